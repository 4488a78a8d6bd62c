"""What an EMA costs a training step on a GPU: none, averages on the GPU, averages offloaded to the host.

Usage (from the repository root, on a machine with a CUDA GPU and swa_fast built with its
CUDA kernels)::

    python -m benchmarks.offload                 # ResNet-50, batch 128, 224 px, bf16 autocast (about a minute)
    python -m benchmarks.offload --quick         # batch 64, fewer steps: under a minute on an H200
    python -m benchmarks.offload --device cpu --model tiny --quick   # the plumbing on a CPU (no offload there)

Without a CUDA device it prints why and exits 0 (unless ``--device cpu`` asks for the
CPU plumbing run, whose figures mean nothing: on the CPU ``device="cpu"`` is no offload).

The model is torchvision's ResNet-50 rebuilt here (torchvision is not a dependency):
the same 161 parameters, 25,557,032 values, as ``benchmarks.cases.resnet50_shapes``,
in channels_last, trained with SGD (momentum 0.9, foreach) on one synthetic batch
held on the device (no data loading), under bf16 autocast by default. After
``--warmup`` steps without an EMA (cuDNN autotuning), three modes run on the same
model and optimizer, in interleaved blocks (each round runs every mode for
``--warmup`` untimed and ``--steps`` timed steps; the order rotates between rounds):

* ``none``: forward, backward, ``optimizer.step()``.
* ``device``: then ``WeightAverage(model, get_ema_multi_avg_fn(0.999)).update(model)``,
  the averages on the GPU (one fused pass, no host sync).
* ``offload``: the same with ``WeightAverage(..., device="cpu")``: the update copies the
  parameters to pinned host memory on a side stream and averages them on the host in a
  worker thread; the training stream does not wait (``swa_fast/averaging/offload.py``).

Per mode and round: the wall-clock time of the timed steps divided by their number
(synchronised before and after; the pipeline of offloaded updates is in flight at both
ends, so this is the steady state), the median step from CUDA events recorded at the
start of every step (gaps where the GPU waits for the host included), and for the
update call the host time spent in it and the training stream's time between events
recorded just before and after it. The overhead is each mode's median step time over
the rounds relative to ``none``'s; the issue's target is ``offload`` within 5%.

Results go to ``benchmarks/results/<device slug>-offload.json`` (schema ``offload-1``,
skipped by ``readme_tables.py``); a smoke run (``--quick``, or the CPU plumbing run) to
``benchmarks/results/scratch/``; ``--output`` wins.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as `python benchmarks/offload.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks.harness import (
    device_info,
    fill_defaults,
    git_commit,
    loadavg,
    results_folder,
    run_facts,
    save_report,
)

SCHEMA = "offload-1"
PROG = "python -m benchmarks.offload"
# The options a run leaves unset: a full run, and --quick (a smoke run).
FULL = {"batch_size": 128, "steps": 50, "warmup": 10, "rounds": 3}
QUICK = {"batch_size": 64, "steps": 20, "warmup": 5, "rounds": 2}
EMA_DECAY = 0.999
MODES = ("none", "device", "offload")
TARGET_OVERHEAD = 0.05  # offloaded EMA within 5% of no EMA
SKIP_NO_CUDA = "skipping the offload benchmark: no CUDA device is available (it times GPU training steps; " \
               "--device cpu runs its plumbing on the CPU, with no offload)"


# ---------------------------------------------------------------------------
# The model: torchvision's ResNet-50 (v1.5), without torchvision
# ---------------------------------------------------------------------------


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)  # stride here (v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with bottleneck blocks: ``resnet(blocks=(3, 4, 6, 3))`` is ResNet-50."""

    def __init__(self, blocks: Sequence[int] = (3, 4, 6, 3), base_width: int = 64, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers, in_channels = [], base_width
        for index, count in enumerate(blocks):
            width = base_width * 2 ** index
            stage = []
            for block in range(count):
                stage.append(Bottleneck(in_channels, width, stride=2 if block == 0 and index > 0 else 1))
                in_channels = width * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# name -> (builder, image size, classes, what it is)
MODELS: Dict[str, tuple] = {
    "resnet50": (lambda: ResNet((3, 4, 6, 3), 64, 1000), 224, 1000, "ResNet-50 (torchvision v1.5 layout), 25.6M"),
    "tiny": (lambda: ResNet((1, 1, 1, 1), 8, 10), 32, 10, "a 4-block bottleneck ResNet of width 8 (plumbing)"),
}


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


class Clock:
    """Marks on the current stream (CUDA events) or the host clock (CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _stats(samples: Sequence[float]) -> dict:
    median = statistics.median(samples)
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [median] * 3
    return {"median_ms": median, "min_ms": min(samples), "max_ms": max(samples), "q1_ms": quartiles[0],
            "q3_ms": quartiles[2], "count": len(samples)}


class Trainer:
    """One model, optimizer and synthetic batch; ``block(mode, steps)`` runs and times steps."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        from swa_fast import WeightAverage
        from swa_fast.swa_utils import get_ema_multi_avg_fn

        build, image_size, classes, _ = MODELS[args.model]
        torch.manual_seed(0)
        self.device = device
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = build().to(device=device, memory_format=memory_format)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4,
                                         foreach=True)
        generator = torch.Generator(device="cpu").manual_seed(1)
        self.images = torch.randn(args.batch_size, 3, image_size, image_size, generator=generator).to(
            device=device, memory_format=memory_format)
        self.labels = torch.randint(0, classes, (args.batch_size,), generator=generator).to(device)
        self.amp = args.amp
        self.clock = Clock(device)
        ema = get_ema_multi_avg_fn(EMA_DECAY)
        self.averages = {}
        if "device" in args.modes:
            self.averages["device"] = WeightAverage(self.model, ema)
        if "offload" in args.modes:
            self.averages["offload"] = WeightAverage(self.model, ema, device="cpu")

    def averages_facts(self) -> dict:
        facts = {}
        for mode, average in self.averages.items():
            tensors = list(average.state_dict()["averages"].values())
            facts[mode] = {"averages_bytes": sum(t.numel() * t.element_size() for t in tensors),
                           "averages_device": str(tensors[0].device) if tensors else None,
                           "pinned_staging": mode == "offload" and self.device.type == "cuda"}
        return facts

    def step(self, average, update_ms: Optional[List[float]], stream_marks: Optional[List[tuple]]) -> None:
        """One training step, then ``average.update`` (None: no EMA); with lists given, the update
        call's host ms and the (before, after) marks on the training stream are appended."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16"):
            loss = nn.functional.cross_entropy(self.model(self.images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if average is not None:
            before = self.clock.mark()
            begin = time.perf_counter()
            average.update(self.model)
            host = (time.perf_counter() - begin) * 1e3
            after = self.clock.mark()
            if update_ms is not None:
                update_ms.append(host)
                stream_marks.append((before, after))

    def block(self, mode: str, warmup: int, steps: int) -> dict:
        """``warmup`` untimed then ``steps`` timed steps of ``mode``; its figures."""
        average = self.averages.get(mode)
        for _ in range(warmup):
            self.step(average, None, None)
        self.clock.sync()
        update_ms: List[float] = []
        stream_marks: List[tuple] = []
        marks = []
        begin = time.perf_counter()
        for _ in range(steps):
            marks.append(self.clock.mark())
            self.step(average, update_ms, stream_marks)
        marks.append(self.clock.mark())
        self.clock.sync()
        wall_ms = (time.perf_counter() - begin) * 1e3 / steps
        # Drain the offloaded updates still in flight before the next block (untimed).
        if average is not None:
            average.synchronize()
        step_ms = [self.clock.ms(a, b) for a, b in zip(marks, marks[1:])]
        result = {"wall_ms_per_step": wall_ms, "event_step": _stats(step_ms)}
        if average is not None:
            result["update_call_host"] = _stats(update_ms)
            result["update_on_training_stream"] = _stats([self.clock.ms(a, b) for a, b in stream_marks])
        return result


def summarize(rounds: List[Dict[str, dict]], modes: Sequence[str]) -> dict:
    """Per mode: the per-round figures, their medians, and the overhead vs ``none``."""
    summary = {}
    for mode in modes:
        blocks = [r[mode] for r in rounds]
        entry = {
            "rounds": blocks,
            "wall_ms_per_step_median": statistics.median(b["wall_ms_per_step"] for b in blocks),
            "event_step_median_ms": statistics.median(b["event_step"]["median_ms"] for b in blocks),
        }
        if mode != "none":
            entry["update_call_host_median_ms"] = statistics.median(b["update_call_host"]["median_ms"] for b in blocks)
            entry["update_on_training_stream_median_ms"] = statistics.median(
                b["update_on_training_stream"]["median_ms"] for b in blocks)
        summary[mode] = entry
    if "none" in summary:
        base = summary["none"]
        for mode, entry in summary.items():
            entry["overhead_wall"] = entry["wall_ms_per_step_median"] / base["wall_ms_per_step_median"] - 1
            entry["overhead_event"] = entry["event_step_median_ms"] / base["event_step_median_ms"] - 1
    return summary


def target_line(summary: dict) -> Optional[str]:
    if "none" not in summary or "offload" not in summary:
        return None
    overhead = summary["offload"]["overhead_wall"]
    verdict = "met" if overhead <= TARGET_OVERHEAD else "missed"
    return (f"target: offloaded EMA within {TARGET_OVERHEAD:.0%} of no EMA (wall clock): "
            f"{overhead:+.1%}, {verdict}")


def format_table(summary: dict) -> List[str]:
    lines = [f"   {'mode':<8}  {'wall ms/step':>12}  {'event ms/step':>13}  {'overhead':>8}  {'update call (host)':>18}"
             f"  {'update on training stream':>25}"]
    for mode, entry in summary.items():
        host = entry.get("update_call_host_median_ms")
        stream = entry.get("update_on_training_stream_median_ms")
        overhead = entry.get("overhead_wall")
        lines.append(
            f"   {mode:<8}  {entry['wall_ms_per_step_median']:>12.2f}  {entry['event_step_median_ms']:>13.2f}"
            f"  {'' if overhead is None else f'{overhead:+.1%}':>8}"
            f"  {'' if host is None else f'{host:.3f} ms':>18}  {'' if stream is None else f'{stream:.3f} ms':>25}")
    line = target_line(summary)
    if line:
        lines.append("   " + line)
    return lines


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Training-step time on a GPU with no EMA, an EMA on the GPU and an EMA offloaded to the host "
                    "(WeightAverage(model, ema, device='cpu')).",
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (default; without a GPU the benchmark skips); cpu runs the plumbing only")
    parser.add_argument("--model", choices=list(MODELS), default="resnet50")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="default: all three")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128; 64 with --quick")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block (default 50; 20 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps before each block (default 10; 5 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="blocks per mode, interleaved (default 3; 2 with --quick)")
    parser.add_argument("--amp", choices=["bf16", "none"], default=None,
                        help="autocast dtype (default bf16 on cuda, none on cpu)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="keep the model and batch contiguous (default: channels_last)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: under a minute on an H200; JSON in benchmarks/results/scratch/")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: see the module docstring)")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    fill_defaults(args, {**(QUICK if args.quick else FULL), "amp": "bf16" if args.device == "cuda" else "none"})
    args.modes = [mode for mode in MODES if mode in args.modes]
    if min(args.batch_size, args.steps, args.rounds) < 1 or args.warmup < 1:
        parser.error("--batch-size, --steps, --rounds and --warmup must be >= 1 (a warm-up step makes the first "
                     "update, the copy, before timing)")
    return args


def is_smoke_run(args: argparse.Namespace) -> bool:
    return args.quick or args.device == "cpu"


def default_output(args: argparse.Namespace, slug: str) -> Path:
    model = "" if args.model == "resnet50" else "-" + args.model
    return results_folder(is_smoke_run(args)) / f"{slug}-offload{model}.json"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the modes, print the table, write the JSON; returns the report (``{"skipped": why}``
    without a CUDA device)."""
    args = parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print(SKIP_NO_CUDA, flush=True)
            return {"skipped": SKIP_NO_CUDA}
    import swa_fast
    from swa_fast.ops.build_facts import build_summary

    if args.device == "cuda" and not swa_fast.BUILD_INFO["cuda"] and "device" in args.modes:
        print("swa_fast is built without CUDA kernels: the 'device' mode is left out (build with SWA_FAST_CUDA=1 "
              "to time it)", flush=True)
        args.modes = [mode for mode in args.modes if mode != "device"]
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    info = device_info(device)
    commit = git_commit()
    _, _, _, model_note = MODELS[args.model]
    where = info["label"] if device.type == "cuda" else f"CPU {info['name']}, {info['threads']} threads"
    print(f"swa_fast {swa_fast.__version__} ({build_summary(swa_fast.BUILD_INFO)}), torch {torch.__version__}, "
          f"{where}, commit {commit}", flush=True)
    if device.type == "cpu":
        print("CPU plumbing run: averages 'offloaded' to the CPU of a CPU model are not offloaded; the figures "
              "mean nothing", flush=True)
    begin = time.perf_counter()
    trainer = Trainer(args, device)
    num_params = sum(p.numel() for p in trainer.model.parameters())
    print(f"== {args.model}: {model_note}; {num_params:,} parameters, batch {args.batch_size}, amp {args.amp}, "
          f"{'channels_last' if args.channels_last else 'contiguous'}; {args.warmup} warm-up steps, then {args.rounds} "
          f"rounds of {args.warmup} warm-up + {args.steps} timed steps per mode, modes interleaved; load average "
          f"{loadavg()}", flush=True)
    # cuDNN's autotuning and the allocator's growth happen here, before any mode's block.
    for _ in range(args.warmup):
        trainer.step(None, None, None)
    trainer.clock.sync()
    rounds: List[Dict[str, dict]] = []
    for index in range(args.rounds):
        shift = index % len(args.modes)
        done = {}
        for mode in args.modes[shift:] + args.modes[:shift]:
            done[mode] = trainer.block(mode, args.warmup, args.steps)
        rounds.append({mode: done[mode] for mode in args.modes})
    summary = summarize(rounds, args.modes)
    report = {
        "schema": SCHEMA,
        "device": info,
        **run_facts(commit, " ".join([PROG, *(sys.argv[1:] if argv is None else list(argv))])),
        "loadavg_end": loadavg(),
        "settings": {key: getattr(args, key) for key in ("device", "model", "modes", "batch_size", "steps", "warmup",
                                                          "rounds", "amp", "channels_last", "lr", "quick")},
        "model": {"name": args.model, "note": model_note, "num_params": num_params,
                  "num_tensors": len(list(trainer.model.parameters()))},
        "ema_decay": EMA_DECAY,
        "averages": trainer.averages_facts(),
        "target_overhead": TARGET_OVERHEAD,
        "modes": summary,
        "wall_s": time.perf_counter() - begin,
    }
    if device.type == "cuda":
        report["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print("\n".join(format_table(summary)), flush=True)
    print(f"total {report['wall_s']:.1f} s", flush=True)
    if not args.no_save:
        save_report(report, args.output or default_output(args, info["slug"]),
                    smoke_default=args.output is None and is_smoke_run(args))
    return report


if __name__ == "__main__":
    main()
