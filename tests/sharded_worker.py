"""One rank of tests/test_sharded_average.py (gloo on CPU): WeightAverage over FSDP2 and DDP models.

``python sharded_worker.py MODE OUT_DIR [DTYPE]`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set. Modes:

* ``fsdp``: an FSDP2 (``fully_shard``) model trained a few steps with SWA and EMA averages
  (fp32 averages), the same two as one MultiAverage, an EMA made before ``fully_shard`` and two power-function profiles (a post-hoc snapshot at the end); records the full parameters after every step (the test replays them in one
  process as the reference), the averages (full and local), swap-in checks, ``update_bn`` inside
  ``swapped_into``, and a ``torch.distributed.checkpoint`` save of both averages.
* ``hsdp``: the same on a 2 x WORLD/2 (replicate, shard) mesh (HSDP).
* ``load``: the same model sharded on this world size loads that checkpoint.
* ``ddp``: a DDP model trained with a WeightAverage (and a MultiAverage beside separate averages);
  averages and swap-in on every rank.
* ``host_mesh``: the CPU twin of a GPU mesh, for host averages of a GPU-sharded model.

Writes ``OUT_DIR/<mode>-rank<RANK>.pt``.
"""

import datetime
import os
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from swa_fast import MultiAverage, WeightAverage, swa_utils
from swa_fast.posthoc import PowerFunctionEMA

STEPS = 5
EMA_DECAY = 0.8
POISONED_STEP = 2  # the skip_nonfinite average sees a NaN in rank 1's shard only, at this step
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
POSTHOC_STDS = (0.05, 0.10)


def make_model(dtype=torch.float32) -> nn.Module:
    """17 and 5 rows: uneven shards on 2 and 4 ranks (9/8, 5/4/4/4, 3/2, 2/1/1/1)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 17), nn.BatchNorm1d(17), nn.ReLU(), nn.Linear(17, 5)).to(dtype)


def shard(model: nn.Module, world: int, hsdp: bool = False) -> nn.Module:
    """FSDP2 over every rank, or HSDP: a (replicate, shard) mesh of 2 x world/2, where each
    parameter is (Replicate(), Shard(0)) and each shard is held by two ranks."""
    if hsdp:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[3], mesh=mesh)
    return fully_shard(model, mesh=mesh)


def batches(seed: int, count: int, rank: int, dtype):
    generator = torch.Generator().manual_seed(seed * 100 + rank)
    return [(torch.randn(8, 6, generator=generator) * 2 + 1).to(dtype) for _ in range(count)]


def averages(dtype):
    """The two averages every mode makes: SWA and EMA, fp32 whatever the parameters' dtype."""
    return {
        "swa": {"avg_dtype": torch.float32},
        "ema": {"multi_avg_fn": swa_utils.get_ema_multi_avg_fn(EMA_DECAY), "avg_dtype": torch.float32},
    }


def locals_of(model: nn.Module):
    return {name: p.to_local().detach().clone() for name, p in model.named_parameters()}


def fsdp(out: Path, rank: int, world: int, dtype, hsdp: bool = False) -> dict:
    unsharded = make_model(dtype)
    # Made before fully_shard (as Lightning's setup makes its average): laid out again at the first update.
    early = WeightAverage(unsharded, **averages(dtype)["ema"])
    model = shard(unsharded, world, hsdp)
    made = {kind: WeightAverage(model, **kwargs) for kind, kwargs in averages(dtype).items()}
    skipping = WeightAverage(model, skip_nonfinite=True, **averages(dtype)["ema"])
    multi = MultiAverage(model, {kind: kwargs.get("multi_avg_fn") for kind, kwargs in averages(dtype).items()},
                         avg_dtype=torch.float32)
    power = PowerFunctionEMA(model, stds=POSTHOC_STDS, use_buffers=False, avg_dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    trajectory = []
    for step, x in enumerate(batches(1, STEPS, rank, dtype)):
        loss = model(x).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for average in (*made.values(), multi, early):
            average.update(model)
        power.update(model, step + 1)
        trajectory.append({name: p.full_tensor() for name, p in model.named_parameters()})
        poisoned = model[0].weight.to_local()
        if step == POISONED_STEP and rank == 1:
            kept = poisoned[0, 0].item()
            with torch.no_grad():
                poisoned[0, 0] = float("nan")
        skipping.update(model)  # every rank must skip the poisoned step, not only rank 1
        if step == POISONED_STEP and rank == 1:
            with torch.no_grad():
                poisoned[0, 0] = kept
    # A snapshot of a sharded model: every rank gathers, rank 0 writes.
    written = power.snapshot(out / "posthoc-snapshot.pt")
    result = {"trajectory": trajectory, "replicas": 2 if hsdp else 1, "snapshot_written": written is not None}
    made["ema_skip"] = skipping
    made["early"] = early
    for kind in ("swa", "ema"):
        made[f"multi_{kind}"] = multi[kind]
    for kind, average in made.items():
        state = average.state_dict()
        result[kind] = {name: t.full_tensor() for name, t in state["averages"].items()}
        result[kind + "/n_averaged"] = average.n_averaged.item()
        result[kind + "/n_skipped"] = average.n_skipped.item()
        result[kind + "/local_numel"] = {name: t.to_local().numel() for name, t in state["averages"].items()}
    result["param_local_numel"] = {name: p.to_local().numel() for name, p in model.named_parameters()}

    # Swap-in: the forward runs on the averages; the shards come back bitwise, also after a raise.
    before = locals_of(model)
    buffers = result["buffers"] = {k: v.clone() for k, v in model.named_buffers()}
    probe = torch.linspace(-1, 1, 12).reshape(2, 6).to(dtype)
    ema = made["ema"]
    try:
        with ema.swapped_into(model):
            model.eval()
            result["swapped_output"] = model(probe).detach()
            raise KeyError("body raised")
    except KeyError:
        pass
    result["restored"] = all(torch.equal(before[k], v) for k, v in locals_of(model).items())
    # update_bn inside: the BN statistics of the average, over every rank's data, then restored.
    with ema.swapped_into(model):
        swa_utils.update_bn(batches(2, 3, rank, dtype), model)
        result["bn_inside"] = {k: v.clone() for k, v in model.named_buffers()}
        model.eval()
        result["bn_output"] = model(probe).detach()
    model.train()
    result["buffers_restored"] = all(torch.equal(buffers[k], v) for k, v in model.named_buffers())
    result["restored_after_bn"] = all(torch.equal(before[k], v) for k, v in locals_of(model).items())
    # Made after an evaluation forward, which leaves the root's parameters gathered: still shards.
    model.eval()
    with torch.no_grad():
        model(probe)
    model.train()
    late = WeightAverage(model, **averages(dtype)["ema"])
    result["late/local_numel"] = {name: t.to_local().numel() for name, t in late.state_dict()["averages"].items()}
    late.update(model)
    try:
        swa_utils.AveragedModel(model)
        result["averaged_model_error"] = None
    except TypeError as error:
        result["averaged_model_error"] = str(error)
    dcp.save({kind: made[kind].state_dict() for kind in ("swa", "ema")}, checkpoint_id=str(out / "dcp"))
    return result


def load(out: Path, rank: int, world: int, dtype) -> dict:
    model = shard(make_model(dtype), world)
    made = {kind: WeightAverage(model, **kwargs) for kind, kwargs in averages(dtype).items()}
    state = {kind: average.state_dict() for kind, average in made.items()}
    dcp.load(state, checkpoint_id=str(out / "dcp"))
    result = {}
    for kind, average in made.items():
        average.load_state_dict(state[kind])
        result[kind] = {name: t.full_tensor() for name, t in average.state_dict()["averages"].items()}
        result[kind + "/n_averaged"] = average.n_averaged.item()
    return result


def ddp(out: Path, rank: int, world: int, dtype) -> dict:
    model = DistributedDataParallel(make_model(dtype))
    average = WeightAverage(model, swa_utils.get_ema_multi_avg_fn(EMA_DECAY))
    swa = WeightAverage(model)
    multi = MultiAverage(model, {"ema": swa_utils.get_ema_multi_avg_fn(EMA_DECAY), "swa": None})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for x in batches(1, STEPS, rank, dtype):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for each in (average, swa, multi):
            each.update(model)
    multi_equal = all(torch.equal(multi[kind].state_dict()["averages"][name], separate.state_dict()["averages"][name])
                      for kind, separate in (("ema", average), ("swa", swa)) for name in separate.state_dict()["averages"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with average.swapped_into(model):
        swa_utils.update_bn(batches(2, 3, rank, dtype), model)
        bn_inside = {k: v.clone() for k, v in model.module.named_buffers()}
    restored = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return {"averages": average.state_dict()["averages"], "bn_inside": bn_inside, "restored": restored,
            "n_averaged": average.n_averaged.item(), "multi_equal": multi_equal}


def host_mesh(out: Path, rank: int, world: int, dtype) -> dict:
    """The CPU twin of a GPU mesh that host averages of a GPU-sharded model get (sharding.host_mesh_like),
    built here from a CPU mesh relabelled as a CUDA one (no GPU on these machines): from the mesh's
    own groups, and with new gloo groups when they have no CPU backend."""
    import copy

    from torch.distributed.tensor import Shard

    from swa_fast.averaging import sharding

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(17.0 * 3).reshape(17, 3)
    local = full.tensor_split(world)[rank].clone()
    result = {}
    for label, has_cpu in (("from_group", True), ("new_gloo_groups", False)):
        gpu_like = copy.copy(mesh)
        gpu_like._device_type = "cuda"
        original = sharding._has_cpu_backend
        sharding._has_cpu_backend = (lambda group: True) if has_cpu else (lambda group: False)
        try:
            host = sharding.host_mesh_like(gpu_like)
        finally:
            sharding._has_cpu_backend = original
        assert host.device_type == "cpu" and host.mesh.tolist() == mesh.mesh.tolist()
        assert sharding.host_mesh_like(gpu_like) is host  # built once
        layout = sharding.ShardLayout(gpu_like, (Shard(0),), tuple(full.shape), full.stride())
        tensor = sharding.dtensor_like(local, layout)
        result[label] = {"mesh_is_host": tensor.device_mesh is host, "full": tensor.full_tensor(),
                         "shares_storage": tensor._local_tensor.data_ptr() == local.data_ptr(),
                         "loads_back": torch.equal(sharding.local_part(tensor, layout), local)}
    result["expected"] = full
    return result


def main(mode: str, out: Path, dtype) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        hsdp = partial(fsdp, hsdp=True)
        result = {"fsdp": fsdp, "hsdp": hsdp, "load": load, "ddp": ddp, "host_mesh": host_mesh}[mode](out, rank, world, dtype)
        torch.save(result, out / f"{mode}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), DTYPES[sys.argv[3] if len(sys.argv) > 3 else "float32"])
    # Results are written and the process group destroyed: leave without interpreter finalization,
    # where gloo's worker threads occasionally abort the process ("terminate called without an
    # active exception", seen about once in 30 runs on a loaded machine), failing a passed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
