"""What code that tracing never ran may touch of a model: the forward of a module that did not trace, the
forward hooks and pre-hooks of a module, a ``__call__`` its class replaces.

When a module's forward does not trace (data-dependent control flow, say), acfx traces its children
instead, assuming the forward uses each child whole. A forward that also reaches into a child
(``self.blk.conv(x)``, ``getattr(self.blk, name)``, a list of modules kept as a plain attribute) would call
a module acfx rewrote, unseen. Nothing ran, so nothing can be observed: the code is read
(code_reader.py) and each site is checked against the paths it uses.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from typing import FrozenSet, List, Optional, Sequence, Tuple

import torch.fx as fx
import torch.nn as nn

from .code_reader import CodeReader, Use
from .code_values import ITEM, Path, covers, within

__all__ = ["Reach", "HookOwner", "reach_of", "hook_reach", "hook_owners", "reach_reason"]

# __call__ implementations that only call the module's forward (fx's adds error reporting around it).
_PLAIN_CALLS = (nn.Module.__call__, fx.GraphModule.__call__)


@dataclasses.dataclass(frozen=True)
class Reach:
    """What a module's untraced code may use: the paths it uses, and why it may use anything below the
    module (None: nothing like that)."""

    uses: FrozenSet[Use] = frozenset()
    anything: Optional[str] = None

    @functools.cached_property
    def ordered(self) -> Tuple[Use, ...]:
        """The uses in a stable order (reasons name the same use on every run)."""
        return tuple(sorted(self.uses, key=lambda u: (u.path, u.action)))

    def use_of(self, path: Path, calls_allowed: bool = False) -> Optional[Use]:
        """The first use that touches the module at ``path`` (None: none does); ``calls_allowed``: other than
        reading that module and calling it, which a traced part's root expects (its insides, or handing it
        on, still count)."""
        for use in self.ordered:
            if calls_allowed and use.path == path and use.action.startswith(("calls", "reads")) and not use.below:
                continue
            if use.named and within(use.path, path):
                return use
            if not use.named and covers(use.path, path, use.below):
                return use
        return None

    def uses_items_only(self, path: Path) -> bool:
        """Whether the code uses the items of the container at ``path`` but never calls it whole (its graph
        is then not what runs: the items are the parts)."""
        calls_whole = any(u.path == path and u.action.startswith("calls") for u in self.uses)
        items = any(len(u.path) == len(path) + 1 and u.path[:len(path)] == path and u.path[-1] == ITEM
                    and u.action.startswith("calls") for u in self.uses)
        return items and not calls_whole


def _path(name: str) -> Path:
    return tuple(name.split(".")) if name else ()


def _plain_call(module: nn.Module) -> bool:
    """The module's __call__ only calls its forward: nn.Module's, or the one fx writes for a GraphModule
    (error reporting around the generated forward) when the class brings no __call__ of its own."""
    call = type(module).__call__
    if call in _PLAIN_CALLS:
        return True
    wrapped = getattr(type(module), "_wrapped_call", None)
    return isinstance(module, fx.GraphModule) and getattr(call, "__qualname__", "").endswith(
        "recompile.<locals>.call_wrapped") and getattr(wrapped, "cls_call", True) is None


def _entries(module: nn.Module) -> List[object]:
    """The code that runs for a call of ``module``: its forward (the instance's, if replaced) and a __call__
    its class replaces."""
    entries = [module.__dict__.get("forward", type(module).forward)]
    if not _plain_call(module):
        entries.append(type(module).__call__)
    return entries


def _read(root: nn.Module, name: str, entries: Sequence[object], what: str, bind_module: bool) -> Reach:
    reader = CodeReader(root)
    module = root.get_submodule(name) if name else root
    for entry in entries:
        first = reader.value_of(module) if bind_module and not _binds_itself(entry) else None
        reader.read_call(entry, first, what)
    return Reach(reader.uses, reader.anything)


def _binds_itself(entry: object) -> bool:
    """A bound method or partial brings its own first argument (a forward replaced on the instance)."""
    return isinstance(entry, (types.MethodType, functools.partial))


def reach_of(root: nn.Module, name: str) -> Reach:
    """What the code of the module ``name`` of ``root`` (its forward, a replaced __call__) may use. Modules it
    keeps in plain attributes (a list of modules, a lambda or partial holding one) are read where that code
    takes them, by identity."""
    entries = _entries(root.get_submodule(name) if name else root)
    module = root.get_submodule(name) if name else root
    forward_replaced = "forward" in module.__dict__
    reach = _read(root, name, entries[:1], f"'{name or '<model>'}'.forward", bind_module=not forward_replaced)
    if len(entries) > 1:
        other = _read(root, name, entries[1:], f"'{name or '<model>'}'.__call__", bind_module=True)
        reach = Reach(reach.uses | other.uses, reach.anything or other.anything)
    return reach


def hook_reach(root: nn.Module, name: str, module: nn.Module) -> Optional[Reach]:
    """What the forward hooks and pre-hooks registered on ``module`` (at ``name`` in ``root``), or a
    ``__call__`` its class replaces, may use (None: it has neither): code tracing never sees."""
    hooks = [h for attr in ("_forward_pre_hooks", "_forward_hooks") for h in getattr(module, attr, {}).values()]
    calls = [] if _plain_call(module) else [type(module).__call__]
    if not hooks and not calls:
        return None
    reader = CodeReader(root)
    for hook in hooks:
        reader.read_call(getattr(hook, "hook", hook), reader.value_of(module), f"a hook on '{name or '<model>'}'",
                         inputs=2)  # acfx's carried hooks wrap the user's
    for call in calls:
        reader.read_call(call, reader.value_of(module), f"'{name or '<model>'}'.__call__")
    return Reach(reader.uses, reader.anything)


@dataclasses.dataclass(frozen=True)
class HookOwner:
    """A module whose forward hooks or pre-hooks run code tracing never sees, with the module at hand."""

    name: str
    reach: Reach
    kind: str = "hook"


def hook_owners(root: nn.Module) -> List[HookOwner]:
    """Every module of ``root`` with forward hooks or pre-hooks (or its own __call__), and what their code
    may use."""
    owners = []
    for name, module in root.named_modules():
        reach = hook_reach(root, name, module)
        if reach is not None:
            owners.append(HookOwner(name, reach))
    return owners


def reach_reason(name: str, module: nn.Module, owners: Sequence, part_root: bool = False) -> Optional[str]:
    """Why the module ``name`` may be used directly by code acfx did not trace (None: it is not).

    ``owners``: modules whose forward did not trace (their children are called as the traced parts) and
    modules with hooks (:class:`HookOwner`), each with a ``name`` and a :class:`Reach`. ``part_root``: the
    module is a traced part, which untraced code is expected to call; any other use of it counts.
    """
    site = _path(name)
    for owner in owners:
        hook = getattr(owner, "kind", "untraced") == "hook"
        label = owner.name or "<model>"
        what = (f"'{label}' has a forward hook (or its own __call__) whose code" if hook else
                f"'{label}' does not trace and its code")
        fix = "remove the hook or exclude this site" if hook else "make its forward traceable or exclude it"
        below = name != owner.name and (not owner.name or name.startswith(owner.name + "."))
        use = owner.reach.use_of(site, calls_allowed=part_root and not hook)
        if use is not None:
            where = f" in {use.where}" if use.where else ""
            return f"{what} {use.action}{where}, so it may call this module directly, unseen; {fix}"
        if below and owner.reach.anything:
            return (f"{what} may reach any module below it ({owner.reach.anything}), so it may call this module "
                    f"directly, unseen; {fix}")
    return None

