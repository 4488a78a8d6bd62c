"""The offload pipeline's host side (``WeightAverage(cuda_model, device="cpu")``), run on the CPU
with the pipeline forced on host tensors (``helpers.force_host_offload``): the worker thread, the
order of updates, the waits of every reader, failures, the staging buffers and the write-ordering
hooks. Its CUDA copies, streams and events run in tests/test_weight_average_cuda.py."""

import gc
import threading
import time

import pytest
import torch
from torch import nn

from swa_fast import WeightAverage, swa_utils

from helpers import assert_bitwise, bn_net, bn_net_inputs, force_host_offload, train_with_updates

STEPS = 8


def slow(monkeypatch, seconds=0.05):
    """Every fused update on the worker takes ``seconds`` longer (a slow host)."""
    from swa_fast.averaging import average_set

    original = average_set.fused_update

    def delayed(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(average_set, "fused_update", delayed)


def test_averaged_model_with_host_averages_is_complete_when_update_parameters_returns(monkeypatch):
    """torch's contract: after update_parameters every read (forward, state_dict, n_averaged,
    update_bn) sees the update. The offloaded copy may be asynchronous inside, never outside."""
    model = bn_net()
    reference = swa_utils.AveragedModel(model, use_buffers=True)
    shell = swa_utils.AveragedModel(model, use_buffers=True)
    force_host_offload(shell._average, model)
    slow(monkeypatch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for x in bn_net_inputs(3):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        reference.update_parameters(model)
        shell.update_parameters(model)
        # read at once, through the module (no WeightAverage reader that would wait)
        assert shell.n_averaged.item() == reference.n_averaged.item()
        assert_bitwise(dict(shell.module.named_parameters()), dict(reference.module.named_parameters()))


def test_the_staging_copies_do_not_run_under_autograd():
    model = bn_net()
    average = WeightAverage(model)
    force_host_offload(average, model)
    average.update(model)
    average.update(model)
    average.synchronize()
    staged = [t for stage in average._set._offload._staging for t in stage]
    assert staged and not any(t.requires_grad or t.grad_fn is not None for t in staged)


def test_a_new_module_elsewhere_does_not_rebuild_the_plan():
    model = bn_net()
    average = WeightAverage(model)
    average.update(model)
    plan = average._set._plan
    nn.Linear(3, 3)  # anywhere in the process
    nn.Sequential(nn.BatchNorm1d(4))
    average.update(model)
    assert average._set._plan is plan


class ReassignsItsBuffer(nn.Module):
    """A module that assigns a new tensor to a buffer in its forward (a step counter)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen = self.seen + 1
        return self.linear(x)


def test_a_buffer_reassigned_in_the_forward_keeps_the_staging_buffers():
    model = ReassignsItsBuffer()
    reference = WeightAverage(model, use_buffers=True)
    average = WeightAverage(model, use_buffers=True)
    force_host_offload(average, model)
    for update in (reference.update, average.update, average.update, reference.update):
        update(model)
    average.synchronize()
    staging = [id(t) for stage in average._set._offload._staging for t in stage]
    for _ in range(3):
        model(torch.ones(2, 4))
        reference.update(model)
        average.update(model)
    average.synchronize()
    assert average._set._offload is not None and average._set._plan_offloads
    assert [id(t) for stage in average._set._offload._staging for t in stage] == staging  # the same tensors
    assert_bitwise(average.state_dict()["averages"], reference.state_dict()["averages"])


def test_every_update_is_applied_in_order_on_the_worker(monkeypatch):
    """Staging, double buffering, the worker thread and the waits of every reader, without the
    device copies."""
    from swa_fast.averaging import average_set

    model = bn_net()
    fn = swa_utils.get_ema_multi_avg_fn(0.9)
    direct = WeightAverage(model, fn, use_buffers=True, skip_nonfinite=True)
    piped = WeightAverage(model, fn, use_buffers=True, skip_nonfinite=True)
    threads = []
    original = average_set.fused_update

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    force_host_offload(piped, model)
    monkeypatch.setattr(average_set, "fused_update", recording)
    train_with_updates(model, [direct.update, piped.update], STEPS, poison_at=3)
    assert piped._set._offload is not None
    piped.synchronize()
    # direct's updates run here, piped's on the worker
    assert sorted(set(threads)) == ["MainThread", "swa_fast-offload_0"]
    assert threads.count("swa_fast-offload_0") == threads.count("MainThread") == STEPS
    assert piped.n_averaged.item() == STEPS - 1 and piped.n_skipped.item() == 1
    assert_bitwise(piped.state_dict()["averages"], direct.state_dict()["averages"])


# --- failures on the worker ---------------------------------------------------------------------


def wait_without_reporting(average):
    for future in average._set._offload._in_flight:
        if future is not None:
            future.exception()


class FailsOnce(swa_utils.EMAMultiAvgFn):
    """An EMA whose weight raises when computed for the ``fail_at``-th update (on the worker)."""

    def __init__(self, fail_at):
        super().__init__(0.8)
        self.calls, self.fail_at = 0, fail_at

    def weight(self, num_averaged, step=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("host out of memory (simulated)")
        return super().weight(num_averaged, step)


def test_a_failed_update_applies_nothing_and_is_raised_once_naming_it():
    model = bn_net()
    failing = WeightAverage(model, FailsOnce(fail_at=3), use_buffers=True)
    reference = WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.8), use_buffers=True)
    force_host_offload(failing, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    raised = []
    for step, x in enumerate(bn_net_inputs(STEPS)):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 3:  # the failure of update 3 is known before call 4...
            wait_without_reporting(failing)
        try:
            failing.update(model)
        except RuntimeError as error:
            raised.append((step, str(error)))
            continue  # ...which raises it and does nothing itself
        if step != 2:  # update 3 (step 2) fails on the worker: the reference skips it too
            reference.update(model)
    failing.synchronize()
    assert len(raised) == 1
    step, message = raised[0]
    assert "update 3 (the 3rd call to update())" in message and "nothing of it was applied" in message
    assert "host out of memory (simulated)" in message
    # the failed update and the call that reported it are missing; every other update is there
    assert failing.n_averaged.item() == reference.n_averaged.item() == STEPS - 2
    assert_bitwise(failing.state_dict()["averages"], reference.state_dict()["averages"])


def test_a_failure_never_reported_is_a_warning_when_the_average_is_dropped():
    model = bn_net()
    failing = WeightAverage(model, FailsOnce(fail_at=2))
    force_host_offload(failing, model)
    failing.update(model)
    failing.update(model)
    wait_without_reporting(failing)
    with pytest.warns(RuntimeWarning, match="update 2 .* failed and was never reported"):
        del failing
        gc.collect()


def test_close_applies_what_is_in_flight_and_refuses_more_updates(monkeypatch):
    model = bn_net()
    average = WeightAverage(model)
    force_host_offload(average, model)
    slow(monkeypatch)
    average.update(model)
    average.update(model)
    worker = average._set._offload._worker
    average.close()
    assert worker._shutdown and average.n_averaged.item() == 2
    with pytest.raises(RuntimeError, match="closed"):
        average.update(model)
    average.state_dict()  # still readable


# --- ordering the copy before the writes that follow it ------------------------------------------


class Recorder:
    """Records, in order, each wait the pipeline orders and each forward of the watched modules."""

    def __init__(self, monkeypatch):
        from swa_fast.averaging import offload

        gc.collect()  # pipelines of earlier tests, dropped but not collected, would order their copies too
        self.events = []
        original = offload.CopyDone.order_before_writes
        recorder = self

        def recording(done, stream=None):
            recorder.events.append("order")
            return original(done, stream)

        monkeypatch.setattr(offload.CopyDone, "order_before_writes", recording)

    def watch(self, module, label):
        module.register_forward_pre_hook(lambda m, args: self.events.append(label))


def test_a_forward_waits_for_the_buffers_copy_before_writing_its_statistics(monkeypatch):
    """BatchNorm statistics (use_buffers=True) are written in the next forward: it must wait for
    the staging copy of the buffers (on a GPU, a stream wait), and only once."""
    model = bn_net()
    average = WeightAverage(model, use_buffers=True)
    force_host_offload(average, model)
    recorder = Recorder(monkeypatch)
    recorder.watch(model[1], "bn forward")
    average.update(model)
    model(bn_net_inputs(1)[0])
    model(bn_net_inputs(1)[0])
    assert recorder.events[:2] == ["order", "bn forward"] and recorder.events.count("order") == 1
    average.synchronize()


def test_without_averaged_buffers_a_forward_waits_for_nothing(monkeypatch):
    model = bn_net()
    average = WeightAverage(model)  # parameters only: a forward writes none of them
    force_host_offload(average, model)
    recorder = Recorder(monkeypatch)
    average.update(model)
    model(bn_net_inputs(1)[0])
    assert recorder.events == []
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # ...but the optimizer step does
    assert recorder.events == ["order"]
    average.synchronize()


def test_an_embedding_with_max_norm_waits_for_the_whole_copy(monkeypatch):
    """nn.Embedding(max_norm=...) renormalizes its weight in place in its forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Linear(4, 2))
    average = WeightAverage(model)
    force_host_offload(average, model)
    recorder = Recorder(monkeypatch)
    recorder.watch(model[0], "embedding forward")
    average.update(model)
    model(torch.tensor([1, 2, 3]))
    assert recorder.events == ["order", "embedding forward"]
    average.synchronize()


def test_order_writes_orders_the_pending_copy_once(monkeypatch):
    model = bn_net()
    average = WeightAverage(model)
    force_host_offload(average, model)
    recorder = Recorder(monkeypatch)
    average.update(model)
    average.order_writes()
    average.order_writes()
    assert recorder.events == ["order"]
    average.synchronize()


def test_an_offloaded_update_with_a_step_equals_the_direct_one():
    model = bn_net()
    fn = lambda: swa_utils.get_ema_multi_avg_fn(0.999, warmup_gamma=1.0, warmup_power=0.75)  # noqa: E731
    direct, piped = WeightAverage(model, fn()), WeightAverage(model, fn())
    force_host_offload(piped, model)
    steps = iter(range(100, 200, 10))
    train_with_updates(model, [lambda m: (s := next(steps), direct.update(m, s), piped.update(m, torch.tensor(s)))],
                       STEPS)
    assert_bitwise(piped.state_dict()["averages"], direct.state_dict()["averages"])
