"""The weight-averaging suite: torch.optim.swa_utils and torch._foreach_* vs swa_fast.

Per case (a parameter set from :mod:`benchmarks.cases`), in one process, every
candidate runs on the same model:

* ``torch_swa``: ``torch.optim.swa_utils.AveragedModel(model).update_parameters(model)``
  (default SWA; on the CPU torch falls back to a per-parameter add/sub/div loop,
  on CUDA it uses ``_foreach`` ops).
* ``torch_ema``: the same with ``multi_avg_fn=get_ema_multi_avg_fn(0.999)``.
* ``torch_foreach_lerp``: the raw ``torch._foreach_lerp_(averaged, current, 0.001)``.
* ``swa_fast_swa`` / ``swa_fast_ema``: ``swa_fast.swa_utils.AveragedModel`` with the
  same settings.
* ``swa_fast_average_``: the raw op ``swa_fast.average_(averaged, current, weight)``.
* ``copy``: ``dst.copy_(src)`` of a buffer the size of the averaged set.

Both AveragedModels have done their first update (the copy) before any timing,
so the timings are of steady-state averaging updates.

Effective GB/s counts the bytes an averaging update must move,
``2 * averaged_bytes + current_bytes`` (read and write the average, read the
model); the copy moves ``2 * buffer_bytes``.
"""

from __future__ import annotations

from typing import List

import torch
from torch.optim import swa_utils as torch_swa_utils

import swa_fast
from swa_fast import swa_utils as fast_swa_utils
from swa_fast.ops.average import weight_tensor

from benchmarks.cases import CASES, Case, make_model
from benchmarks.harness import Candidate, case_facts, copy_candidate, dtype_name

__all__ = ["CASES", "SPEEDUPS", "build_candidates", "describe", "header_lines"]

EMA_DECAY = 0.999

# (speedup name, candidate, baseline); a pair is reported when both ran.
SPEEDUPS = [
    ("swa_fast SWA vs torch SWA", "swa_fast_swa", "torch_swa"),
    ("swa_fast EMA vs torch EMA", "swa_fast_ema", "torch_ema"),
    ("average_ vs _foreach_lerp_", "swa_fast_average_", "torch_foreach_lerp"),
    ("average_ vs _foreach_lerp_(avg32, [x.to(float32)])", "swa_fast_average_", "torch_foreach_lerp_cast"),
]


def _torch_swa_path(device: torch.device) -> str:
    supported = torch_swa_utils._get_foreach_kernels_supported_devices()
    return "_foreach ops" if device.type in supported else "per-param add/sub/div"


def build_candidates(case: Case, device, *, seed: int = 0) -> List[Candidate]:
    """Every candidate for ``case`` on ``device``, set up and past its first (copy) update."""
    device = torch.device(device)
    model = make_model(case, device, seed=seed)
    params = [p.detach() for p in model.parameters()]
    avg_dtype = case.averaged_dtype
    mixed = avg_dtype != case.dtype
    model_dt, avg_dt = dtype_name(case.dtype), dtype_name(avg_dtype)
    same_dtype_bytes = 3 * case.model_bytes  # averages in the model's dtype (torch)
    fast_bytes = 2 * case.averaged_bytes + case.model_bytes
    candidates: List[Candidate] = []

    def averaged_model(cls, **kwargs):
        averaged = cls(model, **kwargs)
        averaged.update_parameters(model)  # the first update copies: do it before timing
        assert int(averaged.n_averaged) == 1
        return averaged

    torch_suffix = f" [{model_dt} avg]" if mixed else ""
    torch_swa = averaged_model(torch_swa_utils.AveragedModel)
    candidates.append(
        Candidate(
            "torch_swa",
            f"torch AveragedModel SWA ({_torch_swa_path(device)}){torch_suffix}",
            lambda: torch_swa.update_parameters(model),
            same_dtype_bytes,
            "torch",
        )
    )
    torch_ema = averaged_model(
        torch_swa_utils.AveragedModel, multi_avg_fn=torch_swa_utils.get_ema_multi_avg_fn(EMA_DECAY)
    )
    candidates.append(
        Candidate(
            "torch_ema",
            f"torch AveragedModel EMA (_foreach_lerp_){torch_suffix}",
            lambda: torch_ema.update_parameters(model),
            same_dtype_bytes,
            "torch",
        )
    )
    foreach_avg = [p.clone() for p in params]
    candidates.append(
        Candidate(
            "torch_foreach_lerp",
            f"torch._foreach_lerp_(avg, cur, 1e-3){torch_suffix}",
            lambda: torch._foreach_lerp_(foreach_avg, params, 1 - EMA_DECAY),
            same_dtype_bytes,
            "torch",
        )
    )
    if mixed:
        cast_avg = [p.to(avg_dtype, copy=True) for p in params]
        candidates.append(
            Candidate(
                "torch_foreach_lerp_cast",
                f"torch._foreach_lerp_({avg_dt} avg, [x.to({avg_dt})], 1e-3)",
                lambda: torch._foreach_lerp_(cast_avg, [p.to(avg_dtype) for p in params], 1 - EMA_DECAY),
                fast_bytes,
                "torch",
            )
        )

    fast_kwargs = {"avg_dtype": avg_dtype} if mixed else {}
    fast_suffix = f" [{avg_dt} avg]" if mixed else ""
    fast_swa = averaged_model(fast_swa_utils.AveragedModel, **fast_kwargs)
    candidates.append(
        Candidate(
            "swa_fast_swa",
            f"swa_fast AveragedModel SWA{fast_suffix}",
            lambda: fast_swa.update_parameters(model),
            fast_bytes,
            "swa_fast",
        )
    )
    fast_ema = averaged_model(
        fast_swa_utils.AveragedModel, multi_avg_fn=fast_swa_utils.get_ema_multi_avg_fn(EMA_DECAY), **fast_kwargs
    )
    candidates.append(
        Candidate(
            "swa_fast_ema",
            f"swa_fast AveragedModel EMA{fast_suffix}",
            lambda: fast_ema.update_parameters(model),
            fast_bytes,
            "swa_fast",
        )
    )
    raw_avg = [p.to(avg_dtype, copy=True) for p in params]
    weight = weight_tensor(1 - EMA_DECAY, device)
    candidates.append(
        Candidate(
            "swa_fast_average_",
            f"swa_fast.average_(avg, cur, w=1e-3){fast_suffix}",
            lambda: swa_fast.average_(raw_avg, params, weight),
            fast_bytes,
            "swa_fast",
        )
    )

    candidates.append(copy_candidate(case.averaged_bytes, device))

    # Move the model away from the averages it was copied into, so the updates
    # average values that differ (as in training); values stay O(0.02).
    with torch.no_grad():
        torch._foreach_add_(params, 0.01)
    return candidates



def describe(case: Case) -> dict:
    """The case's facts stored beside its timings in the JSON."""
    return case_facts(case, averaged_bytes=case.averaged_bytes, ema_decay=EMA_DECAY)


def header_lines(case: Case, device_label: str) -> List[str]:
    mb = 1e6
    return [
        f"== {case.name}: {case.note}",
        f"   {case.num_tensors} tensors, {case.num_params:,} parameters; model "
        f"{case.model_bytes / mb:.1f} MB {dtype_name(case.dtype)}, averages "
        f"{case.averaged_bytes / mb:.1f} MB {dtype_name(case.averaged_dtype)}; {device_label}",
    ]
