"""acfx.expand: every eligible k×k conv (and the BN after it) becomes an Asymmetric Convolution Block."""
from __future__ import annotations

import logging
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Type, Union, overload

import torch.nn as nn

from ..layers.block import ACBlock, NormTail
from ..layers.cfg_links import point_cfg_at
from ..layers.hooks import carry_output_hooks, warn_hook_skips
from ..layers.online import OnlineACConv
from ..matching.find_sites import ConvCall, find_conv_calls
from ..matching.tracing import AcfxTracer, module_calls, shared_module_names, tied_tensor_names, trace_parts
from ..matching.untraced_reach import hook_owners
from .arguments import check_flags, check_model, refuse_wrapped, working_copy
from .build_block import build_site
from .options import ExpandOptions, FilterFn
from .policies import Verdict, expand_verdict
from .reparam_guard import guard_foreign_reparam
from .report import Report
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
def expand(model: nn.Module, *, init: str = ..., inplace: bool = ..., branches: str = ...,
           norm: Optional[str] = ..., placement: str = ..., gamma_init: Optional[float] = ...,
           include_unnormed: bool = ..., filter_fn: Optional[FilterFn] = ...,
           leaf_modules: Sequence[Type[nn.Module]] = ..., mode: str = ...,
           return_report: Literal[False] = ...) -> nn.Module: ...


@overload
def expand(model: nn.Module, *, init: str = ..., inplace: bool = ..., branches: str = ...,
           norm: Optional[str] = ..., placement: str = ..., gamma_init: Optional[float] = ...,
           include_unnormed: bool = ..., filter_fn: Optional[FilterFn] = ...,
           leaf_modules: Sequence[Type[nn.Module]] = ..., mode: str = ...,
           return_report: Literal[True]) -> Tuple[nn.Module, Report]: ...


def expand(model: nn.Module, *, init: str = "scratch", inplace: bool = False, branches: str = "both",
           norm: Optional[str] = None, placement: str = "centre", gamma_init: Optional[float] = None,
           include_unnormed: bool = False, filter_fn: Optional[FilterFn] = None,
           leaf_modules: Sequence[Type[nn.Module]] = (), mode: str = "exact", return_report: bool = False
           ) -> Union[nn.Module, Tuple[nn.Module, Report]]:
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
        init: "scratch": the k×k branch keeps the conv and its BN, the new 1×k/k×1 convs are initialised
            as nn.Conv2d initialises, their BNs at γ=1, β=0. "preserve": the new branch BNs start at
            γ=β=0 (with norm="sum" the new kernels start at 0), so the expanded model computes exactly the
            original function in train and eval mode; use it to fine-tune a pretrained model.
        inplace: rewrite ``model`` itself instead of a deep copy. On error the model is left as it was.
        branches: "both" (the paper's ACB), "hor" (1×k only) or "ver" (k×1 only).
        norm: "branch" (default): one BN per branch (the paper's best); "sum": no branch BNs, the original
            BN stays after the sum of the three convs.
        placement: "centre" (the kernel skeleton, the paper's choice) or "border" (bottom row / right
            column, the paper's ablation). Even kernel sides (2×2, 4×4) have no centre row: "centre" splits
            the branch's output channels between the two middle rows (even channels upper/left, odd
            lower/right) so that no half-pixel shift builds up with depth.
        gamma_init: with init="scratch", set the initial γ of all three branch BNs (the ACNet reference
            suggests 1/3 when training does not improve). None leaves the k×k BN as it is and the new BNs at 1.
        include_unnormed: also expand eligible convs that no BN follows (e.g. DenseNet convs feeding a
            concat): the k×k branch stays without BN, the 1×k/k×1 branches get BNs of their own, and the
            collapsed conv gains a bias (reported as a change of structure).
        filter_fn: ``filter_fn(conv_module, qualified_name) -> bool``; only convs it accepts are expanded.
        leaf_modules: extra module classes the tracer must not trace into.
        mode: "exact" (default): the paper's ACB, three convs and their BNs per site. "online": a different,
            cheaper recipe (OREPA, CVPR 2022): the branches get learnable per-channel scales instead of BNs,
            their kernels are merged at every forward into one k×k conv (:class:`~acfx.OnlineACConv`), and the
            original BN stays after it. ``init="preserve"`` starts the asymmetric scales at 0; ``gamma_init``
            sets the initial scales.
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
    check_flags("expand", inplace=inplace, include_unnormed=include_unnormed, return_report=return_report)
    opts = ExpandOptions(init=init, branches=branches, norm=norm, mode=mode, placement=placement,
                         gamma_init=gamma_init, include_unnormed=include_unnormed, filter_fn=filter_fn,
                         leaf_modules=leaf_modules)
    refuse_wrapped(model, "expand")
    _refuse_expanded(model)
    target = working_copy(model, inplace, "expand")
    tracer = lambda: AcfxTracer(leaf_types=(ACBlock, NormTail, OnlineACConv) + opts.leaf_modules)  # noqa: E731
    parts, untraced = trace_parts(target, tracer)
    shared, tied, hooks = shared_module_names(target), tied_tensor_names(target), hook_owners(target)
    other = _OtherMode(target, tracer, shared, tied, opts.include_unnormed)
    report = Report("expand")
    for part in untraced:
        report.add(part.name, "untraced", "module", f"{part.error}; traced its children instead")
    replacements: Dict[str, nn.Module] = {}
    hooked: List[str] = []
    for part in parts:
        for call in find_conv_calls(part, shared, untraced + hooks, tied):
            replacements.update(_rewrite_site(call, opts, report, hooked, other))
    swaps = ModuleSwaps(target)
    try:
        result = swaps.apply(replacements)
        guard_foreign_reparam(result, replacements)
        point_cfg_at(result, replacements, {id(m): ".square" if isinstance(m, ACBlock) else ".conv"
                                            for m in replacements.values() if isinstance(m, (ACBlock, OnlineACConv))})
    except BaseException:
        swaps.undo()
        raise
    warn_hook_skips("expand", hooked)
    if not replacements:
        logger.info("acfx.expand: nothing expanded in %s", type(model).__name__)
    return (result, report) if return_report else result


class _OtherMode:
    """The sites as the forward of the other mode (eval when the model is in train mode, and vice versa)
    shows them: fx records one path of a forward that branches on self.training, and a site must be a
    site on both paths (or absent from the other one) to be rewritten."""

    def __init__(self, target: nn.Module, tracer, shared: Dict[str, list], tied: Dict[str, List[str]],
                 include_unnormed: bool) -> None:
        self.mode = "eval" if target.training else "train"
        parts, untraced = trace_parts(target, tracer, training=not target.training)
        owners = untraced + hook_owners(target)
        self.parts = [part.name for part in parts]
        self.untraced = {part.name: part.error for part in untraced}
        self.sites = {}
        # Each BN's calls in this mode, and the convs whose output it takes.
        self.norm_calls: Dict[str, int] = {}
        self.norm_feeders: Dict[str, set] = {}
        for part in parts:
            for called, count in module_calls(part.graph).items():
                self.norm_calls[part.qualify(called)] = count
            for call in find_conv_calls(part, shared, owners, tied):
                verdict = expand_verdict(call, None, include_unnormed)
                self.sites[call.name] = (verdict, call.norm_name if verdict.no_norm is None else None)
                if call.norm_name:
                    self.norm_feeders.setdefault(call.norm_name, set()).add(call.name)

    def reason(self, call: ConvCall, norm_name: Optional[str]) -> Optional[str]:
        """Why ``call``, rewritten in the model's own mode with the BN ``norm_name``, cannot be in the other."""
        if call.name not in self.sites and not any(call.name.startswith(f"{part}.") or not part for part in self.parts):
            owner = max((name for name in self.untraced if not name or call.name.startswith(f"{name}.")), key=len,
                        default="")
            return f"in {self.mode} mode '{owner or '<model>'}' does not trace ({self.untraced.get(owner, '')})"
        difference = self._difference(call, norm_name)
        return None if difference is None else f"in {self.mode} mode the forward takes another path here: {difference}"

    def _difference(self, call: ConvCall, norm_name: Optional[str]) -> Optional[str]:
        verdict, other_norm = self.sites.get(call.name, (None, norm_name))  # absent: not called in this mode
        if verdict is not None and verdict.skip:
            return verdict.skip
        if norm_name and self.norm_calls.get(norm_name, 0) and self.norm_feeders.get(norm_name) != {call.name}:
            return f"BatchNorm {norm_name} normalises another input there"
        if other_norm != norm_name:
            return f"the conv's output goes to {other_norm or 'no BatchNorm'}, not {norm_name or 'no BatchNorm'}"
        return None


def _rewrite_site(call: ConvCall, opts: ExpandOptions, report: Report, hooked: List[str], other: _OtherMode
                  ) -> Dict[str, nn.Module]:
    """The replacements for one conv call (none if it is skipped), recorded in ``report``."""
    verdict = expand_verdict(call, opts.filter_fn, opts.include_unnormed)
    if not verdict.skip:
        mode_reason = other.reason(call, call.norm_name if verdict.no_norm is None else None)
        if mode_reason:
            verdict = Verdict(mode_reason)
    if verdict.hooked:
        hooked.append(call.name)
    if verdict.skip:
        logger.debug("acfx.expand: skipped %s: %s", call.name, verdict.skip)
        report.add(call.name, "skipped", call.what, verdict.skip)
        return {}
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
    report.add(call.name, "expanded", call.what.replace(" → no BN", "") if norm is None else call.what,
               detail, changes)
    return replacements
