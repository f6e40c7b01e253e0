"""Round trips over conv geometries: kernel shapes, stride, dilation, groups, padding and padding modes."""
import pytest
import torch
import torch.nn as nn
from timm.layers import Conv2dSame

import acfx
from acfx.layers.geometry import Window
from acfx.layers.padding import DynamicSamePad2d

from helpers import assert_rel_close, randomize_bn

# (kernel, stride, padding, dilation, groups, padding_mode)
GEOMETRIES = [
    ((3, 3), 1, 1, 1, 1, "zeros"),        # the common case: every branch pads by itself
    ((3, 3), 2, 1, 1, 1, "zeros"),
    ((3, 3), 1, 0, 1, 1, "zeros"),        # padding 0: asymmetric branches crop
    ((5, 5), 1, 1, 1, 1, "zeros"),        # padding < k//2: crop, as the reference does
    ((5, 5), 2, 2, 1, 1, "zeros"),
    ((7, 7), 2, 3, 1, 1, "zeros"),
    ((3, 5), 1, (1, 2), 1, 1, "zeros"),
    ((5, 3), 2, (0, 1), 1, 1, "zeros"),
    ((2, 2), 2, 0, 1, 1, "zeros"),        # even kernels: channels split between the middle rows
    ((4, 4), 2, 1, 1, 1, "zeros"),
    ((2, 3), 1, (0, 1), 1, 1, "zeros"),
    ((4, 4), 1, "same", 1, 1, "zeros"),   # asymmetric 'same' padding of an even kernel
    ((2, 2), 1, "same", 2, 1, "zeros"),
    ((3, 3), 1, "same", 2, 1, "zeros"),
    ((3, 3), 1, "valid", 1, 1, "zeros"),
    ((3, 3), 1, 2, 2, 1, "zeros"),        # dilation
    ((3, 3), 2, 1, 2, 4, "zeros"),        # dilation + stride + groups
    ((3, 3), 1, 1, 1, 8, "zeros"),        # depthwise
    ((5, 5), 2, 2, 1, 8, "zeros"),        # depthwise, strided
    ((3, 3), 1, 1, 1, 1, "reflect"),      # non-zero modes: padded once before the branches
    ((3, 3), 2, 1, 1, 1, "replicate"),
    ((3, 3), 1, 1, 1, 1, "circular"),
    ((5, 5), 1, 1, 1, 1, "reflect"),      # reflect + crop
    ((4, 4), 1, 1, 1, 1, "circular"),     # circular + even kernel
    ((3, 3), 1, "same", 1, 4, "replicate"),
]


def _ids(geom):
    k, s, p, d, g, mode = geom
    return f"k{k[0]}x{k[1]}-s{s}-p{p}-d{d}-g{g}-{mode}"


def _conv_bn(geom, bias=False, dtype=torch.float32):
    k, s, p, d, g, mode = geom
    conv = nn.Conv2d(8, 8, k, s, p, d, g, bias=bias, padding_mode=mode)
    return nn.Sequential(conv, nn.BatchNorm2d(8)).to(dtype)


def _round_trip(model, x):
    expanded = randomize_bn(acfx.expand(model), seed=3).eval()
    collapsed = acfx.collapse(expanded)
    with torch.no_grad():
        return expanded(x), collapsed(x), collapsed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=_ids)
def test_round_trip_is_exact(geom, dtype):
    torch.manual_seed(0)
    model = _conv_bn(geom, dtype=dtype)
    for size in ((11, 12), (12, 11)):  # odd and even input sizes
        x = torch.randn(2, 8, *size, dtype=dtype)
        y_expanded, y_collapsed, collapsed = _round_trip(model, x)
        assert_rel_close(y_collapsed, y_expanded, what=f"{_ids(geom)} input {size}")


@pytest.mark.parametrize("geom", GEOMETRIES, ids=_ids)
def test_collapse_gives_back_the_original_conv(geom):
    model = _conv_bn(geom, bias=True)
    collapsed = acfx.collapse(randomize_bn(acfx.expand(model)).eval())
    conv, original = collapsed[0], model[0]
    assert type(conv) is nn.Conv2d and type(collapsed[1]) is nn.BatchNorm2d
    for attr in ("kernel_size", "stride", "dilation", "groups", "in_channels", "out_channels"):
        assert getattr(conv, attr) == getattr(original, attr), attr
    if original.padding == "same" and original.padding_mode != "zeros":
        # documented: comes back as the equivalent explicit symmetric padding
        assert list(conv._reversed_padding_repeated_twice) == list(original._reversed_padding_repeated_twice)
    else:
        assert (conv.padding, conv.padding_mode) == (original.padding, original.padding_mode)
    fresh = _conv_bn(geom, bias=True)
    fresh.load_state_dict(collapsed.state_dict(), strict=True)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=_ids)
def test_preserve_init_computes_the_original_function(geom):
    torch.manual_seed(1)
    model = randomize_bn(_conv_bn(geom))
    expanded = acfx.expand(model, init="preserve")
    x = torch.randn(4, 8, 11, 12)
    for train in (False, True):
        model.train(train)
        expanded.train(train)
        with torch.no_grad():
            assert_rel_close(expanded(x), model(x), what=f"train={train}")
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(expanded[0].square_bn, name), getattr(model[1], name), atol=1e-6)


@pytest.mark.parametrize("kernel,stride", [(3, 2), (5, 2), (4, 2), (3, 1), (2, 2)])
@pytest.mark.parametrize("size", [15, 16])
def test_timm_conv2d_same_round_trips(kernel, stride, size):
    torch.manual_seed(2)
    model = nn.Sequential(Conv2dSame(8, 16, kernel, stride, bias=False), nn.BatchNorm2d(16))
    expanded = randomize_bn(acfx.expand(model)).eval()
    assert isinstance(expanded[0].pad, DynamicSamePad2d)
    collapsed = acfx.collapse(expanded)
    assert type(collapsed[0]) is Conv2dSame
    x = torch.randn(2, 8, size, size + 1)
    with torch.no_grad():
        assert_rel_close(collapsed(x), expanded(x))
        assert_rel_close(acfx.expand(model, init="preserve").eval()(x), model.eval()(x))


def test_layout_pads_natively_when_it_can():
    block = acfx.expand(_conv_bn(((3, 3), 1, 1, 1, 1, "zeros")))[0]
    assert block.pad is None and block.hor.padding == (0, 1) and block.ver.padding == (1, 0)
    assert block.hor_crop.is_zero and block.ver_crop.is_zero


def test_layout_crops_when_padding_is_smaller_than_half_the_kernel():
    block = acfx.expand(_conv_bn(((3, 3), 1, 0, 1, 1, "zeros")))[0]
    assert block.pad is None
    assert (block.hor_crop.top, block.hor_crop.bottom) == (1, 1)
    assert (block.ver_crop.left, block.ver_crop.right) == (1, 1)


def test_layout_pads_once_for_non_zero_modes():
    block = acfx.expand(_conv_bn(((3, 3), 1, 1, 1, 1, "reflect")))[0]
    assert isinstance(block.pad, nn.ReflectionPad2d) and block.square.padding == (0, 0)


def test_even_kernel_splits_channels_between_the_middle_rows():
    block = acfx.expand(_conv_bn(((4, 4), 1, "same", 1, 1, "zeros")))[0]
    assert isinstance(block.hor, acfx.EvenSplitConv2d) and isinstance(block.ver, acfx.EvenSplitConv2d)
    w = block.hor.weight                  # [8, 8, 1, 4]
    eff = block.hor.effective_weight()    # [8, 8, 2, 4]: rows 1 and 2 of the 4x4 kernel
    assert eff.shape == (8, 8, 2, 4)
    assert torch.equal(eff[0::2, :, 0], w[0::2, :, 0]) and not eff[0::2, :, 1].any()
    assert torch.equal(eff[1::2, :, 1], w[1::2, :, 0]) and not eff[1::2, :, 0].any()
    assert (block.hor_crop.top, block.hor_crop.bottom) == (1, 1)  # rows 1-2 of 0-3


def test_border_placement_uses_last_row_and_column():
    model = _conv_bn(((3, 3), 1, 1, 1, 1, "zeros"))
    expanded = randomize_bn(acfx.expand(model, placement="border")).eval()
    block = expanded[0]
    # The bottom row reads the padded input's rows from 2 on: asymmetric, so the input is padded once
    # and the 1x3 branch crops 2 rows on top (the 3x1 branch 2 columns on the left).
    assert isinstance(block.pad, nn.ZeroPad2d) and block.hor.kernel_size == (1, 3)
    assert block.hor_crop == Window(2, 0, 0, 0) and block.ver_crop == Window(0, 0, 2, 0)
    collapsed = acfx.collapse(expanded)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        assert_rel_close(collapsed(x), expanded(x))
