"""The mathematics of power-function EMA profiles (Karras et al., "Analyzing and Improving the
Training Dynamics of Diffusion Models", CVPR 2024, section 3 and appendix C).

A power-function EMA of exponent ``gamma`` averages the weights seen up to step ``t`` with the
density ``p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``[0, t]``: recent weights count
more, and the profile's shape is the same at every ``t`` (its relative width does not shrink as
training goes on, as an exponential EMA's does). Its relative standard deviation (width over
``t``) is ``sigma_rel = sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3))``.

Updated at step ``t`` after the previous update at step ``t - d``, the average is
``avg = lerp(avg, w, 1 - (1 - d / t)^(gamma + 1))``: the new weights take exactly the mass the
profile gives to ``(t - d, t]``. Summed up, the weights ``w_i`` of updates at steps ``s_i`` enter
with ``(s_i^(gamma + 1) - s_(i-1)^(gamma + 1)) / t^(gamma + 1)``: the discrete average equals the
continuous profile's integral over any trajectory that is constant between updates.

Any other profile (another ``gamma``, another ``t``) is then approximated by a linear combination
of stored profiles (snapshots of two tracked EMAs at several steps): the coefficients solve the
least-squares problem in L2([0, inf)), whose normal equations need only the inner products of
two profiles, in closed form (:func:`profile_dot`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from swa_fast._checks import check_number
from swa_fast.averaging.schedules import FusedMultiAvgFn


def gamma_to_std(gamma: float) -> float:
    """The relative standard deviation of the profile of exponent ``gamma`` (> -1)."""
    check_number("gamma", gamma, above=-1)
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


# d log(sigma_rel) / d gamma = 1 / (2 (g + 1)) - 1 / (g + 2) - 1 / (2 (g + 3)) vanishes where
# (g + 2)(g + 3) - 2 (g + 1)(g + 3) - (g + 1)(g + 2) = -2 (g^2 + 3 g + 1) = 0: the widest profile.
WIDEST_GAMMA = (math.sqrt(5) - 3) / 2
#: The largest relative std a power-function profile has (0.3003, at gamma = -0.382).
MAX_STD = gamma_to_std(WIDEST_GAMMA)


def std_to_gamma(std: float) -> float:
    """The exponent of the profile of relative standard deviation ``std``, in (0, :data:`MAX_STD`].

    ``std^2 = (g + 1) / ((g + 2)^2 (g + 3))`` is the cubic ``g^3 + 7 g^2 + (16 - s) g + (12 - s) = 0``
    with ``s = 1 / std^2``; of its real roots the one on the narrowing branch (the largest, at least
    :data:`WIDEST_GAMMA`) is the profile.
    """
    check_number("std", std, above=0, maximum=MAX_STD)
    s = std ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    gamma = float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real))))
    gamma = max(gamma, WIDEST_GAMMA)
    # One Newton step on the exact relation polishes the root numpy's eigenvalue solver found.
    f = gamma_to_std(gamma) - std
    h = 1e-7 * max(1.0, abs(gamma))
    slope = (gamma_to_std(gamma + h) - gamma_to_std(gamma - h)) / (2 * h)
    if slope != 0 and gamma - f / slope > WIDEST_GAMMA:
        gamma -= f / slope
    return gamma


class PowerProfile(FusedMultiAvgFn):
    """The power-function EMA of exponent ``gamma`` as a fused averaging function: the weight of
    an update at step ``t`` after one at step ``t0`` is ``1 - (1 - (t - t0) / t)^(gamma + 1)``,
    computed on the device (float64) from the step and the member's last step. Without a step the
    update counts as the next one (``t0 + 1``)."""

    uses_last_step = True

    def __init__(self, gamma: float) -> None:
        self.gamma = float(check_number("gamma", gamma, above=-1, owner="PowerProfile"))

    @property
    def std(self) -> float:
        return gamma_to_std(self.gamma)

    def weight(self, num_averaged: Tensor, step: Optional[Tensor] = None,
               last_step: Optional[Tensor] = None) -> Tensor:
        t = step.to(torch.float64)
        previous = torch.zeros_like(t) if last_step is None else last_step.to(torch.float64)
        # (1 - d / t) with d = t - t0, as EDM2 writes it: for d = 1 the very float of (1 - 1 / t).
        beta = (1 - (t - previous) / t).pow(self.gamma + 1)
        return 1 - beta

    def __repr__(self) -> str:
        return f"PowerProfile(gamma={self.gamma:.6g}, std={self.std:.6g})"


def profile_dot(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """``integral of p_a(tau) p_b(tau) dtau`` of the profiles (``t_a``, ``gamma_a``) and (``t_b``,
    ``gamma_b``), broadcast, in float64: ``(g_a + 1)(g_b + 1) / (g_a + g_b + 1) * m^(g_a + g_b + 1) /
    (t_a^(g_a + 1) t_b^(g_b + 1))`` with ``m = min(t_a, t_b)``, evaluated through logarithms (the
    powers of large steps overflow on their own)."""
    t_a, gamma_a, t_b, gamma_b = (x.to(torch.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    m = torch.minimum(t_a, t_b)
    log_value = (gamma_a + gamma_b + 1) * m.log() - (gamma_a + 1) * t_a.log() - (gamma_b + 1) * t_b.log()
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * log_value.exp()


def solve_coefficients(steps: Sequence[float], gammas: Sequence[float], target_step: float,
                       target_gamma: float) -> Tuple[Tensor, float]:
    """The coefficients ``x`` that make ``sum_j x_j p_j`` the least-squares best approximation of the
    target profile, for stored profiles ``j`` of exponent ``gammas[j]`` at ``steps[j]``, and the
    relative L2 error of that approximation, ``||p - sum x_j p_j|| / ||p||`` (float64, on the CPU).

    The normal equations ``A x = b`` with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p>``; ``A`` is a Gram
    matrix of distinct profiles, positive definite, solved by Cholesky (least squares, should
    rounding make it singular). The residual is ``<p, p> - x . b``.
    """
    t = torch.tensor(list(steps), dtype=torch.float64)
    g = torch.tensor(list(gammas), dtype=torch.float64)
    t_r = torch.tensor([float(target_step)], dtype=torch.float64)
    g_r = torch.tensor([float(target_gamma)], dtype=torch.float64)
    gram = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_dot(t[:, None], g[:, None], t_r[None, :], g_r[None, :])
    try:
        x = torch.cholesky_solve(b, torch.linalg.cholesky(gram))
    except RuntimeError:  # numerically singular: the minimum-norm least-squares solution
        x = torch.linalg.lstsq(gram, b, driver="gelsd").solution
    target = profile_dot(t_r, g_r, t_r, g_r).item()
    residual = max(0.0, target - float((x[:, 0] * b[:, 0]).sum()))
    return x[:, 0], math.sqrt(residual / target)
