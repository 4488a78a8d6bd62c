"""The command line every recipe shares, presets, and the driver that runs a recipe end to end.

A recipe supplies its own arguments, its presets and a function that turns the
parsed arguments into :class:`~recipe_lib.engine.Arm`\\ s; :func:`run_recipe`
does the rest: process group, data, model builder, training of every arm for
every seed, and (on rank 0) the metrics files, the table and the plots.

Presets: an option left unset on the command line takes the value of the
chosen ``--preset`` (``smoke``: under a minute on a 2-core CPU, the whole path
on small subsets; ``quick``, the default: minutes, the runs docs/RESULTS.md
measured; ``paper``: the papers' epochs and sizes, meant for a GPU). Any
option given explicitly wins.

Option checks, all before any data loads or a process group starts, so a bad
option fails at once, names itself and leaves nothing behind: every numeric
option has an argparse ``type`` with its range (:class:`Number`, also applied
to the preset's values), the checks that involve several options are the
``check_*`` functions here (the recipes' ``make_arms`` call them; it runs once
without data first), and :func:`recipe_lib.outputs.check_out` checks ``--out``,
``--resume`` and ``--restart``.

A run ends with its tables, the list of files it wrote (sizes, checkpoints
included) and a plain-language verdict (:mod:`recipe_lib.verdict`) as the
last lines printed.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from recipe_lib.datasets import DATASET_NAMES, DatasetError, ImageDataset, load_dataset
from recipe_lib.distributed import DistContext, barrier, init_distributed, resolve_device, shutdown
from recipe_lib.engine import Arm, ArmResult, RunSettings, StopRequested, run_all
from recipe_lib.models import MODEL_NAMES, build_model
from recipe_lib.outputs import check_out, start_run, write_atomic
from recipe_lib.reporting import (
    averaging_table,
    distance_fits,
    final_rows,
    outputs_lines,
    plot_accuracy,
    plot_distance,
    results_table,
    write_metrics,
)
from recipe_lib.training import AMP_DTYPES, Precision
from recipe_lib.transforms import DEFAULT_STATS, channel_stats, compose, random_crop, random_hflip
from recipe_lib.verdict import MeasuredSpread, verdict_lines

Presets = dict[str, dict[str, Any]]


DEFAULT_PRESET = "quick"
PRESET_HELP = ("the values of every option not given: smoke = under a minute on a 2-core CPU, checks the whole "
               "path on small subsets (its accuracies are not results); quick (the default) = minutes, the runs "
               "measured in docs/RESULTS.md; paper = the papers' regimes, meant for a GPU")


def _preset_value(value: Any, zero: str | None) -> str:
    """A preset value as the help shows it: lists space-separated, booleans on/off, ``0 = all``-style notes."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{text} = {zero}" if zero is not None and value == 0 else text


def preset_help(presets: Presets, key: str, text: str, zero: str | None = None) -> str:
    """``text`` followed by the presets' values of ``key``, the default preset first.

    E.g. ``"... (quick preset: 20000; smoke: 2048; paper: 0 = all)"``, or ``"(every preset: 128)"``;
    ``zero`` names what 0 means. Presets that leave ``key`` unset (``None``) are not listed.
    """
    names = sorted(presets, key=lambda name: name != DEFAULT_PRESET)
    shown = [(name, presets[name][key]) for name in names if presets[name].get(key) is not None]
    if not shown:
        return text
    if len(shown) == len(presets) > 1 and all(value == shown[0][1] for _, value in shown):
        return f"{text} (every preset: {_preset_value(shown[0][1], zero)})"
    parts = [f"{name}{' preset' if i == 0 else ''}: {_preset_value(value, zero)}"
             for i, (name, value) in enumerate(shown)]
    return f"{text} ({'; '.join(parts)})"


@dataclass(frozen=True)
class Number:
    """The argparse ``type`` of a numeric option, with its range: ``kind`` (int or float) at least
    ``low`` (more than it when ``low_open``) and below ``high`` (at most it unless ``high_open``);
    floats must be finite. ``zero`` says what 0 means where it is allowed (``"all"``).

    A value out of range is refused with the option's name, the rule and the value, e.g.
    ``argument --lr: must be a finite number > 0, got -1``. Options whose range depends on other
    options (``--epochs``, ``--swa-start``) are plain ``INTEGER``\\ s and the ``check_*`` functions
    below check them.
    """

    kind: type
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    zero: str | None = None

    def rule(self) -> str:
        """The range in words: ``an integer >= 1``, ``a finite number > 0``, ``a number >= 0 and < 1``."""
        noun = "an integer" if self.kind is int else "a finite number"
        if self.high is not None and not self.high_open and self.kind is int:
            return f"{noun} from {self.low} to {self.high}"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high}")
            noun = noun.replace("finite ", "")
        text = " ".join([noun, " and ".join(parts)]).strip()
        return f"{text} ({self.zero_note})" if self.zero else text

    @property
    def zero_note(self) -> str:
        return f"0 = {self.zero}"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (self.kind is int and not isinstance(value, int)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if not self.accepts(value):
            raise argparse.ArgumentTypeError(f"must be {self.rule()}, got {text}")
        return value


INTEGER = Number(int)  # range checked with other options (check_epochs, check_swa_start, ...)
COUNT = Number(int, 1)  # sizes, batch sizes, cycles, threads
SUBSET = Number(int, 0, zero="all")
SEED = Number(int, 0, high=2**32 - 1)  # seed + epoch still seeds a generator
RATE = Number(float, 0, low_open=True)  # learning rates, a gradient-norm bound
NON_NEGATIVE = Number(float, 0)  # weight decay, warm-up epochs
NON_NEGATIVE_INT = Number(int, 0)  # anneal or warm-up epochs
MOMENTUM = Number(float, 0, high=1, high_open=True)


def device_option(text: str) -> str:
    """``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` with N a device this machine has."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s)")
    return text


class RecipeArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors raise ``SystemExit(message)`` (printed, exit status 1) after the
    usage, like every other option check of the recipes, so callers and tests see the message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise SystemExit(f"{self.prog}: error: {message}")


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every :class:`Number` option's value, the presets' and the defaults included, within its range."""
    for action in parser._actions:
        if not isinstance(action.type, Number):
            continue
        value = getattr(args, action.dest, None)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and not action.type.accepts(item):
                parser.error(f"argument {'/'.join(action.option_strings)}: must be {action.type.rule()}, got "
                             f"{item} (the {args.preset} preset's value)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where there is a default to show.

    Preset-controlled options default to ``None`` (their help lists the
    presets' values instead), flags to ``False``, and some help texts say
    their default in words: argparse would add ``(default: None)`` to all.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # Identity, not ==: a default of 0 or 0.0 (== False) is a value to show.
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in text:
            return text
        return super()._get_help_string(action)


def base_parser(description: str, presets: Presets, default_out: str) -> argparse.ArgumentParser:
    """The options every recipe has. Preset-controlled options default to ``None`` (filled by :func:`apply_preset`)."""
    p = RecipeArgumentParser(description=description, formatter_class=HelpFormatter)
    h = partial(preset_help, presets)
    p.add_argument("--preset", choices=list(presets), default=DEFAULT_PRESET, help=PRESET_HELP)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASET_NAMES, default="fashion_mnist",
                      help="fashion_mnist reads the IDX files of the Debian package dataset-fashion-mnist "
                           "(or --data-dir); cifar10/100 read the python pickle batches; folder reads "
                           "DIR/train and DIR/test class folders")
    data.add_argument("--data-dir", type=Path, default=None, help="where the data set's files are")
    data.add_argument("--image-size", type=COUNT, default=None,
                      help=h("image_size", "resize folder images to this (other data sets keep their size)"))
    data.add_argument("--train-subset", type=SUBSET, default=None,
                      help=h("train_subset", "train on this many samples drawn from the training split "
                                             f"({SUBSET.zero_note})", zero="all"))
    data.add_argument("--test-subset", type=SUBSET, default=None,
                      help=h("test_subset", f"evaluate on this many test samples ({SUBSET.zero_note})", zero="all"))
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                      help=h("augment", "random crop with padding and horizontal flip of training batches"))
    run = p.add_argument_group("run")
    run.add_argument("--model", choices=MODEL_NAMES, default=None, help=h("model", "network"))
    run.add_argument("--seeds", type=SEED, nargs="+", default=[0], help="one run per seed; the table gives mean ± std")
    run.add_argument("--device", default="auto", type=device_option,
                     help="auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)")
    run.add_argument("--fsdp", action="store_true",
                     help="shard the model with FSDP2 (fully_shard) instead of replicating it with DDP; meant "
                          "for torchrun (gloo on CPU, nccl on GPU), without it a one-rank group. SWA then "
                          "averages the shards with swa_fast.WeightAverage (evaluated through swapped_into), "
                          "there is no torch.optim.swa_utils comparison (as --no-compare-torch), and "
                          "checkpoints hold full tensors gathered on rank 0; --resume needs --fsdp again")
    run.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none", help="autocast dtype (bf16/fp16 on GPU)")
    run.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and input")
    run.add_argument("--threads", type=COUNT, default=None, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--eval-batch-size", type=COUNT, default=1000,
                     help="batch size of the test-set evaluations (the model is in eval mode: no effect on results)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs") / default_out,
                     help="output directory (a new run replaces a finished run there)")
    start = out.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the checkpoints in --out (finished arms are loaded, not retrained); "
                            "refused, naming them, where options that change the results differ from the "
                            "checkpoints' (--out, --device, --threads, --eval-batch-size, --seeds, --stop-after, "
                            "--no-progress and --no-compare-torch may change)")
    start.add_argument("--restart", action="store_true",
                       help="start over: delete the run in --out (its checkpoints and report) and train from "
                            "scratch; needed where --out holds an unfinished run (a run without --resume or "
                            "--restart refuses to replace one)")
    out.add_argument("--stop-after", type=COUNT, default=None,
                     help="stop after this many epochs of this invocation (checkpoints kept; go on with --resume)")
    out.add_argument("--no-progress", action="store_true", help="no tqdm bars (one line per epoch is printed)")
    out.add_argument("--no-compare-torch", action="store_true",
                     help="do not also average with torch.optim.swa_utils (skips the timing comparison)")
    return p


def check_epochs(epochs: int, minimum: int, why: str, option: str = "--epochs") -> None:
    """Refuse too few epochs with a message about the epochs themselves (before any option that depends on them)."""
    if epochs < minimum:
        raise SystemExit(f"{option} {epochs} is too few: {why} (at least {minimum})")


def check_within_epochs(name: str, value: float, epochs: int, why: str, option: str = "--epochs") -> None:
    """``value`` (an epoch of the run) must lie inside it: from 1 to ``epochs - 1``."""
    if not 0 < value < epochs:
        raise SystemExit(f"{name} {value} must be between 1 and {option} - 1 = {epochs - 1} ({why})")


def check_swa_start(start: int, epochs: int, option: str = "--epochs", name: str = "--swa-start") -> None:
    """``--swa-start`` must leave at least one epoch before it and one to average after it."""
    check_within_epochs(name, start, epochs, f"{option} is {epochs}: averaging takes the weights after every "
                                             f"epoch past {name}", option)


def check_warmup(name: str, value: float, epochs: int, option: str = "--epochs") -> None:
    """A warm-up is a part of the run: at most its epochs."""
    if value > epochs:
        raise SystemExit(f"{name} {value:g} must not exceed {option} ({epochs}): the warm-up is a part of the run")


def check_distinct(name: str, values: Iterable[Any], shown: Callable[[Any], str] = str) -> None:
    """No value given twice (as the run would show it: ``0.05`` and ``5e-2`` are one arm)."""
    seen: set[str] = set()
    for value in values:
        text = shown(value)
        if text in seen:
            raise SystemExit(f"{name}: {text} is given twice")
        seen.add(text)


def apply_preset(args: argparse.Namespace, presets: Presets) -> argparse.Namespace:
    """Fill every option still ``None`` from the chosen preset."""
    for key, value in presets[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def default_augment(name: str, image: ImageDataset) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random crop with padding (1/8 of the side) and a horizontal flip; flip only for large photos."""
    side = image.images.shape[-1]
    if side > 64:  # folder photos (Intel scenes): the tutorial's Resize + RandomHorizontalFlip
        return random_hflip
    return compose(partial(random_crop, padding=max(1, side // 8)), random_hflip)


def machine_description(device: torch.device) -> str:
    """CPU model and thread count, or the GPU's name."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


@dataclass
class RecipeSpec:
    """What a recipe tells the driver.

    Attributes:
        baseline: the row every other row is compared with.
        headline: the rows the verdict compares with the baseline (the best
            of them when there are several, e.g. a sweep).
        describe: a row label in words for the verdict (``SWA_8_0.0005`` ->
            ``SWA (start 8, swa_lr 0.0005)``).
        measured_spread: preset -> its seed-to-seed spread from docs/RESULTS.md.
    """

    name: str
    title: str
    make_arms: Callable[[argparse.Namespace, ImageDataset], list[Arm]]
    row_order: Callable[[argparse.Namespace], list[str]]
    baseline: Callable[[argparse.Namespace], str]
    headline: Callable[[argparse.Namespace], list[str]]
    describe: Callable[[str], str] = str
    measured_spread: dict[str, MeasuredSpread] = field(default_factory=dict)
    extra_report: Callable[[argparse.Namespace, Sequence[ArmResult]], str] | None = None
    plot_x: str = "epoch"


def _load_data(args: argparse.Namespace) -> tuple[ImageDataset, ImageDataset]:
    image_size = args.image_size if args.dataset == "folder" else None
    try:
        splits = load_dataset(args.dataset, args.data_dir, image_size)
    except DatasetError as error:
        hint = ("\nFashion-MNIST ships as a Debian package: sudo apt-get install -y dataset-fashion-mnist "
                "(or pass --data-dir with the four IDX files)") if args.dataset == "fashion_mnist" else ""
        raise SystemExit(f"error: {error}{hint}") from None
    train, test = splits.train, splits.test
    if args.train_subset:
        train = train.subset(args.train_subset, seed=12345)
    if args.test_subset:
        test = test.subset(args.test_subset, seed=54321)
    return train, test


@dataclass(frozen=True)
class RunData:
    """The data of a run, loaded: the splits (subsets taken), their normalization, the image shape and the
    training augmentation (None without ``--augment``)."""

    train: ImageDataset
    test: ImageDataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_channels: int
    image_size: int
    augment: Callable[[torch.Tensor], torch.Tensor] | None


def load_run_data(args: argparse.Namespace, ctx: DistContext, log: Callable[[str], None],
                  check: Callable[[ImageDataset], None] | None = None) -> RunData:
    """Load the data set, then (rank 0) clear ``--out`` for this run (:func:`~recipe_lib.outputs.start_run`):
    the previous run's files go, or a resumed run's stale report, only once the data is there. ``check``:
    the options that depend on the training split's size, checked before anything in ``--out`` is removed."""
    train, test = _load_data(args)
    if check is not None:
        check(train)
    if ctx.is_main:
        start_run(args, log)
    barrier(ctx)
    mean, std = DEFAULT_STATS.get(train.name) or channel_stats(train.images)
    augment = default_augment(train.name, train) if args.augment is not False else None
    return RunData(train, test, tuple(mean), tuple(std), train.images.shape[1], train.images.shape[-1], augment)


def run_recipe(spec: RecipeSpec, args: argparse.Namespace) -> list[ArmResult] | None:
    """Train every arm for every seed and write the report; returns the results (None when stopped early)."""
    if args.fsdp and args.channels_last:
        raise SystemExit("--channels-last does not go with --fsdp: FSDP2 shards contiguous parameters only "
                         "(it refuses channels_last convolution weights)")
    check_distinct("--seeds", args.seeds)
    # Arms are data and need no dataset to be built: building them once here checks every option before the
    # data loads or a process group starts, so a bad option fails at once, not after a minute of loading.
    spec.make_arms(args, None)  # type: ignore[arg-type]
    check_out(args)  # --out writable, --resume consistent with the checkpoints: reads only
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device, fsdp=args.fsdp)
    try:
        return _run(spec, args, ctx)
    finally:
        shutdown(ctx)


def start_one_process(args: argparse.Namespace, name: str, why: str) -> tuple[DistContext, Callable[[str], None]]:
    """The start of a recipe that runs in one process (``posthoc_ema.py``, ``swag.py``): torchrun refused
    (``why`` says why), ``--out`` checked (reads only), ``--threads`` set; its context and its log."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(f"{name}.py runs in one process ({why}): launch it with python, not torchrun")
    check_out(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = DistContext(0, 1, resolve_device(args.device))
    return ctx, _log(ctx)


def _log(ctx: DistContext) -> Callable[[str], None]:
    return (lambda text: print(text, flush=True)) if ctx.is_main else (lambda text: None)


def _run(spec: RecipeSpec, args: argparse.Namespace, ctx: DistContext) -> list[ArmResult] | None:
    log = _log(ctx)
    started = time.perf_counter()
    # torch's AveragedModel deep-copies the model, which FSDP2 refuses: set before make_arms, whose
    # SWASettings take it from args.
    skip_torch = ctx.fsdp and not args.no_compare_torch
    args.no_compare_torch = args.no_compare_torch or ctx.fsdp
    data = load_run_data(args, ctx, log)
    train, test, in_channels, image_size = data.train, data.test, data.in_channels, data.image_size
    arms = spec.make_arms(args, train)
    if skip_torch and any(arm.swa is not None for arm in arms):
        log("--fsdp: no comparison with torch.optim.swa_utils (its AveragedModel deep-copies the model, which "
            "FSDP2 refuses); the run goes on as with --no-compare-torch")

    def model_for(arm: Arm) -> torch.nn.Module:
        return build_model(args.model, train.num_classes, in_channels, image_size)

    precision = Precision(args.amp, args.channels_last)
    run = RunSettings(build_model=model_for, train_set=train, test_set=test, augment=data.augment,
                      mean=data.mean, std=data.std, ctx=ctx, precision=precision, out_dir=args.out,
                      resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress,
                      eval_batch_size=args.eval_batch_size, log=log)
    log(f"{spec.name}: {len(train)} train / {len(test)} test samples of {train.name} "
        f"({in_channels}x{image_size}x{image_size}, {train.num_classes} classes), model {args.model}, "
        f"{len(arms)} arm(s) x {len(args.seeds)} seed(s), {ctx.world_size} process(es) on {ctx.device}"
        + (", model sharded with FSDP2" if ctx.fsdp else ""))
    try:
        results = run_all(arms, list(args.seeds), run)
    except StopRequested as stop:
        log(str(stop))
        return None
    wall = time.perf_counter() - started
    if ctx.is_main:
        _report(spec, args, results, arms, ctx, wall)
    return results


def report_header(title: str, args: argparse.Namespace, ctx: DistContext, wall: float) -> tuple[list[str], str, str]:
    """The head of results.md (title, command, machine, processes, wall time, seeds, then a blank line),
    the command line as given and the machine in words."""
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if ctx.enabled:
        command = f"torchrun --nproc_per_node={ctx.world_size} " + command[len("python "):]
    machine = machine_description(ctx.device)
    lines = [f"# {title}", "", f"- command: `{command}`", f"- machine: {machine}",
             f"- processes: {ctx.world_size}" + (" (model sharded with FSDP2)" if ctx.fsdp else ""),
             f"- wall time: {wall:.0f} s", f"- seeds: {list(args.seeds)}", ""]
    return lines, command, machine


def _report(spec: RecipeSpec, args: argparse.Namespace, results: list[ArmResult], arms: list[Arm],
            ctx: DistContext, wall: float) -> None:
    """Write results.md/json, metrics.csv and the plots; print the tables, the outputs and, last, the verdict."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(results, spec.row_order(args), spec.baseline(args))
    timing = averaging_table(results)
    fits = distance_fits(results)
    arm_labels = {arm.name: arm.display_name for arm in arms}
    plots = [plot_accuracy(results, arm_labels, out / "accuracy.png", spec.title, spec.plot_x)]
    if fits:
        plots.append(plot_distance(results, arm_labels, out / "distance.png", fits))
    plots = [p for p in plots if p is not None]
    lines, command, machine = report_header(spec.title, args, ctx, wall)
    lines += [table]
    if timing:
        what = ("Weight averaging (`WeightAverage.update` of each rank's shards):" if ctx.fsdp else
                "Weight averaging (`update_parameters`), the same calls on the same model:")
        lines += ["", what, "", timing]
    if fits:
        lines += ["", "Distance from initialization, fit ||w_t - w_0|| ~ a + b log t (first seed):", "",
                  "| arm | a | b | R² | final distance |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {arm_labels.get(arm, arm)} | {f['a']:.3f} | {f['b']:.3f} | {f['r2']:.3f} | {f['final']:.3f} |"
                  for arm, f in fits.items()]
    if spec.extra_report is not None:
        lines += ["", spec.extra_report(args, results)]
    verdict = verdict_lines(final_rows(results, spec.row_order(args)), spec.baseline(args), spec.headline(args),
                            args.preset, args.dataset, spec.measured_spread, spec.describe)
    # results.md is Markdown: it keeps the plot links; the terminal gets the same text without them.
    images = [f"![{p.stem}]({p.name})" for p in plots]
    write_atomic(out / "results.md", "\n".join(lines + [""] + verdict + [""] + images) + "\n")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {"wall_seconds": wall, "machine": machine, "command": command, "processes": ctx.world_size,
               "table": table, "distance_fits": fits, "verdict": verdict[1:]}
    write_metrics(results, out, config, summary)
    written = ["results.md", "results.json", "metrics.csv"] + [p.name for p in plots] + ["checkpoints"]
    print("\n" + "\n".join(lines + [""] + outputs_lines(out, written) + [""] + verdict), flush=True)
