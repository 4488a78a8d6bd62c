"""A drop-in for ``torch.optim.swa_utils`` whose averaging runs as fused kernels.

Replace ``from torch.optim import swa_utils`` with ``from swa_fast import swa_utils``
and nothing else changes: the same classes and functions, signatures,
defaults, ``state_dict`` keys and numbers. What changes is the cost of
``AveragedModel.update_parameters``: with the default SWA average or an EMA
from :func:`get_ema_multi_avg_fn` it is one fused multi-tensor launch per
device, computes its weight on the device and never synchronises with the
host, so a training step that calls it can be captured in a CUDA graph.

Where swa_fast deliberately differs from torch:

* Integer and bool tensors averaged with ``use_buffers=True`` (BatchNorm's
  ``num_batches_tracked``) are copied from the model. torch's default path
  stores a truncated average of the counts instead.
* With an initialized ``torch.distributed`` process group, ``update_bn``
  combines the BatchNorm statistics of all ranks after the pass (torch leaves
  each rank with its shard's); ``all_reduce=False`` restores torch's behaviour.
* ``n_averaged`` lives on the averaged model's device (torch keeps it on the
  CPU unless ``device=`` is given); the values and keys are the same, so
  checkpoints load either way.

Beyond torch (all keyword-only, all off by default):

* ``AveragedModel(..., avg_dtype=torch.float32)`` keeps fp32 averages of an
  fp16/bf16 model; the arithmetic runs in fp32.
* ``AveragedModel(..., skip_nonfinite=True)``: an update whose model values
  hold any NaN/Inf changes nothing and is not counted (decided on the device;
  ``n_skipped`` counts them).
* ``get_ema_multi_avg_fn(decay, warmup_gamma=..., warmup_power=...)``: the
  timm-style warm-up ``decay_t = min(decay, 1 - (1 + t / gamma) ** -power)``.
* ``update_bn(..., forward_fn=..., progress=...)``, and ``all_reduce=`` across
  ``torch.distributed`` ranks (automatic when a process group is initialized).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn import Module
from torch.optim import swa_utils as _torch_swa_utils
from torch.optim.swa_utils import SWALR, get_ema_avg_fn, get_swa_avg_fn

from swa_fast import _registry
from swa_fast._average_op import average_, is_fusable_pair, nonfinite_flag

__all__ = [
    "AveragedModel",
    "update_bn",
    "SWALR",
    "get_ema_multi_avg_fn",
    "get_swa_multi_avg_fn",
    "get_ema_avg_fn",
    "get_swa_avg_fn",
]

PARAM_LIST = Union[Tuple[Tensor, ...], List[Tensor]]


# ---------------------------------------------------------------------------
# Averaging functions: torch's multi_avg_fn protocol, fused and sync-free.
# ---------------------------------------------------------------------------


class FusedMultiAvgFn:
    """A ``multi_avg_fn`` (``fn(averaged_list, current_list, num_averaged)``) whose
    lerp weight is a function of ``num_averaged`` computed on the device.

    Called directly it updates the lists in place, like torch's functions.
    :class:`AveragedModel` recognises these objects and drives the fused
    kernel itself (one launch for the whole model, no host sync).
    """

    def weight(self, num_averaged: Tensor) -> Tensor:
        """The 0-dim float32/float64 lerp weight for an update after ``num_averaged`` > 0 others."""
        raise NotImplementedError

    def __call__(self, averaged_param_list: PARAM_LIST, current_param_list: PARAM_LIST, num_averaged) -> None:
        if len(averaged_param_list) == 0:
            return
        device = averaged_param_list[0].device
        if isinstance(num_averaged, Tensor):
            count = num_averaged.to(device)
        else:
            count = torch.full((), int(num_averaged), dtype=torch.long, device=device)
        average_(averaged_param_list, current_param_list, self.weight(count))


class SWAMultiAvgFn(FusedMultiAvgFn):
    """Equal-weight running average (SWA): ``avg += (x - avg) / (n + 1)`` as ``lerp(avg, x, 1/(n+1))``."""

    def weight(self, num_averaged: Tensor) -> Tensor:
        # float32, exactly the value torch's foreach path computes as 1 / (n + 1).
        return torch.reciprocal(num_averaged + 1)

    def __repr__(self) -> str:
        return "SWAMultiAvgFn()"


class EMAMultiAvgFn(FusedMultiAvgFn):
    """Exponential moving average: ``avg = lerp(avg, x, 1 - decay_t)``.

    Without warm-up ``decay_t = decay``. With ``warmup_gamma`` set, ``decay_t =
    clamp(1 - (1 + t / warmup_gamma) ** -warmup_power, 0, decay)`` where ``t`` is
    the number of models averaged so far (timm's ModelEma warm-up), computed on
    the device.
    """

    def __init__(self, decay: float = 0.999, warmup_gamma: Optional[float] = None, warmup_power: float = 1.0):
        if decay < 0.0 or decay > 1.0:
            raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")
        if warmup_gamma is not None and warmup_gamma <= 0:
            raise ValueError(f"warmup_gamma must be positive, got {warmup_gamma}")
        if warmup_power <= 0:
            raise ValueError(f"warmup_power must be positive, got {warmup_power}")
        self.decay = decay
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self._constant: dict = {}  # device -> cached 0-dim weight tensor

    def weight(self, num_averaged: Tensor) -> Tensor:
        if self.warmup_gamma is None:
            device = num_averaged.device
            if device not in self._constant:
                # 1 - decay in Python double, as torch passes it to _foreach_lerp_.
                self._constant[device] = torch.full((), 1 - self.decay, dtype=torch.float64, device=device)
            return self._constant[device]
        steps = num_averaged.to(torch.float64)
        decay_t = 1 - (1 + steps / self.warmup_gamma).pow(-self.warmup_power)
        return 1 - decay_t.clamp(0.0, self.decay)

    def __repr__(self) -> str:
        warmup = "" if self.warmup_gamma is None else f", warmup_gamma={self.warmup_gamma}, warmup_power={self.warmup_power}"
        return f"EMAMultiAvgFn(decay={self.decay}{warmup})"


def get_ema_multi_avg_fn(
    decay: float = 0.999, *, warmup_gamma: Optional[float] = None, warmup_power: float = 1.0
) -> EMAMultiAvgFn:
    """The fused EMA ``multi_avg_fn``: ``W_ema = decay * W_ema + (1 - decay) * W_model``.

    Same as ``torch.optim.swa_utils.get_ema_multi_avg_fn`` (bitwise: both are
    ``lerp(W_ema, W_model, 1 - decay)``), plus an optional timm-style decay
    warm-up (see :class:`EMAMultiAvgFn`). Integer tensors are copied.

    Args:
        decay: decay rate in [0, 1]. Default: 0.999.
        warmup_gamma: warm-up time scale in updates; ``None`` (default) disables it.
        warmup_power: warm-up exponent (timm uses 1, or 2/3 and 3/4 for long runs).
    """
    return EMAMultiAvgFn(decay, warmup_gamma, warmup_power)


def get_swa_multi_avg_fn() -> SWAMultiAvgFn:
    """The fused SWA ``multi_avg_fn``: equal-weight running average of the models seen."""
    return SWAMultiAvgFn()


# ---------------------------------------------------------------------------
# AveragedModel
# ---------------------------------------------------------------------------


def _check_device_exists(device) -> None:
    if device is None:
        return
    parsed = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"AveragedModel: device={device!r} does not exist: no CUDA device is available")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"AveragedModel: device={device!r} does not exist: this machine has {count} CUDA device(s)"
            )


@dataclass
class _Pairs:
    """(averaged, current) pairs, split into those the fused op takes and the rest."""

    averaged: List[Tensor] = field(default_factory=list)
    current: List[Tensor] = field(default_factory=list)
    averaged_other: List[Tensor] = field(default_factory=list)  # e.g. complex, or current more precise
    current_other: List[Tensor] = field(default_factory=list)

    def add(self, averaged: Tensor, current: Tensor) -> None:
        if is_fusable_pair(averaged, current):
            self.averaged.append(averaged)
            self.current.append(current)
        else:
            self.averaged_other.append(averaged)
            self.current_other.append(current)


@dataclass
class _DeviceGroup:
    """Everything one update does on one device of the averaged model."""

    device: torch.device
    average: _Pairs = field(default_factory=_Pairs)  # lerped with the averaging weight
    copy: _Pairs = field(default_factory=_Pairs)  # buffers copied each update (use_buffers=False)
    transfer: bool = False  # current tensors live on another device
    all_current: List[Tensor] = field(default_factory=list)  # every tensor read, for the non-finite check

    def add(self, pairs: _Pairs, averaged: Tensor, current: Tensor) -> None:
        self.transfer |= current.device != averaged.device
        self.all_current.append(current)
        pairs.add(averaged, current)

    def checked_current(self, currents) -> List[Tensor]:
        """The tensors the non-finite check reads: the cached list, or the
        transferred copies when the current tensors live on another device."""
        if not self.transfer:
            return self.all_current
        return [t for pair_lists in currents for tensors in pair_lists for t in tensors]

    def currents_here(self, pairs: _Pairs) -> Tuple[List[Tensor], List[Tensor]]:
        """The current tensors of ``pairs``, on this device."""
        if not self.transfer:
            return pairs.current, pairs.current_other
        return [t.to(self.device) for t in pairs.current], [t.to(self.device) for t in pairs.current_other]

    def apply(self, pairs: _Pairs, currents, weight: Tensor, skip: Optional[Tensor], copy: bool = False) -> None:
        """Average ``pairs`` at ``weight`` (``copy``: the pairs are copied, weight is 1)."""
        current, current_other = currents
        average_(pairs.averaged, current, weight, skip=skip)
        for p_avg, p_cur in zip(pairs.averaged_other, current_other):
            _lerp_fallback(p_avg, p_cur, None if copy else weight, skip)


@dataclass
class _UpdatePlan:
    """The cached tensor lists of one (AveragedModel, source model) pair."""

    model: "weakref.ref[Module]"
    generation: int
    first_param_key: Any
    groups: List[_DeviceGroup]


def _lerp_fallback(averaged: Tensor, current: Tensor, weight: Optional[Tensor], skip: Optional[Tensor]) -> None:
    """torch's own arithmetic for the rare pairs the fused op does not take (``weight=None``:
    a copy, as torch copies buffers, which also works for dtypes without a lerp such as float8)."""
    if weight is not None and (averaged.is_floating_point() or averaged.is_complex()):
        new = torch.lerp(averaged, current.to(averaged.dtype), weight.to(averaged.dtype))
    else:
        new = current.to(averaged.dtype)
    if skip is not None:
        new = torch.where(skip, averaged, new)
    averaged.copy_(new)


def _first_param_key(model: Module):
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return None if first is None else (first.device, first.dtype)


class AveragedModel(_torch_swa_utils.AveragedModel):
    r"""Averaged copy of a model for SWA and EMA; ``torch.optim.swa_utils.AveragedModel``
    with a fused, sync-free ``update_parameters``.

    Args:
        model: the model to average.
        device: if given, the averaged model is kept there (it must exist).
        avg_fn: per-tensor averaging function ``fn(averaged, current, n) -> Tensor``;
            runs exactly as in torch (unfused).
        multi_avg_fn: list averaging function. :func:`get_ema_multi_avg_fn` and
            :func:`get_swa_multi_avg_fn` run fused; any other function runs as in torch.
        use_buffers: average the buffers too instead of copying them.
        avg_dtype: keyword-only; floating dtype of the averaged copy (e.g.
            ``torch.float32`` for a bf16 model). ``None`` keeps the model's dtypes.
        skip_nonfinite: keyword-only; skip (and do not count) an update in which any
            model value is NaN or Inf. Decided on the device for the fused averages;
            with a custom ``avg_fn``/``multi_avg_fn`` the check costs one host sync.

    The default (SWA) and EMA updates cache the model's tensor lists between
    calls; the cache follows structural changes of either model (new or
    replaced parameters, buffers or submodules) and ``.to()`` on the averaged
    model. Moving the *source* model to another device is noticed through its
    first parameter.
    """

    n_skipped: Tensor

    def __init__(
        self,
        model: Module,
        device: Optional[Union[int, torch.device, str]] = None,
        avg_fn: Optional[Callable[[Tensor, Tensor, Union[Tensor, int]], Tensor]] = None,
        multi_avg_fn: Optional[Callable[[PARAM_LIST, PARAM_LIST, Union[Tensor, int]], None]] = None,
        use_buffers: bool = False,
        *,
        avg_dtype: Optional[torch.dtype] = None,
        skip_nonfinite: bool = False,
    ) -> None:
        _check_device_exists(device)
        if avg_dtype is not None and not avg_dtype.is_floating_point:
            raise ValueError(f"avg_dtype must be a floating dtype, got {avg_dtype}")
        super().__init__(model, device, avg_fn, multi_avg_fn, use_buffers)
        if avg_dtype is not None:
            self.module.to(dtype=avg_dtype)
        self.avg_dtype = avg_dtype
        self.skip_nonfinite = skip_nonfinite
        # n_averaged lives with the averages so the weight 1/(n+1) is computed
        # there without a host round trip.
        home = _first_param_key(self.module)
        home_device = home[0] if home is not None else self.n_averaged.device
        self.n_averaged = torch.zeros((), dtype=torch.long, device=home_device)
        self.register_buffer("n_skipped", torch.zeros((), dtype=torch.long, device=home_device), persistent=False)
        self._plan: Optional[_UpdatePlan] = None

    # -- the fused path ------------------------------------------------------

    def _fused_fn(self) -> Optional[FusedMultiAvgFn]:
        if self.avg_fn is None and self.multi_avg_fn is None:
            return _DEFAULT_SWA
        if self.avg_fn is None and isinstance(self.multi_avg_fn, FusedMultiAvgFn):
            return self.multi_avg_fn
        return None

    def _averaged_and_current(self, model: Module) -> Tuple[Iterable[Tensor], Iterable[Tensor]]:
        if self.use_buffers:
            return (
                itertools.chain(self.module.parameters(), self.module.buffers()),
                itertools.chain(model.parameters(), model.buffers()),
            )
        return self.parameters(), model.parameters()

    def _build_plan(self, model: Module) -> _UpdatePlan:
        groups: dict = {}

        def group_for(tensor: Tensor) -> _DeviceGroup:
            if tensor.device not in groups:
                groups[tensor.device] = _DeviceGroup(tensor.device)
            return groups[tensor.device]

        averaged, current = self._averaged_and_current(model)
        # zip without strict, as torch pairs them.
        for p_avg, p_cur in zip(averaged, current):
            group = group_for(p_avg)
            group.add(group.average, p_avg, p_cur)
        if not self.use_buffers:
            for b_avg, b_cur in zip(self.module.buffers(), model.buffers(), strict=True):
                group = group_for(b_avg)
                group.add(group.copy, b_avg, b_cur)
        return _UpdatePlan(weakref.ref(model), _registry.generation(), _first_param_key(model), list(groups.values()))

    def _plan_for(self, model: Module) -> _UpdatePlan:
        plan = self._plan
        if (
            plan is None
            or plan.model() is not model
            or plan.generation != _registry.generation()
            or plan.first_param_key != _first_param_key(model)
        ):
            plan = self._plan = self._build_plan(model)
        return plan

    @torch.no_grad()
    def _update_fused(self, model: Module, fn: FusedMultiAvgFn) -> None:
        plan = self._plan_for(model)
        count = self.n_averaged
        currents = [(group.currents_here(group.average), group.currents_here(group.copy)) for group in plan.groups]
        skip = None
        if self.skip_nonfinite:
            checked = [group.checked_current(group_currents) for group, group_currents in zip(plan.groups, currents)]
            flags = [nonfinite_flag(tensors).to(count.device) for tensors in checked if tensors]
            if flags:
                skip = torch.stack(flags).any() if len(flags) > 1 else flags[0]
        for group, (average_currents, copy_currents) in zip(plan.groups, currents):
            count_here = count.to(group.device)
            skip_here = None if skip is None else skip.to(group.device)
            # The first update copies, as torch's does (lerp weight 1 is an exact copy).
            weight = fn.weight(count_here).masked_fill(count_here == 0, 1.0)
            group.apply(group.average, average_currents, weight, skip_here)
            # Buffers are copied (weight 1), as torch does without use_buffers.
            group.apply(group.copy, copy_currents, _ones(group.device), skip_here, copy=True)
        if skip is None:
            count.add_(1)
        else:
            count.add_(skip.logical_not())
            self.n_skipped.add_(skip)

    # -- torch's path, for custom averaging functions -------------------------

    def _update_unfused(self, model: Module) -> None:
        if self.skip_nonfinite:
            tensors = [t for t in itertools.chain(model.parameters(), model.buffers())
                       if t.is_floating_point() or t.is_complex()]
            if tensors and any(bool(nonfinite_flag(ts)) for ts in _by_device(tensors)):
                self.n_skipped.add_(1)
                return
        super().update_parameters(model)

    def update_parameters(self, model: Module) -> None:
        """Average ``model``'s parameters (and buffers, with ``use_buffers``) into this model.

        The first call copies; later calls apply the averaging function. With the
        default SWA average or :func:`get_ema_multi_avg_fn` this is one fused
        launch per device and no host synchronisation.
        """
        fn = self._fused_fn()
        if fn is None:
            self._update_unfused(model)
        else:
            self._update_fused(model, fn)

    def _apply(self, *args, **kwargs):
        self._plan = None  # .to()/.cuda()/.half() may change devices and dtypes
        return super()._apply(*args, **kwargs)


_DEFAULT_SWA = SWAMultiAvgFn()
_ONES: dict = {}


def _ones(device: torch.device) -> Tensor:
    """A cached 0-dim float64 one on ``device``: the weight of a plain copy."""
    if device not in _ONES:
        _ONES[device] = torch.ones((), dtype=torch.float64, device=device)
    return _ONES[device]


def _by_device(tensors: Sequence[Tensor]) -> List[List[Tensor]]:
    lists: dict = {}
    for t in tensors:
        lists.setdefault(t.device, []).append(t)
    return list(lists.values())


# ---------------------------------------------------------------------------
# update_bn
# ---------------------------------------------------------------------------


def _to_device(batch: Any, device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(value, device) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def _progress_bar(loader: Iterable[Any]) -> Iterable[Any]:
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError("update_bn(progress=True) needs tqdm: pip install tqdm") from error
    total = len(loader) if hasattr(loader, "__len__") else None
    return tqdm(loader, total=total, desc="update_bn", unit="batch")


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    model: Module,
    device: Optional[Union[int, torch.device, str]] = None,
    *,
    forward_fn: Optional[Callable[[Module, Any], Any]] = None,
    progress: bool = False,
    all_reduce: Optional[bool] = None,
    process_group: Optional[Any] = None,
) -> None:
    r"""Recompute the BatchNorm running statistics of ``model`` with one pass over ``loader``.

    As ``torch.optim.swa_utils.update_bn``: every ``_BatchNorm`` module (ghost BN
    included) is reset and switched to a cumulative average (``momentum=None``)
    for the pass; momenta and the training mode are restored afterwards, also
    when the pass raises.

    Args:
        loader: batches; each a tensor, or a list/tuple whose first element is
            the model input (unless ``forward_fn`` is given).
        model: the model whose BatchNorm statistics are recomputed.
        device: if given, batches are moved there first (every tensor in a
            list/tuple/dict when ``forward_fn`` is given).
        forward_fn: keyword-only; ``forward_fn(model, batch)`` runs the model on a
            batch of any structure (dicts, several inputs). Default: ``model(batch[0])``.
        progress: keyword-only; show a tqdm progress bar (needs tqdm).
        all_reduce: keyword-only; combine the statistics of all ranks after the
            pass (see below). ``None`` (default): when ``torch.distributed`` is
            initialized; ``False``: never (each rank keeps its own shard's
            statistics, torch's behaviour); ``True``: always (an error without a
            process group).
        process_group: keyword-only; the group to combine over (default: the
            default group).

    Distributed: with a sharded loader (e.g. a ``DistributedSampler``) every rank
    runs its pass, then one all-reduce per device makes every rank hold the
    statistics a single process would compute over the union of all ranks'
    batches: ``running_mean`` and ``running_var`` are the means over all batches,
    each batch weighted once (as torch's cumulative average weights them), and
    ``num_batches_tracked`` is the total batch count. This holds for unequal
    batch counts per rank too (a rank with no batches contributes nothing). It
    equals the single-process result up to float rounding; with unequal batch
    *sizes* it is, like torch's cumulative average, a mean over batches, not over
    samples. Ghost BN counts each ghost as a batch, and is combined the same way.
    ``SyncBatchNorm`` modules are left alone (their forward already combines the
    ranks). Every rank of the group must call ``update_bn`` (it is a collective)
    on a model with the same BatchNorm modules in the same order: code that runs
    it on one rank only (say rank 0 over the whole loader) must pass
    ``all_reduce=False``, or that rank waits for the others until the process
    group's timeout. A model wrapped
    in ``DistributedDataParallel`` broadcasts its buffers on its first forward:
    each rank then needs at least one batch (or pass ``model.module``).
    """
    group = _bn_process_group(all_reduce, process_group)
    momenta = {}
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            momenta[module] = module.momentum

    if not momenta:
        return

    was_training = model.training
    model.train()
    for module in momenta:
        module.momentum = None
    try:
        for batch in _progress_bar(loader) if progress else loader:
            if forward_fn is not None:
                forward_fn(model, batch if device is None else _to_device(batch, device))
                continue
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            if device is not None:
                batch = batch.to(device)
            model(batch)
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        model.train(was_training)
    if group is not _NO_GROUP:
        _all_reduce_bn_stats(list(momenta), group)


_NO_GROUP = object()  # update_bn's marker for "do not all-reduce"


def _bn_process_group(all_reduce: Optional[bool], process_group: Optional[Any]) -> Any:
    """The group ``update_bn`` combines over (``None``: the default group), or ``_NO_GROUP``.

    Decided before the pass, so a misuse fails before the work is done.
    """
    if all_reduce is False:
        return _NO_GROUP
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not initialized:
        if all_reduce:
            raise RuntimeError(
                "update_bn(all_reduce=True) needs an initialized torch.distributed process group "
                "(torch.distributed.init_process_group)"
            )
        return _NO_GROUP
    return process_group


def _all_reduce_bn_stats(modules: List[Module], group: Any) -> None:
    """Turn every rank's cumulative BN averages into the average over all ranks' batches.

    With ``momentum=None`` a module's running_mean/var are the means of its
    per-batch values over the ``n = num_batches_tracked`` batches it saw (n counts
    from 0: update_bn reset it). Summing ``running * n`` and ``n`` over ranks and
    dividing gives the mean over every batch seen anywhere, each batch once. One
    float64 all-reduce per device packs every module (counts stay exact to 2**53).
    """
    from torch.nn.modules.batchnorm import SyncBatchNorm

    by_device: dict = {}
    for module in modules:
        if isinstance(module, SyncBatchNorm) or module.running_mean is None or module.num_batches_tracked is None:
            continue  # SyncBatchNorm already saw every rank's batch; untracked modules have nothing to combine
        by_device.setdefault(module.running_mean.device, []).append(module)
    for device_modules in by_device.values():
        counts = torch.stack([module.num_batches_tracked for module in device_modules]).to(torch.float64)
        packed = [counts]
        for module, count in zip(device_modules, counts):
            packed.append(module.running_mean.to(torch.float64).mul(count))
            packed.append(module.running_var.to(torch.float64).mul(count))
        flat = torch.cat([t.reshape(-1) for t in packed])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
        totals, offset = flat[: len(device_modules)], len(device_modules)
        for module, total in zip(device_modules, totals.tolist()):
            size = module.running_mean.numel()
            mean_sum, var_sum = flat[offset : offset + size], flat[offset + size : offset + 2 * size]
            offset += 2 * size
            if total == 0:
                continue  # no rank saw a batch: keep the reset statistics, as a single process would
            module.running_mean.copy_(mean_sum.div(total).view_as(module.running_mean))
            module.running_var.copy_(var_sum.div(total).view_as(module.running_var))
            module.num_batches_tracked.fill_(int(total))
