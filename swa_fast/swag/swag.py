"""``SWAG``: a Gaussian over the SGD iterates (Maddox et al., NeurIPS 2019), collected on the
averaging core in one fused pass per collection.

What a collection keeps, per parameter (the core's store: three tensors per name and a ring block):

* the mean: the equal-weight (SWA) average of the collected weights;
* the variance: the centred second moment, updated by the weighted Welford recurrence
  ``var <- (1 - w) (var + w (x - mean)^2)`` with ``w = 1/(n+1)``. The reference code keeps
  ``E[x^2]`` and subtracts ``E[x]^2`` at the end, which in fp32 loses every digit when the weights'
  spread is below ``sqrt(eps) * |mean|`` (a weight of 1.0 that moves by 1e-4 has a variance of
  1e-8, below fp32's resolution of ``E[x^2] = 1``); the centred form never subtracts two large
  numbers;
* the deviations ``x - mean`` (mean after the update, as the reference code) of the last
  ``max_rank`` collections: columns of a ring block preallocated with the averages, written in
  place (no reallocation, no host sync).
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor
from torch.nn import Module

from swa_fast._checks import check_number
from swa_fast.averaging.average_set import AverageSet, Device, check_avg_dtype, parse_device
from swa_fast.averaging.sharding import dtensor_like, reshard
from swa_fast.averaging.slots import named_tensor_slots, unwrap
from swa_fast.averaging.state import Writes, check_averages, check_count
from swa_fast.averaging.step import Member, moments_update
from swa_fast.averaging.stores import NamedStore
from swa_fast.averaging.swap import holder_of, swapped
from swa_fast.swag.sampling import Draw, check_generator, sample_tensor

MEAN, VARIANCE, FIRST_COLUMN = 0, 1, 2  # the store's tensors per name


class SWAG:
    r"""SWA-Gaussian: the SWA mean, a diagonal variance and a low-rank deviation matrix of a
    model's parameters over the collected iterates, for sampling models (Bayesian model averaging).

    Args:
        model: the model (plain, DDP, ``torch.compile``; FSDP2 shards: each rank keeps the moments
            and deviations of its local shards). Its floating parameters are collected; buffers
            are not (BatchNorm statistics are recomputed for each sample, see :func:`bma_predict`).
        max_rank: the number of deviation columns kept (the reference code's ``max_num_models``,
            the paper's K = 20). 0 keeps none (diagonal SWAG only).
        avg_dtype: keyword-only; dtype of the moments and deviations (``torch.float32`` for a
            bf16/fp16 model). Default: the parameters'.
        device: keyword-only; where they live. ``"cpu"`` for a CUDA model keeps them (the ring
            included, ``max_rank`` model copies) in host memory through the core's offload: a
            collection copies the model to pinned memory on a side stream and updates on the host.
        var_clamp: keyword-only; the variance is read as ``max(var, var_clamp)`` (the reference
            code's clamp), so its square root is defined.

    Example::

        swag = SWAG(model, max_rank=20)
        for epoch in range(swa_start, epochs):
            train_one_epoch(model)
            swag.collect(model)
        probs = bma_predict(swag, model, test_loader, n_samples=30, bn_loader=train_loader)
    """

    def __init__(self, model: Module, max_rank: int = 20, *, avg_dtype: Optional[torch.dtype] = None,
                 device: Optional[Device] = None, var_clamp: float = 1e-30) -> None:
        if not isinstance(model, Module):
            raise TypeError(f"SWAG: model must be a torch.nn.Module, got {type(model).__name__}")
        self.max_rank = check_number("max_rank", max_rank, minimum=0, integer=True, owner="SWAG")
        self.var_clamp = float(check_number("var_clamp", var_clamp, minimum=0, owner="SWAG"))
        check_avg_dtype(avg_dtype, "SWAG")
        parsed = parse_device(device, "SWAG")
        model = unwrap(model, "SWAG")
        for name, _, tensor in named_tensor_slots(model, "_parameters"):
            if not tensor.is_floating_point():
                raise TypeError(f"SWAG: parameter {name!r} is {tensor.dtype}: SWAG fits a Gaussian to floating "
                                "parameters only")
        with torch.no_grad():
            reshard(model)
            store = NamedStore(model, 1, False, avg_dtype, parsed, None, "SWAG", zeroed=1, columns=self.max_rank)
        self._set = AverageSet(store, [Member.new(None, store.home())], False, "SWAG")
        self._collected = 0  # host mirror of n_averaged (no skipping here): which ring column is next

    # -- collecting ---------------------------------------------------------------------

    def collect(self, model: Module) -> None:
        """Add ``model``'s current weights: the mean and variance updated and ``w - mean`` written
        into the next ring column, in one fused pass (each weight read once), the weight ``1/(n+1)``
        computed on the device: no host sync. The first collection sets the mean to the weights."""
        member = self._member
        if holder_of(unwrap(model, "SWAG.collect")) is member:
            raise RuntimeError("SWAG.collect: not inside sampled_into() or swapped_into(): the model holds a sample "
                               "(or the mean) there, not its own weights; collect after the block")
        column = FIRST_COLUMN + self._collected % self.max_rank if self.max_rank else None

        def collect(plan, step, currents=None, skip=None) -> None:
            moments_update(plan, member, column, currents, skip)

        self._set.apply(model, collect, None, "SWAG.collect")
        self._collected += 1

    @property
    def _member(self) -> Member:
        return self._set.members[0]

    @property
    def n_collected(self) -> int:
        """How many models have been collected."""
        return self._collected

    @property
    def rank(self) -> int:
        """How many deviation columns are held now: ``min(n_collected, max_rank)``."""
        return min(self._collected, self.max_rank)

    def synchronize(self) -> None:
        """Block until offloaded collections have been applied (reading waits by itself)."""
        self._set.synchronize()

    def order_writes(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        """As :meth:`swa_fast.WeightAverage.order_writes` (offloaded collections only)."""
        self._set.order_writes(stream)

    def close(self) -> None:
        """Apply what is in flight and stop the offload worker; further collections are refused."""
        self._set.close()

    # -- reading ------------------------------------------------------------------------

    def _tensors(self, index: int, action: str) -> Dict[str, Tensor]:
        self._set.ready(0, action, "SWAG")
        return self._set.store.averages[index]

    def _as_state(self, tensors: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        layouts = self._set.store.layouts
        return {name: dtensor_like(t, layouts[name]) if name in layouts else t for name, t in tensors.items()}

    def mean_state(self) -> Dict[str, Tensor]:
        """``{parameter name: the SWA mean}`` (sharing storage with it; DTensors for FSDP2 shards)."""
        return self._as_state(self._tensors(MEAN, "mean_state"))

    def variance_state(self) -> Dict[str, Tensor]:
        """``{parameter name: max(variance, var_clamp)}``: the diagonal variance (new tensors)."""
        return self._as_state({name: v.clamp(min=self.var_clamp)
                               for name, v in self._tensors(VARIANCE, "variance_state").items()})

    def deviation_state(self) -> Dict[str, Tensor]:
        """``{parameter name: the held deviations, shape (rank, *parameter shape)}``, oldest first
        (new tensors; local shards for FSDP2 parameters)."""
        self._set.ready(0, "deviation_state", "SWAG")
        store = self._set.store
        order = self._chronological()
        return {name: torch.stack([store.averages[FIRST_COLUMN + c][name] for c in order]) if order else
                store.averages[MEAN][name].new_empty((0, *store.averages[MEAN][name].shape))
                for name in store.names}

    def _chronological(self) -> List[int]:
        """The held ring columns, oldest first."""
        if self._collected <= self.max_rank or not self.max_rank:
            return list(range(self.rank))
        start = self._collected % self.max_rank
        return [(start + j) % self.max_rank for j in range(self.max_rank)]

    # -- using it -----------------------------------------------------------------------

    @contextlib.contextmanager
    def swapped_into(self, model: Module) -> Iterator[Module]:
        """The SWA mean in ``model`` for the block (the core's swap rule; buffers are restored on
        exit, so ``update_bn`` inside changes nothing after it)."""
        with self._set.swapped_into(model, MEAN, "SWAG.swapped_into") as inner:
            yield inner

    @contextlib.contextmanager
    def sampled_into(self, model: Module, scale: float = 0.5, cov: bool = True,
                     generator: Optional[torch.Generator] = None) -> Iterator[Module]:
        r"""One sample of the Gaussian in ``model``'s parameters for the block; its own values
        (parameters and buffers: ``update_bn`` inside is undone) come back bitwise on exit.

        The sample is the reference code's: ``mean + sqrt(scale) * (sqrt(diag) * z1 + D z2 / sqrt(K - 1))``
        with ``cov=True`` (D: the K held deviation columns), ``mean + sqrt(scale) * sqrt(diag) * z1``
        with ``cov=False``; z1, z2 standard normal, drawn on the moments' device (from ``generator``
        when given, which must be on that device). Its covariance is ``scale * (diag + D D^T / (K - 1))``,
        so ``scale=0.5`` is the paper's ``(Sigma_diag + Sigma_low-rank) / 2``; ``scale=0`` is the
        mean. K is the number of columns held (the reference code divides by ``max_rank - 1`` even
        before the ring is full, which shrinks the low-rank part of early samples).

        Every rank draws the same z2, and z1 of every parameter at its full shape (a sharded rank
        keeps its slice), so with the same generator seed the ranks of DDP or FSDP2 hold one
        coherent sample: the very sample of the unsharded model.
        """
        who = "SWAG.sampled_into"
        scale = float(check_number("scale", scale, minimum=0, owner=who))
        if not isinstance(cov, bool):
            raise TypeError(f"{who}: cov must be a bool, got {cov!r}")
        if self._collected < 2:
            raise RuntimeError(f"{who}: {self._collected} model(s) collected; the Gaussian needs at least two "
                               "collections (call collect() after each epoch of the collection phase)")
        if cov and self.max_rank < 2:
            raise ValueError(f"{who}: cov=True needs max_rank >= 2 (this SWAG keeps {self.max_rank} deviation "
                             "column(s)); sample with cov=False for diagonal SWAG")
        targets = self._set.targets(model, MEAN, "sampled_into", who)
        store = self._set.store
        home = store.home()
        check_generator(generator, home, who)
        draw = Draw(generator, home)
        columns = [FIRST_COLUMN + c for c in range(self.rank)] if cov else []
        z2 = draw.normal((len(columns),), torch.float64) if cov else None
        samples = []
        with torch.no_grad():
            for name, target, mean in targets:
                block = store.blocks[name][:len(columns)] if cov else None
                samples.append(sample_tensor(mean, store.averages[VARIANCE][name], block, z2, scale, self.var_clamp,
                                             draw, store.layouts.get(name)))
        inner = unwrap(model, who)
        with swapped(inner, self._member, [(t, s) for (_, t, _), s in zip(targets, samples)],
                     {id(t) for _, t, _ in targets}):
            yield inner

    # -- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """``{"mean", "variance", "deviations", "n_averaged", "ring_position", "max_rank"}``: the
        mean and raw (unclamped) variance by name, the ring block's columns in storage order
        (``{"0": {name: column}, ...}``), the count and the next column to write, so that
        collection resumes exactly. Tensors share storage with the SWAG's (DTensors for FSDP2
        shards, which ``torch.distributed.checkpoint`` saves and loads)."""
        self._set.ready(0, "state_dict", "SWAG")
        store = self._set.store
        return {
            "mean": self._as_state(store.averages[MEAN]),
            "variance": self._as_state(store.averages[VARIANCE]),
            "deviations": {str(c): self._as_state(store.averages[FIRST_COLUMN + c]) for c in range(self.max_rank)},
            "n_averaged": self._member.n_averaged,
            "ring_position": self._collected % self.max_rank if self.max_rank else 0,
            "max_rank": self.max_rank,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` saved (here, on another number of ranks, or unsharded). The
        whole state is checked (names, shapes, dtypes, the count, the ring's size and position)
        before anything is written."""
        who = "SWAG"
        self._set.ready(0, "load_state_dict", who)
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"SWAG.load_state_dict: expected a dict, as SWAG.state_dict() returns, got "
                            f"{type(state_dict).__name__}")
        needed = ("mean", "variance", "deviations", "n_averaged", "ring_position", "max_rank")
        missing = [key for key in needed if key not in state_dict]
        if missing:
            raise ValueError(f"SWAG.load_state_dict: the state has no {missing} (keys: {sorted(state_dict)}); "
                             "expected what SWAG.state_dict() returns")
        saved_rank = state_dict["max_rank"]
        if isinstance(saved_rank, bool) or not isinstance(saved_rank, numbers.Integral) or saved_rank != self.max_rank:
            raise ValueError(f"SWAG.load_state_dict: the state was saved with max_rank={saved_rank!r} but this SWAG "
                             f"has max_rank={self.max_rank}; make it with the same max_rank")
        store = self._set.store
        count = check_count(state_dict["n_averaged"], "n_averaged", who)
        n = int(count)
        position = check_count(state_dict["ring_position"], "ring_position", who)
        expected = n % self.max_rank if self.max_rank else 0
        if int(position) != expected:
            raise ValueError(f"SWAG.load_state_dict: ring_position {int(position)} does not fit n_averaged {n} "
                             f"(with max_rank {self.max_rank} the next column is {expected})")
        deviations = state_dict["deviations"]
        keys = [str(c) for c in range(self.max_rank)]
        if not isinstance(deviations, Mapping) or sorted(deviations) != sorted(keys):
            got = sorted(deviations) if isinstance(deviations, Mapping) else type(deviations).__name__
            raise ValueError(f"SWAG.load_state_dict: 'deviations' must hold the columns {keys} (max_rank "
                             f"{self.max_rank}), got {got}")
        writes = Writes()
        for where, saved, index in (("mean: ", state_dict["mean"], MEAN),
                                    ("variance: ", state_dict["variance"], VARIANCE),
                                    *((f"deviations[{c}]: ", deviations[str(c)], FIRST_COLUMN + c)
                                      for c in range(self.max_rank))):
            writes.extend(check_averages(saved, store.averages[index], store.layouts, True, who, where))
        writes.counts.append((self._member.n_averaged, count))
        writes.apply()
        self._collected = n
        self._set.loaded()

    def __repr__(self) -> str:
        store = self._set.store
        return (f"SWAG(tensors={len(store.names)}, max_rank={self.max_rank}, n_collected={self._collected}, "
                f"avg_dtype={store.avg_dtype}, device={store.device}, var_clamp={self.var_clamp})")


__all__ = ["SWAG"]
