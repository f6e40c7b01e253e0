"""The names code uses, read from its bytecode: the fallback where a function's source cannot be read.

CPython changes its instruction set with every release (3.11 added PRECALL and CACHE entries, 3.12 folded
LOAD_METHOD into LOAD_ATTR and added LOAD_SUPER_ATTR and BINARY_SLICE, 3.13 added superinstructions such
as LOAD_FAST_LOAD_FAST, 3.14 LOAD_FAST_BORROW, LOAD_SMALL_INT and subscripts as BINARY_OP). As torch's
dynamo does, the instructions are first normalised to one vocabulary (superinstructions split, renamed
variants mapped to their plain form, bookkeeping dropped); the reading then matches that vocabulary only.
It fails closed: on an interpreter it was not verified on, or on an instruction it does not know, the
code counts as reaching anything, with a reason that names the interpreter.
"""
from __future__ import annotations

import dataclasses
import dis
import sys
import types
from typing import FrozenSet, Iterable, List, Optional, Sequence, Set

__all__ = ["Instruction", "VERIFIED_VERSIONS", "normalise", "BytecodeNames", "bytecode_names", "reachable_names"]

# Interpreters whose instruction sets this reading was checked on (tests/test_code_reading.py; 3.14 from a
# fixture of its documented instructions).
VERIFIED_VERSIONS = ((3, 10), (3, 11), (3, 12), (3, 13), (3, 14))


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One normalised instruction: its plain operation name and its argument value."""

    opname: str
    argval: object = None


# Superinstructions: two plain instructions in one (3.13, 3.14).
_SPLIT = {"LOAD_FAST_LOAD_FAST": ("LOAD_FAST", "LOAD_FAST"), "STORE_FAST_LOAD_FAST": ("STORE_FAST", "LOAD_FAST"),
          "STORE_FAST_STORE_FAST": ("STORE_FAST", "STORE_FAST"),
          "LOAD_FAST_BORROW_LOAD_FAST_BORROW": ("LOAD_FAST", "LOAD_FAST")}
# Variants of a plain instruction.
_RENAME = {"LOAD_FAST_CHECK": "LOAD_FAST", "LOAD_FAST_AND_CLEAR": "LOAD_FAST", "LOAD_FAST_BORROW": "LOAD_FAST",
           "LOAD_METHOD": "LOAD_ATTR", "LOAD_SUPER_ATTR": "LOAD_ATTR",
           # pseudo-instructions of 3.12/3.13's compiler (listed in dis.opmap, never in real bytecode)
           "LOAD_SUPER_METHOD": "LOAD_ATTR", "LOAD_ZERO_SUPER_METHOD": "LOAD_ATTR", "LOAD_ZERO_SUPER_ATTR": "LOAD_ATTR", "LOAD_SMALL_INT": "LOAD_CONST",
           "BINARY_SLICE": "BINARY_SUBSCR", "LOAD_CONST_IMMORTAL": "LOAD_CONST", "LOAD_CONST_MORTAL": "LOAD_CONST"}
# Bookkeeping without meaning here.
_DROP = {"CACHE", "PUSH_NULL", "PRECALL", "NOP", "RESUME", "COPY_FREE_VARS", "MAKE_CELL", "EXTENDED_ARG",
         "NOT_TAKEN", "KW_NAMES", "RESUME_CHECK", "EXIT_INIT_CHECK"}
# The loads the reading understands once normalised. The reading matches loads (of names, attributes and
# constants) and subscripts; a load it does not know might carry one of them, so it fails closed.
_KNOWN_LOADS = frozenset({
    "LOAD_FAST", "LOAD_ATTR", "LOAD_GLOBAL", "LOAD_NAME", "LOAD_CONST", "LOAD_DEREF", "LOAD_CLOSURE",
    "LOAD_CLASSDEREF", "LOAD_FROM_DICT_OR_DEREF", "LOAD_FROM_DICT_OR_GLOBALS", "LOAD_BUILD_CLASS",
    "LOAD_ASSERTION_ERROR", "LOAD_LOCALS", "LOAD_SPECIAL", "LOAD_COMMON_CONSTANT"})


def _is_subscript(instruction: dis.Instruction) -> bool:
    """3.14 compiles ``a[b]`` to BINARY_OP with the subscript operator (argrepr ``[]``)."""
    return instruction.opname == "BINARY_OP" and instruction.argrepr.strip() == "[]"


def normalise(instructions: Iterable[dis.Instruction]) -> Optional[List[Instruction]]:
    """The instructions in the plain vocabulary; None if one of them is not known (fail closed)."""
    out: List[Instruction] = []
    for instruction in instructions:
        name = instruction.opname
        if name in _DROP:
            continue
        if name in _SPLIT:
            values = instruction.argval if isinstance(instruction.argval, tuple) else (instruction.argval,) * 2
            out += [Instruction(op, value) for op, value in zip(_SPLIT[name], values)]
            continue
        if _is_subscript(instruction):
            out.append(Instruction("BINARY_SUBSCR"))
            continue
        name = _RENAME.get(name, name)
        if name.startswith("LOAD_") and name not in _KNOWN_LOADS:
            return None
        out.append(Instruction(name, instruction.argval))
    return out


@dataclasses.dataclass(frozen=True)
class BytecodeNames:
    """What a code object's bytecode says: the attribute and global names it uses (``[]X`` for each attribute X
    of its first argument that it indexes), or why it may reach anything."""

    names: FrozenSet[str]
    anything: Optional[str] = None


def _version_reason() -> Optional[str]:
    version = sys.version_info[:2]
    if version in VERIFIED_VERSIONS:
        return None
    verified = ", ".join(f"{a}.{b}" for a, b in VERIFIED_VERSIONS)
    return (f"its source cannot be read and acfx reads bytecode only of the CPython versions it was verified on "
            f"({verified}), not {sys.implementation.name} {version[0]}.{version[1]}")


_CHAIN_STARTS = ("LOAD_FAST", "LOAD_GLOBAL", "LOAD_DEREF", "LOAD_NAME", "LOAD_CONST")


def _chain(instructions: Sequence[Instruction], start: int) -> int:
    """The end of the load chain at ``start`` (``self``, ``self.blk``, ``self.seq[0].conv``): one load, then
    attribute loads and constant subscripts. Returns ``start`` when there is no chain."""
    if start >= len(instructions) or instructions[start].opname not in _CHAIN_STARTS:
        return start
    end = start + 1
    while end < len(instructions):
        if instructions[end].opname == "LOAD_ATTR":
            end += 1
        elif instructions[end].opname == "LOAD_CONST" and end + 1 < len(instructions) \
                and instructions[end + 1].opname == "BINARY_SUBSCR":
            end += 2
        else:
            break
    return end


def _getattr_names(code: types.CodeType, instructions: Sequence[Instruction], own_lookup_ok: bool
                   ) -> Optional[Set[str]]:
    """The constant names ``getattr`` is called with (None: a computed name on anything but the first
    argument, which reaches only direct children when ``own_lookup_ok``)."""
    first = code.co_varnames[0] if code.co_argcount else None
    names: Set[str] = set()
    for index, instruction in enumerate(instructions):
        if instruction.opname not in ("LOAD_GLOBAL", "LOAD_NAME") or instruction.argval != "getattr":
            continue
        owner_end = _chain(instructions, index + 1)
        name = instructions[owner_end] if owner_end < len(instructions) else None
        after = instructions[owner_end + 1:owner_end + 3]
        constant = (name is not None and name.opname == "LOAD_CONST" and isinstance(name.argval, str) and after
                    and (after[0].opname.startswith("CALL") or len(after) > 1 and after[1].opname.startswith("CALL")))
        own = owner_end == index + 2 and instructions[index + 1].opname == "LOAD_FAST" \
            and instructions[index + 1].argval == first
        if constant:
            names.add(name.argval)
        elif not (own_lookup_ok and own):
            return None  # a computed name below a child (``getattr(self.blk, name)``) or on another object
    return names


def _indexed(code: types.CodeType, instructions: Sequence[Instruction]) -> Set[str]:
    """``[]X`` for each attribute X of the first argument the code indexes (``self.seq[0]``)."""
    first = code.co_varnames[0] if code.co_argcount else None
    found = set()
    for index in range(len(instructions) - 2):
        load, attribute = instructions[index], instructions[index + 1]
        if load.opname == "LOAD_FAST" and load.argval == first and attribute.opname == "LOAD_ATTR":
            if any(i.opname == "BINARY_SUBSCR" for i in instructions[index + 2:index + 4]):
                found.add(f"[]{attribute.argval}")
    return found


def _read(code: types.CodeType, instructions: Sequence[Instruction], own_lookup_ok: bool) -> BytecodeNames:
    names = set(code.co_names) | _indexed(code, instructions)
    if "getattr" in names:
        constants = _getattr_names(code, instructions, own_lookup_ok)
        if constants is None:
            return BytecodeNames(frozenset(), f"{code.co_name} calls getattr with a computed name")
        names |= constants
    return BytecodeNames(frozenset(names))


def bytecode_names(code: types.CodeType, own_lookup_ok: bool = False,
                   instructions: Optional[Sequence[dis.Instruction]] = None) -> BytecodeNames:
    """The names ``code`` and the functions nested in it use. ``instructions``: the raw instructions to read
    instead of the interpreter's own (a fixture of another interpreter, in tests)."""
    if instructions is None:
        reason = _version_reason()
        if reason:
            return BytecodeNames(frozenset(), reason)
    plain = normalise(dis.get_instructions(code) if instructions is None else instructions)
    if plain is None:
        return BytecodeNames(frozenset(), f"{code.co_name} holds an instruction acfx does not know")
    found = _read(code, plain, own_lookup_ok)
    if found.anything or instructions is not None:
        return found
    names = set(found.names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # nested functions, comprehensions, lambdas
            nested = bytecode_names(const)
            if nested.anything:
                return nested
            names |= nested.names
    return BytecodeNames(frozenset(names))



# Names with which code finds submodules without naming them.
_DYNAMIC = frozenset({"__getattr__", "__getattribute__", "_modules", "modules", "named_modules", "children",
                      "named_children", "get_submodule", "__dict__", "vars", "apply", "attrgetter",
                      "methodcaller", "eval", "exec"})


def _callees(function: types.FunctionType, name: str, cls: Optional[type], names: Set[str]) -> List[object]:
    """What a name in ``function``'s code may run: a method or property of ``cls`` (and of its bases, for
    ``super()``), a Python function of the module the code was written in, or a method (named in the same
    code) of a class or object of that module."""
    found: List[object] = []
    for klass in (cls.__mro__ if cls is not None else ()):
        attribute = vars(klass).get(name)
        if (klass.__module__, klass.__name__) == ("torch.nn.modules.module", "Module") or attribute is None:
            continue
        if isinstance(attribute, property):
            found += [f for f in (attribute.fget, attribute.fset) if f is not None]
        elif isinstance(attribute, (staticmethod, classmethod)):
            found.append(attribute.__func__)
        elif callable(attribute) and not isinstance(attribute, type):
            found.append(attribute)
    target = getattr(function, "__globals__", {}).get(name)
    module = getattr(function, "__module__", None)
    if isinstance(target, types.FunctionType):
        found.append(target)
    elif target is not None and not isinstance(target, (types.ModuleType, types.BuiltinFunctionType)) and \
            (getattr(type(target), "__module__", "") == module or isinstance(target, type) and target.__module__ == module):
        for other in names:  # HELPER.method(self, x): the methods the code names on it
            method = getattr(target, other, None)
            if isinstance(method, (types.FunctionType, types.MethodType)):
                found.append(getattr(method, "__func__", method))
    return found


def reachable_names(entry: types.FunctionType, cls: Optional[type] = None) -> BytecodeNames:
    """The names ``entry``'s bytecode uses, through the methods of ``cls`` (the class of its first argument)
    and the module functions it names, transitively: what a function without readable source may reach."""
    pending: List[types.FunctionType] = [entry]
    seen: Set[types.CodeType] = set()
    names: Set[str] = set()
    while pending:
        function = pending.pop()
        code = getattr(function, "__code__", None)
        if code is None:
            return BytecodeNames(frozenset(), f"{getattr(function, '__qualname__', function)!r} is compiled code")
        if code in seen:
            continue
        seen.add(code)
        found = bytecode_names(code, own_lookup_ok=function is entry)
        if found.anything:
            return found
        names |= found.names
        callable_names = set(found.names) | ({"forward", "__call__"} if "super" in found.names else set())
        for name in callable_names:
            pending += _callees(function, name, cls, set(found.names))
    dynamic = names & _DYNAMIC
    if dynamic:
        return BytecodeNames(frozenset(), f"{entry.__qualname__} looks modules up dynamically ({sorted(dynamic)[0]})")
    return BytecodeNames(frozenset(names))
