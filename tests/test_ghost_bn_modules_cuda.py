"""GPU tests of the ghost BN modules: CUDA against CPU, under autocast, channels_last,
no host sync in a training step. Run on a GPU machine with ``pytest -m cuda``."""

import copy

import pytest
import torch
from torch import nn

from swa_fast.nn import convert_ghost_batchnorm

pytestmark = pytest.mark.cuda  # skipped without a GPU and a CUDA build (conftest.py)



def conv_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=None), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10), nn.BatchNorm1d(10),
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_training_step_matches_cpu(channels_last):
    cpu = convert_ghost_batchnorm(conv_model().double(), 8)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(36, 3, 12, 12, dtype=torch.float64)  # ghosts of 8 x 4 + 4
    x_gpu = x.cuda()
    if channels_last:
        gpu = gpu.to(memory_format=torch.channels_last)
        x_gpu = x_gpu.contiguous(memory_format=torch.channels_last)
    cpu(x).square().sum().backward()
    gpu(x_gpu).square().sum().backward()
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-9, atol=1e-9, msg=name)
    for (name, a), b in zip(cpu.named_buffers(), gpu.buffers()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_float32_parameters_and_statistics(dtype):
    model = convert_ghost_batchnorm(conv_model(), 8).cuda()
    x = torch.randn(32, 3, 12, 12, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)
    out.float().sum().backward()
    bn = model[1]
    assert bn.weight.dtype == bn.running_mean.dtype == torch.float32
    assert bn.weight.grad is not None and torch.isfinite(bn.weight.grad).all()
    assert int(bn.num_batches_tracked) == 4


def test_training_step_does_not_sync():
    model = convert_ghost_batchnorm(conv_model(), 8).cuda()
    model[4].momentum = None  # the cumulative factor is read on the device too
    x = torch.randn(32, 3, 12, 12, device="cuda")
    model(x).sum().backward()  # warm up (lazy init, autograd graph)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
