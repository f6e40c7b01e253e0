"""What a fused block becomes: one conv, or, where its forward does more than the sum, that forward with the
sum replaced by one conv.

A block whose whole forward is the region (and at most one padding of its input) is replaced by one conv
(nn.Conv2d with a bias, timm's Conv2dSame for TF 'same' padding, nn.Conv1d for a block of 1-d convs; the
block's largest conv is the template when it reads the fused window itself, so ``padding='same'`` and friends
survive). A block whose forward also applies what follows the sum (RepVGG's SE and ReLU, DBB's nonlinearity,
ultralytics' activation) or computes the region's input (RepGhost's primary conv) keeps that code: its forward
is copied out of the traced graph, the region's nodes replaced by one call of the fused conv (``reparam``),
into a GraphModule named after the block's class.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
from timm.layers import Conv2dSame

from ..layers.convs import PLAIN, conv_kind
from ..layers.geometry import Window, conv_window, same_window
from ..layers.linear_map import ConvMap, Inexact
from ..layers.module_copies import hollow_copy
from ..matching.find_linear_regions import LinearRegion
from ..matching.scope import PreOp, Scope
from ..matching.tracing import TracedPart

__all__ = ["FusedConv", "Rewrite", "fused_conv", "rewritten_forward", "REPARAM_NAME"]

# The name of the fused conv in a rewritten forward.
REPARAM_NAME = "reparam"


@dataclasses.dataclass(frozen=True)
class FusedConv:
    conv: nn.Module
    # True when the block's largest conv had no bias and the fused conv has one.
    gained_bias: bool


def _padding(found: ConvMap, mode: str, pre: Optional[PreOp]) -> Union[Tuple[object, str], Inexact]:
    """(padding argument for nn.Conv2d, padding_mode) reading what ``found`` after ``pre`` reads."""
    if pre is not None and not pre.window.is_zero and mode != "zeros":
        return Inexact("the block pads its input once and its branches pad again in another mode")
    total = found.window + (pre.window if pre is not None else Window())
    if pre is not None and not pre.window.is_zero:
        mode = pre.mode
    if total.is_symmetric and total.top >= 0 and total.left >= 0:
        return (total.top, total.left), (mode if not total.is_zero else "zeros")
    if tuple(found.stride) == (1, 1) and total == same_window(found.kernel_size, found.dilation):
        return "same", mode
    return Inexact(f"the fused conv would need padding {total}, which nn.Conv2d cannot express")


def _template(found: ConvMap, mode: str, pre: Optional[PreOp], convs: Sequence[nn.Module]) -> Optional[nn.Module]:
    """The region's largest conv when it reads exactly the fused window (its class and configuration kept)."""
    if pre is not None or not convs:
        return None
    largest = max(convs, key=lambda c: math.prod(c.kernel_size))
    if (isinstance(largest, nn.Conv2d) and conv_kind(largest) == PLAIN and tuple(largest.kernel_size) ==
            found.kernel_size and conv_window(largest) == found.window and largest.padding_mode == mode
            and largest.groups == found.groups and tuple(largest.stride) == found.stride
            and largest.in_channels == found.in_channels and largest.out_channels == found.out_channels):
        return largest
    return None


def _empty_conv1d(found: ConvMap, mode: str, pre: Optional[PreOp]) -> Union[nn.Module, Inexact]:
    """An nn.Conv1d for the map of a block of 1-d convs (read as 2-d maps of height 1)."""
    window = found.window
    if pre is not None or found.kernel_size[0] != 1 or found.stride[0] != 1 or window.top or window.bottom:
        return Inexact("the 1-d block pads, crops or pools along a second axis (a 2-d op on its 1-d tensor)")
    if window.left == window.right and window.left >= 0:
        padding: Union[int, str] = window.left
    elif found.stride[1] == 1 and window == same_window(found.kernel_size, found.dilation):
        padding = "same"
    else:
        return Inexact(f"the fused conv would need padding {window}, which nn.Conv1d cannot express")
    return nn.Conv1d(found.in_channels, found.out_channels, found.kernel_size[1], found.stride[1], padding,
                     found.dilation[1], found.groups, True, padding_mode=mode if not window.is_zero else "zeros",
                     device="meta")


def _empty_conv(found: ConvMap, mode: str, pre: Optional[PreOp], convs: Sequence[nn.Module], dims: int
                ) -> Union[nn.Module, Inexact]:
    if dims == 1:
        return _empty_conv1d(found, mode, pre)
    template = _template(found, mode, pre, convs)
    if template is not None:
        conv = hollow_copy(template)
        conv.register_parameter("bias", None)
        return conv
    args = (found.in_channels, found.out_channels, found.kernel_size, found.stride)
    if pre is not None and pre.dynamic is not None:
        if not found.window.is_zero or pre.dynamic != (found.kernel_size, found.stride, found.dilation):
            return Inexact("the block's TF-'same' padding does not match the fused kernel")
        return Conv2dSame(*args, 0, found.dilation, found.groups, True, device="meta")
    padding = _padding(found, mode, pre)
    if isinstance(padding, Inexact):
        return padding
    return nn.Conv2d(*args, padding[0], found.dilation, found.groups, True, padding_mode=padding[1], device="meta")


def fused_conv(found: ConvMap, mode: str, pre: Optional[PreOp], convs: Sequence[nn.Module], training: bool,
               like: torch.Tensor, dims: int = 2) -> Union[FusedConv, Inexact]:
    """The conv computing ``found`` (with its bias; a zero bias where the map has none), in the dtype,
    device and requires_grad of the region's convs (of ``like``, a parameter of the block, without one);
    ``dims`` 1: an nn.Conv1d (the map has height 1)."""
    conv = _empty_conv(found, mode, pre, convs, dims)
    if isinstance(conv, Inexact):
        return conv
    ref = next((c.weight for c in convs if isinstance(getattr(c, "weight", None), torch.Tensor)), like)
    bias = found.bias if found.bias is not None else found.kernel.new_zeros(found.out_channels)
    kernel = found.kernel[:, :, 0] if isinstance(conv, nn.Conv1d) else found.kernel  # a 1-d map has height 1
    conv.register_parameter("weight", nn.Parameter(kernel.to(ref.dtype).to(ref.device), ref.requires_grad))
    conv.register_parameter("bias", nn.Parameter(bias.to(ref.dtype).to(ref.device), ref.requires_grad))
    conv.train(training)
    largest = max(convs, key=lambda c: math.prod(c.kernel_size)) if convs else None
    return FusedConv(conv, largest is None or getattr(largest, "bias", None) is None)


def _relative(target: str, prefix: str) -> str:
    return target[len(prefix) + 1:] if prefix and target.startswith(prefix + ".") else target


def _child_of(node: fx.Node, key: Optional[str]) -> Optional[Tuple[str, str]]:
    """(call key, qualified name) of the direct child of the module call ``key`` whose forward ran ``node``."""
    stack = list(node.meta.get("nn_module_stack", {}).items())
    keys = [k for k, _ in stack]
    position = keys.index(key) + 1 if key in keys else 0 if key is None else None
    if position is None or position >= len(stack):
        return None
    child_key, (name, _) = stack[position]
    return child_key, name


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One region of a block's forward and the conv that replaces it."""

    region: LinearRegion
    conv: nn.Module


def rewritten_forward(part: TracedPart, scope: Scope, rewrites: Sequence[Rewrite], block: nn.Module, key: str
                      ) -> Union[fx.GraphModule, Inexact]:
    """The block's forward (its nodes ``scope.body`` of ``part``'s graph, its call ``key``) with each region
    replaced by its conv. Children of the block the regions do not reach stay calls of those children, so
    that they keep their own structure (and their own fused blocks)."""
    body = list(scope.body)
    inside = set(body)
    inputs = list(dict.fromkeys(a for n in body for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in body if any(u not in inside for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return Inexact(f"'{part.qualify(scope.enclosing) or '<model>'}' takes {len(inputs)} inputs and gives "
                       f"{len(outputs)} outputs: acfx rewrites the forward of single-input, single-output blocks")
    touched = {_child_of(n, key) for r in rewrites for n in r.region.nodes + r.region.constants} - {None}
    calls = _child_calls(body, key, touched)
    if isinstance(calls, Inexact):
        return calls
    prefix = scope.enclosing
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {inputs[0]: graph.placeholder("x")}
    holders: Dict[str, object] = {}
    outputs_of = {r.region.output: (f"{REPARAM_NAME}_{i}" if i else REPARAM_NAME, r) for i, r in enumerate(rewrites)}
    skipped = set().union(*(r.region.node_set | set(r.region.constants) for r in rewrites))
    for node in body:
        if node in outputs_of:
            name, rewrite = outputs_of[node]
            holders[name] = rewrite.conv
            env[node] = graph.call_module(name, (env[rewrite.region.source],))
            continue
        if node in skipped:
            continue
        call = calls.get(node)
        if call is not None:  # a child the regions do not reach: called whole, as the block calls it
            child, child_input, child_output = call
            if node is child_output:
                target = _relative(child, prefix)
                holders[target] = part.module.get_submodule(child)
                env[node] = graph.call_module(target, (env[child_input],))
            continue
        copied = graph.node_copy(node, lambda n: env[n])
        if node.op in ("call_module", "get_attr"):
            copied.target = _relative(node.target, prefix)
            owner = part.module.get_submodule(node.target) if node.op == "call_module" else None
            holders[copied.target] = owner if owner is not None else part.attribute(node.target)
        env[node] = copied
    graph.output(env[outputs[0]])
    module = fx.GraphModule(holders, graph, class_name=type(block).__name__)
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()
    module.train(block.training)
    return module


def _child_calls(body: Sequence[fx.Node], key: str, touched) -> Union[Dict[fx.Node, Tuple[str, fx.Node, fx.Node]],
                                                                         Inexact]:
    """Node -> (child name, its input, its output) for the nodes of each direct child of the block that no region
    reaches; such a child must take one input and give one output to be called whole again."""
    members: Dict[Tuple[str, str], List[fx.Node]] = {}
    for node in body:
        child = _child_of(node, key)
        if child is not None and child not in touched and not (node.op == "call_module" and node.target == child[1]):
            members.setdefault(child, []).append(node)
    calls: Dict[fx.Node, Tuple[str, fx.Node, fx.Node]] = {}
    for (child_key, name), nodes in members.items():
        group = set(nodes)
        inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in group))
        outputs = [n for n in nodes if any(u not in group for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1:
            continue  # inlined as the trace wrote it
        for node in nodes:
            calls[node] = (name, inputs[0], outputs[0])
    return calls
