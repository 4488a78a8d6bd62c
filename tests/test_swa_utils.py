"""swa_fast.swa_utils against torch.optim.swa_utils along real training trajectories."""

import copy

import pytest
import torch
from torch import nn
from torch.optim import swa_utils as torch_swa

from swa_fast import swa_utils

from helpers import bn_net, train_with_updates

UPDATES = 50


def train_and_average(model, averaged_models, steps=UPDATES, dtype=torch.float32, poison_at=None):
    """SGD on random data; every averaged model is updated after every step."""
    train_with_updates(model, [m.update_parameters for m in averaged_models], steps, dtype, poison_at)


def max_abs_diff(state_a, state_b):
    return max((state_a[k].double() - state_b[k].double()).abs().max().item() for k in state_a if state_a[k].is_floating_point())


def assert_floating_equal(state_a, state_b):
    for key in state_a:
        if state_a[key].is_floating_point():
            assert torch.equal(state_a[key], state_b[key]), key


@pytest.mark.parametrize("use_buffers", [False, True])
def test_swa_trajectory_matches_torch(use_buffers):
    model = bn_net()
    ours = swa_utils.AveragedModel(model, use_buffers=use_buffers)
    theirs = torch_swa.AveragedModel(model, use_buffers=use_buffers)
    train_and_average(model, [ours, theirs])
    ours_state, their_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == their_state.keys()
    # torch's CPU SWA path divides by n + 1; the fused kernel lerps with 1/(n+1).
    assert max_abs_diff(ours_state, their_state) <= 1e-6
    assert ours.n_averaged.item() == theirs.n_averaged.item() == UPDATES


@pytest.mark.parametrize("use_buffers", [False, True])
def test_ema_trajectory_is_bitwise_torch(use_buffers):
    model = bn_net()
    ours = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
    theirs = torch_swa.AveragedModel(model, multi_avg_fn=torch_swa.get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
    train_and_average(model, [ours, theirs])
    assert_floating_equal(ours.state_dict(), theirs.state_dict())


def test_integer_buffers_are_copied_when_averaging_buffers():
    model = bn_net()
    ours = swa_utils.AveragedModel(model, use_buffers=True)
    train_and_average(model, [ours], steps=7)
    assert ours.module[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 7


def test_buffers_are_copied_without_use_buffers():
    model = bn_net()
    ours = swa_utils.AveragedModel(model)
    train_and_average(model, [ours], steps=5)
    for ours_buffer, model_buffer in zip(ours.module.buffers(), model.buffers()):
        assert torch.equal(ours_buffer, model_buffer)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"avg_fn": torch_swa.get_ema_avg_fn(0.8)},
        {"avg_fn": torch_swa.get_swa_avg_fn()},
        {"multi_avg_fn": torch_swa.get_ema_multi_avg_fn(0.8)},
        {"multi_avg_fn": torch_swa.get_swa_multi_avg_fn()},
    ],
)
def test_custom_functions_run_exactly_as_in_torch(kwargs):
    model = bn_net()
    ours = swa_utils.AveragedModel(model, **kwargs)
    theirs = torch_swa.AveragedModel(model, **kwargs)
    train_and_average(model, [ours, theirs], steps=10)
    assert_floating_equal(ours.state_dict(), theirs.state_dict())


def test_explicit_fused_swa_function_equals_default():
    model = bn_net()
    default = swa_utils.AveragedModel(model)
    explicit = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_swa_multi_avg_fn())
    train_and_average(model, [default, explicit], steps=10)
    assert_floating_equal(default.state_dict(), explicit.state_dict())


def test_fused_functions_called_directly_match_torch():
    generator = torch.Generator().manual_seed(0)
    averaged = [torch.randn(100, generator=generator), torch.randn(3, 3, generator=generator)]
    current = [torch.randn(100, generator=generator), torch.randn(3, 3, generator=generator)]
    for ours_fn, their_fn in [
        (swa_utils.get_ema_multi_avg_fn(0.95), torch_swa.get_ema_multi_avg_fn(0.95)),
        (swa_utils.get_swa_multi_avg_fn(), torch_swa.get_swa_multi_avg_fn()),
    ]:
        for n in (3, torch.tensor(4)):
            ours = [t.clone() for t in averaged]
            theirs = [t.clone() for t in averaged]
            ours_fn(ours, current, n)
            # torch's multi-tensor SWA path is what it runs on GPUs: lerp by 1/(n+1).
            their_fn(theirs, current, n)
            for a, b in zip(ours, theirs):
                assert torch.equal(a, b)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dicts_are_interchangeable(direction):
    model = bn_net()
    source_cls, target_cls = (
        (torch_swa.AveragedModel, swa_utils.AveragedModel)
        if direction == "torch_to_ours"
        else (swa_utils.AveragedModel, torch_swa.AveragedModel)
    )
    source = source_cls(model, multi_avg_fn=None)
    train_and_average(model, [source], steps=6)
    target = target_cls(bn_net())
    target.load_state_dict(source.state_dict())
    assert target.n_averaged.item() == 6
    assert_floating_equal(target.state_dict(), source.state_dict())
    # Both continue identically from the loaded state.
    train_and_average(model, [source, target], steps=4)
    assert max_abs_diff(source.state_dict(), target.state_dict()) <= 1e-6
    assert target.n_averaged.item() == source.n_averaged.item() == 10


@pytest.mark.parametrize("model_dtype", [torch.float16, torch.bfloat16])
def test_fp32_average_of_half_precision_model_against_float64(model_dtype):
    model = bn_net(model_dtype)
    ours = swa_utils.AveragedModel(model, avg_dtype=torch.float32)
    reference = [p.detach().double().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for step in range(UPDATES):
        loss = model(torch.randn(16, 3, 8, 8, generator=generator).to(model_dtype)).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ours.update_parameters(model)
        for ref, p in zip(reference, model.parameters()):
            if step == 0:
                ref.copy_(p.detach().double())
            else:
                ref += (p.detach().double() - ref) / (step + 1)
    for averaged, ref in zip(ours.module.parameters(), reference):
        assert averaged.dtype == torch.float32
        torch.testing.assert_close(averaged.double(), ref, rtol=1e-5, atol=1e-6)


def test_ema_warmup_follows_the_timm_formula():
    model = bn_net()
    gamma, power, decay = 5.0, 0.75, 0.99
    ours = swa_utils.AveragedModel(
        model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(decay, warmup_gamma=gamma, warmup_power=power)
    )
    reference = [p.detach().double().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for step in range(20):
        loss = model(torch.randn(16, 3, 8, 8, generator=generator)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ours.update_parameters(model)
        decay_t = min(decay, max(0.0, 1 - (1 + step / gamma) ** -power))
        for ref, p in zip(reference, model.parameters()):
            ref.copy_(p.detach().double() if step == 0 else decay_t * ref + (1 - decay_t) * p.detach().double())
    for averaged, ref in zip(ours.module.parameters(), reference):
        torch.testing.assert_close(averaged.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_skip_nonfinite_drops_a_poisoned_update(fused):
    model = bn_net()
    kwargs = {} if fused else {"avg_fn": torch_swa.get_swa_avg_fn()}
    guarded = swa_utils.AveragedModel(model, skip_nonfinite=True, **kwargs)
    clean_copy = copy.deepcopy(model)
    train_and_average(model, [guarded], steps=10, poison_at=4)
    assert guarded.n_averaged.item() == 9
    assert guarded.n_skipped.item() == 1
    assert all(torch.isfinite(p).all() for p in guarded.module.parameters())
    assert "n_skipped" not in guarded.state_dict()
    del clean_copy


class ComplexNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.real = nn.Parameter(torch.ones(4))
        self.phase = nn.Parameter(torch.ones(3, dtype=torch.complex64))


@pytest.mark.parametrize("fused", [True, False])
def test_skip_nonfinite_sees_complex_parameters(fused):
    model = ComplexNet()
    kwargs = {} if fused else {"avg_fn": torch_swa.get_swa_avg_fn()}
    guarded = swa_utils.AveragedModel(model, skip_nonfinite=True, **kwargs)
    guarded.update_parameters(model)
    with torch.no_grad():
        model.phase[1] = complex(0.0, float("nan"))
    guarded.update_parameters(model)
    assert guarded.n_averaged.item() == 1 and guarded.n_skipped.item() == 1
    assert torch.isfinite(torch.view_as_real(guarded.module.phase)).all()


class Float8Buffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.register_buffer("scale", torch.tensor([1.0, 2.0]).to(torch.float8_e4m3fn))


@pytest.mark.parametrize("use_buffers", [False, True])
def test_float8_buffers_behave_as_in_torch(use_buffers):
    # float8 has no fused kernel (nor a lerp in torch): copied buffers are copied as torch
    # copies them; averaged ones raise the same way torch's do.
    results = []
    for module in (torch_swa, swa_utils):
        model = Float8Buffer()
        averaged = module.AveragedModel(model, use_buffers=use_buffers)
        try:
            averaged.update_parameters(model)
            model.scale.copy_(torch.tensor([3.0, 4.0]).to(torch.float8_e4m3fn))
            averaged.update_parameters(model)
            results.append(averaged.module.scale.float().tolist())
        except NotImplementedError:
            results.append("not implemented")
    assert results[0] == results[1]
    if not use_buffers:
        assert results[1] == [3.0, 4.0]


def test_cached_lists_follow_a_replaced_layer():
    model = bn_net()
    ours = swa_utils.AveragedModel(model)
    theirs = torch_swa.AveragedModel(model)
    train_and_average(model, [ours, theirs], steps=3)
    plan = ours._average._set._plan
    train_and_average(model, [ours, theirs], steps=2)
    assert ours._average._set._plan is plan  # reused: no per-parameter Python work per update
    torch.manual_seed(5)
    model[4] = nn.Linear(8 * 6 * 6, 10)  # a new layer, same shapes
    train_and_average(model, [ours, theirs], steps=3)
    assert ours._average._set._plan is not plan
    assert max_abs_diff(ours.state_dict(), theirs.state_dict()) <= 1e-6


def test_source_model_changing_dtype_still_averages():
    model = bn_net()
    ours = swa_utils.AveragedModel(model)
    theirs = torch_swa.AveragedModel(model)
    train_and_average(model, [ours, theirs], steps=2)
    model.double()
    train_and_average(model, [ours, theirs], steps=2, dtype=torch.float64)
    assert max_abs_diff(ours.state_dict(), theirs.state_dict()) <= 1e-6


def test_drop_in_types_and_reexports():
    model = nn.Linear(3, 3)
    assert isinstance(swa_utils.AveragedModel(model), torch_swa.AveragedModel)
    assert swa_utils.SWALR is torch_swa.SWALR
    assert swa_utils.get_ema_avg_fn is torch_swa.get_ema_avg_fn
    assert swa_utils.get_swa_avg_fn is torch_swa.get_swa_avg_fn
    assert set(swa_utils.__all__) == set(torch_swa.__all__)


def test_averaged_model_on_explicit_device_and_moved():
    model = bn_net()
    ours = swa_utils.AveragedModel(model, device="cpu")
    train_and_average(model, [ours], steps=2)
    ours.to(torch.float64)
    assert ours._average._set._plan is None
    train_and_average(model, [ours], steps=2)
    assert ours.n_averaged.item() == 4


# --- update_bn ---------------------------------------------------------------


def batches(count=6, generator_seed=3):
    generator = torch.Generator().manual_seed(generator_seed)
    return [(torch.randn(8, 3, 8, 8, generator=generator), torch.zeros(8)) for _ in range(count)]


def test_update_bn_matches_torch():
    model = bn_net()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    ours.eval()
    theirs.eval()
    swa_utils.update_bn(batches(), ours)
    torch_swa.update_bn(batches(), theirs)
    for a, b in zip(ours.buffers(), theirs.buffers()):
        assert torch.equal(a, b)
    assert not ours.training
    assert ours[1].momentum == 0.1


def test_update_bn_forward_fn_with_dict_batches_and_progress():
    model = bn_net()
    reference = copy.deepcopy(model)
    swa_utils.update_bn(batches(), reference)
    dict_batches = [{"image": x, "label": y} for x, y in batches()]
    swa_utils.update_bn(
        dict_batches, model, device="cpu", forward_fn=lambda m, batch: m(batch["image"]), progress=True
    )
    for a, b in zip(model.buffers(), reference.buffers()):
        assert torch.equal(a, b)


def test_update_bn_restores_state_when_forward_raises():
    model = bn_net()
    model.eval()

    def broken(m, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        swa_utils.update_bn(batches(), model, forward_fn=broken)
    assert not model.training
    assert model[1].momentum == 0.1


def test_update_bn_runs_without_grad():
    model = bn_net()
    seen = []
    swa_utils.update_bn(batches(2), model, forward_fn=lambda m, b: seen.append(torch.is_grad_enabled()) or m(b[0]))
    assert seen == [False, False]


# ---------------------------------------------------------------------------
# The cached plan never gives a wrong answer: copies, pickles, replaced tensors
# ---------------------------------------------------------------------------


def test_deepcopy_after_an_update_averages_the_model_it_is_given():
    model = bn_net()
    ours = swa_utils.AveragedModel(model)
    theirs = torch_swa.AveragedModel(model)
    train_and_average(model, [ours, theirs], steps=2)
    ours_copy, theirs_copy = copy.deepcopy(ours), copy.deepcopy(theirs)
    train_and_average(model, [ours_copy, theirs_copy], steps=3)  # the copies follow the live model
    assert max_abs_diff(ours_copy.state_dict(), theirs_copy.state_dict()) <= 1e-6
    assert max_abs_diff(ours_copy.state_dict(), ours.state_dict()) > 1e-4  # and moved away from the original


@pytest.mark.parametrize("save", ["pickle", "torch.save"])
def test_an_updated_averaged_model_can_be_pickled_whole(save, tmp_path):
    import pickle

    model = bn_net()
    ours = swa_utils.AveragedModel(model)
    train_and_average(model, [ours], steps=2)
    if save == "pickle":
        loaded = pickle.loads(pickle.dumps(ours))
    else:
        torch.save(ours, tmp_path / "whole.pt")
        loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert_floating_equal(loaded.state_dict(), ours.state_dict())
    train_and_average(model, [loaded, ours], steps=2)  # the loaded one builds its own plan
    assert_floating_equal(loaded.state_dict(), ours.state_dict())


def test_a_parameter_replaced_through_the_module_dict_is_followed():
    model = bn_net()
    ours = swa_utils.AveragedModel(model)
    theirs = torch_swa.AveragedModel(model)
    train_and_average(model, [ours, theirs], steps=2)
    # No registration hook fires for a direct dict write: the per-update check must see it.
    model[4]._parameters["weight"] = nn.Parameter(torch.randn_like(model[4].weight))
    train_and_average(model, [ours, theirs], steps=2)
    assert max_abs_diff(ours.state_dict(), theirs.state_dict()) <= 1e-6


def test_to_with_overwritten_parameters_is_followed():
    model = bn_net()
    ours = swa_utils.AveragedModel(model)
    theirs = torch_swa.AveragedModel(model)
    train_and_average(model, [ours, theirs], steps=2)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        old = model[0].weight
        model.to(torch.float64)  # new Parameter objects, in the module dicts directly
        assert model[0].weight is not old
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    train_and_average(model, [ours, theirs], steps=2, dtype=torch.float64)
    assert max_abs_diff(ours.state_dict(), theirs.state_dict()) <= 1e-6


def test_a_dtype_change_of_a_later_parameter_is_followed():
    model = bn_net()
    ours = swa_utils.AveragedModel(model)
    theirs = torch_swa.AveragedModel(model)
    train_and_average(model, [ours, theirs], steps=2)
    with torch.no_grad():  # same Parameter object, new dtype: only the per-tensor check sees it
        model[4].bias.data = model[4].bias.data.double()
    for averaged in (ours, theirs):
        averaged.update_parameters(model)
    assert max_abs_diff(ours.state_dict(), theirs.state_dict()) <= 1e-6
