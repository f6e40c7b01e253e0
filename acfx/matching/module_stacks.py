"""The module calls whose forward ran a node, as torch.fx records them (``nn_module_stack``), outermost first:
what decides which block a node belongs to."""
from __future__ import annotations

from typing import List, Sequence, TypeVar

import torch.fx as fx

__all__ = ["call_keys", "common_prefix"]

T = TypeVar("T")


def call_keys(node: fx.Node) -> List[str]:
    """The call keys of the module calls that ran ``node``, outermost first."""
    return list(node.meta.get("nn_module_stack", {}))


def common_prefix(stacks: Sequence[Sequence[T]]) -> List[T]:
    """The longest start all ``stacks`` share: the innermost module call that ran every one of their nodes."""
    prefix = list(stacks[0])
    for stack in stacks[1:]:
        n = 0
        while n < min(len(prefix), len(stack)) and prefix[n] == stack[n]:
            n += 1
        prefix = prefix[:n]
    return prefix
