"""examples/swap.py: the smoke preset under torchrun, 2 gloo ranks on synthetic Fashion-MNIST IDX files (the SB,
LB and SWAP rows, SWAP's phase 1 equal to the LB run it stops early, the workers-vs-average table, the phases, every
rank identical after swap_average, metrics.csv, the plot and the verdict); in process: the option checks made
before the data loads and the refusal of a single process.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import EXAMPLES, ROOT, ending, load_recipe, results_md_std
from recipe_lib.cli import Number
from recipe_lib.datasets import write_synthetic_fashion_mnist

swap = load_recipe("swap")
ROWS = ["SB", "LB", "SWAP"]
WORKERS = 2


# ------------------------------------------------------------------------------------ the whole path, 2 ranks


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, str]:
    """One torchrun run of the smoke preset, cut to seconds: 512 training images, batch 32 vs 128 (16 and 4
    steps an epoch), 200 test images, one torch thread per rank. Its output folder and what it printed."""
    root = tmp_path_factory.mktemp("swap")
    data = write_synthetic_fashion_mnist(root / "data", n_train=512, n_test=200)
    out = root / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORKERS}",
               str(EXAMPLES / "swap.py"), "--preset", "smoke", "--device", "cpu", "--threads", "1", "--no-progress",
               "--data-dir", str(data), "--out", str(out), "--train-subset", "0", "--test-subset", "0",
               "--small-batch", "32", "--large-batch", "128"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def table(out: Path, header: str) -> dict[str, list[str]]:
    """First cell -> the cells of each row of the results.md table whose header starts with ``header``."""
    lines = (out / "results.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def test_outputs_and_the_results_table(smoke):
    out, printed = smoke
    for name in ("results.md", "results.json", "metrics.csv", "accuracy_vs_time.png"):
        assert (out / name).stat().st_size > 0, name
    assert printed.count("| SWAP |") == 1  # only rank 0 prints the report
    assert "512 train / 200 test samples" in printed and "2 workers on cpu (1 torch thread(s) each)" in printed
    result = json.loads((out / "results.json").read_text())
    assert result["summary"]["processes"] == WORKERS
    finals = {label: metrics for run in result["runs"] for label, metrics in run["finals"].items()}
    rows = table(out, "| arm |")
    assert list(rows) == ROWS
    for label, cells in rows.items():
        metrics = finals[label]
        assert cells[1] == f"{100 * metrics['test_acc']:.2f}" and cells[2] == f"{metrics['wall_seconds']:.1f}"
        assert cells[3] == str(metrics["updates"]) and 0 <= metrics["test_acc"] <= 1 and metrics["wall_seconds"] > 0
    swap_run = next(run for run in result["runs"] if run["arm"] == "swap")["averaging"]
    # One worker's optimizer steps: SB 2 epochs x 512 / 32, LB 2 x (256 per rank / 64), SWAP phase 1 (LB's) and
    # one phase-2 epoch over the whole set at batch 32.
    assert finals["SB"]["updates"] == 32 and finals["LB"]["updates"] == 8
    assert swap_run["phase1_updates"] == 4 * swap_run["phase1_epochs"] and swap_run["phase2_updates"] == 16
    assert finals["SWAP"]["updates"] == swap_run["phase1_updates"] + 16
    total = swap_run["phase1_seconds"] + swap_run["phase2_seconds"] + swap_run["phase3_seconds"]
    assert finals["SWAP"]["wall_seconds"] == pytest.approx(total)
    assert finals["SB"]["test_acc"] > 0.5  # it learned the bands (ten classes: chance is 0.1)


def test_workers_table_and_identical_ranks(smoke):
    out, _ = smoke
    result = json.loads((out / "results.json").read_text())
    info = next(run for run in result["runs"] if run["arm"] == "swap")["averaging"]
    assert len(info["workers"]) == WORKERS
    assert info["ranks_identical"] is True and result["summary"]["ranks_identical"] is True
    header = "| seed | worker 0 % | worker 1 % | mean of workers % | SWAP average % |"
    assert header in (out / "results.md").read_text()
    cells = table(out, header)["0"]
    workers = [100 * w["test_acc"] for w in info["workers"]]
    assert cells[1:3] == [f"{a:.2f}" for a in workers] and cells[3] == f"{sum(workers) / WORKERS:.2f}"
    swap_final = next(run for run in result["runs"] if run["arm"] == "swap")["finals"]["SWAP"]
    assert cells[4] == f"{100 * swap_final['test_acc']:.2f}"
    phases = table(out, "| seed | phase 1 epochs |")["0"]
    assert phases[-1] == "yes" and phases[1] == str(info["phase1_epochs"])


def test_metrics_csv_and_phase_one_is_the_lb_run(smoke):
    out, _ = smoke
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"seed", "arm", "phase", "epoch", "updates", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
            "epoch_seconds", "elapsed_seconds", "worker0_test_acc", "worker1_test_acc"} <= set(rows[0])
    by_arm = {arm: [r for r in rows if r["arm"] == arm] for arm in ("sb", "lb", "swap")}
    assert [r["epoch"] for r in by_arm["sb"]] == ["1", "2"] and [r["epoch"] for r in by_arm["lb"]] == ["1", "2"]
    phases = [r["phase"] for r in by_arm["swap"]]
    first = phases.count("1")
    assert phases == ["1"] * first + ["2", "3"] and first in (1, 2)
    for arm_rows in by_arm.values():  # training time accumulates epoch by epoch
        elapsed = [float(r["elapsed_seconds"]) for r in arm_rows]
        assert elapsed == sorted(elapsed)
        assert elapsed[-1] == pytest.approx(sum(float(r["epoch_seconds"]) for r in arm_rows))
    # Phase 1 is the LB run stopped early: the same weights, data and schedule give the same numbers.
    for lb_row, p1_row in zip(by_arm["lb"], by_arm["swap"][:first]):
        for key in ("updates", "lr", "train_loss", "train_acc", "test_loss", "test_acc"):
            assert lb_row[key] == p1_row[key], key
    phase2 = next(r for r in by_arm["swap"] if r["phase"] == "2")
    workers = [float(phase2[f"worker{r}_test_acc"]) for r in range(WORKERS)]
    assert float(phase2["test_acc"]) == pytest.approx(sum(workers) / WORKERS)


def test_the_verdict_answers_the_question(smoke):
    out, printed = smoke
    verdict, outputs = ending(printed)
    assert verdict[0].startswith(("- Yes: SWAP reached SB's test accuracy", "- No: SWAP "))
    assert any(line.startswith("- Workers vs average (the paper's figure 1)") for line in verdict)
    assert any("bitwise identical weights and BN statistics" in line and "yes on every seed" in line
               for line in verdict)
    assert any("This was the smoke preset" in line for line in verdict)
    assert not any("docs/RESULTS.md gives" in line for line in verdict)
    assert "\n".join(verdict) in (out / "results.md").read_text()
    assert "![accuracy_vs_time](accuracy_vs_time.png)" in (out / "results.md").read_text() and "![" not in printed
    for name in ("results.md", "results.json", "metrics.csv", "accuracy_vs_time.png"):
        assert any(f"{out / name} (" in line for line in outputs), name


def test_measured_spread_is_results_md():
    """The spread the verdict quotes for a one-seed quick run is docs/RESULTS.md's (2 workers, 3 seeds)."""
    assert list(swap.MEASURED_SPREAD) == ["quick"]
    for label, std in swap.MEASURED_SPREAD["quick"].std_points.items():
        assert results_md_std(label) == [std], label


# ------------------------------------------------------------------------------------ in process: option checks


class WorkStarted(Exception):
    """Raised by the stand-ins of load_dataset and init_distributed: the checks were passed."""


@pytest.fixture
def started(monkeypatch) -> list[str]:
    began: list[str] = []

    def stand_in(*args, **kwargs):
        began.append("started")
        raise WorkStarted

    monkeypatch.setattr("recipe_lib.swap.load_run_data", stand_in)
    monkeypatch.setattr("recipe_lib.swap.init_distributed", stand_in)
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()  # run_swap sets the threads per rank: restore this process's
    yield began
    torch.set_num_threads(threads)


def refusal(argv: list[str], tmp_path: Path, started: list[str]) -> str:
    """The message of swap.py's refusal of ``argv``; checks that nothing started and nothing was written."""
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as raised:
        swap.main([*argv, "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])
    assert started == [], f"{argv}: the run started before the refusal"
    assert sorted(tmp_path.rglob("*")) == before, f"{argv}: files were written"
    return str(raised.value)


@pytest.mark.parametrize("argv, message", [
    (["--swap-threshold", "0"], "argument --swap-threshold: must be a number > 0 and <= 1, got 0"),
    (["--swap-threshold", "1.5"], "argument --swap-threshold: must be a number > 0 and <= 1, got 1.5"),
    (["--phase2-epochs", "0"], "argument --phase2-epochs: must be an integer >= 1, got 0"),
    (["--phase2-lr", "-1"], "argument --phase2-lr: must be a finite number > 0, got -1"),
    (["--large-batch", "0"], "argument --large-batch: must be an integer >= 1, got 0"),
    (["--epochs", "0"], "--epochs 0 is too few: every arm trains at least one epoch (at least 1)"),
    (["--phase1-max-epochs", "0"], "--phase1-max-epochs 0 is too few"),
    (["--epochs", "4", "--phase1-max-epochs", "5"], "--phase1-max-epochs 5 must not exceed --epochs (4)"),
    (["--preset", "smoke", "--warmup-epochs", "3"], "--warmup-epochs 3 must not exceed --epochs (2)"),
    (["--small-batch", "64", "--large-batch", "64"], "--large-batch (64) must be larger than --small-batch (64)"),
    (["--train-subset", "100", "--small-batch", "128", "--large-batch", "256"],
     "--small-batch 128 is more than the 100 training samples"),
    (["--seeds", "1", "1"], "--seeds: 1 is given twice"),
    (["--fsdp"], "--fsdp does not go with swap.py"),
    (["--resume"], "--resume: swap.py writes no checkpoints"),
    (["--stop-after", "1"], "--stop-after: swap.py writes no checkpoints"),
    (["--preset", "quick", "--phase2-lr", "0"], "argument --phase2-lr: must be a finite number > 0, got 0"),
])
def test_bad_options_are_refused_before_anything_starts(argv, message, tmp_path, started):
    assert message in refusal(argv, tmp_path, started)


@pytest.mark.parametrize("world, argv, message", [
    ("3", ["--preset", "smoke"], "--large-batch 256 is not a multiple of the 3 workers"),
    ("2", ["--train-subset", "200", "--small-batch", "64", "--large-batch", "512"],
     "each of the 2 worker(s) takes 256 samples a step, more than its share (100)"),
])
def test_checks_that_depend_on_the_workers(world, argv, message, tmp_path, started, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world)
    assert message in refusal(argv, tmp_path, started)


@pytest.mark.parametrize("world", [None, "1"])
def test_a_single_process_is_refused_with_the_torchrun_command(world, tmp_path, started, monkeypatch):
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
    message = refusal(["--preset", "smoke"], tmp_path, started)
    assert "swap.py needs at least 2 workers" in message
    assert "torchrun --nproc_per_node=2 examples/swap.py --device cpu --preset smoke --out " in message


@pytest.mark.parametrize("preset", ["smoke", "quick", "paper"])
def test_every_preset_passes_the_checks_under_torchrun(preset, tmp_path, started, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(WorkStarted):
        swap.main(["--preset", preset, "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])


def numeric_options() -> list[tuple[str, bool]]:
    """(option, whether 0 is in range) of every numeric option of swap.py."""
    return [(action.option_strings[0], action.type.accepts(0))
            for action in swap.build_parser()._actions if isinstance(action.type, Number)]


def test_the_walk_finds_the_recipes_options():
    found = {option for option, _ in numeric_options()}
    assert {"--epochs", "--small-batch", "--large-batch", "--lr", "--warmup-epochs", "--swap-threshold",
            "--phase1-max-epochs", "--phase2-epochs", "--phase2-lr", "--seeds"} <= found


@pytest.mark.parametrize("option, zero_ok", numeric_options())
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_every_numeric_option_refuses_negative_zero_and_non_finite(option, zero_ok, value, tmp_path, started):
    if value == "0" and zero_ok:
        pytest.skip("0 is in this option's range")
    message = refusal([f"{option}={value}"], tmp_path, started)
    if option in ("--epochs", "--phase1-max-epochs") and value in ("0", "-1"):
        assert option in message and value in message, message  # checked against the other options
    else:
        assert f"argument {option}" in message and value in message, message


def test_help_lists_the_presets_and_what_is_refused():
    text = " ".join(swap.build_parser().format_help().split())
    assert "--swap-threshold SWAP_THRESHOLD" in text and "(quick preset: 0.88; smoke: 0.6; paper: 0.98)" in text
    assert "--resume not supported by this recipe (refused)" in text and "--fsdp not with this recipe" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert swap.parse_args([]).seeds == [0] and swap.parse_args([]).preset == "quick"
