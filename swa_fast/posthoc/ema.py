"""``PowerFunctionEMA``: two (or more) power-function EMA profiles of a model, updated in one fused
pass, and their periodic snapshots, from which :func:`swa_fast.posthoc.reconstruct` makes the EMA
of any other length after training."""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn.modules.module import _IncompatibleKeys

from swa_fast._checks import check_number
from swa_fast.averaging import MultiAverage, WeightAverage
from swa_fast.averaging.average_set import Device
from swa_fast.averaging.sharding import is_dtensor
from swa_fast.averaging.slots import Include
from swa_fast.checkpoint_average import save_atomic
from swa_fast.posthoc.profiles import PowerProfile, gamma_to_std, std_to_gamma

#: The key of a snapshot's header; the profiles are ``profile_0``, ``profile_1``, ...
HEADER = "swa_fast.posthoc"
FORMAT_VERSION = 1
#: Two stds closer than this (relative) are the same profile.
STD_MATCH = 1e-6


def profile_key(index: int) -> str:
    return f"profile_{index}"


class PowerFunctionEMA:
    r"""Power-function EMA profiles of a model (EDM2's post-hoc EMA), updated together.

    Args:
        model: the model (plain, DDP, ``torch.compile``; FSDP2 shards too: a snapshot then gathers
            the full tensors, a collective every rank joins, and rank 0 writes the file).
        stds: the profiles' relative standard deviations (EDM2: 0.050 and 0.100), each in
            (0, 0.3]; or give ``gammas``, their exponents, instead.
        gammas: keyword-only; the exponents (> -1).
        use_buffers: keyword-only; average the buffers too (BatchNorm statistics; integer buffers are
            copied), so that a reconstructed checkpoint loads into the model strictly. Default True.
        avg_dtype, device, skip_nonfinite, include: keyword-only; as for :class:`~swa_fast.MultiAverage`
            (``avg_dtype=torch.float32`` for a bf16 model; ``device="cpu"`` keeps the profiles in host
            memory).

    Each :meth:`update` is one fused pass for every profile (each read of the model serves all of
    them), with each profile's weight ``1 - (1 - d / t)^(gamma + 1)`` computed on the device from the
    step ``t`` and the step ``t - d`` of its previous update: no host sync, updates every step or
    every few steps alike. :meth:`snapshot` writes the profiles at this step to a file; a tracked
    profile is :meth:`profile` (a :class:`~swa_fast.WeightAverage`: ``swapped_into``, ``copy_to``).
    """

    def __init__(
        self,
        model: Module,
        stds: Optional[Sequence[float]] = (0.050, 0.100),
        *,
        gammas: Optional[Sequence[float]] = None,
        use_buffers: bool = True,
        avg_dtype: Optional[torch.dtype] = None,
        device: Optional[Device] = None,
        skip_nonfinite: bool = False,
        include: Include = None,
    ) -> None:
        if gammas is not None:
            self.gammas = [float(check_number("gammas", g, above=-1, owner="PowerFunctionEMA")) for g in gammas]
        elif stds is not None:
            self.gammas = [std_to_gamma(float(check_number("stds", s, above=0, owner="PowerFunctionEMA")))
                           for s in stds]
        else:
            raise ValueError("PowerFunctionEMA: give stds (relative standard deviations) or gammas")
        if not self.gammas:
            raise ValueError("PowerFunctionEMA: no profiles: give at least one std (two to reconstruct others)")
        stds = [gamma_to_std(g) for g in self.gammas]
        for i, a in enumerate(stds):
            for b in stds[:i]:
                if math.isclose(a, b, rel_tol=STD_MATCH):
                    raise ValueError(f"PowerFunctionEMA: two profiles of the same std {a:.6g}: each must differ")
        self.stds = stds
        self._names = [f"std={s:.6g}" for s in stds]
        self._multi = MultiAverage(model, {name: PowerProfile(g) for name, g in zip(self._names, self.gammas)},
                                   use_buffers, avg_dtype=avg_dtype, device=device, skip_nonfinite=skip_nonfinite,
                                   include=include)
        self._last_host_step: Optional[int] = None

    # -- the profiles -------------------------------------------------------------------------

    @property
    def profiles(self) -> Dict[float, WeightAverage]:
        """``{std: that profile as a WeightAverage}`` in the order given."""
        return {std: self._multi[name] for std, name in zip(self.stds, self._names)}

    def profile(self, std: float) -> WeightAverage:
        """The tracked profile of relative std ``std`` (as given, or as computed from its gamma)."""
        for tracked, name in zip(self.stds, self._names):
            if math.isclose(tracked, std, rel_tol=STD_MATCH):
                return self._multi[name]
        raise KeyError(f"PowerFunctionEMA tracks no profile of std {std}; it tracks {[round(s, 6) for s in self.stds]} "
                       "(another std is reconstructed from snapshots: swa_fast.posthoc.reconstruct)")

    # -- updating --------------------------------------------------------------------------------

    def update(self, model: Module, step: Union[None, int, Tensor] = None) -> None:
        """Average ``model`` into every profile, one fused pass. ``step``: the number of training steps
        done so far (>= 1: the first step is 1), an int or a 0-dim integer tensor on the device; it
        must grow from update to update (checked when an int). Default: the previous step + 1."""
        if isinstance(step, numbers.Integral) and not isinstance(step, bool):
            if step < 1:
                raise ValueError(f"PowerFunctionEMA.update: step must be >= 1 (steps count from 1: the number of "
                                 f"training steps done), got {step}")
            if self._last_host_step is not None and step <= self._last_host_step:
                raise ValueError(f"PowerFunctionEMA.update: step {step} does not come after the previous update's "
                                 f"step {self._last_host_step}")
            self._last_host_step = int(step)
        self._multi.update(model, step)

    def synchronize(self) -> None:
        self._multi.synchronize()

    def order_writes(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        self._multi.order_writes(stream)

    def close(self) -> None:
        self._multi.close()

    @property
    def step(self) -> int:
        """The step of the last update (0 before any): a host read of a device count."""
        return int(self._multi[self._names[0]].last_step.item())

    # -- snapshots ----------------------------------------------------------------------------------

    def snapshot_state(self) -> Dict[str, Any]:
        """What :meth:`snapshot` writes: a header (format, step, gammas, stds, the state-dict keys) and
        each profile's averages on the CPU under the model's ``state_dict`` keys."""
        step = self.step
        if step < 1:
            raise RuntimeError("PowerFunctionEMA.snapshot: no update yet: a snapshot holds the profiles at a step")
        state: Dict[str, Any] = {}
        for index, name in enumerate(self._names):
            averages = self._multi[name].module_state_dict()
            state[profile_key(index)] = {key: _host_copy(value) for key, value in averages.items()}
        state[HEADER] = {"version": FORMAT_VERSION, "step": step, "gammas": list(self.gammas), "stds": list(self.stds),
                         "keys": list(state[profile_key(0)])}
        return state

    def snapshot(self, path: Union[str, os.PathLike]) -> Optional[Path]:
        """Write the profiles at this step to ``path`` (atomically: a reader never sees half a file);
        returns the path, or None on the ranks other than 0 of a sharded model (which gather, but do
        not write). Costs a copy of the profiles to host memory and the write."""
        state = self.snapshot_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and _sharded(self):
            if torch.distributed.get_rank() != 0:
                return None
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(state, target)
        return target

    # -- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """The profiles (with their counts and last steps) and their gammas: resumes exactly."""
        return {"gammas": list(self.gammas), "profiles": self._multi.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> _IncompatibleKeys:
        """Load what :meth:`state_dict` saved, by a ``PowerFunctionEMA`` of the same profiles (checked
        whole before anything is written)."""
        if not isinstance(state_dict, Mapping) or "profiles" not in state_dict or "gammas" not in state_dict:
            raise TypeError("PowerFunctionEMA.load_state_dict: expected {'gammas': [...], 'profiles': {...}}, as "
                            "PowerFunctionEMA.state_dict() returns")
        saved = [float(g) for g in state_dict["gammas"]]
        if len(saved) != len(self.gammas) or not all(math.isclose(a, b, rel_tol=1e-12) for a, b in
                                                       zip(saved, self.gammas)):
            raise ValueError(f"PowerFunctionEMA.load_state_dict: the state holds profiles of gammas {saved}, this "
                             f"PowerFunctionEMA {self.gammas}")
        keys = self._multi.load_state_dict(state_dict["profiles"], strict)
        self._last_host_step = self.step or None
        return keys

    def __repr__(self) -> str:
        return f"PowerFunctionEMA(stds={[round(s, 6) for s in self.stds]}, gammas={[round(g, 6) for g in self.gammas]})"


def _host_copy(value: Tensor) -> Tensor:
    """A CPU copy of a profile tensor (the full tensor of a shard: a collective)."""
    if is_dtensor(value):
        value = value.full_tensor()
    return value.detach().to("cpu", copy=True)


def _sharded(ema: PowerFunctionEMA) -> bool:
    return any(is_dtensor(t) for t in ema._multi[ema._names[0]].state_dict()["averages"].values())


__all__ = ["PowerFunctionEMA", "HEADER", "FORMAT_VERSION", "profile_key"]
