"""torch.ops.swa_fast.ghost_batch_norm{,_backward,_update_stats_} against the chunk-loop reference.

Tolerances: fp32 and fp64 results are compared with a float64 reference at
~1e-5 relative (fp32) and 1e-10 (fp64). fp16/bf16 input (fp32 statistics and
fp32 weight/bias, as AMP gives) is compared with the float64 reference of the
same input values; the output is rounded once to the input dtype, so the
bound is that rounding: 4e-3 (fp16) and 3e-2 (bf16) relative to max(1, |y|).
"""

import pytest
import torch

import swa_fast  # noqa: F401  (registers the ops)

from helpers import devices
from reference import ghost_averaged_stats_step, ghost_chunk_loop

OPS = torch.ops.swa_fast
EPS = 1e-5

# (shape, memory format): 2-D to 5-D, contiguous and channels_last, spatial
# sizes that leave vector tails, one over the 8192-value statistics segment.
SHAPES = [
    ((38, 5), torch.contiguous_format),
    ((20, 4, 7), torch.contiguous_format),
    ((24, 3, 5, 6), torch.contiguous_format),
    ((24, 3, 5, 6), torch.channels_last),
    ((10, 6, 2, 3, 4), torch.contiguous_format),
    ((10, 6, 2, 3, 4), torch.channels_last_3d),
    ((6, 2, 96, 96), torch.contiguous_format),
    ((10, 300, 1, 1), torch.contiguous_format),
]
GHOSTS = [4, 7, 64]  # divides N or not; larger than N (one ghost)


def make_input(shape, fmt, dtype, device, seed=0, offset=0.0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 1.5 + offset
    return x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)


def make_affine(channels, dtype, device, seed=1):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    bias = torch.randn(channels, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    return weight, bias


def reference_forward_backward(x, weight, bias, ghost, grad_output, dtype=torch.float64):
    """Output and gradients of the chunk loop, computed in ``dtype``."""
    x64 = x.detach().to(dtype).requires_grad_()
    w64 = None if weight is None else weight.detach().to(dtype).requires_grad_()
    b64 = None if bias is None else bias.detach().to(dtype).requires_grad_()
    out = ghost_chunk_loop(x64, ghost, w64, b64, eps=EPS)
    out.backward(grad_output.to(dtype))
    return out.detach(), x64.grad, None if w64 is None else w64.grad, None if b64 is None else b64.grad


def ghost_stats_reference(x, ghost):
    dims = [0, *range(2, x.dim())]
    chunks = x.double().split(ghost)
    return torch.stack([c.mean(dims) for c in chunks]), torch.stack([c.var(dims, unbiased=False) for c in chunks])


def relative_error(got, want) -> float:
    assert got.shape == want.shape
    scale = want.double().abs().clamp_min(1.0)
    return ((got.double() - want.double()).abs() / scale).max().item() if want.numel() else 0.0


def assert_close(got, want, rtol, torch_got=None):
    """got within rtol of the float64 reference ``want``, relative to max(1, |want|); with
    ``torch_got`` (torch's chunk loop in the same dtype), within twice torch's own error
    when that is larger: small ghosts of nearly equal values make the gradient
    ill-conditioned for any fp32 implementation."""
    error = relative_error(got, want)
    bound = rtol if torch_got is None else max(rtol, 2 * relative_error(torch_got, want))
    assert error <= bound, f"max relative error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("shape,fmt", SHAPES)
@pytest.mark.parametrize("ghost", GHOSTS)
def test_forward_and_backward_match_the_chunk_loop(device, dtype, rtol, shape, fmt, ghost):
    x = make_input(shape, fmt, dtype, device)
    weight, bias = make_affine(shape[1], dtype, device)
    grad_output = make_input(shape, fmt, dtype, device, seed=2)
    out, mean, var = OPS.ghost_batch_norm(x, weight, bias, ghost, EPS)
    grad_input, grad_weight, grad_bias = OPS.ghost_batch_norm_backward(
        grad_output, x, weight, mean, var, ghost, EPS, True
    )
    want_out, want_dx, want_dw, want_db = reference_forward_backward(x, weight, bias, ghost, grad_output)
    torch_out, torch_dx, torch_dw, torch_db = reference_forward_backward(x, weight, bias, ghost, grad_output, dtype)
    want_mean, want_var = ghost_stats_reference(x, ghost)
    assert out.dtype == dtype and mean.dtype == var.dtype == dtype
    assert out.is_contiguous(memory_format=fmt) and grad_input.is_contiguous(memory_format=fmt)
    assert mean.shape == (-(-shape[0] // ghost), shape[1])
    assert_close(mean, want_mean, rtol)
    assert_close(var, want_var, rtol)
    assert_close(out, want_out, rtol, torch_out)
    assert_close(grad_input, want_dx, rtol, torch_dx)
    # Sums over a whole channel: relative to the sum's scale.
    assert_close(grad_weight, want_dw, rtol * 10, torch_dw)
    assert_close(grad_bias, want_db, rtol * 10, torch_db)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape,fmt", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[6]])
def test_half_input_with_float32_statistics_and_affine(device, dtype, rtol, shape, fmt):
    ghost = 4
    x = make_input(shape, fmt, dtype, device)
    weight, bias = make_affine(shape[1], torch.float32, device)
    grad_output = make_input(shape, fmt, dtype, device, seed=2)
    out, mean, var = OPS.ghost_batch_norm(x, weight, bias, ghost, EPS)
    grad_input, grad_weight, grad_bias = OPS.ghost_batch_norm_backward(
        grad_output, x, weight, mean, var, ghost, EPS, True
    )
    assert out.dtype == grad_input.dtype == dtype
    assert mean.dtype == var.dtype == grad_weight.dtype == grad_bias.dtype == torch.float32
    want_out, want_dx, want_dw, want_db = reference_forward_backward(x, weight, bias, ghost, grad_output)
    want_mean, want_var = ghost_stats_reference(x, ghost)
    assert_close(mean, want_mean, 1e-5)  # statistics are fp32 sums of exact half values
    assert_close(var, want_var, 1e-5)
    assert_close(out, want_out, rtol)
    assert_close(grad_input, want_dx, rtol)
    assert_close(grad_weight, want_dw, 1e-4)
    assert_close(grad_bias, want_db, 1e-4)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(9, 3), (9, 2, 3, 3)])
def test_every_ghost_size_from_1_to_n(device, shape):
    x = make_input(shape, torch.contiguous_format, torch.float64, device)
    weight, bias = make_affine(shape[1], torch.float64, device)
    n = shape[0]
    values_per_sample = x[0, 0].numel()
    for ghost in range(1, n + 2):
        if (ghost == 1 or n % ghost == 1) and values_per_sample == 1:  # a ghost of one value per channel
            with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
                OPS.ghost_batch_norm(x, weight, bias, ghost, EPS)
            continue
        out, _, _ = OPS.ghost_batch_norm(x, weight, bias, ghost, EPS)
        assert_close(out, ghost_chunk_loop(x, ghost, weight, bias, eps=EPS), 1e-10)


@pytest.mark.parametrize("device", devices())
def test_without_affine(device):
    x = make_input((12, 3, 4, 4), torch.channels_last, torch.float32, device)
    grad_output = make_input((12, 3, 4, 4), torch.channels_last, torch.float32, device, seed=5)
    out, mean, var = OPS.ghost_batch_norm(x, None, None, 5, EPS)
    grad_input, _, _ = OPS.ghost_batch_norm_backward(grad_output, x, None, mean, var, 5, EPS, True)
    want_out, want_dx, _, _ = reference_forward_backward(x, None, None, 5, grad_output)
    assert_close(out, want_out, 1e-5)
    assert_close(grad_input, want_dx, 1e-5)


@pytest.mark.parametrize("device", devices())
def test_variance_is_accurate_far_from_zero(device):
    # A one-pass sum of squares would lose every digit of a unit variance here.
    x = make_input((64, 4, 16, 16), torch.contiguous_format, torch.float32, device, offset=1e4)
    _, mean, var = OPS.ghost_batch_norm(x, None, None, 16, EPS)
    want_mean, want_var = ghost_stats_reference(x, 16)
    assert_close(mean, want_mean, 1e-6)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-4, atol=0)


def test_results_do_not_depend_on_the_thread_count():
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            for shape, fmt in SHAPES[2:4] + SHAPES[6:7]:
                x = make_input(shape, fmt, torch.float32, "cpu")
                weight, bias = make_affine(shape[1], torch.float32, "cpu")
                out, mean, var = OPS.ghost_batch_norm(x, weight, bias, 4, EPS)
                grads = OPS.ghost_batch_norm_backward(out, x, weight, mean, var, 4, EPS, True)
                results.append([out, mean, var, *grads])
    finally:
        torch.set_num_threads(previous)
    per_run = len(results) // 3
    for first, again in zip(results[:per_run], results[per_run:]):
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float64])
def test_per_ghost_running_stats_match_the_chunk_loop(device, momentum, running_dtype):
    shape, ghost = (23, 5, 3, 3), 4
    x = make_input(shape, torch.contiguous_format, running_dtype, device)
    running = [torch.rand(5, dtype=running_dtype, device=device), torch.rand(5, dtype=running_dtype, device=device) + 1]
    tracked = torch.tensor(3, device=device)
    expected = [r.clone() for r in running]
    expected_tracked = tracked.clone()
    for _ in range(2):
        ghost_chunk_loop(x, ghost, None, None, *expected, expected_tracked, momentum, EPS)
        _, mean, var = OPS.ghost_batch_norm(x, None, None, ghost, EPS)
        OPS.ghost_batch_norm_update_stats_(*running, tracked, mean, var, shape[0], ghost, 9, momentum, False)
    assert int(tracked) == int(expected_tracked) == 3 + 2 * 6
    for got, want in zip(running, expected):
        assert_close(got, want, 1e-6 if running_dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("momentum", [0.1, None])
def test_averaged_running_stats(device, momentum):
    shape, ghost = (22, 5, 3), 8  # ghosts of 8, 8 and 6 samples
    x = make_input(shape, torch.contiguous_format, torch.float64, device)
    running = [torch.zeros(5, dtype=torch.float64, device=device), torch.ones(5, dtype=torch.float64, device=device)]
    tracked = torch.tensor(0, device=device)
    expected = [r.clone() for r in running]
    expected_tracked = tracked.clone()
    for _ in range(3):
        ghost_averaged_stats_step(x, ghost, *expected, expected_tracked, momentum)
        _, mean, var = OPS.ghost_batch_norm(x, None, None, ghost, EPS)
        OPS.ghost_batch_norm_update_stats_(*running, tracked, mean, var, shape[0], ghost, 3, momentum, True)
    assert int(tracked) == int(expected_tracked) == 3
    for got, want in zip(running, expected):
        assert_close(got, want, 1e-12)


@pytest.mark.parametrize("device", devices())
def test_half_running_stats(device):
    x = make_input((16, 4, 2, 2), torch.contiguous_format, torch.float16, device)
    running = [torch.zeros(4, dtype=torch.float16, device=device), torch.ones(4, dtype=torch.float16, device=device)]
    tracked = torch.tensor(0, device=device)
    expected = [r.float() for r in running]
    ghost_chunk_loop(x.float(), 8, None, None, *expected, torch.tensor(0), 0.1, EPS)
    _, mean, var = OPS.ghost_batch_norm(x, None, None, 8, EPS)
    OPS.ghost_batch_norm_update_stats_(*running, tracked, mean, var, 16, 8, 4, 0.1, False)
    for got, want in zip(running, expected):
        assert_close(got, want, 1e-3)


@pytest.mark.parametrize("device", devices())
def test_gradcheck_in_float64(device):
    for shape, fmt, ghost, affine in [
        ((6, 3, 2, 2), torch.contiguous_format, 3, True),
        ((8, 3, 2, 2), torch.channels_last, 3, True),
        ((8, 4), torch.contiguous_format, 3, False),
        ((5, 2, 3), torch.contiguous_format, 5, True),
    ]:
        x = make_input(shape, fmt, torch.float64, device).requires_grad_()
        weight, bias = make_affine(shape[1], torch.float64, device)
        params = (weight.requires_grad_(), bias.requires_grad_()) if affine else (None, None)

        def fn(x, weight, bias):
            return OPS.ghost_batch_norm(x, weight, bias, ghost, EPS)[0]

        assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", devices())
def test_opcheck_every_op(device):
    samples = [
        (make_input((10, 3, 4, 4), torch.contiguous_format, torch.float32, device), torch.float32),
        (make_input((10, 3, 4, 4), torch.channels_last, torch.float32, device), torch.float32),
        (make_input((10, 6), torch.contiguous_format, torch.bfloat16, device), torch.float32),
        (make_input((6, 2, 5), torch.contiguous_format, torch.float64, device), torch.float64),
    ]
    for x, param_dtype in samples:
        weight, bias = make_affine(x.shape[1], param_dtype, device)
        x.requires_grad_()
        weight.requires_grad_()
        bias.requires_grad_()
        torch.library.opcheck(OPS.ghost_batch_norm.default, (x, weight, bias, 4, EPS))
        torch.library.opcheck(OPS.ghost_batch_norm.default, (x, None, None, 4, EPS))
        out, mean, var = OPS.ghost_batch_norm(x.detach(), weight.detach(), bias.detach(), 4, EPS)
        for compute_grad_input in (True, False):
            torch.library.opcheck(
                OPS.ghost_batch_norm_backward.default,
                (torch.ones_like(out), x.detach(), weight.detach(), mean, var, 4, EPS, compute_grad_input),
            )
        stats_dtype = mean.dtype
        running = [torch.zeros(x.shape[1], dtype=stats_dtype, device=device), torch.ones(x.shape[1], dtype=stats_dtype, device=device)]
        for momentum in (0.1, None):
            torch.library.opcheck(
                OPS.ghost_batch_norm_update_stats_.default,
                (*running, torch.tensor(2, device=device), mean, var, x.shape[0], 4,
                 x[0, 0].numel(), momentum, momentum is None),
            )


@pytest.mark.parametrize("device", devices())
def test_strided_weight_and_bias(device):
    x = make_input((8, 3, 4), torch.contiguous_format, torch.float64, device)
    weight, bias = make_affine(6, torch.float64, device)
    out, mean, var = OPS.ghost_batch_norm(x, weight[::2], bias[1::2], 4, EPS)
    assert_close(out, ghost_chunk_loop(x, 4, weight[::2], bias[1::2], eps=EPS), 1e-10)
    dy = make_input((8, 3, 4), torch.contiguous_format, torch.float64, device, seed=3)
    _, want_dx, want_dw, _ = reference_forward_backward(x, weight[::2], bias[1::2], 4, dy)
    grad_input, grad_weight, _ = OPS.ghost_batch_norm_backward(dy, x, weight[::2], mean, var, 4, EPS, True)
    assert_close(grad_input, want_dx, 1e-10)
    assert_close(grad_weight, want_dw, 1e-10)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("average_ghosts", [False, True])
def test_update_stats_without_channels_still_counts_the_batch(device, average_ghosts):
    # C = 0 is legal for the mutable op (the forward refuses it): nothing to
    # update, but the batch counts, the same on every device.
    empty = torch.zeros(3, 0, device=device)
    running = [torch.zeros(0, device=device), torch.ones(0, device=device)]
    tracked = torch.tensor(5, device=device)
    OPS.ghost_batch_norm_update_stats_(*running, tracked, empty, empty, 12, 4, 1, None, average_ghosts)
    assert int(tracked) == 5 + (1 if average_ghosts else 3)


def at_storage_offset(t: torch.Tensor, fmt, offset: int) -> torch.Tensor:
    """The same values as t, in t's memory format, starting `offset` elements into a
    fresh storage (misaligned for the 16-byte vector loads)."""
    storage = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    permuted = t.permute(0, *range(2, t.dim()), 1) if fmt != torch.contiguous_format else t
    view = storage[offset:].view(permuted.shape)
    if fmt != torch.contiguous_format:
        view = view.permute(0, t.dim() - 1, *range(1, t.dim() - 1))
    view.copy_(t)
    assert view.is_contiguous(memory_format=fmt) and view.storage_offset() == offset
    return view


# (shape, memory format, ghost): row lengths (S, or C for channels last) that are
# multiples of every vector width, so aligned input takes 16-byte loads.
ALIGNMENT_CASES = [
    ((12, 8, 4, 4), torch.contiguous_format, 4),
    ((12, 16, 3, 3), torch.channels_last, 5),
    ((20, 16), torch.contiguous_format, 8),
    ((6, 2, 64, 64), torch.contiguous_format, 3),  # few pairs, many values: split sums
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,fmt,ghost", ALIGNMENT_CASES)
def test_misaligned_input_gives_the_same_bits_as_aligned(device, dtype, shape, fmt, ghost):
    x = make_input(shape, fmt, dtype, device, offset=3.0)
    dy = make_input(shape, fmt, dtype, device, seed=4)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = make_affine(shape[1], param_dtype, device)
    aligned = (*OPS.ghost_batch_norm(x, weight, bias, ghost, EPS),)
    aligned += OPS.ghost_batch_norm_backward(dy, x, weight, aligned[1], aligned[2], ghost, EPS, True)
    for offset in (1, 3):
        x_off, dy_off = at_storage_offset(x, fmt, offset), at_storage_offset(dy, fmt, offset)
        shifted = (*OPS.ghost_batch_norm(x_off, weight, bias, ghost, EPS),)
        shifted += OPS.ghost_batch_norm_backward(dy_off, x_off, weight, shifted[1], shifted[2], ghost, EPS, True)
        names = ("output", "mean", "var", "grad_input", "grad_weight", "grad_bias")
        for name, got, want in zip(names, shifted, aligned):
            assert torch.equal(got, want), f"{name} differs at storage offset {offset}"


# ---------------------------------------------------------------------------
# Double backward: gradient penalties, Hessian-vector products
# ---------------------------------------------------------------------------

DOUBLE_BACKWARD_CASES = [
    ((8, 3), 3, True),  # 2-D, ghosts 3 + 3 + 2
    ((6, 2, 5), 4, False),  # 3-D, remainder ghost, no affine
    ((5, 2, 2, 3), 2, True),  # 4-D, ghosts 2 + 2 + 1 (one sample with 6 values)
    ((4, 2, 2, 2, 2), 3, True),  # 5-D
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape,ghost,affine", DOUBLE_BACKWARD_CASES)
def test_gradgradcheck_in_float64(device, shape, ghost, affine):
    x = make_input(shape, torch.contiguous_format, torch.float64, device).requires_grad_()
    inputs = [x]
    if affine:
        weight, bias = make_affine(shape[1], torch.float64, device)
        inputs += [weight.requires_grad_(), bias.requires_grad_()]

    def fn(x, weight=None, bias=None):
        return OPS.ghost_batch_norm(x, weight, bias, ghost, EPS)[0]

    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_gradient_penalty_reaches_the_weight_as_with_the_chunk_loop(device):
    # WGAN-GP / R1: the norm of d(out)/d(x), differentiated again w.r.t. the weight.
    x = make_input((12, 3, 4, 4), torch.contiguous_format, torch.float64, device).requires_grad_()
    weight, bias = make_affine(3, torch.float64, device)
    upstream = make_input((12, 3, 4, 4), torch.contiguous_format, torch.float64, device, seed=5)
    grads = {}
    for name, forward in (("swa_fast", lambda x, w, b: OPS.ghost_batch_norm(x, w, b, 4, EPS)[0]),
                          ("chunk loop", lambda x, w, b: ghost_chunk_loop(x, 4, w, b, eps=EPS))):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        out = forward(x, w, b)
        (dx,) = torch.autograd.grad((out * upstream).sum(), x, create_graph=True)
        dx.square().sum().backward()
        grads[name] = w.grad
    assert grads["swa_fast"].abs().max() > 1e-3  # not silently zero
    assert_close(grads["swa_fast"], grads["chunk loop"], 1e-9)


# ---------------------------------------------------------------------------
# nn.BatchNorm's rules: more than one value per channel per ghost, empty input, eps
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape,ghost", [((5, 3, 8, 8), 4), ((1, 3, 16), 4), ((1, 2, 3, 3), 1), ((6, 2, 2), 1)])
def test_a_ghost_of_one_sample_with_several_values_per_channel(device, shape, ghost):
    x = make_input(shape, torch.contiguous_format, torch.float64, device)
    dy = make_input(shape, torch.contiguous_format, torch.float64, device, seed=3)
    weight, bias = make_affine(shape[1], torch.float64, device)
    out, mean, var = OPS.ghost_batch_norm(x, weight, bias, ghost, EPS)
    assert_close(out, ghost_chunk_loop(x, ghost, weight, bias, eps=EPS), 1e-10)
    want_dx, want_dw = reference_forward_backward(x, weight, bias, ghost, dy)[1:3]
    grad_input, grad_weight, _ = OPS.ghost_batch_norm_backward(dy, x, weight, mean, var, ghost, EPS, True)
    assert_close(grad_input, want_dx, 1e-8)
    assert_close(grad_weight, want_dw, 1e-8)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(1, 3), (5, 3), (9, 2)])
def test_a_ghost_of_one_value_per_channel_is_refused_as_batch_norm_refuses_it(device, shape):
    x = make_input(shape, torch.contiguous_format, torch.float32, device)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        OPS.ghost_batch_norm(x, None, None, 4, EPS)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (6, 3, 0), (4, 3, 0, 5), (0, 3)])
@pytest.mark.parametrize("stats_mode", ["per_ghost", "averaged"])
def test_empty_input_as_batch_norm(device, shape, stats_mode):
    from swa_fast.nn.functional import ghost_batch_norm

    channels = shape[1]
    x = torch.zeros(shape, device=device, requires_grad=True)
    weight = torch.ones(channels, device=device, requires_grad=True)
    bias = torch.zeros(channels, device=device, requires_grad=True)
    running = [torch.full((channels,), 0.5, device=device), torch.full((channels,), 2.0, device=device)]
    tracked = torch.tensor(3, device=device)
    out = ghost_batch_norm(x, 2, *running, weight, bias, True, 0.1, EPS, tracked, stats_mode)
    reference = torch.nn.functional.batch_norm(x, running[0].clone(), running[1].clone(), weight, bias, True)
    assert out.shape == reference.shape == x.shape
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))
    assert torch.equal(running[0], torch.full_like(running[0], 0.5))  # untouched, as BatchNorm leaves them
    assert torch.equal(running[1], torch.full_like(running[1], 2.0))
    ghosts = 1 if shape[0] == 0 else -(-shape[0] // 2)  # N = 0 is one empty batch, as BatchNorm counts it
    assert int(tracked) == 3 + (1 if stats_mode == "averaged" else ghosts)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_must_be_positive_with_batch_statistics(device, eps):
    x = torch.ones(4, 3, device=device)  # a constant channel: eps = 0 would divide by zero
    with pytest.raises(ValueError, match="eps must be positive"):
        OPS.ghost_batch_norm(x, None, None, 2, eps)
    with pytest.raises(ValueError, match="eps must be positive"):
        torch.nn.functional.batch_norm(x, None, None, training=True, eps=eps)  # torch's own rule


# ---------------------------------------------------------------------------
# The running-statistics update: torch's in-place rules and aliasing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_update_stats_bumps_versions_and_refuses_aliases(device):
    x = make_input((8, 3, 2, 2), torch.contiguous_format, torch.float32, device)
    _, mean, var = OPS.ghost_batch_norm(x, None, None, 4, EPS)
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    tracked = torch.tensor(0, device=device)
    versions = [t._version for t in (running_mean, running_var, tracked)]
    OPS.ghost_batch_norm_update_stats_(running_mean, running_var, tracked, mean, var, 8, 4, 4, 0.1, False)
    assert [t._version for t in (running_mean, running_var, tracked)] > versions
    snapshot = running_mean.clone()
    with pytest.raises(RuntimeError, match="running_mean and running_var share memory"):
        OPS.ghost_batch_norm_update_stats_(running_mean, running_mean, tracked, mean, var, 8, 4, 4, 0.1, False)
    with pytest.raises(RuntimeError, match="running_mean and mean share memory"):
        OPS.ghost_batch_norm_update_stats_(mean[0], running_var, tracked, mean, var, 8, 4, 4, 0.1, False)
    assert torch.equal(running_mean, snapshot)
    leaf = torch.zeros(3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="running_mean is a leaf Variable that requires grad"):
        OPS.ghost_batch_norm_update_stats_(leaf, running_var, tracked, mean, var, 8, 4, 4, 0.1, False)
