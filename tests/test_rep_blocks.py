"""collapse deploys the re-parameterisable blocks users already have, as their repositories write them.

For each block (tests/rep_blocks.py): the collapsed model gives the unfused model's eval output (1e-5 in
float32, 1e-10 in float64, random BN statistics), runs no more convolutions than the block's own deploy
form and about as many operators (counted as the aten ops its forward dispatches: the branch arithmetic
and the weight generation are gone), and matches that deploy form's output.
"""
import copy

import pytest
import torch
import torch.nn as nn

import acfx

from helpers import assert_rel_close
from rep_blocks import (
    ECB,
    OREPA,
    CollapsibleLinearBlock,
    DilatedReparamBlock,
    DiverseBranchBlock,
    ImplicitHead,
    MobileOneBlock,
    QARepVGGBlock,
    ReparamLargeKernelConv,
    RepConv,
    RepGhostModule,
    RepVGGBlock,
    YOLOv6RepVGGBlock,
)
from rep_models import aten_ops, trained, ultralytics_deploy_form

BLOCKS = {
    "repvgg": lambda: RepVGGBlock(8, 8),
    "repvgg-stride2": lambda: RepVGGBlock(8, 16, stride=2),
    "repvgg-se": lambda: RepVGGBlock(8, 8, use_se=True),
    "repvgg-groups": lambda: RepVGGBlock(8, 8, groups=2),
    "yolov6-repvgg": lambda: YOLOv6RepVGGBlock(8, 8),
    "yolov6-qarepvgg": lambda: QARepVGGBlock(8, 8),
    "yolov6-qarepvgg-stride2": lambda: QARepVGGBlock(8, 16, stride=2),
    "yolov7-repconv": lambda: RepConv(8, 8),
    "yolov7-repconv-stride2": lambda: RepConv(8, 16, s=2),
    "yolov7-implicit": lambda: ImplicitHead(8, 12),
    "mobileone": lambda: MobileOneBlock(8, 8, 3, num_conv_branches=4),
    "mobileone-depthwise": lambda: MobileOneBlock(8, 8, 3, groups=8, num_conv_branches=2),
    "mobileone-pointwise": lambda: MobileOneBlock(8, 16, 1, num_conv_branches=3),
    "repghost": lambda: RepGhostModule(8, 8),
    "dbb": lambda: DiverseBranchBlock(8, 8, 3, nonlinear=nn.ReLU()),
    "dbb-stride2": lambda: DiverseBranchBlock(8, 16, 3, stride=2),
    "dbb-5x5-groups": lambda: DiverseBranchBlock(8, 8, 5, groups=2),
    "dbb-depthwise": lambda: DiverseBranchBlock(8, 8, 3, groups=8),
    "orepa": lambda: OREPA(8, 8, 3, nonlinear=nn.ReLU()),
    "orepa-stride2": lambda: OREPA(8, 16, 3, stride=2),
    "replknet": lambda: ReparamLargeKernelConv(8, 9),
    "unireplknet-7": lambda: DilatedReparamBlock(8, 7),
    "unireplknet-13": lambda: DilatedReparamBlock(8, 13),
    "sesr": lambda: CollapsibleLinearBlock(8, 32, 5),
    "ecbsr-ecb": lambda: ECB(8, 8),
    "ecbsr-ecb-widening": lambda: ECB(8, 16, with_idt=False),
    "ecbsr-ecb-conv-modules": lambda: ECB(8, 8, functional=False),
}


# How each block is collapsed: YOLOv7's implicit layers are constant ops around a conv with no sum, the model's
# own architecture, which the deploy form folds (its notebook by hand, acfx with fold_bn=True).
OPTIONS = {"yolov7-implicit": dict(fold_bn=True)}


def _net(block: nn.Module) -> nn.Module:
    """The block inside a model, between a stem and a head (what collapse sees in practice)."""
    channels = getattr(block, "in_channels", None) or next(m for m in block.modules()
                                                            if isinstance(m, nn.Conv2d)).in_channels
    return nn.Sequential(nn.Conv2d(3, channels, 1), block, nn.Flatten(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_collapse_gives_the_unfused_output_and_the_deploy_forms(name, dtype):
    torch.manual_seed(0)
    model = trained(_net(BLOCKS[name]())).to(dtype)
    x = torch.randn(2, 3, 11, 11, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        collapsed, report = acfx.collapse(model, return_report=True, **OPTIONS.get(name, {}))
        assert [e.name for e in report.of("collapsed")] == ["1"], report
        assert_rel_close(collapsed(x), expected, what=f"{name}: collapsed vs unfused")
        deployed = copy.deepcopy(model)
        deployed[1] = deployed[1].deploy()
        assert_rel_close(collapsed(x), deployed(x), what=f"{name}: collapsed vs the block's own deploy form")


@pytest.mark.parametrize("name", list(BLOCKS))
def test_collapsed_blocks_run_no_more_convolutions_and_about_as_many_operators_as_their_deploy_form(name):
    torch.manual_seed(0)
    model = trained(_net(BLOCKS[name]()))
    x = torch.randn(2, 3, 11, 11)
    collapsed = acfx.collapse(model, **OPTIONS.get(name, {}))
    deployed = copy.deepcopy(model)
    deployed[1] = deployed[1].deploy()
    ours, theirs, unfused = aten_ops(collapsed, x), aten_ops(deployed, x), aten_ops(model, x)
    assert ours["convolution"] <= theirs["convolution"] <= unfused["convolution"], (ours, theirs)
    assert sum(ours.values()) <= sum(theirs.values()) + 1, (ours, theirs)
    assert sum(ours.values()) < sum(unfused.values()), (ours, unfused)  # the branch arithmetic is gone


def test_what_the_report_says_of_a_fused_block():
    torch.manual_seed(0)
    model = trained(_net(DiverseBranchBlock(8, 8, 3, nonlinear=nn.ReLU())))
    collapsed, report = acfx.collapse(model, return_report=True)
    (entry,) = report.of("collapsed")
    assert entry.what.startswith("DiverseBranchBlock") and entry.what.endswith("→ Conv2d 3x3"), entry
    assert "forward rewritten" in entry.detail and entry.changes_structure
    assert isinstance(collapsed[1], torch.fx.GraphModule) and type(collapsed[1]).__name__ == "DiverseBranchBlock"
    assert [type(m) for m in collapsed[1].children()] == [nn.Conv2d, nn.ReLU]


class _NonLinearBranch(nn.Module):
    """Two conv branches and a ReLU branch of the same input: not one linear map."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.a(x) + self.b(x) + torch.relu(self.c(x))


class _Misaligned(nn.Module):
    """Two dilated branches of one output size whose taps do not line up (-2, 0, 2 and -1, 1)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.Conv2d(8, 8, 2, padding=1, dilation=2)

    def forward(self, x):
        return self.a(x) + self.b(x)


class _SeparableBesideAPointwise(nn.Module):
    """A depthwise 3x3 then a 1x1, beside a 1x1: one dense 3x3 exactly, with 9x the weights of one 1x1."""

    def __init__(self):
        super().__init__()
        self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1)
        self.skip = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.pw(self.dw(x)) + self.skip(x)


class _DilatedBesideDense(nn.Module):
    """A 3x3 beside a 3x3 of dilation 2: one 5x5 exactly, with 25 taps where the two have 18."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=2, dilation=2)

    def forward(self, x):
        return self.a(x) + self.b(x)


def _left_as_it_was(model, x):
    """Collapse ``model``: the one block it holds must be skipped, the output unchanged; (collapsed, entry)."""
    with torch.no_grad():
        expected = model(x)
        collapsed, report = acfx.collapse(model, return_report=True)
        assert torch.equal(collapsed(x), expected)
    (entry,) = report.entries
    assert entry.action == "skipped", report
    return collapsed, entry


@pytest.mark.parametrize("block,reason", [(_NonLinearBranch, "not a linear map of the branches' input"),
                                          (_Misaligned, "do not fit in one sliding window"),
                                          (_SeparableBesideAPointwise, "cost more to run than the block"),
                                          (_DilatedBesideDense, "cost more to run than the block")])
def test_blocks_that_are_not_one_conv_are_left_with_the_reason(block, reason):
    torch.manual_seed(0)
    model = trained(nn.Sequential(nn.Conv2d(3, 8, 1), block()))
    collapsed, entry = _left_as_it_was(model, torch.randn(2, 3, 11, 11))
    assert entry.name == "1" and reason in entry.detail, entry
    assert type(collapsed[1]) is block


def _ultralytics_blocks():
    from ultralytics.nn.modules.block import RepVGGDW
    from ultralytics.nn.modules.conv import Conv2, RepConv
    return {"repconv": lambda: RepConv(8, 8, 3, bn=True), "repconv-stride2": lambda: RepConv(8, 16, 3, s=2),
            "conv2": lambda: Conv2(8, 16, 3), "conv2-groups-stride2": lambda: Conv2(8, 8, 3, s=2, g=2),
            "repvggdw": lambda: RepVGGDW(8)}


@pytest.mark.parametrize("name", ["repconv", "repconv-stride2", "conv2", "conv2-groups-stride2", "repvggdw"])
def test_ultralytics_blocks_collapse_to_their_own_deploy_form(name):
    """ultralytics' own blocks (the package, not a re-implementation) against its own conversions."""
    torch.manual_seed(0)
    model = trained(_net(_ultralytics_blocks()[name]()))
    x = torch.randn(2, 3, 12, 12)
    deployed = ultralytics_deploy_form(model)
    with torch.no_grad():
        expected = model(x)
        collapsed, report = acfx.collapse(model, return_report=True, **OPTIONS.get(name, {}))
        assert [e.name for e in report.of("collapsed")] == ["1"], report
        assert_rel_close(collapsed(x), expected, what=f"{name}: collapsed vs unfused")
        assert_rel_close(collapsed(x), deployed(x), what=f"{name}: collapsed vs ultralytics' deploy form")
    ours, theirs = aten_ops(collapsed, x), aten_ops(deployed, x)
    assert ours["convolution"] <= theirs["convolution"], (ours, theirs)
    assert sum(ours.values()) <= sum(theirs.values()) + 1, (ours, theirs)


def test_a_block_whose_bn_is_in_train_mode_is_left_with_the_reason():
    from ultralytics.nn.modules.conv import RepConv
    torch.manual_seed(0)
    model = trained(_net(RepConv(8, 8, 3, bn=True)))
    model[1].conv1.bn.train()  # kept in train mode for test-time adaptation
    collapsed, entry = _left_as_it_was(model, torch.randn(4, 3, 12, 12))
    assert "1.conv1.bn is a BatchNorm in train mode" in entry.detail, entry
    assert type(collapsed[1]) is RepConv


class _ScaledResidual(nn.Module):
    """A conv→BN, a layer scale and a residual scale, as iformer and Inception-ResNet write them: no sum of
    branches, the model's own architecture."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.gamma = nn.Parameter(torch.rand(1, 8, 1, 1))

    def forward(self, x):
        return x + 0.17 * (self.gamma * self.bn(self.conv(torch.relu(x))))


def test_constant_scales_and_shifts_around_a_conv_are_folded_only_in_the_deploy_form():
    torch.manual_seed(0)
    model = trained(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _ScaledResidual()))
    x = torch.randn(2, 3, 9, 9)
    kept, report = acfx.collapse(model, return_report=True)
    assert not report.of("collapsed") and not report.skipped, report
    assert type(kept[1]) is _ScaledResidual and type(kept[1].bn) is nn.BatchNorm2d  # the architecture, as it was
    deployed, report = acfx.collapse(model, fold_bn=True, return_report=True)
    assert [e.name for e in report.of("collapsed")] == ["1"], report
    with torch.no_grad():
        assert_rel_close(deployed(x), model(x), what="layer scale and residual scale folded with fold_bn=True")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in deployed.modules()) == 0
