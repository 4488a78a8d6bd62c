"""``WeightAverage``: a running average of a model's weights, held as tensors (plain, DDP,
FSDP2-sharded, offloaded to host memory).

An average holds tensors only, keyed by the model's parameter (and, with ``use_buffers``,
buffer) names; no module copy is made, so it works where ``copy.deepcopy`` does not (FSDP2
refuses it). It is one member of an :class:`~swa_fast.averaging.average_set.AverageSet`: its own
set of one, or one of a :class:`~swa_fast.MultiAverage`'s. ``AveragedModel`` in
:mod:`swa_fast.swa_utils` is a torch-compatible shell over the same engine.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn.modules.module import _IncompatibleKeys

from swa_fast.averaging.average_set import AverageSet, Device, Step, check_avg_dtype, parse_device
from swa_fast.averaging.sharding import is_dtensor, reshard
from swa_fast.averaging.slots import Include, unwrap
from swa_fast.averaging.step import Member, MultiAvgFn, fused_fn
from swa_fast.averaging.stores import ModuleStore, NamedStore


def rounding_seed(stochastic_rounding: bool, seed: int, fns: Sequence[Optional[MultiAvgFn]],
                  owner: str) -> Optional[int]:
    """The seed of the set's stochastic rounding (None: round to nearest), arguments checked."""
    if not isinstance(stochastic_rounding, bool):
        raise TypeError(f"{owner}: stochastic_rounding must be a bool, got {stochastic_rounding!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
        raise TypeError(f"{owner}: stochastic_rounding_seed must be a 64-bit integer, got {seed!r}")
    if not stochastic_rounding:
        return None
    if any(fn is not None and fused_fn(fn) is None for fn in fns):
        raise ValueError(f"{owner}: stochastic_rounding needs the fused averaging functions (None, "
                         "get_ema_multi_avg_fn, get_swa_multi_avg_fn, ...): a function of your own writes the "
                         "averages itself")
    return seed


def new_named_set(model: Module, fns: Sequence[Optional[MultiAvgFn]], use_buffers: bool,
                  avg_dtype: Optional[torch.dtype], device: Optional[Device], skip_nonfinite: bool,
                  include: Include, owner: str, stochastic_rounding: bool = False,
                  stochastic_rounding_seed: int = 0) -> AverageSet:
    """The set behind ``WeightAverage`` (one function) and ``MultiAverage`` (several), arguments checked."""
    if not isinstance(model, Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
    for fn in fns:
        if fn is not None and not callable(fn):
            raise TypeError(f"{owner}: multi_avg_fn must be callable, got {type(fn).__name__}")
    if not isinstance(use_buffers, bool):
        raise TypeError(f"{owner}: use_buffers must be a bool, got {use_buffers!r}")
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"{owner}: skip_nonfinite must be a bool, got {skip_nonfinite!r}")
    check_avg_dtype(avg_dtype, owner)
    seed = rounding_seed(stochastic_rounding, stochastic_rounding_seed, fns, owner)
    parsed = parse_device(device, owner)
    model = unwrap(model, owner)
    with torch.no_grad():
        reshard(model)  # after an evaluation forward FSDP2's root holds gathered tensors, not its shards
        store = NamedStore(model, len(fns), use_buffers, avg_dtype, parsed, include, owner)
    home = store.home()
    members = [Member.new(fn, home) for fn in fns]
    return AverageSet(store, members, skip_nonfinite, owner, seed)


class WeightAverage:
    r"""A running average (SWA, EMA or any ``multi_avg_fn``) of a model's weights, as tensors.

    Args:
        model: the model to average: plain, wrapped in DDP or ``torch.compile`` (the averages take
            the names of the model inside: either form updates and swaps in), or sharded with
            FSDP2's ``fully_shard`` (whose parameters are DTensors: each rank then averages and
            stores only its local shards, with no communication).
        multi_avg_fn: ``None`` (an equal-weight SWA average), :func:`get_ema_multi_avg_fn`
            or :func:`get_swa_multi_avg_fn` (fused, sync-free), or any torch-style
            ``fn(averages, currents, n_averaged)`` that updates ``averages`` in place (run
            as torch runs it, once per device and dtype).
        use_buffers: average the buffers too (BatchNorm statistics; integer buffers are
            copied). Without it only parameters are averaged and buffers are not held.
        avg_dtype: keyword-only; floating dtype of the averages (``torch.float32`` for a
            bf16/fp16 model: the arithmetic then runs in fp32). Default: the model's dtypes.
        device: keyword-only; where the averages live. Default: with each tensor.
            ``"cpu"`` for a CUDA model offloads them: an update copies the model to pinned
            host memory on a side stream and averages on the host in a worker thread,
            without making the training stream wait (see :meth:`order_writes`).
        skip_nonfinite: keyword-only; an update in which any value read from the model
            is NaN or Inf changes nothing and is not counted (decided on the device;
            ``n_skipped`` counts them; one host sync with a custom ``multi_avg_fn``).
        include: keyword-only; which tensors to average: parameter (and buffer) names, or a
            predicate ``include(name, tensor) -> bool`` evaluated once, here (e.g.
            ``lambda name, p: p.requires_grad`` leaves a frozen base out). Default: all.
        stochastic_rounding: keyword-only; round fp16/bf16 averages stochastically
            (:func:`swa_fast.average_stochastic_`: unbiased, so an EMA whose steps are far below
            bf16's spacing still moves; e.g. ``avg_dtype=torch.bfloat16`` for an fp32 model: half
            the memory of an fp32 EMA). fp32/fp64 averages are unaffected. Needs a fused
            ``multi_avg_fn``. Default: round to nearest.
        stochastic_rounding_seed: keyword-only; the random stream's seed (any 64-bit integer). The
            bits are a function of the seed, the update count, the tensor and the element: the
            same on every rank of DDP (identical averages), on the CPU and on CUDA, and after a
            resume.

    The averages start as a copy of the model, so :meth:`swapped_into` before any update
    leaves the model's values in place. Until the first update (or load) they follow the
    model: an average made before the model was sharded with ``fully_shard``, moved,
    converted or materialized from the meta device is laid out again at its first update.
    """

    _set: AverageSet
    _index: int
    _name: str

    def __init__(
        self,
        model: Module,
        multi_avg_fn: Optional[MultiAvgFn] = None,
        use_buffers: bool = False,
        *,
        avg_dtype: Optional[torch.dtype] = None,
        device: Optional[Device] = None,
        skip_nonfinite: bool = False,
        include: Include = None,
        stochastic_rounding: bool = False,
        stochastic_rounding_seed: int = 0,
    ) -> None:
        self._set = new_named_set(model, [multi_avg_fn], use_buffers, avg_dtype, device, skip_nonfinite, include,
                                  "WeightAverage", stochastic_rounding, stochastic_rounding_seed)
        self._index = 0
        self._name = "WeightAverage"

    @classmethod
    def _member(cls, average_set: AverageSet, index: int, name: str) -> "WeightAverage":
        """The view of member ``index`` of ``average_set`` (a ``MultiAverage``'s)."""
        self = cls.__new__(cls)
        self._set, self._index, self._name = average_set, index, name
        return self

    @classmethod
    def _over_module(cls, module: Module, multi_avg_fn: Optional[MultiAvgFn], use_buffers: bool,
                     skip_nonfinite: bool, counts, rounding_seed: Optional[int] = None,
                     owner: str = "AveragedModel") -> "WeightAverage":
        """The engine of an ``AveragedModel`` (and of ``integrations.timm.ModelEmaV3``): the averages
        are ``module``'s own tensors (paired with a model's by position, as torch pairs them) and the
        counts are the shell's buffers, read through ``counts`` at every update (the shell's ``.to()``
        replaces them). Its updates are complete when they return, as torch's are, also with host
        averages of a CUDA model. ``rounding_seed``: fp16/bf16 averages rounded stochastically with
        this seed (None: to nearest; ``AverageSet.rounding_seed``); ``owner``: the name in errors."""
        average_set = AverageSet(ModuleStore(module, use_buffers), _ShellMembers(multi_avg_fn, counts),
                                 skip_nonfinite, owner, rounding_seed)
        average_set.synchronous = True
        return cls._member(average_set, 0, owner)

    # -- what it is -------------------------------------------------------------------

    @property
    def multi_avg_fn(self) -> Optional[MultiAvgFn]:
        return self._set.members[self._index].fn

    @property
    def use_buffers(self) -> bool:
        return self._set.store.use_buffers

    @property
    def avg_dtype(self) -> Optional[torch.dtype]:
        return getattr(self._set.store, "avg_dtype", None)

    @property
    def device(self) -> Optional[torch.device]:
        return getattr(self._set.store, "device", None)

    @property
    def skip_nonfinite(self) -> bool:
        return self._set.skip_nonfinite

    # -- updating ---------------------------------------------------------------

    def update(self, model: Module, step: Step = None) -> None:
        """Average ``model``'s current values in (the first call copies them).

        With the default SWA average or :func:`get_ema_multi_avg_fn` this is one fused pass
        per device (a few kernel launches; on FSDP2 shards, no communication) and no host
        synchronisation, so it can be captured in a CUDA graph on one device. Offloaded
        (``device="cpu"`` for a CUDA model) it returns once the copies are enqueued.

        Args:
            model: the model the average was made from (or its DDP / ``torch.compile`` wrapper).
            step: the optimizer step (an int, or a 0-dim integer tensor on any device), for a
                warm-up by step instead of by the number of updates (timm's
                ``ModelEmaV3.update(model, step)``); an EMA without warm-up and SWA ignore it.
        """
        self._set.update(model, [self._index], step, self._name)

    def synchronize(self) -> None:
        """Block until every update in flight has been applied (only offloaded updates are ever in
        flight), and raise the error of one that failed. Reading the averages waits by itself."""
        self._set.synchronize()

    def order_writes(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        """Make writes queued later on ``stream`` (default: each device's current stream) wait, on the
        GPU and without a host sync, for the copies of offloaded updates still reading the model.

        Every optimizer step and every module's forward already wait (a forward for the buffers'
        copy, a step for all of it). Call this before writes the library cannot see: a CUDA-graph
        captured or a functional optimizer step, in-place edits of parameters or buffers,
        ``model.load_state_dict``. Without offloading it does nothing."""
        self._set.order_writes(stream)

    def close(self) -> None:
        """Apply the updates in flight and stop the offload worker thread (of the whole
        ``MultiAverage`` for one of its averages). The averages stay readable; updates are refused."""
        self._set.close()

    @property
    def n_averaged(self) -> Tensor:
        """0-dim long tensor: how many models have been averaged (skipped updates not counted)."""
        self._set.synchronize()
        return self._set.counts(self._index)[0]

    @property
    def last_step(self) -> Optional[Tensor]:
        """0-dim long tensor: the step of the last update, for a function that keeps it (a
        power-function profile, ``swa_fast.posthoc``); None for the others."""
        self._set.synchronize()
        return self._set.members[self._index].last_step

    @property
    def n_skipped(self) -> Tensor:
        """0-dim long tensor: updates skipped by ``skip_nonfinite``."""
        self._set.synchronize()
        return self._set.counts(self._index)[1]

    # -- using the averages -------------------------------------------------------

    def swapped_into(self, model: Module):
        """Within the block, ``model`` holds the averages (evaluation, ``update_bn``, export); on exit
        its own values come back bitwise, also when the block raises.

        One rule, for every dtype, device and sharding: inside the block the model *is* the
        average. What the block writes into averaged tensors (``update_bn``'s statistics with
        ``use_buffers=True``, a fine-tuning step) stays in the averages; buffers that are not
        averaged (all of them without ``use_buffers``) are backed up and restored, so what is
        written there is discarded. An average and a parameter of the same dtype and device
        exchange contents (no extra memory); otherwise the parameter is backed up, and on exit
        the elements the block changed go into the average while the others keep its full
        precision.

        The exchange is in place: parameters (FSDP2: local shards) keep their identity, so an
        optimizer, hooks and FSDP2's all-gathers see the averages. ``update``, ``state_dict`` and
        friends of this average are refused inside the block (the averages are in the model);
        another average may swap in on top (by the same rule) but may not ``update`` from or
        ``copy_to`` the model. FSDP2 modules are resharded on entry and on exit, so no gathered
        copy of either set of values outlives its turn.
        """
        return self._set.swapped_into(model, self._index, self._name)

    def copy_to(self, model: Module) -> None:
        """Write the averages into ``model`` for good (converted to the model's dtypes)."""
        self._set.copy_to(model, self._index, self._name)

    def averaged_copy(self, model: Module) -> Module:
        """A new module holding the averages, to evaluate without swapping: a deep copy of ``model``
        (of the model inside a DDP or ``torch.compile`` wrapper) with the averages written in,
        converted to its dtypes; its buffers that are not averaged are ``model``'s. Costs a copy of
        the model. FSDP2 models refuse deep copies: use :meth:`swapped_into` for them."""
        inner = unwrap(model, self._name)
        if any(is_dtensor(t) for t in (*inner.parameters(), *inner.buffers())):
            raise TypeError(f"{self._name}.averaged_copy: an FSDP2 (fully_shard) model cannot be deep-copied; "
                            "evaluate the average inside the model with swapped_into(model)")
        self._set.ready(self._index, "averaged_copy", self._name)
        clone = copy.deepcopy(inner)
        self._set.copy_to(clone, self._index, self._name)
        return clone

    # -- checkpoints --------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """``{"averages": {name: tensor}, "n_averaged": ..., "n_skipped": ...}``.

        The tensors share storage with the averages (as ``nn.Module.state_dict``'s do); those of
        sharded parameters are DTensors with the parameter's mesh and placements, which
        ``torch.distributed.checkpoint`` saves and loads, also on another number of ranks.
        """
        return self._set.member_state(self._index, self._name)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> _IncompatibleKeys:
        """Load averages and counts saved by :meth:`state_dict` (here, on another number of ranks,
        or unsharded): a sharded average takes its shard of a full tensor or of a DTensor.
        The whole state is checked (names, shapes, dtypes, devices, counts: integers >= 0) before
        anything is written. ``strict=False`` loads the names both have and returns the others."""
        writes = self._set.check_member_state(self._index, state_dict, strict, self._name)
        writes.apply()
        self._set.loaded()
        return _IncompatibleKeys(writes.missing, writes.unexpected)

    def module_state_dict(self, model: Optional[Module] = None) -> Dict[str, Tensor]:
        """The averages as a model state dict, which ``model.load_state_dict`` accepts: every key the
        model's ``state_dict()`` has for an averaged tensor (tied weights under each of their
        names; non-persistent buffers left out), sharing storage with the averages. With ``model``,
        its own values fill the keys that are not averaged (its buffers without ``use_buffers``,
        what ``include`` left out), so ``model.load_state_dict(avg.module_state_dict(model))``
        loads strictly."""
        return self._set.module_state(self._index, model, self._name)

    def to(self, device: Optional[Device] = None, dtype: Optional[torch.dtype] = None) -> "WeightAverage":
        """Move the averages to ``device`` and/or convert the floating ones to ``dtype`` (the counts
        follow); returns ``self``. Moving host averages of a CUDA model onto its GPU ends the
        offloading, and the other way round starts it."""
        if self._name != "WeightAverage":
            raise RuntimeError(f"{self._name}.to: the averages of a MultiAverage move together: call the "
                               "MultiAverage's to()")
        self._set.to(device, dtype, self._name)
        return self

    # -- the rest -------------------------------------------------------------------

    def __repr__(self) -> str:
        store = self._set.store
        held = len(store.names) if isinstance(store, NamedStore) else "module"
        sharded = len(store.layouts) if isinstance(store, NamedStore) else 0
        return (f"{self._name}(tensors={held}, multi_avg_fn={self.multi_avg_fn!r}, use_buffers={self.use_buffers}, "
                f"avg_dtype={self.avg_dtype}, device={self.device}, skip_nonfinite={self.skip_nonfinite}, "
                f"sharded={sharded})")


class _ShellMembers:
    """The one member of an ``AveragedModel``'s set, read from the shell's count buffers at every
    call (its ``.to()`` replaces them). A class, not a lambda, so the shell pickles."""

    def __init__(self, fn: Optional[MultiAvgFn], counts) -> None:
        self.fn = fn
        self.counts = counts

    def __call__(self):
        n_averaged, n_skipped = self.counts()
        return [Member(self.fn, n_averaged, n_skipped)]


__all__ = ["WeightAverage"]
