"""Checkpoint conversion: expanded (ACNet) checkpoint → plain one, and plain → expanded.

What `acfx collapse` and `acfx expand` run. The model is rebuilt from its name (timm or torchvision, random
weights), the checkpoint is loaded strictly (nothing is written on a mismatch), and the converted model is
checked against the source model on a random input before anything is saved: it is written only when it
matches to the tolerance, or, where the network amplifies float32 rounding past it, when the conversion
repeated in float64 shows it exact (:func:`acfx.tools.diagnostics.within_rounding`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn as nn

from .checkpoint import Checkpoint, expanded_sites, load_state_dict_strict, read_checkpoint, write_state_dict
from ..passes.collapse import collapse
from .diagnostics import Float64Check, float64_check, output_tensor, relative_error, within_rounding
from ..passes.expand import expand
from .outputs import default_output
from ..passes.report import Report
from .zoo import build_model, fixed_input_size, input_size_for

__all__ = ["Conversion", "collapse_checkpoint", "expand_checkpoint", "build_matching", "default_output"]

CheckpointLike = Union[str, Checkpoint]


def _checkpoint(checkpoint: CheckpointLike, use_ema: bool) -> Checkpoint:
    return checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint, use_ema=use_ema)


@dataclasses.dataclass
class Conversion:
    """What a conversion did and how closely the converted model matches the source."""

    model: str
    source: str
    output: str
    report: Report
    # max|Δ|/max|y| of the converted model against the source model, float32, on a random input.
    error: float
    num_classes: Optional[int]
    tolerance: float
    # Measured only when ``error`` is over the tolerance: the same conversion in float64.
    float64: Optional[Float64Check] = None
    # False when the converted model did not match, and nothing was written.
    written: bool = False

    @property
    def exact(self) -> bool:
        return within_rounding(self.error, self.tolerance, self.float64)


def _classifier_key(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return None
    for name, module in model.named_modules():
        if module is head and hasattr(module, "weight"):
            return f"{name}.weight"
    return None


def build_matching(name: str, state: Mapping[str, torch.Tensor], num_classes: Optional[int] = None,
                   **kwargs) -> nn.Module:
    """The model ``name`` with the number of classes of ``state`` (read off timm's classifier when not given)."""
    if num_classes is not None:
        return build_model(name, num_classes=num_classes, **kwargs)
    model = build_model(name, **kwargs)
    key = _classifier_key(model)
    saved = state.get(key) if key is not None else None
    if saved is not None and saved.ndim >= 1 and saved.shape[0] != model.state_dict()[key].shape[0]:
        return build_model(name, num_classes=int(state[key].shape[0]), **kwargs)
    return model


def _probe(model: nn.Module, name: str) -> torch.Tensor:
    """A random input the model takes: its own size when fixed, else at most 128 px (a fast check)."""
    channels, height, width = input_size_for(model, name)
    size = (height, width) if fixed_input_size(model) else (min(height, 128), min(width, 128))
    return torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(0))


def _verify_and_write(result: Conversion, source: nn.Module, converted: nn.Module,
                      convert: Callable[[nn.Module], nn.Module]) -> Conversion:
    """Compare ``converted`` with ``source`` (in float64 too if float32 is over the tolerance: ``source`` is
    then turned to float64), and write the converted state_dict only if it is exact."""
    x = _probe(source, result.model)
    with torch.no_grad():
        y_source, y_converted = output_tensor(source.eval()(x)), output_tensor(converted.eval()(x))
    result.error = relative_error(y_converted, y_source)
    if result.error > result.tolerance:
        result.float64 = float64_check(source, convert, x, y_source, y_converted)
    if result.exact:
        write_state_dict(converted.state_dict(), result.output)
        result.written = True
    return result


def collapse_checkpoint(checkpoint: CheckpointLike, name: str, output: str, *, use_ema: bool = False,
                        num_classes: Optional[int] = None, fold_bn: bool = False,
                        model_kwargs: Optional[dict] = None, tolerance: float = 1e-5,
                        **expand_kwargs) -> Conversion:
    """Turn a training checkpoint of ``acfx.expand(<name>)`` into a checkpoint of the plain ``name``.

    ``model_kwargs`` go to the model builder; they must be those of training where they change what the
    weights mean (a BN's eps is not stored in the state_dict). ``checkpoint``: a path or a read record."""
    record = _checkpoint(checkpoint, use_ema)
    plain = build_matching(name, record.state, num_classes, **(model_kwargs or {}))
    sites = expanded_sites(record.state)
    if sites and "filter_fn" not in expand_kwargs:  # a conv frozen or excluded in training stayed plain
        expand_kwargs["filter_fn"] = lambda conv, conv_name: conv_name in sites
    expanded = expand(plain, inplace=True, **expand_kwargs)
    load_state_dict_strict(expanded, record.state, record.path)
    collapsed, report = collapse(expanded.eval(), fold_bn=fold_bn, return_report=True)
    result = Conversion(name, record.path, output, report, float("nan"), getattr(plain, "num_classes", None),
                        tolerance)
    return _verify_and_write(result, expanded, collapsed,
                             lambda m: collapse(m, fold_bn=fold_bn, inplace=True))


def expand_checkpoint(checkpoint: CheckpointLike, name: str, output: str, *, use_ema: bool = False,
                      num_classes: Optional[int] = None, model_kwargs: Optional[dict] = None,
                      tolerance: float = 1e-5, **expand_kwargs) -> Conversion:
    """Turn a plain checkpoint of ``name`` into one of ``acfx.expand(name, init="preserve")``."""
    record = _checkpoint(checkpoint, use_ema)
    plain = build_matching(name, record.state, num_classes, **(model_kwargs or {}))
    load_state_dict_strict(plain, record.state, record.path)
    expanded, report = expand(plain, init="preserve", return_report=True, **expand_kwargs)
    result = Conversion(name, record.path, output, report, float("nan"), getattr(plain, "num_classes", None),
                        tolerance)
    return _verify_and_write(result, plain, expanded,
                             lambda m: expand(m, init="preserve", inplace=True, **expand_kwargs))
