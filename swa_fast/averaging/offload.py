"""Averages of a CUDA model kept in host memory, updated without making the training stream wait.

An offloaded update (``WeightAverage(cuda_model, device="cpu")``) is three steps:

1. On the caller's thread: a side stream waits for the work queued so far on the current
   (training) stream, then copies every current tensor device-to-host into pinned staging
   buffers (non-blocking), buffers first, recording an event after the buffers and one after
   everything. The training stream is not made to wait.
2. On a worker thread: wait for the copies (a blocking wait: the thread sleeps, no core spins),
   then run the fused CPU update from the staging buffers, all or nothing.
3. Later calls that read the averages (``swapped_into``, ``state_dict``, ``n_averaged``...) wait
   for the worker (:meth:`OffloadPipeline.wait`).

Two staging sets are used in turn (double buffering): update k copies while update k-1 is still
being averaged on the host; update k waits only for update k-2, which used the same set. The
staging buffers are kept for as long as the model's tensors keep their sizes, strides and dtypes
(a rebuilt plan, e.g. after a buffer was assigned a new tensor, reuses them).

Ordering the copy before the writes that follow it (every wait is on the GPU, never the host):

* a forward of any module (BatchNorm statistics and ``num_batches_tracked``, spectral-norm
  vectors, DDP's buffer broadcast all write buffers there) waits for the buffers' copy only, so
  the parameters' copy still overlaps the forward; a process-wide forward pre-hook is installed
  while such a copy is pending and removes itself once it has ordered it;
* the forward of a module that writes its own parameters (``nn.Embedding(max_norm=...)``) and
  every optimizer step (a global optimizer pre-step hook) wait for the whole copy;
* writes the library cannot see (a CUDA-graph-captured or functional optimizer step, in-place
  edits of parameters, ``load_state_dict`` on the model) are ordered by calling
  ``order_writes()`` first (non-blocking) or ``synchronize()`` (blocking).

A worker's failure applies nothing of its update; it is raised, naming the update, by the next
call that touches the average and finds it (at the latest the update two later, which reuses its
staging set, or any call that waits); one still unreported when the average is dropped is a
warning.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

from swa_fast.averaging.plan import GroupCurrents, UpdatePlan

STAGING_SETS = 2

_LIVE: "weakref.WeakSet[OffloadPipeline]" = weakref.WeakSet()
_HOOK_LOCK = threading.Lock()
_OPTIMIZER_HOOK = None
_FORWARD_HOOK = None


class CopyDone:
    """The completion of one staging copy: a CUDA event recorded after it on the side stream of
    ``device``, or, for host tensors (copied at once), nothing to wait for."""

    def __init__(self, device: torch.device, event: Optional["torch.cuda.Event"] = None) -> None:
        self.device = device
        self.event = event

    def order_before_writes(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        """Make ``stream`` (default: the current stream of the copy's device) wait on the GPU."""
        if self.event is not None:
            (stream or torch.cuda.current_stream(self.device)).wait_event(self.event)

    def wait(self) -> None:
        """Block this thread until the copy is done (it sleeps: the event is a blocking one)."""
        if self.event is not None:
            self.event.synchronize()


@torch._dynamo.disable
def _before_optimizer_step(optimizer, args, kwargs) -> None:
    """Global optimizer pre-step hook: the step's writes wait for every pending staging copy."""
    for pipeline in list(_LIVE):
        pipeline.order_writes()


@torch._dynamo.disable
def _before_any_forward(module, args) -> None:
    """Global forward pre-hook, installed while a buffer copy is pending: a forward's buffer writes
    wait for it; the hook then removes itself."""
    for pipeline in list(_LIVE):
        pipeline.order_writes(buffers_only=True)
    _remove_forward_hook_when_idle()


def _install_hooks(buffers_pending: bool) -> None:
    global _OPTIMIZER_HOOK, _FORWARD_HOOK
    with _HOOK_LOCK:
        if _OPTIMIZER_HOOK is None:
            _OPTIMIZER_HOOK = register_optimizer_step_pre_hook(_before_optimizer_step)
        if buffers_pending and _FORWARD_HOOK is None:
            _FORWARD_HOOK = register_module_forward_pre_hook(_before_any_forward)


def _remove_forward_hook_when_idle() -> None:
    global _FORWARD_HOOK
    with _HOOK_LOCK:
        if _FORWARD_HOOK is not None and not any(p.buffers_pending() for p in list(_LIVE)):
            _FORWARD_HOOK.remove()
            _FORWARD_HOOK = None


class _Failures:
    """Failures of a pipeline's updates, shared with the worker's callbacks (which must not keep
    the pipeline alive): each as (update label, exception), until raised."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.lock = threading.Lock()
        self.pending: List[Tuple[str, BaseException]] = []
        self.abandoned = False  # the pipeline is gone: nobody will raise what fails from now on

    def record(self, label: str, future: Future) -> None:
        error = future.exception()
        if error is None:
            return
        with self.lock:
            if not self.abandoned:
                self.pending.append((label, error))
                return
        warnings.warn(f"{self.owner}: offloaded {label} failed after the average was dropped; nothing of it "
                      f"was applied: {error!r}", RuntimeWarning, stacklevel=2)

    def raise_first(self) -> None:
        with self.lock:
            if not self.pending:
                return
            (label, error), others = self.pending[0], self.pending[1:]
            self.pending = []
        more = f" ({len(others)} later update(s) failed too: {', '.join(l for l, _ in others)})" if others else ""
        raise RuntimeError(f"{self.owner}: offloaded {label} failed on the worker thread and nothing of it was "
                           f"applied{more}: {error}") from error

    def abandon(self) -> None:
        with self.lock:
            self.abandoned = True
            pending, self.pending = self.pending, []
        for label, error in pending:
            warnings.warn(f"{self.owner}: offloaded {label} failed and was never reported (the average was "
                          f"dropped before another call touched it); nothing of it was applied: {error!r}",
                          RuntimeWarning, stacklevel=3)


class OffloadPipeline:
    """Staging buffers, a side stream per device and a one-thread worker for one set of averages."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swa_fast-offload")
        self._failures = _Failures(owner)
        self._signature: Optional[tuple] = None
        self._staging: List[List[Tensor]] = []  # per set: one host tensor per staged source, in staging order
        self._in_flight: List[Optional[Future]] = [None] * STAGING_SETS
        self._next_set = 0
        self._streams: dict = {}
        self._pending_buffers: List[CopyDone] = []  # the buffers' copies no forward has waited for yet
        self._pending_all: List[CopyDone] = []  # the whole copies no optimizer step has waited for yet
        self._writer_hooks: list = []
        self._writers: Tuple[object, ...] = ()
        _LIVE.add(self)

    # -- what others wait for -------------------------------------------------

    def raise_failures(self) -> None:
        """Raise the first failure of an update that has finished (naming it), if any."""
        self._failures.raise_first()

    def wait(self) -> None:
        """Block until every submitted update has been applied; raise a failed one's error."""
        for index, future in enumerate(self._in_flight):
            if future is not None:
                self._in_flight[index] = None
                future.exception()  # waits; the failure itself was recorded by the callback
        # Every copy is complete (the worker waited for it): later writes need no ordering.
        self._pending_buffers, self._pending_all = [], []
        self.raise_failures()

    def buffers_pending(self) -> bool:
        return bool(self._pending_buffers)

    def order_writes(self, stream: Optional["torch.cuda.Stream"] = None, buffers_only: bool = False) -> None:
        """Make writes queued from now on (on ``stream``, default each device's current stream) wait,
        on the GPU, for the pending copies: the buffers' (``buffers_only``) or all of them."""
        if buffers_only:
            pending, self._pending_buffers = self._pending_buffers, []
        else:
            pending = self._pending_all + self._pending_buffers
            self._pending_all, self._pending_buffers = [], []
        for done in pending:
            done.order_before_writes(stream)

    # -- submitting -------------------------------------------------------------

    def submit(self, plan: UpdatePlan, apply: Callable[[List[GroupCurrents], List[Optional[Tensor]]], None],
               label: str, scalars: Sequence[Optional[Tensor]] = ()) -> None:
        """Stage ``plan``'s current tensors (and ``scalars``, 0-dim tensors made on the device: the skip
        decision, the step) to the host and call ``apply(staged currents per group, staged scalars)``
        there, asynchronously (a scalar's device-to-host copy is staged with the rest: reading it
        directly would sync). ``label`` names the update in a failure's message."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{self.owner}: an offloaded update (device='cpu' for a CUDA model) cannot be captured in a "
                "CUDA graph: its averaging runs on the host. Keep the averages on the GPU to capture the update."
            )
        self.raise_failures()
        index = self._next_set
        previous = self._in_flight[index]
        if previous is not None:  # the update that last read this staging set
            self._in_flight[index] = None
            previous.exception()
            self.raise_failures()
        self._next_set = (index + 1) % STAGING_SETS
        sources = plan.current_sources()
        buffer = plan.source_is_buffer()
        order = sorted(range(len(sources)), key=lambda i: not buffer[i])  # buffers first, stable
        self._ensure_staging([sources[i] for i in order])
        self._hook_parameter_writers(plan.parameter_writers)
        staged = [None] * len(sources)
        for position, i in enumerate(order):
            staged[i] = self._staging[index][position]
        copies = [(sources[i], staged[i]) for i in order]
        buffers_end = sum(buffer)
        staged_scalars: List[Optional[Tensor]] = []
        for scalar in scalars:
            if scalar is None or not scalar.is_cuda:
                staged_scalars.append(scalar)
                continue
            staged_scalars.append(torch.empty((), dtype=scalar.dtype, pin_memory=True))
            copies.append((scalar, staged_scalars[-1]))
        buffers_done, all_done = self._copy(copies, buffers_end)
        currents, start = [], 0
        for group in plan.groups:
            count = len(group.current_tensors())
            currents.append(group.split(staged[start:start + count]))
            start += count
        future = self._worker.submit(_run_when_copied, all_done, apply, currents, staged_scalars)
        failures = self._failures
        future.add_done_callback(lambda done, label=label: failures.record(label, done))
        self._in_flight[index] = future
        self._pending_buffers = buffers_done
        self._pending_all = all_done
        _install_hooks(bool(buffers_done))

    def _ensure_staging(self, sources: Sequence[Tensor]) -> None:
        """Pinned staging for ``sources`` (same strides: a device-to-host copy between layouts goes
        through a temporary and waits for the device), kept while their layout is unchanged."""
        signature = tuple((tuple(t.shape), t.stride(), t.dtype, t.is_cuda) for t in sources)
        if signature == self._signature:
            return
        self.wait()  # the old buffers may still be read
        self._staging = [
            [torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, pin_memory=t.is_cuda) for t in sources]
            for _ in range(STAGING_SETS)
        ]
        self._signature = signature

    def _hook_parameter_writers(self, writers: Tuple[object, ...]) -> None:
        """A forward pre-hook on each module that writes averaged parameters in its forward: it waits
        for the whole copy."""
        if writers == self._writers:
            return
        for handle in self._writer_hooks:
            handle.remove()
        pipeline = weakref.ref(self)

        @torch._dynamo.disable
        def before_writing_forward(module, args) -> None:
            live = pipeline()
            if live is not None:
                live.order_writes()

        self._writer_hooks = [m.register_forward_pre_hook(before_writing_forward, prepend=True) for m in writers]
        self._writers = writers

    @torch.no_grad()
    def _copy(self, copies: List[Tuple[Tensor, Tensor]], buffers_end: int) -> Tuple[List[CopyDone], List[CopyDone]]:
        """Enqueue the device-to-host copies on each source device's side stream, after the work
        queued so far on its current stream, the first ``buffers_end`` (the buffers) first; host
        tensors are copied here and now. Returns when the buffers and when all are copied."""
        by_device: dict = {}
        host = torch.device("cpu")
        for position, (source, target) in enumerate(copies):
            if source.is_cuda:
                by_device.setdefault(source.device, []).append((position < buffers_end, source, target))
            else:
                target.copy_(source.detach())
        buffers_done = [CopyDone(host)] if buffers_end else []
        all_done = [CopyDone(host)]
        for device, pairs in by_device.items():
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            buffers_here = sum(1 for is_buffer, _, _ in pairs if is_buffer)  # they come first
            with torch.cuda.stream(stream):
                for copied, (_, source, target) in enumerate(pairs, start=1):
                    target.copy_(source.detach(), non_blocking=True)
                    # The caching allocator must not hand the source's memory to another tensor
                    # before the side stream has read it.
                    source.record_stream(stream)
                    if copied == buffers_here:
                        buffers_done.append(CopyDone(device, _recorded(stream)))
                all_done.append(CopyDone(device, _recorded(stream)))
        return buffers_done, all_done

    def close(self) -> None:
        """Apply what is in flight (raising a failure), stop the worker thread and drop the hooks."""
        try:
            self.wait()
        finally:
            self._worker.shutdown(wait=True)
            for handle in self._writer_hooks:
                handle.remove()
            self._writer_hooks, self._writers = [], ()
            self._pending_buffers, self._pending_all = [], []
            _LIVE.discard(self)
            _remove_forward_hook_when_idle()

    def __del__(self) -> None:  # a dropped average must not leave a thread behind, nor a failure unsaid
        failures = self.__dict__.get("_failures")
        if failures is not None:
            failures.abandon()
        worker = self.__dict__.get("_worker")
        if worker is not None:
            worker.shutdown(wait=False)
        for handle in self.__dict__.get("_writer_hooks", ()):
            handle.remove()


def _recorded(stream: "torch.cuda.Stream") -> "torch.cuda.Event":
    # blocking=True: the worker's event.synchronize() sleeps instead of spinning a core.
    event = torch.cuda.Event(blocking=True)
    event.record(stream)
    return event


def _run_when_copied(copied: List[CopyDone], apply, currents: List[GroupCurrents],
                     scalars: List[Optional[Tensor]]) -> None:
    for done in copied:
        done.wait()  # blocks this worker thread only (the GIL is released while it waits)
    apply(currents, scalars)
