"""collapse's graph part: every sum of conv branches found in a traced part, fused or reported.

A hand-written block that is a whole module becomes one conv (fuse_hand_written.py). An ACBlock met in
the graph is only checked: its recorded layout must be what the graph shows (it fuses itself). Every
other sum is reported with the reason it stays.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import torch.nn as nn

from ..layers.block import ACBlock
from ..layers.fusion import Term
from ..layers.hooks import carry_hooks, hook_reason, hooks_of
from ..matching.find_branch_sums import BranchSum, find_branch_sums
from ..matching.scope import Scope, ScopeIndex
from ..matching.traced_model import TracedModel
from ..matching.tracing import TracedPart, module_calls
from .fuse_hand_written import FusionPlan, fuse_plan
from .report import Action, Entry

__all__ = ["MatchesOutcome", "collapse_matches"]


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


def _outside_use(match: BranchSum, scope: Scope, part: TracedPart, owners: Sequence,
                 calls: Dict[str, int]) -> Optional[str]:
    """Why the block, or a module inside it, is used other than by the block's calls module(x)."""
    block_calls = len(part.call_forms.get(scope.module, ())) if scope.module else 1
    reason = part.use_reason(scope.module, owners) if scope.module else None
    if reason:
        return f"the block is {reason}" if reason.startswith("called") else reason
    for node in sorted(match.nodes, key=lambda n: n.name):
        if node.op != "call_module":
            continue
        name = part.qualify(node.target)
        if calls[node.target] != block_calls:
            return f"{name} is also called outside the block; fusing it away would break that call"
        reason = part.use_reason(node.target, owners)
        if reason:
            return f"{name}: {reason}"
    return None


def _in_train_mode(match: BranchSum, block: nn.Module, modules: Dict[str, nn.Module]) -> bool:
    """The block or a module of the match is in train mode: its eval function is what gets fused."""
    return block.training or any(modules[n.target].training for n in match.nodes if n.op == "call_module")


@dataclasses.dataclass(frozen=True)
class MatchesOutcome:
    """What collapse does with the branch sums of one traced part."""

    # The fused convs for hand-written blocks that are whole modules, by qualified name.
    replacements: Dict[str, nn.Module]
    entries: Tuple[Entry, ...]
    # Blocks left because of hooks (one warning), fused blocks in train mode (one warning).
    hooked: Tuple[str, ...]
    in_train_mode: Tuple[str, ...]
    # ACBlocks whose recorded layout the graph confirmed.
    checked: FrozenSet[str]


def collapse_matches(part: TracedPart, traced: TracedModel) -> MatchesOutcome:
    """Replacements for the fusable hand-written blocks of one traced part; every other match reported,
    ACBlocks checked against the graph."""
    modules = dict(part.module.named_modules())
    index = ScopeIndex(part.live, modules)
    calls = module_calls(part.graph)
    out: Dict[str, nn.Module] = {}
    entries: List[Entry] = []
    hooked: List[str] = []
    in_train_mode: List[str] = []
    checked: Set[str] = set()
    for match in find_branch_sums(part.graph, modules, part.live):
        scope = index.locate(match)
        name = part.qualify(scope.module if scope.module is not None else scope.enclosing)
        block = modules[scope.enclosing]
        if isinstance(block, ACBlock) and scope.module is not None:
            _check_own_layout(block, match, name)
            checked.add(name)
            continue
        if name in out:
            continue  # the same module called again: already fused
        hook = _inner_hooks(match, part, modules) or hook_reason(block, "the block", carries_pre=True,
                                                                 carries_forward=True)
        reason = match.reason or scope.reason or hook or _outside_use(match, scope, part, traced.owners, calls)
        fused = None
        if not reason:
            fused, reason = fuse_plan(_plan(match, scope, part, block.training))
        if fused is None:
            if reason == hook:
                hooked.append(name)
            entries.append(Entry(name, Action.SKIPPED, _describe(match, block), reason))
            continue
        carry_hooks(block, fused.conv, forward_pre=True, forward=True)  # same input, same output
        out[name] = fused.conv
        if _in_train_mode(match, block, modules):
            in_train_mode.append(name)
        notes = [f"{type(block).__name__} replaced by one {type(fused.conv).__name__}"]
        if fused.gained_bias:
            notes.append("the conv gained a bias (no BN slot after the block to hold the shift)")
        entries.append(Entry(name, Action.COLLAPSED, _describe(match, block), "; ".join(notes), True))
    return MatchesOutcome(out, tuple(entries), tuple(hooked), tuple(in_train_mode), frozenset(checked))
