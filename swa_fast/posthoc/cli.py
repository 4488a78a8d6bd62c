"""``python -m swa_fast posthoc-ema``: reconstructed EMA checkpoints from PowerFunctionEMA snapshots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, List

from swa_fast.checkpoint_average import CheckpointError, save_atomic
from swa_fast.posthoc.profiles import MAX_STD
from swa_fast.posthoc.reconstruct import PostHocError, plan, read_snapshot, reconstruct


def sweep_stds(text: str) -> List[float]:
    """``LOW:HIGH:COUNT`` as COUNT stds evenly spaced from LOW to HIGH (both included)."""
    try:
        low_text, high_text, count_text = text.split(":")
        low, high, count = float(low_text), float(high_text), int(count_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH:COUNT (e.g. 0.03:0.15:13), got {text!r}") from None
    if not (0 < low <= high <= MAX_STD) or count < 1 or (count == 1 and low != high):
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH <= {MAX_STD:.4f} and COUNT >= 1 (COUNT 1 needs "
                                         f"LOW == HIGH), got {text!r}")
    return [low + (high - low) * i / max(1, count - 1) for i in range(count)]


def sweep_path(folder: Path, std: float) -> Path:
    return folder / f"ema-std{std:.4f}.pt"


def add_arguments(parser: Any) -> None:
    parser.add_argument("snapshots", nargs="+", metavar="SNAPSHOT", help="files PowerFunctionEMA.snapshot wrote")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--std", type=float, help=f"the relative std of the EMA to make (0 < std <= {MAX_STD:.4f})")
    target.add_argument("--sweep", type=sweep_stds, metavar="LOW:HIGH:COUNT",
                        help="COUNT stds evenly spaced from LOW to HIGH, one checkpoint each in the folder -o")
    parser.add_argument("--step", type=int, help="the step to reconstruct at (default: the last snapshot's); only "
                                                 "snapshots at or before it are used")
    parser.add_argument("-o", "--output", required=True, help="the checkpoint to write (--std), or the folder (--sweep)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


def run(args: Any) -> int:
    """0 on success, 1 with a message on stderr (nothing written) otherwise."""
    try:
        snapshots = [read_snapshot(p) for p in args.snapshots]
        stds = [args.std] if args.std is not None else args.sweep
        plans = [plan(snapshots, std, args.step) for std in stds]  # every target checked before any write
        output = Path(args.output)
        if args.sweep is not None and output.exists() and not output.is_dir():
            raise PostHocError(f"-o {output}: --sweep writes one checkpoint per std into a folder, and this is a file")
        for std, made in zip(stds, plans):
            target = sweep_path(output, std) if args.sweep is not None else output
            state = reconstruct(args.snapshots, std, args.step, progress=not args.quiet and sys.stderr.isatty())
            target.parent.mkdir(parents=True, exist_ok=True)
            save_atomic(state, target)
            if not args.quiet:
                print(f"std {std:.4f} at step {made.target_step}: {len(made.sources)} profiles combined (relative "
                      f"profile error {100 * made.error:.3f}%) -> {target}")
    except (PostHocError, CheckpointError, OSError, ValueError, TypeError) as error:
        print(f"swa_fast posthoc-ema: error: {error}", file=sys.stderr)
        return 1
    return 0
