"""The CUDA multi-tensor harness's launch planning, as data (``csrc/launch_plan.{h,cpp}``).

The planner is host code compiled into every build, so what the GPU would
launch can be inspected (and tested) on any machine: sizes are numbers, and the
addresses are fake values, never dereferenced.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from swa_fast.ops import _C, BUILD_INFO


def launch_limits(arg_bytes: Optional[int] = None) -> Dict[str, object]:
    """Chunk size, blocks per launch, tensors per launch for 1 to 9 lists (``max_tensors[d - 1]``
    for depth d) and the metadata's size, for a kernel-argument budget (4096 or 32768; default: this build's)."""
    return _C.launch_limits(BUILD_INFO["kernel_arg_bytes"] if arg_bytes is None else arg_bytes)


def plan_launches(numels: Sequence[int], depth: int, arg_bytes: Optional[int] = None) -> List[dict]:
    """The launches of one multi_tensor_apply call over tensors of these sizes: per launch its
    ``first_chunk_ordinal``, its ``slots`` (tensor index, numel, one fake address per list)
    and its ``blocks`` ((slot, chunk) per block)."""
    return _C.plan_launches(list(numels), depth, BUILD_INFO["kernel_arg_bytes"] if arg_bytes is None else arg_bytes)


def fake_address(list_index: int, tensor: int) -> int:
    """The address :func:`plan_launches` gives tensor ``tensor`` of list ``list_index``."""
    return _C.fake_address(list_index, tensor)
