"""Checking a saved state of averages whole, before anything of it is written.

``WeightAverage.load_state_dict`` and ``MultiAverage.load_state_dict`` promise that a state that
does not fit raises with nothing changed. So every name, shape, dtype, device and count is checked
here first and turned into a list of writes; the caller writes them only when all passed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from swa_fast.averaging.sharding import ShardLayout, is_dtensor, local_part


@dataclass
class Writes:
    """What a checked state writes: (average, value) pairs and (count, value) pairs."""

    averages: List[Tuple[Tensor, Tensor]] = field(default_factory=list)
    counts: List[Tuple[Tensor, Tensor]] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    def extend(self, other: "Writes") -> None:
        self.averages += other.averages
        self.counts += other.counts
        self.missing += other.missing
        self.unexpected += other.unexpected

    @torch.no_grad()
    def apply(self) -> None:
        for average, value in self.averages:
            if value is not average:
                average.copy_(value)
        for count, value in self.counts:
            count.copy_(value)


def check_count(value: Any, key: str, owner: str) -> Tensor:
    """A saved count (``n_averaged``, ``n_skipped``) as a 0-dim int64 CPU tensor, or an error that
    says what is wrong: a count is an integer >= 0, a Python int or a 0-dim integer tensor."""
    problem = None
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        problem = "a bool"
    elif isinstance(value, Tensor):
        if is_dtensor(value):
            value = value.full_tensor()
        if value.device.type == "meta":
            problem = "a meta tensor (it has no value)"
        elif value.numel() != 1 or value.dim() > 1:
            problem = f"a tensor of shape {tuple(value.shape)}"
        elif value.is_floating_point() or value.is_complex():
            problem = f"a {value.dtype} tensor ({value.item()})"
        else:
            value = int(value.item())
    elif isinstance(value, numbers.Integral):
        value = int(value)
    elif isinstance(value, float):
        problem = f"the float {value}" if math.isfinite(value) else f"{value}"
    else:
        problem = f"{type(value).__name__} {value!r}"
    if problem is None and value < 0:
        problem = str(value)
    if problem is not None:
        raise ValueError(f"{owner}.load_state_dict: {key} must be an integer >= 0 (a Python int or a 0-dim "
                         f"integer tensor), got {problem}")
    return torch.tensor(value, dtype=torch.long)


def check_averages(saved: Any, averages: Dict[str, Tensor], layouts: Mapping[str, ShardLayout],
                   strict: bool, owner: str, where: str = "") -> Writes:
    """The writes that load ``saved`` (name -> tensor) into ``averages``; an error naming the first
    name whose value does not fit (not a tensor, the meta device, a shape, a dtype that cannot be
    the average's), and with ``strict`` every missing and unexpected name."""
    if not isinstance(saved, Mapping):
        raise TypeError(f"{owner}.load_state_dict: {where}'averages' must be a dict of tensors, got "
                        f"{type(saved).__name__}")
    writes = Writes()
    writes.missing = [name for name in averages if name not in saved]
    writes.unexpected = [name for name in saved if name not in averages]
    if strict and (writes.missing or writes.unexpected):
        raise ValueError(f"{owner}.load_state_dict: {where}missing averages {writes.missing}, unexpected "
                         f"{writes.unexpected}")
    for name, value in saved.items():
        if name not in averages:
            continue
        average = averages[name]
        if not isinstance(value, Tensor):
            raise TypeError(f"{owner}.load_state_dict: {where}{name!r} must be a tensor, got {type(value).__name__}")
        if value.device.type == "meta":
            raise ValueError(f"{owner}.load_state_dict: {where}{name!r} is a meta tensor: it has no values to load")
        if average.is_floating_point() != value.is_floating_point() or value.is_complex() != average.is_complex() \
                or (not average.is_floating_point() and value.dtype != average.dtype):
            kind = "floating" if average.is_floating_point() else str(average.dtype)
            raise ValueError(f"{owner}.load_state_dict: {where}{name!r} is {value.dtype} in the state dict but its "
                             f"average is {kind} ({average.dtype})")
        part = local_part(value, layouts.get(name))
        if tuple(part.shape) != tuple(average.shape):
            raise ValueError(f"{owner}.load_state_dict: {where}{name!r} has shape {tuple(value.shape)} in the "
                             f"state dict but {tuple(average.shape)} here")
        writes.averages.append((average, part))
    return writes


def check_member_state(state: Any, averages: Dict[str, Tensor], layouts: Mapping[str, ShardLayout],
                       counts: Tuple[Tensor, Tensor], strict: bool, owner: str, where: str = "",
                       last_step: Optional[Tensor] = None) -> Writes:
    """Every write of one average's state (``{"averages", "n_averaged", "n_skipped"?, "last_step"?}``;
    ``last_step`` for an average whose function keeps the step of its previous update)."""
    if not isinstance(state, Mapping) or "averages" not in state or "n_averaged" not in state:
        raise TypeError(f"{owner}.load_state_dict: {where}expected a dict with 'averages' (a dict of tensors) and "
                        "'n_averaged', as WeightAverage.state_dict() returns")
    writes = check_averages(state["averages"], averages, layouts, strict, owner, where)
    n_averaged, n_skipped = counts
    writes.counts.append((n_averaged, check_count(state["n_averaged"], f"{where}n_averaged", owner)))
    if "n_skipped" in state:
        writes.counts.append((n_skipped, check_count(state["n_skipped"], f"{where}n_skipped", owner)))
    if last_step is not None and "last_step" in state:
        writes.counts.append((last_step, check_count(state["last_step"], f"{where}last_step", owner)))
    return writes
