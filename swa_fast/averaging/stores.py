"""Where the averages live and how they pair with a model's tensors.

One update engine (``weight_average.py``) serves two stores:

* :class:`NamedStore` (``WeightAverage``): the averages are tensors of their own,
  one per parameter (and, with ``use_buffers``, buffer) name of the model; an
  FSDP2 parameter's average is the size of its local shard. Buffers not averaged
  are not held at all.
* :class:`ModuleStore` (``AveragedModel``): the averages are the tensors of a
  deep copy of the model, paired with the model's by position as torch pairs
  them, and without ``use_buffers`` the copy's buffers are copied from the model
  on every update, as torch copies them.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

from torch import Tensor
from torch.nn import Module

from swa_fast.averaging.sharding import local_tensor
from swa_fast.averaging.plan import Entry, PlanEntries, Slot, tensor_slots


def named_tensor_slots(module: Module, kind: str) -> Iterator[Tuple[str, Slot, Tensor]]:
    """(name, slot, tensor) in ``module.named_parameters()`` (``kind="_parameters"``) or
    ``.named_buffers()`` (``"_buffers"``) order, with their de-duplication: a tensor shared by
    two modules (tied weights) appears once, under its first name."""
    seen = set()
    for prefix, owner in module.named_modules():
        members = getattr(owner, kind)
        for key, tensor in members.items():
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            yield (f"{prefix}.{key}" if prefix else key), (members, key), tensor


def averaged_kinds(use_buffers: bool) -> Tuple[str, ...]:
    return ("_parameters", "_buffers") if use_buffers else ("_parameters",)


def module_dicts(module: Module) -> Tuple[dict, ...]:
    """Every dict whose entries decide which tensors ``module`` has."""
    return tuple(getattr(m, kind) for m in module.modules() for kind in ("_parameters", "_buffers", "_modules"))


class NamedStore:
    """The averages of ``WeightAverage``: ``averages[name]`` for every averaged name of the model."""

    def __init__(self, averages: Dict[str, Tensor], use_buffers: bool) -> None:
        self.averages = averages
        self.use_buffers = use_buffers

    def named_model_tensors(self, model: Module, owner: str = "WeightAverage") -> List[Tuple[str, Slot, Tensor]]:
        """The model's averaged tensors in the averages' order; an error that names every
        missing and unexpected name when the model is not the one the averages were made for."""
        found = {name: (slot, tensor) for kind in averaged_kinds(self.use_buffers)
                 for name, slot, tensor in named_tensor_slots(model, kind)}
        if found.keys() != self.averages.keys():
            missing = [name for name in self.averages if name not in found]
            unexpected = [name for name in found if name not in self.averages]
            raise ValueError(
                f"{owner}: the model does not have the tensors the averages were made for "
                f"(missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                f"unexpected: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''})"
            )
        return [(name, *found[name]) for name in self.averages]

    def entries(self, model: Module) -> PlanEntries:
        averaged: List[Entry] = []
        current: List[Entry] = []
        for name, slot, tensor in self.named_model_tensors(model):
            average = self.averages[name]
            shard_shape = local_tensor(tensor).shape
            if average.shape != shard_shape:
                raise ValueError(
                    f"WeightAverage: {name!r} has shape {tuple(shard_shape)} here but its average "
                    f"{tuple(average.shape)}. An FSDP2 model must be updated while sharded (after the "
                    "optimizer step, not between a forward and its backward without resharding)."
                )
            averaged.append(((self.averages, name), average))
            current.append((slot, tensor))
        return PlanEntries(averaged, current, [], [], module_dicts(model) + (self.averages,))


class ModuleStore:
    """The averages of ``AveragedModel``: the tensors of ``module`` (its deep copy of the model)."""

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
        return PlanEntries(averaged, current, copied_averaged, copied_current,
                           module_dicts(self.module) + module_dicts(model))
