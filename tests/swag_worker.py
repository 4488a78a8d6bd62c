"""One rank of tests/test_swag_sharded.py (gloo on CPU): SWAG over FSDP2 shards and DDP.

``python swag_worker.py MODE OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set.

* ``fsdp``: an FSDP2 model set to the same full weights as :func:`trajectory` gives at every step,
  collected into a SWAG made after ``fully_shard`` and one made before it (laid out again at its
  first collection); writes the full mean, variance and deviations, the full parameters inside a
  sample of each kind (same generator seed on every rank), and a ``torch.distributed.checkpoint``
  save of the state.
* ``ddp``: a DDP model trained a few steps with a SWAG; writes a sample (same seed on every rank)
  and the BMA probabilities of a few batches.

Writes ``OUT_DIR/<mode>-rank<RANK>.pt``.
"""

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from swa_fast.swag import SWAG, bma_predict

STEPS = 6
MAX_RANK = 4


def make_model() -> nn.Module:
    """17 and 5 rows: uneven shards on 2 ranks (9/8, 3/2)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 17), nn.BatchNorm1d(17), nn.ReLU(), nn.Linear(17, 5))


def trajectory(step: int, model: nn.Module) -> dict:
    """The full weights of every parameter at ``step`` (the same on every rank and in the test)."""
    generator = torch.Generator().manual_seed(step)
    return {name: torch.randn(tuple(p.shape), generator=generator) * 0.1 + 1.0 for name, p in model.named_parameters()}


def samples(swag: SWAG, model: nn.Module, seed: int, cov: bool) -> dict:
    with swag.sampled_into(model, scale=0.5, cov=cov, generator=torch.Generator().manual_seed(seed)):
        return {name: p.detach().full_tensor().clone() for name, p in model.named_parameters()}


def full(state: dict) -> dict:
    return {name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in state.items()}


def fsdp(out: Path, rank: int, world: int) -> dict:
    model = make_model()
    early = SWAG(model, max_rank=MAX_RANK)  # made before fully_shard: laid out again at its first collection
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[3], mesh=mesh)
    fully_shard(model, mesh=mesh)
    swag = SWAG(model, max_rank=MAX_RANK)
    for step in range(STEPS):
        values = trajectory(step, model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(distribute_tensor(values[name], p.device_mesh, p.placements))
        swag.collect(model)
        early.collect(model)
    state = swag.state_dict()
    result = {
        "mean": full(state["mean"]), "variance": full(state["variance"]),
        "deviations": {c: full(d) for c, d in state["deviations"].items()},
        "early_mean": full(early.state_dict()["mean"]),
        "local_numel": sum(t.numel() for t in swag._set.store.averages[0].values()),
        "sample_cov": samples(swag, model, 11, True), "sample_diag": samples(swag, model, 12, False),
    }
    dcp.save({"swag": swag.state_dict()}, checkpoint_id=str(out / "dcp"))
    return result


def ddp(out: Path, rank: int, world: int) -> dict:
    model = DistributedDataParallel(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    swag = SWAG(model, max_rank=MAX_RANK)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    batches = [torch.randn(8, 6, generator=generator) for _ in range(4)]
    for step in range(STEPS):
        for x in batches:
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        swag.collect(model)
    sample = samples_plain(swag, model, 5)
    probs = bma_predict(swag, model, [(x, torch.zeros(8, dtype=torch.long)) for x in batches[:2]], n_samples=2,
                        bn_loader=batches, generator=torch.Generator().manual_seed(9), progress=False)
    return {"sample": sample, "probs": probs}


def samples_plain(swag: SWAG, model: nn.Module, seed: int) -> dict:
    with swag.sampled_into(model, generator=torch.Generator().manual_seed(seed)) as inner:
        return {name: p.detach().clone() for name, p in inner.named_parameters()}


def main(mode: str, out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        result = {"fsdp": fsdp, "ddp": ddp}[mode](out, rank, world)
        torch.save(result, out / f"{mode}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see sharded_worker.py: gloo's threads at interpreter exit
