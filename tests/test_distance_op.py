"""torch.ops.swa_fast.distance against a float64 pure-torch reference, its determinism, opcheck and errors."""

import pytest
import torch

import swa_fast  # noqa: F401  (loads the op)
from swa_fast.ops.distance import distance_norms

from distance_reference import distance_reference
from helpers import devices, make

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 0; inside one vector; around the vector widths and the 4-accumulator groups;
# one chunk (32k on CPU, 64k on CUDA) and its neighbours; several chunks.
SIZES = [0, 1, 3, 8, 17, 31, 33, 1023, 32_767, 32_768, 32_769, 65_537, 200_003]


def tolerance(acc_dtype, numel):
    """Relative error bound of a sum of squares accumulated in acc_dtype (sqrt halves it)."""
    eps = torch.finfo(acc_dtype).eps
    return 64 * eps if numel < 1_000_000 else 256 * eps


def assert_matches_reference(a, b, per_tensor, total):
    want_per, want_total = distance_reference(a, b)
    acc = per_tensor.dtype
    for i, (got, want) in enumerate(zip(per_tensor.tolist(), want_per.tolist())):
        assert got == pytest.approx(want, rel=tolerance(acc, a[i].numel()), abs=1e-30), f"tensor {i}"
    assert total.item() == pytest.approx(want_total.item(), rel=tolerance(acc, sum(t.numel() for t in a)))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_b", [True, False], ids=["a-b", "a"])
def test_parity_with_float64_reference(device, dtype, with_b):
    a = [make(n, dtype, device, seed=i) for i, n in enumerate(SIZES)]
    b = [make(n, dtype, device, seed=100 + i) for i, n in enumerate(SIZES)] if with_b else None
    per_tensor, total = torch.ops.swa_fast.distance(a, b)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert per_tensor.dtype == total.dtype == acc
    assert per_tensor.shape == (len(a),) and total.shape == ()
    assert per_tensor.device.type == total.device.type == device
    assert per_tensor[0].item() == 0.0  # the empty tensor
    assert_matches_reference(a, b, per_tensor, total)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "a_dtype,b_dtype",
    [
        (torch.bfloat16, torch.float32),  # a bf16 model against an fp32 snapshot
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float64),
    ],
)
def test_mixed_dtypes(device, a_dtype, b_dtype):
    a = [make(n, a_dtype, device, seed=i) for i, n in enumerate(SIZES)]
    b = [make(n, b_dtype, device, seed=50 + i) for i, n in enumerate(SIZES)]
    per_tensor, total = distance_norms(a, b)
    want = torch.float64 if torch.float64 in (a_dtype, b_dtype) else torch.float32
    assert per_tensor.dtype == want
    # The difference is taken after widening both sides, like the reference.
    assert_matches_reference(a, b, per_tensor, total)


@pytest.mark.parametrize("device", devices())
def test_one_float64_tensor_makes_the_whole_call_float64(device):
    a = [make(1000, torch.float32, device, 0), make(10, torch.float64, device, 1), make(77, torch.bfloat16, device, 2)]
    b = [make(1000, torch.float16, device, 3), make(10, torch.float32, device, 4), make(77, torch.bfloat16, device, 5)]
    per_tensor, total = distance_norms(a, b)
    assert per_tensor.dtype == total.dtype == torch.float64
    assert_matches_reference(a, b, per_tensor, total)


@pytest.mark.parametrize("device", devices())
def test_one_huge_and_many_tiny_tensors_with_empty_ones(device):
    sizes = [3_000_017] + [(i * 7) % 13 for i in range(600)]  # includes empty tensors
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    a = [make(n, dtypes[i % 3], device, seed=i) for i, n in enumerate(sizes)]
    b = [make(n, torch.float32, device, seed=10_000 + i) for i, n in enumerate(sizes)]
    per_tensor, total = distance_norms(a, b)
    assert per_tensor.shape == (len(sizes),)
    assert all(per_tensor[i].item() == 0.0 for i, n in enumerate(sizes) if n == 0)
    assert_matches_reference(a, b, per_tensor, total)


@pytest.mark.parametrize("device", devices())
def test_shapes_views_and_layouts(device):
    base = make((4, 6, 5, 3), torch.float32, device, 0)
    other = make((4, 6, 5, 3), torch.float32, device, 1)
    a = [
        base.to(memory_format=torch.channels_last),  # dense, not contiguous
        base[:, ::2],  # a strided view
        make(121, torch.float32, device, 2)[1:],  # storage offset (misaligned)
        base.transpose(0, 3),
        make(1, torch.float32, device, 3).reshape(()),  # 0-dim
    ]
    b = [
        other,  # contiguous against channels_last
        other[:, ::2].contiguous(),
        make(120, torch.bfloat16, device, 4),
        other.transpose(0, 3),
        make(1, torch.float32, device, 5).reshape(()),
    ]
    per_tensor, total = distance_norms(a, b)
    assert_matches_reference(a, b, per_tensor, total)


@pytest.mark.parametrize("device", devices())
def test_nonfinite_values_propagate(device):
    a = [make(100, torch.float32, device, 0), make(70_000, torch.float32, device, 1)]
    b = [x.clone() for x in a]
    a[1][65_600] = float("nan")
    b[0][3] = float("inf")
    per_tensor, total = distance_norms(a, b)
    assert torch.isinf(per_tensor[0]) and torch.isnan(per_tensor[1]) and torch.isnan(total)


@pytest.mark.parametrize("device", devices())
def test_equal_inputs_give_exact_zero(device):
    a = [make(n, torch.bfloat16, device, i) for i, n in enumerate([5, 40_000])]
    per_tensor, total = distance_norms(a, [x.float() for x in a])
    assert per_tensor.tolist() == [0.0, 0.0] and total.item() == 0.0


# ---------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------


def test_same_bits_on_every_call_and_any_thread_count():
    sizes = [1_000_003, 0, 5, 32_768 * 7 + 11, 100]
    a = [make(n, torch.float32, "cpu", i) for i, n in enumerate(sizes)]
    b = [make(n, torch.bfloat16, "cpu", 20 + i) for i, n in enumerate(sizes)]
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 1, 2, 3):
            torch.set_num_threads(count)
            for _ in range(2):
                results.append(distance_norms(a, b))
    finally:
        torch.set_num_threads(threads)
    first_per, first_total = results[0]
    for per_tensor, total in results[1:]:
        assert torch.equal(per_tensor, first_per)
        assert torch.equal(total, first_total)


@pytest.mark.parametrize("device", devices())
def test_copies_of_the_inputs_give_the_same_bits(device):
    a = [make(n, torch.float16, device, i) for i, n in enumerate([70_001, 3, 200_000])]
    b = [make(n, torch.float32, device, 9 + i) for i, n in enumerate([70_001, 3, 200_000])]
    first = distance_norms(a, b)
    again = distance_norms([x.clone() for x in a], [y.clone() for y in b])
    assert torch.equal(first.per_tensor, again.per_tensor) and torch.equal(first.total, again.total)


# ---------------------------------------------------------------------------
# Registration: opcheck, torch.compile, autograd
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    a = [make(33, torch.float32, device, 0), make(5, torch.bfloat16, device, 1), make(0, torch.float32, device, 2)]
    b = [make(33, torch.float16, device, 3), make(5, torch.float32, device, 4), make(0, torch.float32, device, 5)]
    torch.library.opcheck(torch.ops.swa_fast.distance.default, (a, b))
    torch.library.opcheck(torch.ops.swa_fast.distance.default, (a, None))
    torch.library.opcheck(torch.ops.swa_fast.distance.default, ([a[0].double()], [b[0]]))


def test_fake_kernel_reports_errors_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = [torch.empty(3, 4), torch.empty(2, dtype=torch.float64)]
        per_tensor, total = torch.ops.swa_fast.distance(a, [torch.empty(3, 4, dtype=torch.bfloat16), torch.empty(2)])
        assert per_tensor.shape == (2,) and per_tensor.dtype == total.dtype == torch.float64
        with pytest.raises(RuntimeError, match=r"shape mismatch at index 1"):
            torch.ops.swa_fast.distance(a, [torch.empty(3, 4), torch.empty(3)])


def test_works_under_torch_compile():
    def measure(a, b):
        per_tensor, total = torch.ops.swa_fast.distance(a, b)
        return per_tensor * 2, total + 1

    compiled = torch.compile(measure, backend="aot_eager", fullgraph=True)
    a = [make(1000, torch.float32, "cpu", 0), make(10, torch.bfloat16, "cpu", 1)]
    b = [make(1000, torch.float32, "cpu", 2), make(10, torch.float32, "cpu", 3)]
    for got, want in zip(compiled(a, b), measure(a, b)):
        assert torch.equal(got, want)


def test_parameters_that_require_grad_are_read_without_a_graph():
    model = torch.nn.Linear(30, 20)
    reference = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.weight.add_(1.0)
    result = distance_norms(list(model.parameters()), reference)
    assert not result.total.requires_grad and result.total.grad_fn is None
    assert result.per_tensor[0].item() == pytest.approx(600**0.5, rel=1e-6)
    assert result.per_tensor[1].item() == 0.0


# ---------------------------------------------------------------------------
# Bad input: clear errors before any work
# ---------------------------------------------------------------------------


def pairs():
    return [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)], [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)]


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a, b: b.pop(), "a has 3 tensors but b has 2"),
        (lambda a, b: b.__setitem__(1, torch.randn(6)),
         r"shape mismatch at index 1: a\[1\] has shape \[5\] but b\[1\] has shape \[6\]"),
        (lambda a, b: b.__setitem__(2, torch.randn(4)), r"shape mismatch at index 2: .* b\[2\] has shape \[4\]"),
        (lambda a, b: b.__setitem__(1, torch.randn(5, device="meta")), r"b\[1\] is on meta but a\[0\] is on cpu"),
        (lambda a, b: a.__setitem__(2, torch.randn(2, 2, device="meta")), r"a\[2\] is on meta but a\[0\] is on cpu"),
        (lambda a, b: a.__setitem__(1, torch.arange(5)), r"a\[1\] has dtype Long; distance takes floating tensors"),
        (lambda a, b: b.__setitem__(0, torch.ones(4, 3, dtype=torch.bool)), r"b\[0\] has dtype Bool"),
        (lambda a, b: a.__setitem__(0, torch.randn(4, 3, dtype=torch.complex64)), r"a\[0\] has dtype ComplexFloat"),
    ],
)
def test_bad_input_names_the_problem(mutate, message):
    a, b = pairs()
    mutate(a, b)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.swa_fast.distance(a, b)
    with pytest.raises(RuntimeError, match=message):
        distance_norms(a, b)


def test_empty_list_is_an_error():
    with pytest.raises(RuntimeError):
        torch.ops.swa_fast.distance([], None)
    with pytest.raises(ValueError, match="at least one tensor"):
        distance_norms([])
