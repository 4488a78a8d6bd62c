"""swa_fast.distance: weight_distance, fit_log and WeightDistanceTracker (rows, CSV, fit, plot)."""

import csv
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from swa_fast.distance import LogFit, WeightDistanceTracker, fit_log, weight_distance

from distance_reference import distance_reference

ROOT = Path(__file__).resolve().parent.parent


def small_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)


def perturb(model, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator).to(p.dtype))


# ---------------------------------------------------------------------------
# weight_distance
# ---------------------------------------------------------------------------


def test_weight_distance_takes_modules_parameters_lists_and_mappings():
    model, other = small_model(0), small_model(1)
    a = [p.detach() for p in model.parameters()]
    b = [p.detach() for p in other.parameters()]
    want_per, want_total = distance_reference(a, b)
    for x, y in [(model, other), (model.parameters(), other.parameters()), (a, b),
                 (dict(model.named_parameters()), other.state_dict()), (model, b)]:
        total = weight_distance(x, y)
        assert total.dim() == 0 and total.dtype == torch.float32
        assert total.item() == pytest.approx(want_total.item(), rel=1e-6)
    result = weight_distance(model, other, per_tensor=True)
    per_tensor, total = result  # unpacks as (per_tensor, total)
    assert torch.allclose(per_tensor.double(), want_per, rtol=1e-6)
    assert result.total is total
    assert weight_distance(model).item() == pytest.approx(distance_reference(a)[1].item(), rel=1e-6)
    assert weight_distance(a[0], b[0]).item() == pytest.approx(want_per[0].item(), rel=1e-6)  # one tensor


def test_weight_distance_does_not_build_a_graph():
    model = small_model()
    total = weight_distance(model, small_model(1))
    assert not total.requires_grad


def test_weight_distance_errors():
    model = small_model()
    with pytest.raises(ValueError, match="no tensors"):
        weight_distance([])
    with pytest.raises(ValueError, match="no tensors"):
        weight_distance(nn.ReLU())
    with pytest.raises(TypeError, match="'1' is a float, not a tensor"):
        weight_distance([torch.zeros(2), 3.0])
    with pytest.raises(ValueError, match=r"a and b name different tensors: b lacks \['0.weight', '0.bias', "
                                         r"'2.weight', '2.bias'\] and has \['weight', 'bias'\]"):
        weight_distance(model, nn.Linear(8, 16))
    with pytest.raises(RuntimeError, match="a has 4 tensors but b has 2"):
        weight_distance(model, list(nn.Linear(8, 16).parameters()))
    with pytest.raises(RuntimeError, match=r"shape mismatch at index 2: a\[2\] has shape \[3, 16\]"):
        weight_distance(model, [p.detach() for p in model.parameters()][:2] + [torch.zeros(16, 3), torch.zeros(3)])
    with pytest.raises(RuntimeError, match=r"b\[1\] is on meta but a\[0\] is on cpu"):
        weight_distance(model, [p.detach().to("meta") if i == 1 else p.detach() for i, p in enumerate(model.parameters())])
    with pytest.raises(RuntimeError, match=r"a\[0\] has dtype Long"):
        weight_distance([torch.zeros(3, dtype=torch.long)])


# ---------------------------------------------------------------------------
# fit_log
# ---------------------------------------------------------------------------


def test_fit_log_recovers_a_and_b_from_exact_data():
    steps = [1, 2, 5, 10, 50, 100, 1000, 5000]
    fit = fit_log(steps, [0.7 + 2.5 * math.log(t) for t in steps])
    assert fit.a == pytest.approx(0.7, abs=1e-12) and fit.b == pytest.approx(2.5, abs=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12) and fit.n == len(steps)
    assert fit(100) == pytest.approx(0.7 + 2.5 * math.log(100))
    assert fit.step_at(0.7 + 2.5 * math.log(42)) == pytest.approx(42)


def test_fit_log_r2_of_noisy_data_and_points_left_out():
    generator = torch.Generator().manual_seed(0)
    steps = list(range(0, 400, 4))  # step 0 is left out
    noise = (0.05 * torch.randn(len(steps), generator=generator)).tolist()
    fit = fit_log(steps, [1.0 + 0.3 * math.log(max(t, 1)) + e for t, e in zip(steps, noise)])
    assert fit.n == len(steps) - 1
    assert fit.a == pytest.approx(1.0, abs=0.1) and fit.b == pytest.approx(0.3, abs=0.03)
    assert 0.9 < fit.r2 < 1.0
    assert math.isnan(fit_log([1, 2, 3], [4.0, 4.0, 4.0]).r2)  # constant data: no variance to explain


def test_fit_log_errors():
    with pytest.raises(ValueError, match="3 steps but 2 distances"):
        fit_log([1, 2, 3], [1.0, 2.0])
    with pytest.raises(ValueError, match="two or more distinct steps"):
        fit_log([0, 5, 5], [0.0, 1.0, 1.1])
    with pytest.raises(ValueError, match="flat"):
        LogFit(1.0, 0.0, 1.0, 2).step_at(2.0)


# ---------------------------------------------------------------------------
# WeightDistanceTracker
# ---------------------------------------------------------------------------


def test_tracker_snapshots_w0_and_records_rows():
    model = small_model()
    w0 = [p.detach().clone() for p in model.parameters()]
    tracker = WeightDistanceTracker(model)
    assert tracker.columns == ["step", "total", "0.weight", "0.bias", "2.weight", "2.bias"]
    tracker.update(0)
    for step in (1, 2, 3):
        perturb(model, 0.1, seed=step)
        tracker.update(step * 10)
    rows = tracker.history
    assert [row["step"] for row in rows] == [0, 10, 20, 30]
    assert rows[0]["total"] == 0.0 and all(rows[0][name] == 0.0 for name in tracker.names)
    want_per, want_total = distance_reference(list(model.parameters()), w0)
    assert rows[-1]["total"] == pytest.approx(want_total.item(), rel=1e-6)
    for name, want in zip(tracker.names, want_per.tolist()):
        assert rows[-1][name] == pytest.approx(want, rel=1e-6)
    assert rows[1]["total"] < rows[2]["total"] < rows[3]["total"]
    assert tracker.steps == [0, 10, 20, 30] and tracker.totals == [row["total"] for row in rows]
    assert tracker.latest() == rows[-1]["total"]


def test_update_keeps_device_tensors_until_the_history_is_read():
    model = small_model()
    tracker = WeightDistanceTracker(model)
    assert tracker.latest() is None and tracker.last_total is None
    perturb(model, 0.1, seed=1)
    total = tracker.update()
    assert isinstance(total, torch.Tensor) and total.dim() == 0 and tracker.last_total is total
    assert len(tracker._pending) == 1 and not tracker._rows  # nothing converted yet
    perturb(model, 0.1, seed=2)
    tracker.update()
    assert tracker.steps == [1, 2]  # default steps count from 1
    assert not tracker._pending and len(tracker._rows) == 2


def test_tracker_follows_the_model_not_a_stale_alias():
    model = small_model()
    tracker = WeightDistanceTracker(model)
    model.to(torch.float64).to(torch.float32)  # swaps every parameter's data
    perturb(model, 0.5, seed=3)
    tracker.update(1)
    assert tracker.history[0]["total"] == pytest.approx(
        distance_reference(list(model.parameters()), tracker.reference)[1].item(), rel=1e-6
    )
    assert tracker.history[0]["total"] > 0


def test_explicit_reference_and_dtype():
    model, init = small_model(0, torch.bfloat16), small_model(5)
    tracker = WeightDistanceTracker(model, reference=init)
    assert all(r.dtype == torch.float32 for r in tracker.reference)  # fp32 snapshot of a bf16 model
    tracker.update(1)
    want = distance_reference(list(model.parameters()), list(init.parameters()))[1].item()
    assert tracker.history[0]["total"] == pytest.approx(want, rel=1e-6)
    kept = WeightDistanceTracker(model, dtype=None)
    assert all(r.dtype == torch.bfloat16 for r in kept.reference)
    kept.update(1)
    assert kept.latest() == 0.0


def test_reference_is_a_copy():
    model, init = small_model(0), small_model(5)
    tracker = WeightDistanceTracker(model, reference=init)
    perturb(init, 1.0, seed=0)  # changing the reference module afterwards changes nothing
    tracker.update(1)
    assert tracker.latest() == pytest.approx(
        distance_reference(list(model.parameters()), tracker.reference)[1].item(), rel=1e-6
    )
    assert tracker.latest() != pytest.approx(
        distance_reference(list(model.parameters()), list(init.parameters()))[1].item(), rel=1e-3
    )


def test_snapshot_on_another_device_streams_in_buckets():
    # On a GPU machine the snapshot would live on the CPU and stream to the GPU;
    # here both are CPU tensors, which exercises the same bucketed path.
    model = small_model()
    whole = WeightDistanceTracker(model)
    bucketed = WeightDistanceTracker(model, bucket_bytes=200)
    perturb(model, 0.2, seed=4)
    whole.update(1)
    sizes = [s.numel() * 4 for s in bucketed.reference]
    assert len(bucketed._buckets()) > 2 and sizes[0] > 200  # a tensor larger than a bucket gets its own
    per, total = bucketed._measure_streamed(list(model.parameters()), torch.device("cpu"))
    assert torch.allclose(per, torch.tensor([whole.history[0][n] for n in whole.names]), rtol=1e-6)
    assert total.item() == pytest.approx(whole.latest(), rel=1e-6)


def test_param_names_that_clash_with_the_fixed_columns():
    module = nn.Module()
    module.step = nn.Parameter(torch.zeros(2))
    module.total = nn.Parameter(torch.zeros(3))
    tracker = WeightDistanceTracker(module)
    assert tracker.columns == ["step", "total", "param:step", "param:total"]


def test_tracker_of_a_list_names_tensors_by_index():
    tensors = [torch.zeros(3), torch.zeros(2, 2)]
    tracker = WeightDistanceTracker(tensors, dtype=None)
    assert tracker.names == ["0", "1"]
    tensors[1].add_(1.0)
    tracker.update(7)
    assert tracker.history == [{"step": 7, "total": 2.0, "0": 0.0, "1": 2.0}]


def test_tracker_errors():
    model = small_model()
    with pytest.raises(ValueError, match="reference has 2 tensors but the model has 4"):
        WeightDistanceTracker(model, reference=list(nn.Linear(8, 16).parameters()))
    with pytest.raises(ValueError, match=r"shape mismatch at index 2 \('2.weight'\)"):
        WeightDistanceTracker(model, reference=[p.detach() for p in model.parameters()][:2] + [torch.zeros(16, 3), torch.zeros(3)])
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        WeightDistanceTracker(model, dtype=torch.int64)
    with pytest.raises(ValueError, match="no tensors"):
        WeightDistanceTracker(nn.ReLU())
    tracker = WeightDistanceTracker(model)
    with pytest.raises(ValueError, match="two or more distinct steps"):
        tracker.fit_log()
    with pytest.raises(ValueError, match="no update"):
        tracker.distance_at(3)


def test_distance_at_interpolates_between_updates():
    tensors = [torch.zeros(1)]
    tracker = WeightDistanceTracker(tensors)
    for step, value in [(10, 1.0), (20, 3.0), (40, 4.0)]:
        tensors[0].fill_(value)
        tracker.update(step)
    assert tracker.distance_at(10) == 1.0 and tracker.distance_at(15) == 2.0 and tracker.distance_at(30) == 3.5
    with pytest.raises(ValueError, match="outside the recorded steps 10..40"):
        tracker.distance_at(41)


def synthetic_tracker(a, b, steps):
    """A tracker whose model sits exactly a + b log t away from w_0 at each step."""
    param = torch.zeros(5, dtype=torch.float64)
    direction = torch.tensor([3.0, 0.0, 4.0, 0.0, 0.0], dtype=torch.float64) / 5.0  # unit vector
    tracker = WeightDistanceTracker([param], dtype=None)
    for t in steps:
        param.copy_((a + b * math.log(t)) * direction)
        tracker.update(t)
    return tracker


def test_tracker_fit_recovers_a_and_b():
    tracker = synthetic_tracker(0.25, 1.5, [1, 3, 10, 30, 100, 300, 1000])
    fit = tracker.fit_log()
    assert fit.a == pytest.approx(0.25, abs=1e-9) and fit.b == pytest.approx(1.5, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)


def test_to_csv_round_trips(tmp_path):
    tracker = synthetic_tracker(0.5, 0.1, [1, 2, 4])
    path = tracker.to_csv(tmp_path / "distance.csv")
    with path.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "total", "0"]
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 4]
    assert [float(r[1]) for r in rows[1:]] == tracker.totals  # full precision


def test_plot_draws_distance_against_log_t(tmp_path):
    pytest.importorskip("matplotlib")
    tracker = synthetic_tracker(0.5, 0.2, [1, 2, 5, 10, 100])
    path = tmp_path / "distance.png"
    figure = tracker.plot(path, layers=["0"])
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    axes = figure.axes[0]
    assert axes.get_xscale() == "log"
    labels = [line.get_label() for line in axes.get_lines()]
    assert labels[0].startswith("||w_t - w_0||") and "0" in labels and any("log t" in label for label in labels)
    with pytest.raises(ValueError, match="unknown parameter names"):
        tracker.plot(layers=["nope"])


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    tracker = synthetic_tracker(0.5, 0.2, [1, 2])
    with pytest.raises(ImportError, match="pip install matplotlib"):
        tracker.plot("never.png")


def test_swa_fast_imports_and_tracks_without_matplotlib():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["matplotlib"] = None
        import torch, swa_fast
        from swa_fast.distance import WeightDistanceTracker
        tracker = WeightDistanceTracker(torch.nn.Linear(2, 2))
        tracker.update(1)
        print(tracker.history[0]["total"])
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.0"
