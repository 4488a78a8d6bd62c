"""The integrations suite: one training step's averaging with each package's own class and with
swa_fast's drop-in for it (``swa_fast.integrations``), on the ResNet-50 parameter set.

Cases and candidates (every candidate of a case in the same interleaved rounds, plus ``copy``,
``dst.copy_(src)`` of the model's bytes):

* ``timm_resnet50``: ``ModelEmaV3(model, decay=0.9998, use_warmup=True).update(model, step)``,
  timm 1.0.31's own class (``timm/utils/model_ema.py`` loaded by file path: timm itself imports
  torchvision, which this environment does not install) against ``swa_fast.integrations.timm``'s;
* ``timm_bf16_resnet50``: the same with ``dtype=torch.bfloat16`` and stochastic rounding (timm's
  default for bf16 EMAs): half the EMA's memory; and, to show what the stochastic rounding itself
  costs, the op alone on bf16 copies of the EMA (``swa_fast.average_stochastic_``) and
  ``swa_fast.average_`` into an fp32 EMA (the alternative with twice the memory);
* ``diffusers_resnet50``: ``EMAModel(params, decay=0.9999, use_ema_warmup=True).step(params)``,
  diffusers 0.42.1's own (``foreach=False``, its default, and ``foreach=True``) against
  ``swa_fast.integrations.diffusers``'s;
* ``lightning_resnet50``: ``EMAWeightAveraging(decay=0.999)``'s per-step work, the callback's
  ``on_train_batch_end`` with a stand-in trainer whose ``global_step`` advances by one per call
  (pytorch-lightning 2.6.6's own callback, which updates torch's ``AveragedModel``, against
  ``swa_fast.integrations.lightning``'s).

Bytes one update must move per fp32 parameter: read the model and read and write the EMA, 12 (8
with a bf16 EMA). A package that is not installed drops its candidates (the suite then times
swa_fast alone).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.cases import Case, make_model, resnet50_shapes
from benchmarks.harness import Candidate, Steps, case_facts, case_header, copy_candidate, move_model_away

__all__ = ["CASES", "SPEEDUPS", "build_candidates", "describe", "header_lines"]

SPEEDUPS = [
    ("ModelEmaV3 vs timm", "swa_fast_timm", "timm"),
    ("bf16 ModelEmaV3 vs timm", "swa_fast_timm_bf16", "timm_bf16"),
    ("EMAModel vs diffusers", "swa_fast_diffusers", "diffusers"),
    ("EMAModel vs diffusers foreach", "swa_fast_diffusers", "diffusers_foreach"),
    ("EMAWeightAveraging vs Lightning", "swa_fast_lightning", "lightning"),
]


@dataclass(frozen=True)
class IntegrationCase(Case):
    """A parameter set and the package whose averaging class is compared."""

    package: str = ""


CASES: Dict[str, IntegrationCase] = {
    "timm_resnet50": IntegrationCase("timm_resnet50", tuple(resnet50_shapes()), package="timm",
                                     note="ResNet-50 parameter set, timm ModelEmaV3 (fp32 EMA, warm-up, step)"),
    "timm_bf16_resnet50": IntegrationCase("timm_bf16_resnet50", tuple(resnet50_shapes()),
                                          avg_dtype=torch.bfloat16, package="timm_bf16",
                                          note="ResNet-50 parameter set, timm ModelEmaV3 (bf16 EMA, stochastic "
                                               "rounding)"),
    "diffusers_resnet50": IntegrationCase("diffusers_resnet50", tuple(resnet50_shapes()), package="diffusers",
                                          note="ResNet-50 parameter set, diffusers EMAModel (warm-up)"),
    "lightning_resnet50": IntegrationCase("lightning_resnet50", tuple(resnet50_shapes()), package="lightning",
                                          note="ResNet-50 parameter set, Lightning EMAWeightAveraging (decay 0.999)"),
}


def timm_model_ema() -> Optional[ModuleType]:
    """timm's ``timm/utils/model_ema.py`` loaded by its path (it imports only torch), or None."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "model_ema.py"
    if not path.is_file():
        return None
    loaded = importlib.util.spec_from_file_location("_timm_model_ema_for_bench", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


class _Trainer:
    """What the callbacks' ``setup``, ``on_fit_start`` and ``on_train_batch_end`` read of a trainer:
    a single-device strategy and the step (advanced per call)."""

    def __init__(self) -> None:
        self.global_step = 0
        self.current_epoch = 0
        self.strategy = object()


def _timm(case: IntegrationCase, model, bf16: bool) -> List[Candidate]:
    from swa_fast.integrations.timm import ModelEmaV3

    kwargs = dict(decay=0.9998, use_warmup=True)
    if bf16:
        kwargs.update(dtype=torch.bfloat16, stochastic_rounding=True)
    suffix = "_bf16" if bf16 else ""
    what = "bf16 EMA, stochastic rounding" if bf16 else "fp32 EMA"
    steps = Steps()
    ours = ModelEmaV3(model, **kwargs)
    candidates = [Candidate(f"swa_fast_timm{suffix}", f"swa_fast ModelEmaV3.update(model, step), {what}",
                            lambda: ours.update(model, steps.next()), _bytes(case), "swa_fast")]
    module = timm_model_ema()
    if module is not None:
        theirs = module.ModelEmaV3(model, **kwargs)
        their_steps = Steps()
        candidates.append(Candidate(f"timm{suffix}", f"timm ModelEmaV3.update(model, step), {what}",
                                    lambda: theirs.update(model, their_steps.next()), _bytes(case), "torch"))
    if bf16:
        candidates += _rounding_ops(case, model)
    return candidates


def _rounding_ops(case: IntegrationCase, model) -> List[Candidate]:
    """The EMA's update as the bare ops: into a bf16 EMA with stochastic rounding, and into an
    fp32 EMA (what the rounding costs against the plain memory-bound lerp it replaces)."""
    import swa_fast

    params = [p.detach() for p in model.parameters()]
    stochastic = [p.to(torch.bfloat16) for p in params]
    full = [p.clone() for p in params]
    weight = torch.tensor(2e-4, device=params[0].device)
    counter = torch.zeros((), dtype=torch.long, device=params[0].device)

    def stochastic_update() -> None:
        swa_fast.average_stochastic_(stochastic, params, weight, counter, 0)
        counter.add_(1)

    return [Candidate("average_stochastic_bf16", "swa_fast.average_stochastic_ alone (bf16 EMA, fp32 model)",
                      stochastic_update, _bytes(case), "swa_fast"),
            Candidate("average_fp32", "swa_fast.average_ alone (fp32 EMA, fp32 model)",
                      lambda: swa_fast.average_(full, params, weight), 3 * case.model_bytes, "swa_fast")]


def _diffusers(case: IntegrationCase, model) -> List[Candidate]:
    from swa_fast.integrations.diffusers import EMAModel

    params = list(model.parameters())
    ours = EMAModel(params, decay=0.9999, use_ema_warmup=True)
    candidates = [Candidate("swa_fast_diffusers", "swa_fast EMAModel.step(params)", lambda: ours.step(params),
                            _bytes(case), "swa_fast")]
    try:
        from diffusers.training_utils import EMAModel as TheirEMAModel
    except ImportError:
        return candidates
    for foreach in (False, True):
        theirs = TheirEMAModel(params, decay=0.9999, use_ema_warmup=True, foreach=foreach)
        key = "diffusers_foreach" if foreach else "diffusers"
        candidates.append(Candidate(key, f"diffusers EMAModel(foreach={foreach}).step(params)",
                                    lambda theirs=theirs: theirs.step(params), _bytes(case), "torch"))
    return candidates


def _lightning(case: IntegrationCase, model) -> List[Candidate]:
    from swa_fast.integrations import lightning as ours

    class Module(ours.pl.LightningModule):
        """The parameter set as a LightningModule (what the callbacks are given)."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

    module = Module(model)
    candidates = []
    for key, cls, kind in (("swa_fast_lightning", ours.EMAWeightAveraging, "swa_fast"),
                           ("lightning", ours.pl.callbacks.EMAWeightAveraging, "torch")):
        callback = cls(decay=0.999, use_buffers=True)
        trainer = _Trainer()
        callback.setup(trainer, module, "fit")
        callback.on_fit_start(trainer, module)
        who = "swa_fast" if kind == "swa_fast" else "Lightning"
        candidates.append(Candidate(key, f"{who} EMAWeightAveraging.on_train_batch_end",
                                    _batch_end(callback, trainer, module), _bytes(case), kind))
    return candidates


def _batch_end(callback, trainer: _Trainer, model) -> Callable[[], None]:
    def step() -> None:
        trainer.global_step += 1
        callback.on_train_batch_end(trainer, model, None, None, 0)
    return step


def _bytes(case: IntegrationCase) -> int:
    return case.model_bytes + 2 * case.averaged_bytes


BUILDERS = {"timm": lambda case, model: _timm(case, model, bf16=False),
            "timm_bf16": lambda case, model: _timm(case, model, bf16=True),
            "diffusers": _diffusers, "lightning": _lightning}


def build_candidates(case: IntegrationCase, device, *, seed: int = 0) -> List[Candidate]:
    device = torch.device(device)
    model = make_model(case, device, seed=seed)
    candidates = BUILDERS[case.package](case, model)
    for candidate in candidates:  # the first update (a copy for some): done before timing
        candidate.fn()
    candidates.append(copy_candidate(case.model_bytes, device))
    move_model_away(model)
    return candidates


def describe(case: IntegrationCase) -> dict:
    return case_facts(case, package=case.package)


def header_lines(case: IntegrationCase, device_label: str) -> List[str]:
    return case_header(case, device_label)
