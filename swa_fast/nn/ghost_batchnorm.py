"""Ghost batch normalization modules ("Train longer, generalize better", Hoffer et al. 2017).

A large batch is split into contiguous ghost batches of ``ghost_batch_size``
samples along N (the last one smaller when N is not a multiple: N = 1000 with
ghosts of 128 gives 7 x 128 + 104; a batch smaller than the ghost size is one
ghost), and in training each ghost is normalized with its own biased mean and
variance, then the shared affine weight and bias. Normalizing small ghosts
keeps the regularizing noise of small-batch statistics while the optimizer
sees the large batch.

Running statistics (``stats_mode="per_ghost"``, the default) are exactly what
``F.batch_norm(chunk, running_mean, running_var, weight, bias, True, momentum,
eps)`` applied to each chunk in turn would leave (the paper's code and
tabnet's behave so): one momentum step per ghost with the ghost's unbiased
variance, and with ``momentum=None`` the cumulative average counting each
ghost as one batch (``num_batches_tracked`` advances by the number of
ghosts). ``stats_mode="averaged"`` instead takes one momentum step per forward
with the ghost-size-weighted mean of the ghosts' means and unbiased variances
(Keras' ``virtual_batch_size`` behaviour; ``num_batches_tracked`` advances by 1).

In eval mode with running statistics the modules are exactly ``nn.BatchNorm*d``
in eval mode, whatever the batch size. With ``track_running_stats=False`` they
use ghost statistics in eval too. A ghost of one sample in training raises
``ValueError("... Expected more than 1 value per channel when training ...")``
naming the ghost size and N.

The modules subclass ``torch.nn.modules.batchnorm._BatchNorm`` with the same
parameters and buffers, so ``update_bn``, weight-decay filters that look for
``_BatchNorm`` and BatchNorm checkpoints keep working.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from swa_fast.nn.functional import check_ghost_batch_size, check_stats_mode, ghost_batch_norm

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "convert_ghost_batchnorm",
    "revert_ghost_batchnorm",
]


class _GhostBatchNorm(_BatchNorm):
    """Ghost batch norm over (N, C, *) input; see the module docstring for the semantics."""

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        stats_mode: str = "per_ghost",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.ghost_batch_size = check_ghost_batch_size(ghost_batch_size)
        self.stats_mode = check_stats_mode(stats_mode)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}, stats_mode={self.stats_mode!r}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected input with {self.num_features} channels (num_features), got "
                f"shape {tuple(input.shape)}"
            )
        # As nn.BatchNorm: batch statistics in training, or always without running statistics.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update_running = self.training and self.track_running_stats
        return ghost_batch_norm(
            input,
            self.ghost_batch_size,
            self.running_mean if (update_running or not use_batch_stats) else None,
            self.running_var if (update_running or not use_batch_stats) else None,
            self.weight,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            self.num_batches_tracked if update_running else None,
            self.stats_mode,
        )


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost batch norm over (N, C) or (N, C, L) input, the ghost counterpart of ``nn.BatchNorm1d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost batch norm over (N, C, H, W) input (contiguous or channels_last), the ghost
    counterpart of ``nn.BatchNorm2d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class GhostBatchNorm3d(_GhostBatchNorm):
    """Ghost batch norm over (N, C, D, H, W) input, the ghost counterpart of ``nn.BatchNorm3d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


_TO_GHOST = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d, nn.BatchNorm3d: GhostBatchNorm3d}
_TO_PLAIN = {ghost: plain for plain, ghost in _TO_GHOST.items()}


def _swap(module: _BatchNorm, new_class, **kwargs) -> _BatchNorm:
    """A ``new_class`` module sharing ``module``'s parameters, buffers and mode (as
    ``SyncBatchNorm.convert_sync_batchnorm`` shares them)."""
    new = new_class(
        module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
        track_running_stats=module.track_running_stats, **kwargs,
    )
    if module.affine:
        new.weight = module.weight
        new.bias = module.bias
    new.running_mean = module.running_mean
    new.running_var = module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert_ghost_batchnorm(module: nn.Module, ghost_batch_size: int, stats_mode: str = "per_ghost") -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` by the matching ``GhostBatchNorm*d``.

    The new layers share the old ones' weight, bias and running statistics
    (so an optimizer built before the conversion still updates them) and keep
    the training mode. Returns the converted module (a new object when
    ``module`` itself is a BatchNorm), like ``SyncBatchNorm.convert_sync_batchnorm``.
    ``SyncBatchNorm`` and lazy BatchNorms are left alone (ghost batches are per worker).

    Example::

        model = convert_ghost_batchnorm(torchvision_style_resnet(), ghost_batch_size=32)
    """
    check_ghost_batch_size(ghost_batch_size)
    check_stats_mode(stats_mode)
    converted = module
    new_class = _TO_GHOST.get(type(module))
    if new_class is not None:
        converted = _swap(module, new_class, ghost_batch_size=ghost_batch_size, stats_mode=stats_mode)
    for name, child in module.named_children():
        converted.add_module(name, convert_ghost_batchnorm(child, ghost_batch_size, stats_mode))
    return converted


def revert_ghost_batchnorm(module: nn.Module) -> nn.Module:
    """The reverse of :func:`convert_ghost_batchnorm`: every ``GhostBatchNorm*d`` becomes the
    matching ``nn.BatchNorm*d``, sharing its parameters and running statistics."""
    converted = module
    plain_class = _TO_PLAIN.get(type(module))
    if plain_class is not None:
        converted = _swap(module, plain_class)
    for name, child in module.named_children():
        converted.add_module(name, revert_ghost_batchnorm(child))
    return converted
