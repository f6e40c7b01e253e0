"""timm plug-in: ``import acfx.timm`` registers ``acb_<name>`` for every timm architecture with a conv→BN pair.

    import acfx.timm, timm
    model = timm.create_model("acb_resnet50", num_classes=100)       # resnet50, expanded for ACNet training
    model = timm.create_model("acb_resnet50", pretrained=True)        # base weights, function-preserving init

``acb_<name>`` builds ``<name>`` with every create_model argument passed through (pretrained, pretrained_cfg,
num_classes, in_chans, drop_rate, drop_path_rate, features_only, ...) and expands it. With
``pretrained=True`` the base weights are loaded first and expanded with ``init="preserve"``, so fine-tuning
starts from the pretrained accuracy. ``acb_*`` keyword arguments choose the expand options
(``acb_mode``, ``acb_branches``, ``acb_norm``, ``acb_placement``, ``acb_recipe``, ``acb_kxk_branches``, ``acb_gamma_init``,
``acb_include_unnormed``, ``acb_init``), and ``acb_impl="stacked"`` or ``"recompute"`` the forward of the
blocks (:func:`acfx.set_exact_impl`).

In timm's train.py: ``python train.py DATA --device-modules acfx.timm --model acb_resnet50 ...``
(train.py imports the ``--device-modules`` before it builds the model). The architectures registered are
those listed in ``timm_archs.txt`` (found by tracing every model of timm 1.0.31, see
benchmarks/coverage.py) that the installed timm has; :func:`register` adds any other one.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Dict, List

import timm
from timm.models import register_model
from timm.models._registry import _model_default_cfgs

from .passes.expand import expand
from .passes.options import ExpandOptions
from .passes.set_impl import set_exact_impl

__all__ = ["PREFIX", "register", "registered", "default_cfgs"]

PREFIX = "acb_"
logger = logging.getLogger(__name__)

# Read by timm's register_model: the pretrained cfgs of each acb_ model (those of its base model).
default_cfgs: Dict[str, object] = {}
# The acb_<option> keywords: every expand option that is a plain value (ExpandOptions, the one record).
_OPTIONS = tuple(field.name for field in ExpandOptions.fields(timm=True))


def _acb_cfg(base: str):
    """The base model's pretrained cfgs, pointing at the base model's weights."""
    cfg = _model_default_cfgs.get(base)
    if cfg is None:
        return None
    cfgs = {}
    for tag, pcfg in cfg.cfgs.items():
        hub = pcfg.hf_hub_id
        if hub == "timm/":  # timm completes this to timm/<arch>.<tag>: keep the base's name
            hub = f"timm/{base}.{tag}" if tag else f"timm/{base}"
        cfgs[tag] = dataclasses.replace(pcfg, hf_hub_id=hub)
    return dataclasses.replace(cfg, cfgs=cfgs)


def _entrypoint(base: str) -> Callable:
    def create(pretrained: bool = False, pretrained_cfg=None, **kwargs):
        options = {name: kwargs.pop(f"acb_{name}") for name in _OPTIONS if f"acb_{name}" in kwargs}
        impl = kwargs.pop("acb_impl", None)
        unknown = sorted(k for k in kwargs if k.startswith(PREFIX))
        if unknown:
            raise TypeError(f"acfx.timm: {', '.join(unknown)} {'is not an' if len(unknown) == 1 else 'are not'} "
                            f"acb_ keyword{'s' if len(unknown) > 1 else ''} of {PREFIX}{base}; they are "
                            f"{', '.join(PREFIX + o for o in _OPTIONS + ('impl',))}")
        options.setdefault("init", "preserve" if pretrained else "scratch")
        name = base
        if isinstance(pretrained_cfg, str):  # a tag, from "acb_resnet50.a1_in1k"
            name, pretrained_cfg = f"{base}.{pretrained_cfg}", None
        model = timm.create_model(name, pretrained=pretrained, pretrained_cfg=pretrained_cfg, **kwargs)
        model, report = expand(model, inplace=True, return_report=True, **options)
        if not report.of("expanded"):
            logger.warning("acfx: %s has no conv→BN site to expand (%s)", base, report.skip_reasons())
        if impl is not None:
            set_exact_impl(model, impl)
        return model

    create.__name__ = PREFIX + base
    create.__qualname__ = PREFIX + base
    create.__module__ = __name__
    create.__doc__ = f"timm {base}, expanded by acfx for ACNet training."
    return create


def register(base: str) -> str:
    """Register ``acb_<base>`` for the timm model ``base``; returns the new name."""
    if not timm.is_model(base):
        raise ValueError(f"acfx.timm.register: {base!r} is not a timm model (timm.list_models())")
    name = PREFIX + base
    if timm.is_model(name):
        return name
    cfg = _acb_cfg(base)
    if cfg is not None:
        default_cfgs[name] = cfg
    register_model(_entrypoint(base))
    return name


def _packaged_archs() -> List[str]:
    path = Path(__file__).with_name("timm_archs.txt")
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def registered() -> List[str]:
    """The acb_ names registered so far."""
    return sorted(n for n in timm.list_models(f"{PREFIX}*"))


def _register_all() -> None:
    available = set(timm.list_models())
    for base in _packaged_archs():
        if base in available:
            register(base)


_register_all()
