"""Timing machinery shared by every benchmark suite: candidates, interleaved rounds,
summaries with GB/s and speedups, and the facts about the machine a result needs.

A suite (``benchmarks/averaging.py``, ``benchmarks/ghost_bn.py``, ...) builds a list of
:class:`Candidate` per case, always including one with key ``"copy"``: a memory copy
timed in the same rounds, the rate every other candidate's GB/s is compared with.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"  # run.py writes here, readme_tables.py reads
# Smoke runs (run.py --quick, or fewer than MIN_REPEATS rounds) write here instead: a folder .gitignore
# ignores, below RESULTS_DIR so it is easy to find, and never read by readme_tables.py (which reads
# RESULTS_DIR/*.json, not subfolders), so a smoke run cannot replace a committed reference.
SCRATCH_DIR = RESULTS_DIR / "scratch"
# The fewest timed rounds whose median the runner treats as a measurement (a --budget stops no
# earlier); a run with fewer is a smoke run.
MIN_REPEATS = 5


@dataclass
class Candidate:
    key: str
    label: str
    fn: Callable[[], None]
    bytes_per_update: int  # bytes one call must move (each suite documents its count)
    kind: str  # "torch", "swa_fast" or "copy"
    inner: int = 1
    samples_ms: List[float] = field(default_factory=list)  # per call, one per round


class Steps:
    """The step counter a training loop passes to an update: one more per call."""

    def __init__(self) -> None:
        self.step = 0

    def next(self) -> int:
        self.step += 1
        return self.step


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def case_facts(case: Any, **extra: Any) -> dict:
    """What every averaging suite stores beside a case's timings in the JSON (a
    :class:`benchmarks.cases.Case`), plus the suite's own ``extra`` facts."""
    return {"note": case.note, "num_tensors": case.num_tensors, "num_params": case.num_params,
            "model_dtype": dtype_name(case.dtype), "avg_dtype": dtype_name(case.averaged_dtype),
            "model_bytes": case.model_bytes, **extra}


def case_header(case: Any, device_label: str, detail: str = "") -> List[str]:
    """The two lines a suite prints above a case's table; ``detail`` goes before the device."""
    detail = f"; {detail}" if detail else ""
    return [f"== {case.name}: {case.note}",
            f"   {case.num_tensors} tensors, {case.num_params:,} parameters, {case.model_bytes / 1e6:.1f} MB "
            f"{dtype_name(case.dtype)}{detail}; {device_label}"]


@torch.no_grad()
def move_model_away(model: torch.nn.Module) -> None:
    """Move the model away from the averages its first update copied, as training would, so the
    timed updates average two different sets of values."""
    torch._foreach_add_([p.detach() for p in model.parameters()], 0.01)


def copy_candidate(num_bytes: int, device: torch.device) -> Candidate:
    """``dst.copy_(src)`` of ``num_bytes``: the copy bandwidth measured in the same rounds."""
    src = torch.ones(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return Candidate("copy", f"copy: dst.copy_(src), {num_bytes / 1e6:.1f} MB",
                     lambda: dst.copy_(src), 2 * num_bytes, "copy")


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
    min_repeats: int = MIN_REPEATS,
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



def pedantic_benchmark(benchmark, case_name: str, candidate: Candidate, device: str, rounds: int = 10) -> None:
    """Times ``candidate`` with pytest-benchmark's ``benchmark`` fixture, grouped by case;
    on CUDA each call is synchronized so its time includes its kernels."""

    def call() -> None:
        candidate.fn()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{case_name} ({device})"
    benchmark.name = f"{case_name}:{candidate.key}"
    benchmark.extra_info.update(label=candidate.label, bytes_per_update=candidate.bytes_per_update)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------


def gbps(num_bytes: int, ms: float) -> float:
    return num_bytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")


def summarize_candidates(
    candidates: Sequence[Candidate], speedups: Sequence[Tuple[str, str, str]]
) -> dict:
    """Per-candidate statistics (median/min/IQR ms, GB/s, fraction of the copy's GB/s) and
    the ``(name, candidate, baseline)`` speedups whose two candidates both ran."""
    copy = next(c for c in candidates if c.key == "copy")
    copy_gbps = gbps(copy.bytes_per_update, statistics.median(copy.samples_ms))
    results = {}
    for c in candidates:
        median = statistics.median(c.samples_ms)
        quartiles = statistics.quantiles(c.samples_ms, n=4) if len(c.samples_ms) > 1 else [median] * 3
        rate = gbps(c.bytes_per_update, median)
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
            "gbps": rate,
            "gbps_best": gbps(c.bytes_per_update, min(c.samples_ms)),
            "fraction_of_copy": rate / copy_gbps,
        }
    ratios = {}
    for name, fast, base in speedups:
        if fast in results and base in results:
            ratios[name] = {
                "candidate": fast,
                "baseline": base,
                "median": results[base]["median_ms"] / results[fast]["median_ms"],
                "min": results[base]["min_ms"] / results[fast]["min_ms"],
            }
    return {"copy_gbps": copy_gbps, "candidates": results, "speedups": ratios}


def format_candidates(result: dict) -> List[str]:
    """The table of one case's candidates and its speedups, as printed by the runner."""
    rows = list(result["candidates"].values())
    width = max(len(r["label"]) for r in rows)
    lines = [
        f"   {'candidate':<{width}}  {'median ms':>10}  {'min ms':>9}  {'IQR ms':>15}  {'n x inner':>9}"
        f"  {'eff GB/s':>8}  {'% of copy':>9}"
    ]
    for r in rows:
        iqr = f"{r['q1_ms']:.3f}-{r['q3_ms']:.3f}"
        lines.append(
            f"   {r['label']:<{width}}  {r['median_ms']:>10.3f}  {r['min_ms']:>9.3f}  {iqr:>15}"
            f"  {str(r['repeats']) + 'x' + str(r['inner']):>9}  {r['gbps']:>8.2f}  {100 * r['fraction_of_copy']:>8.1f}%"
        )
    for speedup_name, s in result["speedups"].items():
        lines.append(f"   speedup {speedup_name}: x{s['median']:.2f} (median), x{s['min']:.2f} (min)")
    return lines


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def loadavg() -> Optional[List[float]]:
    """1/5/15-minute load averages: other work on the machine shows up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> str:
    """HEAD (with -dirty for local changes), or $SWA_FAST_GIT_COMMIT where the tree is a copy
    without .git (the GPU machine: tools/gpu_check.sh is called with it set)."""
    given = os.environ.get("SWA_FAST_GIT_COMMIT")
    if given:
        return given

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
# Options and the saved report, the same for every benchmark script
# ---------------------------------------------------------------------------


def run_facts(commit: str, command: str) -> dict:
    """What every report records about the software and the run: versions, the build, the commit,
    the UTC date, the command and the Python version."""
    import swa_fast  # here, not at import: the sharded benchmark's launcher runs without it

    return {
        "torch_version": torch.__version__,
        "swa_fast_version": swa_fast.__version__,
        "swa_fast_build_info": dict(swa_fast.BUILD_INFO),
        "git_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "python": platform.python_version(),
    }


def fill_defaults(args: Any, defaults: Mapping[str, Any]) -> None:
    """Give every option of ``args`` that was left None its value in ``defaults`` (the script's
    full-run or ``--quick`` preset); an option given on the command line wins."""
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def results_folder(smoke: bool) -> Path:
    """Where a report goes by default: a smoke run to :data:`SCRATCH_DIR`, so it never replaces
    a committed reference."""
    return SCRATCH_DIR if smoke else RESULTS_DIR


def display_path(path: Path) -> str:
    """``path`` relative to the repository root when it is inside it (shorter, and what the docs
    say), else as given."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


SMOKE_NOTE = " (a smoke run: scratch results, ignored by git and by readme_tables.py; --output PATH to choose)"


def save_report(report: dict, output: Path, smoke_default: bool) -> None:
    """Write ``report`` as JSON to ``output`` and say where; ``smoke_default``: a smoke run written
    to its default place, which the line explains (why it is not in benchmarks/results/ and how
    to put it elsewhere)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"saved {display_path(output)}{SMOKE_NOTE if smoke_default else ''}", flush=True)
