""""Train longer, generalize better": closing the large-batch generalization gap step by step.

Hoffer, Hubara and Soudry (NeurIPS 2017) argue the gap between small-batch
(SB) and large-batch (LB) training comes from too few weight updates, not from
the batch size itself. This recipe trains the rows of their comparison, each
adding one fix to the large batch:

    SB              batch B_S, lr, E epochs, lr decays at the milestones
    LB              batch B_L, otherwise the same regime
    LB +LR          lr * sqrt(B_L / B_S)            (swa_fast.regime.sqrt_lr_scaling)
    LB +LR +GBN     + ghost batch norm of B_S samples (swa_fast.nn.convert_ghost_batchnorm)
    LB +LR +GBN +RA + regime adaptation: E and the milestones x B_L / B_S (swa_fast.regime.adapt_regime),
                      i.e. as many weight updates as SB

Every arm records ||w_t - w_0|| with swa_fast.distance.WeightDistanceTracker
(log-spaced iterations); ``distance.png`` plots it against log t with the
paper's ``a + b log t`` fit. The paper's models are the F1 fully connected
network (Keskar et al.) and ResNet-44.

    python examples/large_batch.py --seeds 0 1 2              # quick preset: F1 on Fashion-MNIST
    python examples/large_batch.py --preset smoke             # under a minute: every arm on small subsets
    python examples/large_batch.py --preset paper --dataset cifar10 --data-dir cifar-10-batches-py --device cuda
    torchrun --nproc_per_node=2 examples/large_batch.py --device cpu
    torchrun --nproc_per_node=2 examples/large_batch.py --device cpu --fsdp   # the model sharded with FSDP2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.optim.lr_scheduler import LRScheduler, MultiStepLR  # noqa: E402

from swa_fast.regime import LinearWarmup, adapt_regime, sqrt_lr_scaling  # noqa: E402

from recipe_lib.recipe import (  # noqa: E402
    COUNT, INTEGER, MOMENTUM, NON_NEGATIVE, RATE, Arm, ArmResult, ImageDataset, MeasuredSpread, RecipeSpec,
    check_epochs, check_warmup, check_within_epochs, parse_recipe_args, recipe_main, recipe_parser,
)


PRESETS = {
    # Under a minute on a 2-core CPU (also on the real 60k Fashion-MNIST: only the subsets are trained on): all
    # five arms, batch 64 vs 512 (x8, so the large batch still takes 4 steps an epoch), RA: 16 epochs.
    "smoke": dict(model="f1", epochs=2, milestones=[1], small_batch=64, large_batch=512, lr=0.01,
                  weight_decay=5e-4, train_subset=2048, test_subset=1000, augment=False),
    # About 1.5 minutes per seed on a 2-core CPU: F1 on 20k Fashion-MNIST images (no augmentation, as the
    # paper's F1 on MNIST), batch 64 vs 1024 (x16), lr 0.01 tuned for the small batch.
    "quick": dict(model="f1", epochs=5, milestones=[3, 4], small_batch=64, large_batch=1024, lr=0.01,
                  weight_decay=5e-4, train_subset=20000, test_subset=5000, augment=False),
    # ResNet-44 on CIFAR-10, batch 128 vs 4096 (x32): the adapted regime trains 3200 epochs. Meant for a GPU.
    "paper": dict(model="resnet44", epochs=100, milestones=[50, 75], small_batch=128, large_batch=4096, lr=0.1,
                  weight_decay=5e-4, train_subset=0, test_subset=0, augment=True),
}
ARM_ORDER = ("sb", "lb", "lb_lr", "lb_lr_gbn", "lb_lr_gbn_ra")
# The seed-to-seed spread (sample std over seeds 0 1 2, accuracy points) in docs/RESULTS.md's table of the quick
# preset: context for the verdict of a one-seed run. Copied, not computed; tests/test_recipe_cli.py checks it.
MEASURED_SPREAD = {"quick": MeasuredSpread({"SB (B=64)": 0.08, "LB (B=1024)": 0.12, "LB +LR (lr 0.04)": 0.33,
                                            "LB +LR +GBN (ghost 64)": 0.54,
                                            "LB +LR +GBN +RA (80 epochs, x16)": 0.11})}


def build_parser() -> argparse.ArgumentParser:
    """The recipe's command line (every preset-controlled option defaults to None until :func:`apply_preset`)."""
    p, h = recipe_parser(__doc__, PRESETS, "large_batch")
    t = p.add_argument_group("regime (SGD, momentum 0.9, lr x0.1 at each milestone)")
    t.add_argument("--epochs", type=INTEGER, default=None,
                   help=h("epochs", "E: epochs of the small-batch regime"))
    t.add_argument("--milestones", type=COUNT, nargs="*", default=None,
                   help=h("milestones", "lr decay epochs, increasing, each before the last epoch"))
    t.add_argument("--small-batch", type=COUNT, default=None, help=h("small_batch", "B_S (per process)"))
    t.add_argument("--large-batch", type=COUNT, default=None, help=h("large_batch", "B_L (per process)"))
    t.add_argument("--lr", type=RATE, default=None, help=h("lr", "learning rate at B_S"))
    t.add_argument("--momentum", type=MOMENTUM, default=0.9, help="SGD momentum")
    t.add_argument("--weight-decay", type=NON_NEGATIVE, default=None, help=h("weight_decay", "weight decay"))
    t.add_argument("--ghost-batch-size", type=COUNT, default=None,
                   help="ghost batch size, at most B_L (default: B_S)")
    t.add_argument("--warmup-epochs", type=NON_NEGATIVE, default=0.0,
                   help="linear lr warm-up of the large-batch arms, in epochs (at most --epochs)")
    t.add_argument("--clip-grad-norm", type=RATE, default=None,
                   help="clip the large-batch arms' gradient norm to this value")
    t.add_argument("--arms", nargs="+", choices=ARM_ORDER, default=list(ARM_ORDER), help="which rows to train")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_recipe_args(build_parser(), PRESETS, argv)


def _step_schedule(epochs: float, milestones: list[float], warmup_epochs: float):
    """``(optimizer, steps_per_epoch) -> scheduler`` stepped per iteration: warm-up, then x0.1 at each milestone."""

    def make(opt: torch.optim.Optimizer, steps: int) -> LRScheduler:
        warmup = round(warmup_epochs * steps)
        # LinearWarmup's inner scheduler counts its steps from the end of the warm-up.
        decay = MultiStepLR(opt, milestones=[max(1, round(m * steps) - warmup) for m in milestones], gamma=0.1)
        return LinearWarmup(opt, warmup_steps=warmup, after=decay)

    return make


def make_arms(args: argparse.Namespace, train: ImageDataset) -> list[Arm]:
    check_epochs(args.epochs, 1, "every arm trains at least one epoch")
    for milestone in args.milestones:
        check_within_epochs("--milestones", milestone, args.epochs, "an lr decay after the last epoch changes nothing")
    if sorted(set(args.milestones)) != args.milestones:
        raise SystemExit(f"--milestones {' '.join(map(str, args.milestones))} must increase")
    check_warmup("--warmup-epochs", args.warmup_epochs, args.epochs)
    b_s, b_l = args.small_batch, args.large_batch
    if b_l <= b_s:
        raise SystemExit(f"--large-batch ({b_l}) must be larger than --small-batch ({b_s})")
    ghost = args.ghost_batch_size or b_s
    if ghost > b_l:
        raise SystemExit(f"--ghost-batch-size {ghost} must not exceed --large-batch ({b_l}): a ghost batch is a "
                         "part of the batch")
    scaled_lr = sqrt_lr_scaling(args.lr, b_l, b_s)
    adapted = adapt_regime(args.epochs, args.milestones, b_l, b_s)
    ra_epochs = int(round(adapted.epochs))

    def sgd(lr: float):
        def make(model: torch.nn.Module) -> torch.optim.Optimizer:
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
        return make

    plain = _step_schedule(args.epochs, args.milestones, 0.0)
    warm = _step_schedule(args.epochs, args.milestones, args.warmup_epochs)
    ratio = b_l // b_s if b_l % b_s == 0 else b_l / b_s
    lb = dict(scheduler_per_iteration=True, distance=True, clip_grad_norm=args.clip_grad_norm)
    arms = {
        "sb": Arm("sb", f"SB (B={b_s})", args.epochs, b_s, sgd(args.lr), plain, scheduler_per_iteration=True,
                  distance=True),
        "lb": Arm("lb", f"LB (B={b_l})", args.epochs, b_l, sgd(args.lr), warm, **lb),
        "lb_lr": Arm("lb_lr", f"LB +LR (lr {scaled_lr:.3g})", args.epochs, b_l, sgd(scaled_lr), warm, **lb),
        "lb_lr_gbn": Arm("lb_lr_gbn", f"LB +LR +GBN (ghost {ghost})", args.epochs, b_l, sgd(scaled_lr), warm,
                         ghost_batch_size=ghost, **lb),
        "lb_lr_gbn_ra": Arm("lb_lr_gbn_ra", f"LB +LR +GBN +RA ({ra_epochs} epochs, x{ratio})", ra_epochs, b_l,
                            sgd(scaled_lr), _step_schedule(ra_epochs, list(adapted.milestones), args.warmup_epochs),
                            ghost_batch_size=ghost, **lb),
    }
    return [arms[name] for name in ARM_ORDER if name in args.arms]


def row_order(args: argparse.Namespace) -> list[str]:
    return [arm.label for arm in make_arms(args, None)]  # type: ignore[arg-type]


def regime_report(args: argparse.Namespace, results: list[ArmResult]) -> str:
    """Epochs, weight updates and distance travelled per arm (first seed)."""
    arms = {arm.name: arm for arm in make_arms(args, None)}  # type: ignore[arg-type]
    lines = ["| arm | batch | epochs | weight updates | final distance |", "| --- | --- | --- | --- | --- |"]
    first = min(r.seed for r in results)
    for result in results:
        if result.seed == first and result.distances:
            arm = arms[result.arm]
            steps, distance = result.distances[-1]
            lines.append(f"| {arm.label} | {arm.batch_size} | {arm.epochs} | {steps} | {distance:.3f} |")
    return "Regimes (first seed):\n\n" + "\n".join(lines)


def headline(args: argparse.Namespace) -> list[str]:
    """The row the verdict compares with SB: the last large-batch row trained (with every fix, by default)."""
    return row_order(args)[-1:]


SPEC = RecipeSpec("large_batch", "Train longer, generalize better: SB vs LB +LR +GBN +RA", make_arms, row_order,
                  baseline=lambda args: f"SB (B={args.small_batch})", headline=headline,
                  measured_spread=MEASURED_SPREAD, extra_report=regime_report,
                  plot_x="steps")  # arms of different batch sizes compared at equal weight updates


def main(argv: list[str] | None = None) -> int:
    return recipe_main(SPEC, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
