"""The abstract values the untraced-code reader computes with, and the module paths they name.

A value is a set of atoms: a :class:`Ref` (the object at a path of the model, or a Python container
holding such objects), a constant, a known Python object (a module, class, function), a method bound to
one of these, or "something else". Paths are tuples from the model's root; besides names they hold
wildcards: ``ITEM`` (one item of a container, any index), ``CHILD`` (any child, from a computed
``getattr``) and ``ANY`` (any number of levels, from ``modules()``).
"""
from __future__ import annotations

import dataclasses
from typing import FrozenSet, Iterable, Optional, Tuple

__all__ = ["Path", "ITEM", "CHILD", "ANY", "Ref", "Const", "Known", "Bound", "Super", "Seq", "Unknown", "UNKNOWN",
           "Value", "EMPTY", "NO_ARGS", "NO_KWARGS", "refs", "items", "element", "wrap", "covers", "within",
           "path_text"]

Path = Tuple[str, ...]
ITEM, CHILD, ANY = "[]", "*", "**"


@dataclasses.dataclass(frozen=True)
class Ref:
    """The object at ``path`` (depth 0), or a Python container ``depth`` levels deep holding it."""

    path: Path
    depth: int = 0


@dataclasses.dataclass(frozen=True)
class Const:
    """A constant: None, a bool, number or string, or a tuple of those."""

    value: object


class Known:
    """A real Python object (a module, class, function, builtin or other instance), compared by identity."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Known) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __repr__(self) -> str:
        return f"Known({self.obj!r})"


@dataclasses.dataclass(frozen=True)
class Bound:
    """A Python function bound to a first argument (a method of a module of the model, of a known object)."""

    function: object = dataclasses.field(compare=False)
    receiver: FrozenSet[object]
    # The class the function is written in (for zero-argument super()).
    owner: Optional[type] = dataclasses.field(default=None, compare=False)
    key: int = 0  # id(function): functions compare by identity

    @classmethod
    def of(cls, function: object, receiver: "Value", owner: Optional[type]) -> "Bound":
        return cls(function, frozenset(receiver), owner, id(function))


@dataclasses.dataclass(frozen=True)
class Super:
    """``super()`` (or ``super(cls, obj)``) inside a method of ``cls`` on ``receiver``."""

    cls: object = dataclasses.field(compare=False)
    receiver: FrozenSet[object] = frozenset()
    key: int = 0

    @classmethod
    def of(cls, klass: type, receiver: "Value") -> "Super":
        return cls(klass, frozenset(receiver), id(klass))


@dataclasses.dataclass(frozen=True)
class Seq:
    """A tuple or list whose elements are known one by one (a tuple display, the ``*args`` of a call)."""

    elements: Tuple[FrozenSet[object], ...]


class Unknown:
    """Something that is not a module of the model, nor a constant or an object the reader knows."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = Unknown()
Value = FrozenSet[object]
EMPTY: Value = frozenset()
# ``*args`` and ``**kwargs`` of a forward called with its input alone.
NO_ARGS = Const(("<no positional arguments>",))
NO_KWARGS = Const(("<no keyword arguments>",))


def refs(value: Iterable[object]) -> FrozenSet[Ref]:
    """The modules a value is or holds (those inside a known tuple one container level deeper)."""
    out = set()
    for atom in value:
        if isinstance(atom, Ref):
            out.add(atom)
        elif isinstance(atom, Seq):
            out |= {Ref(r.path, r.depth + 1) for element in atom.elements for r in refs(element)}
    return frozenset(out)


def items(value: Iterable[object]) -> Value:
    """What iterating or indexing ``value`` gives: an item of a module container, or what a list holds."""
    out = set()
    for atom in value:
        if isinstance(atom, Ref):
            out.add(Ref(atom.path + (ITEM,)) if atom.depth == 0 else Ref(atom.path, atom.depth - 1))
        elif isinstance(atom, Seq):
            out.update(*atom.elements)
        else:
            out.add(UNKNOWN)
    return frozenset(out or {UNKNOWN})


def element(value: Iterable[object], index: Optional[int]) -> Value:
    """``value[index]`` for a known position of a known tuple; what iterating gives otherwise."""
    out = set()
    for atom in value:
        if isinstance(atom, Seq) and index is not None and -len(atom.elements) <= index < len(atom.elements):
            out.update(atom.elements[index])
        else:
            out.update(items([atom]))
    return frozenset(out or {UNKNOWN})


def wrap(value: Iterable[object], levels: int = 1) -> Value:
    """``value`` inside ``levels`` Python containers (a list, tuple or dict holding it)."""
    value = frozenset(value)
    out = {Ref(a.path, a.depth + levels) for a in refs(value)}
    if not out or any(not isinstance(a, (Ref, Seq)) for a in value):
        out.add(UNKNOWN)
    return frozenset(out)


def _instance_has_prefix(pattern: Path, path: Path) -> bool:
    """Whether some path ``pattern`` stands for starts with ``path`` (it names ``path`` or something below)."""
    if not path:
        return True
    if not pattern:
        return False
    head = pattern[0]
    if head == ANY:
        return _instance_has_prefix(pattern[1:], path) or _instance_has_prefix(pattern, path[1:])
    if head in (ITEM, CHILD) or head == path[0]:
        return _instance_has_prefix(pattern[1:], path[1:])
    return False


def _prefix_of(pattern: Path, path: Path) -> bool:
    """Whether some path ``pattern`` stands for is ``path`` or above it."""
    if not pattern:
        return True
    if not path:
        return all(p == ANY for p in pattern)
    head = pattern[0]
    if head == ANY:
        return _prefix_of(pattern[1:], path) or _prefix_of(pattern, path[1:])
    if head in (ITEM, CHILD) or head == path[0]:
        return _prefix_of(pattern[1:], path[1:])
    return False


def covers(pattern: Path, path: Path, below: bool) -> bool:
    """Whether a use of ``pattern`` touches the module at ``path``: it names the module or something inside
    it (a child, a parameter); with ``below`` (code acfx could not read was handed the object at
    ``pattern``) also when ``pattern`` is the module or one above it."""
    return _instance_has_prefix(pattern, path) or (below and _prefix_of(pattern, path))


def within(pattern: Path, path: Path) -> bool:
    """Whether some module ``pattern`` stands for sits on ``path`` (is it, or one of its ancestors)."""
    return _prefix_of(pattern, path)


def path_text(path: Path) -> str:
    return ".".join(path) or "<model>"
