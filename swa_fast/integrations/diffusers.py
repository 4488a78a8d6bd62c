"""diffusers' ``EMAModel`` on swa_fast's fused update: swap one import.

    from diffusers.training_utils import EMAModel        # before
    from swa_fast.integrations.diffusers import EMAModel  # after

:class:`EMAModel` takes diffusers' arguments, keeps diffusers' public attributes
(``shadow_params``, ``optimization_step``, ``cur_decay_value``, ``decay``, ...) and writes and
reads diffusers' state dict and ``save_pretrained`` folders, so checkpoints move freely between
the two classes. Its :meth:`~EMAModel.step` is one fused pass over all the parameters
(:func:`swa_fast.average_`) with the decay computed on the device from a step counter kept there:
no host sync and no per-parameter kernels.

Importing this module imports diffusers (``diffusers.utils``, for its deprecation helper).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from diffusers.utils import deprecate
from torch import Tensor

from swa_fast.averaging.schedules import ScheduledEMAMultiAvgFn
from swa_fast.ops.average import average_, is_fusable_pair

__all__ = ["EMAModel"]

Parameters = Union[Iterable[torch.nn.Parameter], torch.nn.Module]


def _zero3_context(parameters: List[Tensor]) -> contextlib.AbstractContextManager:
    """diffusers' DeepSpeed ZeRO-3 handling: gather the partitioned parameters for the update.

    ZeRO-3 through transformers (``HfDeepSpeedConfig``) means transformers is imported, so a
    process that has not imported it cannot be running ZeRO-3 and importing it is skipped.
    """
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return contextlib.nullcontext()
    try:
        enabled = transformers.integrations.deepspeed.is_deepspeed_zero3_enabled()
    except AttributeError:
        return contextlib.nullcontext()
    if not enabled:
        return contextlib.nullcontext()
    import deepspeed  # only ever needed (and importable) under ZeRO-3

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)


class EMAModel:
    """Exponential moving average of a model's weights: diffusers' ``EMAModel``, updated by one
    fused pass per step.

    Same constructor, attributes, methods, state dict and ``save_pretrained`` layout as
    ``diffusers.training_utils.EMAModel`` (diffusers 0.3x/0.4x); each class loads the other's
    checkpoints. The decay schedule is diffusers' :meth:`get_decay`: with ``s = optimization_step
    - update_after_step - 1``, decay 0 while ``s <= 0``, then ``1 - (1 + s / inv_gamma) ** -power``
    (``use_ema_warmup``) or ``(1 + s) / (10 + s)``, clamped to ``[min_decay, decay]``.

    What differs from diffusers:

    * **Arithmetic.** diffusers computes ``s -= (1 - decay) * (s - p)`` (three roundings: the
      difference, the product, the update); the fused op computes torch's ``lerp(s, p, w)``,
      ``w = 1 - decay`` (``s + w * (p - s)`` with one fused multiply-add for ``w < 0.5``,
      ``p - (p - s) * (1 - w)`` otherwise, an exact copy for ``w == 1``), with the same weight
      (float32 for float32 shadows, float64 for float64 ones). The two agree up to rounding.
      With ``u`` the unit roundoff of the shadow's dtype (``2**-24`` for float32) and
      ``x' = s + w (p - s)`` the exact update, each step of ours is off by at most
      ``u (|x'| + w |p - s|)`` and each of diffusers' by at most ``u (|x'| + 2 w |p - s|)`` (to
      first order), while an earlier difference ``e`` shrinks to ``(1 - w) e``. So per element
      ``e_{t+1} <= (1 - w_t) e_t + u (2 |x'_t| + 3 w_t |p_t - s_t|)``; with ``M`` bounding
      ``|s|`` and ``|p|`` over the run (so ``|x'| <= M``, ``w |p - s| <= 2 M``), after ``T``
      steps ``|ours - diffusers'| <= 8 T u M``, i.e. under 8 ulps of ``M`` per step
      (and with a constant ``w`` the ``(1 - w)`` factor caps it at ``2 u M / w + 6 u M``).
      ``tests/test_integration_diffusers.py`` checks the per-element recurrence on real runs.
      Frozen parameters (``requires_grad=False``) are copied by both: equal bit for bit.
    * **The decay is computed on the device**, in float64, from a step counter kept on the
      shadow parameters' device and incremented there (no host sync, no host-to-device copy).
      On the CPU it equals diffusers' ``1 - get_decay(step)`` bit for bit (torch's pow of a 0-dim
      tensor is the C library's, as Python's), except with ``power=0.5``, where torch takes a
      reciprocal square root (a few float64 ulps apart); on a GPU, CUDA's pow is within a few
      float64 ulps. The float32 weight a float32 update uses is then the same but for the rare
      value next to a float32 rounding boundary (one float32 ulp of ``w``, adding at most
      ``2 u w |p - s|`` to that step's difference). :attr:`cur_decay_value` and :meth:`get_decay`
      are diffusers' Python formula, as before. Settings the device schedule
      does not take (``inv_gamma`` or ``power`` not positive with ``use_ema_warmup``, ``decay`` or
      ``min_decay`` outside [0, 1], a non-integer ``update_after_step``) use the host's decay,
      filled on the device (still no sync); a weight ``1 - decay`` outside [0, 1] is an error.
    * ``foreach`` only chooses how :meth:`copy_to` and :meth:`restore` copy (as in diffusers);
      :meth:`step` is always the fused pass.
    * :meth:`step` raises ``ValueError`` when it is given a different number of parameters than
      there are shadow parameters (diffusers' ``zip`` silently ignores the extra ones).
    * Parameters on another device than their shadow parameter are copied to the shadow's device
      for the update (diffusers' step would fail on the mixed-device arithmetic).
    * Pairs the fused op does not take (e.g. complex tensors, or a float32 parameter into a
      bfloat16 shadow) are updated with diffusers' own arithmetic.
    * :meth:`load_state_dict` runs diffusers' checks, in diffusers' order and with its messages,
      before it changes anything: a rejected state dict leaves the EMA as it was (diffusers keeps
      the values it read before the failing one).

    Args:
        parameters: the parameters to track (a ``torch.nn.Module`` is deprecated, as in diffusers,
            and turns ``use_ema_warmup`` on).
        decay: the largest decay.
        min_decay: the smallest decay (once updates have started).
        update_after_step: number of steps before the average starts to move (it copies the model
            until then).
        use_ema_warmup: use the power warm-up ``1 - (1 + s / inv_gamma) ** -power`` rather than
            ``(1 + s) / (10 + s)``.
        inv_gamma: inverse multiplicative factor of the warm-up.
        power: exponent of the warm-up.
        foreach: copy with ``torch._foreach_copy_`` in :meth:`copy_to` and :meth:`restore`.
        model_cls: the model's class (a diffusers ``ModelMixin`` + ``ConfigMixin``), for
            :meth:`save_pretrained`.
        model_config: the model's config, for :meth:`save_pretrained`.
        **kwargs: diffusers' deprecated ``max_value`` (``decay``), ``min_value`` (``min_decay``)
            and ``device`` (:meth:`to`).
    """

    def __init__(
        self,
        parameters: Parameters,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_ema_warmup: bool = False,
        inv_gamma: Union[float, int] = 1.0,
        power: Union[float, int] = 2 / 3,
        foreach: bool = False,
        model_cls: Optional[Any] = None,
        model_config: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(parameters, torch.nn.Module):
            deprecation_message = (
                "Passing a `torch.nn.Module` to `ExponentialMovingAverage` is deprecated. "
                "Please pass the parameters of the module instead."
            )
            deprecate(
                "passing a `torch.nn.Module` to `ExponentialMovingAverage`",
                "1.0.0",
                deprecation_message,
                standard_warn=False,
            )
            parameters = parameters.parameters()
            # diffusers turns the warm-up on when given a module, for backwards compatibility.
            use_ema_warmup = True

        if kwargs.get("max_value", None) is not None:
            deprecation_message = "The `max_value` argument is deprecated. Please use `decay` instead."
            deprecate("max_value", "1.0.0", deprecation_message, standard_warn=False)
            decay = kwargs["max_value"]

        if kwargs.get("min_value", None) is not None:
            deprecation_message = "The `min_value` argument is deprecated. Please use `min_decay` instead."
            deprecate("min_value", "1.0.0", deprecation_message, standard_warn=False)
            min_decay = kwargs["min_value"]

        parameters = list(parameters)
        self.shadow_params: List[Tensor] = [p.clone().detach() for p in parameters]

        # Per device of the shadow parameters: (0-dim long step counter there, the step it holds).
        self._step_counters: Dict[torch.device, Tuple[Tensor, int]] = {}
        self._schedule_key: Optional[tuple] = None
        self._schedule: Optional[ScheduledEMAMultiAvgFn] = None

        if kwargs.get("device", None) is not None:
            deprecation_message = "The `device` argument is deprecated. Please use `to` instead."
            deprecate("device", "1.0.0", deprecation_message, standard_warn=False)
            self.to(device=kwargs["device"])

        self.temp_stored_params: Optional[List[Tensor]] = None

        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_ema_warmup = use_ema_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.optimization_step: int = 0
        self.cur_decay_value: Optional[float] = None  # set in `step()`
        self.foreach = foreach

        self.model_cls = model_cls
        self.model_config = model_config

    # ------------------------------------------------------------------ save / load (diffusers' way)

    @classmethod
    def from_pretrained(cls, path: str, model_cls: Any, foreach: bool = False) -> "EMAModel":
        """An EMA from a folder written by :meth:`save_pretrained` (ours or diffusers'): the model's
        weights are the shadow parameters and its config carries the EMA's settings."""
        _, ema_kwargs = model_cls.from_config(path, return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)

        ema_model = cls(model.parameters(), model_cls=model_cls, model_config=model.config, foreach=foreach)

        ema_model.load_state_dict(ema_kwargs)
        return ema_model

    def save_pretrained(self, path: str) -> None:
        """Write the averaged model with diffusers' ``save_pretrained``, the EMA's settings (the
        state dict without the shadow parameters) registered in its config, as diffusers does."""
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at __init__.")

        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined at __init__.")

        model = self.model_cls.from_config(self.model_config)
        state_dict = self.state_dict()
        state_dict.pop("shadow_params", None)

        model.register_to_config(**state_dict)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    # ------------------------------------------------------------------ the schedule

    def get_decay(self, optimization_step: int) -> float:
        """The decay of the update at ``optimization_step``: diffusers' formula, in Python."""
        step = max(0, optimization_step - self.update_after_step - 1)

        if step <= 0:
            return 0.0

        if self.use_ema_warmup:
            cur_decay_value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            cur_decay_value = (1 + step) / (10 + step)

        cur_decay_value = min(cur_decay_value, self.decay)
        # make sure decay is not smaller than min_decay
        cur_decay_value = max(cur_decay_value, self.min_decay)
        return cur_decay_value

    def _device_schedule(self) -> Optional[ScheduledEMAMultiAvgFn]:
        """The device-side schedule for the current settings (rebuilt when one changed), or None
        for settings it does not take (the host's decay is used then)."""
        settings = (self.decay, self.min_decay, self.update_after_step, self.use_ema_warmup, self.inv_gamma,
                    self.power)
        key = settings + tuple(type(value) for value in settings)
        if key != self._schedule_key:
            warmup = bool(self.use_ema_warmup)
            try:
                self._schedule = ScheduledEMAMultiAvgFn(
                    self.decay, self.min_decay, self.update_after_step,
                    warmup="power" if warmup else "inverse",
                    # Unused without the warm-up (diffusers ignores them then): defaults, so that odd
                    # values there do not leave the device schedule.
                    warmup_gamma=self.inv_gamma if warmup else 1.0,
                    warmup_power=self.power if warmup else 2 / 3,
                )
            except (TypeError, ValueError):
                self._schedule = None
            self._schedule_key = key
        return self._schedule

    def _weight(self, counter: Tensor, one_minus_decay: float) -> Tensor:
        """The float64 lerp weight ``1 - decay`` of the update at step ``counter`` (a 0-dim long
        tensor), computed on its device; ``one_minus_decay`` is the host's value, used (filled on the
        device) only when the device schedule does not take the settings."""
        schedule = self._device_schedule()
        if schedule is not None:
            return schedule.weight(counter, step=counter)
        if not 0.0 <= one_minus_decay <= 1.0:  # also NaN
            raise ValueError(
                f"EMAModel: the decay at step {self.optimization_step} is {1 - one_minus_decay!r}, outside [0, 1] "
                f"(decay={self.decay!r}, min_decay={self.min_decay!r}); the weight 1 - decay must be in [0, 1]"
            )
        return torch.full((), one_minus_decay, dtype=torch.float64, device=counter.device)

    def _step_counter(self, device: torch.device) -> Tensor:
        """The 0-dim long tensor on ``device`` holding :attr:`optimization_step`: incremented there
        when it held the previous step, else (first update there, a loaded state dict, a changed
        ``optimization_step``) filled with the step, also on the device."""
        entry = self._step_counters.get(device)
        if entry is not None and entry[1] == self.optimization_step - 1:
            counter = entry[0]
            counter.add_(1)
        else:
            counter = torch.full((), self.optimization_step, dtype=torch.long, device=device)
        self._step_counters[device] = (counter, self.optimization_step)
        return counter

    # ------------------------------------------------------------------ the update

    @torch.no_grad()
    def step(self, parameters: Parameters) -> None:
        """One EMA update from the model's current parameters (same order as at construction):
        trainable ones are averaged by one fused pass per device, frozen ones copied."""
        if isinstance(parameters, torch.nn.Module):
            deprecation_message = (
                "Passing a `torch.nn.Module` to `ExponentialMovingAverage.step` is deprecated. "
                "Please pass the parameters of the module instead."
            )
            deprecate(
                "passing a `torch.nn.Module` to `ExponentialMovingAverage.step`",
                "1.0.0",
                deprecation_message,
                standard_warn=False,
            )
            parameters = parameters.parameters()

        parameters = list(parameters)
        if len(parameters) != len(self.shadow_params):
            raise ValueError(
                f"EMAModel.step: got {len(parameters)} parameters but the EMA holds {len(self.shadow_params)} shadow "
                "parameters; pass the parameters of the model the EMA was made from, in the same order"
            )

        self.optimization_step += 1

        # Compute the decay factor for the exponential moving average (host formula: no sync).
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        one_minus_decay = 1 - decay

        with _zero3_context(parameters):
            self._update(parameters, one_minus_decay)

    def _update(self, parameters: List[Tensor], one_minus_decay: float) -> None:
        # Per device of the shadow parameters: the pairs the fused op takes, and the others.
        fused: Dict[torch.device, Tuple[List[Tensor], List[Tensor]]] = {}
        others: List[Tuple[Tensor, Tensor]] = []
        frozen_shadow: List[Tensor] = []  # frozen parameters (copied, as diffusers does), same device
        frozen_param: List[Tensor] = []
        frozen_elsewhere: List[Tuple[Tensor, Tensor]] = []  # frozen, on another device than the shadow
        for s_param, param in zip(self.shadow_params, parameters, strict=True):
            if not param.requires_grad:
                if s_param.device == param.device:
                    frozen_shadow.append(s_param)
                    frozen_param.append(param)
                else:
                    frozen_elsewhere.append((s_param, param))
                continue
            if param.device != s_param.device:
                param = param.to(s_param.device)
            if is_fusable_pair(s_param, param):
                group = fused.setdefault(s_param.device, ([], []))
                group[0].append(s_param)
                group[1].append(param)
            else:
                others.append((s_param, param))

        # The fused calls first: they check their arguments (shapes, devices) before writing anything.
        for device, (shadow, current) in fused.items():
            average_(shadow, current, self._weight(self._step_counter(device), one_minus_decay))
        for s_param, param in others:
            s_param.sub_(one_minus_decay * (s_param - param))  # diffusers' arithmetic
        if frozen_shadow:
            torch._foreach_copy_(frozen_shadow, frozen_param, non_blocking=True)
        for s_param, param in frozen_elsewhere:
            s_param.copy_(param)  # blocking: a device-to-host copy must have landed before it is read

    # ------------------------------------------------------------------ copying weights around

    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Copy the averaged parameters into ``parameters`` (e.g. a model to evaluate or save)."""
        parameters = list(parameters)
        if self.foreach:
            torch._foreach_copy_(
                [param.data for param in parameters],
                [s_param.to(param.device).data for s_param, param in zip(self.shadow_params, parameters, strict=False)],
            )
        else:
            for s_param, param in zip(self.shadow_params, parameters, strict=False):
                param.data.copy_(s_param.to(param.device).data)

    def pin_memory(self) -> None:
        """Move the shadow parameters to pinned host memory (for non-blocking offloading)."""
        self.shadow_params = [p.pin_memory() for p in self.shadow_params]

    def to(self, device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None,
           non_blocking: bool = False) -> None:
        """Move the shadow parameters to ``device`` and cast the floating ones to ``dtype``
        (``torch.Tensor.to``'s arguments; ``None`` keeps each)."""
        self.shadow_params = [
            p.to(device=device, dtype=dtype, non_blocking=non_blocking)
            if p.is_floating_point()
            else p.to(device=device, non_blocking=non_blocking)
            for p in self.shadow_params
        ]

    def state_dict(self) -> Dict[str, Any]:
        """diffusers' state dict: the settings, ``optimization_step`` and (references to) the shadow
        parameters. accelerate saves it when the EMA is registered for checkpointing."""
        return {
            "decay": self.decay,
            "min_decay": self.min_decay,
            "optimization_step": self.optimization_step,
            "update_after_step": self.update_after_step,
            "use_ema_warmup": self.use_ema_warmup,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "shadow_params": self.shadow_params,
        }

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Keep a host copy of ``parameters``, for :meth:`restore` (e.g. around an evaluation with
        the averaged weights)."""
        self.temp_stored_params = [param.detach().cpu().clone() for param in parameters]

    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Copy the values kept by :meth:`store` back into ``parameters``, and drop them."""
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        if self.foreach:
            torch._foreach_copy_(
                [param.data for param in parameters], [c_param.data for c_param in self.temp_stored_params]
            )
        else:
            for c_param, param in zip(self.temp_stored_params, parameters, strict=False):
                param.data.copy_(c_param.data)

        # Better memory-wise.
        self.temp_stored_params = None

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (ours or diffusers'): diffusers' checks and
        messages, all run before anything changes. Missing keys keep their current values."""
        # deepcopy, to be consistent with module API
        state_dict = copy.deepcopy(state_dict)

        decay = state_dict.get("decay", self.decay)
        if decay < 0.0 or decay > 1.0:
            raise ValueError("Decay must be between 0 and 1")

        min_decay = state_dict.get("min_decay", self.min_decay)
        if not isinstance(min_decay, float):
            raise ValueError("Invalid min_decay")

        optimization_step = state_dict.get("optimization_step", self.optimization_step)
        if not isinstance(optimization_step, int):
            raise ValueError("Invalid optimization_step")

        update_after_step = state_dict.get("update_after_step", self.update_after_step)
        if not isinstance(update_after_step, int):
            raise ValueError("Invalid update_after_step")

        use_ema_warmup = state_dict.get("use_ema_warmup", self.use_ema_warmup)
        if not isinstance(use_ema_warmup, bool):
            raise ValueError("Invalid use_ema_warmup")

        inv_gamma = state_dict.get("inv_gamma", self.inv_gamma)
        if not isinstance(inv_gamma, (float, int)):
            raise ValueError("Invalid inv_gamma")

        power = state_dict.get("power", self.power)
        if not isinstance(power, (float, int)):
            raise ValueError("Invalid power")

        shadow_params = state_dict.get("shadow_params", None)
        if shadow_params is not None:
            if not isinstance(shadow_params, list):
                raise ValueError("shadow_params must be a list")
            if not all(isinstance(p, torch.Tensor) for p in shadow_params):
                raise ValueError("shadow_params must all be Tensors")

        self.decay = decay
        self.min_decay = min_decay
        self.optimization_step = optimization_step
        self.update_after_step = update_after_step
        self.use_ema_warmup = use_ema_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        if shadow_params is not None:
            self.shadow_params = shadow_params

    def __repr__(self) -> str:
        return (f"swa_fast.integrations.diffusers.EMAModel({len(self.shadow_params)} shadow parameters, "
                f"decay={self.decay}, min_decay={self.min_decay}, update_after_step={self.update_after_step}, "
                f"use_ema_warmup={self.use_ema_warmup}, inv_gamma={self.inv_gamma}, power={self.power}, "
                f"optimization_step={self.optimization_step})")
