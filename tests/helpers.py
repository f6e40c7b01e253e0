"""Shared test utilities: BN randomisation and relative-error assertions."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from acfx.tools.diagnostics import randomize_norms

F32_TOL = 1e-5
F64_TOL = 1e-10


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters on every BatchNorm.

    Fresh statistics (mean 0, var 1, γ 1, β 0) make BN an identity and hide fusion bugs.
    """
    return randomize_norms(model, seed)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|Δ| / max|expected|."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def tol_for(dtype: torch.dtype) -> float:
    return F64_TOL if dtype == torch.float64 else F32_TOL


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: Optional[float] = None,
                     what: str = "outputs") -> float:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    tol = tol_for(expected.dtype) if tol is None else tol
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: max|Δ|/max|y| = {err:.3e} > {tol:.0e}"
    return err


def count_modules(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def kxk_convs(model: nn.Module) -> int:
    """Conv2d modules with both kernel sides ≥ 2 (what ACNet expands)."""
    return sum(isinstance(m, nn.Conv2d) and min(m.kernel_size) >= 2 for m in model.modules())
