"""The three training recipes end to end on tiny synthetic data: tables, files, resume, branching, torchrun, FSDP2.

Each recipe runs in this process through its ``main(argv)`` on a few hundred
synthetic 28x28 images written as Fashion-MNIST IDX files (one run each on
CIFAR pickles and an image folder), for one to six epochs: seconds each. The
torchrun tests launch 2 gloo ranks (DDP, and FSDP2 with ``--fsdp``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import EXAMPLES, ending, finals, free_port, load_recipe, make_cifar10, make_folder
from recipe_lib.checkpoint import load_checkpoint, save_atomic, tensors_digest
from recipe_lib.cli import _load_data
from recipe_lib.datasets import write_synthetic_fashion_mnist
from recipe_lib.distributed import DistContext
from recipe_lib.engine import checkpoint_path, log_spaced_steps
from recipe_lib.models import build_model
from recipe_lib.training import EvalSet, Precision, evaluate
from recipe_lib.transforms import DEFAULT_STATS

ROOT = Path(__file__).resolve().parents[1]


tutorial, paper, large_batch = (load_recipe(n) for n in ("swa_tutorial", "swa_paper", "large_batch"))


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Path:
    """Learnable 28x28 IDX data: class k is a bright band at rows 2k..2k+4 plus noise."""
    return write_synthetic_fashion_mnist(tmp_path_factory.mktemp("fashion"), n_train=320, n_test=96)


def common(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--out", str(out), "--no-progress", "--train-subset", "0",
            "--test-subset", "0", *extra]


def table_rows(out: Path) -> dict[str, str]:
    """Row label -> line of the results table (the first table of results.md)."""
    lines = (out / "results.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| run |")) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows[line.strip("|").split("|")[0].strip()] = line
    return rows


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------ swa_tutorial

def test_swa_tutorial_end_to_end(fashion, tmp_path, capsys):
    out = tmp_path / "tut"
    tutorial.main(common(fashion, out, "--epochs", "3", "--swa-start", "1", "--batch-size", "32",
                         "--seeds", "0", "1"))
    printed = capsys.readouterr().out
    assert "| baseline |" in printed and "torch / swa_fast" in printed
    for name in ("results.md", "results.json", "metrics.csv", "accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    # The run ends with the outputs and the verdict; Markdown image links only in results.md.
    assert "![" not in printed and "![accuracy](accuracy.png)" in (out / "results.md").read_text()
    verdict, outputs = ending(printed)
    assert verdict[0].startswith("- SWA (start 1, swa_lr 0.0005) reached ")
    assert "for the baseline" in verdict[0] and "mean ± std over 2 seeds" in verdict[0]
    assert any("this run's seed-to-seed spread" in line for line in verdict)
    assert any("measured on the real Fashion-MNIST" in line for line in verdict)  # quick preset: RESULTS.md's
    assert verdict[-1].startswith("- Reproducibility: the same command on the same machine")
    assert "\n".join(verdict) in (out / "results.md").read_text()
    for name in ("results.md", "results.json", "metrics.csv", "accuracy.png"):
        assert any(f"{out / name} (" in line for line in outputs), name
    assert any(re.search(r"checkpoints/ \(\d[\d.]* [kMG]B in \d+ files\)", line) for line in outputs)
    rows = table_rows(out)
    assert list(rows) == ["baseline", "SWA_1_0.0005"]
    assert " ± " in rows["baseline"]  # two seeds: mean ± std
    result = json.loads((out / "results.json").read_text())
    swa_runs = [r for r in result["runs"] if r["arm"] == "SWA_1_0.0005"]
    for run in swa_runs:
        timing = run["averaging"]
        assert timing["updates"] == 2 and timing["fast_seconds"] > 0 and timing["torch_seconds"] > 0
        assert timing["max_abs_diff"] <= 1e-6  # the same average as torch.optim.swa_utils
    epochs = [row for row in result["epochs"] if row["arm"] == "SWA_1_0.0005" and row["seed"] == 0]
    assert [row["epoch"] for row in epochs] == [1, 2, 3]  # the branched prefix is part of the curve
    assert "swa_test_acc" in epochs[-1] and "swa_test_acc" not in epochs[0]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"seed", "arm", "epoch", "steps", "lr", "train_loss", "test_acc", "swa_test_acc"} <= set(header)


def test_swa_tutorial_sweep_has_the_tutorials_rows(fashion, tmp_path):
    out = tmp_path / "sweep"
    tutorial.main(common(fashion, out, "--epochs", "3", "--batch-size", "64", "--sweep", "--sweep-lrs", "0.05",
                         "1e-5", "--sweep-starts", "2", "1", "--no-compare-torch"))
    assert list(table_rows(out)) == ["baseline", "SWA_2_0.05", "SWA_2_1e-05", "SWA_1_0.05", "SWA_1_1e-05"]
    report = (out / "results.md").read_text()
    assert "| SWA_2_0.05 | 1 |" in report and "| n/a (not compared) | n/a | n/a |" in report
    assert "0.00e+00" not in report  # nothing was compared: no difference to report
    assert "(the best of 4 settings)" in report  # the verdict compares the best SWA row of the sweep


def test_smoke_preset_runs_the_whole_path(tmp_path, capsys):
    """--preset smoke on data of the real subset sizes: both arms, averaging, update_bn, table and verdict."""
    data = write_synthetic_fashion_mnist(tmp_path / "data", n_train=2048, n_test=1000)
    out = tmp_path / "smoke"
    tutorial.main(["--preset", "smoke", "--data-dir", str(data), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "2048 train / 1000 test samples" in printed
    assert list(table_rows(out)) == ["baseline", "SWA_1_0.0005"]
    run = next(r for r in json.loads((out / "results.json").read_text())["runs"] if r["arm"] == "SWA_1_0.0005")
    assert run["averaging"]["updates"] == 2 and run["finals"]["SWA_1_0.0005"]["epoch"] == 3
    verdict, outputs = ending(printed)
    assert verdict[0].startswith("- SWA (start 1, swa_lr 0.0005) reached ") and "on one seed" in verdict[0]
    assert any("--seeds 0 1 2" in line for line in verdict)
    assert any("This was the smoke preset" in line for line in verdict)
    assert not any("measured on" in line for line in verdict)  # RESULTS.md measured the quick preset only
    assert any("checkpoints/" in line for line in outputs)


def test_branched_arm_equals_the_arm_trained_from_scratch(fashion, tmp_path):
    """An SWA arm started from the baseline's checkpoint at swa_start is bitwise the arm trained from epoch 1."""
    argv = common(fashion, tmp_path / "branched", "--epochs", "3", "--swa-start", "2", "--batch-size", "64")
    tutorial.main(argv)
    args = tutorial.parse_args(common(fashion, tmp_path / "scratch", "--epochs", "3", "--swa-start", "2",
                                      "--batch-size", "64"))
    original = tutorial.make_arms
    try:  # the same arms without branch_from: the SWA arm trains all three epochs itself
        tutorial.make_arms = lambda a, t: [_unbranched(arm) for arm in original(a, t)]
        tutorial.SPEC.make_arms = tutorial.make_arms
        from recipe_lib.cli import run_recipe
        run_recipe(tutorial.SPEC, args)
    finally:
        tutorial.make_arms = tutorial.SPEC.make_arms = original
    a = load_checkpoint(checkpoint_path(tmp_path / "branched", 0, "SWA_2_0.0005"))
    b = load_checkpoint(checkpoint_path(tmp_path / "scratch", 0, "SWA_2_0.0005"))
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["swa_model"], b["swa_model"])
    assert a["finals"] == b["finals"]


def _unbranched(arm):
    from dataclasses import replace
    return replace(arm, branch_from=None)


def test_resume_gives_the_uninterrupted_result(fashion, tmp_path):
    """Stop after 2 epochs, then after 3 more, then finish: every checkpoint equals the uninterrupted run's."""
    argv = ["--budget", "4", "--swa-start", "2", "--fge", "--fge-cycle", "1", "--batch-size", "64",
            "--seeds", "0", "1"]
    paper.main(common(fashion, tmp_path / "whole", *argv))
    split = common(fashion, tmp_path / "split", *argv)
    paper.main(split + ["--stop-after", "2"])
    assert not (tmp_path / "split" / "results.md").exists()
    paper.main(split + ["--stop-after", "3", "--resume"])
    paper.main(split + ["--resume"])
    for seed in (0, 1):
        for arm in ("sgd", "swa", "fge"):
            whole = load_checkpoint(checkpoint_path(tmp_path / "whole", seed, arm))
            resumed = load_checkpoint(checkpoint_path(tmp_path / "split", seed, arm))
            assert_same_weights(whole["model"], resumed["model"])
            assert_same_weights(whole["optimizer"]["state"][0], resumed["optimizer"]["state"][0])
            if whole["swa_model"] is not None:
                assert_same_weights(whole["swa_model"], resumed["swa_model"])
            assert whole["finals"] == resumed["finals"]
    assert finals(tmp_path / "whole") == finals(tmp_path / "split")


def test_resume_refuses_another_world_size(fashion, tmp_path):
    argv = common(fashion, tmp_path, "--budget", "3", "--swa-start", "1", "--batch-size", "64")
    paper.main(argv + ["--stop-after", "1"])
    path = checkpoint_path(tmp_path, 0, "sgd")
    state = load_checkpoint(path)
    state["world_size"] = 2
    save_atomic(state, path)
    with pytest.raises(SystemExit, match="same number"):
        paper.main(argv + ["--resume"])


# ------------------------------------------------------------------------------------ reruns (issue 19)

REPORT = ("results.md", "results.json", "metrics.csv", "accuracy.png")


def checkpoint_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out / "checkpoints")) for p in (out / "checkpoints").rglob("*.pt"))


def test_resume_refuses_options_that_contradict_the_checkpoints(fashion, tmp_path, monkeypatch):
    """--resume into a finished run with another --lr and --epochs: refused before the data loads, naming
    both with their values; options that do not change the results may differ; --restart starts over."""
    out = tmp_path / "run"
    argv = common(fashion, out, "--epochs", "2", "--swa-start", "1", "--batch-size", "64")
    tutorial.main(argv)
    report = {name: (out / name).read_bytes() for name in REPORT}
    first = finals(out)
    loads = []
    with monkeypatch.context() as patched:
        patched.setattr("recipe_lib.cli.load_dataset", lambda *a: loads.append(a))
        with pytest.raises(SystemExit) as raised:
            tutorial.main(argv + ["--resume", "--lr", "0.5", "--epochs", "5"])
    assert str(raised.value).splitlines() == [
        f"--resume: the checkpoints in {out} were trained with other options:",
        "  --epochs: 2 in the checkpoints, 5 now",
        "  --lr: 0.002 in the checkpoints, 0.5 now",
        ("Resume with the checkpoints' values, or pass --restart instead of --resume to delete them and start over "
         "with these options.")]
    assert loads == [] and {name: (out / name).read_bytes() for name in REPORT} == report

    # Where the files go, how fast, progress, the torch comparison and more seeds do not change the results.
    tutorial.main(argv + ["--resume", "--device", "cpu", "--threads", "1", "--eval-batch-size", "50",
                          "--no-compare-torch", "--seeds", "0", "1"])
    resumed = finals(out)
    assert {key: value for key, value in resumed.items() if key[1] == 0} == first  # seed 0 loaded, not retrained
    assert {seed for _, seed in resumed} == {0, 1}

    tutorial.main(argv + ["--restart", "--lr", "0.5", "--epochs", "3"])
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["lr"] == 0.5 and result["config"]["epochs"] == 3
    assert [row["epoch"] for row in result["epochs"] if row["arm"] == "baseline"] == [1, 2, 3]
    assert {run["seed"] for run in result["runs"]} == {0}
    assert checkpoint_files(out) == ["seed0/SWA_1_0.0005.pt", "seed0/baseline-epoch1.pt", "seed0/baseline.pt"]
    assert load_checkpoint(checkpoint_path(out, 0, "baseline"))["epoch"] == 3


def test_a_rerun_never_mixes_two_runs(fashion, tmp_path):
    """A new run into the --out of a finished one, interrupted after an epoch: no report of the first run is
    left beside its checkpoint, nor the first run's other checkpoints; it is not taken for finished (a new
    run refuses to replace it), and --resume completes it as if it had never stopped."""
    out = tmp_path / "run"
    tutorial.main(common(fashion, out, "--epochs", "2", "--swa-start", "1", "--batch-size", "64"))
    assert checkpoint_files(out) == ["seed0/SWA_1_0.0005.pt", "seed0/baseline-epoch1.pt", "seed0/baseline.pt"]
    options = ("--epochs", "3", "--swa-start", "2", "--batch-size", "64", "--lr", "0.004")
    second = common(fashion, out, *options)
    tutorial.main(second + ["--stop-after", "1"])
    assert [name for name in REPORT if (out / name).exists()] == []
    assert checkpoint_files(out) == ["seed0/baseline.pt"]
    assert load_checkpoint(checkpoint_path(out, 0, "baseline"))["epoch"] == 1
    with pytest.raises(SystemExit) as raised:
        tutorial.main(second)
    assert str(raised.value) == (f"--out {out} holds an unfinished run (1 checkpoint file(s), no results.json: "
                                 "stopped by --stop-after, interrupted or failed): --resume continues it, --restart "
                                 "deletes it and starts over, or choose another --out")
    tutorial.main(second + ["--resume"])
    tutorial.main(common(fashion, tmp_path / "whole", *options))
    assert run_metrics(out) == run_metrics(tmp_path / "whole")


def test_an_interrupted_report_is_not_a_finished_run(fashion, tmp_path, monkeypatch):
    """The report is written at the end, results.json last, each file atomically: a run interrupted while
    writing it has no results.json, and --resume writes the whole report."""
    out = tmp_path / "run"
    argv = common(fashion, out, "--epochs", "2", "--swa-start", "1", "--batch-size", "64")
    with monkeypatch.context() as patched:
        def interrupted(*args):
            raise KeyboardInterrupt
        patched.setattr("recipe_lib.cli.write_metrics", interrupted)
        with pytest.raises(KeyboardInterrupt):
            tutorial.main(argv)
    assert not (out / "results.json").exists() and not list(out.glob(".*.tmp"))
    with pytest.raises(SystemExit, match="holds an unfinished run"):
        tutorial.main(argv)
    tutorial.main(argv + ["--resume"])
    assert all((out / name).stat().st_size > 0 for name in REPORT)


# ------------------------------------------------------------------------------------ swa_paper

def test_swa_paper_budgets_and_fge(fashion, tmp_path):
    out = tmp_path / "paper"
    paper.main(common(fashion, out, "--budget", "4", "--swa-start", "2", "--fge", "--batch-size", "64"))
    rows = table_rows(out)
    assert list(rows) == ["SGD", "SWA 1 budget", "SWA 1.25 budgets", "SWA 1.5 budgets", "FGE 1.5 budgets"]
    got = finals(out)
    assert [got[(label, 0)]["epoch"] for label in rows] == [4, 4, 5, 6, 6]
    assert got[("FGE 1.5 budgets", 0)]["snapshots"] == 2  # epochs 4 and 6 (cycles of 2 after epoch 2)
    lrs = {row["epoch"]: row["lr"] for row in json.loads((out / "results.json").read_text())["epochs"]
           if row["arm"] == "sgd"}
    assert lrs[1] == pytest.approx(0.05)  # constant through the first half of the budget


def test_fge_cycles_end_with_the_budget():
    fge = paper.make_arms(paper.parse_args(["--fge", "--budget", "10", "--swa-start", "8"]), None)[-1]
    assert fge.epochs == 15 and fge.branch_from == ("swa", 8)
    assert fge.fge.start == 9 and fge.fge.cycle == 2  # snapshots after epochs 11, 13 and 15
    with pytest.raises(SystemExit, match="does not fit"):
        paper.make_arms(paper.parse_args(["--fge", "--budget", "4", "--swa-start", "3", "--fge-cycle", "4"]), None)


def test_fge_cycles_end_at_the_low_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = paper.FGECyclicLR(opt, total_steps=10, swa_lr=0.02, cycle_from=10, cycle_steps=4, high=0.02,
                              low=0.0002)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(18):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:5] == pytest.approx([0.1] * 5)  # the SWA schedule's constant start
    assert lrs[9] == pytest.approx(0.02)                  # the SWA schedule's end: swa_lr
    assert lrs[13] == pytest.approx(0.0002) and lrs[17] == pytest.approx(0.0002)  # each cycle's last step
    assert lrs[14] > lrs[13]  # the next cycle starts high again


# ------------------------------------------------------------------------------------ large_batch

def test_large_batch_rows_regimes_and_distance(fashion, tmp_path):
    out = tmp_path / "lb"
    large_batch.main(common(fashion, out, "--epochs", "2", "--milestones", "1", "--small-batch", "16",
                            "--large-batch", "64", "--warmup-epochs", "0.5", "--clip-grad-norm", "5",
                            "--amp", "bf16"))  # bf16 autocast on CPU: ghost BN gets bf16 input
    rows = table_rows(out)
    assert list(rows) == ["SB (B=16)", "LB (B=64)", "LB +LR (lr 0.02)", "LB +LR +GBN (ghost 16)",
                          "LB +LR +GBN +RA (8 epochs, x4)"]
    assert (out / "distance.png").stat().st_size > 0
    runs = {r["arm"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    # Regime adaptation: as many weight updates as the small batch (320 samples: 20 steps/epoch at 16, 5 at 64).
    assert runs["sb"]["distances"][-1][0] == 40 == runs["lb_lr_gbn_ra"]["distances"][-1][0]
    assert runs["lb"]["distances"][-1][0] == 10
    steps = [s for s, _ in runs["sb"]["distances"]]
    assert steps == sorted(set(steps)) and steps[0] == 1  # log-spaced from the first step
    assert "Regimes (first seed)" in (out / "results.md").read_text()


def test_paper_presets_are_the_papers_regimes():
    swa_arms = paper.make_arms(paper.parse_args(["--preset", "paper"]), None)
    assert [(a.name, a.epochs) for a in swa_arms] == [("sgd", 200), ("swa", 300)]
    assert swa_arms[1].swa.start == 161 and swa_arms[1].swa.report_at == {"SWA 1 budget": 200, "SWA 1.25 budgets": 250}
    lb_arms = large_batch.make_arms(large_batch.parse_args(["--preset", "paper"]), None)
    ra = lb_arms[-1]
    assert (ra.epochs, ra.batch_size, ra.ghost_batch_size) == (3200, 4096, 128)  # 100 epochs x 4096/128
    tut = tutorial.parse_args(["--preset", "paper", "--sweep"])
    assert tutorial.row_order(tut)[:6] == ["baseline", "SWA_90_0.05", "SWA_90_0.0005", "SWA_90_0.0001",
                                           "SWA_90_5e-05", "SWA_90_1e-05"]
    assert {row.split("_")[1] for row in tutorial.row_order(tut)[1:]} == {"90", "75", "60"}
    assert tutorial.parse_args(["--preset", "paper", "--epochs", "7"]).epochs == 7  # an explicit option wins


def test_log_spaced_steps():
    steps = log_spaced_steps(1000, per_decade=10)
    assert min(steps) == 1 and max(steps) == 1000 and len(steps) < 40


# ------------------------------------------------------------------------------------ other data and CLI

def test_tutorial_on_cifar_pickles_and_an_image_folder(tmp_path):
    make_cifar10(tmp_path / "cifar", per_batch=24)
    tutorial.main(["--dataset", "cifar10", *common(tmp_path / "cifar", tmp_path / "c", "--epochs", "2",
                                                    "--swa-start", "1", "--batch-size", "16",
                                                    "--model", "vgg_small", "--channels-last")])
    assert "cifar10" in json.loads((tmp_path / "c" / "results.json").read_text())["config"]["dataset"]
    make_folder(tmp_path / "folder")
    tutorial.main(["--dataset", "folder", "--image-size", "32",
                   *common(tmp_path / "folder", tmp_path / "f", "--epochs", "2", "--swa-start", "1",
                           "--batch-size", "2", "--model", "vgg_small")])
    assert list(table_rows(tmp_path / "f")) == ["baseline", "SWA_1_0.0005"]


@pytest.mark.parametrize("name", ["swa_tutorial", "swa_paper", "large_batch"])
def test_help_lists_presets(name):
    done = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--preset" in done.stdout and "quick preset:" in done.stdout and "--resume" in done.stdout
    assert "--fsdp" in done.stdout and "FSDP2" in done.stdout


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(SystemExit, match="apt-get install -y dataset-fashion-mnist"):
        tutorial.main(["--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path)])


def test_bad_options_are_refused(fashion, tmp_path):
    with pytest.raises(SystemExit, match="--swa-start 5"):
        tutorial.main(common(fashion, tmp_path, "--epochs", "3", "--swa-start", "5"))
    with pytest.raises(SystemExit, match="must be larger"):
        large_batch.main(common(fashion, tmp_path, "--small-batch", "64", "--large-batch", "64"))
    with pytest.raises(SystemExit, match="FSDP2 shards contiguous parameters only"):
        tutorial.main(common(fashion, tmp_path, "--fsdp", "--channels-last"))


# ------------------------------------------------------------------------------------ torchrun


def torchrun(recipe: str, argv: list[str], processes: int = 2) -> str:
    """``torchrun --nproc_per_node=processes examples/<recipe>.py *argv`` (gloo on CPU); what it printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={free_port()}", str(EXAMPLES / f"{recipe}.py"), *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_torchrun_two_processes(fashion, tmp_path):
    """2 gloo ranks under torchrun: one set of files, averages identical on both ranks after update_bn."""
    out = tmp_path / "ddp"
    printed = torchrun("swa_paper", common(fashion, out, "--budget", "3", "--swa-start", "1", "--batch-size", "32",
                                           "--fge", "--fge-cycle", "1", "--device", "cpu"))
    assert printed.count("| SWA 1.5 budgets |") == 1  # only rank 0 prints the table
    result = json.loads((out / "results.json").read_text())
    assert result["summary"]["processes"] == 2
    swa = next(r for r in result["runs"] if r["arm"] == "swa")
    assert swa["averaging"]["ranks_identical"] is True
    assert "identical on every rank: yes" in (out / "results.md").read_text()
    # The test set is split between ranks without padding: every sample counted once.
    fge = next(r for r in result["runs"] if r["arm"] == "fge")
    assert fge["finals"]["FGE 1.5 budgets"]["snapshots"] == 4  # epochs 2..5 (budget 1.5 x 3 = 5)


# ------------------------------------------------------------------------------------ --fsdp (FSDP2)

# Timings differ between runs; everything else in results.json must not.
TIMING_KEYS = {"epoch_seconds", "seconds", "fast_seconds", "torch_seconds"}


def run_metrics(out: Path) -> dict:
    """results.json's runs and epoch rows without the timings: what a resumed run must reproduce bit for bit."""
    result = json.loads((out / "results.json").read_text())

    def strip(d: dict) -> dict:
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in TIMING_KEYS}

    return {"runs": [strip(run) for run in result["runs"]], "epochs": [strip(row) for row in result["epochs"]]}


def fsdp_paper_argv(data: Path, out: Path) -> list[str]:
    """swa_paper --fsdp on the smoke preset, cut to seconds: f1_small (BN, one FSDP2 unit per layer), SWA
    and FGE. 95 test samples in batches of 47 give the ranks 2 and 1 batches: the FSDP2 forwards still
    pair up (EvalSet.fillers), or the run would hang."""
    return common(data, out, "--preset", "smoke", "--fsdp", "--device", "cpu", "--model", "f1_small",
                  "--budget", "3", "--swa-start", "1", "--fge", "--fge-cycle", "1", "--batch-size", "32",
                  "--test-subset", "95", "--eval-batch-size", "47")


def test_fsdp_torchrun_resume_is_bitwise_and_the_average_evaluates_alike(fashion, tmp_path):
    """2 gloo ranks with --fsdp: SWA through WeightAverage, no torch comparison, a resume that reproduces the
    uninterrupted run, and a checkpointed average that scores what the run reported when evaluated unsharded."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    printed = torchrun("swa_paper", fsdp_paper_argv(fashion, whole))
    assert printed.count("| SWA 1.5 budgets |") == 1 and "| FGE 1.5 budgets |" in printed
    assert printed.count("--fsdp: no comparison with torch.optim.swa_utils") == 1
    assert "| swa | 4 | " in printed and "| n/a (not compared) | n/a | n/a |" in printed
    assert "BN statistics after update_bn identical on every rank: yes" in printed
    assert "- processes: 2 (model sharded with FSDP2)" in printed

    torchrun("swa_paper", fsdp_paper_argv(fashion, split) + ["--stop-after", "5"])  # sgd 3 epochs, swa 2 of 5
    assert not (split / "results.json").exists()
    torchrun("swa_paper", fsdp_paper_argv(fashion, split) + ["--resume"])
    assert run_metrics(split) == run_metrics(whole)
    for arm in ("sgd", "swa", "fge"):
        a, b = (load_checkpoint(checkpoint_path(out, 0, arm)) for out in (whole, split))
        assert_same_weights(a["model"], b["model"])  # full tensors, gathered on rank 0
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        for name in a["optimizer"]["state"]:  # keyed by parameter name under FSDP2
            assert_same_weights(a["optimizer"]["state"][name], b["optimizer"]["state"][name])

    swa = next(run for run in json.loads((whole / "results.json").read_text())["runs"] if run["arm"] == "swa")
    timing = swa["averaging"]
    assert timing["sharded"] is True and timing["bn_ranks_identical"] is True and "ranks_identical" not in timing
    assert timing["compared"] is False and timing["updates"] == 4
    average = load_checkpoint(checkpoint_path(whole, 0, "swa"))["swa_model"]
    assert int(average["n_averaged"]) == 4
    digest = tensors_digest(dict(average["averages"], **{f"buffer:{k}": v for k, v in average["buffers"].items()}))
    assert timing["average_sha256"] == digest

    # The average evaluated another way: full tensors in the plain model, the whole test set in one process.
    args = paper.parse_args(fsdp_paper_argv(fashion, whole))
    train, test = _load_data(args)
    model = build_model("f1_small", train.num_classes, 1, 28)
    model.load_state_dict(dict(average["averages"], **average["buffers"]))
    ctx = DistContext(0, 1, torch.device("cpu"))
    tested = evaluate(model, EvalSet(test, 1000, ctx, *DEFAULT_STATS[train.name]), Precision(), ctx)
    reported = swa["finals"]["SWA 1.5 budgets"]
    assert tested.accuracy == reported["test_acc"]
    assert tested.loss == pytest.approx(reported["test_loss"], rel=1e-5)


def test_fsdp_without_torchrun_runs_on_one_rank_with_no_torch_comparison(fashion, tmp_path, capsys):
    """--fsdp in one process: a one-rank group of its own, n/a for torch, and no resume without --fsdp."""
    argv = common(fashion, tmp_path, "--epochs", "2", "--swa-start", "1", "--batch-size", "64",
                  "--model", "f1_small")
    tutorial.main(argv + ["--fsdp"])
    assert not torch.distributed.is_initialized()  # the run's own group is gone with it
    printed = capsys.readouterr().out
    assert printed.count("--fsdp: no comparison with torch.optim.swa_utils") == 1
    assert "| SWA_1_0.0005 | 1 | " in printed and "| n/a (not compared) | n/a | n/a |" in printed
    assert "- processes: 1 (model sharded with FSDP2)" in printed
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["config"]["fsdp"] is True and result["config"]["no_compare_torch"] is True
    timing = next(run for run in result["runs"] if run["arm"] == "SWA_1_0.0005")["averaging"]
    assert timing["sharded"] is True and timing["compared"] is False and timing["torch_seconds"] == 0
    with pytest.raises(SystemExit, match="--fsdp: on in the checkpoints, off now"):
        tutorial.main(argv + ["--resume"])


def test_fsdp_large_batch_distance_sums_the_shards(fashion, tmp_path):
    """large_batch --fsdp on 2 ranks (ghost BN, clipping): ||w_t - w_0|| from the ranks' shards is the whole
    model's distance, as computed here from the checkpoint and the seed's initial weights."""
    from swa_fast.nn import convert_ghost_batchnorm

    torchrun("large_batch", common(fashion, tmp_path, "--preset", "smoke", "--fsdp", "--device", "cpu",
                                   "--model", "f1_small", "--arms", "lb_lr_gbn", "--epochs", "1", "--milestones",
                                   "--small-batch", "16", "--large-batch", "64", "--clip-grad-norm", "5"))
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    steps, recorded = run["distances"][-1]
    assert steps == 2  # 320 samples / 2 ranks / 64 per batch (drop_last)
    torch.manual_seed(0)
    initial = dict(convert_ghost_batchnorm(build_model("f1_small", 10, 1, 28), 16).named_parameters())
    final = load_checkpoint(checkpoint_path(tmp_path, 0, "lb_lr_gbn"))["model"]
    expected = sum(((final[name].double() - p.double()) ** 2).sum() for name, p in initial.items()) ** 0.5
    assert recorded == pytest.approx(expected.item(), rel=1e-5)
