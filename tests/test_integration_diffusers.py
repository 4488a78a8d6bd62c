"""swa_fast.integrations.diffusers.EMAModel against diffusers' own EMAModel (CPU; a few CUDA cases
carry @pytest.mark.cuda).

The parity bound. Both classes update each shadow value ``s`` from the parameter ``p`` with the same
float32 weight ``w = fl32(1 - decay)`` (checked: :func:`test_device_weight_matches_get_decay`); the
exact update is ``x' = s + w (p - s)``. With ``u`` the unit roundoff of the shadow's dtype (``2**-24``
for float32) and the standard model ``fl(a op b) = (a op b)(1 + d)``, ``|d| <= u``:

* diffusers: ``d1 = fl(s - p)``, ``m = fl(w d1)``, ``fl(s - m)``: off ``x'`` by at most
  ``2 u w |p - s| + u |x'|`` (first order; its foreach path fuses the last two into one FMA: less);
* ours (torch's lerp, one FMA): ``fl(s + w fl(p - s))`` for ``w < 0.5``: at most
  ``u w |p - s| + u |x'|``; ``fl(p + (w - 1) fl(p - s))`` otherwise (``w - 1`` exact): at most
  ``u (1 - w) |p - s| + u |x'| <= u w |p - s| + u |x'|``; ``w == 1``: an exact copy.

Both start from the same copy of the model and see the same parameters, so the difference ``e``
of the two shadows obeys, elementwise,

    e_{t+1} <= (1 - w_t) e_t + u (2 |x'_t| + 3 w_t |p_t - s_t|)       (s_t: diffusers' shadow)

plus second-order terms: evaluating our error terms at our own shadow adds at most ``u e_t``
(``|x'_ours - x'_theirs| = (1 - w) e``, ``|p - s_ours| <= |p - s_theirs| + e``), and the ``u**2``
terms are below ``4 u`` times the first-order ones. :class:`ParityBound` tracks

    B_{t+1} = (1 - w_t + 3 u) B_t + (1 + 16 u) u (2 |x'_t| + 3 w_t |p_t - s_t|)
              + |dw_t| |p_t - s_t| + 4 * 2**-149

in float64 (the extra ``12 u`` of slack covers the float64 rounding of computing B itself, which
matters only for float64 shadows; ``dw`` is the difference of the two float32 weights, 0 on the CPU;
``2**-149`` covers underflow), and every step must keep ``|ours - theirs| <= B``. In global terms
(``M`` bounding ``|s|`` and ``|p|``, so ``|x'| <= M`` and ``w |p - s| <= 2 M``): ``<= 8 T u M`` after
``T`` steps. Frozen parameters (``requires_grad=False``) are copied by both: equal bit for bit.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("diffusers")

from diffusers import ConfigMixin, ModelMixin  # noqa: E402
from diffusers.configuration_utils import register_to_config  # noqa: E402
from diffusers.training_utils import EMAModel as DiffusersEMAModel  # noqa: E402

import swa_fast.integrations.diffusers as integration  # noqa: E402
from swa_fast.integrations.diffusers import EMAModel  # noqa: E402

TINY = 2.0 ** -149  # the smallest float32 subnormal: the absolute error of an operation that underflows
STEPS = 60


# ---------------------------------------------------------------------------------------------- helpers


class TinyNet(ModelMixin, ConfigMixin):
    """A small diffusers model (ModelMixin + ConfigMixin): a classifier MLP, one frozen parameter."""

    @register_to_config
    def __init__(self, in_features: int = 6, width: int = 16, classes: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, classes))
        self.net[2].bias.requires_grad_(False)  # frozen: both EMAs copy it

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def make_data(n: int = 256, seed: int = 1):
    """A learnable synthetic task: labels from a fixed random nonlinear teacher."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    teacher = torch.randn(6, 3, generator=generator)
    y = torch.tanh(x @ teacher).mul(torch.randn(3, generator=generator)).argmax(1)
    return x, y


def trajectory(model: nn.Module, steps: int = STEPS, seed: int = 2) -> List[List[Tensor]]:
    """Trains ``model`` (SGD with momentum on mini-batches) and returns a copy of its parameters after
    every step: the one trajectory every EMA of a test sees."""
    x, y = make_data()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    snapshots = []
    for _ in range(steps):
        index = torch.randint(0, len(x), (32,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        snapshots.append([p.detach().clone() for p in model.parameters()])
    return snapshots


@torch.no_grad()
def load_snapshot(model: nn.Module, snapshot: Sequence[Tensor]) -> None:
    for p, value in zip(model.parameters(), snapshot, strict=True):
        p.copy_(value)


def fp32(value: float) -> float:
    return float(np.float32(value))


class ParityBound:
    """The per-element bound on ``|ours - theirs|`` of the module docstring, advanced step by step."""

    def __init__(self, ours: EMAModel, theirs: DiffusersEMAModel, trainable: Sequence[bool]):
        self.ours, self.theirs, self.trainable = ours, theirs, list(trainable)
        # B_0: the difference the two start from (0 for EMAs made from one model).
        self.bounds = [(a.double() - b.double().to(a.device)).abs()
                       for a, b in zip(ours.shadow_params, theirs.shadow_params, strict=True)]
        self.worst_ratio = 0.0  # max |ours - theirs| / B seen
        self.worst_diff = 0.0  # max |ours - theirs| seen
        self.nonzero = 0  # elements not bitwise equal, summed over the checks

    def advance(self, params: Sequence[Tensor]) -> None:
        """Before both EMAs step on ``params``: B for the step about to be taken."""
        step = self.theirs.optimization_step + 1
        w_theirs = 1 - self.theirs.get_decay(step)
        counter = torch.full((), step, dtype=torch.long, device=self.ours.shadow_params[0].device)
        w_ours = self.ours._weight(counter, 1 - self.ours.get_decay(step)).item()
        for k, (bound, s, p) in enumerate(zip(self.bounds, self.theirs.shadow_params, params, strict=True)):
            if not self.trainable[k]:
                bound.zero_()
                continue
            u = torch.finfo(s.dtype).eps / 2
            w = fp32(w_theirs) if s.dtype != torch.float64 else w_theirs
            dw = abs((fp32(w_ours) if s.dtype != torch.float64 else w_ours) - w)
            s64, p64 = s.double(), p.detach().to(s.device).double()
            gap = (p64 - s64).abs()
            exact = s64 + w * (p64 - s64)
            bound.mul_(1 - w + 3 * u).add_((1 + 16 * u) * u * (2 * exact.abs() + 3 * w * gap) + dw * gap + 4 * TINY)

    def check(self) -> None:
        pairs = zip(self.bounds, self.ours.shadow_params, self.theirs.shadow_params, strict=True)
        for k, (bound, a, b) in enumerate(pairs):
            diff = (a.double() - b.double().to(a.device)).abs()
            if not self.trainable[k]:
                assert torch.equal(a, b.to(a.device)), f"frozen parameter {k} differs"
                continue
            excess = diff - bound
            assert excess.max().item() <= 0.0, (
                f"step {self.ours.optimization_step}, parameter {k}: |ours - diffusers| = {diff.max().item():.3e} "
                f"beyond the bound by {excess.max().item():.3e}")
            self.worst_diff = max(self.worst_diff, diff.max().item())
            ratio = torch.where(bound > 0, diff / bound, torch.zeros_like(diff)).max().item()
            self.worst_ratio = max(self.worst_ratio, ratio)
            self.nonzero += int((diff > 0).sum())


def run_lockstep(ours: EMAModel, theirs: DiffusersEMAModel, model: nn.Module, snapshots: Sequence[Sequence[Tensor]],
                 bound: Optional[ParityBound] = None) -> ParityBound:
    """Both EMAs step on every snapshot; the bound is checked after each step."""
    if bound is None:
        bound = ParityBound(ours, theirs, [p.requires_grad for p in model.parameters()])
    for snapshot in snapshots:
        load_snapshot(model, snapshot)
        bound.advance(list(model.parameters()))
        ours.step(model.parameters())
        theirs.step(model.parameters())
        assert ours.optimization_step == theirs.optimization_step
        assert ours.cur_decay_value == theirs.cur_decay_value
        bound.check()
    return bound


def run(ema, model: nn.Module, snapshots: Sequence[Sequence[Tensor]]) -> None:
    for snapshot in snapshots:
        load_snapshot(model, snapshot)
        ema.step(model.parameters())


@torch.no_grad()
def evaluate(model: nn.Module):
    x, y = make_data(512, seed=7)
    logits = model(x)
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def quiet(fn, *args, **kwargs):
    """diffusers' loading prints config and accelerate notices and warns; keep the test log clean."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


CONFIGS = [
    dict(),
    dict(decay=0.8),
    dict(decay=0.8, use_ema_warmup=True),
    dict(decay=0.95, use_ema_warmup=True, inv_gamma=2.0, power=0.75),
    dict(decay=0.9, use_ema_warmup=True, power=1),
    dict(decay=0.9, use_ema_warmup=True, power=2),
    dict(decay=0.9, update_after_step=7, min_decay=0.3),
    dict(decay=0.99, use_ema_warmup=True, update_after_step=3, min_decay=0.5, inv_gamma=3),
    dict(decay=0.5, min_decay=0.7),  # min_decay above decay: min_decay wins, as in diffusers
]


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_get_decay_matches_diffusers(config):
    model = make_model()
    ours, theirs = EMAModel(model.parameters(), **config), DiffusersEMAModel(model.parameters(), **config)
    for step in range(0, 3000):
        value = ours.get_decay(step)
        assert type(value) is float and value == theirs.get_decay(step), step


@pytest.mark.parametrize("config", CONFIGS + [dict(decay=0.999, use_ema_warmup=True, power=0.5)], ids=str)
def test_device_weight_matches_get_decay(config):
    """The weight computed on the device from the step counter is diffusers' 1 - get_decay(step): bit for
    bit in float64 on the CPU (torch's CPU pow of a 0-dim tensor is the C library's, as Python's), except
    for power 1/2, where torch takes a reciprocal square root (a few float64 ulps); the float32 weight the
    float32 update uses is equal in every case."""
    model = make_model()
    ours, theirs = EMAModel(model.parameters(), **config), DiffusersEMAModel(model.parameters(), **config)
    assert ours._device_schedule() is not None  # the device path, not the host fallback
    exact = config.get("power") != 0.5
    for step in range(0, 2000):
        expected = 1 - theirs.get_decay(step)
        weight = ours._weight(torch.tensor(step), expected)
        assert weight.dtype == torch.float64 and weight.dim() == 0
        value = weight.item()
        assert fp32(value) == fp32(expected), step
        if exact:
            assert value == expected, step
        else:
            assert abs(value - expected) <= 1e-14 * expected, step


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("min_decay", [0.0, 0.4])
@pytest.mark.parametrize("update_after_step", [0, 5])
@pytest.mark.parametrize("use_ema_warmup", [False, True], ids=["inverse", "warmup"])
def test_parity_with_diffusers(use_ema_warmup, update_after_step, min_decay, foreach):
    config = dict(decay=0.9, min_decay=min_decay, update_after_step=update_after_step, use_ema_warmup=use_ema_warmup,
                  inv_gamma=1.5, power=0.75)
    model = make_model()
    snapshots = trajectory(make_model(), STEPS)
    ours = EMAModel(model.parameters(), foreach=foreach, **config)
    theirs = DiffusersEMAModel(model.parameters(), foreach=foreach, **config)
    bound = run_lockstep(ours, theirs, model, snapshots)
    assert ours.optimization_step == STEPS
    # The runs moved the average (and the bound is not vacuous): well above rounding, well below the spread.
    assert max(b.max().item() for b in bound.bounds) < 1e-5
    moved = max((s - p).abs().max().item() for s, p in zip(ours.shadow_params, model.parameters(), strict=True))
    assert moved > 1e-3


def test_parity_measured(capsys):
    """The default settings over a longer run, with what was measured against the bound printed."""
    model = make_model()
    snapshots = trajectory(make_model(), 200)
    ours = EMAModel(model.parameters(), decay=0.99)
    theirs = DiffusersEMAModel(model.parameters(), decay=0.99)
    bound = run_lockstep(ours, theirs, model, snapshots)
    largest_bound = max(b.max().item() for b in bound.bounds)
    elements = sum(s.numel() for s, g in zip(ours.shadow_params, bound.trainable, strict=True) if g)
    with capsys.disabled():
        print(f"\n200 steps, decay 0.99: max |ours - diffusers| = {bound.worst_diff:.3e}, largest bound "
              f"{largest_bound:.3e}, max diff/bound = {bound.worst_ratio:.3f}, "
              f"{bound.nonzero / (200 * elements):.2%} of trainable element-steps not bitwise equal")
    assert bound.worst_ratio <= 1.0


def test_parity_float64_shadow():
    """``to(dtype=torch.float64)``: float64 shadows of float32 parameters (a pair the fused op takes), with
    float64 weights on both sides; the bound with u = 2**-53."""
    model = make_model()
    snapshots = trajectory(make_model(), 40)
    ours = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True)
    theirs = DiffusersEMAModel(model.parameters(), decay=0.9, use_ema_warmup=True)
    ours.to(dtype=torch.float64)
    theirs.to(dtype=torch.float64)
    assert all(s.dtype == torch.float64 for s in ours.shadow_params)
    bound = run_lockstep(ours, theirs, model, snapshots)
    assert max(b.max().item() for b in bound.bounds) < 1e-13


def test_parity_with_diffusers_unet():
    """A tiny real diffusers model (UNet2DModel, minimal config), some parameters frozen."""
    from diffusers import UNet2DModel

    def unet():
        torch.manual_seed(0)
        net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                          norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D"))
        net.conv_in.requires_grad_(False)
        return net

    model, trained = unet(), unet()
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    snapshots = []
    for _ in range(6):
        x = torch.randn(2, 1, 8, 8, generator=generator)
        loss = (trained(x, 10).sample - x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        snapshots.append([p.detach().clone() for p in trained.parameters()])
    ours = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, power=0.75)
    theirs = DiffusersEMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, power=0.75)
    run_lockstep(ours, theirs, model, snapshots)


def test_one_fused_call_per_step(monkeypatch):
    """The trainable parameters are one average_ call per step, with a 0-dim float64 weight tensor."""
    calls = []
    real = integration.average_

    def spy(averaged, current, weight, **kwargs):
        calls.append((len(averaged), weight))
        return real(averaged, current, weight, **kwargs)

    monkeypatch.setattr(integration, "average_", spy)
    model = make_model()
    ema = EMAModel(model.parameters(), decay=0.9)
    run(ema, model, trajectory(make_model(), 3))
    trainable = sum(p.requires_grad for p in model.parameters())
    assert [n for n, _ in calls] == [trainable] * 3
    assert all(isinstance(w, Tensor) and w.dtype == torch.float64 and w.dim() == 0 for _, w in calls)


def test_device_counter_follows_optimization_step():
    """The device counter is incremented on the device, and refilled when optimization_step is changed by
    hand (diffusers reads the attribute each step): the EMA still matches diffusers'."""
    model = make_model()
    snapshots = trajectory(make_model(), 20)
    ours = EMAModel(model.parameters(), decay=0.95, use_ema_warmup=True)
    theirs = DiffusersEMAModel(model.parameters(), decay=0.95, use_ema_warmup=True)
    bound = run_lockstep(ours, theirs, model, snapshots[:10])
    counter = ours._step_counters[torch.device("cpu")][0]
    assert counter.item() == 10
    ours.optimization_step = theirs.optimization_step = 3
    run_lockstep(ours, theirs, model, snapshots[10:], bound)
    assert ours._step_counters[torch.device("cpu")][0].item() == 13


def test_host_schedule_fallback():
    """Settings the device schedule does not take (here a float update_after_step and a non-positive
    power) use the host's decay: still diffusers' EMA within the bound."""
    model = make_model()
    snapshots = trajectory(make_model(), 20)
    for config in (dict(decay=0.9, update_after_step=4.0), dict(decay=0.9, use_ema_warmup=True, power=0)):
        ours, theirs = EMAModel(model.parameters(), **config), DiffusersEMAModel(model.parameters(), **config)
        assert ours._device_schedule() is None
        run_lockstep(ours, theirs, model, snapshots)


def test_changed_settings_take_effect():
    """decay and the other settings are plain attributes, read at every step (as in diffusers)."""
    model = make_model()
    snapshots = trajectory(make_model(), 30)
    ours, theirs = EMAModel(model.parameters()), DiffusersEMAModel(model.parameters())
    bound = run_lockstep(ours, theirs, model, snapshots[:10])
    for ema in (ours, theirs):
        ema.decay, ema.use_ema_warmup, ema.min_decay = 0.7, True, 0.2
    run_lockstep(ours, theirs, model, snapshots[10:], bound)


# ---------------------------------------------------------------------------------------------- API


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_copy_to_store_restore_and_evaluation(foreach):
    model, their_model = make_model(), make_model()
    trained = make_model()
    snapshots = trajectory(trained, STEPS)
    ours = EMAModel(model.parameters(), decay=0.9, foreach=foreach)
    theirs = DiffusersEMAModel(model.parameters(), decay=0.9, foreach=foreach)
    run_lockstep(ours, theirs, model, snapshots)
    load_snapshot(their_model, snapshots[-1])

    before = [p.detach().clone() for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    ours.store(model.parameters())
    assert all(t.device.type == "cpu" for t in ours.temp_stored_params)
    ours.copy_to(model.parameters())
    for p, s in zip(model.parameters(), ours.shadow_params, strict=True):
        assert torch.equal(p, s)
    ema_metrics = evaluate(model)
    ours.restore(model.parameters())
    assert ours.temp_stored_params is None
    for p, value in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, value)  # the model's own weights, exactly
    assert [p.requires_grad for p in model.parameters()] == flags

    theirs.store(their_model.parameters())
    theirs.copy_to(their_model.parameters())
    their_metrics = evaluate(their_model)
    theirs.restore(their_model.parameters())

    # Same accuracy; the loss equal up to the rounding of shadows that agree within the bound.
    assert ema_metrics[1] == their_metrics[1]
    assert ema_metrics[0] == pytest.approx(their_metrics[0], rel=1e-6, abs=0)
    assert evaluate(model) != ema_metrics  # the EMA is not the model


def test_restore_without_store_raises_as_diffusers():
    model = make_model()
    ours, theirs = EMAModel(model.parameters()), DiffusersEMAModel(model.parameters())
    with pytest.raises(RuntimeError) as theirs_error:
        theirs.restore(model.parameters())
    with pytest.raises(RuntimeError, match="no `store\\(\\)`ed weights") as ours_error:
        ours.restore(model.parameters())
    assert str(ours_error.value) == str(theirs_error.value)


def test_module_arguments_are_deprecated_as_in_diffusers():
    model = make_model()
    snapshots = trajectory(make_model(), 10)
    with pytest.warns(FutureWarning) as theirs_warnings:
        theirs = DiffusersEMAModel(model, decay=0.9)
    with pytest.warns(FutureWarning) as ours_warnings:
        ours = EMAModel(model, decay=0.9)
    assert [str(w.message) for w in ours_warnings] == [str(w.message) for w in theirs_warnings]
    assert ours.use_ema_warmup is True and theirs.use_ema_warmup is True  # diffusers' backwards compatibility
    bound = ParityBound(ours, theirs, [p.requires_grad for p in model.parameters()])
    load_snapshot(model, snapshots[0])
    bound.advance(list(model.parameters()))
    with pytest.warns(FutureWarning, match="ExponentialMovingAverage.step"):
        ours.step(model)
    with pytest.warns(FutureWarning, match="ExponentialMovingAverage.step"):
        theirs.step(model)
    bound.check()
    run_lockstep(ours, theirs, model, snapshots[1:], bound)


def test_deprecated_keywords_as_in_diffusers():
    model = make_model()
    kwargs = dict(max_value=0.8, min_value=0.1, device="cpu")
    with pytest.warns(FutureWarning) as theirs_warnings:
        theirs = DiffusersEMAModel(model.parameters(), **kwargs)
    with pytest.warns(FutureWarning) as ours_warnings:
        ours = EMAModel(model.parameters(), **kwargs)
    assert [str(w.message) for w in ours_warnings] == [str(w.message) for w in theirs_warnings]
    assert (ours.decay, ours.min_decay) == (theirs.decay, theirs.min_decay) == (0.8, 0.1)


def test_public_attributes_match_diffusers():
    model = make_model()
    ours, theirs = EMAModel(model.parameters(), decay=0.9), DiffusersEMAModel(model.parameters(), decay=0.9)
    public = {name for name in dir(theirs) if not name.startswith("_")}
    missing = public - set(dir(ours))
    assert not missing
    for name in ("decay", "min_decay", "update_after_step", "use_ema_warmup", "inv_gamma", "power",
                 "optimization_step", "cur_decay_value", "foreach", "model_cls", "model_config", "temp_stored_params"):
        assert getattr(ours, name) == getattr(theirs, name), name
    for a, b in zip(ours.shadow_params, theirs.shadow_params, strict=True):
        assert torch.equal(a, b) and not a.requires_grad and a.data_ptr() != b.data_ptr()


def test_to_and_pin_memory():
    model = make_model()
    ours, theirs = EMAModel(model.parameters()), DiffusersEMAModel(model.parameters())
    ours.to(dtype=torch.float16)
    assert all(s.dtype == torch.float16 for s in ours.shadow_params)
    ours.to(device="cpu", dtype=torch.float32, non_blocking=True)
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" for s in ours.shadow_params)
    try:
        theirs.pin_memory()
    except Exception as error:  # no accelerator: pinned memory does not exist here, for diffusers either
        with pytest.raises(type(error)):
            ours.pin_memory()
    else:
        ours.pin_memory()
        assert all(s.is_pinned() for s in ours.shadow_params)


def test_bfloat16_shadow_uses_diffusers_arithmetic():
    """A bfloat16 shadow of float32 parameters is a pair the fused op does not take: diffusers' own
    arithmetic, so bit for bit diffusers' result."""
    model = make_model()
    snapshots = trajectory(make_model(), 10)
    ours, theirs = EMAModel(model.parameters(), decay=0.9), DiffusersEMAModel(model.parameters(), decay=0.9)
    ours.to(dtype=torch.bfloat16)
    theirs.to(dtype=torch.bfloat16)
    for snapshot in snapshots:
        load_snapshot(model, snapshot)
        ours.step(model.parameters())
        theirs.step(model.parameters())
    for a, b in zip(ours.shadow_params, theirs.shadow_params, strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- state


def saved(state: Dict) -> Dict:
    """A state dict through torch.save / torch.load, as a checkpoint would carry it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_layout_matches_diffusers():
    model = make_model()
    snapshots = trajectory(make_model(), 5)
    ours = EMAModel(model.parameters(), decay=0.9, update_after_step=2)
    theirs = DiffusersEMAModel(model.parameters(), decay=0.9, update_after_step=2)
    run_lockstep(ours, theirs, model, snapshots)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        if key == "shadow_params":
            assert isinstance(a[key], list) and a[key] is ours.shadow_params  # references, as diffusers returns
        else:
            assert type(a[key]) is type(b[key]) and a[key] == b[key], key


@pytest.mark.parametrize("direction", ["diffusers_to_ours", "ours_to_diffusers"])
def test_state_dict_interchange(direction):
    """Each class loads the other's state dict mid-run and both continue within the bound."""
    model = make_model()
    snapshots = trajectory(make_model(), 40)
    config = dict(decay=0.9, use_ema_warmup=True, update_after_step=2, min_decay=0.1)
    first = (DiffusersEMAModel if direction == "diffusers_to_ours" else EMAModel)(model.parameters(), **config)
    run(first, model, snapshots[:20])
    state = saved(first.state_dict())

    # The loaders start from another model and other settings: everything comes from the state dict.
    other = make_model(seed=5)
    ours = EMAModel(other.parameters(), decay=0.5)
    theirs = DiffusersEMAModel(other.parameters(), decay=0.5)
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    assert ours.state_dict()["shadow_params"] is not state["shadow_params"]  # deep-copied, as diffusers does
    for a, b, c in zip(ours.shadow_params, theirs.shadow_params, first.shadow_params, strict=True):
        assert torch.equal(a, c) and torch.equal(b, c)
    assert ours.optimization_step == theirs.optimization_step == 20
    run_lockstep(ours, theirs, model, snapshots[20:])


def test_resume_from_state_dict_is_bitwise():
    """Stopping mid-run, saving, loading into a new EMAModel and continuing equals never stopping, bit
    for bit (the device counter is refilled from optimization_step)."""
    model = make_model()
    snapshots = trajectory(make_model(), 40)
    config = dict(decay=0.95, use_ema_warmup=True, update_after_step=3, min_decay=0.2)
    straight = EMAModel(model.parameters(), **config)
    run(straight, model, snapshots)

    first = EMAModel(model.parameters(), **config)
    run(first, model, snapshots[:17])
    state = saved(first.state_dict())
    resumed = EMAModel(make_model(seed=9).parameters())
    resumed.load_state_dict(state)
    run(resumed, model, snapshots[17:])
    assert resumed.optimization_step == straight.optimization_step == 40
    assert resumed.cur_decay_value == straight.cur_decay_value
    for a, b in zip(resumed.shadow_params, straight.shadow_params, strict=True):
        assert torch.equal(a, b)


def test_save_pretrained_round_trip_and_interchange(tmp_path):
    model = make_model()
    snapshots = trajectory(make_model(), 30)
    config = dict(decay=0.9, min_decay=0.1, use_ema_warmup=True, inv_gamma=2.0, power=0.75, update_after_step=1)
    ours = EMAModel(model.parameters(), model_cls=TinyNet, model_config=model.config, **config)
    theirs = DiffusersEMAModel(model.parameters(), model_cls=TinyNet, model_config=model.config, **config)
    run_lockstep(ours, theirs, model, snapshots[:15])
    quiet(ours.save_pretrained, str(tmp_path / "ours"))
    quiet(theirs.save_pretrained, str(tmp_path / "theirs"))

    # Same config (the EMA's settings registered in the model's config) from both.
    configs = [json.loads((tmp_path / name / "config.json").read_text()) for name in ("ours", "theirs")]
    assert configs[0] == configs[1]
    assert configs[0]["optimization_step"] == 15 and configs[0]["decay"] == 0.9

    # Ours round trip, and each class loading the other's folder.
    for loader, folder in [(EMAModel, "ours"), (DiffusersEMAModel, "ours"), (EMAModel, "theirs")]:
        loaded = quiet(loader.from_pretrained, str(tmp_path / folder), model_cls=TinyNet, foreach=True)
        assert type(loaded) is loader and loaded.foreach is True and loaded.model_cls is TinyNet
        source = ours if folder == "ours" else theirs
        for a, b in zip(loaded.shadow_params, source.shadow_params, strict=True):
            assert torch.equal(a, b)
        state, expected = loaded.state_dict(), source.state_dict()
        for key in expected:
            if key != "shadow_params":
                assert state[key] == expected[key], key

    # Loaded ours (from diffusers' folder) and loaded diffusers (from ours) continue within the bound
    # (which starts from the rounding difference of the two saved EMAs).
    ours_loaded = quiet(EMAModel.from_pretrained, str(tmp_path / "theirs"), TinyNet)
    theirs_loaded = quiet(DiffusersEMAModel.from_pretrained, str(tmp_path / "ours"), TinyNet)
    run_lockstep(ours_loaded, theirs_loaded, model, snapshots[15:])


# ---------------------------------------------------------------------------------------------- bad input


BAD_STATES = [
    ({"decay": 1.5}, "Decay must be between 0 and 1"),
    ({"decay": -0.1}, "Decay must be between 0 and 1"),
    ({"min_decay": 0}, "Invalid min_decay"),
    ({"optimization_step": 3.0}, "Invalid optimization_step"),
    ({"update_after_step": "3"}, "Invalid update_after_step"),
    ({"use_ema_warmup": 1}, "Invalid use_ema_warmup"),
    ({"inv_gamma": "1"}, "Invalid inv_gamma"),
    ({"power": None}, "Invalid power"),
    ({"shadow_params": (torch.zeros(2),)}, "shadow_params must be a list"),
    ({"shadow_params": [torch.zeros(2), 1.0]}, "shadow_params must all be Tensors"),
    ({"decay": 2.0, "min_decay": 1}, "Decay must be between 0 and 1"),  # diffusers' order: decay first
]


@pytest.mark.parametrize("bad,message", BAD_STATES, ids=[m for _, m in BAD_STATES])
def test_load_state_dict_rejects_as_diffusers(bad, message):
    model = make_model()
    ours, theirs = EMAModel(model.parameters(), decay=0.9), DiffusersEMAModel(model.parameters(), decay=0.9)
    state = {**theirs.state_dict(), **bad}
    with pytest.raises(ValueError) as theirs_error:
        theirs.load_state_dict(state)
    before = {k: (list(v) if k == "shadow_params" else v) for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError) as ours_error:
        ours.load_state_dict(state)
    assert str(ours_error.value) == str(theirs_error.value) == message
    after = ours.state_dict()
    for key, value in before.items():  # nothing changed (diffusers keeps what it read before the failure)
        if key == "shadow_params":
            assert all(a is b for a, b in zip(after[key], value, strict=True)) and len(after[key]) == len(value)
        else:
            assert after[key] == value


def test_save_pretrained_needs_model_cls_and_config_as_diffusers(tmp_path):
    model = make_model()
    for kwargs in (dict(), dict(model_cls=TinyNet)):
        theirs = DiffusersEMAModel(model.parameters(), **kwargs)
        ours = EMAModel(model.parameters(), **kwargs)
        with pytest.raises(ValueError) as theirs_error:
            theirs.save_pretrained(str(tmp_path))
        with pytest.raises(ValueError) as ours_error:
            ours.save_pretrained(str(tmp_path))
        assert str(ours_error.value) == str(theirs_error.value)


def test_step_rejects_a_different_parameter_count():
    model = make_model()
    ema = EMAModel(model.parameters())
    with pytest.raises(ValueError, match="got 5 parameters but the EMA holds 6"):
        ema.step(list(model.parameters())[:5])
    assert ema.optimization_step == 0  # nothing was counted


def test_decay_outside_unit_interval_is_an_error():
    """diffusers' constructor takes any decay; one whose weight 1 - decay leaves [0, 1] cannot be a lerp."""
    model = make_model()
    ema = EMAModel(model.parameters(), decay=-0.5, min_decay=-1.0, update_after_step=0)
    ema.step(model.parameters())  # step 1: decay 0, a copy
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        ema.step(model.parameters())


def test_shape_mismatch_is_an_error():
    model = make_model()
    ema = EMAModel(model.parameters())
    params = [p.detach().clone() for p in model.parameters()]
    params[0] = torch.zeros(3, 3, requires_grad=True)
    with pytest.raises(RuntimeError):
        ema.step(params)


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_parity_with_diffusers_cuda():
    """On the GPU (the fused CUDA kernel; the decay computed with CUDA's float64 pow, so ParityBound
    includes any difference of the float32 weights)."""
    model = make_model().cuda()
    snapshots = [[t.cuda() for t in snap] for snap in trajectory(make_model(), STEPS)]
    config = dict(decay=0.9, use_ema_warmup=True, power=0.75, update_after_step=2, min_decay=0.1)
    ours, theirs = EMAModel(model.parameters(), **config), DiffusersEMAModel(model.parameters(), **config)
    run_lockstep(ours, theirs, model, snapshots)
    assert all(s.is_cuda for s in ours.shadow_params)


@pytest.mark.cuda
@pytest.mark.parametrize("shadow_device", ["cpu", "cuda"])
def test_shadow_on_another_device_cuda(shadow_device):
    """Shadow parameters on another device than the model's (e.g. offloaded with ``to("cpu")``): the
    parameters are copied to the shadows' device; the result is the EMA kept there all along."""
    snapshots = trajectory(make_model(), 20)
    model_device = "cuda" if shadow_device == "cpu" else "cpu"
    model, reference_model = make_model().to(model_device), make_model().to(shadow_device)
    ema, reference = EMAModel(model.parameters(), decay=0.9), EMAModel(reference_model.parameters(), decay=0.9)
    ema.to(device=shadow_device)
    run(ema, model, [[t.to(model_device) for t in snap] for snap in snapshots])
    run(reference, reference_model, [[t.to(shadow_device) for t in snap] for snap in snapshots])
    for a, b in zip(ema.shadow_params, reference.shadow_params, strict=True):
        assert a.device.type == shadow_device and torch.equal(a, b)
    ema.copy_to(model.parameters())
    for p, s in zip(model.parameters(), ema.shadow_params, strict=True):
        assert torch.equal(p.cpu(), s.cpu())


# ---------------------------------------------------------------------------------------------- example


def test_example_runs():
    """examples/with_diffusers.py, shortened: trains, the EMA evaluates, the checkpoint reloads
    identically, and diffusers' own EMA kept alongside stays within rounding."""
    from helpers import load_recipe

    result = load_recipe("with_diffusers").main(["--steps", "20", "--compare"])
    assert result["reloaded_identical"] and result["optimization_step"] == 20
    assert np.isfinite(result["model_loss"]) and np.isfinite(result["ema_loss"])
    assert result["max_abs_diff"] < 1e-5
