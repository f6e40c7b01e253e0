"""BN folding for deployment: every conv→BN pair becomes one conv with a bias, the BN slot is emptied."""
from __future__ import annotations

import collections
from typing import Dict, List

import torch.nn as nn

from ..layers.fusion import Term, combine
from ..layers.hooks import carry_hooks, carry_output_hooks
from ..layers.module_copies import refill_conv
from ..layers.norms import tail_children
from ..matching.find_sites import ConvCall, find_conv_calls
from ..matching.tracing import shared_module_names, tied_tensor_names, trace_parts
from ..matching.untraced_reach import hook_owners
from .policies import fold_verdict
from .report import Report
from .swap_modules import ModuleSwaps

__all__ = ["fold_norms", "fold_site"]


def _empty_slot(norm: nn.Module) -> nn.Module:
    """What replaces a folded BN: nothing, or the drop and activation of a timm norm-act layer."""
    children = tail_children(norm)
    if not children:
        return nn.Identity()
    return nn.Sequential(collections.OrderedDict(children))


def fold_site(call: ConvCall) -> Dict[str, nn.Module]:
    """The conv with the BN folded in, and what takes the BN's slot (hooks carried where they hold)."""
    conv = call.conv
    term = Term(call.name, conv.weight, conv.bias, call.norm, call.norm_name, (0, 0))
    weight, bias = combine([term], tuple(conv.weight.shape[-2:]))
    dtype = conv.weight.dtype
    folded = refill_conv(conv, weight.to(dtype), bias.to(dtype))
    slot = _empty_slot(call.norm)
    carry_hooks(conv, folded, forward_pre=True)  # the folded conv reads the same input
    # The slot returns what the BN returned.
    carry_output_hooks(call.norm, slot, f"{type(call.norm).__name__} '{call.norm_name}'")
    return {call.name: folded, call.norm_name: slot}


def fold_norms(swaps: ModuleSwaps, make_tracer, report: Report, hooked: List[str], in_train_mode: List[str]
               ) -> nn.Module:
    """Fold every conv→BN pair of ``swaps.root`` (all or nothing); each one recorded in ``report``, the
    ones left because of hooks in ``hooked``, BNs folded while in train mode in ``in_train_mode``."""
    parts, untraced = trace_parts(swaps.root, make_tracer, training=False)  # what is folded is the eval path
    shared, tied = shared_module_names(swaps.root), tied_tensor_names(swaps.root)
    owners = untraced + hook_owners(swaps.root)  # code tracing does not see
    replacements: Dict[str, nn.Module] = {}
    for part in parts:
        for call in find_conv_calls(part, shared, owners, tied):
            if call.norm is None and not call.functional_norm:
                continue  # no BN to fold: not a fold site
            verdict = fold_verdict(call)
            if verdict.hooked:
                hooked.append(call.name)
            if verdict.skip:
                report.add(call.name, "skipped", f"{call.what} (fold_bn)", verdict.skip)
                continue
            replacements.update(fold_site(call))
            if call.norm.training:
                in_train_mode.append(call.norm_name)
            report.add(call.name, "folded", f"{call.what} → conv with bias")
    return swaps.apply(replacements)
