"""A drop-in for ``torch.optim.swa_utils`` whose averaging runs as fused kernels.

Replace ``from torch.optim import swa_utils`` with ``from swa_fast import swa_utils``
and nothing else changes: the same classes and functions, signatures,
defaults, ``state_dict`` keys and numbers. What changes is the cost of
``AveragedModel.update_parameters``: with the default SWA average or an EMA
from :func:`get_ema_multi_avg_fn` it is one fused pass per device (two
``average_`` calls, averaged tensors and copied buffers, each a few
multi-tensor kernel launches), computes its weight on the device and never
synchronises with the host, so a training step that calls it can be captured
in a CUDA graph.

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
from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.nn import Module
from torch.optim import swa_utils as _torch_swa_utils
from torch.optim.swa_utils import SWALR, get_ema_avg_fn, get_swa_avg_fn

from swa_fast._average_op import average_, nonfinite_flag
from swa_fast._update_bn import update_bn
from swa_fast._update_plan import UpdatePlan, build_plan, by_device, ones

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
    kernel itself (one fused pass over the whole model, no host sync).
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
    calls, and check cheaply before every update that the cache still describes
    both models: any replaced parameter or buffer, a new dtype or device of any
    of them (``.to()``, ``.half()``, ``param.data = ...``), or a structural
    change rebuilds it (``swa_fast/_update_plan.py``). Copies (``copy.deepcopy``)
    and pickles of an ``AveragedModel`` leave the cache behind.
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
        first = next(itertools.chain(self.module.parameters(), self.module.buffers()), None)
        home_device = first.device if first is not None else self.n_averaged.device
        self.n_averaged = torch.zeros((), dtype=torch.long, device=home_device)
        self.register_buffer("n_skipped", torch.zeros((), dtype=torch.long, device=home_device), persistent=False)
        self._plan: Optional[UpdatePlan] = None

    # -- the fused path ------------------------------------------------------

    def _fused_fn(self) -> Optional[FusedMultiAvgFn]:
        if self.avg_fn is None and self.multi_avg_fn is None:
            return _DEFAULT_SWA
        if self.avg_fn is None and isinstance(self.multi_avg_fn, FusedMultiAvgFn):
            return self.multi_avg_fn
        return None

    def _plan_for(self, model: Module) -> UpdatePlan:
        plan = self._plan
        if plan is None or not plan.is_current(model):
            plan = self._plan = build_plan(self.module, model, self.use_buffers)
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
            group.apply(group.copy, copy_currents, ones(group.device), skip_here, copy=True)
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
            if tensors and any(bool(nonfinite_flag(ts)) for ts in by_device(tensors)):
                self.n_skipped.add_(1)
                return
        super().update_parameters(model)

    def update_parameters(self, model: Module) -> None:
        """Average ``model``'s parameters (and buffers, with ``use_buffers``) into this model.

        The first call copies; later calls apply the averaging function. With the
        default SWA average or :func:`get_ema_multi_avg_fn` this is one fused pass
        per device (a few kernel launches) and no host synchronisation.
        """
        fn = self._fused_fn()
        if fn is None:
            self._update_unfused(model)
        else:
            self._update_fused(model, fn)

    def _apply(self, *args, **kwargs):
        self._plan = None  # .to()/.cuda()/.half() may change devices and dtypes
        return super()._apply(*args, **kwargs)

    def __getstate__(self):
        # The cached plan holds the source model's tensors (and a weakref, which cannot be
        # pickled): a copy or a pickle must rebuild its own from the model it is given.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_plan"] = None
        return state


_DEFAULT_SWA = SWAMultiAvgFn()

