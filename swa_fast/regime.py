"""Training regimes for large batches and for SWA, as small functions and lr schedulers.

From "Train longer, generalize better" (Hoffer, Hubara, Soudry, NeurIPS 2017):

* :func:`sqrt_lr_scaling` -- the learning rate grows with the square root of
  the batch size (``lr * sqrt(B_L / B_S)``), which keeps the covariance of the
  weight updates matched.
* :func:`adapt_regime` -- going from batch ``B_S`` to ``B_L``, train
  ``B_L / B_S`` times more epochs and move every lr milestone the same way:
  the same number of weight updates (100 epochs at 32 -> 3200 at 1024).
* :class:`DistanceMilestoneLR` -- decay the lr when the weights' distance from
  their initialization reaches given values (e.g. where a small-batch
  reference run decayed), measured by a
  :class:`~swa_fast.distance.WeightDistanceTracker`.

From "Averaging Weights Leads to Wider Optima" (Izmailov et al., UAI 2018):

* :class:`SWAScheduleLR` (and :func:`swa_schedule_lr`) -- the paper's schedule
  for a budget: constant lr for the first 50%, linear down to ``swa_lr``
  (default 1% of lr) by 90%, constant after.

And :class:`LinearWarmup`, a linear warm-up in front of any torch scheduler.

Every scheduler is a ``torch.optim.lr_scheduler.LRScheduler``: call ``step()``
once per epoch or once per iteration (count ``total_steps``/``warmup_steps``
in the same unit), after ``optimizer.step()``; ``state_dict()`` and
``load_state_dict()`` resume them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from swa_fast._checks import check_number
from swa_fast.distance import WeightDistanceTracker

__all__ = [
    "DistanceMilestoneLR",
    "LinearWarmup",
    "Regime",
    "SWAScheduleLR",
    "adapt_regime",
    "distance_milestones",
    "sqrt_lr_scaling",
    "swa_schedule_lr",
]

Number = Union[int, float]


def _check_positive(**values: Number) -> None:
    for name, value in values.items():
        check_number(name, value, above=0)


def _plain(x: float) -> Number:
    """x as an int when it is a whole number (3200, not 3200.0), else as is."""
    return int(x) if float(x).is_integer() else x


# ---------------------------------------------------------------------------
# Square-root learning-rate scaling and regime adaptation
# ---------------------------------------------------------------------------


def sqrt_lr_scaling(lr: float, batch_size: int, base_batch_size: int) -> float:
    """The learning rate for ``batch_size`` given ``lr`` tuned at ``base_batch_size``: ``lr * sqrt(B / B_0)``.

    >>> round(sqrt_lr_scaling(0.1, 2048, 256), 6)   # 0.1 * sqrt(8)
    0.282843
    """
    _check_positive(lr=lr, batch_size=batch_size, base_batch_size=base_batch_size)
    return lr * math.sqrt(batch_size / base_batch_size)


@dataclass(frozen=True)
class Regime:
    """A training regime adapted to a larger (or smaller) batch. See :func:`adapt_regime`."""

    epochs: Number
    """Epochs to train at ``batch_size``."""
    milestones: tuple
    """The lr-decay epochs at ``batch_size``."""
    batch_size: int
    base_batch_size: int
    ratio: float
    """``batch_size / base_batch_size``."""
    mode: str
    lr: Optional[float] = None
    """``sqrt_lr_scaling(lr, ...)`` when a base ``lr`` was given."""
    steps_per_epoch: Optional[int] = None
    """Weight updates per epoch at ``batch_size`` (when ``dataset_size`` was given)."""
    total_steps: Optional[int] = None
    """Weight updates of the whole run (when ``dataset_size`` was given)."""
    milestone_steps: Optional[tuple] = None
    """The lr-decay points counted in weight updates (when ``dataset_size`` was given)."""


def _steps_per_epoch(dataset_size: int, batch_size: int, drop_last: bool) -> int:
    steps = dataset_size // batch_size if drop_last else math.ceil(dataset_size / batch_size)
    if steps < 1:
        raise ValueError(f"a dataset of {dataset_size} samples has no full batch of {batch_size} (drop_last=True)")
    return steps


def adapt_regime(
    epochs: Number,
    milestones: Sequence[Number],
    batch_size: int,
    base_batch_size: int,
    *,
    mode: str = "epochs",
    dataset_size: Optional[int] = None,
    drop_last: bool = False,
    lr: Optional[float] = None,
) -> Regime:
    """Adapt a regime tuned at ``base_batch_size`` to ``batch_size`` ("regime adaptation", Hoffer et al.).

    ``mode="epochs"`` (the paper's rule): multiply the epochs and every lr
    milestone by ``B_L / B_S``. 100 epochs with decays at 30, 60, 90 at batch
    32 become 3200 epochs with decays at 960, 1920, 2880 at batch 1024: the
    same number of weight updates, up to each epoch's last partial batch.

    ``mode="updates"`` keeps the number of weight updates exactly equal. It
    needs ``dataset_size``: an epoch makes ``ceil(N / B)`` updates
    (``floor`` with ``drop_last``), the base run makes ``epochs * ceil(N /
    B_S)``, and the returned epochs and milestones (possibly fractional) make
    the large-batch run stop and decay after exactly as many updates as the
    base run did; ``total_steps``/``milestone_steps`` give them in updates,
    for per-iteration schedulers.

    Args:
        epochs, milestones: the base regime (milestones in epochs).
        batch_size, base_batch_size: B_L and B_S.
        mode: ``"epochs"`` or ``"updates"``.
        dataset_size: samples per epoch; fills the ``*_steps`` fields (and is
            required by ``mode="updates"``).
        drop_last: whether the data loader drops the last partial batch.
        lr: the base learning rate; ``Regime.lr`` is then its square-root scaling.

    >>> adapt_regime(100, [30, 60, 90], 1024, 32).epochs
    3200
    """
    _check_positive(epochs=epochs, batch_size=batch_size, base_batch_size=base_batch_size)
    if mode not in ("epochs", "updates"):
        raise ValueError(f"mode must be 'epochs' or 'updates', got {mode!r}")
    for m in milestones:
        check_number("milestone", m)
        if not 0 <= m <= epochs:
            raise ValueError(f"milestone {m} is outside the {epochs} epochs")
    if dataset_size is not None:
        _check_positive(dataset_size=dataset_size)
    ratio = batch_size / base_batch_size
    scaled_lr = None if lr is None else sqrt_lr_scaling(lr, batch_size, base_batch_size)

    if mode == "epochs":
        new_epochs = _plain(epochs * ratio)
        new_milestones = tuple(_plain(m * ratio) for m in milestones)
        steps = total = milestone_steps = None
        if dataset_size is not None:
            steps = _steps_per_epoch(dataset_size, batch_size, drop_last)
            total = round(new_epochs * steps)
            milestone_steps = tuple(round(m * steps) for m in new_milestones)
        return Regime(new_epochs, new_milestones, batch_size, base_batch_size, ratio, mode, scaled_lr,
                      steps, total, milestone_steps)

    if dataset_size is None:
        raise ValueError("mode='updates' needs dataset_size (to count the weight updates of an epoch)")
    base_steps = _steps_per_epoch(dataset_size, base_batch_size, drop_last)
    steps = _steps_per_epoch(dataset_size, batch_size, drop_last)
    total = round(epochs * base_steps)
    milestone_steps = tuple(round(m * base_steps) for m in milestones)
    return Regime(
        _plain(total / steps),
        tuple(_plain(m / steps) for m in milestone_steps),
        batch_size,
        base_batch_size,
        ratio,
        mode,
        scaled_lr,
        steps,
        total,
        milestone_steps,
    )


# ---------------------------------------------------------------------------
# The SWA paper's schedule
# ---------------------------------------------------------------------------


def swa_schedule_lr(step: Number, total_steps: Number, lr: float, swa_lr: Optional[float] = None) -> float:
    """The SWA paper's learning rate at ``step`` of a budget of ``total_steps``.

    With ``t = step / total_steps``: ``lr`` for ``t <= 0.5``; linear from
    ``lr`` to ``swa_lr`` for ``0.5 <= t <= 0.9``; ``swa_lr`` after (also past
    the budget). ``swa_lr`` defaults to ``0.01 * lr``, the paper's SGD
    baseline; with SWA, the paper's budget is the epoch SWA starts at.
    """
    _check_positive(total_steps=total_steps)
    check_number("step", step)
    if swa_lr is not None:
        check_number("swa_lr", swa_lr, minimum=0)
    end = 0.01 * lr if swa_lr is None else swa_lr
    # 10 * step vs 5 * T and 9 * T: exact for integer steps, so the ends of
    # the ramp land exactly on lr and swa_lr.
    if 10 * step <= 5 * total_steps:
        return lr
    if 10 * step >= 9 * total_steps:
        return end
    fraction = (10 * step - 5 * total_steps) / (4 * total_steps)
    return lr + (end - lr) * fraction


class SWAScheduleLR(LRScheduler):
    """The SWA paper's learning-rate schedule over a budget, as a torch scheduler.

    Constant ``lr`` to 50% of ``total_steps``, linear to ``swa_lr`` by 90%,
    constant ``swa_lr`` after (see :func:`swa_schedule_lr`). Step it once per
    epoch with ``total_steps = epochs``, or once per iteration with
    ``total_steps = epochs * iterations_per_epoch``. The lr is computed from
    the step count alone (not chained from the previous lr).

    Args:
        optimizer: its groups' current lrs are the starting lrs.
        total_steps: the budget, in steps of this scheduler.
        swa_lr: the final lr: one float for every group, one per group, or
            None for 1% of each group's lr.
        last_epoch: as for every torch scheduler (-1 to start).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        swa_lr: Optional[Union[float, Sequence[float]]] = None,
        last_epoch: int = -1,
    ) -> None:
        _check_positive(total_steps=total_steps)
        groups = len(optimizer.param_groups)
        if swa_lr is None or isinstance(swa_lr, (int, float)):
            swa_lrs: List[Optional[float]] = [swa_lr] * groups
        else:
            swa_lrs = list(swa_lr)
            if len(swa_lrs) != groups:
                raise ValueError(f"swa_lr has {len(swa_lrs)} values but the optimizer has {groups} param groups")
        for value in swa_lrs:
            if value is not None:
                check_number("swa_lr", value, minimum=0)
        self.total_steps = total_steps
        self.swa_lrs = swa_lrs
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        return self._get_closed_form_lr()

    def _get_closed_form_lr(self) -> List[float]:
        return [
            swa_schedule_lr(self.last_epoch, self.total_steps, base, swa)
            for base, swa in zip(self.base_lrs, self.swa_lrs)
        ]


# ---------------------------------------------------------------------------
# Linear warm-up in front of any scheduler
# ---------------------------------------------------------------------------


class LinearWarmup(LRScheduler):
    """A linear warm-up over ``warmup_steps`` steps, then any torch scheduler.

    For step ``s < warmup_steps``: ``lr = base_lr * (start_factor + (1 -
    start_factor) * s / warmup_steps)``. From ``s = warmup_steps`` on, the
    learning rate is ``after``'s, with ``after`` counting its own steps from
    0 there (so its whole schedule runs after the warm-up). Without
    ``after``, the lr stays at ``base_lr``.

    Construct ``after`` first, on the same optimizer, then wrap it, and step
    only the wrapper (arguments, e.g. ReduceLROnPlateau's metric, are passed
    on to ``after.step``)::

        cosine = CosineAnnealingLR(optimizer, T_max=epochs - 5)
        scheduler = LinearWarmup(optimizer, warmup_steps=5, after=cosine)

    ``state_dict()`` holds ``after``'s state too; ``load_state_dict()``
    restores both.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        after: Optional[LRScheduler] = None,
        start_factor: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        check_number("warmup_steps", warmup_steps, minimum=0)
        check_number("start_factor", start_factor, minimum=0, maximum=1)
        if after is not None and after.optimizer is not optimizer:
            raise ValueError("after must schedule the same optimizer as the warm-up")
        self.warmup_steps = warmup_steps
        self.start_factor = start_factor
        self.after = after
        # after's construction set its step-0 lrs (usually the base lrs); they
        # are the lrs the warm-up hands over to.
        self.handover_lrs = [group["lr"] for group in optimizer.param_groups]
        super().__init__(optimizer, last_epoch)

    def _warmup_lrs(self, step: int) -> List[float]:
        factor = self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        return [base * factor for base in self.base_lrs]

    def get_lr(self) -> List[float]:
        if self.last_epoch < self.warmup_steps:
            return self._warmup_lrs(self.last_epoch)
        if self.last_epoch == self.warmup_steps:
            return list(self.handover_lrs)
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """One step: a warm-up lr, the hand-over to ``after``, or ``after.step(*args, **kwargs)``."""
        self._step_count += 1
        self.last_epoch += 1
        if self.last_epoch > self.warmup_steps and self.after is not None:
            self.after.step(*args, **kwargs)
        else:
            for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
                group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        state = {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "after")}
        state["after"] = None if self.after is None else self.after.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state = dict(state_dict)
        after_state = state.pop("after", None)
        self.__dict__.update(state)
        if self.after is not None and after_state is not None:
            self.after.load_state_dict(after_state)


# ---------------------------------------------------------------------------
# Decay by distance travelled
# ---------------------------------------------------------------------------


class DistanceMilestoneLR(LRScheduler):
    """Multiply the lr by ``gamma`` each time the weights' distance from ``w_0`` passes a milestone.

    Hoffer et al. suggest deciding lr decays by how far the weights have
    travelled rather than by the validation error; a large-batch run can
    then decay where a small-batch reference run's weights had travelled as
    far (see :func:`distance_milestones`). The lr is ``base_lr * gamma ** k``
    with ``k`` the number of milestones the tracker's total distance has
    reached so far; a passed milestone stays passed.

    Each :meth:`step` reads the tracker's latest total as a Python float:
    **one host sync per step**. Update the tracker and step this scheduler
    together, once per epoch or every few hundred iterations::

        tracker = WeightDistanceTracker(model)
        scheduler = DistanceMilestoneLR(optimizer, tracker, milestones=[12.0, 15.5])
        for epoch in range(epochs):
            train_one_epoch(model, optimizer)
            tracker.update(epoch + 1)
            scheduler.step()

    Args:
        optimizer: the optimizer whose lrs to decay.
        tracker: where the distances come from (its :meth:`latest` total).
        milestones: distances, in increasing order.
        gamma: the factor of each decay.

    ``decay_steps`` records the scheduler step at which each milestone was
    passed. ``state_dict()`` leaves the tracker out (it holds tensors); save
    the tracker's snapshot separately if a resumed run needs it.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        tracker: WeightDistanceTracker,
        milestones: Sequence[float],
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        milestones = [float(check_number("milestones", m, minimum=0)) for m in milestones]
        if any(b < a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"milestones must be in increasing order, got {milestones}")
        check_number("gamma", gamma, above=0)
        self.tracker = tracker
        self.milestones = milestones
        self.gamma = gamma
        self.passed = 0
        self.decay_steps: List[int] = []
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        distance = self.tracker.latest()  # the one sync of a step
        while distance is not None and self.passed < len(self.milestones) and distance >= self.milestones[self.passed]:
            self.passed += 1
            self.decay_steps.append(self.last_epoch)
        return [base * self.gamma**self.passed for base in self.base_lrs]

    def state_dict(self) -> Dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "tracker")}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state = {key: value for key, value in state_dict.items() if key != "tracker"}
        self.__dict__.update(state)


def distance_milestones(reference: WeightDistanceTracker, steps: Sequence[float]) -> List[float]:
    """Distances a reference run's weights had travelled at ``steps`` (e.g. its lr-decay steps).

    Interpolated linearly between the reference tracker's updates; feed them
    to :class:`DistanceMilestoneLR` as ``milestones``.
    """
    return [reference.distance_at(step) for step in steps]
