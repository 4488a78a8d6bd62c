"""Averaging across processes: ``average_replicas_`` (every rank's model replaced by the average of
all ranks', one flat all-reduce per bucket) and SWAP's helpers (``AccuracyThreshold``,
``leave_ddp``, ``worker_generator``, ``swap_average``).

Built on ``torch.distributed`` (gloo on CPU, nccl on GPU, any launcher ``init_process_group``
accepts, ``torchrun`` included).
"""

from swa_fast.parallel.replicas import average_replicas_
from swa_fast.parallel.swap import AccuracyThreshold, leave_ddp, swap_average, worker_generator

__all__ = ["AccuracyThreshold", "average_replicas_", "leave_ddp", "swap_average", "worker_generator"]
