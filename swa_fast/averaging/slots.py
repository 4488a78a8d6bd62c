"""Where a model keeps its tensors, which of them an average holds, and under which names.

Everything the averaging core knows about a module's structure is read here: the
``_parameters`` / ``_buffers`` slots (the dict and key that hold each tensor, so a cached
plan can check in O(1) that a slot still holds the same tensor), the names of
``named_parameters()`` / ``named_buffers()`` (tied weights once, under their first name), the
state-dict keys of each name (tied aliases included, non-persistent buffers excluded), the
wrappers whose names are not the model's own (DDP, DataParallel, ``torch.compile``), and the
modules whose forward writes their own parameters.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from torch import Tensor, nn
from torch.nn import Module

# A tensor's slot: the module dict that holds it, and its key there.
Slot = Tuple[Dict[str, Optional[Tensor]], str]
# What selects the averaged tensors: names, or a predicate of (name, tensor).
Include = Union[None, Iterable[str], Callable[[str, Tensor], bool]]

try:  # wrappers that hold the user's model under another attribute
    from torch._dynamo.eval_frame import OptimizedModule
except ImportError:  # pragma: no cover - every torch >= 2.0 has it
    OptimizedModule = None  # type: ignore[assignment, misc]
try:
    from torch.distributed.fsdp import FullyShardedDataParallel
except ImportError:  # pragma: no cover - builds without torch.distributed
    FullyShardedDataParallel = None  # type: ignore[assignment, misc]


def tensor_slots(module: Module, kind: str) -> Iterator[Tuple[Slot, Tensor]]:
    """(slot, tensor) for ``module.parameters()`` (``kind="_parameters"``) or ``.buffers()``
    (``"_buffers"``), in the same order and with the same de-duplication."""
    seen = set()
    for owner in module.modules():
        members = getattr(owner, kind)
        for key, tensor in members.items():
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            yield (members, key), tensor


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


def submodule_slots(module: Module) -> List[Tuple[dict, str, Module]]:
    """(``_modules`` dict, key, submodule) for every submodule: a replaced submodule
    (``model.fc = nn.Linear(...)``) keeps the dict's size but not the object in the slot."""
    return [(m._modules, key, child) for m in module.modules() for key, child in m._modules.items()
            if child is not None]


def unwrap(model: Module, owner: str) -> Module:
    """The module whose names the averages use: the model inside DDP, DataParallel and
    ``torch.compile``'s wrapper (which prefix every name with ``module.`` or ``_orig_mod.``), so
    an average made from either form updates from and swaps into the other.

    Raises:
        TypeError: FSDP1 (``FullyShardedDataParallel``), whose flattened parameters are not the
            model's; FSDP2's ``fully_shard`` is supported.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif OptimizedModule is not None and isinstance(model, OptimizedModule):
            model = model._orig_mod
        elif FullyShardedDataParallel is not None and isinstance(model, FullyShardedDataParallel):
            raise TypeError(
                f"{owner}: FSDP1 (FullyShardedDataParallel) flattens the model's parameters, which the averages "
                "cannot pair with by name. Shard the model with FSDP2 (torch.distributed.fsdp.fully_shard), whose "
                "parameters keep their names, or pass the model outside FSDP1"
            )
        else:
            return model


def include_filter(include: Include, owner: str) -> Callable[[str, Tensor], bool]:
    """``include`` as a predicate of (name, tensor): None takes every tensor, a predicate is
    used as it is, an iterable of names takes exactly those (see :func:`check_included_names`)."""
    if include is None:
        return lambda name, tensor: True
    if callable(include):
        return include
    if isinstance(include, (str, bytes)):
        raise TypeError(f"{owner}: include must be names (a list or set of str) or a predicate of (name, tensor), "
                        f"got the single string {include!r}; wrap it in a list")
    names = set(include)
    if not all(isinstance(name, str) for name in names):
        raise TypeError(f"{owner}: include must hold parameter names (str), got {sorted(map(repr, names))[:5]}")
    return lambda name, tensor: name in names


def check_included_names(include: Include, available: Iterable[str], owner: str) -> None:
    """With ``include`` a list of names: an error that names those the model does not have."""
    if include is None or callable(include):
        return
    known = set(available)
    unknown = sorted(set(include) - known)
    if unknown:
        raise ValueError(f"{owner}: include names {unknown[:5]}{' ...' if len(unknown) > 5 else ''}, which the model "
                         f"does not have among the tensors it averages (e.g. {sorted(known)[:3]})")


def state_dict_keys(model: Module, kinds: Tuple[str, ...]) -> Dict[int, List[str]]:
    """For each tensor of ``kinds`` (by ``id``): every key under which ``model.state_dict()`` holds it,
    in its order: tied weights under each module that holds them, non-persistent buffers under none."""
    keys: Dict[int, List[str]] = {}
    for prefix, owner in model.named_modules(remove_duplicate=False):
        for kind in kinds:
            for key, tensor in getattr(owner, kind).items():
                if tensor is None:
                    continue
                names = keys.setdefault(id(tensor), [])
                persistent = kind == "_parameters" or key not in owner._non_persistent_buffers_set
                full = f"{prefix}.{key}" if prefix else key
                if persistent and full not in names:
                    names.append(full)
    return keys


def modules_writing_parameters_in_forward(model: Module) -> List[Module]:
    """The modules whose forward writes their own parameters in place: ``nn.Embedding`` and
    ``nn.EmbeddingBag`` with ``max_norm`` (they renormalize the rows they look up). Other writes
    in a forward (BatchNorm statistics, spectral-norm vectors) go to buffers."""
    return [m for m in model.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None]
