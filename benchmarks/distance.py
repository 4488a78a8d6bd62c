"""The weight-distance suite: ``torch._foreach_*`` and a per-tensor loop vs ``swa_fast.distance``.

Per case (a parameter set from :mod:`benchmarks.cases`: the model's current
weights ``a`` and a snapshot ``b``, e.g. w_0), in one process, every candidate
computes the per-tensor L2 norms of ``a[i] - b[i]`` and the total:

* ``torch_foreach``: ``per = torch._foreach_norm(torch._foreach_sub(a, b))``, total
  ``torch.linalg.vector_norm(torch.stack(per))`` (the sub writes a temporary
  copy of the weights that the norm then reads again).
* ``torch_loop``: ``per = [(x - y).norm() for x, y in zip(a, b)]``, total as above.
* ``swa_fast_distance``: ``swa_fast.distance.distance_norms(a, b)`` (the fused op,
  one read of each input).
* ``copy``: ``dst.copy_(src)`` of a buffer half the size of ``a`` plus ``b``, so
  that it moves as many bytes as a distance pass reads.

For the mixed case (a bf16 model against an fp32 snapshot), the torch
candidates let type promotion subtract in fp32, as the op does.

Effective GB/s counts the bytes a distance pass must read, ``bytes(a) +
bytes(b)`` (the op writes only ``len(a) + 1`` numbers); the copy moves the same
count (read plus write), so "% of copy" is the op's rate against the
memory bandwidth measured in the same rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from swa_fast.distance import distance_norms

from benchmarks.cases import Case, gpt_shapes, make_model, resnet50_shapes
from benchmarks.harness import Candidate, copy_candidate, dtype_name

__all__ = ["CASES", "SPEEDUPS", "build_candidates", "describe", "header_lines"]

# (speedup name, candidate, baseline); a pair is reported when both ran.
SPEEDUPS = [
    ("distance vs _foreach_norm(_foreach_sub)", "swa_fast_distance", "torch_foreach"),
    ("distance vs per-tensor loop", "swa_fast_distance", "torch_loop"),
]

# How far the weights have moved from the snapshot (values are N(0, 0.02^2)).
DRIFT = 0.01


@dataclass(frozen=True)
class DistanceCase(Case):
    """A parameter set with the model's dtype (``a``) and the snapshot's (``b``): the
    snapshot plays the part the averages play in :class:`benchmarks.cases.Case`."""

    @property
    def ref_dtype(self) -> torch.dtype:
        return self.averaged_dtype

    @property
    def ref_bytes(self) -> int:
        return self.averaged_bytes

    @property
    def read_bytes(self) -> int:
        """What one distance pass must read: both lists once."""
        return self.model_bytes + self.ref_bytes


def _build_cases() -> Dict[str, DistanceCase]:
    resnet = tuple(resnet50_shapes())
    transformer = tuple(gpt_shapes(24, 512))
    billion = tuple(gpt_shapes(48, 1280))
    cases = [
        DistanceCase("distance_resnet50", resnet, note="ResNet-50 parameters vs an fp32 snapshot, fp32"),
        DistanceCase("distance_transformer", transformer,
                     note="GPT-2-style 24 x 512 decoder parameters vs an fp32 snapshot, fp32"),
        DistanceCase("distance_resnet50_bf16_vs_fp32", resnet, torch.bfloat16, torch.float32,
                     note="ResNet-50, bf16 model vs an fp32 snapshot (the tracker's default snapshot dtype)"),
        DistanceCase("distance_billion", billion, gpu_only=True,
                     note="GPT-2-style 48 x 1280 decoder (~1.01B parameters) vs an fp32 snapshot, fp32"),
    ]
    return {case.name: case for case in cases}


CASES: Dict[str, DistanceCase] = _build_cases()


def _total(per_tensor: List[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(per_tensor))


def build_candidates(case: DistanceCase, device, *, seed: int = 0) -> List[Candidate]:
    """Every candidate for ``case`` on ``device``: the weights ``a`` and a snapshot ``b`` a little apart."""
    device = torch.device(device)
    a = [p.detach() for p in make_model(case, device, dtype=case.dtype, seed=seed).parameters()]
    b = [x.to(case.ref_dtype, copy=True) for x in a]
    with torch.no_grad():
        torch._foreach_add_(a, DRIFT)  # the weights moved away from the snapshot
    mixed = case.dtype != case.ref_dtype
    suffix = f" [{dtype_name(case.dtype)} vs {dtype_name(case.ref_dtype)}]" if mixed else ""
    read = case.read_bytes

    def foreach() -> None:
        _total(torch._foreach_norm(torch._foreach_sub(a, b)))

    def loop() -> None:
        _total([(x - y).norm() for x, y in zip(a, b)])

    def fused() -> None:
        distance_norms(a, b)

    return [
        Candidate("torch_foreach", f"torch._foreach_norm(_foreach_sub(a, b)) + stack norm{suffix}", foreach, read,
                  "torch"),
        Candidate("torch_loop", f"[(x - y).norm() for x, y in zip(a, b)] + stack norm{suffix}", loop, read, "torch"),
        Candidate("swa_fast_distance", f"swa_fast distance_norms(a, b){suffix}", fused, read, "swa_fast"),
        copy_candidate(read // 2, device),
    ]


def describe(case: DistanceCase) -> dict:
    """The case's facts stored beside its timings in the JSON."""
    return {
        "note": case.note,
        "num_tensors": case.num_tensors,
        "num_params": case.num_params,
        "model_dtype": dtype_name(case.dtype),
        "ref_dtype": dtype_name(case.ref_dtype),
        "model_bytes": case.model_bytes,
        "ref_bytes": case.ref_bytes,
        "read_bytes": case.read_bytes,
    }


def header_lines(case: DistanceCase, device_label: str) -> List[str]:
    mb = 1e6
    return [
        f"== {case.name}: {case.note}",
        f"   {case.num_tensors} tensors, {case.num_params:,} parameters; model {case.model_bytes / mb:.1f} MB "
        f"{dtype_name(case.dtype)}, snapshot {case.ref_bytes / mb:.1f} MB {dtype_name(case.ref_dtype)}; "
        f"{device_label}",
    ]
