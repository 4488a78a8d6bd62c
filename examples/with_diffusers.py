"""diffusers' EMAModel on swa_fast's fused update: swap one import.

Trains a tiny diffusers ``UNet2DModel`` to denoise 8x8 synthetic images (a bright square at a
random place on a dark, noisy background, generated in memory: no downloads) with diffusers'
``DDPMScheduler``, keeping an EMA of its weights exactly as a diffusers training script does:
``ema.step(model.parameters())`` after every optimizer step, ``store`` / ``copy_to`` / ``restore``
to evaluate with the averaged weights, ``save_pretrained`` / ``from_pretrained`` to checkpoint.
The only change from a diffusers script is the import: every ``ema.step`` is then one fused pass
over all the parameters, with the decay computed on the device.

    python examples/with_diffusers.py                # a few seconds on a 2-core CPU
    python examples/with_diffusers.py --compare      # also keep diffusers' own EMAModel alongside

It prints the denoising loss as training goes, then the held-out loss of the model and of its EMA.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils import logging as diffusers_logging
from torch import nn

from swa_fast.integrations.diffusers import EMAModel  # the swap: was `from diffusers.training_utils import EMAModel`

SIZE = 8  # image side
BATCH_SIZE = 16


def make_model() -> UNet2DModel:
    """A tiny UNet2DModel (two resolutions, 8 and 16 channels): trains in seconds on a CPU."""
    return UNet2DModel(
        sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def make_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` 1x8x8 images in [-1, 1]: a bright 3x3 square at a random place, on faint noise."""
    images = 0.1 * torch.randn(n, 1, SIZE, SIZE, generator=generator) - 0.8
    corners = torch.randint(0, SIZE - 2, (n, 2), generator=generator)
    for image, (row, col) in zip(images, corners.tolist(), strict=True):
        image[:, row:row + 3, col:col + 3] = 0.8
    return images.clamp(-1, 1)


def denoising_loss(model: nn.Module, scheduler: DDPMScheduler, images: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor) -> torch.Tensor:
    """The DDPM training objective: predict the noise added at ``timesteps``."""
    noisy = scheduler.add_noise(images, noise, timesteps)
    return nn.functional.mse_loss(model(noisy, timesteps).sample, noise)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="training steps of batch 16 (default: 120)")
    parser.add_argument("--compare", action="store_true",
                        help="also keep diffusers' own EMAModel and print how far apart the two are")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, keep the EMA, evaluate both; returns the figures (for the tests)."""
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # no notices about config keys or accelerate
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = make_model()
    scheduler = DDPMScheduler(num_train_timesteps=100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    # As in diffusers' training scripts: the EMA is made from the model's parameters and config.
    ema = EMAModel(model.parameters(), decay=0.99, use_ema_warmup=True, power=3 / 4,
                   model_cls=UNet2DModel, model_config=model.config)
    theirs = None
    if args.compare:
        from diffusers.training_utils import EMAModel as DiffusersEMAModel

        theirs = DiffusersEMAModel(model.parameters(), decay=0.99, use_ema_warmup=True, power=3 / 4)
    seconds = {"swa_fast": 0.0, "diffusers": 0.0}

    print(f"training a tiny UNet2DModel ({sum(p.numel() for p in model.parameters())} parameters) to denoise "
          f"{SIZE}x{SIZE} synthetic images, {args.steps} steps:")
    window: list[torch.Tensor] = []
    for step in range(1, args.steps + 1):
        model.train()
        images = make_images(BATCH_SIZE, generator)
        noise = torch.randn(images.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH_SIZE,), generator=generator)
        loss = denoising_loss(model, scheduler, images, noise, timesteps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        start = time.perf_counter()
        ema.step(model.parameters())
        seconds["swa_fast"] += time.perf_counter() - start
        if theirs is not None:
            start = time.perf_counter()
            theirs.step(model.parameters())
            seconds["diffusers"] += time.perf_counter() - start

        window.append(loss.detach())
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(f"  step {step:4d}: loss {torch.stack(window).mean().item():.4f} "
                  f"(EMA decay {ema.cur_decay_value:.4f})")
            window.clear()

    # Held-out loss of the model, then of its EMA: store, copy the EMA in, evaluate, restore.
    eval_generator = torch.Generator().manual_seed(2)
    images = make_images(256, eval_generator)
    noise = torch.randn(images.shape, generator=eval_generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=eval_generator)
    model.eval()
    with torch.no_grad():
        model_loss = denoising_loss(model, scheduler, images, noise, timesteps).item()
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        ema_loss = denoising_loss(model, scheduler, images, noise, timesteps).item()
        ema.restore(model.parameters())
    print(f"held-out denoising loss: model {model_loss:.4f}, EMA {ema_loss:.4f}")

    # Checkpointing as diffusers does it: the EMA's settings ride in the model's config.
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers' own from_config(path) deprecation
        ema.save_pretrained(folder)
        reloaded = EMAModel.from_pretrained(folder, model_cls=UNet2DModel)
    same = all(torch.equal(a, b) for a, b in zip(reloaded.shadow_params, ema.shadow_params, strict=True))
    print(f"save_pretrained / from_pretrained: step {reloaded.optimization_step}, weights identical: {same}")

    result = {"model_loss": model_loss, "ema_loss": ema_loss, "reloaded_identical": same,
              "optimization_step": reloaded.optimization_step}
    if theirs is not None:
        difference = max((a - b).abs().max().item()
                          for a, b in zip(ema.shadow_params, theirs.shadow_params, strict=True))
        print(f"max |swa_fast - diffusers| over the EMA weights: {difference:.2e}; ema.step "
              f"{1e3 * seconds['swa_fast'] / args.steps:.3f} ms (swa_fast) vs "
              f"{1e3 * seconds['diffusers'] / args.steps:.3f} ms (diffusers)")
        result["max_abs_diff"] = difference
    return result


if __name__ == "__main__":
    main()
