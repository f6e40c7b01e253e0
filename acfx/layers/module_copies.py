"""Copies of a module's kind and configuration, refilled with new tensors."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["hollow_copy", "refill_conv"]


def hollow_copy(module: nn.Module) -> nn.Module:
    """An independent copy of ``module`` with no parameters, buffers or children (its kind and config)."""
    shallow = copy.copy(module)
    shallow._modules, shallow._parameters, shallow._buffers = {}, {}, {}
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
