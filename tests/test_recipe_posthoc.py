"""examples/posthoc_ema.py end to end on synthetic Fashion-MNIST IDX files: the smoke preset's whole path
(training with per-step EMA updates, snapshots, the sweep with stds outside the sound range, the report,
the plot, the verdict), a tracked std reconstructed at the last snapshot, the refusals that need the data's
size, --stop-after/--resume, and the measured spread the verdict quotes from docs/RESULTS.md.

The option checks made before the data loads (each option against its range, the sweep's form, the tracked
stds) are table-driven over every recipe in tests/test_recipe_cli.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from swa_fast.posthoc import read_snapshot, reconstruct

from helpers import ROOT, ending, finals, load_recipe
from recipe_lib.checkpoint import load_checkpoint
from recipe_lib.datasets import write_synthetic_fashion_mnist
from recipe_lib.engine import checkpoint_path

posthoc = load_recipe("posthoc_ema")


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Path:
    """Learnable 28x28 IDX data: class k is a bright band at rows 2k..2k+4 plus noise."""
    return write_synthetic_fashion_mnist(tmp_path_factory.mktemp("fashion"), n_train=320, n_test=96)


def common(data: Path, out: Path, *extra: str) -> list[str]:
    """A tiny run: 320 images, batch 32 (10 steps an epoch), 2 epochs."""
    return ["--data-dir", str(data), "--out", str(out), "--no-progress", "--train-subset", "0", "--test-subset", "0",
            "--epochs", "2", "--batch-size", "32", *extra]


def table(out: Path) -> dict[tuple[str, str], list[str]]:
    """(std, source) -> the cells of that row of results.md's table."""
    lines = (out / "results.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| std | source |")) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[(cells[0], cells[1])] = cells
    return rows


def test_smoke_preset_runs_the_whole_path(tmp_path, capsys):
    """--preset smoke on data of its subset sizes: 64 steps, an EMA update after each, 4 snapshots; of the sweep
    0.03:0.15:5, 0.03 and 0.15 lie outside the snapshots' sound range (reported, not tested), 0.06, 0.09 and 0.12
    are reconstructed and tested; the table, the plot, the metrics, the outputs and the verdict."""
    data = write_synthetic_fashion_mnist(tmp_path / "data", n_train=2048, n_test=1000)
    out = tmp_path / "smoke"
    posthoc.main(["--preset", "smoke", "--data-dir", str(data), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "2048 train / 1000 test samples" in printed and "a snapshot every 16 steps (4 per seed)" in printed

    rows = table(out)
    assert list(rows) == [("-", "final model (raw weights)"), ("0.05", "tracked"), ("0.1", "tracked"),
                          ("0.03", "not reconstructible"), ("0.06", "reconstructed"), ("0.09", "reconstructed"),
                          ("0.12", "reconstructed"), ("0.15", "not reconstructible")]  # every swept std has its row
    for (std, source), cells in rows.items():
        if source == "not reconstructible":
            assert cells[2] == "-" and re.fullmatch(r"\d+\.\d% \(over 5%\)", cells[4]), cells
            assert float(cells[4].split("%")[0]) > 5
        else:
            assert re.fullmatch(r"\d+\.\d\d", cells[2]), cells  # its test accuracy
        if source == "reconstructed":
            assert float(cells[4].rstrip("%")) <= 5
    got = finals(out)
    assert {label for label, _ in got} == {"final model", "tracked 0.05", "tracked 0.1", "reconstructed 0.06",
                                          "reconstructed 0.09", "reconstructed 0.12"}
    for (label, _), metrics in got.items():
        source, std = label.split(" ")
        key = ("-", "final model (raw weights)") if label == "final model" else (std, source)
        assert rows[key][2] == f"{100 * metrics['test_acc']:.2f}", label

    result = json.loads((out / "results.json").read_text())
    run = result["runs"][0]
    info = run["averaging"]
    assert info["ema_updates"] == 64 and info["snapshot_steps"] == [16, 32, 48, 64]
    assert sorted(info["not_reconstructible"]) == ["0.03", "0.15"]
    low, high = info["sound_range"]
    assert low > 0.03 and high < 0.15 and low < 0.05 and high > 0.1
    assert result["summary"]["not_reconstructible"] == ["0.03", "0.15"]
    snapshots = sorted((out / "checkpoints" / "seed0").glob("ema-*.pt"))
    assert [read_snapshot(p).step for p in snapshots] == [16, 32, 48, 64]
    assert [row["epoch"] for row in result["epochs"]] == [1, 2]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"seed", "epoch", "steps", "test_acc", "ema_0.05_test_acc", "ema_0.1_test_acc"} <= set(header)

    report = (out / "results.md").read_text()
    assert "![accuracy_vs_std](accuracy_vs_std.png)" in report and "![" not in printed
    assert (out / "accuracy_vs_std.png").stat().st_size > 0
    assert "the sound range of these snapshots (profile fit error <= 5%) is 0.0412 to 0.126" in report
    verdict, outputs = ending(printed)
    assert verdict[0].startswith("- The EMA of std ") and "(the best of 3 reconstructed stds)" in verdict[0]
    assert any(re.match(r"- The best reconstructed std, 0\.\d+, (beats|does not beat) both tracked profiles", line)
               for line in verdict)
    assert any(line.startswith("- 2 of the 5 swept stds could not be reconstructed from these snapshots "
                               "(0.03, 0.15)") for line in verdict)
    assert any("This was the smoke preset" in line for line in verdict)
    assert "\n".join(verdict) in report
    for name in ("results.md", "results.json", "metrics.csv", "accuracy_vs_std.png"):
        assert any(f"{out / name} (" in line for line in outputs), name
    assert any(re.search(r"checkpoints/ \(\d[\d.]* [kMG]B in 6 files\)", line) for line in outputs)


def test_a_tracked_std_reconstructed_at_the_last_snapshot_is_the_tracked_profile(fashion, tmp_path):
    """The last snapshot holds the tracked profiles as they end: reconstructing a tracked std there takes that
    profile alone (fit error 0), so it tests exactly as the tracked profile tested directly."""
    out = tmp_path / "run"
    posthoc.main(common(fashion, out, "--sweep", "0.05:0.1:2", "--seeds", "0", "1"))
    got = finals(out)
    for seed in (0, 1):
        for std in ("0.05", "0.1"):
            tracked, made = got[(f"tracked {std}", seed)], got[(f"reconstructed {std}", seed)]
            assert made["fit_error"] < 1e-6
            assert (made["test_acc"], made["test_loss"]) == pytest.approx((tracked["test_acc"], tracked["test_loss"]),
                                                                          abs=1e-6)
    snapshots = sorted((out / "checkpoints" / "seed0").glob("ema-*.pt"))
    last = torch.load(snapshots[-1], weights_only=True)
    state = reconstruct(snapshots, 0.05)
    for key, value in last["profile_0"].items():
        assert torch.allclose(state[key].float(), value.float(), rtol=1e-6, atol=1e-7), key
    rows = table(out)
    assert rows[("0.05", "reconstructed")][2] == rows[("0.05", "tracked")][2]
    assert rows[("0.05", "reconstructed")][4] == "0.00%" and rows[("0.05", "tracked")][4] == "exact (tracked)"
    assert " ± " in rows[("0.1", "tracked")][2]  # two seeds: mean ± std


def test_stds_outside_the_sound_range_are_reported_not_crashed(fashion, tmp_path, capsys):
    """A sweep reaching past what the snapshots represent runs to its end; a sweep with nothing reconstructible
    still reports the tracked profiles against the final model."""
    out = tmp_path / "wide"
    posthoc.main(common(fashion, out, "--sweep", "0.005:0.3:4", "--snapshot-every", "5"))
    rows = table(out)
    assert [std for std, _ in rows][3:] == ["0.005", "0.1033", "0.2017", "0.3"]
    assert rows[("0.005", "not reconstructible")][2] == "-" and rows[("0.3", "not reconstructible")][2] == "-"
    assert ("0.1033", "reconstructed") in rows
    capsys.readouterr()

    none = tmp_path / "none"
    posthoc.main(common(fashion, none, "--sweep", "0.28:0.3:3", "--snapshot-every", "5"))
    verdict, _ = ending(capsys.readouterr().out)
    assert [source for _, source in table(none)][3:] == ["not reconstructible"] * 3
    assert verdict[0].startswith("- The tracked EMA of std ") and "for the final model (raw weights)" in verdict[0]
    assert any(line.startswith("- 3 of the 3 swept stds could not be reconstructed") for line in verdict)
    assert not any("best reconstructed" in line for line in verdict)
    assert json.loads((none / "results.json").read_text())["summary"]["best_reconstructed"] is None


def test_update_bn_recomputes_the_statistics_of_every_ema_tested(fashion, tmp_path):
    plain, bn = tmp_path / "plain", tmp_path / "bn"
    posthoc.main(common(fashion, plain, "--sweep", "0.07:0.07:1"))
    posthoc.main(common(fashion, bn, "--sweep", "0.07:0.07:1", "--update-bn"))
    assert "no update_bn" in (plain / "results.md").read_text()
    assert "then recomputed with update_bn" in (bn / "results.md").read_text()
    a, b = finals(plain), finals(bn)
    assert a[("final model", 0)] == b[("final model", 0)]  # the final model keeps its own statistics
    assert a[("reconstructed 0.07", 0)]["test_loss"] != b[("reconstructed 0.07", 0)]["test_loss"]


def test_resume_gives_the_uninterrupted_result(fashion, tmp_path):
    """--stop-after 1 then --resume: the same snapshots bit for bit and the same results as one run; a resume of
    the finished run loads its results."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    argv = ["--epochs", "3", "--sweep", "0.06:0.12:3", "--snapshot-every", "4"]
    posthoc.main(common(fashion, whole, *argv))
    posthoc.main(common(fashion, split, *argv, "--stop-after", "1"))
    assert not (split / "results.json").exists()
    assert load_checkpoint(checkpoint_path(split, 0, "train"))["epoch"] == 1
    with pytest.raises(SystemExit, match="holds an unfinished run"):
        posthoc.main(common(fashion, split, *argv))
    posthoc.main(common(fashion, split, *argv, "--resume"))
    names = sorted(p.name for p in (whole / "checkpoints" / "seed0").glob("ema-*.pt"))
    assert names == sorted(p.name for p in (split / "checkpoints" / "seed0").glob("ema-*.pt"))
    assert len(names) == 8  # steps 4, 8, ..., 28 and the last, 30
    for name in names:
        a = torch.load(whole / "checkpoints" / "seed0" / name, weights_only=True)
        b = torch.load(split / "checkpoints" / "seed0" / name, weights_only=True)
        for profile in ("profile_0", "profile_1"):
            assert all(torch.equal(a[profile][k], b[profile][k]) for k in a[profile]), (name, profile)
    assert finals(whole) == finals(split)
    before = (split / "checkpoints" / "seed0" / "train.pt").stat().st_mtime_ns
    posthoc.main(common(fashion, split, *argv, "--resume"))  # finished: loaded, not trained again
    assert (split / "checkpoints" / "seed0" / "train.pt").stat().st_mtime_ns == before
    assert finals(split) == finals(whole)


def test_a_refusal_that_needs_the_data_leaves_the_previous_run(fashion, tmp_path, capsys):
    """--batch-size larger than the training split, known only once the data is loaded: refused before the
    previous run's report and snapshots are removed."""
    out = tmp_path / "run"
    posthoc.main(common(fashion, out, "--sweep", "0.07:0.07:1"))
    files = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(SystemExit, match="--batch-size 512 is more than the 320 training samples"):
        posthoc.main(common(fashion, out, "--sweep", "0.07:0.07:1", "--batch-size", "512"))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files


def test_torchrun_is_refused_before_the_data_loads(tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr("recipe_lib.cli.load_dataset", lambda *a: loads.append(a))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="runs in one process .*: launch it with python, not torchrun"):
        posthoc.main(["--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])
    assert loads == [] and not (tmp_path / "out").exists()


def test_help_lists_presets_and_what_the_shared_options_mean_here():
    text = " ".join(posthoc.build_parser().format_help().split())
    assert "--sweep LOW:HIGH:COUNT" in text and "(quick preset: 0.03:0.15:13; smoke: 0.03:0.15:5" in text
    assert "--stds STDS [STDS ...]" in text and "(every preset: 0.05 0.1)" in text
    assert "(quick preset: 0 = about 20 snapshots a run; smoke: 16" in text
    assert "--fsdp not with this recipe (refused)" in text
    assert "--no-compare-torch no effect here" in text


def results_md_rows() -> dict[tuple[str, str], list[str]]:
    """(std, source) -> the cells of docs/RESULTS.md's post-hoc EMA table."""
    text = (ROOT / "docs" / "RESULTS.md").read_text()
    section = text[text.index("(`examples/posthoc_ema.py`)"):]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 6 and " ± " in cells[2]:
            rows[(cells[0], cells[1])] = cells
    return rows


def test_measured_spread_is_results_md():
    """The spreads the verdict quotes are the ± std of docs/RESULTS.md's three-seed table."""
    rows = results_md_rows()
    spread = posthoc.MEASURED_SPREAD
    assert list(spread) == ["quick"]
    for label, std in spread["quick"].std_points.items():
        key = ("-", "final model (raw weights)") if label == "final model" else tuple(label.split(" ")[::-1])
        assert float(rows[key][2].split(" ± ")[1]) == std, label
