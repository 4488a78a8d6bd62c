"""Batches from an in-memory :class:`ImageDataset`, sharded like ``DistributedSampler``.

Each batch's uint8 rows are gathered where the data set lives (CPU, or the
GPU after ``dataset.to("cuda")``), moved to ``device``, augmented there and
only then converted to normalized float32: the host never touches float
pixels and the copy is 4x smaller than a float one.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch

from recipe_lib.datasets import ImageDataset
from recipe_lib.transforms import DEFAULT_STATS, channel_stats, to_float


def shard_indices(n: int, epoch: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The sample indices ``rank`` sees in ``epoch``: exactly ``DistributedSampler(drop_last=False)``'s.

    Shuffle with ``randperm`` on a CPU generator seeded ``seed + epoch``, pad to
    a multiple of ``world_size`` by repeating the start of the order, then take
    every ``world_size``-th index from ``rank``. So a DDP run built on this
    loader sees the same samples, in the same order, as one built on torch's
    sampler (and with ``world_size=1`` the same order as the sampler alone).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    total = math.ceil(n / world_size) * world_size
    if total > n and n > 0:
        repeats = math.ceil((total - n) / n)  # only > 1 when n < world_size, as in torch
        order = torch.cat([order, order.repeat(repeats)[: total - n]])
    return order[rank:total:world_size]


class BatchLoader:
    """Iterate ``(images float32 [B, C, H, W], labels int64 [B])`` on ``device``.

    Args:
        dataset: the in-memory split.
        batch_size: samples per batch (per rank).
        shuffle: reshuffle every epoch (call :meth:`set_epoch` before each, as
            with ``DistributedSampler``; without it every epoch repeats epoch 0).
        drop_last: drop the last incomplete batch of this rank's shard.
        device: where batches are produced.
        augment: applied to the uint8 batch on ``device`` before normalization
            (e.g. ``compose(partial(random_crop, padding=4), random_hflip)``).
        mean, std: normalization; default ``DEFAULT_STATS[dataset.name]``, else
            the data set's own per-channel statistics.
        seed: base seed of the shuffle (``seed + epoch``).
        rank, world_size: this process's shard, as in ``DistributedSampler``.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 device: torch.device | str = "cpu", augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        shard_indices(0, 0, seed, False, rank, world_size)  # validate rank/world_size now, not mid-training
        if mean is None or std is None:
            default = DEFAULT_STATS.get(dataset.name) or channel_stats(dataset.images)
            mean, std = mean or default[0], std or default[1]
        self.mean, self.std = tuple(mean), tuple(std)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` (same for every rank, different per epoch)."""
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's sample order for the current epoch (before batching)."""
        return shard_indices(len(self.dataset), self.epoch, self.seed, self.shuffle, self.rank, self.world_size)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (padding included, drop_last not applied)."""
        return math.ceil(len(self.dataset) / self.world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices().to(self.dataset.images.device)
        pin = self.device.type == "cuda" and self.dataset.images.device.type == "cpu"
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            images = self.dataset.images.index_select(0, idx)
            labels = self.dataset.labels.index_select(0, idx.to(self.dataset.labels.device))
            if pin:  # pinned source: the host-to-device copy can overlap the previous step's kernels
                images, labels = images.pin_memory(), labels.pin_memory()
            images = images.to(self.device, non_blocking=pin)
            labels = labels.to(self.device, non_blocking=pin)
            if self.augment is not None:
                images = self.augment(images)
            yield to_float(images, self.mean, self.std), labels
