"""Model zoo of the recipes (examples/recipe_lib/models.py): shapes, gradients, sizes, stems, memory format, seeding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recipe_lib.models import (
    MODEL_DESCRIPTIONS,
    MODEL_NAMES,
    build_model,
    count_parameters,
)

# The quick-preset models: cheap enough to try at every input size.
SMALL = ("resnet18_small", "vgg_small", "preresnet20", "wrn16_4", "resnet20", "f1_small")

# (in_channels, image_size, num_classes): Fashion-MNIST-like and CIFAR-100-like.
CONFIGS = [(1, 28, 10), (3, 32, 100)]


def test_names_and_descriptions():
    assert len(set(MODEL_NAMES)) == len(MODEL_NAMES) == 13
    assert set(MODEL_DESCRIPTIONS) == set(MODEL_NAMES)
    assert set(SMALL) <= set(MODEL_NAMES)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}x{c[1]}-{c[2]}cls")
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_and_finite_gradients(name, config):
    in_channels, size, classes = config
    torch.manual_seed(0)
    model = build_model(name, classes, in_channels, size).train()
    logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, classes)
    nn.functional.cross_entropy(logits, torch.tensor([0, classes - 1])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("size", [64, 150])
@pytest.mark.parametrize("name", SMALL)
def test_small_models_at_larger_sizes(name, size):
    model = build_model(name, 6, 3, size).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 6)


def expected_f1_parameters(inputs: int, hidden: int, depth: int, classes: int) -> int:
    """Bias-free hidden Linears (BN follows), BN weight + bias per unit, then a biased output Linear."""
    first = inputs * hidden + 2 * hidden
    rest = (depth - 1) * (hidden * hidden + 2 * hidden)
    return first + rest + hidden * classes + classes


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", 11.2e6),
        ("preresnet110", 1.7e6),
        ("preresnet164", 1.7e6),
        ("wrn28_10", 36.5e6),
        ("resnet44", 0.66e6),
    ],
)
def test_parameter_counts(name, expected):
    with torch.device("meta"):  # counting needs shapes only: skip allocating and initializing the weights
        model = build_model(name, 10, 3, 32)
    assert count_parameters(model) == pytest.approx(expected, rel=0.05)


def test_f1_parameter_counts():
    assert count_parameters(build_model("f1", 10, 1, 28)) == expected_f1_parameters(784, 512, 5, 10)
    assert count_parameters(build_model("f1_small", 10, 1, 28)) == expected_f1_parameters(784, 256, 3, 10)
    assert count_parameters(build_model("f1", 10, 1, 28)) == pytest.approx(1.4e6, rel=0.05)


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def test_resnet18_stem_follows_image_size():
    assert first_conv(build_model("resnet18_small", 10, 3, 64)).kernel_size == (3, 3)
    model = build_model("resnet18", 10, 3, 150).eval()
    assert first_conv(model).kernel_size == (7, 7) and first_conv(model).stride == (2, 2)
    assert any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 150, 150)).shape == (1, 10)


def test_vgg_skips_pools_at_1x1():
    # 28 -> 14 -> 7 -> 3 -> 1: the fifth pool would have nothing to pool.
    pools = lambda size: sum(isinstance(m, nn.MaxPool2d) for m in build_model("vgg_small", 10, 1, size).modules())
    assert (pools(28), pools(32), pools(150)) == (4, 5, 5)


def test_dropout_only_in_vgg16_bn():
    for name in SMALL + ("resnet18", "preresnet110", "resnet44", "f1"):
        with torch.device("meta"):
            model = build_model(name, 10, 3, 32)
        assert not any(isinstance(m, nn.Dropout) for m in model.modules()), name
    with torch.device("meta"):
        assert sum(isinstance(m, nn.Dropout) for m in build_model("vgg16_bn", 10, 3, 32).modules()) == 2


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(0)
    model = build_model(name, 10, 3, 32)
    # A training step's worth of BN statistics, so eval mode normalizes instead of passing
    # activations through unit running stats (which lets deep nets' outputs grow huge).
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("name", SMALL + ("f1",))
def test_same_seed_same_weights(name):
    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model(name, 10, 3, 32).state_dict()

    first, again, other = weights(1), weights(1), weights(2)
    assert first.keys() == again.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


@pytest.mark.parametrize("name", SMALL)
def test_ghost_bn_conversion(name):
    # The recipes swap every nn.BatchNorm*d for ghost BN by type: none may be left behind.
    from swa_fast.nn import convert_ghost_batchnorm

    model = convert_ghost_batchnorm(build_model(name, 10, 1, 28), ghost_batch_size=2).train()
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules())
    model(torch.randn(4, 1, 28, 28)).sum().backward()


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet1000'") as info:
        build_model("resnet1000", 10, 3, 32)
    assert all(name in str(info.value) for name in MODEL_NAMES)


@pytest.mark.parametrize("bad", [dict(num_classes=0), dict(in_channels=-1), dict(image_size=2.5)])
def test_bad_sizes_are_rejected(bad):
    args = dict(num_classes=10, in_channels=3, image_size=32) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_model("resnet20", **args)
