"""The SWA paper's comparison: SGD with the paper's schedule vs SWA at budgets 1, 1.25 and 1.5.

Izmailov et al. (UAI 2018) train with SGD for a budget of B epochs: lr
constant for the first half, linear down to 1% of it by 90%, constant after.
SWA follows the same shape over its first ``--swa-start`` epochs, but decays
only to ``--swa-lr`` and stays there, averaging the weights after every
later epoch; BN statistics are recomputed for the average (``update_bn``).
Their result: SWA beats SGD on CIFAR-10/100 with VGG-16, PreResNet-164 and
WRN-28-10, and bigger budgets help. The budget B is ``--epochs`` (as in the
other recipes; ``--budget`` is an alias).

The SWA schedule does not depend on the budget, so budgets 1 and 1.25 are
the budget-1.5 run's average after B and 1.25 B epochs: one SWA run gives all
three rows. ``--fge`` adds an FGE-style snapshot ensemble at the 1.5 budget:
after ``--swa-start`` (it starts from the SWA arm's checkpoint there), the lr
falls linearly from swa_lr to swa_lr/100 over each cycle of ``--fge-cycle``
epochs (cycles aligned to end with the budget), and the snapshot at each
cycle's end joins an ensemble of predictions (k forward passes at test time,
where SWA needs one).

    python examples/swa_paper.py --seeds 0 1 2                  # quick preset, Fashion-MNIST
    python examples/swa_paper.py --preset smoke                 # under a minute: the whole path
    python examples/swa_paper.py --preset medium                # all 60k/10k images, 14 averaged epochs
    python examples/swa_paper.py --preset paper --dataset cifar100 --data-dir cifar-100-python \\
        --model preresnet164 --lr 0.1 --swa-lr 0.05 --device cuda --fge
    torchrun --nproc_per_node=2 examples/swa_paper.py --device cpu
    torchrun --nproc_per_node=2 examples/swa_paper.py --device cpu --fsdp   # the model sharded with FSDP2
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from swa_fast.regime import SWAScheduleLR  # noqa: E402

from recipe_lib.recipe import (  # noqa: E402
    COUNT, INTEGER, MOMENTUM, NON_NEGATIVE, RATE, Arm, FGESettings, ImageDataset, MeasuredSpread, Number, RecipeSpec,
    SWASettings, check_epochs, check_swa_start, describe_preset, parse_recipe_args, recipe_main, recipe_parser,
)


# ``epochs`` is the budget B: SGD trains B epochs, the SWA run 1.5 B.
PRESETS = {
    # Under a minute on a 2-core CPU (also on the real 60k Fashion-MNIST: only the subsets are trained on): a
    # 4-epoch budget, so the three budgets are distinct epochs (4, 5, 6) and each gets its own update_bn.
    "smoke": dict(model="vgg_small", epochs=4, batch_size=128, lr=0.05, weight_decay=5e-4, swa_lr=0.01,
                  swa_start=2, train_subset=2048, test_subset=1000, augment=True),
    # A few minutes on a 2-core CPU: the small VGG-16-BN variant, a 10-epoch budget on 10k Fashion-MNIST images.
    "quick": dict(model="vgg_small", epochs=10, batch_size=128, lr=0.05, weight_decay=5e-4, swa_lr=0.01,
                  swa_start=8, train_subset=10000, test_subset=0, augment=True),
    # All 60k training and 10k test images: the quick preset's network and lrs, a 20-epoch budget with SWA from
    # epoch 16 (the paper's 80%), so the SWA run averages after each of epochs 17-30 (14 epochs at 1.5 budgets).
    # About 17 minutes a seed on a 2-core CPU.
    "medium": dict(model="vgg_small", epochs=20, batch_size=128, lr=0.05, weight_decay=5e-4, swa_lr=0.01,
                   swa_start=16, train_subset=0, test_subset=0, augment=True),
    # The paper's VGG-16 on CIFAR: 200-epoch budget, SWA from epoch 161 at lr 0.01 (PreResNet/WRN: lr 0.1,
    # swa_lr 0.05 on CIFAR-100, as in the paper's table).
    "paper": dict(model="vgg16_bn", epochs=200, batch_size=128, lr=0.05, weight_decay=5e-4, swa_lr=0.01,
                  swa_start=161, train_subset=0, test_subset=0, augment=True),
}
SWA_BUDGETS = (1.0, 1.25, 1.5)
MEDIUM = ("medium = all 60,000 training and 10,000 test images, a 20-epoch budget, SWA from epoch 16 (14 averaged "
          "epochs at 1.5 budgets): about 17 minutes a seed on a 2-core CPU")
# The seed-to-seed spread (sample std over seeds 0 1 2, accuracy points) in docs/RESULTS.md's table of the quick
# preset: context for the verdict of a one-seed run. Copied, not computed; tests/test_recipe_cli.py checks it.
MEASURED_SPREAD = {"quick": MeasuredSpread({"SGD": 0.40, "SWA 1 budget": 0.44, "SWA 1.25 budgets": 0.35,
                                            "SWA 1.5 budgets": 0.36, "FGE 1.5 budgets": 0.40})}
EPOCHS_OPTION = "--epochs (the budget B)"
# 0: the average is evaluated only at the budgets (SWASettings.eval_every 0: only at report points).
EVAL_EVERY = Number(int, 0, zero="only at the budgets")


class FGECyclicLR(SWAScheduleLR):
    """The SWA schedule until ``cycle_from``, then repeating linear ramps from ``high`` to ``low``.

    A subclass of the SWA arm's scheduler with the same ``total_steps`` and
    ``swa_lr``, so the FGE arm can load the SWA arm's scheduler state where it
    branches from it. Stepped once per iteration; each cycle ends at ``low``,
    where its snapshot is taken.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, swa_lr: float, cycle_from: int,
                 cycle_steps: int, high: float, low: float) -> None:
        self.cycle_from, self.cycle_steps, self.high, self.low = cycle_from, cycle_steps, high, low
        super().__init__(optimizer, total_steps, swa_lr)

    def _get_closed_form_lr(self) -> list[float]:
        step = self.last_epoch
        if step < self.cycle_from:
            return super()._get_closed_form_lr()
        # Position in the cycle in (0, 1]: the last step of a cycle sits exactly at `low`.
        t = ((step - self.cycle_from) % self.cycle_steps + 1) / self.cycle_steps
        return [self.high + (self.low - self.high) * t for _ in self.base_lrs]


def budget_epochs(budget: int, fraction: float) -> int:
    """Epochs of ``fraction`` budgets (halves round up: 1.25 x 10 = 13)."""
    return int(math.floor(budget * fraction + 0.5))


def budget_label(fraction: float) -> str:
    return f"SWA {fraction:g} budget" + ("s" if fraction != 1 else "")


def build_parser() -> argparse.ArgumentParser:
    """The recipe's command line (every preset-controlled option defaults to None until :func:`apply_preset`)."""
    p, h = recipe_parser(__doc__, PRESETS, "swa_paper")
    describe_preset(p, MEDIUM)
    t = p.add_argument_group("training (SGD, momentum 0.9)")
    # One vocabulary across the recipes: --epochs; --budget (the paper's word) stays as an alias.
    t.add_argument("--epochs", "--budget", dest="epochs", type=INTEGER, default=None,
                   help=h("epochs", "the budget B: epochs of the SGD run; SWA is reported at B, 1.25 B and 1.5 B "
                                    "(--budget is an alias)"))
    t.add_argument("--batch-size", type=COUNT, default=None, help=h("batch_size", "per-process batch size"))
    t.add_argument("--lr", type=RATE, default=None, help=h("lr", "initial learning rate"))
    t.add_argument("--momentum", type=MOMENTUM, default=0.9, help="SGD momentum")
    t.add_argument("--weight-decay", type=NON_NEGATIVE, default=None, help=h("weight_decay", "weight decay"))
    s = p.add_argument_group("SWA and FGE")
    s.add_argument("--swa-start", type=INTEGER, default=None,
                   help=h("swa_start", "epochs before averaging (the SWA schedule's own budget)"))
    s.add_argument("--swa-lr", type=RATE, default=None, help=h("swa_lr", "the constant lr of the averaging phase"))
    s.add_argument("--swa-eval-every", type=EVAL_EVERY, default=1,
                   help=f"evaluate the average (update_bn + test) every this many epochs (budgets always; "
                        f"{EVAL_EVERY.zero_note})")
    s.add_argument("--fge", action="store_true", help="add the FGE-style snapshot ensemble at the 1.5 budget")
    s.add_argument("--fge-cycle", type=COUNT, default=2, help="epochs per FGE cycle (one snapshot each)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_recipe_args(build_parser(), PRESETS, argv)


def make_arms(args: argparse.Namespace, train: ImageDataset) -> list[Arm]:
    budget, swa_start = args.epochs, args.swa_start
    check_epochs(budget, 2, "SWA needs at least one epoch before --swa-start and one to average after it",
                 EPOCHS_OPTION)
    check_swa_start(swa_start, budget, EPOCHS_OPTION)
    longest = budget_epochs(budget, SWA_BUDGETS[-1])

    def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)

    # Every schedule is stepped once per iteration: the paper's curve over the fraction of the budget.
    def sgd_schedule(opt: torch.optim.Optimizer, steps: int) -> SWAScheduleLR:
        return SWAScheduleLR(opt, total_steps=budget * steps)  # down to 1% of lr

    def swa_schedule(opt: torch.optim.Optimizer, steps: int) -> SWAScheduleLR:
        return SWAScheduleLR(opt, total_steps=swa_start * steps, swa_lr=args.swa_lr)

    # FGE cycles are aligned to end with the budget (its last epoch is a snapshot); before the first cycle the
    # lr stays at swa_lr, exactly as in the SWA arm, which the FGE arm branches from.
    fge_from = swa_start + (longest - swa_start) % args.fge_cycle

    def fge_schedule(opt: torch.optim.Optimizer, steps: int) -> FGECyclicLR:
        return FGECyclicLR(opt, swa_start * steps, args.swa_lr, cycle_from=fge_from * steps,
                           cycle_steps=args.fge_cycle * steps, high=args.swa_lr, low=args.swa_lr / 100)

    report = {budget_label(f): budget_epochs(budget, f) for f in SWA_BUDGETS[:-1]}
    swa = SWASettings(start=swa_start, label=budget_label(SWA_BUDGETS[-1]), eval_every=args.swa_eval_every,
                      report_at=report, compare_torch=not args.no_compare_torch)
    arms = [Arm("sgd", "SGD", budget, args.batch_size, optimizer, sgd_schedule, scheduler_per_iteration=True),
            Arm("swa", None, longest, args.batch_size, optimizer, swa_schedule, scheduler_per_iteration=True,
                swa=swa, curve="SWA run")]
    if args.fge:
        if longest - swa_start < args.fge_cycle:
            raise SystemExit(f"--fge-cycle {args.fge_cycle} does not fit in the {longest - swa_start} epochs "
                             f"after --swa-start")
        fge = FGESettings(start=fge_from, cycle=args.fge_cycle, label=fge_label(args))
        arms.append(Arm("fge", None, longest, args.batch_size, optimizer, fge_schedule,
                        scheduler_per_iteration=True, fge=fge, branch_from=("swa", swa_start), curve="FGE run"))
    return arms


def fge_label(args: argparse.Namespace) -> str:
    return f"FGE {SWA_BUDGETS[-1]:g} budgets"


def row_order(args: argparse.Namespace) -> list[str]:
    return ["SGD"] + [budget_label(f) for f in SWA_BUDGETS] + ([fge_label(args)] if args.fge else [])


SPEC = RecipeSpec("swa_paper", "SWA paper: SGD (budget 1) vs SWA (budgets 1, 1.25, 1.5)", make_arms, row_order,
                  baseline=lambda args: "SGD", headline=lambda args: [budget_label(SWA_BUDGETS[-1])],
                  measured_spread=MEASURED_SPREAD)


def main(argv: list[str] | None = None) -> int:
    return recipe_main(SPEC, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
