"""Post-hoc EMA (Karras et al., CVPR 2024; EDM2's ``phema.py``): track two power-function EMA
profiles while training, snapshot them, and afterwards reconstruct the EMA of any length.

::

    from swa_fast.posthoc import PowerFunctionEMA, reconstruct
    ema = PowerFunctionEMA(model, stds=(0.050, 0.100))
    for step in range(1, steps + 1):
        train_step()
        ema.update(model, step)                       # both profiles, one fused pass, no host sync
        if step % 1000 == 0:
            ema.snapshot(f"snapshots/ema-{step:07d}.pt")
    state = reconstruct(sorted(Path("snapshots").glob("*.pt")), std=0.07)
    model.load_state_dict(state)

``python -m swa_fast posthoc-ema snapshots/*.pt --std 0.07 -o ema-0.07.pt`` does the same from a shell.
"""

from swa_fast.posthoc.ema import PowerFunctionEMA
from swa_fast.posthoc.profiles import MAX_STD, PowerProfile, gamma_to_std, profile_dot, solve_coefficients, std_to_gamma
from swa_fast.posthoc.reconstruct import PostHocError, plan, read_snapshot, reconstruct, sound_std_range

__all__ = [
    "MAX_STD",
    "PostHocError",
    "PowerFunctionEMA",
    "PowerProfile",
    "gamma_to_std",
    "plan",
    "profile_dot",
    "read_snapshot",
    "reconstruct",
    "solve_coefficients",
    "sound_std_range",
    "std_to_gamma",
]
