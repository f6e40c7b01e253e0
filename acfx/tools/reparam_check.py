"""timm's ``reparameterize_model`` on acb_ models of families with their own re-parameterisable blocks.

What `benchmarks/reparam_coverage.py` and the tests measure: the acb_ model with random BN statistics
in eval, against what timm's walk (validate.py / benchmark.py ``--reparam``) makes of it, and against what
the same walk makes of the plain base model (module types, strict state_dict load).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..passes.reparam_guard import REPARAM_METHODS
from .diagnostics import (
    Float64Check,
    float64_check,
    load_error,
    over_tolerance,
    randomize_norms,
    relative_error,
    within_rounding,
)

__all__ = ["rep_block_modules", "rep_families", "ReparamCheck", "check_reparameterize"]


def rep_block_modules() -> Dict[str, List[str]]:
    """timm.models submodules -> their classes that re-parameterise themselves (found by listing)."""
    import timm.models
    found: Dict[str, List[str]] = {}
    for info in pkgutil.iter_modules(timm.models.__path__):
        module = importlib.import_module(f"timm.models.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, nn.Module) and cls.__module__ == module.__name__ and \
                    any(method in cls.__dict__ for method in REPARAM_METHODS):
                found.setdefault(info.name, []).append(name)
    return found


def _rep_block_params(name: str) -> Optional[int]:
    """The parameter count of ``name`` if any of its modules re-parameterises itself, else None (built on
    the meta device: no memory, no time)."""
    import timm
    with torch.device("meta"):
        model = timm.create_model(name)
    if not any(any(m in type(module).__dict__ for m in REPARAM_METHODS) for module in model.modules()):
        return None
    return sum(p.numel() for p in model.parameters())


def rep_families(registered: List[str], smallest_only: bool = False) -> Dict[str, List[str]]:
    """Family (timm.models submodule) -> base names of registered acb_ models whose modules re-parameterise
    themselves, smallest first. ``smallest_only``: the smallest model of each family."""
    import timm
    families: Dict[str, List[str]] = {}
    for family in rep_block_modules():
        sized = [(params, name) for name in timm.list_models(module=family) if f"acb_{name}" in registered
                 for params in [_rep_block_params(name)] if params is not None]
        if sized:
            names = [name for _, name in sorted(sized)]
            families[family] = names[:1] if smallest_only else names
    return families


@dataclasses.dataclass
class ReparamCheck:
    name: str
    # reparameterize_model(acb model) against the acb model, eval, random BN statistics.
    error: float = float("nan")
    float64: Optional[Float64Check] = None
    tolerance: float = 1e-5
    # The module types of reparameterize_model(acb model) and of reparameterize_model(base model) agree.
    same_types: bool = False
    # None: the state_dict loaded strictly into reparameterize_model(base model); else the error.
    strict_reload: Optional[str] = None
    failure: Optional[str] = None

    @property
    def exact(self) -> bool:
        return within_rounding(self.error, self.tolerance, self.float64)

    @property
    def ok(self) -> bool:
        return self.failure is None and self.exact and self.same_types and self.strict_reload is None


def check_reparameterize(base: str, x: torch.Tensor, tolerance: float = 1e-5) -> ReparamCheck:
    """Build ``acb_<base>``, randomise its BNs, run timm's reparameterize_model and compare. Never raises."""
    import timm
    from timm.utils.model import reparameterize_model
    result = ReparamCheck(base, tolerance=tolerance)
    try:
        torch.manual_seed(0)
        model = randomize_norms(timm.create_model(f"acb_{base}")).eval()
        with torch.no_grad():
            y = model(x)
            deployed = reparameterize_model(model)
            y_deployed = deployed(x)
        result.error = relative_error(y_deployed, y)
        plain = reparameterize_model(timm.create_model(base).eval())
        result.same_types = [type(m) for m in deployed.modules()] == [type(m) for m in plain.modules()]
        result.strict_reload = load_error(plain, deployed.state_dict())
        if over_tolerance(result.error, tolerance):
            result.float64 = float64_check(model, reparameterize_model, x, y, y_deployed)
    except Exception as error:  # reported, so that a sweep goes on
        result.failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return result
