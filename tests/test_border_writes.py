"""A zero pad whose border the code then writes in place (ECBSR's bias pad): read as one pad with that value
when it is exactly that, and never guessed at otherwise (the module stays untraced, as fx leaves it)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import acfx
from acfx.matching.border_writes import pad_with_value

from helpers import assert_rel_close


def _frame(y, value, sides=("top", "bottom", "left", "right"), width=1):
    if "top" in sides:
        y[:, :, 0:width, :] = value
    if "bottom" in sides:
        y[:, :, -width:, :] = value
    if "left" in sides:
        y[:, :, :, 0:width] = value
    if "right" in sides:
        y[:, :, :, -width:] = value
    return y


class _BiasPadded(nn.Module):
    """A 3x3 beside a 1x1→(pad with the 1x1's bias)→3x3; ``value``/``sides``/``width`` vary what is written."""

    def __init__(self, value="bias", sides=("top", "bottom", "left", "right"), width=1, read_early=False):
        super().__init__()
        self.dense = nn.Conv2d(8, 8, 2 * width + 1, padding=width)
        self.first, self.second = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 8, 2 * width + 1)
        self.value, self.sides, self.width, self.read_early = value, sides, width, read_early

    def forward(self, x):
        y = F.pad(self.first(x), (self.width,) * 4, "constant", 0)
        bias = self.first.bias.view(1, -1, 1, 1)
        if self.value == "replicate":
            value = y[:, :, 1:2, 1:2]
        else:
            value = bias if self.value == "bias" else 2 * bias
        early = y.mean() if self.read_early else 0.0
        y = _frame(y, value, self.sides, self.width)
        return self.dense(x) + self.second(y) + early


def _randomized(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def test_pad_with_value_is_the_in_place_frame():
    torch.manual_seed(0)
    x, value = torch.randn(2, 3, 5, 6), torch.randn(1, 3, 1, 1)
    for pad in ((1, 1, 1, 1), (2, 1, 0, 3)):
        expected = F.pad(x, pad)
        left, right, top, bottom = pad
        h, w = expected.shape[-2:]
        border = torch.ones(h, w, dtype=torch.bool)
        border[top:h - bottom, left:w - right] = False
        expected[..., border] = value.reshape(-1, 1).expand(3, int(border.sum())).expand(2, 3, -1)
        assert torch.equal(pad_with_value(x, pad, value), expected), pad


@pytest.mark.parametrize("width", [1, 2])
def test_a_branch_padded_with_its_bias_fuses_into_one_conv(width):
    model = _randomized(_BiasPadded(width=width))
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        expected = model(x)
        collapsed, report = acfx.collapse(model, return_report=True)
        assert [e.name for e in report.of("collapsed")] == [""], report
        assert type(collapsed) is nn.Conv2d and collapsed.kernel_size == (2 * width + 1,) * 2, collapsed
        assert_rel_close(collapsed(x), expected, what=f"bias-padded branch, width {width}")


@pytest.mark.parametrize("variant, reason", [
    (dict(value="twice"), "a value other than the padded map's own bias"),
    (dict(sides=("top", "bottom", "left")), "item assignment"),  # three sides: not a pad with a value
    (dict(value="replicate"), "item assignment"),  # a value read off the pad itself
    (dict(read_early=True), "item assignment"),  # the pad read before its border is written
])
def test_other_border_writes_are_left_as_they_are_with_the_reason(variant, reason):
    model = _randomized(_BiasPadded(**variant))
    x = torch.randn(2, 8, 9, 9)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model(x)
        collapsed, report = acfx.collapse(model, return_report=True)
        assert not report.of("collapsed"), report
        details = " ".join(e.detail for e in report.entries)
        assert reason in details, report
        assert torch.equal(collapsed(x), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _PartialMix(nn.Module):
    """FasterNet's partial conv in eval: a 3x3 written into the first channels of a copy of its input."""

    def __init__(self):
        super().__init__()
        self.partial = nn.Conv2d(2, 2, 3, padding=1, bias=False)

    def forward(self, x):
        x = x.clone()
        x[:, :2, :, :] = self.partial(x[:, :2, :, :])
        return x


def test_an_item_assignment_that_is_no_border_fill_keeps_the_module_untraced_and_the_rest_folds():
    model = _randomized(nn.Sequential(_PartialMix(), nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))))
    with torch.no_grad():
        model[1][1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        expected = model(x)
        deployed, report = acfx.collapse(model, fold_bn=True, return_report=True)
        untraced = {e.name: e.detail for e in report.of("untraced")}
        assert set(untraced) == {"", "0"} and "item assignment" in untraced["0"], report
        assert [e.name for e in report.of("folded")] == ["1.0"], report
        assert_rel_close(deployed(x), expected, what="partial conv, deploy form")
