"""acfx's modules are leaves for timm's fx tools (FeatureGraphNet, create_feature_extractor, fx checks).

timm registers its own layers that do not trace symbolically (shape-dependent padding, ...) with
``register_notrace_module``; its tracers then call them as modules. acfx's modules register the same way:
DynamicSamePad2d computes its padding from the input size, and an ACBlock or NormTail called as a module
runs its real forward (whatever ``set_exact_impl`` chose, and the eval-mode pairing of block and tail).
"""
from __future__ import annotations

__all__ = ["register_timm_fx_leaves"]


def register_timm_fx_leaves() -> None:
    from timm.layers import register_notrace_module

    from .layers.block import ACBlock, NormTail
    from .layers.online import OnlineACConv
    from .layers.padding import DynamicSamePad2d
    from .layers.split_conv import EvenSplitConv2d
    for cls in (ACBlock, NormTail, OnlineACConv, DynamicSamePad2d, EvenSplitConv2d):
        register_notrace_module(cls)
