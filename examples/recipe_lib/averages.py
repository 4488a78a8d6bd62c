"""The SWA average of an arm: a replicated ``AveragedModel``, or a sharded ``WeightAverage`` under ``--fsdp``.

The engine asks an average for the same five things either way: take the
model's weights in (:meth:`update`), evaluate itself (``update_bn`` over the
training batches, then the test set), save and load itself, and say what was
checked about it across ranks (:meth:`consistency`, for results.json).

* :class:`ReplicatedAverage` (one process, or DDP): ``swa_fast.swa_utils.AveragedModel``,
  a full copy of the model on every rank, evaluated as a module of its own.
  The torch comparison pairs its parameters with torch's ``AveragedModel``'s.
* :class:`ShardedAverage` (FSDP2): ``swa_fast.WeightAverage``, tensors only,
  each rank averaging its own parameter shards (``AveragedModel`` deep-copies
  the model, which FSDP2 refuses). It is evaluated inside
  ``WeightAverage.swapped_into(model)``: the sharded model holds the averages
  for ``update_bn`` and the test, and on exit gets its own weights and BN
  statistics back bitwise. The BN statistics recomputed for the average are
  kept next to it, so a checkpoint holds the whole averaged model (full
  parameters and their BN statistics), as a replicated average's does.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

import swa_fast.swa_utils as fast_swa_utils
from swa_fast import WeightAverage

from recipe_lib.checkpoint import full_tensors, tensors_digest
from recipe_lib.distributed import DistContext, unwrap
from recipe_lib.loader import BatchLoader
from recipe_lib.training import EpochStats, EvalSet, Precision, evaluate


def ranks_agree(tensors: Iterable[Tensor], ctx: DistContext) -> bool:
    """Whether every rank holds rank 0's ``tensors`` bit for bit (a collective: every rank calls it)."""
    where = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")  # nccl: GPU tensors; gloo: host
    agree = True
    for tensor in tensors:
        tensor = tensor.to(where)
        reference = tensor.clone()
        dist.broadcast(reference, src=0)
        agree = agree and torch.equal(reference, tensor)
    flag = torch.tensor([int(agree)], device=where)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class ReplicatedAverage:
    """``swa_fast.swa_utils.AveragedModel`` of a plain or DDP model: the whole average on every rank."""

    sharded = False

    def __init__(self, model: nn.Module) -> None:
        self.averaged = fast_swa_utils.AveragedModel(model)

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def parameters(self) -> Iterator[Tensor]:
        """The averaged parameters, in the model's order (for the comparison with torch's average)."""
        return self.averaged.parameters()

    def evaluate(self, model: nn.Module, loader: BatchLoader, test: EvalSet, precision: Precision,
                 ctx: DistContext) -> EpochStats:
        """``update_bn`` on the average's own module (all-reduced across ranks), then its test metrics."""
        averaged = unwrap(self.averaged.module)
        fast_swa_utils.update_bn(loader, averaged, device=ctx.device)
        return evaluate(averaged, test, precision, ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)

    def consistency(self, ctx: DistContext) -> dict[str, Any]:
        """DDP keeps the replicas equal, so the averages must be too: whether they are, bit for bit."""
        if not ctx.enabled:
            return {}
        return {"ranks_identical": ranks_agree(self.averaged.state_dict().values(), ctx)}


class ShardedAverage:
    """``swa_fast.WeightAverage`` of an FSDP2 model: each rank averages and holds its own shards."""

    sharded = True

    def __init__(self, model: nn.Module) -> None:
        self.average = WeightAverage(model)
        # The BN statistics update_bn computed for the average at its last evaluation (None before it).
        self.buffers: dict[str, Tensor] | None = None

    def update(self, model: nn.Module) -> None:
        self.average.update(model)

    def evaluate(self, model: nn.Module, loader: BatchLoader, test: EvalSet, precision: Precision,
                 ctx: DistContext) -> EpochStats:
        """``update_bn`` (all-reduced across ranks) and the test, with the averages swapped into ``model``."""
        with self.average.swapped_into(model):
            fast_swa_utils.update_bn(loader, model, device=ctx.device)
            # swapped_into restores the live BN statistics on exit: keep the average's (BN buffers are not
            # sharded by FSDP2, and update_bn left the same values on every rank).
            self.buffers = {name: b.detach().cpu().clone() for name, b in model.named_buffers()}
            return evaluate(model, test, precision, ctx)

    def full_state(self) -> dict[str, Any]:
        """``WeightAverage.state_dict()`` with every average gathered whole (a collective), plus the BN
        statistics of the last evaluation: the averaged model, unsharded."""
        state = self.average.state_dict()
        return {"averages": full_tensors(state["averages"]), "n_averaged": state["n_averaged"].cpu().clone(),
                "n_skipped": state["n_skipped"].cpu().clone(), "buffers": self.buffers}

    def state_dict(self) -> dict[str, Any]:
        return self.full_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every rank takes its shards of the full averages (``WeightAverage`` slices them locally)."""
        self.average.load_state_dict({key: state[key] for key in ("averages", "n_averaged", "n_skipped")})
        self.buffers = state["buffers"]

    def consistency(self, ctx: DistContext) -> dict[str, Any]:
        """What can be checked of a sharded average (there are no replicas to compare).

        ``bn_ranks_identical``: the BN statistics (the replicated part of the averaged model) are the
        same on every rank; ``average_sha256``: a digest of the gathered averages and those statistics,
        so runs (resumed or not, another launch) can be compared bit for bit by one string.
        """
        state = self.full_state()
        whole = dict(state["averages"], **{f"buffer:{k}": v for k, v in (state["buffers"] or {}).items()})
        result: dict[str, Any] = {"sharded": True, "average_sha256": tensors_digest(whole)}
        if ctx.enabled and self.buffers is not None:
            result["bn_ranks_identical"] = ranks_agree(self.buffers.values(), ctx)
        return result


def make_average(model: nn.Module, ctx: DistContext) -> ReplicatedAverage | ShardedAverage:
    """The average that fits how ``model`` is distributed: sharded under ``--fsdp``, replicated otherwise."""
    return ShardedAverage(model) if ctx.fsdp else ReplicatedAverage(model)
