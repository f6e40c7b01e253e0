"""acfx.expand: every eligible k×k conv (and the BN after it) becomes an Asymmetric Convolution Block."""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Literal, Optional, Tuple, Union, overload

import torch.nn as nn

from ..layers.block import ACBlock, NormTail
from ..layers.cfg_links import point_cfg_at
from ..layers.hooks import carry_output_hooks, warn_hook_skips
from ..layers.online import OnlineACConv
from ..matching.find_sites import ConvCall, find_conv_calls
from ..matching.traced_model import TracedModel, trace_model
from ..matching.tracing import AcfxTracer
from .arguments import check_flags, check_model, refuse_wrapped, working_copy
from .build_block import build_site
from .options import ExpandOptions
from .other_mode import OtherMode
from .policies import Verdict, expand_verdict
from .reparam_guard import guard_foreign_reparam
from .report import Action, Entry, Report
from .swap_modules import ModuleSwaps

__all__ = ["expand"]

logger = logging.getLogger(__name__)


def _refuse_expanded(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, (ACBlock, NormTail, OnlineACConv)):
            raise ValueError(
                f"acfx.expand: the model is already expanded ({type(module).__name__} at "
                f"'{name or '<model>'}'); expanding again would nest blocks. Expand the plain model, or "
                "call acfx.collapse first.")


@overload
def expand(model: nn.Module, options: Optional[ExpandOptions] = ..., *, inplace: bool = ...,
           return_report: Literal[False] = ..., **overrides: object) -> nn.Module: ...


@overload
def expand(model: nn.Module, options: Optional[ExpandOptions] = ..., *, inplace: bool = ...,
           return_report: Literal[True], **overrides: object) -> Tuple[nn.Module, Report]: ...


def expand(model: nn.Module, options: Optional[ExpandOptions] = None, *, inplace: bool = False,
           return_report: bool = False, **overrides: object) -> Union[nn.Module, Tuple[nn.Module, Report]]:
    """Replace every eligible k×k convolution (and the BatchNorm after it) by an ACB for training.

    The model is traced with torch.fx (timm's leaf modules and functions included; where the whole model
    does not trace, its largest parts that do). A conv is eligible when both kernel sides are ≥ 2, acfx
    knows what it computes (nn.Conv2d's own forward, or timm's Conv2dSame), it is trainable, called once,
    has no hooks, and its output goes only to a BatchNorm (nn.BatchNorm2d, nn.SyncBatchNorm, timm
    BatchNormAct2d/SyncBatchNormAct) that tracks running statistics. The conv's module becomes an
    :class:`~acfx.ACBlock` and the BN's slot a :class:`~acfx.NormTail` (which still applies a timm
    norm-act layer's drop and activation, and keeps the BN's forward hooks). Every other conv is left
    alone and reported with the reason. The model keeps its class, methods, attributes, device, dtype,
    train/eval mode and requires_grad flags.

    Args:
        model: any nn.Module (not one wrapped in DistributedDataParallel, FSDP, DataParallel or
            torch.compile: expand the module inside, then wrap it).
        options: an :class:`~acfx.ExpandOptions` record; ``**overrides`` (its field names) override its fields,
            or give the options without a record. They are:

            * ``init``: "scratch": the k×k branch keeps the conv and its BN, the new 1×k/k×1 convs are
              initialised as nn.Conv2d initialises, their BNs at γ=1, β=0. "preserve": the new branch BNs
              start at γ=β=0 (with norm="sum" the new kernels start at 0), so the expanded model computes
              exactly the original function in train and eval mode; use it to fine-tune a pretrained model.
            * ``branches``: "both" (the paper's ACB), "hor" (1×k only) or "ver" (k×1 only).
            * ``norm``: "branch" (default): one BN per branch (the paper's best); "sum": no branch BNs, the
              original BN stays after the sum of the three convs.
            * ``placement``: "centre" (the kernel skeleton, the paper's choice) or "border" (bottom row /
              right column, the paper's ablation). Even kernel sides (2×2, 4×4) have no centre row: "centre"
              splits the branch's output channels between the two middle rows (even channels upper/left,
              odd lower/right) so that no half-pixel shift builds up with depth.
            * ``gamma_init``: with init="scratch", the initial γ of every branch BN (the ACNet
              reference suggests 1/3 when training does not improve). "balanced": 1 / the block's number
              of branches, so that a many-branch block (DBB, MobileOne) starts at the scale of one conv.
              None leaves the k×k BN as it is and the new BNs at 1.
            * ``include_unnormed``: also expand eligible convs that no BN follows (e.g. DenseNet convs
              feeding a concat): the k×k branch stays without BN, the 1×k/k×1 branches get BNs of their
              own, and the collapsed conv gains a bias (reported as a change of structure).
            * ``filter_fn``: ``filter_fn(conv_module, qualified_name) -> bool``; only convs it accepts are
              expanded.
            * ``leaf_modules``: extra module classes the tracer must not trace into.
            * ``recipe``: which branches each block sums beside the k×k conv: "acb" (default, ACNet's 1×k
              and k×1), "repvgg" (a 1×1 conv, and a BN of the input where channels and stride allow), "dbb"
              (a 1×1 conv, 1×1 → k×k and 1×1 → average pooling), "mobileone" (more k×k convs, a 1×1 conv
              and the identity BN), "acb+repvgg", "acb+dbb", or an :class:`~acfx.Recipe` of branch kinds.
            * ``kxk_branches``: the number of k×k branches per block, the conv's own included (default:
              the recipe's; "mobileone" 4).
            * ``mode``: "exact" (default): the recipe's branches, each conv with its BN. "online": a
              different, cheaper form (OREPA, CVPR 2022): the branches get learnable per-channel scales
              instead of BNs, their kernels are merged at every forward into one k×k conv
              (:class:`~acfx.OnlineACConv`), and the original BN stays after it. ``init="preserve"`` starts
              the new branches' scales at 0; ``gamma_init`` sets the initial scales.
        inplace: rewrite ``model`` itself instead of a deep copy. On error the model is left as it was.
        return_report: also return a :class:`~acfx.Report` of every conv found: expanded, or skipped and why.

    Expanding an already-expanded model raises ValueError (blocks would nest). A site skipped because of
    a hook also raises a warning: the hook's owner may not expect the model to differ there.

    Example::

        >>> import acfx, timm
        >>> model = timm.create_model("resnet18")
        >>> acnet, report = acfx.expand(model, return_report=True)
        >>> print(report.summary())
        acfx expand: 17 expanded, 3 skipped
        >>> deployable = acfx.collapse(acnet.eval())   # a plain resnet18 again
    """
    check_model(model, "expand")
    check_flags("expand", inplace=inplace, return_report=return_report)
    opts = ExpandOptions.resolve(options, overrides)
    refuse_wrapped(model, "expand")
    _refuse_expanded(model)
    target = working_copy(model, inplace, "expand")
    tracer = lambda: AcfxTracer(leaf_types=(ACBlock, NormTail, OnlineACConv) + opts.leaf_modules)  # noqa: E731
    traced = trace_model(target, tracer)
    other = OtherMode.of(trace_model(target, tracer, training=not target.training), opts.include_unnormed)
    plan = plan_expansion(traced, other, opts)
    swaps = ModuleSwaps(target)
    try:
        result = swaps.apply(plan.replacements)
        guard_foreign_reparam(result, plan.replacements)
        point_cfg_at(result, plan.replacements, {id(m): ".square" if isinstance(m, ACBlock) else ".conv"
                                                 for m in plan.replacements.values()
                                                 if isinstance(m, (ACBlock, OnlineACConv))})
    except BaseException:
        swaps.undo()
        raise
    warn_hook_skips("expand", plan.hooked)
    if not plan.replacements:
        logger.info("acfx.expand: nothing expanded in %s", type(model).__name__)
    report = Report.from_entries("expand", plan.entries)
    return (result, report) if return_report else result


@dataclasses.dataclass(frozen=True)
class ExpansionPlan:
    """What expand does to a traced model: the modules to swap in, one report entry per site, and the sites
    left because of hooks (one warning)."""

    replacements: Dict[str, nn.Module]
    entries: Tuple[Entry, ...]
    hooked: Tuple[str, ...]


def _untraced_entries(traced: TracedModel) -> List[Entry]:
    return [Entry(part.name, Action.UNTRACED, "module", f"{part.error}; traced its children instead")
            for part in traced.untraced]


def plan_expansion(traced: TracedModel, other: OtherMode, opts: ExpandOptions) -> ExpansionPlan:
    """Every site of ``traced`` decided and, where it is rewritten, built (nothing is swapped yet)."""
    replacements: Dict[str, nn.Module] = {}
    entries: List[Entry] = _untraced_entries(traced)
    hooked: List[str] = []
    for part in traced.parts:
        for call in find_conv_calls(part, traced):
            site = _site(call, opts, other)
            replacements.update(site.replacements)
            entries.append(site.entry)
            if site.hooked:
                hooked.append(call.name)
    return ExpansionPlan(replacements, tuple(entries), tuple(hooked))


@dataclasses.dataclass(frozen=True)
class _Site:
    replacements: Dict[str, nn.Module]
    entry: Entry
    hooked: bool = False


def _site(call: ConvCall, opts: ExpandOptions, other: OtherMode) -> _Site:
    """The replacements for one conv call (none if it is skipped) and its report entry."""
    verdict = expand_verdict(call, opts.filter_fn, opts.include_unnormed,
                             zero_branch_norms=opts.init == "preserve" and opts.norm == "branch" and opts.mode == "exact")
    if not verdict.skip:
        mode_reason = other.reason(call, call.norm_name if verdict.no_norm is None else None)
        if mode_reason:
            verdict = Verdict(mode_reason)
    if verdict.skip:
        logger.debug("acfx.expand: skipped %s: %s", call.name, verdict.skip)
        return _Site({}, Entry(call.name, Action.SKIPPED, call.what, verdict.skip), verdict.hooked)
    norm = call.norm if verdict.no_norm is None else None
    built = build_site(call.conv, norm, opts)
    detail, changes = "", False
    if norm is None:
        changes = call.conv.bias is None and opts.norm == "branch"
        detail = f"{verdict.no_norm}: expanded without a BN after the conv" + (
            "; collapse adds a conv bias" if changes else "")
    replacements: Dict[str, nn.Module] = {call.name: built.block}
    if built.tail is not None:
        # The tail returns what the BN returned.
        carry_output_hooks(norm, built.tail, f"{type(norm).__name__} '{call.norm_name}'")
        replacements[call.norm_name] = built.tail
    what = call.what.replace(" → no BN", "") if norm is None else call.what
    return _Site(replacements, Entry(call.name, Action.EXPANDED, what, detail, changes))
