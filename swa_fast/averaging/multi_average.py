"""``MultiAverage``: several averages of one model (SWA and EMAs of several decays, ...),
updated together in one fused pass that reads each of the model's tensors once.

Bytes per fp32 parameter and update: K separate averages read the model K times and each
average once and write it (12 K bytes); one pass reads the model once (4 + 8 K bytes).
"""

from __future__ import annotations

from collections.abc import Mapping as MappingABC
from typing import Any, Dict, Iterator, Mapping, Optional

import torch
from torch.nn import Module
from torch.nn.modules.module import _IncompatibleKeys

from swa_fast.averaging.average_set import Device, Step
from swa_fast.averaging.slots import Include
from swa_fast.averaging.state import Writes
from swa_fast.averaging.step import MultiAvgFn
from swa_fast.averaging.weight_average import WeightAverage, new_named_set


class MultiAverage(MappingABC):
    r"""Several running averages of a model's weights, updated in one fused pass.

    Args:
        model: as for :class:`~swa_fast.WeightAverage` (plain, DDP, ``torch.compile``, FSDP2 shards).
        multi_avg_fns: ``{name: multi_avg_fn}``, one average per entry, in this order; each as
            ``WeightAverage``'s ``multi_avg_fn`` (``None`` for SWA). The fused ones (SWA,
            :func:`get_ema_multi_avg_fn`) share one pass; a custom function runs as torch runs it.
        use_buffers, avg_dtype, device, skip_nonfinite, include: as for ``WeightAverage``, for
            every average (they share one layout).
        stochastic_rounding, stochastic_rounding_seed: as for ``WeightAverage``; average ``k`` (in
            ``multi_avg_fns``' order) draws with seed ``stochastic_rounding_seed + k``, so it is
            bitwise a ``WeightAverage`` with that seed. Each average is then its own pass over the
            model (one ``average_stochastic_`` call each) instead of one pass for all.

    ``multi[name]`` is that average as a :class:`~swa_fast.WeightAverage` (``swapped_into``,
    ``copy_to``, ``averaged_copy``, ``state_dict``, ``n_averaged``; its ``update`` updates it
    alone). Each average keeps its own counts, so its weight is computed on the device from its
    own ``n_averaged``. An update of all of them is bitwise the same as as many separate
    ``WeightAverage`` updates, and works wherever ``WeightAverage`` works (DDP, FSDP2 shards,
    host offload: one staging copy of the model serves every average).

    Example::

        averages = MultiAverage(model, {"swa": None, "ema": get_ema_multi_avg_fn(0.999),
                                        "ema_fast": get_ema_multi_avg_fn(0.99)})
        for step, batch in enumerate(loader):
            train_step(batch)
            averages.update(model, step)        # one read of the model for all three
        with averages["ema"].swapped_into(model):
            evaluate(model)
    """

    def __init__(
        self,
        model: Module,
        multi_avg_fns: Mapping[str, Optional[MultiAvgFn]],
        use_buffers: bool = False,
        *,
        avg_dtype: Optional[torch.dtype] = None,
        device: Optional[Device] = None,
        skip_nonfinite: bool = False,
        include: Include = None,
        stochastic_rounding: bool = False,
        stochastic_rounding_seed: int = 0,
    ) -> None:
        if not isinstance(multi_avg_fns, Mapping) or not multi_avg_fns:
            raise TypeError("MultiAverage: multi_avg_fns must be a non-empty dict {name: multi_avg_fn}, got "
                            f"{multi_avg_fns!r}")
        names = list(multi_avg_fns)
        if not all(isinstance(name, str) and name for name in names):
            raise TypeError(f"MultiAverage: the averages' names must be non-empty strings, got {names!r}")
        self._names = names
        self._set = new_named_set(model, [multi_avg_fns[n] for n in names], use_buffers, avg_dtype, device,
                                  skip_nonfinite, include, "MultiAverage", stochastic_rounding,
                                  stochastic_rounding_seed)
        self._views = {name: WeightAverage._member(self._set, k, f"MultiAverage[{name!r}]")
                       for k, name in enumerate(names)}

    # -- the mapping of averages ---------------------------------------------------------

    def __getitem__(self, name: str) -> WeightAverage:
        try:
            return self._views[name]
        except KeyError:
            raise KeyError(f"MultiAverage has no average {name!r}; it has {self._names}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    # -- updating ------------------------------------------------------------------------

    def update(self, model: Module, step: Step = None) -> None:
        """Update every average from ``model`` in one pass (one read of each tensor; per device a
        few kernel launches, no host sync with fused functions). ``step``: as for
        :meth:`WeightAverage.update`."""
        self._set.update(model, None, step, "MultiAverage")

    def synchronize(self) -> None:
        """As :meth:`WeightAverage.synchronize`, for every average."""
        self._set.synchronize()

    def order_writes(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        """As :meth:`WeightAverage.order_writes`."""
        self._set.order_writes(stream)

    def close(self) -> None:
        """As :meth:`WeightAverage.close`, for every average."""
        self._set.close()

    def to(self, device: Optional[Device] = None, dtype: Optional[torch.dtype] = None) -> "MultiAverage":
        """Move (and/or convert) every average; returns ``self``."""
        self._set.to(device, dtype, "MultiAverage")
        return self

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        """``{name: that average's WeightAverage.state_dict()}`` for every average."""
        return {name: view.state_dict() for name, view in self._views.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> _IncompatibleKeys:
        """Load what :meth:`state_dict` saved: every average's state is checked before anything of
        any is written. ``strict=False`` loads the averages (and, within each, the names) both have;
        the keys it returns are ``"average_name"`` for whole averages and ``"average_name.tensor"``."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"MultiAverage.load_state_dict: expected a dict {{average name: state}}, got "
                            f"{type(state_dict).__name__}")
        missing = [name for name in self._names if name not in state_dict]
        unexpected = [name for name in state_dict if name not in self._views]
        if strict and (missing or unexpected):
            raise ValueError(f"MultiAverage.load_state_dict: missing averages {missing}, unexpected {unexpected} "
                             f"(this MultiAverage has {self._names})")
        writes = Writes()
        for k, name in enumerate(self._names):
            if name in state_dict:
                member = self._set.check_member_state(k, state_dict[name], strict, "MultiAverage", f"{name!r}: ")
                member.missing = [f"{name}.{key}" for key in member.missing]
                member.unexpected = [f"{name}.{key}" for key in member.unexpected]
                writes.extend(member)
        writes.apply()
        self._set.loaded()
        return _IncompatibleKeys(missing + writes.missing, unexpected + writes.unexpected)

    def __repr__(self) -> str:
        fns = ", ".join(f"{name!r}: {self[name].multi_avg_fn!r}" for name in self._names)
        first = self[self._names[0]]
        return (f"MultiAverage({{{fns}}}, use_buffers={first.use_buffers}, avg_dtype={first.avg_dtype}, "
                f"device={first.device}, skip_nonfinite={first.skip_nonfinite})")
