"""Post-hoc EMA on the recipes' shared pieces: the training loop, the snapshots, the sweep and the report of
``examples/posthoc_ema.py``.

Per seed, one model trains while :class:`swa_fast.posthoc.PowerFunctionEMA` tracks its power-function EMA
profiles: ``ema.update(model, step)`` after every optimizer step (steps counted from 1, through
``train_epoch``'s ``after_step``), and ``ema.snapshot`` every ``--snapshot-every`` steps and at the last step,
into ``checkpoints/seed<N>/ema-<step>.pt``. After training, each std of the sweep is reconstructed from
those snapshots at the last snapshot's step (:func:`swa_fast.posthoc.reconstruct`), loaded into a fresh copy
of the model and tested, next to the final model itself and the tracked profiles. A std the snapshots
cannot represent (profile fit error over 5%, :func:`swa_fast.posthoc.plan`) is reported as not
reconstructible, with its fit error, and not tested.

Why not the arm engine (:func:`recipe_lib.engine.run_all`): its arms average once per epoch into an SWA
average and checkpoint per epoch; here the average is updated after every step and the run's product is
a series of snapshot files plus an evaluation of many averages made from them after training. What the
engine shares is used as it is: the data (:func:`recipe_lib.cli.load_run_data`), models, ``BatchLoader``,
``train_epoch``/``evaluate``, the per-epoch seeding (``epoch_seed``: a resumed run continues bitwise), the
checkpoint files, ``--out`` handling, ``--stop-after``/``--resume``, the metrics files and the verdict.

Checkpoints: ``checkpoints/seed<N>/train.pt`` after every epoch (model, optimizer, the EMA's state, the
snapshot files so far and the metric rows); ``--resume`` continues from it (snapshots an interrupted epoch
wrote after it are removed and written again) and reloads the results of a seed that had finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from swa_fast.posthoc import PostHocError, PowerFunctionEMA, plan, read_snapshot, reconstruct, sound_std_range
from swa_fast.posthoc.cli import sweep_stds
from swa_fast.posthoc.reconstruct import MAX_ERROR
from swa_fast.swa_utils import update_bn

from recipe_lib.checkpoint import (
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    save_atomic,
)
from recipe_lib.cli import RunData, check_distinct, load_run_data, report_header, start_one_process
from recipe_lib.distributed import DistContext
from recipe_lib.engine import ArmResult, StopRequested, checkpoint_path, epoch_seed, progress_bar
from recipe_lib.loader import BatchLoader
from recipe_lib.models import build_model
from recipe_lib.outputs import write_atomic
from recipe_lib.reporting import (
    _pyplot,
    _save_figure,
    final_rows,
    format_mean_std,
    human_size,
    outputs_lines,
    write_metrics,
)
from recipe_lib.training import EpochStats, EvalSet, Precision, evaluate, train_epoch
from recipe_lib.verdict import MeasuredSpread, verdict_lines

NAME = "posthoc_ema"
#: ``--snapshot-every 0`` takes a snapshot every ``total steps / TARGET_SNAPSHOTS`` steps.
TARGET_SNAPSHOTS = 20
#: The most stds a sweep may have (each costs a reconstruction and a test pass per seed).
MAX_SWEEP = 100
CHECKPOINT_VERSION = 1
FINAL = "final model"
PLOT = "accuracy_vs_std.png"


def std_text(std: float) -> str:
    """A std as the report writes it: ``0.05``, ``0.1``, ``0.07``."""
    return f"{std:.4g}"


def tracked_label(std: float) -> str:
    return f"tracked {std_text(std)}"


def reconstructed_label(std: float) -> str:
    return f"reconstructed {std_text(std)}"


# ------------------------------------------------------------------------------------ options


def parse_sweep(text: str) -> list[float]:
    """``LOW:HIGH:COUNT`` as COUNT stds evenly spaced from LOW to HIGH (``python -m swa_fast posthoc-ema``'s
    ``--sweep``), at most :data:`MAX_SWEEP` of them and no two the same in the report; ``ArgumentTypeError``
    otherwise."""
    stds = sweep_stds(text)
    if len(stds) > MAX_SWEEP:
        raise argparse.ArgumentTypeError(f"COUNT must be at most {MAX_SWEEP} (each std is reconstructed and tested "
                                         f"for every seed), got {text!r}")
    shown = [std_text(std) for std in stds]
    if len(set(shown)) < len(shown):
        raise argparse.ArgumentTypeError(f"its stds are closer than the report's 4 significant digits, got {text!r}")
    return stds


def sweep_option(text: str) -> str:
    """The argparse ``type`` of ``--sweep``: the text, checked (kept as given for the report and --resume)."""
    parse_sweep(text)
    return text


def check_sweep(text: str) -> list[float]:
    """``--sweep``'s value (a preset's too) checked, as a refusal naming the option."""
    try:
        return parse_sweep(text)
    except argparse.ArgumentTypeError as error:
        raise SystemExit(f"argument --sweep: {error}") from None


def check_stds(stds: Sequence[float]) -> None:
    """Two or more tracked profiles (reconstruction combines them), each std once."""
    if len(stds) < 2:
        raise SystemExit(f"--stds {' '.join(map(std_text, stds))}: give two or more stds: the reconstruction "
                         "combines the tracked profiles, and one profile can only reproduce itself")
    check_distinct("--stds", stds, shown=std_text)


@dataclass(frozen=True)
class Schedule:
    """The steps of a run and when it writes its snapshots."""

    steps_per_epoch: int
    total: int
    every: int

    @property
    def snapshot_steps(self) -> list[int]:
        """Every ``every``-th step, and the last step (the reconstructions' target) in any case."""
        steps = list(range(self.every, self.total + 1, self.every))
        return steps if steps and steps[-1] == self.total else steps + [self.total]


def check_schedule(args: argparse.Namespace, train_size: int) -> Schedule:
    """The run's steps on ``train_size`` training samples; refused where there is no full batch or where
    ``--snapshot-every`` leaves fewer than two snapshots."""
    steps_per_epoch = train_size // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is more than the {train_size} training samples: there is "
                         "no full batch to train on")
    total = args.epochs * steps_per_epoch
    schedule = Schedule(steps_per_epoch, total, args.snapshot_every or max(1, round(total / TARGET_SNAPSHOTS)))
    count = len(schedule.snapshot_steps)
    if count < 2:
        raise SystemExit(f"--snapshot-every {schedule.every} leaves {count} snapshot in the run's {total} steps "
                         f"({args.epochs} epoch(s) of {steps_per_epoch}): the reconstruction needs at least 2 "
                         f"(--snapshot-every 0 takes about {TARGET_SNAPSHOTS})")
    return schedule


# ------------------------------------------------------------------------------------ one seed


class _SeedRun:
    """One seed: the model, its optimizer, the EMA and its snapshots, and their checkpoint."""

    def __init__(self, seed: int, args: argparse.Namespace, data: RunData, ctx: DistContext, schedule: Schedule,
                 log: Callable[[str], None]) -> None:
        self.seed, self.args, self.data, self.ctx, self.schedule, self.log = seed, args, data, ctx, schedule, log
        self.precision = Precision(args.amp, args.channels_last)
        torch.manual_seed(seed)
        self.model = self._new_model()
        self.scratch = self._new_model()  # each EMA tested is loaded into this copy: the model keeps training
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.scaler = self.precision.make_scaler(ctx.device)  # --amp fp16 only
        self.ema = PowerFunctionEMA(self.model, stds=args.stds)
        self.loader = BatchLoader(data.train, args.batch_size, shuffle=True, drop_last=True, device=ctx.device,
                                  augment=data.augment, seed=seed, mean=data.mean, std=data.std)
        self.test = EvalSet(data.test, args.eval_batch_size, ctx, data.mean, data.std)
        self.path = checkpoint_path(args.out, seed, "train")
        self.folder = self.path.parent
        self.epoch = self.step = 0
        self.rows: list[dict[str, Any]] = []
        self.snapshots: list[str] = []  # the snapshot files written, in step order (names in self.folder)
        self.timing = {"train_seconds": 0.0, "ema_seconds": 0.0, "snapshot_seconds": 0.0}

    def _new_model(self) -> nn.Module:
        data = self.data
        model = build_model(self.args.model, data.train.num_classes, data.in_channels, data.image_size)
        model = model.to(self.ctx.device)
        return model.to(memory_format=torch.channels_last) if self.args.channels_last else model

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self, result: ArmResult | None = None) -> None:
        save_atomic({"version": CHECKPOINT_VERSION, "seed": self.seed, "epoch": self.epoch, "step": self.step,
                     "model": model_state(self.model, self.ctx),
                     "optimizer": optimizer_state(self.model, self.optimizer, self.ctx),
                     "scaler": None if self.scaler is None else self.scaler.state_dict(),
                     "ema": self.ema.state_dict(), "rows": self.rows, "snapshots": self.snapshots,
                     "timing": self.timing, "result": None if result is None else dataclasses.asdict(result)},
                    self.path)

    def restore(self) -> ArmResult | None:
        """Continue from the checkpoint (None), or the finished seed's result."""
        saved = load_checkpoint(self.path)
        if saved.get("version") != CHECKPOINT_VERSION:
            raise SystemExit(f"{self.path}: checkpoint version {saved.get('version')} is not {CHECKPOINT_VERSION}: "
                             "--restart starts afresh")
        if saved["result"] is not None:
            return ArmResult(**saved["result"])
        load_model_state(self.model, saved["model"], self.ctx)
        load_optimizer_state(self.model, self.optimizer, saved["optimizer"], self.ctx)
        if self.scaler is not None and saved["scaler"] is not None:
            self.scaler.load_state_dict(saved["scaler"])
        self.ema.load_state_dict(saved["ema"])
        self.epoch, self.step, self.rows = saved["epoch"], saved["step"], saved["rows"]
        self.snapshots, self.timing = saved["snapshots"], saved["timing"]
        for path in self.folder.glob("ema-*.pt"):  # written after the checkpoint: that epoch is trained again
            if path.name not in self.snapshots:
                path.unlink()
        self.log(f"seed {self.seed}: resuming after epoch {self.epoch} (step {self.step}, "
                 f"{len(self.snapshots)} snapshots)")
        return None

    # -- training ----------------------------------------------------------------------------------

    def evaluate_state(self, state: Mapping[str, torch.Tensor], bn: bool = False) -> EpochStats:
        """Test a state dict (an EMA) in the scratch copy of the model; ``bn``: recompute its BN statistics
        with one pass over the training batches first (``update_bn``)."""
        self.scratch.load_state_dict(state)
        if bn:
            torch.manual_seed(epoch_seed(self.seed, self.args.epochs + 1, 0))
            self.loader.set_epoch(self.args.epochs)
            update_bn(self.loader, self.scratch, device=self.ctx.device)
        return evaluate(self.scratch, self.test, self.precision, self.ctx)

    def _after_step(self, snapshot_at: set[int]) -> None:
        self.step += 1
        started = time.perf_counter()
        self.ema.update(self.model, self.step)
        self.timing["ema_seconds"] += time.perf_counter() - started
        if self.step in snapshot_at:
            started = time.perf_counter()
            name = f"ema-{self.step:07d}.pt"
            self.ema.snapshot(self.folder / name)
            self.snapshots.append(name)
            self.timing["snapshot_seconds"] += time.perf_counter() - started

    def train(self, epochs_run: list[int]) -> None:
        args, ctx = self.args, self.ctx
        snapshot_at = set(self.schedule.snapshot_steps)
        while self.epoch < args.epochs:
            if args.stop_after is not None and epochs_run[0] >= args.stop_after:
                raise StopRequested(f"stopped after {epochs_run[0]} epochs (--stop-after); continue with --resume")
            epoch = self.epoch + 1
            torch.manual_seed(epoch_seed(self.seed, epoch, 0))
            self.loader.set_epoch(epoch - 1)
            started = time.perf_counter()
            bar = progress_bar(not args.no_progress, f"seed {self.seed} {epoch}/{args.epochs}", len(self.loader))
            stats = train_epoch(self.model, self.loader, self.optimizer, ctx, self.precision, scaler=self.scaler,
                                after_step=lambda: self._after_step(snapshot_at), progress=bar)
            self.timing["train_seconds"] += time.perf_counter() - started
            tested = evaluate(self.model, self.test, self.precision, ctx)
            row: dict[str, Any] = {"seed": self.seed, "arm": NAME, "epoch": epoch, "steps": self.step,
                                   "lr": self.optimizer.param_groups[0]["lr"], "train_loss": stats.loss,
                                   "train_acc": stats.accuracy, "test_loss": tested.loss, "test_acc": tested.accuracy}
            for std, profile in self.ema.profiles.items():
                row[f"ema_{std_text(std)}_test_acc"] = self.evaluate_state(profile.module_state_dict()).accuracy
            row["epoch_seconds"] = stats.seconds
            self.rows.append(row)
            self.epoch = epoch
            emas = ", ".join(f"{std_text(std)} {row[f'ema_{std_text(std)}_test_acc']:.4f}" for std in self.ema.stds)
            self.log(f"seed {self.seed} epoch {epoch}/{args.epochs} | step {self.step} | train loss {stats.loss:.3f} "
                     f"acc {stats.accuracy:.4f} | test acc {tested.accuracy:.4f} | EMA test acc {emas} | "
                     f"{len(self.snapshots)} snapshots | {stats.seconds:.1f}s")
            self.save()
            epochs_run[0] += 1

    # -- after training ----------------------------------------------------------------------------

    def sweep(self) -> ArmResult:
        """The final model, the tracked profiles and every std of the sweep reconstructed from the snapshots,
        each tested; the seed's checkpoint then records the result."""
        args = self.args
        started = time.perf_counter()
        finals: dict[str, dict[str, Any]] = {}

        def record(label: str, std: float | None, source: str, fit_error: float | None, stats: EpochStats) -> None:
            finals[label] = {"test_acc": stats.accuracy, "test_loss": stats.loss, "epoch": self.epoch, "std": std,
                             "source": source, "fit_error": fit_error}

        record(FINAL, None, "final model", None, evaluate(self.model, self.test, self.precision, self.ctx))
        for std, profile in self.ema.profiles.items():
            record(tracked_label(std), std, "tracked", None, self.evaluate_state(profile.module_state_dict(),
                                                                                  args.update_bn))
        paths = [self.folder / name for name in self.snapshots]
        snapshots = [read_snapshot(path) for path in paths]
        low, high = sound_std_range(snapshots)
        refused: dict[str, dict[str, Any]] = {}
        for std in check_sweep(args.sweep):
            try:
                fit_error = plan(snapshots, std, max_error=math.inf).error
                if fit_error > MAX_ERROR:
                    refused[std_text(std)] = {"std": std, "fit_error": fit_error,
                                              "reason": f"profile fit error {100 * fit_error:.1f}% > "
                                                        f"{100 * MAX_ERROR:g}%"}
                    continue
                state = reconstruct(paths, std)
            except PostHocError as error:
                refused[std_text(std)] = {"std": std, "fit_error": None, "reason": str(error)}
                continue
            record(reconstructed_label(std), std, "reconstructed", fit_error, self.evaluate_state(state, args.update_bn))
        sweep_seconds = time.perf_counter() - started
        snapshot_bytes = sum(path.stat().st_size for path in paths)
        info = {"ema_updates": self.step, "ema_seconds": self.timing["ema_seconds"],
                "snapshots": len(paths), "snapshot_bytes": snapshot_bytes,
                "snapshot_seconds": self.timing["snapshot_seconds"], "snapshot_steps": [s.step for s in snapshots],
                "sound_range": [low, high], "not_reconstructible": refused, "sweep_seconds": sweep_seconds}
        result = ArmResult(NAME, self.seed, self.rows, finals, info, [], self.timing["train_seconds"] + sweep_seconds)
        self.save(result)
        return result

    def run(self, epochs_run: list[int]) -> ArmResult:
        if self.args.resume and self.path.exists():
            finished = self.restore()
            if finished is not None:
                return finished
        self.train(epochs_run)
        return self.sweep()


# ------------------------------------------------------------------------------------ the run


def run_posthoc(args: argparse.Namespace, title: str, measured: Mapping[str, MeasuredSpread]) -> list[ArmResult] | None:
    """Train every seed, reconstruct and test the sweep, write the report; the results (None when stopped by
    ``--stop-after``). Every option is checked before the data loads (the recipe's own checks first)."""
    check_distinct("--seeds", args.seeds)
    ctx, log = start_one_process(args, NAME, "one model, its EMA and one series of snapshot files per seed")

    started = time.perf_counter()
    data = load_run_data(args, ctx, log, check=lambda train: check_schedule(args, len(train)))
    schedule = check_schedule(args, len(data.train))
    log(f"{NAME}: {len(data.train)} train / {len(data.test)} test samples of {data.train.name}, model {args.model}, "
        f"{schedule.total} steps ({args.epochs} epochs of {schedule.steps_per_epoch}), EMA stds "
        f"{' '.join(map(std_text, args.stds))}, a snapshot every {schedule.every} steps "
        f"({len(schedule.snapshot_steps)} per seed), {len(args.seeds)} seed(s) on {ctx.device}")
    epochs_run = [0]
    results = []
    try:
        for seed in args.seeds:
            results.append(_SeedRun(seed, args, data, ctx, schedule, log).run(epochs_run))
    except StopRequested as stop:
        log(str(stop))
        return None
    _report(args, title, measured, results, data, ctx, schedule, time.perf_counter() - started)
    return results


# ------------------------------------------------------------------------------------ the report


def _mean(per_seed: Sequence[Mapping[str, Any]]) -> float:
    return statistics.fmean(row["test_acc"] for row in per_seed)


def _accuracy(per_seed: Sequence[Mapping[str, Any]]) -> str:
    return format_mean_std([row["test_acc"] for row in per_seed]) + "%"


@dataclass
class _Outcome:
    """The rows of a run by label (per-seed finals), and what the report and the verdict say about them."""

    rows: dict[str, list[dict[str, Any]]]
    tracked: list[str]
    reconstructed: list[str]
    refused: dict[str, dict[str, Any]]
    sound_range: tuple[float, float]

    @property
    def best_tracked(self) -> str:
        return max(self.tracked, key=lambda label: _mean(self.rows[label]))

    @property
    def best_reconstructed(self) -> str | None:
        return max(self.reconstructed, key=lambda label: _mean(self.rows[label])) if self.reconstructed else None


def _outcome(args: argparse.Namespace, results: Sequence[ArmResult]) -> _Outcome:
    sweep = check_sweep(args.sweep)
    tracked = [tracked_label(std) for std in args.stds]
    order = [FINAL] + tracked + [reconstructed_label(std) for std in sweep]
    rows = final_rows(results, order)
    first = results[0].averaging
    return _Outcome(rows, tracked, [label for label in order[1 + len(tracked):] if label in rows],
                    first["not_reconstructible"], tuple(first["sound_range"]))


def sweep_table(args: argparse.Namespace, outcome: _Outcome) -> str:
    """std, source, test accuracy (mean ± std over seeds), the difference from the best tracked profile, the
    profile fit error of the reconstruction and the per-seed accuracies; every swept std has its row."""
    base_label = outcome.best_tracked
    base = _mean(outcome.rows[base_label])
    lines = [f"| std | source | test accuracy % | vs {base_label} | profile fit error | per seed |",
             "| --- | --- | --- | --- | --- | --- |"]

    def row(std: str, source: str, label: str, fit: str) -> str:
        per_seed = outcome.rows[label]
        accs = [r["test_acc"] for r in per_seed]
        seeds = ", ".join(f"{100 * r['test_acc']:.2f}" for r in sorted(per_seed, key=lambda r: r["seed"]))
        return (f"| {std} | {source} | {format_mean_std(accs)} | {100 * (statistics.fmean(accs) - base):+.2f} "
                f"| {fit} | {seeds} |")

    lines.append(row("-", "final model (raw weights)", FINAL, "-"))
    for std in args.stds:
        lines.append(row(std_text(std), "tracked", tracked_label(std), "exact (tracked)"))
    for std in check_sweep(args.sweep):
        label = reconstructed_label(std)
        if label in outcome.rows:
            fit = outcome.rows[label][0]["fit_error"]
            lines.append(row(std_text(std), "reconstructed", label, f"{100 * fit:.2f}%"))
        else:
            refused = outcome.refused[std_text(std)]
            fit = "-" if refused["fit_error"] is None else f"{100 * refused['fit_error']:.1f}% (over {100 * MAX_ERROR:g}%)"
            lines.append(f"| {std_text(std)} | not reconstructible | - | - | {fit} | - |")
    return "\n".join(lines)


def plot_accuracy_vs_std(outcome: _Outcome, path: Path, title: str) -> Path | None:
    """Test accuracy against the EMA's std: the reconstructed sweep (mean ± std band over seeds), the tracked
    profiles (stars and dotted lines), the final model (dashed), the stds outside the sound range shaded."""
    plt = _pyplot(path)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    stds = [outcome.rows[label][0]["std"] for label in outcome.reconstructed]
    seen = stds + [outcome.rows[label][0]["std"] for label in outcome.tracked] + \
        [entry["std"] for entry in outcome.refused.values()]
    if outcome.reconstructed:
        accs = [[100 * r["test_acc"] for r in outcome.rows[label]] for label in outcome.reconstructed]
        means = [statistics.fmean(a) for a in accs]
        ax.plot(stds, means, "o-", color="tab:blue", label="reconstructed from the snapshots")
        if any(len(a) > 1 for a in accs):
            spread = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
            ax.fill_between(stds, [m - s for m, s in zip(means, spread)], [m + s for m, s in zip(means, spread)],
                            color="tab:blue", alpha=0.15)
    for label, color in zip(outcome.tracked, ("tab:red", "tab:green", "tab:purple", "tab:brown", "tab:pink")):
        std = outcome.rows[label][0]["std"]
        ax.axvline(std, linestyle=":", color=color)
        ax.plot([std], [100 * _mean(outcome.rows[label])], "*", markersize=15, color=color,
                label=f"tracked {std_text(std)} (tested directly)")
    ax.axhline(100 * _mean(outcome.rows[FINAL]), linestyle="--", color="gray", label="final model (raw weights)")
    low, high = outcome.sound_range
    left, right = min(seen), max(seen)
    margin = 0.03 * (right - left or 1.0)
    ax.set_xlim(left - margin, right + margin)
    shaded = False
    for start, end in ((left - margin, low), (high, right + margin)):
        if start < end:
            ax.axvspan(start, end, color="gray", alpha=0.15, label=None if shaded else "outside the sound range")
            shaded = True
    if outcome.refused:  # on the x axis: they have no accuracy
        ax.plot([entry["std"] for entry in outcome.refused.values()], [0.03] * len(outcome.refused), "x",
                color="black", transform=ax.get_xaxis_transform(), label="swept, not reconstructible")
    ax.set(xlabel="EMA relative std (sigma_rel)", ylabel="test accuracy % (mean over seeds)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(plt, fig, path)


def _findings(outcome: _Outcome, swept: int) -> list[str]:
    """The recipe's sentences for the verdict: whether the best reconstructed std beat every tracked one,
    how it was picked, and what could not be reconstructed."""
    sentences = []
    best = outcome.best_reconstructed
    if best is not None:
        best_rows = outcome.rows[best]
        tracked = [(label, outcome.rows[label]) for label in outcome.tracked]
        beats = all(_mean(best_rows) > _mean(rows) for _, rows in tracked)
        both = "both tracked profiles" if len(tracked) == 2 else f"all {len(tracked)} tracked profiles"
        against = " and ".join(f"{_accuracy(rows)} for {label}" for label, rows in tracked)
        sentence = (f"The best reconstructed std, {best.split(' ', 1)[1]}, {'beats' if beats else 'does not beat'} "
                    f"{both}: {_accuracy(best_rows)} vs {against}")
        seeds = len(best_rows)
        if seeds > 1:
            tracked_by_seed = [{r["seed"]: r["test_acc"] for r in rows} for _, rows in tracked]
            ahead = sum(all(r["test_acc"] > t.get(r["seed"], math.inf) for t in tracked_by_seed) for r in best_rows)
            sentence += f"; ahead of {'both' if len(tracked) == 2 else 'all'} on {ahead} of {seeds} seeds"
        sentences.append(sentence + ".")
        if len(outcome.reconstructed) > 1:
            sentences.append(f"That std was picked by its accuracy on this test set among the "
                             f"{len(outcome.reconstructed)} reconstructed, so its lead is an optimistic estimate: "
                             "confirm the choice on held-out data before adopting it.")
    if outcome.refused:
        low, high = outcome.sound_range
        listed = ", ".join(outcome.refused)
        sentences.append(f"{len(outcome.refused)} of the {swept} swept stds could not be reconstructed from these "
                         f"snapshots ({listed}): they lie outside the sound range {low:.3g} to {high:.3g} (profile "
                         f"fit error over {100 * MAX_ERROR:g}%), so they are reported, not tested; a smaller "
                         "--snapshot-every widens the range.")
    return sentences


def _verdict(args: argparse.Namespace, outcome: _Outcome, measured: Mapping[str, MeasuredSpread],
             swept: int) -> list[str]:
    best, best_tracked = outcome.best_reconstructed, outcome.best_tracked
    if best is not None:
        baseline, headline = best_tracked, best
    else:  # nothing reconstructible: the tracked profiles against the final model
        baseline, headline = FINAL, best_tracked
    others = [label for label in outcome.tracked + [FINAL] if label not in (baseline, headline)]
    rows = {label: outcome.rows[label] for label in [baseline, headline] + others}

    def describe(label: str) -> str:
        if label == FINAL:
            text = "the final model (raw weights)"
        elif label in outcome.tracked:
            text = f"the tracked EMA of std {label.split(' ', 1)[1]}"
        else:
            best_of = f" (the best of {len(outcome.reconstructed)} reconstructed stds)" \
                if len(outcome.reconstructed) > 1 else ""
            text = f"the EMA of std {label.split(' ', 1)[1]} reconstructed from the snapshots{best_of}"
        return text[:1].upper() + text[1:] if label == headline else text  # the verdict's first word

    return verdict_lines(rows, baseline, [headline], args.preset, args.dataset, measured, describe,
                         findings=_findings(outcome, swept))


def _settings(args: argparse.Namespace, data: RunData, schedule: Schedule, outcome: _Outcome,
              results: Sequence[ArmResult]) -> list[str]:
    info = results[0].averaging
    low, high = outcome.sound_range
    snapshot_size = human_size(info["snapshot_bytes"] // max(1, info["snapshots"]))
    bn = ("then recomputed with update_bn (one pass over the training batches) for every EMA tested"
          if args.update_bn else "no update_bn")
    return [f"- training: {args.model}, Adam at a constant lr {args.lr:g}, batch {args.batch_size}, {args.epochs} "
            f"epochs of {schedule.steps_per_epoch} steps = {schedule.total} steps on {len(data.train)} images; tested "
            f"on {len(data.test)}",
            f"- EMA: PowerFunctionEMA tracking stds {' '.join(map(std_text, args.stds))}, updated after every step; "
            f"a snapshot every {schedule.every} steps and at the last: {info['snapshots']} per seed, {snapshot_size} "
            f"each, in checkpoints/seed<N>/ema-*.pt",
            f"- sweep: {args.sweep} ({len(check_sweep(args.sweep))} stds), reconstructed at the last snapshot (step "
            f"{schedule.total}); the sound range of these snapshots (profile fit error <= {100 * MAX_ERROR:g}%) is "
            f"{low:.3g} to {high:.3g}",
            f"- BN statistics: averaged with the weights by the EMA (use_buffers=True); {bn}"]


def _costs(ctx: DistContext, results: Sequence[ArmResult], stds: int) -> str:
    updates = sum(r.averaging["ema_updates"] for r in results)
    ema_ms = 1e3 * sum(r.averaging["ema_seconds"] for r in results) / max(1, updates)
    snapshots = sum(r.averaging["snapshots"] for r in results)
    snapshot_ms = 1e3 * sum(r.averaging["snapshot_seconds"] for r in results) / max(1, snapshots)
    sweep = statistics.fmean(r.averaging["sweep_seconds"] for r in results)
    host = " (host time: on a GPU the update runs asynchronously)" if ctx.device.type == "cuda" else ""
    return (f"Costs: PowerFunctionEMA.update (every profile in one fused pass) {ema_ms:.3f} ms per step{host}; "
            f"{snapshot_ms:.0f} ms per snapshot written; reconstructing and testing the sweep, the tracked profiles "
            f"and the final model ({stds} tests) {sweep:.1f} s per seed.")


def _report(args: argparse.Namespace, title: str, measured: Mapping[str, MeasuredSpread], results: list[ArmResult],
            data: RunData, ctx: DistContext, schedule: Schedule, wall: float) -> None:
    """results.md/json, metrics.csv and the plot; the tables, the outputs and, last, the verdict printed."""
    out: Path = args.out
    outcome = _outcome(args, results)
    swept = len(check_sweep(args.sweep))
    head, command, machine = report_header(title, args, ctx, wall)
    table = sweep_table(args, outcome)
    later = (f"Any std of the sound range can be made from the snapshots later: `python -m swa_fast posthoc-ema "
             f"{out}/checkpoints/seed0/ema-*.pt --std 0.07 -o ema-0.07.pt`.")
    lines = head[:-1] + _settings(args, data, schedule, outcome, results) + [
        "", table, "", _costs(ctx, results, len(outcome.rows)), "", later]
    plot = plot_accuracy_vs_std(outcome, out / PLOT, title)
    verdict = _verdict(args, outcome, measured, swept)
    images = [f"![{plot.stem}]({plot.name})"] if plot is not None else []
    write_atomic(out / "results.md", "\n".join(lines + [""] + verdict + [""] + images) + "\n")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    best = outcome.best_reconstructed
    summary = {"wall_seconds": wall, "machine": machine, "command": command, "processes": 1, "table": table,
               "steps": schedule.total, "snapshot_every": schedule.every, "sound_range": list(outcome.sound_range),
               "not_reconstructible": sorted(outcome.refused), "best_tracked": outcome.best_tracked,
               "best_reconstructed": best,
               "beats_every_tracked": best is not None and all(_mean(outcome.rows[best]) > _mean(outcome.rows[label])
                                                               for label in outcome.tracked),
               "verdict": verdict[1:]}
    write_metrics(results, out, config, summary)
    written = ["results.md", "results.json", "metrics.csv"] + ([PLOT] if plot is not None else []) + ["checkpoints"]
    print("\n" + "\n".join(lines + [""] + outputs_lines(out, written) + [""] + verdict), flush=True)
