"""torch.fx tracing of user models, whole or in the largest parts that trace, leaving no trace in them.

acfx uses the graph only to find patterns; it never hands a GraphModule back. Convs and BatchNorms are
always leaves (so they show up as module calls, custom subclasses included), and so are timm's own leaf
modules and functions when timm is installed, and the user's leaf modules.

Tracing runs a model's forward on Proxies, and user code keeps what it is given: a forward that caches
its input, a feature hook that stores its output (timm's FeatureHooks) would keep Proxies in the user's
model. So the model traced is a skeleton copy (new module objects sharing the tensors), and module hooks
do not run while tracing. What hooks would have observed counts as used, though: a value only a feature
hook reads is still part of what the model computes.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Iterable, List, Optional, Sequence, Set, Tuple, Type

import torch.fx as fx
import torch.nn as nn

from ..layers.hooks import hooks_of
from ..layers.norms import is_batch_norm

__all__ = ["AcfxTracer", "TracedPart", "UntracedPart", "trace_parts", "live_nodes", "module_calls",
           "shared_module_names"]


def _timm_leaves() -> Tuple[Tuple[type, ...], Tuple]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover
        return (), ()
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return tuple(get_notrace_modules()), functions


def _proxies_in(value) -> List[fx.Proxy]:
    if isinstance(value, fx.Proxy):
        return [value]
    if isinstance(value, (tuple, list)):
        return [p for v in value for p in _proxies_in(v)]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _proxies_in(v)]
    return []


class AcfxTracer(fx.Tracer):
    """An fx tracer with acfx's, timm's and the user's leaf modules, that runs no module hooks and records
    the values the hooks would have observed (``observed``)."""

    def __init__(self, leaf_types: Sequence[Type[nn.Module]] = (),
                 opaque_types: Sequence[Type[nn.Module]] = ()) -> None:
        timm_modules, timm_functions = _timm_leaves()
        super().__init__(autowrap_functions=timm_functions)
        self.leaf_types = tuple(leaf_types) + timm_modules
        # Traced through even when timm or the user names them as leaves.
        self.opaque_types = tuple(opaque_types)
        self.observed: Set[fx.Node] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.opaque_types and isinstance(m, self.opaque_types):
            return False
        if isinstance(m, (nn.Conv2d,) + self.leaf_types) or is_batch_norm(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        hooks = hooks_of(m)
        if not (hooks.forward_pre or hooks.forward):
            return super().call_module(m, forward, args, kwargs)
        # The module's own forward, without its hooks (they would be handed Proxies).
        out = super().call_module(m, lambda *a, **k: m.forward(*a, **k), args, kwargs)
        self.observed.update(p.node for p in _proxies_in((args, kwargs, out)))
        return out


@dataclasses.dataclass
class TracedPart:
    """A submodule that traced: its qualified name in the model ("" for the model), the module (the user's,
    not the copy that was traced) and its graph."""

    name: str
    module: nn.Module
    graph: fx.Graph
    # Nodes that hooks would observe: used, even where nothing in the graph uses them.
    observed: Set[fx.Node] = dataclasses.field(default_factory=set)
    _live: Optional[Set[fx.Node]] = dataclasses.field(default=None, repr=False)

    def qualify(self, target: str) -> str:
        """The name in the whole model of a module the part's graph calls as ``target``."""
        if not target:
            return self.name
        return f"{self.name}.{target}" if self.name else target

    @property
    def live(self) -> Set[fx.Node]:
        """Nodes the output (or a hook) depends on, computed once."""
        if self._live is None:
            self._live = live_nodes(self.graph, self.observed)
        return self._live


@dataclasses.dataclass
class UntracedPart:
    """A submodule that did not trace (and whose children were traced instead, where they could be)."""

    name: str
    error: str


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def skeleton_copy(root: nn.Module) -> Optional[nn.Module]:
    """New module objects with the same structure, attributes and hooks, sharing every tensor (nothing is
    copied that holds data); None if the model cannot be copied."""
    memo = {id(t): t for t in root.state_dict(keep_vars=True).values()}
    for module in root.modules():
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None:
                memo[id(tensor)] = tensor
    try:
        return copy.deepcopy(root, memo)
    except Exception:  # any object deepcopy refuses: trace the model itself, with its state restored after
        return None


class _RestoreState:
    """Puts back every module's attributes as they were before tracing (when no copy could be traced)."""

    def __init__(self, root: nn.Module) -> None:
        self.saved = [(m, dict(m.__dict__)) for m in root.modules()]

    def __enter__(self) -> "_RestoreState":
        return self

    def __exit__(self, *exc) -> None:
        for module, state in self.saved:
            if module.__dict__ != state:
                module.__dict__.clear()
                module.__dict__.update(state)


def trace_parts(root: nn.Module, make_tracer, skip: Tuple[type, ...] = ()
                ) -> Tuple[List[TracedPart], List[UntracedPart]]:
    """Trace ``root``; where a module does not trace, trace its children instead, recursively.

    ``make_tracer()`` returns a fresh tracer per attempt. Modules of a ``skip`` type are not descended into.
    The graphs are of a skeleton copy of ``root``; the parts name ``root``'s own modules.
    """
    traced: List[TracedPart] = []
    untraced: List[UntracedPart] = []
    copied = skeleton_copy(root)
    subject = copied if copied is not None else root
    real = dict(root.named_modules())

    def visit(name: str, module: nn.Module) -> None:
        tracer = make_tracer()
        try:
            graph = tracer.trace(module)
        except Exception as error:  # any failure of symbolic tracing means: try the children
            untraced.append(UntracedPart(name, _first_line(error)))
            for child_name, child in module.named_children():
                if not isinstance(child, skip) and not tracer.is_leaf_module(child, child_name):
                    visit(f"{name}.{child_name}" if name else child_name, child)
            return
        traced.append(TracedPart(name, real[name], graph, set(tracer.observed)))

    if copied is not None:
        visit("", subject)
    else:
        with _RestoreState(root):
            visit("", subject)
    return traced, untraced


def live_nodes(graph: fx.Graph, roots: Iterable[fx.Node] = ()) -> Set[fx.Node]:
    """Nodes the output or ``roots`` depend on (tracing keeps dead nodes, e.g. an unused slice)."""
    stack: List[fx.Node] = [n for n in graph.nodes if n.op == "output"] + list(roots)
    seen: Set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def module_calls(graph: fx.Graph) -> dict:
    """How many times each module target is called in ``graph``."""
    counts: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def shared_module_names(root: nn.Module) -> dict:
    """Names of modules registered under more than one name: qualified name -> all its names."""
    names: dict = {}
    for name, module in root.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return {name: group for group in names.values() if len(group) > 1 for name in group}
