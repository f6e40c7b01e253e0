"""The round-trip verdict of `acfx check` and the coverage sweep: what counts as exact."""
import dataclasses

import pytest
import torch
import torch.nn as nn

from acfx.tools.deploy_check import check_deploy
from acfx.tools.diagnostics import F64_TOLERANCE, RoundTrip, check_round_trip, float64_check, within_rounding


def _verdict(**measured) -> bool:
    return RoundTrip("m", **{"local_error": 1e-7, "error": 1e-7, **measured}).exact


@pytest.mark.parametrize("measured, exact", [
    (dict(), True),
    (dict(local_error=2e-5), False),  # one fused layer is wrong: never excused by the network's noise
    (dict(local_error=2e-5, error=1e-7, error_f64=1e-15), False),
    (dict(error=1e-3), False),  # over the tolerance and nothing measured to explain it
    (dict(error=1e-3, noise_f32=5e-4), True),  # within 4x of the float32 noise floor
    (dict(error=1e-3, noise_f32=1e-4), False),
    (dict(error=1e-3, noise_f32=1e-6, error_f64=F64_TOLERANCE / 10), True),  # exact in float64
    (dict(error=1e-3, noise_f32=1e-6, error_f64=F64_TOLERANCE * 10), False),
    (dict(error=1e-3, noise_f32=1e-6, collapsed_noise_f32=5e-4), True),  # the collapsed model's own floor
    (dict(error=1e-3, noise_f32=1e-6, collapsed_noise_f32=1e-4), False),
])
def test_exact_verdict(measured, exact):
    assert _verdict(**measured) is exact


class _Cancelling(nn.Module):
    """x @ W written as two huge kernels that cancel: the same function, its float32 rounding amplified by
    ``cancel`` (a fused kernel and its branches round differently in the same way, if less)."""

    def __init__(self, weight: torch.Tensor, cancel: float, scale: float):
        super().__init__()
        noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1), dtype=weight.dtype) * cancel
        self.a, self.b, self.scale = nn.Parameter(weight + noise), nn.Parameter(-noise), scale

    def forward(self, x):
        return (x @ self.a + x @ self.b) * self.scale


@pytest.mark.parametrize("cancel, scale, rounding", [
    (1e7, 1.0, True),  # the converted model alone is noisy, beyond what float64 settles to 1e-10
    (1e2, 1.01, False),  # a 1% error stands out of a floor of ~1e-4
])
def test_the_converted_models_noise_floor_counts_and_an_error_above_it_is_caught(cancel, scale, rounding):
    source = nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16)

    def convert(model):
        return _Cancelling(model.weight.detach().T.clone(), cancel, scale)

    with torch.no_grad():
        y_source, y_converted = source(x), convert(source)(x)
    error = (y_converted - y_source).abs().max().item() / y_source.abs().max().item()
    check = float64_check(source, convert, x, y_source, y_converted)
    assert check.noise_f32 < 1e-6 < check.converted_noise_f32, check  # only the converted model is noisy
    if rounding:  # neither the source's floor nor float64 explains it: the converted model's own floor does
        assert error > 4 * check.noise_f32 and check.error_f64 > F64_TOLERANCE, (error, check)
    assert within_rounding(error, 1e-5, check) is rounding, (error, check)


class _Broken(nn.Module):
    """A conv→BN net whose collapse is sabotaged: the verdict must catch it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_round_trip_catches_a_wrong_fusion(monkeypatch):
    import acfx.layers.block as block
    real = block.fit

    def off_by_one_percent(*args, **kwargs):
        fused = real(*args, **kwargs)
        return dataclasses.replace(fused, kernel=fused.kernel * 1.01)

    monkeypatch.setattr(block, "fit", off_by_one_percent)
    result = check_round_trip("broken", _Broken, torch.randn(2, 3, 16, 16))
    assert result.failure is None and result.local_error > 1e-3 and not result.exact and not result.ok, result


def test_round_trip_of_a_correct_fusion_is_exact():
    result = check_round_trip("plain", _Broken, torch.randn(2, 3, 16, 16))
    assert result.ok and result.error <= 1e-5 and result.local_error <= 1e-5, result


class _Computing(_Broken):
    """A constructor that reads its own tensors' values: it cannot be built on the meta device."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(self.conv.weight.abs().max().item() > 0)))


@pytest.mark.parametrize("build", [_Broken, _Computing])
def test_strict_reload_checks_keys_and_shapes_on_a_fresh_model(build):
    from acfx.tools.diagnostics import strict_reload_error
    state = build().state_dict()
    assert strict_reload_error(build, state) is None
    extra = {**state, "stray": torch.zeros(1)}
    assert "Unexpected key(s)" in strict_reload_error(build, extra)
    missing = {k: v for k, v in state.items() if k != "bn.weight"}
    assert "Missing key(s)" in strict_reload_error(build, missing)
    wrong = {**state, "conv.weight": torch.zeros(8, 3, 1, 1)}
    assert "size mismatch" in strict_reload_error(build, wrong)
    # the user's build is called, not mutated: a real build still loads the state afterwards
    build().load_state_dict(state, strict=True)


def test_round_trip_reports_a_collapse_that_does_not_reload(monkeypatch):
    import acfx.tools.diagnostics as diagnostics
    real = diagnostics.collapse

    def with_a_stray_buffer(model, **kwargs):
        out = real(model, **kwargs)
        collapsed = out[0] if isinstance(out, tuple) else out
        collapsed.register_buffer("stray", torch.zeros(1))
        return out

    monkeypatch.setattr(diagnostics, "collapse", with_a_stray_buffer)
    result = check_round_trip("stray", _Broken, torch.randn(2, 3, 16, 16))
    assert result.failure is None and "Unexpected key(s)" in (result.strict_reload or ""), result
    assert not result.ok, result


class _RepNet(nn.Module):
    """A conv→BN stem and a RepVGG-style block of the model's own: the deploy form folds one and fuses the other."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = _Sum()

    def forward(self, x):
        return self.block(self.stem(x))


class _Sum(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.point = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.dense(x) + self.point(x)


def test_deploy_check_of_a_model_with_blocks_of_its_own_is_exact():
    result = check_deploy("rep", _RepNet, torch.randn(2, 3, 12, 12))
    assert result.ok and result.error <= 1e-5, result
    assert len(result.report.of("folded")) == 1 and len(result.report.of("collapsed")) == 1, result.report
    assert result.convs == {"plain": 3, "deployed": 2} and result.norms_left == 0, result


def test_deploy_check_catches_a_wrong_fold(monkeypatch):
    import acfx.passes.fold_bn as fold_bn
    real = fold_bn.fold_into_conv

    def off_by_one_percent(*args, **kwargs):
        weight, bias = real(*args, **kwargs)
        return weight * 1.01, bias

    monkeypatch.setattr(fold_bn, "fold_into_conv", off_by_one_percent)
    result = check_deploy("broken", _RepNet, torch.randn(2, 3, 12, 12))
    assert result.failure is None and result.error > 1e-3 and not result.ok, result
    assert result.float64 is not None and result.float64.error_f64 > 1e-3, result  # not float32 rounding


def test_deploy_check_reports_an_exception_instead_of_raising():
    def broken_build():
        raise RuntimeError("no such model")

    result = check_deploy("missing", broken_build, torch.randn(1, 3, 8, 8))
    assert not result.ok and result.failure == "RuntimeError: no such model", result
