"""SWAP: large-batch training that generalizes, by averaging parallel workers (SB vs LB vs SWAP).

Gupta, Akle Serrano and DeCoste, "Stochastic Weight Averaging in Parallel: Large-Batch Training That
Generalizes Well" (ICLR 2020): phase 1 trains one model with large synchronized batches (DDP) until its
training accuracy reaches a threshold; phase 2 lets every worker continue on its own from that model, with
small batches and its own data order (no gradient communication); phase 3 averages the workers' weights and
recomputes the BatchNorm statistics. The averaged model generalizes like small-batch training, in about the
time of large-batch training. This recipe measures that on Fashion-MNIST with ``swa_fast.parallel``
(``AccuracyThreshold``, ``leave_ddp``, ``worker_generator``, ``swap_average``), per seed:

    SB    batch B_S on one worker (rank 0 trains, the other ranks wait), lr, E epochs
    LB    batch B_L in all (B_L / W per worker) on the W workers with DDP, lr x sqrt(B_L / B_S) after a
          linear warm-up, E epochs
    SWAP  phase 1 = LB until the training accuracy over all workers (each epoch's training batches) reaches
          --swap-threshold, or --phase1-max-epochs; phase 2 = every worker, from the phase-1 model, batch B_S
          over the whole training set in its own order, --phase2-epochs at --phase2-lr decaying to 0;
          phase 3 = swap_average (weights averaged, BN statistics recomputed over every worker's shard)

Every schedule is stepped per iteration: a linear warm-up (the large-batch runs only), then a cosine decay to
0 over the run (phase 1: the LB schedule, stopped early; phase 2: its own). The report gives per arm the test
accuracy, the wall time (training only, evaluation excluded, measured on rank 0 with barriers, so it is what
the slowest worker took) and the weight updates (optimizer steps of one worker), mean ± std over ``--seeds``;
each phase-2 worker's own test accuracy next to the average's (the paper's figure 1); the phases' times and
updates; ``accuracy_vs_time.png`` (test accuracy against training time, first seed, SWAP's phases marked);
and a verdict: did SWAP reach SB's accuracy in less wall time than SB on this machine?

SWAP needs at least 2 workers: run it under torchrun (gloo on CPU, nccl with --device cuda). Each rank gets
cores // (ranks on this machine) torch threads unless --threads says otherwise, so the workers do not
oversubscribe the cores; on a CPU the workers are only as parallel as the cores they have.

    torchrun --nproc_per_node=2 examples/swap.py --device cpu --preset smoke     # under a minute
    torchrun --nproc_per_node=2 examples/swap.py --device cpu                    # quick preset, seed 0
    torchrun --nproc_per_node=2 examples/swap.py --device cpu --seeds 0 1 2
    torchrun --nproc_per_node=8 examples/swap.py --device cuda --preset paper --dataset cifar10 \\
        --data-dir cifar-10-batches-py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_lib.recipe import (  # noqa: E402
    COUNT, INTEGER, MOMENTUM, NON_NEGATIVE, RATE, MeasuredSpread, Number, parse_recipe_args, recipe_parser,
)
from recipe_lib.swap import check_options, run_swap  # noqa: E402

# The model: vgg_small (VGG-16-BN's layout at 1/8 width, 0.23M parameters) has 13 BatchNorm layers, so phase 3's
# BN recomputation matters, and it is the fastest convolutional net of the zoo on a CPU core (about 0.9 ms per
# training sample, against 2.7 for preresnet20 and 4.2 for resnet20).
PRESETS = {
    # Well under a minute with 2 ranks on 2 cores (the real 60k Fashion-MNIST too: only the subsets are used):
    # 2 epochs of SB (32 steps each) and LB (batch 256: 8 steps each), phase 1 stopped at 60% training accuracy
    # or after 2 epochs, one phase-2 epoch.
    "smoke": dict(model="vgg_small", epochs=2, small_batch=64, large_batch=256, lr=0.05, warmup_epochs=0.5,
                  weight_decay=5e-4, swap_threshold=0.6, phase1_max_epochs=2, phase2_epochs=1, phase2_lr=0.02,
                  train_subset=2048, test_subset=1000, augment=False),
    # A few minutes a seed with 2 ranks on 2 cores: 10k training images, all 10k test images, batch 64 vs 512
    # (x8; 256 per worker), 10 epochs. Phase 1 stops at 88% training accuracy (well before convergence) or after
    # 8 of LB's 10 epochs, then 3 small-batch epochs per worker: at most 8 x 1/2 + 3 = 7 SB epochs of work per
    # worker against SB's 10, when the workers run in parallel.
    "quick": dict(model="vgg_small", epochs=10, small_batch=64, large_batch=512, lr=0.05, warmup_epochs=1.0,
                  weight_decay=5e-4, swap_threshold=0.88, phase1_max_epochs=8, phase2_epochs=3, phase2_lr=0.02,
                  train_subset=10000, test_subset=0, augment=False),
    # The paper's CIFAR-10 regime in outline, meant for 8 GPUs (--dataset cifar10): batch 512 vs 4096 (8 x 512),
    # augmented. Its ResNet-9 (DAWNBench) is not in the zoo: resnet18 (3x3 stem at 32 px) stands in. The lr,
    # threshold and epochs are approximations of the paper's appendix tables, not copied from them.
    "paper": dict(model="resnet18", epochs=30, small_batch=512, large_batch=4096, lr=0.2, warmup_epochs=2.0,
                  weight_decay=5e-4, swap_threshold=0.98, phase1_max_epochs=30, phase2_epochs=10, phase2_lr=0.05,
                  train_subset=0, test_subset=0, augment=True),
}
# The seed-to-seed spread (sample std over seeds 0 1 2, accuracy points) in docs/RESULTS.md's table of the quick
# preset with 2 workers: context for the verdict of a one-seed run. Copied, not computed; tests/test_recipe_swap.py
# checks it.
MEASURED_SPREAD = {"quick": MeasuredSpread({"SB": 0.09, "LB": 0.76, "SWAP": 0.58})}
THRESHOLD = Number(float, 0, low_open=True, high=1)
TITLE = "SWAP: small batch (SB) vs large batch (LB) vs SWAP, test accuracy and wall time"


def build_parser() -> argparse.ArgumentParser:
    """The recipe's command line (every preset-controlled option defaults to None until :func:`apply_preset`)."""
    p, h = recipe_parser(__doc__, PRESETS, "swap")
    t = p.add_argument_group("training (SGD, momentum; per-iteration schedules: warm-up, then cosine to 0)")
    t.add_argument("--epochs", type=INTEGER, default=None, help=h("epochs", "E: epochs of the SB and LB arms"))
    t.add_argument("--small-batch", type=COUNT, default=None,
                   help=h("small_batch", "B_S: SB's batch, and each worker's in SWAP's phase 2"))
    t.add_argument("--large-batch", type=COUNT, default=None,
                   help=h("large_batch", "B_L: LB's and SWAP phase 1's batch in all, B_L / W per worker (a "
                                         "multiple of the W workers)"))
    t.add_argument("--lr", type=RATE, default=None,
                   help=h("lr", "SB's learning rate; LB and phase 1 take lr x sqrt(B_L / B_S)"))
    t.add_argument("--warmup-epochs", type=NON_NEGATIVE, default=None,
                   help=h("warmup_epochs", "linear lr warm-up of LB and phase 1, in epochs (at most --epochs)"))
    t.add_argument("--momentum", type=MOMENTUM, default=0.9, help="SGD momentum")
    t.add_argument("--weight-decay", type=NON_NEGATIVE, default=None, help=h("weight_decay", "weight decay"))
    s = p.add_argument_group("SWAP")
    s.add_argument("--swap-threshold", type=THRESHOLD, default=None,
                   help=h("swap_threshold", "phase 1 ends after the first epoch whose training accuracy, over all "
                                            "workers' batches of that epoch, reaches this (> 0 and <= 1)"))
    s.add_argument("--phase1-max-epochs", type=INTEGER, default=None,
                   help=h("phase1_max_epochs", "phase 1 ends after this many epochs whatever the accuracy (at "
                                               "most --epochs: phase 1 is the LB run, stopped early)"))
    s.add_argument("--phase2-epochs", type=COUNT, default=None,
                   help=h("phase2_epochs", "epochs of each worker's independent small-batch training, each over "
                                           "the whole training set"))
    s.add_argument("--phase2-lr", type=RATE, default=None,
                   help=h("phase2_lr", "phase 2's learning rate at its start; it decays to 0 (cosine)"))
    for action in p._actions:  # shared options that mean something else here
        if action.dest == "preset":
            action.help = ("the values of every option not given: smoke = well under a minute with 2 ranks on a 2-core "
                           "CPU, checks the whole path on small subsets (its accuracies are not results); quick (the "
                           "default) = a few minutes a seed with 2 ranks on 2 cores; paper = the paper's CIFAR-10 "
                           "regime in outline (--dataset cifar10), meant for GPUs")
        elif action.dest == "fsdp":
            action.help = ("not with this recipe (refused): SWAP's phase 2 needs a whole replica of the model on "
                           "every worker")
        elif action.dest == "no_compare_torch":
            action.help = "no effect here: nothing is averaged with torch.optim.swa_utils"
        elif action.dest == "resume":
            action.help = ("not supported by this recipe (refused): it writes no checkpoints, every run trains "
                           "every arm from scratch")
        elif action.dest == "stop_after":
            action.help = "not supported by this recipe (refused): there is no --resume to continue from"
        elif action.dest == "threads":
            action.help = "torch CPU threads per rank (default: the machine's cores // the ranks on it)"
        elif action.dest == "device":
            action.help = "auto, cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK; gloo on CPU, nccl on CUDA)"
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_recipe_args(build_parser(), PRESETS, argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    check_options(args)  # every option, before the torchrun check, the data or a process group
    run_swap(args, argv, TITLE, MEASURED_SPREAD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
