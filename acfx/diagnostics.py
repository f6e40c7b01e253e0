"""Round-trip checks of a model: what `acfx check` and benchmarks/coverage.py measure.

Expand, take a training step, randomise every BN (fresh statistics make BN an identity and hide fusion
errors), collapse, compare outputs, and reload the collapsed weights strictly into a fresh model.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from .collapse import collapse
from .expand import expand
from .report import Report

__all__ = ["randomize_norms", "relative_error", "RoundTrip", "check_round_trip", "param_count"]


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters on every BatchNorm, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.running_mean is None:
                continue
            n, ref = module.num_features, module.running_mean
            module.running_mean.copy_(torch.randn(n, generator=gen).mul_(0.2).to(ref))
            module.running_var.copy_(torch.rand(n, generator=gen).mul_(1.5).add_(0.5).to(ref))
            if module.affine:
                module.weight.copy_(torch.rand(n, generator=gen).add_(0.5).to(module.weight))
                module.bias.copy_(torch.randn(n, generator=gen).mul_(0.2).to(module.bias))
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual − expected| / max|expected|."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclasses.dataclass
class RoundTrip:
    """The measurements of one model's round trip; ``ok`` says whether all checks held."""

    name: str
    expand_report: Optional[Report] = None
    collapse_report: Optional[Report] = None
    params: Dict[str, int] = dataclasses.field(default_factory=dict)
    class_kept: bool = False
    train_step_finite: bool = False
    error: float = float("nan")
    tolerance: float = 1e-5
    # None: loaded strictly into a fresh model; else the error (or why it was not expected to load).
    strict_reload: Optional[str] = None
    seconds: float = 0.0
    failure: Optional[str] = None  # an exception that stopped the check

    @property
    def ok(self) -> bool:
        reload_ok = self.strict_reload is None or self.structure_changed
        return (self.failure is None and self.class_kept and self.train_step_finite
                and self.error <= self.tolerance and reload_ok)

    @property
    def structure_changed(self) -> bool:
        """True when collapse was expected to change structure (convs without BN gained a bias)."""
        return bool(self.collapse_report and self.collapse_report.structure_changes)


def _train_step(model: nn.Module, x: torch.Tensor) -> bool:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    out.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad(set_to_none=True)
    return bool(grads) and all(torch.isfinite(g).all() for g in grads)


def check_round_trip(name: str, build: Callable[[], nn.Module], x: torch.Tensor, tolerance: float = 1e-5,
                     **expand_kwargs) -> RoundTrip:
    """Expand, train one step, randomise BNs, collapse, compare, reload strictly. Never raises."""
    result = RoundTrip(name, tolerance=tolerance)
    start = time.perf_counter()
    try:
        _measure(result, build, x, expand_kwargs)
    except Exception as error:  # reported, so that a sweep goes on
        result.failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    result.seconds = time.perf_counter() - start
    return result


def _measure(result: RoundTrip, build, x, expand_kwargs) -> None:
    # In place where possible: a sweep over large models must not hold several copies of each.
    model = build()
    result.params["plain"] = param_count(model)
    kind = type(model)
    expanded, result.expand_report = expand(model, inplace=True, return_report=True, **expand_kwargs)
    result.params["expanded"] = param_count(expanded)
    result.class_kept = type(expanded) is kind
    result.train_step_finite = _train_step(expanded, x)
    randomize_norms(expanded).eval()
    with torch.no_grad():
        y_expanded = expanded(x)
    collapsed, result.collapse_report = collapse(expanded, inplace=True, return_report=True)
    result.params["collapsed"] = param_count(collapsed)
    with torch.no_grad():
        y_collapsed = collapsed(x)
    result.error = relative_error(y_collapsed, y_expanded)
    try:
        build().load_state_dict(collapsed.state_dict(), strict=True)
    except RuntimeError as error:
        result.strict_reload = " ".join(str(error).split())[:400]
