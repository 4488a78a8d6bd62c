"""Metrics of a classifier's predictive distribution: accuracy, NLL, calibration (ECE) and reliability diagrams.

The SWAG paper (Maddox et al., "A Simple Baseline for Bayesian Uncertainty in
Deep Learning", 2019) compares methods by accuracy, negative log-likelihood and
expected calibration error, and shows reliability diagrams; these are those
measures, for predicted class probabilities (e.g. a Bayesian model average of
softmax outputs over SWAG samples).

Every function takes

* ``probs``: an ``(N, C)`` floating tensor of class probabilities, on any
  device; each row non-negative, finite and summing to 1 within ``1e-3``
  (within the dtype's machine epsilon for bfloat16, whose rounding alone moves
  a softmax row's sum by up to ~0.4%);
* ``targets``: an ``(N,)`` integer tensor of class indices in ``[0, C)``;

copies both to the CPU once and computes in float64. The prediction of a row is
its argmax (on ties, the first maximal class, as ``torch.argmax``) and its
confidence the largest probability.

Binning (Guo et al., "On Calibration of Modern Neural Networks", 2017): ``n_bins``
equal-width bins on ``[0, 1]`` with edges ``edges[k] = k / n_bins`` (float64,
correctly rounded, so a confidence written as ``k / n_bins`` lies exactly on the
edge); a confidence ``c`` falls in bin ``b`` when ``edges[b] < c <= edges[b + 1]``:
a confidence on an edge goes to the lower bin. ``c == 0`` (impossible for
probabilities) is put in bin 0, and ``c > 1`` (within the sum tolerance) in the
last bin.

* :func:`accuracy` -- ``mean(argmax p_i == y_i)``.
* :func:`negative_log_likelihood` -- ``mean(-log max(p_i[y_i], eps))``.
* :func:`calibration_bins` -- per-bin counts, accuracy and confidence
  (:class:`CalibrationBins`).
* :func:`expected_calibration_error` -- ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``.
* :func:`classification_metrics` -- the three numbers as a dict.
* :func:`reliability_diagram` -- the per-bin accuracy against confidence, on a
  matplotlib ``Axes`` (matplotlib is optional: ``pip install matplotlib``).
"""

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:  # only for the annotations; matplotlib is imported inside reliability_diagram
    from matplotlib.axes import Axes

__all__ = [
    "CalibrationBins",
    "accuracy",
    "calibration_bins",
    "classification_metrics",
    "expected_calibration_error",
    "negative_log_likelihood",
    "reliability_diagram",
]

# How far a row of ``probs`` may sum from 1 (at least the machine epsilon of its dtype: bfloat16's is 2 ** -7).
ROW_SUM_TOLERANCE = 1e-3


def _row_sum_tolerance(dtype: torch.dtype) -> float:
    return max(ROW_SUM_TOLERANCE, torch.finfo(dtype).eps)


class CalibrationBins(NamedTuple):
    """Equal-width confidence bins of a set of predictions (see the module docstring for the convention).

    Attributes:
        edges: ``(n_bins + 1,)`` float64, ``edges[k] = k / n_bins``; bin ``b`` is
            ``(edges[b], edges[b + 1]]``.
        counts: ``(n_bins,)`` int64, the number of predictions in each bin.
        accuracy: ``(n_bins,)`` float64, the fraction of correct predictions in
            each bin; NaN for an empty bin.
        confidence: ``(n_bins,)`` float64, the mean confidence in each bin; NaN
            for an empty bin.
        n: the number of predictions (``counts.sum()``).
    """

    edges: Tensor
    counts: Tensor
    accuracy: Tensor
    confidence: Tensor
    n: int

    @property
    def n_bins(self) -> int:
        """The number of bins."""
        return int(self.counts.numel())

    @property
    def centers(self) -> Tensor:
        """``(n_bins,)`` float64, the middle of each bin."""
        return (self.edges[:-1] + self.edges[1:]) / 2

    @property
    def gaps(self) -> Tensor:
        """``(n_bins,)`` float64, ``confidence - accuracy`` per bin (positive: over-confident); NaN for empty."""
        return self.confidence - self.accuracy

    @property
    def ece(self) -> float:
        """Expected calibration error, ``sum_b counts[b] / n * |accuracy[b] - confidence[b]|`` over non-empty bins."""
        filled = self.counts > 0
        if self.n <= 0 or not bool(filled.any()):
            return float("nan")
        weights = self.counts[filled].to(torch.float64) / self.n
        return float((weights * (self.accuracy[filled] - self.confidence[filled]).abs()).sum())

    @property
    def mce(self) -> float:
        """Maximum calibration error, ``max_b |accuracy[b] - confidence[b]|`` over non-empty bins."""
        filled = self.counts > 0
        if not bool(filled.any()):
            return float("nan")
        return float((self.accuracy[filled] - self.confidence[filled]).abs().max())


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------


def _check_probs(probs: Any) -> Tensor:
    """``probs`` as a float64 CPU tensor after checking it is an (N, C) matrix of probability rows."""
    if not isinstance(probs, Tensor):
        raise TypeError(f"probs must be a torch.Tensor of shape (N, C), got {type(probs).__name__}")
    if not probs.dtype.is_floating_point:
        raise TypeError(f"probs must have a floating dtype (probabilities), got {probs.dtype}")
    if probs.dim() != 2:
        raise ValueError(f"probs must be 2-D of shape (N, C), got shape {tuple(probs.shape)}")
    n, c = probs.shape
    if n == 0:
        raise ValueError("probs must have at least one row, got N == 0 (shape (0, C))")
    if c == 0:
        raise ValueError("probs must have at least one class, got C == 0 (shape (N, 0))")
    p = probs.detach().cpu().to(torch.float64)
    finite = torch.isfinite(p)
    if not bool(finite.all()):
        row, col = (~finite).nonzero()[0].tolist()
        raise ValueError(f"probs must be finite, got {p[row, col].item()} (NaN or inf) at row {row}, column {col}")
    negative = p < 0
    if bool(negative.any()):
        row, col = negative.nonzero()[0].tolist()
        raise ValueError(f"probs must be non-negative, got {p[row, col].item()} at row {row}, column {col}")
    sums = p.sum(dim=1)
    tolerance = _row_sum_tolerance(probs.dtype)
    off = (sums - 1).abs() > tolerance
    if bool(off.any()):
        row = int(off.nonzero()[0])
        raise ValueError(
            f"probs rows must sum to 1 (within {tolerance:g}), got row {row} summing to {sums[row].item()} "
            f"({int(off.sum())} of {n} rows off); pass probabilities, e.g. logits.softmax(-1), not logits"
        )
    return p


def _check_targets(targets: Any, n: int, c: int) -> Tensor:
    """``targets`` as an int64 CPU tensor after checking it holds ``n`` class indices in ``[0, c)``."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor of shape (N,), got {type(targets).__name__}")
    dtype = targets.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"targets must have an integer dtype (class indices), got {dtype}")
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(
            f"targets must be 1-D with one class index per row of probs, shape ({n},), got shape {tuple(targets.shape)}"
        )
    t = targets.detach().cpu()
    outside = (t < 0) | (t >= c)
    if bool(outside.any()):
        index = int(outside.nonzero()[0])
        raise ValueError(
            f"targets must be class indices in [0, {c}) (C = {c} columns of probs), got {t[index].item()} at index "
            f"{index} ({int(outside.sum())} of {n} out of range)"
        )
    return t.to(torch.int64)


def _check_n_bins(n_bins: Any) -> int:
    """``n_bins`` as a positive ``int``."""
    if isinstance(n_bins, bool) or not hasattr(type(n_bins), "__index__") or isinstance(n_bins, Tensor):
        raise TypeError(f"n_bins must be a positive integer, got {type(n_bins).__name__} {n_bins!r}")
    value = int(n_bins.__index__())
    if value < 1:
        raise ValueError(f"n_bins must be a positive integer, got {value}")
    return value


def _check_eps(eps: Any) -> float:
    """``eps`` as a finite positive ``float``."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a positive number, got {type(eps).__name__} {eps!r}")
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite positive number, got {eps}")
    return float(eps)


def _prepare(probs: Any, targets: Any) -> tuple[Tensor, Tensor]:
    """The checked float64 probabilities and int64 targets, both on the CPU."""
    p = _check_probs(probs)
    return p, _check_targets(targets, p.shape[0], p.shape[1])


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def _confidence_and_correct(p: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: the largest probability and whether the argmax (first on ties) is the target."""
    confidence, _ = p.max(dim=1)
    prediction = p.argmax(dim=1)  # documented to give the first maximal index on ties
    return confidence, prediction == t


def _accuracy(p: Tensor, t: Tensor) -> float:
    _, correct = _confidence_and_correct(p, t)
    return float(correct.to(torch.float64).mean())


def _nll(p: Tensor, t: Tensor, eps: float) -> float:
    picked = p.gather(1, t.unsqueeze(1)).squeeze(1)
    return float(-picked.clamp_min(eps).log().mean())


def _bins(p: Tensor, t: Tensor, n_bins: int) -> CalibrationBins:
    confidence, correct = _confidence_and_correct(p, t)
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    # searchsorted (left) gives the first k with edges[k] >= c, so edges[k - 1] < c <= edges[k]: bin k - 1.
    index = (torch.searchsorted(edges, confidence, right=False) - 1).clamp_(0, n_bins - 1)
    counts = torch.bincount(index, minlength=n_bins)
    hits = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct.to(torch.float64))
    total_confidence = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence)
    filled = counts > 0
    size = counts.to(torch.float64)
    nan = torch.full((n_bins,), float("nan"), dtype=torch.float64)
    return CalibrationBins(
        edges=edges,
        counts=counts,
        accuracy=torch.where(filled, hits / size.clamp_min(1), nan),
        confidence=torch.where(filled, total_confidence / size.clamp_min(1), nan),
        n=int(p.shape[0]),
    )


def accuracy(probs: Tensor, targets: Tensor) -> float:
    """Top-1 accuracy: the fraction of rows whose most probable class is the target.

    ``accuracy = mean_i [argmax_c probs[i, c] == targets[i]]``; on ties the first
    maximal class is the prediction (as ``torch.argmax``).

    Args:
        probs: ``(N, C)`` class probabilities (rows non-negative, summing to 1).
        targets: ``(N,)`` integer class indices in ``[0, C)``.

    Returns:
        The accuracy in ``[0, 1]``.
    """
    return _accuracy(*_prepare(probs, targets))


def negative_log_likelihood(probs: Tensor, targets: Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood (cross-entropy) of the targets under ``probs``, in nats.

    ``nll = mean_i -log(max(probs[i, targets[i]], eps))``, computed in float64.
    ``eps`` caps the penalty of a zero probability on the target at
    ``-log(eps)`` (27.6 nats for the default ``1e-12``) instead of infinity.

    Args:
        probs: ``(N, C)`` class probabilities (rows non-negative, summing to 1).
        targets: ``(N,)`` integer class indices in ``[0, C)``.
        eps: the smallest probability a target is given, a finite positive number.

    Returns:
        The NLL, ``>= 0`` (lower is better).
    """
    eps = _check_eps(eps)
    return _nll(*_prepare(probs, targets), eps)


def calibration_bins(probs: Tensor, targets: Tensor, n_bins: int = 15) -> CalibrationBins:
    """Group the predictions into ``n_bins`` equal-width confidence bins on ``[0, 1]``.

    Bin ``b`` is ``(b / n_bins, (b + 1) / n_bins]``: a confidence exactly on an
    edge goes to the lower bin (a confidence of 0 to bin 0). For each bin: how
    many predictions fall in it, their accuracy and their mean confidence (NaN
    for an empty bin).

    Args:
        probs: ``(N, C)`` class probabilities (rows non-negative, summing to 1).
        targets: ``(N,)`` integer class indices in ``[0, C)``.
        n_bins: the number of bins, a positive integer (15 in Guo et al. and
            the SWAG paper).

    Returns:
        A :class:`CalibrationBins`; its ``ece`` is :func:`expected_calibration_error`.
    """
    n_bins = _check_n_bins(n_bins)
    return _bins(*_prepare(probs, targets), n_bins)


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: how far confidence is from accuracy, averaged over the predictions.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over the equal-width
    confidence bins ``B_b`` of :func:`calibration_bins` (empty bins contribute
    nothing). 0 for a perfectly calibrated model (up to sampling noise of order
    ``sqrt(n_bins / N)``); at most 1.

    Args:
        probs: ``(N, C)`` class probabilities (rows non-negative, summing to 1).
        targets: ``(N,)`` integer class indices in ``[0, C)``.
        n_bins: the number of bins, a positive integer.

    Returns:
        The ECE in ``[0, 1]``.
    """
    return calibration_bins(probs, targets, n_bins).ece


def classification_metrics(probs: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL and ECE of ``probs`` in one pass over the inputs (one copy to the CPU).

    Args:
        probs: ``(N, C)`` class probabilities (rows non-negative, summing to 1).
        targets: ``(N,)`` integer class indices in ``[0, C)``.
        n_bins: the number of ECE bins, a positive integer.

    Returns:
        ``{"accuracy": ..., "nll": ..., "ece": ...}`` as in :func:`accuracy`,
        :func:`negative_log_likelihood` (default ``eps``) and
        :func:`expected_calibration_error`.
    """
    n_bins = _check_n_bins(n_bins)
    p, t = _prepare(probs, targets)
    return {"accuracy": _accuracy(p, t), "nll": _nll(p, t, 1e-12), "ece": _bins(p, t, n_bins).ece}


# --------------------------------------------------------------------------------------------------
# Reliability diagram
# --------------------------------------------------------------------------------------------------


def reliability_diagram(
    probs_or_bins: Tensor | CalibrationBins,
    targets: Tensor | None = None,
    n_bins: int = 15,
    *,
    ax: "Axes | None" = None,
    title: str | None = None,
    label: str | None = None,
) -> "Axes":
    """Draw a reliability diagram: per-bin accuracy against confidence, with the perfect-calibration diagonal.

    Bars of each non-empty bin's accuracy at the bin centres (width one bin),
    the gap between accuracy and the bin's mean confidence as hatched red bars
    (above the accuracy bar: over-confident; below: under-confident), the
    diagonal ``accuracy == confidence`` dashed, and the ECE in the legend.

    Needs matplotlib (an optional dependency: ``pip install matplotlib``). No
    pyplot state is touched when ``ax`` is None: the new figure is
    ``ax.figure`` (save it with ``ax.figure.savefig(path)``); to show it in a
    notebook, pass ``ax`` from ``plt.subplots()``.

    Args:
        probs_or_bins: ``(N, C)`` class probabilities (then ``targets`` is
            required), or a :class:`CalibrationBins` from :func:`calibration_bins`
            (then ``targets`` must be None and ``n_bins`` is not used).
        targets: ``(N,)`` integer class indices in ``[0, C)``.
        n_bins: the number of bins, a positive integer.
        ax: the matplotlib ``Axes`` to draw on, e.g. one of several side by side
            to compare methods; None creates a new figure.
        title: the axes title (default "Reliability diagram").
        label: the name of the method, shown in the legend with its ECE.

    Returns:
        The ``Axes`` drawn on.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "reliability_diagram needs matplotlib, an optional dependency of swa_fast: pip install matplotlib"
        ) from error

    if isinstance(probs_or_bins, CalibrationBins):
        if targets is not None:
            raise TypeError("targets must be None when probs_or_bins is a CalibrationBins (it holds the targets' bins)")
        bins = probs_or_bins
    elif isinstance(probs_or_bins, Tensor):
        if targets is None:
            raise TypeError("targets is required when probs_or_bins is a probs tensor")
        bins = calibration_bins(probs_or_bins, targets, n_bins)
    else:
        raise TypeError(
            f"probs_or_bins must be a torch.Tensor of probabilities or a CalibrationBins, "
            f"got {type(probs_or_bins).__name__}"
        )
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str or None, got {type(title).__name__}")
    if label is not None and not isinstance(label, str):
        raise TypeError(f"label must be a str or None, got {type(label).__name__}")

    if ax is None:
        figure = Figure(figsize=(4.8, 4.8), layout="constrained")
        ax = figure.subplots()

    filled = bins.counts > 0
    centers = bins.centers[filled].tolist()
    width = 1.0 / bins.n_bins
    acc = bins.accuracy[filled].tolist()
    conf = bins.confidence[filled].tolist()
    ece = bins.ece
    name = label if label is not None else "accuracy"
    ax.bar(
        centers, acc, width=width, align="center", edgecolor="black", linewidth=0.8, alpha=0.85,
        label=f"{name} (ECE {100 * ece:.2f}%)",
    )
    ax.bar(
        centers, [c - a for a, c in zip(acc, conf)], bottom=acc, width=width, align="center",
        facecolor=(1.0, 0.0, 0.0, 0.25), edgecolor="red", hatch="//", linewidth=0.8, label="gap to confidence",
    )
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", linewidth=1.0, label="perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title if title is not None else "Reliability diagram")
    ax.legend(loc="upper left")
    return ax
