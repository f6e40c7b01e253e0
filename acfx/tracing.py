"""torch.fx tracing of user models, whole or in the largest parts that trace.

acfx uses the graph only to find patterns; it never hands a GraphModule back. Convs and BatchNorms are
always leaves (so they show up as module calls, custom subclasses included), and so are timm's own leaf
modules and functions when timm is installed, and the user's leaf modules.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, List, Sequence, Set, Tuple, Type

import torch.fx as fx
import torch.nn as nn

from .norms import is_batch_norm

__all__ = ["AcfxTracer", "TracedPart", "UntracedPart", "trace_parts", "live_nodes"]


def _timm_leaves() -> Tuple[Tuple[type, ...], Tuple]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover
        return (), ()
    functions = tuple(f for f in get_notrace_functions() if callable(f))
    return tuple(get_notrace_modules()), functions


class AcfxTracer(fx.Tracer):
    """An fx tracer with acfx's, timm's and the user's leaf modules."""

    def __init__(self, leaf_types: Sequence[Type[nn.Module]] = (),
                 opaque_types: Sequence[Type[nn.Module]] = ()) -> None:
        timm_modules, timm_functions = _timm_leaves()
        super().__init__(autowrap_functions=timm_functions)
        self.leaf_types = tuple(leaf_types) + timm_modules
        # Traced through even when timm or the user names them as leaves.
        self.opaque_types = tuple(opaque_types)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.opaque_types and isinstance(m, self.opaque_types):
            return False
        if isinstance(m, (nn.Conv2d,) + self.leaf_types) or is_batch_norm(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclasses.dataclass
class TracedPart:
    """A submodule that traced: its qualified name in the model ("" for the model) and its graph."""

    name: str
    module: nn.Module
    graph: fx.Graph

    def qualify(self, target: str) -> str:
        """The name in the whole model of a module the part's graph calls as ``target``."""
        if not target:
            return self.name
        return f"{self.name}.{target}" if self.name else target


@dataclasses.dataclass
class UntracedPart:
    """A submodule that did not trace (and whose children were traced instead, where they could be)."""

    name: str
    error: str


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def trace_parts(root: nn.Module, make_tracer, skip: Tuple[type, ...] = ()
                ) -> Tuple[List[TracedPart], List[UntracedPart]]:
    """Trace ``root``; where a module does not trace, trace its children instead, recursively.

    ``make_tracer()`` returns a fresh tracer per attempt. Modules of a ``skip`` type are not descended into.
    """
    traced: List[TracedPart] = []
    untraced: List[UntracedPart] = []

    def visit(name: str, module: nn.Module) -> None:
        tracer = make_tracer()
        try:
            graph = tracer.trace(module)
        except Exception as error:  # any failure of symbolic tracing means: try the children
            children = list(module.named_children())
            untraced.append(UntracedPart(name, _first_line(error)))
            for child_name, child in children:
                if not isinstance(child, skip) and not tracer.is_leaf_module(child, child_name):
                    visit(f"{name}.{child_name}" if name else child_name, child)
            return
        traced.append(TracedPart(name, module, graph))

    visit("", root)
    return traced, untraced


def live_nodes(graph: fx.Graph) -> Set[fx.Node]:
    """Nodes the output depends on (tracing keeps dead nodes, e.g. an unused slice)."""
    output = [n for n in graph.nodes if n.op == "output"]
    seen: Set[fx.Node] = set()
    stack: List[fx.Node] = list(output)
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


def iter_call_modules(part: TracedPart) -> Iterable[fx.Node]:
    return (n for n in part.graph.nodes if n.op == "call_module")
