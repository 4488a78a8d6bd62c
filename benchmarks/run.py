"""Side-by-side benchmark of weight averaging: torch.optim.swa_utils and torch._foreach_* vs swa_fast.

Usage (from the repository root)::

    python -m benchmarks.run                      # every case for the default device
    python benchmarks/run.py --device cpu --cases resnet50 transformer
    python -m benchmarks.run --quick --no-save    # a few repeats (CI smoke)

Per case, in one process, every candidate runs on the same model:

* ``torch_swa``: ``torch.optim.swa_utils.AveragedModel(model).update_parameters(model)``
  (default SWA; on the CPU torch falls back to a per-parameter add/sub/div loop,
  on CUDA it uses ``_foreach`` ops).
* ``torch_ema``: the same with ``multi_avg_fn=get_ema_multi_avg_fn(0.999)``.
* ``torch_foreach_lerp``: the raw ``torch._foreach_lerp_(averaged, current, 0.001)``.
* ``swa_fast_swa`` / ``swa_fast_ema``: ``swa_fast.swa_utils.AveragedModel`` with the
  same settings.
* ``swa_fast_average_``: the raw op ``swa_fast.average_(averaged, current, weight)``.
* ``copy``: ``dst.copy_(src)`` of a buffer the size of the averaged set, the memory
  copy rate the averaging rates are compared with.

Both AveragedModels have done their first update (the copy) before any timing,
so the timings are of steady-state averaging updates. Candidates are
interleaved: each round runs every candidate once (a sample of ``inner``
updates; the order rotates between rounds), after warm-up rounds, and the
median (and min) over the rounds is reported, so machine noise hits all
candidates alike. On CUDA a sample is timed with CUDA events around a loop of
``inner`` updates (synchronised before and after); on the CPU with a host timer.

Effective GB/s counts the bytes an averaging update must move,
``2 * averaged_bytes + current_bytes`` (read and write the average, read the
model); the copy moves ``2 * buffer_bytes``. "% of copy" is a candidate's GB/s
over the copy's, measured in the same rounds.

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
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

if __package__ in (None, ""):  # run as `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.optim import swa_utils as torch_swa_utils

import swa_fast
from swa_fast import swa_utils as fast_swa_utils
from swa_fast._ops import weight_tensor

from benchmarks.cases import CASES, Case, cases_for, get_case, make_model

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
EMA_DECAY = 0.999

# (speedup name, candidate, baseline); a pair is reported when both ran.
SPEEDUPS = [
    ("swa_fast SWA vs torch SWA", "swa_fast_swa", "torch_swa"),
    ("swa_fast EMA vs torch EMA", "swa_fast_ema", "torch_ema"),
    ("average_ vs _foreach_lerp_", "swa_fast_average_", "torch_foreach_lerp"),
    ("average_ vs _foreach_lerp_(avg32, [x.to(float32)])", "swa_fast_average_", "torch_foreach_lerp_cast"),
]


# ---------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------


@dataclass
class Candidate:
    key: str
    label: str
    fn: Callable[[], None]
    bytes_per_update: int  # bytes an update must move (see module docstring)
    kind: str  # "torch", "swa_fast" or "copy"
    inner: int = 1
    samples_ms: List[float] = field(default_factory=list)  # per update, one per round


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _torch_swa_path(device: torch.device) -> str:
    supported = torch_swa_utils._get_foreach_kernels_supported_devices()
    return "_foreach ops" if device.type in supported else "per-param add/sub/div"


def build_candidates(case: Case, device, *, seed: int = 0) -> List[Candidate]:
    """Every candidate for ``case`` on ``device``, set up and past its first (copy) update."""
    device = torch.device(device)
    model = make_model(case, device, seed=seed)
    params = [p.detach() for p in model.parameters()]
    avg_dtype = case.averaged_dtype
    mixed = avg_dtype != case.dtype
    model_dt, avg_dt = _dtype_name(case.dtype), _dtype_name(avg_dtype)
    same_dtype_bytes = 3 * case.model_bytes  # averages in the model's dtype (torch)
    fast_bytes = 2 * case.averaged_bytes + case.model_bytes
    candidates: List[Candidate] = []

    def averaged_model(cls, **kwargs):
        averaged = cls(model, **kwargs)
        averaged.update_parameters(model)  # the first update copies: do it before timing
        assert int(averaged.n_averaged) == 1
        return averaged

    torch_suffix = f" [{model_dt} avg]" if mixed else ""
    torch_swa = averaged_model(torch_swa_utils.AveragedModel)
    candidates.append(
        Candidate(
            "torch_swa",
            f"torch AveragedModel SWA ({_torch_swa_path(device)}){torch_suffix}",
            lambda: torch_swa.update_parameters(model),
            same_dtype_bytes,
            "torch",
        )
    )
    torch_ema = averaged_model(
        torch_swa_utils.AveragedModel, multi_avg_fn=torch_swa_utils.get_ema_multi_avg_fn(EMA_DECAY)
    )
    candidates.append(
        Candidate(
            "torch_ema",
            f"torch AveragedModel EMA (_foreach_lerp_){torch_suffix}",
            lambda: torch_ema.update_parameters(model),
            same_dtype_bytes,
            "torch",
        )
    )
    foreach_avg = [p.clone() for p in params]
    candidates.append(
        Candidate(
            "torch_foreach_lerp",
            f"torch._foreach_lerp_(avg, cur, 1e-3){torch_suffix}",
            lambda: torch._foreach_lerp_(foreach_avg, params, 1 - EMA_DECAY),
            same_dtype_bytes,
            "torch",
        )
    )
    if mixed:
        cast_avg = [p.to(avg_dtype, copy=True) for p in params]
        candidates.append(
            Candidate(
                "torch_foreach_lerp_cast",
                f"torch._foreach_lerp_({avg_dt} avg, [x.to({avg_dt})], 1e-3)",
                lambda: torch._foreach_lerp_(cast_avg, [p.to(avg_dtype) for p in params], 1 - EMA_DECAY),
                fast_bytes,
                "torch",
            )
        )

    fast_kwargs = {"avg_dtype": avg_dtype} if mixed else {}
    fast_suffix = f" [{avg_dt} avg]" if mixed else ""
    fast_swa = averaged_model(fast_swa_utils.AveragedModel, **fast_kwargs)
    candidates.append(
        Candidate(
            "swa_fast_swa",
            f"swa_fast AveragedModel SWA{fast_suffix}",
            lambda: fast_swa.update_parameters(model),
            fast_bytes,
            "swa_fast",
        )
    )
    fast_ema = averaged_model(
        fast_swa_utils.AveragedModel, multi_avg_fn=fast_swa_utils.get_ema_multi_avg_fn(EMA_DECAY), **fast_kwargs
    )
    candidates.append(
        Candidate(
            "swa_fast_ema",
            f"swa_fast AveragedModel EMA{fast_suffix}",
            lambda: fast_ema.update_parameters(model),
            fast_bytes,
            "swa_fast",
        )
    )
    raw_avg = [p.to(avg_dtype, copy=True) for p in params]
    weight = weight_tensor(1 - EMA_DECAY, device)
    candidates.append(
        Candidate(
            "swa_fast_average_",
            f"swa_fast.average_(avg, cur, w=1e-3){fast_suffix}",
            lambda: swa_fast.average_(raw_avg, params, weight),
            fast_bytes,
            "swa_fast",
        )
    )

    copy_src = torch.ones(case.averaged_bytes, dtype=torch.uint8, device=device)
    copy_dst = torch.empty_like(copy_src)
    candidates.append(
        Candidate(
            "copy",
            f"copy: dst.copy_(src), {case.averaged_bytes / 1e6:.1f} MB",
            lambda: copy_dst.copy_(copy_src),
            2 * case.averaged_bytes,
            "copy",
        )
    )

    # Move the model away from the averages it was copied into, so the updates
    # average values that differ (as in training); values stay O(0.02).
    with torch.no_grad():
        torch._foreach_add_(params, 0.01)
    return candidates


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


class Timer:
    """Times ``inner`` calls of a function: CUDA events on CUDA, a host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def per_call_ms(self, fn: Callable[[], None], inner: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            self.start.record()
            for _ in range(inner):
                fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / inner
        begin = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - begin) * 1e3 / inner


def run_rounds(
    candidates: Sequence[Candidate],
    device: torch.device,
    *,
    repeats: int,
    warmup: int,
    target_ms: float,
    max_inner: int = 1000,
    inner: Optional[int] = None,
    budget_s: Optional[float] = None,
    min_repeats: int = 5,
) -> None:
    """Warm up, pick each candidate's ``inner`` (updates per sample, so a sample lasts about
    ``target_ms``), then ``repeats`` interleaved rounds with a rotating order; with
    ``budget_s``, stop early (after at least ``min_repeats`` rounds) once the timed
    rounds have taken that long."""
    timer = Timer(device)
    for _ in range(warmup):
        for candidate in candidates:
            candidate.fn()
    timer.sync()
    for candidate in candidates:
        if inner is not None:
            candidate.inner = inner
        else:
            once = timer.per_call_ms(candidate.fn, 1)
            candidate.inner = max(1, min(max_inner, math.ceil(target_ms / max(once, 1e-3))))
        candidate.samples_ms = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        begin = time.perf_counter()
        for round_index in range(repeats):
            if budget_s is not None and round_index >= min_repeats and time.perf_counter() - begin > budget_s:
                break
            shift = round_index % len(candidates)
            for candidate in list(candidates[shift:]) + list(candidates[:shift]):
                candidate.samples_ms.append(timer.per_call_ms(candidate.fn, candidate.inner))
    finally:
        if gc_was_enabled:
            gc.enable()


# ---------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------


def _gbps(num_bytes: int, ms: float) -> float:
    return num_bytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")


def summarize(case: Case, candidates: Sequence[Candidate]) -> dict:
    copy = next(c for c in candidates if c.key == "copy")
    copy_gbps = _gbps(copy.bytes_per_update, statistics.median(copy.samples_ms))
    results = {}
    for c in candidates:
        median = statistics.median(c.samples_ms)
        quartiles = statistics.quantiles(c.samples_ms, n=4) if len(c.samples_ms) > 1 else [median] * 3
        gbps = _gbps(c.bytes_per_update, median)
        results[c.key] = {
            "label": c.label,
            "kind": c.kind,
            "median_ms": median,
            "min_ms": min(c.samples_ms),
            "mean_ms": statistics.fmean(c.samples_ms),
            "q1_ms": quartiles[0],
            "q3_ms": quartiles[2],
            "repeats": len(c.samples_ms),
            "inner": c.inner,
            "samples_ms": c.samples_ms,
            "bytes_per_update": c.bytes_per_update,
            "gbps": gbps,
            "gbps_best": _gbps(c.bytes_per_update, min(c.samples_ms)),
            "fraction_of_copy": gbps / copy_gbps,
        }
    speedups = {}
    for name, fast, base in SPEEDUPS:
        if fast in results and base in results:
            speedups[name] = {
                "candidate": fast,
                "baseline": base,
                "median": results[base]["median_ms"] / results[fast]["median_ms"],
                "min": results[base]["min_ms"] / results[fast]["min_ms"],
            }
    return {
        "note": case.note,
        "num_tensors": case.num_tensors,
        "num_params": case.num_params,
        "model_dtype": _dtype_name(case.dtype),
        "avg_dtype": _dtype_name(case.averaged_dtype),
        "model_bytes": case.model_bytes,
        "averaged_bytes": case.averaged_bytes,
        "copy_gbps": copy_gbps,
        "candidates": results,
        "speedups": speedups,
    }


def run_case(case: Case, device: torch.device, *, repeats: int, warmup: int, target_ms: float,
             inner: Optional[int] = None, budget_s: Optional[float] = None) -> dict:
    begin = time.perf_counter()
    candidates = build_candidates(case, device)
    setup_s = time.perf_counter() - begin
    run_rounds(candidates, device, repeats=repeats, warmup=warmup, target_ms=target_ms, inner=inner,
               budget_s=budget_s, min_repeats=min(5, repeats))
    result = summarize(case, candidates)
    result["setup_s"] = setup_s
    result["wall_s"] = time.perf_counter() - begin
    del candidates
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def format_case(name: str, result: dict, device_label: str) -> str:
    mb = 1e6
    lines = [
        f"== {name}: {result['note']}",
        f"   {result['num_tensors']} tensors, {result['num_params']:,} parameters; model "
        f"{result['model_bytes'] / mb:.1f} MB {result['model_dtype']}, averages "
        f"{result['averaged_bytes'] / mb:.1f} MB {result['avg_dtype']}; {device_label}",
    ]
    rows = list(result["candidates"].values())
    width = max(len(r["label"]) for r in rows)
    lines.append(
        f"   {'candidate':<{width}}  {'median ms':>10}  {'min ms':>9}  {'IQR ms':>15}  {'n x inner':>9}"
        f"  {'eff GB/s':>8}  {'% of copy':>9}"
    )
    for r in rows:
        iqr = f"{r['q1_ms']:.3f}-{r['q3_ms']:.3f}"
        lines.append(
            f"   {r['label']:<{width}}  {r['median_ms']:>10.3f}  {r['min_ms']:>9.3f}  {iqr:>15}"
            f"  {str(r['repeats']) + 'x' + str(r['inner']):>9}  {r['gbps']:>8.2f}  {100 * r['fraction_of_copy']:>8.1f}%"
        )
    for speedup_name, s in result["speedups"].items():
        lines.append(f"   speedup {speedup_name}: x{s['median']:.2f} (median), x{s['min']:.2f} (min)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", " ", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        name = torch.cuda.get_device_name(index)
        return {
            "type": "cuda",
            "name": name,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count,
            "cuda_version": torch.version.cuda,
            "slug": _slug(name),
            "label": f"{name} (CUDA {torch.version.cuda})",
        }
    model = _cpu_model()
    threads = torch.get_num_threads()
    return {
        "type": "cpu",
        "name": model,
        "threads": threads,
        "logical_cpus": os.cpu_count(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threading_env": {k: v for k, v in os.environ.items() if k.split("_")[0] in ("OMP", "GOMP", "KMP", "MKL")},
        "slug": f"cpu-{_slug(model)}-{threads}threads",
        "label": f"CPU {model}, {threads} threads (copy = CPU memcpy in the same run)",
    }


def _loadavg() -> Optional[List[float]]:
    """1/5/15-minute load averages: other work on the machine shows up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        try:
            commit = git("rev-parse", "HEAD")
        except subprocess.CalledProcessError:
            commit = "no-commit"
        # Results files written by earlier runs do not make the tree dirty.
        dirty = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Side-by-side weight-averaging benchmark: torch.optim.swa_utils / torch._foreach_* vs swa_fast.",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=None,
                        help="default: every case that applies to the device")
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
                        help="JSON path (default: benchmarks/results/<device-slug>.json)")
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
    if args.cases is None:
        cases = cases_for(args.device)
    else:
        cases = []
        for name in dict.fromkeys(args.cases):
            case = get_case(name)
            if case.applies_to(args.device):
                cases.append(case)
            else:
                print(f"skipping {name}: GPU only", flush=True)

    info = device_info(device)
    if __name__ == "__main__":  # the command line that started this run
        as_module = __spec__ is not None and __spec__.name == "benchmarks.run"
        command = shlex.join(["python", *(["-m", "benchmarks.run"] if as_module else sys.argv[:1]), *sys.argv[1:]])
    else:
        command = f"benchmarks.run.main({list(sys.argv[1:] if argv is None else argv)!r})"
    report = {
        "schema": 1,
        "device": info,
        "torch_version": torch.__version__,
        "swa_fast_version": swa_fast.__version__,
        "swa_fast_build_info": dict(swa_fast.BUILD_INFO),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "python": platform.python_version(),
        "loadavg_start": _loadavg(),
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "inner": args.inner,
            "target_ms": args.target_ms,
            "budget_s": args.budget,
            "quick": args.quick,
            "ema_decay": EMA_DECAY,
            "timing": "CUDA events around a loop of `inner` updates" if device.type == "cuda"
            else "host perf_counter around a loop of `inner` updates",
        },
        "cases": {},
    }
    print(f"swa_fast {swa_fast.__version__} ({swa_fast.BUILD_INFO}), torch {torch.__version__}, "
          f"{info['label']}, commit {report['git_commit']}", flush=True)
    budget = (f" (or fewer, at least {min(5, args.repeats)}, once a case's timed rounds pass {args.budget:g} s)"
              if args.budget else "")
    print(f"rounds: {args.repeats} timed{budget} after {args.warmup} warm-up, candidates interleaved; "
          f"times are ms per update; load average {report['loadavg_start']}", flush=True)
    begin = time.perf_counter()
    for case in cases:
        result = run_case(case, device, repeats=args.repeats, warmup=args.warmup,
                          target_ms=args.target_ms, inner=args.inner, budget_s=args.budget or None)
        report["cases"][case.name] = result
        print(format_case(case.name, result, info["label"]), flush=True)
        print(f"   ({result['wall_s']:.1f} s, setup {result['setup_s']:.1f} s)", flush=True)
    report["wall_s"] = time.perf_counter() - begin
    report["loadavg_end"] = _loadavg()
    print(f"total {report['wall_s']:.1f} s", flush=True)
    if not args.no_save:
        output = args.output or RESULTS_DIR / f"{info['slug']}.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1) + "\n")
        print(f"saved {output}", flush=True)
    return report


if __name__ == "__main__":
    main()
