"""The forwards an ACBlock can compute its output with: the registry of exact implementations.

Every implementation computes the same mathematics as the branch forward (the reference) and keeps the
same parameters and state_dict, so collapse and checkpoints do not care which one trained a model.
:func:`acfx.set_exact_impl` chooses one per block.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import torch
import torch.nn as nn

from .recompute import recompute_forward, recompute_unsupported
from .stacked import stacked_forward, stacked_unsupported

__all__ = ["EXACT_IMPLS", "ExactImpl", "alternative_forward", "unsupported_reason"]


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


def unsupported_reason(block: nn.Module, impl: str) -> Optional[str]:
    """Why ``block`` cannot use ``impl`` as it is now (None: it can, or ``impl`` is the branch forward)."""
    chosen = _REGISTRY[impl]
    return chosen.unsupported(block) if chosen is not None else None
