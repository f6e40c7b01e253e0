"""Checkpoint conversion: expanded (ACNet) checkpoint → plain one, and plain → expanded; a checkpoint of a
model with its own re-parameterisable blocks (RepVGG, MobileOne, ...) in train-time form → its deploy form.

What `acfx collapse` and `acfx expand` run. The model is rebuilt from its name (timm or torchvision, random
weights), the checkpoint is loaded strictly (nothing is written on a mismatch), and the converted model is
checked against the source model on a random input before anything is saved: it is written only when it
matches to the tolerance, or, where the network amplifies float32 rounding past it, when the conversion
repeated in float64 shows it exact (:func:`acfx.tools.diagnostics.within_rounding`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..passes.collapse import collapse
from ..passes.expand import expand
from ..passes.report import Report
from .checkpoint import (
    Checkpoint,
    expanded_mode,
    expanded_sites,
    load_into_expanded,
    load_state_dict_strict,
    read_checkpoint,
    write_state_dict,
)
from .container_writing import Dropped, check_container_output, write_container
from .diagnostics import (
    Float64Check,
    float64_check,
    output_tensor,
    over_tolerance,
    relative_error,
    within_rounding,
)
from .outputs import default_output
from .zoo import build_model, fixed_input_size, input_size_for

__all__ = ["Conversion", "collapse_checkpoint", "expand_checkpoint", "build_matching", "default_output"]

CheckpointLike = Union[str, Checkpoint]


@dataclasses.dataclass
class _Source:
    """How to read a checkpoint given by its path: the model it is of, and the choices of the caller."""

    name: str
    num_classes: Optional[int]
    model_kwargs: dict
    use_ema: bool
    checkpoint_key: Optional[str]
    prefix: Optional[str]


def _checkpoint(checkpoint: CheckpointLike, source: _Source) -> Checkpoint:
    """A read record as it is; a path read once, the weights found by the keys of the plain model."""
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    classes = {} if source.num_classes is None else {"num_classes": source.num_classes}
    model = build_model(source.name, **classes, **source.model_kwargs)
    return read_checkpoint(checkpoint, source.use_ema, model=model, checkpoint_key=source.checkpoint_key,
                           prefix=source.prefix)


def _check_output(record: Checkpoint, output: str, keep_container: bool) -> None:
    if keep_container:
        check_container_output(record, output)


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
    # Where in the checkpoint the weights were read: "state_dict['model.'] (Lightning checkpoint, 122 tensors)".
    read: Optional[str] = None
    # With keep_container: the container's entries not carried over as they were (optimizer states, EMA copies).
    dropped: List[Dropped] = dataclasses.field(default_factory=list)
    # True when the checkpoint held the model as built, and what collapsed were its own blocks (no acfx ones).
    own_blocks: bool = False
    # The converted model and an input it was checked on (to export it); None until checked.
    converted: Optional[nn.Module] = dataclasses.field(default=None, repr=False)
    probe: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)

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
                      convert: Callable[[nn.Module], nn.Module], record: Checkpoint,
                      keep_container: bool) -> Conversion:
    """Compare ``converted`` with ``source`` (in float64 too if float32 is over the tolerance: ``source`` is
    then turned to float64), and write the converted state_dict only if it is exact: plain, or in the
    record's container (``keep_container``)."""
    x = _probe(source, result.model)
    with torch.no_grad():
        y_source, y_converted = output_tensor(source.eval()(x)), output_tensor(converted.eval()(x))
    result.error = relative_error(y_converted, y_source)
    result.converted, result.probe = converted, x
    if over_tolerance(result.error, result.tolerance):
        result.float64 = float64_check(source, convert, x, y_source, y_converted)
    if result.exact:
        if keep_container:
            result.dropped = write_container(record, converted.state_dict(), result.output)
        else:
            write_state_dict(converted.state_dict(), result.output)
        result.written = True
    return result


def collapse_checkpoint(checkpoint: CheckpointLike, name: str, output: str, *, use_ema: bool = False,
                        num_classes: Optional[int] = None, fold_bn: bool = False,
                        model_kwargs: Optional[dict] = None, tolerance: float = 1e-5,
                        checkpoint_key: Optional[str] = None, prefix: Optional[str] = None,
                        keep_container: bool = False, **expand_kwargs) -> Conversion:
    """Turn a training checkpoint of ``acfx.expand(<name>)`` into a checkpoint of the plain ``name``.

    ``model_kwargs`` go to the model builder; they must be those of training where they change what the
    weights mean (a BN's eps is not stored in the state_dict). ``checkpoint``: a path (file or directory;
    the weights are found by the model's keys, see :func:`acfx.tools.state_location.locate_state`, with
    ``use_ema``, ``checkpoint_key`` and ``prefix`` to choose) or a read record. ``keep_container``: write the
    input's container with the collapsed weights in place (see :func:`acfx.tools.container_writing.write_container`)
    instead of a plain state_dict."""
    model_kwargs = dict(model_kwargs or {})
    record = _checkpoint(checkpoint, _Source(name, num_classes, model_kwargs, use_ema, checkpoint_key, prefix))
    _check_output(record, output, keep_container)
    plain = build_matching(name, record.state, num_classes, **model_kwargs)
    if _holds_the_model_as_built(plain, record.state):
        return _collapse_own_blocks(plain, record, name, output, fold_bn, tolerance, keep_container)
    sites = expanded_sites(record.state)
    if sites and "filter_fn" not in expand_kwargs:  # a conv frozen or excluded in training stayed plain
        expand_kwargs["filter_fn"] = lambda conv, conv_name: conv_name in sites
    expanded, expanded_report = expand(plain, inplace=True, return_report=True, **expand_kwargs)
    load_into_expanded(expanded, expanded_report, record.state, record.source)
    # acfx's blocks only: the output is the checkpoint of the model as built (its own rep blocks as trained)
    collapsed, report = collapse(expanded.eval(), blocks="acfx", fold_bn=fold_bn, return_report=True)
    result = Conversion(name, record.path, output, report, float("nan"), getattr(plain, "num_classes", None),
                        tolerance, read=record.describe())
    return _verify_and_write(result, expanded, collapsed,
                             lambda m: collapse(m, blocks="acfx", fold_bn=fold_bn, inplace=True), record,
                             keep_container)


def _holds_the_model_as_built(plain: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """A checkpoint of ``plain`` itself, no acfx block in it: every key and shape the model's own."""
    expected = plain.state_dict()
    return (expanded_mode(state) is None and set(state) == set(expected)
            and all(tuple(state[k].shape) == tuple(v.shape) for k, v in expected.items()))


def _collapse_own_blocks(plain: nn.Module, record: Checkpoint, name: str, output: str, fold_bn: bool,
                         tolerance: float, keep_container: bool) -> Conversion:
    """The deploy form of a model trained with its own re-parameterisable blocks (timm's RepVGG, MobileOne,
    FastViT, ...): the checkpoint loaded into the model as built, and the blocks collapse finds fused."""
    load_state_dict_strict(plain, record.state, record.source)
    collapsed, report = collapse(plain.eval(), fold_bn=fold_bn, return_report=True)
    if not report.of("collapsed") and not report.of("folded"):
        raise ValueError(f"{record.path} holds a plain {name} (no acfx blocks in it), and collapse finds no "
                         "re-parameterisable block in it: there is nothing to collapse. A checkpoint of "
                         f"acfx.expand({name}) has keys ending in .layout; was this one written before training?")
    result = Conversion(name, record.path, output, report, float("nan"), getattr(plain, "num_classes", None),
                        tolerance, read=record.describe(), own_blocks=True)
    return _verify_and_write(result, plain, collapsed, lambda m: collapse(m, fold_bn=fold_bn, inplace=True),
                             record, keep_container)


def expand_checkpoint(checkpoint: CheckpointLike, name: str, output: str, *, use_ema: bool = False,
                      num_classes: Optional[int] = None, model_kwargs: Optional[dict] = None,
                      tolerance: float = 1e-5, checkpoint_key: Optional[str] = None, prefix: Optional[str] = None,
                      keep_container: bool = False, **expand_kwargs) -> Conversion:
    """Turn a plain checkpoint of ``name`` into one of ``acfx.expand(name, init="preserve")``; the
    checkpoint and the options as in :func:`collapse_checkpoint`."""
    model_kwargs = dict(model_kwargs or {})
    record = _checkpoint(checkpoint, _Source(name, num_classes, model_kwargs, use_ema, checkpoint_key, prefix))
    _check_output(record, output, keep_container)
    plain = build_matching(name, record.state, num_classes, **model_kwargs)
    load_state_dict_strict(plain, record.state, record.source)
    expanded, report = expand(plain, init="preserve", return_report=True, **expand_kwargs)
    result = Conversion(name, record.path, output, report, float("nan"), getattr(plain, "num_classes", None),
                        tolerance, read=record.describe())
    return _verify_and_write(result, plain, expanded,
                             lambda m: expand(m, init="preserve", inplace=True, **expand_kwargs), record,
                             keep_container)
