"""One update of a set of averages: the fused, sync-free step and torch's unfused one.

Both ``WeightAverage.update`` and ``AveragedModel.update_parameters`` end here;
nothing else computes an average.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from swa_fast.ops.average import nonfinite_flag
from swa_fast.averaging.schedules import DEFAULT_SWA, FusedMultiAvgFn
from swa_fast.averaging.sharding import any_across
from swa_fast.averaging.plan import GroupCurrents, UpdatePlan, by_device, lerp_fallback

MultiAvgFn = Callable[[List[Tensor], List[Tensor], Tensor], None]


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


@torch.no_grad()
def fused_update(
    plan: UpdatePlan,
    fn: FusedMultiAvgFn,
    n_averaged: Tensor,
    n_skipped: Tensor,
    skip_nonfinite: bool,
    currents: Optional[List[GroupCurrents]] = None,
    skip: Optional[Tensor] = None,
) -> None:
    """Average the plan's current tensors into its averages: per device two ``average_`` calls
    (averaged pairs at ``fn``'s weight, computed on the device from ``n_averaged``; copied pairs at
    1), the first update a copy, as torch's. ``currents``: the current tensors per group when the
    caller has staged them (host copies); by default the plan's, moved to each group's device.
    ``skip``: the caller's skip decision (a staged flag); by default decided here with
    ``skip_nonfinite``."""
    if currents is None:
        currents = [group.currents_here() for group in plan.groups]
    if skip is None and skip_nonfinite:
        read = [t for group_currents in currents for lists in group_currents for tensors in lists for t in tensors]
        skip = skip_flag(plan, read, n_averaged.device)
    for group, group_currents in zip(plan.groups, currents):
        count_here = n_averaged.to(group.device)
        skip_here = None if skip is None else skip.to(group.device)
        # The first update copies, as torch's does (lerp weight 1 is an exact copy).
        weight = fn.weight(count_here).masked_fill(count_here == 0, 1.0)
        group.apply_all(group_currents, weight, skip_here)
    if skip is None:
        n_averaged.add_(1)
    else:
        n_averaged.add_(skip.logical_not())
        n_skipped.add_(skip)


@torch.no_grad()
def unfused_update(
    plan: UpdatePlan,
    fn: MultiAvgFn,
    n_averaged: Tensor,
    n_skipped: Tensor,
    skip_nonfinite: bool,
) -> None:
    """torch's update with a ``multi_avg_fn`` of the user's: the first update copies; later ones
    call ``fn(averages, currents, n_averaged)`` once per (device, dtype) of the averages, with the
    currents converted to the averages' dtype and device. Integer and bool tensors are copied.
    ``skip_nonfinite`` costs one host sync here (the decision is needed before ``fn`` runs)."""
    pairs = [(avg, cur) for group in plan.groups
             for avg, cur in zip(group.average.averaged + group.average.averaged_other,
                                 group.average.current + group.average.current_other)]
    copied = [(avg, cur) for group in plan.groups
              for avg, cur in zip(group.copy.averaged + group.copy.averaged_other,
                                  group.copy.current + group.copy.current_other)]
    if skip_nonfinite:
        flag = skip_flag(plan, [cur for _, cur in pairs + copied], n_averaged.device)
        if flag is not None and bool(flag):
            n_skipped.add_(1)
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
        fn(averages, currents, n_averaged.to(device))
    for avg, cur in copied:
        lerp_fallback(avg, cur, None, None)
    n_averaged.add_(1)
