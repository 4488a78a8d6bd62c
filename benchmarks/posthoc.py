"""The post-hoc EMA suite: two power-function EMA profiles of one model, updated every step, as
``swa_fast.posthoc.PowerFunctionEMA`` (one fused pass, weights on the device) and as lucidrains'
``ema_pytorch.PostHocEMA`` (0.8.3, a development dependency: one ``KarrasEMA`` per profile, each a
per-parameter ``lerp_`` loop, beta computed on the host from ``step.item()``).

Candidates, in the same interleaved rounds:

* ``swa_fast_power_ema``: ``PowerFunctionEMA(model, stds=(0.05, 0.10)).update(model, step)``;
* ``ema_pytorch_posthoc``: ``PostHocEMA(model, sigma_rels=(0.05, 0.10), update_every=1,
  checkpoint_every_num_steps="manual").update()`` (no snapshot written while timing);
* ``copy``: ``dst.copy_(src)`` of the model's bytes.

Bytes an update must move per fp32 parameter: one fused pass reads the model once and reads and
writes both profiles (4 + 2 x 8 = 20); two separate profiles read the model twice (2 x 12 = 24).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Dict, List

import torch

from swa_fast.posthoc import PowerFunctionEMA

from benchmarks.cases import Case, make_model, resnet50_shapes
from benchmarks.harness import Candidate, Steps, case_facts, case_header, copy_candidate, move_model_away

__all__ = ["CASES", "SPEEDUPS", "build_candidates", "describe", "header_lines"]

STDS = (0.05, 0.10)
SPEEDUPS = [("PowerFunctionEMA vs ema-pytorch PostHocEMA", "swa_fast_power_ema", "ema_pytorch_posthoc")]


@dataclass(frozen=True)
class PosthocCase(Case):
    """A parameter set whose two power-function profiles are updated."""


CASES: Dict[str, PosthocCase] = {
    "posthoc_resnet50": PosthocCase("posthoc_resnet50", tuple(resnet50_shapes()),
                                    note="ResNet-50 parameter set, two power-function EMA profiles (stds 0.05, 0.10)"),
}


def build_candidates(case: PosthocCase, device, *, seed: int = 0) -> List[Candidate]:
    device = torch.device(device)
    model = make_model(case, device, seed=seed)
    fused_bytes = case.model_bytes + 2 * 2 * case.averaged_bytes
    separate_bytes = 2 * 3 * case.model_bytes
    ours = PowerFunctionEMA(model, stds=STDS, use_buffers=False)
    steps = Steps()
    ours.update(model, steps.next())  # the first update copies: done before timing
    candidates = [Candidate("swa_fast_power_ema", "swa_fast PowerFunctionEMA.update(model, step), 2 profiles",
                            lambda: ours.update(model, steps.next()), fused_bytes, "swa_fast")]
    try:
        from ema_pytorch import PostHocEMA
    except ImportError:  # a development dependency: without it, the suite times swa_fast alone
        PostHocEMA = None
    if PostHocEMA is not None:
        folder = tempfile.mkdtemp(prefix="swa_fast-posthoc-bench-")
        theirs = PostHocEMA(model, sigma_rels=STDS, update_every=1, checkpoint_every_num_steps="manual",
                            checkpoint_folder=folder, checkpoint_dtype=torch.float32)
        theirs.update()
        candidates.append(Candidate("ema_pytorch_posthoc", "ema-pytorch PostHocEMA.update(), 2 profiles",
                                    theirs.update, separate_bytes, "torch"))
    candidates.append(copy_candidate(case.model_bytes, device))
    move_model_away(model)
    return candidates


def describe(case: PosthocCase) -> dict:
    return case_facts(case, stds=list(STDS))


def header_lines(case: PosthocCase, device_label: str) -> List[str]:
    return case_header(case, device_label)
