"""examples/swag.py end to end on synthetic Fashion-MNIST IDX files: the smoke preset's whole path (the SGD and
SWAG runs, the extra MultiSWAG runs, SWA, SWAG-diagonal, SWAG and MultiSWAG scored, the table, the reliability
diagrams, the verdict), the option checks made before the data loads, --stop-after/--resume (bitwise the
uninterrupted result, finished runs and rows loaded, changed options refused), and the medium presets of
swa_tutorial.py and swa_paper.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from swa_fast.swag import calibration_bins

from helpers import ending, finals, load_recipe
from recipe_lib.checkpoint import load_checkpoint, save_atomic
from recipe_lib.datasets import write_synthetic_fashion_mnist
from recipe_lib.engine import checkpoint_path
from recipe_lib.swag import bins_record, extra_seeds, pooled_bins, samples_per_run

swag = load_recipe("swag")
tutorial, paper = load_recipe("swa_tutorial"), load_recipe("swa_paper")
METHODS = ["SGD", "SWA", "SWAG-diagonal", "SWAG", "MultiSWAG"]


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Path:
    """Learnable 28x28 IDX data: class k is a bright band at rows 2k..2k+4 plus noise."""
    return write_synthetic_fashion_mnist(tmp_path_factory.mktemp("fashion"), n_train=320, n_test=96)


def tiny(data: Path, out: Path, *extra: str) -> list[str]:
    """A tiny run: 320 images, batch 32 (10 steps an epoch), a 3-epoch budget collecting after epochs 2 and 3,
    2 samples per BMA, a MultiSWAG of 2 runs x 1 sample, one seed."""
    return ["--preset", "smoke", "--data-dir", str(data), "--out", str(out), "--no-progress", "--train-subset", "0",
            "--test-subset", "0", "--epochs", "3", "--swa-start", "1", "--batch-size", "32", "--n-samples", "2",
            "--seeds", "0", *extra]


def table(out: Path) -> dict[str, list[str]]:
    """method -> the cells of its row of results.md's table."""
    lines = (out / "results.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |")) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def number(cell: str) -> float:
    """The mean of a ``mean ± std`` cell (or the value of a one-seed cell)."""
    return float(cell.split(" ± ")[0])


# ------------------------------------------------------------------------------------ the whole path


def test_smoke_preset_runs_the_whole_path(tmp_path, capsys):
    """--preset smoke (one seed, to keep it short) on data of its subset sizes: 3 training runs (SGD, SWAG, one
    extra MultiSWAG run), 2 collections each, every row scored; the table, the diagrams, the metrics, the outputs
    and the verdict."""
    data = write_synthetic_fashion_mnist(tmp_path / "data", n_train=2048, n_test=1000)
    out = tmp_path / "smoke"
    swag.main(["--preset", "smoke", "--seeds", "0", "--data-dir", str(data), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "2048 train / 1000 test samples" in printed and "(2 collections, max_rank 20)" in printed

    rows = table(out)
    assert list(rows) == METHODS
    got = finals(out)
    for method, cells in rows.items():
        accuracy, nll, ece = (number(cell) for cell in cells[2:5])
        assert all(math.isfinite(v) for v in (accuracy, nll, ece)), cells
        assert 0 <= accuracy <= 100 and nll >= 0 and 0 <= ece <= 100, cells
        metrics = got[(method, 0)]
        assert cells[2] == f"{100 * metrics['test_acc']:.2f}" and cells[3] == f"{metrics['nll']:.4f}"
        assert cells[4] == f"{100 * metrics['ece']:.2f}"
        assert sum(metrics["bins"]["counts"]) == 1000
    assert [got[(m, 0)]["samples"] for m in METHODS] == [1, 1, 4, 4, 4]  # MultiSWAG: 2 runs x 2 samples
    assert rows["MultiSWAG"][1] == "BMA of 2 runs x 2 samples, diagonal + rank 2"
    assert got[("SGD", 0)]["test_acc"] > 0.5  # it learned the bands (ten classes: chance is 0.1)

    result = json.loads((out / "results.json").read_text())
    runs = {run["arm"]: run for run in result["runs"]}
    assert list(runs) == ["sgd", "swag", "swag-seed10000"]
    assert [runs[name]["averaging"]["collections"] for name in runs] == [0, 2, 2]
    assert runs["swag-seed10000"]["averaging"]["run_seed"] == 10000
    assert result["summary"]["multiswag"] == {"runs": 2, "samples_per_run": 2, "seeds": {"0": [0, 10000]}}
    assert set(result["summary"]["metrics"]) == set(METHODS)
    assert [(row["arm"], row["epoch"]) for row in result["epochs"]] == [
        (arm, epoch) for arm in ("sgd", "swag", "swag-seed10000") for epoch in (1, 2, 3, 4)]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"seed", "arm", "run_seed", "epoch", "lr", "test_acc", "collected"} <= set(header)

    report = (out / "results.md").read_text()
    assert "![reliability](reliability.png)" in report and "![" not in printed
    assert (out / "reliability.png").stat().st_size > 0
    verdict, outputs = ending(printed)
    assert verdict[0].startswith("- SWAG improved ")  # the question first: NLL and ECE against SWA and SGD
    assert verdict[0].startswith("- SWAG improved neither") or "with one seed this run has no spread" in verdict[0]
    assert any(line.startswith("- NLL (lower is better): SWAG ") for line in verdict)
    assert any(line.startswith("- ECE (15 bins, lower is better): SWAG ") for line in verdict)
    assert any(line.startswith("- MultiSWAG (2 independent runs x 2 samples, 4 in all against SWAG's 4)")
               for line in verdict)
    assert any("This was the smoke preset" in line for line in verdict)
    assert not any("docs/RESULTS.md gives" in line for line in verdict)
    assert "\n".join(verdict) in report
    for name in ("results.md", "results.json", "metrics.csv", "reliability.png"):
        assert any(f"{out / name} (" in line for line in outputs), name
    # 3 training runs and the evaluation record, plus options.json.
    assert any(re.search(r"checkpoints/ \(\d[\d.]* [kMG]B in 5 files\)", line) for line in outputs)


def test_seeds_pool_in_the_diagrams_and_give_mean_and_std(fashion, tmp_path, capsys):
    """Two seeds: mean ± std in the table, each seed's own extra run, and the verdict set against the spread."""
    out = tmp_path / "two"
    swag.main(tiny(fashion, out, "--seeds", "0", "1"))
    verdict, _ = ending(capsys.readouterr().out)
    rows = table(out)
    assert all(" ± " in cell for cells in rows.values() for cell in cells[2:5])
    result = json.loads((out / "results.json").read_text())
    assert result["summary"]["multiswag"]["seeds"] == {"0": [0, 10000], "1": [1, 10001]}
    assert sorted((run["seed"], run["arm"]) for run in result["runs"]) == [
        (0, "sgd"), (0, "swag"), (0, "swag-seed10000"), (1, "sgd"), (1, "swag"), (1, "swag-seed10001")]
    assert "seed-to-seed spread" in verdict[0] or verdict[0].startswith("- SWAG improved neither")
    assert any("lower on" in line and "of 2 seeds" in line for line in verdict)


def test_pooled_bins_are_the_bins_of_all_predictions():
    """The diagrams pool the seeds' bins: exactly calibration_bins of the concatenated predictions."""
    torch.manual_seed(0)
    parts = [(torch.softmax(3 * torch.randn(n, 10, dtype=torch.float64), 1), torch.randint(0, 10, (n,)))
             for n in (50, 70)]
    pooled = pooled_bins([bins_record(calibration_bins(p, t, 15)) for p, t in parts])
    whole = calibration_bins(torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts]), 15)
    assert torch.equal(pooled.counts, whole.counts) and pooled.n == whole.n == 120
    assert torch.allclose(pooled.accuracy, whole.accuracy, equal_nan=True)
    assert torch.allclose(pooled.confidence, whole.confidence, equal_nan=True)
    assert pooled.ece == pytest.approx(whole.ece)


def test_multiswag_seeds_and_sample_counts():
    assert extra_seeds(0, 3) == [10000, 20000] and extra_seeds(7, 2) == [10007] and extra_seeds(5, 0) == []
    assert samples_per_run(30, 3) == 10  # as many samples in all as SWAG's
    assert samples_per_run(10, 3) == 4 and samples_per_run(2, 3) == 1  # never fewer in all (12 >= 10, 3 >= 2)


# ------------------------------------------------------------------------------------ option checks


class WorkStarted(Exception):
    """Raised by the stand-in of load_dataset: the option checks were passed."""


@pytest.fixture
def started(monkeypatch) -> list[str]:
    began: list[str] = []

    def stand_in(*args, **kwargs):
        began.append("load_dataset")
        raise WorkStarted

    monkeypatch.setattr("recipe_lib.cli.load_dataset", stand_in)
    monkeypatch.setattr("recipe_lib.cli.init_distributed", stand_in)
    return began


def refusal(module, argv: list[str], tmp_path: Path, started: list[str]) -> str:
    """The message ``module``'s refusal of ``argv`` gives; checks that no data loaded and nothing was written."""
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as raised:
        module.main([*argv, "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])
    assert started == [], f"{argv}: the data loaded before the refusal"
    assert sorted(tmp_path.rglob("*")) == before, f"{argv}: files were written"
    return str(raised.value)


@pytest.mark.parametrize("argv, message", [
    (["--n-samples", "0"], "argument --n-samples: must be an integer >= 1, got 0"),
    (["--n-samples", "-3"], "argument --n-samples: must be an integer >= 1, got -3"),
    (["--n-samples", "2.5"], "argument --n-samples: must be an integer >= 1, got 2.5"),
    (["--scale", "0"], "argument --scale: must be a finite number > 0, got 0"),
    (["--scale", "-0.5"], "argument --scale: must be a finite number > 0, got -0.5"),
    (["--scale", "nan"], "argument --scale: must be a finite number > 0, got nan"),
    (["--scale", "inf"], "argument --scale: must be a finite number > 0, got inf"),
    (["--max-rank", "1"], "argument --max-rank: must be an integer >= 2, got 1"),
    (["--max-rank", "0"], "argument --max-rank: must be an integer >= 2, got 0"),
    (["--max-rank", "-1"], "argument --max-rank: must be an integer >= 2, got -1"),
    (["--bn-fraction", "0"], "argument --bn-fraction: must be a number > 0 and <= 1, got 0"),
    (["--bn-fraction", "1.5"], "argument --bn-fraction: must be a number > 0 and <= 1, got 1.5"),
    (["--bn-fraction", "nan"], "argument --bn-fraction: must be a number > 0 and <= 1, got nan"),
    (["--multiswag-runs", "-1"], "argument --multiswag-runs: must be an integer >= 0 (0 = no MultiSWAG row), got -1"),
    (["--multiswag-runs", "1"], "--multiswag-runs 1: a MultiSWAG of one run is the SWAG row again"),
    (["--epochs", "2"], "--epochs (the budget B) 2 is too few: SWAG needs at least one epoch before --swa-start "
                        "and two to collect after it (at least 3)"),
    (["--epochs", "6", "--swa-start", "6"], "--swa-start 6 must be between 1 and --epochs (the budget B) - 1 = 5"),
    (["--epochs", "6", "--swa-start", "5"], "--swa-start 5 leaves 1 collection in the budget of 6 epochs"),
    (["--seeds", "0", "10000"], "--seeds 0 10000: seed 10000 is also one of seed 0's extra MultiSWAG runs"),
    (["--seeds", "1", "1"], "--seeds: 1 is given twice"),
    (["--seeds", str(2**32 - 5)], f"--seeds {2**32 - 5}: its extra MultiSWAG runs take seeds s + 10000 k"),
    (["--train-subset", "100", "--batch-size", "128"], "--batch-size 128 is more than the 100 training samples"),
    (["--fsdp"], "--fsdp does not go with swag.py"),
    (["--preset", "smoke", "--n-samples", "0"], "argument --n-samples: must be an integer >= 1, got 0"),
])
def test_bad_options_are_refused_before_the_data_loads(argv, message, tmp_path, started):
    assert message in refusal(swag, argv, tmp_path, started)


def numeric_options() -> list[tuple[str, str, bool]]:
    """(option, dest, whether 0 is in range) of every numeric option of swag.py."""
    from recipe_lib.cli import Number

    return [(action.option_strings[0], action.dest, action.type.accepts(0))
            for action in swag.build_parser()._actions if isinstance(action.type, Number)]


def test_the_walk_finds_the_recipes_options():
    found = {option for option, _, _ in numeric_options()}
    assert {"--epochs", "--batch-size", "--lr", "--momentum", "--weight-decay", "--swa-start", "--swa-lr",
            "--max-rank", "--n-samples", "--scale", "--bn-fraction", "--multiswag-runs", "--seeds"} <= found


@pytest.mark.parametrize("option, zero_ok", [(option, zero_ok) for option, _, zero_ok in numeric_options()])
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_every_numeric_option_refuses_negative_zero_and_non_finite(option, zero_ok, value, tmp_path, started):
    if value == "0" and zero_ok:
        pytest.skip("0 is in this option's range")
    if option in ("--epochs", "--swa-start") and value in ("0", "-1"):
        message = refusal(swag, [f"{option}={value}"], tmp_path, started)  # checked against the other options
        assert option in message and value in message, message
        return
    message = refusal(swag, [f"{option}={value}"], tmp_path, started)
    assert f"argument {option}" in message and value in message, message


def test_torchrun_is_refused_before_the_data_loads(tmp_path, monkeypatch, started):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "runs in one process" in refusal(swag, [], tmp_path, started)


@pytest.mark.parametrize("argv", [["--multiswag-runs", "0"], ["--seeds", str(2**32 - 1), "--multiswag-runs", "0"],
                                  ["--max-rank", "2", "--n-samples", "1", "--scale", "3", "--bn-fraction", "1"]])
def test_edge_values_pass_the_option_checks(argv, tmp_path, started):
    with pytest.raises(WorkStarted):
        swag.main([*argv, "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])


@pytest.mark.parametrize("module", [swag, tutorial, paper], ids=["swag", "swa_tutorial", "swa_paper"])
@pytest.mark.parametrize("preset", ["smoke", "quick", "medium", "paper"])
def test_every_preset_passes_the_option_checks(module, preset, tmp_path, started):
    with pytest.raises(WorkStarted):
        module.main(["--preset", preset, "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])


def test_medium_presets_train_on_everything_and_average_ten_epochs_or_more():
    """--preset medium: all 60k training and 10k test images, an averaging (collection) phase of 10+ epochs."""
    s = swag.parse_args(["--preset", "medium"])
    assert (s.train_subset, s.test_subset, s.epochs - s.swa_start) == (0, 0, 12)
    t = tutorial.parse_args(["--preset", "medium"])
    assert (t.train_subset, t.test_subset) == (0, 0) and t.epochs - t.swa_start >= 10
    p = paper.parse_args(["--preset", "medium"])
    arms = paper.make_arms(p, None)
    assert (p.train_subset, p.test_subset) == (0, 0) and arms[1].epochs - arms[1].swa.start >= 10
    for module in (swag, tutorial, paper):
        text = " ".join(module.build_parser().format_help().split())
        assert "medium = all 60,000 training and 10,000 test images" in text
        assert "medium: 0 = all" in text  # the subsets' help lists the preset


def test_help_lists_the_options_and_the_default_seeds():
    text = " ".join(swag.build_parser().format_help().split())
    assert "--n-samples N_SAMPLES" in text and "(quick preset: 30; smoke: 4; medium: 30; paper: 30)" in text
    assert "--scale SCALE" in text and "(default: 0.5)" in text and "(default: 20)" in text
    assert "(default: 0 1 2)" in text and swag.parse_args([]).seeds == [0, 1, 2]
    assert "--fsdp not with this recipe (refused)" in text and "--no-compare-torch no effect here" in text
    assert "(default: None)" not in text and "(default: False)" not in text


# ------------------------------------------------------------------------------------ resume


def without_seconds(got: dict) -> dict:
    """finals() without the time each row took to score (the one thing a rerun changes)."""
    return {key: {k: v for k, v in metrics.items() if k != "seconds"} for key, metrics in got.items()}


def test_resume_gives_the_uninterrupted_result(fashion, tmp_path):
    """--stop-after 5 (mid-SWAG run, after its first collection) then --resume: the same SWAG state bit for bit and the
    same rows; a resume of the finished run loads everything; a row missing from the evaluation record is scored
    again, to the same numbers."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    swag.main(tiny(fashion, whole))
    swag.main(tiny(fashion, split, "--stop-after", "5"))
    assert not (split / "results.json").exists()
    assert load_checkpoint(checkpoint_path(split, 0, "swag"))["epoch"] == 2
    assert not checkpoint_path(split, 0, "evaluation").exists()
    with pytest.raises(SystemExit, match="holds an unfinished run"):
        swag.main(tiny(fashion, split))
    swag.main(tiny(fashion, split, "--resume"))
    for run in ("sgd", "swag", "swag-seed10000"):
        a = load_checkpoint(checkpoint_path(whole, 0, run))
        b = load_checkpoint(checkpoint_path(split, 0, run))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), run
        if run != "sgd":
            for part in ("mean", "variance"):
                assert all(torch.equal(a["swag"][part][k], b["swag"][part][k]) for k in a["swag"][part]), run
            assert a["swag"]["n_averaged"] == b["swag"]["n_averaged"] == 2
    assert without_seconds(finals(whole)) == without_seconds(finals(split))

    record = checkpoint_path(split, 0, "evaluation")
    before = {run: checkpoint_path(split, 0, run).stat().st_mtime_ns for run in ("sgd", "swag")}
    saved = load_checkpoint(record)
    del saved["finals"]["MultiSWAG"]
    save_atomic(saved, record)
    swag.main(tiny(fashion, split, "--resume"))  # trained: loaded; the missing row scored again
    assert {run: checkpoint_path(split, 0, run).stat().st_mtime_ns for run in ("sgd", "swag")} == before
    assert without_seconds(finals(split)) == without_seconds(finals(whole))


@pytest.mark.parametrize("argv, named", [(["--n-samples", "3"], "--n-samples: 2 in the checkpoints, 3 now"),
                                         (["--scale", "0.25"], "--scale: 0.5 in the checkpoints, 0.25 now"),
                                         (["--max-rank", "5"], "--max-rank: 20 in the checkpoints, 5 now"),
                                         (["--multiswag-runs", "3"], "--multiswag-runs: 2 in the checkpoints, 3 now")])
def test_resume_refuses_changed_options(fashion, tmp_path, argv, named):
    out = tmp_path / "run"
    swag.main(tiny(fashion, out, "--stop-after", "1"))
    with pytest.raises(SystemExit) as raised:
        swag.main(tiny(fashion, out, "--resume", *argv))
    assert "were trained with other options" in str(raised.value) and named in str(raised.value)


def test_a_new_run_replaces_the_finished_one_whole(fashion, tmp_path):
    """No file of a previous run survives a new one (the diagrams included), and --multiswag-runs 0 has no
    MultiSWAG row and no extra run."""
    out = tmp_path / "run"
    swag.main(tiny(fashion, out))
    (out / "reliability.png").write_bytes(b"stale")
    swag.main(tiny(fashion, out, "--multiswag-runs", "0"))
    assert list(table(out)) == METHODS[:-1]
    assert sorted(p.name for p in (out / "checkpoints" / "seed0").iterdir()) == ["evaluation.pt", "sgd.pt", "swag.pt"]
    assert (out / "reliability.png").read_bytes() != b"stale"
    report = (out / "results.md").read_text()
    assert "- MultiSWAG:" not in report and "| MultiSWAG |" not in report
