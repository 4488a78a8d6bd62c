"""The recipes' command line, presets, option checks (every numeric option against negative, zero, non-finite
and out-of-range values; --out), verdict and averaging table, without training
(fast), and examples/swap_the_import.py on a few steps. examples/posthoc_ema.py's
training, sweep and report are tests/test_recipe_posthoc.py's."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from helpers import load_recipe, results_md_std
from recipe_lib.cli import preset_help
from recipe_lib.engine import ArmResult
from recipe_lib.reporting import averaging_table, human_size, outputs_lines
from recipe_lib.verdict import MeasuredSpread, verdict_lines

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {name: load_recipe(name) for name in ("swa_tutorial", "swa_paper", "large_batch", "posthoc_ema")}
tutorial, paper, large_batch = (RECIPES[name] for name in ("swa_tutorial", "swa_paper", "large_batch"))
# A real default each recipe's help shows (0.0 included: argparse's formatter compares it with False).
SHOWN_DEFAULT = {"swa_tutorial": "Adam weight decay (L2 added to the gradient) (default: 0.0)",
                 "swa_paper": "SGD momentum (default: 0.9)", "large_batch": "SGD momentum (default: 0.9)",
                 "posthoc_ema": "(the model is in eval mode: no effect on results) (default: 1000)"}


# ------------------------------------------------------------------------------------ --help

@pytest.mark.parametrize("name", list(RECIPES))
def test_help_every_option_has_help_and_no_none_default(name):
    parser = RECIPES[name].build_parser()
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "--epochs" in text and "quick preset:" in text and "smoke:" in text and "paper:" in text
    assert "(presets:" not in text
    threads = text[text.index("\n  --threads"):text.index("\n  --eval-batch-size")]
    assert threads.count("default") == 1  # one default, in words
    assert SHOWN_DEFAULT[name] in " ".join(text.split())  # a real default is still shown


def test_help_reads_quick_preset_first_and_names_zero():
    presets = {"smoke": {"train_subset": 2048}, "quick": {"train_subset": 20000}, "paper": {"train_subset": 0}}
    assert preset_help(presets, "train_subset", "train on this many", zero="all") == (
        "train on this many (quick preset: 20000; smoke: 2048; paper: 0 = all)")
    assert preset_help({"quick": {"x": None}, "paper": {"x": 150}}, "x", "size") == "size (paper preset: 150)"
    assert preset_help({"quick": {"a": True}}, "a", "augment") == "augment (quick preset: on)"
    assert preset_help({"quick": {"b": 128}, "paper": {"b": 128}}, "b", "batch") == "batch (every preset: 128)"
    assert preset_help({"quick": {"m": [3, 4]}, "paper": {"m": [50, 75]}}, "m", "at") == (
        "at (quick preset: 3 4; paper: 50 75)")


def test_budget_is_an_alias_of_epochs():
    assert paper.parse_args(["--budget", "7"]).epochs == 7
    assert paper.parse_args(["--epochs", "7"]).epochs == 7
    assert paper.parse_args([]).epochs == 10  # the quick preset's budget
    assert "--epochs EPOCHS, --budget EPOCHS" in paper.build_parser().format_help()


# ------------------------------------------------------------------------------------ presets

def test_smoke_presets_resolve_to_the_documented_values():
    t = tutorial.parse_args(["--preset", "smoke"])
    assert (t.model, t.epochs, t.swa_start, t.train_subset, t.test_subset) == ("resnet18_small", 3, 1, 2048, 1000)
    assert [arm.name for arm in tutorial.make_arms(t, None)] == ["baseline", "SWA_1_0.0005"]
    p = paper.parse_args(["--preset", "smoke"])
    assert (p.model, p.epochs, p.swa_start, p.train_subset, p.test_subset) == ("vgg_small", 4, 2, 2048, 1000)
    swa = paper.make_arms(p, None)[1]
    assert swa.epochs == 6 and swa.swa.report_at == {"SWA 1 budget": 4, "SWA 1.25 budgets": 5}
    b = large_batch.parse_args(["--preset", "smoke"])
    assert (b.model, b.epochs, b.milestones, b.small_batch, b.large_batch, b.train_subset, b.test_subset) == (
        "f1", 2, [1], 64, 512, 2048, 1000)
    assert [(arm.name, arm.epochs) for arm in large_batch.make_arms(b, None)][-1] == ("lb_lr_gbn_ra", 16)
    assert tutorial.parse_args(["--preset", "smoke", "--epochs", "5"]).epochs == 5  # an explicit option wins


# ------------------------------------------------------------------------------------ option checks

@pytest.mark.parametrize("recipe, argv, message", [
    ("swa_tutorial", ["--epochs", "0"], "--epochs 0 is too few: SWA needs at least one epoch before --swa-start "
                                        "and one to average after it (at least 2)"),
    ("swa_tutorial", ["--epochs", "1"], "--epochs 1 is too few"),
    ("swa_tutorial", ["--epochs", "0", "--baseline-only"], "--epochs 0 is too few: train at least one epoch"),
    ("swa_tutorial", ["--epochs", "3", "--swa-start", "5"], "--swa-start 5 must be between 1 and --epochs - 1 = 2 "
                                                            "(--epochs is 3"),
    ("swa_tutorial", ["--epochs", "3"], "--swa-start 8 must be between 1 and --epochs - 1 = 2"),
    ("swa_paper", ["--epochs", "0"], "--epochs (the budget B) 0 is too few"),
    ("swa_paper", ["--budget", "1"], "--epochs (the budget B) 1 is too few"),
    ("swa_paper", ["--budget", "4"], "--swa-start 8 must be between 1 and --epochs (the budget B) - 1 = 3"),
    ("large_batch", ["--epochs", "0"], "--epochs 0 is too few: every arm trains at least one epoch (at least 1)"),
])
def test_epochs_are_checked_before_swa_start(recipe, argv, message):
    module = RECIPES[recipe]
    with pytest.raises(SystemExit) as raised:
        module.make_arms(module.parse_args(argv), None)
    assert message in str(raised.value)


@pytest.mark.parametrize("recipe, argv", [("swa_tutorial", ["--epochs", "0"]), ("swa_paper", ["--budget", "1"]),
                                          ("large_batch", ["--large-batch", "8", "--small-batch", "64"]),
                                          ("posthoc_ema", ["--epochs", "0"])])
def test_bad_options_fail_before_the_data_loads(recipe, argv, tmp_path, monkeypatch):
    """A bad option is reported before the dataset is read (here it does not exist) or a process group starts."""
    module = RECIPES[recipe]
    loads = []
    monkeypatch.setattr("recipe_lib.cli.load_dataset", lambda *a: loads.append(a))
    with pytest.raises(SystemExit) as raised:
        module.main(argv + ["--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert "too few" in str(raised.value) or "must be larger" in str(raised.value)
    assert loads == []


def test_baseline_only_needs_no_swa_start():
    args = tutorial.parse_args(["--epochs", "1", "--baseline-only"])
    assert [arm.name for arm in tutorial.make_arms(args, None)] == ["baseline"]


# ------------------------------------------------------------------------------------ measured spread

# posthoc_ema's table is by std and source, not by row label: tests/test_recipe_posthoc.py checks its spread.
@pytest.mark.parametrize("name", [name for name in RECIPES if name != "posthoc_ema"])
def test_measured_spread_is_results_md(name):
    spread = RECIPES[name].MEASURED_SPREAD
    assert list(spread) == ["quick"]  # RESULTS.md measured the quick presets only
    for label, std in spread["quick"].std_points.items():
        assert results_md_std(label) == [std], label


# ------------------------------------------------------------------------------------ verdict

def rows(**accuracies: list[float]) -> dict[str, list[dict[str, float]]]:
    return {label.replace("_", " "): [{"seed": seed, "test_acc": a / 100, "epoch": 3} for seed, a in enumerate(accs)]
            for label, accs in accuracies.items()}


SPREAD = {"quick": MeasuredSpread({"base": 1.07, "swa": 0.92})}


def test_verdict_one_seed_gives_the_measured_spread_and_the_noise_recipe():
    lines = verdict_lines(rows(base=[87.6], swa=[87.9]), "base", ["swa"], "quick", "fashion_mnist", SPREAD,
                          describe=lambda label: {"base": "the baseline", "swa": "SWA (start 8)"}[label])
    assert lines[0] == "Verdict:"
    assert lines[1] == ("- SWA (start 8) reached 87.90% test accuracy vs 87.60% for the baseline "
                        "(+0.30 points, on one seed).")
    assert "spread of this recipe's quick preset, measured on the real Fashion-MNIST" in lines[2]
    assert "std 1.07 points (base), 0.92 points (swa). A one-seed difference smaller than that" in lines[2]
    assert "--seeds 0 1 2" in lines[3]
    assert lines[-1].startswith("- Reproducibility:") and "GPU runs differ again" in lines[-1]


def test_verdict_several_seeds_says_whether_the_difference_exceeds_the_spread():
    within = verdict_lines(rows(base=[87.6, 85.7, 87.4], swa=[87.3, 85.8, 87.5]), "base", ["swa"], "quick",
                           "fashion_mnist", SPREAD)
    assert within[1] == ("- swa reached 86.87 ± 0.93% test accuracy vs 86.90 ± 1.04% for base "
                         "(-0.03 points, mean ± std over 3 seeds).")
    assert within[2] == ("- The difference (0.03 points) is within this run's seed-to-seed spread (std up to 1.04 "
                         "points): this run cannot tell the two apart; ahead of base on 2 of 3 seeds.")
    assert "measured on" in within[3] and "one-seed" not in within[3]
    assert not any("--seeds 0 1 2" in line for line in within)
    beyond = verdict_lines(rows(base=[86.0, 86.2, 86.1], swa=[87.0, 87.3, 87.1]), "base", ["swa"], "quick",
                           "fashion_mnist", SPREAD)
    assert any("larger than this run's seed-to-seed spread" in line and "on 3 of 3 seeds" in line
               for line in beyond)


def test_verdict_gives_spread_only_where_results_md_has_it():
    for preset, dataset in (("paper", "fashion_mnist"), ("quick", "cifar10")):
        lines = verdict_lines(rows(base=[50.0], swa=[51.0]), "base", ["swa"], preset, dataset, SPREAD)
        assert not any("measured on" in line for line in lines)
        assert any("no measured seed-to-seed spread" in line for line in lines)
    smoke = verdict_lines(rows(base=[50.0], swa=[51.0]), "base", ["swa"], "smoke", "fashion_mnist", SPREAD)
    assert any("This was the smoke preset" in line for line in smoke)
    assert not any("spread for the smoke" in line for line in smoke)


def test_verdict_best_of_a_sweep_other_rows_and_nothing_to_compare():
    lines = verdict_lines(rows(base=[80.0], a=[79.0], b=[81.5]), "base", ["a", "b"], "quick", "fashion_mnist", {})
    assert lines[1].startswith("- b (the best of 2 settings) reached 81.50%")
    assert lines[2] == "- The other rows vs base: a -1.00 points (table above)."
    alone = verdict_lines(rows(base=[80.0]), "base", ["base"], "quick", "fashion_mnist", {})
    assert alone[1] == "- Only base was trained: 80.00% test accuracy; nothing was compared."


# ------------------------------------------------------------------------------------ tables, outputs

def averaged(compared: bool) -> ArmResult:
    timing = {"fast_seconds": 0.002, "torch_seconds": 0.004 if compared else 0.0, "updates": 2,
              "max_abs_diff": 1e-7 if compared else 0.0, "compared": compared}
    return ArmResult("swa", 0, [], {}, timing, [], 1.0)


def test_no_compare_torch_reports_no_difference():
    table = averaging_table([averaged(False)])
    assert "| swa | 2 | 1.000 | n/a (not compared) | n/a | n/a |" in table and "e+00" not in table
    assert "| swa | 2 | 1.000 | 2.000 | 2.00x | 1.00e-07 |" in averaging_table([averaged(True)])


def test_sharded_averages_report_a_digest_not_replicas():
    """--fsdp: no ranks_identical line (there are no replicas), the BN check and where the digest is."""
    timing = dict(averaged(False).averaging, sharded=True, average_sha256="0" * 64, bn_ranks_identical=True)
    table = averaging_table([ArmResult("swa", 0, [], {}, timing, [], 1.0)])
    assert "| n/a (not compared) | n/a | n/a |" in table
    assert "no replicas to compare" in table and "`average_sha256` in results.json" in table
    assert "BN statistics after update_bn identical on every rank: yes" in table
    assert "Averages (parameters and BN statistics after update_bn) identical" not in table


def test_outputs_list_sizes_and_checkpoints(tmp_path):
    (tmp_path / "results.md").write_text("x" * 1500)
    (tmp_path / "checkpoints" / "seed0").mkdir(parents=True)
    (tmp_path / "checkpoints" / "seed0" / "a.pt").write_bytes(b"x" * 2_000_000)
    (tmp_path / "checkpoints" / "seed0" / "b.pt").write_bytes(b"x" * 1_000_000)
    lines = outputs_lines(tmp_path, ["results.md", "missing.csv", "checkpoints"])
    assert lines[0] == f"Outputs written to {tmp_path}/:"
    assert lines[1].startswith(f"  {tmp_path / 'results.md'} (1.5 kB): ")
    assert lines[2].startswith(f"  {tmp_path / 'checkpoints'}/ (3 MB in 2 files): --resume")
    assert len(lines) == 3
    assert [human_size(n) for n in (999, 1000, 31_300_000, 2_500_000_000)] == ["999 B", "1 kB", "31.3 MB", "2.5 GB"]


# ------------------------------------------------------------------------------------ swap_the_import.py

def test_swap_the_import_learns_and_the_averages_agree(capsys):
    swap = load_recipe("swap_the_import")
    got = swap.main(["--steps", "40", "--swa-every", "5", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert got["losses"][0] > 2.0 and got["losses"][-1] < 0.5 * got["losses"][0]  # it learns: from ln 10 down
    assert got["updates"] == {"SWA": 4, "EMA": 40}
    for name in ("SWA", "EMA"):
        assert got["max_abs_diff"][name] <= 1e-6
        assert got["accuracy"][f"{name} torch"] == got["accuracy"][f"{name} swa_fast"]
    assert got["accuracy"]["model"] > 0.5  # ten classes: chance is 0.1
    assert re.search(r"step +40: loss", printed) and "max |torch - swa_fast|" in printed
    assert "ms (torch) vs" in printed


# ------------------------------------------------------------------------------------ hostile inputs (issue 19)
# Every bad option is refused by the option checks: a SystemExit whose message names the option and the bad
# value, before any data loads or a process group starts, with no output folder created.

class WorkStarted(Exception):
    """Raised by the stand-ins of load_dataset and init_distributed: the option checks were passed."""


@pytest.fixture
def started(monkeypatch) -> list[str]:
    """What began after the option checks (a data load, a process group): nothing, for a bad option."""
    began: list[str] = []

    def begin(what: str):
        def stand_in(*args, **kwargs):
            began.append(what)
            raise WorkStarted(what)
        return stand_in

    monkeypatch.setattr("recipe_lib.cli.load_dataset", begin("load_dataset"))
    monkeypatch.setattr("recipe_lib.cli.init_distributed", begin("init_distributed"))
    return began


def refusal(name: str, argv: list[str], tmp_path: Path, started: list[str], out: Path | None = None) -> str:
    """The message ``name``'s refusal of ``argv`` gives; checks that nothing started and nothing was written."""
    out = out or tmp_path / "out"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as raised:
        RECIPES[name].main([*argv, "--out", str(out), "--data-dir", str(tmp_path / "data")])
    assert started == [], f"{argv}: {started} began before the refusal"
    assert sorted(tmp_path.rglob("*")) == before, f"{argv}: files were written"
    assert out.parts[:2] == ("/", "proc") or out.exists() == (out in before)
    assert not (tmp_path / "data").exists()
    return str(raised.value)


def accepted(name: str, argv: list[str], tmp_path: Path, started: list[str]) -> None:
    """``argv`` passes the option checks (the run gets as far as starting its work)."""
    with pytest.raises(WorkStarted):
        RECIPES[name].main([*argv, "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])
    assert started


def numeric_options(name: str) -> list[tuple[str, str, type]]:
    """(option, dest, int or float) of every option of recipe ``name`` whose value is a number."""
    found = []
    for action in RECIPES[name].build_parser()._actions:
        if not action.option_strings or action.type is None:
            continue
        kinds = set()
        for probe in ("1", "0.5", "0.1", "0"):  # the first value in range tells the kind
            try:
                kinds.add(type(action.type(probe)))
                break
            except (argparse.ArgumentTypeError, ValueError):
                continue
        if kinds and (kind := kinds.pop()) in (int, float):
            found.append((action.option_strings[0], action.dest, kind))
    return found


# The numeric options for which 0 is a valid value (what 0 means is in each option's help), and values above
# each option's range. Every other option refuses 0; every option refuses negative and non-finite values.
ZERO_IS_VALID = {"train_subset": "0 = all", "test_subset": "0 = all", "weight_decay": None, "momentum": None,
                 "warmup_epochs": None, "swa_anneal_epochs": None, "swa_eval_every": "0 = only at the budgets",
                 "seeds": None, "snapshot_every": "0 = about 20 snapshots a run"}
ABOVE_RANGE = {"momentum": ["1", "1.5"], "seeds": [str(2**32)], "stds": ["0.5"]}


def hostile_values() -> list:
    cases = []
    for name in RECIPES:
        for option, dest, kind in numeric_options(name):
            values = ["-1"] + ([] if dest in ZERO_IS_VALID else ["0"]) + ABOVE_RANGE.get(dest, [])
            if kind is float:
                values += ["nan", "inf", "-inf", "-0.5"]
            cases += [pytest.param(name, option, value, id=f"{name}{option}={value}") for value in values]
    return cases


def test_the_walk_finds_every_numeric_option():
    """The parametrized walk below sees the options the recipes document (a renamed option would hide)."""
    found = {name: {option for option, _, _ in numeric_options(name)} for name in RECIPES}
    shared = {"--image-size", "--train-subset", "--test-subset", "--seeds", "--threads", "--eval-batch-size",
              "--stop-after"}
    assert found["swa_tutorial"] == shared | {"--epochs", "--batch-size", "--lr", "--weight-decay",
                                              "--warmup-epochs", "--swa-start", "--swa-lr", "--swa-anneal-epochs",
                                              "--sweep-lrs", "--sweep-starts"}
    assert found["swa_paper"] == shared | {"--epochs", "--batch-size", "--lr", "--momentum", "--weight-decay",
                                           "--swa-start", "--swa-lr", "--swa-eval-every", "--fge-cycle"}
    assert found["large_batch"] == shared | {"--epochs", "--milestones", "--small-batch", "--large-batch", "--lr",
                                             "--momentum", "--weight-decay", "--ghost-batch-size",
                                             "--warmup-epochs", "--clip-grad-norm"}
    assert found["posthoc_ema"] == shared | {"--epochs", "--batch-size", "--lr", "--stds", "--snapshot-every"}


@pytest.mark.parametrize("name, option, value", hostile_values())
def test_every_numeric_option_refuses_negative_zero_non_finite_and_out_of_range(name, option, value, tmp_path,
                                                                                 started):
    message = refusal(name, [f"{option}={value}"], tmp_path, started)
    assert option in message, message
    assert value in message, message


@pytest.mark.parametrize("name, dest", [(name, dest) for name in RECIPES for _, dest, _ in numeric_options(name)
                                        if dest in ZERO_IS_VALID])
def test_zero_is_accepted_where_it_means_something_and_help_says_what(name, dest, tmp_path, started):
    option = "--" + dest.replace("_", "-")
    accepted(name, [f"{option}=0"], tmp_path, started)
    if ZERO_IS_VALID[dest]:
        action = next(a for a in RECIPES[name].build_parser()._actions if a.dest == dest)
        assert ZERO_IS_VALID[dest] in action.help


@pytest.mark.parametrize("name, argv, message", [
    # The cases of issue 19, with the exact message each now gives.
    ("swa_tutorial", ["--swa-anneal-epochs", "-1"],
     "argument --swa-anneal-epochs: must be an integer >= 0, got -1"),
    ("swa_tutorial", ["--eval-batch-size", "0"], "argument --eval-batch-size: must be an integer >= 1, got 0"),
    ("swa_tutorial", ["--eval-batch-size", "-3"], "argument --eval-batch-size: must be an integer >= 1, got -3"),
    ("swa_paper", ["--fge", "--fge-cycle", "0"], "argument --fge-cycle: must be an integer >= 1, got 0"),
    ("swa_tutorial", ["--swa-lr", "-1"], "argument --swa-lr: must be a finite number > 0, got -1"),
    ("swa_tutorial", ["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    ("swa_paper", ["--swa-eval-every", "-1"],
     "argument --swa-eval-every: must be an integer >= 0 (0 = only at the budgets), got -1"),
    ("swa_tutorial", ["--image-size", "-3"], "argument --image-size: must be an integer >= 1, got -3"),
    ("swa_tutorial", ["--preset", "smoke", "--train-subset", "-5"],
     "argument --train-subset: must be an integer >= 0 (0 = all), got -5"),
    ("swa_tutorial", ["--test-subset", "-5"], "argument --test-subset: must be an integer >= 0 (0 = all), got -5"),
    ("swa_paper", ["--momentum", "1"], "argument --momentum: must be a number >= 0 and < 1, got 1"),
    ("swa_paper", ["--weight-decay", "inf"], "argument --weight-decay: must be a finite number >= 0, got inf"),
    ("large_batch", ["--clip-grad-norm", "0"], "argument --clip-grad-norm: must be a finite number > 0, got 0"),
    ("swa_tutorial", ["--seeds", "0", "-1"], "argument --seeds: must be an integer from 0 to 4294967295, got -1"),
    # Out of range by another option's value.
    ("swa_tutorial", ["--seeds", "0", "1", "0"], "--seeds: 0 is given twice"),
    ("large_batch", ["--milestones", "3", "5"],
     "--milestones 5 must be between 1 and --epochs - 1 = 4 (an lr decay after the last epoch changes nothing)"),
    ("large_batch", ["--milestones", "4", "3"], "--milestones 4 3 must increase"),
    ("large_batch", ["--warmup-epochs", "5.5"],
     "--warmup-epochs 5.5 must not exceed --epochs (5): the warm-up is a part of the run"),
    ("swa_tutorial", ["--warmup-epochs", "13"], "--warmup-epochs 13 must not exceed --epochs (12)"),
    ("large_batch", ["--ghost-batch-size", "2048"],
     "--ghost-batch-size 2048 must not exceed --large-batch (1024): a ghost batch is a part of the batch"),
    ("swa_tutorial", ["--sweep", "--sweep-starts", "2", "-1"], "argument --sweep-starts: must be an integer >= 1"),
    ("swa_tutorial", ["--sweep", "--sweep-starts", "12"], "--sweep-starts 12 must be between 1 and --epochs - 1"),
    ("swa_tutorial", ["--sweep", "--sweep-starts", "2", "2"], "--sweep-starts: 2 is given twice"),
    ("swa_tutorial", ["--sweep", "--sweep-lrs", "0.05", "5e-2"], "--sweep-lrs: 0.05 is given twice"),
    ("swa_tutorial", ["--sweep-lrs", "0.05"], "--sweep-lrs and --sweep-starts go with --sweep"),
    ("swa_tutorial", ["--sweep", "--baseline-only"], "--baseline-only does not go with --sweep"),
    ("swa_tutorial", ["--resume", "--restart"], "argument --restart: not allowed with argument --resume"),
    # posthoc_ema: the tracked stds, the sweep (parsed as swa_fast's posthoc-ema CLI parses it), the snapshots.
    ("posthoc_ema", ["--stds", "0.05"], "--stds 0.05: give two or more stds"),
    ("posthoc_ema", ["--stds", "0.05", "0.1", "5e-2"], "--stds: 0.05 is given twice"),
    ("posthoc_ema", ["--stds", "0.05", "0.31"], "argument --stds: must be a number > 0 and <= 0.3, got 0.31"),
    ("posthoc_ema", ["--sweep", "0:0.1:3"], "argument --sweep: expected 0 < LOW <= HIGH <= 0.3003"),
    ("posthoc_ema", ["--sweep", "0.1:0.05:3"], "argument --sweep: expected 0 < LOW <= HIGH <= 0.3003"),
    ("posthoc_ema", ["--sweep", "0.03:0.5:3"], "argument --sweep: expected 0 < LOW <= HIGH <= 0.3003"),
    ("posthoc_ema", ["--sweep", "nan:0.1:3"], "argument --sweep: expected 0 < LOW <= HIGH <= 0.3003"),
    ("posthoc_ema", ["--sweep", "0.03:0.15:0"], "argument --sweep: expected 0 < LOW <= HIGH <= 0.3003"),
    ("posthoc_ema", ["--sweep", "0.03:0.15"], "argument --sweep: expected LOW:HIGH:COUNT (e.g. 0.03:0.15:13)"),
    ("posthoc_ema", ["--sweep", "0.03:0.15:2.5"], "argument --sweep: expected LOW:HIGH:COUNT"),
    ("posthoc_ema", ["--sweep", "0.03:0.15:101"], "argument --sweep: COUNT must be at most 100"),
    ("posthoc_ema", ["--sweep", "0.03:0.0301:20"], "argument --sweep: its stds are closer than the report's 4 "
                                                   "significant digits"),
    ("posthoc_ema", ["--snapshot-every", "-1"],
     "argument --snapshot-every: must be an integer >= 0 (0 = about 20 snapshots a run), got -1"),
    ("posthoc_ema", ["--train-subset", "100", "--batch-size", "128"],
     "--batch-size 128 is more than the 100 training samples"),
    ("posthoc_ema", ["--train-subset", "256", "--batch-size", "128", "--epochs", "1", "--snapshot-every", "5"],
     "--snapshot-every 5 leaves 1 snapshot in the run's 2 steps (1 epoch(s) of 2): the reconstruction needs at "
     "least 2"),
    ("posthoc_ema", ["--fsdp"], "--fsdp does not go with posthoc_ema.py"),
    ("posthoc_ema", ["--seeds", "1", "1"], "--seeds: 1 is given twice"),
])
def test_hostile_inputs_are_refused_naming_the_option(name, argv, message, tmp_path, started):
    assert message in refusal(name, argv, tmp_path, started)


@pytest.mark.parametrize("out", ["/proc/x", "/proc/x/y", "file", "file/below"])
def test_an_output_folder_that_cannot_be_written_is_refused_at_once(out, tmp_path, started):
    (tmp_path / "file").write_text("not a folder")
    target = out if out.startswith("/") else str(tmp_path / out)
    message = refusal("swa_tutorial", ["--preset", "smoke"], tmp_path, started, out=Path(target))
    assert message.startswith(f"--out {target}: ") and "cannot be" in message, message
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("preset", ["smoke", "quick", "paper"])
def test_every_preset_passes_the_option_checks(name, preset, tmp_path, started):
    accepted(name, ["--preset", preset], tmp_path, started)


def test_report_files_are_written_whole_or_not_at_all(tmp_path):
    from recipe_lib.outputs import write_atomic

    path = tmp_path / "results.md"
    write_atomic(path, "the first run's report")
    with pytest.raises(TypeError):
        write_atomic(path, 42)  # fails mid-write
    assert path.read_text() == "the first run's report" and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("device, message", [("foo", "must be auto, cpu, cuda or cuda:N, got foo"),
                                             ("mps", "must be auto, cpu, cuda or cuda:N, got mps"),
                                             ("cpu:3", "must be auto, cpu, cuda or cuda:N, got cpu:3")])
def test_a_bad_device_is_refused_naming_the_option(device, message):
    with pytest.raises(SystemExit, match=f"argument --device: {message}"):
        RECIPES["swa_tutorial"].parse_args(["--device", device])
