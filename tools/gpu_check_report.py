"""Reads what tools/gpu_check.sh's stages wrote and turns it into figures, targets and the summary.

    python3 tools/gpu_check_report.py env                      # one line: GPU, SMs, torch, CUDA
    python3 tools/gpu_check_report.py junit FILE               # "P passed, F failed, E errors, S skipped"
    python3 tools/gpu_check_report.py sanitizer LOG...         # errors / hazards per tool
    python3 tools/gpu_check_report.py bench JSON [JSON_32KB]   # the issue's targets, met or missed
    python3 tools/gpu_check_report.py recipe DIR               # accuracies and averaging times of a recipe run
    python3 tools/gpu_check_report.py report ROWS OUTDIR       # OUTDIR/summary.json and the final table

Each figure command prints one line (the stage's key figure) and exits 0 when
its stage passed, 1 when not, 2 when the input is missing.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# (name, suite case, kind, candidate, baseline or None, bound): kind "speedup" compares the
# median speedup of candidate over baseline with a lower bound; "copy" compares the
# candidate's achieved fraction of the copy bandwidth measured in the same run.
TARGETS: List[Tuple[str, str, str, str, Optional[str], float]] = [
    ("SWA update vs torch AveragedModel (ResNet-50)", "resnet50", "speedup", "swa_fast_swa", "torch_swa", 10.0),
    ("EMA update vs torch get_ema_multi_avg_fn (ResNet-50)", "resnet50", "speedup", "swa_fast_ema", "torch_ema", 2.0),
    ("SWA update, fraction of copy bandwidth (1B fp32)", "billion", "copy", "swa_fast_swa", None, 0.85),
    ("SWA update, fraction of copy bandwidth (1B bf16 -> fp32)", "billion_bf16", "copy", "swa_fast_swa", None, 0.85),
    ("distance vs _foreach_sub + _foreach_norm (transformer)", "distance_transformer", "speedup",
     "swa_fast_distance", "torch_foreach", 3.0),
    ("distance, fraction of copy bandwidth (transformer)", "distance_transformer", "copy", "swa_fast_distance", None,
     0.85),
]
# MultiAverage of K EMAs vs K WeightAverages: at least 0.9 of the byte-count ratio 12K/(4+8K).
for _k in (2, 3, 4):
    TARGETS.append((f"MultiAverage of {_k} EMAs vs {_k} WeightAverages (transformer)", f"multi_transformer_k{_k}",
                    "speedup", "multi_average", "weight_averages", round(0.9 * 12 * _k / (4 + 8 * _k), 3)))
GHOST_CASES = ["gbn_n2048_c64_32x32_g128", "gbn_n2048_c64_32x32_g128_channels_last", "gbn_n2048_c64_32x32_g128_bf16"]
for _case in GHOST_CASES:
    _label = _case.replace("gbn_n2048_c64_32x32_g128", "N=2048 C=64 32x32 ghost 128").replace("_", " ")
    # time <= 1.25 x cuDNN BatchNorm2d  <=>  speedup over it >= 0.8
    TARGETS.append((f"ghost BN fwd+bwd vs cuDNN BatchNorm2d ({_label})", _case, "speedup", "swa_fast", "batchnorm", 0.8))
    TARGETS.append((f"ghost BN fwd+bwd vs chunk loop ({_label})", _case, "speedup", "swa_fast", "chunk_loop", 5.0))


def env_line() -> int:
    import torch

    parts = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        parts = [f"{props.name}", f"sm_{props.major}{props.minor}", f"{props.multi_processor_count} SMs",
                 f"{props.total_memory / 2**30:.0f} GiB"] + parts
    else:
        parts = ["no CUDA device"] + parts
    print(", ".join(parts))
    return 0


def junit_line(path: Path) -> int:
    if not path.is_file():
        print(f"no JUnit report ({path.name} missing)")
        return 2
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    print(f"{passed} passed, {count['failures']} failed, {count['errors']} errors, {count['skipped']} skipped")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    for name in failed[:30]:
        print(f"  FAILED {name}", file=sys.stderr)
    return 0 if count["failures"] + count["errors"] == 0 else 1


def sanitizer_line(paths: List[Path]) -> int:
    parts, bad = [], False
    for path in paths:
        tool = path.stem.split("-")[-1]
        if not path.is_file():
            parts.append(f"{tool}: no log")
            bad = True
            continue
        text = path.read_text(errors="replace")
        errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazard", text)
        if hazards:
            parts.append(f"{tool}: {hazards[-1]} hazards")
            bad |= int(hazards[-1]) > 0
        elif errors:
            parts.append(f"{tool}: {errors[-1]} errors")
            bad |= int(errors[-1]) > 0
        else:
            parts.append(f"{tool}: no summary (crashed or timed out)")
            bad = True
        if "gpu_sanitize: 0 failed" not in text:
            parts[-1] += ", driver failed"
            bad = True
    print("; ".join(parts))
    return 1 if bad else 0


def _measure(report: dict, case: str, kind: str, candidate: str, baseline: Optional[str]) -> Optional[float]:
    found = report.get("cases", {}).get(case)
    if not found:
        return None
    candidates = found["candidates"]
    if candidate not in candidates or (baseline is not None and baseline not in candidates):
        return None
    if kind == "copy":
        return candidates[candidate].get("fraction_of_copy")
    return candidates[baseline]["median_ms"] / candidates[candidate]["median_ms"]


def evaluate_targets(report: dict) -> List[dict]:
    rows = []
    for name, case, kind, candidate, baseline, bound in TARGETS:
        value = _measure(report, case, kind, candidate, baseline)
        status = "not run" if value is None else ("met" if value >= bound else "missed")
        rows.append({"target": name, "case": case, "kind": kind, "value": value, "bound": bound, "status": status})
    return rows


def bench_line(path: Path, large: Optional[Path], summary_path: Optional[Path] = None) -> int:
    if not path.is_file():
        print(f"no benchmark results ({path.name} missing)")
        return 2
    measured = json.loads(path.read_text())
    rows = evaluate_targets(measured)
    if measured.get("device", {}).get("type") != "cuda":
        # The targets are GPU targets: on the CPU only show what was measured.
        shown = [f"{r['case']} {r['kind']} {r['value']:.2f}" for r in rows if r["value"] is not None]
        print(f"{measured.get('device', {}).get('type', '?')} figures, no GPU targets: " + ", ".join(shown))
        return 0
    large_rows = evaluate_targets(json.loads(large.read_text())) if large and large.is_file() else None
    for i, row in enumerate(rows):
        shown = "n/a" if row["value"] is None else (f"{row['value']:.2f}" + ("x" if row["kind"] == "speedup" else ""))
        extra = ""
        if large_rows and large_rows[i]["value"] is not None:
            extra = f" (32 KB args: {large_rows[i]['value']:.2f})"
            row["value_32kb_args"] = large_rows[i]["value"]
        print(f"  {row['status']:7s} {row['target']}: {shown} (target {'>=' if row['kind'] == 'speedup' else '>='} "
              f"{row['bound']}){extra}", file=sys.stderr)
    met = sum(r["status"] == "met" for r in rows)
    ran = sum(r["status"] != "not run" for r in rows)
    print(f"targets met {met}/{ran} measured ({len(rows)} defined)")
    if summary_path is not None:
        summary_path.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def recipe_line(directory: Path) -> int:
    path = directory / "results.json"
    if not path.is_file():
        print(f"no recipe results ({path} missing)")
        return 2
    results = json.loads(path.read_text())
    accuracies = []
    for run in results["runs"]:
        for label, metrics in run["finals"].items():
            accuracies.append(f"{label} {100 * metrics['test_acc']:.1f}%")
    timing = [run["averaging"] for run in results["runs"] if run["averaging"]["updates"]]
    parts = [", ".join(accuracies)]
    for t in timing:
        if t["fast_seconds"] > 0:
            parts.append(f"averaging {t['torch_seconds'] / t['fast_seconds']:.1f}x torch over {t['updates']} updates, "
                         f"max |diff| {t['max_abs_diff']:.1e}")
    print("; ".join(parts))
    return 0


def report(rows_path: Path, outdir: Path) -> int:
    stages = []
    for line in rows_path.read_text().splitlines():
        name, status, seconds, key = (line.split("\t") + ["", "", "", ""])[:4]
        stages.append({"name": name, "status": status, "seconds": float(seconds or 0), "key_figure": key})
    summary: Dict[str, object] = {"stages": stages}
    targets_path = outdir / "targets.json"
    if targets_path.is_file():
        summary["targets"] = json.loads(targets_path.read_text())
        targets_path.unlink()  # folded into summary.json: one file fewer to bring back
    (outdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    width = max([len(s["name"]) for s in stages] + [5])
    print(f"{'stage':{width}}  {'status':24}  {'seconds':>7}  key figure")
    for s in stages:
        print(f"{s['name']:{width}}  {s['status']:24}  {s['seconds']:7.0f}  {s['key_figure']}")
    for target in summary.get("targets", []):
        value = "n/a" if target["value"] is None else f"{target['value']:.2f}"
        print(f"  target {target['status']:7s} {value:>6} (>= {target['bound']}) {target['target']}")
    return 0


def main(argv: List[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    command, args = argv[0], argv[1:]
    if command == "env":
        return env_line()
    if command == "junit":
        return junit_line(Path(args[0]))
    if command == "sanitizer":
        return sanitizer_line([Path(a) for a in args])
    if command == "bench":
        large = Path(args[1]) if len(args) > 1 and args[1] else None
        summary = Path(args[2]) if len(args) > 2 else None
        return bench_line(Path(args[0]), large, summary)
    if command == "recipe":
        return recipe_line(Path(args[0]))
    if command == "report":
        return report(Path(args[0]), Path(args[1]))
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
