"""MultiAverage: K averages of one model in one fused pass, bitwise the same as K separate
WeightAverages; each average a WeightAverage of its own (swap-in, copy-out, state dicts, its own
counts); checkpoints of the whole set checked before anything is written; the step-driven
warm-up; and what the core offers beyond torch (include, to, averaged_copy, module_state_dict)."""

import io

import pytest
import torch
from torch import nn

from swa_fast import MultiAverage, WeightAverage, swa_utils

from helpers import assert_bitwise, bn_net, bn_net_inputs, force_host_offload, train_with_updates

STEPS = 7


def custom_halfway(averages, currents, n_averaged):
    torch._foreach_lerp_(averages, currents, 0.5)


FNS = {
    "swa": lambda: None,
    "ema": lambda: swa_utils.get_ema_multi_avg_fn(0.9),
    "ema_warmup": lambda: swa_utils.get_ema_multi_avg_fn(0.999, warmup_gamma=3.0, warmup_power=0.75),
    "swa_fn": lambda: swa_utils.get_swa_multi_avg_fn(),
}


@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_averages_in_one_pass_equal_k_separate_averages(k, use_buffers):
    model = bn_net()
    names = sorted(FNS)[:k]
    multi = MultiAverage(model, {n: FNS[n]() for n in names}, use_buffers, skip_nonfinite=True)
    separate = {n: WeightAverage(model, FNS[n](), use_buffers, skip_nonfinite=True) for n in names}
    train_with_updates(model, [multi.update] + [a.update for a in separate.values()], STEPS, poison_at=2)
    for name in names:
        assert_bitwise(multi[name].state_dict()["averages"], separate[name].state_dict()["averages"])
        assert multi[name].n_averaged.item() == separate[name].n_averaged.item() == STEPS - 1
        assert multi[name].n_skipped.item() == 1


def test_fp32_averages_of_a_bf16_model_and_a_custom_function_alongside():
    model = bn_net(torch.bfloat16)
    fns = {"ema": swa_utils.get_ema_multi_avg_fn(0.9), "swa": None, "custom": custom_halfway}
    multi = MultiAverage(model, fns, avg_dtype=torch.float32)
    separate = {n: WeightAverage(model, fn, avg_dtype=torch.float32) for n, fn in fns.items()}
    train_with_updates(model, [multi.update] + [a.update for a in separate.values()], STEPS, torch.bfloat16)
    for name in fns:
        averages = multi[name].state_dict()["averages"]
        assert all(t.dtype == torch.float32 for t in averages.values())
        assert_bitwise(averages, separate[name].state_dict()["averages"])


def test_the_averages_are_weight_averages_with_their_own_counts():
    model = bn_net()
    multi = MultiAverage(model, {"swa": None, "ema": swa_utils.get_ema_multi_avg_fn(0.9)})
    swa, ema = WeightAverage(model), WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.9))
    assert isinstance(multi["swa"], WeightAverage) and multi["ema"].multi_avg_fn is not None
    assert list(multi) == ["swa", "ema"] and len(multi) == 2 and "ema" in multi
    train_with_updates(model, [multi.update, swa.update, ema.update], 3)
    train_with_updates(model, [multi["swa"].update, swa.update], 2)  # one of them alone
    train_with_updates(model, [multi.update, swa.update, ema.update], 2)  # each from its own count
    assert multi["swa"].n_averaged.item() == 7 and multi["ema"].n_averaged.item() == 5
    assert_bitwise(multi["swa"].state_dict()["averages"], swa.state_dict()["averages"])
    assert_bitwise(multi["ema"].state_dict()["averages"], ema.state_dict()["averages"])
    with pytest.raises(KeyError, match="no average 'emma'; it has \\['swa', 'ema'\\]"):
        multi["emma"]


def test_swapped_into_and_copy_to_use_one_average():
    model = bn_net()
    multi = MultiAverage(model, {"swa": None, "ema": swa_utils.get_ema_multi_avg_fn(0.5)})
    train_with_updates(model, [multi.update], 3)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    for name in multi:
        averages = {k: v.clone() for k, v in multi[name].state_dict()["averages"].items()}
        with multi[name].swapped_into(model):
            for key, parameter in model.named_parameters():
                assert torch.equal(parameter, averages[key])
            with pytest.raises(RuntimeError, match="not inside swapped_into"):
                multi.update(model)
        assert_bitwise(model.state_dict(), own)
    multi["ema"].copy_to(model)
    assert torch.equal(model[0].weight, multi["ema"].state_dict()["averages"]["0.weight"])


def test_host_offloaded_multi_average_equals_the_direct_one():
    model = bn_net()
    fns = lambda: {"swa": None, "ema": swa_utils.get_ema_multi_avg_fn(0.9)}  # noqa: E731
    direct = MultiAverage(model, fns(), use_buffers=True)
    piped = MultiAverage(model, fns(), use_buffers=True)
    force_host_offload(piped, model)
    train_with_updates(model, [direct.update, piped.update], STEPS)
    assert piped._set._offload is not None
    for name in direct:
        assert_bitwise(piped[name].state_dict()["averages"], direct[name].state_dict()["averages"])


# --- the step-driven warm-up ---------------------------------------------------------------------


def test_update_with_a_step_warms_up_by_the_step():
    """timm's ModelEmaV3.update(model, step): decay_t = min(decay, 1 - (1 + step/gamma)^-power)."""
    fn = swa_utils.get_ema_multi_avg_fn(0.99, warmup_gamma=1.0, warmup_power=0.75)
    model = bn_net()
    average = WeightAverage(model, fn)
    train_with_updates(model, [average.update], 1)  # the first update copies
    before = {k: v.clone() for k, v in average.state_dict()["averages"].items()}
    step = 40
    decay = min(0.99, 1 - (1 + step / 1.0) ** -0.75)
    average.update(model, step=step)
    for name, parameter in model.named_parameters():
        expected = torch.lerp(before[name], parameter.detach(), torch.tensor(1 - decay, dtype=torch.float64).float())
        assert torch.allclose(average.state_dict()["averages"][name], expected, rtol=0, atol=1e-7), name
    average.update(model, step=torch.tensor(41))  # a tensor step (on the device: no sync)
    for bad, error in ((-1, ValueError), (2.5, TypeError), (torch.tensor([1, 2]), ValueError),
                       (torch.tensor(1.5), ValueError), (True, TypeError)):
        with pytest.raises(error, match="step must be"):
            average.update(model, step=bad)
    assert average.n_averaged.item() == 3


# --- checkpoints of the set -------------------------------------------------------------------------


def test_state_dict_round_trip_and_continuation():
    model = bn_net()
    fns = lambda: {"swa": None, "ema": swa_utils.get_ema_multi_avg_fn(0.9)}  # noqa: E731
    multi = MultiAverage(model, fns(), use_buffers=True)
    train_with_updates(model, [multi.update], 4)
    buffer = io.BytesIO()
    torch.save(multi.state_dict(), buffer)
    buffer.seek(0)
    restored = MultiAverage(bn_net(), fns(), use_buffers=True)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    train_with_updates(model, [multi.update, restored.update], 3)
    for name in multi:
        assert_bitwise(restored[name].state_dict()["averages"], multi[name].state_dict()["averages"])
        assert restored[name].n_averaged.item() == 7


def test_load_state_dict_checks_every_average_before_writing_any():
    model = bn_net()
    multi = MultiAverage(model, {"a": None, "b": swa_utils.get_ema_multi_avg_fn(0.9)})
    train_with_updates(model, [multi.update], 3)
    before = {n: {k: v.clone() for k, v in multi[n].state_dict()["averages"].items()} for n in multi}
    state = {n: {"averages": {k: v + 1 for k, v in before[n].items()}, "n_averaged": 9} for n in multi}
    state["b"]["n_averaged"] = -1
    with pytest.raises(ValueError, match="'b': n_averaged must be"):
        multi.load_state_dict(state)
    del state["b"]
    with pytest.raises(ValueError, match=r"missing averages \['b'\]"):
        multi.load_state_dict(state)
    for name in multi:
        assert_bitwise(multi[name].state_dict()["averages"], before[name])
        assert multi[name].n_averaged.item() == 3
    state["c"] = {}
    keys = multi.load_state_dict(state, strict=False)
    assert keys.missing_keys == ["b"] and keys.unexpected_keys == ["c"]
    assert multi["a"].n_averaged.item() == 9 and multi["b"].n_averaged.item() == 3


def test_bad_arguments():
    model = bn_net()
    for fns, match in (({}, "non-empty dict"), ([None], "non-empty dict"), ({"": None}, "non-empty strings"),
                       ({"a": 0.9}, "must be callable")):
        with pytest.raises(TypeError, match=match):
            MultiAverage(model, fns)


# --- beyond torch: include, to, averaged_copy, module_state_dict -----------------------------


def test_include_by_names_and_by_predicate():
    model = bn_net()
    model[0].requires_grad_(False)  # a frozen part
    by_predicate = WeightAverage(model, include=lambda name, tensor: tensor.requires_grad)
    by_names = WeightAverage(model, include=["4.weight", "4.bias"])
    assert list(by_predicate.state_dict()["averages"]) == ["1.weight", "1.bias", "4.weight", "4.bias",
                                                           "5.weight", "5.bias"]
    assert list(by_names.state_dict()["averages"]) == ["4.weight", "4.bias"]
    train_with_updates(model, [by_predicate.update, by_names.update], 2)
    with by_names.swapped_into(model):
        pass
    with pytest.raises(ValueError, match=r"include names \['4.wieght'\]"):
        WeightAverage(model, include=["4.wieght"])
    with pytest.raises(TypeError, match="single string"):
        WeightAverage(model, include="4.weight")


def test_to_converts_and_moves_the_averages():
    model = bn_net()
    multi = MultiAverage(model, {"swa": None, "ema": swa_utils.get_ema_multi_avg_fn(0.9)})
    train_with_updates(model, [multi.update], 2)
    assert multi.to(dtype=torch.float64) is multi
    assert all(t.dtype == torch.float64 for n in multi for t in multi[n].state_dict()["averages"].values())
    train_with_updates(model, [multi.update], 2)  # the plan is rebuilt for the new dtype
    assert multi["swa"].n_averaged.item() == 4
    with pytest.raises(RuntimeError, match="call the MultiAverage's to"):
        multi["swa"].to(dtype=torch.float32)
    with pytest.raises(ValueError, match="avg_dtype must be"):
        multi.to(dtype=torch.int64)


def test_averaged_copy_evaluates_like_swapped_into():
    model = bn_net()
    average = WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.7))
    train_with_updates(model, [average.update], 3)
    copy = average.averaged_copy(model)
    x = bn_net_inputs(1, seed=3)[0]
    model.eval()
    copy.eval()
    with average.swapped_into(model):
        expected = model(x)
    assert copy is not model and torch.equal(copy(x), expected)


class TiedWithExtraBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)


def test_module_state_dict_loads_strictly_into_the_model():
    torch.manual_seed(0)
    model = TiedWithExtraBuffer()
    average = WeightAverage(model, use_buffers=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update(model)
    average.update(TiedWithExtraBuffer().train())  # another model's values: the average moves
    state = average.module_state_dict()
    assert set(state) == set(model.state_dict())  # both names of the tied weight, no "scratch"
    assert state["embed.weight"] is state["head.weight"]
    fresh = TiedWithExtraBuffer()
    fresh.load_state_dict(state)  # strict
    assert torch.equal(fresh.head.weight, average.state_dict()["averages"]["embed.weight"])
    params_only = WeightAverage(model)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(params_only.module_state_dict())
    fresh.load_state_dict(params_only.module_state_dict(model))  # the model fills in its buffers
