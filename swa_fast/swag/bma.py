"""Bayesian model averaging with SWAG: :func:`bma_predict` and :class:`MultiSWAG`."""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn import Module

from swa_fast._checks import check_number
from swa_fast.averaging.update_bn import _to_device, update_bn
from swa_fast.swag.swag import SWAG


class MultiSWAG:
    """Several independent SWAG runs (different seeds, so different basins), ensembled: MultiSWAG
    (Wilson and Izmailov, 2020). :func:`bma_predict` draws ``n_samples`` from each and averages
    every sample's probabilities with equal weight.

    Example::

        runs = []
        for seed in range(3):
            model = train(seed)                  # each run collects its own SWAG
            runs.append(swag_of_that_run)
        probs = bma_predict(MultiSWAG(runs), model, test_loader, n_samples=10, bn_loader=train_loader)
    """

    def __init__(self, swags: Sequence[SWAG]) -> None:
        swags = list(swags)
        if not swags or not all(isinstance(s, SWAG) for s in swags):
            raise TypeError(f"MultiSWAG: give a non-empty list of SWAG objects, got {swags!r}")
        names = [tuple(s._set.store.names) for s in swags]
        if any(n != names[0] for n in names):
            raise ValueError("MultiSWAG: the SWAGs were made for different models (their parameter names differ)")
        self.swags = swags

    def __len__(self) -> int:
        return len(self.swags)

    def __getitem__(self, index: int) -> SWAG:
        return self.swags[index]

    def __iter__(self) -> Iterator[SWAG]:
        return iter(self.swags)

    def state_dict(self) -> Dict[str, Any]:
        """``{"0": the first SWAG's state_dict(), ...}``."""
        return {str(i): swag.state_dict() for i, swag in enumerate(self.swags)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` saved (every SWAG's state is checked before any is loaded:
        each load checks its own whole state first, and a count mismatch is refused up front)."""
        keys = [str(i) for i in range(len(self.swags))]
        if not isinstance(state_dict, Mapping) or sorted(state_dict) != sorted(keys):
            got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"MultiSWAG.load_state_dict: expected the states {keys}, got {got}")
        for key, swag in zip(keys, self.swags):
            swag.load_state_dict(state_dict[key])


def _inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _bn_batches(bn_loader: Iterable[Any], fraction: float) -> Iterable[Any]:
    """The first ``ceil(fraction * len(bn_loader))`` batches (all of them for 1.0)."""
    if fraction >= 1.0:
        return bn_loader
    if not hasattr(bn_loader, "__len__"):
        raise TypeError("bma_predict: bn_fraction < 1 needs a bn_loader with a length")
    return list(itertools.islice(bn_loader, max(1, math.ceil(fraction * len(bn_loader)))))


@torch.no_grad()
def _predict(model: Module, loader: Iterable[Any], device: Optional[torch.device],
             forward_fn: Optional[Callable[[Module, Any], Tensor]]) -> Tuple[Tensor, Optional[Tensor]]:
    """Softmax probabilities over ``loader`` (float64 on the CPU) and the targets when batches carry them."""
    was_training = model.training
    model.eval()
    probs, targets = [], []
    try:
        for batch in loader:
            moved = batch if device is None else _to_device(batch, device)
            logits = forward_fn(model, moved) if forward_fn is not None else model(_inputs(moved))
            probs.append(torch.softmax(logits.double(), dim=-1).cpu())
            if isinstance(batch, (list, tuple)) and len(batch) > 1 and isinstance(batch[1], Tensor):
                targets.append(batch[1].cpu())
    finally:
        model.train(was_training)
    if not probs:
        raise ValueError("bma_predict: the loader gave no batches")
    return torch.cat(probs), (torch.cat(targets) if len(targets) == len(probs) else None)


def bma_predict(
    swag: Union[SWAG, MultiSWAG],
    model: Module,
    loader: Iterable[Any],
    n_samples: int = 30,
    bn_loader: Optional[Iterable[Any]] = None,
    scale: float = 0.5,
    *,
    cov: bool = True,
    generator: Optional[torch.Generator] = None,
    bn_fraction: float = 1.0,
    device: Optional[Union[str, torch.device]] = None,
    forward_fn: Optional[Callable[[Module, Any], Tensor]] = None,
    progress: bool = True,
    return_targets: bool = False,
) -> Union[Tensor, Tuple[Tensor, Optional[Tensor]]]:
    r"""Bayesian model averaging: the mean of the softmax probabilities of ``n_samples`` SWAG
    samples (of each SWAG of a :class:`MultiSWAG`) on ``loader``.

    For each sample: the sample goes into ``model`` (:meth:`SWAG.sampled_into`), its BatchNorm
    statistics are recomputed on ``bn_loader`` (the first ``bn_fraction`` of its batches; no
    recomputation when None), and ``loader`` is predicted in eval mode. ``model`` has its own
    weights and statistics back afterwards.

    Args:
        swag: a :class:`SWAG` (or :class:`MultiSWAG`) collected from ``model``.
        model: the model to sample into.
        loader: the batches to predict (a tensor, or a list/tuple whose first element is the
            input and second, when present, the target), in a fixed order (no shuffling).
        n_samples: samples per SWAG (the paper: 30).
        bn_loader: training batches for ``update_bn``.
        scale: the covariance scale (0.5: the paper's (diag + low rank)/2; see ``sampled_into``).
        cov: keyword-only; the low-rank part too (False: SWAG-diagonal).
        generator: keyword-only; for reproducible samples (on the moments' device).
        bn_fraction: keyword-only; the share of ``bn_loader`` used per sample, in (0, 1].
        device: keyword-only; move batches there first.
        forward_fn: keyword-only; ``forward_fn(model, batch) -> logits`` for batches of another shape.
        progress: keyword-only; a tqdm progress bar over the samples.
        return_targets: keyword-only; also return the targets the batches carried (or None).

    Returns:
        probabilities ``(N, C)``, float64 on the CPU (and the targets with ``return_targets``).
    """
    swags = list(swag) if isinstance(swag, MultiSWAG) else [swag]
    if not all(isinstance(s, SWAG) for s in swags):
        raise TypeError(f"bma_predict: swag must be a SWAG or MultiSWAG, got {type(swag).__name__}")
    n_samples = check_number("n_samples", n_samples, minimum=1, integer=True, owner="bma_predict")
    bn_fraction = float(check_number("bn_fraction", bn_fraction, above=0, maximum=1, owner="bma_predict"))
    check_number("scale", scale, minimum=0, owner="bma_predict")
    total = n_samples * len(swags)
    bar = _progress(total) if progress else None
    summed: Optional[Tensor] = None
    targets: Optional[Tensor] = None
    try:
        for member in swags:
            for _ in range(n_samples):
                with member.sampled_into(model, scale=scale, cov=cov, generator=generator) as inner:
                    if bn_loader is not None:
                        update_bn(_bn_batches(bn_loader, bn_fraction), inner, device)
                    probs, targets = _predict(inner, loader, None if device is None else torch.device(device),
                                              forward_fn)
                summed = probs if summed is None else summed.add_(probs)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    result = summed.div_(total)
    return (result, targets) if return_targets else result


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError("bma_predict(progress=True) needs tqdm: pip install tqdm, or pass progress=False") from error
    return tqdm(total=total, desc="bma_predict", unit="sample")


__all__ = ["MultiSWAG", "bma_predict"]
