"""``swa_fast.integrations.timm.ModelEmaV3`` against timm's own ``timm.utils.model_ema.ModelEmaV3``.

timm's module is loaded by file path: it imports only torch, while ``import timm`` needs
torchvision, which the test environment may lack. Without timm's file the tests skip.

What is compared (CPU):

* float32 / float64 EMAs, with and without warm-up, with steps and without, ``update_after_step``,
  ``min_decay``, ``exclude_buffers``, a BatchNorm model, a changed schedule mid-run: **bitwise**
  (both are ``lerp(ema, model, 1 - decay)`` with the same float64 decay);
* a bf16 / fp16 EMA of a model of the same dtype rounded to nearest: bitwise (both are one lerp);
* an EMA of another dtype than the model (fp32 EMA of a bf16 model, fp16 EMA of an fp32 model):
  timm's foreach path computes ``ema * decay + model * (1 - decay)``, swa_fast a lerp: bounded (see
  :func:`test_mixed_dtypes_agree_within_a_few_ulps`);
* a bf16 EMA with stochastic rounding: in distribution (see
  :func:`test_stochastic_rounding_matches_timm_in_distribution`), and bitwise reproducible.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
import torch
from torch import nn

from swa_fast.integrations.timm import ModelEmaV3

from helpers import EXAMPLES, ROOT, bn_net, bn_net_inputs, force_host_offload


def _timm_model_ema() -> ModuleType:
    """timm's ``timm/utils/model_ema.py``, loaded by path; skips the module with the reason."""
    found = importlib.util.find_spec("timm")
    if found is None or not found.submodule_search_locations:
        pytest.skip("timm is not installed: no timm/utils/model_ema.py to compare with", allow_module_level=True)
    path = Path(list(found.submodule_search_locations)[0]) / "utils" / "model_ema.py"
    if not path.is_file():
        pytest.skip(f"timm's {path} is absent: nothing to compare with", allow_module_level=True)
    spec = importlib.util.spec_from_file_location("_timm_model_ema_by_path", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - any failure to load it: nothing to compare with
        pytest.skip(f"timm's {path} does not load on its own ({type(error).__name__}: {error})",
                    allow_module_level=True)
    if not hasattr(module, "ModelEmaV3"):
        pytest.skip(f"timm's {path} has no ModelEmaV3 (timm too old)", allow_module_level=True)
    return module


TimmModelEmaV3 = _timm_model_ema().ModelEmaV3


# -- helpers -----------------------------------------------------------------------------


def train(model: nn.Module, emas: List[nn.Module], steps: int, *, first_step: int = 1, use_step: bool = True,
          seed: int = 1, between: Optional[Callable[[int], None]] = None) -> None:
    """SGD with momentum on :func:`bn_net_inputs`; after every optimizer step every EMA is updated
    as timm's train.py updates it (``update(model, step=num_updates)``, num_updates from 1)."""
    dtype = next(model.parameters()).dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i, x in enumerate(bn_net_inputs(steps, dtype, seed=seed)):
        model.train()
        loss = model(x).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if between is not None:
            between(i)
        for ema in emas:
            ema.update(model, step=first_step + i if use_step else None)


def assert_states_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), (key, (a[key].double() - b[key].double()).abs().max().item())


def moved(ema: nn.Module, model: nn.Module) -> bool:
    """Whether the EMA's floating parameters differ from the model's (the test is not vacuous)."""
    return any(not torch.equal(e, p.to(e.dtype)) for e, p in zip(ema.module.parameters(), model.parameters()))


def saved(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` through torch.save / torch.load, as a checkpoint would carry it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def unwrap_model(model: nn.Module) -> nn.Module:
    """timm.utils.model.unwrap_model's semantics for a ModelEmaV3 (that file imports torchvision)."""
    if hasattr(model, "module"):
        return unwrap_model(model.module)
    if hasattr(model, "_orig_mod"):
        return unwrap_model(model._orig_mod)
    return model


def get_state_dict(model: nn.Module, unwrap_fn=unwrap_model) -> Dict[str, torch.Tensor]:
    """timm.utils.model.get_state_dict (what timm's CheckpointSaver stores as ``state_dict_ema``)."""
    return unwrap_fn(model).state_dict()


# -- parity with timm: float32 / float64, bitwise --------------------------------------------

CONFIGS = {
    "defaults": dict(),
    "decay": dict(decay=0.9),
    "warmup": dict(decay=0.99, use_warmup=True),
    "warmup_after_step": dict(decay=0.99, use_warmup=True, update_after_step=3),
    "warmup_min_decay": dict(decay=0.995, use_warmup=True, min_decay=0.6, warmup_gamma=2.0, warmup_power=0.75),
    "after_step_no_warmup": dict(decay=0.9, update_after_step=4),
    "exclude_buffers": dict(decay=0.9, exclude_buffers=True),
    "exclude_buffers_warmup": dict(decay=0.99, use_warmup=True, exclude_buffers=True, update_after_step=2),
    "no_stochastic_rounding": dict(decay=0.9, stochastic_rounding=False, foreach=False),
}


@pytest.mark.parametrize("use_step", [True, False], ids=["step", "no_step"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_training_run_is_bitwise_timms(name, use_step):
    options = CONFIGS[name]
    model = bn_net()
    theirs, ours = TimmModelEmaV3(model, **options), ModelEmaV3(model, **options)
    train(model, [theirs, ours], steps=12, use_step=use_step)
    assert_states_equal(ours.state_dict(), theirs.state_dict())
    assert_states_equal(ours.module.state_dict(), theirs.module.state_dict())
    if options.get("decay", 0.9999) < 0.9999 or options.get("update_after_step"):
        assert moved(ours, model) and moved(ours, bn_net())  # neither the model nor the start


def test_float64_and_steps_from_zero_irregular_as_tensors_and_numpy():
    model = bn_net(torch.float64)
    options = dict(decay=0.97, use_warmup=True, update_after_step=1, min_decay=0.1)
    theirs, ours = TimmModelEmaV3(model, **options), ModelEmaV3(model, **options)
    steps = iter([0, 1, 2, 2, 7, 3, 100, 101, 5000, 5001])

    def update(i: int) -> None:
        step = next(steps)
        theirs.update(model, step=step)
        ours.update(model, step=[step, torch.tensor(step), np.int64(step)][i % 3])

    train(model, [], steps=10, between=update)
    assert_states_equal(ours.state_dict(), theirs.state_dict())


def test_a_schedule_changed_mid_run_is_followed_as_timm_follows_it():
    model = bn_net()
    options = dict(decay=0.99, use_warmup=True)
    theirs, ours = TimmModelEmaV3(model, **options), ModelEmaV3(model, **options)

    def change(i: int) -> None:
        if i == 4:
            for ema in (theirs, ours):
                ema.decay, ema.min_decay, ema.warmup_power = 0.9, 0.3, 1.0
        if i == 7:
            for ema in (theirs, ours):
                ema.use_warmup, ema.exclude_buffers, ema.update_after_step = False, True, 9

    train(model, [theirs, ours], steps=12, between=change)
    assert_states_equal(ours.state_dict(), theirs.state_dict())
    assert ours._schedule.decay == 0.9 and ours.exclude_buffers and ours.update_after_step == 9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_ema_of_a_16_bit_model_rounded_to_nearest_is_bitwise_timms(dtype):
    # bf16 with stochastic_rounding=False; fp16 with the default True, which timm (and swa_fast)
    # applies to bf16 tensors only: fp16 is rounded to nearest.
    model = bn_net(dtype)
    options = dict(decay=0.9, stochastic_rounding=dtype == torch.float16)
    theirs, ours = TimmModelEmaV3(model, **options), ModelEmaV3(model, **options)
    train(model, [theirs, ours], steps=8)
    assert_states_equal(ours.state_dict(), theirs.state_dict())
    assert moved(ours, model)
    assert ours._engine._set.rounding_seed is None


@pytest.mark.parametrize("model_dtype,ema_dtype,rounding", [
    (torch.bfloat16, torch.float32, True),
    (torch.float16, torch.float32, True),
    (torch.float32, torch.float64, True),
    (torch.float32, torch.float16, True),  # fp16: rounded to nearest, also with stochastic_rounding
    (torch.float32, torch.bfloat16, False),
])
def test_mixed_dtypes_agree_within_a_few_ulps(model_dtype, ema_dtype, rounding):
    """timm's foreach path for an EMA of another dtype than the model is ``ema.mul_(decay)`` then
    ``ema.add_(model, alpha=1 - decay)`` (two roundings in the EMA's dtype: at most ``u|ema|`` and
    ``u|ema'|`` with ``u`` the unit roundoff, plus ``u|(1-decay) model|`` for the product). swa_fast
    computes a lerp in float32 (one rounding, ``u|ema'|``), or for a 16-bit EMA of a float32 model
    torch's ``lerp`` with the weight in the EMA's dtype (``u|ema'|`` plus ``u|weight (model - ema)|``
    <= ``2 u M``). Per update the two results are then within ``6 u M`` (``M``: the largest
    magnitude of the EMAs and the model in the tensor during the run, or the dtype's smallest normal
    number if larger: below it the spacing of subnormals, ``2 u tiny``, bounds the rounding), and an
    earlier difference is scaled by ``decay < 1``, so after ``K`` updates they are within
    ``6 K u M``."""
    model = bn_net(model_dtype)
    options = dict(decay=0.9, dtype=ema_dtype, stochastic_rounding=rounding)
    theirs, ours = TimmModelEmaV3(model, **options), ModelEmaV3(model, **options)
    steps = 8
    magnitudes: Dict[int, float] = {}

    def track(_: int) -> None:
        for index, values in enumerate(zip(theirs.module.state_dict().values(), ours.module.state_dict().values(),
                                           model.state_dict().values())):
            if values[0].is_floating_point():
                m = max(v.double().abs().max().item() for v in values)
                magnitudes[index] = max(magnitudes.get(index, 0.0), m)

    def update_and_track(i: int) -> None:
        track(i)
        theirs.update(model, step=i + 1)
        ours.update(model, step=i + 1)
        track(i)

    train(model, [], steps=steps, between=update_and_track)
    unit_roundoff = torch.finfo(ema_dtype).eps / 2
    for index, (a, b) in enumerate(zip(ours.state_dict().values(), theirs.state_dict().values())):
        assert a.dtype == b.dtype == (ema_dtype if b.is_floating_point() else b.dtype)
        if not a.is_floating_point():
            assert torch.equal(a, b)
            continue
        bound = 6 * steps * unit_roundoff * max(magnitudes[index], torch.finfo(ema_dtype).tiny)
        assert (a.double() - b.double()).abs().max().item() <= bound
    assert moved(ours, model)
    if ema_dtype == torch.float16:
        assert ours._engine._set.rounding_seed is None  # as timm: no stochastic rounding of fp16


# -- stochastic rounding ---------------------------------------------------------------------


class Flat(nn.Module):
    """Two float32 parameters of many elements (independent trials of the rounding): ``up`` starts
    at 1.0 (bf16 spacing 2**-7 in [1, 2)), ``down`` at -0.75 (spacing 2**-8 in [0.5, 1))."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.full((n,), 1.0))
        self.down = nn.Parameter(torch.full((n,), -0.75))


def test_stochastic_rounding_matches_timm_in_distribution():
    """A bf16 EMA (``dtype=torch.bfloat16``) of a float32 model whose values jump at once to a
    target ``b`` (1.3 and -0.6, not bf16 values), then ``K`` updates with ``w = 1 - decay = 1e-3``:
    each step moves the float32 result by ``w * |b - ema|`` < 3.5e-4, far below half of bf16's
    spacing (>= 1.9e-3), so rounding to nearest never moves the EMA; stochastic rounding moves it
    in expectation.

    Both roundings are unbiased (the stored value's conditional expectation is the float32 result
    ``r``), and lerp is affine, so ``E[ema_K] = b + (a - b)(1 - w)^K`` for every element, up to the
    float32 arithmetic (< ``K * 2**-22`` relative, included in the bound). The deviation is a sum of
    martingale increments ``(1 - w)^(K - k) e_k`` with ``E[e_k^2 | past] <= s^2 / 4`` (``s`` the bf16
    spacing), so ``Var(ema_K) <= K s^2 / 4``; the N elements draw independent bits, so the mean
    over them has standard deviation at most ``sigma = s sqrt(K) / (2 sqrt(N))``. Each mean is
    checked within ``6 sigma`` of the expectation, and ours against timm's within
    ``6 sqrt(2) sigma``: with N = 2**17 the means are Gaussian to a good approximation and each
    check fails by chance with probability below 2e-9 (the 6-sigma two-sided tail; the variance is
    a bound, so less), below 1e-8 for the 4 + 2 checks together. (Both streams are seeded, so the
    test is deterministic: the rate is that of picking a failing seed.) Rounding to nearest misses
    by more than 100 sigma, so the check has the power to tell them apart."""
    n, steps, w = 2 ** 17, 20, 1e-3
    model = Flat(n)
    options = dict(decay=1 - w, dtype=torch.bfloat16, stochastic_rounding_seed=3)
    theirs, ours = TimmModelEmaV3(model, **options), ModelEmaV3(model, **options)
    nearest = ModelEmaV3(model, **dict(options, stochastic_rounding=False))
    targets = {"up": (1.0, 1.3, 2.0 ** -7), "down": (-0.75, -0.6, 2.0 ** -8)}
    with torch.no_grad():
        for name, (_, b, _) in targets.items():
            getattr(model, name).fill_(b)
    for _ in range(steps):
        for ema in (theirs, ours, nearest):
            ema.update(model)  # step None: the constant decay, as timm
    assert ours.module.up.dtype == torch.bfloat16 and ours._engine._set.rounding_seed == 3
    for name, (a, b, spacing) in targets.items():
        expected = b + (a - b) * (1 - w) ** steps
        sigma = spacing * math.sqrt(steps) / (2 * math.sqrt(n))
        arithmetic = steps * 2.0 ** -22 * max(abs(a), abs(b))
        ours_mean = getattr(ours.module, name).double().mean().item()
        theirs_mean = getattr(theirs.module, name).double().mean().item()
        assert abs(ours_mean - expected) <= 6 * sigma + arithmetic, (name, ours_mean, expected, sigma)
        assert abs(theirs_mean - expected) <= 6 * sigma + arithmetic, (name, theirs_mean, expected, sigma)
        assert abs(ours_mean - theirs_mean) <= 6 * math.sqrt(2) * sigma + 2 * arithmetic
        nearest_mean = getattr(nearest.module, name).double().mean().item()
        assert nearest_mean == a and abs(nearest_mean - expected) > 100 * sigma


def test_stochastic_rounding_is_bitwise_reproducible_for_a_seed():
    def run(seed: int, offload: bool = False) -> Dict[str, torch.Tensor]:
        model = bn_net()
        ema = ModelEmaV3(model, decay=0.99, use_warmup=True, dtype=torch.bfloat16, stochastic_rounding_seed=seed)
        if offload:
            force_host_offload(ema._engine, model)
        train(model, [ema], steps=8)
        assert ema.n_averaged.item() == 8
        return ema.state_dict()

    first = run(5)
    assert all(v.dtype == torch.bfloat16 for v in first.values() if v.is_floating_point())
    assert_states_equal(run(5), first)
    assert_states_equal(run(5, offload=True), first)  # the asynchronous path draws the same bits
    other = run(6)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_stochastic_rounding_can_be_switched_off_mid_run_as_timms():
    model = Flat(4096)
    options = dict(decay=1 - 1e-3, dtype=torch.bfloat16)
    ours, theirs = ModelEmaV3(model, **options), TimmModelEmaV3(model, **options)
    with torch.no_grad():
        model.up.fill_(1.3)
        model.down.fill_(-0.6)
    for ema in (ours, theirs):
        ema.update(model)
        ema.stochastic_rounding = False
    assert ours._engine._set.rounding_seed is None
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for ema in (ours, theirs):
        ema.update(model)  # a step far below half of bf16's spacing: rounded to nearest, nothing moves
    assert_states_equal(ours.state_dict(), before)
    ours.stochastic_rounding = True
    assert ours._engine._set.rounding_seed == 0
    ours.update(model)
    assert any(not torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    with pytest.raises(TypeError, match="ModelEmaV3: stochastic_rounding must be a bool"):
        ours.stochastic_rounding = 1


def test_a_bf16_ema_resumes_its_stream_when_the_counter_is_restored():
    model = bn_net()
    options = dict(decay=0.95, dtype=torch.bfloat16)
    straight = ModelEmaV3(model, **options)
    resumed: List[ModelEmaV3] = []

    def checkpoint(i: int) -> None:
        if i == 5:  # after 5 updates: save and restore as a resumed run would
            ema = ModelEmaV3(bn_net(), **options)
            ema.load_state_dict(saved(straight.state_dict()))
            ema.n_averaged.fill_(int(straight.n_averaged))
            resumed.append(ema)
        if resumed:
            resumed[0].update(model, step=i + 1)

    train(model, [straight], steps=10, between=checkpoint)
    assert_states_equal(resumed[0].state_dict(), straight.state_dict())


# -- get_decay, set, forward, module ------------------------------------------------------------


@pytest.mark.parametrize("options", [
    dict(),
    dict(decay=0.999),
    dict(decay=0.99, update_after_step=10),
    dict(decay=0.9999, use_warmup=True),
    dict(decay=0.9999, use_warmup=True, warmup_power=0.75, warmup_gamma=3.0, update_after_step=5),
    dict(decay=0.99, use_warmup=True, min_decay=0.5),
    dict(decay=0.3, use_warmup=True, min_decay=0.6),  # min_decay above decay: timm's clamp order
    dict(decay=1.0, use_warmup=True, warmup_power=1.0),
])
def test_get_decay_is_timms(options):
    model = nn.Linear(3, 2)
    theirs, ours = TimmModelEmaV3(model, **options), ModelEmaV3(model, **options)
    for step in [None, -3, 0, 1, 2, 3, 5, 6, 7, 10, 11, 12, 50, 1000, 31622, 10 ** 6, 2 ** 40]:
        expected = theirs.get_decay(step)
        got = ours.get_decay(step)
        assert isinstance(got, float) and got == expected, (step, got, expected)
    assert ours.get_decay(torch.tensor(12)) == theirs.get_decay(12)


def test_set_copies_the_model_as_timm():
    model = bn_net()
    theirs, ours = TimmModelEmaV3(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    train(model, [theirs, ours], steps=4)
    theirs.set(model)
    ours.set(model)
    assert_states_equal(ours.state_dict(), theirs.state_dict())
    assert_states_equal(ours.module.state_dict(), model.state_dict())
    train(model, [theirs, ours], steps=3, seed=2)  # and the updates go on from there
    assert_states_equal(ours.state_dict(), theirs.state_dict())


def test_module_is_an_eval_mode_copy_and_forward_runs_it():
    model = bn_net()
    model.train()
    ours, theirs = ModelEmaV3(model, decay=0.9), TimmModelEmaV3(model, decay=0.9)
    assert not ours.module.training and model.training
    assert ours.module is not model
    assert all(e.data_ptr() != p.data_ptr() for e, p in zip(ours.module.parameters(), model.parameters()))
    train(model, [ours, theirs], steps=3)
    x = bn_net_inputs(1, seed=9)[0]
    with torch.no_grad():
        out = ours(x)
        assert torch.equal(out, ours.module(x))
        assert torch.equal(out, theirs(x))
    assert not ours.module.training  # a forward in eval mode: BatchNorm statistics untouched
    assert_states_equal(ours.state_dict(), theirs.state_dict())


def test_device_and_dtype_place_the_module_as_timm():
    model = bn_net()
    ours = ModelEmaV3(model, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in ours.module.parameters())
    assert ours.module[1].num_batches_tracked.dtype == torch.long
    assert ours.device == "cpu" and ours.dtype == torch.float64
    theirs = TimmModelEmaV3(model, device="cpu", dtype=torch.float64)
    assert_states_equal(ours.state_dict(), theirs.state_dict())


def test_a_host_offloaded_ema_equals_the_direct_one_and_reads_wait():
    # The path of a CPU EMA of a CUDA model (staging copies, worker thread), run on host tensors.
    model = bn_net()
    direct, offloaded = ModelEmaV3(model, decay=0.9, use_warmup=True), ModelEmaV3(model, decay=0.9, use_warmup=True)
    force_host_offload(offloaded._engine, model)

    def read_at_once(i: int) -> None:  # .module waits for the update in flight
        if i:
            assert torch.equal(offloaded.module[0].weight, direct.module[0].weight)
            assert int(offloaded.n_averaged) == i

    train(model, [direct, offloaded], steps=6, between=read_at_once)
    assert offloaded._engine._set._offload is not None
    assert_states_equal(offloaded.state_dict(), direct.state_dict())
    x = bn_net_inputs(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(offloaded(x), direct(x))


# -- checkpoints ---------------------------------------------------------------------------------


def test_state_dict_has_timms_keys_and_nothing_else():
    model = bn_net()
    ours, theirs = ModelEmaV3(model), TimmModelEmaV3(model)
    state = ours.state_dict()
    assert list(state) == list(theirs.state_dict()) == ["module." + k for k in model.state_dict()]
    assert "n_averaged" not in state and "n_skipped" not in state
    assert list(get_state_dict(ours)) == list(get_state_dict(theirs)) == list(model.state_dict())


@pytest.mark.parametrize("direction", ["timm_loads_ours", "ours_loads_timms"])
@pytest.mark.parametrize("via", ["state_dict", "state_dict_ema"])
def test_checkpoints_interchange_and_continue_equal(direction, via):
    """A checkpoint of one class, loaded by the other mid-run, then both updated on: equal bitwise.
    ``state_dict``: the wrapper's (``module.<name>``); ``state_dict_ema``: timm's CheckpointSaver's
    ``get_state_dict(model_ema, unwrap_model)``, loaded as timm's train.py resumes it
    (``load_checkpoint(model_ema.module, ..., use_ema=True)``: into ``.module``)."""
    model = bn_net()
    options = dict(decay=0.95, use_warmup=True, update_after_step=1)
    source = (ModelEmaV3 if direction == "timm_loads_ours" else TimmModelEmaV3)(model, **options)
    target_class = TimmModelEmaV3 if direction == "timm_loads_ours" else ModelEmaV3
    reference = ModelEmaV3(model, **options)
    loaded: List[nn.Module] = []

    def resume(i: int) -> None:
        if i == 5:
            target = target_class(bn_net(torch.float32).apply(_scramble), **options)
            if via == "state_dict":
                target.load_state_dict(saved(source.state_dict()))
            else:
                unwrap_model(target).load_state_dict(saved(get_state_dict(source)))
            assert_states_equal(target.state_dict(), source.state_dict())
            loaded.append(target)
        if loaded:
            loaded[0].update(model, step=i + 1)

    train(model, [source, reference], steps=10, between=resume)
    assert_states_equal(loaded[0].state_dict(), reference.state_dict())
    assert_states_equal(source.state_dict(), reference.state_dict())


def _scramble(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.add_(1.0)


def test_resume_from_a_mid_run_state_dict_equals_an_uninterrupted_run():
    model = bn_net()
    options = dict(decay=0.97, use_warmup=True, update_after_step=2, min_decay=0.2)
    straight = ModelEmaV3(model, **options)
    resumed: List[ModelEmaV3] = []

    def checkpoint(i: int) -> None:
        if i == 4:
            ema = ModelEmaV3(bn_net(), **options)
            ema.load_state_dict(saved(straight.state_dict()))
            resumed.append(ema)
        if resumed:
            resumed[0].update(model, step=i + 1)

    train(model, [straight], steps=10, between=checkpoint)
    assert_states_equal(resumed[0].state_dict(), straight.state_dict())
    assert moved(straight, model)


def test_copies_and_pickles_continue_equal():
    model = bn_net()
    ema = ModelEmaV3(model, decay=0.9)
    train(model, [ema], steps=3)
    copied = copy.deepcopy(ema)
    buffer = io.BytesIO()
    torch.save(ema, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    train(model, [ema, copied, unpickled], steps=3, first_step=4, seed=2)
    assert_states_equal(copied.state_dict(), ema.state_dict())
    assert_states_equal(unpickled.state_dict(), ema.state_dict())
    assert copied.module[0].weight.data_ptr() != ema.module[0].weight.data_ptr()


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,error,match", [
    (dict(decay=1.5), ValueError, "decay must be a number in \\[0, 1\\]"),
    (dict(decay="0.9"), ValueError, "decay must be a number in \\[0, 1\\]"),
    (dict(min_decay=-0.1), ValueError, "min_decay must be a number in \\[0, 1\\]"),
    (dict(update_after_step=1.0), TypeError, "update_after_step must be an int"),
    (dict(use_warmup=1), TypeError, "use_warmup must be a bool"),
    (dict(warmup_gamma=0.0), ValueError, "warmup_gamma must be a positive finite number"),
    (dict(warmup_power=float("nan")), ValueError, "warmup_power must be a positive finite number"),
    (dict(dtype=torch.int8), ValueError, "dtype must be None or a floating dtype"),
    (dict(dtype="bfloat16"), ValueError, "dtype must be None or a floating dtype"),
    (dict(stochastic_rounding="yes"), TypeError, "stochastic_rounding must be a bool"),
    (dict(stochastic_rounding_seed=1.5), TypeError, "stochastic_rounding_seed must be a 64-bit integer"),
    (dict(stochastic_rounding_seed=2 ** 64), TypeError, "stochastic_rounding_seed must be a 64-bit integer"),
    (dict(exclude_buffers=None), TypeError, "exclude_buffers must be a bool"),
    (dict(foreach="no"), TypeError, "foreach must be a bool"),
])
def test_bad_arguments_are_refused_clearly(options, error, match):
    with pytest.raises(error, match="ModelEmaV3: " + match):
        ModelEmaV3(nn.Linear(2, 2), **options)


def test_bad_model_and_steps_are_refused_clearly():
    with pytest.raises(TypeError, match="ModelEmaV3: model must be a torch.nn.Module"):
        ModelEmaV3({"weight": torch.zeros(2)})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' does not exist"):
            ModelEmaV3(nn.Linear(2, 2), device="cuda")
    model = bn_net()
    ema = ModelEmaV3(model, use_warmup=True)
    with pytest.raises(TypeError, match="ModelEmaV3.update: model must be a torch.nn.Module"):
        ema.update(model.state_dict())
    with pytest.raises(ValueError, match="ModelEmaV3.update: the model has 2 parameters but the EMA 8"):
        ema.update(nn.Linear(2, 2))
    other = bn_net()
    other[4] = nn.Linear(8 * 6 * 6, 11)
    with pytest.raises(ValueError, match="parameters 4 has shape \\(11, 288\\) in the model but \\(10, 288\\)"):
        ema.update(other)
    with pytest.raises(ValueError, match="ModelEmaV3.update: step must be >= 0"):
        ema.update(model, step=-1)
    with pytest.raises(TypeError, match="ModelEmaV3.update: step must be an int"):
        ema.update(model, step=2.0)
    with pytest.raises(ValueError, match="step must be an int or a 0-dim integer tensor"):
        ema.update(model, step=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="ModelEmaV3: decay must be a number in \\[0, 1\\]"):
        ema.decay = 2.0
    with pytest.raises(TypeError, match="ModelEmaV3: use_warmup must be a bool"):
        ema.use_warmup = "yes"
    with pytest.raises(TypeError, match="ModelEmaV3.set: model must be a torch.nn.Module"):
        ema.set(None)
    with pytest.raises(ValueError, match="ModelEmaV3.set: the model's state dict has 2 entries but the EMA's 14"):
        ema.set(nn.Linear(2, 2))
    assert ema.decay == 0.9999 and ema.use_warmup  # refused changes changed nothing
    ema.update(model, step=3)  # and it still works
    with pytest.raises(RuntimeError, match="Missing key"):
        ema.load_state_dict({"module.0.weight": torch.zeros(8, 3, 3, 3)})


# -- the example --------------------------------------------------------------------------------


def test_the_example_runs():
    result = subprocess.run([sys.executable, str(EXAMPLES / "with_timm.py"), "--steps", "100", "--bf16-ema"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "EMA (decay" in result.stdout and "module.0.weight" in result.stdout
