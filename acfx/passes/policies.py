"""Which conv calls each pass rewrites: expand's and fold_bn's policies over the facts sites.py records.

Every check is an early return with the reason, which goes into the pass's report as it is.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch.nn as nn

from ..layers.convs import is_plain_conv1d, other_conv_reason, unknown_conv_reason
from ..layers.hooks import hook_reason
from ..layers.norms import foldable_norm, unsupported_norm_reason
from ..matching.find_sites import ConvCall

__all__ = ["Verdict", "expand_verdict", "fold_verdict"]

# filter_fn(conv_module, qualified_name) -> bool: True to expand that conv.
FilterFn = Callable[[nn.Module, str], bool]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a pass does with one conv call."""

    # Why the call is left alone; None when it is rewritten.
    skip: Optional[str] = None
    # Rewritten without a BN (include_unnormed): why no BN belongs to it.
    no_norm: Optional[str] = None
    # True when ``skip`` is because of module hooks (the pass warns about those).
    hooked: bool = False


def _conv_reason(call: ConvCall, conv1d: bool = False) -> Optional[str]:
    """Reasons that stop every pass: the conv itself (``conv1d``: an nn.Conv1d of nn.Conv1d's own computation is
    one the pass rewrites, fold_bn's)."""
    if call.conv is None:
        return "functional convolution: acfx rewrites conv modules only (use nn.Conv2d)"
    if not (conv1d and is_plain_conv1d(call.conv)):
        reason = other_conv_reason(call.conv, conv1d) or unknown_conv_reason(call.conv)
        if reason:
            return reason
    if call.calls > 1:
        return f"module called {call.calls} times (one weight shared by several call sites)"
    if call.aliases:
        return f"module registered under several names {list(call.aliases)}"
    if call.conv_use:
        return call.conv_use
    padding = call.conv.padding
    if isinstance(padding, str) and padding not in ("same", "valid"):
        return f"padding={call.conv.padding!r} cannot be resolved"
    return None


def _norm_reason(call: ConvCall) -> Optional[str]:
    """Why the conv's consumer is not a BN that can be rewritten with it (None: it is)."""
    consumer = call.consumer
    if consumer.norm is None:
        return consumer.reason
    if consumer.norm_calls > 1:
        return f"BatchNorm {consumer.norm_name} is called {consumer.norm_calls} times"
    if consumer.norm_aliases:
        return f"BatchNorm registered under several names {list(consumer.norm_aliases)}"
    if consumer.norm_inputs != 1:
        return "BatchNorm called with more than one tensor input"
    if consumer.norm_use:
        return f"BatchNorm {consumer.norm_name}: {consumer.norm_use}"
    return None


def expand_verdict(call: ConvCall, filter_fn: Optional[FilterFn], include_unnormed: bool,
                   zero_branch_norms: bool = False) -> Verdict:
    """expand: a known k×k Conv2d (both sides ≥ 2), trainable, without hooks that would change meaning,
    followed by a supported BN (or none, with ``include_unnormed``). ``zero_branch_norms``: the new branches'
    BNs start at γ = β = 0 (init="preserve" with a BN per branch), so the BN's affine parameters must train."""
    reason = _conv_reason(call)
    if reason:
        return Verdict(reason)
    conv = call.conv
    if min(conv.kernel_size) < 2:
        return Verdict(f"kernel {tuple(conv.kernel_size)} has a side of 1")
    if not conv.weight.requires_grad:
        return Verdict("conv weight is frozen (requires_grad=False): new branches could never train and would "
                       "change the layer's function for good; unfreeze it to expand this conv")
    if filter_fn is not None and not filter_fn(conv, call.name):
        return Verdict("excluded by filter_fn")
    reason = hook_reason(conv, "conv")
    if reason:
        return Verdict(reason, hooked=True)
    no_norm = _norm_reason(call) or unsupported_norm_reason(call.norm)
    if no_norm is None:
        norm = call.norm
        if zero_branch_norms and norm.affine and not norm.weight.requires_grad:
            return Verdict(f"BatchNorm {call.consumer.norm_name}'s weight is frozen (requires_grad=False): with "
                           "init='preserve' the new branches' BNs would start at γ = 0 with it and never train, so "
                           "the branches could never learn; unfreeze the BN's weight and bias, or expand with "
                           "init='scratch' (or mode='online', whose scales follow the conv)")
        # A BN's forward hooks see the normalised sum in the module left in its slot: carried there.
        no_norm = hook_reason(call.norm, "BatchNorm", carries_forward=True)
        return Verdict(no_norm, hooked=no_norm is not None)  # None: expanded with its BN
    if not include_unnormed:
        return Verdict(no_norm)
    return Verdict(no_norm=no_norm)


def fold_verdict(call: ConvCall) -> Verdict:
    """fold_bn: a known Conv2d (or Conv1d) of any kernel whose output only goes to a BN that is an affine map in
    eval."""
    reason = _conv_reason(call, conv1d=True) or _norm_reason(call)
    if reason:
        return Verdict(reason)
    one_d = isinstance(call.conv, nn.Conv1d)
    if one_d != (type(call.norm) is nn.BatchNorm1d) or one_d and not foldable_norm(call.norm):
        return Verdict(f"{type(call.conv).__name__} followed by {type(call.norm).__name__}: fold_bn folds a Conv1d "
                       "into a plain nn.BatchNorm1d with running statistics, a 2-d conv into a 2-d BN")
    reason = None if one_d else unsupported_norm_reason(call.norm)  # a norm-act layer's drop/act stay in the slot
    if reason:
        return Verdict(reason)
    # The folded conv reads the same input (pre-hooks carried) but outputs what the BN output.
    reason = (hook_reason(call.conv, "conv", carries_pre=True)
              or hook_reason(call.norm, "BatchNorm", carries_forward=True))
    return Verdict(reason, hooked=reason is not None)
