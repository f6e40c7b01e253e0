"""The options of :func:`acfx.expand`, validated once."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import List, Optional, Sequence, Tuple, Type

import torch.nn as nn

from .policies import FilterFn

__all__ = ["ExpandOptions", "FilterFn", "check_leaf_modules"]

def _option(default, choices: Tuple = (), help: str = "", structural: bool = False, timm: bool = True):
    """A field of :class:`ExpandOptions` with what every place that offers it needs to know.

    ``structural``: the option changes which modules and tensors the expanded model has (a checkpoint must be
    converted with the value it was trained with; the command line offers it). ``timm``: offered as an
    ``acb_<name>`` keyword by the timm plug-in.
    """
    return dataclasses.field(default=default, metadata=dict(choices=tuple(choices), help=help,
                                                            structural=structural, timm=timm))


@dataclasses.dataclass(frozen=True)
class ExpandOptions:
    """How expand builds each ACB: the one record of expand's options. :func:`acfx.expand`'s signature,
    the command line's flags, the timm plug-in's ``acb_*`` keywords and the README's table are derived from
    (or tested against) its fields. See :func:`acfx.expand` for what each one means."""

    init: str = _option("scratch", ("scratch", "preserve"),
                        "new branches as nn.Conv2d initialises them, BN γ=1, β=0; "
                        "or function-preserving (new BN γ=β=0)")
    branches: str = _option("both", ("both", "hor", "ver"), "which asymmetric branches (the paper's Table 4)",
                            structural=True)
    norm: Optional[str] = _option(None, ("branch", "sum"), "exact mode: one BN per branch (the default), or the "
                                  "original BN after the sum of the three convs", structural=True)
    mode: str = _option("exact", ("exact", "online"), "the paper's ACB, or online re-parameterisation",
                        structural=True)
    placement: str = _option("centre", ("centre", "border"), "asymmetric kernels on the centre row/column (the "
                             "skeleton), or on the bottom row / right column (the paper's ablation)", structural=True)
    gamma_init: Optional[float] = _option(None, help="initial γ of all three branch BNs with init='scratch'")
    include_unnormed: bool = _option(False, help="also expand k×k convs that no BN follows (the collapsed conv "
                                     "gains a bias)", structural=True)
    filter_fn: Optional[FilterFn] = _option(None, help="filter_fn(module, name) -> bool: expand only the convs it "
                                            "accepts", timm=False)
    leaf_modules: Sequence[Type[nn.Module]] = _option((), help="module classes fx must not trace into", timm=False)

    @classmethod
    def fields(cls, structural: Optional[bool] = None, timm: Optional[bool] = None) -> List[dataclasses.Field]:
        """The option fields, in order, filtered by their ``structural`` / ``timm`` metadata when asked."""
        return [f for f in dataclasses.fields(cls)
                if (structural is None or f.metadata["structural"] == structural)
                and (timm is None or f.metadata["timm"] == timm)]

    def kwargs(self) -> dict:
        """The options as :func:`acfx.expand` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __post_init__(self) -> None:
        if self.mode == "online" and self.norm is not None:
            raise ValueError(f"acfx.expand: mode='online' has no branch BNs (one BN after the merged conv), so "
                             f"norm={self.norm!r} does not apply; drop norm= or use mode='exact'")
        if self.norm is None and self.mode == "exact":
            object.__setattr__(self, "norm", "branch")
        for field in dataclasses.fields(self):
            allowed = field.metadata["choices"]
            if not allowed or (field.name == "norm" and self.mode == "online"):
                continue
            value = getattr(self, field.name)
            if value not in allowed:
                raise ValueError(f"acfx.expand: {field.name}={value!r} is not one of {allowed}")
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
