"""One rank of tests/test_sharded_distance.py (gloo on CPU): weight distances of FSDP2 models.

``python sharded_distance_worker.py MODE OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set. Modes:

* ``fsdp``: a model sharded with ``fully_shard`` on a 1-D mesh of every rank;
* ``hsdp``: the same on a 2-D (replicate, shard) mesh of 4 ranks, where each parameter is
  ``(Replicate(), Shard(0))``: the replicas must be counted once.

Each trains a few steps with a :class:`WeightDistanceTracker` (made before training, and one made
after an evaluation forward left the root gathered), records the full parameters after every
step (the test replays them in one process as the reference), ``weight_distance`` between two
sharded models and of one, and the errors for mismatched layouts and a Partial DTensor.
Writes ``OUT_DIR/<mode>-rank<RANK>.pt``.
"""

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from sharded_worker import STEPS, batches, make_model, shard
from torch.distributed.tensor import DTensor, Partial

from swa_fast.distance import WeightDistanceTracker, weight_distance


def error_of(call) -> str:
    try:
        call()
    except ValueError as error:
        return str(error)
    return "no error"


def run(mode: str, rank: int, world: int) -> dict:
    model = shard(make_model(), world, hsdp=mode == "hsdp")
    start = {name: p.full_tensor() for name, p in model.named_parameters()}
    tracker = WeightDistanceTracker(model)
    from_full = WeightDistanceTracker(model, reference=start, dtype=None)  # each rank slices its shard
    model.eval()
    model(torch.ones(2, 6))  # the root stays gathered after a forward without backward
    late = WeightDistanceTracker(model)  # w_0 = the weights now, taken from the shards
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    trajectory = []
    for step, x in enumerate(batches(3, STEPS, rank, torch.float32), start=1):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for t in (tracker, from_full, late):
            t.update(step)
        trajectory.append({name: p.full_tensor() for name, p in model.named_parameters()})
    initial = shard(make_model(), world, hsdp=mode == "hsdp")  # w_0 as a second sharded model
    return {
        "replicas": 2 if mode == "hsdp" else 1,  # copies of each shard across the mesh
        "start": start,
        "trajectory": trajectory,
        "history": tracker.history,
        "from_full": from_full.history,
        "late": late.history,
        "snapshot_numel": [s.numel() for s in tracker.reference],
        "param_local_numel": [p.to_local().numel() for p in model.parameters()],
        "between_models": tuple(weight_distance(model, initial, per_tensor=True)),
        "norm": weight_distance(model),
        "mismatch": error_of(lambda: weight_distance(model, list(start.values()))),
        "partial": error_of(lambda: weight_distance([DTensor.from_local(
            torch.ones(3), model[0].weight.device_mesh, [Partial()] * model[0].weight.device_mesh.ndim)])),
    }


def main(mode: str, out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        torch.save(run(mode, rank, world), out / f"{mode}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    # As in sharded_worker.py: results are written; skip the finalization where gloo may abort.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
