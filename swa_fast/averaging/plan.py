"""The cached tensor lists behind the fused update (``WeightAverage.update``,
``MultiAverage.update``, ``AveragedModel.update_parameters``).

Building the lists costs a walk over both models and a dtype check per pair;
an update with a cached plan costs a few fused op calls. A plan must never give
a wrong answer, so every update first checks, cheaply, that it still describes
both models (:meth:`UpdatePlan.is_current`): every tensor it holds is still the
one in its module's ``_parameters``/``_buffers`` slot (a parameter replaced by
``model.fc.weight = nn.Parameter(...)``, ``model._parameters[name] = p``, a buffer
assigned a new tensor in a forward, or ``.to()`` under
``torch.__future__.set_overwrite_module_params_on_conversion(True)`` is noticed),
every submodule is still the one in its parent's ``_modules`` slot
(``model.fc = nn.Linear(...)``), with the same dtype and device (``param.data = ...``,
``model.half()`` and ``model.to(device)`` keep the object but change these), and no
slot was added or removed in the dicts it walked. Nothing outside the model is
consulted: a module created elsewhere in the process changes nothing. For an FSDP2
parameter (a DTensor) the plan holds its local shard, and checks that the DTensor
still holds that shard.

A plan pairs each current tensor with K averages (the members of a
``MultiAverage``; K = 1 for ``WeightAverage`` and ``AveragedModel``). Which tensors
pair with which is the store's business (``stores.py``): by position for
``AveragedModel`` (as torch pairs them), by name otherwise.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor
from torch.nn import Module

from swa_fast.averaging.sharding import is_dtensor, local_tensor, meshes_of
from swa_fast.averaging.slots import Slot, modules_writing_parameters_in_forward, submodule_slots
from swa_fast.ops.average import (
    average_stochastic_,
    dtypes_and_devices,
    is_fusable_pair,
    is_stochastic_pair,
    multi_average_,
)

Entry = Tuple[Slot, Tensor]


@dataclass
class Pairs:
    """(K averages, current) pairs, split into those the fused op takes and the rest."""

    members: int
    stochastic: bool = False  # the fused op is average_stochastic_ (its pairs: a fp32 current into bf16 too)
    averaged: List[List[Tensor]] = field(default_factory=list)  # averaged[k][i]: average k of current[i]
    current: List[Tensor] = field(default_factory=list)
    averaged_other: List[List[Tensor]] = field(default_factory=list)  # e.g. complex, float8, current more precise
    current_other: List[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.averaged = [[] for _ in range(self.members)]
        self.averaged_other = [[] for _ in range(self.members)]

    def add(self, averages: Sequence[Tensor], current: Tensor) -> None:
        # Every member of a pair has the same dtype and layout, so the first one decides for all.
        fused = (is_stochastic_pair if self.stochastic else is_fusable_pair)(averages[0], current)
        for k, average in enumerate(averages):
            (self.averaged if fused else self.averaged_other)[k].append(average)
        (self.current if fused else self.current_other).append(current)


@dataclass
class DeviceGroup:
    """Everything one update does on one device of the averages: a ``multi_average_`` call for the
    averaged pairs and one for the copied buffers (each a few kernel launches, whatever K), plus
    torch's lerp for the pairs the fused op does not take."""

    device: torch.device
    members: int
    # Stochastic rounding of fp16/bf16 averages: member k's seed is rounding_seed + k (None: round to nearest).
    rounding_seed: Optional[int] = None
    average: Pairs = None  # lerped with each member's weight
    copy: Pairs = None  # buffers copied each update (AveragedModel without use_buffers)
    transfer: bool = False  # current tensors live on another device
    is_buffer: Dict[int, bool] = field(default_factory=dict)  # id(current) -> it is a buffer

    def __post_init__(self) -> None:
        self.average = Pairs(self.members, stochastic=self.rounding_seed is not None)
        self.copy = Pairs(self.members)

    def add(self, pairs: Pairs, averages: Sequence[Tensor], current: Tensor, buffer: bool) -> None:
        self.transfer |= current.device != averages[0].device
        self.is_buffer[id(current)] = buffer
        pairs.add(averages, current)

    def current_tensors(self) -> List[Tensor]:
        """Every current tensor this group reads, in a fixed order (see :meth:`split`)."""
        return [*self.average.current, *self.average.current_other, *self.copy.current, *self.copy.current_other]

    def split(self, flat: Sequence[Tensor]) -> "GroupCurrents":
        """``flat`` (one tensor per :meth:`current_tensors` entry, e.g. host copies of them) as
        the (averaged, copied) x (fused, other) lists :meth:`prepare` takes."""
        bounds = list(itertools.accumulate(
            map(len, (self.average.current, self.average.current_other, self.copy.current, self.copy.current_other)),
            initial=0))
        lists = [list(flat[a:b]) for a, b in zip(bounds, bounds[1:])]
        return (lists[0], lists[1]), (lists[2], lists[3])

    def currents_here(self) -> "GroupCurrents":
        """The current tensors, on this group's device (copied there when they live elsewhere)."""
        flat = self.current_tensors()
        if self.transfer:
            flat = [t.detach().to(self.device) for t in flat]
        return self.split(flat)

    def prepare(self, currents: "GroupCurrents", weights: Tensor, members: Sequence[int],
                skip: Optional[Tensor], counters: Sequence[Tensor] = ()) -> Callable[[], None]:
        """Everything of one update of this group that can fail, done before anything is written:
        the new values of the pairs torch's lerp handles. Returns what writes the update (the fused
        calls, the prepared values), which cannot fail once the arguments passed the checks.
        ``weights[j]`` is the weight of member ``members[j]``; copied pairs take weight 1. With
        stochastic rounding, ``counters[j]`` is member ``members[j]``'s update count on this device
        (its random stream's counter) and each member is one ``average_stochastic_`` call (one
        read of the currents per member, where ``multi_average_`` reads them once for all)."""
        (average_current, average_other), (copy_current, copy_other) = currents
        averaged = [self.average.averaged[k] for k in members]
        copied = [self.copy.averaged[k] for k in members]
        ones = ones_like_weights(weights)
        others = [(target, lerp_value(target, cur, weights[j], skip))
                  for j, k in enumerate(members)
                  for target, cur in zip(self.average.averaged_other[k], average_other)]
        others += [(target, lerp_value(target, cur, None, skip))
                   for k in members for target, cur in zip(self.copy.averaged_other[k], copy_other)]

        stochastic = self.rounding_seed is not None
        if stochastic and len(counters) != len(members):
            raise RuntimeError("stochastic rounding needs each member's update counter")

        def commit() -> None:
            if stochastic:
                for j, k in enumerate(members):
                    average_stochastic_(averaged[j], average_current, weights[j], counters[j],
                                        member_seed(self.rounding_seed, k), skip=skip)
            else:
                multi_average_(averaged, average_current, weights, skip=skip)
            multi_average_(copied, copy_current, ones, skip=skip)  # buffers copied, as torch does
            for target, value in others:
                target.copy_(value)

        return commit


GroupCurrents = Tuple[Tuple[List[Tensor], List[Tensor]], Tuple[List[Tensor], List[Tensor]]]


def member_seed(seed: int, index: int) -> int:
    """Member ``index``'s stochastic-rounding seed: ``seed + index``, wrapped into int64 (distinct
    seeds give independent Philox streams)."""
    value = (seed + index) % 2**64
    return value - 2**64 if value >= 2**63 else value


@dataclass
class PlanEntries:
    """What a store pairs for one update: K lists of averaged entries with one list of current
    entries (each member's weight), copied-average lists with copied-current entries (weight 1:
    buffers kept in sync), every dict whose size proves nothing was added or removed, and the
    ids of the current tensors that are buffers."""

    averaged: List[List[Entry]]
    current: List[Entry]
    copied_averaged: List[List[Entry]]
    copied_current: List[Entry]
    walked: Tuple[dict, ...]
    buffers: Set[int]


@dataclass
class UpdatePlan:
    """The cached tensor lists of one (averages, source model) pair, and what proves
    they are still current."""

    model: "weakref.ref[Module]"
    groups: List[DeviceGroup]
    # Every tensor of the plan, averages and source model alike: the dict and key of its slot,
    # the tensor, the tensor the kernels read (a DTensor's local shard), and all their dtypes and
    # devices (dtypes_and_devices of the kernels' tensors).
    dicts: Tuple[dict, ...]
    keys: Tuple[str, ...]
    tensors: Tuple[Tensor, ...]
    kernel_tensors: Tuple[Tensor, ...]
    metadata: bytes
    # Every dict the store walked, and how many entries each had.
    walked: Tuple[dict, ...]
    sizes: List[int]
    # Every submodule's slot: a replaced submodule changes no size.
    module_dicts: Tuple[dict, ...]
    module_keys: Tuple[str, ...]
    modules: Tuple[Module, ...]
    # The DTensors among the tensors, and the local shard of each that the groups hold.
    sharded: Tuple[Tensor, ...] = ()
    shards: Tuple[Tensor, ...] = ()
    # The device meshes of the sharded tensors: the ranks that must agree on skipping an update.
    meshes: Tuple[object, ...] = ()
    # Modules of the source model whose forward writes averaged parameters (nn.Embedding(max_norm=...)).
    parameter_writers: Tuple[Module, ...] = ()

    def is_current(self, model: Module) -> bool:
        """Whether the plan still describes ``model`` and the averages: C loops over the
        cached tuples and one C++ call, no module walk (tens of microseconds for the few hundred
        tensors of a ResNet-50 and its average on one CPU core)."""
        return (
            self.model() is model
            and list(map(len, self.walked)) == self.sizes
            and all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.tensors))
            and all(map(operator.is_, map(dict.get, self.module_dicts, self.module_keys), self.modules))
            and all(map(operator.is_, map(local_tensor, self.sharded), self.shards))
            and dtypes_and_devices(self.kernel_tensors) == self.metadata
        )

    def current_sources(self) -> List[Tensor]:
        """Every current tensor of every group, in group order (what an offloaded update stages)."""
        return [t for group in self.groups for t in group.current_tensors()]

    def source_is_buffer(self) -> List[bool]:
        """For each of :meth:`current_sources`: whether it is a buffer (written by forwards)."""
        return [group.is_buffer.get(id(t), False) for group in self.groups for t in group.current_tensors()]


def build_plan(model: Module, entries: PlanEntries, owner: str, rounding_seed: Optional[int] = None) -> UpdatePlan:
    """The plan for one update of the averages from ``model``, as ``entries`` pairs them
    (``zip``: pairs beyond the shorter list are ignored, as torch ignores them); ``rounding_seed``:
    fp16/bf16 averages rounded stochastically with this seed (None: to nearest).

    Raises:
        ValueError: a tensor of the model is on the meta device (it has no values to average).
    """
    members = len(entries.averaged)
    groups: Dict[torch.device, DeviceGroup] = {}

    def group_for(tensor: Tensor) -> DeviceGroup:
        if tensor.device not in groups:
            groups[tensor.device] = DeviceGroup(tensor.device, members, rounding_seed)
        return groups[tensor.device]

    for pairs_of, averaged, current in (
        (operator.attrgetter("average"), entries.averaged, entries.current),
        (operator.attrgetter("copy"), entries.copied_averaged, entries.copied_current),
    ):
        for position, (_, t_cur) in enumerate(current):
            if position >= min(map(len, averaged)):
                break
            averages = [averaged[k][position][1] for k in range(members)]
            source = local_tensor(t_cur)
            if source.device.type == "meta":
                raise ValueError(f"{owner}: the model has tensors on the meta device, which hold no values to "
                                 "average; materialize it first (model.to_empty(device=...) and initialize it)")
            group = group_for(averages[0])
            group.add(pairs_of(group), averages, source, id(t_cur) in entries.buffers)

    listed = [e for entries_k in entries.averaged for e in entries_k] + entries.current
    listed += [e for entries_k in entries.copied_averaged for e in entries_k] + entries.copied_current
    tensors = tuple(tensor for _, tensor in listed)
    kernel_tensors = tuple(map(local_tensor, tensors))
    sharded = tuple(t for t in tensors if is_dtensor(t))
    submodules = submodule_slots(model)
    written = {id(t) for _, t in entries.current}
    writers = tuple(m for m in modules_writing_parameters_in_forward(model)
                    if any(id(p) in written for p in m.parameters(recurse=False)))
    return UpdatePlan(
        model=weakref.ref(model),
        groups=list(groups.values()),
        dicts=tuple(d for (d, _), _ in listed),
        keys=tuple(k for (_, k), _ in listed),
        tensors=tensors,
        kernel_tensors=kernel_tensors,
        metadata=dtypes_and_devices(kernel_tensors),
        walked=entries.walked,
        sizes=list(map(len, entries.walked)),
        module_dicts=tuple(d for d, _, _ in submodules),
        module_keys=tuple(k for _, k, _ in submodules),
        modules=tuple(m for _, _, m in submodules),
        sharded=sharded,
        shards=tuple(map(local_tensor, sharded)),
        meshes=meshes_of(sharded),
        parameter_writers=writers,
    )


def lerp_value(averaged: Tensor, current: Tensor, weight: Optional[Tensor], skip: Optional[Tensor]) -> Tensor:
    """torch's own arithmetic for the rare pairs the fused op does not take, as a new tensor
    (``weight=None``: a copy, as torch copies buffers, which also works for dtypes without a lerp
    such as float8)."""
    if weight is not None and (averaged.is_floating_point() or averaged.is_complex()):
        new = torch.lerp(averaged, current.to(averaged.dtype), weight.to(averaged.dtype))
    else:
        new = current.to(averaged.dtype)
    if skip is not None:
        new = torch.where(skip, averaged, new)
    return new


def lerp_fallback(averaged: Tensor, current: Tensor, weight: Optional[Tensor], skip: Optional[Tensor]) -> None:
    """:func:`lerp_value`, written into ``averaged``."""
    averaged.copy_(lerp_value(averaged, current, weight, skip))


_ONES: dict = {}


def ones_like_weights(weights: Tensor) -> Tensor:
    """A cached float64 vector of ones like ``weights``: the weights of a plain copy."""
    key = (weights.device, weights.numel())
    if key not in _ONES:
        _ONES[key] = torch.ones(weights.numel(), dtype=torch.float64, device=weights.device)
    return _ONES[key]


def by_device(tensors: Sequence[Tensor]) -> List[List[Tensor]]:
    lists: dict = {}
    for t in tensors:
        lists.setdefault(t.device, []).append(t)
    return list(lists.values())
