"""collapse's graph part: every re-parameterisable region of a traced part, fused or reported.

A region (matching/find_linear_regions.py) that is a whole module becomes one conv; one that shares its
module's forward with more code becomes that forward with the region replaced by one conv
(fuse_regions.py). The map is computed with the algebra of linear maps (region_map.py). Regions inside
acfx's own blocks are left to them: an ACBlock fuses itself (fuse_own.py). Every region that stays is
reported with the reason.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import torch.nn as nn

from ..layers.block import ACBlock
from ..layers.convs import kernel_of
from ..layers.hooks import carry_hooks, hook_reason, hooks_of
from ..layers.linear_map import ConvMap, Inexact
from ..matching.find_linear_regions import LinearRegion, find_linear_regions
from ..matching.module_stacks import call_keys, common_prefix
from ..matching.scope import Scope, ScopeIndex
from ..matching.traced_model import TracedModel
from ..matching.tracing import TracedPart, module_calls
from ..matching.untraced_reach import reach_reason
from .fuse_regions import REPARAM_NAME, Rewrite, fused_conv, rewritten_forward
from .region_map import region_map
from .report import Action, Entry

__all__ = ["MatchesOutcome", "collapse_matches"]


def _kernels(region: LinearRegion) -> str:
    sizes = []
    for op in region.ops:
        if op.kind == "conv":
            sizes.append("x".join(map(str, op.module.kernel_size)))
        elif op.kind == "function_conv":
            sizes.append("conv(computed weight)")
    return "+".join(sizes)


def _describe(region: LinearRegion, block: nn.Module, conv: Optional[nn.Module] = None) -> str:
    what = f"{type(block).__name__} {_kernels(region)}"
    if conv is not None:
        what += f" → {type(conv).__name__} {'x'.join(map(str, conv.kernel_size))}"
    return what


def _inner_hooks(region: LinearRegion, part: TracedPart, modules: Dict[str, nn.Module]) -> Optional[str]:
    """Why hooks on the modules inside a block stop its fusion (they would disappear with them)."""
    for node in region.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is not None and hooks_of(module).any:
            return (f"{part.qualify(node.target)} ({type(module).__name__}) inside the block has "
                    f"{' and '.join(hooks_of(module).kinds())}; fusing would drop it: remove the hook to collapse "
                    "this block")
    return None


def _outside_use(region: LinearRegion, scope: Scope, part: TracedPart, owners: Sequence,
                 calls: Dict[str, int]) -> Optional[str]:
    """Why the block, or a module inside the region, is used other than by the block's calls module(x)."""
    block_calls = len(part.call_forms.get(scope.module, ())) if scope.module else 1
    if scope.module:
        reason = _block_use(scope, part, owners)
    else:  # the part's own root: a child of a module that did not trace, whose code may use it otherwise
        reason = reach_reason(part.name, part.module, owners, part_root=True) if part.name else None
    if reason:
        return f"the block is {reason}" if reason.startswith("called") else reason
    fused = region.node_set | set(region.constants)
    read_by_fusion = {c for c in region.constants if all(u in fused for u in c.users)}  # ECB's bias pad reads
    for node in sorted(region.nodes, key=lambda n: n.name):
        if node.op != "call_module":
            continue
        name = part.qualify(node.target)
        if calls[node.target] != block_calls:
            return f"{name} is also called outside the block; fusing it away would break that call"
        reason = part.use_reason(node.target, owners, read_by_fusion)
        if reason:
            return f"{name}: {reason}"
    return None


def _block_use(scope: Scope, part: TracedPart, owners: Sequence) -> Optional[str]:
    """Why the block is used other than by its calls: another call form, code tracing does not see, or a read of
    its tensors from outside its own forward (its forward reads them: OREPA's weights, YOLOv7's implicit)."""
    reason = part.call_form_reason(scope.module)
    if reason:
        return reason
    body = set(scope.body)
    prefix = f"{scope.module}."
    outside = sorted({n.target for n in part.graph.nodes if n.op == "get_attr" and n.target.startswith(prefix)
                      and n not in body and n.users})  # a read nothing uses computes nothing
    if outside:
        return f"the forward reads {part.qualify(outside[0])} outside the block, which fusing it would remove"
    return reach_reason(part.qualify(scope.module), part.module.get_submodule(scope.module), owners)


def _in_train_mode(region: LinearRegion, block: nn.Module, modules: Dict[str, nn.Module]) -> bool:
    """The block or a module of the region is in train mode: its eval function is what gets fused."""
    return block.training or any(modules[n.target].training for n in region.nodes if n.op == "call_module")


def _kept_in_train_mode(region: LinearRegion, block: nn.Module, part: TracedPart,
                        modules: Dict[str, nn.Module]) -> Optional[str]:
    """Why a region of a block in eval mode is left: one of its BNs was put in train mode on purpose (test-time
    adaptation), so it normalises with batch statistics, which no conv computes. (A whole model in train
    mode is fused for eval, with a warning: that is a forgotten .eval().)"""
    if block.training:
        return None
    kept = [n.target for n in region.nodes if n.op == "call_module" and modules[n.target].training
            and isinstance(modules[n.target], nn.modules.batchnorm._NormBase)]
    if not kept:
        return None
    return (f"{part.qualify(kept[0])} is a BatchNorm in train mode in a block in eval mode: it normalises with "
            "batch statistics, which no conv computes; call .eval() on it to fuse its running statistics")


def _own_block_of(name: str, modules: Dict[str, nn.Module]) -> Optional[str]:
    """The acfx ACBlock ``name`` lies in (or is), if any: such a block fuses itself from its recorded layout."""
    parts = name.split(".") if name else []
    return next((".".join(parts[:i]) for i in range(len(parts) + 1)
                 if isinstance(modules.get(".".join(parts[:i])), ACBlock)), None)


def _own_blocks_in(region: LinearRegion, modules: Dict[str, nn.Module]) -> Set[str]:
    """The ACBlocks whose modules the region runs."""
    found = (_own_block_of(n.target, modules) for n in region.nodes if n.op == "call_module")
    return {name for name in found if name is not None}


@dataclasses.dataclass(frozen=True)
class MatchesOutcome:
    """What collapse does with the regions of one traced part."""

    # What replaces each fused block (a conv, or its forward rewritten around one conv), by qualified name.
    replacements: Dict[str, nn.Module]
    entries: Tuple[Entry, ...]
    # Blocks left because of hooks (one warning), fused blocks in train mode (one warning).
    hooked: Tuple[str, ...]
    in_train_mode: Tuple[str, ...]
    # ACBlocks the graph showed (fused by themselves).
    checked: FrozenSet[str]


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """A region that can be fused, with its conv, waiting for the other regions of its block."""

    region: LinearRegion
    scope: Scope
    conv: nn.Module
    gained_bias: bool


def _costlier(found: ConvMap, region: LinearRegion, convs: Sequence[nn.Module]) -> Optional[str]:
    """Why one conv would cost more than the block (None: it does not). A chain with a wide map before a
    narrow one (a depthwise conv then a 1×1, a bottleneck's 1×1 into a k×k) or dilated kernels whose common
    lattice is denser is one conv exactly, but one with more weights than the block's convs, so more to run.
    A weight the forward computes (OREPA) is generated at the fused size: nothing to compare."""
    if any(op.kind == "function_conv" for op in region.ops):
        return None
    held = sum(kernel_of(conv).numel() for conv in convs)
    if found.kernel.numel() <= held:
        return None
    return (f"one conv would hold {found.kernel.numel()} weights where the block's convs hold {held}, so it would "
            "cost more to run than the block: left as it is")


def _fuse(region: LinearRegion, scope: Scope, part: TracedPart, block: nn.Module):
    """The conv computing ``region`` (a _Candidate), or the reason there is none."""
    found = region_map(region, part)
    if isinstance(found, Inexact):
        return found.reason
    convs = [op.module for op in region.ops if op.kind == "conv"]
    costlier = _costlier(found.map, region, convs)
    if costlier:
        return costlier
    like = next(block.parameters(), found.map.kernel)
    conv = fused_conv(found.map, found.padding_mode, scope.pre, convs, block.training, like, found.dims)
    if isinstance(conv, Inexact):
        return conv.reason
    return _Candidate(region, scope, conv.conv, conv.gained_bias)


def _call_key(region: LinearRegion) -> Optional[str]:
    """The call key (fx's nn_module_stack) of the module call whose forward holds the region."""
    common = common_prefix([call_keys(n) for n in region.nodes])
    return common[-1] if common else None


def collapse_matches(part: TracedPart, traced: TracedModel, affine_chains: bool = False, foreign: bool = True
                     ) -> MatchesOutcome:
    """Replacements for the fusable blocks of one traced part; every other region reported. ``affine_chains``:
    constant shifts and scales around a conv with no sum are fused too (collapse's fold_bn); ``foreign``
    False: only acfx's own blocks are looked at (they fuse themselves), the model's own are left unreported."""
    modules = dict(part.module.named_modules())
    index = ScopeIndex(part.live, modules, part.graph)
    calls = module_calls(part.graph)
    entries: List[Entry] = []
    hooked: List[str] = []
    checked: Set[str] = set()
    by_block: Dict[str, List[_Candidate]] = {}
    for region in find_linear_regions(part.graph, modules, part.live, affine_chains):
        scope = index.locate(region)
        name = part.qualify(scope.module if scope.module is not None else scope.enclosing)
        block = modules[scope.enclosing]
        if _own_block_of(scope.enclosing, modules) is not None:
            checked.add(name)
            continue
        own = _own_blocks_in(region, modules)
        if own:  # an ACBlock with linear ops of the model's own around it: the block fuses itself, the rest stays
            checked.update(part.qualify(n) for n in own)
            continue
        if not foreign:
            continue
        hook = _inner_hooks(region, part, modules) or hook_reason(block, "the block", carries_pre=True,
                                                                  carries_forward=True)
        reason = (region.reason or scope.reason or hook or _kept_in_train_mode(region, block, part, modules)
                  or _outside_use(region, scope, part, traced.owners, calls))
        fused = _fuse(region, scope, part, block) if not reason else reason
        if isinstance(fused, str):
            if fused == hook:
                hooked.append(name)
            entries.append(Entry(name, Action.SKIPPED, _describe(region, block), fused))
            continue
        if any(c.region.output is region.output for c in by_block.get(name, ())):
            continue  # the same region twice: a module called again
        by_block.setdefault(name, []).append(fused)
    out: Dict[str, nn.Module] = {}
    in_train_mode: List[str] = []
    for name, candidates in by_block.items():
        entry, module = _replace(name, candidates, part, modules)
        entries.append(entry)
        if module is not None:
            block = modules[candidates[0].scope.enclosing]
            carry_hooks(block, module, forward_pre=True, forward=True)  # same input, same output
            out[name] = module
            if any(_in_train_mode(c.region, block, modules) for c in candidates):
                in_train_mode.append(name)
    return MatchesOutcome(out, tuple(entries), tuple(hooked), tuple(in_train_mode), frozenset(checked))


def _replace(name: str, candidates: List[_Candidate], part: TracedPart, modules: Dict[str, nn.Module]
             ) -> Tuple[Entry, Optional[nn.Module]]:
    """What replaces a block (its entry in the report, and the module; None when it stays)."""
    first = candidates[0]
    block = modules[first.scope.enclosing]
    what = "; ".join(_describe(c.region, block, c.conv) for c in candidates)
    bias = ["the conv gained a bias (no BN slot after the block to hold the shift)"] if any(
        c.gained_bias for c in candidates) else []
    if first.scope.whole and len(candidates) == 1:
        notes = [f"{type(block).__name__} replaced by one {type(first.conv).__name__}"] + bias
        return Entry(name, Action.COLLAPSED, what, "; ".join(notes), True), first.conv
    rewrites = [Rewrite(c.region, c.conv) for c in candidates]
    module = rewritten_forward(part, first.scope, rewrites, block, _call_key(first.region))
    if isinstance(module, Inexact):
        return Entry(name, Action.SKIPPED, what, module.reason), None
    kinds = ", ".join(sorted({type(c.conv).__name__ for c in candidates}))
    notes = [f"{type(block).__name__}'s forward rewritten: {len(candidates)} sum(s) each one {kinds} "
             f"('{REPARAM_NAME}'), the rest of its forward kept"] + bias
    return Entry(name, Action.COLLAPSED, what, "; ".join(notes), True), module
