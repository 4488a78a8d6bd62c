"""Drawing one SWAG sample of a tensor: ``mean + sqrt(scale) * (sqrt(diag) * z1 + D z2 / sqrt(K - 1))``.

The noise is drawn on the moments' device. For a sample to be one coherent model across ranks,
every rank draws the same numbers: z2 (K values) first, then z1 of each parameter at its *full*
shape, in the store's order; a rank holding an FSDP2 shard keeps the slice of z1 its shard covers.
So the sample of a sharded model is, with the same generator state, the sample of the unsharded one.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from swa_fast.averaging.sharding import ShardLayout


def check_generator(generator: Optional[torch.Generator], device: torch.device, who: str) -> None:
    """``generator`` is None or a ``torch.Generator`` on ``device`` (where the noise is drawn)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{who}: generator must be a torch.Generator, got {type(generator).__name__}")
    here = generator.device
    if here.type != device.type or (device.type != "cpu" and here.index not in (None, device.index)):
        raise ValueError(f"{who}: generator is on {here} but the moments are on {device}, where the noise is "
                         f"drawn; pass torch.Generator(device={str(device)!r})")


class Draw:
    """Standard normal numbers from ``generator`` (the device's default one when None) on ``device``."""

    def __init__(self, generator: Optional[torch.Generator], device: torch.device) -> None:
        self.generator = generator
        self.device = device

    def normal(self, shape: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=dtype)


def _shard_of(full: Tensor, layout: ShardLayout) -> Tensor:
    """The part of ``full`` (a tensor of the parameter's global shape) this rank's shard covers."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, layout.device_mesh, layout.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def sample_tensor(mean: Tensor, variance: Tensor, deviations: Optional[Tensor], z2: Optional[Tensor], scale: float,
                  var_clamp: float, draw: Draw, layout: Optional[ShardLayout]) -> Tensor:
    """One sample of the Gaussian of one tensor (its local shard under ``layout``), as a new tensor of
    ``mean``'s dtype and layout. ``deviations``: the held columns ``(K, numel)`` in the mean's memory
    order, or None for the diagonal part only; ``z2``: their K coefficients. Arithmetic in float32
    (float64 for float64 moments)."""
    compute = torch.float64 if mean.dtype == torch.float64 else torch.float32
    z1 = draw.normal(tuple(layout.shape) if layout is not None else tuple(mean.shape), compute)
    if layout is not None:
        z1 = _shard_of(z1, layout)
    noise = variance.to(compute).clamp(min=var_clamp).sqrt_().mul_(z1)
    if deviations is not None:
        rank = deviations.shape[0]
        low_rank = (z2.to(compute) @ deviations.to(compute)).div_(math.sqrt(rank - 1))
        noise += low_rank.as_strided(mean.shape, mean.stride())
    return noise.mul_(math.sqrt(scale)).add_(mean.to(compute)).to(mean.dtype)
