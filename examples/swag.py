"""SWAG: SGD vs SWA vs SWAG (diagonal and low rank) vs MultiSWAG, by accuracy, NLL and calibration.

Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning" (NeurIPS 2019), fit a
Gaussian to the SGD iterates of the end of training: the SWA mean, a diagonal variance and a low-rank
covariance from the last K = 20 deviations from the mean, collected once per epoch at a constant
learning rate. Predicting with the average of the softmax outputs of 30 models sampled from it (a
Bayesian model average at scale 0.5) improves the test NLL and the calibration (ECE) over SGD and SWA
at about SWA's accuracy; MultiSWAG (Wilson and Izmailov, 2020) ensembles several independent SWAGs.
This recipe measures that on Fashion-MNIST with ``swa_fast.swag``: per seed, an SGD run with the SWA
paper's schedule (``swa_paper.py``'s SGD baseline, same budget) and a run of the same budget whose
schedule decays to ``--swa-lr`` by ``--swa-start`` and then collects into ``SWAG(model,
max_rank=--max-rank)`` after every epoch. The rows: SGD (its final weights), SWA (the SWAG mean,
``update_bn``), SWAG-diagonal and SWAG (``bma_predict`` with ``cov=False`` / ``cov=True``) and
MultiSWAG. The report gives accuracy, NLL and ECE (15 equal-width bins), mean ± std over ``--seeds``
(default 0 1 2), the reliability diagram of every row side by side (``reliability.png``, the test
predictions of all seeds pooled) and a verdict: did SWAG improve NLL and ECE over SWA and SGD, beyond
the seed-to-seed spread?

MultiSWAG: for seed s, the seed's SWAG run and ``--multiswag-runs`` - 1 more (default: 2 more) with
seeds s + 10000, s + 20000, ... (their own initial weights, shuffles and augmentation), trained as the
SWAG run; a ``--seeds`` value that is another seed's extra seed is refused, so no two seeds' MultiSWAG
rows share a run.
It draws ceil(n_samples / runs) samples from each run: the same number of samples in all as the SWAG
row (30 = 3 x 10 by default; at most runs - 1 more when runs does not divide --n-samples). Every BN pass
(SWA's, each sample's) uses the same first ``--bn-fraction`` of a shuffled pass over the training set.
``--multiswag-runs 0`` leaves the MultiSWAG row (and its extra training runs) out.

Time on a 2-core CPU: smoke about 35 s (three seeds); quick about 3.5 minutes a seed (10 for the default
three seeds); medium (all 60,000 training and 10,000 test images, 12 collections) about 33 minutes a seed.

    python examples/swag.py                              # quick preset, seeds 0 1 2
    python examples/swag.py --preset smoke               # under a minute: the whole path on small subsets
    python examples/swag.py --preset quick --seeds 0     # one seed
    python examples/swag.py --preset medium              # the full data set, 12 collections
    python examples/swag.py --n-samples 10 --scale 0.25 --max-rank 10 --multiswag-runs 0
    python examples/swag.py --stop-after 4 && python examples/swag.py --resume
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_lib.recipe import (  # noqa: E402
    COUNT, INTEGER, MOMENTUM, NON_NEGATIVE, RATE, MeasuredSpread, Number, describe_preset, parse_recipe_args,
    recipe_parser,
)
from recipe_lib.swag import check_batches, check_options, run_swag  # noqa: E402

# ``epochs`` is the budget B of every run (the SGD baseline and each SWAG run); SWAG collects after every epoch
# past ``swa_start``.
PRESETS = {
    # Under a minute on a 2-core CPU (the real 60k Fashion-MNIST too: only the subsets are used): a 4-epoch budget
    # with 2 collections, 4 samples per BMA, a MultiSWAG of 2 runs x 2 samples.
    "smoke": dict(model="vgg_small", epochs=4, batch_size=128, lr=0.05, weight_decay=5e-4, swa_start=2,
                  swa_lr=0.01, n_samples=4, bn_fraction=0.25, multiswag_runs=2, train_subset=2048,
                  test_subset=1000, augment=True),
    # About 3.5 minutes a seed on a 2-core CPU: swa_paper.py's quick setting (the small VGG-16-BN on 10k training
    # images, augmented), a 10-epoch budget of which the last 5 collect; the paper's 30 samples, each tested on 5k
    # test images.
    "quick": dict(model="vgg_small", epochs=10, batch_size=128, lr=0.05, weight_decay=5e-4, swa_start=5,
                  swa_lr=0.01, n_samples=30, bn_fraction=0.2, multiswag_runs=3, train_subset=10000,
                  test_subset=5000, augment=True),
    # All 60k training and 10k test images: a 24-epoch budget, SWAG collecting after epochs 13-24 (12
    # collections); each BN pass over a tenth of the training set. About 33 minutes a seed on a 2-core CPU.
    "medium": dict(model="vgg_small", epochs=24, batch_size=128, lr=0.05, weight_decay=5e-4, swa_start=12,
                   swa_lr=0.01, n_samples=30, bn_fraction=0.1, multiswag_runs=3, train_subset=0, test_subset=0,
                   augment=True),
    # The SWAG paper's VGG-16 on CIFAR: 300 epochs, collecting from epoch 161 at lr 0.01, 30 samples, BN passes
    # over the whole training set. Meant for a GPU.
    "paper": dict(model="vgg16_bn", epochs=300, batch_size=128, lr=0.05, weight_decay=5e-4, swa_start=161,
                  swa_lr=0.01, n_samples=30, bn_fraction=1.0, multiswag_runs=3, train_subset=0, test_subset=0,
                  augment=True),
}
MEDIUM = ("medium = all 60,000 training and 10,000 test images, SWAG collecting over the last 12 epochs of a 24-epoch "
          "budget: about 33 minutes a seed on a 2-core CPU")
# No preset of this recipe has been measured over three seeds in docs/RESULTS.md yet: the verdict says so.
MEASURED_SPREAD: dict[str, MeasuredSpread] = {}
SCALE = Number(float, 0, low_open=True)
MAX_RANK = Number(int, 2)  # the SWAG row samples the low-rank part, which needs two deviation columns
BN_FRACTION = Number(float, 0, low_open=True, high=1)
MULTISWAG_RUNS = Number(int, 0, zero="no MultiSWAG row")
DEFAULT_SEEDS = [0, 1, 2]
TITLE = "SWAG: SGD vs SWA vs SWAG (diagonal, low rank) vs MultiSWAG: accuracy, NLL and calibration"


def build_parser() -> argparse.ArgumentParser:
    """The recipe's command line (every preset-controlled option defaults to None until :func:`apply_preset`)."""
    p, h = recipe_parser(__doc__, PRESETS, "swag")
    describe_preset(p, MEDIUM)
    t = p.add_argument_group("training (SGD, momentum; the SWA paper's schedules)")
    t.add_argument("--epochs", "--budget", dest="epochs", type=INTEGER, default=None,
                   help=h("epochs", "the budget B: epochs of every run (the SGD baseline and each SWAG run; "
                                    "--budget is an alias)"))
    t.add_argument("--batch-size", type=COUNT, default=None, help=h("batch_size", "batch size"))
    t.add_argument("--lr", type=RATE, default=None, help=h("lr", "initial learning rate"))
    t.add_argument("--momentum", type=MOMENTUM, default=0.9, help="SGD momentum")
    t.add_argument("--weight-decay", type=NON_NEGATIVE, default=None, help=h("weight_decay", "weight decay"))
    s = p.add_argument_group("SWAG")
    s.add_argument("--swa-start", type=INTEGER, default=None,
                   help=h("swa_start", "epochs before collecting: the SWAG runs' schedule decays to --swa-lr over "
                                       "them, then SWAG collects after every later epoch (at least 2 collections)"))
    s.add_argument("--swa-lr", type=RATE, default=None, help=h("swa_lr", "the constant lr of the collection phase"))
    s.add_argument("--max-rank", type=MAX_RANK, default=20,
                   help="deviation columns SWAG keeps (the paper's K; at least 2: the SWAG row samples the "
                        "low-rank part)")
    s.add_argument("--n-samples", type=COUNT, default=None,
                   help=h("n_samples", "models sampled per Bayesian model average (SWAG-diagonal, SWAG; MultiSWAG "
                                       "draws as many in all, split over its runs)"))
    s.add_argument("--scale", type=SCALE, default=0.5,
                   help="covariance scale of the samples (0.5: the paper's (diagonal + low rank) / 2)")
    s.add_argument("--bn-fraction", type=BN_FRACTION, default=None,
                   help=h("bn_fraction", "share of a shuffled pass over the training set on which every sample's "
                                         "(and SWA's) BN statistics are recomputed, > 0 and <= 1"))
    s.add_argument("--multiswag-runs", type=MULTISWAG_RUNS, default=None,
                   help=h("multiswag_runs", "independent SWAG runs per seed in the MultiSWAG row (the seed's own "
                                            "and more with seeds s + 10000 k); 2 or more, "
                                            f"{MULTISWAG_RUNS.zero_note}", zero=MULTISWAG_RUNS.zero))
    for action in p._actions:  # shared options that mean something else here
        if action.dest == "seeds":
            action.default = list(DEFAULT_SEEDS)
            action.help = ("one SGD and one SWAG run per seed (and the MultiSWAG runs); the table gives mean ± std "
                           f"(default: {' '.join(map(str, DEFAULT_SEEDS))})")
        elif action.dest == "fsdp":
            action.help = "not with this recipe (refused): it trains one unsharded model at a time in one process"
        elif action.dest == "no_compare_torch":
            action.help = "no effect here: nothing is averaged with torch.optim.swa_utils"
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_recipe_args(build_parser(), PRESETS, argv)


def validate(args: argparse.Namespace) -> None:
    """Every option this recipe adds or refuses, before the data loads: the budget, --swa-start, the seeds of the
    MultiSWAG runs and, where --train-subset fixes the data's size, a full batch."""
    check_options(args)
    if args.train_subset:  # at most this many samples: the refusal holds for fewer too
        check_batches(args, args.train_subset)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    validate(args)
    run_swag(args, TITLE, MEASURED_SPREAD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
