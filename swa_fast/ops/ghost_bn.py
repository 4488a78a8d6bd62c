"""Fake kernels and autograd for the ghost batch norm ops in ``torch.ops.swa_fast``.

Their schemas and checks are ``csrc/ghost_bn_args.{h,cpp}``; their kernels
``csrc/cpu/ghost_bn_cpu.cpp`` and ``csrc/cuda/ghost_bn_cuda.cu``.
``ghost_batch_norm`` is differentiable through ``torch.library.register_autograd``:
its backward is the fused ``ghost_batch_norm_backward`` op, or, when the
backward itself must be differentiable (``create_graph=True``: double
backward), the same gradients as torch expressions. Its mean/var outputs are
statistics, not differentiable. ``ghost_batch_norm_update_stats_`` mutates
buffers and has no gradient (csrc/inplace.h: torch's in-place rules).
"""

from __future__ import annotations

import torch
from torch import Tensor

from swa_fast.ops import _C


def _is_static(*values) -> bool:
    """True when no size, stride or integer is symbolic (the C++ checks read concrete metadata;
    under dynamic shapes the fake kernels check in Python what they can)."""
    for value in values:
        if isinstance(value, Tensor):
            if any(isinstance(s, torch.SymInt) for s in (*value.shape, *value.stride())):
                return False
        elif isinstance(value, (torch.SymInt, torch.SymFloat)):
            return False
    return True


_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}
_DTYPES = {"Float": torch.float32, "Double": torch.float64}


def _layout_facts(input: Tensor, weight, bias, ghost_batch_size, eps):
    """(num_ghosts, channels, output memory format, statistics dtype): from the C++ checks
    when the shapes are concrete. Under symbolic shapes the C++ code cannot run, and this is
    the one place that restates its rules (csrc/ghost_bn_args.cpp: ghost_memory_format,
    ghost_stats_dtype, num_ghosts) in Python, for the fake tensors' metadata."""
    if _is_static(input, weight, bias, ghost_batch_size):
        ghosts, channels, fmt, dtype = _C.validate_ghost_batch_norm_args(input, weight, bias, ghost_batch_size, eps)
        return ghosts, channels, _FORMATS[fmt], _DTYPES[dtype]
    torch._check(ghost_batch_size >= 1, lambda: "ghost_batch_size must be a positive number of samples")
    if input.is_contiguous():
        fmt = torch.contiguous_format
    elif input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    elif input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        fmt = torch.channels_last_3d
    else:
        fmt = torch.contiguous_format
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    ghosts = torch.sym_max(1, (input.shape[0] + ghost_batch_size - 1) // ghost_batch_size)  # N = 0: one empty ghost
    return ghosts, input.shape[1], fmt, dtype


@torch.library.register_fake("swa_fast::ghost_batch_norm")
def _ghost_batch_norm_fake(input, weight, bias, ghost_batch_size, eps):
    ghosts, channels, fmt, dtype = _layout_facts(input, weight, bias, ghost_batch_size, eps)
    output = torch.empty_like(input, memory_format=fmt)
    mean = input.new_empty((ghosts, channels), dtype=dtype)
    return output, mean, torch.empty_like(mean)


@torch.library.register_fake("swa_fast::ghost_batch_norm_backward")
def _ghost_batch_norm_backward_fake(grad_output, input, weight, mean, var, ghost_batch_size, eps, compute_grad_input):
    if _is_static(grad_output, input, weight, mean, var, ghost_batch_size):
        _C.validate_ghost_batch_norm_backward_args(grad_output, input, weight, mean, var, ghost_batch_size, eps)
    _ghosts, _channels, fmt, _dtype = _layout_facts(input, weight, None, ghost_batch_size, eps)
    grad_input = torch.empty_like(input, memory_format=fmt) if compute_grad_input else input.new_empty((0,))
    param = weight if weight is not None else mean
    grad_weight = param.new_empty((input.shape[1],))
    return grad_input, grad_weight, torch.empty_like(grad_weight)


@torch.library.register_fake("swa_fast::ghost_batch_norm_update_stats_")
def _update_stats_fake(
    running_mean, running_var, num_batches_tracked, mean, var, batch_size, ghost_batch_size, sample_numel,
    momentum, average_ghosts,
) -> None:
    if _is_static(running_mean, running_var, mean, var, batch_size, ghost_batch_size, sample_numel):
        _C.validate_ghost_update_stats_args(
            running_mean, running_var, num_batches_tracked, mean, var, batch_size, ghost_batch_size, sample_numel,
            momentum,
        )


def _setup_context(ctx, inputs, output) -> None:
    input, weight, _bias, ghost_batch_size, eps = inputs
    _output, mean, var = output
    ctx.save_for_backward(input, weight, mean, var)
    ctx.ghost_batch_size = ghost_batch_size
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, var)


def _differentiable_gradients(grad_output, input, weight, ghost_batch_size, eps, needs):
    """The gradients as differentiable torch expressions, for ``create_graph=True`` (gradient
    penalties, Hessian-vector products, MAML): the forward is recomputed with torch ops, one
    chunk per ghost with its own biased statistics, and differentiated with
    ``create_graph=True``, so second and higher derivatives are exact. Slower than the fused
    backward, which runs whenever no graph of the backward is asked for."""
    dims = [0, *range(2, input.dim())]
    channel_shape = [1, -1] + [1] * (input.dim() - 2)
    with torch.enable_grad():
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        pieces = []
        for chunk in x.split(ghost_batch_size):
            mean = chunk.mean(dims, keepdim=True)
            var = chunk.var(dims, unbiased=False, keepdim=True)
            pieces.append((chunk - mean) * torch.rsqrt(var + eps))
        normalized = torch.cat(pieces)
        output = normalized * weight.view(channel_shape) if weight is not None else normalized
        targets = [t for t, need in ((input, needs[0]), (weight, needs[1])) if need]
        grads = list(torch.autograd.grad(output, targets, grad_output.to(output.dtype), create_graph=True))
    grad_input = grads.pop(0) if needs[0] else None
    grad_weight = grads.pop(0) if needs[1] else None
    grad_bias = grad_output.sum(dims) if needs[2] else None
    return grad_input, grad_weight, grad_bias


def _backward(ctx, grad_output, _grad_mean, _grad_var):
    input, weight, mean, var = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradient itself must be differentiable
        grad_input, grad_weight, grad_bias = _differentiable_gradients(
            grad_output, input, weight, ctx.ghost_batch_size, ctx.eps, (need_input, need_weight, need_bias)
        )
        return grad_input, grad_weight, grad_bias, None, None
    grad_input, grad_weight, grad_bias = torch.ops.swa_fast.ghost_batch_norm_backward(
        grad_output, input, weight, mean, var, ctx.ghost_batch_size, ctx.eps, need_input
    )
    return (
        grad_input if need_input else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
        None,
        None,
    )


torch.library.register_autograd("swa_fast::ghost_batch_norm", _backward, setup_context=_setup_context)

