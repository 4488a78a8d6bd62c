"""``WeightAverage``: the averaging core for every model (plain, DDP, FSDP2-sharded, offloaded).

An average holds tensors only, keyed by the model's parameter (and, with
``use_buffers``, buffer) names; no module copy is made, so it works where
``copy.deepcopy`` does not (FSDP2 refuses it). ``AveragedModel`` in
:mod:`swa_fast.swa_utils` is a torch-compatible shell over the same engine.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn.modules.module import _IncompatibleKeys

from swa_fast.averaging.stores import ModuleStore, NamedStore, averaged_kinds, named_tensor_slots
from swa_fast.averaging.offload import OffloadPipeline
from swa_fast.averaging.sharding import ShardLayout, dtensor_like, layout_of, local_part, local_tensor, reshard
from swa_fast.averaging.plan import UpdatePlan, build_plan
from swa_fast.averaging.step import MultiAvgFn, fused_fn, fused_update, skip_flag, unfused_update

Device = Union[int, str, torch.device]


def parse_device(device: Optional[Device], owner: str) -> Optional[torch.device]:
    """``device`` as a torch.device; an error that names it when this machine has no such device."""
    if device is None:
        return None
    parsed = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{owner}: device={device!r} does not exist: no CUDA device is available")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{owner}: device={device!r} does not exist: this machine has {count} CUDA device(s)")
    return parsed


def check_avg_dtype(avg_dtype: Optional[torch.dtype]) -> None:
    if avg_dtype is not None and not (isinstance(avg_dtype, torch.dtype) and avg_dtype.is_floating_point):
        raise ValueError(f"avg_dtype must be a floating dtype, got {avg_dtype}")


class WeightAverage:
    r"""A running average (SWA, EMA or any ``multi_avg_fn``) of a model's weights, as tensors.

    Args:
        model: the model to average: plain, wrapped in DDP, or sharded with FSDP2's
            ``fully_shard`` (whose parameters are DTensors: each rank then averages and
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
            without making the training stream wait (see :meth:`synchronize`).
        skip_nonfinite: keyword-only; an update in which any value read from the model
            is NaN or Inf changes nothing and is not counted (decided on the device;
            ``n_skipped`` counts them; one host sync with a custom ``multi_avg_fn``).

    The first :meth:`update` copies the model; each later one applies the average. The
    averages start as a copy of the model, so :meth:`swapped_into` before any update
    leaves the model's values in place.
    """

    def __init__(
        self,
        model: Module,
        multi_avg_fn: Optional[MultiAvgFn] = None,
        use_buffers: bool = False,
        *,
        avg_dtype: Optional[torch.dtype] = None,
        device: Optional[Device] = None,
        skip_nonfinite: bool = False,
    ) -> None:
        if not isinstance(model, Module):
            raise TypeError(f"WeightAverage: model must be a torch.nn.Module, got {type(model).__name__}")
        if multi_avg_fn is not None and not callable(multi_avg_fn):
            raise TypeError(f"WeightAverage: multi_avg_fn must be callable, got {type(multi_avg_fn).__name__}")
        check_avg_dtype(avg_dtype)
        self.device = parse_device(device, "WeightAverage")
        averages: Dict[str, Tensor] = {}
        self._layouts: Dict[str, ShardLayout] = {}
        reshard(model)  # after an evaluation forward FSDP2's root holds gathered tensors, not its shards
        with torch.no_grad():
            for kind in averaged_kinds(use_buffers):
                for name, _, tensor in named_tensor_slots(model, kind):
                    averages[name] = _new_average(local_tensor(tensor), avg_dtype, self.device)
                    layout = layout_of(tensor)
                    if layout is not None:
                        self._layouts[name] = layout
        first = next(iter(averages.values()), None)
        home = self.device or (first.device if first is not None else torch.device("cpu"))
        self._init_engine(NamedStore(averages, use_buffers), multi_avg_fn, use_buffers, avg_dtype,
                          skip_nonfinite, torch.zeros((), dtype=torch.long, device=home),
                          torch.zeros((), dtype=torch.long, device=home))

    @classmethod
    def _over_module(cls, module: Module, multi_avg_fn: Optional[MultiAvgFn], use_buffers: bool,
                     skip_nonfinite: bool, counts: Callable[[], Tuple[Tensor, Tensor]]) -> "WeightAverage":
        """The engine of an ``AveragedModel``: the averages are ``module``'s own tensors (paired with a
        model's by position, as torch pairs them) and the counts are the shell's buffers, read
        through ``counts`` at every update (the shell's ``.to()`` replaces them)."""
        self = cls.__new__(cls)
        self.device = None
        self._layouts = {}
        self._init_engine(ModuleStore(module, use_buffers), multi_avg_fn, use_buffers, None, skip_nonfinite,
                          None, None)
        self._counts = counts
        return self

    def _init_engine(self, store, multi_avg_fn, use_buffers, avg_dtype, skip_nonfinite, n_averaged, n_skipped):
        self._store = store
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers
        self.avg_dtype = avg_dtype
        self.skip_nonfinite = skip_nonfinite
        self._n_averaged = n_averaged
        self._n_skipped = n_skipped
        self._counts: Optional[Callable[[], Tuple[Tensor, Tensor]]] = None
        self._plan: Optional[UpdatePlan] = None
        self._plan_offloads = False
        self._offload: Optional[OffloadPipeline] = None
        self._swapped = False

    # -- updating ---------------------------------------------------------------

    def update(self, model: Module) -> None:
        """Average ``model``'s current values in (the first call copies them).

        With the default SWA average or :func:`get_ema_multi_avg_fn` this is one fused pass
        per device (a few kernel launches; on FSDP2 shards, no communication) and no host
        synchronisation, so it can be captured in a CUDA graph on one device. Offloaded
        (``device="cpu"`` for a CUDA model) it returns once the copies are enqueued.
        """
        self._refuse_while_swapped("update")
        n_averaged, n_skipped = self._count_tensors()
        plan = self._plan_for(model)
        fn = fused_fn(self.multi_avg_fn)
        if fn is None:
            self.synchronize()
            unfused_update(plan, self.multi_avg_fn, n_averaged, n_skipped, self.skip_nonfinite)
        elif self._plan_offloads:
            if self._offload is None:
                self._offload = OffloadPipeline()
            flag = None
            if self.skip_nonfinite:  # decided on the GPU (and across shards) here, staged with the copies
                sources = [t for group in plan.groups for t in group.current_tensors()]
                flag = skip_flag(plan, sources, next((t.device for t in sources if t.is_cuda), sources[0].device))
            self._offload.submit(plan, lambda currents, skip: fused_update(
                plan, fn, n_averaged, n_skipped, self.skip_nonfinite, currents, skip), flag)
        else:
            fused_update(plan, fn, n_averaged, n_skipped, self.skip_nonfinite)

    def _plan_for(self, model: Module) -> UpdatePlan:
        plan = self._plan
        if plan is None or not plan.is_current(model):
            reshard(model)  # FSDP2 modules left gathered by an evaluation hold no DTensors
            plan = self._plan = build_plan(model, self._store.entries(model))
            self._plan_offloads = any(
                group.device.type == "cpu" and any(t.is_cuda for t in group.current_tensors())
                for group in plan.groups)
        return plan

    def _forget_plan(self) -> None:
        """Drop the cached tensor lists (the averages moved: the next update rebuilds them)."""
        self.synchronize()
        self._plan = None

    def _count_tensors(self) -> Tuple[Tensor, Tensor]:
        return self._counts() if self._counts is not None else (self._n_averaged, self._n_skipped)

    def synchronize(self) -> None:
        """Block until every update in flight has been applied (only offloaded updates are ever in
        flight). Call it before writing the model's parameters outside an optimizer step while an
        offloaded update may still be copying them; reading the averages waits by itself."""
        if self._offload is not None:
            self._offload.wait()

    @property
    def n_averaged(self) -> Tensor:
        """0-dim long tensor: how many models have been averaged (skipped updates not counted)."""
        self.synchronize()
        return self._count_tensors()[0]

    @property
    def n_skipped(self) -> Tensor:
        """0-dim long tensor: updates skipped by ``skip_nonfinite``."""
        self.synchronize()
        return self._count_tensors()[1]

    # -- using the averages -------------------------------------------------------

    def _targets(self, model: Module, action: str) -> List[Tuple[str, Tensor, Tensor]]:
        """(name, the model's tensor the average replaces (its local shard), the average)."""
        self._refuse_while_swapped(action)
        self.synchronize()
        reshard(model)
        store: NamedStore = self._named_store(action)
        targets = []
        for name, _, tensor in store.named_model_tensors(model):
            target, average = local_tensor(tensor), store.averages[name]
            if target.shape != average.shape:
                raise ValueError(f"WeightAverage.{action}: {name!r} has shape {tuple(target.shape)} in the model "
                                 f"but its average {tuple(average.shape)}")
            targets.append((name, target, average))
        return targets

    @contextlib.contextmanager
    def swapped_into(self, model: Module) -> Iterator[Module]:
        """Within the block, ``model`` holds the averages (evaluation, ``update_bn``, export); on exit
        its own values come back bitwise, also when the block raises.

        The exchange is in place: parameters (FSDP2: local shards) keep their identity, so an
        optimizer, hooks and FSDP2's all-gathers see the averages. Where average and parameter
        share dtype and device their contents are exchanged (no extra memory); elsewhere the
        parameter is backed up. Buffers that are not averaged (all of them without
        ``use_buffers``) are backed up and restored, so BatchNorm statistics recomputed inside
        (``update_bn``) belong to the average only. ``update``, ``state_dict`` and friends are
        refused inside the block (the averages are in the model). FSDP2 modules are resharded
        on entry and on exit, so no gathered copy of either set of values outlives its turn.
        """
        targets = self._targets(model, "swapped_into")
        averaged = {id(target) for _, target, _ in targets}
        kept = [(b, b.clone()) for _, _, b in named_tensor_slots(model, "_buffers") if id(b) not in averaged]
        undo: List[Callable[[], None]] = []
        try:
            with torch.no_grad():
                for _, target, average in targets:
                    undo.append(_put(target, average))
            self._swapped = True
            yield model
        finally:
            self._swapped = False
            # An FSDP2 forward in the block may have left gathered copies of the averages behind;
            # the next forward would reuse them instead of gathering the restored shards.
            reshard(model)
            with torch.no_grad():
                for restore in reversed(undo):
                    restore()
                for buffer, original in kept:
                    buffer.copy_(original)

    def copy_to(self, model: Module) -> None:
        """Write the averages into ``model`` for good (converted to the model's dtypes)."""
        with torch.no_grad():
            for _, target, average in self._targets(model, "copy_to"):
                target.copy_(average)

    # -- checkpoints --------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """``{"averages": {name: tensor}, "n_averaged": ..., "n_skipped": ...}``.

        The tensors share storage with the averages (as ``nn.Module.state_dict``'s do); those of
        sharded parameters are DTensors with the parameter's mesh and placements, which
        ``torch.distributed.checkpoint`` saves and loads, also on another number of ranks.
        """
        self._refuse_while_swapped("state_dict")
        self.synchronize()
        store = self._named_store("state_dict")
        averages = {name: dtensor_like(average, self._layouts[name]) if name in self._layouts else average
                    for name, average in store.averages.items()}
        n_averaged, n_skipped = self._count_tensors()
        return {"averages": averages, "n_averaged": n_averaged, "n_skipped": n_skipped}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> _IncompatibleKeys:
        """Load averages and counts saved by :meth:`state_dict` (here, on another number of ranks,
        or unsharded): a sharded average takes its shard of a full tensor or of a DTensor.
        Everything is checked before anything is written. ``strict=False`` loads the names both
        have and returns the others."""
        self._refuse_while_swapped("load_state_dict")
        self.synchronize()
        store = self._named_store("load_state_dict")
        if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("averages"), Mapping) \
                or "n_averaged" not in state_dict:
            raise TypeError("WeightAverage.load_state_dict: expected a dict with 'averages' (a dict of tensors) "
                             "and 'n_averaged', as WeightAverage.state_dict() returns")
        saved = state_dict["averages"]
        missing = [name for name in store.averages if name not in saved]
        unexpected = [name for name in saved if name not in store.averages]
        if strict and (missing or unexpected):
            raise ValueError(f"WeightAverage.load_state_dict: missing averages {missing}, unexpected {unexpected}")
        loads = []
        for name, value in saved.items():
            if name not in store.averages:
                continue
            part = local_part(value, self._layouts.get(name))
            average = store.averages[name]
            if tuple(part.shape) != tuple(average.shape):
                raise ValueError(f"WeightAverage.load_state_dict: {name!r} has shape {tuple(value.shape)} in the "
                                 f"state dict but {tuple(average.shape)} here")
            loads.append((average, part))
        n_averaged, n_skipped = self._count_tensors()
        with torch.no_grad():
            for average, part in loads:
                if part is not average:
                    average.copy_(part)
            n_averaged.copy_(local_part(torch.as_tensor(state_dict["n_averaged"]), None))
            if "n_skipped" in state_dict:
                n_skipped.copy_(local_part(torch.as_tensor(state_dict["n_skipped"]), None))
        return _IncompatibleKeys(missing, unexpected)

    # -- the rest -------------------------------------------------------------------

    def _named_store(self, action: str) -> NamedStore:
        if not isinstance(self._store, NamedStore):  # pragma: no cover - AveragedModel exposes none of these
            raise RuntimeError(f"{action} is for WeightAverage; AveragedModel is a module: use its own methods")
        return self._store

    def _refuse_while_swapped(self, action: str) -> None:
        if self._swapped:
            raise RuntimeError(f"WeightAverage.{action}: not inside swapped_into(): the model holds the averages "
                               "there and the averages the model's values; call it after the block")

    def __getstate__(self) -> Dict[str, Any]:
        # The cached plan holds the source model's tensors (and a weakref); the offload pipeline
        # holds a thread and pinned buffers. A copy or a pickle rebuilds both when it first updates.
        self.synchronize()
        state = dict(self.__dict__)
        state.update(_plan=None, _plan_offloads=False, _offload=None)
        return state

    def __repr__(self) -> str:
        store = self._store
        held = len(store.averages) if isinstance(store, NamedStore) else "module"
        return (f"WeightAverage(tensors={held}, multi_avg_fn={self.multi_avg_fn!r}, use_buffers={self.use_buffers}, "
                f"avg_dtype={self.avg_dtype}, device={self.device}, skip_nonfinite={self.skip_nonfinite}, "
                f"sharded={len(self._layouts)})")


def _new_average(tensor: Tensor, avg_dtype: Optional[torch.dtype], device: Optional[torch.device]) -> Tensor:
    """A copy of ``tensor`` (a parameter or its local shard) to hold its average."""
    dtype = avg_dtype if avg_dtype is not None and tensor.is_floating_point() else tensor.dtype
    average = torch.empty_like(tensor, dtype=dtype, device=device or tensor.device, requires_grad=False)
    return average.copy_(tensor.detach())


def _put(target: Tensor, average: Tensor) -> Callable[[], None]:
    """Write ``average`` into ``target``; return what undoes it bitwise."""
    if target.dtype == average.dtype and target.device == average.device:
        _exchange(target, average)
        return lambda: _exchange(target, average)
    original = target.clone()
    target.copy_(average)
    return lambda: target.copy_(original)


def _exchange(a: Tensor, b: Tensor) -> None:
    scratch = a.clone()
    a.copy_(b)
    b.copy_(scratch)
