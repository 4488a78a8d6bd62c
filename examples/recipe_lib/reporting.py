"""Metrics files, the results table (mean ± std over seeds) and the plots of a recipe run.

Written by rank 0 into the run's output directory:
``metrics.csv`` (one row per seed, arm and epoch), ``results.json``
(configuration, per-epoch rows, final rows, averaging timings), ``results.md``
(the tables and the verdict, printed at the end without the plot links),
``accuracy.png`` (test accuracy and error per epoch, mean over seeds, one
curve per arm and one per average) and, for
runs that track it, ``distance.png`` (``||w_t - w_0||`` against log t). Each
file is written atomically (:func:`recipe_lib.outputs.write_atomic`), once the
run has finished, ``results.json`` last. After writing, :func:`outputs_lines`
lists every output with its size (checkpoints included) for the end of the run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from recipe_lib.engine import ArmResult
from recipe_lib.outputs import write_atomic


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """``"91.23 ± 0.15"`` (accuracy as a percentage by default); no ``±`` for one seed."""
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def final_rows(results: Iterable[ArmResult], order: Sequence[str]) -> dict[str, list[dict[str, float]]]:
    """Row label -> the per-seed final metrics, labels in ``order`` (then any others)."""
    by_label: dict[str, list[dict[str, float]]] = defaultdict(list)
    for result in results:
        for label, metrics in result.finals.items():
            by_label[label].append(dict(metrics, seed=result.seed))
    ordered = [label for label in order if label in by_label]
    ordered += [label for label in by_label if label not in ordered]
    return {label: by_label[label] for label in ordered}


def results_table(results: Sequence[ArmResult], order: Sequence[str], baseline: str | None = None) -> str:
    """The Markdown results table: test accuracy and error, mean ± std over seeds, per-seed values."""
    rows = final_rows(results, order)
    base = None
    if baseline in rows:
        base = statistics.fmean(r["test_acc"] for r in rows[baseline])
    lines = ["| run | test accuracy % | test error % | vs " + (baseline or "baseline") + " | epochs | per seed |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, per_seed in rows.items():
        accs = [r["test_acc"] for r in per_seed]
        delta = "" if base is None else f"{100 * (statistics.fmean(accs) - base):+.2f}"
        seeds = ", ".join(f"{100 * r['test_acc']:.2f}" for r in sorted(per_seed, key=lambda r: r["seed"]))
        epochs = sorted({int(r["epoch"]) for r in per_seed})
        lines.append(f"| {label} | {format_mean_std(accs)} | {format_mean_std([1 - a for a in accs])} | {delta} "
                     f"| {'/'.join(map(str, epochs))} | {seeds} |")
    return "\n".join(lines)


def averaging_table(results: Sequence[ArmResult]) -> str:
    """Time in ``update_parameters``: swa_fast vs torch.optim.swa_utils on the same model and calls."""
    lines = ["| arm | updates | swa_fast ms/update | torch.optim.swa_utils ms/update | torch / swa_fast | "
             "max abs difference |", "| --- | --- | --- | --- | --- | --- |"]
    per_arm: dict[str, list[dict[str, float]]] = defaultdict(list)
    for result in results:
        if result.averaging["updates"]:
            per_arm[result.arm].append(result.averaging)
    for arm, timings in per_arm.items():
        updates = sum(t["updates"] for t in timings)
        fast = sum(t["fast_seconds"] for t in timings)
        fast_ms = f"{1e3 * fast / updates:.3f}"
        if not all(_compared(t) for t in timings):  # --no-compare-torch: no torch time, ratio or difference
            lines.append(f"| {arm} | {updates} | {fast_ms} | n/a (not compared) | n/a | n/a |")
            continue
        ref = sum(t["torch_seconds"] for t in timings)
        ratio = f"{ref / fast:.2f}x" if fast > 0 and ref > 0 else "n/a"
        diff = max(t["max_abs_diff"] for t in timings)
        lines.append(f"| {arm} | {updates} | {fast_ms} | {1e3 * ref / updates:.3f} | {ratio} | {diff:.2e} |")
    timings = [t for arm_timings in per_arm.values() for t in arm_timings]
    checks = [t["ranks_identical"] for t in timings if "ranks_identical" in t]
    if checks:
        lines += ["", "Averages (parameters and BN statistics after update_bn) identical on every rank: "
                  + ("yes" if all(checks) else "NO")]
    if any(t.get("sharded") for t in timings):
        lines += ["", ("Averages sharded with the model (FSDP2: each rank averages its own shards, so there are no "
                       "replicas to compare); their SHA-256 (gathered parameters and BN statistics) is "
                       "`average_sha256` in results.json.")]
        bn = [t["bn_ranks_identical"] for t in timings if "bn_ranks_identical" in t]
        if bn:
            lines[-1] += " BN statistics after update_bn identical on every rank: " + ("yes" if all(bn) else "NO")
    return "\n".join(lines) if per_arm else ""


def _compared(timing: dict[str, float]) -> bool:
    """Whether torch.optim.swa_utils averaged alongside (checkpoints from before the flag: it took time)."""
    return bool(timing.get("compared", timing["torch_seconds"] > 0))


def human_size(size: int) -> str:
    """``"31 MB"``, ``"2.1 kB"``: decimal units, as ``du --si`` and ``ls -lh --si`` print them."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def tree_size(path: Path) -> tuple[int, int]:
    """Bytes and number of files under ``path`` (a file: its own size)."""
    if path.is_file():
        return path.stat().st_size, 1
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


# What each output of a run is, for the list printed at the end.
OUTPUT_NOTES = {
    "results.md": "the tables and the verdict (Markdown, with the plots linked)",
    "results.json": "configuration, every metric, averaging timings",
    "metrics.csv": "one row per seed, arm and epoch",
    "accuracy.png": "test accuracy and error per epoch",
    "distance.png": "||w_t - w_0|| against log t",
    "accuracy_vs_std.png": "test accuracy against the EMA's std, the tracked stds marked",
    "reliability.png": "a reliability diagram per method, side by side (SWAG recipe)",
    "accuracy_vs_time.png": "test accuracy against training time, SWAP's phases marked (SWAP recipe)",
    "checkpoints": "--resume continues or reloads from them; delete the folder to free the space",
}


def outputs_lines(out_dir: Path, names: Sequence[str]) -> list[str]:
    """One line per output of the run with its size, checkpoints included (they are the bulk of it)."""
    lines = [f"Outputs written to {out_dir}/:"]
    for name in names:
        path = out_dir / name
        if not path.exists():
            continue
        size, count = tree_size(path)
        if path.is_dir():
            shown = f"{path}/ ({human_size(size)} in {count} files)"
        else:
            shown = f"{path} ({human_size(size)})"
        lines.append(f"  {shown}: {OUTPUT_NOTES.get(name, name)}")
    return lines


def write_metrics(results: Sequence[ArmResult], out_dir: Path, config: dict[str, Any],
                  summary: dict[str, Any]) -> None:
    """``metrics.csv`` (every epoch row) and ``results.json`` (everything)."""
    rows = [row for result in results for row in result.rows]
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out_dir / "metrics.csv", table.getvalue())
    payload = {
        "config": config,
        "summary": summary,
        "runs": [{"arm": r.arm, "seed": r.seed, "seconds": r.seconds, "finals": r.finals,
                  "averaging": r.averaging, "distances": r.distances} for r in results],
        "epochs": rows,
    }
    write_atomic(out_dir / "results.json", json.dumps(payload, indent=1, default=str))


def _mean_curve(results: Sequence[ArmResult], arm: str, key: str,
                x_key: str = "epoch") -> tuple[list[int], list[float], list[float]]:
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for result in results:
        if result.arm == arm:
            for row in result.rows:
                if key in row and row[key] is not None and row[key] != "":
                    by_epoch[int(row[x_key])].append(float(row[key]))
    epochs = sorted(by_epoch)
    stats = [mean_std(by_epoch[e]) for e in epochs]
    return epochs, [m for m, _ in stats], [s for _, s in stats]


def _pyplot(path: Path) -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping", path.name)
        return None
    return plt


X_AXES = {"epoch": "epoch", "steps": "weight updates"}


def plot_accuracy(results: Sequence[ArmResult], arm_labels: dict[str, str], path: Path, title: str,
                  x_key: str = "epoch") -> Path | None:
    """Test accuracy and test error (mean ± std band over seeds) for every arm and every average.

    ``x_key``: ``"epoch"``, or ``"steps"`` (weight updates: arms with different
    batch sizes then line up by the number of updates they made).
    """
    plt = _pyplot(path)
    if plt is None:
        return None
    fig, (ax_acc, ax_err) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [("test_acc", ""), ("swa_test_acc", " (SWA average)"), ("fge_test_acc", " (FGE ensemble)")]
    for arm, label in arm_labels.items():
        for key, suffix in series:
            epochs, mean, std = _mean_curve(results, arm, key, x_key)
            if not epochs:
                continue
            style = "-" if key == "test_acc" else "--"
            acc = [100 * m for m in mean]
            line, = ax_acc.plot(epochs, acc, style, marker="." if len(epochs) < 40 else None, label=label + suffix)
            ax_err.plot(epochs, [100 - a for a in acc], style, color=line.get_color(), label=label + suffix)
            if any(s > 0 for s in std):
                lo = [100 * (m - s) for m, s in zip(mean, std)]
                hi = [100 * (m + s) for m, s in zip(mean, std)]
                ax_acc.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.15)
                ax_err.fill_between(epochs, [100 - h for h in hi], [100 - lo_ for lo_ in lo],
                                    color=line.get_color(), alpha=0.15)
    ax_acc.set(xlabel=X_AXES[x_key], ylabel="test accuracy %", title=title)
    ax_err.set(xlabel=X_AXES[x_key], ylabel="test error %", title="test error (lower is better)")
    for ax in (ax_acc, ax_err):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    return _save_figure(plt, fig, path)


def _save_figure(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, image.getvalue())
    return path


def plot_distance(results: Sequence[ArmResult], arm_labels: dict[str, str], path: Path,
                  fits: dict[str, dict[str, float]]) -> Path | None:
    """``||w_t - w_0||`` against iterations on a log axis, per arm (first seed), with the fits of :func:`distance_fits`."""
    plt = _pyplot(path)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    first_seed = min(r.seed for r in results)
    for result in results:
        if result.seed != first_seed or not result.distances:
            continue
        steps = [s for s, _ in result.distances]
        totals = [d for _, d in result.distances]
        label = arm_labels.get(result.arm, result.arm)
        line, = ax.plot(steps, totals, label=label)
        fit = fits.get(result.arm)
        if fit is not None:
            ax.plot(steps, [fit["a"] + fit["b"] * math.log(t) for t in steps], ":", color=line.get_color(),
                    label=f"  fit {fit['a']:.2f} + {fit['b']:.2f} log t (R² {fit['r2']:.3f})")
    ax.set_xscale("log")
    ax.set(xlabel="iteration t (log scale)", ylabel="||w_t - w_0||",
           title=f"distance from initialization (seed {first_seed})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save_figure(plt, fig, path)


def distance_fits(results: Sequence[ArmResult]) -> dict[str, dict[str, float]]:
    """Per arm, the ``a + b log t`` fit of seed 0's distance curve (the paper's ultra-slow diffusion)."""
    from swa_fast.distance import fit_log

    fits = {}
    first_seed = min((r.seed for r in results), default=0)
    for result in results:
        if result.seed == first_seed and len(result.distances) >= 3:
            fit = fit_log([s for s, _ in result.distances], [d for _, d in result.distances])
            fits[result.arm] = {"a": fit.a, "b": fit.b, "r2": fit.r2, "final": result.distances[-1][1]}
    return fits

