"""Neural-network layers: ghost batch normalization (modules, conversion, functional)."""

from swa_fast.nn.functional import ghost_batch_norm
from swa_fast.nn.ghost_batchnorm import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    convert_ghost_batchnorm,
    revert_ghost_batchnorm,
)

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "convert_ghost_batchnorm",
    "ghost_batch_norm",
    "revert_ghost_batchnorm",
]
