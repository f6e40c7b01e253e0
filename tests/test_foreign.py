"""Collapse is a graph pass: it fuses ACNet-style blocks acfx did not create, and says what it leaves."""
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import acfx

from helpers import assert_rel_close, randomize_bn


class HandWrittenACB(nn.Module):
    """An ACNet block as one would write it by hand (three conv+BN branches, summed)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.square_conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.square_bn = nn.BatchNorm2d(cout)
        self.hor_conv = nn.Conv2d(cin, cout, (1, 3), stride, (0, 1), bias=False)
        self.hor_bn = nn.BatchNorm2d(cout)
        self.ver_conv = nn.Conv2d(cin, cout, (3, 1), stride, (1, 0), bias=False)
        self.ver_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        square = self.square_bn(self.square_conv(x))
        hor = self.hor_bn(self.hor_conv(x))
        ver = self.ver_bn(self.ver_conv(x))
        return square + hor + ver


class CroppedACB(nn.Module):
    """Padding 0: the reference's crop layer, written as slices, with a bias on the square conv."""

    def __init__(self, c):
        super().__init__()
        self.square = nn.Conv2d(c, c, 3, bias=True)
        self.hor = nn.Conv2d(c, c, (1, 3), bias=False)
        self.hor_bn = nn.BatchNorm2d(c)
        self.ver = nn.Conv2d(c, c, (3, 1), bias=False)
        self.ver_bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.square(x) + self.hor_bn(self.hor(x[:, :, 1:-1, :])) + self.ver_bn(self.ver(x[:, :, :, 1:-1]))


class ReflectACB(HandWrittenACB):
    """Pads the input once (reflect) and runs the branches unpadded, cropping the shared input."""

    def __init__(self, c):
        super().__init__(c, c)
        for conv in (self.square_conv, self.hor_conv, self.ver_conv):
            conv.padding = (0, 0)

    def forward(self, x):
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return (self.square_bn(self.square_conv(x)) + self.hor_bn(self.hor_conv(x[:, :, 1:-1]))
                + self.ver_bn(self.ver_conv(x[..., 1:-1])))


class RepVGGLike(nn.Module):
    """3x3 + 1x1 branches with BN: the 1x1 kernel fits at the centre of the 3x3 window."""

    def __init__(self, c):
        super().__init__()
        self.kxk = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return self.kxk(x) + self.k1(x)


class Net(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.block = block
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.block(self.stem(x))))


def _collapse(model, x):
    model = randomize_bn(model, seed=7).eval()
    collapsed, report = acfx.collapse(model, return_report=True)
    with torch.no_grad():
        assert_rel_close(collapsed(x), model(x))
    return collapsed, report


def test_hand_written_block_becomes_one_conv():
    x = torch.randn(2, 3, 10, 11)
    for stride in (1, 2):
        collapsed, report = _collapse(Net(HandWrittenACB(8, 8, stride)), x)
        conv = collapsed.block
        assert type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (stride, stride)
        assert conv.padding == (1, 1) and conv.bias is not None
        (entry,) = report.of("collapsed")
        assert entry.name == "block" and entry.changes_structure
        assert "HandWrittenACB replaced by one Conv2d" in entry.detail


def test_cropped_block_with_conv_bias():
    collapsed, _ = _collapse(Net(CroppedACB(8)), torch.randn(2, 3, 10, 11))
    assert type(collapsed.block) is nn.Conv2d and collapsed.block.padding == (0, 0)


def test_block_padding_its_input_once_becomes_a_reflect_conv():
    collapsed, _ = _collapse(Net(ReflectACB(8)), torch.randn(2, 3, 10, 11))
    conv = collapsed.block
    assert type(conv) is nn.Conv2d and conv.padding == (1, 1) and conv.padding_mode == "reflect"


def test_repvgg_like_block_with_a_1x1_branch():
    collapsed, _ = _collapse(Net(RepVGGLike(8)), torch.randn(2, 3, 9, 9))
    assert type(collapsed.block) is nn.Conv2d and collapsed.block.kernel_size == (3, 3)


def test_a_model_that_is_one_block_becomes_a_conv():
    collapsed, _ = _collapse(HandWrittenACB(3, 4), torch.randn(2, 3, 8, 8))
    assert type(collapsed) is nn.Conv2d


class InlineSum(nn.Module):
    """Branches summed in a forward that does more: not a whole module, so not swapped."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.a_bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(3, 4, (1, 3), padding=(0, 1), bias=False)
        self.b_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.a_bn(self.a(x)) + self.b_bn(self.b(x)))


class Misaligned(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=2, dilation=2)  # taps at -2, 0, 2 of each output point
        self.b = nn.Conv2d(3, 4, 2, padding=1, dilation=2)  # taps at -1, 1: no common lattice of dilation 2

    def forward(self, x):
        return self.a(x) + self.b(x)


class WithIdentity(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, (1, 3), padding=(0, 1))

    def forward(self, x):
        return self.a(x) + self.b(x) + x


def test_blocks_that_cannot_be_swapped_are_left_alone_and_reported():
    cases = [(InlineSum(), "summed inline in the model's own forward"),
             (Misaligned(), "do not fit in one sliding window")]
    for model, reason in cases:
        model = randomize_bn(model).eval()
        collapsed, report = acfx.collapse(model, return_report=True)
        assert not report.of("collapsed")
        assert [reason in e.detail for e in report.skipped] == [True], (reason, report.entries)
        assert [type(m) for m in collapsed.modules()] == [type(m) for m in model.modules()]
        x = torch.randn(1, 3, 8, 8)
        with torch.no_grad():
            assert torch.equal(collapsed(x), model(x))


class OtherDimRepVGG(nn.Module):
    """A RepVGG block of Conv1d or Conv3d branches, each with its BN, and an identity BN where shapes allow."""

    def __init__(self, conv, norm, channels=4, kernel=3, stride=1, dilation=1, padding=None, mode="zeros"):
        super().__init__()
        padding = dilation * (kernel // 2) if padding is None else padding
        self.dense = nn.Sequential(conv(channels, channels, kernel, stride, padding, dilation, bias=False,
                                        padding_mode=mode), norm(channels))
        self.point = nn.Sequential(conv(channels, channels, 1, stride, bias=False), norm(channels))
        self.skip = norm(channels) if stride == 1 else None

    def forward(self, x):
        out = self.dense(x) + self.point(x)
        return F.relu(out if self.skip is None else out + self.skip(x))


@pytest.mark.parametrize("options", [{}, dict(stride=2), dict(kernel=5, dilation=2), dict(mode="reflect"),
                                     dict(kernel=4, padding="same"), dict(kernel=7, stride=3)],
                         ids=["3", "stride2", "5-dilation2", "reflect", "4-same", "7-stride3"])
def test_a_repvgg_block_of_1d_convs_becomes_one_conv1d(options):
    model = randomize_bn(nn.Sequential(nn.Conv1d(3, 4, 1), OtherDimRepVGG(nn.Conv1d, nn.BatchNorm1d, **options),
                                       nn.Conv1d(4, 2, 1))).eval()
    x = torch.randn(2, 3, 23)
    collapsed, report = acfx.collapse(model, return_report=True)
    assert [e.name for e in report.of("collapsed")] == ["1"], report
    assert [type(m) for m in collapsed[1].modules() if isinstance(m, nn.modules.conv._ConvNd)] == [nn.Conv1d]
    with torch.no_grad():
        assert_rel_close(collapsed(x), model(x), what=f"1-d block {options}")


class _Conv1dWithState(nn.Conv1d):
    """A Conv1d subclass with a buffer of its own: traced through, its F.conv1d read as a 2-d conv of height 1."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", torch.ones(1))


def test_a_1d_block_of_a_conv1d_subclass_fuses_through_its_functional_conv_and_one_replaced_forward_is_left():
    x = torch.randn(2, 3, 9)
    block = OtherDimRepVGG(nn.Conv1d, nn.BatchNorm1d, stride=2)
    block.point[0] = _Conv1dWithState(4, 4, 1, 2, bias=False)
    model = randomize_bn(nn.Sequential(nn.Conv1d(3, 4, 1), block)).eval()
    collapsed, report = acfx.collapse(model, return_report=True)
    assert [e.name for e in report.of("collapsed")] == ["1"], report
    assert [type(m) for m in collapsed[1].modules() if isinstance(m, nn.modules.conv._ConvNd)] == [nn.Conv1d]
    with torch.no_grad():
        assert_rel_close(collapsed(x), model(x), what="1-d block with a functional conv1d")
    conv = model[1].point[0] = nn.Conv1d(4, 4, 1, 2, bias=False)
    conv.forward = types.MethodType(lambda self, x: nn.Conv1d.forward(self, x) * 2, conv)  # replaced on the instance
    collapsed, report = acfx.collapse(model, return_report=True)
    assert [(e.name, "is an nn.Conv1d whose computation acfx does not know" in e.detail)
            for e in report.skipped] == [("1", True)], report
    with torch.no_grad():
        assert torch.equal(collapsed(x), model(x))


def test_a_1d_network_in_deploy_form_has_one_conv1d_per_block_and_no_bn():
    model = randomize_bn(nn.Sequential(nn.Conv1d(3, 4, 5, 2, 2, bias=False), nn.BatchNorm1d(4), nn.ReLU(),
                                       OtherDimRepVGG(nn.Conv1d, nn.BatchNorm1d, kernel=5),
                                       nn.Conv1d(4, 4, 3, groups=2), nn.BatchNorm1d(4), nn.BatchNorm1d(4))).eval()
    x = torch.randn(2, 3, 31)
    deployed, report = acfx.collapse(model, fold_bn=True, return_report=True)
    assert [e.name for e in report.of("collapsed")] == ["3"] and [e.name for e in report.of("folded")] == ["0", "4"]
    assert [e.name for e in report.skipped] == [], report
    assert [type(m) for m in deployed.modules() if not isinstance(m, (nn.Sequential, nn.ReLU, nn.Identity))
            and type(m).__name__ != "OtherDimRepVGG"] == [nn.Conv1d, nn.Conv1d, nn.Conv1d, nn.BatchNorm1d]
    with torch.no_grad():
        assert_rel_close(deployed(x), model(x), what="1-d network, deploy form")


def test_a_block_of_3d_convs_is_reported_and_left_as_it_was():
    model = randomize_bn(nn.Sequential(nn.Conv3d(4, 4, 1), OtherDimRepVGG(nn.Conv3d, nn.BatchNorm3d))).eval()
    x = torch.randn(2, 4, 5, 5, 5)
    collapsed, report = acfx.collapse(model, return_report=True)
    assert [(e.name, "neither a 1-d nor a 2-d convolution" in e.detail) for e in report.skipped] == [("1", True)], report
    assert [type(m) for m in collapsed.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        assert torch.equal(collapsed(x), model(x))


def test_a_block_with_an_identity_branch_becomes_one_conv():
    model = randomize_bn(WithIdentity()).eval()
    collapsed, report = acfx.collapse(model, return_report=True)
    assert type(collapsed) is nn.Conv2d and report.of("collapsed"), report
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert_rel_close(collapsed(x), model(x))


def test_plain_model_collapses_to_itself():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    collapsed, report = acfx.collapse(model, return_report=True)
    assert report.summary() == "acfx collapse: nothing found"
    assert [type(m) for m in collapsed] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
