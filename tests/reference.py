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


def ghost_chunk_loop(
    x: Tensor,
    ghost_batch_size: int,
    weight=None,
    bias=None,
    running_mean=None,
    running_var=None,
    num_batches_tracked=None,
    momentum=0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Ghost batch norm as the paper's code does it: ``F.batch_norm`` on each chunk of
    ``ghost_batch_size`` samples in turn (training mode), running statistics and
    ``num_batches_tracked`` updated in place per chunk the way ``nn.BatchNorm`` does
    (``momentum=None``: factor ``1 / num_batches_tracked``)."""
    outputs = []
    for chunk in x.split(ghost_batch_size):
        factor = 0.0 if momentum is None else momentum
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:
                factor = 1.0 / float(num_batches_tracked)
        outputs.append(torch.nn.functional.batch_norm(chunk, running_mean, running_var, weight, bias, True, factor, eps))
    return torch.cat(outputs)


def ghost_averaged_stats_step(x: Tensor, ghost_batch_size: int, running_mean, running_var, num_batches_tracked,
                              momentum=0.1) -> None:
    """The ``stats_mode="averaged"`` running-statistics update, in float64: one step with the
    ghost-size-weighted mean of the ghosts' means and unbiased variances."""
    dims = [0, *range(2, x.dim())]
    chunks = x.double().split(ghost_batch_size)
    sizes = torch.tensor([c.shape[0] for c in chunks], dtype=torch.float64)
    means = torch.stack([c.mean(dims) for c in chunks])
    variances = torch.stack([c.var(dims, unbiased=True) for c in chunks])
    mean = (sizes[:, None] * means).sum(0) / sizes.sum()
    var = (sizes[:, None] * variances).sum(0) / sizes.sum()
    num_batches_tracked.add_(1)
    factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    running_mean.copy_((1 - factor) * running_mean.double() + factor * mean)
    running_var.copy_((1 - factor) * running_var.double() + factor * var)
