"""The options of :func:`acfx.expand`, validated once."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Type

import torch.nn as nn

__all__ = ["ExpandOptions", "FilterFn"]

# filter_fn(conv_module, qualified_name) -> bool: True to expand that conv.
FilterFn = Callable[[nn.Module, str], bool]

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
            if self.init == "preserve":
                raise ValueError("acfx.expand: gamma_init changes the BN scales, so the expanded model would not "
                                 "compute the original function; use it with init='scratch' or drop it")
            if self.norm == "sum" and self.mode == "exact":
                raise ValueError("acfx.expand: gamma_init sets the branch BN scales, but norm='sum' has no branch "
                                 "BNs; use norm='branch' or drop gamma_init")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"acfx.expand: filter_fn must be callable (module, name) -> bool, got "
                            f"{type(self.filter_fn).__name__}")
        for leaf in self.leaf_modules:
            if not (isinstance(leaf, type) and issubclass(leaf, nn.Module)):
                raise TypeError(f"acfx: leaf_modules must hold nn.Module classes, got {leaf!r}")
