"""The SWAG suite: one collection (mean, second moment, a deviation column with ``max_rank = 20``)
of a model, as ``swa_fast.swag.SWAG.collect`` and as the two ways people write it in torch.

Candidates, in the same interleaved rounds, each in the steady state (the ring already full):

* ``swa_fast_swag``: ``SWAG(model, max_rank=20).collect(model)``: one fused pass (mean, centred
  variance, the deviation written into a preallocated ring column), the weight on the device;
* ``reference_swag``: the reference code's collection (``wjmaddox/swa_gaussian``'s
  ``collect_model``, rewritten here): per parameter, the count read with ``.item()``, the mean and
  the raw second moment as ``mean * n/(n+1) + w/(n+1)``, and the deviation matrix regrown with
  ``torch.cat`` and sliced back to ``max_rank`` rows on every collection;
* ``torch_foreach_swag``: what a careful torch user writes: ``_foreach_lerp_`` for the mean and
  for the raw second moment (of ``_foreach_mul(x, x)``), and ``_foreach_sub`` of the new mean
  into a preallocated ring column; the weight a device tensor, no host sync;
* ``copy``: ``dst.copy_(src)`` of the model's bytes.

Bytes one collection must move per fp32 parameter: the fused pass reads the weight (4), reads
and writes the mean and the variance (16) and writes the deviation (4): 24. The foreach version
moves 12 (mean lerp) + 12 (the square) + 12 (second-moment lerp) + 12 (deviation) = 48.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from swa_fast.swag import SWAG

from benchmarks.cases import Case, make_model, resnet50_shapes
from benchmarks.harness import Candidate, case_facts, case_header, copy_candidate

__all__ = ["CASES", "MAX_RANK", "SPEEDUPS", "build_candidates", "describe", "header_lines"]

MAX_RANK = 20
SPEEDUPS = [("SWAG.collect vs the reference code's", "swa_fast_swag", "reference_swag"),
            ("SWAG.collect vs torch foreach", "swa_fast_swag", "torch_foreach_swag")]


@dataclass(frozen=True)
class SwagCase(Case):
    """A parameter set collected into a SWAG."""


CASES: Dict[str, SwagCase] = {
    "swag_resnet50": SwagCase("swag_resnet50", tuple(resnet50_shapes()),
                              note=f"ResNet-50 parameter set, one SWAG collection (max_rank {MAX_RANK}, ring full)"),
}


class ReferenceSWAG:
    """The reference code's collection, per parameter (see the module docstring)."""

    def __init__(self, params: List[torch.Tensor], max_rank: int) -> None:
        self.max_rank = max_rank
        self.n_models = torch.zeros((), dtype=torch.long)
        self.mean = [torch.zeros_like(p) for p in params]
        self.sq_mean = [torch.zeros_like(p) for p in params]
        self.cov_mat_sqrt = [p.new_zeros((0, p.numel())) for p in params]

    @torch.no_grad()
    def collect(self, params: List[torch.Tensor]) -> None:
        for i, p in enumerate(params):
            n = self.n_models.item()
            self.mean[i] = self.mean[i] * n / (n + 1.0) + p / (n + 1.0)
            self.sq_mean[i] = self.sq_mean[i] * n / (n + 1.0) + p ** 2 / (n + 1.0)
            deviation = (p - self.mean[i]).view(-1, 1)
            grown = torch.cat((self.cov_mat_sqrt[i], deviation.t()), dim=0)
            self.cov_mat_sqrt[i] = grown[1:, :] if n + 1 > self.max_rank else grown
        self.n_models.add_(1)


class ForeachSWAG:
    """Raw moments by ``_foreach_lerp_`` and a preallocated ring (see the module docstring)."""

    def __init__(self, params: List[torch.Tensor], max_rank: int) -> None:
        self.max_rank = max_rank
        self.count = torch.zeros((), dtype=torch.float32, device=params[0].device)
        self.collected = 0
        self.mean = [p.detach().clone() for p in params]
        self.sq_mean = [p.detach() * p.detach() for p in params]
        self.ring = [p.new_zeros((max_rank, *p.shape)) for p in params]

    @torch.no_grad()
    def collect(self, params: List[torch.Tensor]) -> None:
        weight = torch.reciprocal(self.count + 1)
        torch._foreach_lerp_(self.mean, params, weight)
        torch._foreach_lerp_(self.sq_mean, torch._foreach_mul(params, params), weight)
        column = self.collected % self.max_rank
        deviations = torch._foreach_sub(params, self.mean)
        torch._foreach_copy_([ring[column] for ring in self.ring], deviations)
        self.count.add_(1)
        self.collected += 1


def build_candidates(case: SwagCase, device, *, seed: int = 0) -> List[Candidate]:
    device = torch.device(device)
    model = make_model(case, device, seed=seed)
    params = [p.detach() for p in model.parameters()]
    ours = SWAG(model, max_rank=MAX_RANK)
    reference = ReferenceSWAG(params, MAX_RANK)
    foreach = ForeachSWAG(params, MAX_RANK)
    for _ in range(MAX_RANK + 1):  # the steady state: every ring full
        ours.collect(model)
        reference.collect(params)
        foreach.collect(params)
    fused_bytes = case.model_bytes + 4 * case.averaged_bytes + case.averaged_bytes
    foreach_bytes = 4 * 3 * case.model_bytes
    candidates = [
        Candidate("swa_fast_swag", f"swa_fast SWAG.collect(model), max_rank {MAX_RANK}",
                  lambda: ours.collect(model), fused_bytes, "swa_fast"),
        Candidate("reference_swag", "reference collect_model (per tensor, .item(), torch.cat ring)",
                  lambda: reference.collect(params), foreach_bytes, "torch"),
        Candidate("torch_foreach_swag", "torch foreach: lerp mean and E[x^2], ring column copy",
                  lambda: foreach.collect(params), foreach_bytes, "torch"),
        copy_candidate(case.model_bytes, device),
    ]
    with torch.no_grad():  # move the model away from its averages, as training would
        torch._foreach_add_(params, 0.01)
    return candidates


def describe(case: SwagCase) -> dict:
    return case_facts(case, max_rank=MAX_RANK)


def header_lines(case: SwagCase, device_label: str) -> List[str]:
    return case_header(case, device_label)
