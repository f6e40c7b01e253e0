"""The one linear map a region of a traced graph computes, from the model's tensors, in float64.

The region finder (matching/find_linear_regions.py) says which nodes form a block; here each node is
applied to the map of its inputs with the algebra of layers/linear_map.py: a conv composes, a BN or a
constant scale and shift is affine, DBB's BNAndPadLayer pads with its bias, pooling is a depthwise conv, a
sum adds maps over one window. Weights computed from parameters (OREPA's, DBB's identity-based 1×1) are
evaluated once. The result is a map, or the reason the region is not one conv exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from ..layers.geometry import Window, same_window
from ..layers.linear_map import ConvMap, Inexact, add, compose
from ..layers.norms import fusion_dtype
from ..layers.stage_maps import apply_module, conv_map, pool_map
from ..matching.find_linear_regions import LinearRegion
from ..matching.known_layers import bias_padded_norm
from ..matching.linear_ops import LinearOp
from ..matching.tracing import TracedPart

__all__ = ["RegionMap", "region_map", "evaluate_constants"]


@dataclasses.dataclass(frozen=True)
class RegionMap:
    """The map a region computes, and the padding mode its convs pad the region's input with."""

    map: ConvMap
    padding_mode: str = "zeros"
    # 1 when the region's convs are 1-d (read as 2-d maps of height 1): the fused conv is an nn.Conv1d.
    dims: int = 2


@dataclasses.dataclass(frozen=True)
class _Form:
    """A node's value: ``map`` of the region's source, or the source itself (None) read through ``window``."""

    map: Optional[ConvMap]
    window: Window = Window()



def evaluate_constants(part: TracedPart, nodes, dtype: torch.dtype) -> Dict[fx.Node, object]:
    """The values of constant nodes (parameters, buffers and what the forward computes from them), once."""
    values: Dict[fx.Node, object] = {}
    with torch.no_grad():
        for node in nodes:
            args = fx.node.map_arg(node.args, values.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
            if node.op == "get_attr":
                value = part.attribute(node.target)
                if isinstance(value, torch.Tensor):
                    value = value.detach().to(dtype) if value.is_floating_point() else value.detach()
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            else:
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            values[node] = value
    return values


def _channel_vector(value, channels: int, like: torch.Tensor) -> Union[torch.Tensor, Inexact]:
    """A per-channel vector of a constant broadcast over an NCHW map: a number, [C], [C,1,1] or [1,C,1,1]."""
    if isinstance(value, (int, float)):
        return torch.full((channels,), float(value), dtype=like.dtype, device=like.device)
    if not isinstance(value, torch.Tensor):
        return Inexact(f"a constant of type {type(value).__name__}")
    shape = tuple(value.shape)
    if value.numel() == 1:
        return value.reshape(1).to(like.dtype).expand(channels).clone()
    if shape in ((channels,), (channels, 1, 1), (1, channels, 1, 1)):
        return value.reshape(channels).to(like.dtype)
    return Inexact(f"a constant of shape {list(shape)} is not per channel: one conv cannot add or scale it")


def _materialise(form: _Form, channels: Optional[int], like: torch.Tensor) -> Union[ConvMap, Inexact]:
    if form.map is not None:
        return form.map
    if channels is None:
        return Inexact("the number of channels of the block's input is not known (no conv or BN reads it)")
    return ConvMap.identity(channels, like).reading(form.window)


_PRESERVING = ("identity", "pad", "value_pad", "crop", "shift", "scale", "pool", "norm", "bias_padded_norm")


def _source_channels(region: LinearRegion) -> Optional[int]:
    """The channels of the region's input: read off the first conv or BN that reads it (through ops that keep
    the channels), or off a per-channel constant added to or multiplying it."""
    keeping = {region.source}
    for op in region.ops:
        if not all(i in keeping for i in op.inputs):
            continue
        module = op.module
        if module is not None:
            padded = bias_padded_norm(module)
            channels = getattr(module, "in_channels", None) or getattr(module, "num_features", None) or (
                padded.norm.num_features if padded is not None else None)
            if channels:
                return int(channels)
        if op.kind == "function_conv":
            return None  # read off the evaluated weight by the caller
        if op.kind in _PRESERVING:
            keeping.add(op.node)
    return None


def _conv_padding(padding, kernel, dilation) -> Union[Window, Inexact]:
    if isinstance(padding, str):
        return Window() if padding == "valid" else same_window(kernel, dilation) if padding == "same" else \
            Inexact(f"padding={padding!r}")
    ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return Window(ph, ph, pw, pw)


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def _single(value) -> int:
    """A conv1d argument (an int or a 1-tuple) as an int."""
    return value if isinstance(value, int) else value[0]


class _Evaluator:
    def __init__(self, region: LinearRegion, part: TracedPart, like: torch.Tensor) -> None:
        self.region, self.part, self.like = region, part, like
        self.constants = evaluate_constants(part, region.constants, like.dtype)
        self.channels = _source_channels(region) or self._constant_channels()
        self.values: Dict[fx.Node, _Form] = {region.source: _Form(None)}
        # (padding mode, own window, crop) of each conv reading the region's input directly.
        self.reads = []
        self.dims = set()  # of the convs (1 or 2)

    def run(self) -> Union[RegionMap, Inexact]:
        for op in self.region.ops:
            form = self._apply(op)
            if isinstance(form, Inexact):
                return form if op.kind == "unknown_conv" else Inexact(f"{op.node.name}: {form.reason}")
            self.values[op.node] = form
        found = _materialise(self.values[self.region.output], self.channels, self.like)
        if isinstance(found, Inexact):
            return found
        if len(self.dims) > 1:
            return Inexact("the block mixes 1-d and 2-d convolutions")
        mode = self._padding_mode()
        return mode if isinstance(mode, Inexact) else RegionMap(found, mode, self.dims.pop() if self.dims else 2)

    def _padding_mode(self) -> Union[str, Inexact]:
        """The one mode the convs pad the input with. A non-zero mode (reflect, replicate, circular) maps every
        padded index back into the input, per axis: convs padding that way on an axis they do not crop read
        what one conv padding that way reads."""
        padding = [(mode, window, crop) for mode, window, crop in self.reads if not window.positive().is_zero]
        modes = {mode for mode, _, _ in padding}
        if len(modes) > 1:
            return Inexact(f"branches pad in different modes {sorted(modes)}")
        mode = modes.pop() if modes else "zeros"
        if mode == "zeros":
            return mode
        for _, window, crop in padding:
            if (window.top > 0 or window.bottom > 0) and (crop.top < 0 or crop.bottom < 0) or \
                    (window.left > 0 or window.right > 0) and (crop.left < 0 or crop.right < 0):
                return Inexact(f"a branch crops its input and pads it with padding_mode={mode!r} along the same "
                               "axis; one conv cannot read that")
        return mode

    def _constant_channels(self) -> Optional[int]:
        """The input's channels from what the region reads of it: a functional conv's weight, a per-channel
        constant added or multiplied before any conv."""
        for op in self.region.ops:
            value = self._constant(op.constant) if op.constant is not None else None
            if op.kind == "function_conv" and isinstance(value, torch.Tensor):
                return int(value.shape[1] * op.arguments[3])
            if op.kind in ("shift", "scale") and isinstance(value, torch.Tensor) and value.numel() > 1:
                return int(value.numel())
        return None

    def _constant(self, value):
        return self.constants[value] if isinstance(value, fx.Node) else value

    def _apply(self, op: LinearOp) -> Union[_Form, Inexact]:
        inputs = [self.values[i] for i in op.inputs]
        first = inputs[0]
        if op.kind == "identity":
            return first
        if op.kind == "conv":
            self.dims.add(1 if isinstance(op.module, nn.Conv1d) else 2)
        if op.kind == "conv" and first.map is None:
            return self._direct_conv(op, first)
        if op.kind in ("conv", "norm"):
            found = apply_module(first.map, op.module, self.part.qualify(op.node.target), self.like)
            if isinstance(found, Inexact) or found is None:
                return found or first
            return _Form(found if first.map is not None else found.reading(first.window))
        if op.kind == "bias_padded_norm":
            padded = bias_padded_norm(op.module)
            norm = apply_module(first.map, padded.norm, self.part.qualify(op.node.target), self.like)
            if isinstance(norm, Inexact):
                return norm
            norm = norm if first.map is not None else norm.reading(first.window)
            pixels = padded.pixels
            found = norm.pad_output(Window(pixels, pixels, pixels, pixels)) if pixels > 0 else norm
            return found if isinstance(found, Inexact) else _Form(found)
        if op.kind == "pool":
            return self._pool(op, first)
        if op.kind in ("pad", "crop"):
            return self._window(op, first)
        if op.kind == "value_pad":
            return self._value_pad(op, first)
        if op.kind in ("shift", "scale"):
            return self._affine(op, first)
        if op.kind in ("add", "sub"):
            return self._add(op, inputs)
        if op.kind == "function_conv":
            return self._function_conv(op, first)
        if op.kind == "unknown_conv":
            return Inexact(op.arguments[0])
        return Inexact(f"a {op.kind} op acfx does not evaluate")

    def _direct_conv(self, op: LinearOp, first: _Form) -> Union[_Form, Inexact]:
        """A conv reading the region's input: its padding mode is the region's (checked in the end)."""
        conv = op.module
        mode = getattr(conv, "padding_mode", "zeros")
        found = conv_map(conv, self.like.dtype, any_mode=True)
        if isinstance(found, Inexact):
            return Inexact(f"{self.part.qualify(op.node.target)}: {found.reason}")
        self.reads.append((mode, found.window, first.window))
        return _Form(found.reading(first.window))

    def _pool(self, op: LinearOp, first: _Form) -> Union[_Form, Inexact]:
        pool = op.module
        channels = first.map.out_channels if first.map is not None else self.channels
        if channels is None:
            return Inexact("average pooling of an input whose channels are not known")
        found = pool_map(pool, channels, self.like)
        if isinstance(found, Inexact):
            return Inexact(f"{op.node.name}: {found.reason}")
        if first.map is None:
            return _Form(found.reading(first.window))
        composed = compose(first.map, found)
        return composed if isinstance(composed, Inexact) else _Form(composed)

    def _value_pad(self, op: LinearOp, first: _Form) -> Union[_Form, Inexact]:
        """A pad with a per-channel value: one conv when the value is the (pointwise) map's own bias, the
        map's output outside its input (up to float32 rounding of the code that computed the value)."""
        left, right, top, bottom = op.arguments
        value = self._constant(op.constant)
        if first.map is None:
            return Inexact("a pad of the block's input with a value: the fused conv pads with zeros")
        channels = first.map.out_channels
        if not isinstance(value, torch.Tensor) or value.dim() > 4 or \
                tuple((1, 1, 1, 1) + tuple(value.shape))[-4:] not in ((1, channels, 1, 1), (1, 1, 1, 1)):
            return Inexact("a pad with a value that is not one number per channel")
        value = value.detach().reshape(-1).to(self.like.dtype).expand(channels)
        bias = first.map.bias.detach() if first.map.bias is not None else torch.zeros_like(value)
        scale = float(bias.abs().max()) if bias.numel() else 0.0
        if not torch.allclose(value, bias, rtol=1e-6, atol=1e-6 * scale):
            return Inexact("a pad with a value other than the padded map's own bias (what a conv reading a "
                           "zero-padded input gives there)")
        found = first.map.pad_output(Window(top, bottom, left, right))
        return found if isinstance(found, Inexact) else _Form(found)

    def _window(self, op: LinearOp, first: _Form) -> Union[_Form, Inexact]:
        if op.kind == "pad":
            left, right, top, bottom = op.arguments
            pad = Window(top, bottom, left, right)
            if first.map is None:
                self.reads.append(("zeros", pad, first.window))
                return _Form(None, first.window + pad)
            if first.map.pointwise and (first.map.bias is None or not bool((first.map.bias != 0).any())):
                return _Form(first.map.reading(pad))
            return Inexact("a zero pad of a map that is not zero on the border (a bias, or a wider kernel)")
        crop = op.arguments[0]
        if first.map is None:
            return _Form(None, first.window - crop)
        sh, sw = first.map.stride
        return _Form(first.map.reading(Window(-crop.top * sh, -crop.bottom * sh, -crop.left * sw, -crop.right * sw)))

    def _affine(self, op: LinearOp, first: _Form) -> Union[_Form, Inexact]:
        base = _materialise(first, self.channels, self.like)
        if isinstance(base, Inexact):
            return base
        vector = _channel_vector(self._constant(op.constant), base.out_channels, self.like)
        if isinstance(vector, Inexact):
            return vector
        inverse = op.arguments == (-1,)
        if op.kind == "shift":
            return _Form(base.then_affine(None, -vector if inverse else vector))
        if inverse and not bool((vector != 0).all()):
            return Inexact("a division by zero")
        return _Form(base.then_affine(1.0 / vector if inverse else vector, None))

    def _add(self, op: LinearOp, inputs) -> Union[_Form, Inexact]:
        maps = [_materialise(f, self.channels if self.channels is not None else
                             next((g.map.out_channels for g in inputs if g.map is not None), None), self.like)
                for f in inputs]
        for found in maps:
            if isinstance(found, Inexact):
                return found
        if op.kind == "sub":
            maps[1] = maps[1].then_affine(-torch.ones(maps[1].out_channels, dtype=self.like.dtype,
                                                      device=self.like.device), None)
        summed = add(maps)
        return summed if isinstance(summed, Inexact) else _Form(summed)

    def _function_conv(self, op: LinearOp, first: _Form) -> Union[_Form, Inexact]:
        weight = self._constant(op.constant)
        bias = self._constant(op.bias) if op.bias is not None else None
        stride, padding, dilation, groups = op.arguments
        self.dims.add(weight.dim() - 2)
        if weight.dim() == 3:  # F.conv1d: a 2-d conv of height 1
            weight, stride, dilation = weight.unsqueeze(2), (1, _single(stride)), (1, _single(dilation))
            padding = padding if isinstance(padding, str) else (0, _single(padding))
        window = _conv_padding(padding, tuple(weight.shape[-2:]), _pair(dilation))
        if isinstance(window, Inexact):
            return window
        found = ConvMap(weight, bias, _pair(stride), _pair(dilation), groups, window)
        if first.map is None:
            return _Form(found.reading(first.window))
        composed = compose(first.map, found)
        return composed if isinstance(composed, Inexact) else _Form(composed)


def region_map(region: LinearRegion, part: TracedPart) -> Union[RegionMap, Inexact]:
    """The map ``region`` of ``part`` computes in eval (float64), or why it is not one conv exactly."""
    device = next((t.device for t in part.module.parameters()), torch.device("cpu"))
    like = torch.empty(0, dtype=fusion_dtype(device), device=device)
    return _Evaluator(region, part, like).run()

