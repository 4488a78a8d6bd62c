"""One rank of tests/test_parallel.py (gloo on CPU): ``average_replicas_`` and SWAP's helpers.

``python replicas_worker.py MODE OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set.
Every mode writes ``OUT_DIR/<mode>-rank<RANK>.pt``: the rank's state before (``before``) and after
(``after``) the call, and what the mode observed (an error message, an accuracy, ...).
"""

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from swa_fast.parallel import AccuracyThreshold, average_replicas_, leave_ddp, swap_average, worker_generator


class Replica(nn.Module):
    """Every kind of tensor average_replicas_ meets: fp32/bf16/fp64 parameters, a non-contiguous
    one, a tied one, a parameter that does not require grad, BN buffers (floating and integer)."""

    def __init__(self, rank: int, grow: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(100 + rank)
        self.fc = nn.Linear(7, 5 + grow)
        self.bn = nn.BatchNorm1d(5 + grow)
        self.head = nn.Linear(5 + grow, 3)
        self.tied = self.head  # the same module twice: its parameters are averaged once
        self.low = nn.Parameter(torch.randn(4, 6, generator=generator).to(torch.bfloat16))
        self.wide = nn.Parameter(torch.randn(9, generator=generator, dtype=torch.float64))
        self.strided = nn.Parameter(torch.randn(6, 4, generator=generator).t())  # non-contiguous
        self.frozen = nn.Parameter(torch.randn(3, generator=generator) + 1000.0, requires_grad=False)
        with torch.no_grad():
            for p in (self.fc.weight, self.fc.bias, self.head.weight, self.head.bias):
                p.copy_(torch.randn(p.shape, generator=generator) * (rank + 1))
            self.bn.running_mean.copy_(torch.randn(5 + grow, generator=generator))
            self.bn.running_var.copy_(torch.rand(5 + grow, generator=generator) + 0.5)
            self.bn.num_batches_tracked.fill_(10 + rank)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


def state(model: nn.Module) -> dict:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def plain(rank, world, out):
    model = Replica(rank)
    before = state(model)
    versions = {name: p._version for name, p in model.named_parameters()}
    average_replicas_(model, bucket_mb=0.0001)  # ~100 bytes: several buckets, each size class split
    bumped = all(p._version > versions[name] for name, p in model.named_parameters())
    return {"before": before, "after": state(model), "versions_bumped": bumped,
            "strided_still_strided": not model.strided.is_contiguous()}


def weighted(rank, world, out):
    model = Replica(rank)
    before = state(model)
    average_replicas_(model, weights=[float(r + 1) for r in range(world)])
    return {"before": before, "after": state(model)}


def no_buffers(rank, world, out):
    model = Replica(rank)
    before = state(model)
    average_replicas_(model, buffers=False, accumulate_dtype=torch.float64)
    return {"before": before, "after": state(model)}


def ddp(rank, world, out):
    model = Replica(rank)
    before = state(model)
    wrapped = DistributedDataParallel(Replica(rank))  # DDP broadcasts rank 0's weights on creation
    wrapped.module.load_state_dict(model.state_dict())  # this rank's own replica again
    average_replicas_(wrapped)
    return {"before": before, "after": state(wrapped.module)}


def mismatch(rank, world, out):
    """Each case: what rank 1 does differently; every rank must raise, nothing modified."""
    cases = {
        "shape": lambda: (Replica(rank, grow=int(rank == 1)), {}),
        "dtype": lambda: (Replica(rank).to(torch.float64) if rank == 1 else Replica(rank), {}),
        "missing": lambda: (_without_wide(Replica(rank)) if rank == 1 else Replica(rank), {}),
        "weights": lambda: (Replica(rank), {"weights": [1.0] * world if rank != 1 else [2.0] + [1.0] * (world - 1)}),
    }
    result = {}
    for case, make in cases.items():
        model, kwargs = make()
        before = state(model)
        try:
            average_replicas_(model, **kwargs)
            message = None
        except ValueError as error:
            message = str(error)
        unchanged = all(torch.equal(before[name], value) for name, value in state(model).items())
        result[case] = {"message": message, "unchanged": unchanged}
    return result


def _without_wide(model):
    del model.wide
    return model


def groups(rank, world, out):
    """Two groups of two ranks: {0, 1} and {2, 3} average separately."""
    first, second = dist.new_group([0, 1]), dist.new_group([2, 3])
    model = Replica(rank)
    before = state(model)
    average_replicas_(model, first if rank < 2 else second)
    return {"before": before, "after": state(model)}


def swap(rank, world, out):
    """The three phases on a tiny problem: the threshold rule, the independent phase, the average."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    ddp_model = DistributedDataParallel(model)
    rule = AccuracyThreshold(0.5)
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(rank))
    y = torch.arange(24) % 3
    # phase 1 accuracy: rank r gets r + 1 of its 4 predictions right (the rule must count every rank's)
    labels = torch.tensor([0, 1, 2, 0])
    predicted = labels.clone()
    predicted[rank + 1:] = (labels[rank + 1:] + 1) % 3
    logits = nn.functional.one_hot(predicted, 3).float()
    rule.update(logits, labels)
    accuracy = rule.accuracy()
    reached = rule.reached()
    after_reset = rule.accuracy()
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(ddp_model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    start = state(model)
    independent = leave_ddp(ddp_model)
    generator = worker_generator(7)
    order = torch.randperm(24, generator=generator)
    for step in range(3):  # phase 2: no gradient sync
        batch = order[step * 8:(step + 1) * 8]
        nn.functional.cross_entropy(independent(x[batch]), y[batch]).backward()
        opt.step()
        opt.zero_grad()
    phase2 = state(model)
    bn_batches = [x[:12], x[12:]]
    swap_average(independent, bn_batches)
    return {"accuracy": accuracy, "reached": reached, "after_reset": after_reset, "start": start, "phase2": phase2,
            "after": state(model), "x": x, "order": order, "is_module": independent is model}


MODES = {f.__name__: f for f in (plain, weighted, no_buffers, ddp, mismatch, groups, swap)}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(MODES[mode](rank, world, out), out / f"{mode}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
