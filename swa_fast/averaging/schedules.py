"""The ``multi_avg_fn`` objects the fused update recognises: SWA and EMA weights computed on the device.

torch's protocol is ``fn(averaged_list, current_list, num_averaged)``, updating
the lists in place; these objects follow it when called directly, and
:class:`~swa_fast.WeightAverage` and ``AveragedModel`` drive the fused kernel
with their :meth:`FusedMultiAvgFn.weight` instead (one fused pass, no host sync).
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from swa_fast.ops.average import average_

PARAM_LIST = Union[Tuple[Tensor, ...], List[Tensor]]


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


DEFAULT_SWA = SWAMultiAvgFn()
