"""The SWA tutorial recipe: a ResNet-18-style network with Adam, baseline vs SWA.

What it reproduces (see docs/RESULTS.md and ../README.md): the tutorial
fine-tunes a ResNet-18 on the Intel image data with Adam (lr 1e-4, cosine
schedule with linear warm-up, 120 epochs); the SWA variant trains the same way
until ``--swa-start``, then switches to ``SWALR`` at ``--swa-lr``, averages the
weights after every epoch and recomputes the BN statistics with ``update_bn``
at the end. There, SWA with swa_lr <= 1e-4 beat the baseline (94.57% vs
94.10% at start 90, lr 5e-5) and too large a swa_lr for Adam (0.05) broke
training (80.53%).

Every SWA arm starts from the baseline's checkpoint at its ``--swa-start``
(their training is identical until then), so an arm costs only its averaging
epochs. ``--sweep`` runs a grid of swa_lr x swa_start and prints the
tutorial's table shape (rows: baseline, SWA_<start>_<lr>).

    python examples/swa_tutorial.py                      # quick preset, Fashion-MNIST
    python examples/swa_tutorial.py --preset smoke       # under a minute: the whole path on small subsets
    python examples/swa_tutorial.py --seeds 0 1 2 --sweep
    python examples/swa_tutorial.py --preset medium      # all 60k/10k images, 10 averaged epochs: about an hour
    python examples/swa_tutorial.py --preset paper --dataset folder --data-dir intel/ --device cuda
    torchrun --nproc_per_node=2 examples/swa_tutorial.py --device cpu
    torchrun --nproc_per_node=2 examples/swa_tutorial.py --device cpu --fsdp   # the model sharded with FSDP2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.optim.lr_scheduler import CosineAnnealingLR  # noqa: E402

from swa_fast.regime import LinearWarmup  # noqa: E402
from swa_fast.swa_utils import SWALR  # noqa: E402

from recipe_lib.recipe import (  # noqa: E402
    COUNT, INTEGER, NON_NEGATIVE, NON_NEGATIVE_INT, RATE, Arm, ImageDataset, MeasuredSpread, RecipeSpec, SWASettings,
    check_distinct, check_epochs, check_swa_start, check_warmup, describe_preset, parse_recipe_args, recipe_main,
    recipe_parser,
)


PRESETS = {
    # Under a minute on a 2-core CPU (the real 60k Fashion-MNIST too: only the subsets are trained on): both
    # arms, the SWA arm's branch, SWALR, two averaging updates, update_bn and the report.
    "smoke": dict(model="resnet18_small", epochs=3, batch_size=128, lr=2e-3, warmup_epochs=1, swa_start=1,
                  swa_lr=5e-4, swa_anneal_epochs=1, train_subset=2048, test_subset=1000, image_size=None,
                  augment=True),
    # Minutes on a 2-core CPU: a narrow ResNet-18 on a Fashion-MNIST subset, trained from scratch (so a larger
    # Adam lr than the tutorial's fine-tuning lr), SWA over the last third.
    "quick": dict(model="resnet18_small", epochs=12, batch_size=128, lr=2e-3, warmup_epochs=1, swa_start=8,
                  swa_lr=5e-4, swa_anneal_epochs=1, train_subset=6000, test_subset=2000, image_size=None,
                  augment=True),
    # All 60k training and 10k test images: the quick preset's network and lrs over 30 epochs, SWA averaging after
    # each of the last 10 (from the baseline's checkpoint at epoch 20). About an hour a seed on a 2-core CPU.
    "medium": dict(model="resnet18_small", epochs=30, batch_size=128, lr=2e-3, warmup_epochs=1, swa_start=20,
                   swa_lr=5e-4, swa_anneal_epochs=1, train_subset=0, test_subset=0, image_size=None,
                   augment=True),
    # The tutorial's settings (it fine-tuned ImageNet weights; here the network starts from scratch).
    "paper": dict(model="resnet18", epochs=120, batch_size=256, lr=1e-4, warmup_epochs=5, swa_start=90,
                  swa_lr=5e-5, swa_anneal_epochs=5, train_subset=0, test_subset=0, image_size=150,
                  augment=True),
}
MEDIUM = ("medium = all 60,000 training and 10,000 test images, 30 epochs, SWA averaging the last 10: about an hour "
          "a seed on a 2-core CPU")
SWEEP_LR_FACTORS = (500, 5, 1, 0.5, 0.1)
# The seed-to-seed spread (sample std over seeds 0 1 2, accuracy points) in docs/RESULTS.md's table of the quick
# preset: context for the verdict of a one-seed run. Copied, not computed; tests/test_recipe_cli.py checks it.
MEASURED_SPREAD = {"quick": MeasuredSpread({"baseline": 1.07, "SWA_8_0.0005": 0.92})}


def build_parser() -> argparse.ArgumentParser:
    """The recipe's command line (every preset-controlled option defaults to None until :func:`apply_preset`)."""
    p, h = recipe_parser(__doc__, PRESETS, "swa_tutorial")
    describe_preset(p, MEDIUM)
    t = p.add_argument_group("training (Adam, cosine with linear warm-up)")
    t.add_argument("--epochs", type=INTEGER, default=None, help=h("epochs", "epochs of every arm"))
    t.add_argument("--batch-size", type=COUNT, default=None, help=h("batch_size", "per-process batch size"))
    t.add_argument("--lr", type=RATE, default=None, help=h("lr", "Adam learning rate"))
    t.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0,
                   help="Adam weight decay (L2 added to the gradient)")
    t.add_argument("--warmup-epochs", type=NON_NEGATIVE_INT, default=None,
                   help=h("warmup_epochs", "linear warm-up epochs (at most --epochs)"))
    s = p.add_argument_group("SWA")
    s.add_argument("--swa-start", type=INTEGER, default=None,
                   help=h("swa_start", "epochs before averaging starts (average after every later epoch)"))
    s.add_argument("--swa-lr", type=RATE, default=None, help=h("swa_lr", "SWALR's learning rate"))
    s.add_argument("--swa-anneal-epochs", type=NON_NEGATIVE_INT, default=None,
                   help=h("swa_anneal_epochs", "SWALR's cosine anneal from the current lr to swa_lr"))
    s.add_argument("--sweep", action="store_true",
                   help="an SWA arm for every --sweep-lrs x --sweep-starts (the tutorial's table)")
    s.add_argument("--sweep-lrs", type=RATE, nargs="+", default=None,
                   help="swa_lr values of the sweep (default: 500x, 5x, 1x, 0.5x and 0.1x --lr: the tutorial's "
                        "0.05, 5e-4, 1e-4, 5e-5, 1e-5 around its lr 1e-4)")
    s.add_argument("--sweep-starts", type=COUNT, nargs="+", default=None,
                   help="swa_start values of the sweep (default: --swa-start, 1/8 and 1/4 of the epochs earlier: "
                        "the tutorial's 90, 75, 60 of 120)")
    s.add_argument("--baseline-only", action="store_true", help="train the baseline arm only (not with --sweep)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_recipe_args(build_parser(), PRESETS, argv)


def validate(args: argparse.Namespace) -> None:
    """The options that go together, the epochs (every other check depends on them), the warm-up, then each
    SWA arm's start and the sweep's values."""
    if args.sweep and args.baseline_only:
        raise SystemExit("--baseline-only does not go with --sweep")
    if not args.sweep and (args.sweep_lrs or args.sweep_starts):
        raise SystemExit("--sweep-lrs and --sweep-starts go with --sweep")
    if args.baseline_only:
        check_epochs(args.epochs, 1, "train at least one epoch")
    else:
        check_epochs(args.epochs, 2, "SWA needs at least one epoch before --swa-start and one to average after it")
    check_warmup("--warmup-epochs", args.warmup_epochs, args.epochs)
    if args.sweep:
        for start in args.sweep_starts or []:
            check_swa_start(start, args.epochs, name="--sweep-starts")
        check_distinct("--sweep-starts", args.sweep_starts or [])
        check_distinct("--sweep-lrs", args.sweep_lrs or [], shown=lambda lr: f"{lr:g}")  # as the row labels
    for start, _ in sweep_grid(args):
        check_swa_start(start, args.epochs)


def swa_label(start: int, lr: float) -> str:
    """The tutorial's row name, e.g. ``SWA_90_5e-05``."""
    return f"SWA_{start}_{lr:g}"


def sweep_grid(args: argparse.Namespace) -> list[tuple[int, float]]:
    """(swa_start, swa_lr) of every SWA arm."""
    if not args.sweep:
        return [] if args.baseline_only else [(args.swa_start, args.swa_lr)]
    # The tutorial's grid around its lr 1e-4: swa_lr 0.05, 5e-4, 1e-4, 5e-5, 1e-5 and starts 90, 75, 60 of 120.
    lrs = args.sweep_lrs or [factor * args.lr for factor in SWEEP_LR_FACTORS]
    starts = args.sweep_starts or sorted({max(1, args.swa_start - args.epochs * k // 8) for k in (0, 1, 2)},
                                         reverse=True)
    return [(start, lr) for start in starts for lr in lrs]


def make_arms(args: argparse.Namespace, train: ImageDataset) -> list[Arm]:
    validate(args)
    epochs, warmup = args.epochs, args.warmup_epochs

    def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    def scheduler(opt: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
        # Stepped once per epoch, as in the tutorial: warm-up epochs, then a cosine over the rest.
        cosine = CosineAnnealingLR(opt, T_max=max(1, epochs - warmup))
        return LinearWarmup(opt, warmup_steps=warmup, after=cosine)

    arms = [Arm("baseline", "baseline", epochs, args.batch_size, optimizer, scheduler)]
    for start, lr in sweep_grid(args):
        def swalr(opt: torch.optim.Optimizer, lr: float = lr) -> SWALR:
            return SWALR(opt, swa_lr=lr, anneal_epochs=args.swa_anneal_epochs, anneal_strategy="cos")

        label = swa_label(start, lr)
        swa = SWASettings(start=start, label=label, make_scheduler=swalr, eval_every=1,
                          compare_torch=not args.no_compare_torch)
        # Identical to the baseline until `start`: begin from its checkpoint there.
        arms.append(Arm(label, None, epochs, args.batch_size, optimizer, scheduler, swa=swa,
                        branch_from=("baseline", start), curve=f"{label} run"))
    return arms


def row_order(args: argparse.Namespace) -> list[str]:
    return ["baseline"] + swa_rows(args)


def swa_rows(args: argparse.Namespace) -> list[str]:
    """The SWA rows, which the verdict compares with the baseline (the best of them in a sweep)."""
    return [swa_label(start, lr) for start, lr in sweep_grid(args)]


def describe(label: str) -> str:
    """A row in words for the verdict: ``SWA_8_0.0005`` -> ``SWA (start 8, swa_lr 0.0005)``."""
    if label == "baseline":
        return "the baseline"
    _, start, lr = label.split("_", 2)
    return f"SWA (start {start}, swa_lr {lr})"


SPEC = RecipeSpec("swa_tutorial", "SWA tutorial: baseline (Adam, cosine) vs SWA (SWALR, update_bn)",
                  make_arms, row_order, baseline=lambda args: "baseline", headline=swa_rows, describe=describe,
                  measured_spread=MEASURED_SPREAD)


def main(argv: list[str] | None = None) -> int:
    return recipe_main(SPEC, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
