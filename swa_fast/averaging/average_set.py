"""The engine every average runs on: K averages of one model's tensors, updated in one pass.

:class:`AverageSet` owns a store (``stores.py``: the averages), the members (``step.Member``: each
average's function and counts), the cached plan (``plan.py``), the offload pipeline
(``offload.py``) and the swap-in state (``swap.py``). ``MultiAverage`` is a set with K named
members, ``WeightAverage`` a view of one member (its own set of one, or a ``MultiAverage``'s),
``AveragedModel`` a set of one over its module's tensors.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn import Module

from swa_fast.averaging.offload import OffloadPipeline
from swa_fast.averaging.plan import UpdatePlan, build_plan
from swa_fast.averaging.sharding import dtensor_like, local_tensor, reshard
from swa_fast.averaging.slots import unwrap
from swa_fast.averaging.state import Writes, check_member_state
from swa_fast.averaging.step import Member, fused_update, skip_flag, unfused_update
from swa_fast.averaging.stores import ModuleStore, NamedStore
from swa_fast.averaging.swap import holder_of, refuse_if_held_by_another, swapped

Device = Union[int, str, torch.device]
Step = Union[None, int, Tensor]
# One update on a plan: work(plan, step, currents=None, skip=None); currents and skip are given when
# the offload pipeline staged them.
Work = Callable[..., None]


def parse_device(device: Optional[Device], owner: str) -> Optional[torch.device]:
    """``device`` as a torch.device; an error that names it when this machine has no such device."""
    if device is None:
        return None
    parsed = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{owner}: device={device!r} does not exist: no CUDA device is available")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{owner}: device={device!r} does not exist: this machine has {count} CUDA device(s)")
    return parsed


def check_avg_dtype(avg_dtype: Optional[torch.dtype], owner: str = "") -> None:
    """Averages are float16, bfloat16, float32 or float64 (float8 has no arithmetic to average in)."""
    allowed = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if avg_dtype is not None and avg_dtype not in allowed:
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}avg_dtype must be a floating dtype with arithmetic (float16, bfloat16, float32 "
                         f"or float64), got {avg_dtype}")


class AverageSet:
    """K averages of one model's tensors (see the module docstring)."""

    def __init__(self, store: Union[NamedStore, ModuleStore],
                 members: Union[List[Member], Callable[[], List[Member]]], skip_nonfinite: bool, owner: str,
                 rounding_seed: Optional[int] = None) -> None:
        self.store = store
        self.rounding_seed = rounding_seed  # fp16/bf16 averages rounded stochastically (None: to nearest)
        # A list, or (AveragedModel, whose .to() replaces its count buffers) what reads them.
        self._members = members
        self.skip_nonfinite = skip_nonfinite
        self.owner = owner
        self.synchronous = False  # AveragedModel: an update is complete when it returns (torch's contract)
        self._plan: Optional[UpdatePlan] = None
        self._plan_offloads = False
        self._force_offload = False  # tests: run the pipeline on host tensors
        self._offload: Optional[OffloadPipeline] = None
        self._swapped: set = set()  # indices of the members swapped into a model now
        self._fresh = isinstance(store, NamedStore)  # never written: the averages follow the model's layout
        self._closed = False
        self._updates = 0  # calls to update: what a failed offloaded update is called by

    @property
    def members(self) -> List[Member]:
        return self._members if isinstance(self._members, list) else self._members()

    # -- updating ---------------------------------------------------------------

    def update(self, model: Module, indices: Optional[Sequence[int]] = None, step: Step = None,
               name: Optional[str] = None) -> None:
        """One update of the members ``indices`` (all by default) from ``model``; ``step``: the
        optimizer step (an int or a 0-dim integer tensor), for step-driven warm-ups."""
        who = name or self.owner
        members = self.members
        indices = list(range(len(members))) if indices is None else list(indices)
        fused = [i for i in indices if members[i].fused is not None]
        unfused = [i for i in indices if members[i].fused is None]
        chosen = [members[i] for i in fused]

        def update_fused(plan: UpdatePlan, step_tensor: Optional[Tensor], currents=None, skip=None) -> None:
            fused_update(plan, chosen, fused, self.skip_nonfinite, step_tensor, currents, skip)

        plan = self.apply(model, update_fused if fused else None, step, who)
        for index in unfused:
            self.synchronize()
            unfused_update(plan, members[index], index, self.skip_nonfinite)

    def apply(self, model: Module, work: Optional[Work], step: Step, who: str) -> UpdatePlan:
        """Run one update ``work(plan, step, currents=None, skip=None)`` from ``model``: checked (open,
        not from a model holding these averages or another average's), on the cached
        plan, directly or through the offload pipeline (which stages the currents and the skip
        flag and calls ``work`` with them on its worker). Returns the plan."""
        self._check_open(who, "update")
        if self._offload is not None:
            self._offload.raise_failures()
        if isinstance(self.store, NamedStore):
            model = unwrap(model, who)
        self._refuse_if_model_holds_averages(model, who)
        plan = self._plan_for(model)
        step_tensor = self._step_tensor(step, who)
        self._updates += 1
        if work is not None:
            if self._plan_offloads:
                self._submit(plan, work, step_tensor)
            else:
                work(plan, step_tensor)
        self._fresh = False
        return plan

    def _submit(self, plan: UpdatePlan, work: Work, step: Optional[Tensor]) -> None:
        if self._offload is None:
            self._offload = OffloadPipeline(self.owner)
        flag = None
        if self.skip_nonfinite:  # decided on the GPU (and across shards) here, staged with the copies
            sources = plan.current_sources()
            flag = skip_flag(plan, sources, next((t.device for t in sources if t.is_cuda), sources[0].device))
        self._offload.submit(plan, lambda currents, scalars: work(plan, scalars[1], currents, scalars[0]),
                             f"update {self._updates} (the {_ordinal(self._updates)} call to update())", [flag, step])
        if self.synchronous:
            self._offload.wait()

    def _step_tensor(self, step: Step, who: str) -> Optional[Tensor]:
        if step is None:
            return None
        if isinstance(step, Tensor):
            if step.dim() != 0 or step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
                raise ValueError(f"{who}.update: step must be an int or a 0-dim integer tensor, got a "
                                 f"{step.dtype} tensor of shape {tuple(step.shape)}")
            return step
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"{who}.update: step must be an int or a 0-dim integer tensor, got {step!r}")
        if step < 0:
            raise ValueError(f"{who}.update: step must be >= 0, got {step}")
        # A fill, not a host-to-device copy: no sync.
        return torch.full((), step, dtype=torch.long, device=self.members[0].n_averaged.device)

    def _plan_for(self, model: Module) -> UpdatePlan:
        plan = self._plan
        if plan is None or not plan.is_current(model):
            reshard(model)  # FSDP2 modules left gathered by an evaluation hold no DTensors
            store = self.store
            if isinstance(store, NamedStore):
                self._fit_layout(model)
            plan = self._plan = build_plan(model, store.entries(model), self.owner, self.rounding_seed)
            self._plan_offloads = self._force_offload or any(
                group.device.type == "cpu" and any(t.is_cuda for t in group.current_tensors())
                for group in plan.groups)
        return plan

    def _fit_layout(self, model: Module) -> None:
        """Never-written averages follow the model's layout (sharded, moved, converted or materialized
        after they were made); written ones must keep fitting it."""
        store: NamedStore = self.store
        if self._fresh:
            if store.layout_differs(model, exact=True) is not None:
                self.synchronize()
                store.relayout(model)
                home = store.home()
                for member in self.members:
                    member.move_to(home)
            return
        reason = store.layout_differs(model, exact=False)
        if reason is not None:
            raise ValueError(f"{self.owner}: {reason}")

    def forget_plan(self) -> None:
        """Drop the cached tensor lists (the averages moved: the next update rebuilds them)."""
        self.synchronize()
        self._plan = None

    def _refuse_if_model_holds_averages(self, model: Module, who: str) -> None:
        members = self.members
        holder = holder_of(model)
        if any(holder is member for member in members):
            raise RuntimeError(f"{who}.update: not inside swapped_into(): the model holds the averages there "
                               "and the averages the model's values; call it after the block")
        refuse_if_held_by_another(model, members, "update", who)

    # -- waiting, ordering, closing ------------------------------------------------

    def synchronize(self) -> None:
        """Block until every update in flight has been applied (only offloaded updates are ever in
        flight); raise a failed one's error."""
        if self._offload is not None:
            self._offload.wait()

    def order_writes(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        """Make later writes on ``stream`` (default: each device's current stream) wait, on the GPU
        and without a host sync, for the copies of offloaded updates still reading the model."""
        if self._offload is not None:
            self._offload.order_writes(stream)

    def close(self) -> None:
        """Apply what is in flight and stop the offload worker; the set refuses updates afterwards."""
        if self._offload is not None:
            offload, self._offload = self._offload, None
            offload.close()
        self._closed = True

    def _check_open(self, who: str, action: str) -> None:
        if self._closed:
            raise RuntimeError(f"{who}.{action}: the average was closed (close()); its averages can still be "
                               "read, but it takes no more updates")

    # -- one member's averages ---------------------------------------------------------

    def ready(self, index: int, action: str, who: str) -> None:
        """Before a call that reads or writes member ``index``'s averages: not while it is swapped
        in, and after every update in flight."""
        if index in self._swapped:
            raise RuntimeError(f"{who}.{action}: not inside swapped_into(): the model holds the averages there "
                               "and the averages the model's values; call it after the block")
        self.synchronize()

    def counts(self, index: int) -> Tuple[Tensor, Tensor]:
        member = self.members[index]
        return member.n_averaged, member.n_skipped

    def targets(self, model: Module, index: int, action: str, who: str) -> List[Tuple[str, Tensor, Tensor]]:
        """(name, the model's tensor the average replaces (its local shard), the average)."""
        self.ready(index, action, who)
        store = self._named(action)
        model = unwrap(model, who)
        reshard(model)
        averages = store.averages[index]
        if store.from_meta and self._fresh:
            raise ValueError(f"{who}.{action}: the averages were made from a model on the meta device and hold no "
                             "values yet; update them from the materialized model first")
        targets = []
        for name, _, tensor in store.named_model_tensors(model):
            target, average = local_tensor(tensor), averages[name]
            if target.shape != average.shape:
                raise ValueError(f"{who}.{action}: {name!r} has shape {tuple(target.shape)} in the model "
                                 f"but its average {tuple(average.shape)}")
            targets.append((name, target, average))
        return targets

    @contextlib.contextmanager
    def swapped_into(self, model: Module, index: int, who: str) -> Iterator[Module]:
        targets = self.targets(model, index, "swapped_into", who)
        model = unwrap(model, who)
        owner = self.members[index]
        with swapped(model, owner, [(t, a) for _, t, a in targets], {id(t) for _, t, _ in targets}):
            self._swapped.add(index)
            try:
                yield model
            finally:
                self._swapped.discard(index)

    def copy_to(self, model: Module, index: int, who: str) -> None:
        refuse_if_held_by_another(unwrap(model, who), [self.members[index]], "copy_to", who)
        with torch.no_grad():
            for _, target, average in self.targets(model, index, "copy_to", who):
                target.copy_(average)

    def member_state(self, index: int, who: str) -> Dict[str, Any]:
        self.ready(index, "state_dict", who)
        store = self._named("state_dict")
        averages = {name: dtensor_like(average, store.layouts[name]) if name in store.layouts else average
                    for name, average in store.averages[index].items()}
        n_averaged, n_skipped = self.counts(index)
        state = {"averages": averages, "n_averaged": n_averaged, "n_skipped": n_skipped}
        last_step = self.members[index].last_step
        if last_step is not None:
            state["last_step"] = last_step
        return state

    def check_member_state(self, index: int, state: Any, strict: bool, who: str, where: str = "") -> Writes:
        self.ready(index, "load_state_dict", who)
        store = self._named("load_state_dict")
        return check_member_state(state, store.averages[index], store.layouts, self.counts(index), strict, who, where,
                                  last_step=self.members[index].last_step)

    def loaded(self) -> None:
        """After a load: the averages hold values now, so their layout is fixed."""
        self._fresh = False

    def module_state(self, index: int, model: Optional[Module], who: str) -> Dict[str, Tensor]:
        """Member ``index``'s averages under every key ``model.state_dict()`` has for them (tied
        aliases; persistent buffers only), with ``model``'s own values for the keys not averaged."""
        self.ready(index, "module_state_dict", who)
        store = self._named("module_state_dict")
        averages = self.member_state(index, who)["averages"]
        by_key = {key: averages[name] for name in store.names for key in store.state_keys[name]}
        if model is None:
            return by_key
        full = unwrap(model, who).state_dict()
        return {key: by_key.get(key, value) for key, value in full.items()}

    def to(self, device: Optional[Device], dtype: Optional[torch.dtype], who: str) -> None:
        self.synchronize()
        if any(self._swapped):
            raise RuntimeError(f"{who}.to: not inside swapped_into()")
        store = self._named("to")
        parsed = parse_device(device, who)
        check_avg_dtype(dtype, who)
        store.to(parsed, dtype)
        home = store.home()
        for member in self.members:
            member.move_to(home)
        self._plan = None

    def _named(self, action: str) -> NamedStore:
        if not isinstance(self.store, NamedStore):  # pragma: no cover - AveragedModel exposes none of these
            raise RuntimeError(f"{action} is for WeightAverage; AveragedModel is a module: use its own methods")
        return self.store

    def __getstate__(self) -> Dict[str, Any]:
        # The cached plan holds the source model's tensors (and a weakref); the offload pipeline
        # holds a thread and pinned buffers. A copy or a pickle rebuilds both when it first updates.
        self.synchronize()
        state = dict(self.__dict__)
        state.update(_plan=None, _plan_offloads=False, _offload=None, _swapped=set())
        return state


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
