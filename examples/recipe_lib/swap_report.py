"""The report of ``examples/swap.py`` (rank 0 writes it): the results table (test accuracy, wall time and weight
updates per arm, mean ± std over seeds), the workers-vs-average table (the paper's figure 1: each phase-2
worker's own test accuracy next to the SWAP average's), SWAP's phases (time and updates of each), the plot of
test accuracy against training time (``accuracy_vs_time.png``, first seed, SWAP's phases marked), and the
verdict: did SWAP reach SB's accuracy in less wall time than SB on this machine, and if not, why not.

Files, as every recipe's: ``results.md`` (with the plot linked), ``results.json`` (configuration, every
metric; the SWAP run's phases and workers under ``averaging``), ``metrics.csv`` (one row per seed, arm and
epoch: ``phase`` 1, 2 or 3 for SWAP, ``elapsed_seconds`` its training time so far, ``worker<r>_test_acc`` in
phase 2) and the plot.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from swa_fast.regime import sqrt_lr_scaling

from recipe_lib.cli import RunData, report_header
from recipe_lib.distributed import DistContext
from recipe_lib.engine import ArmResult
from recipe_lib.models import build_model, count_parameters
from recipe_lib.outputs import write_atomic
from recipe_lib.reporting import (
    _pyplot,
    _save_figure,
    final_rows,
    format_mean_std,
    mean_std,
    outputs_lines,
    write_metrics,
)
from recipe_lib.verdict import MeasuredSpread, verdict_lines

SB, LB, SWAP = "SB", "LB", "SWAP"
ROWS = (SB, LB, SWAP)  # the table's rows, the arms' order
PLOT = "accuracy_vs_time.png"
Rows = Mapping[str, Sequence[Mapping[str, Any]]]  # row label -> one final-metrics dict per seed


def _stats(per_seed: Sequence[Mapping[str, Any]], key: str) -> tuple[float, float]:
    """Mean and sample std over the seeds of one metric of a row (std 0 for one seed)."""
    return mean_std([row[key] for row in per_seed])


def _cell(per_seed: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0, digits: int = 2) -> str:
    """A table cell: the metric's mean ± std over the seeds."""
    return format_mean_std([row[key] for row in per_seed], scale=scale, digits=digits)


def _swap_runs(results: Sequence[ArmResult]) -> list[ArmResult]:
    return sorted((r for r in results if r.arm == "swap"), key=lambda r: r.seed)


def results_table(rows: Rows) -> str:
    """Per arm: test accuracy, wall time and weight updates (mean ± std over seeds), test loss, the per-seed values."""
    lines = ["| arm | test accuracy % | wall time s | weight updates | test loss | per seed: accuracy % / time s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, per_seed in rows.items():
        seeds = ", ".join(f"{100 * r['test_acc']:.2f} / {r['wall_seconds']:.1f}"
                          for r in sorted(per_seed, key=lambda r: r["seed"]))
        lines.append(f"| {label} | {_cell(per_seed, 'test_acc', scale=100.0)} "
                     f"| {_cell(per_seed, 'wall_seconds', digits=1)} | {_cell(per_seed, 'updates', digits=0)} "
                     f"| {_cell(per_seed, 'test_loss', digits=4)} | {seeds} |")
    return "\n".join(lines)


def workers_table(results: Sequence[ArmResult], world: int) -> str:
    """Per seed: each phase-2 worker's own test accuracy (its model and BN statistics at the end of phase 2),
    their mean, and the SWAP average's."""
    head = " | ".join(f"worker {r} %" for r in range(world))
    lines = [f"| seed | {head} | mean of workers % | SWAP average % |", "| --- |" + " --- |" * (world + 2)]
    for run in _swap_runs(results):
        accs = [100 * w["test_acc"] for w in run.averaging["workers"]]
        cells = " | ".join(f"{a:.2f}" for a in accs)
        lines.append(f"| {run.seed} | {cells} | {statistics.fmean(accs):.2f} | "
                     f"{100 * run.finals[SWAP]['test_acc']:.2f} |")
    return "\n".join(lines)


def phases_table(results: Sequence[ArmResult]) -> str:
    """Per seed: how phase 1 ended, the time and weight updates of each phase, and the identity check."""
    lines = ["| seed | phase 1 epochs | phase 1 ended by | phase 1 training accuracy % | phase 1 s / updates | "
             "phase 2 s / updates | phase 3 s | SWAP s / updates | ranks identical after the average |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in _swap_runs(results):
        a = run.averaging
        ended = "the threshold" if a["phase1_reached"] else "--phase1-max-epochs"
        lines.append(f"| {run.seed} | {a['phase1_epochs']} | {ended} | {100 * a['phase1_train_acc']:.2f} | "
                     f"{a['phase1_seconds']:.1f} / {a['phase1_updates']} | {a['phase2_seconds']:.1f} / "
                     f"{a['phase2_updates']} | {a['phase3_seconds']:.2f} | {a['wall_seconds']:.1f} / {a['updates']} | "
                     f"{'yes' if a['ranks_identical'] else 'NO'} |")
    return "\n".join(lines)


def plot_accuracy_vs_time(results: Sequence[ArmResult], labels: Mapping[str, str], seed: int, path: Path,
                          title: str) -> Path | None:
    """Test accuracy against training time (seed ``seed``), one line per arm; SWAP's phase 2 is the mean of the
    workers' own accuracies, its workers are crosses at the end of phase 2, the average a star, the phases'
    ends dotted lines."""
    plt = _pyplot(path)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    runs = {r.arm: r for r in results if r.seed == seed}
    for arm in ("sb", "lb"):
        rows = runs[arm].rows
        ax.plot([r["elapsed_seconds"] for r in rows], [100 * r["test_acc"] for r in rows], "o-", markersize=4,
                label=labels[arm])
    rows = runs["swap"].rows
    trained = [r for r in rows if r["phase"] in (1, 2)]
    line, = ax.plot([r["elapsed_seconds"] for r in trained], [100 * r["test_acc"] for r in trained], "o-",
                    markersize=4, label=labels["swap"] + "; phase 2: the mean of the workers' own models")
    color = line.get_color()
    end1 = max(r["elapsed_seconds"] for r in rows if r["phase"] == 1)
    end2 = max(r["elapsed_seconds"] for r in rows if r["phase"] == 2)
    average = rows[-1]
    workers = runs["swap"].averaging["workers"]
    ax.plot([end2] * len(workers), [100 * w["test_acc"] for w in workers], "x", color=color, markersize=7,
            label=f"SWAP's {len(workers)} workers at the end of phase 2")
    ax.plot([end2, average["elapsed_seconds"]], [100 * trained[-1]["test_acc"], 100 * average["test_acc"]], ":",
            color=color)
    ax.plot([average["elapsed_seconds"]], [100 * average["test_acc"]], "*", color=color, markersize=15,
            label="SWAP average (phase 3: weights averaged, BN recomputed)")
    for x, text in ((end1, "end of phase 1"), (average["elapsed_seconds"], "end of phase 3")):
        ax.axvline(x, linestyle=":", color="gray")
        ax.text(x, 0.98, f"{text} ", rotation=90, fontsize=7, color="gray", transform=ax.get_xaxis_transform(),
                ha="right", va="top")
    ax.set(xlabel="training time s (evaluation excluded)", ylabel="test accuracy %", title=f"{title} (seed {seed})")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save_figure(plt, fig, path)


# ------------------------------------------------------------------------------------ the verdict


def _why_slower(args: argparse.Namespace, results: Sequence[ArmResult], rows: Rows, ctx: DistContext,
                threads: int, cores: int) -> str:
    """Why SWAP took no less time than SB: its epochs against SB's, and the machine."""
    world = ctx.world_size
    sb_epoch = _stats(rows[SB], "wall_seconds")[0] / args.epochs
    lb_epoch = _stats(rows[LB], "wall_seconds")[0] / args.epochs
    runs = _swap_runs(results)
    phase2 = statistics.fmean(r.averaging["phase2_seconds"] for r in runs) / args.phase2_epochs
    phase1 = statistics.fmean(r.averaging["phase1_epochs"] for r in runs)
    text = (f"Why not faster: a phase-2 epoch (each worker over the whole training set at batch {args.small_batch}, "
            f"an SB epoch's work) took {phase2 / sb_epoch:.2f}x an SB epoch's time, "
            f"an LB epoch {lb_epoch / sb_epoch:.2f}x "
            f"(with {world} workers truly in parallel: about 1x and 1/{world}), and phase 1 ran {phase1:g} of LB's "
            f"{args.epochs} epochs.")
    if ctx.device.type == "cpu":
        text += (f" {world} workers on {cores} CPU cores ({threads} torch thread(s) each, sharing the cores with "
                 "whatever else runs) do not run in parallel faster than one: SWAP saves time when every worker has "
                 "a device (a GPU, or cores) of its own.")
    else:
        text += " SWAP saves time when every worker has a GPU of its own and the large batch keeps it busy."
    return text


def _answer(args: argparse.Namespace, rows: Rows) -> str:
    """The verdict's first sentence: did SWAP reach SB's accuracy in less wall time than SB?"""
    acc = {label: 100 * _stats(rows[label], "test_acc")[0] for label in (SB, SWAP)}
    time_ = {label: _stats(rows[label], "wall_seconds")[0] for label in (SB, SWAP)}
    reached, faster = acc[SWAP] >= acc[SB], time_[SWAP] < time_[SB]
    accuracy = f"{acc[SWAP]:.2f}% vs {acc[SB]:.2f}%"
    times = f"{time_[SWAP]:.1f} s vs {time_[SB]:.1f} s of training, {time_[SB] / max(time_[SWAP], 1e-9):.2f}x"
    if reached and faster:
        return f"Yes: SWAP reached SB's test accuracy ({accuracy}) in less wall time than SB on this machine ({times})."
    if faster:
        return (f"No: SWAP took less wall time than SB ({times}) but did not reach its test accuracy ({accuracy}, "
                f"{acc[SWAP] - acc[SB]:+.2f} points).")
    if reached:
        return (f"No: SWAP reached SB's test accuracy ({accuracy}) but not in less wall time on this machine "
                f"({times}).")
    return f"No: SWAP reached neither SB's test accuracy ({accuracy}) nor less wall time on this machine ({times})."


def _findings(args: argparse.Namespace, results: Sequence[ArmResult], rows: Rows, ctx: DistContext,
              threads: int, cores: int) -> list[str]:
    runs = _swap_runs(results)
    sentences = []
    if _stats(rows[SWAP], "wall_seconds")[0] >= _stats(rows[SB], "wall_seconds")[0]:
        sentences.append(_why_slower(args, results, rows, ctx, threads, cores))
    if _stats(rows[SWAP], "test_acc")[0] < _stats(rows[SB], "test_acc")[0]:
        ended = sum(r.averaging["phase1_reached"] for r in runs)
        sentences.append(f"Accuracy: phase 1 reached the threshold {args.swap_threshold:g} on {ended} of {len(runs)} "
                         f"seed(s) (else it ran --phase1-max-epochs {args.phase1_max_epochs}); a higher "
                         "--swap-threshold or more --phase2-epochs buy accuracy with time.")
    averages = [100 * r.finals[SWAP]["test_acc"] for r in runs]
    means = [statistics.fmean(100 * w["test_acc"] for w in r.averaging["workers"]) for r in runs]
    bests = [max(100 * w["test_acc"] for w in r.averaging["workers"]) for r in runs]
    above = sum(a > b for a, b in zip(averages, bests))
    gain = statistics.fmean(averages) - statistics.fmean(means)
    sentences.append(f"Workers vs average (the paper's figure 1): the SWAP average {statistics.fmean(averages):.2f}% "
                     f"vs {statistics.fmean(means):.2f}% for the workers' own models on average ({gain:+.2f} points); "
                     f"above every worker on {above} of {len(runs)} seed(s).")
    identical = [r.seed for r in runs if r.averaging["ranks_identical"]]
    verdict = ("yes on every seed" if len(identical) == len(runs) else
               f"NO on seed(s) {', '.join(str(r.seed) for r in runs if r.seed not in identical)}")
    sentences.append(f"After swap_average every rank held bitwise identical weights and BN statistics (one SHA-256 "
                     f"of the state dict per rank): {verdict}.")
    sentences.append("Wall time counts training only (evaluation excluded), on rank 0's clock from a barrier to a "
                     "barrier: the slowest worker's time. Weight updates are one worker's optimizer steps.")
    return sentences


def _verdict(args: argparse.Namespace, results: Sequence[ArmResult], rows: Rows, ctx: DistContext, threads: int,
             cores: int, measured: Mapping[str, MeasuredSpread], describe: Callable[[str], str]) -> list[str]:
    lines = verdict_lines(rows, SB, [SWAP], args.preset, args.dataset, measured, describe,
                          findings=_findings(args, results, rows, ctx, threads, cores))
    # The shared smoke sentence points at docs/RESULTS.md, which has no results of this recipe yet.
    lines = [line.replace(", whose results docs/RESULTS.md gives.", " (a few minutes a seed with 2 workers on 2 "
                          "cores).") for line in lines]
    return [lines[0], f"- {_answer(args, rows)}"] + lines[1:]


# ------------------------------------------------------------------------------------ the report


def _settings(args: argparse.Namespace, data: RunData, ctx: DistContext, threads: int) -> list[str]:
    world, n = ctx.world_size, len(data.train)
    b_s, b_l = args.small_batch, args.large_batch
    sb_steps, lb_steps = n // b_s, math.ceil(n / world) // (b_l // world)
    params = count_parameters(build_model(args.model, data.train.num_classes, data.in_channels, data.image_size))
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    return [f"- training: {args.model} ({params / 1e6:.2f}M parameters) on {n} images of {data.train.name}"
            + (" (augmented: random crop and flip)" if data.augment is not None else "")
            + f", tested on {len(data.test)}; SGD momentum {args.momentum:g}, weight decay {args.weight_decay:g}; "
              "every schedule per iteration: a linear warm-up (large batches only), then cosine to 0",
            f"- workers: {world} ranks on {ctx.device} ({backend}), {threads} torch thread(s) each",
            f"- SB: batch {b_s} on 1 worker (rank 0; the others wait), lr {args.lr:g}, {args.epochs} epochs of "
            f"{sb_steps} steps",
            f"- LB: batch {b_l} = {world} x {b_l // world} with DDP, lr {sqrt_lr_scaling(args.lr, b_l, b_s):.4g} (lr x "
            f"sqrt({b_l} / {b_s})) after {args.warmup_epochs:g} epoch(s) of linear warm-up, {args.epochs} epochs of "
            f"{lb_steps} steps",
            f"- SWAP: phase 1 = the LB run, stopped after the first epoch whose training accuracy (every worker's "
            f"batches of that epoch, AccuracyThreshold) reaches {args.swap_threshold:g}, at most "
            f"{args.phase1_max_epochs} epochs; phase 2 = every worker on its own from that model (leave_ddp), batch "
            f"{b_s} over all {n} training images in its own order (worker_generator), lr {args.phase2_lr:g} cosine "
            f"to 0 over {args.phase2_epochs} epoch(s) of {sb_steps} steps; phase 3 = swap_average: the workers' "
            f"weights averaged, BN statistics recomputed over every worker's shard in batches of {b_s}"]


def write_report(args: argparse.Namespace, title: str, measured: Mapping[str, MeasuredSpread],
                 results: list[ArmResult], data: RunData, ctx: DistContext, threads: int, cores: int,
                 wall: float) -> None:
    """results.md/json, metrics.csv and the plot; the tables, the outputs and, last, the verdict printed."""
    out: Path = args.out
    world = ctx.world_size
    rows = final_rows(results, ROWS)
    names = {SB: f"SB (batch {args.small_batch}, 1 worker)",
             LB: f"LB (batch {args.large_batch}, {world} workers)", SWAP: f"SWAP ({world} workers)"}
    head, command, machine = report_header(title, args, ctx, wall)
    table, workers, phases = results_table(rows), workers_table(results, world), phases_table(results)
    lines = head[:-1] + _settings(args, data, ctx, threads) + [
        "", table, "",
        "Workers vs average: each phase-2 worker's own model (its own BN statistics) on the test set at the end of "
        "phase 2, then the SWAP average (test accuracy %):", "", workers, "",
        "SWAP's phases (training time on rank 0, weight updates of one worker):", "", phases]
    labels = {"sb": names[SB], "lb": names[LB], "swap": names[SWAP]}
    plot = plot_accuracy_vs_time(results, labels, args.seeds[0], out / PLOT, title)
    verdict = _verdict(args, results, rows, ctx, threads, cores, measured, lambda label: names.get(label, label))
    images = [f"![{plot.stem}]({plot.name})"] if plot is not None else []
    write_atomic(out / "results.md", "\n".join(lines + [""] + verdict + [""] + images) + "\n")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    metrics = {label: {key: dict(zip(("mean", "std"), _stats(per_seed, key)))
                       for key in ("test_acc", "test_loss", "wall_seconds", "updates")}
               for label, per_seed in rows.items()}
    summary = {"wall_seconds": wall, "machine": machine, "command": command, "processes": world,
               "threads_per_rank": threads, "cores": cores, "table": table, "workers_table": workers,
               "phases_table": phases,
               "metrics": metrics, "ranks_identical": all(r.averaging["ranks_identical"] for r in _swap_runs(results)),
               "verdict": verdict[1:]}
    write_metrics(results, out, config, summary)
    written = ["results.md", "results.json", "metrics.csv"] + ([PLOT] if plot is not None else [])
    print("\n" + "\n".join(lines + [""] + outputs_lines(out, written) + [""] + verdict), flush=True)


__all__ = ["LB", "PLOT", "ROWS", "SB", "SWAP", "phases_table", "plot_accuracy_vs_time", "results_table",
           "workers_table", "write_report"]
