"""The one-line import swap, on a small real training loop.

Trains a small CNN with SGD on synthetic images, keeping an SWA average and an
EMA with torch.optim.swa_utils and with swa_fast.swa_utils side by side, then
prints how far apart the averages are and how long the averaging took.

    python examples/swap_the_import.py --steps 200

(The full recipes of the SWA and large-batch papers are separate examples.)
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.optim import swa_utils as torch_swa_utils

from swa_fast import swa_utils  # the swap: was `from torch.optim import swa_utils`


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = make_model().to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pairs = {
        "SWA": (torch_swa_utils.AveragedModel(model), swa_utils.AveragedModel(model)),
        "EMA": (
            torch_swa_utils.AveragedModel(model, multi_avg_fn=torch_swa_utils.get_ema_multi_avg_fn(0.99)),
            swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.99)),
        ),
    }
    seconds = {(name, side): 0.0 for name in pairs for side in ("torch", "swa_fast")}
    generator = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        images = torch.randn(32, 3, 16, 16, generator=generator).to(args.device)
        labels = torch.randint(0, 10, (32,), generator=generator).to(args.device)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for name, (theirs, ours) in pairs.items():
            for side, averaged in (("torch", theirs), ("swa_fast", ours)):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                averaged.update_parameters(model)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds[(name, side)] += time.perf_counter() - start

    print(f"{args.steps} steps on {args.device}, final loss {loss.item():.3f}")
    for name, (theirs, ours) in pairs.items():
        difference = max(
            (a.double() - b.double()).abs().max().item()
            for a, b in zip(theirs.module.parameters(), ours.module.parameters())
        )
        torch_ms = 1e3 * seconds[(name, "torch")] / args.steps
        ours_ms = 1e3 * seconds[(name, "swa_fast")] / args.steps
        print(
            f"{name}: max |torch - swa_fast| = {difference:.2e}; update {torch_ms:.3f} ms (torch) vs "
            f"{ours_ms:.3f} ms (swa_fast)"
        )


if __name__ == "__main__":
    main()
