"""WeightAverage on a GPU: the on-device path, and averages offloaded to host memory
(``device="cpu"``): same numbers as the host reference, no host sync in ``update``, the copy
overlapping the training stream, and the next optimizer step ordered after the copy.

Runs with `pytest -m cuda` on a GPU machine; skipped elsewhere.
"""

import pytest
import torch
from torch import nn

from swa_fast import WeightAverage, swa_utils

pytestmark = pytest.mark.cuda  # skipped without a GPU and a CUDA build (conftest.py)

STEPS = 6


def net(device="cuda"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10)).to(device)


def step(model, optimizer, generator):
    x = torch.randn(32, 64, generator=generator).to(next(model.parameters()).device)
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def busy(milliseconds=50):
    """Queue roughly ``milliseconds`` of work on the current stream: a spin kernel of that many
    clock cycles at about 2 GHz (only "long compared with a small copy" matters)."""
    torch.cuda._sleep(int(milliseconds * 2_000_000))


@pytest.mark.parametrize("use_buffers", [False, True])
def test_offloaded_average_equals_the_host_reference(use_buffers):
    model = net()
    host_model = net("cpu")
    fn = swa_utils.get_ema_multi_avg_fn(0.9)
    offloaded = WeightAverage(model, fn, use_buffers, device="cpu")
    reference = WeightAverage(host_model, fn, use_buffers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        step(model, optimizer, generator)
        offloaded.update(model)
        host_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        reference.update(host_model)
    averages = offloaded.state_dict()["averages"]
    assert all(t.device.type == "cpu" for t in averages.values())
    for name, expected in reference.state_dict()["averages"].items():
        assert torch.equal(averages[name], expected), name
    assert offloaded.n_averaged.item() == STEPS and offloaded.n_averaged.device.type == "cpu"


def test_on_device_and_offloaded_updates_do_not_sync():
    model = net()
    on_device = WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.9), skip_nonfinite=True)
    offloaded = WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.9), device="cpu")
    for average in (on_device, offloaded):
        average.update(model)  # the first update builds the plan and the staging buffers
    offloaded.synchronize()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            on_device.update(model)
            offloaded.update(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert offloaded.n_averaged.item() == 4


def test_the_staging_copy_overlaps_the_training_stream():
    model = net()
    offloaded = WeightAverage(model, device="cpu")
    offloaded.update(model)
    offloaded.synchronize()
    offloaded.update(model)  # its copy waits only for work queued before it...
    busy(200)  # ...not for this, queued after it on the training stream
    compute_done = torch.cuda.Event()
    compute_done.record()
    pipeline = offloaded._offload
    copied = next(iter(pipeline._copied.values()))
    overlapped = False
    while not compute_done.query():
        if copied.query():
            overlapped = True
            break
    assert overlapped, "the staging copy waited for compute queued after the update"
    torch.cuda.synchronize()


def test_the_next_optimizer_step_waits_for_the_copy():
    model = net()
    offloaded = WeightAverage(model, device="cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    expected = {k: v.detach().cpu().clone() for k, v in model.named_parameters()}
    busy(200)  # the copy is queued behind this...
    offloaded.update(model)
    optimizer.step()  # ...and this write must wait for the copy (the optimizer pre-step hook)
    averages = offloaded.state_dict()["averages"]
    for name, value in expected.items():
        assert torch.equal(averages[name], value), name


def test_swapped_into_with_offloaded_averages_restores_bitwise():
    model = net()
    offloaded = WeightAverage(model, device="cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        step(model, optimizer, generator)
        offloaded.update(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with offloaded.swapped_into(model):
        for name, parameter in model.named_parameters():
            assert torch.equal(parameter.cpu(), offloaded._store.averages[name])
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_on_device_update_is_captured_in_a_cuda_graph():
    model = net()
    eager = WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.9))
    captured = WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.9))
    for average in (eager, captured):
        average.update(model)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs advise
        captured.update(model)
        eager.update(model)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.update(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        step(model, optimizer, generator)
        graph.replay()
        eager.update(model)
    torch.cuda.synchronize()
    for name, value in eager.state_dict()["averages"].items():
        assert torch.equal(captured.state_dict()["averages"][name], value), name
    assert captured.n_averaged.item() == eager.n_averaged.item() == 5


def test_offloaded_update_refuses_graph_capture():
    model = net()
    offloaded = WeightAverage(model, device="cpu")
    offloaded.update(model)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"), torch.cuda.graph(graph):
        offloaded.update(model)
