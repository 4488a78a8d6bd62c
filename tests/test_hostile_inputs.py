"""The second round of hostile inputs (issue 19), library side: each case a careful but unlucky
user hit, with the message it now gives. The checkpoint CLI, distances and the tracker, the
schedules, and the counts of saved averages. (The recipes' options: tests/test_recipe_cli.py.
Generated inputs of every class for every entry point: tests/test_properties.py.)"""

import errno
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from swa_fast import WeightAverage, swa_utils
from swa_fast import checkpoint_average as ca
from swa_fast.distance import WeightDistanceTracker, fit_log, weight_distance
from swa_fast.regime import DistanceMilestoneLR, LinearWarmup, SWAScheduleLR

from helpers import ROOT


def cli(*args):
    return subprocess.run([sys.executable, "-m", "swa_fast", "average", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


# --- the checkpoint CLI -------------------------------------------------------------------------


class Payload:
    """What an attacker pickles: loading it would call os.system (it is never loaded here)."""

    def __reduce__(self):
        return (os.system, ("echo swa_fast-test-payload-ran",))


def test_a_pickle_calling_a_blocked_global_is_refused_as_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "x": Payload()}, path)
    done = cli(path, "-o", tmp_path / "out.pt")
    assert done.returncode == 1 and "payload-ran" not in done.stdout + done.stderr
    message = done.stderr
    assert "references posix.system, a global that is not allowed" in message or \
        "references nt.system, a global that is not allowed" in message
    assert "may contain code" in message
    for advice in ("torch.save", "weights_only", "Saving it again", "re-save", "truncated"):
        assert advice not in message, advice
    assert not (tmp_path / "out.pt").exists()


def test_a_full_disk_is_reported_as_the_os_error(tmp_path, monkeypatch):
    """torch.save hides the ENOSPC of its writes behind a C++ 'enforce fail' it raises while closing
    the archive; the tool reports the OS error, and leaves no partial file."""
    for name in ("a.pt", "b.pt"):
        torch.save({"w": torch.randn(100_000)}, tmp_path / name)
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, file):
            self.file, self.written = file, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(os, "fdopen", lambda *args, **kwargs: FullDisk(real_fdopen(*args, **kwargs)))
    out = tmp_path / "out" / "avg.pt"
    out.parent.mkdir()
    with pytest.raises(OSError, match="No space left on device") as error:
        ca.save_atomic(ca.average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"]), out)
    assert error.value.errno == errno.ENOSPC and str(out) in str(error.value)
    assert "enforce fail" not in str(error.value)
    assert list(out.parent.iterdir()) == []  # nothing partial left


def test_a_non_string_key_with_prefix_is_a_clear_error(tmp_path):
    path = tmp_path / "ints.pt"
    torch.save({0: torch.ones(2), "head.weight": torch.ones(3)}, path)
    with pytest.raises(ca.CheckpointError, match=r"key 0 is a int, not a string: --prefix selects string keys"):
        ca.average_checkpoints([path], prefix="head.")
    assert set(ca.average_checkpoints([path])) == {0, "head.weight"}  # without --prefix: averaged as they are


def test_saved_parameters_average_into_plain_tensors(tmp_path):
    for index in range(2):
        layer = nn.Linear(3, 2)
        torch.save({"weight": layer.weight, "bias": layer.bias, "steps": torch.tensor(index)}, tmp_path / f"{index}.pt")
    averaged = ca.average_checkpoints([tmp_path / "0.pt", tmp_path / "1.pt"])
    for name, value in averaged.items():
        assert type(value) is torch.Tensor, name
        assert not value.requires_grad and value.grad_fn is None, name


# --- distances and the tracker ----------------------------------------------------------------------


def test_mappings_are_paired_by_name_not_by_position():
    x, y = torch.ones(3), torch.zeros(2)
    assert weight_distance({"a": x, "b": y}, {"b": y, "a": x}).item() == 0.0
    with pytest.raises(ValueError, match=r"b lacks \['b'\] and has \['c'\]"):
        weight_distance({"a": x, "b": y}, {"a": x, "c": y})
    model = nn.Linear(3, 2)
    shuffled = dict(reversed(list((k, v.detach().clone()) for k, v in model.named_parameters())))
    assert weight_distance(model, shuffled).item() == 0.0
    tracker = WeightDistanceTracker(model, reference=shuffled)
    assert tracker.update().item() == 0.0


def test_tracker_steps_increase_and_are_integers():
    model = nn.Linear(3, 2)
    tracker = WeightDistanceTracker(model)
    tracker.update(5)
    for step, error, match in ((3, ValueError, "step 3 does not come after the last recorded step 5"),
                               (5, ValueError, "step 5 does not come after"),
                               (-1, ValueError, "step must be >= 0, got -1"),
                               (2.5, TypeError, "step must be an integer, got float 2.5"),
                               (True, TypeError, "step must be an integer")):
        with pytest.raises(error, match=match):
            tracker.update(step)
    tracker.update(6)
    tracker.update()  # the next step, 7
    assert tracker.steps == [5, 6, 7]


def test_a_parameter_named_like_a_column_gets_a_column_of_its_own():
    model = nn.Module()
    model.total = nn.Parameter(torch.ones(3))
    model.register_parameter("param:total", nn.Parameter(torch.ones(2)))
    model.step = nn.Parameter(torch.ones(1))
    tracker = WeightDistanceTracker(model)
    tracker.update(1)
    assert tracker.columns == ["step", "total", "param:total", "param:param:total", "param:step"]
    assert len(set(tracker.columns)) == len(tracker.columns) == len(tracker.history[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fit_log_refuses_non_finite_distances_naming_the_step(bad):
    with pytest.raises(ValueError, match=f"the distance at step 2 is {bad}: the weights diverged"):
        fit_log([1, 2, 3], [1.0, bad, 2.0])
    with pytest.raises(ValueError, match="a step must be finite"):
        fit_log([1, bad, 3], [1.0, 1.5, 2.0])


# --- schedules --------------------------------------------------------------------------------------


def optimizer():
    return torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_schedules_refuse_non_finite_values(bad):
    with pytest.raises(ValueError, match="swa_lr must be finite"):
        SWAScheduleLR(optimizer(), 10, swa_lr=bad)
    with pytest.raises(ValueError, match="warmup_steps must be finite"):
        LinearWarmup(optimizer(), warmup_steps=bad)
    with pytest.raises(ValueError, match="total_steps must be finite"):
        SWAScheduleLR(optimizer(), bad)
    with pytest.raises(ValueError, match="gamma must be finite"):
        DistanceMilestoneLR(optimizer(), WeightDistanceTracker(nn.Linear(2, 2)), [1.0], gamma=bad)


# --- the counts of saved averages ------------------------------------------------------------------


@pytest.mark.parametrize("count", [torch.tensor(-5), torch.tensor(float("nan")), torch.tensor(2.7), -5, 2.7])
def test_saved_counts_that_are_no_count_are_refused_at_load(count):
    model = nn.Linear(3, 2)
    averaged = swa_utils.AveragedModel(model)
    averaged.update_parameters(model)
    state = averaged.state_dict()
    state["n_averaged"] = count
    with pytest.raises(ValueError, match="AveragedModel.load_state_dict: n_averaged must be an integer >= 0"):
        averaged.load_state_dict(state)
    assert averaged.n_averaged.item() == 1
    average = WeightAverage(model)
    good = average.state_dict()
    with pytest.raises(ValueError, match="WeightAverage.load_state_dict: n_averaged must be an integer >= 0"):
        average.load_state_dict({**good, "n_averaged": count})
    with pytest.raises(TypeError, match="'weight' must be a tensor, got list"):
        average.load_state_dict({**good, "averages": {**good["averages"], "weight": [1.0]}})


def test_float8_averages_are_refused_at_construction():
    for make in (lambda: WeightAverage(nn.Linear(2, 2), avg_dtype=torch.float8_e4m3fn),
                 lambda: swa_utils.AveragedModel(nn.Linear(2, 2), avg_dtype=torch.float8_e4m3fn)):
        with pytest.raises(ValueError, match="avg_dtype must be a floating dtype with arithmetic"):
            make()
