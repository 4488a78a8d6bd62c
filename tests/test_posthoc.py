"""Post-hoc EMA (swa_fast.posthoc): the profile mathematics, the fused recursion against a float64
reference of the paper's formula, exact resume, reconstruction (a tracked std at the last
snapshot; a trajectory whose power-function EMA is known in closed form for any std, within a
derived bound), the checks that refuse what cannot be reconstructed, and the CLI.

Notation: a profile of exponent g updated at steps s_1 < s_2 < ... < s_n = t holds
sum_i (s_i^(g+1) - s_(i-1)^(g+1)) / t^(g+1) * w_i (s_0 = 0): the weights of the recursion
avg = lerp(avg, w, 1 - (1 - (s_i - s_(i-1)) / s_i)^(g+1)) multiplied out.
"""

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from swa_fast.posthoc import (
    MAX_STD,
    PostHocError,
    PowerFunctionEMA,
    gamma_to_std,
    plan,
    profile_dot,
    read_snapshot,
    reconstruct,
    std_to_gamma,
)

from helpers import ROOT

EPS32 = torch.finfo(torch.float32).eps


# --- the profile mathematics -----------------------------------------------------------------------


def test_std_and_gamma_are_inverse_and_match_edm2():
    # EDM2's published pairs (its phema.py default profiles).
    assert std_to_gamma(0.050) == pytest.approx(16.97, abs=0.01)
    assert std_to_gamma(0.100) == pytest.approx(6.94, abs=0.01)
    for std in (0.001, 0.01, 0.05, 0.07, 0.1, 0.2, 0.29, MAX_STD):
        assert gamma_to_std(std_to_gamma(std)) == pytest.approx(std, rel=1e-12)
    assert MAX_STD == pytest.approx(0.3003, abs=1e-4)
    for bad in (0.0, -0.1, 0.31, float("nan")):
        with pytest.raises(ValueError, match="std must be"):
            std_to_gamma(bad)


def test_profile_dot_is_the_integral_of_the_product():
    """Against a midpoint-rule quadrature of the two densities (p = (g+1) tau^g / t^(g+1) on [0, t])."""
    def density(tau, t, g):
        return torch.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), torch.zeros_like(tau))

    for (t_a, g_a, t_b, g_b) in ((100.0, 6.9, 70.0, 16.97), (50.0, 2.0, 50.0, 2.0), (10.0, 0.5, 30.0, 9.0)):
        n = 400_000
        tau = (torch.arange(n, dtype=torch.float64) + 0.5) * (max(t_a, t_b) / n)
        numeric = (density(tau, t_a, g_a) * density(tau, t_b, g_b)).sum() * (max(t_a, t_b) / n)
        exact = profile_dot(*(torch.tensor(v, dtype=torch.float64) for v in (t_a, g_a, t_b, g_b)))
        assert exact.item() == pytest.approx(numeric.item(), rel=1e-4)


# --- the fused recursion -----------------------------------------------------------------------------


def trajectory(steps, dtype=torch.float32, seed=0):
    """The weights of a small model at each step (random walks), as a list of state dicts."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)
    states = []
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, states


def reference_profile(states, update_steps, gamma):
    """The paper's formula in float64: sum_i (s_i^(g+1) - s_(i-1)^(g+1)) / t^(g+1) * w(s_i)."""
    t = update_steps[-1]
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in states[0].items()}
    previous = 0
    for s in update_steps:
        share = (s ** (gamma + 1) - previous ** (gamma + 1)) / t ** (gamma + 1)
        for k, v in states[s - 1].items():
            total[k] += share * v.double()
        previous = s
    return total


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_recursion_equals_the_papers_formula(every, dtype):
    """Every step, or every third step (the update then takes the whole interval's share). Tolerance:
    each of the n lerps rounds once in the averages' dtype (at most an ulp of the largest |w|), and
    the profile sums shares of at most 1, so the error stays below 2 n eps max|w|."""
    model, states = trajectory(60, dtype)
    ema = PowerFunctionEMA(model, stds=(0.05, 0.10))
    update_steps = list(range(every, 61, every))
    for s in update_steps:
        model.load_state_dict(states[s - 1])
        ema.update(model, s)
    largest = max(v.abs().max().item() for v in states[-1].values())
    eps = torch.finfo(dtype).eps
    for std, profile in ema.profiles.items():
        expected = reference_profile(states, update_steps, std_to_gamma(std))
        got = profile.module_state_dict()
        for key, value in expected.items():
            bound = 2 * len(update_steps) * eps * max(largest, 1.0)
            assert (got[key].double() - value).abs().max().item() <= bound, (std, key)
    assert ema.step == 60


def test_updates_without_a_step_count_one_step_each():
    model, states = trajectory(10)
    counted, stepped = PowerFunctionEMA(model), PowerFunctionEMA(model)
    for s, state in enumerate(states, start=1):
        model.load_state_dict(state)
        counted.update(model)
        stepped.update(model, s)
    for std in counted.stds:
        a, b = counted.profile(std).module_state_dict(), stepped.profile(std).module_state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert counted.step == 10


def test_state_dict_resumes_exactly():
    model, states = trajectory(20)
    whole, first = PowerFunctionEMA(model), PowerFunctionEMA(model)
    for s, state in enumerate(states[:12], start=1):
        model.load_state_dict(state)
        whole.update(model, s)
        first.update(model, s)
    resumed = PowerFunctionEMA(model)
    resumed.load_state_dict(first.state_dict())
    for s, state in enumerate(states[12:], start=13):
        model.load_state_dict(state)
        whole.update(model, s)
        resumed.update(model, s)
    for std in whole.stds:
        a, b = whole.profile(std).module_state_dict(), resumed.profile(std).module_state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="profiles of gammas"):
        PowerFunctionEMA(model, stds=(0.05, 0.2)).load_state_dict(first.state_dict())


def test_bad_steps_and_profiles():
    model = nn.Linear(2, 2)
    ema = PowerFunctionEMA(model)
    with pytest.raises(RuntimeError, match="no update yet"):
        ema.snapshot_state()
    with pytest.raises(ValueError, match=r"step must be >= 1 \(steps count from 1"):
        ema.update(model, 0)
    ema.update(model, 5)
    with pytest.raises(ValueError, match="step 5 does not come after the previous update's step 5"):
        ema.update(model, 5)
    with pytest.raises(ValueError, match="two profiles of the same std"):
        PowerFunctionEMA(model, stds=(0.05, 0.05))
    with pytest.raises(ValueError, match="std must be"):
        PowerFunctionEMA(model, stds=(0.05, 0.4))
    with pytest.raises(KeyError, match=r"tracks no profile of std 0.07; it tracks \[0.05, 0.1\]"):
        ema.profile(0.07)
    assert PowerFunctionEMA(model, gammas=(6.94, 16.97)).stds[0] == pytest.approx(0.1, abs=1e-4)


# --- reconstruction ----------------------------------------------------------------------------------


def snapshots_of(model, states, folder, every, stds=(0.05, 0.10), update_every=1):
    ema = PowerFunctionEMA(model, stds=stds)
    paths = []
    for s, state in enumerate(states, start=1):
        if s % update_every:
            continue
        model.load_state_dict(state)
        ema.update(model, s)
        if s % every == 0:
            paths.append(ema.snapshot(folder / f"ema-{s:05d}.pt"))
    return ema, paths


def test_a_tracked_std_at_the_last_snapshot_is_the_tracked_profile(tmp_path):
    """The target is in the span (it is one of the profiles), so the solve gives coefficient 1 there
    and, up to the conditioning of the Gram matrix, 0 elsewhere: the sum is the tracked profile
    plus sum_{others} |x_k| max|w| plus the fp32 additions (n eps max|w| sum |x|)."""
    model, states = trajectory(100)
    ema, paths = snapshots_of(model, states, tmp_path, every=10)
    snapshots = [read_snapshot(p) for p in paths]
    for std in ema.stds:
        made = plan(snapshots, std)
        x = torch.tensor(made.coefficients)
        largest = max(v.abs().max().item() for v in states[-1].values())
        own = [i for i, (path, key) in enumerate(made.sources)
               if path == str(paths[-1]) and key == f"profile_{ema.stds.index(std)}"][0]
        others = x.abs().sum().item() - abs(x[own].item())
        bound = others * largest + len(x) * EPS32 * largest * x.abs().sum().item()
        assert abs(x[own].item() - 1) < 1e-9 and others < 1e-8
        got = reconstruct(paths, std)
        tracked = ema.profile(std).module_state_dict()
        for key in tracked:
            assert (got[key] - tracked[key]).abs().max().item() <= bound, key


def step_trajectory(steps, jumps, seed=0):
    """w(s) = c_0 + sum_k c_k [s <= s_k]: constant between updates, so its discrete power-function EMA
    at t is exactly c_0 + sum_k c_k (min(s_k, t) / t)^(g+1) for any g."""
    generator = torch.Generator().manual_seed(seed)
    c0 = torch.randn(6, generator=generator, dtype=torch.float64)
    cs = [torch.randn(6, generator=generator, dtype=torch.float64) for _ in jumps]

    def weights(s):
        return c0 + sum(c for c, s_k in zip(cs, jumps) if s <= s_k)

    def exact(t, gamma):
        return c0 + sum(c * (min(s_k, t) / t) ** (gamma + 1) for c, s_k in zip(cs, jumps))

    return weights, exact


def test_a_closed_form_trajectory_reconstructs_within_the_derived_bound(tmp_path):
    """Two profiles (stds 0.05, 0.10) x 20 snapshots; targets from 0.04 to 0.2 at the last step and
    at an earlier one. The reconstruction misses the exact EMA by
        |<p - sum x_j p_j, w>| <= ||p - sum x_j p_j||_2 ||w||_2        (Cauchy-Schwarz)
    per element: the first factor is the plan's relative error times ||p||_2 = (g+1)/sqrt((2g+1) t),
    the second sqrt(sum_s w(s)^2) (w constant on each (s-1, s]); plus the fp32 rounding of the
    tracked profiles and of the sum: (2 n_updates + n_terms) eps max|w| sum|x_j|."""
    steps, jumps = 400, (37, 150, 290, 333)
    weights, exact = step_trajectory(steps, jumps)
    model = nn.Linear(6, 1, bias=False)
    ema = PowerFunctionEMA(model, stds=(0.05, 0.10))
    paths = []
    for s in range(1, steps + 1):
        with torch.no_grad():
            model.weight.copy_(weights(s).float()[None])
        ema.update(model, s)
        if s % 20 == 0:
            paths.append(ema.snapshot(tmp_path / f"ema-{s:05d}.pt"))
    snapshots = [read_snapshot(p) for p in paths]
    w_l2 = torch.stack([weights(s) for s in range(1, steps + 1)]).square().sum(0).sqrt()
    largest = max(weights(s).abs().max().item() for s in range(1, steps + 1))
    for t in (400, 260):
        for std in (0.04, 0.05, 0.07, 0.12, 0.2):
            made = plan(snapshots, std, t)
            gamma = made.target_gamma
            p_l2 = (gamma + 1) / math.sqrt((2 * gamma + 1) * t)
            x_sum = sum(abs(x) for x in made.coefficients)
            float_part = (2 * t + len(made.coefficients)) * EPS32 * largest * x_sum
            bound = made.error * p_l2 * w_l2 + float_part
            got = reconstruct(paths, std, t)["weight"][0].double()
            miss = (got - exact(t, gamma)).abs()
            assert bool((miss <= bound).all()), (t, std, miss.max().item(), bound.min().item())
            assert miss.max().item() < 0.05 * largest  # and the bound is not vacuous here


def test_an_earlier_step_uses_the_snapshots_up_to_it(tmp_path):
    model, states = trajectory(60)
    _, paths = snapshots_of(model, states, tmp_path, every=10)
    early = reconstruct(paths, 0.07, 30)
    only = reconstruct(paths[:3], 0.07)
    assert all(torch.equal(early[k], only[k]) for k in early)


def test_what_cannot_be_reconstructed_is_refused(tmp_path):
    model, states = trajectory(60)
    _, paths = snapshots_of(model, states, tmp_path / "a", every=10)
    other_model = nn.Linear(3, 3)
    other = PowerFunctionEMA(other_model)
    other.update(other_model, 10)
    alien = other.snapshot(tmp_path / "other.pt")
    _, different_profiles = snapshots_of(model, states[:20], tmp_path / "b", every=10, stds=(0.05, 0.2))
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.pt")
    cases = [
        ([], None, None, "no snapshots"),
        (paths + [alien], 0.07, None, "hold different models"),
        (paths + different_profiles[1:], 0.07, None, "snapshots of different PowerFunctionEMAs"),
        (paths + [paths[0]], 0.07, None, "are both of step 10"),
        (paths, 0.005, None, r"misses it by .*The sound range here is 0\.0\d+ to 0\.\d+"),
        (paths, 0.07, 61, "step 61 is after the last snapshot's step 60"),
        (paths, 0.07, 5, "no snapshot at or before step 5"),
        (paths, 0.5, None, "std must be"),
        ([tmp_path / "plain.pt"], 0.07, None, "not a PowerFunctionEMA snapshot"),
    ]
    for files, std, step, match in cases:
        with pytest.raises((PostHocError, ValueError), match=match):
            reconstruct(files, std, step)


# --- the command line -------------------------------------------------------------------------------


def posthoc_cli(*args):
    return subprocess.run([sys.executable, "-m", "swa_fast", "posthoc-ema", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_cli_writes_checkpoints_the_model_loads(tmp_path):
    model, states = trajectory(40)
    _, paths = snapshots_of(model, states, tmp_path / "snaps", every=10)
    out = tmp_path / "ema-0.07.pt"
    done = posthoc_cli(*paths, "--std", 0.07, "-o", out)
    assert done.returncode == 0, done.stderr
    state = torch.load(out, weights_only=True)
    expected = reconstruct(paths, 0.07)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    model.load_state_dict(state)  # strict
    folder = tmp_path / "sweep"
    done = posthoc_cli(*paths, "--sweep", "0.06:0.1:5", "-o", folder)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in folder.iterdir()) == [f"ema-std{s:.4f}.pt" for s in (0.06, 0.07, 0.08, 0.09, 0.1)]


def test_cli_checks_every_target_before_writing_any(tmp_path):
    model, states = trajectory(40)
    _, paths = snapshots_of(model, states, tmp_path / "snaps", every=10)
    folder = tmp_path / "sweep"
    done = posthoc_cli(*paths, "--sweep", "0.001:0.07:3", "-o", folder)
    assert done.returncode == 1 and "cannot be reconstructed" in done.stderr and "sound range" in done.stderr
    assert not folder.exists()
    done = posthoc_cli(*paths, "--sweep", "0.2:0.1:3", "-o", folder)
    assert done.returncode != 0 and "LOW <= HIGH" in done.stderr
