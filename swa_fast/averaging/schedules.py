"""The ``multi_avg_fn`` objects the fused update recognises: SWA and EMA weights computed on the device.

torch's protocol is ``fn(averaged_list, current_list, num_averaged)``, updating
the lists in place; these objects follow it when called directly, and
:class:`~swa_fast.WeightAverage` and ``AveragedModel`` drive the fused kernel
with their :meth:`FusedMultiAvgFn.weight` instead (one fused pass, no host sync).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from swa_fast.ops.average import average_

PARAM_LIST = Union[Tuple[Tensor, ...], List[Tensor]]


class FusedMultiAvgFn:
    """A ``multi_avg_fn`` (``fn(averaged_list, current_list, num_averaged)``) whose
    lerp weight is a function of ``num_averaged`` (or of the optimizer step) computed on the device.

    Called directly it updates the lists in place, like torch's functions.
    :class:`AveragedModel`, :class:`~swa_fast.WeightAverage` and :class:`~swa_fast.MultiAverage`
    recognise these objects and drive the fused kernel themselves (one fused pass over the whole
    model, no host sync).

    Weights are float64 0-dim tensors: the kernels convert them to the arithmetic type of each
    average (float64 for fp64 averages, float32 otherwise), so fp64 averages get fp64 weights.
    """

    #: Whether :meth:`weight` takes the step of the member's previous update as a third argument
    #: (the set then keeps it: ``last_step`` in the average's state dict).
    uses_last_step = False

    #: Whether a member's first update copies the model (weight 1, as torch's ``AveragedModel``
    #: does). ``False``: the first update is a lerp with :meth:`weight` like any other, from the
    #: copy of the model the average was made from (timm's and diffusers' EMAs).
    first_update_copies = True

    def weight(self, num_averaged: Tensor, step: Optional[Tensor] = None) -> Tensor:
        """The float64 lerp weight of an update after ``num_averaged`` > 0 others (a long tensor, any
        shape); ``step``, when the caller gives one, is the optimizer step of the update."""
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

    def weight(self, num_averaged: Tensor, step: Optional[Tensor] = None) -> Tensor:
        # 1/(n+1) in float64: exact enough for fp64 averages (a float32 weight left 1,000 fp64 updates
        # 3e-9 from the mean), and for fp32 averages it rounds to the very float32 torch's foreach
        # path computes as 1 / (n + 1), for every n + 1 <= 2**24 (tests/test_weight_average_rules.py).
        return torch.reciprocal(num_averaged.to(torch.float64) + 1)

    def __repr__(self) -> str:
        return "SWAMultiAvgFn()"


def _check_decay(decay: float) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid decay value {decay} provided. Please provide a value in [0,1] range.")
    return float(decay)


def _check_positive(name: str, value: Optional[float], optional: bool) -> Optional[float]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class EMAMultiAvgFn(FusedMultiAvgFn):
    """Exponential moving average: ``avg = lerp(avg, x, 1 - decay_t)``.

    Without warm-up ``decay_t = decay``. With ``warmup_gamma`` set, ``decay_t =
    clamp(1 - (1 + t / warmup_gamma) ** -warmup_power, 0, decay)`` where ``t`` is
    the optimizer step when the update is given one (``update(model, step)``, as timm's
    ``ModelEmaV3.update(model, step)``), else the number of models averaged so far; computed
    on the device. ``decay``, ``warmup_gamma`` and ``warmup_power`` may be changed between
    updates (checked; the next update uses them).
    """

    def __init__(self, decay: float = 0.999, warmup_gamma: Optional[float] = None, warmup_power: float = 1.0):
        self._constant: dict = {}  # device -> cached 0-dim weight tensor for the current decay
        self.decay = decay
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power

    @property
    def decay(self) -> float:
        return self._decay

    @decay.setter
    def decay(self, value: float) -> None:
        self._decay = _check_decay(value)
        self._constant = {}  # the cached 1 - decay belongs to the old value

    @property
    def warmup_gamma(self) -> Optional[float]:
        return self._warmup_gamma

    @warmup_gamma.setter
    def warmup_gamma(self, value: Optional[float]) -> None:
        self._warmup_gamma = _check_positive("warmup_gamma", value, optional=True)

    @property
    def warmup_power(self) -> float:
        return self._warmup_power

    @warmup_power.setter
    def warmup_power(self, value: float) -> None:
        self._warmup_power = _check_positive("warmup_power", value, optional=False)

    def weight(self, num_averaged: Tensor, step: Optional[Tensor] = None) -> Tensor:
        if self._warmup_gamma is None:
            device = num_averaged.device
            constant = self._constant.get(device)
            if constant is None:
                # 1 - decay in Python double, as torch passes it to _foreach_lerp_.
                constant = self._constant[device] = torch.full((), 1 - self._decay, dtype=torch.float64,
                                                               device=device)
            return constant
        steps = (num_averaged if step is None else step).to(torch.float64)
        decay_t = 1 - (1 + steps / self._warmup_gamma).pow(-self._warmup_power)
        return 1 - decay_t.clamp(0.0, self._decay)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_constant"] = {}  # device tensors are rebuilt where the copy is used
        return state

    def __repr__(self) -> str:
        warmup = "" if self._warmup_gamma is None else \
            f", warmup_gamma={self._warmup_gamma}, warmup_power={self._warmup_power}"
        return f"EMAMultiAvgFn(decay={self._decay}{warmup})"


WARMUPS = (None, "power", "inverse")


class ScheduledEMAMultiAvgFn(FusedMultiAvgFn):
    """An EMA whose decay follows the optimizer step, computed on the device in float64: timm's
    ``ModelEmaV3.get_decay`` and diffusers' ``EMAModel.get_decay`` (no first-update copy: the
    average starts as the model it was made from, as theirs do).

    With ``s = step - update_after_step - 1``:

    * ``s <= 0``: decay 0 (the update copies the model);
    * ``warmup="power"``: ``1 - (1 + s / warmup_gamma) ** -warmup_power``, clamped to
      ``[min_decay, decay]`` (timm with ``use_warmup``, diffusers with ``use_ema_warmup``, whose
      ``inv_gamma`` is ``warmup_gamma``);
    * ``warmup="inverse"``: ``(1 + s) / (10 + s)``, clamped to ``[min_decay, decay]`` (diffusers
      without warm-up);
    * ``warmup=None``: ``decay`` (timm without warm-up).

    An update given no step uses ``decay`` (timm's ``update(model)`` without a step). The lerp
    weight is ``1 - decay_t``.
    """

    first_update_copies = False

    def __init__(self, decay: float, min_decay: float = 0.0, update_after_step: int = 0,
                 warmup: Optional[str] = None, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3) -> None:
        self.decay = _check_decay(decay)
        self.min_decay = _check_decay(min_decay)
        if isinstance(update_after_step, bool) or not isinstance(update_after_step, int):
            raise TypeError(f"update_after_step must be an int, got {update_after_step!r}")
        self.update_after_step = update_after_step
        if warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {WARMUPS}, got {warmup!r}")
        self.warmup = warmup
        self.warmup_gamma = _check_positive("warmup_gamma", warmup_gamma, optional=False)
        self.warmup_power = _check_positive("warmup_power", warmup_power, optional=False)

    def decay_at(self, step: Tensor) -> Tensor:
        """The float64 decay of an update at optimizer step ``step`` (a tensor, any shape), on its device."""
        s = step.to(torch.float64) - (self.update_after_step + 1)
        if self.warmup == "power":
            value = 1 - (1 + s / self.warmup_gamma).pow(-self.warmup_power)
        elif self.warmup == "inverse":
            value = (1 + s) / (10 + s)
        else:
            return torch.where(s <= 0, 0.0, torch.full_like(s, self.decay))
        value = value.clamp(max=self.decay).clamp(min=self.min_decay)
        return torch.where(s <= 0, 0.0, value)

    def weight(self, num_averaged: Tensor, step: Optional[Tensor] = None) -> Tensor:
        if step is None:
            return torch.full_like(num_averaged, 1 - self.decay, dtype=torch.float64)
        return 1 - self.decay_at(step)

    def __repr__(self) -> str:
        return (f"ScheduledEMAMultiAvgFn(decay={self.decay}, min_decay={self.min_decay}, "
                f"update_after_step={self.update_after_step}, warmup={self.warmup!r}, "
                f"warmup_gamma={self.warmup_gamma}, warmup_power={self.warmup_power})")


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
