"""BatchLoader of the recipes (examples/recipe_lib/loader.py): epochs, shuffling, DDP sharding."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from recipe_lib.datasets import ImageDataset
from recipe_lib.loader import BatchLoader, shard_indices
from recipe_lib.transforms import random_hflip


def dataset(n: int) -> ImageDataset:
    """Sample i has every pixel equal to i % 256 and label i: batches reveal which samples they hold."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageDataset(images, torch.arange(n), tuple(str(i) for i in range(n)), "synthetic")


def epoch_labels(loader: BatchLoader) -> list[int]:
    return [i for _, labels in loader for i in labels.tolist()]


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_sample_once_per_epoch(shuffle):
    loader = BatchLoader(dataset(23), batch_size=5, shuffle=shuffle, mean=(0.0,), std=(1 / 255,))
    assert len(loader) == 5
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [5, 5, 5, 5, 3]
    assert sorted(epoch_labels(loader)) == list(range(23))
    for images, labels in batches:  # images stay paired with their labels through shuffling
        assert images.dtype == torch.float32
        torch.testing.assert_close(images[:, 0, 0, 0], labels.float())
    drop = BatchLoader(dataset(23), batch_size=5, drop_last=True)
    assert len(drop) == 4 and len(epoch_labels(drop)) == 20


def test_shuffle_differs_per_epoch_and_is_reproducible():
    a = BatchLoader(dataset(50), batch_size=8, shuffle=True, seed=7)
    b = BatchLoader(dataset(50), batch_size=8, shuffle=True, seed=7)
    orders = []
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        orders.append(epoch_labels(a))
        assert orders[-1] == epoch_labels(b)
    assert orders[0] != orders[1] != orders[2]
    a.set_epoch(0)
    assert epoch_labels(a) == orders[0]
    assert epoch_labels(BatchLoader(dataset(50), batch_size=8, shuffle=True, seed=8)) != orders[0]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n", [10, 11, 2])  # divisible, not divisible, fewer samples than ranks
def test_sharding_matches_distributed_sampler(world_size, shuffle, n):
    data = dataset(n)
    for epoch in (0, 3):
        seen = []
        for rank in range(world_size):
            sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=11)
            sampler.set_epoch(epoch)
            loader = BatchLoader(data, batch_size=2, shuffle=shuffle, seed=11, rank=rank, world_size=world_size)
            loader.set_epoch(epoch)
            assert shard_indices(n, epoch, 11, shuffle, rank, world_size).tolist() == list(sampler)
            assert epoch_labels(loader) == list(sampler)
            assert loader.num_samples == len(sampler)
            seen += list(sampler)
        assert set(seen) == set(range(n))


def test_augment_runs_on_uint8_batch_before_normalization():
    seen = []

    def augment(x):
        seen.append(x.dtype)
        return random_hflip(x, p=1.0)

    data = dataset(4)
    data.images[:, :, :, 1] = 0  # asymmetric, so the flip shows
    images, labels = next(iter(BatchLoader(data, batch_size=4, augment=augment, mean=(0.0,), std=(1 / 255,))))
    assert seen == [torch.uint8]
    assert images[:, 0, :, 0].eq(0).all()  # the zeroed column moved left
    torch.testing.assert_close(images[:, 0, :, 1], labels.float()[:, None].expand(4, 2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(dataset(4), batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(dataset(4), batch_size=0)


@pytest.mark.cuda
def test_cuda_batches_match_cpu_batches():
    """Same seeds, same batches on the GPU (CPU generator for the augmentation draws), data on host or device."""
    from functools import partial

    from recipe_lib.transforms import compose, random_crop

    data = ImageDataset(torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8), torch.arange(20) % 3,
                        ("a", "b", "c"), "cifar10")

    def run(device, on_device):
        g = torch.Generator().manual_seed(4)
        augment = compose(partial(random_crop, padding=2, generator=g), partial(random_hflip, generator=g))
        loader = BatchLoader(data.to(device) if on_device else data, batch_size=6, shuffle=True,
                             device=device, augment=augment, seed=1)
        loader.set_epoch(2)
        return [(x.cpu(), y.cpu()) for x, y in loader]

    expected = run("cpu", False)
    for on_device in (False, True):
        for (x, y), (ex, ey) in zip(run("cuda", on_device), expected):
            torch.testing.assert_close(x, ex)
            assert torch.equal(y, ey)
