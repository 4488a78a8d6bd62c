"""swa_fast.integrations.lightning against the installed Lightning's own callbacks, on the CPU.

Each test trains the same tiny BatchNorm model on the same synthetic data with swa_fast's callback
and with Lightning's (same seed) and compares what they produce:

* ``WeightAveraging`` with the same lerp on both sides (swa_fast's fused SWA or EMA against torch's
  ``get_swa_multi_avg_fn``/``get_ema_multi_avg_fn`` in Lightning's callback) and with a per-tensor
  ``avg_fn``: the averaged weights, what validation sees, the validation losses and the model's own
  trajectory are bitwise Lightning's. Integer buffers (``num_batches_tracked``) differ by design:
  swa_fast copies them, torch's AveragedModel stores a truncated average.
* ``WeightAveraging()`` against Lightning's default: torch's AveragedModel averages on the CPU as
  ``avg + (w - avg) / (n + 1)`` (its foreach lerp is for CUDA), the fused default is the lerp:
  within ``4 * eps * M * updates``.
* ``EMAWeightAveraging`` against Lightning's (``decay * ema + (1 - decay) * w`` per tensor, not a
  lerp): within ``8 * eps * M * min(updates, 1 / (1 - decay))`` (a few roundings per update on each
  side, contracted by ``decay``; ``M`` the largest magnitude seen).
* ``StochasticWeightAveraging``: bitwise with ``avg_fn`` given (run as Lightning runs it); without
  it ``lerp`` against Lightning's ``avg + (w - avg) / (n + 1)``: within ``4 * eps * M`` per update
  for the averages, and the BatchNorm statistics recomputed from them within 1e-5.

Checkpoints written by either class resume with the other; a resumed run equals an uninterrupted
one. Two gloo processes (tests/lightning_worker.py) run DDP and FSDP2 (ModelParallelStrategy).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:  # the package swa_fast.integrations.lightning subclasses: lightning.pytorch first, as it does
    import lightning.pytorch as pl
except ImportError:
    pl = pytest.importorskip("pytorch_lightning")

from torch.optim.swa_utils import get_ema_multi_avg_fn as torch_ema_fn  # noqa: E402
from torch.optim.swa_utils import get_swa_avg_fn  # noqa: E402
from torch.optim.swa_utils import get_swa_multi_avg_fn as torch_swa_fn  # noqa: E402

from swa_fast.integrations import lightning as fast  # noqa: E402
from swa_fast.swa_utils import get_ema_multi_avg_fn as fast_ema_fn  # noqa: E402

from helpers import run_ranks  # noqa: E402

theirs = pl.callbacks
WORKER = Path(__file__).with_name("lightning_worker.py")
EPS = torch.finfo(torch.float32).eps

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        self.val_losses: List[torch.Tensor] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.val_losses.append(loss.detach().clone())
        self.log("val_loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def loader(seed: int = 1, n: int = 64) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator) * 2 + 0.5
    y = (x[:, 0] > 0).long() + (x[:, 1] * x[:, 2] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Probe(pl.Callback):
    """Records the model at the hooks it is given (placed before or after the callback under test)."""

    def __init__(self) -> None:
        self.val_start: List[dict] = []
        self.val_end: List[dict] = []
        self.train_end = None
        self.max_abs = 0.0

    def on_validation_epoch_start(self, trainer, pl_module):
        self.val_start.append(state(pl_module))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.val_end.append(state(pl_module))

    def on_train_end(self, trainer, pl_module):
        self.train_end = state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.max_abs = max([self.max_abs] + [v.abs().max().item() for v in pl_module.state_dict().values()
                                             if v.is_floating_point()])


def fit(callbacks, max_epochs=3, val=True, ckpt_path=None, checkpoint_dir=None):
    pl.seed_everything(0, verbose=False)
    model = Net()
    extra = [pl.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, filename="{epoch}", save_top_k=-1,
                                          every_n_epochs=1)] if checkpoint_dir else []
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, enable_progress_bar=False,
                         logger=False, enable_model_summary=False, enable_checkpointing=bool(checkpoint_dir),
                         num_sanity_val_steps=1 if val else 0, limit_val_batches=2 if val else 0,
                         callbacks=list(callbacks) + extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=loader(), val_dataloaders=loader(2, 32) if val else None,
                    ckpt_path=ckpt_path)
    return model, trainer


def floats(d):
    return {k: v for k, v in d.items() if v.is_floating_point()}


def assert_equal(a, b, only_floats=False):
    if only_floats:
        a, b = floats(a), floats(b)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def run_pair(ours, lightnings, **kw):
    """One fit with each callback, probes around it; returns (model, probe_before, probe_after) per run."""
    runs = []
    for callback in (ours, lightnings):
        before, after = Probe(), Probe()
        model, _ = fit([before, callback, after], **kw)
        runs.append((model, before, after))
    return runs


@pytest.fixture(scope="module")
def plain():
    """The trajectory without averaging: the model's own weights at the end and at each validation."""
    probe = Probe()
    fit([probe])
    return probe


def check_against(runs, plain_probe, bitwise_floats=True, updated_at_last_step=True):
    (ours, ob, oa), (lights, _, la) = runs
    # The model's own weights: before each validation as without averaging, and restored after it.
    for before, after, own in zip(ob.val_start, oa.val_end, plain_probe.val_start):
        assert_equal(before, own)
        assert_equal(after, own)
    assert_equal(ob.train_end, plain_probe.train_end)
    if bitwise_floats:
        # What validation saw (the averages swapped in) and the final averaged model: Lightning's.
        assert len(oa.val_start) == len(la.val_start) == len(plain_probe.val_start)
        for a, b in zip(oa.val_start, la.val_start):
            assert_equal(a, b, only_floats=True)
        assert_equal(state(ours), state(lights), only_floats=True)
        assert torch.equal(torch.stack(ours.val_losses), torch.stack(lights.val_losses))
    # Integer buffers are copied from the model (torch's AveragedModel truncates an average of them).
    for key, value in state(ours).items() if updated_at_last_step else ():
        if not value.is_floating_point():
            assert torch.equal(value, plain_probe.train_end[key]), key


def max_gap(a, b):
    a, b = floats(a), floats(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_weight_averaging_default_swa_bounded(plain):
    """The default (SWA) is the fused lerp(avg, w, 1/(n+1)); torch's AveragedModel computes it as
    avg + (w - avg) / (n + 1) on the CPU (its foreach lerp runs on CUDA only): a couple of roundings
    apart per update, which the 1/(n+1) weights of later updates shrink: within 4 * eps * M * updates."""
    runs = run_pair(fast.WeightAveraging(), theirs.WeightAveraging())
    check_against(runs, plain, bitwise_floats=False)
    (ours, ob, oa), (lights, _, la) = runs
    bound = 4 * EPS * max(ob.max_abs, 1.0) * 12
    assert max_gap(state(ours), state(lights)) <= bound
    for a, b in zip(oa.val_start, la.val_start):
        assert max_gap(a, b) <= bound
    torch.testing.assert_close(torch.stack(ours.val_losses), torch.stack(lights.val_losses), rtol=1e-5, atol=1e-6)


def test_weight_averaging_swa_lerp_no_buffers_bitwise(plain):
    """The fused default against Lightning's with torch's lerp SWA (get_swa_multi_avg_fn, which with
    use_buffers=True fails on BatchNorm's integer count in torch), use_buffers=False (the buffers of
    the last update swapped in, saved and copied at the end, as torch's AveragedModel keeps them),
    updating every third step so those buffers are not the model's: every tensor bitwise."""

    def every_third(self, step_idx=None, epoch_idx=None):
        return step_idx is not None and step_idx % 3 == 0

    ours = type("Ours", (fast.WeightAveraging,), {"should_update": every_third})
    lights = type("Theirs", (theirs.WeightAveraging,), {"should_update": every_third})
    runs = run_pair(ours(use_buffers=False), lights(use_buffers=False, multi_avg_fn=torch_swa_fn()))
    check_against(runs, plain, updated_at_last_step=False)
    (ours, _, oa), (lights, _, la) = runs
    assert_equal(state(ours), state(lights))
    for a, b in zip(oa.val_start, la.val_start):
        assert_equal(a, b)


def test_weight_averaging_avg_fn_bitwise(plain):
    """A per-tensor avg_fn runs unfused, as torch runs it: the floats bitwise."""
    avg_fn = get_swa_avg_fn()
    check_against(run_pair(fast.WeightAveraging(avg_fn=avg_fn), theirs.WeightAveraging(avg_fn=avg_fn)), plain)


def test_ema_bitwise_torch_lerp_ema(plain):
    """Ours against Lightning's WeightAveraging with torch's (lerp) EMA and EMAWeightAveraging's rule."""

    class LerpEMA(theirs.EMAWeightAveraging):
        def __init__(self, decay, **rule):
            theirs.WeightAveraging.__init__(self, multi_avg_fn=torch_ema_fn(decay))
            self.update_every_n_steps = rule.get("update_every_n_steps", 1)
            self.update_starting_at_step = rule.get("update_starting_at_step")
            self.update_starting_at_epoch = rule.get("update_starting_at_epoch")

    rule = dict(update_every_n_steps=2, update_starting_at_step=3)
    runs = run_pair(fast.EMAWeightAveraging(decay=0.8, **rule), LerpEMA(0.8, **rule))
    check_against(runs, plain, updated_at_last_step=False)  # steps 4, 6, 8, 10 of 0..11


def test_ema_against_lightning_ema_bounded(plain):
    decay = 0.8
    runs = run_pair(fast.EMAWeightAveraging(decay=decay), theirs.EMAWeightAveraging(decay=decay))
    check_against(runs, plain, bitwise_floats=False)
    (ours, ob, _), (lights, _, _) = runs
    updates = 12  # 3 epochs x 4 steps
    bound = 8 * EPS * max(ob.max_abs, 1.0) * min(updates, 1 / (1 - decay))
    a, b = floats(state(ours)), floats(state(lights))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= bound, (worst, bound)
    torch.testing.assert_close(torch.stack(ours.val_losses), torch.stack(lights.val_losses), rtol=1e-5, atol=1e-6)


def test_ema_warmup_follows_the_step():
    """decay_t = min(decay, 1 - (1 + t / gamma) ** -power), t = trainer.global_step, first update a copy."""
    decay, gamma, power = 0.95, 3.0, 0.75
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append((trainer.global_step, {k: v.detach().clone() for k, v in pl_module.named_parameters()}))

    callback = fast.EMAWeightAveraging(decay=decay, warmup_gamma=gamma, warmup_power=power)
    model, _ = fit([Record(), callback], max_epochs=2, val=False)
    ema = None
    for step, weights in seen:
        if ema is None:
            ema = dict(weights)
            continue
        decay_t = min(decay, 1 - (1 + step / gamma) ** -power)
        weight = torch.tensor(1 - decay_t, dtype=torch.float64).float()
        ema = {k: torch.lerp(ema[k], weights[k], weight) for k in ema}
    for name, value in model.named_parameters():
        assert torch.equal(value.detach(), ema[name]), name
    assert int(callback.average.n_averaged) == len(seen)


@pytest.mark.parametrize("rule", ["every_3_steps", "epochs_only"])
def test_should_update_overrides(plain, rule):
    def should_update(self, step_idx=None, epoch_idx=None):
        if rule == "every_3_steps":
            return step_idx is not None and step_idx % 3 == 2
        return epoch_idx is not None

    ours = type("Ours", (fast.WeightAveraging,), {"should_update": should_update})(multi_avg_fn=fast_ema_fn(0.8))
    lights = type("Theirs", (theirs.WeightAveraging,), {"should_update": should_update})
    runs = run_pair(ours, lights(multi_avg_fn=torch_ema_fn(0.8)))
    check_against(runs, plain)
    assert int(ours.average.n_averaged) == (4 if rule == "every_3_steps" else 3)  # steps 2, 5, 8, 11; 3 epochs


# ---------------------------------------------------------------------------- checkpoints


def make_ema(name):
    if name == "ours":
        return fast.WeightAveraging(multi_avg_fn=fast_ema_fn(0.8))
    return theirs.WeightAveraging(multi_avg_fn=torch_ema_fn(0.8))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """4 epochs with each class (no validation), a checkpoint after every epoch. The EMA of torch's
    get_ema_multi_avg_fn (a lerp) on both sides: the floats are bitwise the same."""
    out = {}
    for name in ("ours", "theirs"):
        root = tmp_path_factory.mktemp(name)
        model, _ = fit([make_ema(name)], max_epochs=4, val=False, checkpoint_dir=root)
        out[name] = (root, state(model))
    return out


def test_checkpoint_layout_is_lightnings(checkpoints):
    ours = torch.load(checkpoints["ours"][0] / "epoch=1.ckpt", weights_only=False)
    lights = torch.load(checkpoints["theirs"][0] / "epoch=1.ckpt", weights_only=False)
    for key in ("state_dict", "current_model_state", "averaging_state"):
        assert ours[key].keys() == lights[key].keys(), key
        assert_equal(ours[key], lights[key], only_floats=True)
    assert ours["callbacks"].keys() == lights["callbacks"].keys()
    assert "WeightAveraging" in ours["callbacks"]
    assert ours["callbacks"]["WeightAveraging"] == lights["callbacks"]["WeightAveraging"] == {"latest_update_step": 8}
    assert int(ours["averaging_state"]["n_averaged"]) == int(lights["averaging_state"]["n_averaged"]) == 8


@pytest.mark.parametrize("written, resumed", [("theirs", "ours"), ("ours", "theirs"), ("ours", "ours")])
def test_checkpoint_interchange_and_resume(checkpoints, written, resumed):
    """Resume from the checkpoint after 2 of 4 epochs, written by one class, with the other: the end
    equals the uninterrupted run of the resuming class (bitwise; everything with swa_fast on both sides)."""
    model, _ = fit([make_ema(resumed)], max_epochs=4, val=False, ckpt_path=checkpoints[written][0] / "epoch=1.ckpt")
    assert_equal(state(model), checkpoints[resumed][1], only_floats=written != resumed)


@pytest.mark.parametrize("kind", ["ema_warmup_every_3", "ema_no_buffers"])
def test_resume_equals_uninterrupted(tmp_path, kind):
    """swa_fast on both sides: every tensor bitwise, the buffers kept without use_buffers included."""

    def make():
        if kind == "ema_warmup_every_3":
            return fast.EMAWeightAveraging(decay=0.8, update_every_n_steps=3, warmup_gamma=2.0)
        return fast.WeightAveraging(use_buffers=False, multi_avg_fn=fast_ema_fn(0.7))

    whole, _ = fit([make()], max_epochs=3, val=False, checkpoint_dir=tmp_path)
    resumed, _ = fit([make()], max_epochs=3, val=False, ckpt_path=tmp_path / "epoch=0.ckpt")
    assert_equal(state(resumed), state(whole))


def test_plain_checkpoint_initializes_the_averages(tmp_path):
    """A checkpoint written without the callback: Lightning's rule (averages from state_dict, count 0)."""
    fit([], max_epochs=1, val=False, checkpoint_dir=tmp_path)
    results = []
    for name in ("ours", "theirs"):
        model, _ = fit([make_ema(name)], max_epochs=2, val=False, ckpt_path=tmp_path / "epoch=0.ckpt")
        results.append(state(model))
    assert_equal(results[0], results[1], only_floats=True)


# ---------------------------------------------------------------------------- StochasticWeightAveraging


SWA_ARGS = dict(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=1)


@pytest.mark.parametrize("given_avg_fn", [True, False], ids=["avg_fn", "fused"])
def test_stochastic_weight_averaging_matches_lightning(given_avg_fn):
    kw = dict(SWA_ARGS, avg_fn=get_swa_avg_fn()) if given_avg_fn else SWA_ARGS
    runs = run_pair(fast.StochasticWeightAveraging(**kw), theirs.StochasticWeightAveraging(**kw),
                    max_epochs=4, val=False)
    (ours, ob, _), (lights, _, _) = runs
    a, b = state(ours), state(lights)
    assert a.keys() == b.keys()
    if given_avg_fn:
        assert_equal(a, b)
        return
    # 3 updates (epochs 1, 2, 3) of lerp against Lightning's division form; the BatchNorm statistics
    # are recomputed from the averaged weights in the extra epoch.
    bound = 3 * 4 * EPS * max(ob.max_abs, 1.0)
    parameters = {name for name, _ in ours.named_parameters()}
    for key in a:
        if key in parameters:
            assert (a[key] - b[key]).abs().max().item() <= bound, key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_stochastic_weight_averaging_checkpoint_interchange(tmp_path):
    """Lightning's SWA checkpoint (mid-SWA) resumed by ours and ours by Lightning's: the end is the
    uninterrupted run's (avg_fn given: the same arithmetic on both sides)."""
    kw = dict(SWA_ARGS, avg_fn=get_swa_avg_fn())
    ends = {}
    for name, make in (("ours", fast.StochasticWeightAveraging), ("theirs", theirs.StochasticWeightAveraging)):
        model, _ = fit([make(**kw)], max_epochs=4, val=False, checkpoint_dir=tmp_path / name)
        ends[name] = state(model)
    saved = [torch.load(tmp_path / name / "epoch=2.ckpt", weights_only=False)["callbacks"]["StochasticWeightAveraging"]
             for name in ("ours", "theirs")]
    assert saved[0].keys() == saved[1].keys()
    assert saved[0]["n_averaged"] == saved[1]["n_averaged"] == 2
    assert saved[0]["average_model_state"].keys() == saved[1]["average_model_state"].keys()
    # The averaged parameters; the averaged copy's buffers are never used (see the class docstring).
    parameters = {name for name, _ in Net().named_parameters()}
    assert_equal(*({k: v for k, v in s["average_model_state"].items() if k in parameters} for s in saved))
    for written, make in (("theirs", fast.StochasticWeightAveraging), ("ours", theirs.StochasticWeightAveraging)):
        model, _ = fit([make(**kw)], max_epochs=4, val=False, ckpt_path=tmp_path / written / "epoch=2.ckpt")
        assert_equal(state(model), ends[written])


# ---------------------------------------------------------------------------- distributed


def test_ddp_two_processes(tmp_path):
    """Lightning's DDP strategy on 2 gloo ranks: the averaged parameters are identical on both ranks and,
    rank by rank, Lightning's own callback's (bitwise)."""
    run_ranks(WORKER, ["ddp", str(tmp_path)], 2)
    ranks = [torch.load(tmp_path / f"ddp-rank{rank}.pt", weights_only=True) for rank in range(2)]
    for result in ranks:
        assert_equal(result["ours"], result["theirs"], only_floats=True)
        assert result["n_averaged"] == 12
    # BatchNorm's statistics are each rank's own under DDP (in the model as in its averages).
    params = [{k: v for k, v in r["ours"].items() if k in r["parameters"]} for r in ranks]
    assert_equal(params[0], params[1])
    for result in ranks:
        assert result["restored"]


def test_fsdp2_model_parallel_two_processes(tmp_path):
    """An FSDP2 model (fully_shard in configure_model) under ModelParallelStrategy on 2 gloo ranks: the
    EMA of the local shards equals the EMA of the gathered trajectory, validation sees it and gives the
    model its weights back, the end copies it in, and a run resumed from a distributed checkpoint ends
    as the uninterrupted one."""
    run_ranks(WORKER, ["fsdp", str(tmp_path)], 2, timeout=180)
    ranks = [torch.load(tmp_path / f"fsdp-rank{rank}.pt", weights_only=True) for rank in range(2)]
    for result in ranks:
        for name, value in result["reference"].items():
            assert torch.equal(result["final"][name], value), name
        assert result["restored"] and result["swapped_in"]
        assert_equal(result["resumed"], result["final"])
        assert_equal(result["resumed_full"], result["final"])
        assert result["layout"] == {"sharded": True, "distributed_checkpoint": True, "current_in_full": True,
                                    "n_averaged_saved": 4, "n_averaged": 8, "n_averaged_resumed": 8,
                                    "full_checkpoint": True}
    assert_equal(ranks[0]["final"], ranks[1]["final"])


def test_refusals_are_clear():
    """FSDP1 (FSDPStrategy) for the weight-averaging callbacks, any FSDP2 model for
    StochasticWeightAveraging (a deep copy), unknown averaging arguments."""
    from types import SimpleNamespace

    FSDPStrategy, ModelParallelStrategy = pl.strategies.FSDPStrategy, pl.strategies.ModelParallelStrategy
    MisconfigurationException = fast.MisconfigurationException

    with pytest.raises(MisconfigurationException, match="FSDP2"):
        fast.EMAWeightAveraging().setup(SimpleNamespace(strategy=FSDPStrategy()), Net(), "fit")
    with pytest.raises(MisconfigurationException, match="deep copy"):
        fast.StochasticWeightAveraging(swa_lrs=0.1).setup(SimpleNamespace(strategy=ModelParallelStrategy()), Net(),
                                                          "fit")
    with pytest.raises(TypeError, match="decay"):
        fast.WeightAveraging(decay=0.9)
    with pytest.raises(ValueError, match="only one"):
        fast.WeightAveraging(avg_fn=get_swa_avg_fn(), multi_avg_fn=fast_ema_fn(0.9))
