"""Which modules of a model code tracing never ran may use, read from that code's syntax tree.

When a module's forward does not trace, acfx traces its children instead and must know that the forward
uses them only whole; a hook or a replaced ``__call__`` runs code tracing never sees at all. Nothing ran,
so nothing can be observed: the code is read. :class:`CodeReader` interprets the syntax tree of that code
abstractly (every branch, loops to a fixed point) with values that are paths of the model's modules, and
records every path the code calls, reads, indexes or writes, and every module it hands to code acfx
cannot read (which may then do anything with it and all below it). It follows the methods, properties
and functions the code calls with a module of the model (``self.predict(x)``, ``helper(self, x)``,
``super().forward(x)``, a class built from the model), so a name that merely appears in the code
(``LOGGER.info``) is not taken for a method of the model. Python functions without readable source are
read from their bytecode instead (bytecode_names.py); anything else unreadable fails closed.

The forward of a module is read as tracing calls it, with its input alone: parameters at their defaults,
no extra arguments, attributes of the model at their values now (``self.training`` excepted: both modes
are traced), so that ``if profile:`` branches fx never takes are not read either.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import inspect
import os
import sys
import types
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

from .bytecode_names import reachable_names
from .code_values import (
    ANY,
    CHILD,
    ITEM,
    NO_ARGS,
    NO_KWARGS,
    UNKNOWN,
    Bound,
    Const,
    Known,
    Path,
    Ref,
    Seq,
    Super,
    Value,
    element,
    items,
    path_text,
    refs,
    wrap,
)
from .source_tree import function_tree, mangle

__all__ = ["Use", "CodeReader"]

_MISSING = object()
_SIMPLE = (type(None), bool, int, float, str, bytes)
# Builtins that do not run a module's code nor keep it (they may call __len__, __repr__, __bool__).
_PURE_BUILTINS = {getattr(builtins, name) for name in (
    "isinstance", "issubclass", "len", "id", "callable", "print", "repr", "str", "format", "hash", "bool", "int",
    "float", "abs", "round", "divmod", "pow", "ord", "chr", "ascii", "bin", "hex", "oct", "any", "all", "sum",
    "min", "max", "range", "slice", "object", "complex", "bytes", "type")}
# Builtins that give back what they are given, as a container.
_SAME_CONTAINER = {list, tuple, reversed, sorted, set, frozenset, iter, filter}
# Builtins that hand code or names over to execution.
_DYNAMIC_BUILTINS = {getattr(builtins, name) for name in ("eval", "exec", "compile", "__import__", "globals", "locals",
                                                         "vars", "dir", "breakpoint", "open", "input")}
# nn.Module's own methods: how each uses the module it is called on.
_CALLS = {"__call__", "_call_impl", "_wrapped_call_impl", "forward"}
_HARMLESS = {"train", "eval", "to", "cpu", "cuda", "xpu", "mps", "half", "float", "double", "bfloat16", "type",
             "zero_grad", "requires_grad_", "extra_repr", "__repr__", "_get_name", "__dir__", "__getstate__",
             "register_buffer", "register_parameter", "__setstate__", "share_memory"}
# Those of them that return the module itself (``self.blk.eval().conv`` is blk.conv).
_RETURN_SELF = {"train", "eval", "to", "cpu", "cuda", "xpu", "mps", "half", "float", "double", "bfloat16", "type",
                "requires_grad_", "share_memory"}
# Methods that give the tensors below a module: their values are read (expand replaces them), unless only a
# tensor's device or dtype is (``next(self.parameters()).device``, see CodeReader._e_Attribute).
_TENSOR_LISTS = {"parameters", "named_parameters", "buffers", "named_buffers", "state_dict", "_named_members"}
_TENSOR_GETTERS = {"get_parameter", "get_buffer"}
# Methods of a Python container of modules, read as the builtin that gives the same (see _container_method).
_CONTAINER_METHODS = ((list, {"values", "copy", "__iter__", "__reversed__"}), (enumerate, {"items"}),
                      (next, {"get", "__getitem__", "pop"}), (len, {"keys", "index", "count", "__len__",
                                                               "__contains__"}))
# What ``next(module.parameters())`` may be read for without its values mattering.
_TENSOR_METADATA = {"device", "dtype", "is_cuda", "is_cpu", "is_meta"}
_CONTAINERS = {"children": (CHILD, 1), "named_children": (CHILD, 2), "modules": (ANY, 1), "named_modules": (ANY, 2)}
# Methods of a Python container that put a value in it.
_MUTATORS = {"append", "extend", "insert", "add", "update", "setdefault", "appendleft", "extendleft"}
_MAX_DEPTH, _MAX_FUNCTIONS, _MAX_OBJECTS = 12, 800, 4096


@dataclasses.dataclass(frozen=True)
class Use:
    """A path of the model the code uses, what it does there, and where (``Class.method (file.py:12)``).

    ``below``: the object was handed to code acfx cannot read, so anything at or below the path may be used.
    ``named``: read from bytecode, the code only shows the last name of the path (any module of that name).
    """

    path: Path
    action: str
    where: str = dataclasses.field(default="", compare=False)
    below: bool = False
    named: bool = False


@dataclasses.dataclass
class _Args:
    """The values of a call's arguments. ``extra``/``extra_keywords``: what ``*x`` / ``**x`` add, when
    they add something (the count is then unknown)."""

    positional: List[Value]
    keywords: Dict[str, Value]
    extra: Optional[Value] = None
    extra_keywords: Optional[Value] = None

    def values(self) -> List[Value]:
        return self.positional + list(self.keywords.values()) + [v for v in (self.extra, self.extra_keywords) if v]


@dataclasses.dataclass
class _Frame:
    """One function being read: its bindings (flow-insensitive: every value a name may hold), where it is."""

    function: types.FunctionType
    env: Dict[str, Set[object]]
    local_names: FrozenSet[str]
    owner: Optional[type]
    class_name: Optional[str]
    receiver: Value
    returns: Set[object] = dataclasses.field(default_factory=set)
    line: int = 0

    @property
    def where(self) -> str:
        code = self.function.__code__
        return f"{self.function.__qualname__} ({os.path.basename(code.co_filename)}:{self.line or code.co_firstlineno})"


def _local_names(code: types.CodeType) -> FrozenSet[str]:
    names = set(code.co_varnames) | set(code.co_cellvars)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _local_names(const)
    return frozenset(names)


def _simple(value: object, depth: int = 0) -> bool:
    if isinstance(value, _SIMPLE):
        return True
    return isinstance(value, tuple) and depth < 2 and all(_simple(v, depth + 1) for v in value)


def _decided(value: Value) -> Optional[bool]:
    """The truth of a value when every atom is a constant agreeing on it (None: not known)."""
    if not value or not all(isinstance(a, Const) for a in value) or value & {NO_ARGS, NO_KWARGS}:
        return None
    truths = {bool(a.value) for a in value}
    return truths.pop() if len(truths) == 1 else None


def _module_method(function: object) -> Optional[str]:
    """The name of ``function`` if it is one of nn.Module's own methods."""
    name = getattr(function, "__name__", None)
    return name if name is not None and vars(nn.Module).get(name) is function else None


def _first_tensor_call(node: ast.Attribute) -> Optional[Tuple[ast.expr, Optional[ast.expr], ast.expr, str]]:
    """(the ``next`` name, the ``iter`` name or None, the module expression, the method) of
    ``next([iter(]M.parameters()[)]).device``; None for any other expression."""
    call = node.value
    if node.attr not in _TENSOR_METADATA or not _one_argument_call(call) or not isinstance(call.func, ast.Name):
        return None
    inner, iter_name = call.args[0], None
    if _one_argument_call(inner) and isinstance(inner.func, ast.Name):
        inner, iter_name = inner.args[0], inner.func
    if not (isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) and not inner.args
            and not inner.keywords and inner.func.attr in ("parameters", "buffers")):
        return None
    return call.func, iter_name, inner.func.value, inner.func.attr


def _one_argument_call(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords \
        and not isinstance(node.args[0], ast.Starred)


def _defining_class(cls: type, name: str) -> Optional[type]:
    return next((klass for klass in cls.__mro__ if name in vars(klass)), None)


class CodeReader:
    """Reads code with the model's modules as paths; :attr:`uses` and :attr:`anything` are what it found."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.paths: Dict[int, Path] = {}
        for name, module in root.named_modules():
            self.paths.setdefault(id(module), tuple(name.split(".")) if name else ())
        for name, tensor in [*root.named_parameters(), *root.named_buffers()]:  # held elsewhere too (a partial)
            self.paths.setdefault(id(tensor), tuple(name.split(".")))
        self._uses: Dict[Tuple, Use] = {}
        self.anything: Optional[str] = None
        self._summaries: Dict[Tuple, Value] = {}
        self._active: Set[Tuple] = set()
        self._depth = 0
        self._functions = 0
        self._objects: Dict[Path, List[object]] = {}

    @property
    def uses(self) -> FrozenSet[Use]:
        return frozenset(self._uses.values())

    # -- entry points ---------------------------------------------------------------------------------------
    def read_call(self, entry: object, first: Optional[Value], what: str, inputs: int = 1) -> None:
        """Read ``entry`` (a function, bound method, partial or callable object) called with ``first`` as its
        first argument (None: the entry binds its own) and ``inputs`` further unknown arguments."""
        positional: List[Value] = [] if first is None else [first]
        keywords: Dict[str, Value] = {}
        while isinstance(entry, functools.partial):
            positional = [self.value_of(a) for a in entry.args] + positional
            keywords = {**{k: self.value_of(v) for k, v in entry.keywords.items()}, **keywords}
            entry = entry.func
        if isinstance(entry, types.MethodType):
            positional = [self.value_of(entry.__self__)] + positional
            entry = entry.__func__
        elif not isinstance(entry, types.FunctionType) and callable(entry) and not isinstance(entry, type):
            call = getattr(type(entry), "__call__", None)
            if isinstance(call, types.FunctionType):
                positional = [self.value_of(entry)] + positional
                entry = call
        if not isinstance(entry, types.FunctionType):
            self.anything = self.anything or f"{what} is {type(entry).__name__} {entry!r}, not Python code acfx can read"
            return
        args = _Args(positional + [frozenset({UNKNOWN})] * inputs, keywords)
        self._call_python(entry, args, None, owner=_owner_of(entry), entry=True)

    # -- values of real objects -----------------------------------------------------------------------------
    def value_of(self, obj: object, depth: int = 0) -> Value:
        """The abstract value of a real object: a module of the model is its path."""
        path = self.paths.get(id(obj))
        if path is not None:
            return frozenset({Ref(path)})
        if _simple(obj):
            return frozenset({Const(obj)})
        if depth < 3 and isinstance(obj, (list, tuple, set, frozenset, dict)) and not isinstance(obj, nn.Module):
            values = obj.values() if isinstance(obj, dict) else obj
            held = [a for v in values for a in self.value_of(v, depth + 1) if isinstance(a, Ref)]
            if held:
                return wrap(held) | {Known(obj)}
        return frozenset({Known(obj)})

    def objects(self, path: Path) -> List[object]:
        """The real objects a path stands for now (wildcards expanded)."""
        if path in self._objects:
            return self._objects[path]
        found: List[object] = [self.root]
        for part in path:
            step: Dict[int, object] = {}
            for obj in found:
                for child in _step(obj, part):
                    step.setdefault(id(child), child)
            found = list(step.values())[:_MAX_OBJECTS]
        self._objects[path] = found
        return found

    # -- recording ----------------------------------------------------------------------------------------
    def _use(self, path: Path, action: str, frame: Optional[_Frame], below: bool = False, named: bool = False) -> None:
        key = (path, action, below, named)
        if key not in self._uses:
            self._uses[key] = Use(path, action, frame.where if frame is not None else "", below, named)

    def _hand_over(self, values: Iterable[Value], frame: _Frame, to: str) -> None:
        """Modules in ``values`` go to code acfx cannot read: anything at or below them may be used (modules
        a handed-over object holds, in containers, partials, bound methods or closures, included)."""
        for value in values:
            for atom in value:
                if isinstance(atom, Seq):
                    self._hand_over(atom.elements, frame, to)
                elif isinstance(atom, Known):
                    for path in self._held_paths(atom.obj):
                        self._use(path, f"hands an object holding {path_text(path)} to {to}", frame, below=True)
                elif isinstance(atom, Ref):
                    self._use(atom.path, f"hands {path_text(atom.path)} to {to}", frame, below=True)
                elif isinstance(atom, (Bound, Super)):
                    for ref in refs(atom.receiver):
                        self._use(ref.path, f"hands a method of {path_text(ref.path)} to {to}", frame, below=True)

    def _held_paths(self, obj: object, depth: int = 0) -> List[Path]:
        """The paths of the model's modules an object holds (not the object's own attributes: only what
        containers, partials, bound methods and closures carry)."""
        if id(obj) in self.paths:
            return [self.paths[id(obj)]]
        if depth >= 3 or isinstance(obj, (types.ModuleType, type)) or _simple(obj):
            return []
        if isinstance(obj, dict):
            inner: Iterable[object] = obj.values()
        elif isinstance(obj, (list, tuple, set, frozenset)):
            inner = obj
        elif isinstance(obj, functools.partial):
            inner = (obj.func, *obj.args, *obj.keywords.values())
        elif isinstance(obj, types.MethodType):
            inner = (obj.__self__, obj.__func__)
        elif isinstance(obj, types.FunctionType):
            inner = []
            for cell in obj.__closure__ or ():
                try:
                    inner.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    continue
        else:
            return []
        return [path for item in inner for path in self._held_paths(item, depth + 1)]

    def _fail(self, reason: str, frame: Optional[_Frame]) -> None:
        if self.anything is None:
            self.anything = f"{reason} ({frame.where})" if frame is not None else reason

    def _closes_over_model(self, function: types.FunctionType) -> bool:
        """A closure holding a module of the model (a lambda kept as an attribute)."""
        for cell in function.__closure__ or ():
            try:
                if refs(self.value_of(cell.cell_contents)):
                    return True
            except ValueError:  # an empty cell
                continue
        return False

    # -- calls ----------------------------------------------------------------------------------------------
    def _call_python(self, function: types.FunctionType, args: _Args, caller: Optional[_Frame],
                     owner: Optional[type] = None, entry: bool = False) -> Value:
        involved = [v for v in args.values() if refs(v) or any(isinstance(a, (Bound, Super)) for a in v)]
        if not involved and not entry and not self._closes_over_model(function):
            return frozenset({UNKNOWN})  # nothing of the model reaches it
        name = getattr(function, "__qualname__", repr(function))
        if self._depth >= _MAX_DEPTH or self._functions >= _MAX_FUNCTIONS:
            self._hand_over(involved, caller, f"{name} (too deep a chain of calls to read)")
            return frozenset({UNKNOWN})
        tree = function_tree(function)
        if tree is None:
            return self._call_unreadable(function, args, entry)
        frame = _Frame(function, {}, _local_names(function.__code__), owner, _class_name(function), frozenset())
        bindings = _bind(function, args, self.value_of)
        key = (id(function), tuple(sorted((k, frozenset(v)) for k, v in bindings.items())))
        if key in self._summaries:
            return self._summaries[key]
        if key in self._active:
            return frozenset({UNKNOWN})  # recursion: the outer reading collects its uses
        self._active.add(key)
        self._depth += 1
        self._functions += 1
        try:
            for param, value in bindings.items():
                frame.env[param] = set(value)
            params = function.__code__.co_varnames[:function.__code__.co_argcount]
            frame.receiver = frozenset(bindings.get(params[0], ())) if params else frozenset()
            body = tree.body if isinstance(tree, (ast.FunctionDef, ast.AsyncFunctionDef)) else [ast.Return(tree.body)]
            self._block_fixed_point(body, frame)
        finally:
            self._depth -= 1
            self._active.discard(key)
        result = frozenset(frame.returns) or frozenset({Const(None)})
        self._summaries[key] = result
        return result

    def _call_unreadable(self, function: types.FunctionType, args: _Args, entry: bool) -> Value:
        """A Python function whose source cannot be read: the names its bytecode uses, relative to each module
        handed to it (below the direct children for an untraced module's own forward, which calls those)."""
        receivers = [o for r in refs(args.positional[0]) for o in self.objects(r.path)] if args.positional else []
        found = reachable_names(function, type(receivers[0]) if receivers else None)
        where = f"{function.__qualname__} (read from bytecode)"
        for value in args.values():
            for ref in refs(value):
                if found.anything:
                    key = (ref.path, "unreadable", True, False)
                    self._uses.setdefault(key, Use(ref.path, f"hands {path_text(ref.path)} to code that {found.anything}",
                                                   where, below=True))
                    continue
                base = ref.path + ((CHILD,) if entry and ref.depth == 0 else ())
                for name in found.names:
                    pattern = base + (ANY, name)
                    self._uses.setdefault((pattern, "names", False, True),
                                          Use(pattern, f"names '{name}'", where, named=True))
        return frozenset({UNKNOWN})

    def _apply(self, callee: Value, args: _Args, frame: _Frame) -> Value:
        out: Set[object] = set()
        for atom in callee:
            if isinstance(atom, Ref):
                path = atom.path
                self._use(path, f"calls {path_text(path)}", frame)
                objects = self.objects(path) if atom.depth == 0 else []
                held = [o for o in objects if not isinstance(o, nn.Module)]
                for obj in held:  # a Python object the model holds, called: what it runs
                    out |= self._call_held_object(obj, path, args, frame)
                if not held or len(held) < len(objects):  # a module (or what a container holds) is called
                    self._hand_over(args.values(), frame, f"the module {path_text(path)}")
                    out.add(UNKNOWN)
            elif isinstance(atom, Bound):
                out |= self._call_bound(atom, args, frame)
            elif isinstance(atom, Known):
                out |= self._call_known(atom.obj, args, frame)
            else:
                self._hand_over(args.values(), frame, "code acfx cannot identify")
                out.add(UNKNOWN)
        return frozenset(out) or frozenset({UNKNOWN})

    def _call_bound(self, atom: Bound, args: _Args, frame: _Frame) -> Value:
        method = _module_method(atom.function)
        if method is not None:
            return self._module_call(method, atom.receiver, args, frame)
        bound = _Args([frozenset(atom.receiver)] + args.positional, args.keywords, args.extra, args.extra_keywords)
        if isinstance(atom.function, types.FunctionType):
            return self._call_python(atom.function, bound, frame, owner=atom.owner)
        return self._call_known(atom.function, bound, frame)

    def _module_call(self, method: str, receiver: FrozenSet[object], args: _Args, frame: _Frame) -> Value:
        """One of nn.Module's own methods called on ``receiver``."""
        out: Set[object] = set()
        for ref in refs(receiver):
            path = ref.path
            if method in _CALLS:
                self._use(path, f"calls {path_text(path)}", frame)
                self._hand_over(args.values(), frame, f"the module {path_text(path)}")
            elif method in _HARMLESS:
                self._use(path, f"calls {path_text(path)}.{method}()", frame)
                if method in _RETURN_SELF:
                    out.add(Ref(path))
            elif method in _TENSOR_LISTS:
                self._use(path, f"reads the tensors below {path_text(path)} ({method}())", frame, below=True)
            elif method in _TENSOR_GETTERS and args.positional and _decided_str(args.positional[0]):
                child = path + tuple(_decided_str(args.positional[0]).split("."))
                self._use(child, f"reads {path_text(child)} ({method}())", frame)
                out.add(Ref(child))
            elif method in _CONTAINERS:
                wildcard, depth = _CONTAINERS[method]
                out.add(Ref(path + (wildcard,), depth))
            elif method == "get_submodule" and args.positional and _decided_str(args.positional[0]):
                out.add(Ref(path + tuple(_decided_str(args.positional[0]).split("."))))
            else:
                self._use(path, f"calls {path_text(path)}.{method}()", frame, below=True)
        return frozenset(out) or frozenset({UNKNOWN})

    def _call_known(self, obj: object, args: _Args, frame: _Frame) -> Value:
        if isinstance(obj, functools.partial):  # a partial held by the model: its function, its arguments first
            bound = _Args([self.value_of(a) for a in obj.args] + args.positional,
                          {**{k: self.value_of(v) for k, v in obj.keywords.items()}, **args.keywords},
                          args.extra, args.extra_keywords)
            return self._apply(self.value_of(obj.func), bound, frame)
        if isinstance(obj, types.MethodType):
            bound = _Args([self.value_of(obj.__self__)] + args.positional, args.keywords, args.extra,
                          args.extra_keywords)
            return self._apply(self.value_of(obj.__func__), bound, frame)
        first = args.positional[0] if args.positional else frozenset({UNKNOWN})
        if obj is getattr:
            return self._getattr(args, frame)
        if obj in (setattr, delattr):
            name = _decided_str(args.positional[1]) if len(args.positional) > 1 else None
            for ref in refs(first):
                self._use(ref.path + ((name,) if name else (CHILD,)), f"writes {path_text(ref.path)}.{name or '*'}",
                          frame, below=True)
            self._hand_over(args.positional[2:], frame, "an attribute it sets")
            return frozenset({Const(None)})
        if obj is super:
            return self._super(args, frame)
        if obj is hasattr:
            name = _decided_str(args.positional[1]) if len(args.positional) > 1 else None
            for ref in refs(first):
                self._use(ref.path + ((name,) if name else (CHILD,)), f"reads {path_text(ref.path)}.{name}", frame)
            return frozenset({UNKNOWN})
        if obj is type:
            return frozenset({Known(type(o)) for r in refs(first) for o in self.objects(r.path)} or {UNKNOWN})
        if _hashable(obj) and obj in _SAME_CONTAINER:
            return first if obj is not filter else (args.positional[1] if len(args.positional) > 1 else first)
        if obj is next:
            return items(first)
        if obj is enumerate:
            return wrap(items(first), 2)
        if obj is zip:
            return wrap(frozenset().union(*(items(v) for v in args.positional)) or {UNKNOWN}, 2)
        if _hashable(obj) and obj in _PURE_BUILTINS:
            return frozenset({UNKNOWN})
        if _hashable(obj) and obj in _DYNAMIC_BUILTINS:
            if obj in (eval, exec, compile) or any(refs(v) for v in args.values()):
                self._fail(f"calls {obj.__name__}(), which may reach any module", frame)
            return frozenset({UNKNOWN})
        if isinstance(obj, types.FunctionType):
            return self._call_python(obj, args, frame, owner=_owner_of(obj))
        if isinstance(obj, type):
            return self._construct(obj, args, frame)
        call = getattr(type(obj), "__call__", None)
        if isinstance(call, types.FunctionType) and not isinstance(obj, (types.BuiltinFunctionType,
                                                                         types.BuiltinMethodType)):
            bound = _Args([frozenset({Known(obj)})] + args.positional, args.keywords, args.extra, args.extra_keywords)
            return self._call_python(call, bound, frame, owner=_defining_class(type(obj), "__call__"))
        self._hand_over(args.values() + [frozenset({Known(obj)})], frame, _callable_name(obj))
        return frozenset({UNKNOWN})

    def _construct(self, cls: type, args: _Args, frame: _Frame) -> Value:
        """A class called with a module of the model: its __init__ read with a new object (anything it stores
        of the model on that object is handed over)."""
        if issubclass(cls, BaseException):
            return frozenset({UNKNOWN})
        if not any(refs(v) or any(isinstance(a, (Bound, Super)) for a in v) for v in args.values()):
            return frozenset({UNKNOWN})
        init = inspect.getattr_static(cls, "__init__", None)
        new = inspect.getattr_static(cls, "__new__", None)
        if isinstance(new, staticmethod):
            new = new.__func__
        if isinstance(init, types.FunctionType) and new in (object.__new__, None) or \
                isinstance(init, types.FunctionType) and _module_method(init) is None and new is object.__new__:
            bound = _Args([frozenset({UNKNOWN})] + args.positional, args.keywords, args.extra, args.extra_keywords)
            self._call_python(init, bound, frame, owner=_defining_class(cls, "__init__"))
            return frozenset({UNKNOWN})
        self._hand_over(args.values(), frame, f"{cls.__qualname__}(...)")
        return frozenset({UNKNOWN})

    def _getattr(self, args: _Args, frame: _Frame) -> Value:
        if len(args.positional) < 2:
            self._hand_over(args.values(), frame, "getattr")
            return frozenset({UNKNOWN})
        target, name = args.positional[0], args.positional[1]
        names = {a.value for a in name if isinstance(a, Const) and isinstance(a.value, str)}
        computed = any(not (isinstance(a, Const) and isinstance(a.value, str)) for a in name)
        out: Set[object] = set()
        for attribute in names:
            out |= self._attribute(target, attribute, frame)
        if computed:
            for atom in target:
                if isinstance(atom, Ref) and atom.depth == 0:
                    self._use(atom.path + (CHILD,), f"looks up a computed name on {path_text(atom.path)}", frame)
                    out.add(Ref(atom.path + (CHILD,)))
                elif isinstance(atom, (Bound, Super)) or isinstance(atom, Ref):
                    self._hand_over([frozenset({atom})], frame, "getattr with a computed name")
            out.add(UNKNOWN)
        if len(args.positional) > 2:
            out |= args.positional[2]
        return frozenset(out) or frozenset({UNKNOWN})

    def _super(self, args: _Args, frame: _Frame) -> Value:
        if len(args.positional) >= 2:
            classes = [a.obj for a in args.positional[0] if isinstance(a, Known) and isinstance(a.obj, type)]
            receiver = args.positional[1]
        else:
            owner = _class_cell(frame.function) or frame.owner
            classes, receiver = ([owner] if owner is not None else []), frame.receiver
        if not classes:
            self._hand_over([receiver], frame, "super() outside a method acfx knows the class of")
            return frozenset({UNKNOWN})
        return frozenset(Super.of(cls, receiver) for cls in classes)

    # -- attributes ----------------------------------------------------------------------------------------
    def _attribute(self, value: Value, attribute: str, frame: _Frame) -> Value:
        out: Set[object] = set()
        for atom in value:
            if isinstance(atom, Ref):
                out |= self._ref_attribute(atom, attribute, frame)
            elif isinstance(atom, Known):
                out |= self._known_attribute(atom.obj, attribute, frame)
            elif isinstance(atom, Super):
                out |= self._super_attribute(atom, attribute, frame)
            elif isinstance(atom, Bound) and attribute == "__self__":
                out |= atom.receiver
            else:
                out.add(UNKNOWN)
        return frozenset(out) or frozenset({UNKNOWN})

    def _ref_attribute(self, ref: Ref, attribute: str, frame: _Frame) -> Value:
        path = ref.path
        if ref.depth:
            return self._container_method(ref, attribute, frame)
        if attribute == "__dict__":
            self._use(path, f"reads {path_text(path)}.__dict__", frame, below=True)
            return frozenset({UNKNOWN})
        if attribute in ("_modules", "_parameters", "_buffers"):
            return frozenset({Ref(path + (CHILD,), 1)})
        found = self.objects(path)
        if not found:
            self._use(path + (attribute,), f"reads {path_text(path + (attribute,))}", frame)
            return frozenset({Ref(path + (attribute,))})
        out: Set[object] = set()
        for obj in found:
            out |= self._object_attribute(obj, path, attribute, frame)
        return frozenset(out) or frozenset({UNKNOWN})

    def _plain_attribute(self, obj: object, path: Path, attribute: str) -> Value:
        """An attribute of a Python object (not a module) the model holds at ``path``: a method of its class
        is followed with the object as self; a value it holds is also what it is (a module of the model held
        there is that module, at its own path)."""
        child = path + (attribute,)
        if isinstance(obj, torch.Tensor):
            return frozenset({Ref(child)})
        static = inspect.getattr_static(obj, attribute, _MISSING)
        if isinstance(static, types.FunctionType) and attribute not in getattr(obj, "__dict__", {}):
            return frozenset({Bound.of(static, frozenset({Ref(path)}), _defining_class(type(obj), attribute))})
        if attribute in getattr(obj, "__dict__", {}):
            return self.value_of(static) | {Ref(child)}
        return frozenset({Ref(child)})

    def _call_held_object(self, obj: object, path: Path, args: _Args, frame: _Frame) -> Value:
        """A Python object (not a module) the model holds at ``path``, called: its class's ``__call__`` read
        with the object as self, or the callable itself (a partial, a function) as any call of it is."""
        call = inspect.getattr_static(type(obj), "__call__", None)
        if isinstance(obj, (types.FunctionType, types.MethodType, functools.partial)) or not \
                isinstance(call, types.FunctionType):
            return self._call_known(obj, args, frame)
        bound = _Args([frozenset({Ref(path)})] + args.positional, args.keywords, args.extra, args.extra_keywords)
        return self._call_python(call, bound, frame, owner=_defining_class(type(obj), "__call__"))

    def _container_method(self, ref: Ref, attribute: str, frame: _Frame) -> Value:
        """A method of a Python container holding modules of the model (a ModuleDict's ``_modules``, a list
        attribute), as the builtin that gives what it gives: its items (``values()``), (key, item) pairs
        (``items()``), one item (``get(k)``), or no module (``keys()``). Any other method may change the
        container or hand its items on: everything below it is used."""
        for builtin, methods in _CONTAINER_METHODS:
            if attribute in methods:
                return frozenset({Bound.of(builtin, frozenset({ref}), None)})
        self._use(ref.path, f"calls {attribute}() of the container {path_text(ref.path)}", frame, below=True)
        return frozenset({UNKNOWN})

    def _object_attribute(self, obj: object, path: Path, attribute: str, frame: _Frame) -> Value:
        child = path + (attribute,)
        if attribute == "__class__":
            return frozenset({Known(type(obj))})
        if not isinstance(obj, nn.Module):
            self._use(child, f"reads {path_text(child)}", frame)
            return self._plain_attribute(obj, path, attribute)
        if attribute in obj._modules or attribute in obj._parameters or attribute in obj._buffers:
            self._use(child, f"reads {path_text(child)}", frame)
            return frozenset({Ref(child)})
        if attribute in obj.__dict__:
            value = obj.__dict__[attribute]
            self._use(child, f"reads {path_text(child)}", frame)
            if attribute == "training":
                return frozenset({UNKNOWN})
            if _simple(value):
                return frozenset({Const(value)})
            return self.value_of(value) | {Ref(child)}
        cls = type(obj)
        static = inspect.getattr_static(cls, attribute, _MISSING)
        owner = _defining_class(cls, attribute)
        if isinstance(static, property):
            self._use(path, f"reads {path_text(child)}", frame)
            if static.fget is None:
                return frozenset({UNKNOWN})
            return self._call_known(static.fget, _Args([frozenset({Ref(path)})], {}), frame)
        if isinstance(static, types.FunctionType):
            return frozenset({Bound.of(static, frozenset({Ref(path)}), owner)})
        if isinstance(static, staticmethod):
            return frozenset({Known(static.__func__)})
        if isinstance(static, classmethod):
            return frozenset({Bound.of(static.__func__, frozenset({Known(cls)}), owner)})
        if static is _MISSING:
            if getattr(cls, "__getattr__", None) is not nn.Module.__getattr__:
                self._use(path, f"reads {path_text(child)} through {cls.__qualname__}.__getattr__", frame, below=True)
                return frozenset({UNKNOWN})
            self._use(child, f"reads {path_text(child)}", frame)  # set later, at run time
            return frozenset({Ref(child)})
        if _simple(static):
            return frozenset({Const(static)})
        return self.value_of(static)

    def _known_attribute(self, obj: object, attribute: str, frame: _Frame) -> Value:
        if isinstance(obj, types.ModuleType):
            try:
                return self.value_of(getattr(obj, attribute))
            except AttributeError:
                return frozenset({UNKNOWN})
        if isinstance(obj, type):
            static = inspect.getattr_static(obj, attribute, _MISSING)
            if isinstance(static, (staticmethod, classmethod)):
                function = static.__func__
                return frozenset({Known(function)} if isinstance(static, staticmethod) else
                                 {Bound.of(function, frozenset({Known(obj)}), _defining_class(obj, attribute))})
            return frozenset({UNKNOWN}) if static is _MISSING else self.value_of(static)
        static = inspect.getattr_static(type(obj), attribute, _MISSING)
        if isinstance(static, types.FunctionType):
            return frozenset({Bound.of(static, frozenset({Known(obj)}), _defining_class(type(obj), attribute))})
        if isinstance(static, staticmethod):
            return frozenset({Known(static.__func__)})
        if isinstance(static, classmethod):
            return frozenset({Bound.of(static.__func__, frozenset({Known(type(obj))}), _defining_class(type(obj),
                                                                                                    attribute))})
        if isinstance(static, property) and static.fget is not None:
            return self._call_known(static.fget, _Args([frozenset({Known(obj)})], {}), frame)
        instance = getattr(obj, "__dict__", {})
        if isinstance(instance, dict) and attribute in instance:
            return self.value_of(instance[attribute])
        return frozenset({UNKNOWN}) if static is _MISSING or callable(static) else self.value_of(static)

    def _super_attribute(self, atom: Super, attribute: str, frame: _Frame) -> Value:
        out: Set[object] = set()
        receivers = [o for r in refs(atom.receiver) for o in self.objects(r.path)]
        types_ = {type(o) for o in receivers} or {atom.cls}
        for cls in types_:
            mro = cls.__mro__
            start = mro.index(atom.cls) + 1 if atom.cls in mro else 0
            for klass in mro[start:]:
                if attribute in vars(klass):
                    function = vars(klass)[attribute]
                    if isinstance(function, types.FunctionType):
                        out.add(Bound.of(function, atom.receiver, klass))
                    else:
                        self._hand_over([atom.receiver], frame, f"super().{attribute}")
                        out.add(UNKNOWN)
                    break
        return frozenset(out) or frozenset({UNKNOWN})

    # -- statements -------------------------------------------------------------------------------------------
    def _block_fixed_point(self, body: Sequence[ast.stmt], frame: _Frame) -> None:
        """Read a body until its bindings stop growing (a name bound later in a loop is used earlier)."""
        for _ in range(4):
            before = {k: frozenset(v) for k, v in frame.env.items()}
            self._block(body, frame)
            if {k: frozenset(v) for k, v in frame.env.items()} == before:
                return

    def _block(self, body: Sequence[ast.stmt], frame: _Frame) -> None:
        for statement in body:
            frame.line = getattr(statement, "lineno", frame.line)
            handler = getattr(self, f"_s_{type(statement).__name__}", None)
            if handler is None:
                self._fail(f"holds a {type(statement).__name__} statement acfx does not read", frame)
                continue
            handler(statement, frame)

    def _s_Expr(self, node, frame):
        self._expr(node.value, frame)

    def _s_Return(self, node, frame):
        frame.returns |= self._expr(node.value, frame) if node.value is not None else {Const(None)}

    def _s_Assign(self, node, frame):
        value = self._expr(node.value, frame)
        for target in node.targets:
            self._bind(target, value, frame)

    def _s_AnnAssign(self, node, frame):
        if node.value is not None:
            self._bind(node.target, self._expr(node.value, frame), frame)

    def _s_AugAssign(self, node, frame):
        value = self._expr(node.value, frame)
        if isinstance(node.target, ast.Name):
            current = self._name(node.target.id, frame)
            frame.env.setdefault(node.target.id, set()).update(current | frozenset(refs(value)) | {UNKNOWN})
        else:
            self._expr(node.target.value, frame)
            self._bind(node.target, value, frame)

    def _s_For(self, node, frame):
        self._bind(node.target, items(self._expr(node.iter, frame)), frame)
        self._block(node.body, frame)
        self._block(node.body, frame)
        self._block(node.orelse, frame)

    _s_AsyncFor = _s_For

    def _s_While(self, node, frame):
        if _decided(self._expr(node.test, frame)) is not False:
            self._block(node.body, frame)
            self._block(node.body, frame)
        self._block(node.orelse, frame)

    def _s_If(self, node, frame):
        truth = _decided(self._expr(node.test, frame))
        if truth is not False:
            self._block(node.body, frame)
        if truth is not True:
            self._block(node.orelse, frame)

    def _s_With(self, node, frame):
        for item in node.items:
            value = self._expr(item.context_expr, frame)
            if item.optional_vars is not None:
                self._bind(item.optional_vars, value | {UNKNOWN}, frame)
        self._block(node.body, frame)

    _s_AsyncWith = _s_With

    def _s_Try(self, node, frame):
        self._block(node.body, frame)
        for handler in node.handlers:
            if handler.type is not None:
                self._expr(handler.type, frame)
            if handler.name:
                frame.env.setdefault(handler.name, set()).add(UNKNOWN)
            self._block(handler.body, frame)
        self._block(node.orelse, frame)
        self._block(node.finalbody, frame)

    _s_TryStar = _s_Try

    def _s_Raise(self, node, frame):
        for part in (node.exc, node.cause):
            if part is not None:
                self._expr(part, frame)

    def _s_Assert(self, node, frame):
        self._expr(node.test, frame)
        if node.msg is not None:
            self._expr(node.msg, frame)

    def _s_Delete(self, node, frame):
        for target in node.targets:
            if isinstance(target, (ast.Attribute, ast.Subscript)):
                for ref in refs(self._expr(target.value, frame)):
                    self._use(ref.path, f"deletes from {path_text(ref.path)}", frame, below=True)

    def _s_Import(self, node, frame):
        for alias in node.names:
            name = alias.asname or alias.name.split(".")[0]
            module = sys.modules.get(alias.name if alias.asname else alias.name.split(".")[0])
            frame.env.setdefault(name, set()).add(Known(module) if module is not None else UNKNOWN)

    def _s_ImportFrom(self, node, frame):
        package = frame.function.__globals__.get("__package__") or ""
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
        module = sys.modules.get(base)
        for alias in node.names:
            if alias.name == "*":
                continue
            value = getattr(module, alias.name, _MISSING) if module is not None else _MISSING
            frame.env.setdefault(alias.asname or alias.name, set()).update(
                self.value_of(value) if value is not _MISSING else {UNKNOWN})

    def _s_FunctionDef(self, node, frame):
        for expr in node.decorator_list:
            self._expr(expr, frame)
        self._bind_arguments(node.args, frame)
        frame.env.setdefault(node.name, set()).add(UNKNOWN)
        self._block(node.body, frame)  # read where it is defined: its uses count wherever it runs

    _s_AsyncFunctionDef = _s_FunctionDef

    def _s_ClassDef(self, node, frame):
        for expr in node.bases + node.decorator_list:
            self._expr(expr, frame)
        frame.env.setdefault(node.name, set()).add(UNKNOWN)
        self._block(node.body, frame)

    def _s_Match(self, node, frame):
        subject = self._expr(node.subject, frame)
        for case in node.cases:
            for child in ast.walk(case.pattern):
                for name in (getattr(child, "name", None), getattr(child, "rest", None)):
                    if isinstance(name, str):
                        frame.env.setdefault(name, set()).update(subject | items(subject))
            if case.guard is not None:
                self._expr(case.guard, frame)
            self._block(case.body, frame)

    def _s_Pass(self, node, frame):
        return None

    _s_Break = _s_Continue = _s_Global = _s_Nonlocal = _s_TypeAlias = _s_Pass

    # -- binding -----------------------------------------------------------------------------------------------
    def _bind(self, target: ast.expr, value: Value, frame: _Frame) -> None:
        if isinstance(target, ast.Name):
            frame.env.setdefault(target.id, set()).update(value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            starred = any(isinstance(e, ast.Starred) for e in target.elts)
            for position, part in enumerate(target.elts):
                if isinstance(part, ast.Starred):
                    self._bind(part.value, wrap(items(value)), frame)
                else:
                    self._bind(part, items(value) if starred else _unpacked(value, position, len(target.elts)), frame)
        elif isinstance(target, ast.Starred):
            self._bind(target.value, value, frame)
        elif isinstance(target, ast.Attribute):
            attribute = mangle(target.attr, frame.class_name)
            for atom in self._expr(target.value, frame):
                if isinstance(atom, Ref) and atom.depth == 0:
                    self._use(atom.path + (attribute,), f"writes {path_text(atom.path + (attribute,))}", frame)
            self._hand_over([frozenset(refs(value))] if refs(value) else [], frame, f"an attribute '{attribute}'")
        elif isinstance(target, ast.Subscript):
            self._expr(target.slice, frame)
            container = self._expr(target.value, frame)
            for atom in container:
                if isinstance(atom, Ref) and atom.depth == 0:
                    self._use(atom.path + (ITEM,), f"writes an item of {path_text(atom.path)}", frame, below=True)
            if refs(value):
                if isinstance(target.value, ast.Name) and target.value.id in frame.local_names:
                    frame.env.setdefault(target.value.id, set()).update(wrap(refs(value)))
                else:
                    self._hand_over([frozenset(refs(value))], frame, "a container acfx does not follow")

    # -- expressions ------------------------------------------------------------------------------------------
    def _expr(self, node: Optional[ast.expr], frame: _Frame) -> Value:
        if node is None:
            return frozenset({Const(None)})
        handler = getattr(self, f"_e_{type(node).__name__}", None)
        if handler is None:  # syntax this reader does not know: its parts are handed over
            parts = [self._expr(child, frame) for child in ast.iter_child_nodes(node) if isinstance(child, ast.expr)]
            self._hand_over(parts, frame, f"a {type(node).__name__} expression")
            return frozenset({UNKNOWN})
        return handler(node, frame)

    def _name(self, name: str, frame: _Frame) -> Value:
        if name in frame.env:
            return frozenset(frame.env[name])
        if name in frame.local_names:
            return frozenset({UNKNOWN})
        code = frame.function.__code__
        if name in code.co_freevars and frame.function.__closure__:
            cell = frame.function.__closure__[code.co_freevars.index(name)]
            try:
                return self.value_of(cell.cell_contents)
            except ValueError:  # an empty cell
                return frozenset({UNKNOWN})
        if name in frame.function.__globals__:
            return self.value_of(frame.function.__globals__[name])
        if hasattr(builtins, name):
            return frozenset({Known(getattr(builtins, name))})
        return frozenset({UNKNOWN})

    def _e_Name(self, node, frame):
        return self._name(node.id, frame)

    def _e_Constant(self, node, frame):
        return frozenset({Const(node.value) if _simple(node.value) else UNKNOWN})

    def _e_Attribute(self, node, frame):
        metadata = self._tensor_metadata(node, frame)
        if metadata is not None:
            return metadata
        return self._attribute(self._expr(node.value, frame), mangle(node.attr, frame.class_name), frame)

    def _tensor_metadata(self, node: ast.Attribute, frame: _Frame) -> Optional[Value]:
        """``next(module.parameters()).device`` (or ``.dtype``, ``buffers()``, ``iter(...)``): the common way
        to ask a module where it lives reads no tensor's values, so it uses the module as calling it would."""
        found = _first_tensor_call(node)
        if found is None:
            return None
        next_name, iter_name, receiver, method = found
        if self._expr(next_name, frame) != frozenset({Known(builtins.next)}) or \
                iter_name is not None and self._expr(iter_name, frame) != frozenset({Known(builtins.iter)}):
            return None
        methods = self._attribute(self._expr(receiver, frame), method, frame)
        if not all(isinstance(a, Bound) and _module_method(a.function) == method for a in methods):
            return None
        for ref in refs(frozenset().union(*(a.receiver for a in methods))):
            self._use(ref.path, f"reads the {node.attr} of a tensor of {path_text(ref.path)}", frame)
        return frozenset({UNKNOWN})

    def _e_Subscript(self, node, frame):
        container = self._expr(node.value, frame)
        index = self._expr(node.slice, frame)
        key = None
        if len(index) == 1:
            atom = next(iter(index))
            if isinstance(atom, Const) and (isinstance(atom.value, str) or
                                            isinstance(atom.value, int) and not isinstance(atom.value, bool)
                                            and atom.value >= 0):
                key = str(atom.value)
        out: Set[object] = set()
        for atom in container:
            if isinstance(atom, Ref) and atom.depth == 0:
                if isinstance(node.slice, ast.Slice):
                    self._use(atom.path + (ITEM,), f"indexes '{path_text(atom.path)}' (a slice of it)", frame)
                    out.add(Ref(atom.path + (ITEM,), 1))
                    continue
                for item in self._item_names(atom.path, key):
                    path = atom.path + (item,)
                    self._use(path, f"indexes '{path_text(atom.path)}' ({path_text(path)})", frame)
                    out.add(Ref(path))
            elif isinstance(atom, Ref):
                out.add(Ref(atom.path, atom.depth - 1))
            elif isinstance(atom, Seq) and not isinstance(node.slice, ast.Slice):
                position = int(key) if key is not None and key.lstrip("-").isdigit() else None
                out |= element([atom], position if position is not None else _int_index(index))
            else:
                out |= items([atom]) if isinstance(atom, Seq) else {UNKNOWN}
        return frozenset(out) or frozenset({UNKNOWN})

    def _item_names(self, path: Path, key: Optional[str]) -> List[str]:
        """The names of the items ``container[key]`` may be: a position of a Sequential or ModuleList is the
        item at that position whatever its name; a key of a ModuleDict is its name; anything else any item."""
        if key is None:
            return [ITEM]
        names = set()
        for obj in self.objects(path):
            if isinstance(obj, (nn.Sequential, nn.ModuleList)) and key.isdigit():
                children = list(obj._modules)
                names.add(children[int(key)] if int(key) < len(children) else ITEM)
            else:
                names.add(key)
        return sorted(names) or [key]

    def _e_Call(self, node, frame):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in _MUTATORS and isinstance(func.value, ast.Name) \
                and func.value.id in frame.local_names:
            values = [self._expr(a.value if isinstance(a, ast.Starred) else a, frame) for a in node.args]
            values += [self._expr(k.value, frame) for k in node.keywords]
            held = frozenset().union(*(refs(v) for v in values)) if values else frozenset()
            if held:
                frame.env.setdefault(func.value.id, set()).update(
                    wrap(held) if func.attr in ("append", "add", "insert", "appendleft", "setdefault") else held)
            self._expr(func.value, frame)
            return frozenset({Const(None)})
        callee = self._expr(func, frame)
        args = _Args([], {})
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                value = self._expr(arg.value, frame)
                if value == {NO_ARGS}:
                    continue
                if len(value) == 1 and isinstance(next(iter(value)), Seq) and args.extra is None:
                    args.positional.extend(next(iter(value)).elements)  # a known tuple: its elements one by one
                    continue
                args.extra = (args.extra or frozenset()) | items(value) | {UNKNOWN}
            else:
                args.positional.append(self._expr(arg, frame))
        for keyword in node.keywords:
            value = self._expr(keyword.value, frame)
            if keyword.arg is not None:
                args.keywords[keyword.arg] = value
            elif value != {NO_KWARGS}:
                args.extra_keywords = (args.extra_keywords or frozenset()) | items(value) | {UNKNOWN}
        return self._apply(callee, args, frame)

    def _e_BoolOp(self, node, frame):
        out: Set[object] = set()
        for value_node in node.values:
            value = self._expr(value_node, frame)
            out |= value
            truth = _decided(value)
            if truth is not None and truth == isinstance(node.op, ast.Or):
                return frozenset(value)
        return frozenset(out)

    def _e_BinOp(self, node, frame):
        held = refs(self._expr(node.left, frame)) | refs(self._expr(node.right, frame))
        return frozenset(held) | {UNKNOWN}  # ModuleList + list, tensor arithmetic: what it holds, conservatively

    def _e_UnaryOp(self, node, frame):
        value = self._expr(node.operand, frame)
        truth = _decided(value)
        if isinstance(node.op, ast.Not) and truth is not None:
            return frozenset({Const(not truth)})
        number = _int_index(value)
        if number is not None and isinstance(node.op, (ast.USub, ast.UAdd)):
            return frozenset({Const(-number if isinstance(node.op, ast.USub) else number)})  # x[-1]
        return frozenset({UNKNOWN})

    def _e_Compare(self, node, frame):
        values = [self._expr(node.left, frame)] + [self._expr(c, frame) for c in node.comparators]
        if len(node.ops) == 1 and all(len(v) == 1 and isinstance(next(iter(v)), Const) for v in values) \
                and not any(v & {NO_ARGS, NO_KWARGS} for v in values):
            left, right = (next(iter(v)).value for v in values)
            op = node.ops[0]
            known = {ast.Is: lambda: left is right, ast.IsNot: lambda: left is not right,
                     ast.Eq: lambda: left == right, ast.NotEq: lambda: left != right}
            if type(op) in known:
                return frozenset({Const(known[type(op)]())})
        return frozenset({UNKNOWN})

    def _e_IfExp(self, node, frame):
        truth = _decided(self._expr(node.test, frame))
        out: Set[object] = set()
        if truth is not False:
            out |= self._expr(node.body, frame)
        if truth is not True:
            out |= self._expr(node.orelse, frame)
        return frozenset(out)

    def _elements(self, nodes: Sequence[ast.expr], frame: _Frame) -> Value:
        out: Set[object] = set()
        for node in nodes:
            if isinstance(node, ast.Starred):
                out |= items(self._expr(node.value, frame))
            else:
                out |= self._expr(node, frame)
        return wrap(out)

    def _e_Tuple(self, node, frame):
        if any(isinstance(e, ast.Starred) for e in node.elts):
            return self._elements(node.elts, frame)
        return frozenset({Seq(tuple(self._expr(e, frame) for e in node.elts))})

    _e_List = _e_Set = _e_Tuple

    def _e_Dict(self, node, frame):
        for key in node.keys:
            if key is not None:
                self._expr(key, frame)
        values = [self._expr(v, frame) for v in node.values]
        return wrap(frozenset().union(*values) if values else {UNKNOWN})

    def _comprehension(self, node, frame, *elements) -> Value:
        for generator in node.generators:
            self._bind(generator.target, items(self._expr(generator.iter, frame)), frame)
            for condition in generator.ifs:
                self._expr(condition, frame)
        return wrap(frozenset().union(*(self._expr(e, frame) for e in elements)))

    def _e_ListComp(self, node, frame):
        return self._comprehension(node, frame, node.elt)

    _e_SetComp = _e_GeneratorExp = _e_ListComp

    def _e_DictComp(self, node, frame):
        return self._comprehension(node, frame, node.key, node.value)

    def _bind_arguments(self, args: ast.arguments, frame: _Frame) -> None:
        """The arguments of a function or lambda written in the code, read where it is written: any value, or
        its default (``lambda t, m=self.blk: m.conv(t)`` uses blk.conv)."""
        positional = getattr(args, "posonlyargs", []) + args.args
        defaulted = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
        defaulted += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
        defaults = [(arg.arg, self._expr(default, frame)) for arg, default in defaulted]  # in the outer scope
        for arg in _arguments(args):
            frame.env.setdefault(arg, set()).add(UNKNOWN)
        for name, value in defaults:
            frame.env[name].update(value)

    def _e_Lambda(self, node, frame):
        self._bind_arguments(node.args, frame)
        self._expr(node.body, frame)  # read where it is written: its uses count wherever it runs
        return frozenset({UNKNOWN})

    def _e_NamedExpr(self, node, frame):
        value = self._expr(node.value, frame)
        self._bind(node.target, value, frame)
        return value

    def _e_Await(self, node, frame):
        value = self._expr(node.value, frame)
        self._hand_over([value], frame, "a coroutine")
        return frozenset({UNKNOWN})

    def _e_Yield(self, node, frame):
        if node.value is not None:
            self._hand_over([self._expr(node.value, frame)], frame, "the caller of a generator")
        return frozenset({UNKNOWN})

    _e_YieldFrom = _e_Yield

    def _e_JoinedStr(self, node, frame):
        for value in node.values:
            self._expr(value, frame)
        return frozenset({UNKNOWN})

    def _e_FormattedValue(self, node, frame):
        self._expr(node.value, frame)
        if node.format_spec is not None:
            self._expr(node.format_spec, frame)
        return frozenset({UNKNOWN})

    def _e_Slice(self, node, frame):
        for part in (node.lower, node.upper, node.step):
            if part is not None:
                self._expr(part, frame)
        return frozenset({UNKNOWN})

    def _e_Starred(self, node, frame):
        return items(self._expr(node.value, frame))


# -- helpers ------------------------------------------------------------------------------------------------
def _step(obj: object, part: str) -> List[object]:
    """The objects one path component leads to from ``obj``."""
    if part == ANY:
        return list(obj.modules()) if isinstance(obj, nn.Module) else [obj]
    if part in (ITEM, CHILD):
        if isinstance(obj, nn.Module):
            return list(obj._modules.values())
        if isinstance(obj, (list, tuple)):
            return list(obj)
        if isinstance(obj, dict):
            return list(obj.values())
        return []
    if isinstance(obj, nn.Module):
        for store in (obj._modules, obj._parameters, obj._buffers, obj.__dict__):
            if part in store and store[part] is not None:
                return [store[part]]
        return []
    if isinstance(obj, (list, tuple)) and part.isdigit() and int(part) < len(obj):
        return [obj[int(part)]]
    if isinstance(obj, dict) and part in obj:
        return [obj[part]]
    return []


def _bind(function: types.FunctionType, args: _Args, value_of) -> Dict[str, Value]:
    """Parameter name -> value for a call of ``function`` with ``args`` (defaults where nothing is passed)."""
    code = function.__code__
    positional = code.co_varnames[:code.co_argcount]
    keyword_only = code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount]
    index = code.co_argcount + code.co_kwonlyargcount
    star = code.co_varnames[index] if code.co_flags & inspect.CO_VARARGS else None
    index += 1 if star else 0
    double = code.co_varnames[index] if code.co_flags & inspect.CO_VARKEYWORDS else None
    defaults = dict(zip(positional[len(positional) - len(function.__defaults__ or ()):], function.__defaults__ or ()))
    defaults.update(function.__kwdefaults__ or {})
    unknown: Value = frozenset({UNKNOWN})
    bound: Dict[str, Value] = {}
    for name, value in zip(positional, args.positional):
        bound[name] = value
    extra_positional = args.positional[len(positional):]
    keywords = dict(args.keywords)
    for name in positional + keyword_only:
        if name in keywords:
            bound[name] = keywords.pop(name)
        elif name not in bound:
            extra = (args.extra or frozenset() if name in positional else frozenset()) | (args.extra_keywords or frozenset())
            reader_default = defaults.get(name, _MISSING)
            value: Value = unknown if reader_default is _MISSING else value_of(reader_default)
            bound[name] = value | extra if extra else value
    if star:
        if args.extra:
            held = frozenset().union(*extra_positional) if extra_positional else frozenset()
            bound[star] = wrap(held | args.extra)
        else:
            bound[star] = frozenset({Seq(tuple(extra_positional))}) if extra_positional else frozenset({NO_ARGS})
    if double:
        held = frozenset().union(*keywords.values()) if keywords else frozenset()
        rest = held | (args.extra_keywords or frozenset())
        bound[double] = wrap(rest) if rest else frozenset({NO_KWARGS})
    return bound


def _arguments(args: ast.arguments) -> List[str]:
    names = [a.arg for a in getattr(args, "posonlyargs", []) + args.args + args.kwonlyargs]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return names


def _unpacked(value: Value, position: int, count: int) -> Value:
    """What the target at ``position`` of a ``count``-element unpacking of ``value`` gets."""
    out: Set[object] = set()
    for atom in value:
        if isinstance(atom, Seq) and len(atom.elements) == count:
            out |= atom.elements[position]
        else:
            out |= items([atom])
    return frozenset(out or {UNKNOWN})


def _int_index(value: Value) -> Optional[int]:
    if len(value) == 1:
        atom = next(iter(value))
        if isinstance(atom, Const) and isinstance(atom.value, int) and not isinstance(atom.value, bool):
            return atom.value
    return None


def _decided_str(value: Value) -> Optional[str]:
    if len(value) == 1:
        atom = next(iter(value))
        if isinstance(atom, Const) and isinstance(atom.value, str):
            return atom.value
    return None


def _hashable(obj: object) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def _callable_name(obj: object) -> str:
    module = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", "")
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{name}, which acfx cannot read" if module else f"{name}, which acfx cannot read"


def _class_name(function: types.FunctionType) -> Optional[str]:
    parts = getattr(function, "__qualname__", "").split(".")
    return parts[-2] if len(parts) >= 2 and parts[-2] != "<locals>" else None


def _class_cell(function: types.FunctionType) -> Optional[type]:
    """The class zero-argument ``super()`` means in ``function`` (the compiler's ``__class__`` cell)."""
    code = function.__code__
    if "__class__" in code.co_freevars and function.__closure__:
        try:
            value = function.__closure__[code.co_freevars.index("__class__")].cell_contents
        except ValueError:
            return None
        return value if isinstance(value, type) else None
    return None


def _owner_of(function: types.FunctionType) -> Optional[type]:
    """The class a function is written in, found through its qualified name and module (for super())."""
    parts = getattr(function, "__qualname__", "").split(".")
    if len(parts) < 2 or "<locals>" in parts:
        return None
    obj: object = sys.modules.get(getattr(function, "__module__", ""), None)
    for part in parts[:-1]:
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None
