"""Averaging whole-model replicas across gloo ranks: ``average_replicas_`` vs the per-tensor loop and
torch's flat-bucket utilities.

Usage (from the repository root)::

    python -m benchmarks.replicas                 # every real set on 2 and 4 ranks (long)
    python -m benchmarks.replicas --quick         # tiny sets, 2 ranks, 3 rounds (a smoke run, scratch JSON)
    python -m benchmarks.replicas --sets resnet50 transformer --worlds 2 4
    python -m benchmarks.replicas --sets resnet50_bf16 --worlds 4 --repeats 10 --threads 1

Every rank builds its own replica of one parameter set (a module holding exactly the set's
parameters, no buffers) with different values on every rank: tensor ``i`` of rank ``r`` is
N(0, 0.02^2) drawn in the set's dtype from a ``torch.Generator`` seeded ``SEED + 1000003 * r + i``,
so any rank can rebuild any rank's tensor. The sets (``--sets``):

* ``resnet50``: the ResNet-50 set of the other suites (``benchmarks.cases`` ``resnet50``), fp32:
  161 tensors, 25,557,032 parameters, 102.2 MB.
* ``transformer``: the transformer set (``benchmarks.cases`` ``transformer``, ``gpt_shapes(24, 512)``),
  fp32: 292 tensors, 101,914,112 parameters, 407.7 MB.
* ``resnet50_bf16``: the ResNet-50 set as a bf16 model (51.1 MB).
* ``tiny``, ``tiny_bf16``: ``gpt_shapes(2, 32, vocab=100, context=16)`` (28 tensors) in fp32 / bf16,
  for ``--quick`` and the tests.

One call of a candidate averages this rank's whole replica with every other rank's, in place
(every rank ends with the mean):

* ``average_replicas_``: ``swa_fast.parallel.average_replicas_(model, buffers=False,
  bucket_mb=25.0)`` (``--bucket-mb``): flat buckets per (device, accumulation dtype), one
  asynchronous all-reduce per bucket, fp32 accumulation for bf16, the mean written back in place
  (plus its one small all-gather that checks every rank passed the same model).
* ``per_tensor_all_reduce``: ``for p in params: dist.all_reduce(p); p.div_(world)``, the baseline
  to beat: one collective per tensor, a bf16 model summed in bf16.
* ``flatten_dense_tensors``: what DDP-style code (apex, mmcv's ``allreduce_params``) does: per dtype,
  ``flat = torch._utils._flatten_dense_tensors(tensors)``, one ``all_reduce(flat)``,
  ``flat.div_(world)``, and ``t.copy_(s)`` for each ``s`` of ``_unflatten_dense_tensors(flat,
  tensors)``: one collective per dtype over a full-model flat copy, summed in the model's dtype.
* ``all_reduce_coalesced``: ``dist.all_reduce_coalesced(tensors)`` per dtype (gloo takes one dtype
  per call; gloo flattens the list itself) and ``torch._foreach_div_(tensors, world)``. It works on
  gloo in torch 2.13 but warns that it "will be deprecated"; the ranks silence that warning.

Accuracy: before timing, every candidate runs once on freshly built replicas; each rank compares
its share of the tensors (``i % world == rank``) with the float64 mean of all ranks' replicas (rebuilt
from the seeds) and the JSON keeps the largest absolute difference over all ranks, next to the
largest |value| of the replicas and of the mean (the scale to read it against), and whether the
result is bitwise identical on every rank (a SHA-256 of each rank's tensors). fp32 candidates sum in
fp32 and agree to a few fp32 ulps. For bf16 the per-tensor loop and both flat baselines sum in bf16:
on 2 ranks that is still one rounding of the exact mean (the sum of two bf16 values is rounded once
and halving is exact), so every candidate gives the same bits there (the ``--quick`` run shows it);
from 3 ranks up the bf16 sums round once per partial sum (gloo adds the ranks' chunks one at a time
in the tensor's dtype; a division by 3 rounds again), an error ``average_replicas_``'s fp32 sum and
single rounding avoid: ``resnet50_bf16`` on 4 ranks is the comparison that shows it.

On the tiny sets the fixed cost per call of ``average_replicas_`` (its check all-gather, the
asynchronous bucket) is most of the time, and the one-collective flat baselines are faster; the
per-tensor latency it removes shows on the real sets.

Timing, as in ``benchmarks/sharded.py``: the ranks are separate processes (one torch thread each by
default, ``--threads``; ``--worlds 4`` on a 2-core machine oversubscribes it) started by this
script with ``MASTER_ADDR``/``MASTER_PORT``, one launch per world size running every set in turn.
Each round runs every candidate once (a sample of ``inner`` calls, the same count on every rank,
after a barrier; the order rotates between rounds), after warm-up rounds. After the first call the
replicas are equal, which costs a collective the same. Per candidate the JSON has every rank's
samples, median, min and quartiles, the median over rounds of the slowest rank's sample (what a
training step waits for), the effective bandwidth (the model's bytes / that median), the collectives
per call, and the speedups of ``average_replicas_`` over the others (from those medians).

Results: one JSON per invocation holding every (set, world) combination under ``runs`` (keys
``<set>-<world>ranks``), schema ``replicas-1`` (``readme_tables.py`` skips it), at
``benchmarks/results/<device slug>-replicas.json`` for the full matrix (the three real sets on 2 and
4 ranks) and ``benchmarks/results/<device slug>-replicas-<set>[-<set>...]-<world>[-<world>...]ranks.json``
for any other choice; a smoke run (``--quick`` or fewer than ``harness.MIN_REPEATS`` rounds) goes to
``benchmarks/results/scratch/`` under the same name; ``--output`` wins. Every combination also
prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as `python benchmarks/replicas.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import gloo_bench
from benchmarks.cases import Shape, get_case, gpt_shapes
from benchmarks.harness import gbps, loadavg, results_folder

SCHEMA = "replicas-1"
PROG = "python -m benchmarks.replicas"
SEED = 1234
SEED_RANK_STRIDE = 1_000_003  # tensor i of rank r: seed SEED + SEED_RANK_STRIDE * r + i
STD = 0.02


@dataclass(frozen=True)
class ReplicaSet:
    shapes: Tuple[Shape, ...]
    dtype: str  # torch dtype name
    note: str

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    @property
    def model_bytes(self) -> int:
        return self.num_params * self.itemsize


_RESNET = tuple(get_case("resnet50").shapes)
_TINY = tuple(gpt_shapes(2, 32, vocab=100, context=16))
SETS: Dict[str, ReplicaSet] = {
    "resnet50": ReplicaSet(_RESNET, "float32", "ResNet-50 parameters (benchmarks.cases 'resnet50'), fp32"),
    "transformer": ReplicaSet(tuple(get_case("transformer").shapes), "float32",
                              "GPT-2-style 24 x 512 decoder parameters (benchmarks.cases 'transformer'), fp32"),
    "resnet50_bf16": ReplicaSet(_RESNET, "bfloat16",
                                "ResNet-50 parameters as a bf16 model (the baselines sum in bf16, "
                                "average_replicas_ in fp32)"),
    "tiny": ReplicaSet(_TINY, "float32", "GPT-2-style 2 x 32 decoder, vocab 100, fp32 (tests, --quick)"),
    "tiny_bf16": ReplicaSet(_TINY, "bfloat16", "GPT-2-style 2 x 32 decoder, vocab 100, bf16 (tests, --quick)"),
}

CANDIDATES: Dict[str, str] = {
    "average_replicas_": "swa_fast.parallel.average_replicas_(model, buffers=False, bucket_mb=B)",
    "per_tensor_all_reduce": "for p in params: dist.all_reduce(p); p.div_(world)",
    "flatten_dense_tensors": "per dtype: _flatten_dense_tensors, one all_reduce, div_, _unflatten_dense_tensors + "
                             "copy_ back",
    "all_reduce_coalesced": "per dtype: dist.all_reduce_coalesced(tensors) + _foreach_div_",
}
FAST = "average_replicas_"

# The options a run leaves unset: a full run, and --quick (a smoke run).
FULL = {"sets": ["resnet50", "transformer", "resnet50_bf16"], "worlds": [2, 4], "repeats": 15, "warmup": 2,
        "target_ms": 50.0, "budget": 300.0}
QUICK = {"sets": ["tiny", "tiny_bf16"], "worlds": [2], "repeats": 3, "warmup": 1, "target_ms": 5.0, "budget": 0.0}


def run_key(set_name: str, world: int) -> str:
    return f"{set_name}-{world}ranks"


# ---------------------------------------------------------------------------
# One rank (run as `python -m benchmarks.replicas --worker CONFIG_JSON`)
# ---------------------------------------------------------------------------


def replica_tensor(shape: Shape, dtype, rank: int, index: int):
    """Tensor ``index`` of rank ``rank``'s replica (the same on whichever rank builds it)."""
    import torch

    generator = torch.Generator().manual_seed(SEED + SEED_RANK_STRIDE * rank + index)
    return torch.empty(shape, dtype=dtype).normal_(0.0, STD, generator=generator)


def run_set(name: str, config: dict, rank: int, world: int) -> dict:
    """Build this rank's replica of set ``name``, check every candidate against the float64 mean, time them."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from swa_fast.parallel import average_replicas_
    from swa_fast.parallel.replicas import make_buckets

    from benchmarks.cases import ParameterSet

    begin = time.perf_counter()
    spec = SETS[name]
    dtype = getattr(torch, spec.dtype)
    model = ParameterSet([nn.Parameter(torch.empty(shape, dtype=dtype)) for shape in spec.shapes])
    params = list(model.parameters())
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    groups = list(by_dtype.values())
    chosen = [key for key in CANDIDATES if key in config["candidates"]]
    bucket_mb = config["bucket_mb"]

    @torch.no_grad()
    def fill_replica() -> None:
        for index, p in enumerate(params):
            p.copy_(replica_tensor(p.shape, dtype, rank, index))

    def fast():
        average_replicas_(model, buffers=False, bucket_mb=bucket_mb)

    @torch.no_grad()
    def per_tensor_all_reduce():
        for p in params:
            dist.all_reduce(p)
            p.div_(world)

    @torch.no_grad()
    def flatten_dense_tensors():
        for tensors in groups:
            flat = _flatten_dense_tensors(tensors)
            dist.all_reduce(flat)
            flat.div_(world)
            for tensor, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                tensor.copy_(synced)

    @torch.no_grad()
    def all_reduce_coalesced():
        for tensors in groups:
            dist.all_reduce_coalesced(tensors)
            torch._foreach_div_(tensors, world)

    every = {"average_replicas_": fast, "per_tensor_all_reduce": per_tensor_all_reduce,
             "flatten_dense_tensors": flatten_dense_tensors, "all_reduce_coalesced": all_reduce_coalesced}
    fns = {key: every[key] for key in chosen}
    buckets = len(make_buckets(params, max(1, int(bucket_mb * 2**20)), None))
    collectives = {"average_replicas_": buckets + 1, "per_tensor_all_reduce": len(params),
                   "flatten_dense_tensors": len(groups), "all_reduce_coalesced": len(groups)}

    # The float64 mean of every rank's replica, for this rank's share of the tensors.
    share = list(range(rank, len(params), world))
    reference = {}
    for index in share:
        total = torch.zeros(params[index].shape, dtype=torch.float64)
        for other in range(world):
            total += replica_tensor(params[index].shape, dtype, other, index).double()
        reference[index] = total.div_(world)
    fill_replica()
    scale = torch.tensor([max(p.detach().abs().max().item() for p in params),
                          max((r.abs().max().item() for r in reference.values()), default=0.0)],
                         dtype=torch.float64)
    dist.all_reduce(scale, op=dist.ReduceOp.MAX)

    # Every candidate once on fresh replicas: its largest error against the float64 mean, same bits on every rank?
    errors, identical = {}, {}
    for key in chosen:
        fill_replica()
        fns[key]()
        with torch.no_grad():
            error = max((float((params[i].double() - reference[i]).abs().max()) for i in share), default=0.0)
            digest = hashlib.sha256()
            for p in params:
                digest.update(memoryview(p.detach().reshape(-1).view(torch.uint8).numpy()))
        error_t = torch.tensor(error, dtype=torch.float64)
        dist.all_reduce(error_t, op=dist.ReduceOp.MAX)
        errors[key] = error_t.item()
        digests: List[Optional[str]] = [None] * world
        dist.all_gather_object(digests, digest.hexdigest())
        identical[key] = len(set(digests)) == 1
    del reference
    gc.collect()
    setup_s = time.perf_counter() - begin

    inner, samples = gloo_bench.time_rounds(fns, config, gc_off=True)
    result = {"samples_ms": samples, "inner": inner, "max_abs_error": errors, "bitwise_identical": identical,
              "collectives_per_call": {key: collectives[key] for key in chosen}, "buckets": buckets,
              "replica_max_abs": scale[0].item(), "reference_max_abs": scale[1].item(), "setup_s": setup_s,
              "num_tensors": len(params), "num_params": sum(p.numel() for p in params),
              "model_bytes": sum(p.numel() * p.element_size() for p in params), "dtype": spec.dtype}
    return result  # the model and the candidates go with this frame


def worker(config: dict) -> None:
    """One rank: every set in turn; rank 0 writes every rank's raw results."""
    import torch

    warnings.filterwarnings("ignore", message=r".*all_reduce_coalesced.* will be deprecated")
    rank, world = gloo_bench.init_rank(config)
    mine = {"rank": rank, "threads": torch.get_num_threads(), "sets": {}}
    for name in config["sets"]:
        mine["sets"][name] = run_set(name, config, rank, world)
        gc.collect()  # the set's replica and buffers, before the next set's
    gloo_bench.finish_rank(mine, config)


# ---------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------


def launch(config: dict, world: int, timeout_s: float) -> List[dict]:
    """Run ``world`` ranks of :func:`worker` and return every rank's raw results (rank order)."""
    return gloo_bench.launch_workers("benchmarks.replicas", config, world, timeout_s,
                                     f"replicas benchmark on {world} ranks")


def summarize(ranks: List[dict], set_name: str, world: int, bucket_mb: float) -> dict:
    """One (set, world) combination: the set, per candidate every rank's statistics, the slowest rank per
    round, the bandwidth, the accuracy; the speedups of average_replicas_."""
    per_rank_sets = [r["sets"][set_name] for r in ranks]
    first = per_rank_sets[0]
    spec = SETS[set_name]
    model_bytes = first["model_bytes"]
    candidates = {}
    for key in first["samples_ms"]:
        per_rank, stats = gloo_bench.rank_timings([r["rank"] for r in ranks],
                                                  [s["samples_ms"][key] for s in per_rank_sets])
        label = CANDIDATES[key].replace("bucket_mb=B", f"bucket_mb={bucket_mb:g}")
        candidates[key] = {
            "label": label,
            "inner": first["inner"][key],
            "collectives_per_call": first["collectives_per_call"][key],
            "per_rank": per_rank,
            "slowest_rank": stats,
            "model_gbps": gbps(model_bytes, stats["median_ms"]),
            "max_abs_error_vs_float64_mean": first["max_abs_error"][key],
            "bitwise_identical_on_all_ranks": first["bitwise_identical"][key],
        }
    return {
        "set": {"name": set_name, "note": spec.note, "dtype": first["dtype"], "num_tensors": first["num_tensors"],
                "num_params": first["num_params"], "model_bytes": model_bytes,
                "replica_max_abs": first["replica_max_abs"], "reference_max_abs": first["reference_max_abs"]},
        "world": world,
        "average_replicas_buckets": first["buckets"],
        "setup_s_per_rank": [s["setup_s"] for s in per_rank_sets],
        "candidates": candidates,
        "speedups": gloo_bench.speedups(candidates, FAST),
    }


def format_table(run: dict) -> List[str]:
    """The combination's markdown table: candidate, slowest rank's median, speedup, accuracy."""
    header = ("| candidate | median ms, slowest rank (IQR) | n x inner | collectives | model GB/s "
              f"| {FAST} speedup | max abs error vs float64 mean | same bits on all ranks |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for key, row in run["candidates"].items():
        s = row["slowest_rank"]
        speedup = run["speedups"].get(f"{FAST} vs {key}")
        speed = "" if key == FAST or speedup is None else f"x{speedup['slowest_rank_median']:.2f}"
        lines.append(f"| `{key}` | {s['median_ms']:.3f} ({s['q1_ms']:.3f}-{s['q3_ms']:.3f}) "
                     f"| {s['repeats']}x{row['inner']} | {row['collectives_per_call']} | {row['model_gbps']:.2f} "
                     f"| {speed} | {row['max_abs_error_vs_float64_mean']:.3g} "
                     f"| {'yes' if row['bitwise_identical_on_all_ranks'] else 'no'} |")
    return lines


def default_output(args: argparse.Namespace, slug: str) -> Path:
    folder = results_folder(gloo_bench.is_smoke_run(args))
    if sorted(args.sets) == sorted(FULL["sets"]) and sorted(args.worlds) == sorted(FULL["worlds"]):
        return folder / f"{slug}-replicas.json"
    return folder / f"{slug}-replicas-{'-'.join(args.sets)}-{'-'.join(map(str, args.worlds))}ranks.json"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Average every rank's replica of a model over CPU gloo ranks: swa_fast.parallel."
                    "average_replicas_ vs a per-tensor all_reduce loop and torch's flat-bucket utilities.",
    )
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=None,
                        help="parameter sets (default: resnet50 transformer resnet50_bf16; tiny tiny_bf16 with "
                             "--quick)")
    parser.add_argument("--worlds", nargs="+", type=int, default=None,
                        help="numbers of ranks (processes), one launch each (default: 2 4; 2 with --quick)")
    parser.add_argument("--bucket-mb", type=float, default=25.0,
                        help="average_replicas_'s bucket_mb (default 25, the function's default)")
    gloo_bench.add_run_arguments(parser, CANDIDATES, calls="calls",
                                 budget_stops="per (set, world) after which it stops", timeout_s=3600.0,
                                 timeout_help="seconds before one world's ranks are killed (default 3600)",
                                 quick_help="tiny sets on 2 ranks, few rounds")
    args = gloo_bench.parse_run_args(parser, argv, FULL, QUICK, ["--threads", "--repeats", "--inner"])
    if args.worker is not None:
        return args
    if any(world < 2 for world in args.worlds):
        parser.error(f"--worlds: every world must be >= 2 ranks (averaging replicas needs two), got {args.worlds}")
    for option, values in (("--sets", args.sets), ("--worlds", args.worlds), ("--candidates", args.candidates)):
        if len(set(values)) != len(values):
            parser.error(f"{option} names a value twice: {values}")
    if not (math.isfinite(args.bucket_mb) and args.bucket_mb > 0):
        parser.error(f"--bucket-mb must be a positive number of MiB, got {args.bucket_mb:g}")
    if not (args.target_ms > 0 and args.budget >= 0 and args.timeout > 0):
        parser.error("--target-ms and --timeout must be > 0, --budget >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:
        gloo_bench.run_worker(worker, args.worker)
    config = gloo_bench.run_config(args, {"sets": args.sets}, {"bucket_mb": args.bucket_mb})
    report = gloo_bench.open_report(
        args, argv, config, schema=SCHEMA, prog=PROG, ranks={"worlds": args.worlds},
        ranks_text=" and ".join(map(str, args.worlds)), title="average replicas across ranks",
        unit="ms per call (whole model) of the slowest rank",
        settings={"worlds": args.worlds, "quick": args.quick,
                  "replicas": f"tensor i of rank r ~ N(0, {STD}^2) in the set's dtype, torch.Generator seeded "
                              f"{SEED} + {SEED_RANK_STRIDE} * r + i"})
    report["runs"] = {}
    begin = time.perf_counter()
    for world in args.worlds:
        ranks = launch(config, world, args.timeout)
        for set_name in args.sets:
            run = report["runs"][run_key(set_name, world)] = summarize(ranks, set_name, world, args.bucket_mb)
            info = run["set"]
            print(f"\n== {set_name}, {world} ranks: {info['note']}; {info['num_tensors']} tensors, "
                  f"{info['num_params']:,} parameters ({info['dtype']}, {info['model_bytes'] / 1e6:.1f} MB); "
                  f"average_replicas_ in {run['average_replicas_buckets']} bucket(s) of <= {args.bucket_mb:g} MiB; "
                  f"max |replica| {info['replica_max_abs']:.3g}, max |mean| {info['reference_max_abs']:.3g}\n",
                  flush=True)
            print("\n".join(format_table(run)), flush=True)
    report["wall_s"] = time.perf_counter() - begin
    report["loadavg_end"] = loadavg()
    print(f"\ntotal {report['wall_s']:.1f} s, load average {report['loadavg_end']}", flush=True)
    gloo_bench.save(report, args, default_output(args, report["device"]["slug"]))
    return report


if __name__ == "__main__":
    main()
