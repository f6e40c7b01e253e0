"""Where a matched region lives: the whole forward of one module, or part of a module's forward.

fx records, for every node, the stack of modules whose forward it ran in (node.meta["nn_module_stack"]).
A region is *whole* when the innermost module holding it runs nothing else (but one padding op on its input
before the branches, and the constants the region reads): that module can be swapped for one conv. A
region that shares its module's forward with other code (an activation after the sum) is located with that
forward's nodes, which collapse rewrites around one conv.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Set, Tuple

import torch.fx as fx
import torch.nn as nn

from ..layers.geometry import Window
from ..layers.padding import PAD_FUNCTIONS, PAD_MODULES, DynamicSamePad2d
from .module_stacks import common_prefix

__all__ = ["PreOp", "Scope", "ScopeIndex", "pre_op_of"]

_MODE_OF = {cls: mode for mode, cls in PAD_MODULES.items()}


@dataclasses.dataclass
class PreOp:
    """Padding the block applies to its input once, before the branches."""

    window: Window = Window()
    mode: str = "zeros"
    # (kernel, stride, dilation) of a TF-'same' padding computed at run time; None for static padding.
    dynamic: Optional[Tuple[tuple, tuple, tuple]] = None


@dataclasses.dataclass(frozen=True)
class Scope:
    """The module holding a region ("" for the traced root): whether the region is its whole forward, the nodes
    of that forward in graph order, or why the region cannot be rewritten there."""

    module: Optional[str]
    # The innermost module (qualified name in the traced part) whose forward holds the match.
    enclosing: str
    pre: Optional[PreOp] = None
    reason: Optional[str] = None
    # True: the region (and ``pre``) is all the module computes; False: the forward does more.
    whole: bool = True
    body: Tuple[fx.Node, ...] = ()


def _pad_function_op(node: fx.Node) -> Optional[PreOp]:
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    if not (isinstance(pad, (tuple, list)) and len(pad) == 4 and all(isinstance(p, int) for p in pad)):
        return None
    if mode == "constant" and value in (None, 0, 0.0):
        mode = "zeros"
    if mode not in PAD_MODULES:
        return None
    return PreOp(Window.from_pad_args(tuple(pad)), mode)


def pre_op_of(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[PreOp]:
    """The padding ``node`` performs, if it is one acfx can fold into a conv's padding."""
    if node.op == "call_function" and node.target in PAD_FUNCTIONS:
        return _pad_function_op(node)
    if node.op != "call_module":
        return None
    module = modules[node.target]
    if isinstance(module, DynamicSamePad2d):
        return PreOp(dynamic=(module.kernel_size, module.stride, module.dilation))
    if isinstance(module, nn.ConstantPad2d) and module.value != 0:
        return None
    mode = _MODE_OF.get(type(module), "zeros" if isinstance(module, nn.ConstantPad2d) else None)
    if mode is None:
        return None
    return PreOp(Window.from_pad_args(tuple(module.padding)), mode)


def _stack(node: fx.Node) -> List[Tuple[str, str]]:
    """(call key, module qualified name) of the modules whose forward ran ``node``, outermost first."""
    return [(key, value[0]) for key, value in node.meta.get("nn_module_stack", {}).items()]


class ScopeIndex:
    """The live nodes of a traced part, by each module call whose forward ran them: built once, so that
    locating every match costs the size of its module, not of the model."""

    def __init__(self, live: Set[fx.Node], modules: Dict[str, nn.Module], graph: fx.Graph) -> None:
        self.live, self.modules = live, modules
        self.order = {node: i for i, node in enumerate(graph.nodes)}
        ordered = sorted(live, key=self.order.__getitem__)
        self.calls = [n for n in ordered if n.op.startswith("call_") or n.op == "get_attr"]
        self.by_key: Dict[str, List[fx.Node]] = {}
        for node in self.calls:
            for key in node.meta.get("nn_module_stack", {}):
                self.by_key.setdefault(key, []).append(node)
        self.outputs = [a for n in live if n.op == "output" for a in n.all_input_nodes]

    def _identity(self, node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(self.modules.get(node.target), nn.Identity)

    def locate(self, region) -> Scope:
        """The module whose forward holds ``region`` (a LinearRegion), whole or with more code around it."""
        nodes = region.node_set
        prefix = common_prefix([_stack(n) for n in nodes])
        key, name = prefix[-1] if prefix else (None, "")
        body = tuple(self.calls if key is None else self.by_key.get(key, ()))
        inside = set(body)
        extra = {n for n in inside - nodes - set(region.constants) if not self._identity(n)}
        inputs = {a for n in body for a in n.all_input_nodes if a not in inside}
        whole_inputs = len(inputs) == 1 and (key is not None or self.outputs == [region.output])
        if not extra and whole_inputs:
            return Scope(name, name, None, None, True, body)
        if extra == {region.source} and whole_inputs:
            pre = pre_op_of(region.source, self.modules)
            if pre is not None:
                return Scope(name, name, pre, None, True, body)
        if key is None:
            return Scope(None, name, reason="the branches are summed inline in the model's own forward among other "
                                            "operations; acfx rewrites the forward of modules below the model")
        return Scope(name, name, None, None, False, body)

