"""timm's ``ModelEmaV3`` on swa_fast's fused averaging core: swap one import.

Replace::

    from timm.utils.model_ema import ModelEmaV3      # or: from timm.utils import ModelEmaV3

with::

    from swa_fast.integrations.timm import ModelEmaV3

and nothing else changes: the same constructor and defaults (timm 1.0.31), ``.module`` (the
EMA copy of the model, in eval mode), ``update(model, step=None)``, ``set(model)``,
``get_decay(step=None)``, ``forward`` and the same ``state_dict`` (``module.<name>`` keys, nothing
else), so timm's checkpoint helpers (``timm.utils.get_state_dict(model_ema, unwrap_model)``,
``load_checkpoint(model_ema.module, ..., use_ema=True)``) save and load it interchangeably with
timm's own class. What changes is the cost of ``update``: one fused pass over the whole model
per device (a few kernel launches), its decay computed on the device from the step (no host
sync), and an EMA kept in host memory for a CUDA model updated asynchronously.

timm is not imported (nor needed) by this module.
"""

from __future__ import annotations

import itertools
import operator
from copy import deepcopy
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import Module

from swa_fast.averaging.average_set import parse_device
from swa_fast.averaging.schedules import ScheduledEMAMultiAvgFn
from swa_fast.averaging.weight_average import WeightAverage, rounding_seed

__all__ = ["ModelEmaV3"]

DeviceLike = Union[int, str, torch.device]
_OWNER = "ModelEmaV3"
_EMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_WAITED_FOR = frozenset(("module", "n_averaged", "n_skipped"))  # attributes an update in flight writes


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{_OWNER}: {name} must be a bool, got {value!r}")
    return value


def _check_unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{_OWNER}: {name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _tensors(module: Module) -> List[Tensor]:
    return list(itertools.chain(module.parameters(), module.buffers()))


class ModelEmaV3(nn.Module):
    r"""Model Exponential Moving Average V3: timm's ``timm.utils.model_ema.ModelEmaV3`` (1.0.31),
    its update run by swa_fast's fused kernels.

    Keeps a moving average of everything in the model's state dict (parameters and buffers; with
    ``exclude_buffers=True`` parameters only, the buffers copied) in ``self.module``, a deep copy
    of the model in eval mode, optionally on another ``device`` or in another ``dtype``. Evaluate
    with ``ema.module(x)`` or ``ema(x)``; checkpoint with ``ema.state_dict()`` (keys
    ``module.<name>``, exactly timm's) or ``ema.module.state_dict()`` (timm's ``state_dict_ema``).

    Args:
        model: the model to average (``nn.Module``); its deep copy becomes ``.module``.
        decay: the EMA decay in [0, 1]. Default: 0.9999.
        min_decay: the lower clamp of the warm-up decay, in [0, 1]. Default: 0.
        update_after_step: updates at steps ``<= update_after_step + 1`` copy the model (decay 0).
        use_warmup: decay ``1 - (1 + s / warmup_gamma) ** -warmup_power`` (``s = step -
            update_after_step - 1``), clamped to ``[min_decay, decay]``.
        warmup_gamma: warm-up time scale (> 0). Default: 1.
        warmup_power: warm-up exponent (> 0). Default: 2/3.
        device: keep the EMA there (e.g. ``"cpu"`` for a CUDA model: an update then copies the
            model into pinned host memory on a side stream and averages on the host in a worker
            thread, without making the training stream wait: swa_fast's asynchronous offload,
            see below). Default: with the model.
        dtype: the floating dtype of the EMA (float16, bfloat16, float32 or float64), e.g.
            ``torch.bfloat16`` for a float32 model (half the memory; see ``stochastic_rounding``)
            or ``torch.float32`` for a low-precision model. Default: the model's dtypes.
        stochastic_rounding: round bfloat16 EMA tensors stochastically (unbiased), so updates far
            below bfloat16's spacing still accumulate in expectation. Default: True, as timm.
        stochastic_rounding_seed: the seed of the rounding's random stream (a 64-bit integer).
        foreach: accepted for compatibility with timm's signature; no effect (the update is
            always one fused pass).
        exclude_buffers: average parameters only and copy the buffers (timm's
            ``apply_update_no_buffers_``).

    Attributes ``decay``, ``min_decay``, ``update_after_step``, ``use_warmup``, ``warmup_gamma``,
    ``warmup_power``, ``stochastic_rounding`` and ``exclude_buffers`` may be changed between
    updates, as timm's (checked; the next update uses them).

    Numerics against timm's class (``tests/test_integration_timm.py``):

    * float32 (and float64) EMA of a model of the same dtype, with or without warm-up, step or
      no step, with buffers or without: **bitwise** timm's (both are ``lerp(ema, model, 1 -
      decay)``; the decay is timm's formula, evaluated in float64 on the device).
    * A bfloat16 / float16 EMA of a model of the same dtype, rounded to nearest: bitwise timm's.
    * An EMA of another dtype than the model (``dtype=torch.float32`` for a bf16 model, or a
      16-bit EMA of a float32 model rounded to nearest): timm's foreach path then computes
      ``ema * decay + model * (1 - decay)`` (two roundings), swa_fast one ``lerp`` (for a 16-bit EMA
      of a float32 model, torch's, with the weight in the EMA's dtype); they agree within a few
      units of the EMA's rounding per update (at most ``6 u M`` each, ``u`` the unit roundoff, ``M``
      the largest magnitude).
    * bfloat16 EMA with stochastic rounding: both roundings are unbiased (the stored value equals
      the float32 result in expectation) but the random bits differ: timm draws ``torch.randint``
      from a private ``torch.Generator``, swa_fast counter-based Philox bits, a pure function of
      (seed, update count ``n_averaged``, tensor, element), identical on the CPU and on CUDA and
      for any thread count. The two agree in distribution, not bitwise.
    * float16 EMA: rounded to nearest, as timm. (An EMA holding both bfloat16 and float16 tensors,
      which timm rounds stochastically and to nearest respectively, rounds both stochastically
      here: the rounding is chosen for the whole EMA.)

    Other differences from timm:

    * The decay of an update given ``step`` is computed on the device from the step, in float64
      (an int step is filled there, a 0-dim integer tensor step, also accepted, is read there: no
      host sync). A negative step is refused (timm treats it as 0).
      :meth:`get_decay` returns timm's Python float, computed on the host.
    * Non-persistent buffers (not in the state dict, so timm leaves them as they were copied) are
      averaged like the others (floating ones; integer ones copied). Those of timm's models are
      constants (position indices, frequency tables), which an average leaves bitwise unchanged.
    * ``device="cpu"`` for a CUDA model: updates are asynchronous (see ``device``). Everything
      that reads the EMA through this object waits for the updates in flight first: ``ema.module``,
      ``ema(x)``, ``ema.n_averaged``, ``state_dict``, ``load_state_dict``, ``set``, ``.to()``; a
      reference to ``ema.module`` kept across updates must call :meth:`synchronize` before it is
      read. The model's later writes (optimizer steps, forwards) wait for the copies on the GPU.
    * The update counter ``n_averaged`` (a non-persistent buffer, so not in the state dict) numbers
      the random streams of stochastic rounding. Like timm's generator, which restarts from its
      seed, it restarts from 0 after a resume; save it and restore it (``ema.n_averaged.fill_(n)``)
      to continue the very stream of an uninterrupted run. float32 EMAs do not depend on it.
    * The model given to ``update`` must have the EMA's structure (its parameters and buffers,
      shapes and count): checked whenever the cached tensor lists are rebuilt, instead of zipping
      silently.
    """

    n_averaged: Tensor
    n_skipped: Tensor

    def __init__(
        self,
        model: Module,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        device: Optional[DeviceLike] = None,
        dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = True,
        stochastic_rounding_seed: int = 0,
        foreach: bool = True,
        exclude_buffers: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, Module):
            raise TypeError(f"{_OWNER}: model must be a torch.nn.Module, got {type(model).__name__}")
        _check_bool("use_warmup", use_warmup)
        _check_bool("foreach", foreach)
        _check_bool("exclude_buffers", exclude_buffers)
        _check_unit("decay", decay)
        _check_unit("min_decay", min_decay)
        if dtype is not None and dtype not in _EMA_DTYPES:
            raise ValueError(f"{_OWNER}: dtype must be None or a floating dtype with arithmetic (torch.float16, "
                             f"torch.bfloat16, torch.float32 or torch.float64), got {dtype!r}")
        parsed = parse_device(device, _OWNER)
        # The decay schedule (checks decay, min_decay, update_after_step, warmup_gamma/power).
        try:
            schedule = ScheduledEMAMultiAvgFn(decay, min_decay, update_after_step, "power" if use_warmup else None,
                                              warmup_gamma, warmup_power)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{_OWNER}: {error}") from None
        rounding_seed(stochastic_rounding, stochastic_rounding_seed, [schedule], _OWNER)  # checks both
        self._schedule = schedule  # what the schedule's properties (decay, ...) read and write
        self._stochastic_rounding = stochastic_rounding
        self._exclude_buffers = exclude_buffers
        self.stochastic_rounding_seed = stochastic_rounding_seed

        # make a copy of the model for accumulating moving average of weights
        self.module = deepcopy(model)
        self.module.eval()
        self.foreach = foreach  # no effect: the update is always fused
        self.device = device  # perform ema on different device from model if set
        self.dtype = dtype  # keep ema in a different (e.g. higher precision) dtype from model if set
        first = next(iter(_tensors(model)), None)
        if parsed is not None and (first is None or not _same_device(parsed, first.device)):
            self.foreach = False  # as timm: no foreach across devices (here: no effect either)
            self.module.to(device=parsed)
        if dtype is not None:
            self.module.to(dtype=dtype)
        held = _tensors(self.module)
        home = held[0].device if held else (parsed or torch.device("cpu"))
        # The update count (stochastic rounding's counter) and the skipped updates (none: no
        # skip_nonfinite), with the EMA: not in the state dict, which is timm's.
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long, device=home), persistent=False)
        self.register_buffer("n_skipped", torch.zeros((), dtype=torch.long, device=home), persistent=False)
        self._engine = self._new_engine()

    # -- the engine ---------------------------------------------------------------------

    def _new_engine(self) -> WeightAverage:
        engine = WeightAverage._over_module(self._modules["module"], self._schedule, not self._exclude_buffers,
                                            False, self._counts, self._rounding_seed_now(), _OWNER)
        # A host EMA of a CUDA model: updates return once the copies are enqueued; every read
        # through this object waits (synchronize()).
        engine._set.synchronous = False
        return engine

    def _counts(self) -> Tuple[Tensor, Tensor]:
        return self.n_averaged, self.n_skipped

    def _rounding_seed_now(self) -> Optional[int]:
        """The seed when bfloat16 tensors are rounded stochastically now; None (round to nearest)
        without stochastic rounding or for an EMA whose 16-bit tensors are all float16 (as timm)."""
        if not self._stochastic_rounding:
            return None
        dtypes = {t.dtype for t in _tensors(self._modules["module"])}
        if torch.float16 in dtypes and torch.bfloat16 not in dtypes:
            return None
        return self.stochastic_rounding_seed

    def synchronize(self) -> None:
        """Block until the updates in flight (only those of a host EMA of a CUDA model ever are)
        have been applied, and raise the error of one that failed."""
        engine = self.__dict__.get("_engine")
        if engine is not None:
            engine.synchronize()

    def __getattr__(self, name: str) -> Any:
        if name in _WAITED_FOR:  # reading the EMA or its counts: after the updates in flight
            self.synchronize()
        return super().__getattr__(name)

    # -- timm's schedule, read from and written to the fused function ------------------------

    def _reschedule(self, **changes: Any) -> None:
        schedule: ScheduledEMAMultiAvgFn = self._schedule
        values = dict(decay=schedule.decay, min_decay=schedule.min_decay,
                      update_after_step=schedule.update_after_step, warmup=schedule.warmup,
                      warmup_gamma=schedule.warmup_gamma, warmup_power=schedule.warmup_power)
        values.update(changes)
        _check_unit("decay", values["decay"])
        _check_unit("min_decay", values["min_decay"])
        try:
            checked = ScheduledEMAMultiAvgFn(**values)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{_OWNER}: {error}") from None
        self.synchronize()  # an update in flight reads the schedule on the worker
        schedule.__dict__.update(checked.__dict__)

    @property
    def decay(self) -> float:
        return self._schedule.decay

    @decay.setter
    def decay(self, value: float) -> None:
        self._reschedule(decay=value)

    @property
    def min_decay(self) -> float:
        return self._schedule.min_decay

    @min_decay.setter
    def min_decay(self, value: float) -> None:
        self._reschedule(min_decay=value)

    @property
    def update_after_step(self) -> int:
        return self._schedule.update_after_step

    @update_after_step.setter
    def update_after_step(self, value: int) -> None:
        self._reschedule(update_after_step=value)

    @property
    def use_warmup(self) -> bool:
        return self._schedule.warmup == "power"

    @use_warmup.setter
    def use_warmup(self, value: bool) -> None:
        self._reschedule(warmup="power" if _check_bool("use_warmup", value) else None)

    @property
    def warmup_gamma(self) -> float:
        return self._schedule.warmup_gamma

    @warmup_gamma.setter
    def warmup_gamma(self, value: float) -> None:
        self._reschedule(warmup_gamma=value)

    @property
    def warmup_power(self) -> float:
        return self._schedule.warmup_power

    @warmup_power.setter
    def warmup_power(self, value: float) -> None:
        self._reschedule(warmup_power=value)

    @property
    def stochastic_rounding(self) -> bool:
        return self._stochastic_rounding

    @stochastic_rounding.setter
    def stochastic_rounding(self, value: bool) -> None:
        self._stochastic_rounding = _check_bool("stochastic_rounding", value)
        engine = self.__dict__.get("_engine")
        if engine is not None:
            engine._set.forget_plan()  # the next update rebuilds it with the new rounding
            engine._set.rounding_seed = self._rounding_seed_now()

    @property
    def exclude_buffers(self) -> bool:
        return self._exclude_buffers

    @exclude_buffers.setter
    def exclude_buffers(self, value: bool) -> None:
        self._exclude_buffers = _check_bool("exclude_buffers", value)
        self.synchronize()
        self._engine = self._new_engine()  # the same counts: buffers averaged or copied from now on

    def get_decay(self, step: Optional[Union[int, Tensor]] = None) -> float:
        """The decay of an update at optimizer step ``step`` (None: ``decay``), timm's formula on the
        host (the update evaluates the same formula on the device)."""
        if step is None:
            return float(self.decay)
        if isinstance(step, Tensor):
            step = int(step)
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
            decay = max(min(decay, self.decay), self.min_decay)
        else:
            decay = self.decay
        return float(decay)

    # -- updating ---------------------------------------------------------------------

    def _check_model(self, model: Module) -> None:
        """``model`` pairs with the EMA by position (as timm zips them): same count and shapes."""
        ema = self._modules["module"]
        kinds = [("parameters", lambda m: list(m.parameters())), ("buffers", lambda m: list(m.buffers()))]
        for kind, listed in kinds:
            ours, theirs = listed(ema), listed(model)
            if len(ours) != len(theirs):
                raise ValueError(f"{_OWNER}.update: the model has {len(theirs)} {kind} but the EMA {len(ours)}; "
                                 "update from the model the EMA was made from")
            for index, (a, b) in enumerate(zip(ours, theirs)):
                if a.shape != b.shape:
                    raise ValueError(f"{_OWNER}.update: {kind} {index} has shape {tuple(b.shape)} in the model but "
                                     f"{tuple(a.shape)} in the EMA; update from the model the EMA was made from")

    @torch.no_grad()
    def update(self, model: Module, step: Optional[Union[int, Tensor]] = None) -> None:
        """Average ``model`` in with the decay of ``step`` (:meth:`get_decay`; None: ``decay``): one
        fused pass per device, no host sync. A host EMA of a CUDA model returns once the copies are
        enqueued (see the class docstring)."""
        if not isinstance(model, Module):
            raise TypeError(f"{_OWNER}.update: model must be a torch.nn.Module, got {type(model).__name__}")
        if step is not None and not isinstance(step, Tensor):
            step = _integer_step(step)
        engine = self._engine
        average_set = engine._set
        if average_set.store.module is not self._modules["module"]:  # ema.module was replaced
            self.synchronize()
            engine = self._engine = self._new_engine()
            average_set = engine._set
        plan = average_set._plan
        if plan is None or not plan.is_current(model):  # the tensor lists are rebuilt: check them
            self._check_model(model)
            average_set.rounding_seed = self._rounding_seed_now()
        engine.update(model, step)

    @torch.no_grad()
    def set(self, model: Module) -> None:
        """Copy ``model``'s state into the EMA (as timm: the state dict's tensors)."""
        if not isinstance(model, Module):
            raise TypeError(f"{_OWNER}.set: model must be a torch.nn.Module, got {type(model).__name__}")
        ema = self.module  # waits for the updates in flight
        ours, theirs = list(ema.state_dict().values()), list(model.state_dict().values())
        if len(ours) != len(theirs):
            raise ValueError(f"{_OWNER}.set: the model's state dict has {len(theirs)} entries but the EMA's "
                             f"{len(ours)}")
        for ema_v, model_v in zip(ours, theirs):
            ema_v.copy_(model_v.to(device=ema_v.device))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    # -- checkpoints and moves: after the updates in flight --------------------------

    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """timm's state dict: ``module.<name>`` for every entry of ``self.module.state_dict()``."""
        self.synchronize()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a state dict of this class or of timm's ``ModelEmaV3`` (``module.<name>`` keys)."""
        self.synchronize()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _apply(self, *args: Any, **kwargs: Any):
        engine = self.__dict__.get("_engine")
        if engine is not None:
            engine._set.forget_plan()  # waits for the updates in flight; .to() may change devices/dtypes
        return super()._apply(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"decay={self.decay}, min_decay={self.min_decay}, update_after_step={self.update_after_step}, "
                f"use_warmup={self.use_warmup}, warmup_gamma={self.warmup_gamma}, "
                f"warmup_power={self.warmup_power}, device={self.device}, dtype={self.dtype}, "
                f"stochastic_rounding={self.stochastic_rounding}, exclude_buffers={self.exclude_buffers}")


def _integer_step(step: Any) -> int:
    """``step`` as a Python int (a NumPy integer too, as timm takes it); a clear error otherwise."""
    if not isinstance(step, bool):
        try:
            return operator.index(step)
        except TypeError:
            pass
    raise TypeError(f"{_OWNER}.update: step must be an int, a 0-dim integer tensor or None, got {step!r}")


def _same_device(wanted: torch.device, actual: torch.device) -> bool:
    """Whether ``wanted`` (``"cuda"`` without an index: the current CUDA device) is ``actual``."""
    if wanted.type != actual.type:
        return False
    if wanted.type == "cuda" and wanted.index is None:
        wanted = torch.device("cuda", torch.cuda.current_device())
    return wanted.index == actual.index
