"""The deploy check of a model: ``collapse(model, fold_bn=True)`` of the model as built, against the model.

What ``benchmarks/coverage.py --check deploy`` measures over a zoo: every re-parameterisable block of the
model's own fused (timm's rep families, hand-written sums of branches), every conv→BN pair folded, and the
output unchanged, with random BN statistics, in float32; where a deep network amplifies float32 rounding
beyond the tolerance, the same conversion is repeated in float64 (the verdict of the round trip).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from ..passes.collapse import collapse
from ..passes.report import Report
from .diagnostics import (
    Float64Check,
    float64_check,
    output_tensor,
    over_tolerance,
    param_count,
    randomized_output,
    relative_error,
    within_rounding,
)

__all__ = ["DeployCheck", "check_deploy"]


@dataclasses.dataclass
class DeployCheck:
    """The measurements of one model's deploy form; ``ok`` says whether it computes what the model does."""

    name: str
    report: Optional[Report] = None
    params: Dict[str, int] = dataclasses.field(default_factory=dict)
    # Conv modules of the model and of its deploy form, and the BatchNorms left in the deploy form.
    convs: Dict[str, int] = dataclasses.field(default_factory=dict)
    norms_left: int = 0
    error: float = float("nan")
    tolerance: float = 1e-5
    # Measured only when the float32 error is over the tolerance (see diagnostics.float64_check).
    float64: Optional[Float64Check] = None
    gamma_scale: float = 1.0
    seconds: float = 0.0
    failure: Optional[str] = None  # an exception that stopped the check

    @property
    def ok(self) -> bool:
        return self.failure is None and within_rounding(self.error, self.tolerance, self.float64)


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def check_deploy(name: str, build: Callable[[], nn.Module], x: torch.Tensor, tolerance: float = 1e-5
                 ) -> DeployCheck:
    """Build, randomise BNs, collapse with fold_bn=True, compare outputs. Never raises."""
    result = DeployCheck(name, tolerance=tolerance)
    start = time.perf_counter()
    try:
        model = build().eval()
        y, result.gamma_scale = randomized_output(model, x)
        deployed, result.report = collapse(model, fold_bn=True, return_report=True)
        result.params = {"plain": param_count(model), "deployed": param_count(deployed)}
        result.convs = {"plain": _count(model, nn.modules.conv._ConvNd),
                        "deployed": _count(deployed, nn.modules.conv._ConvNd)}
        result.norms_left = _count(deployed, nn.modules.batchnorm._BatchNorm)
        with torch.no_grad():
            y_deployed = output_tensor(deployed(x))
        del deployed
        result.error = relative_error(y_deployed, y)
        if over_tolerance(result.error, tolerance):
            result.float64 = float64_check(model, lambda m: collapse(m, fold_bn=True), x, y, y_deployed)
    except Exception as error:  # reported, so that a sweep goes on
        result.failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    result.seconds = time.perf_counter() - start
    return result
