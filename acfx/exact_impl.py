"""How an ACBlock computes its forward: the registry of exact implementations and the switch between them.

Every implementation computes the same mathematics as the branch forward (the reference) and keeps the
same parameters and state_dict, so collapse and checkpoints do not care which one trained a model.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch
import torch.nn as nn

from .recompute import recompute_forward, recompute_unsupported
from .stacked import stacked_forward, stacked_unsupported

__all__ = ["EXACT_IMPLS", "ExactImpl", "set_exact_impl", "alternative_forward"]


class ExactImpl(NamedTuple):
    """An alternative forward of ACBlock."""

    # Why a block cannot use it as it is now (None: it can).
    unsupported: Callable[[nn.Module], Optional[str]]
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]


# None: ACBlock's own (branch) forward.
_REGISTRY: Dict[str, Optional[ExactImpl]] = {
    "branches": None,
    "stacked": ExactImpl(stacked_unsupported, stacked_forward),
    "recompute": ExactImpl(recompute_unsupported, recompute_forward),
}
EXACT_IMPLS = tuple(_REGISTRY)


def alternative_forward(block: nn.Module) -> Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """The forward of ``block.impl`` if it applies to the block as it is now (train/eval mode included);
    None for the branch forward."""
    impl = _REGISTRY[block.impl]
    if impl is None or impl.unsupported(block) is not None:
        return None
    return impl.forward


def set_exact_impl(model: nn.Module, impl: str) -> Dict[str, str]:
    """Choose how every ACBlock of ``model`` computes its forward; the mathematics stay the same.

    * ``"branches"`` (default): the reference, three convs and three BNs, summed.
    * ``"stacked"``: one conv over the three kernels stacked, one BN, one sum (:mod:`acfx.stacked`).
    * ``"recompute"``: the branches, each conv→BN keeping only its input for backward and recomputing the
      conv output there (:mod:`acfx.recompute`): less activation memory for one more conv forward.

    Parameters, state_dict and collapse are the same either way. Returns the blocks that do not use
    ``impl`` as they are now, with the reason (e.g. SyncBatchNorm branches, ``norm="sum"``; ``"recompute"``
    applies in training mode only, the branch forward runs in eval). Raises ``ValueError`` for an unknown
    ``impl`` or a model without ACBlocks.
    """
    from .block import ACBlock  # local: block imports this module
    from ._checks import check_model

    check_model(model, "set_exact_impl")
    if impl not in _REGISTRY:
        raise ValueError(f"acfx.set_exact_impl: impl must be one of {EXACT_IMPLS}, got {impl!r}")
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, ACBlock)}
    if not blocks:
        raise ValueError(f"acfx.set_exact_impl: {type(model).__name__} has no ACBlock: call acfx.expand(model) "
                         "first (online-mode models have one conv per site and nothing to choose)")
    kept: Dict[str, str] = {}
    for name, block in blocks.items():
        block.impl = impl
        chosen = _REGISTRY[impl]
        reason = chosen.unsupported(block) if chosen is not None else None
        if reason is not None:
            kept[name] = reason
    return kept
