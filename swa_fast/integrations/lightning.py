"""Lightning's weight-averaging callbacks on swa_fast's fused averaging core: swap one import.

Replace::

    from pytorch_lightning.callbacks import EMAWeightAveraging   # or: from lightning.pytorch.callbacks import ...

with::

    from swa_fast.integrations.lightning import EMAWeightAveraging

(likewise ``WeightAveraging`` and ``StochasticWeightAveraging``) and nothing else changes. Each class
here is a subclass of the installed Lightning's (``lightning.pytorch`` when installed, else
``pytorch_lightning``) with its constructor, defaults, ``should_update(step_idx=None,
epoch_idx=None)`` contract, hooks, checkpoint layout and callback ``state_key``, so a checkpoint
written with either class resumes with the other:

* ``checkpoint["state_dict"]``: the averaged weights (every key of the model's state dict);
* ``checkpoint["current_model_state"]``: the model's own weights;
* ``checkpoint["averaging_state"]``: ``{"n_averaged": ...}``;
* ``checkpoint["callbacks"][<class name>]``: ``{"latest_update_step": ...}``.

What changes is the cost:

* an update is one fused pass over the whole model per device (a few kernel launches), its weight
  computed on the device, with no host synchronisation (:class:`swa_fast.WeightAverage`);
  ``device="cpu"`` for a model on a GPU keeps the averages in host memory, updated asynchronously
  from pinned copies;
* the validation swap and the copy at the end of training are the core's
  (:meth:`~swa_fast.WeightAverage.swapped_into`, :meth:`~swa_fast.WeightAverage.copy_to`): an
  exchange of contents in place, not a clone per tensor, and no deep copy of the model is kept.

Where the numbers differ from Lightning's (all deliberate):

* Integer buffers (BatchNorm's ``num_batches_tracked``) averaged with ``use_buffers=True`` are
  copied from the model; torch's ``AveragedModel`` stores a truncated average of the counts (as
  :mod:`swa_fast.swa_utils` documents).
* The default average (SWA) is the fused ``lerp(avg, w, 1 / (n + 1))``, torch's foreach path. On the
  CPU torch's ``AveragedModel`` takes its per-tensor path instead, ``avg + (w - avg) / (n + 1)``
  (Lightning's ``StochasticWeightAveraging`` computes the same): the two round differently in the
  last bits (a couple of ulps per update, shrunk by later updates' ``1 / (n + 1)``). With
  ``multi_avg_fn=torch.optim.swa_utils.get_swa_multi_avg_fn()`` (use_buffers=False) Lightning's
  callback runs the lerp on the CPU too, and the two are bitwise equal.
* Lightning's ``EMAWeightAveraging`` computes ``decay * ema + (1 - decay) * w`` per tensor; the fused
  EMA is ``lerp(ema, w, 1 - decay)`` (torch's ``get_ema_multi_avg_fn``, bitwise): the two round
  differently in the last bits (a few ulps per update, contracted by ``decay`` afterwards).
* Giving ``avg_fn=`` (a per-tensor function) runs it unfused, as torch and Lightning run it: bitwise
  their numbers, at their cost.

Beyond Lightning:

* FSDP2 models (``fully_shard`` in ``configure_model`` under ``ModelParallelStrategy``):
  ``WeightAveraging`` and ``EMAWeightAveraging`` average each rank's local shards (no
  communication), swap them in for validation, copy them in at the end and checkpoint them (with a
  distributed checkpoint the averages are saved sharded as ``state_dict``; the model's own weights,
  which Lightning keeps in the rank-0 metadata file, are gathered there in full).
  ``StochasticWeightAveraging`` (a deep copy of the model, as Lightning's) refuses them. FSDP1
  (``FSDPStrategy``) and DeepSpeed ZeRO stage 3, whose parameters are not the model's, are refused
  with an error that says so (Lightning's ``StochasticWeightAveraging`` refuses them too).
* ``EMAWeightAveraging(..., warmup_gamma=..., warmup_power=...)``: timm's decay warm-up
  ``min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)`` with ``t = trainer.global_step``,
  computed on the device.
* ``WeightAveraging(..., avg_dtype=torch.float32)`` (fp32 averages of a bf16 model),
  ``skip_nonfinite=True``, ``include=...``, ``stochastic_rounding=True``: the core's options
  (:class:`swa_fast.WeightAverage`).
* ``callback.average``: the :class:`swa_fast.WeightAverage` itself (after fit starts).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from swa_fast.averaging.schedules import get_ema_multi_avg_fn
from swa_fast.averaging.sharding import is_dtensor
from swa_fast.averaging.weight_average import WeightAverage
from swa_fast.swa_utils import SWALR, AveragedModel  # noqa: F401  (SWALR: torch's class, as Lightning uses it)

try:  # the unified package first, as Lightning's own docs recommend
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import StochasticWeightAveraging as _LightningSWA
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.model_helpers import is_overridden
    from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

    _PACKAGE = "lightning.pytorch"
except ImportError:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import StochasticWeightAveraging as _LightningSWA
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
    from pytorch_lightning.utilities.exceptions import MisconfigurationException
    from pytorch_lightning.utilities.model_helpers import is_overridden
    from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

    _PACKAGE = "pytorch_lightning"

try:
    _LightningWeightAveraging = pl.callbacks.WeightAveraging
    _LightningEMAWeightAveraging = pl.callbacks.EMAWeightAveraging
except AttributeError as error:  # pragma: no cover - Lightning < 2.6
    raise ImportError(
        f"swa_fast.integrations.lightning needs Lightning's WeightAveraging and EMAWeightAveraging callbacks "
        f"(Lightning >= 2.6); the installed {_PACKAGE} {pl.__version__} has neither"
    ) from error

__all__ = ["WeightAveraging", "EMAWeightAveraging", "StochasticWeightAveraging"]

_CORE_KWARGS = ("avg_dtype", "skip_nonfinite", "include", "stochastic_rounding", "stochastic_rounding_seed")


def _has_dtensors(module: nn.Module) -> bool:
    return any(is_dtensor(t) for t in itertools.chain(module.parameters(), module.buffers()))


def _kept_copy(buffer: Tensor, device: Optional[torch.device]) -> Tensor:
    """Where a buffer of the last update is kept: on ``device`` (default: the buffer's), pinned when
    that is host memory for a GPU buffer (asynchronous copies)."""
    target = device or buffer.device
    pin = target.type == "cpu" and buffer.is_cuda
    kept = torch.empty(buffer.shape, dtype=buffer.dtype, device=target, pin_memory=pin)
    kept.copy_(buffer.detach())
    return kept


class _PerTensor:
    """A torch-style per-tensor ``avg_fn(averaged, current, n_averaged) -> Tensor`` as a
    ``multi_avg_fn``: torch's ``AveragedModel`` arithmetic (``averaged.copy_(avg_fn(...))``),
    run by the core as torch runs it (once per device and dtype; the first update copies)."""

    def __init__(self, avg_fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
        self.avg_fn = avg_fn

    @torch.no_grad()
    def __call__(self, averaged: List[Tensor], current: List[Tensor], n_averaged: Tensor) -> None:
        for average, value in zip(averaged, current):
            average.copy_(self.avg_fn(average, value, n_averaged))

    def __repr__(self) -> str:
        return f"avg_fn={self.avg_fn!r}"


class WeightAveraging(_LightningWeightAveraging):
    r"""Lightning's ``WeightAveraging`` callback with swa_fast's fused, sync-free averaging.

    The same constructor: ``device`` (default: with the model), ``use_buffers=True`` and
    ``**kwargs`` for the averaging: ``avg_fn`` (torch's per-tensor function, run unfused as torch
    runs it) or ``multi_avg_fn`` (``swa_fast.swa_utils.get_ema_multi_avg_fn`` /
    ``get_swa_multi_avg_fn`` run fused; another function runs as torch runs it). Without either,
    an equal-weight average (SWA), fused. swa_fast's keyword arguments are accepted too:
    ``avg_dtype``, ``skip_nonfinite``, ``include``, ``stochastic_rounding``,
    ``stochastic_rounding_seed`` (see :class:`swa_fast.WeightAverage`).

    Override ``should_update(step_idx=None, epoch_idx=None)`` as with Lightning's class.

    The averages are made when fit starts (``on_fit_start``: after the strategy has moved, wrapped
    or sharded the model) and the state of a checkpoint restored before that waits for them. See
    the module docstring for the checkpoint layout and where the numbers differ from Lightning's.
    """

    def __init__(
        self,
        device: Optional[Union[torch.device, str, int]] = None,
        use_buffers: bool = True,
        **kwargs: Any,
    ) -> None:
        # Not super(): in EMAWeightAveraging's MRO the next class is Lightning's EMAWeightAveraging,
        # whose __init__ would add torch's per-tensor EMA.
        _LightningWeightAveraging.__init__(self, device=device, use_buffers=use_buffers, **kwargs)
        unknown = sorted(set(kwargs) - {"avg_fn", "multi_avg_fn", *_CORE_KWARGS})
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected keyword arguments {unknown} (the averaging takes "
                            f"avg_fn, multi_avg_fn and {', '.join(_CORE_KWARGS)})")
        if kwargs.get("avg_fn") is not None and kwargs.get("multi_avg_fn") is not None:
            raise ValueError(f"{type(self).__name__}: only one of avg_fn and multi_avg_fn should be provided")
        for name in ("avg_fn", "multi_avg_fn"):
            if kwargs.get(name) is not None and not callable(kwargs[name]):
                raise TypeError(f"{type(self).__name__}: {name} must be callable, got {kwargs[name]!r}")
        self._average: Optional[WeightAverage] = None
        self._fitting = False  # setup("fit") ran and the averages are not made yet
        self._pending: Optional[Tuple[Mapping[str, Any], Optional[Mapping[str, Any]], bool]] = None
        # use_buffers=False: the model's buffers as of the last update (torch's AveragedModel copies
        # them at every update; Lightning swaps them in and saves them with the averages).
        self._buffers: Optional[List[Tuple[str, Tensor, Tensor]]] = None
        self._buffers_copied: Optional[Any] = None  # a CUDA event: the asynchronous host copies of them
        self._swap: Optional[contextlib.ExitStack] = None

    # -- what it is ---------------------------------------------------------------------------

    @property
    def average(self) -> Optional[WeightAverage]:
        """The :class:`swa_fast.WeightAverage` holding the averages (None before fit starts)."""
        return self._average

    def _multi_avg_fn(self) -> Any:
        if self._kwargs.get("avg_fn") is not None:
            return _PerTensor(self._kwargs["avg_fn"])
        return self._kwargs.get("multi_avg_fn")

    def _update_step(self, trainer: "pl.Trainer") -> Optional[int]:
        """The optimizer step an update is given (for step-driven warm-ups): ``trainer.global_step``."""
        return trainer.global_step

    # -- making the averages ------------------------------------------------------------------

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """When fit begins: checks the strategy and, as Lightning's callback does, calls an overridden
        ``configure_model`` (with its warning) so that the model has all its layers; under
        ``ModelParallelStrategy`` the strategy shards it in its own context instead. The averages
        themselves are made in ``on_fit_start``."""
        if stage != "fit":
            return
        strategy = trainer.strategy
        if isinstance(strategy, FSDPStrategy) or (isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3):
            raise MisconfigurationException(
                f"{type(self).__name__} (swa_fast) does not support {type(strategy).__name__}"
                f"{' with ZeRO stage 3' if isinstance(strategy, DeepSpeedStrategy) else ''}: its parameters are "
                "flattened or partitioned, not the model's. Shard the model with FSDP2 instead: ModelParallelStrategy "
                "and torch.distributed.fsdp.fully_shard in configure_model() (each rank then averages its shards)"
            )
        if self._average is not None:
            self._average.close()
        self._average, self._pending, self._buffers, self._swap = None, None, None, None
        self._fitting = True
        if not isinstance(trainer.strategy, ModelParallelStrategy) and is_overridden("configure_model", pl_module):
            rank_zero_warn(
                "You're using the WeightAveraging callback with a model that overrides the configure_model "
                "callback. WeightAveraging doesn't support sharding model layers, so you may run out of memory."
            )
            pl_module.configure_model()

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Makes the averages from the model as the strategy set it up (its device, its FSDP2 shards),
        and loads the state of a checkpoint restored before."""
        if not self._fitting:
            return
        self._fitting = False
        fn = self._multi_avg_fn()
        options = {name: self._kwargs[name] for name in _CORE_KWARGS if name in self._kwargs}
        # Lightning's `self._device or pl_module.device`: no device (or 0) means the model's.
        self._average = WeightAverage(pl_module, fn, self._use_buffers, device=self._device or None, **options)
        if not self._use_buffers:
            self._buffers = [(name, buffer, _kept_copy(buffer, self._average.device))
                             for name, buffer in pl_module.named_buffers()]
            self._buffers_copied = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._load_averages(pl_module, *pending)

    # -- updating -----------------------------------------------------------------------------

    def _update(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        assert self._average is not None
        self._average.update(pl_module, self._update_step(trainer))
        if self._buffers is not None:
            offloaded = False
            with torch.no_grad():
                for _, buffer, kept in self._buffers:
                    # Host copies of a GPU model's buffers: pinned, asynchronous (read after _buffers_ready).
                    asynchronous = kept.device.type == "cpu" and buffer.is_cuda
                    kept.copy_(buffer.detach(), non_blocking=asynchronous)
                    offloaded |= asynchronous
            if offloaded:
                self._buffers_copied = torch.cuda.Event()
                self._buffers_copied.record()

    def _buffers_ready(self) -> Optional[List[Tuple[str, Tensor, Tensor]]]:
        """The buffers of the last update, once their asynchronous host copies have landed."""
        event, self._buffers_copied = getattr(self, "_buffers_copied", None), None
        if event is not None:
            event.synchronize()
        return self._buffers

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Updates the averages after an optimizer step when ``should_update(step_idx=...)`` says so."""
        # Lightning's rule: step_idx is zero-based, one update per optimizer step at most.
        step_idx = trainer.global_step - 1
        if (trainer.global_step > self._latest_update_step) and self.should_update(step_idx=step_idx):
            self._update(trainer, pl_module)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Updates the averages after an epoch when ``should_update(epoch_idx=...)`` says so."""
        if (trainer.current_epoch > self._latest_update_epoch) and self.should_update(epoch_idx=trainer.current_epoch):
            self._update(trainer, pl_module)
            self._latest_update_epoch = trainer.current_epoch

    # -- using the averages -------------------------------------------------------------------

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Writes the averages into the model (and, without ``use_buffers``, the buffers of the last update)."""
        assert self._average is not None
        self._close_swap()
        self._average.copy_to(pl_module)
        if self._buffers_ready() is not None:
            with torch.no_grad():
                for _, buffer, kept in self._buffers:
                    buffer.copy_(kept)

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Swaps the averages into the model for validation (in place: no copy of the model)."""
        if self._average is None or self._swap is not None:
            return
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(self._average.swapped_into(pl_module))
            if self._buffers_ready() is not None:
                stack.enter_context(self._buffers_swapped())
        except BaseException:
            stack.close()
            raise
        self._swap = stack

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Gives the model its own weights back (bitwise)."""
        self._close_swap()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """An exception inside validation leaves the model its own weights, not the averages."""
        self._close_swap()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._close_swap()
        if self._average is not None:
            self._average.synchronize()

    def _close_swap(self) -> None:
        swap, self._swap = self._swap, None
        if swap is not None:
            swap.close()

    @contextlib.contextmanager
    def _buffers_swapped(self) -> Iterator[None]:
        """Lightning swaps the buffers of the last update in with the averaged parameters (and takes
        what validation leaves in them back)."""

        def exchange() -> None:
            with torch.no_grad():
                for _, buffer, kept in self._buffers:
                    scratch = buffer.detach().clone()
                    buffer.copy_(kept)
                    kept.copy_(scratch)

        exchange()
        try:
            yield
        finally:
            exchange()

    # -- checkpoints --------------------------------------------------------------------------

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        """Lightning's layout: the averages in ``state_dict``, the model's weights in
        ``current_model_state``, the count in ``averaging_state``."""
        if self._average is None:
            rank_zero_info(
                "You're using the WeightAveraging callback, but saving a checkpoint outside the 'fit' stage. The state "
                "of the WeightAveraging callback won't be saved in the checkpoint. If training has finished, the "
                "average model parameters will be saved to the state_dict in the checkpoint."
            )
            return
        current = checkpoint["state_dict"]
        averaged = self._averaged_state(pl_module)
        if _has_dtensors(pl_module):
            current, averaged = self._sharded_states(trainer, pl_module, current, averaged)
        checkpoint["current_model_state"] = current
        checkpoint["state_dict"] = averaged
        checkpoint["averaging_state"] = self._counts_state()

    def _averaged_state(self, pl_module: "pl.LightningModule") -> Dict[str, Tensor]:
        """Every key of the model's state dict: the averages, the buffers of the last update
        (``use_buffers=False``), the model's own values for what ``include`` leaves out."""
        state = self._average.module_state_dict(pl_module)
        if self._buffers_ready() is not None:
            kept = {id(buffer): value for _, buffer, value in self._buffers}
            for key, value in pl_module.state_dict(keep_vars=True).items():
                if id(value) in kept:
                    state[key] = kept[id(value)].detach()
        return state

    def _counts_state(self) -> Dict[str, Tensor]:
        """``averaging_state``: ``{"n_averaged"}`` as torch's AveragedModel saves it (plus ``n_skipped``
        with ``skip_nonfinite`` and ``last_step`` for functions that keep it, which torch's has not)."""
        core = self._average.state_dict()
        state = {"n_averaged": core["n_averaged"].clone()}
        if self._average.skip_nonfinite:
            state["n_skipped"] = core["n_skipped"].clone()
        if "last_step" in core:
            state["last_step"] = core["last_step"].clone()
        return state

    def _sharded_states(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", current: Dict[str, Any],
                        averaged: Dict[str, Tensor]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """An FSDP2 model under ModelParallelStrategy. A distributed checkpoint (``state_dict`` holds
        DTensors) saves ``state_dict`` sharded and everything else in a metadata file on rank 0: the
        averages stay sharded and the model's weights are gathered there in full. A full checkpoint
        (``state_dict`` full on rank 0, empty elsewhere) gathers the averages the same way."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        rank = trainer.global_rank
        if any(is_dtensor(value) for value in current.values()):
            full = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return (full if rank == 0 else {}), averaged
        gathered = {}
        for key, value in averaged.items():
            value = value.full_tensor() if is_dtensor(value) else value  # a collective: on every rank
            gathered[key] = value.detach().cpu()
        return current, (gathered if rank == 0 else {})

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        """Loads the averages and gives the model its own weights (``current_model_state``); a
        checkpoint without averaging state initializes the averages with ``state_dict``."""
        if self._average is None and not self._fitting:
            rank_zero_warn(
                "You're using the WeightAveraging callback, but loading a checkpoint outside the 'fit' stage. The "
                "WeightAveraging state cannot be restored. If you're using the checkpoint for prediction or testing, "
                "you can ignore this warning. To disable the warning, remove the WeightAveraging callback."
            )
        elif ("current_model_state" in checkpoint) and ("averaging_state" in checkpoint):
            rank_zero_info("Found current_model_state in the checkpoint. This will be used to initialize the model.")
            self._load_or_keep(pl_module, self._saved_averages(pl_module, checkpoint),
                               checkpoint["averaging_state"], True)
            # The model was loaded from "state_dict" (the averages); its own weights are these.
            self._load_model_state(pl_module, checkpoint["current_model_state"])
        else:
            rank_zero_warn(
                "The checkpoint was not created with WeightAveraging. Both the current and the average model will be "
                "initialized with state_dict."
            )
            self._load_or_keep(pl_module, self._saved_averages(pl_module, checkpoint), None, False)

    def _saved_averages(self, pl_module: "pl.LightningModule", checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
        if "state_dict" in checkpoint:
            return checkpoint["state_dict"]
        # ModelParallelStrategy loads "state_dict" into the (sharded) model itself and leaves it out of
        # the checkpoint it hands on: the averages are the model's values now.
        return {key: value.detach().clone() for key, value in pl_module.state_dict().items()}

    def _load_or_keep(self, pl_module: "pl.LightningModule", state: Mapping[str, Any],
                      counts: Optional[Mapping[str, Any]], strict: bool) -> None:
        if self._average is None:  # restored before on_fit_start made the averages: wait for them
            self._pending = (state, counts, strict)
        else:
            self._load_averages(pl_module, state, counts, strict)

    def _load_averages(self, pl_module: "pl.LightningModule", state: Mapping[str, Any],
                       counts: Optional[Mapping[str, Any]], strict: bool) -> None:
        """``state`` (model state-dict keys) into the averages, all checked before anything is written.
        ``counts``: ``averaging_state``; None keeps the count (0: the next update copies the model)."""
        expected = list(pl_module.state_dict(keep_vars=True).keys())
        if strict:
            missing = [key for key in expected if key not in state]
            unexpected = [key for key in state if key not in set(expected)]
            if missing or unexpected:
                raise RuntimeError(f"{type(self).__name__}: error loading the averaged weights from the checkpoint: "
                                   f"missing keys {missing}, unexpected keys {unexpected}")
        core = self._average.state_dict()
        averages = {name: state[name] for name in core["averages"] if name in state}
        new_state: Dict[str, Any] = {"averages": averages, "n_averaged": core["n_averaged"].clone()}
        if counts is not None:
            new_state.update((key, counts[key]) for key in ("n_averaged", "n_skipped", "last_step") if key in counts)
        buffers = [(kept, state[name]) for name, _, kept in (self._buffers_ready() or []) if name in state]
        for kept, value in buffers:  # checked before the averages are written, as the core checks its own
            if tuple(value.shape) != tuple(kept.shape):
                raise RuntimeError(f"{type(self).__name__}: a buffer has shape {tuple(value.shape)} in the checkpoint "
                                   f"but {tuple(kept.shape)} in the model")
        self._average.load_state_dict(new_state, strict=False)
        with torch.no_grad():
            for kept, value in buffers:
                kept.copy_(value)

    def _load_model_state(self, pl_module: "pl.LightningModule", state: Mapping[str, Any]) -> None:
        if _has_dtensors(pl_module) and not any(is_dtensor(value) for value in state.values()):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(pl_module, dict(state),
                                 options=StateDictOptions(full_state_dict=True, strict=pl_module.strict_loading))
        else:
            pl_module.load_state_dict(state)


class EMAWeightAveraging(WeightAveraging, _LightningEMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` with swa_fast's fused EMA (``lerp(ema, w, 1 - decay)``,
    torch's ``get_ema_multi_avg_fn``, bitwise).

    The same constructor and ``should_update`` (``update_every_n_steps``,
    ``update_starting_at_step``, ``update_starting_at_epoch``), plus an optional timm-style decay
    warm-up as keyword arguments: with ``warmup_gamma`` set, each update uses ``decay_t =
    min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)`` where ``t`` is ``trainer.global_step``
    (computed on the device). ``decay``, ``warmup_gamma`` and ``warmup_power`` are attributes of
    ``self.multi_avg_fn`` and can be changed during training.
    """

    def __init__(
        self,
        device: Optional[Union[torch.device, str, int]] = None,
        use_buffers: bool = True,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: Optional[int] = None,
        update_starting_at_epoch: Optional[int] = None,
        *,
        warmup_gamma: Optional[float] = None,
        warmup_power: float = 1.0,
        **kwargs: Any,
    ) -> None:
        self.multi_avg_fn = get_ema_multi_avg_fn(decay, warmup_gamma=warmup_gamma, warmup_power=warmup_power)
        WeightAveraging.__init__(self, device=device, use_buffers=use_buffers, **kwargs,
                                 multi_avg_fn=self.multi_avg_fn)
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch


class StochasticWeightAveraging(_LightningSWA):
    r"""Lightning's ``StochasticWeightAveraging`` callback on ``swa_fast.swa_utils.AveragedModel``.

    The same constructor (``swa_lrs``, ``swa_epoch_start``, ``annealing_epochs``,
    ``annealing_strategy``, ``avg_fn``, ``device`` defaulting to the CPU) and behaviour: the average
    is updated at the start of each SWA epoch, the learning rate follows ``SWALR`` (torch's, which
    ``swa_fast.swa_utils`` re-exports), and with BatchNorm layers one more epoch recomputes their
    statistics with the averaged weights. Its checkpoint state (``n_averaged``,
    ``latest_update_epoch``, ``scheduler_state``, ``average_model_state`` keyed as the model's state
    dict) is Lightning's, so either class resumes from the other's checkpoints.

    The update is ``AveragedModel.update_parameters``: fused, with no host sync on one device, and
    with the default ``device="cpu"`` for a model on a GPU, from pinned copies. Without ``avg_fn``
    the average is ``lerp(avg, w, 1 / (n + 1))`` (torch's foreach path), where Lightning computes
    ``avg + (w - avg) / (n + 1)``: the two differ in the last bits. With ``avg_fn`` given, it runs
    as Lightning runs it (bitwise). Differs from Lightning's in one invisible place: the averaged
    copy's buffers (never used: only parameters are transferred) follow the model's at each update,
    as torch's AveragedModel
    keeps them, instead of staying as they were at setup.
    """

    def __init__(
        self,
        swa_lrs: Union[float, List[float]],
        swa_epoch_start: Union[int, float] = 0.8,
        annealing_epochs: int = 10,
        annealing_strategy: str = "cos",
        avg_fn: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None,
        device: Optional[Union[torch.device, str]] = torch.device("cpu"),
    ):
        super().__init__(swa_lrs, swa_epoch_start, annealing_epochs, annealing_strategy, avg_fn, device)
        self._given_avg_fn = avg_fn

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise MisconfigurationException("SWA does not currently support sharded models.")
        if isinstance(trainer.strategy, ModelParallelStrategy) or _has_dtensors(pl_module):
            raise MisconfigurationException(
                "StochasticWeightAveraging keeps a deep copy of the model, which an FSDP2 (ModelParallelStrategy) "
                "model cannot have. Use swa_fast.integrations.lightning.WeightAveraging (its default is the same "
                "equal-weight average, kept as each rank's local shards) with a should_update() for the epochs "
                "to average."
            )
        # A copy of the model before it moves to the accelerator, as Lightning's.
        self._average_model = AveragedModel(pl_module, avg_fn=self._given_avg_fn)

    @staticmethod
    def update_parameters(average_model: Any, model: "pl.LightningModule", n_averaged: Tensor,
                          avg_fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
        """One update of ``average_model``: fused (``AveragedModel.update_parameters``), counting in
        ``n_averaged`` (the callback's count)."""
        if not isinstance(average_model, AveragedModel):
            return _LightningSWA.update_parameters(average_model, model, n_averaged, avg_fn)
        if average_model.n_averaged is not n_averaged:
            average_model.n_averaged = n_averaged  # the callback's count is the one it saves
        average_model.update_parameters(model)

    @staticmethod
    def transfer_weights(src_pl_module: Any, dst_pl_module: "pl.LightningModule") -> None:
        """The averaged parameters into the model (parameters only, as Lightning's)."""
        if isinstance(src_pl_module, AveragedModel):
            src_pl_module = src_pl_module.module
        pairs: Dict[Tuple[torch.device, torch.dtype], Tuple[List[Tensor], List[Tensor]]] = {}
        with torch.no_grad():
            for src, dst in zip(src_pl_module.parameters(), dst_pl_module.parameters()):
                if src.device == dst.device and src.dtype == dst.dtype:
                    dsts, srcs = pairs.setdefault((dst.device, dst.dtype), ([], []))
                    dsts.append(dst.detach())
                    srcs.append(src.detach())
                else:
                    dst.detach().copy_(src.to(dst.device))
            for dsts, srcs in pairs.values():
                torch._foreach_copy_(dsts, srcs)

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        if isinstance(self._average_model, AveragedModel):
            # Keyed as the model's state dict (Lightning's averaged model is a copy of the LightningModule).
            state["average_model_state"] = self._average_model.module.state_dict()
        return state

    def _load_average_model_state(self, model_state: Any) -> None:
        if isinstance(self._average_model, AveragedModel):
            self._average_model.module.load_state_dict(model_state)
        else:
            super()._load_average_model_state(model_state)
