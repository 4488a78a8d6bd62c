"""SWAP on the recipes' shared pieces: the option checks, the three arms and the run of ``examples/swap.py``
(the report is :mod:`recipe_lib.swap_report`'s).

Per seed ``s`` every arm starts from the same weights (``torch.manual_seed(s)`` before the model is built) and
trains with SGD (momentum, weight decay), its schedule stepped every iteration: a linear warm-up
(``swa_fast.regime.LinearWarmup``; the large-batch runs only), then a cosine decay to 0.

* **SB**: batch B_S on rank 0 alone, ``--lr``, ``--epochs`` E; the other ranks wait at a barrier after every
  epoch (one barrier an epoch, so no wait outlasts the process group's timeout);
* **LB**: DDP over the W ranks, B_L / W samples per rank and step (``BatchLoader(rank=, world_size=)``: each
  epoch's shuffle split as ``DistributedSampler`` splits it), lr ``sqrt_lr_scaling(lr, B_L, B_S)`` after
  ``--warmup-epochs`` of warm-up, E epochs;
* **SWAP**: phase 1 is the LB run itself (same weights, data, schedule), with an ``AccuracyThreshold`` fed
  every training batch's logits; after each epoch ``reached()`` (one all-reduce) ends it once the epoch's
  training accuracy over all ranks is at least ``--swap-threshold``, or after ``--phase1-max-epochs``. Phase 2:
  ``leave_ddp`` (the same module, no gradient all-reduce), a fresh SGD at ``--phase2-lr`` decaying to 0 over
  ``--phase2-epochs``, batch B_S over the whole training set in the rank's own order (the loader's seed from
  ``worker_generator(s)``: a hash of the seed and the rank). Phase 3: ``swap_average(model, bn_loader=this
  rank's shard of the training set in batches of B_S)``, then a check that every rank holds the same bits (one
  SHA-256 of the state dict per rank, gathered).

Time: training only (evaluation, logging and the identity check excluded), on rank 0's clock. The DDP epochs
and every phase are timed from a barrier to a barrier, so what is recorded is what the slowest worker took;
phase 2 has a barrier around every epoch (its workers are timed epoch by epoch, each epoch at its slowest
worker's pace). Weight updates: the optimizer steps of one worker (drop_last batches). Random draws of epoch
``e`` on rank ``r`` (augmentation) come from ``epoch_seed(s, e, r)``; a rerun gives the same numbers.

Evaluation: SB's model on rank 0 over the whole test set; the DDP model and the SWAP average split over the
ranks (``EvalSet``) and summed; in phase 2, every worker tests its own model (its own BN statistics, as it
stands) on the whole test set, and the ranks' results are gathered to rank 0.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

from swa_fast.parallel import AccuracyThreshold, leave_ddp, swap_average, worker_generator
from swa_fast.regime import LinearWarmup, sqrt_lr_scaling

from recipe_lib.checkpoint import tensors_digest
from recipe_lib.cli import RunData, check_distinct, check_epochs, check_warmup, load_run_data
from recipe_lib.distributed import DistContext, barrier, init_distributed, shutdown, unwrap, wrap_ddp
from recipe_lib.engine import ArmResult, epoch_seed, progress_bar
from recipe_lib.loader import BatchLoader
from recipe_lib.models import build_model
from recipe_lib.outputs import check_out
from recipe_lib.swap_report import LB, SB, SWAP, write_report
from recipe_lib.training import EpochStats, EvalSet, Precision, evaluate, train_epoch
from recipe_lib.verdict import MeasuredSpread

NAME = "swap"


# ------------------------------------------------------------------------------------ options


def world_size() -> int:
    """The ranks torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_batches(args: argparse.Namespace, train_size: int, world: int) -> None:
    """A full small batch in the training set, and a full share of the large batch in every rank's shard
    (the last partial batch of an epoch is dropped)."""
    if train_size < args.small_batch:
        raise SystemExit(f"--small-batch {args.small_batch} is more than the {train_size} training samples: there "
                         "is no full small batch to train on")
    world = max(1, world)
    per_rank, shard = args.large_batch // world, math.ceil(train_size / world)
    if shard < per_rank:
        raise SystemExit(f"--large-batch {args.large_batch}: each of the {world} worker(s) takes {per_rank} samples "
                         f"a step, more than its share ({shard}) of the {train_size} training samples: there is no "
                         "full large batch to train on")


def check_options(args: argparse.Namespace) -> None:
    """Every option that depends on another or that this recipe refuses, before the torchrun check, the data
    or a process group: the epochs, the batches (B_L a multiple of torchrun's ranks) and the warm-up."""
    if args.fsdp:
        raise SystemExit("--fsdp does not go with swap.py: SWAP's phase 2 trains a whole replica of the model on "
                         "every worker (leave_ddp), which FSDP2's shards are not")
    if args.resume:
        raise SystemExit("--resume: swap.py writes no checkpoints (every run trains every arm from scratch); run "
                         "it again without --resume")
    if args.stop_after is not None:
        raise SystemExit("--stop-after: swap.py writes no checkpoints to continue from (it has no --resume); "
                         "leave it out")
    check_distinct("--seeds", args.seeds)
    check_epochs(args.epochs, 1, "every arm trains at least one epoch")
    check_epochs(args.phase1_max_epochs, 1, "phase 1 trains at least one epoch", "--phase1-max-epochs")
    if args.phase1_max_epochs > args.epochs:
        raise SystemExit(f"--phase1-max-epochs {args.phase1_max_epochs} must not exceed --epochs ({args.epochs}): "
                         "phase 1 is the LB run (its schedule spans --epochs), stopped early")
    check_warmup("--warmup-epochs", args.warmup_epochs, args.epochs)
    if args.large_batch <= args.small_batch:
        raise SystemExit(f"--large-batch ({args.large_batch}) must be larger than --small-batch "
                         f"({args.small_batch})")
    world = world_size()
    if world > 1 and args.large_batch % world:
        raise SystemExit(f"--large-batch {args.large_batch} is not a multiple of the {world} workers: each worker "
                         "takes B_L / W samples a step")
    if args.train_subset:  # at most this many samples: the refusal holds for fewer too
        check_batches(args, args.train_subset, world)


def check_workers(argv: Sequence[str]) -> int:
    """The number of workers: at least 2 (torchrun), else a refusal that shows the torchrun command."""
    world = world_size()
    if world < 2:
        given = list(argv) if "--device" in argv else ["--device", "cpu", *argv]
        raise SystemExit("swap.py needs at least 2 workers (SWAP averages the weights of workers trained in "
                         "parallel), so it runs under torchrun, one process per worker:\n"
                         f"  torchrun --nproc_per_node=2 examples/swap.py {shlex.join(given)}")
    return world


def machine_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def rank_threads(args: argparse.Namespace) -> int:
    """Torch threads per rank: ``--threads``, else this machine's cores shared out among its ranks."""
    if args.threads:
        return args.threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, machine_cores() // max(1, local))


# ------------------------------------------------------------------------------------ the arms


class _Tap:
    """Feeds phase 1's ``AccuracyThreshold`` from ``train_epoch``: the batch iterator (its ``progress``
    wrapper) notes each batch's labels, and a forward hook on the training model passes the batch's logits
    with them to ``rule.update`` (counted on the device, no sync)."""

    def __init__(self, model: nn.Module, rule: AccuracyThreshold) -> None:
        self.rule = rule
        self.labels: torch.Tensor | None = None
        self.handle = model.register_forward_hook(self._hook)

    def batches(self, it: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in it:
            self.labels = labels
            yield images, labels

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training and self.labels is not None:
            self.rule.update(output.detach(), self.labels)

    def close(self) -> None:
        self.handle.remove()


@dataclass
class _Setup:
    """What every seed's arms share."""

    args: argparse.Namespace
    data: RunData
    ctx: DistContext
    log: Callable[[str], None]
    precision: Precision
    solo: DistContext = field(init=False)  # this rank on its own: no collective in its training or evaluation
    test_all: EvalSet = field(init=False)  # the whole test set, on this rank alone
    test_split: EvalSet = field(init=False)  # this rank's slice of the test set (the ranks' results summed)

    def __post_init__(self) -> None:
        self.solo = DistContext(0, 1, self.ctx.device)
        size, data = self.args.eval_batch_size, self.data
        self.test_all = EvalSet(data.test, size, self.solo, data.mean, data.std)
        self.test_split = EvalSet(data.test, size, self.ctx, data.mean, data.std)


@dataclass
class _LargeBatch:
    """A DDP run (the LB arm, or SWAP's phase 1) as it ended."""

    ddp: nn.Module | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    updates: int = 0
    epochs: int = 0
    reached: bool = False


def final(row: Mapping[str, Any], seconds: float, updates: int) -> dict[str, Any]:
    """An arm's row of the table: its last test accuracy and loss, wall time and weight updates."""
    return {"test_acc": row["test_acc"], "test_loss": row["test_loss"], "epoch": row["epoch"],
            "wall_seconds": seconds, "updates": updates}


class _SeedArms:
    """The three arms of one seed."""

    def __init__(self, seed: int, setup: _Setup) -> None:
        self.seed, self.setup = seed, setup
        self.args, self.ctx, self.data, self.precision = setup.args, setup.ctx, setup.data, setup.precision
        self.show = not self.args.no_progress and self.ctx.is_main

    # -- pieces ------------------------------------------------------------------------------------

    def _model(self) -> nn.Module:
        torch.manual_seed(self.seed)  # every arm starts from the same weights
        data = self.data
        model = build_model(self.args.model, data.train.num_classes, data.in_channels, data.image_size)
        model = model.to(self.ctx.device)
        return model.to(memory_format=torch.channels_last) if self.args.channels_last else model

    def _sgd(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=self.args.momentum,
                               weight_decay=self.args.weight_decay)

    @staticmethod
    def _schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LRScheduler:
        """Per iteration: linear warm-up over ``warmup`` steps, then cosine to 0 at step ``total``."""
        cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=0.0)
        return LinearWarmup(optimizer, warmup_steps=warmup, after=cosine)

    def _loader(self, batch_size: int, seed: int, shard: bool, drop_last: bool = True) -> BatchLoader:
        """Shuffled training batches: this rank's shard of every epoch (``shard``), or the whole set."""
        data, ctx = self.data, self.ctx
        rank, world = (ctx.rank, ctx.world_size) if shard else (0, 1)
        return BatchLoader(data.train, batch_size, shuffle=True, drop_last=drop_last, device=ctx.device,
                           augment=data.augment, seed=seed, rank=rank, world_size=world, mean=data.mean,
                           std=data.std)

    def _clock(self, together: bool) -> float:
        """Now, on this rank's clock, once the device is done (and, ``together``, once every rank is here)."""
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        if together:
            barrier(self.ctx)
        return time.perf_counter()

    def _train(self, model: nn.Module, loader: BatchLoader, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
               scaler: torch.amp.GradScaler | None, ctx: DistContext, epoch: int, desc: str, together: bool,
               wrap: Callable[[Iterator], Iterator] | None = None) -> tuple[EpochStats, float]:
        """One epoch of training (epoch ``epoch`` of the arm: its shuffle and random draws); its statistics and
        its start on :meth:`_clock` (the caller stops the clock)."""
        torch.manual_seed(epoch_seed(self.seed, epoch, self.ctx.rank))
        loader.set_epoch(epoch - 1)
        bar = progress_bar(self.show, desc, len(loader))
        if wrap is None:
            progress = bar
        else:
            progress = wrap if bar is None else (lambda it: bar(wrap(it)))
        start = self._clock(together)
        stats = train_epoch(model, loader, optimizer, ctx, self.precision, scaler=scaler, after_step=scheduler.step,
                            progress=progress)
        return stats, start

    def _gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        values: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(values, value)
        return values

    def _row(self, arm: str, phase: int | str, epoch: int, updates: int, lr: float | str, train: Sequence[Any],
             test: Sequence[float], seconds: float, elapsed: float) -> dict[str, Any]:
        return {"seed": self.seed, "arm": arm, "phase": phase, "epoch": epoch, "updates": updates, "lr": lr,
                "train_loss": train[0], "train_acc": train[1], "test_loss": test[0], "test_acc": test[1],
                "epoch_seconds": seconds, "elapsed_seconds": elapsed}

    def _log(self, label: str, row: Mapping[str, Any], of: int | str, note: str = "") -> None:
        train = f"train loss {row['train_loss']:.3f} acc {row['train_acc']:.4f} | " if row["train_acc"] != "" else ""
        lr = f"lr {row['lr']:.3g} | " if row["lr"] != "" else ""
        self.setup.log(f"seed {self.seed} {label} epoch {row['epoch']}/{of} | {lr}{train}test loss "
                       f"{row['test_loss']:.3f} acc {row['test_acc']:.4f}{note} | {row['epoch_seconds']:.1f}s "
                       f"(training so far {row['elapsed_seconds']:.1f}s, {row['updates']} updates)")

    # -- SB ----------------------------------------------------------------------------------------

    def sb(self) -> ArmResult:
        """Small batches on rank 0 alone; the other ranks wait at one barrier an epoch."""
        args, main = self.args, self.ctx.is_main
        rows: list[dict[str, Any]] = []
        seconds, updates = 0.0, 0
        if main:
            model = self._model()
            optimizer = self._sgd(model, args.lr)
            loader = self._loader(args.small_batch, self.seed, shard=False)
            scheduler = self._schedule(optimizer, 0, args.epochs * len(loader))
            scaler = self.precision.make_scaler(self.ctx.device)  # --amp fp16 only
        for epoch in range(1, args.epochs + 1):
            if main:
                lr = optimizer.param_groups[0]["lr"]
                stats, start = self._train(model, loader, optimizer, scheduler, scaler, self.setup.solo, epoch,
                                           f"seed {self.seed} SB {epoch}/{args.epochs}", together=False)
                took = self._clock(False) - start
                seconds, updates = seconds + took, updates + len(loader)
                tested = evaluate(model, self.setup.test_all, self.precision, self.setup.solo)
                rows.append(self._row("sb", "", epoch, updates, lr, (stats.loss, stats.accuracy),
                                      (tested.loss, tested.accuracy), took, seconds))
                self._log(SB, rows[-1], args.epochs)
            barrier(self.ctx)
        finals = {SB: final(rows[-1], seconds, updates)} if main else {}
        return ArmResult("sb", self.seed, rows, finals, {"wall_seconds": seconds, "updates": updates}, [], seconds)

    # -- LB and SWAP's phase 1 ---------------------------------------------------------------------

    def _large_batch(self, arm: str, label: str, epochs: int, rule: AccuracyThreshold | None) -> _LargeBatch:
        """The DDP run: B_L / W per rank, the sqrt-scaled lr after the warm-up, cosine over --epochs; with
        ``rule`` (phase 1), stopped after the first epoch whose training accuracy reaches the threshold."""
        args, ctx = self.args, self.ctx
        model = self._model()
        run = _LargeBatch(wrap_ddp(model, ctx))
        optimizer = self._sgd(model, sqrt_lr_scaling(args.lr, args.large_batch, args.small_batch))
        loader = self._loader(args.large_batch // ctx.world_size, self.seed, shard=True)
        steps = len(loader)
        scheduler = self._schedule(optimizer, round(args.warmup_epochs * steps), args.epochs * steps)
        scaler = self.precision.make_scaler(ctx.device)
        tap = None if rule is None else _Tap(run.ddp, rule)
        for epoch in range(1, epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            stats, start = self._train(run.ddp, loader, optimizer, scheduler, scaler, ctx, epoch,
                                       f"seed {self.seed} {label} {epoch}/{epochs}", together=True,
                                       wrap=None if tap is None else tap.batches)
            if rule is not None:
                run.reached = rule.reached()  # one all-reduce: the same answer on every rank
            took = self._clock(True) - start
            run.seconds, run.updates, run.epochs = run.seconds + took, run.updates + steps, epoch
            tested = evaluate(unwrap(run.ddp), self.setup.test_split, self.precision, ctx)
            run.rows.append(self._row(arm, "" if rule is None else 1, epoch, run.updates, lr,
                                      (stats.loss, stats.accuracy), (tested.loss, tested.accuracy), took,
                                      run.seconds))
            note = ""
            if rule is not None:
                note = f" | threshold {args.swap_threshold:g} {'reached' if run.reached else 'not reached'}"
            self._log(label, run.rows[-1], epochs, note)
            if run.reached:
                break
        if tap is not None:
            tap.close()
        return run

    def lb(self) -> ArmResult:
        run = self._large_batch("lb", LB, self.args.epochs, None)
        finals = {LB: final(run.rows[-1], run.seconds, run.updates)}
        return ArmResult("lb", self.seed, run.rows, finals, {"wall_seconds": run.seconds, "updates": run.updates},
                         [], run.seconds)

    # -- SWAP --------------------------------------------------------------------------------------

    def _phase2(self, model: nn.Module, first: int, elapsed: float, updates: int,
                rows: list[dict[str, Any]]) -> tuple[float, int, list[dict[str, float]]]:
        """Every rank on its own: small batches over the whole training set in its own order. Its seconds and
        updates, and every worker's own test loss and accuracy at the end."""
        args = self.args
        optimizer = self._sgd(model, args.phase2_lr)
        loader = self._loader(args.small_batch, worker_generator(self.seed).initial_seed(), shard=False)
        scheduler = self._schedule(optimizer, 0, args.phase2_epochs * len(loader))
        scaler = self.precision.make_scaler(self.ctx.device)
        seconds, workers = 0.0, []
        for k in range(1, args.phase2_epochs + 1):
            epoch = first + k
            lr = optimizer.param_groups[0]["lr"]
            stats, start = self._train(model, loader, optimizer, scheduler, scaler, self.setup.solo, epoch,
                                       f"seed {self.seed} SWAP phase 2 {k}/{args.phase2_epochs}", together=True)
            took = self._clock(True) - start
            seconds, updates = seconds + took, updates + len(loader)
            tested = evaluate(model, self.setup.test_all, self.precision, self.setup.solo)
            workers = [dict(zip(("train_loss", "train_acc", "test_loss", "test_acc"), values)) for values in
                       self._gather((stats.loss, stats.accuracy, tested.loss, tested.accuracy))]
            mean = {key: sum(w[key] for w in workers) / len(workers) for key in workers[0]}
            row = self._row("swap", 2, epoch, updates, lr, (mean["train_loss"], mean["train_acc"]),
                            (mean["test_loss"], mean["test_acc"]), took, elapsed + seconds)
            row.update({f"worker{r}_test_acc": w["test_acc"] for r, w in enumerate(workers)})
            rows.append(row)
            each = ", ".join(f"{100 * w['test_acc']:.2f}" for w in workers)
            self._log("SWAP phase 2 (mean of the workers)", row, first + args.phase2_epochs,
                      f" | workers' test acc % {each}")
        return seconds, updates, [{"test_acc": w["test_acc"], "test_loss": w["test_loss"]} for w in workers]

    def swap(self) -> ArmResult:
        args, ctx = self.args, self.ctx
        phase1 = self._large_batch("swap", "SWAP phase 1", args.phase1_max_epochs,
                                   AccuracyThreshold(args.swap_threshold))
        model = leave_ddp(phase1.ddp)  # the same module: phase 2 trains it without DDP's gradient all-reduce
        phase1.ddp = None
        rows = list(phase1.rows)
        p2_seconds, updates, workers = self._phase2(model, phase1.epochs, phase1.seconds, phase1.updates, rows)
        last = phase1.epochs + args.phase2_epochs

        # Phase 3: average, then the BN statistics over every rank's shard (batches of B_S, augmented as in training).
        bn_loader = self._loader(args.small_batch, self.seed, shard=True, drop_last=False)
        bn_loader.set_epoch(last)
        torch.manual_seed(epoch_seed(self.seed, last + 1, ctx.rank))
        start = self._clock(True)
        swap_average(model, bn_loader)
        p3_seconds = self._clock(True) - start
        digests = self._gather(tensors_digest(model.state_dict()))
        identical = len(set(digests)) == 1
        tested = evaluate(model, self.setup.test_split, self.precision, ctx)
        seconds = phase1.seconds + p2_seconds + p3_seconds
        rows.append(self._row("swap", 3, last, updates, "", ("", ""), (tested.loss, tested.accuracy), p3_seconds,
                              seconds))
        self._log("SWAP phase 3 (the average)", rows[-1], last,
                  f" | every rank identical: {'yes' if identical else 'NO'}")
        info = {"wall_seconds": seconds, "updates": updates, "phase1_epochs": phase1.epochs,
                "phase1_reached": phase1.reached, "phase1_train_acc": phase1.rows[-1]["train_acc"],
                "phase1_seconds": phase1.seconds, "phase1_updates": phase1.updates, "phase2_seconds": p2_seconds,
                "phase2_updates": updates - phase1.updates, "phase3_seconds": p3_seconds, "workers": workers,
                "ranks_identical": identical, "state_sha256": digests[0]}
        finals = {SWAP: final(rows[-1], seconds, updates)}
        return ArmResult("swap", self.seed, rows, finals, info, [], seconds)


# ------------------------------------------------------------------------------------ the run


def run_swap(args: argparse.Namespace, argv: Sequence[str], title: str,
             measured: Mapping[str, MeasuredSpread]) -> list[ArmResult]:
    """Train every seed's arms on the torchrun ranks and (rank 0) write the report; the results. The recipe's
    option checks (:func:`check_options`) have run before this."""
    check_workers(argv)
    check_out(args)  # --out writable: reads only
    threads = rank_threads(args)
    torch.set_num_threads(threads)
    ctx = init_distributed(args.device)
    try:
        return _run(args, title, measured, ctx, threads)
    finally:
        shutdown(ctx)


def _run(args: argparse.Namespace, title: str, measured: Mapping[str, MeasuredSpread], ctx: DistContext,
         threads: int) -> list[ArmResult]:
    log: Callable[[str], None] = (lambda text: print(text, flush=True)) if ctx.is_main else (lambda text: None)
    started = time.perf_counter()
    data = load_run_data(args, ctx, log, check=lambda train: check_batches(args, len(train), ctx.world_size))
    setup = _Setup(args, data, ctx, log, Precision(args.amp, args.channels_last))
    log(f"{NAME}: {len(data.train)} train / {len(data.test)} test samples of {data.train.name}, model {args.model}, "
        f"{ctx.world_size} workers on {ctx.device} ({threads} torch thread(s) each); SB batch {args.small_batch}, "
        f"LB batch {args.large_batch} ({args.large_batch // ctx.world_size} per worker), {args.epochs} epochs; "
        f"SWAP: phase 1 to training accuracy {args.swap_threshold:g} (at most {args.phase1_max_epochs} epochs), "
        f"phase 2 {args.phase2_epochs} epoch(s); {len(args.seeds)} seed(s)")
    results: list[ArmResult] = []
    for seed in args.seeds:
        arms = _SeedArms(seed, setup)
        results += [arms.sb(), arms.lb(), arms.swap()]
    if ctx.is_main:
        write_report(args, title, measured, results, data, ctx, threads, machine_cores(), time.perf_counter() - started)
    return results


__all__ = ["check_batches", "check_options", "check_workers", "machine_cores", "rank_threads",
           "run_swap", "world_size"]
