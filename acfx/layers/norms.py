"""The BatchNorm kinds acfx splits into branch BNs, and how it builds and rebuilds them.

Supported: nn.BatchNorm2d, nn.SyncBatchNorm, and timm's BatchNormAct2d / SyncBatchNormAct (BN subclasses
that also apply a drop and an activation; those two stay in the BN's slot, see NormTail).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d as _BatchNormAct2d
from timm.layers.norm_act import SyncBatchNormAct as _SyncBatchNormAct

from .convs import extra_state, instance_override

_NORM_ACT = (_BatchNormAct2d, _SyncBatchNormAct)

__all__ = ["is_batch_norm", "unsupported_norm_reason", "foldable_norm", "branch_norm", "plain_norm",
           "tail_children", "training_momentum", "norm_affine", "check_finite", "fusion_dtype"]

_PLAIN = (nn.BatchNorm2d, nn.SyncBatchNorm)


def is_batch_norm(module: nn.Module) -> bool:
    """Any BatchNorm-like module (supported or not), for reporting what follows a conv."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(module).__name__


_STATE = dict(parameters=("weight", "bias"), buffers=("running_mean", "running_var", "num_batches_tracked"))


def unsupported_norm_reason(module: nn.Module) -> Optional[str]:
    """Why this BN cannot be split into branch BNs, or None if it can."""
    kind = type(module)
    name = kind.__name__
    if kind not in _PLAIN + _NORM_ACT:
        if "Frozen" in kind.__name__:
            return (f"followed by {kind.__name__}: frozen statistics cannot become per-branch batch "
                    "statistics; unfreeze it first (acfx.unfreeze_batch_norm(model)) to expand it")
        return f"norm type {kind.__name__} is not supported (nn.BatchNorm2d, nn.SyncBatchNorm, timm BatchNormAct2d)"
    replaced = instance_override(module, ("forward",))
    if replaced:
        return (f"{name} has its forward replaced on the instance, so acfx does not know what it computes; "
                "restore the class's forward to rewrite it")
    extra = extra_state(module, children=("drop", "act") if kind in _NORM_ACT else (), **_STATE)
    if extra:
        return (f"{name} holds {extra} beyond a BatchNorm's parameters and statistics: the rewrite would drop "
                "them and acfx does not know what they do")
    if module.affine and module.bias is None:
        return f"{name} has a scale but no shift (bias=False): acfx's branch BNs and fusion need both"
    if not module.track_running_stats or module.running_mean is None:
        return ("BN does not track running statistics: it normalises with batch statistics even in eval, "
                "so the branches could never be fused")
    return None


def foldable_norm(module: nn.Module) -> bool:
    """A BN whose eval output is an affine map of its input (timm norm-act only with no drop/act; an
    nn.BatchNorm1d too, which collapse folds after 1-d convs and expand never splits)."""
    if type(module) is nn.BatchNorm1d:
        return not instance_override(module, ("forward",)) and not extra_state(module, **_STATE) and \
            module.track_running_stats and module.running_var is not None
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or unsupported_norm_reason(module):
        return False
    if type(module) not in _PLAIN:
        children = dict(module.named_children())
        if type(module) not in _NORM_ACT or any(type(c) is not nn.Identity for c in children.values()):
            return False
    return module.track_running_stats and module.running_var is not None


def _norm_class(module: nn.Module):
    sync = isinstance(module, nn.SyncBatchNorm)
    return nn.SyncBatchNorm if sync else nn.BatchNorm2d


def _like(module: nn.Module, affine: Optional[bool] = None, features: Optional[int] = None) -> nn.Module:
    """A new plain BN with the configuration of ``module`` (affine, eps, momentum, process group), of
    ``features`` channels (default: as many as ``module``)."""
    cls = _norm_class(module)
    kwargs = dict(eps=module.eps, momentum=module.momentum, affine=module.affine if affine is None else affine,
                  track_running_stats=module.track_running_stats)
    if cls is nn.SyncBatchNorm:
        kwargs["process_group"] = module.process_group
    ref = module.weight if module.affine else module.running_mean
    new = cls(module.num_features if features is None else features, device=ref.device, dtype=ref.dtype, **kwargs)
    new.train(module.training)
    return new


def branch_norm(module: nn.Module, gamma: Optional[float], beta: Optional[float] = None,
                features: Optional[int] = None) -> nn.Module:
    """A fresh BN for a new branch, configured like ``module``, γ/β set when given; ``features`` channels (for
    a BN inside a branch, DBB's after its 1×1 conv; default: as many as ``module``).

    Setting γ/β needs affine parameters, so the branch BN has them then even if ``module`` has none.
    """
    new = _like(module, affine=True if (gamma is not None or beta is not None) else None, features=features)
    if new.affine:
        with torch.no_grad():
            if gamma is not None:
                new.weight.fill_(gamma)
            if beta is not None:
                new.bias.fill_(beta)
        requires_grad = module.weight.requires_grad if module.affine else True
        new.requires_grad_(requires_grad)
    return new


def plain_norm(module: nn.Module, gamma: Optional[float] = None) -> nn.Module:
    """A plain BN sharing ``module``'s parameters and statistics (not copies), for the k×k branch.

    ``gamma`` replaces the scale with a new tensor (the user's module is never written to).
    """
    new = _like(module)
    if module.affine:
        new.weight = module.weight
        new.bias = module.bias
        if gamma is not None:
            new.weight = nn.Parameter(torch.full_like(module.weight, gamma),
                                      requires_grad=module.weight.requires_grad)
    new.running_mean = module.running_mean
    new.running_var = module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    return new


def tail_children(module: nn.Module) -> Dict[str, nn.Module]:
    """The drop/act modules a timm norm-act layer applies after normalising, in order."""
    children = dict(module.named_children())
    return {name: children[name] for name in ("drop", "act") if name in children}


def training_momentum(norm: nn.modules.batchnorm._BatchNorm) -> float:
    """Count one training batch on ``norm`` and return the momentum factor nn.BatchNorm2d.forward would pass
    to F.batch_norm for it (1/num_batches_tracked when momentum is None): for forwards that call the
    functional BN themselves."""
    with torch.no_grad():
        norm.num_batches_tracked.add_(1)
    return (1.0 / float(norm.num_batches_tracked)) if norm.momentum is None else norm.momentum


def fusion_dtype(device: torch.device) -> torch.dtype:
    """The dtype fusion computes in: float64, except on devices without it (Apple MPS: float32)."""
    return torch.float32 if device.type == "mps" else torch.float64


def check_finite(name: str, what: str, tensor: Optional[torch.Tensor]) -> None:
    if tensor is not None and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"acfx.collapse: {what} of '{name}' is not finite (NaN or inf). The model cannot be "
                         "fused; check for diverged training or reload a good checkpoint before collapsing.")


def norm_affine(norm: nn.Module, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of a BN in eval mode, in float64: γ/σ and β − μ·γ/σ."""
    for what in ("running_mean", "running_var", "weight", "bias"):
        check_finite(name, what, getattr(norm, what, None))
    dtype = fusion_dtype(norm.running_var.device)
    var = norm.running_var.to(dtype) + norm.eps
    if bool((var <= 0).any()):
        raise ValueError(f"acfx.collapse: running_var + eps of '{name}' is not positive; the BN statistics are "
                         "broken, recompute them before collapsing.")
    scale = torch.rsqrt(var)  # shape [C_out]
    if norm.weight is not None:
        scale = scale * norm.weight.to(dtype)
    shift = -norm.running_mean.to(dtype) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.to(dtype)
    return scale, shift
