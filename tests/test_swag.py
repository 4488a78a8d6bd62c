"""swa_fast.swag.SWAG against a float64 reference of the paper's formulas (Maddox et al. 2019),
the sampler's statistics, reproducibility, resume and bad input."""

import math

import pytest
import torch
from torch import nn

from swa_fast.swag import SWAG, MultiSWAG, bma_predict

from helpers import force_host_offload


def assert_bitwise(a, b):
    """Two tensors with the same dtype, shape and values (NaNs nowhere: torch.equal)."""
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5)).to(dtype)


def wiggle(model, step, scale=0.1):
    """A deterministic 'training step': every parameter moves (different per step)."""
    gen = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale)


def record(model, swag, steps):
    """Collect ``steps`` times, returning the float64 snapshots of every parameter at each collection."""
    snapshots = []
    for step in range(steps):
        wiggle(model, step)
        swag.collect(model)
        snapshots.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    return snapshots


def reference(snapshots, max_rank):
    """The paper's formulas in float64: mean, population variance, and the deviations x_i - mean_i
    (mean after collection i, as the reference code) of the last max_rank collections, oldest first."""
    names = snapshots[0].keys()
    means, deviations = [], []
    for i in range(len(snapshots)):
        mean = {n: torch.stack([s[n] for s in snapshots[:i + 1]]).mean(0) for n in names}
        means.append(mean)
        deviations.append({n: snapshots[i][n] - mean[n] for n in names})
    stacked = {n: torch.stack([s[n] for s in snapshots]) for n in names}
    variance = {n: stacked[n].var(0, unbiased=False) for n in names}
    last = deviations[-max_rank:] if max_rank else []
    held = {n: torch.stack([d[n] for d in last]) if last else None for n in names}
    return means[-1], variance, held


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("steps,max_rank", [(3, 5), (5, 5), (9, 4), (7, 0)])
def test_moments_and_ring_against_float64_reference(dtype, tol, steps, max_rank):
    model = net(dtype)
    swag = SWAG(model, max_rank=max_rank)
    snapshots = record(model, swag, steps)
    mean, variance, held = reference(snapshots, max_rank)
    got_mean, got_var, got_dev = swag.mean_state(), swag.variance_state(), swag.deviation_state()
    assert swag.n_collected == steps and swag.rank == min(steps, max_rank)
    for name in mean:
        scale = snapshots[-1][name].abs().max().item() + 1e-3
        assert (got_mean[name].double() - mean[name]).abs().max().item() <= tol * scale, name
        assert (got_var[name].double() - variance[name].clamp(min=1e-30)).abs().max().item() <= tol * scale ** 2 * 10
        if max_rank:
            assert got_dev[name].shape == (min(steps, max_rank), *mean[name].shape)
            assert (got_dev[name].double() - held[name]).abs().max().item() <= tol * scale * 10, name
        else:
            assert got_dev[name].shape[0] == 0


def test_mean_is_bitwise_the_swa_average():
    from swa_fast import WeightAverage

    model = net()
    swag, swa = SWAG(model, max_rank=3), WeightAverage(model)
    for step in range(6):
        wiggle(model, step)
        swag.collect(model)
        swa.update(model)
    for name, average in swa.state_dict()["averages"].items():
        assert_bitwise(swag.mean_state()[name], average)


def test_variance_is_sound_for_a_large_mean_and_a_tiny_spread():
    """Weights near 1000 moving by 1e-2: the variance (1e-4) is far below fp32's resolution of
    E[x^2] (1e6 * 6e-8 = 0.06), so E[x^2] - E[x]^2 is noise; the centred recurrence keeps it.

    What fp32 still costs: the stored mean is rounded to half an ulp of 1000 (eps = 3.05e-5) at
    every update, and each deviation is taken from that rounded mean, so the variance carries a
    relative error of about 2 eps / sigma = 0.6% at most per element (eps^2 / sigma^2 = 1e-5 is
    negligible); 2% leaves room for the sample's spread of those errors over 4,096 elements."""
    model = nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.fill_(1000.0)
        model.bias.fill_(-1000.0)
    swag = SWAG(model, max_rank=2)
    gen = torch.Generator().manual_seed(0)
    values = []
    for _ in range(50):
        with torch.no_grad():
            noise = torch.randn(model.weight.shape, generator=gen) * 1e-2
            model.weight.copy_(1000.0 + noise)
        values.append(model.weight.detach().double().clone())
        swag.collect(model)
    truth = torch.stack(values).var(0, unbiased=False)
    got = swag.variance_state()["weight"].double()
    relative = ((got - truth).abs() / truth).max().item()
    assert relative < 0.02, relative
    # What the reference code's E[x^2] - E[x]^2 gives in fp32 on the same values: orders of magnitude off.
    x = torch.stack(values).float()
    naive = ((x * x).mean(0) - x.mean(0) ** 2).double()
    assert ((naive - truth).abs() / truth).max().item() > 10


def flat_gaussian(swag, scale, cov):
    """The Gaussian of the (single-tensor) model's parameters in float64: mean and covariance."""
    mean = torch.cat([t.double().flatten() for t in swag.mean_state().values()])
    var = torch.cat([t.double().flatten() for t in swag.variance_state().values()])
    cov_matrix = torch.diag(var)
    if cov:
        devs = torch.cat([d.double().flatten(1) for d in swag.deviation_state().values()], dim=1)  # (K, d)
        cov_matrix = cov_matrix + devs.T @ devs / (devs.shape[0] - 1)
    return mean, scale * cov_matrix


@pytest.mark.parametrize("cov", [False, True])
def test_sampler_matches_the_gaussian(cov):
    """Empirical mean and covariance of 40,000 samples against the Gaussian's. Each entry is checked
    at 6 standard errors of its estimate (Gaussian samples: se(mean_i) = sqrt(S_ii / n),
    se(cov_ij) = sqrt((S_ii S_jj + S_ij^2) / n)); over the 8 + 36 entries a random seed fails with
    probability below 1e-7 (two-sided 6-sigma tail 2e-9 per entry). The seed is fixed."""
    model = nn.Linear(3, 2).double()
    swag = SWAG(model, max_rank=4)
    record(model, swag, 6)
    n = 40_000
    gen = torch.Generator().manual_seed(7)
    samples = []
    for _ in range(n):
        with swag.sampled_into(model, scale=0.5, cov=cov, generator=gen):
            samples.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    x = torch.stack(samples)
    mean, sigma = flat_gaussian(swag, 0.5, cov)
    se_mean = (sigma.diag() / n).sqrt()
    assert ((x.mean(0) - mean).abs() / se_mean).max().item() < 6
    empirical = torch.cov(x.T, correction=0)
    se_cov = ((torch.outer(sigma.diag(), sigma.diag()) + sigma ** 2) / n).sqrt()
    assert ((empirical - sigma).abs() / se_cov).max().item() < 6


def test_sample_formula_and_scale_zero_is_the_mean():
    model = net(torch.float64)
    swag = SWAG(model, max_rank=3)
    record(model, swag, 5)
    with swag.sampled_into(model, scale=0.0, generator=torch.Generator().manual_seed(0)):
        for name, p in model.named_parameters():
            assert_bitwise(p.detach(), swag.mean_state()[name])
    # cov=False by hand: z1 drawn per parameter in the store's order
    gen = torch.Generator().manual_seed(3)
    with swag.sampled_into(model, scale=0.3, cov=False, generator=gen):
        got = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        z1 = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        want = swag.mean_state()[name] + math.sqrt(0.3) * swag.variance_state()[name].sqrt() * z1
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-15)
    # cov=True by hand: z2 (K values) first, then z1 per parameter
    gen = torch.Generator().manual_seed(4)
    with swag.sampled_into(model, scale=0.3, cov=True, generator=gen):
        got = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(4)
    z2 = torch.randn(3, generator=gen, dtype=torch.float64)
    ring = swag._set.store.blocks
    for name, p in model.named_parameters():
        z1 = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        low = (z2 @ ring[name].double()).reshape(p.shape) / math.sqrt(2)
        want = swag.mean_state()[name] + math.sqrt(0.3) * (swag.variance_state()[name].sqrt() * z1 + low)
        torch.testing.assert_close(got[name], want, rtol=1e-13, atol=1e-15)


def test_samples_are_reproducible_with_a_generator_and_the_model_is_restored():
    model = net()
    swag = SWAG(model, max_rank=4)
    record(model, swag, 5)
    own = {k: v.clone() for k, v in model.state_dict().items()}

    def sample(seed):
        with swag.sampled_into(model, generator=torch.Generator().manual_seed(seed)):
            model.train()
            model(torch.randn(4, 2, 4, 4))  # writes BatchNorm statistics: undone on exit
            return {n: p.detach().clone() for n, p in model.named_parameters()}

    a, b, c = sample(1), sample(1), sample(2)
    for name in a:
        assert_bitwise(a[name], b[name])
        assert not torch.equal(a[name], c[name])
    for key, value in model.state_dict().items():
        assert_bitwise(value, own[key])
    with pytest.raises(ZeroDivisionError):
        with swag.sampled_into(model, generator=torch.Generator().manual_seed(1)):
            1 / 0
    for key, value in model.state_dict().items():
        assert_bitwise(value, own[key])


def test_resume_is_exact():
    model = net()
    swag = SWAG(model, max_rank=3)
    record(model, swag, 5)
    state = {k: v for k, v in swag.state_dict().items()}
    saved = torch.nn.Module()  # a round trip through torch.save, as a checkpoint does
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = SWAG(net(seed=5), max_rank=3)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.n_collected == 5
    for step in range(5, 9):
        wiggle(model, step)
        swag.collect(model)
        resumed.collect(model)
    a, b = swag.state_dict(), resumed.state_dict()
    for key in ("mean", "variance"):
        for name in a[key]:
            assert_bitwise(a[key][name], b[key][name])
    for column in a["deviations"]:
        for name in a["deviations"][column]:
            assert_bitwise(a["deviations"][column][name], b["deviations"][column][name])
    assert int(a["n_averaged"]) == int(b["n_averaged"]) == 9 and a["ring_position"] == b["ring_position"] == 0
    with swag.sampled_into(model, generator=torch.Generator().manual_seed(0)):
        x = [p.detach().clone() for p in model.parameters()]
    with resumed.sampled_into(model, generator=torch.Generator().manual_seed(0)):
        y = [p.detach().clone() for p in model.parameters()]
    for p, q in zip(x, y):
        assert_bitwise(p, q)
    del saved


def test_offloaded_collection_equals_direct():
    model = net()
    direct, offloaded = SWAG(model, max_rank=3), SWAG(model, max_rank=3)
    force_host_offload(offloaded, model)
    for step in range(5):
        wiggle(model, step)
        direct.collect(model)
        offloaded.collect(model)
    for key in ("mean", "variance"):
        for name, value in direct.state_dict()[key].items():
            assert_bitwise(offloaded.state_dict()[key][name], value)
    for name, value in direct.deviation_state().items():
        assert_bitwise(offloaded.deviation_state()[name], value)


def test_low_precision_model_with_fp32_moments():
    model = net(torch.bfloat16)
    swag = SWAG(model, max_rank=3, avg_dtype=torch.float32)
    snapshots = record(model, swag, 5)
    mean, variance, held = reference(snapshots, 3)
    for name in mean:
        assert swag.mean_state()[name].dtype == torch.float32
        torch.testing.assert_close(swag.mean_state()[name].double(), mean[name], rtol=0, atol=1e-5)
        torch.testing.assert_close(swag.variance_state()[name].double(), variance[name], rtol=1e-4, atol=1e-9)
    with swag.sampled_into(model, generator=torch.Generator().manual_seed(0)):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# ---------------------------------------------------------------------------------- bad input


def test_bad_input():
    model = net()
    with pytest.raises(ValueError, match="max_rank"):
        SWAG(model, max_rank=-1)
    with pytest.raises(TypeError, match="max_rank"):
        SWAG(model, max_rank=True)
    with pytest.raises(ValueError, match="var_clamp"):
        SWAG(model, var_clamp=float("nan"))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        SWAG("model")
    swag = SWAG(model, max_rank=1)
    with pytest.raises(RuntimeError, match="at least two"):
        with swag.sampled_into(model):
            pass
    swag.collect(model)
    with pytest.raises(RuntimeError, match="at least two"):
        with swag.sampled_into(model, cov=False):
            pass
    wiggle(model, 0)
    swag.collect(model)
    with pytest.raises(ValueError, match="max_rank >= 2"):
        with swag.sampled_into(model, cov=True):
            pass
    with swag.sampled_into(model, cov=False):
        with pytest.raises(RuntimeError, match="not inside sampled_into"):
            swag.collect(model)
    with pytest.raises(ValueError, match="scale"):
        with swag.sampled_into(model, scale=-1, cov=False):
            pass
    with pytest.raises(TypeError, match="generator must be"):
        with swag.sampled_into(model, cov=False, generator=0):
            pass
    with pytest.raises(ValueError, match="does not have the tensors"):
        swag.collect(nn.Linear(3, 3))


def test_load_state_dict_checks_everything_first():
    model = net()
    swag = SWAG(model, max_rank=3)
    record(model, swag, 4)
    before = {k: v.clone() for k, v in swag.mean_state().items()}
    good = SWAG(model, max_rank=3)
    record(model, good, 2)
    cases = []
    state = dict(good.state_dict())
    state["max_rank"] = 4
    cases.append((state, "max_rank"))
    state = dict(good.state_dict())
    state["ring_position"] = 0
    cases.append((state, "ring_position"))
    state = dict(good.state_dict())
    state["n_averaged"] = torch.tensor([1, 2])
    cases.append((state, "n_averaged"))
    state = dict(good.state_dict())
    state["deviations"] = {**state["deviations"], "2": {k: v[:1] for k, v in state["deviations"]["2"].items()}}
    cases.append((state, "shape"))
    state = dict(good.state_dict())
    del state["variance"]
    cases.append((state, "variance"))
    for bad, words in cases:
        with pytest.raises((ValueError, TypeError), match=words):
            swag.load_state_dict(bad)
        for name, value in swag.mean_state().items():
            assert_bitwise(value, before[name])
        assert swag.n_collected == 4


# ---------------------------------------------------------------------------------- BMA


def loader(n=24, batch=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=gen)
    y = torch.randint(0, 5, (n,), generator=gen)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def test_bma_predict_averages_samples_with_their_own_bn_statistics():
    from swa_fast.swa_utils import update_bn

    model = net()
    swag = SWAG(model, max_rank=3)
    record(model, swag, 4)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    test, train = loader(seed=1), loader(seed=2)
    probs, targets = bma_predict(swag, model, test, n_samples=3, bn_loader=train, generator=torch.Generator().manual_seed(0),
                                 progress=False, return_targets=True)
    assert probs.shape == (24, 5) and probs.dtype == torch.float64
    torch.testing.assert_close(probs.sum(1), torch.ones(24, dtype=torch.float64))
    assert torch.equal(targets, torch.cat([y for _, y in test]))
    gen = torch.Generator().manual_seed(0)
    manual = torch.zeros(24, 5, dtype=torch.float64)
    for _ in range(3):
        with swag.sampled_into(model, generator=gen):
            update_bn(train, model)
            model.eval()
            with torch.no_grad():
                manual += torch.cat([torch.softmax(model(x).double(), 1) for x, _ in test])
    torch.testing.assert_close(probs, manual / 3, rtol=0, atol=1e-12)
    for key, value in model.state_dict().items():
        assert_bitwise(value, own[key])


def test_multiswag_ensembles_runs():
    first, second = net(seed=0), net(seed=1)
    a, b = SWAG(first, max_rank=2), SWAG(second, max_rank=2)
    record(first, a, 3)
    record(second, b, 3)
    test = loader()
    ensemble = bma_predict(MultiSWAG([a, b]), first, test, n_samples=1, scale=0.0, progress=False)
    each = [bma_predict(s, first, test, n_samples=1, scale=0.0, progress=False) for s in (a, b)]
    torch.testing.assert_close(ensemble, (each[0] + each[1]) / 2, rtol=0, atol=1e-12)
    state = MultiSWAG([a, b]).state_dict()
    c, d = SWAG(first, max_rank=2), SWAG(second, max_rank=2)
    MultiSWAG([c, d]).load_state_dict(state)
    assert c.n_collected == 3
    with pytest.raises(ValueError, match="different models"):
        MultiSWAG([a, SWAG(nn.Linear(2, 2))])
