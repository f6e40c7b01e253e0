"""The conv kinds acfx knows the computation of, and why any other conv is left alone.

A re-parameterisation is exact only if acfx knows what the conv computes. That is the case for an
nn.Conv2d (or a subclass) that runs nn.Conv2d's own ``forward`` and ``_conv_forward`` on plain
``weight``/``bias`` parameters, and for timm's Conv2dSame (TF-style 'same' padding computed from the
input size). A subclass that overrides either method (weight standardisation, hand-made padding), a
parametrized conv, or any other conv-like module is reported with the reason and never rewritten.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Conv2dSame as _Conv2dSame
from torch.nn.utils import parametrize

from .split_conv import EvenSplitConv2d

__all__ = ["PLAIN", "SAME", "conv_kind", "instance_override", "extra_state", "unknown_conv_reason", "is_dynamic_same",
           "is_plain_conv1d", "other_conv_reason", "kernel_of"]

PLAIN = "conv2d"  # nn.Conv2d's computation: static padding, any padding mode
SAME = "conv2d_same"  # timm's Conv2dSame: TF 'same' padding from the input size, then a conv with padding 0


def _plain_parameters(module: nn.Module) -> bool:
    """weight (and bias, if any) are the module's own registered tensors, not computed on access."""
    if parametrize.is_parametrized(module):
        return False
    return "weight" in module._parameters and "bias" in module._parameters


def instance_override(module: nn.Module, methods=("forward", "_conv_forward")) -> Optional[str]:
    """The name of a method replaced on this module object (monkeypatching, accelerate-style hooks), if any:
    the class's code is then not what runs."""
    return next((name for name in methods if name in module.__dict__), None)


def extra_state(module: nn.Module, parameters=("weight", "bias"), buffers=(), children=()) -> list:
    """Parameters, buffers and children ``module`` holds beyond those of its kind: a rebuilt module would
    drop them, and what the module does with them is unknown."""
    return ([n for n in module._parameters if n not in parameters] + [n for n in module._buffers if n not in buffers]
            + [n for n in module._modules if n not in children])


def conv_kind(module: nn.Module) -> Optional[str]:
    """``PLAIN`` or ``SAME`` when acfx knows what ``module`` computes; None otherwise."""
    if not isinstance(module, nn.Conv2d) or not _plain_parameters(module):
        return None
    if instance_override(module) or extra_state(module):
        return None
    kind = type(module)
    if isinstance(module, _Conv2dSame):
        return SAME if kind.forward is _Conv2dSame.forward else None
    if kind.forward is nn.Conv2d.forward and kind._conv_forward is nn.Conv2d._conv_forward:
        return PLAIN
    return None


def is_plain_conv1d(module: nn.Module) -> bool:
    """An nn.Conv1d computing nn.Conv1d's own forward on plain parameters: collapse reads it as a 2-d conv of
    height 1 (the algebra is 2-d) and writes the fused map back as an nn.Conv1d."""
    kind = type(module)
    return (isinstance(module, nn.Conv1d) and _plain_parameters(module) and not instance_override(module)
            and not extra_state(module) and kind.forward is nn.Conv1d.forward
            and kind._conv_forward is nn.Conv1d._conv_forward)


def is_dynamic_same(module: nn.Module) -> bool:
    """timm's Conv2dSame (or a subclass computing the same): its padding is computed at run time."""
    return conv_kind(module) == SAME


def unknown_conv_reason(module: nn.Module) -> Optional[str]:
    """Why acfx cannot rewrite this nn.Conv2d (None: it can)."""
    if conv_kind(module) is not None:
        return None
    name = type(module).__name__
    if parametrize.is_parametrized(module):
        return (f"conv {name} is parametrized (torch.nn.utils.parametrize): its weight is computed on access; "
                "remove the parametrization (parametrize.remove_parametrizations) to expand it")
    if not _plain_parameters(module):
        return f"conv {name} does not hold its weight as a registered parameter"
    replaced = instance_override(module)
    if replaced:
        return (f"conv {name} has its {replaced} replaced on the instance, so acfx does not know what it computes; "
                "restore the class's method to rewrite it")
    extra = extra_state(module)
    if extra:
        return (f"conv {name} holds {extra} beyond a conv's weight and bias: the rewrite would drop them and "
                "acfx does not know what they do")
    overridden = [m for m in ("forward", "_conv_forward") if getattr(type(module), m) is not getattr(nn.Conv2d, m)]
    return (f"conv type {name} is not supported: it overrides {' and '.join(overridden) or 'its forward'}, so acfx "
            "does not know what it computes (it handles nn.Conv2d's own forward and timm's Conv2dSame)")


_OTHER_CONVS = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def other_conv_reason(module: nn.Module, conv1d: bool = False) -> Optional[str]:
    """The reason a conv the pass does not handle is skipped (Conv3d, transposed convs, and Conv1d unless the
    pass fuses it: ``conv1d``, as collapse and fold_bn do); None for others."""
    if not isinstance(module, _OTHER_CONVS) or conv1d and type(module) is nn.Conv1d:
        return None
    if conv1d:
        return (f"{type(module).__name__} is neither a 1-d nor a 2-d convolution: this pass handles nn.Conv2d, timm's "
                "Conv2dSame and nn.Conv1d only")
    return f"{type(module).__name__} is not a 2-d convolution: acfx expand rewrites nn.Conv2d (and timm's Conv2dSame) only"


def kernel_of(conv: nn.Module) -> torch.Tensor:
    """The kernel a conv acfx built or knows convolves with: its weight, or the 2-line kernel of an
    EvenSplitConv2d ([C_out, C_in/groups, h, w])."""
    effective = getattr(conv, "effective_weight", None)
    return effective() if isinstance(conv, EvenSplitConv2d) else conv.weight
