"""Online mode (OREPA-style): one conv with kernels merged at every forward; collapses exactly."""
import pytest
import torch
import torch.nn as nn
from timm.layers import Conv2dSame

import acfx

from helpers import assert_rel_close, randomize_bn
from test_geometry import GEOMETRIES, _conv_bn, _ids


@pytest.mark.parametrize("geom", GEOMETRIES, ids=_ids)
def test_online_forward_is_its_merged_conv_and_collapses_exactly(geom):
    torch.manual_seed(0)
    model = _conv_bn(geom, bias=True)
    expanded = randomize_bn(acfx.expand(model, mode="online"))
    block = expanded[0]
    assert isinstance(block, acfx.OnlineACConv) and type(expanded[1]) is nn.BatchNorm2d
    x = torch.randn(2, 8, 11, 12)
    reference = model[0]._conv_forward(x, block.effective_weight(), block.conv.bias)
    assert_rel_close(block(x), reference, what="forward vs merged-kernel conv")
    expanded.eval()
    collapsed = acfx.collapse(expanded)
    assert type(collapsed[0]) is nn.Conv2d and collapsed[0].padding == model[0].padding
    with torch.no_grad():
        assert_rel_close(collapsed(x), expanded(x))
    _conv_bn(geom, bias=True).load_state_dict(collapsed.state_dict(), strict=True)


def test_online_with_conv2d_same_keeps_the_tf_padding():
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(4, 8, 3, 2, bias=False), nn.BatchNorm2d(8))
    expanded = randomize_bn(acfx.expand(model, mode="online")).eval()
    collapsed = acfx.collapse(expanded)
    assert type(collapsed[0]) is Conv2dSame
    x = torch.randn(2, 4, 15, 16)
    with torch.no_grad():
        assert_rel_close(collapsed(x), expanded(x))


def test_online_even_kernel_merges_split_channels_on_the_middle_rows():
    model = _conv_bn(((4, 4), 1, "same", 1, 1, "zeros"))
    block = acfx.expand(model, mode="online", branches="hor")[0]
    with torch.no_grad():
        block.conv.weight.zero_()
    kernel = block.effective_weight()  # only the 1x4 branch: rows 1 (even channels) and 2 (odd channels)
    assert torch.equal(kernel[0::2, :, 1], block.hor_weight[0::2, :, 0])
    assert torch.equal(kernel[1::2, :, 2], block.hor_weight[1::2, :, 0])
    assert not kernel[:, :, [0, 3]].any() and not kernel[0::2, :, 2].any()


def test_online_preserve_is_the_original_function_and_trains():
    torch.manual_seed(0)
    model = randomize_bn(_conv_bn(((3, 3), 2, 1, 1, 1, "zeros")))
    expanded = acfx.expand(model, mode="online", init="preserve")
    x = torch.randn(4, 8, 12, 12)
    for train in (True, False):
        with torch.no_grad():
            assert torch.equal(expanded.train(train)(x), model.train(train)(x))
    expanded.train()(x).square().mean().backward()
    block = expanded[0]
    assert block.hor_scale.grad.abs().sum() > 0 and block.ver_scale.grad.abs().sum() > 0
    assert sorted(name for name, _ in block.named_parameters()) == [
        "conv.weight", "hor_scale", "hor_weight", "square_scale", "ver_scale", "ver_weight"]


def test_online_rejects_branch_norms():
    with pytest.raises(ValueError, match="mode='online' has no branch BNs"):
        acfx.expand(_conv_bn(((3, 3), 1, 1, 1, 1, "zeros")), mode="online", norm="branch")
