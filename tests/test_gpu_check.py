"""tools/gpu_check.sh is wired right: its dry run on this CPU machine, and its report tool.

The GPU check must work the first time a GPU is lent (15 minutes of device
time per task, no second chance), so every piece of its plumbing runs here:
the stages in order with their own time limits, the CPU counterparts of the
sanitizer driver, the graph check, the benchmark and the recipe, the JUnit,
sanitizer-log and benchmark parsing, and the summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_check_report

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"
STAGES = ["env", "build", "tests", "sanitizer", "graph", "bench", "recipe"]


def run_check(out: Path, budget: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable}
    if budget is not None:
        env["GPU_CHECK_BUDGET_S"] = str(budget)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT / "tests")


def test_dry_run_runs_every_stage_and_writes_the_summary(tmp_path):
    out = tmp_path / "check"
    result = run_check(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert stages["env"]["status"] == "ok"
    for name in STAGES[1:]:
        assert stages[name]["status"] == "skipped (dry run)", stages[name]
        assert stages[name]["key_figure"], name
    # The CPU counterparts really ran.
    assert "cases passed on cpu" in stages["sanitizer"]["key_figure"]
    assert "max |diff| 0" in stages["graph"]["key_figure"]
    assert "SWA 1.5 budgets" in stages["recipe"]["key_figure"]
    assert "skipped" in stages["tests"]["key_figure"]
    # What comes back from the device: a few flat files, the table printed last.
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
    assert {"check.log", "summary.json", "junit.xml", "bench.json", "recipe.md"} <= set(files)
    last_lines = result.stdout.strip().splitlines()[-len(STAGES):]
    assert [line.split()[0] for line in last_lines] == STAGES
    log = (out / "check.log").read_text()
    assert all(f"==== {name}:" in log for name in STAGES)


def test_stages_without_time_left_are_skipped_and_still_reported(tmp_path):
    out = tmp_path / "check"
    result = run_check(out, budget=60)
    summary = json.loads((out / "summary.json").read_text())
    statuses = {s["name"]: s["status"] for s in summary["stages"]}
    assert list(statuses) == STAGES
    assert "skipped (no time left)" in statuses.values()  # the reserves of later stages exceed the budget
    assert result.returncode == 0  # skipped is not failed


def test_usage_error_without_an_output_directory():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_junit_counts(tmp_path, capsys):
    report = tmp_path / "junit.xml"
    report.write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/></testcase>'
        "</testsuite></testsuites>"
    )
    assert gpu_check_report.junit_line(report) == 1
    assert capsys.readouterr().out.strip() == "2 passed, 1 failed, 0 errors, 2 skipped"
    assert gpu_check_report.junit_line(tmp_path / "missing.xml") == 2


@pytest.mark.parametrize(
    "logs,status,expected",
    [
        ({"memcheck": "ERROR SUMMARY: 0 errors", "racecheck": "RACECHECK SUMMARY: 0 hazards displayed"}, 0,
         "memcheck: 0 errors; racecheck: 0 hazards"),
        ({"memcheck": "ERROR SUMMARY: 3 errors"}, 1, "memcheck: 3 errors"),
        ({"initcheck": "Segmentation fault"}, 1, "initcheck: no summary (crashed or timed out)"),
    ],
)
def test_sanitizer_summaries(tmp_path, capsys, logs, status, expected):
    paths = []
    for tool, text in logs.items():
        path = tmp_path / f"sanitizer-{tool}.log"
        path.write_text(f"{text}\ngpu_sanitize: 0 failed\n")
        paths.append(path)
    assert gpu_check_report.sanitizer_line(paths) == status
    assert capsys.readouterr().out.strip() == expected


def fake_bench(device_type: str, speedups: dict, fractions: dict) -> dict:
    """A benchmark report with median times giving these speedups and copy fractions."""
    cases = {}
    for (case, candidate, baseline), ratio in speedups.items():
        found = cases.setdefault(case, {"candidates": {}})["candidates"]
        found[candidate] = {"median_ms": 1.0}
        found[baseline] = {"median_ms": ratio}
    for (case, candidate), fraction in fractions.items():
        found = cases.setdefault(case, {"candidates": {}})["candidates"]
        found.setdefault(candidate, {"median_ms": 1.0})["fraction_of_copy"] = fraction
    return {"device": {"type": device_type}, "cases": cases}


def test_targets_met_missed_and_not_run():
    report = fake_bench(
        "cuda",
        {("resnet50", "swa_fast_swa", "torch_swa"): 12.0, ("resnet50", "swa_fast_ema", "torch_ema"): 1.5,
         ("gbn_n2048_c64_32x32_g128", "swa_fast", "batchnorm"): 0.9},
        {("billion", "swa_fast_swa"): 0.91},
    )
    rows = {r["target"]: r for r in gpu_check_report.evaluate_targets(report)}
    assert rows["SWA update vs torch AveragedModel (ResNet-50)"]["status"] == "met"
    assert rows["EMA update vs torch get_ema_multi_avg_fn (ResNet-50)"]["status"] == "missed"
    assert rows["SWA update, fraction of copy bandwidth (1B fp32)"]["status"] == "met"
    assert rows["SWA update, fraction of copy bandwidth (1B bf16 -> fp32)"]["status"] == "not run"
    assert rows["ghost BN fwd+bwd vs cuDNN BatchNorm2d (N=2048 C=64 32x32 ghost 128)"]["status"] == "met"


def test_bench_line_on_cuda_writes_targets_and_reads_the_32kb_run(tmp_path, capsys):
    small = fake_bench("cuda", {("resnet50", "swa_fast_swa", "torch_swa"): 11.0}, {})
    large = fake_bench("cuda", {("resnet50", "swa_fast_swa", "torch_swa"): 14.0}, {})
    (tmp_path / "a.json").write_text(json.dumps(small))
    (tmp_path / "b.json").write_text(json.dumps(large))
    targets = tmp_path / "targets.json"
    assert gpu_check_report.bench_line(tmp_path / "a.json", tmp_path / "b.json", targets) == 0
    assert capsys.readouterr().out.strip() == "targets met 1/1 measured (15 defined)"
    first = json.loads(targets.read_text())[0]
    assert first["value"] == 11.0 and first["value_32kb_args"] == 14.0
