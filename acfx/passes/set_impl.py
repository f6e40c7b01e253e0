"""acfx.set_exact_impl: choose how every ACBlock of a model computes its forward."""
from __future__ import annotations

from typing import Dict

import torch.nn as nn

from ..layers.block import ACBlock
from ..layers.forwards import EXACT_IMPLS, unsupported_reason
from .arguments import check_model

__all__ = ["set_exact_impl"]


def set_exact_impl(model: nn.Module, impl: str) -> Dict[str, str]:
    """Choose how every ACBlock of ``model`` computes its forward; the mathematics stay the same.

    * ``"branches"`` (default): the reference, three convs and three BNs, summed.
    * ``"stacked"``: one conv over the three kernels stacked, one BN, one sum (:mod:`acfx.layers.stacked`).
    * ``"recompute"``: the branches, each conv→BN keeping only its input for backward and recomputing the
      conv output there (:mod:`acfx.layers.recompute`): less activation memory for one more conv forward.

    Parameters, state_dict and collapse are the same either way. Returns the blocks that do not use
    ``impl`` as they are now, with the reason (e.g. SyncBatchNorm branches, ``norm="sum"``; ``"recompute"``
    applies in training mode only, the branch forward runs in eval). Raises ``ValueError`` for an unknown
    ``impl`` or a model without ACBlocks.
    """
    check_model(model, "set_exact_impl")
    if impl not in EXACT_IMPLS:
        raise ValueError(f"acfx.set_exact_impl: impl must be one of {EXACT_IMPLS}, got {impl!r}")
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, ACBlock)}
    if not blocks:
        raise ValueError(f"acfx.set_exact_impl: {type(model).__name__} has no ACBlock: call acfx.expand(model) "
                         "first (online-mode models have one conv per site and nothing to choose)")
    kept: Dict[str, str] = {}
    for name, block in blocks.items():
        block.impl = impl
        reason = unsupported_reason(block, impl)
        if reason is not None:
            kept[name] = reason
    return kept
