"""Turn frozen BatchNorms (torchvision's and timm's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d) into
trainable ones holding the same statistics, so that the convs before them can be expanded.

Detection and segmentation backbones built with pretrained weights use frozen BNs: their statistics
cannot become per-branch batch statistics, so expand leaves those sites alone. Unfreezing first is the
way to train such a model as an ACNet (fine-tune with the BNs in train mode, or keep them in eval).
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d
from torchvision.ops.misc import FrozenBatchNorm2d

from ..layers.convs import instance_override
from ..layers.hooks import hooks_of
from .arguments import check_flags, check_model, working_copy
from .report import Action, Entry, Report

__all__ = ["unfreeze_batch_norm"]


# The frozen BN kinds: torchvision's (which timm's freeze_batch_norm_2d also builds) and timm's norm-act one.
_FROZEN = (FrozenBatchNorm2d, FrozenBatchNormAct2d)


def _unfrozen(frozen: nn.Module) -> nn.Module:
    """A trainable BN of the same statistics (BatchNormAct2d keeping drop/act for a norm-act layer)."""
    weight = frozen.weight
    kwargs = dict(eps=frozen.eps, device=weight.device, dtype=weight.dtype)
    if hasattr(frozen, "act"):
        new = BatchNormAct2d(weight.numel(), apply_act=False, **kwargs)
        new.drop, new.act = frozen.drop, frozen.act
    else:
        new = nn.BatchNorm2d(weight.numel(), **kwargs)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).copy_(getattr(frozen, name))
    new.train(frozen.training)
    return new


def _left_reason(frozen: nn.Module, kinds) -> Optional[str]:
    """Why this frozen BN is not replaced (None: it is): a subclass or a replaced forward computes something
    acfx does not know, and hooks would be dropped with the module."""
    if type(frozen) not in kinds:
        return f"{type(frozen).__name__} subclasses a frozen BN"
    if instance_override(frozen, ("forward",)):
        return "its forward is replaced on the instance"
    if hooks_of(frozen).any:
        return f"it has a {' and a '.join(hooks_of(frozen).kinds())}"
    return None


def unfreeze_batch_norm(model: nn.Module, *, inplace: bool = True, return_report: bool = False
                        ) -> Union[nn.Module, Tuple[nn.Module, Report]]:
    """Replace every frozen BatchNorm of ``model`` by a trainable nn.BatchNorm2d (timm BatchNormAct2d for
    FrozenBatchNormAct2d) with the same affine parameters and running statistics.

    In eval mode the model computes exactly what it computed. A frozen BN whose computation acfx does not
    know (a subclass, a forward replaced on the instance) or that has hooks is left as it is, with a warning
    (expand then skips the conv before it) and its reason in the report.

    Args:
        inplace: change ``model`` itself (the default, as before acfx 0.3) or, with ``inplace=False``, a deep copy.
        return_report: also return a :class:`~acfx.Report`: each frozen BN unfrozen, or left and why.

    Returns the model (a new BN if ``model`` is itself a frozen BN).

    Example::

        >>> detector = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        ...     weights_backbone="DEFAULT", trainable_backbone_layers=5)
        >>> acnet = acfx.expand(acfx.unfreeze_batch_norm(detector))
    """
    check_model(model, "unfreeze_batch_norm")
    check_flags("unfreeze_batch_norm", inplace=inplace, return_report=return_report)
    model = working_copy(model, inplace, "unfreeze_batch_norm")
    entries = []
    if isinstance(model, _FROZEN):
        entry = _entry("", model)
        entries.append(entry)
        model = model if entry.action == Action.SKIPPED else _unfrozen(model)
    else:
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, _FROZEN):
                    entry = _entry(f"{name + '.' if name else ''}{child_name}", child)
                    entries.append(entry)
                    if entry.action != Action.SKIPPED:
                        setattr(module, child_name, _unfrozen(child))
    left = [f"{e.name or '<model>'}: {e.detail}" for e in entries if e.action == Action.SKIPPED]
    if left:
        warnings.warn(f"acfx.unfreeze_batch_norm: {len(left)} frozen BatchNorm(s) left frozen, their computation "
                      f"would not be kept ({'; '.join(left[:3])}{'; ...' if len(left) > 3 else ''}); expand skips "
                      "the convs before them", UserWarning, stacklevel=2)
    report = Report.from_entries("unfreeze_batch_norm", entries)
    return (model, report) if return_report else model


def _entry(name: str, frozen: nn.Module) -> Entry:
    reason = _left_reason(frozen, _FROZEN)
    what = type(frozen).__name__
    if reason:
        return Entry(name, Action.SKIPPED, what, reason)
    return Entry(name, Action.UNFROZEN, what, "BatchNorm2d" if not hasattr(frozen, "act") else "BatchNormAct2d")
