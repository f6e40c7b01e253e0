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
from .exact_impl import set_exact_impl

__all__ = [
    "expand",
    "collapse",
    "set_exact_impl",
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
