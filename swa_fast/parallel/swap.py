"""SWAP's three phases as a few lines of a user's own DDP loop (Gupta, Akle Serrano and DeCoste,
"Stochastic Weight Averaging in Parallel", ICLR 2020).

    phase 1  one model, large synchronized batches (DDP), until the training accuracy over all
             ranks reaches a threshold                          -> AccuracyThreshold
    phase 2  every rank continues from that model on its own: small batches, its own data order,
             no gradient communication                          -> leave_ddp, worker_generator
    phase 3  the ranks' weights averaged, BN statistics recomputed over every rank's data
                                                                -> swap_average

::

    ddp = DistributedDataParallel(model)
    rule = AccuracyThreshold(0.95)
    for epoch in range(max_epochs):                       # phase 1
        for x, y in large_batch_loader:
            logits = ddp(x); loss_fn(logits, y).backward(); opt.step(); opt.zero_grad()
            rule.update(logits, y)                         # counted on the device, no sync
        if rule.reached():                                 # one all-reduce per epoch
            break
    model = leave_ddp(ddp)                                 # phase 2: the same module, no gradient sync
    order = RandomSampler(train_set, generator=worker_generator(seed))
    ...train model with small batches drawn in that order...
    swap_average(model, bn_loader)                         # phase 3: every rank holds the SWAP model
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from swa_fast.averaging.update_bn import update_bn
from swa_fast.parallel.replica_checks import communication_device
from swa_fast.parallel.replicas import average_replicas_


def _require_group(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{what} needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group, or torchrun)")


class AccuracyThreshold:
    """Phase 1's stopping rule: the training accuracy over all ranks has reached ``threshold``.

    :meth:`update` counts correct predictions on the device (no host sync per batch);
    :meth:`accuracy` and :meth:`reached` all-reduce the counts once (a collective: every rank calls
    them at the same point, e.g. after each epoch) and give every rank the same answer.

    Args:
        threshold: the training accuracy, in [0, 1], that ends phase 1.
        group: the process group to count over (default: the default group; without an initialized
            group, this process alone).
    """

    def __init__(self, threshold: float, group: Optional[dist.ProcessGroup] = None) -> None:
        if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"AccuracyThreshold: threshold must be a training accuracy in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        self.group = group
        self._counts: Optional[Tensor] = None  # [correct, seen], int64, on the predictions' device

    def update(self, output: Tensor, targets: Tensor) -> None:
        """Count one batch: ``output`` is logits/probabilities ``(N, C)`` (argmax over dim 1) or predicted
        labels ``(N,)``; ``targets`` the labels ``(N,)``."""
        predicted = output.argmax(dim=1) if output.dim() > 1 else output
        if predicted.shape != targets.shape:
            raise ValueError(f"AccuracyThreshold.update: {tuple(predicted.shape)} predictions for "
                             f"{tuple(targets.shape)} targets")
        batch = torch.stack([(predicted == targets.to(predicted.device)).sum(), torch.tensor(targets.numel(),
                                                                                           device=predicted.device)])
        self._counts = batch if self._counts is None else self._counts + batch

    def accuracy(self) -> float:
        """The accuracy of every batch counted since the last :meth:`reset`, over all ranks (NaN: none)."""
        counts = torch.zeros(2, dtype=torch.int64) if self._counts is None else self._counts.detach()
        if dist.is_available() and dist.is_initialized():
            counts = counts.to(communication_device(self.group))
            dist.all_reduce(counts, group=self.group)
        correct, seen = counts.tolist()
        return correct / seen if seen else math.nan

    def reached(self, reset: bool = True) -> bool:
        """Whether :meth:`accuracy` has reached the threshold (then, by default, the counts restart)."""
        done = self.accuracy() >= self.threshold
        if reset:
            self.reset()
        return done

    def reset(self) -> None:
        """Forget the batches counted so far (the next epoch's accuracy starts from zero)."""
        self._counts = None


def leave_ddp(model: nn.Module) -> nn.Module:
    """Phase 2's model: the module inside a ``DistributedDataParallel`` wrapper.

    It holds the very parameters DDP trained (identical on every rank); trained through it (not the
    wrapper), backward runs without DDP's gradient all-reduce, so each rank continues on its own.
    DDP's forward also broadcasts rank 0's buffers, which stops too: each rank's BN statistics follow
    its own batches until :func:`swap_average` recomputes them. A model that is not wrapped is
    returned as it is (a rank that trained phase 1 alone).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    if type(model).__name__ == "FSDPModule" or any(hasattr(p, "_local_tensor") for p in model.parameters()):
        raise ValueError("leave_ddp: an FSDP2-sharded model holds one shard per rank, not a replica; SWAP's "
                         "independent phase needs whole replicas (train phase 1 with DDP)")
    return model


def worker_generator(seed: int, group: Optional[dist.ProcessGroup] = None,
                     device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, rank)``: phase 2's data order, different on every rank and
    reproducible (e.g. ``RandomSampler(train_set, generator=worker_generator(seed))``).

    The rank is the rank in ``group`` (0 without a process group). The seed is a hash of both, so
    ``(seed, rank)`` and ``(seed + 1, rank - 1)`` do not collide.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"worker_generator: seed must be an int, got {type(seed).__name__}")
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    digest = hashlib.sha256(f"swap-phase-2 {seed} {rank}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def swap_average(
    model: nn.Module,
    bn_loader: Optional[Iterable[Any]],
    group: Optional[dist.ProcessGroup] = None,
    *,
    weights: Optional[Sequence[float]] = None,
    device: Optional[Union[int, str, torch.device]] = None,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    bucket_mb: float = 25.0,
    progress: bool = False,
) -> None:
    """Phase 3: average the ranks' weights (:func:`average_replicas_`), then recompute the BatchNorm
    statistics over every rank's batches of ``bn_loader`` (``update_bn`` with the all-reduce), so every
    rank holds the SWAP model. A collective.

    ``bn_loader``: this rank's share of the training data (e.g. a ``DistributedSampler`` loader);
    ``None`` for a model without BatchNorm (its averaged buffers are kept). ``weights``, ``bucket_mb``:
    as for :func:`average_replicas_`; ``device``, ``forward_fn``, ``progress``: as for ``update_bn``.
    """
    _require_group("swap_average")
    module = leave_ddp(model)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    if has_bn and bn_loader is None:
        raise ValueError("swap_average: the model has BatchNorm layers, whose statistics must be recomputed "
                         "for the averaged weights; pass bn_loader (this rank's share of the training data)")
    average_replicas_(module, group, weights=weights, bucket_mb=bucket_mb)
    if has_bn:
        update_bn(bn_loader, module, device, forward_fn=forward_fn, progress=progress, all_reduce=True,
                  process_group=group)
