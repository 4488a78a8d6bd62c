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
    step = torch.tensor(10, device="cuda")
    try:
        for _ in range(3):
            on_device.update(model, step)
            offloaded.update(model, step)  # the step is staged with the copies, not read
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
    pipeline = offloaded._set._offload
    copied = next(done.event for done in pipeline._pending_all if done.event is not None)
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
            assert torch.equal(parameter.cpu(), offloaded._set.store.averages[0][name])
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


# --- the orderings of issue 18: every write after an offloaded update waits for its copy ----------


def copied_behind_busy_work(model, **kwargs):
    """A copying average (an EMA of decay 0 keeps exactly what was staged) whose second update is
    queued behind 200 ms of GPU work; returns it and the model's values at that update."""
    offloaded = WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.0), device="cpu", **kwargs)
    offloaded.update(model)
    offloaded.synchronize()
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    busy(200)  # the copy queues behind this...
    offloaded.update(model)
    return offloaded, expected


def test_the_next_forward_waits_for_the_buffers_copy():
    """BatchNorm writes its statistics in the forward: the staged buffers are the values from
    before that forward (an EMA of decay 0 copies what was staged)."""
    model = net()
    offloaded, expected = copied_behind_busy_work(model, use_buffers=True)
    model(torch.randn(32, 64, device="cuda"))  # ...and these statistics' writes must wait for it
    averages = offloaded.state_dict()["averages"]
    for name, value in expected.items():
        assert torch.equal(averages[name], value), name


def test_an_embedding_with_max_norm_waits_for_the_whole_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 64, max_norm=0.01), nn.Linear(64, 4)).cuda()
    offloaded, expected = copied_behind_busy_work(model)
    model(torch.arange(100, device="cuda"))  # renormalizes every row in place
    assert not torch.equal(model[0].weight.detach().cpu(), expected["0.weight"])
    assert torch.equal(offloaded.state_dict()["averages"]["0.weight"], expected["0.weight"])


def test_order_writes_orders_a_write_the_library_cannot_see():
    model = net()
    offloaded, expected = copied_behind_busy_work(model)
    offloaded.order_writes()  # non-blocking: the next write waits on the GPU
    assert not offloaded._set._offload._pending_all
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # an in-place edit outside any optimizer or forward
    assert torch.equal(offloaded.state_dict()["averages"]["0.weight"], expected["0.weight"])


def test_the_worker_waits_on_blocking_events(monkeypatch):
    created = []
    original = torch.cuda.Event

    def recording(*args, **kwargs):
        created.append(kwargs.get("blocking", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "Event", recording)
    model = net()
    offloaded = WeightAverage(model, use_buffers=True, device="cpu")
    offloaded.update(model)
    offloaded.synchronize()
    assert created and all(created)  # the worker sleeps in event.synchronize(); no core spins


def test_averaged_model_with_host_averages_is_complete_when_update_parameters_returns():
    model = net()
    shell = swa_utils.AveragedModel(model, device="cpu", use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        step(model, optimizer, generator)
        busy(100)
        shell.update_parameters(model)
        # torch's contract: read at once, without any swa_fast reader that would wait
        for (name, average), (_, current) in zip(shell.module.named_parameters(), model.named_parameters()):
            if shell.n_averaged.item() == 1:
                assert torch.equal(average, current.detach().cpu()), name
    assert shell.n_averaged.item() == 3


def test_a_multi_average_offloaded_and_on_device_equal_separate_averages():
    from swa_fast import MultiAverage

    model = net()
    fns = lambda: {"swa": None, "ema": swa_utils.get_ema_multi_avg_fn(0.9)}  # noqa: E731
    on_device = MultiAverage(model, fns(), use_buffers=True)
    offloaded = MultiAverage(model, fns(), use_buffers=True, device="cpu")
    separate = {name: WeightAverage(model, fn, use_buffers=True) for name, fn in fns().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        step(model, optimizer, generator)
        for average in (on_device, offloaded, *separate.values()):
            average.update(model)
    for name, reference in separate.items():
        for key, value in reference.state_dict()["averages"].items():
            assert torch.equal(on_device[name].state_dict()["averages"][key], value), (name, key)
            assert torch.equal(offloaded[name].state_dict()["averages"][key], value.cpu()), (name, key)


def test_host_averages_of_a_gpu_sharded_model_gather_on_the_host():
    """FSDP2 on one GPU (a 1-rank NCCL group): the host averages' DTensors live on a CPU mesh, so
    full_tensor() runs (over gloo), where a CUDA mesh would hand host tensors to NCCL."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from helpers import free_port

    dist.init_process_group("cuda:nccl,cpu:gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        model = net()
        fully_shard(model, mesh=init_device_mesh("cuda", (1,)))
        offloaded = WeightAverage(model, device="cpu")
        offloaded.update(model)
        for name, average in offloaded.state_dict()["averages"].items():
            assert average.device_mesh.device_type == "cpu", name
            assert torch.equal(average.full_tensor(), dict(model.named_parameters())[name].full_tensor().cpu())
    finally:
        dist.destroy_process_group()


def test_stochastic_rounding_on_the_device_and_offloaded_equals_the_cpu():
    """A bf16 EMA with stochastic rounding of a CUDA model, on the device and offloaded to host
    memory, bitwise equal to the same EMA of a CPU copy of the model (the op draws the same bits on
    both devices; the counter is each average's update count, wherever it lives)."""
    from helpers import bn_net

    def make(model, **kwargs):
        return WeightAverage(model, swa_utils.get_ema_multi_avg_fn(0.99), use_buffers=True, avg_dtype=torch.bfloat16,
                                      stochastic_rounding=True, stochastic_rounding_seed=5, **kwargs)

    cpu_model = bn_net()
    gpu_model = bn_net().cuda()
    on_cpu, on_gpu, offloaded = make(cpu_model), make(gpu_model), make(gpu_model, device="cpu")
    for step in range(4):
        with torch.no_grad():
            for p_cpu, p_gpu in zip(cpu_model.parameters(), gpu_model.parameters()):
                p_cpu.add_(torch.randn(p_cpu.shape, generator=torch.Generator().manual_seed(step)) * 0.01)
                p_gpu.copy_(p_cpu)
        on_cpu.update(cpu_model)
        on_gpu.update(gpu_model)
        offloaded.update(gpu_model)
    offloaded.synchronize()
    for key, value in on_cpu.module_state_dict().items():
        assert torch.equal(on_gpu.module_state_dict()[key].cpu(), value), key
        assert torch.equal(offloaded.module_state_dict()[key], value), key
