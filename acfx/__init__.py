"""acfx: ACNet (Ding et al., ICCV 2019) training for any CNN, as one call before and one after training.

    acnet = acfx.expand(model)      # every k×k conv→BN becomes an Asymmetric Convolution Block
    ...                             # train as usual
    plain = acfx.collapse(acnet)    # the original architecture with the trained weights, exactly
"""
from .block import ACBlock, NormTail
from .collapse import collapse
from .expand import expand
from .online import OnlineACConv
from .options import ExpandOptions
from .padding import DynamicSamePad2d
from .report import Entry, Report
from .split_conv import EvenSplitConv2d
from .unfreeze import unfreeze_batch_norm
from .exact_impl import set_exact_impl
from .timm_fx import register_timm_fx_leaves

register_timm_fx_leaves()

__all__ = [
    "expand",
    "collapse",
    "set_exact_impl",
    "unfreeze_batch_norm",
    "ACBlock",
    "NormTail",
    "OnlineACConv",
    "EvenSplitConv2d",
    "DynamicSamePad2d",
    "ExpandOptions",
    "Report",
    "Entry",
]

__version__ = "0.1.0"
