"""WeightAverage in one process: the same numbers as AveragedModel (and torch), swap-in, copy-out,
checkpoints, and the errors. Sharded (FSDP2) and DDP models: tests/test_sharded_average.py."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.optim import swa_utils as torch_swa

from swa_fast import WeightAverage, swa_utils

from helpers import assert_bitwise, bn_net, bn_net_inputs, train_with_updates

STEPS = 12


def train(model, updates, steps=STEPS, dtype=torch.float32, poison_at=None):
    train_with_updates(model, updates, steps, dtype, poison_at)


def averages_of(averaged_model, use_buffers):
    """An AveragedModel's averages under the model's names (what WeightAverage keys them by)."""
    named = dict(averaged_model.module.named_parameters())
    if use_buffers:
        named.update(averaged_model.module.named_buffers())
    return named


FNS = {
    "swa": lambda: None,
    "ema": lambda: swa_utils.get_ema_multi_avg_fn(0.9),
    "ema_warmup": lambda: swa_utils.get_ema_multi_avg_fn(0.999, warmup_gamma=3.0, warmup_power=0.75),
}


@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("fn", sorted(FNS))
def test_same_numbers_as_averaged_model(fn, use_buffers):
    model = bn_net()
    average = WeightAverage(model, FNS[fn](), use_buffers)
    shell = swa_utils.AveragedModel(model, multi_avg_fn=FNS[fn](), use_buffers=use_buffers)
    train(model, [average.update, shell.update_parameters])
    assert_bitwise(average.state_dict()["averages"], averages_of(shell, use_buffers))
    assert average.n_averaged.dtype == torch.long and average.n_averaged.dim() == 0
    assert average.n_averaged.item() == shell.n_averaged.item() == STEPS


def test_ema_is_bitwise_torch():
    model = bn_net()
    average = WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True)
    theirs = torch_swa.AveragedModel(model, multi_avg_fn=torch_swa.get_ema_multi_avg_fn(0.9), use_buffers=True)
    train(model, [average.update, theirs.update_parameters])
    floating = {k: v for k, v in averages_of(theirs, True).items() if v.is_floating_point()}
    ours = {k: v for k, v in average.state_dict()["averages"].items() if k in floating}
    assert_bitwise(ours, floating)


def test_custom_multi_avg_fn_runs_as_torch_runs_it():
    model = bn_net()
    calls = []

    def halfway(averages, currents, n_averaged):
        calls.append((len(averages), n_averaged.item()))
        torch._foreach_lerp_(averages, currents, 0.5)

    average = WeightAverage(model, halfway)
    theirs = torch_swa.AveragedModel(model, multi_avg_fn=halfway)
    train(model, [average.update, theirs.update_parameters])
    assert_bitwise(average.state_dict()["averages"], averages_of(theirs, False))
    assert calls[0] == (len(list(model.parameters())), 1)  # first update copied; one call per device and dtype


def test_fp32_averages_of_a_bf16_model():
    model = bn_net(torch.bfloat16)
    average = WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.9), avg_dtype=torch.float32)
    shell = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9), avg_dtype=torch.float32)
    train(model, [average.update, shell.update_parameters], dtype=torch.bfloat16)
    averages = average.state_dict()["averages"]
    assert all(t.dtype == torch.float32 for t in averages.values())
    assert_bitwise(averages, averages_of(shell, False))


def test_skip_nonfinite_drops_the_poisoned_update():
    model = bn_net()
    average = WeightAverage(model, skip_nonfinite=True)
    shell = swa_utils.AveragedModel(model, skip_nonfinite=True)
    train(model, [average.update, shell.update_parameters], poison_at=4)
    assert average.n_averaged.item() == STEPS - 1 and average.n_skipped.item() == 1
    assert all(torch.isfinite(t).all() for t in average.state_dict()["averages"].values())
    assert_bitwise(average.state_dict()["averages"], averages_of(shell, False))


def test_integer_buffers_are_copied():
    model = bn_net()
    average = WeightAverage(model, use_buffers=True)
    train(model, [average.update])
    assert average.state_dict()["averages"]["1.num_batches_tracked"].item() == STEPS


def test_the_average_holds_tensors_not_a_module():
    model = bn_net()
    average = WeightAverage(model)
    averages = average.state_dict()["averages"]
    assert list(averages) == [name for name, _ in model.named_parameters()]
    for name, parameter in model.named_parameters():
        assert averages[name].data_ptr() != parameter.data_ptr() and not averages[name].requires_grad
        assert torch.equal(averages[name], parameter)  # starts as a copy


def test_tied_weights_are_averaged_once():
    torch.manual_seed(0)
    embedding = nn.Embedding(7, 4)
    head = nn.Linear(4, 7, bias=False)
    head.weight = embedding.weight
    model = nn.Sequential(embedding, head)
    average = WeightAverage(model)
    assert list(average.state_dict()["averages"]) == ["0.weight"]
    average.update(model)
    with average.swapped_into(model):
        assert model[1].weight is model[0].weight


# --- swapped_into ---------------------------------------------------------------------------


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("avg_dtype", [None, torch.float64])
def test_swapped_into_holds_the_averages_and_restores_bitwise(avg_dtype):
    model = bn_net()
    average = WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.8), avg_dtype=avg_dtype)
    train(model, [average.update])
    before = snapshot(model)
    parameters = list(model.parameters())
    averages = {k: v.clone() for k, v in average.state_dict()["averages"].items()}
    with average.swapped_into(model) as swapped:
        assert swapped is model
        assert [p for p in model.parameters()] == parameters  # same objects, new contents
        for name, parameter in model.named_parameters():
            assert torch.equal(parameter, averages[name].to(parameter.dtype)), name
    assert_bitwise(snapshot(model), before)
    assert_bitwise(average.state_dict()["averages"], averages)  # the averages are untouched too


def test_swapped_into_restores_when_the_block_raises():
    model = bn_net()
    average = WeightAverage(model)
    train(model, [average.update])
    before = snapshot(model)
    with pytest.raises(KeyError, match="inside"), average.swapped_into(model):
        model(bn_net_inputs(1)[0])
        raise KeyError("inside")
    assert_bitwise(snapshot(model), before)
    average.update(model)  # usable again


def test_update_bn_inside_swapped_into_matches_averaged_model():
    model = bn_net()
    average = WeightAverage(model)
    shell = swa_utils.AveragedModel(model)
    train(model, [average.update, shell.update_parameters])
    before = snapshot(model)
    loader = bn_net_inputs(4, seed=7)
    swa_utils.update_bn(loader, shell)
    with average.swapped_into(model):
        swa_utils.update_bn(loader, model)
        assert_bitwise(snapshot(model), {k: v for k, v in shell.module.state_dict().items()})
        model.eval()
        x = bn_net_inputs(1, seed=9)[0]
        assert torch.equal(model(x), shell.eval()(x))
    model.train()
    assert_bitwise(snapshot(model), before)  # BN statistics of the average stay inside the block


def test_gradients_still_flow_after_swapping():
    model = bn_net()
    average = WeightAverage(model)
    average.update(model)
    with average.swapped_into(model):
        model(bn_net_inputs(1)[0]).sum().backward()
    assert all(p.is_leaf and p.requires_grad and p.grad is not None for p in model.parameters())


def test_calls_that_read_the_averages_are_refused_inside_the_block():
    model = bn_net()
    average = WeightAverage(model)
    with average.swapped_into(model):
        for call in (lambda: average.update(model), average.state_dict, lambda: average.copy_to(model),
                     lambda: average.load_state_dict(average.state_dict())):
            with pytest.raises(RuntimeError, match="not inside swapped_into"):
                call()
        with pytest.raises(RuntimeError, match="not inside swapped_into"), average.swapped_into(model):
            pass


def test_copy_to_writes_the_averages_for_good():
    model = bn_net(torch.bfloat16)
    average = WeightAverage(model, avg_dtype=torch.float32)
    train(model, [average.update], dtype=torch.bfloat16)
    average.copy_to(model)
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.bfloat16
        assert torch.equal(parameter, average.state_dict()["averages"][name].to(torch.bfloat16))


# --- checkpoints ------------------------------------------------------------------------------


def test_state_dict_round_trip_through_torch_save():
    model = bn_net()
    average = WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True)
    train(model, [average.update])
    buffer = io.BytesIO()
    torch.save(average.state_dict(), buffer)
    buffer.seek(0)
    restored = WeightAverage(bn_net(), swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert_bitwise(restored.state_dict()["averages"], average.state_dict()["averages"])
    assert restored.n_averaged.item() == STEPS
    # and both continue identically
    train(model, [average.update, restored.update], steps=3)
    assert_bitwise(restored.state_dict()["averages"], average.state_dict()["averages"])


def test_load_state_dict_checks_everything_before_writing():
    model = bn_net()
    average = WeightAverage(model)
    train(model, [average.update])
    before = {k: v.clone() for k, v in average.state_dict()["averages"].items()}
    state = {"averages": {k: v.clone() for k, v in before.items()}, "n_averaged": torch.tensor(99)}
    state["averages"]["4.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="'4.weight' has shape"):
        average.load_state_dict(state)
    del state["averages"]["4.weight"]
    with pytest.raises(ValueError, match=r"missing averages \['4.weight'\]"):
        average.load_state_dict(state)
    with pytest.raises(TypeError, match="expected a dict with 'averages'"):
        average.load_state_dict({"0.weight": before["0.weight"]})
    assert_bitwise(average.state_dict()["averages"], before)
    assert average.n_averaged.item() == STEPS
    keys = average.load_state_dict(state, strict=False)
    assert keys.missing_keys == ["4.weight"] and average.n_averaged.item() == 99


def test_another_models_names_are_refused_with_the_names():
    average = WeightAverage(bn_net())
    other = nn.Sequential(nn.Linear(3, 3))
    for call in (average.update, average.copy_to):
        with pytest.raises(ValueError, match=r"missing: \['0.bias', '1.weight'.*unexpected: \[\]|missing"):
            call(other)


def test_deepcopy_and_pickle_after_updates():
    model = bn_net()
    average = WeightAverage(model)
    train(model, [average.update], steps=3)
    for twin in (copy.deepcopy(average), pickle.loads(pickle.dumps(average))):
        assert twin._set._plan is None
        assert_bitwise(twin.state_dict()["averages"], average.state_dict()["averages"])
    twin = copy.deepcopy(average)
    train(model, [average.update, twin.update], steps=2)
    assert_bitwise(twin.state_dict()["averages"], average.state_dict()["averages"])


def test_a_replaced_parameter_is_noticed():
    model = bn_net()
    average = WeightAverage(model)
    shell = swa_utils.AveragedModel(model)
    train(model, [average.update, shell.update_parameters], steps=3)
    plan = average._set._plan
    model[4]._parameters["weight"] = nn.Parameter(torch.randn(10, 8 * 6 * 6))
    train(model, [average.update, shell.update_parameters], steps=2)
    assert average._set._plan is not plan
    assert_bitwise(average.state_dict()["averages"], averages_of(shell, False))


def test_bad_arguments():
    model = bn_net()
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        WeightAverage([torch.zeros(3)])
    with pytest.raises(ValueError, match="avg_dtype must be a floating dtype"):
        WeightAverage(model, avg_dtype=torch.int32)
    with pytest.raises(TypeError, match="multi_avg_fn must be callable"):
        WeightAverage(model, 0.999)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="does not exist: no CUDA device"):
            WeightAverage(model, device="cuda")


def test_averaged_model_is_a_shell_over_weight_average():
    shell = swa_utils.AveragedModel(bn_net())
    assert isinstance(shell._average, WeightAverage)
