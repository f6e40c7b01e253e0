"""acfx's own modules, fused from their own children: an ACBlock with its NormTail, an OnlineACConv.

Used by collapse for every ACBlock it meets (the graph only checks the recorded layout) and by the
stand-ins that let foreign re-parameterisation walks run (reparam_guard.py).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch.nn as nn

from ..layers.block import ACBlock, NormTail
from ..layers.fusion import fuse_pair
from ..layers.hooks import carry_hooks, hooks_of
from ..layers.online import OnlineACConv

__all__ = ["OwnFusion", "fuse_own"]


@dataclasses.dataclass
class OwnFusion:
    """One acfx module fused: what replaces it (and its NormTail), or why it stays."""

    name: str
    module: nn.Module
    what: str
    replacements: Dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    # Why the module stays as it is (a hook inside a block); None when fused.
    skip: Optional[str] = None
    # The block, a BN in it or the BN restored after it is in train mode (collapse warns: what is fused is the
    # eval function, and a BN in train mode normalises with batch statistics).
    in_train_mode: bool = False
    # The conv carries the shift as a bias it did not have (no NormTail to put a BN back in).
    gained_bias: bool = False


def _branch_kernels(branch) -> str:
    """A branch as the kernels it runs: "3x3", "1x1→3x3" (DBB's chain), "1x1→avg3x3", "identity"."""
    steps = []
    for module in branch.modules:
        size = getattr(module, "kernel_size", None)
        if size is None:
            continue
        size = (size, size) if isinstance(size, int) else size
        steps.append(("avg" if isinstance(module, nn.AvgPool2d) else "") + "x".join(map(str, size)))
    return "→".join(steps) or "identity"


def _kernels(block: ACBlock) -> str:
    sizes = "+".join(_branch_kernels(b) for b in block.branches())
    return f"ACBlock {sizes} → conv {'x'.join(map(str, block.kernel_size))}"


def _fuse_block(name: str, block: ACBlock, names: Dict[int, str]) -> OwnFusion:
    found = OwnFusion(name, block, _kernels(block))
    inner = [f"{name}.{n}" if name else n for n, m in block.named_modules() if n and hooks_of(m).any]
    if inner:
        found.skip = (f"{inner[0]} inside the block has a hook; fusing would drop it: remove the hook to collapse "
                      "this block")
        return found
    tail = block.tail()
    tail_name = names.get(id(tail)) if tail is not None else None  # a tail outside ``root`` keeps adding the shift
    conv, norm = fuse_pair(block, restore_tail=tail_name is not None, name=name)
    carry_hooks(block, conv, forward_pre=True, forward=True)  # same input; in eval, the same output
    found.replacements[name] = conv
    if norm is not None:
        carry_hooks(tail, norm, forward_pre=True, forward=True)
        found.replacements[tail_name] = norm
    found.in_train_mode = any(m.training for m in block.modules()) or (norm is not None and norm.training)
    found.gained_bias = conv.bias is not None and block.square.bias is None
    return found


def fuse_own(root: nn.Module) -> List[OwnFusion]:
    """Every ACBlock (with its NormTail, when that is in ``root`` too) and OnlineACConv under ``root``."""
    names = {id(m): n for n, m in root.named_modules()}
    found = []
    for name, module in root.named_modules():
        if isinstance(module, OnlineACConv):
            conv = module.fused_conv()
            carry_hooks(module, conv, forward_pre=True, forward=True)
            kh, kw = module.conv.kernel_size
            found.append(OwnFusion(name, module, f"OnlineACConv → {type(module.conv).__name__} {kh}x{kw}",
                                   {name: conv}))
        elif isinstance(module, ACBlock):
            found.append(_fuse_block(name, module, names))
        elif isinstance(module, NormTail) and module.block() is None:
            found.append(OwnFusion(name, module, "NormTail", skip="its block is not known (built by an older "
                                                                  "acfx): collapse the whole model"))
    return found
