"""How far weights have travelled: fused distance norms and a tracker of ||w_t - w_0||.

"Train longer, generalize better" (Hoffer, Hubara, Soudry, 2017) observes that
weights drift from their initialization like an ultra-slow diffusion,
``||w_t - w_0|| ~ a + b log t``, and suggests using that distance, rather than
the validation error, to decide when to decay the learning rate.

* :func:`weight_distance` -- ``||a - b||`` (total and per tensor) of two models,
  parameter iterables or tensor lists, in one fused pass
  (``torch.ops.swa_fast.distance``).
* :class:`WeightDistanceTracker` -- snapshots ``w_0``, records the distance at
  the steps you choose without synchronising with the GPU, and gives the
  history as rows, CSV, the fit ``a + b log t`` (:class:`LogFit`) and a plot.
* :func:`fit_log` -- the least-squares fit on its own.

The learning-rate rules built on these live in :mod:`swa_fast.regime`.
"""

from __future__ import annotations

import csv
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from swa_fast._checks import check_number
from swa_fast.ops.distance import Distances, combine_shard_norms, distance_norms
from swa_fast.averaging.sharding import layout_of, local_part, local_tensor, reshard, shard_groups

__all__ = [
    "Distances",
    "LogFit",
    "WeightDistanceTracker",
    "distance_norms",
    "fit_log",
    "weight_distance",
]

# A module (its parameters, in named_parameters() order), a name -> tensor
# mapping (e.g. a state_dict of floating tensors), or an iterable of tensors.
Weights = Union[nn.Module, Mapping[str, Tensor], Iterable[Tensor], Tensor]


def _named_tensors(weights: Weights, what: str) -> Tuple[List[str], List[Tensor]]:
    """Names and tensors of ``weights``; tensors of a list are named by index.

    The tensors themselves (parameters included) are returned, not detached
    aliases: ``module.to(...)`` swaps a parameter's data, and an alias taken
    before would keep reading the old storage. The op runs under no_grad.
    """
    if isinstance(weights, nn.Module):
        # An FSDP2 module left gathered by an evaluation forward lists its unsharded copies; its
        # parameters are the shards (which the optimizer updates), so put it back first.
        reshard(weights)
        named = list(weights.named_parameters())
        names, tensors = [n for n, _ in named], [t for _, t in named]
    elif isinstance(weights, Tensor):  # one tensor, not an iterable over its rows
        names, tensors = ["0"], [weights]
    elif isinstance(weights, Mapping):
        names, tensors = [str(k) for k in weights.keys()], list(weights.values())
    else:
        tensors = list(weights)
        names = [str(i) for i in range(len(tensors))]
    for name, tensor in zip(names, tensors):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{what}: {name!r} is a {type(tensor).__name__}, not a tensor")
    if not tensors:
        raise ValueError(f"{what} has no tensors (a module without parameters, or an empty list)")
    return names, tensors


def weight_distance(
    a: Weights, b: Optional[Weights] = None, per_tensor: bool = False
) -> Union[Tensor, Distances]:
    """The L2 distance ``||a - b||`` between two sets of weights (``||a||`` when ``b`` is None).

    One fused pass over all tensors (``torch.ops.swa_fast.distance``), as if
    every tensor were flattened into one long vector. Accumulated in float32
    (float64 when any tensor is float64), in a fixed order: the same inputs
    give the same bits on every call. Nothing is read back to the host, so on
    a GPU the call does not wait for the GPU; reading the result (``float()``,
    ``.item()``) does.

    Args:
        a: a module (its parameters), a name -> tensor mapping, or an iterable
            of tensors. All on one device.
        b: the same kind of thing, on ``a``'s device, dtypes may differ (e.g. a bf16
            model against an fp32 snapshot). When both are named (modules or
            mappings) tensors are paired by name: the same names, in any order;
            otherwise by position, with the same number of tensors and shapes.
        per_tensor: also return the distance of every tensor.

    Returns:
        A 0-dim tensor, or with ``per_tensor=True`` a :class:`Distances`
        ``(per_tensor, total)``.

    Raises:
        ValueError: no tensors, or two named sets whose names differ.
        RuntimeError: (from the op) a length or shape mismatch naming the
            index, tensors on several devices, a non-floating tensor.
    """
    _, tensors_a, tensors_b = _paired(a, b, "a", "b")
    result = distance_norms(tensors_a, tensors_b)
    return result if per_tensor else result.total


def _is_named(weights: Weights) -> bool:
    return isinstance(weights, (nn.Module, Mapping))


def _paired(a: Weights, b: Optional[Weights], what_a: str, what_b: str
            ) -> Tuple[List[str], List[Tensor], Optional[List[Tensor]]]:
    """``a``'s names and tensors and ``b``'s tensors paired with them: by name when both are named
    (modules or mappings: the same names in any order, an error listing the difference
    otherwise), by position when either is a plain sequence."""
    names_a, tensors_a = _named_tensors(a, what_a)
    if b is None:
        return names_a, tensors_a, None
    names_b, tensors_b = _named_tensors(b, what_b)
    if not (_is_named(a) and _is_named(b)):
        return names_a, tensors_a, tensors_b
    by_name = dict(zip(names_b, tensors_b))
    missing = [n for n in names_a if n not in by_name]
    extra = [n for n in names_b if n not in set(names_a)]
    if missing or extra:
        raise ValueError(
            f"{what_a} and {what_b} name different tensors: {what_b} lacks {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} and has {extra[:5]}{' ...' if len(extra) > 5 else ''} "
            f"that {what_a} does not (they are paired by name)"
        )
    return names_a, tensors_a, [by_name[n] for n in names_a]


# ---------------------------------------------------------------------------
# The fit a + b log t
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LogFit:
    """The least-squares fit ``distance ~ a + b * log(t)`` (natural log)."""

    a: float
    b: float
    r2: float
    """Coefficient of determination; nan when every distance is equal."""
    n: int
    """Number of points fitted (steps t > 0)."""

    def __call__(self, t: Union[float, Sequence[float]]) -> Union[float, List[float]]:
        """The fitted distance at step ``t`` (a number or a sequence of numbers, t > 0)."""
        if isinstance(t, numbers.Real):
            return self.a + self.b * math.log(t)
        return [self.a + self.b * math.log(x) for x in t]

    def step_at(self, distance: float) -> float:
        """The step at which the fit reaches ``distance``: ``exp((distance - a) / b)``."""
        if self.b == 0:
            raise ValueError("the fit is flat (b == 0): no step reaches another distance")
        return math.exp((distance - self.a) / self.b)


def fit_log(steps: Sequence[float], distances: Sequence[float]) -> LogFit:
    """Least-squares fit of ``distances ~ a + b * log(steps)``, with its R^2.

    Points with ``step <= 0`` are left out (log is undefined there; the
    distance at step 0 is 0 by construction anyway).

    Raises:
        ValueError: different lengths, a non-finite step or distance (named), or fewer than two
            distinct steps > 0.
    """
    if len(steps) != len(distances):
        raise ValueError(f"fit_log: {len(steps)} steps but {len(distances)} distances")
    for t, d in zip(steps, distances):
        check_number("fit_log: a step", t)
        if isinstance(d, bool) or not isinstance(d, numbers.Real):
            raise TypeError(f"fit_log: the distance at step {t} must be a number, got {type(d).__name__} {d!r}")
        if not math.isfinite(float(d)):
            raise ValueError(f"fit_log: the distance at step {t} is {float(d)}: the weights diverged (or were not "
                             "finite) there; a log fit needs finite distances (fit the steps before it)")
    # Fitted on distances scaled to at most 1 (the squares of huge distances would overflow), then scaled back.
    scale = max((abs(float(d)) for d in distances), default=1.0) or 1.0
    points = [(math.log(float(t)), float(d) / scale) for t, d in zip(steps, distances) if t > 0]
    if len({x for x, _ in points}) < 2:
        raise ValueError("fit_log needs distances at two or more distinct steps > 0")
    n = len(points)
    mean_x = math.fsum(x for x, _ in points) / n
    mean_y = math.fsum(y for _, y in points) / n
    sxx = math.fsum((x - mean_x) ** 2 for x, _ in points)
    sxy = math.fsum((x - mean_x) * (y - mean_y) for x, y in points)
    b = sxy / sxx
    a = mean_y - b * mean_x
    ss_res = math.fsum((y - (a + b * x)) ** 2 for x, y in points)
    ss_tot = math.fsum((y - mean_y) ** 2 for _, y in points)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return LogFit(a=a * scale, b=b * scale, r2=r2, n=n)


# ---------------------------------------------------------------------------
# The tracker
# ---------------------------------------------------------------------------


def _columns(names: Sequence[str]) -> List[str]:
    """The per-parameter column names: each name, with ``param:`` in front until it collides neither
    with ``step``/``total`` nor with a column before it."""
    taken = {"step", "total"}
    columns = []
    for name in names:
        column = name
        while column in taken:
            column = f"param:{column}"
        taken.add(column)
        columns.append(column)
    return columns


class _Record(NamedTuple):
    step: int
    total: Tensor  # 0-dim, on the compute device
    per_tensor: Tensor  # 1-D, on the compute device


class WeightDistanceTracker:
    """Records ``||w_t - w_0||`` (in total and per parameter) over training.

    At construction the tracker copies the reference weights ``w_0`` (the
    model's current parameters, or ``reference``). Each :meth:`update` runs
    one fused distance pass and keeps the results as tensors on the device,
    without waiting for the GPU; they become Python floats only when you read
    :attr:`history`, :meth:`to_csv`, :meth:`fit_log`, :meth:`plot` or
    :meth:`latest` (one sync for all updates recorded since the last read).

    Example::

        tracker = WeightDistanceTracker(model)          # w_0 = the weights now
        for step in range(1, steps + 1):
            train_step(model)
            if step % 100 == 0:
                tracker.update(step)
        fit = tracker.fit_log()                          # a + b log t, R^2
        tracker.to_csv("distance.csv"); tracker.plot("distance.png")

    Args:
        model: a module (its parameters, named by ``named_parameters()``), a
            name -> tensor mapping, or an iterable of tensors. The tracker keeps
            these tensor objects: ``model.to(...)`` is followed, replacing a
            parameter object is not.
        reference: the weights to measure from, with the model's shapes and
            order (default: the model's weights at construction). Copied.
        device: where the snapshot lives (default: each tensor's device).
            ``"cpu"`` keeps ``w_0`` off the GPU: each update then streams it to
            the model's device in buckets of ``bucket_bytes`` (from pinned
            memory, asynchronously: still no sync) and runs the op there.
        dtype: the snapshot's dtype (default float32: an fp32 ``w_0`` of a bf16
            model); ``None`` keeps every tensor's own dtype (use it for a
            float64 model, whose float32 snapshot would be rounded).
        bucket_bytes: the most snapshot bytes streamed to the model's device at
            once, when the snapshot lives on another device.

    An FSDP2 model (DTensor parameters) is measured whole: the snapshot keeps
    this rank's shards of ``w_0`` only (a ``reference`` may be DTensors or full
    tensors, each rank takes its shard), and every update adds the shards'
    squared norms up across ranks with one all-reduce per sharding mesh
    dimension, so every rank must call :meth:`update` and all of them record
    the same distances. :attr:`reference` is then the local shards.

    The per-parameter columns of the rows are the parameter names (a name that is
    ``"step"``, ``"total"`` or already taken gets ``"param:"`` in front until it is unique).
    """

    def __init__(
        self,
        model: Weights,
        reference: Optional[Weights] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = torch.float32,
        *,
        bucket_bytes: int = 64 << 20,
    ) -> None:
        names, params, ref = _paired(model, reference, "model", "reference")
        if ref is None:
            ref = params
        else:
            if len(ref) != len(params):
                raise ValueError(f"reference has {len(ref)} tensors but the model has {len(params)}")
            for i, (name, p, r) in enumerate(zip(names, params, ref)):
                if p.shape != r.shape:
                    raise ValueError(
                        f"shape mismatch at index {i} ({name!r}): the model's is {tuple(p.shape)}, "
                        f"the reference's {tuple(r.shape)}"
                    )
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype (or None), got {dtype}")
        check_number("bucket_bytes", bucket_bytes, above=0, integer=True, owner="WeightDistanceTracker")
        self.names: List[str] = _columns(names)
        self._params = params
        # DTensors (FSDP2): the snapshot holds this rank's shards of w_0 only, and each update
        # combines the shards' norms across ranks (one all-reduce per sharding mesh dimension).
        layouts = [layout_of(p) for p in params]
        model_device = local_tensor(params[0]).device
        self._groups = shard_groups(layouts, model_device) if any(layouts) else None
        ref = [local_part(r, layout) for r, layout in zip(ref, layouts)] if any(layouts) else ref
        self._snapshot = [self._snapshot_of(r, device, dtype, model_device) for r in ref]
        self._bucket_bytes = bucket_bytes
        self._pending: List[_Record] = []
        self._rows: List[Tuple[int, float, List[float]]] = []
        self._last: Optional[_Record] = None

    @staticmethod
    def _snapshot_of(tensor: Tensor, device, dtype, model_device: torch.device) -> Tensor:
        target = torch.device(device) if device is not None else tensor.device
        snapshot = tensor.detach().to(device=target, dtype=dtype or tensor.dtype, copy=True)
        if target.type == "cpu" and model_device.type == "cuda":
            snapshot = snapshot.pin_memory()  # so streaming it to the GPU needs no sync
        return snapshot

    @property
    def reference(self) -> List[Tensor]:
        """The snapshot ``w_0`` the distances are measured from (the tracker's own copies)."""
        return list(self._snapshot)

    @property
    def columns(self) -> List[str]:
        """Column names of :attr:`history` rows and of the CSV: step, total, then one per parameter."""
        return ["step", "total", *self.names]

    # -- recording ---------------------------------------------------------

    def update(self, step: Optional[int] = None) -> Tensor:
        """Measure the distance now and record it under ``step``; returns the 0-dim total.

        ``step`` defaults to the previous step + 1 (1 for the first update); given, it is an integer
        >= 0 and greater than the previous one (the records are a curve over training time).
        No host sync: the total and per-parameter distances stay on the device
        until the history is read.
        """
        if step is None:
            step = (self._last.step + 1) if self._last is not None else 1
        check_number("step", step, minimum=0, integer=True, owner="WeightDistanceTracker.update")
        if self._last is not None and step <= self._last.step:
            raise ValueError(f"WeightDistanceTracker.update: step {step} does not come after the last recorded step "
                             f"{self._last.step}: steps must increase")
        with torch.no_grad():
            result = self._measure()
        record = _Record(int(step), result.total, result.per_tensor)
        self._pending.append(record)
        self._last = record
        return record.total

    def _measure(self) -> Distances:
        params = [local_tensor(p) for p in self._params]
        device = params[0].device
        if all(s.device == device for s in self._snapshot):
            measured = distance_norms(params, self._snapshot)
        else:
            measured = self._measure_streamed(params, device)
        return measured if self._groups is None else combine_shard_norms(measured.per_tensor, self._groups)

    def _measure_streamed(self, params: List[Tensor], device: torch.device) -> Distances:
        """The snapshot lives elsewhere (w_0 kept on the CPU): stream it to the
        model's device a bucket at a time, then combine the per-tensor norms."""
        per_tensor = []
        for lo, hi in self._buckets():
            ref = [_to_device(s, device) for s in self._snapshot[lo:hi]]
            per_tensor.append(distance_norms(params[lo:hi], ref).per_tensor)
        per_tensor = torch.cat(per_tensor) if len(per_tensor) > 1 else per_tensor[0]
        # The total from the per-tensor norms, with the op's fixed order.
        return Distances(per_tensor, distance_norms([per_tensor]).total)

    def _buckets(self) -> List[Tuple[int, int]]:
        buckets, lo, size = [], 0, 0
        for i, s in enumerate(self._snapshot):
            nbytes = s.numel() * s.element_size()
            if i > lo and size + nbytes > self._bucket_bytes:
                buckets.append((lo, i))
                lo, size = i, 0
            size += nbytes
        buckets.append((lo, len(self._snapshot)))
        return buckets

    # -- reading (each read syncs once for everything recorded since the last) --

    def _materialize(self) -> None:
        if not self._pending:
            return
        totals = torch.stack([r.total for r in self._pending]).tolist()
        per_tensor = torch.stack([r.per_tensor for r in self._pending]).tolist()
        for record, total, layers in zip(self._pending, totals, per_tensor):
            self._rows.append((record.step, total, layers))
        self._pending.clear()

    def latest(self) -> Optional[float]:
        """The total distance of the last update as a float (a sync), or None before any update."""
        return None if self._last is None else float(self._last.total)

    @property
    def last_total(self) -> Optional[Tensor]:
        """The last update's total as a 0-dim device tensor (no sync), or None before any update."""
        return None if self._last is None else self._last.total

    @property
    def history(self) -> List[Dict[str, float]]:
        """One dict per update, in update order: ``{"step": t, "total": d, "<param name>": d_i, ...}``."""
        self._materialize()
        return [
            {"step": step, "total": total, **dict(zip(self.names, layers))} for step, total, layers in self._rows
        ]

    @property
    def steps(self) -> List[int]:
        self._materialize()
        return [row[0] for row in self._rows]

    @property
    def totals(self) -> List[float]:
        self._materialize()
        return [row[1] for row in self._rows]

    def distance_at(self, step: float) -> float:
        """The total distance at ``step``, linearly interpolated between recorded updates.

        Raises ValueError outside the recorded steps. With the updates of a
        reference run this turns its lr-decay steps into distance milestones
        (see :class:`swa_fast.regime.DistanceMilestoneLR`).
        """
        points = sorted(zip(self.steps, self.totals))
        if not points:
            raise ValueError("distance_at: no update has been recorded yet")
        if not points[0][0] <= step <= points[-1][0]:
            raise ValueError(f"distance_at: step {step} is outside the recorded steps {points[0][0]}..{points[-1][0]}")
        for (t0, d0), (t1, d1) in zip(points, points[1:]):
            if t0 <= step <= t1:
                return d0 if t1 == t0 else d0 + (d1 - d0) * (step - t0) / (t1 - t0)
        return points[0][1]  # a single recorded step

    def to_csv(self, path: Union[str, Path]) -> Path:
        """Write :attr:`history` to ``path`` as CSV (header: :attr:`columns`); returns the path."""
        path = Path(path)
        rows = self.history
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.columns)
            for row in rows:
                writer.writerow([row["step"], *(repr(row[c]) for c in self.columns[1:])])
        return path

    def fit_log(self) -> LogFit:
        """The least-squares fit of the total distance ``a + b * log(step)`` over the updates with step > 0."""
        return fit_log(self.steps, self.totals)

    def plot(self, path: Optional[Union[str, Path]] = None, *, layers: Sequence[str] = (), fit: bool = True):
        """Draw the total distance against log t, with the fit ``a + b log t``; save it to ``path``.

        Needs matplotlib (an optional dependency: ``pip install matplotlib``).

        Args:
            path: where to save the figure (any format matplotlib knows from
                the suffix); None only returns the figure.
            layers: parameter names whose own distances to draw as well.
            fit: draw the fitted line (when two or more steps > 0 exist).

        Returns:
            The matplotlib ``Figure``.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError(
                "WeightDistanceTracker.plot needs matplotlib, an optional dependency of swa_fast: "
                "pip install matplotlib"
            ) from error
        unknown = [name for name in layers if name not in self.names]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; known: {self.names}")
        rows = [row for row in self.history if row["step"] > 0]
        figure = Figure(figsize=(6.4, 4.0), layout="constrained")
        axes = figure.subplots()
        steps = [row["step"] for row in rows]
        axes.plot(steps, [row["total"] for row in rows], "o", markersize=3, label="||w_t - w_0|| (total)")
        for name in layers:
            axes.plot(steps, [row[name] for row in rows], "-", linewidth=1, label=name)
        if fit and len(set(steps)) >= 2:
            line = fit_log(steps, [row["total"] for row in rows])
            grid = [min(steps) * (max(steps) / min(steps)) ** (k / 99) for k in range(100)]
            axes.plot(grid, line(grid), "-", label=f"{line.a:.3g} + {line.b:.3g} log t (R² {line.r2:.3f})")
        axes.set_xscale("log")
        axes.set_xlabel("step t (log scale)")
        axes.set_ylabel("distance from w_0")
        axes.legend()
        if path is not None:
            figure.savefig(path)
        return figure


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A copy on ``device`` without waiting: non-blocking to a GPU; to the CPU a
    blocking copy (the CPU kernel must not read a buffer still being filled)."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=device.type == "cuda")
