"""Rollback for PEFT operations that fail halfway: the module tree, hooks and patched forwards as they were.

A failed `get_peft_model`, `add_adapter`, `load_adapter` or `PeftModel.from_pretrained` must leave the model exactly as
it was. What these operations change is plain Python state on the modules they touch: child modules and parameters
replaced, hooks registered, an instance-level `forward`, `peft_config`, `training`, and `requires_grad` on the base
parameters. [`ModelSnapshot`] records that state and puts it back in place. Tensor values are not copied: adding or
loading an adapter writes only the adapter's own new tensors, never the base weights.
"""

from __future__ import annotations

from torch import nn


_CONTAINERS = (dict, list, set)


def _record(state: dict) -> list[tuple[str, object, object]]:
    # (key, value, contents): the value object itself, and a shallow copy of it when it is a container, so that it can
    # be refilled in place (a hook's RemovableHandle holds a weak reference to the very dict it was registered in)
    return [(key, value, value.copy() if isinstance(value, _CONTAINERS) else None) for key, value in state.items()]


def _refill(state: dict, recorded: list[tuple[str, object, object]]) -> None:
    state.clear()
    for key, value, contents in recorded:
        if isinstance(value, dict):
            value.clear()
            value.update(contents)
        elif isinstance(value, list):
            value[:] = contents
        elif isinstance(value, set):
            value.clear()
            value |= contents
        state[key] = value


class ModelSnapshot:
    """The attributes of `root` and of every module under it, and which parameters require grad.

    `restore()` puts them back: modules added since are dropped, modules replaced come back, hooks registered since
    are gone and the ones removed return, with the same dict objects as before.
    """

    def __init__(self, root: nn.Module):
        self._modules = [(module, _record(module.__dict__)) for module in root.modules()]
        self._requires_grad = [(param, param.requires_grad) for param in root.parameters()]

    def restore(self) -> None:
        for module, recorded in self._modules:
            _refill(module.__dict__, recorded)
        for param, requires_grad in self._requires_grad:
            param.requires_grad_(requires_grad)
