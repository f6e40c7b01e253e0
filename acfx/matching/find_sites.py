"""Find every convolution call in a traced model and what takes its output: the facts, no decisions.

Matching only: nothing here changes the model, and nothing here decides whether a conv is rewritten.
Each pass reads these records through its own policy (acfx.passes.policies), the way Inductor's passes pair a
pattern with an ``extra_check``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..layers.norms import is_batch_norm
from .tracing import TracedPart, UntracedPart, module_calls

__all__ = ["ConvCall", "find_conv_calls"]

# Convolutions called as functions: reported, never rewritten (acfx swaps modules).
_FUNCTIONAL_CONVS = {f: f"F.{name}" for name, f in (
    ("conv1d", F.conv1d), ("conv2d", F.conv2d), ("conv3d", F.conv3d), ("conv_transpose1d", F.conv_transpose1d),
    ("conv_transpose2d", F.conv_transpose2d), ("conv_transpose3d", F.conv_transpose3d))}
_FUNCTIONAL_NORMS = (F.batch_norm, torch.batch_norm)
_CONV_MODULES = (nn.modules.conv._ConvNd,)


@dataclasses.dataclass
class ConvCall:
    """One convolution call in a traced part and the node that consumes its output."""

    # Qualified name of the conv module in the model; for a functional conv, "<module>:<node name>".
    name: str
    # The conv module; None for a functional call.
    conv: Optional[nn.Module]
    # Times the conv module is called in the part, and its other names in the model (shared modules).
    calls: int = 1
    aliases: Tuple[str, ...] = ()
    # What takes the conv's output when it is not one BatchNorm-like module call: "returned by the traced
    # module", "add", "2 nodes", ...; None when a BN-like module is the sole consumer.
    consumer: Optional[str] = None
    # The BN-like module that is the sole consumer of the conv's output (supported or not).
    norm_name: Optional[str] = None
    norm: Optional[nn.Module] = None
    norm_calls: int = 0
    norm_aliases: Tuple[str, ...] = ()
    # Tensor inputs of the BN call (1 for a plain call).
    norm_inputs: int = 1
    # Why the conv / the BN is used other than by one call module(x) seen in the graph (keyword arguments,
    # its weights read directly, code that did not trace reaching it); None when it is not.
    conv_use: Optional[str] = None
    norm_use: Optional[str] = None
    # The conv's output goes to a functional batch_norm (reported, never rewritten).
    functional_norm: bool = False
    # For a functional conv: the function called ("F.conv2d").
    function: str = ""

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
        return f"{conv} → {'F.batch_norm' if self.functional_norm else 'no BN'}"


def _op_name(node: fx.Node, modules: Dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "output":
        return "the output"
    return getattr(node.target, "__name__", str(node.target))


def _other_use(part: TracedPart, target: str, untraced: List[UntracedPart], tied: Dict[str, List[str]]
               ) -> Optional[str]:
    """Why the module ``target`` of ``part`` may be used other than by its calls in the graph."""
    name = part.qualify(target)
    if name in tied:
        return (f"a parameter or buffer of it is tied to {tied[name][:3]}: rewriting one holder would break the tie "
                "(untie them, or exclude this site)")
    return part.use_reason(target, untraced)


def _consumer(call: ConvCall, node: fx.Node, part: TracedPart, modules: Dict[str, nn.Module], calls: Dict[str, int],
              shared: Dict[str, list], untraced: List[UntracedPart], tied: Dict[str, List[str]]) -> None:
    """Fill in what takes the output of the conv ``node``."""
    users = [u for u in node.users if u in part.live]
    if not users:
        call.consumer = "its output is not used inside the traced part"
        return
    if len(users) > 1:
        call.consumer = f"its output is used by {len(users)} nodes, not only by a BatchNorm"
        return
    user = users[0]
    if user.op == "call_function" and user.target in _FUNCTIONAL_NORMS:
        call.functional_norm = True
        call.consumer = "its output goes to a functional batch_norm (acfx rewrites modules only)"
        return
    if user.op == "output":
        call.consumer = "its output is returned by the traced module, no BatchNorm follows in it"
        return
    if user.op != "call_module" or not is_batch_norm(modules[user.target]):
        call.consumer = f"no BatchNorm follows (output goes to {_op_name(user, modules)})"
        return
    call.norm_name, call.norm = part.qualify(user.target), modules[user.target]
    call.norm_calls = calls[user.target]
    call.norm_aliases = tuple(shared.get(call.norm_name, ()))
    call.norm_inputs = len(user.all_input_nodes)
    call.norm_use = _other_use(part, user.target, untraced, tied)


def _enclosing(node: fx.Node, part: TracedPart) -> str:
    stack = list(node.meta.get("nn_module_stack", {}).values())
    return part.qualify(stack[-1][0]) if stack else (part.name or "<model>")


def find_conv_calls(part: TracedPart, shared: Dict[str, list], untraced: Sequence[UntracedPart] = (),
                    tied: Optional[Dict[str, List[str]]] = None) -> List[ConvCall]:
    """Every convolution call in ``part`` (modules of any conv kind, and functional convs), in graph order.

    ``shared``: qualified name -> all names, for modules registered under several names. ``untraced``: the
    modules that did not trace (their code may reach into the part). ``tied``: modules holding a tensor
    another module holds too (tracing.tied_tensor_names).
    """
    untraced, tied = list(untraced), tied or {}
    modules = dict(part.module.named_modules())
    calls = module_calls(part.graph)
    found = []
    for node in part.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], _CONV_MODULES):
            name = part.qualify(node.target)
            call = ConvCall(name, modules[node.target], calls[node.target], tuple(shared.get(name, ())),
                            conv_use=_other_use(part, node.target, untraced, tied))
        elif node.op == "call_function" and node.target in _FUNCTIONAL_CONVS and node in part.live:
            call = ConvCall(f"{_enclosing(node, part)}:{node.name}", None, function=_FUNCTIONAL_CONVS[node.target])
        else:
            continue
        _consumer(call, node, part, modules, calls, shared, untraced, tied)
        found.append(call)
    return found
