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
import dis
import functools
import types
from typing import FrozenSet, Iterable, List, Optional, Sequence, Set

import torch.nn as nn

__all__ = ["Reach", "HookOwner", "reach_of", "hook_reach", "hook_owners", "code_names", "reach_reason"]

# Names with which code finds submodules without naming them.
_DYNAMIC = frozenset({"__getattr__", "__getattribute__", "_modules", "modules", "named_modules", "children",
                      "named_children", "get_submodule", "__dict__", "vars", "apply", "attrgetter",
                      "methodcaller", "eval", "exec"})


@dataclasses.dataclass(frozen=True)
class Reach:
    """Names an untraced module's code uses (None: it looks modules up dynamically, so any), and the ids of
    modules it holds in plain (non-module) attributes."""

    names: Optional[FrozenSet[str]]
    held: FrozenSet[int]


def _first_argument(code: types.CodeType) -> Optional[str]:
    return code.co_varnames[0] if code.co_argcount else None


def _instructions(code: types.CodeType) -> List[dis.Instruction]:
    """The instructions that carry meaning here (no call bookkeeping), so that neighbours are operands."""
    return [i for i in dis.get_instructions(code) if i.opname not in ("PUSH_NULL", "PRECALL", "CACHE")]


def _constant_getattr_names(code: types.CodeType, own_lookup_ok: bool) -> Optional[Set[str]]:
    """The attribute names ``getattr`` is called with in ``code`` when each is a constant string (None:
    some call looks a name up that is not written in the code). ``own_lookup_ok``: a computed name looked up
    on the function's first argument (``getattr(self, name)``, mmdet's layer loop) reaches only a direct
    child, which the caller counts as called whole."""
    instructions = _instructions(code)
    names: Set[str] = set()
    for index, instruction in enumerate(instructions):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME") and instruction.argval == "getattr":
            owner = instructions[index + 1] if index + 1 < len(instructions) else None
            constant = instructions[index + 2] if index + 2 < len(instructions) else None
            if constant is not None and constant.opname == "LOAD_CONST" and isinstance(constant.argval, str):
                names.add(constant.argval)
            elif not (own_lookup_ok and owner is not None and owner.opname == "LOAD_FAST"
                      and owner.argval == _first_argument(code)):
                return None
    return names


def _indexed_containers(code: types.CodeType) -> Set[str]:
    """``[]X`` for each attribute X of the first argument the code indexes (``self.seq[0](x)`` calls one
    item of a container, which may be a conv or a BN on its own)."""
    instructions = _instructions(code)
    first = _first_argument(code)
    found = set()
    for index in range(len(instructions) - 2):
        load, attribute = instructions[index], instructions[index + 1]
        if load.opname == "LOAD_FAST" and load.argval == first and attribute.opname in ("LOAD_ATTR", "LOAD_METHOD"):
            if any(i.opname == "BINARY_SUBSCR" for i in instructions[index + 2:index + 4]):
                found.add(f"[]{attribute.argval}")
    return found


def _code_names(code: types.CodeType, own_lookup_ok: bool = False) -> Optional[Set[str]]:
    names = set(code.co_names) | _indexed_containers(code)
    if "getattr" in names:
        constants = _constant_getattr_names(code, own_lookup_ok)
        if constants is None:
            return None
        names |= constants
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # nested functions, comprehensions
            nested = _code_names(const, own_lookup_ok=False)
            if nested is None:
                return None
            names |= nested
    return names


def _function_code(function) -> Optional[types.CodeType]:
    function = getattr(function, "__func__", function)
    return getattr(function, "__code__", None)


def _callees(function, name: str, cls: type, names: Set[str]) -> List[object]:
    """What a name in ``function``'s code may run: a method or property of the class (and of its bases,
    for ``super()``), a Python function of the module the code was written in, or a method (named in the
    same code) of a class or object of that module."""
    found = []
    for klass in cls.__mro__:
        attribute = vars(klass).get(name)
        if klass is nn.Module or attribute is None:
            continue
        if isinstance(attribute, property):
            found += [f for f in (attribute.fget, attribute.fset) if f is not None]
        elif isinstance(attribute, (staticmethod, classmethod)):
            found.append(attribute.__func__)
        elif callable(attribute) and not isinstance(attribute, type):
            found.append(attribute)
    target = getattr(function, "__globals__", {}).get(name)
    if isinstance(target, types.FunctionType):
        found.append(target)
    elif target is not None and not isinstance(target, (types.ModuleType, types.BuiltinFunctionType)) \
            and getattr(type(target), "__module__", "") == getattr(function, "__module__", None) or \
            isinstance(target, type) and target.__module__ == getattr(function, "__module__", None):
        for other in names:  # HELPER.method(self, x): the methods the code names on it
            method = getattr(target, other, None)
            if isinstance(method, (types.FunctionType, types.MethodType)):
                found.append(method)
    return found


def code_names(entry, cls: type, own_lookup_ok: bool = False) -> Optional[FrozenSet[str]]:
    """Names the code starting at ``entry`` (a function or method of an object of class ``cls``) uses,
    through the methods, properties and module functions it names, transitively (None: it looks
    modules up dynamically, or runs code that cannot be read)."""
    while isinstance(entry, functools.partial):  # a hook bound to arguments (timm's FeatureHooks)
        entry = entry.func
    if isinstance(entry, types.MethodType) and not isinstance(entry.__self__, type):
        cls = type(entry.__self__)  # a method of another object: its own class's methods are what it calls
    pending, seen, names = [entry], set(), set()
    while pending:
        function = pending.pop()
        code = _function_code(function)
        if code is None:
            return None  # compiled or wrapped code: what it touches cannot be read
        if code in seen:
            continue
        seen.add(code)
        found = _code_names(code, own_lookup_ok)
        if found is None:
            return None
        names |= found
        if "super" in found:  # super().forward and friends: the bases' methods of every name used
            found = found | {"forward", "__call__"}
        for name in found:
            pending += _callees(getattr(function, "__func__", function), name, cls, found)
    if names & _DYNAMIC:
        return None
    return frozenset(names)


def _names(module: nn.Module) -> Optional[FrozenSet[str]]:
    """co_names of the module's forward (and its __call__ if the class replaces it), and of what they run."""
    entries = [module.__dict__.get("forward", type(module).forward)]
    if type(module).__call__ is not nn.Module.__call__:
        entries.append(type(module).__call__)
    names: Set[str] = set()
    for entry in entries:
        found = code_names(entry, type(module), own_lookup_ok=True)
        if found is None:
            return None
        names |= found
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
    elif depth < 3 and isinstance(value, functools.partial):
        yield from _held_modules((value.func, value.args, value.keywords), depth + 1)
    elif depth < 3 and isinstance(value, types.MethodType):
        yield from _held_modules(value.__self__, depth + 1)
    elif depth < 3 and isinstance(value, types.FunctionType) and value.__closure__:
        for cell in value.__closure__:
            try:
                yield from _held_modules(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                continue


def reach_of(module: nn.Module) -> Reach:
    """What ``module``'s own code (forward, a replaced __call__) may reach; a plain attribute holding the
    module itself (a lambda closing over ``self``, a partial of a helper) makes every module reachable."""
    held = {id(m) for key, value in vars(module).items() if key not in ("_modules", "_parameters", "_buffers")
            and not isinstance(value, nn.Module) for held in _held_modules(value) for m in held.modules()}
    names = None if id(module) in held else _names(module)
    return Reach(names, frozenset(held))


def hook_reach(module: nn.Module) -> Optional[Reach]:
    """What the forward hooks and pre-hooks registered on ``module``, or a ``__call__`` its class replaces,
    may reach below it (None: it has neither): code that tracing never sees, with the module at hand."""
    hooks = [h for name in ("_forward_pre_hooks", "_forward_hooks") for h in getattr(module, name, {}).values()]
    if type(module).__call__ is not nn.Module.__call__:
        hooks.append(getattr(module, "__call__"))
    if not hooks:
        return None
    names: Set[str] = set()
    for hook in hooks:
        found = code_names(getattr(hook, "hook", hook), type(module))  # acfx's carried hooks wrap the user's
        if found is None:
            return Reach(None, frozenset())
        names |= found
    return Reach(frozenset(names), frozenset())


@dataclasses.dataclass(frozen=True)
class HookOwner:
    """A module whose forward hooks or pre-hooks run code tracing never sees, with the module at hand."""

    name: str
    reach: Reach
    kind: str = "hook"


def hook_owners(root: nn.Module) -> List[HookOwner]:
    """Every module of ``root`` with forward hooks or pre-hooks, and what their code may reach."""
    owners = []
    for name, module in root.named_modules():
        reach = hook_reach(module)
        if reach is not None:
            owners.append(HookOwner(name, reach))
    return owners


def reach_reason(name: str, module: nn.Module, owners: Sequence) -> Optional[str]:
    """Why the module ``name`` may be used directly by code acfx did not trace (None: it is not).

    ``owners``: modules whose forward did not trace (untraced parts: their direct children are called as the
    traced parts) and modules with hooks (:class:`HookOwner`: every module below them counts), each with a
    ``name`` and a :class:`Reach`.
    """
    for owner in owners:
        prefix = f"{owner.name}." if owner.name else ""
        if not name.startswith(prefix) or name == owner.name:
            continue
        hook = getattr(owner, "kind", "untraced") == "hook"
        below = name[len(prefix):].split(".")[0 if hook else 1:]
        if not below:
            continue  # a direct child of code that did not trace: the traced part's own call
        label = owner.name or "<model>"
        what = (f"'{label}' has a forward hook (or its own __call__) whose code" if hook else
            f"'{label}' does not trace and its code")
        fix = "remove the hook or exclude this site" if hook else "make its forward traceable or exclude it"
        if owner.reach.names is None:
            return (f"{what} looks up modules dynamically (getattr, modules(), a closure over the module, ...), "
                    f"so it may call this module directly, unseen; {fix}")
        used = [part for part in below if part in owner.reach.names]
        if used:
            return f"{what} names {used}, so it may call this module directly, unseen; {fix}"
        path = name[len(prefix):].split(".")
        if len(path) >= 2 and path[-1].isdigit() and f"[]{path[-2]}" in owner.reach.names:
            return f"{what} indexes '{path[-2]}', so it may call this module directly, unseen; {fix}"
        if id(module) in owner.reach.held:
            return f"{what} holds this module in a plain attribute, so it may call it directly; {fix}"
    return None
