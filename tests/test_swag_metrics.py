"""swa_fast.swag.metrics: accuracy, NLL, ECE (equal-width bins, Guo et al.'s (lo, hi] convention) and the
reliability diagram, against float64 numpy references written here, on random, synthetic-calibrated,
over-confident and hand-made inputs; every bad input refused with a message naming it."""

import ast
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from swa_fast.swag import metrics
from swa_fast.swag.metrics import (
    CalibrationBins,
    accuracy,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_diagram,
)

# --------------------------------------------------------------------------------------------------
# float64 numpy references (independent of the module: boolean masks per bin, a Python loop)
# --------------------------------------------------------------------------------------------------


def reference(probs, targets, n_bins=15, eps=1e-12):
    """accuracy, nll, ece and the per-bin (count, accuracy, confidence) lists, in float64 numpy."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    n = p.shape[0]
    conf = p.max(axis=1)
    pred = p.argmax(axis=1)  # numpy's argmax also returns the first maximum
    correct = pred == y
    nll = float(np.mean([-math.log(max(p[i, y[i]], eps)) for i in range(n)]))
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts, accs, confs = [], [], []
    ece = 0.0
    for b in range(n_bins):
        in_bin = (conf > edges[b]) & (conf <= edges[b + 1])
        if b == 0:
            in_bin |= conf <= edges[0]
        if b == n_bins - 1:
            in_bin |= conf > edges[-1]
        k = int(in_bin.sum())
        counts.append(k)
        if k == 0:
            accs.append(float("nan"))
            confs.append(float("nan"))
            continue
        a, c = float(correct[in_bin].mean()), float(conf[in_bin].mean())
        accs.append(a)
        confs.append(c)
        ece += k / n * abs(a - c)
    return {"accuracy": float(correct.mean()), "nll": nll, "ece": ece, "counts": counts, "acc": accs, "conf": confs}


def random_case(seed, n, c, dtype=torch.float32, scale=None):
    """Softmax of random logits (scale varying with the seed so confidences cover [1/C, 1]) and random targets."""
    generator = torch.Generator().manual_seed(seed)
    scale = scale if scale is not None else 0.5 + 1.5 * seed
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64) * scale
    probs = logits.softmax(dim=1).to(dtype)
    targets = torch.randint(0, c, (n,), generator=generator)
    # Make about half the targets the argmax so the accuracy is not ~1/C.
    take = torch.rand(n, generator=generator) < 0.5
    targets = torch.where(take, probs.argmax(dim=1), targets)
    return probs, targets


def sample_labels(probs, seed):
    """One label per row drawn from the row's distribution (inverse CDF in float64)."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64)
    cdf = probs.to(torch.float64).cumsum(dim=1)
    return (cdf < u * cdf[:, -1:]).sum(dim=1).clamp_(max=probs.shape[1] - 1)


def assert_bins_match(bins, ref):
    assert bins.counts.tolist() == ref["counts"]
    np.testing.assert_allclose(bins.accuracy.numpy(), ref["acc"], rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(bins.confidence.numpy(), ref["conf"], rtol=0, atol=1e-12, equal_nan=True)


# --------------------------------------------------------------------------------------------------
# Against the references
# --------------------------------------------------------------------------------------------------

CASES = [  # (N, C, n_bins, dtype): N not a multiple of anything in particular
    (1001, 10, 15, torch.float32),
    (37, 3, 7, torch.float64),
    (513, 2, 1, torch.float64),
    (2999, 100, 20, torch.float32),
    (1, 5, 15, torch.float64),
    (777, 7, 13, torch.float16),
    (641, 10, 10, torch.bfloat16),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,c,n_bins,dtype", CASES)
def test_metrics_match_numpy_reference(seed, n, c, n_bins, dtype):
    probs, targets = random_case(seed, n, c, dtype)
    ref = reference(probs.to(torch.float64).numpy(), targets.numpy(), n_bins)
    assert accuracy(probs, targets) == pytest.approx(ref["accuracy"], abs=1e-15)
    assert negative_log_likelihood(probs, targets) == pytest.approx(ref["nll"], rel=1e-12)
    assert expected_calibration_error(probs, targets, n_bins) == pytest.approx(ref["ece"], abs=1e-12)
    bins = calibration_bins(probs, targets, n_bins)
    assert_bins_match(bins, ref)
    assert bins.n == n and bins.n_bins == n_bins and sum(ref["counts"]) == n
    assert bins.ece == pytest.approx(ref["ece"], abs=1e-12)
    both = classification_metrics(probs, targets, n_bins)
    assert set(both) == {"accuracy", "nll", "ece"}
    assert all(type(value) is float for value in both.values())
    assert both["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-15)
    assert both["nll"] == pytest.approx(ref["nll"], rel=1e-12)
    assert both["ece"] == pytest.approx(ref["ece"], abs=1e-12)


def test_default_is_fifteen_bins_and_targets_of_any_integer_dtype():
    probs, targets = random_case(3, 301, 4, torch.float64)
    ref = reference(probs.numpy(), targets.numpy(), 15)
    assert calibration_bins(probs, targets).n_bins == 15
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        assert expected_calibration_error(probs, targets.to(dtype)) == pytest.approx(ref["ece"], abs=1e-12)
        assert accuracy(probs, targets.to(dtype)) == pytest.approx(ref["accuracy"], abs=1e-15)


def test_non_contiguous_and_requires_grad_inputs():
    probs, targets = random_case(4, 257, 6, torch.float64)
    ref = reference(probs.numpy(), targets.numpy(), 15)
    transposed = probs.t().contiguous().t()  # same values, column-major strides
    assert not transposed.is_contiguous()
    leaf = probs.clone().requires_grad_(True)
    for p in (transposed, leaf):
        assert classification_metrics(p, targets[::1]) == pytest.approx(
            {"accuracy": ref["accuracy"], "nll": ref["nll"], "ece": ref["ece"]}, abs=1e-12
        )
    strided_targets = torch.stack([targets, targets], dim=1)[:, 0]
    assert accuracy(probs, strided_targets) == pytest.approx(ref["accuracy"], abs=1e-15)


def test_bin_edges_are_k_over_n_bins():
    probs, targets = random_case(0, 11, 3, torch.float64)
    for n_bins in (1, 3, 10, 15, 100):
        edges = calibration_bins(probs, targets, n_bins).edges
        assert edges.dtype == torch.float64 and edges.shape == (n_bins + 1,)
        assert edges.tolist() == [k / n_bins for k in range(n_bins + 1)]
        np.testing.assert_allclose(edges.numpy(), np.linspace(0, 1, n_bins + 1), rtol=0, atol=1e-15)
        bins = calibration_bins(probs, targets, n_bins)
        assert bins.centers.tolist() == pytest.approx([(k + 0.5) / n_bins for k in range(n_bins)], abs=1e-15)


# --------------------------------------------------------------------------------------------------
# Synthetic calibration
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perfectly_calibrated_predictions_have_small_ece(seed):
    """Labels drawn from the predicted distribution: the argmax is right with probability exactly its
    confidence c_i, so in bin b, acc_b - conf_b = mean(correct_i - c_i) has mean 0 and standard error
    se_b = sqrt(sum_i c_i (1 - c_i)) / n_b (Bernoulli(c_i) trials). E|N(0, se_b^2)| = sqrt(2/pi) se_b,
    so E[ECE] ~ 0.8 * sum_b n_b / N * se_b; we allow 3x that sum (~3.8x the expectation) and 4.5 se_b
    per bin. With N = 200,000 and 15 bins the sum is below 0.5 * sqrt(15 / N) = 0.0043."""
    n, c, n_bins = 200_003, 10, 15
    generator = torch.Generator().manual_seed(100 + seed)
    probs = (torch.randn(n, c, generator=generator, dtype=torch.float64) * 2.0).softmax(dim=1)
    targets = sample_labels(probs, seed)
    bins = calibration_bins(probs, targets, n_bins)

    conf = probs.max(dim=1).values.numpy()
    index = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)  # (lo, hi] bins
    se = np.array([math.sqrt(float((conf[index == b] * (1 - conf[index == b])).sum())) / max(1, (index == b).sum())
                   for b in range(n_bins)])
    counts = bins.counts.numpy()
    assert counts.tolist() == np.bincount(index, minlength=n_bins).tolist()
    tolerance = 3 * float((counts / n * se).sum())
    assert tolerance < 3 * 0.5 * math.sqrt(n_bins / n)
    ece = bins.ece
    assert ece < tolerance, (ece, tolerance)
    assert ece == pytest.approx(reference(probs.numpy(), targets.numpy(), n_bins)["ece"], abs=1e-12)
    filled = counts >= 50
    assert filled.sum() >= 8  # the confidences do spread over the bins
    gaps = np.abs(bins.accuracy.numpy() - bins.confidence.numpy())
    assert np.all(gaps[filled] <= 4.5 * se[filled]), (gaps[filled], se[filled])


def test_over_confident_predictions_have_large_ece():
    """Labels drawn from softmax(z) but softmax(3 z) reported: every bin's confidence exceeds its accuracy,
    so ECE = sum_b n_b / N (conf_b - acc_b) = mean confidence - accuracy, and it is large."""
    n, c = 50_001, 10
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64)
    targets = sample_labels(logits.softmax(dim=1), 7)
    sharp = (3 * logits).softmax(dim=1)
    bins = calibration_bins(sharp, targets)
    filled = bins.counts > 0
    assert bool((bins.gaps[filled] > 0).all())
    ece = bins.ece
    mean_conf_minus_acc = float(sharp.max(dim=1).values.mean()) - accuracy(sharp, targets)
    assert ece == pytest.approx(mean_conf_minus_acc, abs=1e-12)
    assert ece > 0.2
    assert ece > 20 * expected_calibration_error(logits.softmax(dim=1), targets)  # the calibrated version
    assert bins.mce >= ece


def test_tiny_hand_example():
    """5 bins (edges 0, .2, .4, .6, .8, 1):
    bin 2 (.4, .6]: conf .55 right                 -> acc 1,  conf .55, gap .45
    bin 3 (.6, .8]: conf .7 wrong, conf .7 right   -> acc .5, conf .7,  gap .2
    bin 4 (.8, 1]:  conf .9 right, conf 1 right    -> acc 1,  conf .95, gap .05
    ECE = (1 * .45 + 2 * .2 + 2 * .05) / 5 = .19; accuracy 4/5;
    NLL = -(log .9 + log .3 + log .7 + log .55 + log 1) / 5."""
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.3, 0.7], [0.55, 0.45], [1.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 1, 0, 0])
    bins = calibration_bins(probs, targets, n_bins=5)
    assert bins.counts.tolist() == [0, 0, 1, 2, 2]
    assert bins.accuracy.tolist()[2:] == [1.0, 0.5, 1.0]
    assert bins.confidence.tolist()[2:] == pytest.approx([0.55, 0.7, 0.95], abs=1e-15)
    assert all(math.isnan(v) for v in bins.accuracy.tolist()[:2] + bins.confidence.tolist()[:2])
    assert bins.ece == pytest.approx(0.19, abs=1e-15)
    assert bins.mce == pytest.approx(0.45, abs=1e-15)
    assert expected_calibration_error(probs, targets, 5) == pytest.approx(0.19, abs=1e-15)
    assert accuracy(probs, targets) == 0.8
    nll = -(math.log(0.9) + math.log(0.3) + math.log(0.7) + math.log(0.55) + math.log(1.0)) / 5
    assert negative_log_likelihood(probs, targets) == pytest.approx(nll, rel=1e-15)
    assert classification_metrics(probs, targets, 5) == pytest.approx({"accuracy": 0.8, "nll": nll, "ece": 0.19})
    # One bin: ECE = |accuracy - mean confidence| = |0.8 - 0.77|.
    assert expected_calibration_error(probs, targets, 1) == pytest.approx(abs(0.8 - (0.9 + 0.7 + 0.7 + 0.55 + 1) / 5))


# --------------------------------------------------------------------------------------------------
# Bin edges, one-hot rows, ties
# --------------------------------------------------------------------------------------------------


def test_confidence_on_an_edge_goes_to_the_lower_bin():
    # n_bins = 10: a row of confidence k / 10 (float64, the edge value itself) lands in bin k - 1.
    c = 10
    rows = []
    for k in range(1, 11):
        top = k / 10
        rest = (1 - top) / (c - 1)
        rows.append([top] + [rest] * (c - 1))
    probs = torch.tensor(rows, dtype=torch.float64)
    assert probs.max(dim=1).values.tolist() == [k / 10 for k in range(1, 11)]
    bins = calibration_bins(probs, torch.zeros(10, dtype=torch.int64), n_bins=10)
    assert bins.counts.tolist() == [1] * 10
    assert bins.confidence.tolist() == [k / 10 for k in range(1, 11)]
    # n_bins = 4 with float32 (0.25, 0.5, 0.75 and 1 are exact): each on an edge goes down; a hair above goes up.
    probs = torch.tensor([[0.25] * 4, [0.5, 0.5, 0, 0], [0.75, 0.25, 0, 0], [1.0, 0, 0, 0],
                          [0.5 + 2 ** -20, 0.5 - 2 ** -20, 0, 0]], dtype=torch.float32)
    bins = calibration_bins(probs, torch.zeros(5, dtype=torch.int64), n_bins=4)
    assert bins.counts.tolist() == [1, 1, 2, 1]
    assert bins.confidence[2].item() == pytest.approx((0.75 + 0.5 + 2 ** -20) / 2, abs=1e-15)


def test_one_hot_probabilities_nll_uses_eps():
    probs = torch.eye(4, dtype=torch.float32)[torch.tensor([0, 1, 2, 3, 0, 1, 2])]
    targets = torch.tensor([0, 1, 2, 0, 1, 1, 2])  # rows 3 and 4 wrong: zero probability on the target
    assert accuracy(probs, targets) == pytest.approx(5 / 7)
    assert negative_log_likelihood(probs, targets) == pytest.approx(-2 * math.log(1e-12) / 7, rel=1e-14)
    assert negative_log_likelihood(probs, targets, eps=1e-6) == pytest.approx(-2 * math.log(1e-6) / 7, rel=1e-14)
    assert negative_log_likelihood(probs, targets, eps=1) == 0.0  # every probability capped below at 1
    assert math.isfinite(negative_log_likelihood(probs, targets, eps=1e-300))
    ref = reference(probs.numpy(), targets.numpy(), 15)
    assert negative_log_likelihood(probs, targets) == pytest.approx(ref["nll"], rel=1e-14)
    bins = calibration_bins(probs, targets)
    assert bins.counts.tolist() == [0] * 14 + [7]  # confidence 1 is the last bin's upper edge
    assert bins.ece == pytest.approx(1 - 5 / 7, abs=1e-15)  # all confidence 1, accuracy 5/7
    right = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    assert classification_metrics(probs, right) == {"accuracy": 1.0, "nll": 0.0, "ece": 0.0}


def test_ties_predict_the_first_maximal_class():
    probs = torch.tensor([[0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.45, 0.45]],
                         dtype=torch.float64)
    assert probs.argmax(dim=1).tolist() == [0, 1, 0, 1]
    assert accuracy(probs, torch.tensor([0, 1, 0, 1])) == 1.0
    assert accuracy(probs, torch.tensor([1, 2, 2, 2])) == 0.0
    assert accuracy(probs, torch.tensor([0, 2, 1, 1])) == 0.5
    bins = calibration_bins(probs, torch.tensor([1, 2, 2, 2]), n_bins=5)
    assert bins.accuracy[bins.counts > 0].tolist() == [0.0, 0.0]
    ref = reference(probs.numpy(), np.array([1, 2, 2, 2]), 5)
    assert bins.ece == pytest.approx(ref["ece"], abs=1e-15)


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------

GOOD_P = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
GOOD_T = torch.tensor([1, 0, 1])

BAD = [  # (probs, targets, error, message pattern)
    ([[0.2, 0.8]], torch.tensor([1]), TypeError, r"probs must be a torch\.Tensor.*list"),
    (np.array([[0.2, 0.8]]), torch.tensor([1]), TypeError, r"probs must be a torch\.Tensor.*ndarray"),
    (torch.tensor([[0, 1], [1, 0]]), torch.tensor([1, 0]), TypeError, r"probs must have a floating dtype.*int64"),
    (torch.tensor([[0.2, 0.8]], dtype=torch.complex64), torch.tensor([1]), TypeError, r"probs .*floating dtype"),
    (torch.tensor([0.2, 0.8]), torch.tensor([1]), ValueError, r"probs must be 2-D.*\(2,\)"),
    (torch.full((2, 2, 2), 0.5), torch.tensor([1, 0]), ValueError, r"probs must be 2-D.*\(2, 2, 2\)"),
    (torch.tensor(1.0), torch.tensor([0]), ValueError, r"probs must be 2-D.*\(\)"),
    (torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), ValueError, r"probs must have at least one row.*N == 0"),
    (torch.zeros(2, 0), torch.tensor([0, 0]), ValueError, r"probs must have at least one class.*C == 0"),
    (torch.tensor([[0.2, 0.8], [float("nan"), 0.5]]), GOOD_T[:2], ValueError, r"probs must be finite.*nan.*row 1"),
    (torch.tensor([[0.2, float("inf")], [0.5, 0.5]]), GOOD_T[:2], ValueError, r"probs must be finite.*inf.*row 0"),
    (torch.tensor([[1.1, -0.1], [0.5, 0.5]]), GOOD_T[:2], ValueError, r"probs must be non-negative.*-0\.1.*row 0"),
    (torch.tensor([[0.2, 0.8], [0.5, 0.6]]), GOOD_T[:2], ValueError, r"probs rows must sum to 1.*0\.001.*row 1.*1\.1"),
    (torch.tensor([[2.0, -1.0], [0.5, 0.5]]), GOOD_T[:2], ValueError, r"probs must be non-negative"),
    (torch.tensor([[3.0, 1.5], [0.1, 0.2]]), GOOD_T[:2], ValueError, r"probs rows must sum to 1.*logits"),
    (torch.tensor([[0.5, 0.5015]]), torch.tensor([0]), ValueError, r"probs rows must sum to 1"),
    (GOOD_P, [1, 0, 1], TypeError, r"targets must be a torch\.Tensor.*list"),
    (GOOD_P, GOOD_T.float(), TypeError, r"targets must have an integer dtype.*float32"),
    (GOOD_P, GOOD_T.bool(), TypeError, r"targets must have an integer dtype.*bool"),
    (GOOD_P, torch.tensor([1, 0]), ValueError, r"targets must be 1-D.*\(3,\).*\(2,\)"),
    (GOOD_P, torch.tensor([1, 0, 1, 0]), ValueError, r"targets must be 1-D.*\(3,\).*\(4,\)"),
    (GOOD_P, GOOD_T.unsqueeze(1), ValueError, r"targets must be 1-D.*\(3, 1\)"),
    (GOOD_P, torch.tensor(1), ValueError, r"targets must be 1-D.*\(\)"),
    (GOOD_P, torch.tensor([1, -1, 0]), ValueError, r"targets must be class indices in \[0, 2\).*-1 at index 1"),
    (GOOD_P, torch.tensor([1, 0, 2]), ValueError, r"targets must be class indices in \[0, 2\).*2 at index 2"),
]

FUNCTIONS = [accuracy, negative_log_likelihood, calibration_bins, expected_calibration_error, classification_metrics]


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("probs,targets,error,pattern", BAD)
def test_bad_inputs_are_refused(function, probs, targets, error, pattern):
    with pytest.raises(error, match=pattern):
        function(probs, targets)


def test_row_sum_tolerance():
    assert accuracy(torch.tensor([[0.5, 0.5009]]), torch.tensor([1])) == 1.0  # within 1e-3
    assert accuracy(torch.tensor([[0.5, 0.4991]], dtype=torch.float64), torch.tensor([0])) == 1.0
    with pytest.raises(ValueError, match="sum to 1"):
        accuracy(torch.tensor([[0.5, 0.4985]], dtype=torch.float64), torch.tensor([0]))
    # bfloat16 rounding alone moves a softmax row's sum by up to ~0.4%: its tolerance is its epsilon, 2 ** -7.
    probs = (torch.randn(2000, 10, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16).softmax(1)
    assert (probs.double().sum(1) - 1).abs().max() > 1e-3
    assert 0 <= accuracy(probs, torch.zeros(2000, dtype=torch.int64)) <= 1
    with pytest.raises(ValueError, match=r"within 0\.0078125"):
        accuracy(torch.tensor([[0.5, 0.51]], dtype=torch.bfloat16), torch.tensor([0]))


@pytest.mark.parametrize("function", [calibration_bins, expected_calibration_error, classification_metrics],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("n_bins,error,pattern", [
    (0, ValueError, "n_bins must be a positive integer, got 0"),
    (-3, ValueError, "n_bins must be a positive integer, got -3"),
    (True, TypeError, "n_bins must be a positive integer, got bool True"),
    (2.5, TypeError, "n_bins must be a positive integer, got float 2.5"),
    (15.0, TypeError, "n_bins must be a positive integer, got float 15.0"),
    ("15", TypeError, "n_bins must be a positive integer, got str '15'"),
    (None, TypeError, "n_bins must be a positive integer, got NoneType"),
    (torch.tensor(15), TypeError, "n_bins must be a positive integer, got Tensor"),
])
def test_bad_n_bins_are_refused(function, n_bins, error, pattern):
    with pytest.raises(error, match=pattern):
        function(GOOD_P, GOOD_T, n_bins)


def test_numpy_integer_n_bins_is_accepted():
    assert calibration_bins(GOOD_P, GOOD_T, np.int64(4)).n_bins == 4


@pytest.mark.parametrize("eps,error,pattern", [
    (0.0, ValueError, "eps must be a finite positive number, got 0.0"),
    (-1e-12, ValueError, "eps must be a finite positive number"),
    (float("nan"), ValueError, "eps must be a finite positive number, got nan"),
    (float("inf"), ValueError, "eps must be a finite positive number, got inf"),
    (True, TypeError, "eps must be a positive number, got bool"),
    ("1e-12", TypeError, "eps must be a positive number, got str"),
])
def test_bad_eps_is_refused(eps, error, pattern):
    with pytest.raises(error, match=pattern):
        negative_log_likelihood(GOOD_P, GOOD_T, eps)


# --------------------------------------------------------------------------------------------------
# Reliability diagram
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def agg():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    return matplotlib


def bar_containers(ax):
    from matplotlib.container import BarContainer

    return [container for container in ax.containers if isinstance(container, BarContainer)]


def test_reliability_diagram_draws_bars_gap_and_diagonal(agg, tmp_path):
    probs, targets = random_case(1, 999, 10, torch.float64)
    bins = calibration_bins(probs, targets, 10)
    ax = reliability_diagram(probs, targets, 10, title="SWAG", label="swag")
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    filled = bins.counts > 0
    accuracy_bars, gap_bars = bar_containers(ax)
    assert len(accuracy_bars.patches) == int(filled.sum()) >= 5
    heights = [patch.get_height() for patch in accuracy_bars.patches]
    centers = [patch.get_x() + patch.get_width() / 2 for patch in accuracy_bars.patches]
    assert heights == pytest.approx(bins.accuracy[filled].tolist(), abs=1e-12)
    assert centers == pytest.approx(bins.centers[filled].tolist(), abs=1e-12)
    assert all(patch.get_width() == pytest.approx(0.1) for patch in accuracy_bars.patches)
    # The gap bars run from the accuracy to the mean confidence.
    tops = [patch.get_y() + patch.get_height() for patch in gap_bars.patches]
    assert [patch.get_y() for patch in gap_bars.patches] == pytest.approx(heights, abs=1e-12)
    assert tops == pytest.approx(bins.confidence[filled].tolist(), abs=1e-12)
    # The diagonal.
    lines = ax.get_lines()
    assert len(lines) == 1
    assert list(lines[0].get_xdata()) == [0.0, 1.0] and list(lines[0].get_ydata()) == [0.0, 1.0]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert f"swag (ECE {100 * bins.ece:.2f}%)" in legend
    assert "perfect calibration" in legend
    assert ax.get_title() == "SWAG"
    assert ax.get_xlim() == (0.0, 1.0) and ax.get_ylim() == (0.0, 1.0)
    path = tmp_path / "reliability.png"
    ax.figure.savefig(path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_reliability_diagram_draws_into_the_given_axes_side_by_side(agg):
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2)
    try:
        probs, targets = random_case(2, 500, 5, torch.float32)
        sharp = (probs.double().log() * 3).softmax(1)
        returned = reliability_diagram(probs, targets, ax=left, label="SWA")
        assert returned is left
        assert len(right.patches) == 0 and len(right.get_lines()) == 0
        bins = calibration_bins(sharp, targets, 8)
        assert reliability_diagram(bins, ax=right, label="SGD") is right
        assert figure.axes == [left, right]
        for ax in (left, right):
            assert len(bar_containers(ax)) == 2 and len(ax.get_lines()) == 1
        accuracy_bars = bar_containers(right)[0]
        assert len(accuracy_bars.patches) == int((bins.counts > 0).sum())
        assert accuracy_bars.patches[0].get_width() == pytest.approx(1 / 8)
        legend = " ".join(text.get_text() for text in right.get_legend().get_texts())
        assert f"SGD (ECE {100 * bins.ece:.2f}%)" in legend
        assert left.get_title() == "Reliability diagram"
    finally:
        plt.close(figure)


def test_reliability_diagram_from_bins_matches_from_probs(agg):
    probs, targets = random_case(0, 321, 4, torch.float64)
    a = reliability_diagram(probs, targets, 12)
    b = reliability_diagram(calibration_bins(probs, targets, 12))
    heights = [[patch.get_height() for patch in bar_containers(ax)[0].patches] for ax in (a, b)]
    assert heights[0] == heights[1]
    assert [text.get_text() for text in a.get_legend().get_texts()] == [
        text.get_text() for text in b.get_legend().get_texts()]
    assert any("ECE" in text.get_text() for text in a.get_legend().get_texts())


def test_reliability_diagram_refuses_bad_arguments(agg):
    bins = calibration_bins(GOOD_P, GOOD_T)
    with pytest.raises(TypeError, match="targets is required"):
        reliability_diagram(GOOD_P)
    with pytest.raises(TypeError, match="targets must be None when probs_or_bins is a CalibrationBins"):
        reliability_diagram(bins, GOOD_T)
    with pytest.raises(TypeError, match="probs_or_bins must be a torch.Tensor of probabilities or a CalibrationBins"):
        reliability_diagram([[0.5, 0.5]], torch.tensor([0]))
    with pytest.raises(ValueError, match="probs rows must sum to 1"):
        reliability_diagram(torch.tensor([[0.5, 0.6]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        reliability_diagram(GOOD_P, GOOD_T, 0)
    with pytest.raises(TypeError, match="title must be a str"):
        reliability_diagram(bins, title=3)
    with pytest.raises(TypeError, match="label must be a str"):
        reliability_diagram(bins, label=3)


def test_reliability_diagram_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        reliability_diagram(GOOD_P, GOOD_T)
    assert accuracy(GOOD_P, GOOD_T) == pytest.approx(2 / 3)  # the metrics themselves need no matplotlib


# --------------------------------------------------------------------------------------------------
# The module itself, and a GPU input
# --------------------------------------------------------------------------------------------------


def test_module_imports_only_torch_math_typing_and_lazily_matplotlib():
    path = Path(metrics.__file__)
    assert path.parent.name == "swag" and path.parent.parent.name == "swa_fast"
    tree = ast.parse(path.read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            top_level.add(node.module.split(".")[0])
        elif isinstance(node, ast.If):  # the TYPE_CHECKING block
            assert ast.unparse(node.test) == "TYPE_CHECKING"
    assert top_level <= {"torch", "math", "typing"}, top_level
    every = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            every.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            every.add(node.module.split(".")[0])
    assert every <= {"torch", "math", "typing", "matplotlib"}, every
    assert isinstance(calibration_bins(GOOD_P, GOOD_T), CalibrationBins)
    for name in metrics.__all__:
        assert getattr(metrics, name).__doc__


@pytest.mark.cuda
def test_cuda_inputs_give_the_cpu_results():
    probs, targets = random_case(5, 1003, 10, torch.float32)
    on_cpu = classification_metrics(probs, targets)
    assert classification_metrics(probs.cuda(), targets.cuda()) == on_cpu
    assert classification_metrics(probs.cuda(), targets) == on_cpu
    assert calibration_bins(probs.cuda(), targets.cuda()).counts.device.type == "cpu"
