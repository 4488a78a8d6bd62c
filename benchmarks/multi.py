"""The several-averages suite: K EMAs of one model, as K torch ``AveragedModel``s, as K
``swa_fast.WeightAverage``s, and as one ``swa_fast.MultiAverage`` (one fused pass).

Per case (a parameter set from :mod:`benchmarks.cases` and a K), in one process, every
candidate keeps K EMAs (decays 0.999, 0.9995, 0.9998, 0.9999) of the same fp32 model:

* ``torch_emas``: K ``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d))``,
  each ``update_parameters(model)`` (torch's ``_foreach_lerp_``);
* ``weight_averages``: K ``swa_fast.WeightAverage(model, get_ema_multi_avg_fn(d))``, each ``update(model)``;
* ``multi_average``: one ``swa_fast.MultiAverage(model, {name: get_ema_multi_avg_fn(d)})``,
  ``update(model)``: one ``multi_average_`` pass;
* ``copy``: ``dst.copy_(src)`` of the model's bytes (the bandwidth measured in the same rounds).

Bytes an update must move, per fp32 parameter: K separate averages read the model K times and
read and write each average (12 K); one fused pass reads the model once (4 + 8 K). Their ratio,
``12 K / (4 + 8 K)``, is what a memory-bound fused pass can gain (1, 1.2, 1.29, 1.33 for K = 1..4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torch.optim import swa_utils as torch_swa_utils

from swa_fast import MultiAverage, WeightAverage
from swa_fast.swa_utils import get_ema_multi_avg_fn

from benchmarks.cases import Case, gpt_shapes, make_model, resnet50_shapes
from benchmarks.harness import Candidate, case_facts, case_header, copy_candidate, move_model_away

__all__ = ["CASES", "SPEEDUPS", "build_candidates", "byte_ratio", "describe", "header_lines"]

DECAYS = (0.999, 0.9995, 0.9998, 0.9999)

SPEEDUPS = [
    ("MultiAverage vs K WeightAverages", "multi_average", "weight_averages"),
    ("MultiAverage vs K torch AveragedModel EMAs", "multi_average", "torch_emas"),
]


@dataclass(frozen=True)
class MultiCase(Case):
    """A parameter set and the number of averages kept of it."""

    k: int = 1


def byte_ratio(k: int) -> float:
    """Bytes of K separate updates over bytes of one fused pass: 12 K / (4 + 8 K) for fp32."""
    return 12 * k / (4 + 8 * k)


def _build_cases() -> Dict[str, MultiCase]:
    sets = {"resnet50": ("ResNet-50 parameter set", tuple(resnet50_shapes())),
            "transformer": ("24-layer GPT-2-style set (see benchmarks/cases.py)", tuple(gpt_shapes(24, 512)))}
    cases = {}
    for set_name, (note, shapes) in sets.items():
        for k in range(1, len(DECAYS) + 1):
            name = f"multi_{set_name}_k{k}"
            cases[name] = MultiCase(name, shapes, note=f"{note}, {k} EMA(s)", k=k)
    return cases


CASES: Dict[str, MultiCase] = _build_cases()


def build_candidates(case: MultiCase, device, *, seed: int = 0) -> List[Candidate]:
    """Every candidate for ``case`` on ``device``, each past its first (copy) update."""
    device = torch.device(device)
    model = make_model(case, device, seed=seed)
    decays = DECAYS[:case.k]
    separate_bytes = 3 * case.k * case.model_bytes
    fused_bytes = case.model_bytes + 2 * case.k * case.averaged_bytes

    torch_emas = [torch_swa_utils.AveragedModel(model, multi_avg_fn=torch_swa_utils.get_ema_multi_avg_fn(d))
                  for d in decays]
    averages = [WeightAverage(model, get_ema_multi_avg_fn(d)) for d in decays]
    multi = MultiAverage(model, {f"ema_{d}": get_ema_multi_avg_fn(d) for d in decays})
    for average in torch_emas:
        average.update_parameters(model)  # the first update copies: done before timing
    for average in averages:
        average.update(model)
    multi.update(model)

    def update_torch() -> None:
        for average in torch_emas:
            average.update_parameters(model)

    def update_separately() -> None:
        for average in averages:
            average.update(model)

    candidates = [
        Candidate("torch_emas", f"{case.k} torch AveragedModel EMA(s) (_foreach_lerp_)", update_torch,
                  separate_bytes, "torch"),
        Candidate("weight_averages", f"{case.k} swa_fast WeightAverage EMA(s)", update_separately,
                  separate_bytes, "swa_fast"),
        Candidate("multi_average", f"swa_fast MultiAverage of {case.k} EMA(s) (one pass)", lambda: multi.update(model),
                  fused_bytes, "swa_fast"),
        copy_candidate(case.model_bytes, device),
    ]
    move_model_away(model)
    return candidates


def describe(case: MultiCase) -> dict:
    """The case's facts stored beside its timings in the JSON."""
    return case_facts(case, k=case.k, byte_ratio=byte_ratio(case.k), decays=list(DECAYS[:case.k]))


def header_lines(case: MultiCase, device_label: str) -> List[str]:
    return case_header(case, device_label, f"K = {case.k}; byte-count ratio 12K/(4+8K) = {byte_ratio(case.k):.3f}")
