"""BN folding for deployment: every conv→BN pair becomes one conv with a bias, the BN slot is emptied."""
from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List, Tuple

import torch.nn as nn

from ..layers.fusion import fold_into_conv
from ..layers.hooks import carry_hooks, carry_output_hooks
from ..layers.module_copies import refill_conv
from ..layers.norms import tail_children
from ..matching.find_sites import ConvCall, find_conv_calls
from ..matching.traced_model import TracedModel
from .policies import fold_verdict
from .report import Action, Entry

__all__ = ["FoldOutcome", "fold_norms", "fold_site"]


def _empty_slot(norm: nn.Module) -> nn.Module:
    """What replaces a folded BN: nothing, or the drop and activation of a timm norm-act layer."""
    children = tail_children(norm)
    if not children:
        return nn.Identity()
    return nn.Sequential(collections.OrderedDict(children))


def fold_site(call: ConvCall) -> Dict[str, nn.Module]:
    """The conv with the BN folded in, and what takes the BN's slot (hooks carried where they hold)."""
    conv = call.conv
    weight, bias = fold_into_conv(conv, call.norm, call.name, call.norm_name)
    dtype = conv.weight.dtype
    folded = refill_conv(conv, weight.to(dtype), bias.to(dtype))
    slot = _empty_slot(call.norm)
    carry_hooks(conv, folded, forward_pre=True)  # the folded conv reads the same input
    # The slot returns what the BN returned.
    carry_output_hooks(call.norm, slot, f"{type(call.norm).__name__} '{call.norm_name}'")
    return {call.name: folded, call.norm_name: slot}


@dataclasses.dataclass(frozen=True)
class FoldOutcome:
    """What BN folding does to a traced model: the swaps, one entry per conv→BN pair, the pairs left because
    of hooks (one warning) and the BNs folded while in train mode (one warning)."""

    replacements: Dict[str, nn.Module]
    entries: Tuple[Entry, ...]
    hooked: Tuple[str, ...]
    in_train_mode: Tuple[str, ...]


def fold_norms(traced: TracedModel) -> FoldOutcome:
    """Fold every conv→BN pair of ``traced`` (traced in eval mode: what is folded is the eval path)."""
    replacements: Dict[str, nn.Module] = {}
    entries: List[Entry] = []
    hooked: List[str] = []
    in_train_mode: List[str] = []
    for part in traced.parts:
        for call in find_conv_calls(part, traced):
            if call.norm is None and not call.consumer.functional_norm:
                continue  # no BN to fold: not a fold site
            verdict = fold_verdict(call)
            if verdict.hooked:
                hooked.append(call.name)
            if verdict.skip:
                entries.append(Entry(call.name, Action.SKIPPED, f"{call.what} (fold_bn)", verdict.skip))
                continue
            replacements.update(fold_site(call))
            if call.norm.training:
                in_train_mode.append(call.norm_name)
            entries.append(Entry(call.name, Action.FOLDED, f"{call.what} → conv with bias"))
    return FoldOutcome(replacements, tuple(entries), tuple(hooked), tuple(in_train_mode))
