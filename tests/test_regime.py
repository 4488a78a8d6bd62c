"""swa_fast.regime against hand-computed values from the two papers, and the schedulers' state."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR, LinearLR, ReduceLROnPlateau, StepLR

from swa_fast.distance import WeightDistanceTracker
from swa_fast.regime import (
    DistanceMilestoneLR,
    LinearWarmup,
    Regime,
    SWAScheduleLR,
    adapt_regime,
    distance_milestones,
    sqrt_lr_scaling,
    swa_schedule_lr,
)


def optimizer(lr=0.1, groups=1):
    params = [nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(params)], lr=lr)


def run(opt, scheduler, steps, *args):
    """The lr of group 0 before each of ``steps`` optimizer steps."""
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step(*args)
    return lrs


# ---------------------------------------------------------------------------
# Square-root scaling and regime adaptation (Hoffer et al.)
# ---------------------------------------------------------------------------


def test_sqrt_lr_scaling_matches_the_paper():
    assert sqrt_lr_scaling(0.1, 2048, 256) == pytest.approx(0.1 * math.sqrt(8))
    assert sqrt_lr_scaling(0.1, 256, 256) == 0.1
    assert sqrt_lr_scaling(0.4, 64, 256) == pytest.approx(0.2)  # smaller batches too
    with pytest.raises(ValueError, match="batch_size must be positive"):
        sqrt_lr_scaling(0.1, 0, 256)
    with pytest.raises(ValueError, match="lr must be positive"):
        sqrt_lr_scaling(-0.1, 512, 256)


def test_adapt_regime_multiplies_epochs_and_milestones():
    regime = adapt_regime(100, [30, 60, 90], batch_size=1024, base_batch_size=32)
    assert isinstance(regime, Regime)
    assert regime.epochs == 3200 and isinstance(regime.epochs, int)
    assert regime.milestones == (960, 1920, 2880)
    assert regime.ratio == 32 and regime.mode == "epochs" and regime.lr is None
    assert regime.total_steps is None
    # with the base lr, the regime carries its square-root scaling as well
    regime = adapt_regime(100, [30, 60, 90], 1024, 32, lr=0.1, dataset_size=50_000)
    assert regime.lr == pytest.approx(0.1 * math.sqrt(32))
    assert regime.steps_per_epoch == 49 and regime.total_steps == 3200 * 49
    assert regime.milestone_steps == (960 * 49, 1920 * 49, 2880 * 49)
    # fractional ratios give fractional epochs
    assert adapt_regime(10, [5], 384, 256).epochs == 15 and adapt_regime(3, [1], 384, 256).epochs == 4.5


def test_adapt_regime_updates_mode_keeps_the_number_of_updates():
    # 50,000 samples: 1563 updates per epoch at batch 32 (last batch partial), 49 at batch 1024.
    regime = adapt_regime(100, [30, 60, 90], 1024, 32, mode="updates", dataset_size=50_000)
    assert regime.total_steps == 100 * 1563 == 156_300
    assert regime.milestone_steps == (30 * 1563, 60 * 1563, 90 * 1563)
    assert regime.steps_per_epoch == 49
    assert regime.epochs == pytest.approx(156_300 / 49)  # 3189.8: fewer than the 3200 of mode="epochs"
    assert regime.milestones[0] == pytest.approx(46_890 / 49)
    epochs_mode = adapt_regime(100, [30, 60, 90], 1024, 32, dataset_size=50_000)
    assert epochs_mode.total_steps == 156_800 != regime.total_steps
    # drop_last counts only full batches: 1562 and 48 updates per epoch
    dropped = adapt_regime(10, [5], 1024, 32, mode="updates", dataset_size=50_000, drop_last=True)
    assert dropped.total_steps == 15_620 and dropped.steps_per_epoch == 48
    # when the batches divide the data set evenly the two modes agree
    even = adapt_regime(100, [30], 1024, 32, mode="updates", dataset_size=32_768)
    assert even.epochs == 3200 and even.milestones == (960,)


def test_adapt_regime_errors():
    with pytest.raises(ValueError, match="mode must be 'epochs' or 'updates'"):
        adapt_regime(100, [30], 1024, 32, mode="steps")
    with pytest.raises(ValueError, match="needs dataset_size"):
        adapt_regime(100, [30], 1024, 32, mode="updates")
    with pytest.raises(ValueError, match="milestone 130 is outside the 100 epochs"):
        adapt_regime(100, [30, 130], 1024, 32)
    with pytest.raises(ValueError, match="epochs must be positive"):
        adapt_regime(0, [], 1024, 32)
    with pytest.raises(ValueError, match="no full batch"):
        adapt_regime(1, [], 1024, 32, mode="updates", dataset_size=500, drop_last=True)


# ---------------------------------------------------------------------------
# The SWA paper's schedule
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fraction,factor", [(0.0, 1.0), (0.5, 1.0), (0.7, 0.505), (0.9, 0.01), (1.0, 0.01)])
def test_swa_schedule_at_fractions_of_the_budget(fraction, factor):
    # Paper: constant to 50%, linear to 1% by 90% (70%: halfway, 1 - 0.99 / 2), constant after.
    assert swa_schedule_lr(round(fraction * 200), 200, 0.1) == pytest.approx(0.1 * factor, rel=1e-12)
    assert swa_schedule_lr(round(fraction * 200), 200, 0.1, swa_lr=0.05) == pytest.approx(
        0.1 + (0.05 - 0.1) * min(max((fraction - 0.5) / 0.4, 0.0), 1.0), rel=1e-12
    )


def test_swa_schedule_ends_are_exact_and_past_the_budget_is_constant():
    assert swa_schedule_lr(50, 100, 0.1) == 0.1
    assert swa_schedule_lr(90, 100, 0.1, swa_lr=0.03) == 0.03
    assert swa_schedule_lr(500, 100, 0.1, swa_lr=0.03) == 0.03


def test_swa_schedule_lr_per_epoch_and_per_iteration():
    opt = optimizer(0.1)
    lrs = run(opt, SWAScheduleLR(opt, total_steps=100), 101)
    assert lrs[0] == lrs[50] == 0.1
    assert lrs[70] == pytest.approx(0.0505) and lrs[90] == pytest.approx(0.001) and lrs[100] == pytest.approx(0.001)
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))  # never increases
    # per iteration: 20 epochs x 50 iterations, the same curve on a finer grid
    opt = optimizer(0.1)
    fine = run(opt, SWAScheduleLR(opt, total_steps=20 * 50), 20 * 50 + 1)
    assert [fine[e * 50] for e in (0, 10, 14, 18, 20)] == pytest.approx([0.1, 0.1, 0.0505, 0.001, 0.001])


def test_swa_schedule_per_group_swa_lr_and_state_dict():
    opt = optimizer(0.1, groups=2)  # group lrs 0.1 and 0.2
    scheduler = SWAScheduleLR(opt, total_steps=10, swa_lr=[0.01, 0.05])
    run(opt, scheduler, 10)
    assert scheduler.get_last_lr() == pytest.approx([0.01, 0.05])
    state = scheduler.state_dict()
    opt2 = optimizer(0.1, groups=2)
    resumed = SWAScheduleLR(opt2, total_steps=10, swa_lr=[0.01, 0.05])
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 10
    with pytest.raises(ValueError, match="swa_lr has 1 values but the optimizer has 2 param groups"):
        SWAScheduleLR(optimizer(0.1, groups=2), 10, swa_lr=[0.01])
    with pytest.raises(ValueError, match="total_steps must be positive"):
        SWAScheduleLR(optimizer(), 0)


def test_swa_schedule_inside_sequential_lr_uses_the_closed_form():
    opt = optimizer(0.1)
    warm = LinearLR(opt, start_factor=0.5, total_iters=2)
    swa = SWAScheduleLR(opt, total_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's deprecated step(0) call
        sequential = torch.optim.lr_scheduler.SequentialLR(opt, [warm, swa], milestones=[2])
        lrs = run(opt, sequential, 12)
    assert lrs[:2] == pytest.approx([0.05, 0.075])
    assert lrs[2] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.001)


# ---------------------------------------------------------------------------
# Linear warm-up
# ---------------------------------------------------------------------------


def test_linear_warmup_then_step_lr():
    opt = optimizer(0.1)
    step_lr = StepLR(opt, step_size=3, gamma=0.5)
    scheduler = LinearWarmup(opt, warmup_steps=4, after=step_lr, start_factor=0.2)
    lrs = run(opt, scheduler, 12)
    warmup = [0.1 * (0.2 + 0.8 * s / 4) for s in range(4)]
    # after the warm-up, StepLR's own schedule from its step 0
    after = [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025]
    assert lrs == pytest.approx(warmup + after)


def test_linear_warmup_then_cosine_and_without_after():
    opt = optimizer(1.0)
    cosine = CosineAnnealingLR(opt, T_max=10)
    lrs = run(opt, LinearWarmup(opt, warmup_steps=5, after=cosine, start_factor=0.0), 16)
    assert lrs[:5] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert lrs[5:] == pytest.approx([(1 + math.cos(math.pi * k / 10)) / 2 for k in range(11)], abs=1e-12)
    opt = optimizer(1.0)
    assert run(opt, LinearWarmup(opt, warmup_steps=2), 4) == pytest.approx([0.1, 0.55, 1.0, 1.0])
    opt = optimizer(1.0)
    exponential = ExponentialLR(opt, gamma=0.5)
    assert run(opt, LinearWarmup(opt, warmup_steps=0, after=exponential), 3) == pytest.approx([1.0, 0.5, 0.25])


def test_linear_warmup_passes_metrics_to_reduce_on_plateau():
    opt = optimizer(1.0)
    plateau = ReduceLROnPlateau(opt, factor=0.5, patience=0)
    scheduler = LinearWarmup(opt, warmup_steps=2, after=plateau, start_factor=0.5)
    lrs = run(opt, scheduler, 6, 1.0)  # a constant metric: every step after the first is a plateau
    assert lrs[:3] == pytest.approx([0.5, 0.75, 1.0])
    assert lrs[3:] == pytest.approx([1.0, 0.5, 0.25])


def test_linear_warmup_state_dict_resumes_mid_way():
    def make():
        opt = optimizer(0.1, groups=2)
        return opt, LinearWarmup(opt, warmup_steps=3, after=StepLR(opt, step_size=2, gamma=0.1))

    opt, scheduler = make()
    full = run(opt, scheduler, 10)
    opt, scheduler = make()
    first = run(opt, scheduler, 5)
    state = scheduler.state_dict()
    assert "optimizer" not in state and isinstance(state["after"], dict)
    opt2, resumed = make()
    resumed.load_state_dict(state)
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]  # as the optimizer's own state_dict would restore
    opt2.param_groups[1]["lr"] = opt.param_groups[1]["lr"]
    assert resumed.last_epoch == 5 and resumed.after.last_epoch == 2
    assert first + run(opt2, resumed, 5) == pytest.approx(full)


def test_linear_warmup_errors():
    opt = optimizer()
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        LinearWarmup(opt, -1)
    with pytest.raises(ValueError, match="start_factor must be in"):
        LinearWarmup(opt, 3, start_factor=1.5)
    with pytest.raises(ValueError, match="same optimizer"):
        LinearWarmup(opt, 3, after=StepLR(optimizer(), 2))


# ---------------------------------------------------------------------------
# Decay by distance travelled
# ---------------------------------------------------------------------------


def walking_model():
    """A one-parameter model that moves by exactly 1.0 per step from w_0 = 0."""
    param = nn.Parameter(torch.zeros(1))
    return param, torch.optim.SGD([param], lr=0.1)


def test_distance_milestone_lr_decays_where_the_distance_passes_milestones():
    param, opt = walking_model()
    tracker = WeightDistanceTracker([param])
    scheduler = DistanceMilestoneLR(opt, tracker, milestones=[2.5, 4.0], gamma=0.1)
    lrs = []
    for step in range(1, 7):
        with torch.no_grad():
            param.add_(1.0)  # distance = step
        opt.step()
        tracker.update(step)
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001, 0.001])
    assert scheduler.decay_steps == [3, 4]


def test_distance_milestone_lr_passed_milestones_stay_passed_and_state_dict():
    param, opt = walking_model()
    tracker = WeightDistanceTracker([param])
    scheduler = DistanceMilestoneLR(opt, tracker, milestones=[1.0, 2.0, 3.0], gamma=0.5)
    assert opt.param_groups[0]["lr"] == 0.1  # no update yet: no decay
    with torch.no_grad():
        param.add_(2.5)  # passes two milestones at once
    opt.step()
    tracker.update(1)
    scheduler.step()
    assert scheduler.passed == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.025)
    with torch.no_grad():
        param.zero_()  # back at w_0: decays are not undone
    tracker.update(2)
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    state = scheduler.state_dict()
    assert "tracker" not in state and state["passed"] == 2
    param2, opt2 = walking_model()
    resumed = DistanceMilestoneLR(opt2, WeightDistanceTracker([param2]), milestones=[1.0, 2.0, 3.0], gamma=0.5)
    resumed.load_state_dict(state)
    assert resumed.passed == 2 and resumed.decay_steps == scheduler.decay_steps
    with pytest.raises(ValueError, match="increasing order"):
        DistanceMilestoneLR(opt, tracker, milestones=[2.0, 1.0])


def test_distance_milestones_from_a_reference_run():
    param = nn.Parameter(torch.zeros(1))
    reference = WeightDistanceTracker([param])
    for step in (10, 20, 30):
        with torch.no_grad():
            param.fill_(step / 10)
        reference.update(step)
    assert distance_milestones(reference, [15, 30]) == pytest.approx([1.5, 3.0])
