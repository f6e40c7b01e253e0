"""How an expanded model meets a foreign re-parameterisation walk (timm's ``reparameterize_model``).

timm's walk goes from the top: a RepVGG / MobileOne / FastViT block re-parameterises itself first, reading
its conv child's kernel and its BN's statistics, before the walk reaches the children. Under such a block
an ACBlock would be read as if it were the conv. So expand gives every module above a site that has its
own ``fuse`` / ``reparameterize`` / ``switch_to_deploy`` a stand-in for that method (an instance attribute,
so the class is untouched): it first fuses the acfx modules beneath the module back into the original
conv and BN, then runs the module's own method, which then sees what it would see in the plain model.
"""
from __future__ import annotations

import inspect
from typing import Dict, Iterable, List

import torch.nn as nn

from ..layers.block import ACBlock, NormTail
from ..layers.cfg_links import restore_cfg
from ..layers.online import OnlineACConv
from .fuse_own import fuse_own
from .swap_modules import ModuleSwaps

__all__ = ["REPARAM_METHODS", "CollapseFirst", "guard_foreign_reparam", "remove_guards", "fuse_own_modules"]

# The methods timm's reparameterize_model duck-types on, in the order it tries them.
REPARAM_METHODS = ("fuse", "reparameterize", "switch_to_deploy")
_OWN = (ACBlock, NormTail, OnlineACConv)


class CollapseFirst:
    """Stands in for one module's own re-parameterisation method (see the module docstring)."""

    def __init__(self, module: nn.Module, method: str) -> None:
        self.module = module
        self.method = method

    def __call__(self, *args, **kwargs):
        remove_guards(self.module)
        fuse_own_modules(self.module)
        return getattr(self.module, self.method)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<acfx: fuse acfx blocks, then {type(self.module).__name__}.{self.method}>"


def _takes_no_arguments(method) -> bool:
    """A re-parameterisation method is called bare (``module.fuse()``); a method of that name that needs
    arguments is something else (a helper its forward calls) and keeps running as written."""
    try:
        inspect.signature(method).bind(None)  # unbound: ``self`` only
    except TypeError:
        return False
    except ValueError:  # no signature to read: a builtin, not a Python re-parameterisation method
        return False
    return True


def _guardable(module: nn.Module) -> List[str]:
    if isinstance(module, _OWN):
        return []
    return [name for name in REPARAM_METHODS
            if callable(getattr(type(module), name, None)) and _takes_no_arguments(getattr(type(module), name))]


def guard_foreign_reparam(root: nn.Module, replaced: Iterable[str]) -> None:
    """Give each module above a replaced name that re-parameterises itself a :class:`CollapseFirst`."""
    ancestors = set()
    for name in replaced:
        parts = name.split(".") if name else []
        ancestors.update(".".join(parts[:i]) for i in range(len(parts)))
    for name in sorted(ancestors):
        module = root.get_submodule(name) if name else root
        for method in _guardable(module):
            module.__dict__[method] = CollapseFirst(module, method)


def remove_guards(root: nn.Module) -> None:
    """Remove every :class:`CollapseFirst` under ``root`` (the model no longer holds acfx modules)."""
    for module in root.modules():
        for method in REPARAM_METHODS:
            if isinstance(module.__dict__.get(method), CollapseFirst):
                del module.__dict__[method]


def fuse_own_modules(root: nn.Module) -> None:
    """Fuse every acfx module under ``root`` in place, all or nothing (a block with a hook inside stops it:
    the module's own method would then read an ACBlock as its conv)."""
    owns = fuse_own(root)
    replacements: Dict[str, nn.Module] = {}
    for own in owns:
        if own.skip:
            raise ValueError(f"acfx: cannot fuse '{own.name}' before {type(root).__name__}'s own re-parameterisation: "
                             f"{own.skip}")
        replacements.update(own.replacements)
    swaps = ModuleSwaps(root)
    try:
        swaps.apply(replacements)
    except BaseException:
        swaps.undo()
        raise
    for own in owns:
        restore_cfg(own.module)
