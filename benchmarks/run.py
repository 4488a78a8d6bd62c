"""Side-by-side benchmarks of swa_fast against what users run today, every suite in one runner.

Usage (from the repository root)::

    python -m benchmarks.run                                  # every suite and case for the default device
    python benchmarks/run.py --device cpu --cases resnet50 transformer
    python benchmarks/run.py --suites averaging               # one suite
    python -m benchmarks.run --quick --no-save                # a few repeats (CI smoke)

Suites (each module's docstring lists its candidates and how it counts bytes):

* ``averaging`` (:mod:`benchmarks.averaging`): AveragedModel SWA/EMA updates.
* ``ghost_bn`` (:mod:`benchmarks.ghost_bn`): ghost batch norm forward + backward.
* ``distance`` (:mod:`benchmarks.distance`): weight-distance norms ||a - b|| per tensor and in total.

Per case, every candidate of the case runs in one process on the same data,
together with a memory copy (``copy``) whose rate the others' GB/s are compared
with. Candidates are interleaved: each round runs every candidate once (a
sample of ``inner`` calls; the order rotates between rounds), after warm-up
rounds, and the median (and min) over the rounds is reported, so machine noise
hits all candidates alike. On CUDA a sample is timed with CUDA events around a
loop of ``inner`` calls (synchronised before and after); on the CPU with a
host timer.

Results go to ``benchmarks/results/<device-slug>.json`` unless ``--no-save``.

On a shared CPU machine other processes slow every candidate, but not equally:
each of torch's per-tensor kernels opens its own OpenMP parallel region, and
when another process holds a core, waking the pool's workers can cost
milliseconds per region, so many-kernel baselines lose far more than one
fused pass. The JSON records the load average at the start and end of a run;
compare CPU speedups only between runs on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import swa_fast

from benchmarks import averaging, distance, ghost_bn
from benchmarks.harness import (
    RESULTS_DIR,
    device_info,
    format_candidates,
    git_commit,
    loadavg,
    release_memory,
    run_rounds,
    summarize_candidates,
)

# A suite module has CASES (name -> case with .name, .note, .applies_to(device)),
# SPEEDUPS, build_candidates(case, device), describe(case) and header_lines(case, label).
SUITES: Dict[str, ModuleType] = {
    "averaging": averaging,
    "ghost_bn": ghost_bn,
    "distance": distance,
}


def all_cases() -> Dict[str, Tuple[str, object]]:
    """Every case name of every suite -> (suite name, case); names are unique across suites."""
    found: Dict[str, Tuple[str, object]] = {}
    for suite_name, suite in SUITES.items():
        for name, case in suite.CASES.items():
            if name in found:
                raise RuntimeError(f"case {name!r} is in suites {found[name][0]!r} and {suite_name!r}")
            found[name] = (suite_name, case)
    return found


def run_case(suite: ModuleType, case, device: torch.device, *, repeats: int, warmup: int, target_ms: float,
             inner: Optional[int] = None, budget_s: Optional[float] = None) -> dict:
    begin = time.perf_counter()
    candidates = suite.build_candidates(case, device)
    setup_s = time.perf_counter() - begin
    run_rounds(candidates, device, repeats=repeats, warmup=warmup, target_ms=target_ms, inner=inner,
               budget_s=budget_s, min_repeats=min(5, repeats))
    result = suite.describe(case)
    result.update(summarize_candidates(candidates, suite.SPEEDUPS))
    result["setup_s"] = setup_s
    result["wall_s"] = time.perf_counter() - begin
    del candidates
    release_memory(device)
    return result


def default_output(slug: str, args: argparse.Namespace) -> Path:
    """``results/<slug>.json`` for a full run; a partial run (``--suites``/``--cases``) gets its
    own file so it never overwrites the full run's figures."""
    if not (args.suites or args.cases):
        return RESULTS_DIR / f"{slug}.json"
    parts = args.suites if not args.cases else args.cases
    return RESULTS_DIR / f"{slug}-{'-'.join(parts)}.json"


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Side-by-side benchmarks: swa_fast vs torch baselines, every suite (averaging, ...).",
    )
    parser.add_argument("--suites", nargs="+", choices=list(SUITES), default=None,
                        help="default: every suite (with --cases: the suites of those cases)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--cases", nargs="+", choices=list(all_cases()), default=None,
                        help="default: every case of the chosen suites that applies to the device")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per case (default: 20 on CPU, 30 on CUDA; 3 with --quick)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed rounds per case after which a case stops early, after at least "
                             "5 rounds (default: 40 on CPU, none on CUDA or with --quick; 0 = none)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds before timing (default: 2 on CPU, 5 on CUDA; 1 with --quick)")
    parser.add_argument("--inner", type=int, default=None,
                        help="updates per timed sample (default: chosen so a sample lasts ~--target-ms)")
    parser.add_argument("--target-ms", type=float, default=None,
                        help="aimed duration of one timed sample (default: 10 on CUDA, 5 on CPU; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a CI smoke run")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/<device-slug>.json; with --suites or --cases "
                             "<device-slug>-<names>.json)")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.repeats is None:
        args.repeats = 3 if args.quick else (30 if cuda else 20)
    if args.warmup is None:
        args.warmup = 1 if args.quick else (5 if cuda else 2)
    if args.budget is None:
        args.budget = 40.0 if not (cuda or args.quick) else 0.0
    if args.target_ms is None:
        args.target_ms = 2.0 if args.quick else (10.0 if cuda else 5.0)
    if args.repeats < 1 or args.warmup < 0 or (args.inner is not None and args.inner < 1):
        parser.error("--repeats and --inner must be >= 1, --warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    known = all_cases()
    suites = args.suites or list(SUITES)
    names = list(dict.fromkeys(args.cases)) if args.cases else [n for n, (s, _) in known.items() if s in suites]
    cases = []
    for name in names:
        suite_name, case = known[name]
        if case.applies_to(args.device):
            cases.append((suite_name, case))
        elif args.cases:
            print(f"skipping {name}: GPU only", flush=True)

    info = device_info(device)
    if __name__ == "__main__":  # the command line that started this run
        as_module = __spec__ is not None and __spec__.name == "benchmarks.run"
        command = shlex.join(["python", *(["-m", "benchmarks.run"] if as_module else sys.argv[:1]), *sys.argv[1:]])
    else:
        command = f"benchmarks.run.main({list(sys.argv[1:] if argv is None else argv)!r})"
    report = {
        "schema": 2,
        "device": info,
        "torch_version": torch.__version__,
        "swa_fast_version": swa_fast.__version__,
        "swa_fast_build_info": dict(swa_fast.BUILD_INFO),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "python": platform.python_version(),
        "loadavg_start": loadavg(),
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "inner": args.inner,
            "target_ms": args.target_ms,
            "budget_s": args.budget,
            "quick": args.quick,
            "timing": "CUDA events around a loop of `inner` calls" if device.type == "cuda"
            else "host perf_counter around a loop of `inner` calls",
        },
        "cases": {},
    }
    print(f"swa_fast {swa_fast.__version__} ({swa_fast.BUILD_INFO}), torch {torch.__version__}, "
          f"{info['label']}, commit {report['git_commit']}", flush=True)
    budget = (f" (or fewer, at least {min(5, args.repeats)}, once a case's timed rounds pass {args.budget:g} s)"
              if args.budget else "")
    print(f"rounds: {args.repeats} timed{budget} after {args.warmup} warm-up, candidates interleaved; "
          f"times are ms per call; load average {report['loadavg_start']}", flush=True)
    begin = time.perf_counter()
    for suite_name, case in cases:
        suite = SUITES[suite_name]
        result = run_case(suite, case, device, repeats=args.repeats, warmup=args.warmup,
                          target_ms=args.target_ms, inner=args.inner, budget_s=args.budget or None)
        result["suite"] = suite_name
        report["cases"][case.name] = result
        print("\n".join(suite.header_lines(case, info["label"]) + format_candidates(result)), flush=True)
        print(f"   ({result['wall_s']:.1f} s, setup {result['setup_s']:.1f} s)", flush=True)
    report["wall_s"] = time.perf_counter() - begin
    report["loadavg_end"] = loadavg()
    print(f"total {report['wall_s']:.1f} s", flush=True)
    if not args.no_save:
        output = args.output or default_output(info["slug"], args)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1) + "\n")
        print(f"saved {output}", flush=True)
    return report


if __name__ == "__main__":
    main()
