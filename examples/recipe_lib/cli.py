"""The command line every recipe shares, presets, and the driver that runs a recipe end to end.

A recipe supplies its own arguments, its presets and a function that turns the
parsed arguments into :class:`~recipe_lib.engine.Arm`\\ s; :func:`run_recipe`
does the rest: process group, data, model builder, training of every arm for
every seed, and (on rank 0) the metrics files, the table and the plots.

Presets: an option left unset on the command line takes the value of the
chosen ``--preset`` (``quick``: minutes on a 2-core CPU; ``paper``: the
papers' epochs and sizes, meant for a GPU). Any option given explicitly wins.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from recipe_lib.datasets import DATASET_NAMES, DatasetError, ImageDataset, load_dataset
from recipe_lib.distributed import DistContext, init_distributed, shutdown
from recipe_lib.engine import Arm, ArmResult, RunSettings, StopRequested, run_all
from recipe_lib.models import MODEL_NAMES, build_model
from recipe_lib.reporting import (
    averaging_table,
    distance_fits,
    plot_accuracy,
    plot_distance,
    results_table,
    write_metrics,
)
from recipe_lib.training import AMP_DTYPES, Precision
from recipe_lib.transforms import DEFAULT_STATS, channel_stats, compose, random_crop, random_hflip

Presets = dict[str, dict[str, Any]]


def preset_help(presets: Presets, key: str, text: str) -> str:
    """``text`` followed by the preset values of ``key``."""
    values = ", ".join(f"{name}: {values[key]}" for name, values in presets.items() if key in values)
    return f"{text} (presets: {values})" if values else text


def base_parser(description: str, presets: Presets, default_out: str) -> argparse.ArgumentParser:
    """The options every recipe has. Preset-controlled options default to ``None`` (filled by :func:`apply_preset`)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    h = partial(preset_help, presets)
    p.add_argument("--preset", choices=sorted(presets), default="quick", help="defaults for every unset option")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASET_NAMES, default="fashion_mnist",
                      help="fashion_mnist reads the IDX files of the Debian package dataset-fashion-mnist "
                           "(or --data-dir); cifar10/100 read the python pickle batches; folder reads "
                           "DIR/train and DIR/test class folders")
    data.add_argument("--data-dir", type=Path, default=None, help="where the data set's files are")
    data.add_argument("--image-size", type=int, default=None, help=h("image_size", "resize folder images to this"))
    data.add_argument("--train-subset", type=int, default=None,
                      help=h("train_subset", "train on this many samples drawn from the training split (0: all)"))
    data.add_argument("--test-subset", type=int, default=None,
                      help=h("test_subset", "evaluate on this many test samples (0: all)"))
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                      help=h("augment", "random crop with padding and horizontal flip of training batches"))
    run = p.add_argument_group("run")
    run.add_argument("--model", choices=MODEL_NAMES, default=None, help=h("model", "network"))
    run.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; the table gives mean ± std")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)")
    run.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none", help="autocast dtype (bf16/fp16 on GPU)")
    run.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and input")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--eval-batch-size", type=int, default=1000)
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs") / default_out, help="output directory")
    out.add_argument("--resume", action="store_true",
                     help="continue from the checkpoints in --out (finished arms are loaded, not retrained)")
    out.add_argument("--stop-after", type=int, default=None,
                     help="stop after this many epochs of this invocation (checkpoints kept; go on with --resume)")
    out.add_argument("--no-progress", action="store_true", help="no tqdm bars (one line per epoch is printed)")
    out.add_argument("--no-compare-torch", action="store_true",
                     help="do not also average with torch.optim.swa_utils (skips the timing comparison)")
    return p


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
    """What a recipe tells the driver."""

    name: str
    title: str
    make_arms: Callable[[argparse.Namespace, ImageDataset], list[Arm]]
    row_order: Callable[[argparse.Namespace], list[str]]
    baseline: Callable[[argparse.Namespace], str]
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


def run_recipe(spec: RecipeSpec, args: argparse.Namespace) -> list[ArmResult] | None:
    """Train every arm for every seed and write the report; returns the results (None when stopped early)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    try:
        return _run(spec, args, ctx)
    finally:
        shutdown(ctx)


def _log(ctx: DistContext) -> Callable[[str], None]:
    return (lambda text: print(text, flush=True)) if ctx.is_main else (lambda text: None)


def _run(spec: RecipeSpec, args: argparse.Namespace, ctx: DistContext) -> list[ArmResult] | None:
    log = _log(ctx)
    started = time.perf_counter()
    train, test = _load_data(args)
    mean, std = DEFAULT_STATS.get(train.name) or channel_stats(train.images)
    in_channels, image_size = train.images.shape[1], train.images.shape[-1]
    arms = spec.make_arms(args, train)

    def model_for(arm: Arm) -> torch.nn.Module:
        return build_model(args.model, train.num_classes, in_channels, image_size)

    precision = Precision(args.amp, args.channels_last)
    run = RunSettings(build_model=model_for, train_set=train, test_set=test,
                      augment=default_augment(train.name, train) if args.augment is not False else None,
                      mean=tuple(mean), std=tuple(std), ctx=ctx, precision=precision, out_dir=args.out,
                      resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress,
                      eval_batch_size=args.eval_batch_size, log=log)
    log(f"{spec.name}: {len(train)} train / {len(test)} test samples of {train.name} "
        f"({in_channels}x{image_size}x{image_size}, {train.num_classes} classes), model {args.model}, "
        f"{len(arms)} arm(s) x {len(args.seeds)} seed(s), {ctx.world_size} process(es) on {ctx.device}")
    try:
        results = run_all(arms, list(args.seeds), run)
    except StopRequested as stop:
        log(str(stop))
        return None
    wall = time.perf_counter() - started
    if ctx.is_main:
        _report(spec, args, results, arms, ctx, wall)
    return results


def _report(spec: RecipeSpec, args: argparse.Namespace, results: list[ArmResult], arms: list[Arm],
            ctx: DistContext, wall: float) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(results, spec.row_order(args), spec.baseline(args))
    timing = averaging_table(results)
    fits = distance_fits(results)
    arm_labels = {arm.name: arm.display_name for arm in arms}
    plots = [plot_accuracy(results, arm_labels, out / "accuracy.png", spec.title, spec.plot_x)]
    if fits:
        plots.append(plot_distance(results, arm_labels, out / "distance.png", fits))
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if ctx.enabled:
        command = f"torchrun --nproc_per_node={ctx.world_size} " + command[len("python "):]
    machine = machine_description(ctx.device)
    lines = [f"# {spec.title}", "", f"- command: `{command}`", f"- machine: {machine}",
             f"- processes: {ctx.world_size}", f"- wall time: {wall:.0f} s", f"- seeds: {list(args.seeds)}", "",
             table]
    if timing:
        lines += ["", "Weight averaging (`update_parameters`), the same calls on the same model:", "", timing]
    if fits:
        lines += ["", "Distance from initialization, fit ||w_t - w_0|| ~ a + b log t (first seed):", "",
                  "| arm | a | b | R² | final distance |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {arm_labels.get(arm, arm)} | {f['a']:.3f} | {f['b']:.3f} | {f['r2']:.3f} | {f['final']:.3f} |"
                  for arm, f in fits.items()]
    if spec.extra_report is not None:
        lines += ["", spec.extra_report(args, results)]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    report = "\n".join(lines) + "\n"
    (out / "results.md").write_text(report)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {"wall_seconds": wall, "machine": machine, "command": command, "processes": ctx.world_size,
               "table": table, "distance_fits": fits}
    write_metrics(results, out, config, summary)
    print("\n" + report + f"(written to {out}/: results.md, results.json, metrics.csv, "
          + ", ".join(p.name for p in plots if p is not None) + ")", flush=True)
