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

For an FSDP2 (``fully_shard``) model, which ``AveragedModel``'s deep copy cannot
take, or to evaluate the average inside the live model, use
:class:`swa_fast.WeightAverage`, the core ``AveragedModel`` runs on.

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
from typing import Any, Callable, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.nn import Module
from torch.optim import swa_utils as _torch_swa_utils
from torch.optim.swa_utils import SWALR, get_ema_avg_fn, get_swa_avg_fn

from swa_fast.averaging.schedules import (  # noqa: F401  (the Fused/SWA/EMA classes are re-exported)
    PARAM_LIST,
    EMAMultiAvgFn,
    FusedMultiAvgFn,
    SWAMultiAvgFn,
    get_ema_multi_avg_fn,
    get_swa_multi_avg_fn,
)
from swa_fast.averaging.sharding import is_dtensor
from swa_fast.averaging.update_bn import update_bn
from swa_fast.averaging.step import any_nonfinite
from swa_fast.averaging.average_set import check_avg_dtype, parse_device
from swa_fast.averaging.state import check_count
from swa_fast.averaging.weight_average import WeightAverage

__all__ = [
    "AveragedModel",
    "update_bn",
    "SWALR",
    "get_ema_multi_avg_fn",
    "get_swa_multi_avg_fn",
    "get_ema_avg_fn",
    "get_swa_avg_fn",
]


# ---------------------------------------------------------------------------
# AveragedModel: torch's class, its averaging done by WeightAverage's engine.
# ---------------------------------------------------------------------------


def _refuse_sharded(model: Module) -> None:
    if any(is_dtensor(p) for p in itertools.chain(model.parameters(), model.buffers())):
        raise TypeError(
            "AveragedModel deep-copies the model, which an FSDP2 (fully_shard) model refuses, and its average "
            "would hold full tensors. Use swa_fast.WeightAverage(model, multi_avg_fn=..., avg_dtype=...): it "
            "keeps shard-local averages (no copy of the model, no communication), swaps them in for evaluation "
            "(WeightAverage.swapped_into) and checkpoints them with torch.distributed.checkpoint."
        )


class AveragedModel(_torch_swa_utils.AveragedModel):
    r"""Averaged copy of a model for SWA and EMA; ``torch.optim.swa_utils.AveragedModel``
    with a fused, sync-free ``update_parameters``.

    Args:
        model: the model to average (not an FSDP2 model: use :class:`swa_fast.WeightAverage`).
        device: if given, the averaged model is kept there (it must exist).
        avg_fn: per-tensor averaging function ``fn(averaged, current, n) -> Tensor``;
            runs exactly as in torch (unfused).
        multi_avg_fn: list averaging function. :func:`get_ema_multi_avg_fn` and
            :func:`get_swa_multi_avg_fn` run fused; any other function runs as in torch,
            once per device and dtype.
        use_buffers: average the buffers too instead of copying them.
        avg_dtype: keyword-only; floating dtype of the averaged copy (e.g.
            ``torch.float32`` for a bf16 model). ``None`` keeps the model's dtypes.
        skip_nonfinite: keyword-only; skip (and do not count) an update in which any
            model value is NaN or Inf. Decided on the device for the fused averages;
            with a custom ``avg_fn``/``multi_avg_fn`` the check costs one host sync.

    The averaging is :class:`swa_fast.WeightAverage`'s engine over this module's
    tensors. The default (SWA) and EMA updates cache the model's tensor lists
    between calls, and check cheaply before every update that the cache still
    describes both models: any replaced parameter or buffer, a new dtype or device
    of any of them (``.to()``, ``.half()``, ``param.data = ...``), or a structural
    change rebuilds it (``swa_fast/averaging/plan.py``). Copies (``copy.deepcopy``)
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
        parse_device(device, "AveragedModel")
        check_avg_dtype(avg_dtype)
        _refuse_sharded(model)
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
        self._average = WeightAverage._over_module(self.module, multi_avg_fn, use_buffers, skip_nonfinite,
                                                   self._counts)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``, after checking ``n_averaged`` (an integer >= 0, a Python int
        or a 0-dim integer tensor): a negative, fractional or NaN count would load, then make every
        later update fail (its weight ``1/(n+1)`` outside [0, 1])."""
        if isinstance(state_dict, Mapping) and "n_averaged" in state_dict:
            check_count(state_dict["n_averaged"], "n_averaged", "AveragedModel")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _counts(self) -> Tuple[Tensor, Tensor]:
        return self.n_averaged, self.n_skipped

    def update_parameters(self, model: Module) -> None:
        """Average ``model``'s parameters (and buffers, with ``use_buffers``) into this model.

        The first call copies; later calls apply the averaging function. With the
        default SWA average or :func:`get_ema_multi_avg_fn` this is one fused pass
        per device (a few kernel launches) and no host synchronisation.
        """
        if self.avg_fn is not None:
            self._update_with_avg_fn(model)
        else:
            self._average.update(model)

    def _update_with_avg_fn(self, model: Module) -> None:
        """torch's own update, for a per-tensor ``avg_fn``."""
        if self.skip_nonfinite:
            flag = any_nonfinite(list(itertools.chain(model.parameters(), model.buffers())), self.n_skipped.device)
            if flag is not None and bool(flag):
                self.n_skipped.add_(1)
                return
        super().update_parameters(model)

    def _apply(self, *args, **kwargs):
        average = self.__dict__.get("_average")
        if average is not None:
            average._set.forget_plan()  # .to()/.cuda()/.half() may change devices and dtypes
        return super()._apply(*args, **kwargs)
