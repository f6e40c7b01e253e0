"""The syntax tree of a live function, read from its source and checked against its code object.

Python's syntax tree is the same on every interpreter acfx supports; its bytecode is not (3.11, 3.12, 3.13
and 3.14 each changed the instructions a plain ``self.seq[0](x)`` compiles to). So code that tracing never
ran is read from its source where the source exists. Source can be stale (a file edited after import) or
ambiguous (two lambdas on one line): a candidate tree is used only when compiling it gives the code
object's own names, locals and nesting, else there is no tree and the caller falls back to bytecode.
"""
from __future__ import annotations

import ast
import linecache
import types
from typing import Dict, List, Optional, Tuple, Union

__all__ = ["FunctionTree", "function_tree", "mangle"]

FunctionTree = Union[ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda]


# filename -> (the lines linecache gave, {(name, first line): candidate nodes}): a file is parsed once.
_INDEX: Dict[str, Tuple[List[str], Dict[Tuple[str, int], List[FunctionTree]]]] = {}


# (code object, class name) -> (the lines it was checked against, its tree or None).
_VERIFIED: Dict[Tuple[types.CodeType, Optional[str]], Tuple[List[str], Optional["FunctionTree"]]] = {}


def _index(filename: str, lines: List[str]) -> Dict[Tuple[str, int], List[FunctionTree]]:
    cached = _INDEX.get(filename)
    if cached is not None and cached[0] is lines:
        return cached[1]
    try:
        tree = ast.parse("".join(lines), filename)
    except (SyntaxError, ValueError):
        tree = ast.Module(body=[], type_ignores=[])
    index: Dict[Tuple[str, int], List[FunctionTree]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            for line in {first, node.lineno}:
                index.setdefault((node.name, line), []).append(node)
        elif isinstance(node, ast.Lambda):
            index.setdefault(("<lambda>", node.lineno), []).append(node)
    _INDEX[filename] = (lines, index)
    return index


def _class_name(function: types.FunctionType) -> Optional[str]:
    """The class a method is written in (for private-name mangling), from its qualified name."""
    parts = getattr(function, "__qualname__", "").split(".")
    return parts[-2] if len(parts) >= 2 and parts[-2] != "<locals>" else None


def mangle(name: str, class_name: Optional[str]) -> str:
    """``__x`` written inside class ``C`` means ``_C__x`` (the compiler's private-name mangling)."""
    if class_name and name.startswith("__") and not name.endswith("__") and "." not in name:
        return f"_{class_name.lstrip('_')}{name}"
    return name


def _compiled(node: FunctionTree, filename: str, class_name: Optional[str]) -> Optional[types.CodeType]:
    """The code object the candidate compiles to on its own (inside a class of the same name, for mangling)."""
    if isinstance(node, ast.Lambda):
        body: ast.stmt = ast.Expr(node)
    else:
        body = type(node)(**{**{f: getattr(node, f) for f in node._fields}, "decorator_list": []})
    if class_name:
        body = ast.ClassDef(name=class_name, bases=[], keywords=[], body=[body], decorator_list=[],
                            **({"type_params": []} if "type_params" in ast.ClassDef._fields else {}))
    module = ast.fix_missing_locations(ast.Module(body=[body], type_ignores=[]))
    try:
        compiled = compile(module, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError, TypeError):
        return None
    return _find_code(compiled, "<lambda>" if isinstance(node, ast.Lambda) else node.name)


def _find_code(code: types.CodeType, name: str) -> Optional[types.CodeType]:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if const.co_name == name:
                return const
            inner = _find_code(const, name)
            if inner is not None:
                return inner
    return None


def _shape(code: types.CodeType, free: frozenset = frozenset()) -> Tuple:
    """What must agree between the live code and the compiled candidate. Names free in the live code are
    globals when the candidate compiles on its own, so they are left out of the comparison."""
    free = free | frozenset(code.co_freevars)
    nested = tuple(_shape(c, free) for c in code.co_consts if isinstance(c, types.CodeType))
    return (code.co_name, code.co_argcount, code.co_kwonlyargcount, code.co_varnames,
            frozenset(code.co_names) - free, nested)


def function_tree(function) -> Optional[FunctionTree]:
    """The syntax tree of ``function`` (a Python function), or None when its source is missing, stale or
    ambiguous."""
    code = getattr(function, "__code__", None)
    if not isinstance(code, types.CodeType):
        return None
    lines = linecache.getlines(code.co_filename, getattr(function, "__globals__", None))
    if not lines:
        return None
    key = (code, _class_name(function))
    cached = _VERIFIED.get(key)
    if cached is not None and cached[0] is lines:
        return cached[1]
    live = _shape(code)
    matching = []
    for node in _index(code.co_filename, lines).get((code.co_name, code.co_firstlineno), ()):
        compiled = _compiled(node, code.co_filename, key[1])
        if compiled is not None and _shape(compiled, frozenset(code.co_freevars)) == live:
            matching.append(node)
    tree = matching[0] if len(matching) == 1 else None
    _VERIFIED[key] = (lines, tree)
    return tree
