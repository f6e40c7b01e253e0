"""BN folding for deployment: every conv→BN pair becomes one conv with a bias, the BN slot is emptied."""
from __future__ import annotations

import collections
from typing import Dict

import torch.nn as nn

from ._modules import refill_conv
from .fusion import check_finite, fold_norm, norm_affine
from .norms import tail_children
from .report import Report
from .rewrite import ModuleSwaps
from .sites import ConvSite, find_conv_sites
from .tracing import shared_module_names, trace_parts

__all__ = ["fold_norms", "fold_site"]


def _empty_slot(norm: nn.Module) -> nn.Module:
    """What replaces a folded BN: nothing, or the drop and activation of a timm norm-act layer."""
    children = tail_children(norm)
    if not children:
        return nn.Identity()
    return nn.Sequential(collections.OrderedDict(children))


def fold_site(site: ConvSite) -> Dict[str, nn.Module]:
    """The conv with the BN folded in, and what takes the BN's slot."""
    conv = site.conv
    check_finite(site.name, "weight", conv.weight)
    weight = conv.weight.detach().double()
    bias = None if conv.bias is None else conv.bias.detach().double()
    weight, bias = fold_norm(weight, bias, *norm_affine(site.norm, site.norm_name))
    dtype = conv.weight.dtype
    folded = refill_conv(conv, weight.to(dtype), bias.to(dtype))
    return {site.name: folded, site.norm_name: _empty_slot(site.norm)}


def fold_norms(swaps: ModuleSwaps, make_tracer, report: Report) -> nn.Module:
    """Fold every conv→BN pair of ``swaps.root`` (all or nothing); each one recorded in ``report``."""
    parts, _ = trace_parts(swaps.root, make_tracer)
    shared = shared_module_names(swaps.root)
    replacements: Dict[str, nn.Module] = {}
    for part in parts:
        for site in find_conv_sites(part, shared, min_side=1):
            kh, kw = site.conv.kernel_size
            if site.skip:
                if site.norm_follows:
                    report.add(site.name, "skipped", f"conv {kh}x{kw} → BN (fold_bn)", site.skip)
                continue
            replacements.update(fold_site(site))
            report.add(site.name, "folded", f"conv {kh}x{kw} + {type(site.norm).__name__} → conv with bias")
    return swaps.apply(replacements)
