"""One update of a set of averages: the fused, sync-free step and torch's unfused one.

``WeightAverage.update``, ``MultiAverage.update`` and ``AveragedModel.update_parameters`` all
end here; nothing else computes an average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from swa_fast.averaging.plan import GroupCurrents, UpdatePlan, by_device, lerp_fallback
from swa_fast.averaging.schedules import DEFAULT_SWA, FusedMultiAvgFn
from swa_fast.averaging.sharding import any_across
from swa_fast.ops.average import nonfinite_flag, swag_moments_

MultiAvgFn = Callable[[List[Tensor], List[Tensor], Tensor], None]


@dataclass
class Member:
    """One average of a set: its averaging function and its counts (0-dim long tensors), and for a
    function whose weight depends on the step of the previous update (``uses_last_step``, the
    power-function EMA) that step, 0 before the first update."""

    fn: Optional[MultiAvgFn]
    n_averaged: Tensor
    n_skipped: Tensor
    last_step: Optional[Tensor] = None

    @property
    def fused(self) -> Optional[FusedMultiAvgFn]:
        return fused_fn(self.fn)

    @classmethod
    def new(cls, fn: Optional[MultiAvgFn], home: torch.device) -> "Member":
        """A member that has averaged nothing yet, its counts on ``home``."""
        zero = lambda: torch.zeros((), dtype=torch.long, device=home)  # noqa: E731
        keeps_step = getattr(fused_fn(fn), "uses_last_step", False)
        return cls(fn, zero(), zero(), zero() if keeps_step else None)

    def move_to(self, home: torch.device) -> None:
        """Move the counts (with the averages' new home)."""
        self.n_averaged = self.n_averaged.to(home)
        self.n_skipped = self.n_skipped.to(home)
        if self.last_step is not None:
            self.last_step = self.last_step.to(home)


def fused_fn(multi_avg_fn: Optional[MultiAvgFn]) -> Optional[FusedMultiAvgFn]:
    """The fused averaging function ``multi_avg_fn`` stands for (None: SWA), or None when it is a
    function of the user's, which runs as torch runs it."""
    if multi_avg_fn is None:
        return DEFAULT_SWA
    return multi_avg_fn if isinstance(multi_avg_fn, FusedMultiAvgFn) else None


def any_nonfinite(tensors: Sequence[Tensor], device: torch.device) -> Optional[Tensor]:
    """One 0-dim bool on ``device``: whether any of ``tensors`` holds a NaN or Inf (no sync)."""
    checked = [t for t in tensors if t.is_floating_point() or t.is_complex()]
    flags = [nonfinite_flag(group).to(device) for group in by_device(checked)]
    if not flags:
        return None
    return torch.stack(flags).any() if len(flags) > 1 else flags[0]


def skip_flag(plan: UpdatePlan, tensors: Sequence[Tensor], device: torch.device) -> Optional[Tensor]:
    """Whether this update is skipped: any non-finite value in ``tensors`` on any rank holding
    shards of the plan (sharded models), on ``device`` (no host sync)."""
    flag = any_nonfinite(tensors, device)
    if flag is None or not plan.meshes:
        return flag
    return any_across(flag, plan.meshes)


def member_weights(members: Sequence[Member], device: torch.device, step: Optional[Tensor]) -> Tensor:
    """The float64 weights of ``members`` on ``device``, each from its own count (and the step,
    when given, and the step of its previous update, for a function that asks for it); a member's
    first update copies (weight 1), as torch's does, unless its function says otherwise
    (``first_update_copies``: timm's and diffusers' EMAs). No host sync."""
    weights = []
    step_here = None if step is None else step.to(device)
    for member in members:
        count = member.n_averaged.to(device)
        fn = member.fused
        if member.last_step is not None:
            weight = fn.weight(count, _this_step(member, step_here, device), member.last_step.to(device))
        elif step_here is None:
            weight = fn.weight(count)
        else:
            weight = fn.weight(count, step_here)
        weight = weight.to(torch.float64)
        weights.append(weight.masked_fill(count == 0, 1.0) if fn.first_update_copies else weight)
    return torch.stack(weights)


def _this_step(member: Member, step: Optional[Tensor], device: torch.device) -> Tensor:
    """The step of this update for a member that keeps its last one: the given step, else the last + 1."""
    return step if step is not None else member.last_step.to(device) + 1


def advance_last_steps(members: Sequence[Member], step: Optional[Tensor], skip: Optional[Tensor]) -> None:
    """After an update: each member that keeps its last step records this one (not when skipped)."""
    for member in members:
        if member.last_step is None:
            continue
        here = _this_step(member, None if step is None else step.to(member.last_step.device),
                          member.last_step.device)
        if skip is not None:
            here = torch.where(skip.to(here.device), member.last_step, here)
        member.last_step.copy_(here)


@torch.no_grad()
def fused_update(
    plan: UpdatePlan,
    members: Sequence[Member],
    indices: Sequence[int],
    skip_nonfinite: bool,
    step: Optional[Tensor] = None,
    currents: Optional[List[GroupCurrents]] = None,
    skip: Optional[Tensor] = None,
) -> None:
    """Average the plan's current tensors into the averages of ``members`` (the plan's members
    ``indices``, all using fused functions): per device one ``multi_average_`` call for the averaged
    pairs (each member's weight computed on the device from its count) and one for copied pairs,
    whatever the number of members: one read of each current tensor. ``currents``: the current
    tensors per group when the caller has staged them (host copies); by default the plan's, moved
    to each group's device. ``skip``: the caller's skip decision (a staged flag); by default decided
    here with ``skip_nonfinite``.

    All or nothing: everything that can fail (the weights, torch's arithmetic for the rare pairs
    the fused op does not take) runs before the first write.
    """
    if currents is None:
        currents = [group.currents_here() for group in plan.groups]
    if skip is None and skip_nonfinite:
        read = [t for group_currents in currents for lists in group_currents for tensors in lists for t in tensors]
        skip = skip_flag(plan, read, members[0].n_averaged.device)
    commits = []
    for group, group_currents in zip(plan.groups, currents):
        weights = member_weights(members, group.device, step)
        skip_here = None if skip is None else skip.to(group.device)
        # Stochastic rounding's counters: each member's updates so far (a new stream each update,
        # the same after a resume).
        counters = [m.n_averaged.to(group.device) for m in members] if group.rounding_seed is not None else ()
        commits.append(group.prepare(group_currents, weights, indices, skip_here, counters))
    for commit in commits:
        commit()
    advance_last_steps(members, step, skip)
    for member in members:
        if skip is None:
            member.n_averaged.add_(1)
        else:
            member.n_averaged.add_(skip.logical_not())
            member.n_skipped.add_(skip)


@torch.no_grad()
def unfused_update(plan: UpdatePlan, member: Member, index: int, skip_nonfinite: bool) -> None:
    """torch's update with a ``multi_avg_fn`` of the user's: the first update copies; later ones
    call ``fn(averages, currents, n_averaged)`` once per (device, dtype) of the averages, with the
    currents converted to the averages' dtype and device. Integer and bool tensors are copied.
    ``skip_nonfinite`` costs one host sync here (the decision is needed before ``fn`` runs)."""
    pairs = [(avg, cur) for group in plan.groups
             for avg, cur in zip(group.average.averaged[index] + group.average.averaged_other[index],
                                 group.average.current + group.average.current_other)]
    copied = [(avg, cur) for group in plan.groups
              for avg, cur in zip(group.copy.averaged[index] + group.copy.averaged_other[index],
                                  group.copy.current + group.copy.current_other)]
    n_averaged = member.n_averaged
    if skip_nonfinite:
        flag = skip_flag(plan, [cur for _, cur in pairs + copied], n_averaged.device)
        if flag is not None and bool(flag):
            member.n_skipped.add_(1)
            return
    first = bool(n_averaged == 0)
    lists: dict = {}
    for avg, cur in pairs:
        if first or not (avg.is_floating_point() or avg.is_complex()):
            lerp_fallback(avg, cur, None, None)
        else:
            averages, currents = lists.setdefault((avg.device, avg.dtype), ([], []))
            averages.append(avg)
            currents.append(cur.to(device=avg.device, dtype=avg.dtype))
    for (device, _), (averages, currents) in lists.items():
        member.fn(averages, currents, n_averaged.to(device))
    for avg, cur in copied:
        lerp_fallback(avg, cur, None, None)
    n_averaged.add_(1)


def moments_value(mean: Tensor, variance: Tensor, current: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``swag_moments_``'s arithmetic in torch, for the pairs the fused op does not take (a current
    more precise than the averages, float8): the new mean, variance and deviation, in float64 and
    rounded once to the averages' dtype."""
    x, m, v = (t.to(device=mean.device, dtype=torch.float64) for t in (current, mean, variance))
    w = weight.to(device=mean.device, dtype=torch.float64)
    delta = x - m
    new_mean = torch.lerp(m, x, w)
    new_variance = (1 - w) * (v + w * delta * delta)
    return new_mean.to(mean.dtype), new_variance.to(mean.dtype), (x - new_mean).to(mean.dtype)


@torch.no_grad()
def moments_update(
    plan: UpdatePlan,
    member: Member,
    deviation: Optional[int],
    currents: Optional[List[GroupCurrents]] = None,
    skip: Optional[Tensor] = None,
) -> None:
    """One SWAG collection: the plan's averages 0 (the mean, ``member``'s: an equal-weight SWA
    average) and 1 (the centred variance) updated from the current tensors, and ``x - mean`` written
    into average ``deviation`` (a ring column; None: none), by ``swag_moments_``: one read of each
    current tensor, the weight ``1/(n+1)`` computed on the device from ``member``'s count, no host
    sync. ``currents``/``skip``: as for :func:`fused_update`. All or nothing, as there."""
    if currents is None:
        currents = [group.currents_here() for group in plan.groups]
    commits = []
    for group, ((fused, other), _) in zip(plan.groups, currents):
        weight = member_weights([member], group.device, None)[0]
        skip_here = None if skip is None else skip.to(group.device)
        pairs = group.average
        deviations = [] if deviation is None else pairs.averaged[deviation]
        deviations_other = [] if deviation is None else pairs.averaged_other[deviation]
        values = [moments_value(m, v, x, weight) for m, v, x in
                  zip(pairs.averaged_other[0], pairs.averaged_other[1], other)]

        def commit(pairs=pairs, fused=fused, deviations=deviations, deviations_other=deviations_other,
                   values=values, weight=weight, skip_here=skip_here) -> None:
            if fused:
                swag_moments_(pairs.averaged[0], pairs.averaged[1], deviations, fused, weight, skip_here)
            targets = zip(pairs.averaged_other[0], pairs.averaged_other[1],
                          deviations_other or [None] * len(values), values)
            for mean, variance, dev, (new_mean, new_variance, new_dev) in targets:
                keep = (lambda old, new: torch.where(skip_here, old, new)) if skip_here is not None else \
                    (lambda old, new: new)
                for target, new in ((mean, new_mean), (variance, new_variance), (dev, new_dev)):
                    if target is not None:
                        target.copy_(keep(target, new))

        commits.append(commit)
    for commit in commits:
        commit()
    if skip is None:
        member.n_averaged.add_(1)
    else:
        member.n_averaged.add_(skip.logical_not())
        member.n_skipped.add_(skip)
