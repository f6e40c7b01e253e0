"""acfx.set_exact_impl: choose how every ACBlock of a model computes its forward."""
from __future__ import annotations

from typing import Literal, Tuple, Union

import torch.nn as nn

from ..layers.block import ACBlock
from ..layers.forwards import EXACT_IMPLS, unsupported_reason
from .arguments import check_flags, check_model, working_copy
from .report import Action, Entry, Report

# How an ACBlock computes its forward (acfx.layers.forwards' registry).
ExactImpl = Literal["branches", "stacked", "recompute"]

__all__ = ["set_exact_impl", "ExactImpl"]


def set_exact_impl(model: nn.Module, impl: ExactImpl, *, inplace: bool = True, return_report: bool = False
                   ) -> Union[nn.Module, Tuple[nn.Module, Report]]:
    """Choose how every ACBlock of ``model`` computes its forward; the mathematics stay the same.

    * ``"branches"`` (default): the reference, three convs and three BNs, summed.
    * ``"stacked"``: one conv over the three kernels stacked, one BN, one sum (:mod:`acfx.layers.stacked`).
    * ``"recompute"``: the branches, each conv→BN keeping only its input for backward and recomputing the
      conv output there (:mod:`acfx.layers.recompute`): less activation memory for one more conv forward.

    Parameters, state_dict and collapse are the same either way. Blocks that cannot use ``impl`` as they are
    now keep the branch forward; the report (``return_report=True``) gives each block and, for those, the
    reason (e.g. SyncBatchNorm branches, ``norm="sum"``; ``"recompute"`` applies in training mode only, the
    branch forward runs in eval). ``inplace``: change ``model`` itself (the default, as before acfx 0.3) or,
    with ``inplace=False``, a deep copy. Returns the model. Raises ``ValueError`` for an unknown ``impl`` or a
    model without ACBlocks.
    """
    check_model(model, "set_exact_impl")
    check_flags("set_exact_impl", inplace=inplace, return_report=return_report)
    if impl not in EXACT_IMPLS:
        raise ValueError(f"acfx.set_exact_impl: impl must be one of {EXACT_IMPLS}, got {impl!r}")
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, ACBlock)}
    if not blocks:
        raise ValueError(f"acfx.set_exact_impl: {type(model).__name__} has no ACBlock: call acfx.expand(model) "
                         "first (online-mode models have one conv per site and nothing to choose)")
    model = working_copy(model, inplace, "set_exact_impl")
    entries = []
    for name, block in model.named_modules():
        if not isinstance(block, ACBlock):
            continue
        block.impl = impl
        reason = unsupported_reason(block, impl)
        what = f"ACBlock forward: {impl}"
        entries.append(Entry(name, Action.SKIPPED, what, f"keeps the branch forward: {reason}") if reason is not None
                       else Entry(name, Action.SWITCHED, what))
    report = Report.from_entries("set_exact_impl", entries)
    return (model, report) if return_report else model
