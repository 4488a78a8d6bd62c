"""One epoch of training and one pass of evaluation, shared by every recipe.

Nothing here knows about SWA or large batches: the recipes build the model,
optimizer and schedulers, and :mod:`recipe_lib.engine` calls these two
functions once per epoch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recipe_lib.datasets import ImageDataset
from recipe_lib.distributed import DistContext, sum_across_ranks
from recipe_lib.loader import BatchLoader
from recipe_lib.transforms import to_float

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How forward passes run: autocast dtype (or full fp32) and memory format."""

    amp: str = "none"
    channels_last: bool = False

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        dtype = AMP_DTYPES[self.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def make_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 (bf16 has fp32's range and needs none)."""
        if self.amp != "fp16":
            return None
        return torch.amp.GradScaler(device.type)


@dataclass
class EpochStats:
    """Loss and accuracy summed over every rank's samples."""

    loss: float
    accuracy: float
    samples: int
    seconds: float


def _reduce(loss_sum: float, correct: float, samples: float, seconds: float, ctx: DistContext) -> EpochStats:
    loss_sum, correct, samples = sum_across_ranks([loss_sum, correct, samples], ctx)
    samples = max(samples, 1.0)
    return EpochStats(loss_sum / samples, correct / samples, int(samples), seconds)


def train_epoch(model: nn.Module, loader: BatchLoader, optimizer: torch.optim.Optimizer, ctx: DistContext,
                precision: Precision, *, scaler: torch.amp.GradScaler | None = None,
                clip_grad_norm: float | None = None,
                after_step: Callable[[], None] | None = None,
                progress: Callable[[Iterator], Iterator] | None = None) -> EpochStats:
    """One pass over ``loader``: forward, cross-entropy, backward, (clip), step, then ``after_step()``.

    ``after_step`` runs after every optimizer step (per-iteration schedulers,
    the distance tracker). ``progress`` wraps the batch iterator (a tqdm bar
    on rank 0); its ``set_postfix`` is fed the running loss and accuracy.
    Loss and correct counts are accumulated on the device and read once at
    the end of the epoch, so a step never waits for the GPU.
    """
    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    samples = 0
    batches = loader if progress is None else progress(iter(loader))
    show = hasattr(batches, "set_postfix") and not getattr(batches, "disable", False)
    for step, (images, labels) in enumerate(batches):
        images = precision.prepare(images)
        with precision.autocast(ctx.device):
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
        if after_step is not None:
            after_step()
        loss_sum += loss.detach().double() * labels.shape[0]
        correct += (logits.argmax(1) == labels).sum()
        samples += labels.shape[0]
        if show and step % 10 == 0:
            # A host sync every 10 steps, only when a bar is shown.
            batches.set_postfix(loss=f"{loss_sum.item() / samples:.3f}", acc=f"{correct.item() / samples:.3f}")
    return _reduce(loss_sum.item(), correct.item(), samples, time.perf_counter() - start, ctx)


class EvalSet:
    """This rank's slice of an evaluation split: samples ``rank, rank + K, ...``.

    Unlike ``DistributedSampler`` (which pads with repeated samples), the
    slices are disjoint and cover the split exactly, so the summed metrics are
    the metrics of the whole split. A rank's slice is the same on every call,
    which lets prediction ensembles (FGE) be accumulated per rank.

    Under FSDP2 (``ctx.fsdp``) every forward all-gathers parameters, a
    collective, so every rank must run as many forwards as the others; slices
    differ by one sample at most, which can make one rank's last batch
    missing: :meth:`fillers` gives the batches that make up the difference
    (their outputs are discarded).
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, ctx: DistContext,
                 mean: Sequence[float], std: Sequence[float],
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.images = dataset.images[ctx.rank::ctx.world_size]
        self.labels = dataset.labels[ctx.rank::ctx.world_size]
        self.batch_size = batch_size
        self.device = ctx.device
        self.mean, self.std = tuple(mean), tuple(std)
        self.transform = transform
        self.batches = math.ceil(len(self) / batch_size)
        # The most batches any rank has (the largest slice has ceil(n / world_size) samples).
        most = math.ceil(math.ceil(len(dataset) / ctx.world_size) / batch_size)
        self.forwards = most if ctx.fsdp else self.batches
        self._filler = dataset.images[:1]  # any real sample: every layer accepts it, whatever the model

    def __len__(self) -> int:
        return self.images.shape[0]

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        if self.transform is not None:
            images = self.transform(images)
        return to_float(images, self.mean, self.std)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), self.batch_size):
            images = self._prepare(self.images[start:start + self.batch_size])
            yield images, self.labels[start:start + self.batch_size].to(self.device)

    def fillers(self) -> Iterator[torch.Tensor]:
        """One-sample batches to run after :meth:`__iter__`'s so this rank makes ``forwards`` forwards."""
        for _ in range(self.batches, self.forwards):
            yield self._prepare(self._filler)


@torch.no_grad()
def predict(model: nn.Module, data: EvalSet, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (float32, ``[len(data), classes]``) and labels of this rank's slice, in eval mode."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for images, y in data:
        with precision.autocast(data.device):
            logits = model(precision.prepare(images))
        probs.append(torch.softmax(logits.float(), dim=1))
        labels.append(y)
    for images in data.fillers():  # FSDP2: the forwards (collectives) other ranks run; outputs discarded
        with precision.autocast(data.device):
            model(precision.prepare(images))
    model.train(was_training)
    return torch.cat(probs), torch.cat(labels)


def score(probs: torch.Tensor, labels: torch.Tensor, ctx: DistContext, seconds: float = 0.0) -> EpochStats:
    """Negative log-likelihood and accuracy of predicted probabilities, summed over ranks."""
    nll = -torch.log(probs.gather(1, labels[:, None]).clamp_min(1e-12)).sum()
    correct = (probs.argmax(1) == labels).sum()
    return _reduce(nll.item(), correct.item(), labels.shape[0], seconds, ctx)


def evaluate(model: nn.Module, data: EvalSet, precision: Precision, ctx: DistContext) -> EpochStats:
    """Test loss and accuracy of ``model`` over the whole split (all ranks)."""
    start = time.perf_counter()
    probs, labels = predict(model, data, precision)
    return score(probs, labels, ctx, time.perf_counter() - start)
