"""Which nodes of a traced graph are linear in one tensor, in eval: the vocabulary of the region finder.

A node is *constant* when it depends on parameters and constants only (OREPA's weight generation at every
forward, DBB's identity-based 1×1 kernel ``weight + id_tensor``): collapse evaluates it once. A node is a
*linear op* when, in eval, it is a linear map of its tensor inputs (a conv, a BN, DBB's BNAndPadLayer,
average pooling, a zero pad, a crop, a sum, a constant added or multiplied per channel, a functional conv
with a constant weight). Everything else starts a new linear form of its own. Facts only: no tensor is read.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Dict, FrozenSet, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from ..layers.convs import PLAIN, conv_kind, is_plain_conv1d, other_conv_reason, unknown_conv_reason
from ..layers.norms import foldable_norm
from ..layers.padding import PAD_FUNCTIONS
from ..layers.split_conv import EvenSplitConv2d
from .border_writes import pad_with_value
from .crops import crop_of
from .known_layers import bias_padded_norm

__all__ = ["LinearOp", "constant_nodes", "linear_op"]

_ADDS = (operator.add, operator.iadd, torch.add)
_SUBS = (operator.sub, operator.isub, torch.sub)
_MULS = (operator.mul, operator.imul, torch.mul)
_DIVS = (operator.truediv, operator.itruediv, torch.div)
_CONVS = (F.conv2d, torch.conv2d, F.conv1d, torch.conv1d)  # a 1-d conv is read as a 2-d one of height 1
# Pure functions and methods a constant may be computed with (no randomness, no state).
_RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "normal", "bernoulli", "dropout", "uniform_",
           "normal_", "manual_seed", "empty", "empty_like"}
_IDENTITY_METHODS = {"contiguous", "clone"}
_OTHER_DIM_NORMS = (nn.BatchNorm1d, nn.BatchNorm3d)  # those that are not foldable_norm: reported


@dataclasses.dataclass(frozen=True)
class LinearOp:
    """One linear node: what kind, the tensor inputs it is linear in, and the rest of what it reads."""

    node: fx.Node
    # "conv", "norm", "bias_padded_norm", "pool", "pad", "value_pad" (a pad with a constant: its value), "crop",
    # "add", "sub", "shift", "scale", "identity", "function_conv"; "unknown_conv" (a conv whose computation acfx does not know: it stops the region's fusion,
    # with ``arguments[0]`` as the reason).
    kind: str
    # The inputs it is linear in (1, or 2 for a sum or difference of two linear forms).
    inputs: Tuple[fx.Node, ...]
    module: Optional[nn.Module] = None
    # A constant operand: the added or multiplied value, or a functional conv's weight and bias.
    constant: object = None
    bias: object = None
    # Static arguments of a function: padding, stride, ... ; a shift's sign (−1 for x − c).
    arguments: Tuple = ()


def _is_constant(node: fx.Node, constant: Set[fx.Node]) -> bool:
    if node.op == "get_attr":
        return True
    if node.op not in ("call_function", "call_method") or not node.all_input_nodes:
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in _RANDOM or name.endswith("_") and not name.startswith("_"):
        return False
    return all(i in constant for i in node.all_input_nodes)


def constant_nodes(graph: fx.Graph) -> FrozenSet[fx.Node]:
    """The nodes computed from parameters and constants only (evaluated once by collapse)."""
    constant: Set[fx.Node] = set()
    for node in graph.nodes:
        if _is_constant(node, constant):
            constant.add(node)
    return frozenset(constant)


def _single(node: fx.Node) -> Optional[fx.Node]:
    return node.args[0] if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node) else None


def _conv1d_reason(module: nn.Module) -> Optional[str]:
    if not isinstance(module, nn.Conv1d):
        return None
    return (f"conv {type(module).__name__} is an nn.Conv1d whose computation acfx does not know (it fuses nn.Conv1d's "
            "own forward on plain weight and bias parameters)")


def _module_op(node: fx.Node, module: nn.Module) -> Optional[LinearOp]:
    source = _single(node)
    if source is None:
        return None
    if isinstance(module, EvenSplitConv2d) or isinstance(module, nn.Conv2d) and conv_kind(module) == PLAIN \
            or is_plain_conv1d(module):
        return LinearOp(node, "conv", (source,), module)
    if isinstance(module, nn.modules.conv._ConvNd):  # a conv acfx does not know: the region says why
        reason = _conv1d_reason(module) or other_conv_reason(module, conv1d=True) or unknown_conv_reason(module) or (
            f"{type(module).__name__} pads by the input size at run time (TF 'same'), which one branch of a sum cannot "
            "share with the others")
        return LinearOp(node, "unknown_conv", (source,), module, arguments=(reason,))
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and foldable_norm(module):
        return LinearOp(node, "norm", (source,), module)
    if isinstance(module, _OTHER_DIM_NORMS):  # linear too: a block of Conv1d branches is fused, one of Conv3d
        return LinearOp(node, "norm", (source,), module)  # branches reported with why it is left (its convs)
    if bias_padded_norm(module) is not None:
        return LinearOp(node, "bias_padded_norm", (source,), module)
    if isinstance(module, (nn.Identity, nn.Dropout, nn.Dropout2d, DropPath)):  # eval: the identity
        return LinearOp(node, "identity", (source,), module)
    if isinstance(module, nn.AvgPool2d) and module.count_include_pad and not module.ceil_mode \
            and module.divisor_override is None:
        return LinearOp(node, "pool", (source,), module)
    if type(module) is nn.ZeroPad2d or type(module) is nn.ConstantPad2d and module.value == 0:
        return LinearOp(node, "pad", (source,), module, arguments=tuple(module.padding))
    return None


def _operands(node: fx.Node, constant: FrozenSet[fx.Node]) -> Tuple[Tuple[fx.Node, ...], Tuple[object, ...]]:
    """(tensor operands that are not constant, constant operands: nodes or numbers)."""
    if len(node.args) != 2 or node.kwargs:
        return (), ()
    tensors, constants = [], []
    for arg in node.args:
        if isinstance(arg, fx.Node) and arg not in constant:
            tensors.append(arg)
        elif isinstance(arg, (fx.Node, int, float)) and not isinstance(arg, bool):
            constants.append(arg)
        else:
            return (), ()
    return tuple(tensors), tuple(constants)


def _arithmetic(node: fx.Node, constant: FrozenSet[fx.Node]) -> Optional[LinearOp]:
    target = node.target
    if node.op == "call_method":
        target = {"add": operator.add, "add_": operator.iadd, "sub": operator.sub, "mul": operator.mul,
                  "mul_": operator.imul, "div": operator.truediv}.get(node.target)
    if target is None:
        return None
    tensors, constants = _operands(node, constant)
    if target in _ADDS:
        if len(tensors) == 2:
            return LinearOp(node, "add", tensors)
        if len(tensors) == 1 and isinstance(constants[0], (int, float)) and constants[0] == 0:
            # RepVGG's "+ 0" where a block has no identity branch; MobileOne's "0 + 0 + branch" where it has
            # one branch: a sum the block's author wrote, so the block is re-parameterisable (a shift by 0)
            return LinearOp(node, "shift", tensors, constant=0)
        return LinearOp(node, "shift", tensors, constant=constants[0]) if len(tensors) == 1 else None
    if target in _SUBS:
        if len(tensors) == 2:
            return LinearOp(node, "sub", tensors)
        if len(tensors) == 1 and node.args[0] is tensors[0]:
            return LinearOp(node, "shift", tensors, constant=constants[0], arguments=(-1,))
        return None
    if target in _MULS and len(tensors) == 1:
        return LinearOp(node, "scale", tensors, constant=constants[0])
    if target in _DIVS and len(tensors) == 1 and node.args[0] is tensors[0]:
        return LinearOp(node, "scale", tensors, constant=constants[0], arguments=(-1,))
    return None


def _function_conv(node: fx.Node, constant: FrozenSet[fx.Node]) -> Optional[LinearOp]:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    values = dict(zip(names, node.args))
    values.update(node.kwargs)
    source, weight, bias = values.get("input"), values.get("weight"), values.get("bias")
    if not isinstance(source, fx.Node) or source in constant or not isinstance(weight, fx.Node) or weight not in constant:
        return None
    if bias is not None and not (isinstance(bias, fx.Node) and bias in constant):
        return None
    static = tuple(values.get(n, d) for n, d in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)))
    if any(isinstance(v, fx.Node) for v in static):
        return None
    return LinearOp(node, "function_conv", (source,), constant=weight, bias=bias, arguments=static)


def _function_op(node: fx.Node, constant: FrozenSet[fx.Node]) -> Optional[LinearOp]:
    if node.target in _CONVS:
        return _function_conv(node, constant)
    if node.target is operator.getitem:
        window = crop_of(node)
        return LinearOp(node, "crop", (node.args[0],), arguments=(window,)) if window is not None else None
    if node.target is pad_with_value:  # a zero pad whose border the code wrote with a value (border_writes.py)
        source, pad, value = node.args
        if isinstance(source, fx.Node) and value in constant:
            return LinearOp(node, "value_pad", (source,), constant=value, arguments=tuple(pad))
        return None
    if node.target in PAD_FUNCTIONS:
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if mode == "constant" and value in (None, 0, 0.0) and isinstance(pad, (tuple, list)) and len(pad) == 4 \
                and all(isinstance(p, int) for p in pad) and isinstance(node.args[0], fx.Node):
            return LinearOp(node, "pad", (node.args[0],), arguments=tuple(pad))
        return None
    return _arithmetic(node, constant)


def linear_op(node: fx.Node, modules: Dict[str, nn.Module], constant: FrozenSet[fx.Node]) -> Optional[LinearOp]:
    """The linear op ``node`` is in eval (None: it is not one, or it is constant)."""
    if node in constant:
        return None
    if node.op == "call_module":
        return _module_op(node, modules[node.target])
    if node.op == "call_function":
        return _function_op(node, constant)
    if node.op == "call_method":
        if node.target in _IDENTITY_METHODS and _single(node) is not None:
            return LinearOp(node, "identity", (node.args[0],))
        return _arithmetic(node, constant)
    return None
