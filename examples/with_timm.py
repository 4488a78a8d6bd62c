"""timm's ``ModelEmaV3`` with swa_fast's fused update: swap one import.

In a timm training script replace::

    from timm.utils.model_ema import ModelEmaV3

with::

    from swa_fast.integrations.timm import ModelEmaV3

and keep everything else: the constructor, ``model_ema.update(model, step=num_updates)``,
evaluating ``model_ema.module`` and ``timm.utils.get_state_dict(model_ema, unwrap_model)`` for the
checkpoint (the same ``state_dict`` keys as timm's class).

This script trains a small MLP with BatchNorm on a synthetic 4-class task generated in memory (no
downloads), keeps an EMA with timm's warm-up, and prints the loss and accuracy of the model and
of the EMA as training goes. When timm itself imports (it needs torchvision), timm's class runs
side by side and the script prints how far the two EMAs are apart (float32: bitwise equal).

    python examples/with_timm.py              # a few seconds on a 2-core CPU
    python examples/with_timm.py --bf16-ema   # the EMA in bfloat16 with stochastic rounding
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from torch import nn  # noqa: E402

from swa_fast.integrations.timm import ModelEmaV3  # noqa: E402  (was: from timm.utils.model_ema import ModelEmaV3)

try:  # only for the side-by-side comparison; timm's package import needs torchvision
    from timm.utils.model_ema import ModelEmaV3 as TimmModelEmaV3
except Exception:  # noqa: BLE001 - any import failure just skips the comparison
    TimmModelEmaV3 = None

CLASSES = 4
FEATURES = 16


def synthetic_task(count: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``count`` noisy points around 4 fixed class centres (the centres do not depend on ``seed``)."""
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0)) * 1.5
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    points = centres[labels] + torch.randn(count, FEATURES, generator=generator) * 1.8
    return points, labels


@torch.no_grad()
def evaluate(model: nn.Module, points: torch.Tensor, labels: torch.Tensor) -> Tuple[float, float]:
    model.eval()
    logits = model(points.to(next(model.parameters()).dtype)).float()  # a bf16 EMA takes bf16 inputs
    loss = nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--decay", type=float, default=0.998)
    parser.add_argument("--bf16-ema", action="store_true", help="keep the EMA in bfloat16 (stochastic rounding)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the model is tiny: more threads only add synchronisation
    torch.manual_seed(0)
    train_x, train_y = synthetic_task(args.steps * args.batch_size, seed=1)
    test_x, test_y = synthetic_task(2000, seed=2)
    model = nn.Sequential(nn.Linear(FEATURES, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)

    options = dict(decay=args.decay, use_warmup=True, dtype=torch.bfloat16 if args.bf16_ema else None)
    model_ema = ModelEmaV3(model, **options)  # exactly timm's call
    timm_ema = TimmModelEmaV3(model, **options) if TimmModelEmaV3 is not None else None

    num_updates = 0
    for step in range(args.steps):
        model.train()
        batch = slice(step * args.batch_size, (step + 1) * args.batch_size)
        loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        num_updates += 1
        model_ema.update(model, step=num_updates)  # as timm's train.py calls it
        if timm_ema is not None:
            timm_ema.update(model, step=num_updates)
        if num_updates % 100 == 0 or num_updates == args.steps:
            model_loss, model_acc = evaluate(model, test_x, test_y)
            ema_loss, ema_acc = evaluate(model_ema.module, test_x, test_y)
            print(f"step {num_updates:4d}  train loss {loss.item():.3f}  |  model: test loss {model_loss:.3f} "
                  f"acc {model_acc:.3f}  |  EMA (decay {model_ema.get_decay(num_updates):.4f}): "
                  f"test loss {ema_loss:.3f} acc {ema_acc:.3f}")

    state = model_ema.state_dict()  # timm's keys: module.<name>
    print(f"EMA state_dict: {len(state)} entries, e.g. {list(state)[:2]}")
    if timm_ema is None:
        print("timm is not importable here (it needs torchvision): no side-by-side comparison")
    else:
        theirs = timm_ema.state_dict()
        assert list(theirs) == list(state)
        gap = max((state[k].double() - theirs[k].double()).abs().max().item() for k in state)
        print(f"timm's ModelEmaV3 on the same run: largest difference {gap:.3g}")


if __name__ == "__main__":
    main()
