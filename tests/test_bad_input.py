"""Bad input raises an error that names the problem, and leaves every tensor untouched."""

import pytest
import torch

import swa_fast
from swa_fast import swa_utils


def snapshot(*lists):
    return [t.clone() for tensors in lists for t in tensors]


def assert_untouched(before, *lists):
    after = [t for tensors in lists for t in tensors]
    assert len(before) == len(after)
    for old, new in zip(before, after):
        assert torch.equal(old, new)


def fresh():
    averaged = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)]
    current = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)]
    return averaged, current


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a, c: c.pop(), "averaged has 3 tensors but current has 2"),
        (lambda a, c: c.__setitem__(1, torch.randn(6)), r"shape mismatch at index 1: averaged\[1\] has shape \[5\] but current\[1\] has shape \[6\]"),
        (lambda a, c: c.__setitem__(2, torch.randn(2, 2, dtype=torch.float64)), r"current\[2\] has dtype Double"),
        (lambda a, c: a.__setitem__(2, torch.zeros(2, 2, dtype=torch.long)), r"averaged\[2\] has non-floating dtype Long but current\[2\] is Float"),
        (lambda a, c: a.__setitem__(1, torch.randn(10)[::2]), r"averaged\[1\] is a strided view"),
        (lambda a, c: a.__setitem__(0, torch.randn(4, 3, dtype=torch.complex64)), r"averaged\[0\] is complex"),
    ],
)
def test_list_errors_name_the_problem_and_modify_nothing(mutate, message):
    averaged, current = fresh()
    mutate(averaged, current)
    before = snapshot(averaged, current)
    with pytest.raises(RuntimeError, match=message):
        swa_fast.average_(averaged, current, 0.5)
    assert_untouched(before, averaged, current)


def test_error_in_the_last_pair_modifies_no_earlier_pair():
    averaged, current = fresh()
    current[2] = torch.randn(3, 3)
    before = snapshot(averaged)
    with pytest.raises(RuntimeError, match="shape mismatch at index 2"):
        swa_fast.average_(averaged, current, 0.5)
    assert_untouched(before, averaged)


@pytest.mark.parametrize("weight", [1.5, -0.1, float("nan")])
def test_weight_outside_unit_interval(weight):
    averaged, current = fresh()
    before = snapshot(averaged)
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\]"):
        swa_fast.average_(averaged, current, weight)
    with pytest.raises(RuntimeError, match=r"weight must be in \[0, 1\]"):
        torch.ops.swa_fast.average_(averaged, current, torch.tensor(weight), None)
    assert_untouched(before, averaged)


@pytest.mark.parametrize(
    "weight,message",
    [
        (torch.tensor([0.5]), "weight must be a 0-dim tensor"),
        (torch.tensor(1, dtype=torch.long), "weight must be float32 or float64"),
        (torch.tensor(0.5, dtype=torch.float16), "weight must be float32 or float64"),
        (torch.tensor(0.5, device="meta"), "weight is on meta but the averaged tensors are on cpu"),
    ],
)
def test_bad_weight_tensor(weight, message):
    averaged, current = fresh()
    before = snapshot(averaged)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.swa_fast.average_(averaged, current, weight, None)
    assert_untouched(before, averaged)


def test_bad_skip_flag():
    averaged, current = fresh()
    before = snapshot(averaged)
    with pytest.raises(RuntimeError, match="skip must be a 0-dim bool tensor"):
        swa_fast.average_(averaged, current, 0.5, skip=torch.tensor(1.0))
    assert_untouched(before, averaged)


def test_tensors_on_another_device():
    averaged, current = fresh()
    current[1] = torch.randn(5, device="meta")
    before = snapshot(averaged)
    with pytest.raises(RuntimeError, match=r"current\[1\] is on meta but averaged\[0\] is on cpu"):
        swa_fast.average_(averaged, current, 0.5)
    assert_untouched(before, averaged)


def test_moments_list_mismatch():
    mean, current = fresh()
    sq_mean = [m * m for m in mean]
    before = snapshot(mean, sq_mean)
    with pytest.raises(RuntimeError, match="mean has 3 tensors but sq_mean has 2"):
        swa_fast.average_moments_(mean, sq_mean[:2], current, 0.5)
    with pytest.raises(RuntimeError, match=r"sq_mean\[1\] must match mean\[1\]"):
        swa_fast.average_moments_(mean, [sq_mean[0], sq_mean[1].double(), sq_mean[2]], current, 0.5)
    assert_untouched(before, mean, sq_mean)


def test_nonfinite_flag_needs_one_device():
    with pytest.raises(ValueError, match="needs at least one tensor"):
        swa_fast.nonfinite_flag([])
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is on meta"):
        swa_fast.nonfinite_flag([torch.randn(2), torch.randn(2, device="meta")])


def test_averaged_model_device_that_does_not_exist():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="does not exist"):
        swa_utils.AveragedModel(model, device="cuda:7")


def test_averaged_model_non_floating_avg_dtype():
    with pytest.raises(ValueError, match="avg_dtype must be a floating dtype"):
        swa_utils.AveragedModel(torch.nn.Linear(2, 2), avg_dtype=torch.int32)


def test_ema_decay_out_of_range_matches_torch_message():
    with pytest.raises(ValueError, match=r"Invalid decay value 1.5"):
        swa_utils.get_ema_multi_avg_fn(1.5)


def test_avg_fn_and_multi_avg_fn_together():
    with pytest.raises(AssertionError, match="Only one of avg_fn and multi_avg_fn"):
        swa_utils.AveragedModel(
            torch.nn.Linear(2, 2), avg_fn=swa_utils.get_swa_avg_fn(), multi_avg_fn=swa_utils.get_swa_multi_avg_fn()
        )


def swag_fresh():
    mean, current = fresh()
    variance = [m.abs() for m in mean]
    deviation = [torch.zeros_like(m) for m in mean]
    return mean, variance, deviation, current


def replace(tensors, index, tensor):
    tensors = list(tensors)
    tensors[index] = tensor
    return tensors


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda m, v, d, c: (m, v, d, c[:2]), r"swag_moments_: mean has 3 tensors but current has 2"),
        (lambda m, v, d, c: (m, v[:2], d, c), r"swag_moments_: mean has 3 tensors but variance has 2"),
        (lambda m, v, d, c: (m, v, d[:2], c),
         (r"swag_moments_: mean has 3 tensors but deviation has 2; pass one deviation tensor per mean tensor, or an "
          r"empty list")),
        (lambda m, v, d, c: (m, v, replace(d, 2, torch.zeros(4)), c),
         (r"swag_moments_: deviation\[2\] has shape \[4\], strides \[1\] and dtype Float but mean\[2\] has shape "
          r"\[2, 2\], strides \[2, 1\] and dtype Float")),
        (lambda m, v, d, c: (m, v, replace(d, 0, torch.zeros(3, 4).t()), c),
         r"deviation\[0\] has shape \[4, 3\], strides \[1, 4\] .* must match mean\[0\] in shape, strides"),
        (lambda m, v, d, c: (m, v, replace(d, 1, torch.zeros(5, dtype=torch.float64)), c),
         r"deviation\[1\] has shape \[5\], strides \[1\] and dtype Double but mean\[1\]"),
        (lambda m, v, d, c: (m, replace(v, 1, torch.zeros(5, dtype=torch.float16)), d, c),
         r"variance\[1\] has shape \[5\], strides \[1\] and dtype Half but mean\[1\] has shape \[5\]"),
        (lambda m, v, d, c: (m, v, replace(d, 1, torch.zeros(5, device="meta")), c),
         r"deviation\[1\] is on meta but mean\[0\] is on cpu"),
        (lambda m, v, d, c: (m, v, d, replace(c, 1, torch.randn(6))),
         r"swag_moments_: shape mismatch at index 1: mean\[1\] has shape \[5\] but current\[1\] has shape \[6\]"),
        (lambda m, v, d, c: (m, v, d, replace(c, 2, torch.randn(2, 2, dtype=torch.float64))),
         (r"mean\[2\] has dtype Float but current\[2\] has dtype Double; current must have the averaged dtype or a "
          r"lower-precision floating dtype")),
        (lambda m, v, d, c: (replace(m, 1, torch.zeros(5, dtype=torch.long)), v, d, c),
         r"swag_moments_: mean\[1\] has dtype Long; SWAG averages floating parameters only"),
        (lambda m, v, d, c: (m, v, d, replace(c, 0, torch.ones(4, 3, dtype=torch.bool))),
         r"swag_moments_: current\[0\] has dtype Bool; SWAG averages floating parameters only"),
        (lambda m, v, d, c: (replace(m, 0, torch.randn(4, 3, dtype=torch.complex64)), v, d, c),
         r"mean\[0\] has dtype ComplexFloat; SWAG averages floating parameters only"),
        (lambda m, v, d, c: (replace(m, 0, torch.randn(4, 3).to(torch.float8_e4m3fn)), v, d, c),
         r"mean\[0\] has dtype Float8_e4m3fn; SWAG averages floating parameters only"),
        (lambda m, v, d, c: (replace(m, 1, torch.randn(10)[::2]), v, d, c), r"mean\[1\] is a strided view"),
        (lambda m, v, d, c: (m, v, d, replace(c, 1, torch.randn(5, device="meta"))),
         r"current\[1\] is on meta but mean\[0\] is on cpu"),
    ],
)
def test_swag_moments_errors_name_the_argument_and_modify_nothing(mutate, message):
    args = mutate(*swag_fresh())
    on_cpu = [[t for t in ts if t.device.type == "cpu"] for ts in args]  # meta tensors hold no values
    before = snapshot(*on_cpu)
    with pytest.raises(RuntimeError, match=message):
        swa_fast.swag_moments_(*args, 0.5)
    assert_untouched(before, *on_cpu)


@pytest.mark.parametrize(
    "weight,skip,message,metadata",
    [
        # The range is read only from a CPU weight (a device one would cost a sync): not by the fake kernel.
        (torch.tensor(1.5), None, r"swag_moments_: weight must be in \[0, 1\], got 1.5", False),
        (torch.tensor(float("nan"), dtype=torch.float64), None, r"weight must be in \[0, 1\], got nan", False),
        (torch.tensor([0.5]), None, "swag_moments_: weight must be a 0-dim tensor", True),
        (torch.tensor(0.5, dtype=torch.float16), None, "weight must be float32 or float64, got Half", True),
        (torch.tensor(0.5, device="meta"), None, "weight is on meta but the averaged tensors are on cpu", True),
        (torch.tensor(0.5), torch.tensor(1.0), "swag_moments_: skip must be a 0-dim bool tensor", True),
        (torch.tensor(0.5), torch.tensor([True]), "skip must be a 0-dim bool tensor", True),
    ],
)
def test_swag_moments_bad_weight_and_skip(weight, skip, message, metadata):
    mean, variance, deviation, current = swag_fresh()
    before = snapshot(mean, variance, deviation)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.swa_fast.swag_moments_(mean, variance, deviation, current, weight, skip)
    if metadata:  # the fake kernel (torch.compile's tracing) runs the same checks
        fake_mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
        with pytest.raises(RuntimeError, match=message), fake_mode:
            torch.ops.swa_fast.swag_moments_(mean, variance, deviation, current, weight, skip)
    assert_untouched(before, mean, variance, deviation)


@pytest.mark.parametrize("weight", [1.5, -0.1, float("nan"), True])
def test_swag_moments_python_weight_is_checked(weight):
    mean, variance, deviation, current = swag_fresh()
    before = snapshot(mean, variance, deviation)
    with pytest.raises((ValueError, TypeError), match=r"weight must be"):
        swa_fast.swag_moments_(mean, variance, deviation, current, weight)
    assert_untouched(before, mean, variance, deviation)
