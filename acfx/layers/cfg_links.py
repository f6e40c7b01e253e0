"""Keep a timm model's pretrained_cfg naming modules that exist, before and after a block is fused.

timm's cfg names the first conv and the classifier (``first_conv="conv1"``); its loaders and checks read
``<name>.weight`` from the state_dict. Once expand puts an ACBlock at ``conv1`` that key is
``conv1.square.weight``, and once the block is fused it is ``conv1.weight`` again. So expand points the
cfg at the k×k branch and leaves a link on the block, and whoever fuses the block (collapse, or timm's
``reparameterize_model`` through ``fuse()``) points it back.
"""
from __future__ import annotations

from typing import Dict, List

import torch.nn as nn

__all__ = ["point_cfg_at", "restore_cfg"]

_CFG_ATTRS = ("pretrained_cfg", "default_cfg")
_CFG_KEYS = ("first_conv", "classifier")


def _cfgs(root: nn.Module) -> List[dict]:
    """The distinct cfg dicts of ``root`` and of the modules in it (feature wrappers hold their own)."""
    found: Dict[int, dict] = {}
    for module in root.modules():
        for attr in _CFG_ATTRS:
            cfg = module.__dict__.get(attr)
            if isinstance(cfg, dict):
                found.setdefault(id(cfg), cfg)
    return list(found.values())


def _rename(value, old: str, new: str):
    if isinstance(value, str):
        return new if value == old else value
    if isinstance(value, (tuple, list)):
        return type(value)(new if v == old else v for v in value)
    return value


def point_cfg_at(root: nn.Module, renames: Dict[str, nn.Module], suffix: Dict[int, str]) -> None:
    """For each replaced name whose cfg entry names it, point the entry at ``name + suffix`` and leave the
    link on the new module (``renames``: name -> new module; ``suffix``: id(new module) -> ".square")."""
    for cfg in _cfgs(root):
        for key in _CFG_KEYS:
            value = cfg.get(key)
            names = [value] if isinstance(value, str) else list(value) if isinstance(value, (tuple, list)) else []
            for name in names:
                module = renames.get(name)
                if module is None or id(module) not in suffix:
                    continue
                new = name + suffix[id(module)]
                cfg[key] = _rename(cfg[key], name, new)
                module.__dict__.setdefault("_cfg_links", []).append((cfg, key, new, name))


def restore_cfg(module: nn.Module) -> None:
    """Point the cfg entries linked to ``module`` back at its own name (it is being fused)."""
    for cfg, key, current, original in module.__dict__.pop("_cfg_links", []):
        cfg[key] = _rename(cfg.get(key), current, original)
