"""swa_fast.swa_utils on a GPU: torch parity, no host sync, CUDA-graph capture.

Runs with `pytest -m cuda` on a GPU machine; skipped elsewhere.
"""

import copy

import pytest
import torch
from torch import nn
from torch.optim import swa_utils as torch_swa

from swa_fast import swa_utils

pytestmark = pytest.mark.cuda  # skipped without a GPU and a CUDA build (conftest.py)


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10)
    ).cuda()


def train_step(model, optimizer, generator):
    x = torch.randn(32, 3, 8, 8, generator=generator).cuda()
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def ema(module):
    return module.get_ema_multi_avg_fn(0.9)


def floating_groups_only(multi_avg_fn):
    """torch's multi_avg_fn for the floating groups; integer groups copied, as swa_fast does.

    torch's own default SWA path raises on CUDA with use_buffers=True: it sends
    BatchNorm's int64 num_batches_tracked to ``_foreach_addcdiv_``, which has no
    integer kernel. The floating groups still go through torch's exact code.
    """

    def update(averaged, current, num_averaged):
        if averaged[0].is_floating_point():
            multi_avg_fn(averaged, current, num_averaged)
        else:
            torch._foreach_copy_(averaged, current)

    return update


@pytest.mark.parametrize("kind", ["swa", "ema"])
@pytest.mark.parametrize("use_buffers", [False, True])
def test_trajectory_is_bitwise_torch_on_cuda(kind, use_buffers):
    # On CUDA torch's default SWA path is _foreach_lerp_ with 1/(n+1): bitwise for both.
    model = bn_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ours_kwargs = {} if kind == "swa" else {"multi_avg_fn": ema(swa_utils)}
    their_kwargs = {} if kind == "swa" else {"multi_avg_fn": ema(torch_swa)}
    if kind == "swa" and use_buffers:
        their_kwargs = {"multi_avg_fn": floating_groups_only(torch_swa.get_swa_multi_avg_fn())}
    ours = swa_utils.AveragedModel(model, use_buffers=use_buffers, **ours_kwargs)
    theirs = torch_swa.AveragedModel(model, use_buffers=use_buffers, **their_kwargs)
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        train_step(model, optimizer, generator)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    ours_state = ours.state_dict()
    for key, value in theirs.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(ours_state[key], value), key
        elif kind == "swa" and use_buffers:
            assert torch.equal(ours_state[key], value), key  # num_batches_tracked: copied by both


@pytest.mark.parametrize("kind", ["swa", "ema", "ema_warmup", "guarded"])
def test_update_parameters_never_syncs(kind):
    model = bn_net()
    kwargs = {
        "swa": {},
        "ema": {"multi_avg_fn": ema(swa_utils)},
        "ema_warmup": {"multi_avg_fn": swa_utils.get_ema_multi_avg_fn(0.99, warmup_gamma=2.0)},
        "guarded": {"skip_nonfinite": True, "use_buffers": True},
    }[kind]
    averaged = swa_utils.AveragedModel(model, **kwargs)
    averaged.update_parameters(model)  # builds and caches the plan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            averaged.update_parameters(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert averaged.n_averaged.item() == 6
    assert averaged.n_averaged.device.type == "cuda"


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_training_step_with_update_captured_in_a_cuda_graph(kind):
    model = bn_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    kwargs = {} if kind == "swa" else {"multi_avg_fn": ema(swa_utils)}
    averaged = swa_utils.AveragedModel(model, **kwargs)
    static_x = torch.randn(32, 3, 8, 8, device="cuda")

    def step():
        loss = model(static_x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        averaged.update_parameters(model)

    # Warm up on a side stream, as torch.cuda.graphs documents, then capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    eager_model = copy.deepcopy(model)
    eager_averaged = copy.deepcopy(averaged)
    eager_optimizer = torch.optim.SGD(eager_model.parameters(), lr=0.05)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(4):
        graph.replay()
    # The capture itself ran no step; the 4 replays are 4 steps.
    for _ in range(4):
        loss = eager_model(static_x).square().mean()
        loss.backward()
        eager_optimizer.step()
        eager_optimizer.zero_grad(set_to_none=False)
        eager_averaged.update_parameters(eager_model)
    torch.cuda.synchronize()
    assert averaged.n_averaged.item() == eager_averaged.n_averaged.item() == 7
    for a, b in zip(averaged.module.parameters(), eager_averaged.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
