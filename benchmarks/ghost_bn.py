"""The ghost batch norm suite: forward + backward of one layer, swa_fast vs what users write today.

Per case (an activation shape and a ghost size), every candidate computes the
training-mode output and the gradients of input, weight and bias
(``torch.autograd.grad``, so nothing accumulates between calls) for the same
input and output gradient:

* ``batchnorm``: ``nn.BatchNorm*d`` on the whole batch (one set of statistics).
  Ghost BN moves the same bytes, so this is the floor to meet.
* ``chunk_loop``: ``torch.cat([bn(c) for c in x.split(ghost)])``, the usual
  implementation (the paper's code, tabnet): 2 kernels per ghost per layer
  forward and more backward.
* ``reshape_trick``: folds the ghosts into channels,
  ``x.view(G, g, C, *S).transpose(0, 1).reshape(g, G*C, *S)``, normalizes that
  with ``F.batch_norm`` (no affine), unfolds, then applies weight/bias: one
  normalization kernel but two transposing copies (needs N divisible by g).
* ``swa_fast``: ``swa_fast.nn.GhostBatchNorm*d`` (running statistics updated too).
* ``copy``: ``dst.copy_(src)`` of the activation's bytes.

Effective GB/s counts the traffic of a two-pass forward and backward,
``8 x activation bytes``: forward reads x for the statistics, then reads x and
writes y; backward reads dy and x for the per-ghost sums, then reads dy and x
and writes dx.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from swa_fast.nn import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d

from benchmarks.harness import Candidate, copy_candidate, dtype_name

__all__ = ["CASES", "SPEEDUPS", "GhostCase", "build_candidates", "describe", "header_lines"]

SPEEDUPS = [
    ("swa_fast vs chunk loop", "swa_fast", "chunk_loop"),
    ("swa_fast vs reshape trick", "swa_fast", "reshape_trick"),
    ("swa_fast vs whole-batch BatchNorm (>1: faster than the floor)", "swa_fast", "batchnorm"),
]


@dataclass(frozen=True)
class GhostCase:
    name: str
    shape: Tuple[int, ...]  # (N, C, *spatial)
    ghost_batch_size: int
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    gpu_only: bool = False
    note: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def activation_bytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def num_ghosts(self) -> int:
        return -(-self.shape[0] // self.ghost_batch_size)

    def applies_to(self, device: str) -> bool:
        return not self.gpu_only or torch.device(device).type == "cuda"


def _build_cases() -> Dict[str, GhostCase]:
    cases = [
        GhostCase("gbn_n256_c64_32x32_g32", (256, 64, 32, 32), 32, note="ResNet-style CIFAR activation, 8 ghosts"),
        GhostCase("gbn_n2048_c64_32x32_g128", (2048, 64, 32, 32), 128,
                  note="large batch of CIFAR activations, 16 ghosts (the paper's setting)"),
        GhostCase("gbn_n4096_c512_g128", (4096, 512), 128, note="MLP features (BatchNorm1d), 32 ghosts"),
        GhostCase("gbn_n2048_c64_32x32_g128_channels_last", (2048, 64, 32, 32), 128, channels_last=True,
                  gpu_only=True, note="the N=2048 case in channels_last"),
        GhostCase("gbn_n2048_c64_32x32_g128_bf16", (2048, 64, 32, 32), 128, dtype=torch.bfloat16, gpu_only=True,
                  note="the N=2048 case, bf16 activations with fp32 parameters (AMP)"),
    ]
    return {case.name: case for case in cases}


CASES: Dict[str, GhostCase] = _build_cases()

_PLAIN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_GHOST = {2: GhostBatchNorm1d, 3: GhostBatchNorm1d, 4: GhostBatchNorm2d, 5: GhostBatchNorm3d}


def _make_activation(case: GhostCase, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(case.shape, generator=generator, device=device, dtype=torch.float32).to(case.dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _fwd_bwd(forward, x: torch.Tensor, params, grad_output: torch.Tensor):
    """One training step of a layer: output, then the gradients of x and the parameters."""

    def step() -> None:
        out = forward(x)
        torch.autograd.grad(out, [x, *params], grad_output)

    return step


def _reshape_trick(case: GhostCase, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    n, c, *spatial = case.shape
    g = case.ghost_batch_size
    ghosts = n // g
    affine_shape = (1, c) + (1,) * len(spatial)

    def forward(x: torch.Tensor) -> torch.Tensor:
        folded = x.view(ghosts, g, c, *spatial).transpose(0, 1).reshape(g, ghosts * c, *spatial)
        normalized = F.batch_norm(folded, None, None, None, None, True, 0.0, eps)
        unfolded = normalized.view(g, ghosts, c, *spatial).transpose(0, 1).reshape(n, c, *spatial)
        return unfolded * weight.view(affine_shape) + bias.view(affine_shape)

    return forward


def build_candidates(case: GhostCase, device, *, seed: int = 0) -> List[Candidate]:
    """Every candidate for ``case`` on ``device``, all on the same input and output gradient."""
    device = torch.device(device)
    channels, dims = case.shape[1], len(case.shape)
    x = _make_activation(case, device, seed).requires_grad_()
    grad_output = _make_activation(case, device, seed + 1)
    traffic = 8 * case.activation_bytes
    candidates: List[Candidate] = []

    plain = _PLAIN[dims](channels, device=device)
    candidates.append(Candidate("batchnorm", f"nn.{type(plain).__name__} on the whole batch",
                                _fwd_bwd(plain, x, [plain.weight, plain.bias], grad_output), traffic, "torch"))

    chunk_bn = _PLAIN[dims](channels, device=device)
    candidates.append(Candidate(
        "chunk_loop", f"torch.cat([bn(c) for c in x.split({case.ghost_batch_size})])",
        _fwd_bwd(lambda t: torch.cat([chunk_bn(c) for c in t.split(case.ghost_batch_size)]), x,
                 [chunk_bn.weight, chunk_bn.bias], grad_output),
        traffic, "torch"))

    if case.shape[0] % case.ghost_batch_size == 0:
        weight = torch.ones(channels, device=device, requires_grad=True)
        bias = torch.zeros(channels, device=device, requires_grad=True)
        candidates.append(Candidate(
            "reshape_trick", "reshape trick: ghosts folded into channels, F.batch_norm, unfold, affine",
            _fwd_bwd(_reshape_trick(case, weight, bias, 1e-5), x, [weight, bias], grad_output), traffic, "torch"))

    ghost = _GHOST[dims](channels, case.ghost_batch_size, device=device)
    candidates.append(Candidate("swa_fast", f"swa_fast.nn.{type(ghost).__name__}(ghost_batch_size={case.ghost_batch_size})",
                                _fwd_bwd(ghost, x, [ghost.weight, ghost.bias], grad_output), traffic, "swa_fast"))

    candidates.append(copy_candidate(case.activation_bytes, device))
    return candidates


def describe(case: GhostCase) -> dict:
    return {
        "note": case.note,
        "shape": list(case.shape),
        "ghost_batch_size": case.ghost_batch_size,
        "num_ghosts": case.num_ghosts,
        "dtype": dtype_name(case.dtype),
        "memory_format": "channels_last" if case.channels_last else "contiguous",
        "activation_bytes": case.activation_bytes,
        "bytes_counted": "8 x activation bytes per forward + backward",
    }


def header_lines(case: GhostCase, device_label: str) -> List[str]:
    layout = ", channels_last" if case.channels_last else ""
    return [
        f"== {case.name}: {case.note}",
        f"   input {tuple(case.shape)} {dtype_name(case.dtype)}{layout}, ghosts of {case.ghost_batch_size} "
        f"({case.num_ghosts} ghosts), {case.activation_bytes / 1e6:.1f} MB; forward + backward; {device_label}",
    ]
