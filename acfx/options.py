"""The options of :func:`acfx.expand`, validated once."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Sequence, Type

import torch.nn as nn

from .policies import FilterFn

__all__ = ["ExpandOptions", "FilterFn", "check_leaf_modules"]

_CHOICES = {
    "mode": ("exact", "online"),
    "init": ("scratch", "preserve"),
    "branches": ("both", "hor", "ver"),
    "norm": ("branch", "sum"),
    "placement": ("centre", "border"),
}


@dataclasses.dataclass(frozen=True)
class ExpandOptions:
    """How expand builds each ACB. See :func:`acfx.expand` for what each field means."""

    init: str = "scratch"
    branches: str = "both"
    norm: Optional[str] = None  # "branch" in exact mode
    mode: str = "exact"
    placement: str = "centre"
    gamma_init: Optional[float] = None
    include_unnormed: bool = False
    filter_fn: Optional[FilterFn] = None
    leaf_modules: Sequence[Type[nn.Module]] = ()

    def __post_init__(self) -> None:
        if self.mode == "online" and self.norm is not None:
            raise ValueError(f"acfx.expand: mode='online' has no branch BNs (one BN after the merged conv), so "
                             f"norm={self.norm!r} does not apply; drop norm= or use mode='exact'")
        if self.norm is None and self.mode == "exact":
            object.__setattr__(self, "norm", "branch")
        for name, allowed in _CHOICES.items():
            if name == "norm" and self.mode == "online":
                continue
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"acfx.expand: {name}={value!r} is not one of {allowed}")
        if self.gamma_init is not None:
            if isinstance(self.gamma_init, bool) or not isinstance(self.gamma_init, numbers.Real):
                raise TypeError(f"acfx.expand: gamma_init must be a number (e.g. 1/3), got {self.gamma_init!r} "
                                f"({type(self.gamma_init).__name__})")
            if not math.isfinite(float(self.gamma_init)):
                raise ValueError(f"acfx.expand: gamma_init must be finite, got {self.gamma_init!r}")
            object.__setattr__(self, "gamma_init", float(self.gamma_init))
            if self.init == "preserve":
                raise ValueError("acfx.expand: gamma_init changes the BN scales, so the expanded model would not "
                                 "compute the original function; use it with init='scratch' or drop it")
            if self.norm == "sum" and self.mode == "exact":
                raise ValueError("acfx.expand: gamma_init sets the branch BN scales, but norm='sum' has no branch "
                                 "BNs; use norm='branch' or drop gamma_init")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"acfx.expand: filter_fn must be callable (module, name) -> bool, got "
                            f"{type(self.filter_fn).__name__}")
        object.__setattr__(self, "leaf_modules", check_leaf_modules(self.leaf_modules))


def check_leaf_modules(leaf_modules: object) -> tuple:
    """``leaf_modules`` as a tuple of nn.Module classes, or a TypeError that says how to write it."""
    if isinstance(leaf_modules, type) or isinstance(leaf_modules, (str, bytes)):
        raise TypeError(f"acfx: leaf_modules takes a sequence of nn.Module classes, e.g. leaf_modules=(MyBlock,); "
                        f"got {leaf_modules!r} itself")
    try:
        leaves = tuple(leaf_modules)
    except TypeError:
        raise TypeError(f"acfx: leaf_modules takes a sequence of nn.Module classes, got {leaf_modules!r}") from None
    for leaf in leaves:
        if not (isinstance(leaf, type) and issubclass(leaf, nn.Module)):
            raise TypeError(f"acfx: leaf_modules must hold nn.Module classes, got {leaf!r}")
    return leaves
