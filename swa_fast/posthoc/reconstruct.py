"""Reconstructing the power-function EMA of any length from the snapshots ``PowerFunctionEMA``
wrote: the least-squares coefficients in float64, then one weighted sum of the snapshots'
profiles, streamed (one snapshot's profile read at a time, through a memory map)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from swa_fast._checks import check_number
from swa_fast.checkpoint_average import CheckpointError, average_checkpoints
from swa_fast.posthoc.ema import FORMAT_VERSION, HEADER, profile_key
from swa_fast.posthoc.profiles import MAX_STD, gamma_to_std, solve_coefficients, std_to_gamma

PathLike = Union[str, os.PathLike]
#: A target whose best approximation misses it by more than this (relative L2 error of the
#: profiles) is refused: the snapshots cannot represent it.
MAX_ERROR = 0.05


class PostHocError(ValueError):
    """Snapshots that cannot be reconstructed from, or a target they cannot represent."""


@dataclass(frozen=True)
class Snapshot:
    """What a snapshot file says about itself (its tensors are not read)."""

    path: str
    step: int
    gammas: Tuple[float, ...]
    layout: Tuple[Tuple[str, Tuple[int, ...], torch.dtype], ...]  # (key, shape, dtype) of its profiles


def _load_mapped(path: PathLike) -> Any:
    """A snapshot with its tensors memory-mapped: reading the header or one profile reads only that."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def read_snapshot(path: PathLike) -> Snapshot:
    """The header of the snapshot at ``path``; an error naming the file when it is not one."""
    path = os.fspath(path)
    try:
        state = _load_mapped(path)
    except Exception as error:
        raise PostHocError(f"{path}: cannot be read as a snapshot ({type(error).__name__}: {error})") from error
    header = state.get(HEADER) if isinstance(state, dict) else None
    if not isinstance(header, dict) or header.get("version") != FORMAT_VERSION:
        raise PostHocError(f"{path}: not a PowerFunctionEMA snapshot (no '{HEADER}' header of version "
                           f"{FORMAT_VERSION}: write snapshots with PowerFunctionEMA.snapshot)")
    gammas = tuple(float(g) for g in header["gammas"])
    profiles = [state.get(profile_key(i)) for i in range(len(gammas))]
    if any(not isinstance(p, dict) for p in profiles):
        raise PostHocError(f"{path}: the snapshot lacks some of its {len(gammas)} profiles")
    layout = tuple((key, tuple(value.shape), value.dtype) for key, value in profiles[0].items())
    for index, profile in enumerate(profiles[1:], start=1):
        if tuple((k, tuple(v.shape), v.dtype) for k, v in profile.items()) != layout:
            raise PostHocError(f"{path}: its profiles hold different tensors (profile 0 and {index})")
    return Snapshot(path, int(header["step"]), gammas, layout)


def check_snapshots(snapshots: Sequence[Snapshot]) -> None:
    """One training run's snapshots: the same profiles, the same model, distinct steps."""
    if not snapshots:
        raise PostHocError("no snapshots: give the files PowerFunctionEMA.snapshot wrote")
    first = snapshots[0]
    for snap in snapshots[1:]:
        if snap.gammas != first.gammas:
            raise PostHocError(f"{snap.path} tracks profiles of stds {_stds(snap.gammas)} but {first.path} "
                               f"{_stds(first.gammas)}: snapshots of different PowerFunctionEMAs")
        if snap.layout != first.layout:
            difference = _layout_difference(first.layout, snap.layout)
            raise PostHocError(f"{snap.path} and {first.path} hold different models ({difference})")
    steps: Dict[int, str] = {}
    for snap in snapshots:
        if snap.step in steps:
            raise PostHocError(f"{snap.path} and {steps[snap.step]} are both of step {snap.step}: each step once")
        steps[snap.step] = snap.path


def _stds(gammas: Sequence[float]) -> List[float]:
    return [round(gamma_to_std(g), 6) for g in gammas]


def _layout_difference(a, b) -> str:
    keys_a, keys_b = {k for k, _, _ in a}, {k for k, _, _ in b}
    if keys_a != keys_b:
        return f"keys only in one: {sorted(keys_a ^ keys_b)[:3]}"
    for (key, shape_a, dtype_a), (_, shape_b, dtype_b) in zip(a, sorted(b, key=lambda e: [k for k, _, _ in a].index(e[0]))):
        if (shape_a, dtype_a) != (shape_b, dtype_b):
            return f"{key!r}: {tuple(shape_a)} {dtype_a} vs {tuple(shape_b)} {dtype_b}"
    return "the same tensors in another order"


@dataclass(frozen=True)
class Plan:
    """How a target is made: one coefficient per (snapshot, profile) and how well the sum fits."""

    target_step: int
    target_gamma: float
    sources: Tuple[Tuple[str, str], ...]  # (path, profile key)
    coefficients: Tuple[float, ...]
    error: float  # the relative L2 error of the profiles' fit

    @property
    def target_std(self) -> float:
        return gamma_to_std(self.target_gamma)


def sound_std_range(snapshots: Sequence[Snapshot], step: Optional[int] = None,
                    max_error: float = MAX_ERROR) -> Tuple[float, float]:
    """The stds around the tracked ones that the snapshots (at or before ``step``) reconstruct with a
    relative profile error of at most ``max_error``: the interval a grid of 400 stds finds."""
    used = _used(snapshots, step if step is not None else max(s.step for s in snapshots))
    target = max(s.step for s in used)
    tracked = [gamma_to_std(g) for g in snapshots[0].gammas]
    grid = np.geomspace(1e-3, MAX_STD, 400)
    ok = [_fit(used, target, std_to_gamma(float(s)))[1] <= max_error for s in grid]
    # The contiguous run of sound stds that holds the tracked ones.
    anchor = int(np.argmin(np.abs(grid - min(tracked))))
    low = anchor
    while low > 0 and ok[low - 1]:
        low -= 1
    high = int(np.argmin(np.abs(grid - max(tracked))))
    while high < len(grid) - 1 and ok[high + 1]:
        high += 1
    return float(grid[low]), float(grid[high])


def _used(snapshots: Sequence[Snapshot], step: int) -> List[Snapshot]:
    return [s for s in snapshots if s.step <= step]


def _fit(used: Sequence[Snapshot], step: int, gamma: float) -> Tuple[List[float], float]:
    steps = [s.step for s in used for _ in s.gammas]
    gammas = [g for s in used for g in s.gammas]
    x, error = solve_coefficients(steps, gammas, step, gamma)
    return x.tolist(), error


def plan(snapshots: Sequence[Snapshot], std: Optional[float] = None, step: Optional[int] = None, *,
         gamma: Optional[float] = None, max_error: float = MAX_ERROR) -> Plan:
    """The coefficients that make the profile of ``std`` (or ``gamma``) at ``step`` (default: the last
    snapshot's) from the snapshots at or before that step, checked: the target must be within the
    snapshots' steps and representable (relative profile error <= ``max_error``)."""
    check_snapshots(snapshots)
    if (std is None) == (gamma is None):
        raise PostHocError("give the target as std (relative standard deviation) or gamma, one of them")
    if std is not None:
        check_number("std", std, above=0, maximum=MAX_STD, owner="reconstruct")
        gamma = std_to_gamma(std)
    else:
        check_number("gamma", gamma, above=-1, owner="reconstruct")
    last = max(s.step for s in snapshots)
    if step is None:
        step = last
    check_number("step", step, minimum=1, integer=True, owner="reconstruct")
    if step > last:
        raise PostHocError(f"step {step} is after the last snapshot's step {last}: the snapshots know nothing of "
                           "the weights after it")
    used = _used(snapshots, step)
    if not used:
        raise PostHocError(f"no snapshot at or before step {step} (the first is at step "
                           f"{min(s.step for s in snapshots)})")
    coefficients, error = _fit(used, step, gamma)
    if not math.isfinite(error) or error > max_error:
        low, high = sound_std_range(snapshots, step, max_error)
        raise PostHocError(
            f"std {gamma_to_std(gamma):.4g} cannot be reconstructed from these snapshots: the best combination of "
            f"the tracked profiles (stds {_stds(snapshots[0].gammas)}) misses it by {100 * error:.1f}% (relative L2 "
            f"error of the profiles, over the {100 * max_error:g}% allowed). The sound range here is "
            f"{low:.4g} to {high:.4g}; more snapshots widen it"
        )
    sources = tuple((s.path, profile_key(j)) for s in used for j in range(len(s.gammas)))
    return Plan(int(step), float(gamma), sources, tuple(coefficients), error)


def reconstruct(
    snapshot_paths: Sequence[PathLike],
    std: Optional[float] = None,
    step: Optional[int] = None,
    *,
    gamma: Optional[float] = None,
    max_error: float = MAX_ERROR,
    progress: bool = False,
) -> Dict[str, Tensor]:
    """The power-function EMA of relative std ``std`` (or exponent ``gamma``) at ``step`` (default:
    the last snapshot's), from ``PowerFunctionEMA`` snapshots: ``{state-dict key: tensor}`` on the
    CPU, in the snapshots' dtypes, which ``model.load_state_dict`` accepts (strictly when the
    profiles averaged the buffers too, ``use_buffers=True``, the default).

    The coefficients solve the least-squares problem in float64 (:func:`plan`); the snapshots at or
    before ``step`` are then summed with them one profile at a time, memory-mapped, into fp32
    accumulators (fp64 for fp64 entries): peak memory about the model twice (the accumulator and
    the profile being read). Integer tensors (``num_batches_tracked``) come from the last snapshot.

    Raises:
        PostHocError: no snapshots, a file that is not a snapshot, snapshots of different models or
            profiles, duplicate steps, a target step after the last snapshot or before the first, a
            std the snapshots cannot represent (the message gives the sound range). Nothing is
            written.
    """
    snapshots = [read_snapshot(p) for p in snapshot_paths]
    made = plan(snapshots, std, step, gamma=gamma, max_error=max_error)
    try:
        return average_checkpoints([path for path, _ in made.sources], key=[key for _, key in made.sources],
                                   weights=list(made.coefficients), signed=True, progress=progress,
                                   load=_load_mapped)
    except CheckpointError as error:
        raise PostHocError(str(error)) from error


__all__ = ["MAX_ERROR", "Plan", "PostHocError", "Snapshot", "check_snapshots", "plan", "read_snapshot",
           "reconstruct", "sound_std_range"]
