"""README.md's performance tables, generated from the committed results in ``benchmarks/results/``.

Usage (from the repository root)::

    python benchmarks/readme_tables.py            # print every table block
    python benchmarks/readme_tables.py --write    # rewrite README.md's table blocks in place
    python benchmarks/readme_tables.py --check    # exit 1 with a diff when README.md differs

One table per suite (``averaging``, ``multi``, ``posthoc``, ``swag``, ``integrations``, ``ghost_bn``, ``distance``)
per results file,
each followed by a line naming the device, torch, commit and date of its run.
In README.md a table lives between two marker comments named by the suite and
the results file's stem::

    <!-- tables:averaging:cpu-intel-xeon-processor-2threads begin -->
    ...
    <!-- tables:averaging:cpu-intel-xeon-processor-2threads end -->

Only what lies between the markers is generated; the prose around them is
written by hand. The results files read are every ``*.json`` with schema 2 that
is a full run (named ``<device slug>.json``, as ``run.py`` names it); a partial
run (``<slug>-<suites or cases>.json``) is read only where README.md already has
markers for it. Only the files directly in the folder are read: smoke runs
(``run.py --quick``) write to its ``scratch/`` subfolder, and a report whose
settings say ``quick`` is skipped wherever it lies. ``--write`` puts the table
of a results file that has no markers yet (a new GPU, say) right after the last
table of the same suite, and drops the blocks whose results file or suite is
gone: a device with no results has no table.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as `python benchmarks/readme_tables.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import (
    BILLION_PARAMS,
    BILLION_TENSORS,
    RESNET50_PARAMS,
    RESNET50_TENSORS,
    TRANSFORMER_PARAMS,
    TRANSFORMER_TENSORS,
)
from benchmarks.harness import REPO_ROOT, RESULTS_DIR

README = REPO_ROOT / "README.md"
SCHEMA = 2  # the results layout this script reads (run.py's report["schema"])
DASH = "—"  # a candidate that did not run, or whose figure would compare unlike things

# The parameter sets of benchmarks/cases.py, recognised by their counts (the JSON
# stores the counts, not the set's name; averaging and distance cases share sets).
MODEL_NAMES: Dict[Tuple[int, int], str] = {
    (RESNET50_TENSORS, RESNET50_PARAMS): "ResNet-50",
    (TRANSFORMER_TENSORS, TRANSFORMER_PARAMS): "transformer",
    (BILLION_TENSORS, BILLION_PARAMS): "1B transformer",
}

SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}

Case = Mapping[str, object]  # report["cases"][name]: the case's facts, "candidates", "speedups"
Key = Tuple[str, str]  # (suite, results file stem): one table block


# ---------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------


def median_ms(case: Case, key: str) -> Optional[float]:
    """The candidate's median ms per call, or None when it did not run in this case."""
    candidate = case["candidates"].get(key)
    return None if candidate is None else candidate["median_ms"]


def format_ms(ms: Optional[float]) -> str:
    """One decimal from 1 ms up (what the CPU tables need); two significant digits below,
    so sub-millisecond GPU figures keep the precision the CPU ones have."""
    if ms is None:
        return DASH
    return f"{ms:.1f}" if round(ms, 1) >= 1 else f"{ms:.2g}"


def ratio(case: Case, fast: str, base: str) -> Optional[float]:
    """``base``'s median over ``fast``'s: the runner's ``speedups[...]["median"]`` for that pair,
    computed here so that pairs the runner does not list (and renamed ones) work too."""
    fast_ms, base_ms = median_ms(case, fast), median_ms(case, base)
    if fast_ms is None or base_ms is None:
        return None
    return base_ms / fast_ms


def format_ratio(value: Optional[float], digits: int) -> str:
    """``6.4x``; empty when one side did not run."""
    return "" if value is None else f"{value:.{digits}f}x"


def short_dtype(name: str) -> str:
    """``bfloat16`` -> ``bf16``, as the README writes dtypes."""
    return SHORT_DTYPES.get(name, name)


def param_count(num_params: int) -> str:
    """Three significant digits with a suffix: 25.6M, 102M, 1.01B."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if num_params >= scale:
            return f"{num_params / scale:.3g}{suffix}"
    return str(num_params)


def model_name(case: Case) -> str:
    """The parameter set's name, or the case's name for a set this script does not know."""
    return MODEL_NAMES.get((case["num_tensors"], case["num_params"]), str(case.get("name", "?")))


# ---------------------------------------------------------------------------
# Suites: a row label and columns of cells per case
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Case], str]


@dataclass(frozen=True)
class SuiteTable:
    first_header: str
    row_label: Callable[[Case], str]
    columns: Sequence[Column]


def averaging_mixed(case: Case) -> bool:
    """A model averaged in another dtype (bf16 model, fp32 averages): torch's AveragedModel
    cannot do that and averages in bf16, a different job, so its cells stay empty."""
    return case["avg_dtype"] != case["model_dtype"]


def averaging_label(case: Case) -> str:
    """``ResNet-50 (161 tensors, 25.6M fp32)``, or the dtypes alone for a mixed case."""
    if averaging_mixed(case):
        return (f"{model_name(case)}, {short_dtype(case['model_dtype'])} model, "
                f"{short_dtype(case['avg_dtype'])} averages")
    return (f"{model_name(case)} ({case['num_tensors']} tensors, {param_count(case['num_params'])} "
            f"{short_dtype(case['model_dtype'])})")


def torch_averaged_ms(key: str) -> Callable[[Case], str]:
    """A torch AveragedModel candidate's cell: a dash where it averages in another dtype."""
    return lambda case: DASH if averaging_mixed(case) else format_ms(median_ms(case, key))


def torch_averaged_speedup(fast: str, base: str, digits: int) -> Callable[[Case], str]:
    """swa_fast against a torch AveragedModel candidate; empty where the two do different jobs."""
    return lambda case: "" if averaging_mixed(case) else format_ratio(ratio(case, fast, base), digits)


def foreach_lerp_cell(case: Case) -> str:
    """The mixed case compares with ``_foreach_lerp_`` on copies cast to the averages' dtype,
    the nearest torch gets to swa_fast's job there."""
    if not averaging_mixed(case):
        return format_ms(median_ms(case, "torch_foreach_lerp"))
    cast = ".float()" if case["avg_dtype"] == "float32" else f".to({case['avg_dtype']})"
    return f"{format_ms(median_ms(case, 'torch_foreach_lerp_cast'))} (`lerp_` after `{cast}`)"


def ms_cell(key: str) -> Callable[[Case], str]:
    """The column of one candidate's median ms."""
    return lambda case: format_ms(median_ms(case, key))


AVERAGING = SuiteTable(
    "parameter set",
    averaging_label,
    [
        Column("torch SWA (default)", torch_averaged_ms("torch_swa")),
        Column("swa_fast SWA", ms_cell("swa_fast_swa")),
        # SWA's speedup is large (one decimal says it); EMA's is near 1, where the second matters.
        Column("speedup", torch_averaged_speedup("swa_fast_swa", "torch_swa", 1)),
        Column("torch EMA (`get_ema_multi_avg_fn`)", torch_averaged_ms("torch_ema")),
        Column("swa_fast EMA", ms_cell("swa_fast_ema")),
        Column("speedup", torch_averaged_speedup("swa_fast_ema", "torch_ema", 2)),
        Column("`_foreach_lerp_`", foreach_lerp_cell),
        Column("`swa_fast.average_`", ms_cell("swa_fast_average_")),
        Column("memcpy of the set", ms_cell("copy")),
    ],
)


def ghost_label(case: Case) -> str:
    """``(2048, 64, 32, 32), 128``, plus the layout and dtype where they are not the default."""
    extras = [case["memory_format"]] if case["memory_format"] != "contiguous" else []
    extras += [short_dtype(case["dtype"])] if case["dtype"] != "float32" else []
    return ", ".join([str(tuple(case["shape"])), str(case["ghost_batch_size"]), *extras])


def ghost_vs_chunk(case: Case) -> str:
    """Speedup over the chunk loop, said the other way round when swa_fast is the slower."""
    value = ratio(case, "swa_fast", "chunk_loop")
    if value is None:
        return ""
    return f"{value:.1f}x faster" if value >= 1 else f"{1 / value:.1f}x slower"


def ghost_vs_batchnorm(case: Case) -> str:
    """Time against whole-batch BatchNorm (the floor), the inverse of a speedup."""
    value = ratio(case, "batchnorm", "swa_fast")
    return "" if value is None else f"{value:.2f}x the time"


GHOST_BN = SuiteTable(
    "input, ghost size",
    ghost_label,
    [
        Column("`nn.BatchNorm` on the whole batch", ms_cell("batchnorm")),
        Column("chunk loop `torch.cat([bn(c) for c in x.split(g)])`", ms_cell("chunk_loop")),
        Column("reshape trick (ghosts folded into channels)", ms_cell("reshape_trick")),
        Column("swa_fast `GhostBatchNorm`", ms_cell("swa_fast")),
        Column("vs chunk loop", ghost_vs_chunk),
        Column("vs whole-batch BatchNorm", ghost_vs_batchnorm),
    ],
)


def distance_label(case: Case) -> str:
    """``ResNet-50 (161 tensors, 25.6M, fp32 vs fp32)``, or the dtypes alone for a mixed pair."""
    model, ref = short_dtype(case["model_dtype"]), short_dtype(case["ref_dtype"])
    if model != ref:
        return f"{model_name(case)}, {model} model vs {ref} snapshot"
    return f"{model_name(case)} ({case['num_tensors']} tensors, {param_count(case['num_params'])}, {model} vs {ref})"


def distance_speedups(case: Case) -> str:
    """``2.6x / 2.3x``: the op against the foreach pair and against the per-tensor loop."""
    foreach = format_ratio(ratio(case, "swa_fast_distance", "torch_foreach"), 1) or DASH
    loop = format_ratio(ratio(case, "swa_fast_distance", "torch_loop"), 1) or DASH
    return f"{foreach} / {loop}"


DISTANCE = SuiteTable(
    "parameter set",
    distance_label,
    [
        Column("`_foreach_norm(_foreach_sub(a, b))` + stacked norm", ms_cell("torch_foreach")),
        Column("`(x - y).norm()` loop", ms_cell("torch_loop")),
        Column("swa_fast", ms_cell("swa_fast_distance")),
        Column("speedup vs foreach / loop", distance_speedups),
        Column("memcpy of as many bytes", ms_cell("copy")),
    ],
)

def multi_label(case: Case) -> str:
    """``ResNet-50 (25.6M fp32), K = 3``."""
    return (f"{model_name(case)} ({param_count(case['num_params'])} {short_dtype(case['model_dtype'])}), "
            f"K = {case['k']}")


def multi_vs_bound(case: Case) -> str:
    """The fused pass's gain over K separate averages, against what the byte count allows."""
    value = ratio(case, "multi_average", "weight_averages")
    bound = case["byte_ratio"]
    return "" if value is None else f"{value:.2f}x of {bound:.2f}x ({100 * value / bound:.0f}%)"


MULTI = SuiteTable(
    "parameter set, K EMAs",
    multi_label,
    [
        Column("K torch `AveragedModel` EMAs", ms_cell("torch_emas")),
        Column("K `WeightAverage`s", ms_cell("weight_averages")),
        Column("`MultiAverage` (one pass)", ms_cell("multi_average")),
        Column("vs K `WeightAverage`s, of the byte-count bound 12K/(4+8K)", multi_vs_bound),
        Column("vs torch", lambda case: format_ratio(ratio(case, "multi_average", "torch_emas"), 2)),
        Column("memcpy of the model", ms_cell("copy")),
    ],
)

POSTHOC = SuiteTable(
    "parameter set",
    lambda case: f"{model_name(case)} ({param_count(case['num_params'])} {short_dtype(case['model_dtype'])}), two profiles",
    [
        Column("ema-pytorch `PostHocEMA.update()`", ms_cell("ema_pytorch_posthoc")),
        Column("swa_fast `PowerFunctionEMA.update(model, step)`", ms_cell("swa_fast_power_ema")),
        Column("speedup", lambda case: format_ratio(ratio(case, "swa_fast_power_ema", "ema_pytorch_posthoc"), 2)),
        Column("memcpy of the model", ms_cell("copy")),
    ],
)

SWAG = SuiteTable(
    "parameter set",
    lambda case: (f"{model_name(case)} ({param_count(case['num_params'])} {short_dtype(case['model_dtype'])}), "
                  f"max_rank {case.get('max_rank', '?')}"),
    [
        Column("reference `collect_model` (per tensor, `torch.cat` ring)", ms_cell("reference_swag")),
        Column("torch foreach (raw moments, preallocated ring)", ms_cell("torch_foreach_swag")),
        Column("swa_fast `SWAG.collect(model)`", ms_cell("swa_fast_swag")),
        Column("speedup vs reference / vs foreach", lambda case: " / ".join(
            format_ratio(ratio(case, "swa_fast_swag", other), 1) for other in ("reference_swag", "torch_foreach_swag"))),
        Column("memcpy of the model", ms_cell("copy")),
    ],
)

# Per integrations case (its ``package``): the row's label, the package's own candidates, swa_fast's.
INTEGRATION_ROWS = {
    "timm": ("timm `ModelEmaV3.update(model, step)`, fp32 EMA, warm-up", ("timm",), "swa_fast_timm"),
    "timm_bf16": ("timm `ModelEmaV3`, bf16 EMA, stochastic rounding", ("timm_bf16",), "swa_fast_timm_bf16"),
    "diffusers": ("diffusers `EMAModel.step(params)`, warm-up (foreach False / True)",
                  ("diffusers", "diffusers_foreach"), "swa_fast_diffusers"),
    "lightning": ("Lightning `EMAWeightAveraging`, one `on_train_batch_end`", ("lightning",), "swa_fast_lightning"),
}


def integration_label(case: Case) -> str:
    label = INTEGRATION_ROWS[case["package"]][0]
    return f"{label} ({model_name(case)}, {param_count(case['num_params'])} {short_dtype(case['model_dtype'])})"


def integration_theirs(case: Case) -> str:
    return " / ".join(format_ms(median_ms(case, key)) for key in INTEGRATION_ROWS[case["package"]][1])


def integration_ours(case: Case) -> str:
    return format_ms(median_ms(case, INTEGRATION_ROWS[case["package"]][2]))


def integration_speedup(case: Case) -> str:
    _, theirs, ours = INTEGRATION_ROWS[case["package"]]
    return " / ".join(format_ratio(ratio(case, ours, key), 2) for key in theirs)


INTEGRATIONS = SuiteTable(
    "the package's class, per training step",
    integration_label,
    [
        Column("the package's own", integration_theirs),
        Column("swa_fast's drop-in (`swa_fast.integrations`)", integration_ours),
        Column("speedup", integration_speedup),
        Column("memcpy of the model", ms_cell("copy")),
    ],
)

# In README order; a suite of run.py without an entry here gets no table.
TABLES: Dict[str, SuiteTable] = {"multi": MULTI, "posthoc": POSTHOC, "swag": SWAG, "integrations": INTEGRATIONS,
                                  "averaging": AVERAGING,
                                  "ghost_bn": GHOST_BN,
                                  "distance": DISTANCE}


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def markdown_row(cells: Sequence[str]) -> str:
    """``| a | b |``; an empty cell is ``| |``."""
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def suite_cases(report: Mapping, suite: str) -> List[Case]:
    """The report's cases of ``suite`` in run order, each with its name added."""
    return [dict(case, name=name) for name, case in report["cases"].items() if case.get("suite") == suite]


def format_table(table: SuiteTable, cases: Sequence[Case]) -> List[str]:
    """The Markdown lines of one table: header, separator, a row per case."""
    headers = [table.first_header] + [column.header for column in table.columns]
    lines = [markdown_row(headers), markdown_row(["---"] * len(headers))]
    for case in cases:
        lines.append(markdown_row([table.row_label(case)] + [column.cell(case) for column in table.columns]))
    return lines


def device_text(device: Mapping) -> str:
    """The device as a reader wants it: the CPU label's note on the copy is left out (the
    table's memcpy column says what the copy is), the CPU's vector ISA put in."""
    if device["type"] == "cpu":
        return f"CPU {device['name']} ({device['capability']}), {device['threads']} threads"
    return device["label"]


def provenance(report: Mapping, file_name: str) -> str:
    """The line under a table: which machine, torch, commit and date its figures come from."""
    commit = report["git_commit"]
    short = commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")
    parts = [device_text(report["device"]), f"torch {report['torch_version']}",
             f"commit {short}, {report['date'][:10]}"]
    if report.get("loadavg_start") and report.get("loadavg_end"):
        # Other work on a CPU slows the many-kernel baselines most: say how quiet the machine was.
        parts.append(f"load average {report['loadavg_start'][0]:g} at the start, {report['loadavg_end'][0]:g} at the end")
    return f"Measured on {'; '.join(parts)} (`benchmarks/results/{file_name}`)."


def format_block(report: Mapping, suite: str, file_name: str) -> Optional[str]:
    """The table of ``suite`` and its provenance line, or None when the report has no such cases."""
    cases = suite_cases(report, suite)
    if not cases:
        return None
    return "\n".join(format_table(TABLES[suite], cases) + ["", provenance(report, file_name)])


def generate_blocks(reports: Mapping[str, Mapping]) -> Dict[Key, str]:
    """Every (suite, results stem) -> its block body, suites in README order, then files by name."""
    blocks: Dict[Key, str] = {}
    for suite in TABLES:
        for stem in sorted(reports):
            body = format_block(reports[stem], suite, f"{stem}.json")
            if body is not None:
                blocks[(suite, stem)] = body
    return blocks


# ---------------------------------------------------------------------------
# Results files and README.md
# ---------------------------------------------------------------------------


BLOCK = re.compile(
    r"^<!-- tables:(?P<suite>\w+):(?P<stem>[\w.-]+) begin -->\n.*?^<!-- tables:(?P=suite):(?P=stem) end -->\n"
    r"(?P<gap>\n)?",
    re.MULTILINE | re.DOTALL,
)


def marker_keys(text: str) -> List[Key]:
    """The (suite, results stem) of every marked block in ``text``, in order."""
    return [(match["suite"], match["stem"]) for match in BLOCK.finditer(text)]


def load_reports(results_dir: Path, marked_stems: Sequence[str]) -> Dict[str, dict]:
    """Results file stem -> report, for every schema-2 file that is a full run (named by its
    device slug) or that README.md has markers for. The glob is not recursive: the smoke runs
    in ``scratch/`` are never read."""
    reports = {}
    for path in sorted(results_dir.glob("*.json")):
        report = json.loads(path.read_text())
        if report.get("schema") != SCHEMA:
            continue  # another layout: its fields may differ
        if report.get("settings", {}).get("quick"):
            continue  # a smoke run written here with --output: its figures are no reference
        if path.stem == report["device"]["slug"] or path.stem in marked_stems:
            reports[path.stem] = report
    return reports


def block_text(key: Key, body: str) -> str:
    """A block as it stands in the README: the body between its two markers."""
    suite, stem = key
    return f"<!-- tables:{suite}:{stem} begin -->\n{body}\n<!-- tables:{suite}:{stem} end -->\n"


class PlacementError(Exception):
    """A table has no markers in README.md and no table of its suite to follow."""


def render_readme(text: str, blocks: Mapping[Key, str]) -> str:
    """``text`` with every marked block regenerated, blocks without results dropped and new
    blocks placed after the last block of their suite."""
    marked = marker_keys(text)
    missing = [key for key in blocks if key not in marked]
    for suite, stem in missing:
        if suite not in {s for s, _ in marked}:
            raise PlacementError(f"no place in the README for the {suite} table of {stem}.json: add a "
                                 f"'<!-- tables:{suite}:{stem} begin -->' / 'end -->' pair where it belongs")
    last_of_suite = {suite: stem for suite, stem in marked}

    def replace(match: re.Match) -> str:
        suite, stem = match["suite"], match["stem"]
        parts = [block_text((suite, stem), blocks[(suite, stem)])] if (suite, stem) in blocks else []
        if last_of_suite[suite] == stem:
            parts += [block_text(key, blocks[key]) for key in missing if key[0] == suite]
        if not parts:
            return ""  # its results are gone: drop the block and the blank line after it
        return "\n".join(parts) + (match["gap"] or "")

    return BLOCK.sub(replace, text)


def readme_diff(old: str, new: str, name: str) -> str:
    """A unified diff from the README as it is to the README as generated."""
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), name, f"{name} (generated)"))


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/readme_tables.py",
                                     description="README.md's benchmark tables from benchmarks/results/*.json.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the README's table blocks in place")
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff when the README differs")
    parser.add_argument("--readme", type=Path, default=README, help="default: README.md")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="default: benchmarks/results/")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    text = args.readme.read_text()
    reports = load_reports(args.results, [stem for _, stem in marker_keys(text)])
    blocks = generate_blocks(reports)
    if not (args.write or args.check):
        print("\n".join(block_text(key, body) for key, body in blocks.items()), end="")
        return 0
    try:
        new = render_readme(text, blocks)
    except PlacementError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.write:
        if new != text:
            args.readme.write_text(new)
        print(f"{args.readme}: {len(blocks)} tables {'rewritten' if new != text else 'already up to date'}")
        return 0
    if new != text:
        print(readme_diff(text, new, str(args.readme)), end="")
        print(f"{args.readme} differs from benchmarks/results: run python benchmarks/readme_tables.py --write",
              file=sys.stderr)
        return 1
    print(f"{args.readme}: {len(blocks)} tables agree with {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
