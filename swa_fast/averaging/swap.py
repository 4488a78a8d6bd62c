"""Putting averages into a model and taking them out again: one rule for every dtype, device and
sharding.

The rule (``WeightAverage.swapped_into``): inside the block the model *is* the average.
Its averaged tensors hold the averages (converted to their dtypes), so an optimizer, hooks and
FSDP2's all-gathers see them; what the block writes into them (``update_bn``'s statistics with
``use_buffers=True``, a fine-tuning step) is the average's from then on; on exit the model gets
its own values back bitwise. Buffers the average does not hold are backed up and restored, so
what the block writes there is discarded.

How each tensor goes in and out:

* average and tensor share dtype and device: their contents are exchanged on entry and
  exchanged back on exit (no extra memory; the block's writes land in the average exactly);
* otherwise the tensor is backed up and overwritten by the rounded average; on exit each element
  the block changed (it no longer equals the rounded average) is written into the average, and the
  others keep the average's full precision, so a block that writes nothing changes nothing.

A model holding an average is marked (:func:`holder_of`): another average may swap in on top and
out again (by the same rule), but may not update from it (it would average an average) or
``copy_to`` it (the write would land in the outer average).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import Module

from swa_fast.averaging.sharding import reshard
from swa_fast.averaging.slots import named_tensor_slots

# model -> the averages swapped into it, innermost last
_HELD: "weakref.WeakKeyDictionary[Module, List[object]]" = weakref.WeakKeyDictionary()


def holder_of(model: Module) -> Optional[object]:
    """The average whose values ``model`` holds now (the innermost swap), or None."""
    holders = _HELD.get(model)
    return holders[-1] if holders else None


def refuse_if_held_by_another(model: Module, own: Sequence[object], action: str, name: str) -> None:
    """Refuse ``action`` on ``model`` while it holds the averages of an average not in ``own``:
    updating from it would average those averages, copying into it would write into them."""
    holder = holder_of(model)
    if holder is not None and not any(holder is mine for mine in own):
        raise RuntimeError(
            f"{name}.{action}: the model holds the averages of another average now (inside its swapped_into "
            f"block); {action} would {'average those' if action == 'update' else 'write into them'}. Call it "
            "after that block, or on another model"
        )


@contextlib.contextmanager
def swapped(model: Module, owner: object, targets: Sequence[Tuple[Tensor, Tensor]], averaged_ids: set) -> Iterator[Module]:
    """Put each ``(target, average)`` into ``model`` for the block, by the module's rule."""
    kept = [(b, b.clone()) for _, _, b in named_tensor_slots(model, "_buffers") if id(b) not in averaged_ids]
    undo: List[Callable[[], None]] = []
    holders = _HELD.setdefault(model, [])
    try:
        with torch.no_grad():
            for target, average in targets:
                undo.append(_put(target, average))
        holders.append(owner)
        yield model
    finally:
        if holders and holders[-1] is owner:
            holders.pop()
        # An FSDP2 forward in the block may have left gathered copies of the averages behind;
        # the next forward would reuse them instead of gathering the restored shards.
        reshard(model)
        with torch.no_grad():
            for restore in reversed(undo):
                restore()
            for buffer, original in kept:
                buffer.copy_(original)


def _put(target: Tensor, average: Tensor) -> Callable[[], None]:
    """Write ``average`` into ``target``; return what takes the block's writes into ``average``
    and gives ``target`` its own values back bitwise."""
    if target.dtype == average.dtype and target.device == average.device:
        _exchange(target, average)
        return lambda: _exchange(target, average)
    original = target.clone()
    target.copy_(average)

    def restore() -> None:
        written = target.to(device=average.device, dtype=average.dtype)
        rounded = average.to(target.dtype).to(average.dtype)
        # Elements the block did not change still equal the rounded average: keep the exact one.
        average.copy_(torch.where(written == rounded, average, written))
        target.copy_(original)

    return restore


def _exchange(a: Tensor, b: Tensor) -> None:
    scratch = a.clone()
    a.copy_(b)
    b.copy_(scratch)
