"""``update_bn``: BatchNorm statistics recomputed for averaged weights, torch's algorithm plus
``forward_fn``, ``progress`` and the all-reduce across ``torch.distributed`` ranks.

Public as :func:`swa_fast.swa_utils.update_bn`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional, Union

import torch
from torch import Tensor
from torch.nn import Module

# ---------------------------------------------------------------------------
# update_bn
# ---------------------------------------------------------------------------


def _to_device(batch: Any, device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(value, device) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def _progress_bar(loader: Iterable[Any]) -> Iterable[Any]:
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError("update_bn(progress=True) needs tqdm: pip install tqdm") from error
    total = len(loader) if hasattr(loader, "__len__") else None
    return tqdm(loader, total=total, desc="update_bn", unit="batch")


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    model: Module,
    device: Optional[Union[int, torch.device, str]] = None,
    *,
    forward_fn: Optional[Callable[[Module, Any], Any]] = None,
    progress: bool = False,
    all_reduce: Optional[bool] = None,
    process_group: Optional[Any] = None,
) -> None:
    r"""Recompute the BatchNorm running statistics of ``model`` with one pass over ``loader``.

    As ``torch.optim.swa_utils.update_bn``: every ``_BatchNorm`` module (ghost BN
    included) is reset and switched to a cumulative average (``momentum=None``)
    for the pass; momenta and the training mode are restored afterwards, also
    when the pass raises.

    Args:
        loader: batches; each a tensor, or a list/tuple whose first element is
            the model input (unless ``forward_fn`` is given).
        model: the model whose BatchNorm statistics are recomputed.
        device: if given, batches are moved there first (every tensor in a
            list/tuple/dict when ``forward_fn`` is given).
        forward_fn: keyword-only; ``forward_fn(model, batch)`` runs the model on a
            batch of any structure (dicts, several inputs). Default: ``model(batch[0])``.
        progress: keyword-only; show a tqdm progress bar (needs tqdm).
        all_reduce: keyword-only; combine the statistics of all ranks after the
            pass (see below). ``None`` (default): when ``torch.distributed`` is
            initialized; ``False``: never (each rank keeps its own shard's
            statistics, torch's behaviour); ``True``: always (an error without a
            process group).
        process_group: keyword-only; the group to combine over (default: the
            default group).

    Distributed: with a sharded loader (e.g. a ``DistributedSampler``) every rank
    runs its pass, then one all-reduce per device makes every rank hold the
    statistics a single process would compute over the union of all ranks'
    batches: ``running_mean`` and ``running_var`` are the means over all batches,
    each batch weighted once (as torch's cumulative average weights them), and
    ``num_batches_tracked`` is the total batch count. This holds for unequal
    batch counts per rank too (a rank with no batches contributes nothing). It
    equals the single-process result up to float rounding; with unequal batch
    *sizes* it is, like torch's cumulative average, a mean over batches, not over
    samples. Ghost BN counts each ghost as a batch, and is combined the same way.
    ``SyncBatchNorm`` modules are left alone (their forward already combines the
    ranks). Every rank of the group must call ``update_bn`` (it is a collective)
    on a model with the same BatchNorm modules in the same order: code that runs
    it on one rank only (say rank 0 over the whole loader) must pass
    ``all_reduce=False``, or that rank waits for the others until the process
    group's timeout. A model wrapped
    in ``DistributedDataParallel`` broadcasts its buffers on its first forward:
    each rank then needs at least one batch (or pass ``model.module``).
    """
    group = _bn_process_group(all_reduce, process_group)
    momenta = {}
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            momenta[module] = module.momentum

    if not momenta:
        return

    was_training = model.training
    model.train()
    for module in momenta:
        module.momentum = None
    try:
        for batch in _progress_bar(loader) if progress else loader:
            if forward_fn is not None:
                forward_fn(model, batch if device is None else _to_device(batch, device))
                continue
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            if device is not None:
                batch = batch.to(device)
            model(batch)
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        model.train(was_training)
    if group is not _NO_GROUP:
        _all_reduce_bn_stats(list(momenta), group)


_NO_GROUP = object()  # update_bn's marker for "do not all-reduce"


def _bn_process_group(all_reduce: Optional[bool], process_group: Optional[Any]) -> Any:
    """The group ``update_bn`` combines over (``None``: the default group), or ``_NO_GROUP``.

    Decided before the pass, so a misuse fails before the work is done.
    """
    if all_reduce is False:
        return _NO_GROUP
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not initialized:
        if all_reduce:
            raise RuntimeError(
                "update_bn(all_reduce=True) needs an initialized torch.distributed process group "
                "(torch.distributed.init_process_group)"
            )
        return _NO_GROUP
    return process_group


def _all_reduce_bn_stats(modules: List[Module], group: Any) -> None:
    """Turn every rank's cumulative BN averages into the average over all ranks' batches.

    With ``momentum=None`` a module's running_mean/var are the means of its
    per-batch values over the ``n = num_batches_tracked`` batches it saw (n counts
    from 0: update_bn reset it). Summing ``running * n`` and ``n`` over ranks and
    dividing gives the mean over every batch seen anywhere, each batch once. One
    float64 all-reduce per device packs every module (counts stay exact to 2**53).
    """
    from torch.nn.modules.batchnorm import SyncBatchNorm

    by_device: dict = {}
    for module in modules:
        if isinstance(module, SyncBatchNorm) or module.running_mean is None or module.num_batches_tracked is None:
            continue  # SyncBatchNorm already saw every rank's batch; untracked modules have nothing to combine
        by_device.setdefault(module.running_mean.device, []).append(module)
    for device_modules in by_device.values():
        counts = torch.stack([module.num_batches_tracked for module in device_modules]).to(torch.float64)
        packed = [counts]
        for module, count in zip(device_modules, counts):
            packed.append(module.running_mean.to(torch.float64).mul(count))
            packed.append(module.running_var.to(torch.float64).mul(count))
        flat = torch.cat([t.reshape(-1) for t in packed])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
        totals, offset = flat[: len(device_modules)], len(device_modules)
        for module, total in zip(device_modules, totals.tolist()):
            size = module.running_mean.numel()
            mean_sum, var_sum = flat[offset : offset + size], flat[offset + size : offset + 2 * size]
            offset += 2 * size
            if total == 0:
                continue  # no rank saw a batch: keep the reset statistics, as a single process would
            module.running_mean.copy_(mean_sum.div(total).view_as(module.running_mean))
            module.running_var.copy_(var_sum.div(total).view_as(module.running_var))
            module.num_batches_tracked.fill_(int(total))
