"""Swap modules into a model by qualified name, all or nothing."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch.nn as nn

__all__ = ["ModuleSwaps"]


def _parent(root: nn.Module, name: str) -> Tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


class ModuleSwaps:
    """Records every swap made in ``root`` so that all of them can be undone if a later step fails."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._done: List[Tuple[nn.Module, str, nn.Module]] = []

    def apply(self, replacements: Dict[str, nn.Module]) -> nn.Module:
        """Put each module of ``replacements`` at its qualified name; return the (possibly new) root.

        The name "" replaces the root itself: the new module becomes the root. Outer modules are swapped
        before the modules inside them (a rewritten block holds children that are swapped too).
        """
        if "" in replacements:
            self.root = replacements[""]
            return self.root
        for name, new in sorted(replacements.items(), key=lambda item: item[0].count(".")):
            parent, child = _parent(self.root, name)
            old = getattr(parent, child)
            setattr(parent, child, new)
            self._done.append((parent, child, old))
        return self.root

    def undo(self) -> None:
        for parent, child, old in reversed(self._done):
            setattr(parent, child, old)
        self._done.clear()
