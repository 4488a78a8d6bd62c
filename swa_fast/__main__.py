"""``python -m swa_fast info``, ``bench``, ``average`` and ``posthoc-ema``."""

from __future__ import annotations

import argparse
import platform
import runpy
import sys
from pathlib import Path
from typing import List, Optional

from swa_fast import checkpoint_average
from swa_fast.posthoc import cli as posthoc_cli

# The parser's description is plain text: argparse prints it as is, so the module docstring's
# reST markup (double backticks) would show in --help.
DESCRIPTION = (
    "swa_fast's command line: info (versions, compiled kernels, the GPU seen), bench (the side-by-side "
    "benchmark runner of a source checkout), average (average the weights of saved checkpoints) and posthoc-ema "
    "(reconstruct the EMA of any length from PowerFunctionEMA snapshots)."
)
BENCH_PROG = "python -m swa_fast bench"


def info_lines() -> List[str]:
    """What `python -m swa_fast info` prints: versions, compiled kernels, GPU seen."""
    import torch

    import swa_fast

    build = swa_fast.BUILD_INFO
    lines = [
        f"swa_fast {swa_fast.__version__}",
        f"torch {torch.__version__} (swa_fast._C built against {build['torch_version']})",
        f"python {platform.python_version()} on {platform.machine()}",
        f"CPU kernels: compiled ({build['cpu_capability']} vector ISA), {torch.get_num_threads()} threads",
    ]
    if build["cuda"]:
        lines.append(f"CUDA kernels: compiled for {build['cuda_archs'] or 'default archs'}")
    else:
        lines.append("CUDA kernels: not compiled (CPU-only build)")
    lines.append(f"torch CUDA: {torch.version.cuda or 'none (CPU build of torch)'}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"GPU {index}: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("GPU: none seen")
    lines.append(f"sources: {build['source_hash']}")
    return lines


def _bench(argv: List[str]) -> int:
    """Run benchmarks/run.py with ``argv`` (``--help`` included: the runner's own options)."""
    runner = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
    if not runner.is_file():
        print("swa_fast bench runs benchmarks/run.py from a source checkout; none was found next to this install.")
        return 2
    # Loaded under a name that is not __main__ (its own main() does not run on load), then called
    # with this command's name, so its help and the recorded command say `python -m swa_fast bench`.
    runner_globals = runpy.run_path(str(runner), run_name="swa_fast_bench_runner")
    runner_globals["main"](argv, prog=BENCH_PROG)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swa_fast", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, compiled kernels and the GPU seen",
                   description="Print the versions, the kernels compiled and the GPU seen.")
    # No -h of its own: --help passes through to the runner, which lists its options.
    sub.add_parser("bench", add_help=False,
                   help="the side-by-side benchmark runner (benchmarks/run.py); options pass through, "
                        "bench --help lists them")
    average = sub.add_parser(
        "average",
        help="average the weights of saved checkpoints into one state_dict",
        description="Average the state_dicts of checkpoints, one checkpoint in memory at a time. "
        "Floating entries are averaged (fp32 accumulators, fp64 for fp64) and written in their dtype; "
        "integer/bool entries are taken from the last checkpoint. The output is written atomically.",
    )
    checkpoint_average.add_arguments(average)
    posthoc = sub.add_parser(
        "posthoc-ema",
        help="reconstruct the EMA of any length from PowerFunctionEMA snapshots",
        description="Reconstruct the power-function EMA of a relative std (--std) or of several (--sweep) "
        "from the snapshots swa_fast.posthoc.PowerFunctionEMA wrote: least-squares coefficients in float64, "
        "then one weighted sum of the snapshots, one at a time. The output is a state_dict that "
        "model.load_state_dict accepts, written atomically; every target is checked before anything is written.",
    )
    posthoc_cli.add_arguments(posthoc)
    args, rest = parser.parse_known_args(argv)
    if args.command in ("average", "posthoc-ema"):
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return (checkpoint_average if args.command == "average" else posthoc_cli).run(args)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        print("\n".join(info_lines()))
        return 0
    return _bench(rest)


if __name__ == "__main__":
    sys.exit(main())
