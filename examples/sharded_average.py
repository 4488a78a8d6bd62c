"""An EMA of an FSDP2-sharded model, evaluated by swapping it in and checkpointed with DCP.

    torchrun --nproc_per_node 2 examples/sharded_average.py            # gloo on CPU
    torchrun --nproc_per_node 2 examples/sharded_average.py --offload  # averages in host memory (GPU)

Each rank keeps the average of its own parameter shards only (no copy of the
model, no communication in ``update``); ``swapped_into`` puts the averages in
the model for ``update_bn`` and evaluation and gives the training weights back
bitwise; ``state_dict`` holds DTensors that ``torch.distributed.checkpoint``
saves and can load on another number of ranks. README.md quotes the middle of
this file.
"""

import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from swa_fast import WeightAverage, swa_utils


def synthetic_batches(count: int, rank: int, device: torch.device):
    """A learnable task (the label is which of 4 directions the input leans to), different per rank."""
    generator = torch.Generator().manual_seed(rank)
    directions = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(count):
        labels = torch.randint(0, 4, (64,), generator=generator)
        inputs = directions[labels] + 2.5 * torch.randn(64, 32, generator=generator)
        yield inputs.to(device), labels.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--offload", action="store_true", help="keep the averages in host memory (CUDA models)")
    parser.add_argument("--checkpoint", default="runs/sharded_average/ema",
                        help="directory of the torch.distributed.checkpoint save (default: %(default)s)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 4)).to(device)
    eval_batches = list(synthetic_batches(8, rank + 100, device))

    # --- README: Sharded and offloaded averages ---
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)                    # parameters are now DTensor shards
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.99),
                        avg_dtype=torch.float32,     # fp32 averages, also of bf16 weights
                        device="cpu" if args.offload else None)
    for inputs, labels in synthetic_batches(args.steps, rank, device):
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)                            # local shards only: no communication
    with ema.swapped_into(model):                    # the averages, in place, for this block
        swa_utils.update_bn([x for x, _ in eval_batches], model)  # BN statistics of the average
        model.eval()
        correct = sum((model(x).argmax(1) == y).sum() for x, y in eval_batches)
    model.train()                                    # the training weights are back, bitwise
    dcp.save({"ema": ema.state_dict()}, checkpoint_id=args.checkpoint)  # loads on any number of ranks
    # --- end of README excerpt ---

    model.eval()
    live_correct = sum((model(x).argmax(1) == y).sum() for x, y in eval_batches)
    samples = 64 * len(eval_batches)
    if rank == 0:
        print(f"held-out accuracy on rank 0: live weights {live_correct.item() / samples:.3f} (training BN "
              f"statistics), EMA of {ema.n_averaged.item()} updates {correct.item() / samples:.3f}; "
              f"its shards ({sum(t.to_local().numel() for t in ema.state_dict()['averages'].values())} values "
              f"on this rank) saved with torch.distributed.checkpoint in {args.checkpoint}")
    # Collect FSDP2's finished collective work objects before the group goes: left to interpreter
    # finalization, gloo's threads can abort the process ("terminate called without an active
    # exception"; a torch teardown problem, seen in about 1 of 8 runs here without this line).
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
