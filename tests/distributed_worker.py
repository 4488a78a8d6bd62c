"""One rank of tests/test_distributed.py (gloo on CPU): DDP training with an AveragedModel, then update_bn.

Run as ``python distributed_worker.py OUT_DIR`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set. Writes ``OUT_DIR/rank{RANK}.pt``: the averaged
parameters and the BN buffers after each update_bn scenario.
"""

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from swa_fast import swa_utils
from swa_fast.nn import GhostBatchNorm1d

BATCH = 8
TRAIN_STEPS = 4


def make_model() -> nn.Module:
    """Plain BN and ghost BN (2 ghosts per batch), same initial weights on every rank."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8), GhostBatchNorm1d(8, ghost_batch_size=4), nn.Linear(8, 1)
    )


def batches(seed: int, count: int):
    """The whole data set as ``count`` batches; every rank generates all of it and takes its shard."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, 6, generator=generator) * 3 + 1 for _ in range(count)]


def bn_buffers(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


# The update_bn scenarios: name -> (batch indices of rank 0, of rank 1); the data has 8 batches.
SCENARIOS = {
    "interleaved": (list(range(0, 8, 2)), list(range(1, 8, 2))),
    "unequal": ([0, 1, 2], [3, 4, 5, 6, 7]),
    "empty_rank": (list(range(8)), []),
}


def main(out_dir: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        torch.set_num_threads(1)
        ddp = DistributedDataParallel(make_model())
        swa = swa_utils.AveragedModel(ddp)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
        train = batches(seed=1, count=2 * TRAIN_STEPS)
        for x in train[rank::world]:
            loss = ddp(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            swa.update_parameters(ddp)

        results = {"params": [p.detach().clone() for p in swa.parameters()], "averaged_state": swa.module.module.state_dict()}
        data = batches(seed=2, count=8)
        for name, shards in SCENARIOS.items():
            mine = [data[i] for i in shards[rank]]
            # DDP's first forward broadcasts buffers (a collective): a rank without batches runs the bare module.
            target = swa if all(shards) else swa.module.module
            swa_utils.update_bn(mine, target)
            results[name] = bn_buffers(swa.module.module)
            swa_utils.update_bn(mine, target, all_reduce=False)
            results[name + "/local"] = bn_buffers(swa.module.module)
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # Results are written and the process group destroyed: leave without interpreter finalization,
    # where gloo's worker threads occasionally abort the process ("terminate called without an
    # active exception", seen about once in 30 runs on a loaded machine), failing a passed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
