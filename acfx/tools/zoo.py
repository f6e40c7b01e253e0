"""Build timm and torchvision models by name, with random weights (no downloads)."""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch.nn as nn

__all__ = ["build_model", "model_source", "input_size_for", "fixed_input_size", "is_detection", "unsupported_task"]

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


def _torchvision_builder(bare: str) -> Callable:
    import torchvision
    try:
        return torchvision.models.get_model_builder(bare)
    except ValueError:
        raise ValueError(f"unknown torchvision model {bare!r} (torchvision.models.list_models())") from None


def is_detection(name: str) -> bool:
    """A torchvision detection model (its forward takes targets in train mode and returns detections)."""
    source, bare = model_source(name)
    if source != "torchvision":
        return False
    return _torchvision_builder(bare).__module__.startswith("torchvision.models.detection")


def unsupported_task(name: str) -> Optional[str]:
    """The task of a torchvision model whose input is not one image batch (video, optical flow), if any."""
    source, bare = model_source(name)
    if source != "torchvision":
        return None
    module = _torchvision_builder(bare).__module__
    for part, task in ((".video", "video"), (".optical_flow", "optical-flow")):
        if part in module:
            return task
    return None


def build_model(name: str, **kwargs) -> nn.Module:
    """A timm or torchvision model with random weights; ``kwargs`` go to the builder.

    Nothing is downloaded: torchvision builders get ``weights=None`` and, for detection and segmentation
    models, ``weights_backbone=None`` (their backbone then has plain BatchNorm2d, not FrozenBatchNorm2d).
    """
    source, bare = model_source(name)
    try:
        if source == "timm":
            import timm
            return timm.create_model(bare, pretrained=False, **kwargs)
        builder = _torchvision_builder(bare)
        defaults = dict(_TV_KWARGS.get(bare, {}), weights=None)
        if "weights_backbone" in inspect.signature(builder).parameters:
            defaults["weights_backbone"] = None
        return builder(**{**defaults, **kwargs})
    except TypeError as error:  # a builder's answer to arguments it does not take: the caller's input
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"
        raise ValueError(f"building {name!r} with {given} failed: {error}") from error


def _space_to_depth_factor(model: nn.Module, conv: nn.Module) -> int:
    """How many times a space-to-depth stem before ``conv`` multiplies the input's channels (TResNet's
    SpaceToDepth, nn.PixelUnshuffle: block size squared); 1 without one."""
    from timm.layers import SpaceToDepth
    for module in model.modules():
        if module is conv:
            return 1
        if isinstance(module, SpaceToDepth):
            return int(module.bs) ** 2
        if isinstance(module, nn.PixelUnshuffle):
            return int(module.downscale_factor) ** 2
    return 1


def _input_channels(model: nn.Module, cfg: Optional[dict]) -> Optional[int]:
    """The channels the model takes, read off its first conv (the cfg keeps 3 for a model built with
    in_chans=1), divided back where a space-to-depth stem comes before it."""
    first = (cfg or {}).get("first_conv")
    conv = None
    for name in [first] if isinstance(first, str) else list(first or ()):
        try:
            candidate = model.get_submodule(name)
            int(candidate.in_channels)
        except (AttributeError, TypeError, ValueError):
            continue
        conv = candidate
        break
    if conv is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return None
    factor = _space_to_depth_factor(model, conv)
    channels = int(conv.in_channels)
    return channels // factor if channels % factor == 0 else channels


def input_size_for(model: nn.Module, name: str, default: int = 224) -> tuple:
    """(C, H, W) the model expects: timm's pretrained_cfg, else default×default (299 for inception_v3),
    with the channels of its first conv."""
    cfg: Optional[dict] = getattr(model, "pretrained_cfg", None)
    if cfg and cfg.get("input_size"):
        channels, height, width = cfg["input_size"]
    else:
        channels, height, width = (3, 299, 299) if "inception_v3" in name else (3, default, default)
    return (_input_channels(model, cfg) or channels, height, width)


def fixed_input_size(model: nn.Module) -> bool:
    """The model takes only its own input size (timm's ``fixed_input_size``: position embeddings, windows)."""
    cfg: Optional[dict] = getattr(model, "pretrained_cfg", None)
    return bool(cfg and cfg.get("fixed_input_size"))
