"""GPU tests of the ghost batch norm CUDA kernels (csrc/cuda/ghost_bn_cuda.cu), at the op level.

What only the CUDA path has: the reductions' split/merge plan (few (ghost,
channel) pairs with many values each), the vectorized / scalar split (row
lengths around the vector width, misaligned views), ChannelsLast channel
tiles, int64 offsets past 2^31 elements, bitwise run-to-run reproducibility,
num_batches_tracked read on the device (no host sync, CUDA-graph capture).
Run on a GPU machine with ``pytest -m cuda``; elsewhere every test skips.

Tolerances, relative to max(1, max |reference|), against a float64 chunk-loop
reference computed from the same input values: fp64 1e-10 (1e-9 for sums);
fp32 1e-5 (1e-4 for the backward's sums over up to 2^19 values); fp16 4e-3 and
bf16 3e-2 for what is rounded to the input (or weight) dtype, that rounding
being the bound; statistics of fp16/bf16 input are fp32, so 1e-5.
"""

from __future__ import annotations

import pytest
import torch

import swa_fast  # noqa: F401  (registers the ops)

from reference import ghost_averaged_stats_step, ghost_chunk_loop

pytestmark = pytest.mark.cuda  # skipped without a GPU and a CUDA build (conftest.py)


OPS = torch.ops.swa_fast
DEVICE = "cuda"
EPS = 1e-5
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CONTIGUOUS = torch.contiguous_format
CHANNELS_LAST = torch.channels_last
CHANNELS_LAST_3D = torch.channels_last_3d

TOLERANCES = {
    torch.float64: {"stats": 1e-10, "out": 1e-10, "grad": 1e-9},
    torch.float32: {"stats": 1e-5, "out": 1e-5, "grad": 1e-4},
    torch.float16: {"stats": 1e-5, "out": 4e-3, "grad": 4e-3},
    torch.bfloat16: {"stats": 1e-5, "out": 3e-2, "grad": 3e-2},
}

# (shape, memory format, ghost size). Vector widths are 4 (fp32), 2 (fp64)
# and 8 (fp16/bf16) elements along S (ChannelsFirst) or C (ChannelsLast).
# No ghost has only 2 values per channel: there dx is ~0 by cancellation of
# terms up to ~invstd^2 * |x| (invstd up to 1/sqrt(eps)), which fp32 cannot
# resolve to 1e-4, on the CPU as on the GPU.
CASES = [
    ((16, 5), CONTIGUOUS, 4),  # 2-D: ChannelsLast layout, C = 5 under every width
    ((13, 8), CONTIGUOUS, 5),  # ghosts 5 + 5 + 3; C = 8 vectorized for every dtype
    ((64, 33), CONTIGUOUS, 8),  # a channel tile of 32+ units for fp64 (33 is odd: scalar)
    ((12, 6, 7), CONTIGUOUS, 4),  # 3-D, S = 7: scalar
    ((9, 3, 8), CONTIGUOUS, 3),  # S = 8: vectorized for every dtype
    ((8, 4, 2), CONTIGUOUS, 2),  # short rows (S = 2), two-sample ghosts
    ((16, 8, 5, 5), CONTIGUOUS, 4),
    ((10, 3, 7, 7), CONTIGUOUS, 4),  # ghosts 4 + 4 + 2, S = 49
    ((8, 16, 8, 8), CONTIGUOUS, 8),  # one ghost, S = 64 vectorized
    ((6, 5, 3, 4), CONTIGUOUS, 7),  # ghost larger than N: one ghost of 6
    ((10, 3, 7, 7), CHANNELS_LAST, 4),  # C = 3: scalar ChannelsLast
    ((8, 16, 8, 8), CHANNELS_LAST, 2),  # C = 16: vectorized ChannelsLast for every dtype
    ((12, 40, 3, 3), CHANNELS_LAST, 5),  # ghosts 5 + 5 + 2
    ((6, 264, 2, 3), CHANNELS_LAST, 3),  # 2 to 5 channel tiles, depending on the width
    ((8, 4, 3, 4, 5), CONTIGUOUS, 4),  # 5-D
    ((8, 4, 3, 4, 5), CHANNELS_LAST_3D, 4),
    ((6, 3, 2, 2, 2), CONTIGUOUS, 3),
    ((10, 300, 1, 1), CONTIGUOUS, 5),  # S = 1: the ChannelsLast layout from contiguous 4-D
    ((10, 8, 1, 1), CHANNELS_LAST, 5),  # contiguous and channels_last at once
]

# Few (ghost, channel) pairs with many values each: the reductions split each
# pair's sum over many blocks and merge the partials in a second kernel.
FEW_PAIRS = [
    ((64, 2, 128, 128), CONTIGUOUS, 32),  # 4 pairs of 2^19 values
    ((64, 2, 128, 128), CHANNELS_LAST, 32),  # C = 2: scalar ChannelsLast, split rows
    ((16, 8, 64, 64), CHANNELS_LAST, 8),  # vectorized ChannelsLast, split rows
    ((65536, 4), CONTIGUOUS, 16384),  # 2-D: 4 ghosts x 4 channels
    ((4, 1, 256, 1024), CONTIGUOUS, 2),  # one channel
]


def case_id(case):
    shape, fmt, ghost = case
    name = {CONTIGUOUS: "contig", CHANNELS_LAST: "cl", CHANNELS_LAST_3D: "cl3d"}[fmt]
    return f"{'x'.join(map(str, shape))}-{name}-g{ghost}"


def make_input(shape, fmt, dtype, seed=0, offset=3.0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 1.5 + offset
    return x.to(device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)


def make_affine(channels, dtype, kind, seed=1):
    """(weight, bias): None, in the input's dtype, or float32 (for fp16/bf16 input, as AMP gives)."""
    if kind == "none":
        return None, None
    generator = torch.Generator().manual_seed(seed)
    weight = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=generator, dtype=torch.float64)
    param_dtype = {"same": dtype, "float32": torch.float32}[kind]
    return weight.to(DEVICE, param_dtype), bias.to(DEVICE, param_dtype)


def affine_kinds(dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return ["none", "same", "float32"]
    return ["none", "same"]


def reference(x, weight, bias, ghost, grad_output):
    """The float64 chunk loop on the CPU: output, per-ghost mean and biased var, gradients.
    Without weight/bias the gradients are those of weight = 1, bias = 0 (the op returns them)."""
    channels = x.shape[1]
    x64 = x.detach().cpu().double().requires_grad_()
    w64 = torch.ones(channels, dtype=torch.float64) if weight is None else weight.detach().cpu().double()
    b64 = torch.zeros(channels, dtype=torch.float64) if bias is None else bias.detach().cpu().double()
    w64.requires_grad_()
    b64.requires_grad_()
    out = ghost_chunk_loop(x64, ghost, w64, b64, eps=EPS)
    out.backward(grad_output.detach().cpu().double())
    dims = [0, *range(2, x.dim())]
    chunks = x64.detach().split(ghost)
    return {
        "output": out.detach(),
        "mean": torch.stack([c.mean(dims) for c in chunks]),
        "var": torch.stack([c.var(dims, unbiased=False) for c in chunks]),
        "grad_input": x64.grad,
        "grad_weight": w64.grad,
        "grad_bias": b64.grad,
    }


def run_ops(x, weight, bias, ghost, grad_output, compute_grad_input=True):
    out, mean, var = OPS.ghost_batch_norm(x, weight, bias, ghost, EPS)
    grad_input, grad_weight, grad_bias = OPS.ghost_batch_norm_backward(
        grad_output, x, weight, mean, var, ghost, EPS, compute_grad_input
    )
    return {
        "output": out,
        "mean": mean,
        "var": var,
        "grad_input": grad_input,
        "grad_weight": grad_weight,
        "grad_bias": grad_bias,
    }


# Which tolerance of TOLERANCES each result gets.
KIND = {
    "output": "out",
    "mean": "stats",
    "var": "stats",
    "grad_input": "grad",
    "grad_weight": "grad",
    "grad_bias": "grad",
}


def assert_close(got, want, tol, what):
    got = got.detach().cpu().double()
    want = want.detach().cpu().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max |diff| {err:.3g} > {tol:g} x {scale:.3g}"


def check_against(results, expected, dtype, weight, fmt):
    tol = TOLERANCES[dtype]
    for name, want in expected.items():
        assert_close(results[name], want, tol[KIND[name]], name)
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert results["output"].dtype == results["grad_input"].dtype == dtype
    assert results["mean"].dtype == results["var"].dtype == stats_dtype
    param_dtype = stats_dtype if weight is None else weight.dtype
    assert results["grad_weight"].dtype == results["grad_bias"].dtype == param_dtype
    assert results["output"].is_contiguous(memory_format=fmt)
    assert results["grad_input"].is_contiguous(memory_format=fmt)


# ---------------------------------------------------------------------------
# Against the float64 chunk loop, and against the CPU op
# ---------------------------------------------------------------------------


def _reference_params():
    for case in CASES:
        for dtype in FLOAT_DTYPES:
            for kind in affine_kinds(dtype):
                yield pytest.param(case, dtype, kind, id=f"{case_id(case)}-{str(dtype)[6:]}-{kind}")


@pytest.mark.parametrize("case,dtype,affine", list(_reference_params()))
def test_matches_chunk_loop_reference(case, dtype, affine):
    shape, fmt, ghost = case
    x = make_input(shape, fmt, dtype)
    dy = make_input(shape, fmt, dtype, seed=7, offset=0.0)
    weight, bias = make_affine(shape[1], dtype, affine)
    results = run_ops(x, weight, bias, ghost, dy)
    check_against(results, reference(x, weight, bias, ghost, dy), dtype, weight, fmt)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_cpu_op(case, dtype):
    shape, fmt, ghost = case
    x = make_input(shape, fmt, dtype)
    dy = make_input(shape, fmt, dtype, seed=7, offset=0.0)
    weight, bias = make_affine(shape[1], dtype, "same")
    gpu = run_ops(x, weight, bias, ghost, dy)
    cpu = run_ops(x.cpu(), weight.cpu(), bias.cpu(), ghost, dy.cpu())
    tol = TOLERANCES[dtype]
    for name, value in cpu.items():
        assert gpu[name].dtype == value.dtype, name
        # Both approximate the same float64 result: allow twice the bound.
        assert_close(gpu[name], value, 2 * tol[KIND[name]], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", [CONTIGUOUS, CHANNELS_LAST], ids=["contig", "cl"])
def test_every_ghost_size(fmt, dtype):
    shape = (11, 6, 4, 5)
    x = make_input(shape, fmt, dtype)
    dy = make_input(shape, fmt, dtype, seed=3, offset=0.0)
    weight, bias = make_affine(shape[1], dtype, "same")
    checked = 0
    for ghost in range(2, shape[0] + 2):
        num_ghosts = -(-shape[0] // ghost)
        if shape[0] - (num_ghosts - 1) * ghost == 1:
            continue  # a last ghost of one sample is an error (tests/test_bad_input.py)
        results = run_ops(x, weight, bias, ghost, dy)
        assert results["mean"].shape == (num_ghosts, shape[1])
        check_against(results, reference(x, weight, bias, ghost, dy), dtype, weight, fmt)
        checked += 1
    assert checked >= 5


def test_without_grad_input_same_parameter_gradients():
    shape, fmt, ghost = (10, 3, 7, 7), CONTIGUOUS, 4
    x = make_input(shape, fmt, torch.float32)
    dy = make_input(shape, fmt, torch.float32, seed=5, offset=0.0)
    weight, bias = make_affine(3, torch.float32, "same")
    full = run_ops(x, weight, bias, ghost, dy, compute_grad_input=True)
    partial = run_ops(x, weight, bias, ghost, dy, compute_grad_input=False)
    assert partial["grad_input"].numel() == 0 and partial["grad_input"].device == x.device
    assert torch.equal(partial["grad_weight"], full["grad_weight"])
    assert torch.equal(partial["grad_bias"], full["grad_bias"])


# ---------------------------------------------------------------------------
# Vector paths: misaligned views, few pairs with many values
# ---------------------------------------------------------------------------


def at_storage_offset_1(t, fmt):
    """A copy of t that starts one element into its storage: misaligned for 16-byte vectors."""
    storage = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
    if fmt == CHANNELS_LAST:
        n, c, h, w = t.shape
        view = storage[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        view = storage[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous(memory_format=fmt) and view.storage_offset() == 1
    return view


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("fmt", [CONTIGUOUS, CHANNELS_LAST], ids=["contig", "cl"])
def test_misaligned_views(fmt, dtype):
    shape, ghost = (12, 8, 4, 4), 4  # S = 16 and C = 8: vectorized when aligned
    x = make_input(shape, fmt, dtype)
    dy = make_input(shape, fmt, dtype, seed=9, offset=0.0)
    weight, bias = make_affine(8, dtype, "same")
    x_off, dy_off = at_storage_offset_1(x, fmt), at_storage_offset_1(dy, fmt)
    assert x_off.data_ptr() % 16 != 0
    expected = reference(x, weight, bias, ghost, dy)
    for xs, dys in ((x_off, dy), (x, dy_off), (x_off, dy_off)):
        results = run_ops(xs, weight, bias, ghost, dys)
        check_against(results, expected, dtype, weight, fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", FEW_PAIRS, ids=case_id)
def test_few_pairs_many_values(case, dtype):
    shape, fmt, ghost = case
    x = make_input(shape, fmt, dtype, offset=10.0)  # a large mean: the statistics must not cancel
    dy = make_input(shape, fmt, dtype, seed=11, offset=0.0)
    weight, bias = make_affine(shape[1], dtype, "same")
    results = run_ops(x, weight, bias, ghost, dy)
    check_against(results, reference(x, weight, bias, ghost, dy), dtype, weight, fmt)


# ---------------------------------------------------------------------------
# Running statistics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("average", [False, True], ids=["per_ghost", "averaged"])
@pytest.mark.parametrize("shape,ghost", [((10, 6, 5, 5), 4), ((38, 5), 7)], ids=["4d", "2d"])
def test_update_stats_matches_chunk_loop(shape, ghost, average, momentum, input_dtype, running_dtype):
    x = make_input(shape, CONTIGUOUS, input_dtype)
    _, mean, var = OPS.ghost_batch_norm(x, None, None, ghost, EPS)
    channels = shape[1]
    sample_numel = x[0, 0].numel()
    num_ghosts = -(-shape[0] // ghost)
    generator = torch.Generator().manual_seed(4)
    rm0 = (torch.randn(channels, generator=generator, dtype=torch.float64) * 0.5).to(running_dtype)
    rv0 = (torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5).to(running_dtype)
    rm, rv = rm0.clone().to(DEVICE), rv0.clone().to(DEVICE)  # never the reference's storage
    nbt = torch.tensor(3, dtype=torch.long, device=DEVICE)
    OPS.ghost_batch_norm_update_stats_(rm, rv, nbt, mean, var, shape[0], ghost, sample_numel, momentum, average)

    ref_rm, ref_rv, ref_nbt = rm0.double().clone(), rv0.double().clone(), torch.tensor(3, dtype=torch.long)
    if average:
        ghost_averaged_stats_step(x.cpu(), ghost, ref_rm, ref_rv, ref_nbt, momentum)
    else:
        ghost_chunk_loop(x.cpu().double(), ghost, None, None, ref_rm, ref_rv, ref_nbt, momentum, EPS)
    assert nbt.device == mean.device and nbt.dtype == torch.long  # advanced in place, on the device
    assert int(nbt.item()) == int(ref_nbt) == 3 + (1 if average else num_ghosts)
    assert rm.dtype == rv.dtype == running_dtype
    tol = {torch.float64: 1e-5 if input_dtype == torch.float32 else 1e-10, torch.float32: 1e-5, torch.float16: 2e-3}
    assert_close(rm, ref_rm, tol[running_dtype], "running_mean")
    assert_close(rv, ref_rv, tol[running_dtype], "running_var")


@pytest.mark.parametrize("momentum", [0.25, None])
@pytest.mark.parametrize("average", [False, True], ids=["per_ghost", "averaged"])
def test_update_stats_matches_cpu_op(average, momentum):
    mean = torch.randn(5, 7, device=DEVICE)
    var = torch.rand(5, 7, device=DEVICE) + 0.1
    rm, rv = torch.randn(7, device=DEVICE), torch.rand(7, device=DEVICE) + 0.5
    nbt = torch.tensor(11, dtype=torch.long, device=DEVICE)
    rm_cpu, rv_cpu, nbt_cpu = rm.cpu().clone(), rv.cpu().clone(), nbt.cpu().clone()
    args = (38, 8, 9, momentum, average)  # ghosts 8 x 4 + 6 of 9 values per sample
    OPS.ghost_batch_norm_update_stats_(rm, rv, nbt, mean, var, *args)
    OPS.ghost_batch_norm_update_stats_(rm_cpu, rv_cpu, nbt_cpu, mean.cpu(), var.cpu(), *args)
    # The same formulas operation for operation in float32.
    torch.testing.assert_close(rm.cpu(), rm_cpu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv.cpu(), rv_cpu, rtol=1e-6, atol=1e-6)
    assert torch.equal(nbt.cpu(), nbt_cpu)


# ---------------------------------------------------------------------------
# Reproducibility, no host sync, CUDA graphs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "case",
    [CASES[7], CASES[8], CASES[11], CASES[13], FEW_PAIRS[0], FEW_PAIRS[2]],
    ids=case_id,
)
def test_bitwise_reproducible(case, dtype):
    shape, fmt, ghost = case
    x = make_input(shape, fmt, dtype)
    dy = make_input(shape, fmt, dtype, seed=2, offset=0.0)
    weight, bias = make_affine(shape[1], dtype, "same")
    first = run_ops(x, weight, bias, ghost, dy)
    for _ in range(3):
        again = run_ops(x, weight, bias, ghost, dy)
        for name, value in first.items():
            assert torch.equal(again[name], value), name


def test_no_host_sync():
    shape, ghost = (20, 8, 6, 6), 8
    x_cf = make_input(shape, CONTIGUOUS, torch.float32)
    x_cl = make_input(shape, CHANNELS_LAST, torch.bfloat16)
    dy_cf = make_input(shape, CONTIGUOUS, torch.float32, seed=1, offset=0.0)
    dy_cl = make_input(shape, CHANNELS_LAST, torch.bfloat16, seed=1, offset=0.0)
    weight, bias = make_affine(8, torch.float32, "same")
    big = make_input(FEW_PAIRS[0][0], CONTIGUOUS, torch.float32)  # the split/merge path
    rm, rv = torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE)
    nbt = torch.tensor(0, dtype=torch.long, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, dy in ((x_cf, dy_cf), (x_cl, dy_cl)):
            out, mean, var = OPS.ghost_batch_norm(x, weight, bias, ghost, EPS)
            OPS.ghost_batch_norm_backward(dy, x, weight, mean, var, ghost, EPS, True)
            OPS.ghost_batch_norm_backward(dy, x, None, mean, var, ghost, EPS, False)
            for momentum in (0.1, None):
                for average in (False, True):
                    OPS.ghost_batch_norm_update_stats_(rm, rv, nbt, mean, var, shape[0], ghost, 36, momentum, average)
        _, big_mean, big_var = OPS.ghost_batch_norm(big, None, None, FEW_PAIRS[0][2], EPS)
        OPS.ghost_batch_norm_backward(big, big, None, big_mean, big_var, FEW_PAIRS[0][2], EPS, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(nbt.item()) == 2 * 2 * (3 + 1)  # per input: (G = 3, then 1) for each momentum


@pytest.mark.parametrize(
    "case", [((20, 8, 6, 6), CONTIGUOUS, 8), ((32, 4, 32, 32), CHANNELS_LAST, 16)], ids=case_id
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_cuda_graph_replay_matches_eager(case, momentum):
    shape, fmt, ghost = case
    channels, sample_numel = shape[1], shape[2] * shape[3]
    static_x = make_input(shape, fmt, torch.float32)
    static_dy = make_input(shape, fmt, torch.float32, seed=1, offset=0.0)
    weight, bias = make_affine(channels, torch.float32, "same")

    def fresh_state():
        return (
            torch.zeros(channels, device=DEVICE),
            torch.ones(channels, device=DEVICE),
            torch.tensor(2, dtype=torch.long, device=DEVICE),
        )

    def step(state):
        out, mean, var = OPS.ghost_batch_norm(static_x, weight, bias, ghost, EPS)
        grads = OPS.ghost_batch_norm_backward(static_dy, static_x, weight, mean, var, ghost, EPS, True)
        OPS.ghost_batch_norm_update_stats_(*state, mean, var, shape[0], ghost, sample_numel, momentum, False)
        return (out, mean, var, *grads)

    # Warm up on a side stream with throwaway state (loads the kernels outside the capture).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(fresh_state())
    torch.cuda.current_stream().wait_stream(side)

    graph_state, eager_state = fresh_state(), fresh_state()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step(graph_state)

    for n in range(3):
        static_x.copy_(make_input(shape, fmt, torch.float32, seed=100 + n))
        static_dy.copy_(make_input(shape, fmt, torch.float32, seed=200 + n, offset=0.0))
        graph.replay()
        eager_out = step(eager_state)
        torch.cuda.synchronize()
        for i, (g, e) in enumerate(zip(graph_out, eager_out)):
            assert torch.equal(g, e), f"output {i} after replay {n}"
        for g, e in zip(graph_state, eager_state):
            assert torch.equal(g, e)
    num_ghosts = -(-shape[0] // ghost)
    assert int(graph_state[2].item()) == 2 + 3 * num_ghosts


# ---------------------------------------------------------------------------
# 64-bit offsets
# ---------------------------------------------------------------------------


def test_offsets_past_2_31_elements():
    """A bf16 input of 2^32 + 64 elements (8 GiB): every offset past 2^31 must land where it should.
    With dy = x the backward has closed forms: grad_bias = sum of x, grad_weight =
    sum over ghosts of n * var / sqrt(var + eps), dx = xhat * eps / (var + eps)."""
    need = 40 * 2**30  # x, output and dx (8 GiB each) plus a 4 GiB float32 slice
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip("needs 40 GiB of free GPU memory")
    n, c, s = 4, 2, 2**29 + 8  # ChannelsFirst, S % 8 == 0: vectorized; 2 ghosts of 2 samples
    eps = 0.5
    torch.manual_seed(0)
    x = torch.randn((n, c, s), device=DEVICE, dtype=torch.bfloat16)
    out, mean, var = OPS.ghost_batch_norm(x, None, None, 2, eps)
    for g in range(2):
        for ch in range(c):
            values = x[2 * g : 2 * g + 2, ch].float()
            want_var, want_mean = torch.var_mean(values, correction=0)
            del values
            assert abs(mean[g, ch].item() - want_mean.item()) <= 1e-4
            assert abs(var[g, ch].item() - want_var.item()) <= 1e-4 * want_var.item()
    invstd = torch.rsqrt(var.double() + eps)
    ends = (slice(0, 4096), slice(s - 4096, s))
    for sample in (0, n - 1):
        for ch in (0, c - 1):
            g = sample // 2
            for part in ends:
                xhat = (x[sample, ch, part].double() - mean[g, ch].double()) * invstd[g, ch]
                assert_close(out[sample, ch, part], xhat, 3e-2, f"output [{sample}, {ch}, {part}]")
    del out
    grad_input, grad_weight, grad_bias = OPS.ghost_batch_norm_backward(x, x, None, mean, var, 2, eps, True)
    count = 2 * s
    for ch in range(c):
        want_bias = x[:, ch].sum(dtype=torch.float32).item()
        assert abs(grad_bias[ch].item() - want_bias) <= 1e-4 * max(1.0, abs(want_bias)) + 1.0
        want_weight = sum(count * var[g, ch].item() * invstd[g, ch].item() for g in range(2))
        assert abs(grad_weight[ch].item() - want_weight) <= 1e-4 * want_weight
    for sample in (0, n - 1):
        for ch in (0, c - 1):
            g = sample // 2
            for part in ends:
                xhat = (x[sample, ch, part].double() - mean[g, ch].double()) * invstd[g, ch]
                want = xhat * eps / (var[g, ch].double() + eps)
                assert_close(grad_input[sample, ch, part], want, 3e-2, f"grad_input [{sample}, {ch}, {part}]")
