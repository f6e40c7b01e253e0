"""Copies of a module's kind and configuration, refilled with new tensors."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["hollow_copy", "refill_conv", "copy_modes"]


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def hollow_copy(module: nn.Module) -> nn.Module:
    """An independent copy of ``module`` with no parameters, buffers, children or hooks (its kind and config).

    Hooks belong to the user's module object: a template that kept copies of them would bring back, when the
    module is rebuilt from it, a hook the user has since removed.
    """
    shallow = copy.copy(module)
    shallow._modules, shallow._parameters, shallow._buffers = {}, {}, {}
    for name in _HOOK_DICTS:
        if name in shallow.__dict__:
            setattr(shallow, name, OrderedDict())
    group = getattr(module, "process_group", None)  # process groups are shared, never copied
    return copy.deepcopy(shallow, memo={id(group): group})


def refill_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: Optional[torch.Tensor],
                requires_grad: Optional[bool] = None, training: Optional[bool] = None) -> nn.Conv2d:
    """A conv of ``conv``'s class and configuration holding ``weight`` and ``bias`` (None: no bias).

    ``requires_grad`` and ``training`` default to ``conv``'s (a template without tensors must pass them).
    """
    new = hollow_copy(conv)
    requires_grad = conv.weight.requires_grad if requires_grad is None else requires_grad
    new.register_parameter("weight", nn.Parameter(weight, requires_grad))
    new.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad))
    new.train(conv.training if training is None else training)
    return new


def _kind(module: nn.Module) -> type:
    """The class a module was written as (every GraphModule instance gets a class of its own)."""
    kind = type(module)  # (whose name a feature extractor may change: __qualname__ keeps it)
    return kind.__mro__[1] if kind.__qualname__.endswith("GraphModuleImpl") else kind


def copy_modes(source: nn.Module, copied: nn.Module) -> bool:
    """Give every module of ``copied`` (a deep copy of ``source``) the training flag of its original; False
    when the copy does not have the modules the source has.

    Deep copies do not always keep the mode: a GraphModule copies itself in train mode (torchvision's feature
    extractors included), whatever mode it was in.
    """
    originals = list(source.named_modules(remove_duplicate=False))
    copies = list(copied.named_modules(remove_duplicate=False))
    if len(originals) != len(copies):
        return False
    for (name, original), (copy_name, module) in zip(originals, copies):
        if name != copy_name or _kind(original) is not _kind(module):
            return False
        module.training = original.training
    return True
