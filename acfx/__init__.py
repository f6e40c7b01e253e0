"""acfx: ACNet (Ding et al., ICCV 2019) training for any CNN, as one call before and one after training.

    acnet = acfx.expand(model)      # every k×k conv→BN becomes an Asymmetric Convolution Block
    ...                             # train as usual
    plain = acfx.collapse(acnet)    # the original architecture with the trained weights, exactly

The package reads in four layers, each importing only from those before it: ``acfx.layers`` (the nn
modules and their arithmetic), ``acfx.matching`` (tracing and the finders), ``acfx.passes`` (expand,
collapse and what they build and swap in), ``acfx.tools`` (command line, checkpoints, diagnostics).
"""
from .layers.block import ACBlock, NormTail
from .layers.online import OnlineACConv
from .layers.padding import DynamicSamePad2d
from .layers.recipe import RECIPES, Recipe
from .layers.split_conv import EvenSplitConv2d
from .passes.collapse import collapse
from .passes.expand import expand
from .passes.options import ExpandOptions
from .passes.report import Entry, Report
from .passes.set_impl import set_exact_impl
from .passes.unfreeze import unfreeze_batch_norm
from .timm_fx import register_timm_fx_leaves
from .tools.checkpoint import load_state_dict_strict

register_timm_fx_leaves()

__all__ = [
    "expand",
    "collapse",
    "set_exact_impl",
    "unfreeze_batch_norm",
    "load_state_dict_strict",
    "ACBlock",
    "NormTail",
    "OnlineACConv",
    "EvenSplitConv2d",
    "DynamicSamePad2d",
    "ExpandOptions",
    "Recipe",
    "RECIPES",
    "Report",
    "Entry",
]

__version__ = "0.2.0"
