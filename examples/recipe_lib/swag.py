"""SWAG on the recipes' shared pieces: the training runs, the Bayesian model averages and the report of
``examples/swag.py``.

Per seed ``s`` the recipe trains, for the same budget of ``--epochs`` B epochs (SGD, momentum, weight decay,
the schedule stepped every iteration):

* ``sgd``: the SGD baseline, exactly as ``examples/swa_paper.py`` defines it: the SWA paper's schedule over
  the whole budget (lr flat to 50%, linear down to 1% of it by 90%, flat after); its final weights, tested
  as they are, are the **SGD** row;
* ``swag``: the SWA schedule over ``--swa-start`` epochs (the same shape, decaying to ``--swa-lr``), then
  constant ``--swa-lr``; after every epoch past ``--swa-start``, ``SWAG.collect`` (mean, centred variance
  and a deviation column: ``B - swa_start`` collections, ``--max-rank`` columns kept);
* ``swag-seed<S>``: ``--multiswag-runs`` - 1 more SWAG runs, identical but for their seed
  ``S = s + 10000 k`` (k = 1, 2, ...: initial weights, shuffle and augmentation all follow the run's
  seed); they exist only for the MultiSWAG row. A ``--seeds`` value that is another chosen seed's extra
  seed is refused, so no run is shared between two seeds' rows: the MultiSWAG rows of different seeds are
  independent.

Then, from the runs' final checkpoints, every row's test-set predictions:

* **SWA**: the SWAG mean (``SWAG.swapped_into``), BN statistics recomputed with ``update_bn``;
* **SWAG-diagonal**: ``bma_predict(..., cov=False)``: the mean of the softmax outputs of ``--n-samples``
  samples of the diagonal Gaussian;
* **SWAG**: ``bma_predict(..., cov=True)``: diagonal plus the low-rank part, at ``--scale``;
* **MultiSWAG**: ``bma_predict(MultiSWAG([the seed's SWAG run and its extra runs]), cov=True)`` with
  ``ceil(n_samples / runs)`` samples from each run: as many samples in all as the SWAG row
  (``--n-samples`` 30 and 3 runs: 10 each) when ``runs`` divides ``--n-samples``, at most ``runs - 1``
  more otherwise; never fewer.

Every BN pass (SWA's and each sample's) runs over the same training batches: the first ``--bn-fraction``
of one shuffled pass over the training split (augmented as in training), seeded per seed and row, so the
rows differ by their weights only. Samples come from a ``torch.Generator`` seeded per seed and row: a rerun
gives the same numbers.

Each row is scored on the test set by :func:`swa_fast.swag.classification_metrics`: accuracy, NLL (mean
``-log p(y)``, nats) and ECE over 15 equal-width confidence bins. The reliability diagrams
(``reliability.png``, one panel per row, side by side) pool the test predictions of every seed of the
run (so with one seed they are that seed's).

Checkpoints: ``checkpoints/seed<N>/<run>.pt`` after every epoch of every run (model, optimizer, scheduler,
the SWAG's state once it has collected, the metric rows), and ``checkpoints/seed<N>/evaluation.pt`` after
each row is scored (its metrics and calibration bins). ``--resume`` continues an interrupted run, skips
finished runs and rows, and refuses changed options (:func:`recipe_lib.outputs.check_out`).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from swa_fast.regime import SWAScheduleLR
from swa_fast.swa_utils import update_bn
from swa_fast.swag import (
    SWAG,
    CalibrationBins,
    MultiSWAG,
    bma_predict,
    calibration_bins,
    classification_metrics,
    reliability_diagram,
)

from recipe_lib.checkpoint import (
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    save_atomic,
)
from recipe_lib.cli import (
    RunData,
    check_distinct,
    check_epochs,
    check_swa_start,
    load_run_data,
    report_header,
    start_one_process,
)
from recipe_lib.distributed import DistContext
from recipe_lib.engine import ArmResult, StopRequested, checkpoint_path, epoch_seed, progress_bar
from recipe_lib.loader import BatchLoader
from recipe_lib.models import build_model, count_parameters
from recipe_lib.outputs import write_atomic
from recipe_lib.reporting import _pyplot, _save_figure, final_rows, format_mean_std, outputs_lines, write_metrics
from recipe_lib.training import EvalSet, Precision, evaluate, train_epoch
from recipe_lib.verdict import MeasuredSpread, verdict_lines

NAME = "swag"
CHECKPOINT_VERSION = 1
#: Equal-width confidence bins of the ECE and the reliability diagrams (Guo et al. 2017, the SWAG paper).
N_BINS = 15
#: The extra MultiSWAG runs of seed s have seeds s + EXTRA_SEED_STRIDE * k, k = 1 .. runs - 1.
EXTRA_SEED_STRIDE = 10_000
MAX_SEED = 2**32 - 1
EVALUATION = "evaluation"  # checkpoints/seed<N>/evaluation.pt
PLOT = "reliability.png"

SGD, SWA, DIAGONAL, SWAG_ROW, MULTISWAG = "SGD", "SWA", "SWAG-diagonal", "SWAG", "MultiSWAG"


def row_labels(args: argparse.Namespace) -> list[str]:
    """The table's rows, in order (no MultiSWAG row with ``--multiswag-runs 0``)."""
    return [SGD, SWA, DIAGONAL, SWAG_ROW] + ([MULTISWAG] if args.multiswag_runs else [])


# ------------------------------------------------------------------------------------ options


def extra_seeds(seed: int, runs: int) -> list[int]:
    """The seeds of seed ``seed``'s extra MultiSWAG runs: ``seed + 10000 k`` for k = 1 .. runs - 1."""
    return [seed + EXTRA_SEED_STRIDE * k for k in range(1, runs)]


def samples_per_run(n_samples: int, runs: int) -> int:
    """MultiSWAG's samples from each run: ``ceil(n_samples / runs)``, so that it draws as many samples in
    all as the SWAG row (more by at most ``runs - 1`` when ``runs`` does not divide ``n_samples``)."""
    return max(1, math.ceil(n_samples / runs))


def collections(args: argparse.Namespace) -> int:
    """How many times a SWAG run collects: once after every epoch past ``--swa-start``."""
    return args.epochs - args.swa_start


def check_options(args: argparse.Namespace) -> None:
    """Every option that depends on another, before the data loads: the budget, ``--swa-start`` (at least
    two collections: the Gaussian needs two), ``--multiswag-runs`` and the seeds of its extra runs."""
    if args.fsdp:
        raise SystemExit("--fsdp does not go with swag.py: it trains one unsharded model at a time in one process")
    check_epochs(args.epochs, 3, "SWAG needs at least one epoch before --swa-start and two to collect after it",
                 "--epochs (the budget B)")
    check_swa_start(args.swa_start, args.epochs, "--epochs (the budget B)")
    if collections(args) < 2:
        raise SystemExit(f"--swa-start {args.swa_start} leaves {collections(args)} collection in the budget of "
                         f"{args.epochs} epochs: SWAG collects after every epoch past --swa-start and its Gaussian "
                         f"needs at least 2 (--swa-start at most {args.epochs - 2})")
    check_distinct("--seeds", args.seeds)
    if args.multiswag_runs == 1:
        raise SystemExit("--multiswag-runs 1: a MultiSWAG of one run is the SWAG row again; give 2 or more runs, "
                         "or 0 for no MultiSWAG row")
    chosen = set(args.seeds)
    for seed in args.seeds:
        for extra in extra_seeds(seed, args.multiswag_runs):
            if extra > MAX_SEED:
                raise SystemExit(f"--seeds {seed}: its extra MultiSWAG runs take seeds s + {EXTRA_SEED_STRIDE} k "
                                 f"(k = 1 .. {args.multiswag_runs - 1}), and {extra} is past the largest seed, "
                                 f"{MAX_SEED}: choose a smaller seed or fewer --multiswag-runs")
            if extra in chosen:
                raise SystemExit(f"--seeds {seed} {extra}: seed {extra} is also one of seed {seed}'s extra MultiSWAG "
                                 f"runs (seeds s + {EXTRA_SEED_STRIDE} k), so the two seeds' rows would share a run; "
                                 "choose seeds that differ otherwise")


def check_batches(args: argparse.Namespace, train_size: int) -> None:
    """A full batch to train on (the last partial batch of an epoch is dropped)."""
    if train_size < args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} is more than the {train_size} training samples: there is "
                         "no full batch to train on")


# ------------------------------------------------------------------------------------ training runs


@dataclass(frozen=True)
class RunPlan:
    """One training run of a seed: its name (checkpoint file), its own seed, and whether it collects a SWAG."""

    name: str
    seed: int
    collect: bool


def run_plans(seed: int, args: argparse.Namespace) -> list[RunPlan]:
    """The training runs of seed ``seed``: the SGD baseline, the SWAG run, the extra MultiSWAG runs."""
    return [RunPlan("sgd", seed, False), RunPlan("swag", seed, True)] + [
        RunPlan(f"swag-seed{extra}", extra, True) for extra in extra_seeds(seed, args.multiswag_runs)]


def new_model(args: argparse.Namespace, data: RunData, ctx: DistContext) -> nn.Module:
    model = build_model(args.model, data.train.num_classes, data.in_channels, data.image_size).to(ctx.device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


class _TrainRun:
    """One training run: its model, optimizer, schedule, SWAG (collecting runs) and checkpoint."""

    def __init__(self, plan: RunPlan, owner: int, args: argparse.Namespace, data: RunData, ctx: DistContext,
                 test: EvalSet, log: Callable[[str], None]) -> None:
        self.plan, self.owner, self.args, self.data, self.ctx, self.test, self.log = plan, owner, args, data, ctx, \
            test, log
        self.precision = Precision(args.amp, args.channels_last)
        torch.manual_seed(plan.seed)  # the SGD and SWAG runs of a seed start from the same weights
        self.model = new_model(args, data, ctx)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=args.momentum,
                                         weight_decay=args.weight_decay)
        self.loader = BatchLoader(data.train, args.batch_size, shuffle=True, drop_last=True, device=ctx.device,
                                  augment=data.augment, seed=plan.seed, mean=data.mean, std=data.std)
        steps = len(self.loader)
        # Stepped once per iteration, as swa_paper.py's arms: the SGD baseline decays to 1% of lr over the
        # budget; a SWAG run has the SWA schedule over --swa-start epochs, then --swa-lr.
        if plan.collect:
            self.scheduler = SWAScheduleLR(self.optimizer, total_steps=args.swa_start * steps, swa_lr=args.swa_lr)
            self.swag: SWAG | None = SWAG(self.model, max_rank=args.max_rank)
        else:
            self.scheduler = SWAScheduleLR(self.optimizer, total_steps=args.epochs * steps)
            self.swag = None
        self.scaler = self.precision.make_scaler(ctx.device)
        self.path = checkpoint_path(args.out, owner, plan.name)
        self.epoch = 0
        self.rows: list[dict[str, Any]] = []
        self.timing = {"train_seconds": 0.0, "collect_seconds": 0.0, "collections": 0}

    @property
    def finished(self) -> bool:
        return self.epoch >= self.args.epochs

    def save(self) -> None:
        swag = self.swag.state_dict() if self.swag is not None and self.swag.n_collected else None
        save_atomic({"version": CHECKPOINT_VERSION, "owner": self.owner, "run": self.plan.name,
                     "seed": self.plan.seed, "epoch": self.epoch, "model": model_state(self.model, self.ctx),
                     "optimizer": optimizer_state(self.model, self.optimizer, self.ctx),
                     "scheduler": self.scheduler.state_dict(),
                     "scaler": None if self.scaler is None else self.scaler.state_dict(),
                     "swag": swag, "rows": self.rows, "timing": self.timing}, self.path)

    def restore(self) -> None:
        saved = read_run(self.path)
        load_model_state(self.model, saved["model"], self.ctx)
        load_optimizer_state(self.model, self.optimizer, saved["optimizer"], self.ctx)
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None and saved["scaler"] is not None:
            self.scaler.load_state_dict(saved["scaler"])
        if self.swag is not None and saved["swag"] is not None:
            self.swag.load_state_dict(saved["swag"])
        self.epoch, self.rows, self.timing = saved["epoch"], saved["rows"], saved["timing"]
        if not self.finished:
            self.log(f"seed {self.owner} {self.plan.name}: resuming after epoch {self.epoch}")

    def train(self, epochs_run: list[int]) -> None:
        args, ctx = self.args, self.ctx
        if args.resume and self.path.exists():
            self.restore()
        while not self.finished:
            if args.stop_after is not None and epochs_run[0] >= args.stop_after:
                raise StopRequested(f"stopped after {epochs_run[0]} epochs (--stop-after); continue with --resume")
            epoch = self.epoch + 1
            torch.manual_seed(epoch_seed(self.plan.seed, epoch, 0))
            self.loader.set_epoch(epoch - 1)
            lr = self.optimizer.param_groups[0]["lr"]
            bar = progress_bar(not args.no_progress, f"seed {self.owner} {self.plan.name} {epoch}/{args.epochs}",
                               len(self.loader))
            started = time.perf_counter()
            stats = train_epoch(self.model, self.loader, self.optimizer, ctx, self.precision, scaler=self.scaler,
                                after_step=self.scheduler.step, progress=bar)
            if self.swag is not None and epoch > args.swa_start:
                collect_started = time.perf_counter()
                self.swag.collect(self.model)
                self.swag.synchronize()
                self.timing["collect_seconds"] += time.perf_counter() - collect_started
                self.timing["collections"] += 1
            self.timing["train_seconds"] += time.perf_counter() - started
            tested = evaluate(self.model, self.test, self.precision, ctx)
            row: dict[str, Any] = {"seed": self.owner, "arm": self.plan.name, "run_seed": self.plan.seed,
                                   "epoch": epoch, "steps": epoch * len(self.loader), "lr": lr,
                                   "train_loss": stats.loss, "train_acc": stats.accuracy, "test_loss": tested.loss,
                                   "test_acc": tested.accuracy,
                                   "collected": self.swag.n_collected if self.swag is not None else 0,
                                   "epoch_seconds": stats.seconds}
            self.rows.append(row)
            self.epoch = epoch
            collected = f" | SWAG: {row['collected']} collected" if self.swag is not None else ""
            self.log(f"seed {self.owner} {self.plan.name} epoch {epoch}/{args.epochs} | lr {lr:.3g} | train loss "
                     f"{stats.loss:.3f} acc {stats.accuracy:.4f} | test loss {tested.loss:.3f} acc "
                     f"{tested.accuracy:.4f}{collected} | {stats.seconds:.1f}s")
            self.save()
            epochs_run[0] += 1


def read_run(path: Path) -> dict[str, Any]:
    saved = load_checkpoint(path)
    if saved.get("version") != CHECKPOINT_VERSION:
        raise SystemExit(f"{path}: checkpoint version {saved.get('version')} is not {CHECKPOINT_VERSION}: "
                         "--restart starts afresh")
    return saved


# ------------------------------------------------------------------------------------ the rows


def bins_record(bins: CalibrationBins) -> dict[str, list]:
    """A seed's calibration bins as sums (no NaN for empty bins), so that seeds can be pooled exactly:
    per bin the number of predictions, how many were right, and their summed confidence."""
    counts = bins.counts.tolist()
    right = [round(a * c) if c else 0 for a, c in zip(bins.accuracy.tolist(), counts)]
    confidence = [f * c if c else 0.0 for f, c in zip(bins.confidence.tolist(), counts)]
    return {"counts": counts, "correct": right, "confidence_sum": confidence}


def pooled_bins(records: Sequence[Mapping[str, list]]) -> CalibrationBins:
    """The calibration bins of the predictions of every record together (what ``calibration_bins`` gives
    for the concatenated predictions)."""
    n_bins = len(records[0]["counts"])
    counts = torch.tensor([sum(r["counts"][b] for r in records) for b in range(n_bins)], dtype=torch.int64)
    right = torch.tensor([sum(r["correct"][b] for r in records) for b in range(n_bins)], dtype=torch.float64)
    confidence = torch.tensor([sum(r["confidence_sum"][b] for r in records) for b in range(n_bins)],
                              dtype=torch.float64)
    size = counts.to(torch.float64)
    nan = torch.full((n_bins,), float("nan"), dtype=torch.float64)
    filled = counts > 0
    return CalibrationBins(edges=torch.arange(n_bins + 1, dtype=torch.float64) / n_bins, counts=counts,
                           accuracy=torch.where(filled, right / size.clamp_min(1), nan),
                           confidence=torch.where(filled, confidence / size.clamp_min(1), nan),
                           n=int(counts.sum()))


class _Evaluation:
    """A seed's rows: each scored from the runs' final checkpoints, and recorded in ``evaluation.pt`` as soon
    as it is (a resumed run skips the rows already there)."""

    def __init__(self, seed: int, args: argparse.Namespace, data: RunData, ctx: DistContext, test: EvalSet,
                 log: Callable[[str], None]) -> None:
        self.seed, self.args, self.data, self.ctx, self.test, self.log = seed, args, data, ctx, test, log
        self.precision = Precision(args.amp, args.channels_last)
        self.path = checkpoint_path(args.out, seed, EVALUATION)
        self.finals: dict[str, dict[str, Any]] = {}
        if args.resume and self.path.exists():
            self.finals = read_run(self.path)["finals"]
        self.plans = {plan.name: plan for plan in run_plans(seed, args)}
        self.model = new_model(args, data, ctx)  # every row's weights are loaded into this one model
        # The BN passes: one shuffled pass over the training split (the epoch after training), augmented as in
        # training; each pass takes its first --bn-fraction of the batches.
        self.bn_loader = BatchLoader(data.train, args.batch_size, shuffle=True, drop_last=False, device=ctx.device,
                                     augment=data.augment, seed=seed, mean=data.mean, std=data.std)
        self.bn_loader.set_epoch(args.epochs)
        self.bn_batches = max(1, math.ceil(args.bn_fraction * len(self.bn_loader)))

    def _forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        with self.precision.autocast(self.ctx.device):
            return model(self.precision.prepare(batch[0]))

    @torch.no_grad()
    def _predict(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities (float64, on the CPU, as bma_predict's) and the targets of the test set."""
        was_training = model.training
        model.eval()
        probs, targets = [], []
        for images, labels in self.test:
            probs.append(torch.softmax(self._forward(model, (images,)).double(), dim=1).cpu())
            targets.append(labels.cpu())
        model.train(was_training)
        return torch.cat(probs), torch.cat(targets)

    def _seed_rng(self, row: int) -> torch.Generator:
        """Seed the global RNG (BN-pass augmentation) for row ``row`` and return its sampling generator."""
        value = epoch_seed(self.seed, self.args.epochs + 1 + row, 0)
        torch.manual_seed(value)
        return torch.Generator(device=self.ctx.device).manual_seed(value)

    def _swag(self, plan: RunPlan) -> SWAG:
        saved = read_run(checkpoint_path(self.args.out, self.seed, plan.name))
        swag = SWAG(self.model, max_rank=self.args.max_rank)
        swag.load_state_dict(saved["swag"])
        return swag

    def _bma(self, swag: SWAG | MultiSWAG, n_samples: int, cov: bool, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = self._seed_rng(row)
        args = self.args
        probs, targets = bma_predict(swag, self.model, self.test, n_samples=n_samples, bn_loader=self.bn_loader,
                                     scale=args.scale, cov=cov, generator=generator, bn_fraction=args.bn_fraction,
                                     forward_fn=self._forward,
                                     progress=not args.no_progress and sys.stderr.isatty(), return_targets=True)
        return probs, targets

    def _score(self, label: str) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        """The test predictions of row ``label`` and the number of models averaged in them."""
        args = self.args
        row = row_labels(args).index(label)
        if label == SGD:
            saved = read_run(checkpoint_path(args.out, self.seed, "sgd"))
            self.model.load_state_dict(saved["model"])
            return self._predict(self.model), 1
        # The SWAG rows sample into the SWAG run's final model (its weights and BN statistics are restored
        # after every sample and after the SWA block).
        self.model.load_state_dict(read_run(checkpoint_path(args.out, self.seed, "swag"))["model"])
        swag = self._swag(self.plans["swag"])
        if label == SWA:
            self._seed_rng(row)
            with swag.swapped_into(self.model) as inner:
                update_bn(itertools.islice(self.bn_loader, self.bn_batches), inner)
                return self._predict(inner), 1
        if label in (DIAGONAL, SWAG_ROW):
            return self._bma(swag, args.n_samples, cov=label == SWAG_ROW, row=row), args.n_samples
        runs = [swag] + [self._swag(plan) for plan in self.plans.values() if plan.collect and plan.name != "swag"]
        per_run = samples_per_run(args.n_samples, len(runs))
        return self._bma(MultiSWAG(runs), per_run, cov=True, row=row), per_run * len(runs)

    def run(self) -> dict[str, dict[str, Any]]:
        for label in row_labels(self.args):
            if label in self.finals:
                continue
            started = time.perf_counter()
            (probs, targets), samples = self._score(label)
            seconds = time.perf_counter() - started
            metrics = classification_metrics(probs, targets, n_bins=N_BINS)
            self.finals[label] = {"test_acc": metrics["accuracy"], "test_loss": metrics["nll"],
                                  "nll": metrics["nll"], "ece": metrics["ece"], "epoch": self.args.epochs,
                                  "samples": samples, "seconds": seconds,
                                  "bins": bins_record(calibration_bins(probs, targets, N_BINS))}
            self.log(f"seed {self.seed} {label}: accuracy {metrics['accuracy']:.4f}, NLL {metrics['nll']:.4f}, "
                     f"ECE {metrics['ece']:.4f} ({samples} model(s), {seconds:.1f}s)")
            save_atomic({"version": CHECKPOINT_VERSION, "seed": self.seed, "finals": self.finals}, self.path)
        return self.finals


# ------------------------------------------------------------------------------------ the run


def _run_seed(seed: int, args: argparse.Namespace, data: RunData, ctx: DistContext, test: EvalSet,
              log: Callable[[str], None], epochs_run: list[int]) -> list[ArmResult]:
    """Train (or resume, or skip) every run of seed ``seed``, then score its rows."""
    trained = []
    for plan in run_plans(seed, args):
        run = _TrainRun(plan, seed, args, data, ctx, test, log)
        run.train(epochs_run)
        trained.append((plan, run.rows, dict(run.timing)))
        del run
    finals = _Evaluation(seed, args, data, ctx, test, log).run()
    results = []
    for plan, rows, timing in trained:
        if plan.name == "sgd":
            mine = {SGD: finals[SGD]}
        elif plan.name == "swag":
            mine = {label: finals[label] for label in row_labels(args) if label != SGD}
        else:
            mine = {}
        seconds = timing["train_seconds"] + sum(m["seconds"] for m in mine.values())
        results.append(ArmResult(plan.name, seed, rows, mine, dict(timing, run_seed=plan.seed), [], seconds))
    return results


def run_swag(args: argparse.Namespace, title: str,
             measured: Mapping[str, MeasuredSpread]) -> list[ArmResult] | None:
    """Train every seed's runs, score the rows, write the report; the results (None when stopped by
    ``--stop-after``). The recipe's own checks (:func:`check_options`) have run before this."""
    ctx, log = start_one_process(args, NAME, "its runs train one after another, and bma_predict samples into one "
                                 "model")

    started = time.perf_counter()
    data = load_run_data(args, ctx, log, check=lambda train: check_batches(args, len(train)))
    test = EvalSet(data.test, args.eval_batch_size, ctx, data.mean, data.std)
    steps = len(data.train) // args.batch_size
    runs = 1 + max(1, args.multiswag_runs)
    log(f"{NAME}: {len(data.train)} train / {len(data.test)} test samples of {data.train.name}, model {args.model}, "
        f"a budget of {args.epochs} epochs of {steps} steps; SWAG collects after epochs {args.swa_start + 1}-"
        f"{args.epochs} ({collections(args)} collections, max_rank {args.max_rank}); {runs} training runs x "
        f"{len(args.seeds)} seed(s) on {ctx.device}")
    epochs_run = [0]
    results: list[ArmResult] = []
    try:
        for seed in args.seeds:
            results += _run_seed(seed, args, data, ctx, test, log, epochs_run)
    except StopRequested as stop:
        log(str(stop))
        return None
    _report(args, title, measured, results, data, ctx, time.perf_counter() - started)
    return results


# ------------------------------------------------------------------------------------ the report


def _values(per_seed: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [row[key] for row in sorted(per_seed, key=lambda r: r["seed"])]


def _mean(per_seed: Sequence[Mapping[str, Any]], key: str) -> float:
    return statistics.fmean(_values(per_seed, key))


def _std(per_seed: Sequence[Mapping[str, Any]], key: str) -> float:
    values = _values(per_seed, key)
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _shown(per_seed: Sequence[Mapping[str, Any]], key: str) -> str:
    """A row's accuracy (%), NLL or ECE (%) as the table shows it: mean ± std over seeds."""
    if key == "nll":
        return format_mean_std(_values(per_seed, key), scale=1.0, digits=4)
    return format_mean_std(_values(per_seed, key))


def _with_unit(per_seed: Sequence[Mapping[str, Any]], key: str) -> str:
    """:func:`_shown` with the unit, for sentences: ``0.3120 ± 0.0060``, ``2.13 ± 0.40%``."""
    return _shown(per_seed, key) + ("" if key == "nll" else "%")


def describe_row(label: str, args: argparse.Namespace) -> str:
    """What a row predicts with, in words."""
    runs = args.multiswag_runs
    rank = f"rank {min(args.max_rank, collections(args))}"
    return {SGD: f"SGD run's final weights (budget {args.epochs})",
            SWA: "SWAG mean + update_bn",
            DIAGONAL: f"BMA of {args.n_samples} samples, diagonal, scale {args.scale:g}",
            SWAG_ROW: f"BMA of {args.n_samples} samples, diagonal + {rank}, scale {args.scale:g}",
            MULTISWAG: f"BMA of {runs} runs x {samples_per_run(args.n_samples, max(runs, 1))} samples, "
                       f"diagonal + {rank}"}[label]


def results_table(args: argparse.Namespace, rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Per row: what it predicts with, accuracy, NLL and ECE (mean ± std over seeds), and the per-seed values."""
    lines = ["| method | predicts with | accuracy % | NLL | ECE % | per seed: accuracy % / NLL / ECE % |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, per_seed in rows.items():
        seeds = ", ".join(f"{100 * r['test_acc']:.2f} / {r['nll']:.4f} / {100 * r['ece']:.2f}"
                          for r in sorted(per_seed, key=lambda r: r["seed"]))
        lines.append(f"| {label} | {describe_row(label, args)} | {_shown(per_seed, 'test_acc')} | "
                     f"{_shown(per_seed, 'nll')} | {_shown(per_seed, 'ece')} | {seeds} |")
    return "\n".join(lines)


def plot_reliability(rows: Mapping[str, Sequence[Mapping[str, Any]]], seeds: Sequence[int], path: Path) -> Path | None:
    """One reliability diagram per row, side by side, from the test predictions of every seed pooled."""
    plt = _pyplot(path)
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 4.2), squeeze=False)
    for ax, (label, per_seed) in zip(axes[0], rows.items()):
        bins = pooled_bins([r["bins"] for r in per_seed])
        reliability_diagram(bins, ax=ax, title=label, label=label)
        ax.legend(loc="upper left", fontsize=7)
    source = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {' '.join(map(str, seeds))} pooled"
    n = pooled_bins([r["bins"] for r in next(iter(rows.values()))]).n
    fig.suptitle(f"Reliability diagrams, {N_BINS} equal-width bins: the test predictions of {source} ({n} per "
                 "panel)", fontsize=10)
    return _save_figure(plt, fig, path)


@dataclass(frozen=True)
class Comparison:
    """SWAG against another row on one metric (lower is better): the difference of the means, this run's
    seed-to-seed spread of the two, and the seeds where SWAG was lower."""

    other: str
    key: str
    difference: float
    spread: float
    lower_on: int
    seeds: int

    @property
    def improved(self) -> bool:
        return self.difference < 0

    @property
    def beyond_spread(self) -> bool:
        return self.seeds > 1 and abs(self.difference) > self.spread


def compare(rows: Mapping[str, Sequence[Mapping[str, Any]]], other: str, key: str,
            label: str = SWAG_ROW) -> Comparison:
    mine = {r["seed"]: r[key] for r in rows[label]}
    theirs = {r["seed"]: r[key] for r in rows[other]}
    shared = sorted(mine.keys() & theirs.keys())
    return Comparison(other, key, _mean(rows[label], key) - _mean(rows[other], key),
                      max(_std(rows[label], key), _std(rows[other], key)),
                      sum(mine[s] < theirs[s] for s in shared), len(shared))


METRIC_NAMES = {"nll": "NLL", "ece": "ECE"}


def _metric_text(value: float, key: str) -> str:
    return f"{value:.4f}" if key == "nll" else f"{100 * value:.2f}%"


def _difference_text(c: Comparison) -> str:
    sign = "-" if c.difference < 0 else "+"
    size = abs(c.difference)
    return f"{sign}{size:.4f}" if c.key == "nll" else f"{sign}{100 * size:.2f} points"


def _comparison_sentence(rows: Mapping[str, Sequence[Mapping[str, Any]]], key: str) -> str:
    """SWAG's NLL or ECE against SWA's and SGD's, with each difference set against this run's spread."""
    parts = []
    for other in (SWA, SGD):
        c = compare(rows, other, key)
        text = f"{other} {_with_unit(rows[other], key)} ({_difference_text(c)}"
        if c.seeds > 1:
            spread = _metric_text(c.spread, key).rstrip("%") + (" points" if key == "ece" else "")
            relation = "larger than" if c.beyond_spread else "within"
            text += f", {relation} the seed-to-seed spread of std up to {spread}; lower on {c.lower_on} of {c.seeds} " \
                    "seeds"
        parts.append(text + ")")
    unit = " (lower is better)" if key == "nll" else f" ({N_BINS} bins, lower is better)"
    return f"{METRIC_NAMES[key]}{unit}: SWAG {_with_unit(rows[SWAG_ROW], key)} vs " + " and ".join(parts) + "."


def _answer(rows: Mapping[str, Sequence[Mapping[str, Any]]], seeds: int) -> str:
    """The verdict's first sentence: did SWAG improve NLL and ECE over SWA and SGD, beyond the spread?"""
    clauses, beyond, within = [], [], []
    for key in ("nll", "ece"):
        better = [c for c in (compare(rows, SWA, key), compare(rows, SGD, key)) if c.improved]
        names = [c.other for c in better]
        name = METRIC_NAMES[key]
        if len(names) == 2:
            clauses.append(f"{name} over both SWA and SGD")
        elif names:
            clauses.append(f"{name} over {names[0]} only")
        beyond += [f"{name} vs {c.other}" for c in better if c.beyond_spread]
        within += [f"{name} vs {c.other}" for c in better if not c.beyond_spread]
    if not clauses:
        answer = "SWAG improved neither NLL nor ECE over SWA or SGD"
    else:
        answer = "SWAG improved " + " and ".join(clauses)
    if not clauses:
        tail = ""
    elif seeds == 1:
        tail = "; with one seed this run has no spread to judge these differences by"
    elif not within:
        tail = "; every one of these gains exceeds this run's seed-to-seed spread"
    elif not beyond:
        tail = "; none of these gains exceeds this run's seed-to-seed spread: it cannot tell them from noise"
    else:
        tail = (f"; beyond this run's seed-to-seed spread: {', '.join(beyond)}; within it (not distinguishable from "
                f"noise): {', '.join(within)}")
    return answer + tail + "."


def _multiswag_sentence(rows: Mapping[str, Sequence[Mapping[str, Any]]], args: argparse.Namespace) -> str | None:
    if MULTISWAG not in rows:
        return None
    parts = []
    for key in ("nll", "ece"):
        c = compare(rows, SWAG_ROW, key, label=MULTISWAG)
        verb = "lower" if c.improved else "not lower"
        text = f"{METRIC_NAMES[key]} {_with_unit(rows[MULTISWAG], key)}, {verb} than SWAG's ({_difference_text(c)}"
        if c.seeds > 1:
            text += f"; {'beyond' if c.beyond_spread else 'within'} the seed-to-seed spread"
        parts.append(text + ")")
    per_run = samples_per_run(args.n_samples, args.multiswag_runs)
    return (f"MultiSWAG ({args.multiswag_runs} independent runs x {per_run} samples, "
            f"{args.multiswag_runs * per_run} in all against SWAG's {args.n_samples}): " + "; ".join(parts) + ".")


def _verdict(args: argparse.Namespace, rows: Mapping[str, Sequence[Mapping[str, Any]]],
             measured: Mapping[str, MeasuredSpread]) -> list[str]:
    seeds = max(len(per_seed) for per_seed in rows.values())
    findings = [_comparison_sentence(rows, "nll"), _comparison_sentence(rows, "ece")]
    multi = _multiswag_sentence(rows, args)
    if multi:
        findings.append(multi)

    def describe(label: str) -> str:
        return {SGD: "SGD", SWA: "SWA", DIAGONAL: "SWAG-diagonal",
                SWAG_ROW: f"SWAG ({args.n_samples} samples)", MULTISWAG: "MultiSWAG"}[label]

    lines = verdict_lines(rows, SGD, [SWAG_ROW], args.preset, args.dataset, measured, describe, findings=findings)
    # The shared smoke sentence points at docs/RESULTS.md, which has no results of this recipe yet.
    lines = [line.replace(", whose results docs/RESULTS.md gives.", " (about 3.5 minutes a seed).") for line in lines]
    return [lines[0], f"- {_answer(rows, seeds)}"] + lines[1:]


def _settings(args: argparse.Namespace, data: RunData, results: Sequence[ArmResult]) -> list[str]:
    steps = len(data.train) // args.batch_size
    batches = math.ceil(len(data.train) / args.batch_size)  # the BN loader keeps the last partial batch
    bn_batches = max(1, math.ceil(args.bn_fraction * batches))
    params = count_parameters(build_model(args.model, data.train.num_classes, data.in_channels, data.image_size))
    runs = args.multiswag_runs
    lines = [f"- training: {args.model} ({params / 1e6:.2f}M parameters), SGD momentum {args.momentum:g}, weight "
             f"decay {args.weight_decay:g}, batch {args.batch_size}, lr {args.lr:g}; a budget of {args.epochs} epochs "
             f"of {steps} steps on {len(data.train)} images"
             + (" (augmented: random crop and flip)" if data.augment is not None else "")
             + f"; tested on {len(data.test)}",
             "- SGD: the SWA paper's schedule over the budget (lr flat to 50%, linear to 1% by 90%), as "
             "swa_paper.py's SGD baseline; its final weights",
             f"- SWAG runs: the same budget with the SWA schedule over {args.swa_start} epochs, down to swa_lr "
             f"{args.swa_lr:g}, constant after; SWAG.collect after each of epochs {args.swa_start + 1}-{args.epochs} "
             f"({collections(args)} collections, max_rank {args.max_rank})",
             f"- BMA: scale {args.scale:g}; before every sample's test pass, and for SWA, the BN statistics are "
             f"recomputed on the first {bn_batches} of {batches} shuffled training batches (--bn-fraction "
             f"{args.bn_fraction:g})"]
    if runs:
        per_run = samples_per_run(args.n_samples, runs)
        example = ", ".join(str(s) for s in [args.seeds[0]] + extra_seeds(args.seeds[0], runs))
        lines.append(f"- MultiSWAG: per seed s, its SWAG run and {runs - 1} more with seeds s + {EXTRA_SEED_STRIDE} k "
                     f"(seed {args.seeds[0]}: {example}); {per_run} samples from each, {runs * per_run} in all")
    lines.append(f"- scores: accuracy, NLL (mean -log p(y), nats) and ECE ({N_BINS} equal-width confidence bins) of "
                 f"the test predictions; {PLOT}: the predictions of every seed pooled (the ECE in its legends is the "
                 "pooled predictions', not the mean over seeds of the table)")
    return lines


def _costs(args: argparse.Namespace, results: Sequence[ArmResult], seeds: int) -> str:
    collecting = [r for r in results if r.averaging["collections"]]
    count = sum(r.averaging["collections"] for r in collecting)
    collect_ms = 1e3 * sum(r.averaging["collect_seconds"] for r in collecting) / max(1, count)
    epochs = sum(len(r.rows) for r in results)
    train = sum(r.averaging["train_seconds"] for r in results)
    finals = [m for r in results for m in r.finals.values()]
    sampled = [m for r in results for label, m in r.finals.items() if label in (DIAGONAL, SWAG_ROW, MULTISWAG)]
    per_sample = sum(m["seconds"] for m in sampled) / max(1, sum(m["samples"] for m in sampled))
    scoring = sum(m["seconds"] for m in finals) / max(1, seeds)
    return (f"Costs: SWAG.collect {collect_ms:.2f} ms per collection (one fused pass); training "
            f"{train / max(1, epochs):.1f} s per epoch (test pass included: {epochs} epochs over "
            f"{len(results) // max(1, seeds)} runs per seed); bma_predict {per_sample:.2f} s per sample (its BN pass "
            f"and test pass); scoring every row {scoring:.0f} s per seed.")


def _report(args: argparse.Namespace, title: str, measured: Mapping[str, MeasuredSpread], results: list[ArmResult],
            data: RunData, ctx: DistContext, wall: float) -> None:
    """results.md/json, metrics.csv and the reliability diagrams; the table, the outputs and, last, the verdict
    printed."""
    out: Path = args.out
    rows = final_rows(results, row_labels(args))
    head, command, machine = report_header(title, args, ctx, wall)
    table = results_table(args, rows)
    lines = head[:-1] + _settings(args, data, results) + ["", table, "", _costs(args, results, len(args.seeds))]
    plot = plot_reliability(rows, list(args.seeds), out / PLOT)
    verdict = _verdict(args, rows, measured)
    images = [f"![{plot.stem}]({plot.name})"] if plot is not None else []
    write_atomic(out / "results.md", "\n".join(lines + [""] + verdict + [""] + images) + "\n")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    metrics = {label: {key: {"mean": _mean(per_seed, key), "std": _std(per_seed, key)}
                       for key in ("test_acc", "nll", "ece")} for label, per_seed in rows.items()}
    summary = {"wall_seconds": wall, "machine": machine, "command": command, "processes": 1, "table": table,
               "metrics": metrics, "n_bins": N_BINS, "collections": collections(args),
               "multiswag": {"runs": args.multiswag_runs,
                             "samples_per_run": samples_per_run(args.n_samples, max(1, args.multiswag_runs)),
                             "seeds": {str(s): [s] + extra_seeds(s, args.multiswag_runs) for s in args.seeds}}
               if args.multiswag_runs else None,
               "reliability": f"{PLOT}: the test predictions of "
                              + (f"seed {args.seeds[0]}" if len(args.seeds) == 1 else f"seeds {list(args.seeds)} pooled"),
               "verdict": verdict[1:]}
    write_metrics(results, out, config, summary)
    written = ["results.md", "results.json", "metrics.csv"] + ([PLOT] if plot is not None else []) + ["checkpoints"]
    print("\n" + "\n".join(lines + [""] + outputs_lines(out, written) + [""] + verdict), flush=True)


__all__ = ["EXTRA_SEED_STRIDE", "N_BINS", "PLOT", "check_batches", "check_options", "extra_seeds", "run_swag",
           "samples_per_run"]
