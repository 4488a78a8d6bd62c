"""EMA of an FSDP2-sharded model: ``WeightAverage`` on the local shards vs gathering the full model.

Usage (from the repository root)::

    python -m benchmarks.sharded                     # the transformer set on 2 gloo ranks (a few minutes)
    python -m benchmarks.sharded --quick             # a small set, 3 rounds (a smoke run, scratch JSON)
    python -m benchmarks.sharded --set small --world 2 --repeats 10

Every rank builds the same parameter set (``--set``: ``transformer`` is
``benchmarks.cases.gpt_shapes(24, 512)``, 292 tensors, 101.9M parameters; ``small``
is ``gpt_shapes(4, 256, vocab=8192, context=512)``; ``tiny`` is for the tests) as a
module of one submodule per group of parameters (the embeddings, each decoder layer,
the final norm), applies ``fully_shard`` to every group and then to the root on a
CPU mesh of ``--world`` ranks (``init_device_mesh("cpu", (world,))``, gloo), and
times one EMA update (decay 0.999) of that model per call with each candidate:

* ``weight_average``: ``WeightAverage(model, get_ema_multi_avg_fn(0.999)).update(model)``:
  each rank averages its local shards (averages of the shards' size), no communication.
* ``gather_full_tensor``: what people do when they cannot ``deepcopy`` an FSDP model:
  every rank all-gathers every parameter (``p.full_tensor()``, one collective per
  tensor) and runs ``torch._foreach_lerp_`` into full-size averages.
* ``gather_unshard``: the same with one all-gather per ``fully_shard`` group:
  ``unshard()`` every FSDP module, ``_foreach_lerp_`` over the gathered parameters,
  ``reshard()``.
* ``local_foreach_lerp``: ``torch._foreach_lerp_`` over ``[p.to_local() for p in params]``
  into shard-sized averages: the unfused local baseline (what the fused kernel replaces).

Every average has taken its first update (the copy) before timing, and a check
update compares them (the largest difference between the gathered candidates' and
``WeightAverage``'s averages is in the JSON). The ranks are separate processes (one
thread each by default: ``--threads``) started by this script with
``MASTER_ADDR``/``MASTER_PORT``; each round runs every candidate once (a sample of
``inner`` calls, the same on every rank, after a barrier; the order rotates between
rounds), after warm-up rounds. Per candidate the JSON has every rank's samples,
median, min and quartiles, the median over rounds of the slowest rank's sample
(what a training step waits for), the speedups of ``weight_average`` over the
others (from those medians), and the bytes each rank holds for the averages and
gathers per update.

Results go to ``benchmarks/results/<device slug>-sharded-<set>-<world>ranks.json``
(schema ``sharded-1``: ``readme_tables.py`` skips it); a smoke run (``--quick`` or
fewer than ``harness.MIN_REPEATS`` rounds) to ``benchmarks/results/scratch/``;
``--output`` wins.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as `python benchmarks/sharded.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import gloo_bench
from benchmarks.cases import Shape, gpt_shapes
from benchmarks.harness import loadavg, results_folder

SCHEMA = "sharded-1"
EMA_DECAY = 0.999
PROG = "python -m benchmarks.sharded"

# name -> (gpt_shapes arguments, what it is)
SETS: Dict[str, Tuple[dict, str]] = {
    "transformer": (dict(layers=24, d_model=512), "GPT-2-style 24 x 512 decoder (benchmarks.cases 'transformer')"),
    "small": (dict(layers=4, d_model=256, vocab=8192, context=512), "GPT-2-style 4 x 256 decoder, vocab 8192"),
    "tiny": (dict(layers=2, d_model=32, vocab=100, context=16), "GPT-2-style 2 x 32 decoder, vocab 100 (tests)"),
}

CANDIDATES: Dict[str, str] = {
    "weight_average": "WeightAverage(model, get_ema_multi_avg_fn(0.999)).update(model) on the shards",
    "gather_full_tensor": "p.full_tensor() per parameter + _foreach_lerp_ into full-size averages",
    "gather_unshard": "unshard() per FSDP group + _foreach_lerp_ into full-size averages + reshard()",
    "local_foreach_lerp": "_foreach_lerp_ over [p.to_local()] into shard-size averages",
}
FAST = "weight_average"

# The options a run leaves unset: a full run, and --quick (a smoke run).
FULL = {"set": "transformer", "repeats": 15, "warmup": 2, "target_ms": 50.0, "budget": 300.0}
QUICK = {"set": "small", "repeats": 3, "warmup": 1, "target_ms": 5.0, "budget": 0.0}


def group_shapes(layers: int, d_model: int, **kwargs) -> List[List[Shape]]:
    """``gpt_shapes(layers, d_model, **kwargs)`` cut into the groups a real model would shard one
    by one: the two embeddings, each layer's 12 tensors, the final norm's two."""
    shapes = gpt_shapes(layers, d_model, **kwargs)
    per_layer = (len(shapes) - 4) // layers
    groups = [shapes[:2]]
    groups += [shapes[2 + i * per_layer: 2 + (i + 1) * per_layer] for i in range(layers)]
    groups.append(shapes[-2:])
    assert [s for g in groups for s in g] == shapes
    return groups


# ---------------------------------------------------------------------------
# One rank (run as `python -m benchmarks.sharded --worker CONFIG_JSON`)
# ---------------------------------------------------------------------------


def _build_model(groups: Sequence[Sequence[Shape]], seed: int = 0):
    """The set as a module: ``groups[i]`` is submodule ``groups.<i>`` holding a ParameterList. The
    same values on every rank (``fully_shard`` keeps each rank's own slice)."""
    import torch
    from torch import nn

    class Group(nn.Module):
        def __init__(self, shapes: Sequence[Shape], generator: torch.Generator):
            super().__init__()
            self.params = nn.ParameterList(
                [nn.Parameter(torch.empty(shape).normal_(0.0, 0.02, generator=generator)) for shape in shapes])

    class ShardedSet(nn.Module):
        def __init__(self):
            super().__init__()
            generator = torch.Generator().manual_seed(seed)
            self.groups = nn.ModuleList([Group(shapes, generator) for shapes in groups])

    return ShardedSet()


def worker(config: dict) -> None:
    """One rank: shard the set, set up the candidates, time them; rank 0 writes the raw results."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from swa_fast import WeightAverage
    from swa_fast.swa_utils import get_ema_multi_avg_fn

    rank, world = gloo_bench.init_rank(config)
    begin = time.perf_counter()
    groups = group_shapes(**SETS[config["set"]][0])
    model = _build_model(groups)
    mesh = init_device_mesh("cpu", (world,))
    for group in model.groups:
        fully_shard(group, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    weight = 1 - EMA_DECAY
    chosen = [key for key in CANDIDATES if key in config["candidates"]]
    fns = {}  # candidate -> one update
    held = {}  # candidate -> the averages it keeps on this rank

    with torch.no_grad():
        # (a) the shards' average, in place, no communication (always built: the check's reference)
        average = WeightAverage(model, get_ema_multi_avg_fn(EMA_DECAY))
        average.update(model)  # the first update copies
        fns["weight_average"] = lambda: average.update(model)

        # (b) the full model on every rank, one collective per tensor
        if "gather_full_tensor" in chosen:
            full_avg = held["gather_full_tensor"] = [p.full_tensor().clone() for p in params]

            def gather_full_tensor():
                with torch.no_grad():
                    torch._foreach_lerp_(full_avg, [p.full_tensor() for p in params], weight)

            fns["gather_full_tensor"] = gather_full_tensor

        # (c) one all-gather per FSDP group
        if "gather_unshard" in chosen:
            unshard_avg = held["gather_unshard"] = [p.full_tensor().clone() for p in params]

            def gather_unshard():
                with torch.no_grad():
                    handles = [m.unshard(async_op=True) for m in fsdp_modules]
                    for handle in handles:
                        if handle is not None:
                            handle.wait()
                    gathered = list(model.parameters())
                    torch._foreach_lerp_(unshard_avg, gathered, weight)
                    for m in fsdp_modules:
                        m.reshard()

            fns["gather_unshard"] = gather_unshard

        # (d) torch's unfused lerp on the local shards
        if "local_foreach_lerp" in chosen:
            local_avg = held["local_foreach_lerp"] = [p.to_local().clone() for p in params]

            def local_foreach_lerp():
                with torch.no_grad():
                    torch._foreach_lerp_(local_avg, [p.to_local() for p in params], weight)

            fns["local_foreach_lerp"] = local_foreach_lerp

        # Move the model away from the averages it was copied into (as training would).
        torch._foreach_add_([p.to_local() for p in params], 0.01)

    fns = {key: fns[key] for key in chosen}

    # A check update of every candidate (each has had its first copy): the averages must agree.
    for key in chosen:
        fns[key]()
    if "weight_average" not in chosen:
        average.update(model)
    check = {}
    with torch.no_grad():
        averages = average.state_dict()["averages"]
        held["weight_average"] = [averages[n].to_local() for n in names]
        full_reference = [averages[n].full_tensor() for n in names]
        for key in chosen:
            if key != "weight_average":
                reference = held["weight_average"] if key == "local_foreach_lerp" else full_reference
                check[key] = max((a - r).abs().max().item() for a, r in zip(held[key], reference))
    setup_s = time.perf_counter() - begin

    # Bytes each rank holds for the averages, and gathers (all-gathered full tensors) per update.
    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    local_params = nbytes(p.to_local() for p in params)
    full_params = sum(math.prod(p.shape) * p.to_local().element_size() for p in params)
    gathers = {"gather_full_tensor": full_params, "gather_unshard": full_params}
    memory = {key: {"averages_bytes": nbytes(held[key]), "gathered_bytes_per_update": gathers.get(key, 0)}
              for key in chosen}

    inner, samples = gloo_bench.time_rounds(fns, config)
    mine = {"rank": rank, "samples_ms": samples, "inner": inner, "check_max_abs_diff": check, "memory": memory,
            "setup_s": setup_s, "local_param_bytes": local_params, "full_param_bytes": full_params,
            "num_tensors": len(params), "num_params": sum(math.prod(p.shape) for p in params),
            "num_groups": len(groups), "threads": torch.get_num_threads()}
    gloo_bench.finish_rank(mine, config)


# ---------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------


def launch(config: dict, world: int, timeout_s: float) -> List[dict]:
    """Run ``world`` ranks of :func:`worker` and return every rank's raw results (rank order)."""
    return gloo_bench.launch_workers("benchmarks.sharded", config, world, timeout_s, "sharded benchmark")


def summarize(ranks: List[dict]) -> dict:
    """Per candidate: every rank's statistics, the slowest rank per round, memory; the speedups."""
    candidates = {}
    for key in ranks[0]["samples_ms"]:
        per_rank, slowest = gloo_bench.rank_timings([r["rank"] for r in ranks], [r["samples_ms"][key] for r in ranks])
        candidates[key] = {
            "label": CANDIDATES[key],
            "inner": ranks[0]["inner"][key],
            "per_rank": per_rank,
            "slowest_rank": slowest,
            "averages_bytes_per_rank": ranks[0]["memory"][key]["averages_bytes"],
            "gathered_bytes_per_update_per_rank": ranks[0]["memory"][key]["gathered_bytes_per_update"],
            "check_max_abs_diff_vs_weight_average": max(r["check_max_abs_diff"].get(key, 0.0) for r in ranks),
        }
    faster = gloo_bench.speedups(candidates, FAST)
    for speedup in faster.values():
        speedup["averages_memory"] = (candidates[speedup["baseline"]]["averages_bytes_per_rank"]
                                      / candidates[FAST]["averages_bytes_per_rank"])
    return {"candidates": candidates, "speedups": faster}


def megabytes(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e6 else f"{num_bytes / 1e3:.1f} kB"


def format_table(result: dict, world: int) -> List[str]:
    rows = result["candidates"]
    width = max(len(key) for key in rows)
    rank_cols = "".join(f"  {f'rank {r} median (IQR)':>24}" for r in range(world))
    lines = [f"   {'candidate':<{width}}{rank_cols}  {'slowest':>8}  {'n x inner':>9}  {'averages/rank':>13}"]
    for key, row in rows.items():
        cells = "".join(f"  {r['median_ms']:>8.2f} ({r['q1_ms']:.2f}-{r['q3_ms']:.2f})".rjust(26)
                        for r in row["per_rank"])
        count = f"{row['per_rank'][0]['repeats']}x{row['inner']}"
        lines.append(f"   {key:<{width}}{cells}  {row['slowest_rank']['median_ms']:>8.2f}  {count:>9}"
                     f"  {megabytes(row['averages_bytes_per_rank']):>13}")
    checks = ", ".join(f"{key} {row['check_max_abs_diff_vs_weight_average']:.2g}" for key, row in rows.items()
                       if key != FAST)
    if checks:
        lines.append(f"   check update, max |average - WeightAverage's|: {checks}")
    for name, s in result["speedups"].items():
        per_rank = ", ".join(f"x{v:.2f}" for v in s["per_rank_median"])
        lines.append(f"   speedup {name}: x{s['slowest_rank_median']:.2f} (slowest rank, median; per rank "
                     f"{per_rank}); averages' memory x{s['averages_memory']:.2f}")
    return lines


def default_output(args: argparse.Namespace, slug: str) -> Path:
    return results_folder(gloo_bench.is_smoke_run(args)) / f"{slug}-sharded-{args.set}-{args.world}ranks.json"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="EMA update of an FSDP2-sharded model on CPU gloo ranks: WeightAverage on the shards vs "
                    "all-gathering the full model on every rank.",
    )
    parser.add_argument("--set", choices=list(SETS), default=None,
                        help="parameter set (default: transformer; small with --quick)")
    parser.add_argument("--world", type=int, default=2, help="ranks (processes), default 2")
    gloo_bench.add_run_arguments(parser, CANDIDATES, calls="updates", budget_stops="after which the run stops",
                                 timeout_s=1800.0, timeout_help="seconds before the ranks are killed",
                                 quick_help="small set, few rounds")
    return gloo_bench.parse_run_args(parser, argv, FULL, QUICK, ["--world", "--threads", "--repeats", "--inner"])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:
        gloo_bench.run_worker(worker, args.worker)
    config = gloo_bench.run_config(args, {"set": args.set}, {})
    gpt_args, set_note = SETS[args.set]
    report = gloo_bench.open_report(
        args, argv, config, schema=SCHEMA, prog=PROG, ranks={"ranks": args.world}, ranks_text=str(args.world),
        title=f"sharded EMA update, set {args.set}: {set_note}", unit="ms per update per rank",
        settings={"world": args.world, "quick": args.quick, "ema_decay": EMA_DECAY})
    begin = time.perf_counter()
    ranks = launch(config, args.world, args.timeout)
    report["wall_s"] = time.perf_counter() - begin
    report["loadavg_end"] = loadavg()
    first = ranks[0]
    report["set"] = {"name": args.set, "note": set_note, "gpt_shapes": gpt_args, "num_tensors": first["num_tensors"],
                     "num_params": first["num_params"], "fully_shard_groups": first["num_groups"],
                     "full_param_bytes": first["full_param_bytes"],
                     "local_param_bytes_per_rank": [r["local_param_bytes"] for r in ranks]}
    report["setup_s_per_rank"] = [r["setup_s"] for r in ranks]
    report.update(summarize(ranks))
    print(f"   {first['num_tensors']} tensors, {first['num_params']:,} parameters (fp32, "
          f"{first['full_param_bytes'] / 1e6:.1f} MB), {first['num_groups']} fully_shard groups + the root",
          flush=True)
    print("\n".join(format_table(report, args.world)), flush=True)
    print(f"total {report['wall_s']:.1f} s", flush=True)
    gloo_bench.save(report, args, default_output(args, report["device"]["slug"]))
    return report


if __name__ == "__main__":
    main()
