"""Post-hoc EMA: train once with two tracked EMA profiles and snapshots, then sweep the EMA length afterwards.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2, CVPR 2024),
average the weights with a power-function EMA whose length is a fraction of the training so far (its
relative std, sigma_rel), track two such profiles during training (stds 0.050 and 0.100), store snapshots
of them now and then, and afterwards reconstruct the EMA of any other std as a least-squares combination
of the snapshots: the EMA length is chosen after training, without retraining. This recipe does that on
Fashion-MNIST with ``swa_fast.posthoc``: per seed one model, ``PowerFunctionEMA(model, stds=--stds)``
updated after every optimizer step, a snapshot every ``--snapshot-every`` steps (default: about 20 per
run) and at the last step; then every std of ``--sweep LOW:HIGH:COUNT`` reconstructed at the last
snapshot and tested, next to the final model and the tracked profiles tested directly. The report gives
test accuracy against the std (table and ``accuracy_vs_std.png``, the tracked stds marked), the profile
fit error of each reconstruction, the best reconstructed std and whether it beats both tracked ones.
Swept stds the snapshots cannot represent (outside their sound range, fit error over 5%) are reported as
not reconstructible, not tested.

Training: Adam at a constant learning rate, no decay. With a schedule that decays to zero, as the other
recipes' have, the last weights are already a quiet point and every EMA length ends close to them; a
constant lr keeps the weights noisy, which is where the length of the average matters (EDM2 trains
most of its run at a constant or slowly decaying rate too).

BatchNorm: the profiles average the BN running statistics with the weights (``use_buffers=True``, the
default), so a reconstructed state loads strictly and is tested as it is. ``update_bn`` is not run by
default: the averaged statistics belong to the same window of training as the averaged weights, the
point of post-hoc EMA is a checkpoint usable as it comes out of ``reconstruct``, and a BN pass over the
training set for every swept std would cost more than the reconstruction. ``--update-bn`` recomputes them
for every EMA tested (the final model keeps its own), to measure what that changes.

    python examples/posthoc_ema.py --seeds 0 1 2         # quick preset: F1 on the whole Fashion-MNIST
    python examples/posthoc_ema.py --preset smoke        # under a minute: the whole path on small subsets
    python examples/posthoc_ema.py --sweep 0.02:0.25:24 --snapshot-every 100 --update-bn
    python examples/posthoc_ema.py --stop-after 4 && python examples/posthoc_ema.py --resume
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_lib.posthoc import (  # noqa: E402
    TARGET_SNAPSHOTS, check_schedule, check_stds, check_sweep, run_posthoc, sweep_option,
)
from recipe_lib.recipe import (  # noqa: E402
    COUNT, INTEGER, RATE, MeasuredSpread, Number, check_epochs, parse_recipe_args, recipe_parser,
)

PRESETS = {
    # Under a minute on a 2-core CPU (the real 60k Fashion-MNIST too: only the subsets are used): 64 steps, a
    # snapshot every 16 (4 snapshots), so of the short sweep 0.03 and 0.15 lie outside the sound range and are
    # reported as not reconstructible, the others reconstructed and tested.
    "smoke": dict(model="f1", epochs=2, batch_size=64, lr=1e-3, stds=[0.05, 0.1], snapshot_every=16,
                  sweep="0.03:0.15:5", train_subset=2048, test_subset=1000, augment=False),
    # About a minute per seed on a 2-core CPU: F1 on all 60k training images, tested on all 10k, 10 epochs of
    # 468 steps, EDM2's tracked stds, about 20 snapshots, 13 stds swept.
    "quick": dict(model="f1", epochs=10, batch_size=128, lr=1e-3, stds=[0.05, 0.1], snapshot_every=0,
                  sweep="0.03:0.15:13", train_subset=0, test_subset=0, augment=False),
    # EDM2's tracked profiles on a full ResNet-18 with augmentation, 100 epochs. Meant for a GPU.
    "paper": dict(model="resnet18", epochs=100, batch_size=256, lr=1e-3, stds=[0.05, 0.1], snapshot_every=0,
                  sweep="0.03:0.15:13", train_subset=0, test_subset=0, augment=True),
}
STD = Number(float, 0, low_open=True, high=0.3)  # a power-function profile's std is at most 0.3003
SNAPSHOT_EVERY = Number(int, 0, zero=f"about {TARGET_SNAPSHOTS} snapshots a run")
# The seed-to-seed spread (sample std over seeds 0 1 2, accuracy points) in docs/RESULTS.md's table of the quick
# preset: context for the verdict of a one-seed run. Copied, not computed; tests/test_recipe_posthoc.py checks it.
MEASURED_SPREAD = {"quick": MeasuredSpread({"final model": 0.41, "tracked 0.05": 0.12, "tracked 0.1": 0.10})}
TITLE = "Post-hoc EMA: test accuracy against the reconstructed EMA's std"


def build_parser() -> argparse.ArgumentParser:
    """The recipe's command line (every preset-controlled option defaults to None until :func:`apply_preset`)."""
    p, h = recipe_parser(__doc__, PRESETS, "posthoc_ema")
    t = p.add_argument_group("training (Adam at a constant lr)")
    t.add_argument("--epochs", type=INTEGER, default=None, help=h("epochs", "epochs of every seed's run"))
    t.add_argument("--batch-size", type=COUNT, default=None, help=h("batch_size", "batch size"))
    t.add_argument("--lr", type=RATE, default=None, help=h("lr", "Adam learning rate (constant)"))
    e = p.add_argument_group("post-hoc EMA")
    e.add_argument("--stds", type=STD, nargs="+", default=None,
                   help=h("stds", "relative stds of the tracked power-function EMA profiles (two or more, distinct, "
                                  "each > 0 and <= 0.3; EDM2 tracks 0.05 and 0.1)"))
    e.add_argument("--snapshot-every", type=SNAPSHOT_EVERY, default=None,
                   help=h("snapshot_every", "steps between snapshots of the profiles, plus one at the last step "
                                            f"({SNAPSHOT_EVERY.zero_note}); more snapshots widen the range of "
                                            "stds that can be reconstructed", zero=SNAPSHOT_EVERY.zero))
    e.add_argument("--sweep", type=sweep_option, default=None, metavar="LOW:HIGH:COUNT",
                   help=h("sweep", "COUNT stds evenly spaced from LOW to HIGH (0 < LOW <= HIGH <= 0.3003, COUNT from "
                                   "1 to 100), each reconstructed from the snapshots and tested; those outside the "
                                   "snapshots' sound range are reported as not reconstructible"))
    e.add_argument("--update-bn", action="store_true",
                   help="recompute the BN statistics of every EMA tested with one pass over the training batches "
                        "(update_bn) instead of testing the averaged statistics the profiles hold")
    for action in p._actions:  # shared options that mean something else here
        if action.dest == "fsdp":
            action.help = "not with this recipe (refused): it trains one unsharded model in one process"
        elif action.dest == "no_compare_torch":
            action.help = "no effect here: nothing is averaged with torch.optim.swa_utils"
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_recipe_args(build_parser(), PRESETS, argv)


def validate(args: argparse.Namespace) -> None:
    """Every option this recipe adds or refuses, before the data loads: the epochs, the tracked stds, the sweep
    (a preset's too) and, where --train-subset fixes the data's size, the snapshots it leaves."""
    if args.fsdp:
        raise SystemExit("--fsdp does not go with posthoc_ema.py: it trains one unsharded model in one process")
    check_epochs(args.epochs, 1, "train at least one epoch")
    check_stds(args.stds)
    check_sweep(args.sweep)
    if args.train_subset:  # at most this many samples: the refusal holds for fewer too
        check_schedule(args, args.train_subset)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    validate(args)
    run_posthoc(args, TITLE, MEASURED_SPREAD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
