"""Module hooks on what a pass replaces: carried over where their meaning holds, a reason to skip otherwise.

A hook belongs to a module object; a pass that swaps the module would drop it silently. A forward hook
on a BatchNorm observes the normalised output, which the module left in the BN's slot still returns, so
it is carried there (its input no longer exists: a hook that reads it gets a clear error); a forward
pre-hook keeps its meaning on a module that reads the same input. Every other hook (on a conv whose
output changes meaning in training, a BN's pre-hook, backward and state_dict hooks) makes the pass leave
that site alone and say why.
"""
from __future__ import annotations

import dataclasses
import warnings
import weakref
from typing import List, Optional, Sequence

import torch.nn as nn

__all__ = ["HookSet", "hooks_of", "carry_hooks", "carry_output_hooks", "MissingInput", "OutputOnlyHook", "hook_reason",
           "warn_hook_skips"]


@dataclasses.dataclass(frozen=True)
class HookSet:
    """How many hooks of each kind a module holds (global hooks are not the module's and not counted)."""

    forward_pre: int = 0
    forward: int = 0
    backward: int = 0
    state_dict: int = 0

    @property
    def any(self) -> bool:
        return bool(self.forward_pre or self.forward or self.backward or self.state_dict)

    def kinds(self, forward_pre: bool = True, forward: bool = True) -> List[str]:
        """Names of the kinds present, leaving out those asked not to be listed."""
        named = [("forward pre-hook", self.forward_pre if forward_pre else 0),
                 ("forward hook", self.forward if forward else 0), ("backward hook", self.backward),
                 ("state_dict hook", self.state_dict)]
        return [name for name, count in named if count]


def _count(module: nn.Module, *names: str) -> int:
    return sum(len(getattr(module, name, None) or {}) for name in names)


def hooks_of(module: nn.Module) -> HookSet:
    return HookSet(
        forward_pre=_count(module, "_forward_pre_hooks"),
        forward=_count(module, "_forward_hooks"),
        backward=_count(module, "_backward_hooks", "_backward_pre_hooks"),
        state_dict=_count(module, "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                          "_load_state_dict_post_hooks"))


def hook_reason(module: nn.Module, role: str, carries_pre: bool = False, carries_forward: bool = False
                ) -> Optional[str]:
    """Why the hooks on ``module`` (the site's ``role``, e.g. "conv") stop the pass, or None.

    ``carries_pre`` / ``carries_forward``: the pass carries those kinds to the replacing module.
    """
    kinds = hooks_of(module).kinds(forward_pre=not carries_pre, forward=not carries_forward)
    if not kinds:
        return None
    return (f"{role} {type(module).__name__} has a {' and a '.join(kinds)}, which would not mean the same on the "
            "module replacing it; remove the hook (or exclude this site) to rewrite it")


class MissingInput(tuple):
    """The ``args`` a carried output hook receives: the hooked module's input does not exist any more, and a
    hook that reads it gets this error instead of another tensor."""

    def __new__(cls, owner: str) -> "MissingInput":
        new = super().__new__(cls)
        new.owner = owner
        return new

    def _refuse(self, *_):
        raise RuntimeError(
            f"acfx: this forward hook was registered on {self.owner}, whose input no longer exists in the rewritten "
            "model (the module in its slot returns what it returned, from other inputs), so the hook sees the "
            "output only. Register a hook that does not read its input, or remove the hook before the rewrite.")

    __getitem__ = __iter__ = __len__ = __bool__ = __contains__ = _refuse


class OutputOnlyHook:
    """A forward hook carried to a module that returns what the hooked module returned from another input:
    the hook gets the output as before and, for its input, a MissingInput that refuses to be read."""

    def __init__(self, hook, owner: str, original: nn.Module) -> None:
        self.hook = hook
        self.owner = owner
        self.original = weakref.ref(original)

    def __call__(self, module: nn.Module, args, *rest):  # rest: (output,) or, with_kwargs, (kwargs, output)
        if module is self.original():  # the module put back after a failed rewrite: its input is real
            return self.hook(module, args, *rest)
        return self.hook(module, MissingInput(self.owner), *rest)


_PRE = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
_FORWARD = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _unwrapped(hook):
    return hook.hook if isinstance(hook, OutputOnlyHook) else hook


def _move(source: nn.Module, target: nn.Module, names: Sequence[str]) -> None:
    for name in names:
        src, dst = getattr(source, name, None), getattr(target, name, None)
        if src is not None and dst is not None:
            dst.update({key: _unwrapped(value) if name == names[0] else value for key, value in src.items()})


def carry_hooks(source: nn.Module, target: nn.Module, forward_pre: bool = False, forward: bool = False) -> None:
    """Register ``source``'s forward pre-hooks and/or forward hooks on ``target``, same ids, order and flags
    (with_kwargs, always_call), after any ``target`` already has. ``target`` reads the input ``source`` read:
    hooks carried away from their input by ``carry_output_hooks`` get it back."""
    if forward_pre:
        _move(source, target, _PRE)
    if forward:
        _move(source, target, _FORWARD)


def carry_output_hooks(source: nn.Module, target: nn.Module, owner: str) -> None:
    """Carry ``source``'s forward hooks to ``target``, which returns what ``source`` returned from another input.

    Each hook sees the output and a MissingInput for its input. When ``target`` has no forward hooks yet, it
    takes ``source``'s hook dicts themselves, so a handle the user kept still removes the hook.
    """
    hooks = getattr(source, _FORWARD[0])
    for key, hook in list(hooks.items()):
        if not isinstance(hook, OutputOnlyHook):
            hooks[key] = OutputOnlyHook(hook, owner, source)
    if not hooks_of(target).forward:
        for name in _FORWARD:
            setattr(target, name, getattr(source, name))
    else:
        _move(source, target, _FORWARD)


def warn_hook_skips(pass_name: str, names: Sequence[str]) -> None:
    """One warning for the sites a pass left alone because of hooks: their owner may expect a rewrite."""
    if names:
        listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        warnings.warn(f"acfx.{pass_name}: {len(names)} site(s) left as they are because of module hooks ({listed}): "
                      "the hooks would not mean the same on the modules replacing them; see the report "
                      "(return_report=True)", UserWarning, stacklevel=3)
