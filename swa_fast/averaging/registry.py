"""A counter that changes whenever any nn.Module gains or swaps a parameter,
buffer or submodule, anywhere in the process.

AveragedModel caches the tensor lists it averages; comparing this counter is
how a cached list learns, in O(1) per update, that a model's structure may
have changed (``model.fc = nn.Linear(...)``, ``bn.running_mean = t``). Moving
a model with ``.to()`` keeps the same Parameter objects (their data is swapped
in place), so it needs no invalidation.
"""

from __future__ import annotations

from torch.nn.modules import module as _module

_generation = 0


def _slot_for(registry: str):
    """A hook that bumps the counter when ``module.<registry>[name]`` gets another object.

    Re-assigning the same object (``self.n_averaged += 1`` in torch's
    AveragedModel re-registers the buffer it just added to in place) is no
    structural change and leaves the counter alone.
    """

    def hook(module, name, value):
        global _generation
        if getattr(module, registry, {}).get(name) is not value:
            _generation += 1

    return hook


_module.register_module_parameter_registration_hook(_slot_for("_parameters"))
_module.register_module_buffer_registration_hook(_slot_for("_buffers"))
_module.register_module_module_registration_hook(_slot_for("_modules"))


def generation() -> int:
    """The current value of the counter."""
    return _generation
