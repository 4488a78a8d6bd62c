"""What the benchmarks timed on CPU gloo ranks (``benchmarks/sharded.py``, ``benchmarks/replicas.py``)
share: the launcher that runs a script's ``--worker`` as ranks and reads their results back, a rank's
start and end, the barrier-timed rounds, the statistics and speedups of the samples, the common
command-line options and checks, and the report's start (machine, device, settings) and saving.

A script using it runs as ``python -m benchmarks.<name> --worker CONFIG_JSON`` on every rank (its
``main`` hands that to :func:`run_worker`); its ``worker(config)`` starts with :func:`init_rank`,
times with :func:`time_rounds` and ends with :func:`finish_rank`: rank 0 writes every rank's
results to the file :func:`launch_workers`, in the launching process, reads back.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NoReturn, Optional, Sequence, Tuple

import torch

from benchmarks.harness import (
    MIN_REPEATS,
    REPO_ROOT,
    _cpu_model,
    _slug,
    fill_defaults,
    git_commit,
    loadavg,
    run_facts,
    save_report,
)
from benchmarks.ranks import launch_ranks

# ---------------------------------------------------------------------------
# The launching process
# ---------------------------------------------------------------------------


def launch_workers(module: str, config: Mapping[str, Any], world: int, timeout_s: float,
                   what: str) -> List[dict]:
    """Run ``python -m <module> --worker <config as JSON>`` as ``world`` gloo ranks
    (:func:`benchmarks.ranks.launch_ranks`, from the repository root, with ``config["threads"]``
    OpenMP/MKL threads and the root on PYTHONPATH) and return every rank's raw results (rank
    order), which rank 0 writes to ``config["raw_output"]`` (a scratch file set here, see
    :func:`finish_rank`). A failed rank raises RuntimeError("<what> failed: ...") with every failed
    rank's stderr."""
    with tempfile.TemporaryDirectory(prefix=f"swa_fast-{module.rsplit('.', 1)[-1]}-") as scratch:
        raw = Path(scratch) / "raw.json"
        config = {**config, "raw_output": str(raw)}
        threads = str(config["threads"])
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        command = [sys.executable, "-m", module, "--worker", json.dumps(config)]
        errors = launch_ranks(command, world, timeout_s, env, cwd=REPO_ROOT)
        if errors:
            raise RuntimeError(f"{what} failed:\n" + "\n".join(errors))
        return json.loads(raw.read_text())


# ---------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------


def run_worker(worker: Callable[[dict], None], config_json: str) -> NoReturn:
    """Run ``worker`` on the ``--worker`` option's config and leave the process at once."""
    worker(json.loads(config_json))
    # The results are written and the process group destroyed: skip the interpreter's teardown. A rank
    # once aborted at its end here ("terminate called without an active exception", 1 run in about 30
    # on a busy machine), the way gloo's threads can at interpreter shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def init_rank(config: Mapping[str, Any]) -> Tuple[int, int]:
    """Set ``config["threads"]`` torch threads and join the gloo group (RANK and WORLD_SIZE from
    the environment, collectives time out after ``config["collective_timeout_s"]``); returns
    ``(rank, world)``."""
    import torch.distributed as dist

    torch.set_num_threads(config["threads"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=config["collective_timeout_s"]))
    return rank, world


def finish_rank(mine: Any, config: Mapping[str, Any]) -> None:
    """Gather every rank's ``mine`` (``all_gather_object``), rank 0 writes the list (rank order) as
    JSON to ``config["raw_output"]``; then a barrier and the end of the process group."""
    import torch.distributed as dist

    everyone: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        Path(config["raw_output"]).write_text(json.dumps(everyone))
    dist.barrier()
    dist.destroy_process_group()


def barrier_ms(fn: Callable[[], None], inner: int) -> float:
    """One sample: a barrier, then ``inner`` calls of ``fn``; this rank's host milliseconds per call."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) * 1e3 / inner


def time_rounds(fns: Mapping[str, Callable[[], None]], config: Mapping[str, Any],
                gc_off: bool = False) -> Tuple[Dict[str, int], Dict[str, List[float]]]:
    """Time every candidate of ``fns`` (key -> one call; each call may run collectives, so every
    rank passes the same keys in the same order): ``config["warmup"]`` untimed rounds, then per
    candidate the calls per sample (``config["inner"]``, or as many as last ``config["target_ms"]``
    on the slowest rank, 1 to 1000: the same on every rank), then ``config["repeats"]`` rounds of
    one :func:`barrier_ms` sample per candidate, the order rotating between rounds. With
    ``config["budget_s"]`` (seconds, 0 = none) every rank stops after the same round once that
    much time was spent timing, after at least ``MIN_REPEATS`` rounds. ``gc_off``: the garbage
    collector is off during the timed rounds. Returns ``(inner, samples_ms)`` per candidate."""
    import gc

    import torch.distributed as dist

    chosen = list(fns)
    for _ in range(config["warmup"]):
        for key in chosen:
            fns[key]()
    inner = {}
    for key in chosen:
        once = torch.tensor(barrier_ms(fns[key], 1), dtype=torch.float64)
        dist.all_reduce(once, op=dist.ReduceOp.MAX)  # the same count on every rank: the collectives pair up
        inner[key] = config["inner"] or max(1, min(1000, math.ceil(config["target_ms"] / max(once.item(), 1e-3))))
    samples: Dict[str, List[float]] = {key: [] for key in chosen}
    if gc_off:
        gc.disable()
    try:
        timed_begin = time.perf_counter()
        for round_index in range(config["repeats"]):
            if config["budget_s"] and round_index >= min(MIN_REPEATS, config["repeats"]):
                over = torch.tensor(float(time.perf_counter() - timed_begin > config["budget_s"]))
                dist.all_reduce(over, op=dist.ReduceOp.MAX)  # every rank stops after the same round
                if over.item():
                    break
            shift = round_index % len(chosen)
            for key in chosen[shift:] + chosen[:shift]:
                samples[key].append(barrier_ms(fns[key], inner[key]))
    finally:
        if gc_off:
            gc.enable()
    return inner, samples


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------


def stats(samples: Sequence[float]) -> Dict[str, Any]:
    """Median, min, max and quartiles (ms) of ``samples``, and their count."""
    median = statistics.median(samples)
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [median] * 3
    return {"median_ms": median, "min_ms": min(samples), "max_ms": max(samples), "q1_ms": quartiles[0],
            "q3_ms": quartiles[2], "repeats": len(samples)}


def rank_timings(ranks: Sequence[int], samples: Sequence[Sequence[float]]) -> Tuple[List[dict], Dict[str, Any]]:
    """One candidate's samples on every rank (``samples[i]``: rank ``ranks[i]``'s, one per round):
    each rank's :func:`stats` with its samples, and the stats of the slowest rank per round."""
    per_rank = [{"rank": rank, **stats(mine), "samples_ms": mine} for rank, mine in zip(ranks, samples)]
    slowest = [max(values) for values in zip(*samples)]
    return per_rank, stats(slowest)


def speedups(candidates: Mapping[str, Mapping[str, Any]], fast: str) -> Dict[str, dict]:
    """``"<fast> vs <other>"`` for every other candidate (entries with ``slowest_rank`` and
    ``per_rank`` as :func:`rank_timings` gives them): the other's median over ``fast``'s, of the
    slowest rank and per rank (none without ``fast``)."""
    result = {}
    if fast in candidates:
        mine = candidates[fast]
        for key, other in candidates.items():
            if key != fast:
                result[f"{fast} vs {key}"] = {
                    "candidate": fast,
                    "baseline": key,
                    "slowest_rank_median": other["slowest_rank"]["median_ms"] / mine["slowest_rank"]["median_ms"],
                    "per_rank_median": [o["median_ms"] / f["median_ms"]
                                        for o, f in zip(other["per_rank"], mine["per_rank"])],
                }
    return result


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser, candidates: Sequence[str], *, calls: str, budget_stops: str,
                      timeout_s: float, timeout_help: str, quick_help: str) -> None:
    """The options every gloo benchmark takes, after its own: ``--threads``, ``--candidates``
    (``candidates``, default all), the rounds (``--repeats``, ``--warmup``, ``--inner``
    counting ``calls`` per sample, ``--target-ms``, ``--budget``: seconds of timed rounds
    ``budget_stops``), ``--timeout`` (default ``timeout_s``), ``--quick`` (``quick_help``: what
    it runs), ``--output``, ``--no-save``, ``--note`` and the hidden ``--worker``. The rounds'
    options default to None, for ``harness.fill_defaults``."""
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--candidates", nargs="+", choices=list(candidates), default=list(candidates),
                        help="default: all")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2; 1 with --quick)")
    parser.add_argument("--inner", type=int, default=None,
                        help=f"{calls} per timed sample (default: so a sample lasts ~--target-ms)")
    parser.add_argument("--target-ms", type=float, default=None, help="default 50; 5 with --quick")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds of timed rounds {budget_stops} (after at least {MIN_REPEATS} rounds; "
                             "default 300, 0 = none)")
    parser.add_argument("--timeout", type=float, default=timeout_s, help=timeout_help)
    parser.add_argument("--quick", action="store_true",
                        help=f"{quick_help}: a smoke run, its JSON goes to benchmarks/results/scratch/")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: see the module docstring)")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    parser.add_argument("--note", default="", help="free text stored in the JSON's machine field")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace, at_least_one: Sequence[str]) -> None:
    """Refuse (``parser.error``) any option of ``at_least_one`` (names such as ``"--threads"``;
    ``--inner`` may be unset) below 1, or ``--warmup`` below 0."""
    values = [getattr(args, option[2:].replace("-", "_")) for option in at_least_one]
    if args.warmup < 0 or any(value is not None and value < 1 for value in values):
        names = ", ".join(at_least_one[:-1]) + f" and {at_least_one[-1]}" if len(at_least_one) > 1 else at_least_one[0]
        parser.error(f"{names} must be >= 1, --warmup >= 0")


def parse_run_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], full: Mapping[str, Any],
                   quick: Mapping[str, Any], at_least_one: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; unless it is a ``--worker`` call, give the options left unset their value in
    ``full`` or (``--quick``) ``quick`` and :func:`check_counts` ``at_least_one``."""
    args = parser.parse_args(argv)
    if args.worker is None:
        fill_defaults(args, quick if args.quick else full)
        check_counts(parser, args, at_least_one)
    return args


def is_smoke_run(args: argparse.Namespace) -> bool:
    """``--quick``, or fewer than ``harness.MIN_REPEATS`` rounds: its JSON goes to the scratch folder."""
    return args.quick or args.repeats < MIN_REPEATS


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

TIMING = "host perf_counter around `inner` calls after a barrier, per rank"


def run_config(args: argparse.Namespace, choice: Mapping[str, Any], options: Mapping[str, Any]) -> Dict[str, Any]:
    """What every rank's worker is given: ``choice`` (what the run covers), ``--threads``,
    ``--candidates``, ``options`` (the candidates' own), the rounds' settings and the collectives'
    timeout (``--timeout``, at least 60 s)."""
    return {**choice, "threads": args.threads, "candidates": args.candidates, **options, "repeats": args.repeats,
            "warmup": args.warmup, "inner": args.inner, "target_ms": args.target_ms, "budget_s": args.budget,
            "collective_timeout_s": max(60, int(args.timeout))}


def cpu_facts(ranks: Mapping[str, Any], ranks_text: str, threads: int, note: str) -> Tuple[dict, dict]:
    """The report's ``machine`` (this CPU, ``ranks``' entries, ``threads`` per rank, gloo, a
    description naming ``ranks_text`` gloo ranks and ending with ``note``) and ``device`` (with
    the slug of the results' file names)."""
    cpu = _cpu_model()
    machine = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        **ranks,
        "threads_per_rank": threads,
        "backend": "gloo",
        "description": f"{os.cpu_count()} logical CPUs ({cpu}), {ranks_text} gloo ranks (processes) on this one "
                       f"machine, {threads} torch thread(s) each" + (f"; {note}" if note else ""),
    }
    device = {"type": "cpu", "name": cpu, "slug": f"cpu-{_slug(cpu)}-{threads}threads", "threads": threads,
              "capability": torch.backends.cpu.get_cpu_capability()}
    return machine, device


def open_report(args: argparse.Namespace, argv: Optional[Sequence[str]], config: Mapping[str, Any], *, schema: str,
                prog: str, ranks: Mapping[str, Any], ranks_text: str, title: str, unit: str,
                settings: Mapping[str, Any]) -> dict:
    """Print the run's header (versions, ``== <title>; <the machine>``, the rounds and ``unit``,
    the load) and return the report's start: ``schema``, the machine and device
    (:func:`cpu_facts`), the run's facts (the command line as ``prog`` with ``argv``), the load
    and the settings (``config`` but the collectives' timeout, then ``settings``, then how the
    samples are timed)."""
    import swa_fast
    from swa_fast.ops.build_facts import build_summary

    machine, device = cpu_facts(ranks, ranks_text, args.threads, args.note)
    commit = git_commit()
    print(f"swa_fast {swa_fast.__version__} ({build_summary(swa_fast.BUILD_INFO)}), torch {torch.__version__}, "
          f"commit {commit}", flush=True)
    print(f"== {title}; {machine['description']}", flush=True)
    print(f"   rounds: {args.repeats} timed after {args.warmup} warm-up, candidates interleaved, a barrier before "
          f"each sample; {unit}; load average {loadavg()}", flush=True)
    return {
        "schema": schema,
        "machine": machine,
        "device": device,
        **run_facts(commit, " ".join([prog, *(sys.argv[1:] if argv is None else list(argv))])),
        "loadavg_start": loadavg(),
        "settings": {**{k: v for k, v in config.items() if k != "collective_timeout_s"}, **settings,
                     "timing": TIMING},
    }


def save(report: dict, args: argparse.Namespace, default_output: Path) -> None:
    """Write ``report`` to ``--output`` or ``default_output``, unless ``--no-save``."""
    if not args.no_save:
        save_report(report, args.output or default_output, smoke_default=args.output is None and is_smoke_run(args))
