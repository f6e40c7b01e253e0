"""What the code of a module that did not trace may touch below its children.

When a module's forward does not trace (data-dependent control flow, say), acfx traces its children
instead, assuming the forward calls each child as a whole. A forward that also reaches into a child
(``self.blk.conv(x)``, ``getattr(self.blk, name)``, a list of modules kept as a plain attribute) would call a
module acfx rewrote, unseen. Nothing ran, so nothing can be observed: the forward's code is read instead.
The names it uses (its bytecode's attribute and global names, through the methods of its own class it
calls) are compared with the path to each site; code that looks modules up dynamically reaches anything.
"""
from __future__ import annotations

import dataclasses
import types
from typing import FrozenSet, Iterable, Optional, Sequence, Set

import torch.nn as nn

__all__ = ["Reach", "reach_of", "reach_reason"]

# Names with which code finds submodules without naming them.
_DYNAMIC = frozenset({"getattr", "__getattr__", "__getattribute__", "_modules", "modules", "named_modules",
                      "children", "named_children", "get_submodule", "__dict__", "vars", "apply"})


@dataclasses.dataclass(frozen=True)
class Reach:
    """Names an untraced module's code uses (None: it looks modules up dynamically, so any), and the ids of
    modules it holds in plain (non-module) attributes."""

    names: Optional[FrozenSet[str]]
    held: FrozenSet[int]


def _code_names(code: types.CodeType) -> Set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # nested functions, comprehensions
            names |= _code_names(const)
    return names


def _function_code(function) -> Optional[types.CodeType]:
    function = getattr(function, "__func__", function)
    return getattr(function, "__code__", None)


def _names(module: nn.Module) -> Optional[FrozenSet[str]]:
    """co_names of the module's forward and of the methods of its class it names, transitively."""
    forward = module.__dict__.get("forward", type(module).forward)
    pending, seen, names = [forward], set(), set()
    while pending:
        code = _function_code(pending.pop())
        if code is None:
            return None  # compiled or wrapped code: what it touches cannot be read
        if code in seen:
            continue
        seen.add(code)
        found = _code_names(code)
        names |= found
        for name in found:
            method = getattr(type(module), name, None)
            if callable(method) and not isinstance(method, type) and _function_code(method) is not None \
                    and name not in vars(nn.Module):
                pending.append(method)
    if names & _DYNAMIC:
        return None
    return frozenset(names)


def _held_modules(value, depth: int = 0) -> Iterable[nn.Module]:
    if isinstance(value, nn.Module):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _held_modules(item, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for item in value.values():
            yield from _held_modules(item, depth + 1)


def reach_of(module: nn.Module) -> Reach:
    held = {id(m) for key, value in vars(module).items() if not key.startswith("_")
            for held in _held_modules(value) for m in held.modules()}
    return Reach(_names(module), frozenset(held))


def reach_reason(name: str, module: nn.Module, untraced: Sequence[tuple]) -> Optional[str]:
    """Why the module ``name`` may be used directly by the code of an untraced ancestor (None: it is not).

    ``untraced``: (qualified name, Reach) of every module that did not trace.
    """
    for owner, reach in untraced:
        prefix = f"{owner}." if owner else ""
        if not name.startswith(prefix) or name == owner:
            continue
        below_child = name[len(prefix):].split(".")[1:]
        if not below_child:
            continue  # a direct child: the traced part's own call
        label = owner or "<model>"
        if reach.names is None:
            return (f"'{label}' does not trace and its code looks up submodules dynamically (getattr, modules(), "
                    "...), so it may call this module directly, unseen; make its forward traceable or exclude it")
        used = [part for part in below_child if part in reach.names]
        if used:
            return (f"'{label}' does not trace and its code names {used}, so it may call this module directly, "
                    "unseen; make its forward traceable or exclude it")
        if id(module) in reach.held:
            return f"'{label}' does not trace and holds this module in a plain attribute, so it may call it directly"
    return None
