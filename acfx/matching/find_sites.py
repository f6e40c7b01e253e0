"""Find every convolution call in a traced model and what takes its output: the facts, no decisions.

Matching only: nothing here changes the model, and nothing here decides whether a conv is rewritten.
Each pass reads these records through its own policy (acfx.passes.policies), the way Inductor's passes pair a
pattern with an ``extra_check``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..layers.norms import is_batch_norm
from .traced_model import TracedModel
from .tracing import TracedPart

__all__ = ["Consumer", "ConvCall", "find_conv_calls"]

# Convolutions called as functions: reported, never rewritten (acfx swaps modules).
_FUNCTIONAL_CONVS = {f: f"F.{name}" for name, f in (
    ("conv1d", F.conv1d), ("conv2d", F.conv2d), ("conv3d", F.conv3d), ("conv_transpose1d", F.conv_transpose1d),
    ("conv_transpose2d", F.conv_transpose2d), ("conv_transpose3d", F.conv_transpose3d))}
_FUNCTIONAL_NORMS = (F.batch_norm, torch.batch_norm)
_CONV_MODULES = (nn.modules.conv._ConvNd,)


@dataclasses.dataclass(frozen=True)
class Consumer:
    """What takes the output of one conv call."""

    # Why it is not one BatchNorm-like module call ("returned by the traced module", "add", "2 nodes", ...);
    # None when a BN-like module is the sole consumer.
    reason: Optional[str] = None
    # The BN-like module that is the sole consumer (supported or not), with its calls and other names.
    norm_name: Optional[str] = None
    norm: Optional[nn.Module] = None
    norm_calls: int = 0
    norm_aliases: Tuple[str, ...] = ()
    # Tensor inputs of the BN call (1 for a plain call).
    norm_inputs: int = 1
    # Why the BN is used other than by one call module(x) seen in the graph; None when it is not.
    norm_use: Optional[str] = None
    # The conv's output goes to a functional batch_norm (reported, never rewritten).
    functional_norm: bool = False


@dataclasses.dataclass(frozen=True)
class ConvCall:
    """One convolution call in a traced part and what consumes its output: complete when built."""

    # Qualified name of the conv module in the model; for a functional conv, "<module>:<node name>".
    name: str
    # The conv module; None for a functional call.
    conv: Optional[nn.Module]
    consumer: Consumer
    # Times the conv module is called in the part, and its other names in the model (shared modules).
    calls: int = 1
    aliases: Tuple[str, ...] = ()
    # Why the conv is used other than by one call module(x) seen in the graph (keyword arguments, its weights
    # read directly, code that did not trace reaching it); None when it is not.
    conv_use: Optional[str] = None
    # For a functional conv: the function called ("F.conv2d").
    function: str = ""

    @property
    def norm_name(self) -> Optional[str]:
        return self.consumer.norm_name

    @property
    def norm(self) -> Optional[nn.Module]:
        return self.consumer.norm

    @property
    def kernel_size(self) -> Tuple[int, ...]:
        return tuple(getattr(self.conv, "kernel_size", ()))

    @property
    def what(self) -> str:
        """What was found, for reports: "Conv2d 3x3 → BatchNorm2d"."""
        if self.conv is None:
            conv = self.function
        else:
            conv = f"{type(self.conv).__name__} {'x'.join(map(str, self.kernel_size))}"
        if self.norm is not None:
            return f"{conv} → {type(self.norm).__name__}"
        return f"{conv} → {'F.batch_norm' if self.consumer.functional_norm else 'no BN'}"


def _op_name(node: fx.Node, modules: Dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "output":
        return "the output"
    return getattr(node.target, "__name__", str(node.target))


def _other_use(part: TracedPart, target: str, model: TracedModel) -> Optional[str]:
    """Why the module ``target`` of ``part`` may be used other than by its calls in the graph."""
    name = part.qualify(target)
    if name in model.tied:
        return (f"a parameter or buffer of it is tied to {list(model.tied[name][:3])}: rewriting one holder would "
                "break the tie (untie them, or exclude this site)")
    return part.use_reason(target, model.owners)


def _consumer(node: fx.Node, part: TracedPart, modules: Dict[str, nn.Module], model: TracedModel) -> Consumer:
    """What takes the output of the conv ``node``."""
    users = [u for u in node.users if u in part.live]
    if not users:
        return Consumer("its output is not used inside the traced part")
    if len(users) > 1:
        return Consumer(f"its output is used by {len(users)} nodes, not only by a BatchNorm")
    user = users[0]
    if user.op == "call_function" and user.target in _FUNCTIONAL_NORMS:
        return Consumer("its output goes to a functional batch_norm (acfx rewrites modules only)", functional_norm=True)
    if user.op == "output":
        return Consumer("its output is returned by the traced module, no BatchNorm follows in it")
    if user.op != "call_module" or not is_batch_norm(modules[user.target]):
        return Consumer(f"no BatchNorm follows (output goes to {_op_name(user, modules)})")
    name = part.qualify(user.target)
    return Consumer(None, name, modules[user.target], model.calls.get(name, 0), model.shared.get(name, ()),
                    len(user.all_input_nodes), _other_use(part, user.target, model))


def _enclosing(node: fx.Node, part: TracedPart) -> str:
    stack = list(node.meta.get("nn_module_stack", {}).values())
    return part.qualify(stack[-1][0]) if stack else (part.name or "<model>")


def find_conv_calls(part: TracedPart, model: TracedModel) -> List[ConvCall]:
    """Every convolution call in ``part`` of ``model`` (modules of any conv kind, and functional convs), in
    graph order, each with what takes its output."""
    modules = dict(part.module.named_modules())
    found = []
    for node in part.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], _CONV_MODULES):
            name = part.qualify(node.target)
            found.append(ConvCall(name, modules[node.target], _consumer(node, part, modules, model),
                                  model.calls.get(name, 0), model.shared.get(name, ()),
                                  _other_use(part, node.target, model)))
        elif node.op == "call_function" and node.target in _FUNCTIONAL_CONVS and node in part.live:
            found.append(ConvCall(f"{_enclosing(node, part)}:{node.name}", None, _consumer(node, part, modules, model),
                                  function=_FUNCTIONAL_CONVS[node.target]))
    return found
