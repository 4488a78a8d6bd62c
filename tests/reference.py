"""Pure-torch references the kernels are checked against."""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor


def lerp_reference(averaged: Tensor, current: Tensor, weight: float) -> Tensor:
    """lerp(averaged, current, weight) in float64, rounded once to averaged's dtype.

    Integer tensors are copied, as the ops do.
    """
    if not averaged.is_floating_point():
        return current.clone()
    if weight == 1.0:
        return current.to(averaged.dtype)
    a, b = averaged.double(), current.double()
    return (a + weight * (b - a)).to(averaged.dtype)


def torch_lerp(averaged: Tensor, current: Tensor, weight: float) -> Tensor:
    """torch's own lerp (what torch.optim.swa_utils' foreach paths compute)."""
    result = averaged.clone()
    torch._foreach_lerp_([result], [current], weight)
    return result


def moments_reference(mean: Tensor, sq_mean: Tensor, current: Tensor, weight: float) -> List[Tensor]:
    """``mean.lerp_(x, w); sq_mean.lerp_(x * x, w)`` in the arithmetic type (fp32,
    fp64 for fp64; x * x rounded there), each result rounded once to mean's dtype."""
    opmath = torch.float64 if mean.dtype == torch.float64 else torch.float32
    x = current.to(opmath)
    new_mean, new_sq = mean.to(opmath), sq_mean.to(opmath)
    if weight == 1.0:
        return [x.to(mean.dtype), (x * x).to(mean.dtype)]
    torch._foreach_lerp_([new_mean, new_sq], [x, x * x], weight)
    return [new_mean.to(mean.dtype), new_sq.to(mean.dtype)]
