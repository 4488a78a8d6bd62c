"""swa_fast.nn.GhostBatchNorm*d and the conversions, against the chunk loop and nn.BatchNorm*d."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import swa_utils as torch_swa_utils

from swa_fast import swa_utils
from swa_fast.nn import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    convert_ghost_batchnorm,
    ghost_batch_norm,
    revert_ghost_batchnorm,
)

from reference import ghost_averaged_stats_step, ghost_chunk_loop

CLASSES = [
    (GhostBatchNorm1d, nn.BatchNorm1d, (22, 6)),
    (GhostBatchNorm1d, nn.BatchNorm1d, (22, 6, 5)),
    (GhostBatchNorm2d, nn.BatchNorm2d, (22, 6, 4, 5)),
    (GhostBatchNorm3d, nn.BatchNorm3d, (22, 6, 2, 3, 4)),
]


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomize(bn: _BatchNorm, seed=3):
    with torch.no_grad():
        bn.weight.copy_(randn(bn.num_features, seed=seed).abs() + 0.5)
        bn.bias.copy_(randn(bn.num_features, seed=seed + 1))
        if bn.running_mean is not None:
            bn.running_mean.copy_(randn(bn.num_features, seed=seed + 2))
            bn.running_var.copy_(randn(bn.num_features, seed=seed + 3).abs() + 0.5)
    return bn


@pytest.mark.parametrize("ghost_class,plain_class,shape", CLASSES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_matches_the_chunk_loop(ghost_class, plain_class, shape, momentum):
    ghost = randomize(ghost_class(6, 8, momentum=momentum, dtype=torch.float64))  # ghosts of 8, 8, 6
    weight = ghost.weight.detach().clone().requires_grad_()
    bias = ghost.bias.detach().clone().requires_grad_()
    running = [ghost.running_mean.clone(), ghost.running_var.clone()]
    tracked = ghost.num_batches_tracked.clone()
    for step in range(3):
        x = randn(*shape, seed=step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        grad_output = randn(*shape, seed=10 + step)
        out = ghost(x)
        out.backward(grad_output)
        want = ghost_chunk_loop(x_ref, 8, weight, bias, *running, tracked, momentum, ghost.eps)
        want.backward(grad_output)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ghost.weight.grad, weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ghost.bias.grad, bias.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ghost.running_mean, running[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, running[1], rtol=1e-12, atol=1e-12)
    assert int(ghost.num_batches_tracked) == int(tracked) == 9  # 3 ghosts per forward


@pytest.mark.parametrize("momentum", [0.1, None])
def test_averaged_stats_mode(momentum):
    ghost = randomize(GhostBatchNorm2d(6, 8, momentum=momentum, stats_mode="averaged", dtype=torch.float64))
    running = [ghost.running_mean.clone(), ghost.running_var.clone()]
    tracked = ghost.num_batches_tracked.clone()
    for step in range(3):
        x = randn(22, 6, 3, 3, seed=step)
        out = ghost(x)
        torch.testing.assert_close(out, ghost_chunk_loop(x, 8, ghost.weight, ghost.bias, eps=ghost.eps))
        ghost_averaged_stats_step(x, 8, *running, tracked, momentum)
    torch.testing.assert_close(ghost.running_mean, running[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, running[1], rtol=1e-12, atol=1e-12)
    assert int(ghost.num_batches_tracked) == 3


@pytest.mark.parametrize("momentum", [1.5, -0.5, 0.0, 1.0])
def test_any_momentum_batchnorm_takes(momentum):
    """nn.BatchNorm does not check its momentum, so a converted model must not either: one ghost of the whole
    batch is BatchNorm, running statistics included."""
    plain = randomize(nn.BatchNorm2d(6, momentum=momentum, dtype=torch.float64))
    ghost = convert_ghost_batchnorm(copy.deepcopy(plain), ghost_batch_size=22)
    for step in range(2):
        x = randn(22, 6, 4, 5, seed=step)
        torch.testing.assert_close(ghost(x), plain(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ghost.running_mean, plain.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, plain.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ghost_class,plain_class,shape", CLASSES)
@pytest.mark.parametrize("batch", [1, 5, 22])
def test_eval_mode_equals_batchnorm(ghost_class, plain_class, shape, batch):
    plain = randomize(plain_class(6)).eval()
    ghost = ghost_class(6, 4)
    ghost.load_state_dict(plain.state_dict())
    ghost.eval()
    x = randn(batch, *shape[1:], dtype=torch.float32)
    assert torch.equal(ghost(x), plain(x))


def test_channels_last_stays_channels_last():
    ghost = GhostBatchNorm2d(6, 4)
    x = randn(12, 6, 5, 5, dtype=torch.float32).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = ghost(x)
    out.sum().backward()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ghost_chunk_loop(x.detach(), 4, ghost.weight, ghost.bias))


def test_without_running_stats_uses_ghost_statistics_in_eval_too():
    ghost = GhostBatchNorm2d(6, 4, track_running_stats=False, affine=False).eval()
    assert ghost.running_mean is None and ghost.num_batches_tracked is None
    x = randn(12, 6, 3, 3, dtype=torch.float32)
    torch.testing.assert_close(ghost(x), ghost_chunk_loop(x, 4))


def test_half_input_with_float32_module():
    ghost = GhostBatchNorm2d(6, 4)
    x = randn(12, 6, 3, 3).to(torch.bfloat16)
    out = ghost(x)
    assert out.dtype == torch.bfloat16 and ghost.running_mean.dtype == torch.float32
    torch.testing.assert_close(out.float(), ghost_chunk_loop(x.float(), 4), rtol=3e-2, atol=3e-2)


def test_is_a_batchnorm_with_the_same_state_dict():
    ghost, plain = GhostBatchNorm2d(6, 4), nn.BatchNorm2d(6)
    assert isinstance(ghost, _BatchNorm)
    assert list(ghost.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in ghost.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert "ghost_batch_size=4" in repr(ghost) and "stats_mode='per_ghost'" in repr(ghost)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
        nn.BatchNorm1d(10, affine=False),
    )


def test_convert_and_revert_keep_parameters_and_statistics():
    model = small_model()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.running_mean.add_(0.5)
            module.num_batches_tracked.fill_(7)
    model[3].eval()
    before = copy.deepcopy(model.state_dict())
    first_weight = model[1].weight
    converted = convert_ghost_batchnorm(model, ghost_batch_size=4)
    kinds = [type(m) for m in converted.modules() if isinstance(m, _BatchNorm)]
    assert kinds == [GhostBatchNorm2d, GhostBatchNorm2d, GhostBatchNorm1d]
    assert converted[1].weight is first_weight  # an optimizer built before still updates it
    assert converted[3][1].momentum is None and not converted[3][1].training and converted[1].training
    assert converted[6].weight is None and converted[6].ghost_batch_size == 4
    after = converted.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    reverted = revert_ghost_batchnorm(converted)
    kinds = [type(m) for m in reverted.modules() if isinstance(m, _BatchNorm)]
    assert kinds == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d]
    assert all(torch.equal(reverted.state_dict()[k], before[k]) for k in before)
    single = convert_ghost_batchnorm(nn.BatchNorm3d(4), 2, stats_mode="averaged")
    assert isinstance(single, GhostBatchNorm3d) and single.stats_mode == "averaged"


def test_converted_model_trains_like_the_chunk_loop_and_evaluates_like_batchnorm():
    model = small_model()
    ghost_model = convert_ghost_batchnorm(copy.deepcopy(model), 4)
    x = torch.randn(12, 3, 6, 6)
    ghost_model(x).sum().backward()
    # Evaluate both with the ghost model's statistics: identical outputs.
    model.load_state_dict(ghost_model.state_dict())
    model.eval()
    ghost_model.eval()
    assert torch.equal(model(x), ghost_model(x))


@pytest.mark.parametrize("update_bn", [swa_utils.update_bn, torch_swa_utils.update_bn])
def test_update_bn_recomputes_ghost_statistics(update_bn):
    model = convert_ghost_batchnorm(small_model(), 4)
    data = [torch.randn(12, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    update_bn(data, model)
    # update_bn resets and uses momentum=None: the cumulative average over every ghost.
    bn = model[1]
    assert int(bn.num_batches_tracked) == 9 and bn.momentum == 0.1
    expected = [torch.zeros(8), torch.ones(8)]
    tracked = torch.tensor(0)
    reference = copy.deepcopy(model)
    for batch in data:
        features = reference[0](batch)
        ghost_chunk_loop(features, 4, None, None, *expected, tracked, None, bn.eps)
    torch.testing.assert_close(bn.running_mean, expected[0])
    torch.testing.assert_close(bn.running_var, expected[1])


def test_torch_compile_matches_eager():
    eager = convert_ghost_batchnorm(small_model(), 4)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    for step in range(2):
        x = torch.randn(12, 3, 6, 6, generator=torch.Generator().manual_seed(step))
        want = eager(x)
        got = compiled(x)
        torch.testing.assert_close(got, want)
        want.square().sum().backward()
        got.square().sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    for (name, a), b in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b, a, msg=name)


def test_torch_compile_with_a_dynamic_batch_size():
    # The fake kernels fall back to Python shape arithmetic when N is symbolic.
    compiled_bn, eager_bn = GhostBatchNorm2d(4, 4), GhostBatchNorm2d(4, 4)
    compiled = torch.compile(compiled_bn, backend="aot_eager", dynamic=True)
    for batch in (12, 16, 10):
        x = torch.randn(batch, 4, 3, 3, generator=torch.Generator().manual_seed(batch))
        torch.testing.assert_close(compiled(x), eager_bn(x))
    torch.testing.assert_close(compiled_bn.running_var, eager_bn.running_var)
    assert int(compiled_bn.num_batches_tracked) == int(eager_bn.num_batches_tracked) == 3 + 4 + 3


def test_functional_without_running_stats_or_counter():
    x = randn(10, 3, 4)
    running = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    out = ghost_batch_norm(x, 4, *running, training=True)
    expected = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    torch.testing.assert_close(out, ghost_chunk_loop(x, 4, None, None, *expected, None, 0.1))
    torch.testing.assert_close(running, expected)
    with pytest.raises(ValueError, match="needs num_batches_tracked"):
        ghost_batch_norm(x, 4, *running, training=True, momentum=None)
    with pytest.raises(ValueError, match="both running_mean and running_var"):
        ghost_batch_norm(x, 4, running[0], None, training=True)


# ---------------------------------------------------------------------------
# Bad input: a clear error, and the module's tensors untouched
# ---------------------------------------------------------------------------


def assert_untouched(bn, before):
    after = bn.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_wrong_channel_count():
    bn = GhostBatchNorm2d(6, 4)
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError, match="expected input with 6 channels"):
        bn(torch.randn(8, 5, 3, 3))
    assert_untouched(bn, before)


@pytest.mark.parametrize("batch,ghost,named", [(9, 4, "ghost_batch_size=4 and N = 9"), (1, 4, "N = 1"),
                                               (8, 1, "ghost_batch_size=1")])
def test_one_sample_ghost_raises_like_batchnorm(batch, ghost, named):
    bn = GhostBatchNorm1d(3, ghost)
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as error:
        bn(torch.randn(batch, 3))
    assert named in str(error.value)
    assert_untouched(bn, before)
    bn.eval()
    assert bn(torch.randn(batch, 3)).shape == (batch, 3)  # running statistics: any batch size


@pytest.mark.parametrize("ghost", [0, -3, 2.5, True, None])
def test_bad_ghost_batch_size(ghost):
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive int"):
        GhostBatchNorm2d(4, ghost)
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive int"):
        convert_ghost_batchnorm(nn.BatchNorm2d(4), ghost)
    if isinstance(ghost, int) and not isinstance(ghost, bool):
        with pytest.raises(ValueError, match="ghost_batch_size must be a positive number"):
            torch.ops.swa_fast.ghost_batch_norm(torch.randn(8, 4), None, None, ghost, 1e-5)


def test_bad_stats_mode():
    with pytest.raises(ValueError, match="stats_mode must be one of"):
        GhostBatchNorm2d(4, 2, stats_mode="mean")


def test_non_floating_input():
    bn = GhostBatchNorm2d(3, 2)
    with pytest.raises(TypeError, match="input must be float16, bfloat16, float32 or float64, got Long"):
        bn(torch.ones(4, 3, 2, 2, dtype=torch.long))


def test_wrong_input_dims():
    with pytest.raises(ValueError, match="expected 4D input"):
        GhostBatchNorm2d(3, 2)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        GhostBatchNorm1d(3, 2)(torch.randn(4, 3, 2, 2))


def test_parameters_on_another_device():
    x = torch.randn(8, 3, 2, 2)
    weight = torch.ones(3, device="meta")
    with pytest.raises(RuntimeError, match="weight is on meta but input is on cpu"):
        torch.ops.swa_fast.ghost_batch_norm(x, weight, None, 4, 1e-5)


def test_mismatched_affine_dtypes_and_shapes():
    x = torch.randn(8, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="weight must have the input's dtype"):
        torch.ops.swa_fast.ghost_batch_norm(x, torch.ones(3, dtype=torch.float64), None, 4, 1e-5)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[3\]"):
        torch.ops.swa_fast.ghost_batch_norm(x, None, torch.ones(4), 4, 1e-5)
