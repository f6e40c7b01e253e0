"""Recipes: which branches a block sums beside the conv's own k×k conv→BN, as data.

A recipe is a tuple of branch kinds. Each kind is a sub-network that is linear in eval mode and reads the
same sliding window as the k×k conv, so every recipe collapses into that conv exactly:

========== ======================================================= =============================================
kind       branch                                                  where it applies
========== ======================================================= =============================================
square     another k×k conv → BN (MobileOne's k branches)          every conv
hor, ver   1×k / k×1 conv → BN on the centre row / column (ACNet)  every conv (``branches=`` chooses)
point      1×1 conv → BN on the centre tap (RepVGG, MobileOne)     every conv
identity   a BN of the input itself (RepVGG, MobileOne's skip BN)  as many channels out as in, stride 1
chain      1×1 conv → BN → k×k conv → BN (DBB)                     every conv
avg        1×1 conv → BN → k×k average pooling → BN (DBB)          dilation 1 (average pooling has none)
========== ======================================================= =============================================

The built-in recipes (``RECIPES``) are written with this record too; ``a + b`` composes two, and a user
defines a new one the same way: ``acfx.Recipe("mine", ("hor", "ver", "chain"))``.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Dict, Literal, Tuple

__all__ = ["BranchKind", "BRANCH_KINDS", "Recipe", "RECIPES", "MAX_BRANCHES"]

BranchKind = Literal["square", "hor", "ver", "point", "identity", "chain", "avg"]
BRANCH_KINDS: Tuple[str, ...] = typing.get_args(BranchKind)
# Kinds of which one block holds at most one (their modules have fixed names in the state_dict).
_SINGLE = ("hor", "ver", "point", "identity", "chain", "avg")
# The most k×k branches one block holds (the conv's own included), as TorchScript's forward spells them out.
MAX_BRANCHES = 8


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The branches each block sums beside the conv's own k×k branch, in order (see the module docstring).

    ``Recipe("dbb", ("point", "chain", "avg"))``; ``RECIPES["acb"] + RECIPES["repvgg"]`` is both in one
    block. Checked when built: known kinds, each single kind at most once, at most ``MAX_BRANCHES`` k×k
    branches.
    """

    name: str
    branches: Tuple[BranchKind, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"acfx.Recipe: name must be a non-empty string, got {self.name!r}")
        if isinstance(self.branches, str) or not isinstance(self.branches, (tuple, list)):
            raise TypeError(f"acfx.Recipe {self.name!r}: branches takes a tuple of branch kinds, e.g. ('hor', 'ver'), "
                            f"got {self.branches!r}")
        kinds = tuple(self.branches)
        unknown = [k for k in kinds if k not in BRANCH_KINDS]
        if unknown:
            raise ValueError(f"acfx.Recipe {self.name!r}: unknown branch kind {unknown[0]!r}; the kinds are "
                             f"{BRANCH_KINDS}")
        repeated = sorted({k for k in kinds if k in _SINGLE and kinds.count(k) > 1})
        if repeated:
            raise ValueError(f"acfx.Recipe {self.name!r}: a block holds one {repeated[0]!r} branch at most "
                             "(only 'square' repeats)")
        if kinds.count("square") + 1 > MAX_BRANCHES:
            raise ValueError(f"acfx.Recipe {self.name!r}: at most {MAX_BRANCHES} k×k branches per block (the conv's "
                             f"own included), got {kinds.count('square') + 1}")
        object.__setattr__(self, "branches", kinds)

    def __add__(self, other: "Recipe") -> "Recipe":
        if not isinstance(other, Recipe):
            return NotImplemented
        return Recipe(f"{self.name}+{other.name}", self.branches + other.branches)

    def with_kxk_branches(self, count: int) -> "Recipe":
        """This recipe with ``count`` k×k branches in all (the conv's own included), the other kinds kept."""
        others = tuple(k for k in self.branches if k != "square")
        return Recipe(self.name, ("square",) * (count - 1) + others)

    @property
    def asymmetric(self) -> bool:
        """Whether the recipe has ACNet's 1×k / k×1 branches (which ``branches=`` chooses between)."""
        return "hor" in self.branches or "ver" in self.branches


_ACB = Recipe("acb", ("hor", "ver"))
_REPVGG = Recipe("repvgg", ("point", "identity"))
_DBB = Recipe("dbb", ("point", "chain", "avg"))

# The recipes ``recipe=`` takes by name. MobileOne: k = 4 k×k branches (its S0; ``kxk_branches=`` sets k).
RECIPES: Dict[str, Recipe] = {
    "acb": _ACB,
    "repvgg": _REPVGG,
    "acb+repvgg": _ACB + _REPVGG,
    "dbb": _DBB,
    "acb+dbb": _ACB + _DBB,
    "mobileone": Recipe("mobileone", ("square", "square", "square", "point", "identity")),
}
