"""The epoch loop every recipe shares: train arms, average, evaluate, checkpoint, resume.

A recipe describes its comparison as a list of :class:`Arm`\\ s (baseline, SWA,
large batch + ghost BN, ...) and hands them to :func:`run_arm` once per seed.
Per epoch an arm trains, then (by its settings) averages the weights with
``swa_fast.swa_utils.AveragedModel`` while timing the same update done by
``torch.optim.swa_utils.AveragedModel`` on a shadow copy, recomputes BN
statistics with ``update_bn`` and evaluates the average, collects FGE
snapshots, records ``||w_t - w_0||``, and writes an atomic checkpoint.

Under ``--fsdp`` the model is sharded with FSDP2, the average is a sharded
``swa_fast.WeightAverage`` evaluated through ``swapped_into``
(:mod:`recipe_lib.averages`), there is no torch shadow average (torch's
deep-copies the model, which FSDP2 refuses), ``||w_t - w_0||`` is summed
over the ranks' shards, and checkpoints hold full tensors gathered on rank 0
(:mod:`recipe_lib.checkpoint`).

Reproducibility: every random draw of epoch ``e`` comes from generators seeded
by ``(seed, e, rank)`` at the start of the epoch (the shuffle from ``seed + e``),
so a run resumed from the checkpoint of epoch ``e`` continues exactly as the
uninterrupted run would, and an arm branched from another arm's epoch-``e``
checkpoint equals the same arm trained from scratch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.optim.swa_utils as torch_swa_utils
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from swa_fast.distance import WeightDistanceTracker

from recipe_lib.averages import make_average
from recipe_lib.checkpoint import (
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    save_atomic,
)
from recipe_lib.datasets import ImageDataset
from recipe_lib.distributed import DistContext, barrier, share_rank0_buffers, unwrap, wrap_model
from recipe_lib.loader import BatchLoader
from recipe_lib.training import EvalSet, Precision, evaluate, predict, score, train_epoch

CHECKPOINT_VERSION = 1


class StopRequested(Exception):
    """``--stop-after`` was reached: the checkpoints are written, continue with ``--resume``."""


@dataclass
class SWASettings:
    """Stochastic weight averaging inside an arm.

    Attributes:
        start: the average takes the weights after every epoch ``e > start``
            (epochs counted from 1), as ``epoch > swa_start`` in torch's docs.
        make_scheduler: builds the lr scheduler of the averaging phase (e.g.
            ``SWALR``), stepped once per epoch from ``start`` on instead of the
            arm's scheduler; ``None`` keeps the arm's scheduler throughout.
        eval_every: recompute BN statistics and evaluate the average every this
            many epochs of the averaging phase (0: only at report points).
        report_at: extra result rows, ``label -> epoch``: the average as it was
            after that epoch (the SWA paper's budgets 1 and 1.25 are points
            of the budget-1.5 run, whose schedule they share).
        label: the row label of the average after the last epoch.
        compare_torch: also average into a ``torch.optim.swa_utils.AveragedModel``
            and report the time ratio and the largest difference (not with an
            FSDP2 model: torch's class deep-copies it, which FSDP2 refuses).
    """

    start: int
    label: str
    make_scheduler: Callable[[Optimizer], LRScheduler] | None = None
    eval_every: int = 1
    report_at: dict[str, int] = field(default_factory=dict)
    compare_torch: bool = True


@dataclass
class FGESettings:
    """An FGE-style snapshot ensemble: predictions of snapshots taken every ``cycle`` epochs after ``start``."""

    start: int
    cycle: int
    label: str


@dataclass
class Arm:
    """One training run of a comparison (one row, or a few rows, of the results table).

    Attributes:
        name: a file-safe id (checkpoint names, CSV ``arm`` column).
        label: the row label of the final model (``None``: no row for it).
        epochs: epochs to train.
        batch_size: per-rank batch size.
        make_optimizer: ``model -> optimizer``.
        make_scheduler: ``(optimizer, steps_per_epoch) -> scheduler``.
        scheduler_per_iteration: step the scheduler after every optimizer step
            (else once per epoch).
        swa, fge: averaging and snapshot-ensemble settings.
        ghost_batch_size: convert the model's BatchNorm to ghost BN of this size.
        clip_grad_norm: clip the gradients' global norm to this value.
        distance: record ``||w_t - w_0||`` (log-spaced steps and every epoch end).
        branch_from: ``(arm name, epoch)``: start from that arm's checkpoint after
            that epoch instead of from scratch (valid when this arm's optimizer
            and schedule equal that arm's up to the epoch; saves the prefix).
        curve: the legend name of this arm's curves (default: ``label``, else ``name``).
    """

    name: str
    label: str | None
    epochs: int
    batch_size: int
    make_optimizer: Callable[[nn.Module], Optimizer]
    make_scheduler: Callable[[Optimizer, int], LRScheduler]
    scheduler_per_iteration: bool = False
    swa: SWASettings | None = None
    fge: FGESettings | None = None
    ghost_batch_size: int | None = None
    clip_grad_norm: float | None = None
    distance: bool = False
    branch_from: tuple[str, int] | None = None
    curve: str | None = None

    @property
    def display_name(self) -> str:
        return self.curve or self.label or self.name


@dataclass
class RunSettings:
    """What every arm of a recipe run shares."""

    build_model: Callable[[Arm], nn.Module]
    train_set: ImageDataset
    test_set: ImageDataset
    augment: Callable[[torch.Tensor], torch.Tensor] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ctx: DistContext
    precision: Precision
    out_dir: Path
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True
    eval_batch_size: int = 1000
    log: Callable[[str], None] = print


@dataclass
class ArmResult:
    """What one (seed, arm) produced."""

    arm: str
    seed: int
    rows: list[dict[str, Any]]
    finals: dict[str, dict[str, float]]
    averaging: dict[str, float]
    distances: list[tuple[int, float]]
    seconds: float


@dataclass
class _EpochsRun:
    """Epochs trained by this invocation, for ``--stop-after``."""

    count: int = 0


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of all random draws of ``epoch`` on ``rank`` (augmentation, dropout)."""
    return (seed * 1_000_003 + epoch * 7919 + rank) % (2**63)


def log_spaced_steps(total: int, per_decade: int = 20) -> set[int]:
    """About ``per_decade`` integer steps per factor of 10 in ``[1, total]``: even points on a log-t axis."""
    steps, k = set(), 0
    while True:
        s = round(10 ** (k / per_decade))
        if s > total:
            return steps
        steps.add(s)
        k += 1


def checkpoint_path(out_dir: Path, seed: int, arm: str, epoch: int | None = None) -> Path:
    suffix = "" if epoch is None else f"-epoch{epoch}"
    return out_dir / "checkpoints" / f"seed{seed}" / f"{arm}{suffix}.pt"


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class _ArmState:
    """The live objects of one arm and their (de)serialization."""

    def __init__(self, arm: Arm, seed: int, run: RunSettings) -> None:
        ctx = run.ctx
        self.arm, self.seed, self.run = arm, seed, run
        torch.manual_seed(seed)  # the same initial weights for every arm of a seed
        model = run.build_model(arm)
        if arm.ghost_batch_size is not None:
            from swa_fast.nn import convert_ghost_batchnorm
            model = convert_ghost_batchnorm(model, arm.ghost_batch_size)
        model = model.to(ctx.device)
        if run.precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = wrap_model(model, ctx)
        self.loader = BatchLoader(run.train_set, arm.batch_size, shuffle=True, drop_last=True, device=ctx.device,
                                  augment=run.augment, seed=seed, rank=ctx.rank, world_size=ctx.world_size,
                                  mean=run.mean, std=run.std)
        if len(self.loader) == 0:
            raise SystemExit(f"arm {arm.name}: {run.train_set.images.shape[0]} training samples over "
                             f"{ctx.world_size} rank(s) give no full batch of {arm.batch_size}")
        self.steps_per_epoch = len(self.loader)
        self.optimizer = arm.make_optimizer(self.model)
        self.scheduler = arm.make_scheduler(self.optimizer, self.steps_per_epoch)
        self.scaler = run.precision.make_scaler(ctx.device)
        self.swa_model = self.torch_swa_model = None
        if arm.swa is not None:
            self.swa_model = make_average(self.model, ctx)
            if arm.swa.compare_torch:
                if ctx.fsdp:
                    raise ValueError(f"arm {arm.name}: compare_torch needs an unsharded model (torch's "
                                     "AveragedModel deep-copies it, which FSDP2 refuses)")
                self.torch_swa_model = torch_swa_utils.AveragedModel(self.model)
        self.tracker = WeightDistanceTracker(unwrap(self.model)) if arm.distance else None
        self.record_steps = log_spaced_steps(arm.epochs * self.steps_per_epoch) if arm.distance else set()
        self.swa_scheduler: LRScheduler | None = None
        self.swa_scheduler_state: dict[str, Any] | None = None
        self.fge_probs: torch.Tensor | None = None
        self.fge_count = 0
        self.epoch = 0
        self.rows: list[dict[str, Any]] = []
        self.finals: dict[str, dict[str, float]] = {}
        # "compared": torch.optim.swa_utils averaged alongside (else its time and difference mean nothing).
        self.averaging = {"fast_seconds": 0.0, "torch_seconds": 0.0, "updates": 0, "max_abs_diff": 0.0,
                          "compared": self.torch_swa_model is not None}
        self.distances: list[tuple[int, float]] = []
        self.restored_distances: list[tuple[int, float]] = []
        self.seconds = 0.0
        self.finished = False

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        def opt(obj: Any) -> Any:
            return None if obj is None else obj.state_dict()

        fge = self.fge_probs
        if fge is not None and self.run.ctx.enabled:  # each rank holds the ensemble of its own test slice
            gathered: list[Any] = [None] * self.run.ctx.world_size
            dist.all_gather_object(gathered, fge.cpu())
            fge = gathered
        elif fge is not None:
            fge = [fge.cpu()]
        ctx = self.run.ctx
        return {
            "version": CHECKPOINT_VERSION, "arm": self.arm.name, "seed": self.seed, "epoch": self.epoch,
            "world_size": ctx.world_size, "fsdp": ctx.fsdp, "finished": self.finished,
            "model": model_state(self.model, ctx), "optimizer": optimizer_state(self.model, self.optimizer, ctx),
            "scheduler": self.scheduler.state_dict(), "swa_scheduler": opt(self.swa_scheduler),
            "swa_model": opt(self.swa_model), "torch_swa_model": opt(self.torch_swa_model), "scaler": opt(self.scaler),
            "fge_probs": fge, "fge_count": self.fge_count, "rows": self.rows, "finals": self.finals,
            "averaging": self.averaging, "distances": self.distances, "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any], *, branch: bool = False) -> None:
        """Restore a checkpoint; ``branch``: only the training state of another arm (no averages, no results)."""
        if state.get("version") != CHECKPOINT_VERSION:
            raise SystemExit(f"checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}; start afresh")
        ctx = self.run.ctx
        if state["world_size"] != ctx.world_size:
            raise SystemExit(f"the checkpoint was written by {state['world_size']} process(es), this run has "
                             f"{ctx.world_size}: resume with the same number")
        if state.get("fsdp", False) != ctx.fsdp:  # the optimizer's and the average's states differ in form
            written = "with" if state.get("fsdp", False) else "without"
            raise SystemExit(f"the checkpoint was written {written} --fsdp: resume {written} it")
        load_model_state(self.model, state["model"], ctx)
        load_optimizer_state(self.model, self.optimizer, state["optimizer"], ctx)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = state["epoch"]
        self.rows = [dict(row, arm=self.arm.name) for row in state["rows"]]
        self.restored_distances = list(state["distances"]) if self.arm.distance else []
        self.distances = list(self.restored_distances)
        self.seconds = state["seconds"]
        if branch:
            return
        self.swa_scheduler_state = state["swa_scheduler"]
        for obj, key in ((self.swa_model, "swa_model"), (self.torch_swa_model, "torch_swa_model")):
            if obj is not None and state[key] is not None:
                obj.load_state_dict(state[key])
        if state["fge_probs"] is not None:
            self.fge_probs = state["fge_probs"][self.run.ctx.rank].to(self.run.ctx.device)
        self.fge_count = state["fge_count"]
        self.finals, self.averaging, self.finished = state["finals"], state["averaging"], state["finished"]
        # A resume with --no-compare-torch stops the comparison: what was measured before is incomplete.
        self.averaging["compared"] = self.averaging.get("compared", True) and self.torch_swa_model is not None

    def attach_swa_scheduler(self) -> None:
        """Build the averaging phase's scheduler (after any load: a loaded optimizer state replaces
        the param groups, and with them the keys a scheduler like SWALR adds there)."""
        if self.arm.swa is None or self.arm.swa.make_scheduler is None:
            return
        self.swa_scheduler = self.arm.swa.make_scheduler(self.optimizer)
        if self.swa_scheduler_state is not None:
            self.swa_scheduler.load_state_dict(self.swa_scheduler_state)

    def save(self, keep: bool) -> None:
        state = self.state_dict()  # every rank: it may all-gather
        if self.run.ctx.is_main:
            save_atomic(state, checkpoint_path(self.run.out_dir, self.seed, self.arm.name))
            if keep:
                save_atomic(state, checkpoint_path(self.run.out_dir, self.seed, self.arm.name, self.epoch))
        barrier(self.run.ctx)

    def result(self) -> ArmResult:
        return ArmResult(self.arm.name, self.seed, self.rows, self.finals, dict(self.averaging),
                         list(self.distances), self.seconds)


def _progress(run: RunSettings, desc: str, total: int) -> Callable[[Iterator], Iterator] | None:
    return progress_bar(run.progress and run.ctx.is_main, desc, total)


def progress_bar(show: bool, desc: str, total: int) -> Callable[[Iterator], Iterator] | None:
    """A wrapper of a batch iterator in a tqdm bar (``train_epoch``'s ``progress``), or None when not shown."""
    if not show:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs get the one summary line per epoch).
    return lambda it: tqdm(it, total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True)


def run_arm(arm: Arm, seed: int, run: RunSettings, keep_epochs: set[int], epochs_run: _EpochsRun) -> ArmResult:
    """Train (or resume, or load the finished result of) one arm for one seed."""
    state = _ArmState(arm, seed, run)
    ckpt = checkpoint_path(run.out_dir, seed, arm.name)
    if run.resume and ckpt.exists():
        state.load_state_dict(load_checkpoint(ckpt))
        if state.finished:
            return state.result()
        run.log(f"seed {seed} {arm.name}: resuming after epoch {state.epoch}")
    elif arm.branch_from is not None:
        source, at = arm.branch_from
        path = checkpoint_path(run.out_dir, seed, source, at)
        if not path.exists():
            raise SystemExit(f"arm {arm.name} branches from {source} after epoch {at}, but {path} is missing")
        state.load_state_dict(load_checkpoint(path), branch=True)
    state.attach_swa_scheduler()
    _train(state, keep_epochs, epochs_run)
    return state.result()


def _train(state: _ArmState, keep_epochs: set[int], epochs_run: _EpochsRun) -> None:
    arm, run, ctx, seed = state.arm, state.run, state.run.ctx, state.seed
    test = EvalSet(run.test_set, run.eval_batch_size, ctx, run.mean, run.std)
    swa = arm.swa

    def in_swa_phase(epoch: int) -> bool:
        return swa is not None and epoch > swa.start

    while state.epoch < arm.epochs:
        if run.stop_after is not None and epochs_run.count >= run.stop_after:
            raise StopRequested(f"stopped after {epochs_run.count} epochs (--stop-after); continue with --resume")
        epoch = state.epoch + 1
        averaging_now = in_swa_phase(epoch)
        torch.manual_seed(epoch_seed(seed, epoch, ctx.rank))
        state.loader.set_epoch(epoch - 1)
        step_count = [(epoch - 1) * state.steps_per_epoch]  # global optimizer steps, for the tracker
        wall_start = time.perf_counter()

        def after_step() -> None:
            step_count[0] += 1
            if arm.scheduler_per_iteration and not (averaging_now and state.swa_scheduler is not None):
                state.scheduler.step()
            if state.tracker is not None and step_count[0] in state.record_steps:
                state.tracker.update(step_count[0])

        lr = state.optimizer.param_groups[0]["lr"]
        bar = _progress(run, f"seed {seed} {arm.name} {epoch}/{arm.epochs}", state.steps_per_epoch)
        stats = train_epoch(state.model, state.loader, state.optimizer, ctx, run.precision, scaler=state.scaler,
                            clip_grad_norm=arm.clip_grad_norm, after_step=after_step, progress=bar)
        share_rank0_buffers(state.model, ctx)  # FSDP2: the same BN statistics on every rank, as DDP has them
        if averaging_now:
            _average(state)
        if averaging_now and state.swa_scheduler is not None:
            state.swa_scheduler.step()
        elif not arm.scheduler_per_iteration:
            state.scheduler.step()
        tested = evaluate(unwrap(state.model), test, run.precision, ctx)
        row: dict[str, Any] = {"seed": seed, "arm": arm.name, "epoch": epoch, "steps": step_count[0], "lr": lr,
                               "train_loss": stats.loss, "train_acc": stats.accuracy,
                               "test_loss": tested.loss, "test_acc": tested.accuracy}
        if averaging_now:
            row.update(_evaluate_average(state, test, epoch))
        if arm.fge is not None and epoch > arm.fge.start and (epoch - arm.fge.start) % arm.fge.cycle == 0:
            row.update(_add_snapshot(state, test, epoch))
        if state.tracker is not None:
            if step_count[0] not in state.record_steps:  # every epoch end is a point too
                state.tracker.update(step_count[0])
            # The tracker was created in this session: its history starts after the restored records.
            state.distances = state.restored_distances + _distances(state)
            row["distance"] = state.distances[-1][1]
        row["epoch_seconds"] = stats.seconds
        state.seconds += time.perf_counter() - wall_start
        state.rows.append(row)
        state.epoch = epoch
        if epoch == arm.epochs:
            _finish(state, tested)
        if ctx.is_main:
            run.log(_epoch_line(row, arm))
        state.save(keep=epoch in keep_epochs)
        epochs_run.count += 1


def _distances(state: _ArmState) -> list[tuple[int, float]]:
    """``(step, ||w_t - w_0||)`` recorded by this session's tracker (under FSDP2 the tracker
    measures the whole model from the shards, the same on every rank)."""
    return [(int(r["step"]), r["total"]) for r in state.tracker.history]


def _average(state: _ArmState) -> None:
    device = state.run.ctx.device
    timing = state.averaging
    timing["fast_seconds"] += _timed(lambda: state.swa_model.update(state.model), device)
    if state.torch_swa_model is not None:
        timing["torch_seconds"] += _timed(lambda: state.torch_swa_model.update_parameters(state.model), device)
        diff = max((a - b).abs().max().item() for a, b in
                   zip(state.swa_model.parameters(), state.torch_swa_model.parameters()))
        timing["max_abs_diff"] = max(timing["max_abs_diff"], diff)
    timing["updates"] += 1


def _evaluate_average(state: _ArmState, test: EvalSet, epoch: int) -> dict[str, float]:
    """update_bn + test of the average, when this epoch is an evaluation or report point."""
    swa, arm = state.arm.swa, state.arm
    reported = {label for label, at in swa.report_at.items() if at == epoch}
    periodic = swa.eval_every > 0 and (epoch - swa.start) % swa.eval_every == 0
    if not (reported or periodic or epoch == arm.epochs):
        return {}
    # update_bn all-reduces the BN statistics across ranks under torchrun (every rank ends with the whole data's).
    tested = state.swa_model.evaluate(state.model, state.loader, test, state.run.precision, state.run.ctx)
    for label in reported:
        state.finals[label] = {"test_acc": tested.accuracy, "test_loss": tested.loss, "epoch": epoch}
    if epoch == arm.epochs:
        state.finals[swa.label] = {"test_acc": tested.accuracy, "test_loss": tested.loss, "epoch": epoch}
    return {"swa_test_loss": tested.loss, "swa_test_acc": tested.accuracy}


def _add_snapshot(state: _ArmState, test: EvalSet, epoch: int) -> dict[str, float]:
    probs, labels = predict(unwrap(state.model), test, state.run.precision)
    state.fge_probs = probs if state.fge_probs is None else state.fge_probs + probs
    state.fge_count += 1
    tested = score(state.fge_probs / state.fge_count, labels, state.run.ctx)
    if epoch == state.arm.epochs:
        state.finals[state.arm.fge.label] = {"test_acc": tested.accuracy, "test_loss": tested.loss, "epoch": epoch,
                                             "snapshots": state.fge_count}
    return {"fge_test_loss": tested.loss, "fge_test_acc": tested.accuracy, "fge_snapshots": state.fge_count}


def _finish(state: _ArmState, tested: Any) -> None:
    if state.arm.fge is not None and state.arm.fge.label not in state.finals:
        raise RuntimeError(f"arm {state.arm.name}: the last epoch took no FGE snapshot (cycles must end with it)")
    if state.swa_model is not None:
        # Once, at the end: DDP's replicated averages must be identical on every rank; a sharded one
        # records its digest and whether its BN statistics agree (see recipe_lib.averages).
        state.averaging.update(state.swa_model.consistency(state.run.ctx))
    if state.arm.label is not None:
        state.finals[state.arm.label] = {"test_acc": tested.accuracy, "test_loss": tested.loss,
                                         "epoch": state.epoch}
    state.finished = True


def _epoch_line(row: dict[str, Any], arm: Arm) -> str:
    parts = [f"seed {row['seed']} {arm.name} epoch {row['epoch']}/{arm.epochs}", f"lr {row['lr']:.3g}",
             f"train loss {row['train_loss']:.3f} acc {row['train_acc']:.4f}",
             f"test loss {row['test_loss']:.3f} acc {row['test_acc']:.4f}"]
    if "swa_test_acc" in row:
        parts.append(f"swa acc {row['swa_test_acc']:.4f}")
    if "fge_test_acc" in row:
        parts.append(f"fge acc {row['fge_test_acc']:.4f} ({row['fge_snapshots']} snapshots)")
    if "distance" in row:
        parts.append(f"|w-w0| {row['distance']:.3f}")
    parts.append(f"{row['epoch_seconds']:.1f}s")
    return " | ".join(parts)


def branch_points(arms: list[Arm]) -> dict[str, set[int]]:
    """For each arm, the epochs whose checkpoints other arms branch from (kept as separate files)."""
    keep: dict[str, set[int]] = {arm.name: set() for arm in arms}
    seen: set[str] = set()
    for arm in arms:
        if arm.branch_from is not None:
            source, at = arm.branch_from
            if source not in seen:
                raise ValueError(f"arm {arm.name} branches from {source!r}, which must run before it")
            keep[source].add(at)
        seen.add(arm.name)
    return keep


def run_all(arms: list[Arm], seeds: list[int], run: RunSettings) -> list[ArmResult]:
    """Every arm for every seed, in order; raises :class:`StopRequested` at ``--stop-after``."""
    keep = branch_points(arms)
    epochs_run = _EpochsRun()
    results = []
    for seed in seeds:
        for arm in arms:
            results.append(run_arm(arm, seed, run, keep[arm.name], epochs_run))
    return results
