"""acfx.collapse: fuse every block of summed conv(→BN) branches back into one convolution."""
from __future__ import annotations

import logging
import warnings
from typing import Dict, List, Literal, Optional, Sequence, Set, Tuple, Type, Union, overload

import torch.nn as nn

from ._checks import check_flags, check_model, refuse_wrapped, working_copy
from .block import ACBlock, NormTail, fuse_pair
from .branch_match import BranchSum, find_branch_sums
from .cfg_links import restore_cfg
from .fold import fold_norms
from .fused import FusionPlan, fuse_plan
from .fusion import Term
from .hooks import carry_hooks, hook_reason, hooks_of
from .online import OnlineACConv
from .options import check_leaf_modules
from .padding import DynamicSamePad2d
from .reparam_guard import remove_guards
from .report import Report
from .rewrite import ModuleSwaps
from .scope import Scope, ScopeIndex
from .split_conv import EvenSplitConv2d
from .tracing import AcfxTracer, TracedPart, trace_parts

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
    * Every other sum of conv branches on one input (written inline in a larger forward, adding other
      terms, branches that do not line up) is left as it is and reported with the reason: acfx swaps whole
      modules and never hands back a GraphModule.

    Forward hooks and pre-hooks on a replaced block (or NormTail) are carried to the module replacing it;
    a block whose inner modules hold hooks is left alone, with a warning.

    Args:
        model: the expanded (or any) model, with real weights and BN statistics (not on the meta device).
            Its train/eval mode is kept; fusion always uses running statistics, which must be finite. A
            model left in train mode gets a warning: the BNs put back in the slots hold the fused shift as
            running statistics, which train mode ignores.
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
    check_flags("collapse", fold_bn=fold_bn, inplace=inplace, return_report=return_report)
    leaves = check_leaf_modules(leaf_modules)
    refuse_wrapped(model, "collapse")
    _refuse_meta(model)
    target = working_copy(model, inplace, "collapse")
    report = Report("collapse")
    swaps = ModuleSwaps(target)
    try:
        result, restored_training, fused = _collapse_blocks(swaps, leaves, report)
        if fold_bn:
            result = fold_norms(swaps, collapse_tracer(leaves), report)
            restored_training = []  # the restored BNs are folded away
    except BaseException:
        swaps.undo()
        raise
    for module in fused:
        restore_cfg(module)
    if not any(isinstance(m, (ACBlock, NormTail, OnlineACConv)) for m in result.modules()):
        remove_guards(result)
    _warn(restored_training, report)
    logger.info("%s", report.summary())
    return (result, report) if return_report else result


def _refuse_meta(model: nn.Module) -> None:
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.device.type == "meta" for t in tensors):
        raise ValueError("acfx.collapse: the model is on the meta device, without weights or BN statistics; "
                         "collapse computes the fused kernels from them: materialise the model and load its "
                         "trained weights first (model.to_empty(device=...); model.load_state_dict(...))")


def _warn(restored_training: Sequence[str], report: Report) -> None:
    if restored_training:
        names = ", ".join(restored_training[:3]) + (", ..." if len(restored_training) > 3 else "")
        warnings.warn(
            f"acfx.collapse: the model is in train mode; the BatchNorms put back after {len(restored_training)} "
            f"fused block(s) ({names}) hold the fused shift as running statistics, which a BatchNorm in train "
            "mode ignores (it normalises with batch statistics), so in train mode the collapsed model computes "
            "another function. Call .eval() on the model before collapsing it (acfx.collapse(model.eval())) "
            "and deploy it in eval mode.", UserWarning, stacklevel=3)
    hooked = [e.name for e in report.skipped if "remove the hook" in e.detail]
    if hooked:
        warnings.warn(f"acfx.collapse: {len(hooked)} site(s) left as they are because of module hooks "
                      f"({', '.join(hooked[:5])}): see the report (return_report=True)", UserWarning, stacklevel=3)


def _collapse_blocks(swaps: ModuleSwaps, leaves: Tuple[type, ...], report: Report
                     ) -> Tuple[nn.Module, List[str], List[nn.Module]]:
    """Fuse every block; returns the new root, the blocks whose restored BN is in train mode and the acfx
    modules fused."""
    root = swaps.root
    parts, untraced = trace_parts(root, collapse_tracer(leaves))
    for part in untraced:
        report.add(part.name, "untraced", "module", f"{part.error}; traced its children instead")
    replacements: Dict[str, nn.Module] = {}
    in_graph: Set[str] = set()
    for part in parts:
        replacements.update(_collapse_part(part, report, in_graph))
    own, restored_training = _fuse_own(root, report, in_graph)
    fused = [m for m in map(root.get_submodule, own) if isinstance(m, (ACBlock, OnlineACConv))]
    replacements.update(own)
    return swaps.apply(replacements), restored_training, fused


def _describe(match: BranchSum, block: nn.Module) -> str:
    kernels = "+".join(b.kernel_text for b in match.branches)
    if match.alignment is None:
        return f"{type(block).__name__} {kernels}"
    return f"{type(block).__name__} {kernels} → conv {'x'.join(map(str, match.alignment.kernel_size))}"


def _inner_hooks(match: BranchSum, part: TracedPart, modules: Dict[str, nn.Module]) -> Optional[str]:
    """Why hooks on the modules inside a block stop its fusion (they would disappear with them)."""
    for node in match.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is not None and hooks_of(module).any:
            return (f"{part.qualify(node.target)} ({type(module).__name__}) inside the block has "
                    f"{' and '.join(hooks_of(module).kinds())}; fusing would drop it: remove the hook to collapse "
                    "this block")
    return None


def _plan(match: BranchSum, scope: Scope, part: TracedPart, training: bool) -> FusionPlan:
    """The resolved fusion plan of a fusable, whole-module match."""
    terms = tuple(Term(part.qualify(b.conv.target), b.spec.weight(), b.spec.bias,
                       part.module.get_submodule(b.norm.target) if b.norm is not None else None,
                       part.qualify(b.norm.target) if b.norm is not None else "", offset)
                  for b, offset in zip(match.branches, match.alignment.offsets))
    square = max(match.branches, key=lambda b: b.spec.kernel_size[0] * b.spec.kernel_size[1]).spec
    return FusionPlan(terms, match.alignment.kernel_size, match.alignment.window, match.alignment.padding_mode,
                      scope.pre, square, training)


def _collapse_part(part: TracedPart, report: Report, in_graph: Set[str]) -> Dict[str, nn.Module]:
    """Replacements for every fusable hand-written block in one traced part; the rest reported. The
    ACBlocks met are checked against their own layout and left to :func:`_fuse_own`."""
    modules = dict(part.module.named_modules())
    index = ScopeIndex(part.live, modules)
    out: Dict[str, nn.Module] = {}
    for match in find_branch_sums(part.graph, modules, part.live):
        scope = index.locate(match)
        name = part.qualify(scope.module if scope.module is not None else scope.enclosing)
        block = modules[scope.enclosing]
        if isinstance(block, ACBlock) and scope.module is not None:
            _check_own_layout(block, match, name)
            in_graph.add(name)
            continue
        what = _describe(match, block)
        reason = match.reason or scope.reason or _inner_hooks(match, part, modules)
        reason = reason or hook_reason(block, "the block", carries_pre=True, carries_forward=True)
        if reason:
            if name not in out:
                report.add(name, "skipped", what, reason)
            continue
        if name in out:
            continue  # the same module called again: already fused
        fused, reason = fuse_plan(_plan(match, scope, part, block.training))
        if fused is None:
            report.add(name, "skipped", what, reason)
            continue
        carry_hooks(block, fused.conv, forward_pre=True, forward=True)  # same input, same output
        out[name] = fused.conv
        notes = [f"{type(block).__name__} replaced by one {type(fused.conv).__name__}"]
        if fused.gained_bias:
            notes.append("the conv gained a bias (no BN slot after the block to hold the shift)")
        report.add(name, "collapsed", what, "; ".join(notes), True)
    return out


def _check_own_layout(block: ACBlock, match: BranchSum, name: str) -> None:
    """The graph's reading of an ACBlock must be the layout the block records (an internal invariant)."""
    if match.reason is not None or match.alignment is None:
        raise AssertionError(f"acfx internal error: ACBlock '{name}' does not match as a fusable block "
                             f"({match.reason}); please report it")
    convs = {id(getattr(block, n)): n for n in block.branch_names()}
    seen = {convs.get(id(b.module)): offset for b, offset in zip(match.branches, match.alignment.offsets)}
    if match.alignment.kernel_size != block.kernel_size or seen != block.offsets:
        raise AssertionError(f"acfx internal error: ACBlock '{name}' records offsets {block.offsets} in a "
                             f"{block.kernel_size} kernel, its graph reads {seen} in {match.alignment.kernel_size}; "
                             "please report it")


def _fuse_own(root: nn.Module, report: Report, in_graph: Set[str]) -> Tuple[Dict[str, nn.Module], List[str]]:
    """Every ACBlock (with its NormTail) and OnlineACConv fused from its own children."""
    names = {id(m): n for n, m in root.named_modules()}
    out: Dict[str, nn.Module] = {}
    restored_training: List[str] = []
    for name, module in root.named_modules():
        if isinstance(module, OnlineACConv):
            out[name] = module.fused_conv()
            carry_hooks(module, out[name], forward_pre=True, forward=True)
            kh, kw = module.conv.kernel_size
            report.add(name, "collapsed", f"OnlineACConv → {type(module.conv).__name__} {kh}x{kw}")
            continue
        if not isinstance(module, ACBlock):
            continue
        what = f"ACBlock {'+'.join('x'.join(map(str, getattr(module, n).kernel_size)) for n in module.branch_names())}" \
               f" → conv {'x'.join(map(str, module.kernel_size))}"
        inner = [f"{name}.{n}" for n, m in module.named_modules() if n and hooks_of(m).any]
        if inner:
            report.add(name, "skipped", what, f"{inner[0]} inside the block has a hook; fusing would drop it: "
                                              "remove the hook to collapse this block")
            continue
        tail = module.tail()
        tail_name = names.get(id(tail)) if tail is not None else None
        conv, norm = fuse_pair(module, restore_tail=tail_name is not None, name=name)
        carry_hooks(module, conv, forward_pre=True, forward=True)
        out[name] = conv
        notes = [] if name in in_graph else ["not in a traced part of the model: fused from its recorded layout"]
        if norm is not None:
            carry_hooks(tail, norm, forward_pre=True, forward=True)
            out[tail_name] = norm
            if norm.training:
                restored_training.append(name)
        elif conv.bias is not None and module.square.bias is None:
            notes.append("the conv gained a bias (no BN slot after the block to hold the shift)")
        report.add(name, "collapsed", what, "; ".join(notes), "gained a bias" in "; ".join(notes))
    return out, restored_training
