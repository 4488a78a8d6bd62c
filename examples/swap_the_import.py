"""The one-line import swap, on a tiny real training run.

Trains a small CNN with SGD on a learnable synthetic task generated in memory
(class k is a bright band at rows 2k..2k+4 of a noisy 28x28 image: the
generator of the recipes' synthetic Fashion-MNIST; no downloads), keeping an
SWA average and an EMA with ``torch.optim.swa_utils`` and with
``swa_fast.swa_utils`` side by side. It prints the training loss as it falls,
the test accuracy of the model and of every average (after ``update_bn``),
how far torch's and swa_fast's averages are apart and how long each library
spent averaging.

    python examples/swap_the_import.py                 # about 10 s on a 2-core CPU
    python examples/swap_the_import.py --steps 600 --device cuda

(The full recipes of the SWA and large-batch papers are separate examples.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim import swa_utils as torch_swa_utils  # noqa: E402

from swa_fast import swa_utils  # noqa: E402  (the swap: was `from torch.optim import swa_utils`)

from recipe_lib.datasets import synthetic_bands  # noqa: E402

BATCH_SIZE = 64
EMA_DECAY = 0.99


def make_model() -> nn.Module:
    """A small CNN with BatchNorm (so the SWA averages need ``update_bn``, as real ones do).

    It pools to a 4x4 grid, not to one value per channel: the classes differ in where the band is.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, 10),
    )


def make_data(n: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` normalized 1x28x28 images and their labels, generated in memory."""
    images, labels = synthetic_bands(n, np.random.default_rng(seed))
    x = torch.from_numpy(images).float().div_(255).unsqueeze(1)
    return ((x - x.mean()) / x.std()).to(device), torch.from_numpy(labels).long().to(device)


def batches(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    """Shuffled batches, pass after pass (the generator makes the order reproducible)."""
    while True:
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for start in range(0, len(x) - BATCH_SIZE + 1, BATCH_SIZE):
            index = order[start:start + BATCH_SIZE]
            yield x[index], y[index]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def timed_update(averaged: torch_swa_utils.AveragedModel, model: nn.Module, device: str) -> float:
    """Seconds of one ``update_parameters`` (synchronized on a GPU, where the call only queues work)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    averaged.update_parameters(model)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def max_abs_difference(a: nn.Module, b: nn.Module) -> float:
    """Largest elementwise difference of two averages' parameters (what ``update_parameters`` computes)."""
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max((p.double() - q.double()).abs().max().item() for p, q in pairs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="SGD steps of batch 64 (default: 200)")
    parser.add_argument("--swa-every", type=int, default=10,
                        help="SWA takes the weights every this many steps of the second half (default: 10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when there is one)")
    return parser.parse_args(argv)


Pairs = dict[str, tuple[torch_swa_utils.AveragedModel, torch_swa_utils.AveragedModel]]  # name -> (torch, ours)


def make_averages(model: nn.Module) -> Pairs:
    """An SWA average and an EMA of ``model``, each kept by torch and by swa_fast."""
    return {
        "SWA": (torch_swa_utils.AveragedModel(model), swa_utils.AveragedModel(model)),
        "EMA": (torch_swa_utils.AveragedModel(model, multi_avg_fn=torch_swa_utils.get_ema_multi_avg_fn(EMA_DECAY)),
                swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(EMA_DECAY))),
    }


def train(args: argparse.Namespace, model: nn.Module, pairs: Pairs,
          data: Iterator[tuple[torch.Tensor, ...]]) -> tuple[list[float], dict[tuple[str, str], float], dict[str, int]]:
    """SGD steps, averaging as it goes; returns the loss lines, seconds spent averaging and update counts."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seconds = {(name, side): 0.0 for name in pairs for side in ("torch", "swa_fast")}
    updates = dict.fromkeys(pairs, 0)
    swa_from = args.steps // 2  # SWA averages the second half, where the loss has flattened
    losses: list[float] = []  # the first step's loss, then the mean loss of each reporting window
    window: list[torch.Tensor] = []
    for step in range(1, args.steps + 1):
        model.train()
        images, labels = next(data)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        window.append(loss.detach())
        due = {"EMA": True, "SWA": step > swa_from and (step - swa_from) % args.swa_every == 0}
        for name, (theirs, ours) in pairs.items():
            if due[name]:
                seconds[(name, "torch")] += timed_update(theirs, model, args.device)
                seconds[(name, "swa_fast")] += timed_update(ours, model, args.device)
                updates[name] += 1
        if step == 1 or step * 6 // args.steps != (step - 1) * 6 // args.steps:  # the first step, then 6 lines
            losses.append(torch.stack(window).mean().item())  # one host sync per report, not per step
            window.clear()
            print(f"  step {step:4d}: loss {losses[-1]:.3f}")
    return losses, seconds, updates


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, average both ways, print the comparison; returns its figures (for the tests)."""
    args = parse_args(argv)
    torch.manual_seed(0)
    train_x, train_y = make_data(4096, seed=1, device=args.device)
    test_x, test_y = make_data(1000, seed=2, device=args.device)
    model = make_model().to(args.device)
    pairs = make_averages(model)
    data = batches(train_x, train_y, torch.Generator().manual_seed(3))
    print(f"training a small CNN on {len(train_x)} synthetic images ({args.device}), {args.steps} steps "
          "(loss: mean over the steps since the previous line):")
    losses, seconds, updates = train(args, model, pairs, data)

    # Each library's update_bn recomputes the BatchNorm statistics of its own averages.
    bn_batches = [next(data)[0] for _ in range(16)]  # 1024 images: plenty for 48 channels' statistics
    accuracies = {"model": accuracy(model, test_x, test_y)}
    differences = {}
    for name, (theirs, ours) in pairs.items():
        differences[name] = max_abs_difference(theirs, ours)
        torch_swa_utils.update_bn(bn_batches, theirs)
        swa_utils.update_bn(bn_batches, ours)
        accuracies[f"{name} torch"] = accuracy(theirs, test_x, test_y)
        accuracies[f"{name} swa_fast"] = accuracy(ours, test_x, test_y)

    print(f"test accuracy on {len(test_x)} images: model {100 * accuracies['model']:.1f}%, "
          + ", ".join(f"{key} {100 * value:.1f}%" for key, value in accuracies.items() if key != "model"))
    ms = {key: 1e3 * value / max(1, updates[key[0]]) for key, value in seconds.items()}
    for name in pairs:
        print(f"{name} ({updates[name]} updates): max |torch - swa_fast| = {differences[name]:.2e}; "
              f"update_parameters {ms[(name, 'torch')]:.3f} ms (torch) vs {ms[(name, 'swa_fast')]:.3f} ms "
              f"(swa_fast)")
    return {"losses": losses, "accuracy": accuracies, "max_abs_diff": differences, "updates": updates,
            "ms_per_update": ms}


if __name__ == "__main__":
    main()
