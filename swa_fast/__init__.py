"""swa_fast: fused weight averaging for PyTorch.

``from swa_fast import swa_utils`` is a drop-in for ``torch.optim.swa_utils``
whose averaging runs as fused multi-tensor kernels (C++ on CPU, CUDA on GPU).
The kernels themselves are ``torch.ops.swa_fast.*``, wrapped here as
:func:`average_`, :func:`multi_average_` (K averages from one read of the
model), :func:`average_moments_`, :func:`swag_moments_` (SWAG's mean, centred
variance and deviation in one pass), :func:`average_stochastic_` (stochastic
rounding of fp16/bf16 averages) and :func:`nonfinite_flag`.
:class:`WeightAverage` is the averaging core for every model (plain, DDP,
FSDP2-sharded, offloaded to host memory), with ``swapped_into`` for evaluation.
``swa_fast.parallel`` averages the replicas of a model across processes
(``average_replicas_``) and holds SWAP's helpers. ``swa_fast.posthoc`` is post-hoc EMA
(``PowerFunctionEMA``, ``reconstruct``).
``swa_fast.nn`` has ghost batch normalization (``GhostBatchNorm1d/2d/3d``,
``convert_ghost_batchnorm``). ``swa_fast.checkpoint_average.average_checkpoints``
(``python -m swa_fast average``) averages saved checkpoints.
"""

__version__ = "0.1.0"

from swa_fast import checkpoint_average, distance, nn, parallel, posthoc, regime, swa_utils  # noqa: E402
from swa_fast.ops.average import (  # noqa: E402
    average_,
    average_moments_,
    average_stochastic_,
    multi_average_,
    nonfinite_flag,
    swag_moments_,
)
from swa_fast.ops import BUILD_INFO  # noqa: E402  (loads _C and registers every op)
from swa_fast.averaging import MultiAverage, WeightAverage  # noqa: E402

__all__ = [
    "BUILD_INFO",
    "MultiAverage",
    "WeightAverage",
    "average_",
    "average_moments_",
    "average_stochastic_",
    "swag_moments_",
    "checkpoint_average",
    "distance",
    "multi_average_",
    "nn",
    "nonfinite_flag",
    "parallel",
    "posthoc",
    "regime",
    "swa_utils",
    "__version__",
]
