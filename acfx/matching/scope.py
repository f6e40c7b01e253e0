"""Where a matched branch sum lives: the whole forward of one module, or inline among other code.

Only a block that is a whole module can be swapped for one conv. fx records, for every node, the stack of
modules whose forward it ran in (node.meta["nn_module_stack"]); a block is whole when the innermost
module holding the match runs nothing else, except one padding op on its input before the branches.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..layers.geometry import Window
from ..layers.padding import PAD_MODULES, DynamicSamePad2d
from .find_branch_sums import BranchSum

__all__ = ["PreOp", "Scope", "ScopeIndex", "pre_op_of"]

_PAD_FUNCTIONS = (F.pad, torch._C._nn.pad) if hasattr(torch._C._nn, "pad") else (F.pad,)
_MODE_OF = {cls: mode for mode, cls in PAD_MODULES.items()}


@dataclasses.dataclass
class PreOp:
    """Padding the block applies to its input once, before the branches."""

    window: Window = Window()
    mode: str = "zeros"
    # (kernel, stride, dilation) of a TF-'same' padding computed at run time; None for static padding.
    dynamic: Optional[Tuple[tuple, tuple, tuple]] = None


@dataclasses.dataclass
class Scope:
    """The module a match is the whole forward of ("" for the traced root), or why there is none."""

    module: Optional[str]
    # The innermost module (qualified name in the traced part) whose forward holds the match.
    enclosing: str
    pre: Optional[PreOp] = None
    reason: Optional[str] = None


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
    if node.op == "call_function" and node.target in _PAD_FUNCTIONS:
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


def _common_prefix(stacks: List[List[Tuple[str, str]]]) -> List[Tuple[str, str]]:
    prefix = stacks[0]
    for stack in stacks[1:]:
        n = 0
        while n < min(len(prefix), len(stack)) and prefix[n] == stack[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


class ScopeIndex:
    """The live call nodes of a traced part, by each module call whose forward ran them: built once, so
    that locating every match costs the size of its module, not of the model."""

    def __init__(self, live: Set[fx.Node], modules: Dict[str, nn.Module]) -> None:
        self.live, self.modules = live, modules
        self.calls = [n for n in live if n.op.startswith("call_")]
        self.by_key: Dict[str, List[fx.Node]] = {}
        for node in self.calls:
            for key in node.meta.get("nn_module_stack", {}):
                self.by_key.setdefault(key, []).append(node)
        self.outputs = [a for n in live if n.op == "output" for a in n.all_input_nodes]

    def _identity(self, node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(self.modules.get(node.target), nn.Identity)

    def locate(self, match: BranchSum) -> Scope:
        """The module whose whole forward ``match`` is, with the padding it applies first, if any."""
        prefix = _common_prefix([_stack(n) for n in match.nodes])
        key, name = prefix[-1] if prefix else (None, "")
        body = set(self.calls if key is None else self.by_key.get(key, ()))
        extra = {n for n in body - match.nodes if not self._identity(n)}  # nn.Identity calls change nothing
        pre = None
        if extra == {match.source}:
            pre = pre_op_of(match.source, self.modules)
            if pre is None:
                return Scope(None, name, reason=f"the branches' input is computed inside '{name or '<model>'}' "
                                                f"by {match.source.name}, not a padding acfx can fold")
        elif extra:
            return Scope(None, name, reason=f"the branches are summed inline in '{name or '<model>'}'.forward "
                                            "among other operations; acfx swaps whole modules only")
        inputs = {a for n in body for a in n.all_input_nodes if a not in body}
        if len(inputs) != 1:
            return Scope(None, name, reason=f"'{name or '<model>'}' takes {len(inputs)} inputs, a conv takes one")
        if key is None and self.outputs != [match.output]:
            return Scope(None, name, reason="the model returns more than the branch sum")
        return Scope(name, name, pre)
