"""Averages of a CUDA model kept in host memory, updated without making the training stream wait.

An offloaded update (``WeightAverage(cuda_model, device="cpu")``) is three steps:

1. On the caller's thread: an event recorded on the current (training) stream
   after the optimizer step; a side stream waits for it and copies every
   current tensor device-to-host into pinned staging buffers (non-blocking),
   then records ``copied``. The training stream is not made to wait.
2. On a worker thread: wait for ``copied`` (the worker blocks, not the
   training loop), then run the fused CPU update from the staging buffers.
3. Later calls that read the averages (the next update of the same staging
   set, ``swapped_into``, ``state_dict``, ``n_averaged``...) wait for the
   worker (:meth:`OffloadPipeline.wait`).

Two staging sets are used in turn (double buffering): update k copies while
update k-1 is still being averaged on the host; update k waits only for update
k-2, which used the same set.

The copy reads the model's parameters while the training stream runs on, so a
later write to them must wait for it: every optimizer step makes the current
stream wait for the last copy (a GPU-side wait, normally already satisfied:
the copy takes a few milliseconds, a forward and backward longer). Code that
writes parameters outside an optimizer step calls ``WeightAverage.synchronize()``
first.
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, List, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from swa_fast.averaging.plan import GroupCurrents, UpdatePlan

STAGING_SETS = 2

_LIVE: "weakref.WeakSet[OffloadPipeline]" = weakref.WeakSet()
_HOOK_LOCK = threading.Lock()
_HOOK_HANDLE = None


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    """Global optimizer pre-step hook: the step's writes wait for the last staging copy of every
    live pipeline (on the GPU: no host sync)."""
    for pipeline in list(_LIVE):
        pipeline.order_writes_after_copy()


def _install_hook() -> None:
    global _HOOK_HANDLE
    with _HOOK_LOCK:
        if _HOOK_HANDLE is None:
            _HOOK_HANDLE = register_optimizer_step_pre_hook(_before_optimizer_step)


class OffloadPipeline:
    """Staging buffers, a side stream per device and a one-thread worker for one WeightAverage."""

    def __init__(self) -> None:
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swa_fast-offload")
        self._plan: Optional[UpdatePlan] = None
        self._staging: List[List[Tensor]] = []  # per set: one host tensor per current tensor of the plan
        self._in_flight: List[Optional[Future]] = [None] * STAGING_SETS
        self._next_set = 0
        self._streams: dict = {}
        self._copied: dict = {}  # device -> event recorded after the last staging copy from it
        _LIVE.add(self)
        _install_hook()

    # -- what others wait for -------------------------------------------------

    def wait(self) -> None:
        """Block until every submitted update has been applied; re-raise a worker's error."""
        for index, future in enumerate(self._in_flight):
            if future is not None:
                self._in_flight[index] = None
                future.result()

    def order_writes_after_copy(self) -> None:
        """Make each device's current stream wait for the last staging copy from it."""
        copied, self._copied = self._copied, {}
        for device, event in copied.items():
            torch.cuda.current_stream(device).wait_event(event)

    # -- submitting -------------------------------------------------------------

    def submit(self, plan: UpdatePlan, apply: Callable[[List[GroupCurrents], Optional[Tensor]], None],
               flag: Optional[Tensor] = None) -> None:
        """Stage ``plan``'s current tensors (and ``flag``, a 0-dim skip decision made on the device)
        to the host and call ``apply(staged currents per group, staged flag)`` there, asynchronously."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "WeightAverage: an offloaded update (device='cpu' for a CUDA model) cannot be captured in a "
                "CUDA graph: its averaging runs on the host. Keep the averages on the GPU to capture the update."
            )
        index = self._next_set
        self._next_set = (index + 1) % STAGING_SETS
        previous = self._in_flight[index]
        if previous is not None:  # the update that last read this staging set
            self._in_flight[index] = None
            previous.result()
        if plan is not self._plan:
            self._allocate(plan)
        staging = self._staging[index]
        sources = [t for group in plan.groups for t in group.current_tensors()]
        staged_flag = None
        if flag is not None:
            staged_flag = torch.empty((), dtype=flag.dtype, pin_memory=flag.is_cuda)
            sources, staging = [*sources, flag], [*staging, staged_flag]
        events = self._copy(sources, staging)
        currents, start = [], 0
        for group in plan.groups:
            count = len(group.current_tensors())
            currents.append(group.split(staging[start:start + count]))
            start += count
        self._in_flight[index] = self._worker.submit(_run_when_copied, events, apply, currents, staged_flag)

    def _allocate(self, plan: UpdatePlan) -> None:
        self.wait()  # the old buffers may still be read
        sources = [t for group in plan.groups for t in group.current_tensors()]
        # Same strides as the source: a device-to-host copy between different layouts goes through a
        # temporary and a host-side copy, which waits for the device.
        self._staging = [
            [torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, pin_memory=t.is_cuda) for t in sources]
            for _ in range(STAGING_SETS)
        ]
        self._plan = plan

    def _copy(self, sources: List[Tensor], staging: List[Tensor]) -> List["torch.cuda.Event"]:
        """Enqueue the device-to-host copies on each source device's side stream, after the work
        queued so far on its current stream; host tensors are copied here and now."""
        by_device: dict = {}
        for source, target in zip(sources, staging):
            if source.is_cuda:
                by_device.setdefault(source.device, []).append((source, target))
            else:
                target.copy_(source)
        events = []
        for device, pairs in by_device.items():
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for source, target in pairs:
                    target.copy_(source, non_blocking=True)
                    # The caching allocator must not hand the source's memory to another tensor
                    # before the side stream has read it.
                    source.record_stream(stream)
                copied = torch.cuda.Event()
                copied.record(stream)
            self._copied[device] = copied
            events.append(copied)
        return events

    def close(self) -> None:
        self.wait()
        self._worker.shutdown(wait=True)
        _LIVE.discard(self)

    def __del__(self) -> None:  # a dropped WeightAverage must not leave a thread behind
        worker = self.__dict__.get("_worker")
        if worker is not None:
            worker.shutdown(wait=False)


def _run_when_copied(events, apply, currents: List[GroupCurrents], flag: Optional[Tensor]) -> None:
    for event in events:
        event.synchronize()  # blocks this worker thread only (the GIL is released while it waits)
    apply(currents, flag)
