"""Find conv→BN sites in a traced model, and say why each one can or cannot be expanded.

Matching only: nothing here changes the model. Each check is an early return with the reason, which
ends up in the report.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch.fx as fx
import torch.nn as nn

from .build import is_dynamic_same
from .norms import is_batch_norm, unsupported_norm_reason
from .options import FilterFn
from .tracing import TracedPart, live_nodes, module_calls

__all__ = ["ConvSite", "find_conv_sites", "conv_type_reason"]


@dataclasses.dataclass
class ConvSite:
    """One Conv2d call found in the graph."""

    # Qualified name of the conv in the model.
    name: str
    conv: nn.Module
    # Qualified name and module of the BN that takes the conv's output, when it is the site's BN.
    norm_name: Optional[str] = None
    norm: Optional[nn.Module] = None
    # Why this conv is left alone; None when it is to be rewritten.
    skip: Optional[str] = None
    # Why no BN belongs to this site (for convs expanded or folded without one).
    no_norm: Optional[str] = None
    # True when the conv's only consumer is a BatchNorm-like module (supported or not).
    norm_follows: bool = False


def conv_type_reason(conv: nn.Module) -> Optional[str]:
    """Why acfx cannot rewrite this Conv2d (None if it can): only the plain conv and timm's Conv2dSame."""
    if type(conv) is nn.Conv2d or is_dynamic_same(conv):
        return None
    return (f"conv type {type(conv).__name__} is not supported: its forward differs from nn.Conv2d's "
            "(acfx handles nn.Conv2d and timm's Conv2dSame)")


def _op_name(node: fx.Node, modules: Dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return getattr(node.target, "__name__", str(node.target))


def _norm_of(node: fx.Node, modules: Dict[str, nn.Module], calls: Dict[str, int],
             live: set) -> tuple:
    """(BN node, None) if the conv's output goes to one BN and nowhere else, else (None, reason)."""
    users = [u for u in node.users if u in live]
    if not users:
        return None, "conv output is not used inside the traced part"
    if len(users) > 1:
        return None, "conv output is used by several nodes, not only by a BatchNorm"
    user = users[0]
    if user.op == "output":
        return None, "conv output is returned by the traced module, no BatchNorm follows in it"
    if user.op != "call_module" or not is_batch_norm(modules[user.target]):
        return None, f"no BatchNorm follows (output goes to {_op_name(user, modules)})"
    norm = modules[user.target]
    reason = unsupported_norm_reason(norm)
    if reason:
        return None, reason
    if calls[user.target] > 1:
        return None, f"BatchNorm {user.target} is called {calls[user.target]} times"
    if len(user.all_input_nodes) != 1:
        return None, "BatchNorm called with more than one tensor input"
    return user, None


def _conv_reason(node: fx.Node, conv: nn.Module, calls: Dict[str, int], shared: Dict[str, list],
                 name: str) -> Optional[str]:
    reason = conv_type_reason(conv)
    if reason:
        return reason
    if calls[node.target] > 1:
        return f"module called {calls[node.target]} times (one weight shared by several call sites)"
    if name in shared:
        return f"module registered under several names {shared[name]}"
    if isinstance(conv.padding, str) and conv.padding not in ("same", "valid"):
        return f"padding={conv.padding!r} cannot be resolved"
    return None


def find_conv_sites(part: TracedPart, shared: Dict[str, list], min_side: int = 2,
                    filter_fn: Optional[FilterFn] = None, unnormed: bool = False) -> List[ConvSite]:
    """Every Conv2d call in ``part``, each with its BN (if one is the sole consumer) or a skip reason.

    ``min_side``: kernels with a side below it are skipped (2 for expand, 1 for BN folding).
    ``unnormed``: convs no (supported) BN follows are kept, with ``no_norm`` saying why.
    """
    modules = dict(part.module.named_modules())
    calls = module_calls(part.graph)
    live = live_nodes(part.graph)
    sites = []
    for node in part.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d):
            continue
        conv, name = modules[node.target], part.qualify(node.target)
        site = ConvSite(name, conv)
        sites.append(site)
        users = [u for u in node.users if u in live]
        site.norm_follows = (len(users) == 1 and users[0].op == "call_module"
                             and is_batch_norm(modules[users[0].target]))
        site.skip = _conv_reason(node, conv, calls, shared, name)
        if site.skip:
            continue
        if min(conv.kernel_size) < min_side:
            site.skip = f"kernel {tuple(conv.kernel_size)} has a side of 1"
            continue
        if filter_fn is not None and not filter_fn(conv, name):
            site.skip = "excluded by filter_fn"
            continue
        norm_node, site.no_norm = _norm_of(node, modules, calls, live)
        if norm_node is not None and part.qualify(norm_node.target) in shared:
            norm_node, site.no_norm = None, f"BatchNorm registered under several names {shared[part.qualify(norm_node.target)]}"
        if norm_node is not None:
            site.norm_name, site.norm = part.qualify(norm_node.target), modules[norm_node.target]
        elif not unnormed:
            site.skip, site.no_norm = site.no_norm, None
    return sites
