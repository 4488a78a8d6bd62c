"""Peer check of swa_fast.posthoc against lucidrains' ema-pytorch (``PostHocEMA``, 0.8.3, a development
dependency) on one recorded trajectory: the same two profiles, the same snapshot steps, the same
target std.

One difference is a convention, not arithmetic: ema-pytorch increments its step before computing
beta = (1 - 1/(step + 1))^(1 + gamma), so after n updates its profile is the power function at
t = n + 1 (the first weights cover [0, 2], the i-th (i, i + 1]), while its checkpoint is labelled n.
swa_fast's step is the number of training steps done (EDM2's t after the step): the first update
covers [0, 1]. Fed steps n + 1, swa_fast's profiles are ema-pytorch's; its reconstruction then uses
the true t = n + 1 where ema-pytorch solves with the labels n, so below the comparison of the
combination uses ema-pytorch's labels, and the effect of the label is measured separately.

Where the two differ otherwise, and why they still agree to float32 rounding:
- the tracked profiles: ema-pytorch computes beta = (1 - 1/t)^(1 + gamma) in Python doubles and lerps
  with the float weight 1 - beta, one parameter at a time; swa_fast computes the same expression in
  float64 on the device and lerps all parameters in one fused pass. The weights can differ in their
  last float64 bits (pow implementations), which after rounding to float32 changes at most a rare
  ulp per update;
- gamma from sigma_rel: both take the largest real root of the same cubic (numpy.roots); swa_fast
  polishes it with a Newton step (differences ~1e-15 relative);
- the coefficients: torch.linalg.solve (LU) against Cholesky on the same float64 Gram matrix;
- the sum: ema-pytorch adds ``checkpoint * weight`` (two float32 roundings per term), swa_fast adds
  ``weight * checkpoint`` into the accumulator with ``add_(alpha=...)``.
So per element |ours - theirs| <= sum_j |x_j| * (2 n_updates + 4 n_terms) * eps32 * max|w|.
"""

import pytest
import torch
from torch import nn

from swa_fast.checkpoint_average import average_checkpoints
from swa_fast.posthoc import PowerFunctionEMA, read_snapshot, reconstruct, solve_coefficients, std_to_gamma

ema_pytorch = pytest.importorskip("ema_pytorch")

STEPS, EVERY, STDS = 120, 10, (0.05, 0.10)


def test_reconstruction_agrees_with_ema_pytorch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    theirs = ema_pytorch.PostHocEMA(model, sigma_rels=STDS, update_every=1, checkpoint_every_num_steps=EVERY,
                                    checkpoint_folder=str(tmp_path / "theirs"), checkpoint_dtype=torch.float32)
    ours = PowerFunctionEMA(model, stds=STDS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    paths, largest = [], 0.0
    for step in range(1, STEPS + 1):
        x = torch.randn(32, 6, generator=generator)
        loss = (model(x) - x[:, :3]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        largest = max(largest, max(p.abs().max().item() for p in model.parameters()))
        theirs.update()
        ours.update(model, step + 1)  # ema-pytorch's profile after `step` updates is the one at t = step + 1
        if step % EVERY == 0:
            paths.append(ours.snapshot(tmp_path / "ours" / f"ema-{step:05d}.pt"))
    eps = torch.finfo(torch.float32).eps

    # The tracked profiles: the same recursion, up to float32 rounding of the weights.
    for index, std in enumerate(STDS):
        tracked = ours.profile(std).module_state_dict()
        peer = peer_state(theirs.ema_models[index])
        for key, value in tracked.items():
            assert (value - peer[key]).abs().max().item() <= 2 * STEPS * eps * largest, key

    snapshots = [read_snapshot(p) for p in paths]
    labels = [s.step - 1 for s in snapshots for _ in s.gammas]  # ema-pytorch's labels: one less
    gammas = [g for s in snapshots for g in s.gammas]
    sources = [(s.path, f"profile_{j}") for s in snapshots for j in range(len(s.gammas))]
    for target in (0.05, 0.07, 0.085, 0.12):
        x, _ = solve_coefficients(labels, gammas, STEPS, std_to_gamma(target))
        combined = average_checkpoints([p for p, _ in sources], key=[k for _, k in sources], weights=x.tolist(),
                                       signed=True)
        synthesized = peer_state(theirs.synthesize_ema_model(sigma_rel=target))
        bound = x.abs().sum().item() * (2 * STEPS + 4 * len(x)) * eps * largest
        for key, value in combined.items():
            difference = (value - synthesized[key]).abs().max().item()
            assert difference <= bound, (target, key, difference, bound)
        # With the true times (swa_fast's reconstruct) the result moves by the label's effect, which
        # shrinks as 1/t: here (t = 120, 12 snapshots) well under a percent of the weights' scale.
        true = reconstruct(paths, target)
        shift = max((true[k] - synthesized[k]).abs().max().item() for k in true)
        assert shift < 0.01 * largest, (target, shift)


def peer_state(karras_ema):
    return {k.removeprefix("ema_model."): v for k, v in karras_ema.state_dict().items() if k.startswith("ema_model.")}
