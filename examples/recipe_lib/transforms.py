"""Batch transforms as tensor ops on the batch's own device.

They take ``[N, C, H, W]`` batches (uint8 or float) and work on the whole
batch at once: random crops and flips draw one value per sample and apply it
by index arithmetic, never a Python loop over samples, so a GPU batch never
goes back to the host. Randomness comes from ``generator`` when given (a CPU
generator is fine for a GPU batch: only the N draws are copied over), else
from the default generator of the batch's device.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# Per-channel mean/std of each training set, as fractions of 255.
# CIFAR-10's std is the population std (0.247, 0.243, 0.261), not the
# often-copied (0.2023, 0.1994, 0.2010), which is a mean of per-image stds.
# "folder" uses ImageNet's statistics: the tutorial recipe fine-tunes an
# ImageNet-pretrained ResNet-18, which expects them.
DEFAULT_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

Transform = Callable[[torch.Tensor], torch.Tensor]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _check_batch(batch: torch.Tensor) -> None:
    if batch.dim() != 4:
        raise ValueError(f"expected a [N, C, H, W] batch, got shape {tuple(batch.shape)}")


def _draw(kind: str, n: int, generator: torch.Generator | None, device: torch.device, high: int = 0) -> torch.Tensor:
    """``n`` random draws made where the generator lives, returned on ``device``."""
    where = generator.device if generator is not None else device
    if kind == "int":
        values = torch.randint(high, (n,), generator=generator, device=where)
    else:
        values = torch.rand((n,), generator=generator, device=where)
    return values.to(device)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images as fractions of 255 (float64 sums, chunked to bound memory)."""
    _check_batch(images)
    total = torch.zeros(images.shape[1], dtype=torch.float64, device=images.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float64).div_(255)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def to_float(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float32 ``(x / 255 - mean) / std`` per channel, on the same device."""
    _check_batch(images)
    channels = images.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {channels} channels")
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    x = images.to(torch.float32)
    if images.dtype == torch.uint8:
        x = x.div_(255)
    return x.sub_(m).div_(s)


def _source_index(pos: torch.Tensor, size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map padded-image coordinates ``pos`` (already shifted by -padding) to source indices.

    Returns (index, valid mask or None). Reflect mirrors without repeating the
    edge, like ``F.pad(mode="reflect")``.
    """
    if mode == "constant":
        valid = (pos >= 0) & (pos < size)
        return pos.clamp(0, size - 1), valid
    if mode == "reflect":
        pos = pos.abs()
        return torch.where(pos >= size, 2 * (size - 1) - pos, pos), None
    if mode == "replicate":
        return pos.clamp(0, size - 1), None
    raise ValueError(f"padding mode must be constant, reflect or replicate, got {mode!r}")


def random_crop(batch: torch.Tensor, padding: int, generator: torch.Generator | None = None,
                mode: str = "constant") -> torch.Tensor:
    """Pad each image by ``padding`` on every side and crop a random window of the original size.

    Equivalent to ``F.pad(batch, [padding] * 4, mode)`` followed by a crop at
    per-sample offsets ``(dy, dx)`` uniform in ``[0, 2 * padding]``, but done as
    one gather from the unpadded batch (no padded copy; uint8 works in every
    mode). ``mode``: ``constant`` (zeros), ``reflect`` or ``replicate``.
    """
    _check_batch(batch)
    n, c, h, w = batch.shape
    if padding == 0 or n == 0:
        return batch.clone()
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"reflect padding {padding} must be smaller than the image ({h}x{w})")
    device = batch.device
    dy = _draw("int", n, generator, device, 2 * padding + 1)
    dx = _draw("int", n, generator, device, 2 * padding + 1)
    rows, row_ok = _source_index(dy[:, None] + torch.arange(h, device=device) - padding, h, mode)  # [N, H]
    cols, col_ok = _source_index(dx[:, None] + torch.arange(w, device=device) - padding, w, mode)  # [N, W]
    flat = batch.reshape(n, c, h * w)
    index = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    out = flat.gather(2, index).reshape(n, c, h, w)
    if row_ok is not None:
        ok = (row_ok[:, :, None] & col_ok[:, None, :])[:, None]  # [N, 1, H, W]
        out = out.masked_fill_(~ok, 0)
    return out


def random_hflip(batch: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image left-right with probability ``p`` (one draw per sample)."""
    _check_batch(batch)
    flip = _draw("float", batch.shape[0], generator, batch.device) < p
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


def resize(batch: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Bilinear resize to ``size`` (``S`` or ``(H, W)``), antialiased when shrinking.

    uint8 batches are resized in float32 and rounded back to uint8, so the
    result can still be cropped, flipped and normalized like the original.
    """
    _check_batch(batch)
    h, w = _pair(size)
    if (h, w) == tuple(batch.shape[2:]):
        return batch.clone()
    shrinking = h < batch.shape[2] or w < batch.shape[3]
    x = batch if batch.is_floating_point() else batch.to(torch.float32)
    out = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrinking)
    if batch.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(batch.dtype)


def pad_to(batch: torch.Tensor, size: int | Sequence[int], value: float = 0) -> torch.Tensor:
    """Pad (centered, with ``value``) to ``size``; e.g. Fashion-MNIST 28x28 -> 32x32 for CIFAR-sized models."""
    _check_batch(batch)
    h, w = _pair(size)
    dh, dw = h - batch.shape[2], w - batch.shape[3]
    if dh < 0 or dw < 0:
        raise ValueError(f"cannot pad {tuple(batch.shape[2:])} to the smaller {(h, w)}; use resize")
    return F.pad(batch, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2], value=value)


def compose(*transforms: Transform) -> Transform:
    """Apply ``transforms`` left to right."""
    def apply(batch: torch.Tensor) -> torch.Tensor:
        for t in transforms:
            batch = t(batch)
        return batch
    return apply
