"""Stochastic rounding in the averaging core: ``WeightAverage`` / ``MultiAverage`` with
``stochastic_rounding=True`` against ``average_stochastic_`` called by hand, the counter (the
member's update count) across resume, skip and offload, the seeds of a ``MultiAverage``'s members,
and the refusals."""

import copy

import pytest
import torch

from swa_fast import MultiAverage, WeightAverage, average_stochastic_
from swa_fast.swa_utils import get_ema_multi_avg_fn

from helpers import bn_net, force_host_offload, train_with_updates

DECAY = 0.99


def ema(model, seed=7, **kwargs):
    return WeightAverage(model, get_ema_multi_avg_fn(DECAY), use_buffers=True, avg_dtype=torch.bfloat16,
                         stochastic_rounding=True, stochastic_rounding_seed=seed, **kwargs)


class ByHand:
    """The EMA written with the op: counter = updates so far, weight 1 at the first update,
    integer buffers copied; the tensors in the average's order (parameters, then buffers), which
    numbers the random streams."""

    def __init__(self, model, seed):
        named = [*model.named_parameters(), *model.named_buffers()]
        self.state = {k: v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach().clone()
                      for k, v in named}
        self.seed = seed
        self.n = 0

    def update(self, model):
        current = model.state_dict()
        names = list(self.state)
        weight = 1.0 if self.n == 0 else 1 - DECAY
        average_stochastic_([self.state[k] for k in names], [current[k].detach() for k in names], weight,
                            torch.tensor(self.n), self.seed)
        self.n += 1


def states_equal(average: WeightAverage, reference: dict) -> None:
    state = average.module_state_dict()
    assert sorted(state) == sorted(reference)
    for name, value in reference.items():
        assert torch.equal(state[name], value), name


def test_an_ema_update_is_the_op_with_the_update_count_as_counter():
    model = bn_net()
    average = ema(model)
    by_hand = ByHand(model, 7)
    train_with_updates(model, [average.update, by_hand.update], steps=6)
    states_equal(average, by_hand.state)
    assert all(v.dtype == torch.bfloat16 for v in average.module_state_dict().values() if v.is_floating_point())


def test_stochastic_rounding_differs_from_round_to_nearest_and_leaves_fp32_averages_alone():
    model = bn_net()
    rounded = ema(model)
    nearest = WeightAverage(model, get_ema_multi_avg_fn(DECAY), use_buffers=True, avg_dtype=torch.bfloat16)
    full = WeightAverage(model, get_ema_multi_avg_fn(DECAY), use_buffers=True)
    full_flagged = WeightAverage(model, get_ema_multi_avg_fn(DECAY), use_buffers=True, stochastic_rounding=True)
    train_with_updates(model, [a.update for a in (rounded, nearest, full, full_flagged)], steps=5)
    a, b = rounded.module_state_dict(), nearest.module_state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    for name, value in full.module_state_dict().items():
        assert torch.equal(full_flagged.module_state_dict()[name], value), name


def test_multi_average_member_k_is_a_weight_average_with_seed_plus_k():
    model = bn_net()
    multi = MultiAverage(model, {"slow": get_ema_multi_avg_fn(DECAY), "fast": get_ema_multi_avg_fn(DECAY)},
                         use_buffers=True, avg_dtype=torch.bfloat16, stochastic_rounding=True,
                         stochastic_rounding_seed=40)
    singles = [ema(model, seed=40), ema(model, seed=41)]
    train_with_updates(model, [multi.update] + [s.update for s in singles], steps=4)
    for name, single in zip(("slow", "fast"), singles):
        for key, value in single.module_state_dict().items():
            assert torch.equal(multi[name].module_state_dict()[key], value), (name, key)


def test_resume_continues_the_random_stream():
    model = bn_net()
    uninterrupted = ema(model)
    train_with_updates(model, [uninterrupted.update], steps=3)
    state = copy.deepcopy(uninterrupted.state_dict())
    resumed = ema(model)
    resumed.load_state_dict(state)
    train_with_updates(model, [uninterrupted.update, resumed.update], steps=3)
    for key, value in uninterrupted.module_state_dict().items():
        assert torch.equal(resumed.module_state_dict()[key], value), key


def test_a_skipped_update_writes_nothing_and_keeps_the_counter():
    model = bn_net()
    skipping = ema(model, skip_nonfinite=True)
    by_hand = ByHand(model, 7)

    def by_hand_unless_nan(m):
        if all(torch.isfinite(p).all() for p in m.parameters()):
            by_hand.update(m)

    train_with_updates(model, [skipping.update, by_hand_unless_nan], steps=5, poison_at=2)
    assert int(skipping.n_skipped) == 1 and int(skipping.n_averaged) == 4
    states_equal(skipping, by_hand.state)


def test_offloaded_updates_equal_direct_ones():
    model = bn_net()
    direct = ema(model)
    offloaded = ema(model)
    force_host_offload(offloaded, model)
    train_with_updates(model, [direct.update, offloaded.update], steps=4)
    offloaded.synchronize()
    for key, value in direct.module_state_dict().items():
        assert torch.equal(offloaded.module_state_dict()[key], value), key


def test_refusals():
    model = bn_net()

    def mine(averaged, current, n):
        pass

    with pytest.raises(ValueError, match="stochastic_rounding needs the fused averaging functions"):
        WeightAverage(model, mine, stochastic_rounding=True)
    with pytest.raises(TypeError, match="stochastic_rounding must be a bool"):
        WeightAverage(model, stochastic_rounding=1)
    with pytest.raises(TypeError, match="stochastic_rounding_seed must be a 64-bit integer"):
        WeightAverage(model, stochastic_rounding=True, stochastic_rounding_seed=2**63)
    with pytest.raises(TypeError, match="stochastic_rounding_seed must be a 64-bit integer"):
        MultiAverage(model, {"a": None}, stochastic_rounding=True, stochastic_rounding_seed=1.0)
