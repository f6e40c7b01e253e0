"""acfx.collapse: fuse every block of summed conv(→BN) branches back into one convolution."""
from __future__ import annotations

import collections
import logging
from typing import Dict, Literal, Sequence, Tuple, Type, Union, overload

import torch
import torch.nn as nn

from ._checks import check_model, working_copy
from .block import ACBlock, NormTail
from .branch_match import BranchSum, find_branch_sums
from .fold import fold_norms
from ._modules import refill_conv
from .fused import fuse_match
from .fusion import check_finite
from .online import OnlineACConv
from .options import ExpandOptions
from .padding import DynamicSamePad2d
from .report import Report
from .rewrite import ModuleSwaps
from .scope import locate
from .split_conv import EvenSplitConv2d
from .tracing import AcfxTracer, TracedPart, live_nodes, trace_parts

__all__ = ["collapse", "collapse_tracer"]

logger = logging.getLogger(__name__)


def collapse_tracer(leaf_modules: Sequence[Type[nn.Module]] = ()):
    """A tracer factory that traces through ACBlocks (and any block) down to convs and BNs."""
    leaves = (NormTail, DynamicSamePad2d, EvenSplitConv2d, OnlineACConv) + tuple(leaf_modules)
    return lambda: AcfxTracer(leaf_types=leaves, opaque_types=(ACBlock,))


@overload
def collapse(model: nn.Module, *, fold_bn: bool = ..., inplace: bool = ...,
             leaf_modules: Sequence[Type[nn.Module]] = ..., return_report: Literal[False] = ...) -> nn.Module: ...


@overload
def collapse(model: nn.Module, *, fold_bn: bool = ..., inplace: bool = ...,
             leaf_modules: Sequence[Type[nn.Module]] = ..., return_report: Literal[True]
             ) -> Tuple[nn.Module, Report]: ...


def collapse(model: nn.Module, *, fold_bn: bool = False, inplace: bool = False,
             leaf_modules: Sequence[Type[nn.Module]] = (), return_report: bool = False
             ) -> Union[nn.Module, Tuple[nn.Module, Report]]:
    """Fuse every block of parallel conv(→BN) branches summed on one input into a single convolution.

    A graph pass: the model is traced with torch.fx and blocks are found by pattern (branches that read
    the same input, through optional crops, and whose kernels fit in one sliding window), so it fuses
    acfx's :class:`~acfx.ACBlock` and hand-written ACNet-style blocks alike. The result is what the
    blocks compute in eval mode (BN running statistics), exactly up to float rounding.

    What each block becomes:

    * An ACBlock from :func:`acfx.expand` becomes the original conv again, and the BN slot after it a BN
      of the original kind (BatchNorm2d, BatchNormAct2d with its activation, ...) holding the fused shift,
      so ``collapse(expand(m)).state_dict()`` loads with ``strict=True`` into a fresh ``m``.
    * Any other block that is a whole module (its forward is the branches, their sum, and at most one
      padding op on its input) is replaced by one nn.Conv2d (timm Conv2dSame for TF-'same' padding)
      with a bias; the report marks it as a change of structure.
    * Branch sums written inline in a larger forward (among other operations) are left as they are and
      reported with the reason: acfx swaps whole modules and never hands back a GraphModule.

    Args:
        model: the expanded (or any) model. Its train/eval mode is kept; fusion always uses running
            statistics, which must be finite.
        fold_bn: also fold every conv→BN pair in the model (fused or not) into a conv with bias and remove
            the BN (a timm norm-act layer keeps its drop and activation): the deploy form.
        inplace: rewrite ``model`` itself instead of a deep copy. On error the model is left as it was.
        leaf_modules: extra module classes the tracer must not trace into.
        return_report: also return a :class:`~acfx.Report` of every block found and what became of it.

    Raises ValueError naming the module when BN statistics or weights are not finite.

    Example::

        >>> acnet = acfx.expand(timm.create_model("resnet18"))
        >>> ...  # train
        >>> plain = acfx.collapse(acnet.eval())
        >>> timm.create_model("resnet18").load_state_dict(plain.state_dict())  # strict
    """
    check_model(model, "collapse")
    ExpandOptions(leaf_modules=tuple(leaf_modules))  # validates leaf_modules
    target = working_copy(model, inplace, "collapse")
    report = Report("collapse")
    swaps = ModuleSwaps(target)
    try:
        result = _collapse_blocks(swaps, tuple(leaf_modules), report)
        if fold_bn:
            result = fold_norms(swaps, collapse_tracer(leaf_modules), report)
    except BaseException:
        swaps.undo()
        raise
    logger.info("%s", report.summary())
    return (result, report) if return_report else result


def _collapse_blocks(swaps: ModuleSwaps, leaf_modules, report: Report) -> nn.Module:
    parts, untraced = trace_parts(swaps.root, collapse_tracer(leaf_modules))
    for part in untraced:
        report.add(part.name, "untraced", "module", f"{part.error}; traced its children instead")
    replacements: Dict[str, nn.Module] = {}
    for part in parts:
        replacements.update(_collapse_part(part, report))
        replacements.update(_collapse_merged_convs(part, report))
    reported = {e.name for e in report.entries}
    for name, module in swaps.root.named_modules():
        if isinstance(module, ACBlock) and name not in replacements and name not in reported:
            report.add(name, "skipped", "ACBlock", "not found in the traced graph (inside a part that "
                                                   "could not be traced)")
    return swaps.apply(replacements)


def _is_merged_conv(module: nn.Module) -> bool:
    """The protocol of convs whose kernel is computed from several (OnlineACConv): ``effective_weight()``
    and the ``conv`` whose configuration applies it."""
    return callable(getattr(module, "effective_weight", None)) and isinstance(getattr(module, "conv", None), nn.Conv2d)


def _collapse_merged_convs(part: TracedPart, report: Report) -> Dict[str, nn.Module]:
    """Each module with a merged kernel becomes its conv, holding that kernel (as computed in forward)."""
    modules = dict(part.module.named_modules())
    out: Dict[str, nn.Module] = {}
    for node in part.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        name = part.qualify(node.target) if module is not None else None
        if module is None or name in out or not _is_merged_conv(module):
            continue
        with torch.no_grad():
            weight = module.effective_weight().detach().clone()
        check_finite(name, "merged weight", weight)
        bias = None if module.conv.bias is None else module.conv.bias.detach().clone()
        out[name] = refill_conv(module.conv, weight, bias)
        kh, kw = module.conv.kernel_size
        report.add(name, "collapsed", f"{type(module).__name__} → {type(module.conv).__name__} {kh}x{kw}")
    return out


def _describe(match: BranchSum, block: nn.Module) -> str:
    kernels = "+".join(f"{b.spec.kernel_size[0]}x{b.spec.kernel_size[1]}" for b in match.branches)
    size = "x".join(map(str, match.kernel_size))
    return f"{type(block).__name__} {kernels} → conv {size}"


def _collapse_part(part: TracedPart, report: Report) -> Dict[str, nn.Module]:
    """Replacements for every fusable whole-module block in one traced part; the rest reported."""
    modules = dict(part.module.named_modules())
    live = live_nodes(part.graph)
    located = [(m, locate(m, live, modules)) for m in find_branch_sums(part.graph, modules, live)]
    calls = collections.Counter(scope.module for _, scope in located if scope.module is not None)
    out: Dict[str, nn.Module] = {}
    for match, scope in located:
        name = part.qualify(scope.module if scope.module is not None else scope.enclosing)
        block = modules[scope.enclosing]
        what = _describe(match, block)
        reason = match.reason or scope.reason
        fused = None
        if not reason and name not in out:
            fused, reason = fuse_match(match, scope.pre, modules, live, part.qualify, block.training,
                                       restore_tail=calls[scope.module] == 1)
        if reason:
            report.add(name, "skipped", what, reason)
            continue
        if fused is None:
            continue  # the same module called again: already fused
        out[name] = fused.conv
        if fused.tail_target is not None:
            out[part.qualify(fused.tail_target)] = fused.norm
        notes = []
        if not isinstance(block, ACBlock):
            notes.append(f"{type(block).__name__} replaced by one {type(fused.conv).__name__}")
        if fused.gained_bias:
            notes.append("the conv gained a bias (no BN slot after the block to hold the shift)")
        report.add(name, "collapsed", what, "; ".join(notes), bool(notes))
    return out
