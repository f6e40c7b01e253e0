"""acfx.collapse: fuse every block of summed conv(→BN) branches back into one convolution."""
from __future__ import annotations

import dataclasses
import logging
import typing
import warnings
from typing import Dict, List, Literal, Sequence, Set, Tuple, Type, Union, overload

import torch.nn as nn

from ..layers.block import ACBlock, NormTail
from ..layers.cfg_links import restore_cfg
from ..layers.hooks import warn_hook_skips
from ..layers.online import OnlineACConv
from ..layers.padding import DynamicSamePad2d
from ..layers.split_conv import EvenSplitConv2d
from ..matching.traced_model import trace_model
from ..matching.tracing import AcfxTracer
from .arguments import check_flags, check_model, refuse_wrapped, working_copy
from .collapse_matches import collapse_matches
from .fold_bn import fold_norms
from .fuse_own import fuse_own
from .options import check_leaf_modules
from .reparam_guard import remove_guards
from .report import Action, Entry, Report
from .swap_modules import ModuleSwaps

__all__ = ["collapse", "collapse_tracer"]

logger = logging.getLogger(__name__)


def collapse_tracer(leaf_modules: Sequence[Type[nn.Module]] = ()):
    """A tracer factory that traces through ACBlocks (and any block) down to convs and BNs."""
    leaves = (NormTail, DynamicSamePad2d, EvenSplitConv2d, OnlineACConv) + tuple(leaf_modules)
    return lambda: AcfxTracer(leaf_types=leaves, opaque_types=(ACBlock,), read_layers=True)


# Which blocks collapse fuses: every re-parameterisable one, or acfx's own only (the model's architecture kept).
Blocks = Literal["all", "acfx"]


@overload
def collapse(model: nn.Module, *, blocks: Blocks = ..., fold_bn: bool = ..., inplace: bool = ...,
             leaf_modules: Sequence[Type[nn.Module]] = ..., return_report: Literal[False] = ...) -> nn.Module: ...


@overload
def collapse(model: nn.Module, *, blocks: Blocks = ..., fold_bn: bool = ..., inplace: bool = ...,
             leaf_modules: Sequence[Type[nn.Module]] = ..., return_report: Literal[True]
             ) -> Tuple[nn.Module, Report]: ...


def collapse(model: nn.Module, *, blocks: Blocks = "all", fold_bn: bool = False, inplace: bool = False,
             leaf_modules: Sequence[Type[nn.Module]] = (), return_report: bool = False
             ) -> Union[nn.Module, Tuple[nn.Module, Report]]:
    """Fuse every block of parallel conv(→BN) branches summed on one input into a single convolution.

    A graph pass: the model is traced with torch.fx and blocks are found by pattern (branches that read
    the same input, through optional crops and nn.Identity calls, and whose kernels fit in one sliding
    window), so it fuses acfx's :class:`~acfx.ACBlock` and hand-written ACNet-style blocks alike. The
    result is what the blocks compute in eval mode (BN running statistics), exactly up to float rounding.

    What each block becomes:

    * An ACBlock from :func:`acfx.expand` becomes the original conv again (fused from its own recorded
      layout, which the graph's pattern must agree with), and the BN slot after it a BN of the original
      kind (BatchNorm2d, BatchNormAct2d with its activation, ...) holding the fused shift, so
      ``collapse(expand(m)).state_dict()`` loads with ``strict=True`` into a fresh ``m``.
    * Any other block that is a whole module (its forward is the branches, their sum, and at most one
      padding op on its input) is replaced by one nn.Conv2d (timm Conv2dSame for TF-'same' padding)
      with a bias; the report marks it as a change of structure.
    * A block whose forward does more than the sum (a ReLU or SE after it, RepGhost's primary conv before)
      keeps the rest of its forward: a GraphModule named after the block, each sum one conv ('reparam').
    * A sum that cannot be one conv exactly (a non-linear or other-input term, branches that do not line
      up, a BN kept in train mode) is left as it is and reported with the reason.

    Constant shifts and scales around a conv with no sum (YOLOv7's implicit layers, a layer scale) are the
    model's own architecture: folded into the conv with ``fold_bn=True``, like the BNs.

    Forward hooks and pre-hooks on a replaced block (or NormTail) are carried to the module replacing it;
    a block whose inner modules hold hooks is left alone, with a warning.

    Args:
        model: the expanded (or any) model, with real weights and BN statistics (not on the meta device).
        blocks: "all" (default): acfx's blocks and every re-parameterisable block of the model's own
            (RepVGG's, MobileOne's, timm's rep families in their train-time form, any sum of linear branches).
            "acfx": acfx's blocks only, the rest of the model as it is, so that a model with blocks of its own
            (timm's fastvit, mobileone) collapses back to exactly the architecture it was expanded from and
            its state_dict loads strictly into a freshly built one.
            Its train/eval mode is kept; fusion always uses running statistics, which must be finite. A
            model left in train mode gets a warning: the BNs put back in the slots hold the fused shift as
            running statistics, which train mode ignores.
        fold_bn: also fold every conv→BN pair in the model (fused or not) into a conv with bias and remove
            the BN (a timm norm-act layer keeps its drop and activation), and the constant shifts and scales
            around a conv into it: the deploy form.
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
    check_flags("collapse", fold_bn=fold_bn, inplace=inplace, return_report=return_report)
    if blocks not in typing.get_args(Blocks):
        raise ValueError(f"acfx.collapse: blocks={blocks!r} is not one of {typing.get_args(Blocks)}")
    leaves = check_leaf_modules(leaf_modules)
    refuse_wrapped(model, "collapse")
    _refuse_meta(model)
    target = working_copy(model, inplace, "collapse")
    swaps = ModuleSwaps(target)
    before = {id(m) for m in target.modules()}
    try:
        fused = _collapse_blocks(target, leaves, fold_bn, foreign=blocks == "all")
        result = swaps.apply(fused.replacements)
        folded = None
        if fold_bn:  # what is folded is the eval path
            folded = fold_norms(trace_model(result, collapse_tracer(leaves), training=False))
            result = swaps.apply(folded.replacements)
    except BaseException:
        swaps.undo()
        raise
    for module in fused.fused:
        restore_cfg(module)
    _unlink_replaced(fused.fused, before, {id(m) for m in result.modules()})
    if not any(isinstance(m, (ACBlock, NormTail, OnlineACConv)) for m in result.modules()):
        remove_guards(result)
    _warn_train_mode(fused.in_train_mode + (folded.in_train_mode if folded else ()))
    warn_hook_skips("collapse", fused.hooked + (folded.hooked if folded else ()))
    report = Report.from_entries("collapse", fused.entries, folded.entries if folded else ())
    logger.info("%s", report.summary())
    return (result, report) if return_report else result


@dataclasses.dataclass(frozen=True)
class _Collapsed:
    """What collapse fuses: the swaps, one entry per block, the blocks left because of hooks (one warning),
    fused blocks in train mode (one warning), and the acfx modules fused (their cfg links point back)."""

    replacements: Dict[str, nn.Module]
    entries: Tuple[Entry, ...]
    hooked: Tuple[str, ...]
    in_train_mode: Tuple[str, ...]
    fused: Tuple[nn.Module, ...]


def _unlink_replaced(fused: Sequence[nn.Module], before: Set[int], after: Set[int]) -> None:
    """Break the block ↔ NormTail link of each ACBlock collapse took out of the model with its tail, so that
    both are freed at once (GPU memory included), not at Python's next cyclic collection. A tail outside the
    collapsed module stays linked: it still reads its block's shift."""
    for module in fused:
        if not isinstance(module, ACBlock) or id(module) in after:
            continue
        tail = module.tail()
        if tail is not None and id(tail) in before and id(tail) not in after:
            module.unlink_tail()


def _refuse_meta(model: nn.Module) -> None:
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.device.type == "meta" for t in tensors):
        raise ValueError("acfx.collapse: the model is on the meta device, without weights or BN statistics; "
                         "collapse computes the fused kernels from them: materialise the model and load its "
                         "trained weights first (model.to_empty(device=...); model.load_state_dict(...))")


def _warn_train_mode(in_train_mode: Sequence[str]) -> None:
    if in_train_mode:
        names = ", ".join(in_train_mode[:3]) + (", ..." if len(in_train_mode) > 3 else "")
        warnings.warn(
            f"acfx.collapse: the model is in train mode at {len(in_train_mode)} fused block(s) ({names}). Collapse "
            "fuses what a block computes in eval mode, from its BatchNorms' running statistics; a BatchNorm in "
            "train mode normalises with batch statistics instead (and one put back after a fused ACBlock holds the "
            "fused shift as running statistics, which it then ignores), so the collapsed model computes another "
            "function in train mode. Call .eval() on the model before collapsing it (acfx.collapse(model.eval())) "
            "and deploy it in eval mode.", UserWarning, stacklevel=3)


def _collapse_blocks(root: nn.Module, leaves: Tuple[type, ...], fold_bn: bool, foreign: bool) -> _Collapsed:
    """Every block: hand-written ones from the graph (``foreign``; with ``fold_bn``, the constant shifts and
    scales around a conv too), acfx's own from themselves."""
    traced = trace_model(root, collapse_tracer(leaves), training=False)  # what is fused is the eval function
    entries: List[Entry] = [Entry(p.name, Action.UNTRACED, "module", f"{p.error}; traced its children instead")
                            for p in traced.untraced]
    replacements: Dict[str, nn.Module] = {}
    hooked: List[str] = []
    in_train_mode: List[str] = []
    checked = set()
    for part in traced.parts:
        matches = collapse_matches(part, traced, affine_chains=fold_bn, foreign=foreign)
        replacements.update(matches.replacements)
        entries += matches.entries
        hooked += matches.hooked
        in_train_mode += matches.in_train_mode
        checked |= matches.checked
    fused: List[nn.Module] = []
    for own in fuse_own(root):
        if own.skip:
            hooked.append(own.name)
            entries.append(Entry(own.name, Action.SKIPPED, own.what, own.skip))
            continue
        replacements.update(own.replacements)
        fused.append(own.module)
        if own.in_train_mode:
            in_train_mode.append(own.name)
        notes = [] if own.name in checked or isinstance(own.module, OnlineACConv) else \
            ["not in a traced part of the model: fused from its recorded layout"]
        if own.gained_bias:
            notes.append("the conv gained a bias (no BN slot after the block to hold the shift)")
        entries.append(Entry(own.name, Action.COLLAPSED, own.what, "; ".join(notes), own.gained_bias))
    return _Collapsed(replacements, tuple(entries), tuple(hooked), tuple(in_train_mode), tuple(fused))
