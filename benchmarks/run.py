"""Side-by-side benchmarks of swa_fast against what users run today, every suite in one runner.

Usage (from the repository root)::

    python -m benchmarks.run                                  # every suite and case for the default device
    python benchmarks/run.py --device cpu --cases resnet50 transformer
    python benchmarks/run.py --suites averaging               # one suite
    python -m benchmarks.run --quick                          # a few repeats (smoke run, scratch JSON)
    python -m swa_fast bench --help                           # the same runner from the package's CLI

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

Results go to ``benchmarks/results/<device-slug>.json`` unless ``--no-save`` or
``--output``. A smoke run (``--quick``, or fewer than ``harness.MIN_REPEATS``
timed rounds) writes to ``benchmarks/results/scratch/`` instead, a folder git
ignores and ``readme_tables.py`` never reads: its figures are too rough for a
reference, and its file name (the device slug) would replace the committed
results of a machine of the same name. An explicit ``--output`` wins.

On a shared CPU machine other processes slow every candidate, but not equally:
each of torch's per-tensor kernels opens its own OpenMP parallel region, and
when another process holds a core, waking the pool's workers can cost
milliseconds per region, so many-kernel baselines lose far more than one
fused pass. The JSON records the load average at the start and end of a run;
compare CPU speedups only between runs on a quiet machine.
"""

from __future__ import annotations

import argparse
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
from swa_fast.ops.build_facts import build_summary

from benchmarks import averaging, distance, ghost_bn, integrations, multi, posthoc, swag
from benchmarks.harness import (
    MIN_REPEATS,
    device_info,
    fill_defaults,
    format_candidates,
    git_commit,
    loadavg,
    release_memory,
    results_folder,
    run_facts,
    run_rounds,
    save_report,
    summarize_candidates,
)

# A suite module has CASES (name -> case with .name, .note, .applies_to(device)),
# SPEEDUPS, build_candidates(case, device), describe(case) and header_lines(case, label).
SUITES: Dict[str, ModuleType] = {
    "averaging": averaging,
    "multi": multi,
    "posthoc": posthoc,
    "integrations": integrations,
    "swag": swag,
    "ghost_bn": ghost_bn,
    "distance": distance,
}


PROG = "python -m benchmarks.run"  # the command the help names unless a front end passes its own


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
               budget_s=budget_s, min_repeats=min(MIN_REPEATS, repeats))
    result = suite.describe(case)
    result.update(summarize_candidates(candidates, suite.SPEEDUPS))
    result["setup_s"] = setup_s
    result["wall_s"] = time.perf_counter() - begin
    del candidates
    release_memory(device)
    return result


def is_smoke_run(args: argparse.Namespace) -> bool:
    """A run whose figures are no reference: ``--quick`` (short samples, one warm-up round) or
    fewer timed rounds than a measurement needs. Reduced but sufficient repeats (the GPU check's
    ``--repeats 15``) still count as a reference run."""
    return args.quick or args.repeats < MIN_REPEATS


def default_output(slug: str, args: argparse.Namespace) -> Path:
    """``results/<slug>.json`` for a full run; a partial run (``--suites``/``--cases``) gets its
    own file so it never overwrites the full run's figures; a smoke run goes to ``results/scratch/``
    (same names) so it never replaces a committed reference."""
    folder = results_folder(is_smoke_run(args))
    if not (args.suites or args.cases):
        return folder / f"{slug}.json"
    parts = args.suites if not args.cases else args.cases
    return folder / f"{slug}-{'-'.join(parts)}.json"


def header_line(device_label: str, commit: str) -> str:
    """The run's first line: the swa_fast build, torch, the device and the commit measured."""
    return (f"swa_fast {swa_fast.__version__} ({build_summary(swa_fast.BUILD_INFO)}), torch {torch.__version__}, "
            f"{device_label}, commit {commit}")


def command_line(argv: Optional[Sequence[str]], prog: Optional[str]) -> str:
    """The command that started this run, for the JSON: the shell command when run from one
    (``prog`` names the front end, e.g. ``python -m swa_fast bench``), else the Python call."""
    if prog is not None:
        return shlex.join([*shlex.split(prog), *(sys.argv[1:] if argv is None else argv)])
    if argv is None and __name__ == "__main__":
        as_module = __spec__ is not None and __spec__.name == "benchmarks.run"
        return shlex.join(["python", *(["-m", "benchmarks.run"] if as_module else sys.argv[:1]), *sys.argv[1:]])
    return f"benchmarks.run.main({list(sys.argv[1:] if argv is None else argv)!r})"


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> argparse.Namespace:
    """The runner's options with their device-dependent defaults filled in; ``prog`` is the
    command the help names (``python -m swa_fast bench`` when run from there)."""
    parser = argparse.ArgumentParser(
        prog=prog,
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
                             f"{MIN_REPEATS} rounds (default: 40 on CPU, none on CUDA or with --quick; 0 = none)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds before timing (default: 2 on CPU, 5 on CUDA; 1 with --quick)")
    parser.add_argument("--inner", type=int, default=None,
                        help="updates per timed sample (default: chosen so a sample lasts ~--target-ms)")
    parser.add_argument("--target-ms", type=float, default=None,
                        help="aimed duration of one timed sample (default: 10 on CUDA, 5 on CPU; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="few repeats, for a smoke run; its JSON goes to benchmarks/results/scratch/ "
                             "(ignored by git) unless --output is given")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/<device-slug>.json; with --suites or --cases "
                             f"<device-slug>-<names>.json; a smoke run, --quick or fewer than {MIN_REPEATS} "
                             "repeats, writes the same name under benchmarks/results/scratch/)")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.quick:
        fill_defaults(args, {"repeats": 3, "warmup": 1, "budget": 0.0, "target_ms": 2.0})
    else:
        fill_defaults(args, {"repeats": 30, "warmup": 5, "budget": 0.0, "target_ms": 10.0} if cuda else
                      {"repeats": 20, "warmup": 2, "budget": 40.0, "target_ms": 5.0})
    if args.repeats < 1 or args.warmup < 0 or (args.inner is not None and args.inner < 1):
        parser.error("--repeats and --inner must be >= 1, --warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> dict:
    """Run the chosen cases, print their tables, write the JSON; returns the report.
    ``prog``: the front end that called (its name goes into the help and the recorded command)."""
    args = parse_args(argv, prog or PROG)
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
    command = command_line(argv, prog)
    report = {
        "schema": 2,
        "device": info,
        **run_facts(git_commit(), command),
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
    print(header_line(info["label"], report["git_commit"]), flush=True)
    floor = min(MIN_REPEATS, args.repeats)
    budget = f" (or fewer, at least {floor}, once a case's timed rounds pass {args.budget:g} s)" if args.budget else ""
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
        save_report(report, args.output or default_output(info["slug"], args),
                    smoke_default=args.output is None and is_smoke_run(args))
    return report


if __name__ == "__main__":
    main()
