"""Where the averages live and how they pair with a model's tensors.

One update engine (``average_set.py``) serves two stores:

* :class:`NamedStore` (``WeightAverage``, ``MultiAverage``, ``SWAG``): K tensors per name, of
  their own, keyed by the model's parameter (and, with ``use_buffers``, buffer) names; an FSDP2
  parameter's are the size of its local shard. Buffers not averaged are not held. The K tensors
  are copies of the model (the averages), then zero-filled ones (SWAG's variance), then columns
  of one ring block per name (SWAG's deviations: ``blocks[name]``, ``(columns, numel)``).
  Until its first update or load a store follows the model's layout (:meth:`NamedStore.relayout`).
* :class:`ModuleStore` (``AveragedModel``): one average, the tensors of a deep copy of the
  model, paired with the model's by position as torch pairs them; without ``use_buffers`` the
  copy's buffers are copied from the model on every update, as torch copies them.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.nn import Module

from swa_fast.averaging.plan import Entry, PlanEntries
from swa_fast.averaging.sharding import ShardLayout, host_mesh_like, layout_of, local_tensor
from swa_fast.averaging.slots import (
    Include,
    Slot,
    averaged_kinds,
    check_included_names,
    include_filter,
    module_dicts,
    named_tensor_slots,
    state_dict_keys,
    tensor_slots,
)


def new_average(tensor: Tensor, avg_dtype: Optional[torch.dtype], device: Optional[torch.device],
                zero: bool = False) -> Tensor:
    """A copy of ``tensor`` (a parameter or its local shard) to hold its average: ``avg_dtype``
    for floating tensors, on ``device`` (default: the tensor's), never requiring grad; with ``zero``
    zero-filled instead of a copy."""
    dtype = avg_dtype if avg_dtype is not None and tensor.is_floating_point() else tensor.dtype
    with torch.no_grad():
        average = torch.empty_like(tensor, dtype=dtype, device=device or tensor.device, requires_grad=False)
        if average.device.type != "meta" and zero:
            average.zero_()
        elif average.device.type != "meta" and tensor.device.type != "meta":
            average.copy_(tensor.detach())
    return average


def column_view(block: Tensor, like: Tensor, column: int) -> Tensor:
    """Column ``column`` of a ring ``block`` (``(columns, like.numel())``) as a tensor with ``like``'s
    shape and strides: ``like`` is dense (``empty_like`` keeps only dense strides), so its strides
    address exactly ``numel`` consecutive elements, and the columns never overlap."""
    return block.as_strided(like.shape, like.stride(), block.storage_offset() + column * like.numel())


class NamedStore:
    """K tensors per name of a model's tensors: ``averages[k][name]``; ``members`` copies of the
    model, then ``zeroed`` zero-filled tensors, then the ``columns`` columns of ``blocks[name]``.

    ``names`` fixes the order (``named_parameters()`` then ``named_buffers()``), ``excluded`` the
    names ``include`` left out (they are neither averaged nor unexpected), ``layouts`` the FSDP2
    layout of sharded names and ``state_keys`` every key of ``model.state_dict()`` each name
    appears under (tied aliases; none for non-persistent buffers).
    """

    def __init__(self, model: Module, members: int, use_buffers: bool, avg_dtype: Optional[torch.dtype],
                 device: Optional[torch.device], include: Include, owner: str, *, zeroed: int = 0,
                 columns: int = 0) -> None:
        self.use_buffers = use_buffers
        self.avg_dtype = avg_dtype
        self.device = device
        self.owner = owner
        self.copies, self.zeroed, self.columns = members, zeroed, columns
        self.members = members + zeroed + columns  # tensors per name (a plan's K)
        self._lay_out(model, include_filter(include, owner), include)

    def _lay_out(self, model: Module, wanted, include: Include) -> None:
        kinds = averaged_kinds(self.use_buffers)
        found = [(name, tensor) for kind in kinds for name, _, tensor in named_tensor_slots(model, kind)]
        check_included_names(include, [name for name, _ in found], self.owner)
        keys = state_dict_keys(model, kinds)
        self.names: List[str] = []
        self.excluded = set()
        self.layouts: Dict[str, ShardLayout] = {}
        self.state_keys: Dict[str, List[str]] = {}
        firsts: Dict[str, Tensor] = {}
        for name, tensor in found:
            if not wanted(name, tensor):
                self.excluded.add(name)
                continue
            self.names.append(name)
            self.state_keys[name] = keys.get(id(tensor), [])
            layout = layout_of(tensor)
            if layout is not None:
                self.layouts[name] = layout
                if self.device is not None and self.device.type != layout.device_mesh.device_type:
                    host_mesh_like(layout.device_mesh)  # made now, on every rank, not in a later state_dict
            firsts[name] = local_tensor(tensor)
        # Averages of a meta-device model hold no values until the first update copies the model.
        self.from_meta = any(t.device.type == "meta" for t in firsts.values())
        self.averages: List[Dict[str, Tensor]] = [
            {name: new_average(firsts[name], self.avg_dtype, self.device, zero=k >= self.copies)
             for name in self.names}
            for k in range(self.copies + self.zeroed)
        ]
        like = self.averages[0] if self.averages else {}
        self.blocks: Dict[str, Tensor] = {}
        if self.columns:
            for name in self.names:
                self.blocks[name] = torch.zeros((self.columns, like[name].numel()), dtype=like[name].dtype,
                                                device=like[name].device)
        self._add_columns()

    def _add_columns(self) -> None:
        """The column views of the ring blocks, after the copies and the zero-filled tensors."""
        del self.averages[self.copies + self.zeroed:]
        like = self.averages[0] if self.averages else {}
        for column in range(self.columns):
            self.averages.append({name: column_view(block, like[name], column) for name, block in self.blocks.items()})

    def home(self) -> torch.device:
        """Where the counts live: with the averages (the first one's device, CPU for an empty store)."""
        first = next(iter(self.averages[0].values()), None) if self.averages else None
        if self.device is not None:
            return self.device
        return first.device if first is not None and first.device.type != "meta" else torch.device("cpu")

    def named_model_tensors(self, model: Module) -> List[Tuple[str, Slot, Tensor]]:
        """The model's averaged tensors in the averages' order; an error that names every
        missing and unexpected name when the model is not the one the averages were made for."""
        found = {name: (slot, tensor) for kind in averaged_kinds(self.use_buffers)
                 for name, slot, tensor in named_tensor_slots(model, kind)}
        missing = [name for name in self.names if name not in found]
        unexpected = [name for name in found if name not in self.state_keys and name not in self.excluded]
        if missing or unexpected:
            raise ValueError(
                f"{self.owner}: the model does not have the tensors the averages were made for "
                f"(missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                f"unexpected: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''})"
            )
        return [(name, *found[name]) for name in self.names]

    def layout_differs(self, model: Module, exact: bool) -> Optional[str]:
        """Why the averages do not fit ``model``'s tensors, or None: a shape or sharding (the model was
        sharded after the averages were made); with ``exact`` also a device (with ``device=None``)
        or a dtype (with ``avg_dtype=None``), which an update otherwise converts."""
        for name, _, tensor in self.named_model_tensors(model):
            local = local_tensor(tensor)
            average = self.averages[0][name]
            if tuple(local.shape) != tuple(average.shape) or (layout_of(tensor) is None) != (name not in self.layouts):
                return (f"{name!r} has shape {tuple(local.shape)} here but its averages {tuple(average.shape)}. An "
                        "FSDP2 model must be updated while sharded (after the optimizer step, not between a forward "
                        "and its backward without resharding)")
            if not exact:
                continue
            if average.device.type == "meta" or (self.device is None and local.device != average.device):
                return f"{name!r} is on {local.device} but its averages on {average.device}"
            if local.is_floating_point() and self.avg_dtype is None and local.dtype != average.dtype:
                return f"{name!r} is {local.dtype} here but its averages are {average.dtype}"
        return None

    def relayout(self, model: Module) -> None:
        """Make the averages again as copies of ``model``'s tensors as they are now (its names kept):
        what an average that has never been written does when the model was sharded, moved,
        converted or materialized after the average was made."""
        held = set(self.names)
        self._lay_out(model, lambda name, tensor: name in held, None)

    def entries(self, model: Module) -> PlanEntries:
        averaged: List[List[Entry]] = [[] for _ in range(self.members)]
        current: List[Entry] = []
        for name, slot, tensor in self.named_model_tensors(model):
            for k, averages in enumerate(self.averages):
                averaged[k].append(((averages, name), averages[name]))
            current.append((slot, tensor))
        buffers = {id(tensor) for tensor in model.buffers()} if self.use_buffers else set()
        return PlanEntries(averaged, current, [[]], [], module_dicts(model) + tuple(self.averages), buffers)

    def to(self, device: Optional[torch.device], dtype: Optional[torch.dtype]) -> None:
        """Move the averages (and convert the floating ones), in place of the old tensors."""

        def moved(tensor: Tensor) -> Tensor:
            target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            return tensor.to(device=device or tensor.device, dtype=target, copy=False)

        for averages in self.averages[:self.copies + self.zeroed]:
            for name, average in averages.items():
                averages[name] = moved(average)
        self.blocks = {name: moved(block) for name, block in self.blocks.items()}
        self._add_columns()
        if device is not None:
            self.device = device
        if dtype is not None:
            self.avg_dtype = dtype


class ModuleStore:
    """The averages of ``AveragedModel``: the tensors of ``module`` (its deep copy of the model)."""

    members = 1

    def __init__(self, module: Module, use_buffers: bool) -> None:
        self.module = module
        self.use_buffers = use_buffers

    def entries(self, model: Module) -> PlanEntries:
        kinds = averaged_kinds(self.use_buffers)
        averaged = [entry for kind in kinds for entry in tensor_slots(self.module, kind)]
        current = [entry for kind in kinds for entry in tensor_slots(model, kind)]
        copied_averaged = [] if self.use_buffers else list(tensor_slots(self.module, "_buffers"))
        copied_current = [] if self.use_buffers else list(tensor_slots(model, "_buffers"))
        if len(copied_averaged) != len(copied_current):
            raise ValueError(
                f"AveragedModel: the model has {len(copied_current)} buffers but the averaged model "
                f"{len(copied_averaged)}; they must have the same structure"
            )
        buffers = {id(t) for _, t in copied_current}
        if self.use_buffers:
            buffers |= {id(t) for _, t in tensor_slots(model, "_buffers")}
        return PlanEntries([averaged], current, [copied_averaged], copied_current,
                           module_dicts(self.module) + module_dicts(model), buffers)
