"""The averaging core: every running average of a model's weights is computed here.

Layers, each importing only downward:

* :mod:`~swa_fast.averaging.schedules`: the averaging weights (SWA, EMA), computed on the device;
* :mod:`~swa_fast.averaging.stores`, :mod:`~swa_fast.averaging.plan`,
  :mod:`~swa_fast.averaging.step`: which tensors pair, the cached self-checking tensor lists, and
  the one update (fused, or torch-style for a user's ``multi_avg_fn``);
* :mod:`~swa_fast.averaging.sharding` (FSDP2 shards), :mod:`~swa_fast.averaging.offload` (host
  averages of a GPU model), :mod:`~swa_fast.averaging.update_bn`;
* :mod:`~swa_fast.averaging.slots` (where a model keeps its tensors, under which names),
  :mod:`~swa_fast.averaging.state` (checkpoints checked whole), :mod:`~swa_fast.averaging.swap`
  (the swap-in rule);
* :mod:`~swa_fast.averaging.average_set`: the engine, K averages of one model in one pass;
* :mod:`~swa_fast.averaging.weight_average` and :mod:`~swa_fast.averaging.multi_average`:
  :class:`WeightAverage` (one average) and :class:`MultiAverage` (several), the core's public faces.

The public faces (``swa_fast.swa_utils`` and the rest) sit on top of this package; the op
bindings (``swa_fast.ops``) below it.
"""

from swa_fast.averaging.multi_average import MultiAverage
from swa_fast.averaging.weight_average import WeightAverage

__all__ = ["MultiAverage", "WeightAverage"]
