"""WeightAverage's rules, each pinned by the case that once broke it: checkpoints checked whole
before anything is written, weights in the averages' precision, one swap-in rule for every dtype
and device, a changed EMA decay honoured, meta-device models refused, averages that follow the
model's layout until their first update, and wrapped models (torch.compile, DDP) under their
own names."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from swa_fast import WeightAverage, swa_utils

from helpers import assert_bitwise, bn_net, bn_net_inputs, free_port, train_with_updates

STEPS = 6


def trained_average(**kwargs):
    model = bn_net()
    average = WeightAverage(model, **kwargs)
    train_with_updates(model, [average.update], STEPS)
    return model, average


# --- load_state_dict: everything checked, then written ----------------------------------------


def bad_states(average):
    good = average.state_dict()
    averages = {k: v.clone() for k, v in good["averages"].items()}
    last = list(averages)[-1]
    yield "n_averaged must be", {"averages": averages, "n_averaged": torch.tensor([1, 2])}
    yield "n_skipped must be", {"averages": averages, "n_averaged": torch.tensor(3), "n_skipped": "x"}
    yield "meta", {"averages": {**averages, last: torch.empty_like(averages[last], device="meta")},
                   "n_averaged": torch.tensor(3)}
    yield "n_averaged must be", {"averages": averages, "n_averaged": torch.tensor(-5)}
    yield "n_averaged must be", {"averages": averages, "n_averaged": torch.tensor(2.7)}
    yield "n_averaged must be", {"averages": averages, "n_averaged": float("nan")}
    yield "n_averaged must be", {"averages": averages, "n_averaged": True}
    yield "'4.weight' must be a tensor", {"averages": {**averages, "4.weight": [1.0]}, "n_averaged": 3}
    yield "floating", {"averages": {**averages, "4.weight": averages["4.weight"].to(torch.int64)},
                       "n_averaged": 3}


def test_load_state_dict_checks_the_whole_state_before_writing_anything():
    _, average = trained_average()
    before = {k: v.clone() for k, v in average.state_dict()["averages"].items()}
    for match, state in bad_states(average):
        for name in state["averages"]:
            if isinstance(state["averages"][name], torch.Tensor) and state["averages"][name].device.type != "meta":
                state["averages"][name] = state["averages"][name] + 1  # would change every average
        with pytest.raises((ValueError, TypeError), match=match):
            average.load_state_dict(state)
        assert_bitwise(average.state_dict()["averages"], before)
        assert average.n_averaged.item() == STEPS and average.n_skipped.item() == 0


# --- precision of the weights ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["model", "avg_dtype"])
def test_fp64_averages_are_as_precise_as_torchs(where):
    """1,000 SWA updates: the exact mean (fsum in float64 of the same values) within fp64 rounding,
    as torch's per-parameter CPU path gets it (4.9e-15 here); a float32 weight 1/(n+1) gave 3e-9."""
    torch.manual_seed(0)
    dtype = torch.float64 if where == "model" else torch.float32
    model = nn.Linear(100, 100).to(dtype)
    average = WeightAverage(model, avg_dtype=torch.float64 if where == "avg_dtype" else None)
    total = torch.zeros_like(model.weight, dtype=torch.float64)
    for _ in range(1000):
        with torch.no_grad():
            model.weight.copy_(torch.randn_like(model.weight))
        total += model.weight.double()
        average.update(model)
    exact = total / 1000
    error = (average.state_dict()["averages"]["weight"] - exact).abs().max().item()
    assert error < 1e-13, error


def test_ema_weights_of_fp64_averages_are_fp64():
    fn = swa_utils.get_ema_multi_avg_fn(0.999, warmup_gamma=7.0, warmup_power=0.75)
    weight = fn.weight(torch.tensor(5))
    assert weight.dtype == torch.float64
    assert swa_utils.get_swa_multi_avg_fn().weight(torch.tensor(6)).dtype == torch.float64


def test_swa_weight_equals_torchs_float32_weight_for_fp32_averages():
    """In float64, 1/(n+1) rounds to the same float32 as torch's float32 reciprocal for every
    n + 1 up to 2**24 (checked exhaustively while choosing float64): fp32 SWA stays bitwise torch's."""
    n = torch.arange(0, 2**24, 997)
    ours = swa_utils.get_swa_multi_avg_fn().weight(n).float()
    assert torch.equal(ours, 1 / (n + 1))


# --- EMA decay ----------------------------------------------------------------------------------


def test_a_changed_ema_decay_is_honoured():
    fn = swa_utils.get_ema_multi_avg_fn(0.9)
    model = bn_net()
    average = WeightAverage(model, fn)
    train_with_updates(model, [average.update], 3)
    fn.decay = 0.5
    expected = {k: torch.lerp(v, dict(model.named_parameters())[k].detach(), 0.5)
                for k, v in average.state_dict()["averages"].items()}
    average.update(model)
    assert_bitwise(average.state_dict()["averages"], expected)
    with pytest.raises(ValueError, match="decay"):
        fn.decay = 1.5


# --- swapped_into: one rule ---------------------------------------------------------------------


@pytest.mark.parametrize("avg_dtype", [None, torch.float64])
def test_writes_inside_swapped_into_reach_the_averages_for_every_dtype(avg_dtype):
    """The rule: inside the block the model is the average, so what the block writes into averaged
    tensors (update_bn's statistics with use_buffers) stays in the averages; the model gets its own
    values back bitwise. The same whether or not average and model share dtype and device."""
    model = bn_net()
    average = WeightAverage(model, use_buffers=True, avg_dtype=avg_dtype)
    train_with_updates(model, [average.update], STEPS)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in average.state_dict()["averages"].items()}
    loader = bn_net_inputs(3, seed=5)
    probe = copy.deepcopy(model)  # what update_bn computes for the average, in the model's dtypes
    average.copy_to(probe)
    swa_utils.update_bn(loader, probe)
    with average.swapped_into(model):
        swa_utils.update_bn(loader, model)
    assert_bitwise(model.state_dict(), own)
    averages = average.state_dict()["averages"]
    for name, value in probe.named_buffers():
        assert torch.equal(averages[name].to(value.dtype), value), name  # the block's writes
    for name, _ in model.named_parameters():
        assert torch.equal(averages[name], before[name]), name  # untouched: full precision kept


def test_another_averages_copy_to_inside_swapped_into_is_refused():
    model = bn_net()
    a, b = WeightAverage(model), WeightAverage(model)
    train_with_updates(model, [a.update, b.update], 2)
    before = {k: v.clone() for k, v in a.state_dict()["averages"].items()}
    with a.swapped_into(model):
        with pytest.raises(RuntimeError, match="holds the averages of another"):
            b.copy_to(model)
        with pytest.raises(RuntimeError, match="holds the averages of another"):
            b.update(model)
    assert_bitwise(a.state_dict()["averages"], before)


def test_nested_swaps_of_two_averages_follow_the_rule():
    model = bn_net()
    a, b = WeightAverage(model), WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.5))
    train_with_updates(model, [a.update, b.update], 3)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    a_before = {k: v.clone() for k, v in a.state_dict()["averages"].items()}
    b_before = {k: v.clone() for k, v in b.state_dict()["averages"].items()}
    with a.swapped_into(model):
        with b.swapped_into(model):
            assert torch.equal(model[0].weight, b_before["0.weight"])
        assert torch.equal(model[0].weight, a_before["0.weight"])
    assert_bitwise(model.state_dict(), own)
    assert_bitwise(a.state_dict()["averages"], a_before)
    assert_bitwise(b.state_dict()["averages"], b_before)


# --- models the average cannot or can take --------------------------------------------------------


def test_a_meta_device_model_is_refused_at_update():
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    average = WeightAverage(model)
    with pytest.raises(ValueError, match="meta"):
        average.update(model)


def test_an_average_made_before_the_model_was_materialized_follows_it():
    """Made on a meta model (or before a move, a dtype change, fully_shard): the averages have not
    been written yet, so the first update lays them out as the model is then."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    average = WeightAverage(model)
    model.to_empty(device="cpu")
    for module in model:
        module.reset_parameters()
    model.double()
    with pytest.raises(ValueError, match="hold no values yet"):
        average.copy_to(model)
    average.update(model)
    for name, parameter in model.named_parameters():
        stored = average.state_dict()["averages"][name]
        assert stored.device.type == "cpu" and stored.dtype == torch.float64
        assert torch.equal(stored, parameter)
    model.float()
    with pytest.raises(ValueError, match="has shape"):  # after the first update the layout is fixed
        average.update(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2)))


def test_a_compiled_model_maps_to_the_same_names():
    model = bn_net()
    compiled = torch.compile(model)  # an OptimizedModule; nothing is compiled before its forward
    average = WeightAverage(compiled)
    reference = WeightAverage(model)
    train_with_updates(model, [average.update, reference.update], 3)
    average.update(compiled)
    reference.update(model)
    assert_bitwise(average.state_dict()["averages"], reference.state_dict()["averages"])
    with average.swapped_into(compiled):
        assert torch.equal(model[0].weight, reference.state_dict()["averages"]["0.weight"])


def test_a_ddp_model_maps_to_the_same_names():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = bn_net()
        ddp = nn.parallel.DistributedDataParallel(model)
        average = WeightAverage(ddp)
        reference = WeightAverage(model)
        assert list(average.state_dict()["averages"]) == [n for n, _ in model.named_parameters()]
        train_with_updates(model, [average.update, reference.update], 2)
        average.update(ddp)
        reference.update(model)
        assert_bitwise(average.state_dict()["averages"], reference.state_dict()["averages"])
    finally:
        dist.destroy_process_group()
