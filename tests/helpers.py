"""What several test files need: reproducible tensors, the devices to test on, a free port,
small on-disk data sets in the recipes' formats and the recipe scripts as modules. Test files
import from here (pyproject's ``pythonpath`` puts tests/ on the path), never from conftest or
from each other."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Sequence, Union

import numpy as np
import pytest
import torch
from torch import Tensor

import swa_fast

from benchmarks.ranks import free_port, launch_ranks  # noqa: F401 (free_port: for the tests)

Shape = Union[int, Sequence[int]]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def make(shape: Shape, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0, *,
         offset: float = 0.0) -> Tensor:
    """Reproducible values of ``shape``: standard normal draws in float64 from a generator seeded
    with ``seed`` (plus ``offset``), cast to ``dtype`` on ``device``. Integer dtypes get the draws
    times 50, rounded and clamped to [-100, 100] (absolute values for uint8); bool gets draws > 0."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float64) + offset
    if dtype.is_floating_point or dtype.is_complex:
        return values.to(device=device, dtype=dtype)
    if dtype == torch.bool:
        return (values > 0).to(device)
    if dtype == torch.uint8:
        values = values.abs()
    return (values * 50).round().clamp(-100, 100).to(device=device, dtype=dtype)


def assert_bitwise(a, b) -> None:
    """Two dicts of tensors with the same keys, dtypes and bits."""
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def devices() -> List[object]:
    """The devices the op tests run on: the CPU always; CUDA (marked ``cuda``) when a GPU and a
    CUDA build are there."""
    found: List[object] = ["cpu"]
    if torch.cuda.is_available() and swa_fast.BUILD_INFO["cuda"]:
        found.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return found


ROOT = Path(__file__).resolve().parents[1]


def bn_net(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A small conv net with BatchNorm (2-D and 1-D), seeded: what the averaging tests train."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 10), torch.nn.BatchNorm1d(10),
    ).to(dtype)


def bn_net_inputs(count: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> List[Tensor]:
    """``count`` random batches for :func:`bn_net`, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=generator).to(dtype) for _ in range(count)]


def train_with_updates(model: torch.nn.Module, updates: Sequence, steps: int, dtype: torch.dtype = torch.float32,
                       poison_at: Optional[int] = None) -> None:
    """SGD on :func:`bn_net_inputs`; after every step each function in ``updates`` is called with
    the model. At step ``poison_at`` one weight is NaN during the updates (then 0)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step, x in enumerate(bn_net_inputs(steps, dtype)):
        loss = model(x).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == poison_at:
            with torch.no_grad():
                model[0].weight[0, 0, 0, 0] = float("nan")
        for update in updates:
            update(model)
        if step == poison_at:
            with torch.no_grad():
                model[0].weight[0, 0, 0, 0] = 0.0


def run_ranks(script: Path, args: Sequence[str], world: int, timeout: float = 120) -> None:
    """Runs ``python script *args`` as ``world`` gloo ranks (one thread each, tests/ importable)
    and fails with every failed rank's stderr; ranks still running after ``timeout`` seconds (a
    collective another rank skipped) are killed (:func:`benchmarks.ranks.launch_ranks`, which
    also retries a rendezvous port taken by another job)."""
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    errors = launch_ranks([sys.executable, str(script), *args], world, timeout, env)
    assert not errors, "\n".join(errors)


# ----------------------------------------------------------------- recipe results


def results_md_std(label: str) -> list[float]:
    """The ``± std`` of ``label``'s rows in docs/RESULTS.md's three-seed tables (the first column
    is the label, the second ``mean ± std``)."""
    found = []
    for line in (ROOT / "docs" / "RESULTS.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label and " ± " in cells[1]:
            found.append(float(cells[1].split(" ± ")[1]))
    return found


# ----------------------------------------------------------------- recipe data sets on disk


def write_pickle(path: Path, obj) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def make_cifar10(root: Path, per_batch: int = 3) -> dict[str, np.ndarray]:
    """The official layout: bytes keys, uint8 data rows, list labels."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    write_pickle(root / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072})
    data, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, per_batch).tolist()
        write_pickle(root / name, {b"batch_label": name.encode(), b"data": rows, b"labels": lab})
        data.append(rows)
        labels.append(lab)
    return {"train": np.concatenate(data[:5]), "train_labels": np.concatenate(labels[:5]),
            "test": data[5], "test_labels": np.asarray(labels[5])}


def save_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (8, 6), mode: str = "RGB") -> np.ndarray:
    """A (W, H) = size image with a color gradient (so a resize or transposition would show); returns HxWx3."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[...] = color
    pixels[:, :, 0] = (np.arange(w)[None, :] * 20 + np.arange(h)[:, None] * 3 + color[0]) % 256
    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image  # pillow: requirements-dev.txt

    img = Image.fromarray(pixels)
    if mode == "L":
        img = img.convert("L")
        pixels = np.asarray(img.convert("RGB"))
    img.save(path)
    return pixels


def make_folder(root: Path, train_split: str = "train", test_split: str = "test") -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for split, dirname in (("train", train_split), ("test", test_split)):
        for label, cls in enumerate(("glacier", "buildings")):  # sorted: buildings=0, glacier=1
            for i in range(2 if split == "train" else 1):
                out[split].append(save_image(root / dirname / cls / f"img{i}.png", (label * 100, 50 + i, 7)))
    return out


# ----------------------------------------------------------------- recipe scripts


def ending(printed: str) -> tuple[list[str], list[str]]:
    """What a recipe run printed, its end: the verdict's bullets (the last lines printed) and the outputs list
    just before them."""
    lines = printed.rstrip().splitlines()
    start = len(lines) - 1 - lines[::-1].index("Verdict:")
    listed = next(i for i in range(start, -1, -1) if lines[i].startswith("Outputs written to "))
    assert all(line.startswith("- ") for line in lines[start + 1:])  # nothing printed after the verdict
    return lines[start + 1:], lines[listed:start]


def finals(out: Path) -> dict[tuple[str, int], dict]:
    """(row label, seed) -> the final metrics of that row, from the results.json a recipe run wrote to ``out``."""
    runs = json.loads((out / "results.json").read_text())["runs"]
    return {(label, run["seed"]): metrics for run in runs for label, metrics in run["finals"].items()}


def load_recipe(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (the scripts are not a package), e.g. ``load_recipe("swa_tutorial")``."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------- the offload pipeline, host side


def force_host_offload(average, model: torch.nn.Module) -> None:
    """Make ``average`` (a WeightAverage, a MultiAverage or an AveragedModel's engine) take the
    offload path for ``model``'s host tensors, as it would for a CUDA model with host averages: the
    staging, the worker thread and the waits run, only the device copies are plain host copies."""
    average._set._force_offload = True
    average._set._plan = None
