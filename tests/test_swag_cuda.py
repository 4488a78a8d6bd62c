"""SWAG on a GPU: collection on the device against the CPU, the ring in host memory for a CUDA model
(``device="cpu"``, the core's offload), noise drawn on the device, and the generator's device checked.

Runs with `pytest -m cuda` on a GPU machine; skipped elsewhere.
"""

import pytest
import torch
from torch import nn

from swa_fast.swag import SWAG, bma_predict

pytestmark = pytest.mark.cuda  # skipped without a GPU and a CUDA build (conftest.py)

STEPS = 7


def net(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10)).to(device)


def trajectory(models):
    """The same weights in every model at every step; each model collected into its SWAG."""
    for step in range(STEPS):
        for model, swag in models:
            with torch.no_grad():
                for p in model.parameters():
                    values = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 1000 + p.numel()))
                    p.copy_(values.to(p.device) * 0.1)
            swag.collect(model)


def states(swag):
    state = swag.state_dict()
    flat = {f"mean.{k}": v for k, v in state["mean"].items()}
    flat.update({f"variance.{k}": v for k, v in state["variance"].items()})
    flat.update({f"dev{c}.{k}": v for c, d in state["deviations"].items() for k, v in d.items()})
    return {k: v.detach().cpu() for k, v in flat.items()}


def test_device_and_offloaded_collection_equal_the_cpu():
    cpu_model, gpu_model, host_model = net("cpu"), net("cuda"), net("cuda")
    on_cpu = SWAG(cpu_model, max_rank=4)
    on_gpu = SWAG(gpu_model, max_rank=4)
    offloaded = SWAG(host_model, max_rank=4, device="cpu")
    trajectory([(cpu_model, on_cpu), (gpu_model, on_gpu), (host_model, offloaded)])
    reference = states(on_cpu)
    for swag in (on_gpu, offloaded):
        for key, value in states(swag).items():
            torch.testing.assert_close(value, reference[key], rtol=1e-6, atol=1e-7, msg=key)
    assert offloaded.mean_state()["0.weight"].device.type == "cpu"


def test_samples_on_the_device_reproducible_and_generator_checked():
    model = net("cuda")
    swag = SWAG(model, max_rank=4)
    trajectory([(model, swag)])

    def sample(seed):
        with swag.sampled_into(model, generator=torch.Generator(device="cuda").manual_seed(seed)):
            return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(sample(3), sample(3)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="generator is on cpu"):
        with swag.sampled_into(model, generator=torch.Generator().manual_seed(0)):
            pass
    loader = [(torch.randn(16, 64, device="cuda"), torch.zeros(16, dtype=torch.long, device="cuda"))]
    probs = bma_predict(swag, model, loader, n_samples=2, bn_loader=[x for x, _ in loader], progress=False)
    assert probs.shape == (16, 10) and probs.device.type == "cpu"


def test_host_moments_of_a_cuda_model_sample_into_it():
    model = net("cuda")
    swag = SWAG(model, max_rank=3, device="cpu")
    trajectory([(model, swag)])
    own = [p.detach().clone() for p in model.parameters()]
    with swag.sampled_into(model, generator=torch.Generator().manual_seed(0)):
        assert all(p.is_cuda for p in model.parameters())
    for p, q in zip(model.parameters(), own):
        assert torch.equal(p, q)
