"""Round-trip checks of a model: what `acfx check` and benchmarks/coverage.py measure.

Expand, take a training step, randomise every BN (fresh statistics make BN an identity and hide fusion
errors), collapse, compare outputs, and reload the collapsed weights strictly into a fresh model.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from ..layers.block import ACBlock, NormTail
from ..passes.collapse import collapse
from ..passes.expand import expand
from ..passes.report import Report

__all__ = ["randomize_norms", "relative_error", "RoundTrip", "check_round_trip", "param_count", "Float64Check",
           "float64_check", "within_rounding", "over_tolerance", "saved_activation_bytes", "strict_reload_error",
           "load_error", "output_tensor", "randomized_output"]

F64_TOLERANCE = 1e-10


def randomize_norms(model: nn.Module, seed: int = 0, gamma: float = 1.0) -> nn.Module:
    """Random running statistics and affine parameters on every BatchNorm, in place.

    γ is drawn from [0.5, 1.5]·``gamma``: a smaller ``gamma`` keeps very deep networks' activations finite.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.running_mean is None:
                continue
            n, ref = module.num_features, module.running_mean
            module.running_mean.copy_(torch.randn(n, generator=gen).mul_(0.2).to(ref))
            module.running_var.copy_(torch.rand(n, generator=gen).mul_(1.5).add_(0.5).to(ref))
            if module.affine:
                module.weight.copy_(torch.rand(n, generator=gen).add_(0.5).mul_(gamma).to(module.weight))
                if module.bias is not None:  # BatchNorm2d(bias=False), torch ≥ 2.12
                    module.bias.copy_(torch.randn(n, generator=gen).mul_(0.2).to(module.bias))
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual − expected| / max|expected|."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def saved_activation_bytes(run: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``run()`` executes.

    The activation memory of a training forward, the same on any device (unlike a peak-memory reading);
    storages of ``exclude`` (parameters, the input) are not counted.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


@dataclasses.dataclass
class Float64Check:
    """A conversion repeated in float64, to tell float32 rounding (amplified by a deep network) from an error."""

    # The float64 converted model against the float64 source model.
    error_f64: float
    # The float32 source model against its own float64 result: the network's float32 noise floor.
    noise_f32: float
    # The float32 converted model against the float64 source model.
    converted_vs_f64: float
    # The float32 converted model against its own float64 result: its float32 noise floor. The two models
    # round differently (a fused kernel is not its branches), so their float32 outputs may differ by the
    # sum of both floors; the larger one bounds what rounding alone explains.
    converted_noise_f32: float = 0.0

    @property
    def noise_floor(self) -> float:
        return max(self.noise_f32, self.converted_noise_f32)


def float64_check(source: nn.Module, convert: Callable[[nn.Module], nn.Module], x: torch.Tensor,
                  y_source: torch.Tensor, y_converted: torch.Tensor) -> Float64Check:
    """Run ``convert`` again on ``source`` in float64 and compare. Turns ``source`` to float64 in place
    (callers no longer need its float32 weights, and a large model must not be held twice)."""
    source.double()
    with torch.no_grad():
        truth = output_tensor(source(x.double()))
        converted = output_tensor(convert(source)(x.double()))
    return Float64Check(relative_error(converted, truth), relative_error(y_source, truth),
                        relative_error(y_converted, truth), relative_error(y_converted, converted))


def over_tolerance(error: float, tolerance: float) -> bool:
    """Whether an error calls for the float64 repetition: over ``tolerance``, or not finite (a float32
    output that overflowed to inf or NaN says nothing about the conversion; float64 does)."""
    return not error <= tolerance


def within_rounding(error: float, tolerance: float, check: Optional[Float64Check]) -> bool:
    """Whether a float32 conversion error is exactness up to rounding.

    Within ``tolerance``; or, when a network amplifies float32 rounding beyond it (deep networks with
    random or barely trained BN statistics do), within 4× of the float32 noise floor (the larger of the two
    models' own distances to their float64 results), or exact to ``F64_TOLERANCE`` when the same conversion
    is repeated in float64."""
    if error <= tolerance:
        return True
    if check is None:
        return False
    return error <= 4 * check.noise_floor or check.error_f64 <= F64_TOLERANCE


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
    # Measured only when the float32 error is over the tolerance, to tell float32 noise from a fusion error:
    # the round trip in float64, and how far the float32 expanded / collapsed models are from float64 truth.
    error_f64: Optional[float] = None
    noise_f32: Optional[float] = None
    collapsed_vs_f64: Optional[float] = None
    collapsed_noise_f32: Optional[float] = None  # the float32 collapsed model against its own float64 result

    # Largest error of one fused layer against its block, on the input the block saw (float32).
    local_error: float = float("nan")
    # γ scale of the random BN statistics (below 1 when the first draw made the outputs non-finite).
    gamma_scale: float = 1.0

    @property
    def exact(self) -> bool:
        """Every fused layer reproduces its block to the tolerance, and so does the whole model, unless the
        network itself amplifies rounding beyond it (random BN statistics make deep networks ill-conditioned).
        Then the float32 difference counts as rounding when it is within 4× of the float32 noise floor (the
        larger of ``noise_f32`` and ``collapsed_noise_f32``, each model's own distance to its float64
        result), or when the same round trip in float64 agrees
        to ``F64_TOLERANCE``: the fusion is exact, and float32 only rounds its weights, which the per-layer
        check bounds."""
        if not self.local_error <= self.tolerance:
            return False
        check = None
        if self.error_f64 is not None or self.noise_f32 is not None:
            check = Float64Check(_or_inf(self.error_f64), self.noise_f32 or 0.0, _or_inf(self.collapsed_vs_f64),
                                 self.collapsed_noise_f32 or 0.0)
        return within_rounding(self.error, self.tolerance, check)

    @property
    def ok(self) -> bool:
        reload_ok = self.strict_reload is None or self.structure_changed
        return (self.failure is None and self.class_kept and self.train_step_finite and self.exact
                and reload_ok)

    @property
    def structure_changed(self) -> bool:
        """True when collapse was expected to change structure (convs without BN gained a bias)."""
        return bool(self.collapse_report and self.collapse_report.structure_changes)


def _or_inf(value: Optional[float]) -> float:
    return float("inf") if value is None else value


def output_tensor(out: object) -> torch.Tensor:
    """One tensor of a model's output: itself, or its tensors flattened and joined (a segmentation model's
    dict, a feature extractor's list)."""
    if isinstance(out, torch.Tensor):
        return out
    values = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else None
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        raise TypeError(f"the model returns {type(out).__name__}, not tensors acfx check can compare")
    return torch.cat([v.flatten(1) for v in values], dim=1)


def randomized_output(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """(output, γ scale): the eval output of ``model`` on ``x`` after randomize_norms, with γ scaled down
    while the output is not finite (random statistics can overflow very deep networks)."""
    with torch.no_grad():
        for gamma in (1.0, 0.5, 0.25):
            y = output_tensor(randomize_norms(model, gamma=gamma)(x))
            if torch.isfinite(y).all():
                break
    return y, gamma


def _train_step(model: nn.Module, x: torch.Tensor) -> bool:
    model.train()
    model.zero_grad(set_to_none=True)
    out = output_tensor(model(x))
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
    expanded.eval()
    y_expanded, result.gamma_scale = randomized_output(expanded, x)
    # acfx's blocks: the round trip gives back the model as built (its own rep blocks too, as they were)
    collapsed, result.collapse_report = collapse(expanded, blocks="acfx", return_report=True)
    result.params["collapsed"] = param_count(collapsed)
    with torch.no_grad():
        y_collapsed = output_tensor(collapsed(x))
        result.local_error = _local_error(expanded, collapsed, x)
    result.error = relative_error(y_collapsed, y_expanded)
    state = collapsed.state_dict()
    del collapsed  # the float64 repetition below needs the memory more than the collapsed copy does
    result.strict_reload = strict_reload_error(build, state)
    del state
    if over_tolerance(result.error, result.tolerance):
        _measure_float64(result, expanded, y_expanded, y_collapsed, x)


def strict_reload_error(build: Callable[[], nn.Module], state: Dict[str, torch.Tensor]) -> Optional[str]:
    """Why ``state`` does not load strictly into a freshly built model, or None.

    The model is built on the meta device where its constructor allows (keys and shapes are checked the
    same way, and a model of billions of parameters costs no memory a second time); else on the CPU.
    """
    try:
        with torch.device("meta"):
            fresh, assign = build(), True
    except Exception:  # a constructor that computes with its tensors: build it for real
        fresh, assign = build(), False
    return load_error(fresh, state, assign=assign)


def load_error(model: nn.Module, state: Dict[str, torch.Tensor], assign: bool = False) -> Optional[str]:
    """Why ``state`` does not load strictly into ``model`` (load_state_dict's message on one line), or None."""
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as error:
        return " ".join(str(error).split())[:400]
    return None


def _local_error(expanded: nn.Module, collapsed: nn.Module, x: torch.Tensor) -> float:
    """Max over blocks of the fused layer's error on the block's own input (no amplification by depth).

    A block's NormTail (its BN slot) is found as the module whose input is the block's output tensor.
    """
    seen: Dict[str, tuple] = {}
    alive = []  # keeps the recorded tensors alive, so that their ids stay unique

    def record(name, args, out):  # copies: later in-place ops (ReLU(inplace=True)) would change them
        alive.extend((args[0], out))
        seen[name] = (id(args[0]), args[0].clone(), id(out), out.clone())

    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: record(name, args, out))
             for name, m in expanded.named_modules() if isinstance(m, (ACBlock, NormTail))]
    try:
        expanded(x)
    finally:
        for hook in hooks:
            hook.remove()
    tails = {ids: name for name, (ids, *_) in seen.items() if isinstance(expanded.get_submodule(name), NormTail)}
    worst = 0.0
    for name, (_, inp, out_id, out) in seen.items():
        if not isinstance(expanded.get_submodule(name), ACBlock):
            continue
        y = collapsed.get_submodule(name)(inp)
        tail = tails.get(out_id)
        if tail is not None:
            y, out = collapsed.get_submodule(tail)(y), seen[tail][3]
        worst = max(worst, relative_error(y, out))
    return worst


def _measure_float64(result: RoundTrip, expanded: nn.Module, y_expanded, y_collapsed, x) -> None:
    """The float64 round trip and the float32 noise floor of this network."""
    check = float64_check(expanded, lambda m: collapse(m, blocks="acfx", inplace=True), x, y_expanded, y_collapsed)
    result.error_f64, result.noise_f32 = check.error_f64, check.noise_f32
    result.collapsed_vs_f64, result.collapsed_noise_f32 = check.converted_vs_f64, check.converted_noise_f32
