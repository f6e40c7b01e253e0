"""The options of :func:`acfx.expand`: one typed record, validated once.

The record is what every place that offers the options derives from: the verb's ``**overrides``, the
command line's flags, the timm plug-in's ``acb_*`` keywords and the README's table (tests/test_options.py
checks the last against it). A choice is a ``Literal`` type; its values are read off the type.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type, Union

import torch.nn as nn

from ..layers.recipe import MAX_BRANCHES, RECIPES, Recipe
from .policies import FilterFn

__all__ = ["ExpandOptions", "FilterFn", "Init", "Branches", "Norm", "Mode", "Placement", "RecipeName", "GammaInit",
           "check_leaf_modules"]

Init = Literal["scratch", "preserve"]
Branches = Literal["both", "hor", "ver"]
Norm = Literal["branch", "sum"]
Mode = Literal["exact", "online"]
Placement = Literal["centre", "border"]
# Which branches a block sums, by name (acfx.layers.recipe.RECIPES; an acfx.Recipe record for any other).
RecipeName = Literal["acb", "repvgg", "acb+repvgg", "dbb", "acb+dbb", "mobileone"]
# γ of every branch BN as a number, or "balanced": 1 / the block's number of branches (a block then starts at
# the scale of one conv however many branches its recipe sums).
GammaInit = Union[float, Literal["balanced"]]


def _option(default, help: str = "", structural: bool = False, timm: bool = True):
    """A field of :class:`ExpandOptions` with what every place that offers it needs to know.

    ``structural``: the option changes which modules and tensors the expanded model has (a checkpoint must be
    converted with the value it was trained with; the command line offers it). ``timm``: offered as an
    ``acb_<name>`` keyword by the timm plug-in.
    """
    return dataclasses.field(default=default, metadata=dict(help=help, structural=structural, timm=timm))


@dataclasses.dataclass(frozen=True)
class ExpandOptions:
    """How expand builds each ACB. See :func:`acfx.expand` for what each option means.

    ``acfx.expand(model, ExpandOptions(placement="border"), init="preserve")``: a record, and keywords that
    override its fields. Every value is checked when the record is built.
    """

    init: Init = _option("scratch", "new branches as nn.Conv2d initialises them, BN γ=1, β=0; "
                         "or function-preserving (new BN γ=β=0)")
    branches: Branches = _option("both", "which asymmetric branches (the paper's Table 4)", structural=True)
    norm: Optional[Norm] = _option(None, "exact mode: one BN per branch (the default), or the original BN after the "
                                   "sum of the three convs", structural=True)
    mode: Mode = _option("exact", "the paper's ACB, or online re-parameterisation", structural=True)
    placement: Placement = _option("centre", "asymmetric kernels on the centre row/column (the skeleton), or on "
                                   "the bottom row / right column (the paper's ablation)", structural=True)
    recipe: Union[RecipeName, Recipe] = _option(
        "acb", "the branches of each block: ACNet's 1×k and k×1; RepVGG's 1×1 and identity BN (where in/out channels "
        "match and the stride is 1); DBB's 1×1, 1×1→k×k and 1×1→average (average where the conv has no dilation); "
        "MobileOne's k×k branches, 1×1 and identity BN; '+' two in one block; or an acfx.Recipe", structural=True)
    kxk_branches: Optional[int] = _option(None, f"k×k conv→BN branches per block, the conv's own included (1 to "
                                          f"{MAX_BRANCHES}; default: the recipe's, mobileone 4, the others 1)",
                                          structural=True)
    gamma_init: Optional[GammaInit] = _option(None, "initial γ of every branch BN with init='scratch': a number, or "
                                              "'balanced' (1/the block's number of branches)")
    include_unnormed: bool = _option(False, "also expand k×k convs that no BN follows (the collapsed conv gains a "
                                     "bias)", structural=True)
    filter_fn: Optional[FilterFn] = _option(None, "filter_fn(module, name) -> bool: expand only the convs it accepts",
                                            timm=False)
    leaf_modules: Sequence[Type[nn.Module]] = _option((), "module classes fx must not trace into", timm=False)

    @classmethod
    def fields(cls, structural: Optional[bool] = None, timm: Optional[bool] = None) -> List[dataclasses.Field]:
        """The option fields, in order, filtered by their ``structural`` / ``timm`` metadata when asked."""
        return [f for f in dataclasses.fields(cls)
                if (structural is None or f.metadata["structural"] == structural)
                and (timm is None or f.metadata["timm"] == timm)]

    @classmethod
    def choices(cls, name: str) -> Tuple[Any, ...]:
        """The values an option takes, read off its ``Literal`` type (empty for an option that is not a choice)."""
        hint = typing.get_type_hints(cls)[name]
        if typing.get_origin(hint) is typing.Union:  # Optional[Literal[...]]
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()

    @classmethod
    def value_type(cls, name: str) -> type:
        """The plain type of an option that is not a choice (``Optional[int]``: int)."""
        hint = typing.get_type_hints(cls)[name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint

    @classmethod
    def resolve(cls, options: Optional["ExpandOptions"], overrides: Mapping[str, object], verb: str = "expand"
                ) -> "ExpandOptions":
        """``options`` (or the defaults) with ``overrides`` applied, checked; a TypeError names an unknown key."""
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"acfx.{verb}: options must be an acfx.ExpandOptions, got {type(options).__name__} (pass "
                            "options as keywords: acfx.expand(model, init='preserve'))")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in overrides if key not in names]
        if unknown:
            raise TypeError(f"acfx.{verb}: unknown option {unknown[0]!r}; the options are {names}")
        base = options if options is not None else cls()
        values: Dict[str, object] = {name: getattr(base, name) for name in names}
        if "mode" in overrides and "norm" not in overrides and base.norm == "branch" and overrides["mode"] == "online":
            values["norm"] = None  # the default the record filled in for exact mode, not a choice of the user's
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        if self.mode == "online" and self.norm is not None:
            raise ValueError(f"acfx.expand: mode='online' has no branch BNs (one BN after the merged conv), so "
                             f"norm={self.norm!r} does not apply; drop norm= or use mode='exact'")
        if self.norm is None and self.mode == "exact":
            object.__setattr__(self, "norm", "branch")
        for field in dataclasses.fields(self):
            allowed = self.choices(field.name)
            value = getattr(self, field.name)
            if isinstance(value, Recipe) and field.name == "recipe":
                continue
            if allowed and not (value is None and field.name == "norm") and value not in allowed:
                more = (": compose others with '+' on acfx.RECIPES, e.g. acfx.RECIPES['acb'] + acfx.RECIPES['mobileone'], "
                        "or define one with acfx.Recipe(name, branches)" if field.name == "recipe" else "")
                raise ValueError(f"acfx.expand: {field.name}={value!r} is not one of {allowed}{more}")
        self._check_recipe()
        if self.gamma_init is not None:
            self._check_gamma()
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"acfx.expand: filter_fn must be callable (module, name) -> bool, got "
                            f"{type(self.filter_fn).__name__}")
        if not isinstance(self.include_unnormed, bool):
            raise TypeError(f"acfx.expand: include_unnormed must be True or False, got {self.include_unnormed!r}")
        object.__setattr__(self, "leaf_modules", check_leaf_modules(self.leaf_modules))

    def branch_gamma(self, branches: int) -> Optional[float]:
        """The γ of a block's branch BNs as a number (None: the BN defaults), for a block of ``branches``."""
        return 1.0 / branches if self.gamma_init == "balanced" else self.gamma_init

    def resolved_recipe(self) -> Recipe:
        """The recipe as a record, with ``kxk_branches`` applied."""
        recipe = self.recipe if isinstance(self.recipe, Recipe) else RECIPES[self.recipe]
        return recipe if self.kxk_branches is None else recipe.with_kxk_branches(self.kxk_branches)

    def _check_recipe(self) -> None:
        if self.kxk_branches is not None and (isinstance(self.kxk_branches, bool) or not isinstance(
                self.kxk_branches, numbers.Integral) or not 1 <= self.kxk_branches <= MAX_BRANCHES):
            raise ValueError(f"acfx.expand: kxk_branches must be an integer from 1 to {MAX_BRANCHES}, got "
                             f"{self.kxk_branches!r}")
        recipe = self.resolved_recipe()
        if "identity" in recipe.branches and self.norm == "sum" and self.init == "preserve":
            raise ValueError(f"acfx.expand: recipe={recipe.name!r} with norm='sum' adds the input itself (its identity "
                             "branch has no BN to start at zero), so init='preserve' cannot keep the function; use "
                             "norm='branch' or init='scratch'")
        if self.branches != "both" and not recipe.asymmetric:
            raise ValueError(f"acfx.expand: branches={self.branches!r} chooses ACNet's asymmetric branches, which "
                             f"recipe={recipe.name!r} does not have; add 'acb' to the recipe ('acb+{recipe.name}', or "
                             "acfx.RECIPES['acb'] + your recipe) to combine them")

    def _check_gamma(self) -> None:
        if self.gamma_init != "balanced":
            if isinstance(self.gamma_init, bool) or not isinstance(self.gamma_init, numbers.Real):
                raise TypeError(f"acfx.expand: gamma_init must be a number (e.g. 1/3) or 'balanced', got "
                                f"{self.gamma_init!r} ({type(self.gamma_init).__name__})")
            if not math.isfinite(float(self.gamma_init)):
                raise ValueError(f"acfx.expand: gamma_init must be finite, got {self.gamma_init!r}")
            object.__setattr__(self, "gamma_init", float(self.gamma_init))
        if self.init == "preserve":
            raise ValueError("acfx.expand: gamma_init changes the BN scales, so the expanded model would not "
                             "compute the original function; use it with init='scratch' or drop it")
        if self.norm == "sum" and self.mode == "exact":
            raise ValueError("acfx.expand: gamma_init sets the branch BN scales, but norm='sum' has no branch "
                             "BNs; use norm='branch' or drop gamma_init")


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
