"""Functional ghost batch normalization, the counterpart of ``F.batch_norm``."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from swa_fast.ops import ghost_bn as _ghost_bn_op  # noqa: F401  (registers the fake kernels and autograd)

STATS_MODES = ("per_ghost", "averaged")


def check_ghost_batch_size(ghost_batch_size) -> int:
    """``ghost_batch_size`` as an int, or a ValueError that says what is wrong with it."""
    if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int) or ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be a positive int (samples per ghost batch), got {ghost_batch_size!r}")
    return ghost_batch_size


def check_stats_mode(stats_mode: str) -> str:
    if stats_mode not in STATS_MODES:
        raise ValueError(f"stats_mode must be one of {STATS_MODES}, got {stats_mode!r}")
    return stats_mode


def ghost_batch_norm(
    input: Tensor,
    ghost_batch_size: int,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Optional[Tensor] = None,
    stats_mode: str = "per_ghost",
) -> Tensor:
    """Ghost batch normalization of ``input`` (N, C, *), like ``F.batch_norm`` with ghosts.

    With ``training`` (or without running statistics), the batch is split into
    contiguous ghost batches of ``ghost_batch_size`` samples along N (the last
    one smaller when N is not a multiple) and each is normalized with its own
    biased mean and variance, then ``weight``/``bias``. The running statistics,
    when given and ``training``, are updated in place on the device:

    * ``stats_mode="per_ghost"``: one momentum step per ghost, in order, exactly
      what ``F.batch_norm`` applied to each chunk in turn would leave (unbiased
      variance stored); ``num_batches_tracked`` advances by the number of ghosts.
    * ``stats_mode="averaged"``: one momentum step per call with the
      ghost-size-weighted mean of the ghosts' means and unbiased variances
      (Keras' ``virtual_batch_size``); ``num_batches_tracked`` advances by 1.

    ``momentum=None`` is the cumulative average (factor ``1/num_batches_tracked``,
    each ghost (or call) counting once) and needs ``num_batches_tracked``.
    Without ``training`` and with running statistics, this is exactly
    ``F.batch_norm(..., training=False)``.
    """
    check_ghost_batch_size(ghost_batch_size)
    check_stats_mode(stats_mode)
    if (running_mean is None) != (running_var is None):
        raise ValueError("ghost_batch_norm: pass both running_mean and running_var, or neither")
    if not training and running_mean is not None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    output, mean, var = torch.ops.swa_fast.ghost_batch_norm(input, weight, bias, ghost_batch_size, float(eps))
    if training and running_mean is not None:
        if num_batches_tracked is None:
            if momentum is None:
                raise ValueError("ghost_batch_norm: momentum=None (cumulative average) needs num_batches_tracked")
            num_batches_tracked = torch.zeros((), dtype=torch.long, device=mean.device)
        torch.ops.swa_fast.ghost_batch_norm_update_stats_(
            running_mean,
            running_var,
            num_batches_tracked,
            mean,
            var,
            input.shape[0],
            ghost_batch_size,
            math.prod(input.shape[2:]),
            None if momentum is None else float(momentum),
            stats_mode == "averaged",
        )
    return output
