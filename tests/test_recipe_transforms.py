"""Batch transforms of the recipes (examples/recipe_lib/transforms.py): exact results, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recipe_lib.transforms import (
    DEFAULT_STATS,
    channel_stats,
    compose,
    pad_to,
    random_crop,
    random_hflip,
    resize,
    to_float,
)


def batch(n: int = 16, c: int = 3, h: int = 7, w: int = 9, seed: int = 0) -> torch.Tensor:
    """Random uint8 images in 1..255, so a zero in a crop can only come from padding."""
    return torch.randint(1, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_to_float_values():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = to_float(x, mean=(0.0, 0.1, 0.5), std=(1.0, 0.5, 0.25))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, (0.2 - 0.1) / 0.5, (1.0 - 0.5) / 0.25]))
    with pytest.raises(ValueError, match="3 channels"):
        to_float(x, (0.5,), (0.5,))


def test_default_stats_match_channel_stats():
    x = batch(64)
    mean, std = channel_stats(x)
    out = to_float(x, mean, std)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert {"fashion_mnist", "cifar10", "cifar100", "folder"} <= set(DEFAULT_STATS)
    for mean, std in DEFAULT_STATS.values():
        assert len(mean) == len(std) and all(0 < s < 1 for s in std)


def _windows(padded: torch.Tensor, h: int, w: int) -> list[torch.Tensor]:
    return [padded[..., i:i + h, j:j + w] for i in range(padded.shape[-2] - h + 1) for j in range(padded.shape[-1] - w + 1)]


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_is_a_window_of_the_padded_image(mode, dtype):
    x = batch().to(dtype)
    p = 3
    out = random_crop(x, p, generator=torch.Generator().manual_seed(1), mode=mode)
    assert out.shape == x.shape and out.dtype == dtype
    padded = F.pad(x.float(), [p] * 4, mode=mode).to(dtype)
    offsets = set()
    for k in range(x.shape[0]):
        matches = [i for i, win in enumerate(_windows(padded[k], 7, 9)) if torch.equal(win, out[k])]
        assert matches, f"sample {k} is not a window of its padded image"
        offsets.add(matches[0])
    assert len(offsets) > 4  # offsets really differ per sample


def test_random_crop_deterministic_and_zero_padding():
    x = batch(32)
    a = random_crop(x, 2, generator=torch.Generator().manual_seed(5))
    b = random_crop(x, 2, generator=torch.Generator().manual_seed(5))
    c = random_crop(x, 2, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a == 0).any()  # some crops include the zero border
    assert torch.equal(random_crop(x, 0), x)
    with pytest.raises(ValueError, match="reflect padding"):
        random_crop(x, 7, mode="reflect")


def test_random_hflip_flips_exactly_the_drawn_samples():
    x = batch(64)
    out = random_hflip(x, generator=torch.Generator().manual_seed(3))
    # The mask is one uniform draw per sample from the generator, flipped where < p.
    expected = torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5
    flipped = torch.tensor([torch.equal(out[k], x[k].flip(-1)) for k in range(64)])
    same = torch.tensor([torch.equal(out[k], x[k]) for k in range(64)])
    assert torch.equal(flipped, expected) and torch.equal(same, ~expected)
    assert 10 < int(expected.sum()) < 54
    assert torch.equal(random_hflip(x, p=0.0), x) and torch.equal(random_hflip(x, p=1.0), x.flip(-1))
    assert torch.equal(out, random_hflip(x, generator=torch.Generator().manual_seed(3)))


def test_resize_and_pad_to():
    x = batch(4, h=28, w=28)
    small = resize(x, 14)
    assert small.shape == (4, 3, 14, 14) and small.dtype == torch.uint8
    # Antialiased 2x shrink of a constant image stays constant; bilinear of uint8 rounds back.
    flat = torch.full((1, 1, 28, 28), 200, dtype=torch.uint8)
    assert torch.equal(resize(flat, (14, 7)), torch.full((1, 1, 14, 7), 200, dtype=torch.uint8))
    expected = F.interpolate(x.float(), size=(14, 14), mode="bilinear", antialias=True).round().to(torch.uint8)
    assert torch.equal(small, expected)
    assert resize(x.float(), (40, 30)).shape == (4, 3, 40, 30)
    padded = pad_to(x, 32)
    assert padded.shape == (4, 3, 32, 32) and torch.equal(padded[..., 2:30, 2:30], x)
    assert padded[..., :2, :].eq(0).all() and padded[..., :, 30:].eq(0).all()
    assert pad_to(batch(1, h=5, w=5), (6, 8))[..., 0:5, 1:6].equal(batch(1, h=5, w=5))
    with pytest.raises(ValueError, match="smaller"):
        pad_to(x, 20)


def test_compose_runs_in_order():
    x = batch(8, h=28, w=28)
    g = torch.Generator().manual_seed(0)
    out = compose(lambda b: pad_to(b, 32), lambda b: random_crop(b, 4, generator=g), random_hflip)(x)
    assert out.shape == (8, 3, 32, 32)
