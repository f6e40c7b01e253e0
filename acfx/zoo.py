"""Build timm and torchvision classification models by name, with random weights (no downloads)."""
from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn

__all__ = ["build_model", "model_source", "input_size_for"]

_TORCHVISION_PREFIXES = ("tv:", "torchvision:")
# torchvision models whose builders need extra arguments to build without pretrained weights.
_TV_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": False},
              "inception_v3": {"aux_logits": False, "init_weights": False}}


def model_source(name: str) -> tuple:
    """("timm" | "torchvision", bare name). ``tv:NAME`` forces torchvision; otherwise timm first."""
    for prefix in _TORCHVISION_PREFIXES:
        if name.startswith(prefix):
            return "torchvision", name[len(prefix):]
    import timm
    if timm.is_model(name):
        return "timm", name
    import torchvision
    if name in torchvision.models.list_models(module=torchvision.models):
        return "torchvision", name
    raise ValueError(f"unknown model {name!r}: not a timm model (timm.list_models()) nor a torchvision "
                     "classification model (prefix it with 'tv:' to force torchvision)")


def build_model(name: str, **kwargs) -> nn.Module:
    """A timm or torchvision model with random weights; ``kwargs`` go to the builder."""
    source, bare = model_source(name)
    if source == "timm":
        import timm
        return timm.create_model(bare, pretrained=False, **kwargs)
    import torchvision
    builder: Callable = torchvision.models.get_model_builder(bare)
    return builder(weights=None, **{**_TV_KWARGS.get(bare, {}), **kwargs})


def input_size_for(model: nn.Module, name: str, default: int = 224) -> tuple:
    """(C, H, W) the model expects: timm's pretrained_cfg, else 3×default (299 for inception_v3)."""
    cfg: Optional[dict] = getattr(model, "pretrained_cfg", None)
    if cfg and cfg.get("input_size"):
        return tuple(cfg["input_size"])
    return (3, 299, 299) if "inception_v3" in name else (3, default, default)
