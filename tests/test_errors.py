"""Bad input: clear errors naming the module and the fix, and the user's model left as it was."""
import importlib

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import StdConv2d

import acfx

from helpers import randomize_bn

expand_module = importlib.import_module("acfx.passes.expand")
collapse_module = importlib.import_module("acfx.passes.fuse_own")  # where collapse fuses each block


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))


def _snapshot(model):
    return [(n, type(m), id(m)) for n, m in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snapshot):
    modules, state = snapshot
    now = model.state_dict()
    return _snapshot(model)[0] == modules and all(
        torch.equal(now[k], v) or torch.allclose(now[k], v, rtol=0, atol=0, equal_nan=True)
        for k, v in state.items())


@pytest.mark.parametrize("call", [acfx.expand, acfx.collapse])
def test_not_a_module(call):
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got OrderedDict"):
        call(_net().state_dict())


def test_expanding_twice_is_refused_and_names_the_block():
    expanded = acfx.expand(_net())
    before = _snapshot(expanded)
    with pytest.raises(ValueError, match=r"already expanded \(ACBlock at '0'\).*acfx.collapse first"):
        acfx.expand(expanded, inplace=True)
    assert _unchanged(expanded, before)


@pytest.mark.parametrize("tensor", ["running_var", "running_mean", "weight"])
def test_non_finite_statistics_at_collapse(tensor):
    expanded = randomize_bn(acfx.expand(_net())).eval()
    getattr(expanded[3].hor_bn, tensor).data[1] = float("nan")
    before = _snapshot(expanded)
    with pytest.raises(ValueError, match=rf"{tensor} of '3.hor_bn' is not finite"):
        acfx.collapse(expanded, inplace=True)
    assert _unchanged(expanded, before)


@pytest.mark.parametrize("recipe,where", [("acb", "hor"), ("acb", "square"), ("dbb", "chain"),
                                          ("mobileone", "square_2")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_branch_weight_at_collapse(recipe, where, value):
    """A branch conv's weight is checked as its BN's statistics are: named, and the model left as it was."""
    expanded = randomize_bn(acfx.expand(_net(), recipe=recipe)).eval()
    expanded[3].get_submodule(where).weight.data.view(-1)[1] = value
    before = _snapshot(expanded)
    with pytest.raises(ValueError, match=rf"weight of '3.{where}' is not finite"):
        acfx.collapse(expanded, inplace=True)
    assert _unchanged(expanded, before)


@pytest.mark.parametrize("change", ["norm", "dilation"])
def test_a_branch_replaced_after_expand_is_named_at_collapse(change):
    """A block whose branch a user replaced by a module that runs but is not what expand built (a GroupNorm,
    a conv reading another window): a ValueError naming the block, not an internal error; the model as it was."""
    expanded = randomize_bn(acfx.expand(_net())).eval()
    if change == "norm":
        expanded[3].hor_bn = nn.GroupNorm(2, 4)
    else:
        expanded[3].hor = nn.Conv2d(4, 4, (1, 3), padding=(0, 2), dilation=(1, 2), bias=False)
    expanded(torch.randn(1, 3, 8, 8))  # it still runs
    before = _snapshot(expanded)
    with pytest.raises(ValueError, match=r"the ACBlock at '3' cannot be fused.*replaced after expand"):
        acfx.collapse(expanded, inplace=True)
    assert _unchanged(expanded, before)


def test_non_finite_statistics_when_folding():
    model = randomize_bn(_net()).eval()
    model[1].running_var.data[0] = float("inf")
    with pytest.raises(ValueError, match="running_var of '1' is not finite"):
        acfx.collapse(model, fold_bn=True)


class CustomConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("conv,name", [
    (StdConv2d(3, 4, 3, padding=1), "StdConv2d"),
    (CustomConv(3, 4, 3, padding=1), "CustomConv"),
])
def test_unsupported_conv_types_are_skipped_never_rewritten(conv, name):
    model = nn.Sequential(conv, nn.BatchNorm2d(4))
    expanded, report = acfx.expand(model, return_report=True)
    (entry,) = report.entries
    assert entry.action == "skipped" and f"conv type {name} is not supported" in entry.detail
    assert type(expanded[0]) is type(conv)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(expanded.eval()(x), model.eval()(x))


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.alias = self.conv

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


def test_reused_and_aliased_modules_are_skipped():
    _, report = acfx.expand(Reused(), return_report=True)
    details = [e.detail for e in report.skipped]
    assert any("called 2 times" in d for d in details), details


class Aliased(Reused):
    def forward(self, x):
        return self.bn(self.conv(x))


def test_module_registered_twice_is_skipped():
    _, report = acfx.expand(Aliased(), return_report=True)
    assert "registered under several names ['conv', 'alias']" in report.skipped[0].detail


def test_failure_while_planning_leaves_the_model_untouched(monkeypatch):
    model = timm.create_model("resnet18")
    before = _snapshot(model)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    real = expand_module.build_site
    monkeypatch.setattr(expand_module, "build_site", broken)
    with pytest.raises(RuntimeError, match="injected"):
        acfx.expand(model, inplace=True)
    assert _unchanged(model, before)

    expanded = acfx.expand(model.eval())
    before = _snapshot(expanded)
    real_fuse, calls[:] = collapse_module.fuse_pair, []

    def broken_fuse(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("injected failure")
        return real_fuse(*args, **kwargs)

    monkeypatch.setattr(collapse_module, "fuse_pair", broken_fuse)
    with pytest.raises(RuntimeError, match="injected"):
        acfx.collapse(expanded, inplace=True)
    assert _unchanged(expanded, before)


class Fussy(nn.Sequential):
    """A container that refuses to have one particular child replaced, as a broken custom module might."""

    def __setattr__(self, name, value):
        if name == "3" and not isinstance(value, nn.Conv2d):
            raise RuntimeError("Fussy refuses")
        super().__setattr__(name, value)


def test_failure_while_swapping_undoes_every_swap():
    model = Fussy(*_net())
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="Fussy refuses"):
        acfx.expand(model, inplace=True)
    assert _unchanged(model, before)
