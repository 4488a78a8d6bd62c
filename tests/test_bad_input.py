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
