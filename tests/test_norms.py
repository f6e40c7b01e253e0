"""BatchNorm kinds: what expand splits, what collapse puts back, what is skipped and why."""
import pytest
import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d
from timm.layers.norm_act import SyncBatchNormAct, convert_sync_batchnorm
from torchvision.ops.misc import FrozenBatchNorm2d

import acfx

from helpers import assert_rel_close, randomize_bn


class Negate(nn.Module):
    """A 'drop' layer that does not commute with ReLU, to catch drop/act applied in the wrong order."""

    def forward(self, x):
        return -x


def _model(norm):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), norm, nn.Conv2d(6, 3, 1))


def _norm_act():
    return BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=Negate)


NORMS = {
    "BatchNorm2d": lambda: nn.BatchNorm2d(6),
    "BatchNorm2d-no-affine": lambda: nn.BatchNorm2d(6, affine=False),
    "BatchNorm2d-momentum-None": lambda: nn.BatchNorm2d(6, momentum=None, eps=1e-3),
    "SyncBatchNorm": lambda: nn.SyncBatchNorm(6),
    "BatchNormAct2d": _norm_act,
    "SyncBatchNormAct": lambda: convert_sync_batchnorm(_norm_act()),
}


@pytest.mark.parametrize("kind", list(NORMS))
def test_norm_kind_round_trips_and_comes_back(kind):
    model = _model(NORMS[kind]())
    if kind == "SyncBatchNormAct":
        assert type(model[1]) is SyncBatchNormAct, type(model[1])
    expanded, report = acfx.expand(model, return_report=True)
    assert len(report.of("expanded")) == 1
    assert isinstance(expanded[1], acfx.NormTail) and expanded[1].norm_type is type(model[1])
    branch_kind = nn.SyncBatchNorm if isinstance(model[1], nn.SyncBatchNorm) else nn.BatchNorm2d
    assert all(type(bn) is branch_kind for bn in (expanded[0].square_bn, expanded[0].hor_bn, expanded[0].ver_bn))
    randomize_bn(expanded).eval()
    collapsed = acfx.collapse(expanded)
    assert type(collapsed[1]) is type(model[1])
    x = torch.randn(2, 4, 9, 10)
    with torch.no_grad():
        assert_rel_close(collapsed(x), expanded(x))
        # the tail still applies the norm-act layer's drop and activation, in that order
        assert_rel_close(acfx.expand(model, init="preserve").eval()(x), model.eval()(x))
    fresh = _model(NORMS[kind]())
    fresh.load_state_dict(collapsed.state_dict(), strict=True)
    with torch.no_grad():
        assert_rel_close(fresh.eval()(x), collapsed(x))


def test_norm_act_keeps_its_activation_and_drop_modules():
    model = _model(_norm_act())
    expanded = acfx.expand(model)
    assert isinstance(expanded[1].act, nn.SiLU) and isinstance(expanded[1].drop, Negate)
    collapsed = acfx.collapse(expanded.eval())
    assert isinstance(collapsed[1].act, nn.SiLU) and isinstance(collapsed[1].drop, Negate)
    assert collapsed[1].eps == model[1].eps and collapsed[1].momentum == model[1].momentum


@pytest.mark.parametrize("norm,reason", [
    (lambda: nn.BatchNorm2d(6, track_running_stats=False), "does not track running statistics"),
    (lambda: FrozenBatchNorm2d(6), "FrozenBatchNorm2d"),
    (lambda: type("MyBN", (nn.BatchNorm2d,), {})(6), "MyBN is not supported"),
])
def test_unsupported_norms_are_skipped_with_reason(norm, reason):
    model = _model(norm())
    expanded, report = acfx.expand(model, return_report=True)
    (entry,) = report.of("skipped")[:1]
    assert entry.name == "0" and reason in entry.detail, entry.detail
    assert not report.of("expanded")
    assert type(expanded[0]) is nn.Conv2d and type(expanded[1]) is type(model[1])


def test_unsupported_norm_with_include_unnormed_expands_the_conv_only():
    model = _model(nn.BatchNorm2d(6, track_running_stats=False))
    expanded = acfx.expand(model, include_unnormed=True, init="preserve")
    assert isinstance(expanded[0], acfx.ACBlock) and type(expanded[1]) is nn.BatchNorm2d
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        assert_rel_close(expanded(x), model(x))


def test_fold_bn_removes_every_norm_and_keeps_norm_act_activation():
    model = _model(_norm_act())
    expanded = randomize_bn(acfx.expand(model)).eval()
    folded, report = acfx.collapse(expanded, fold_bn=True, return_report=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert isinstance(folded[1].act, nn.SiLU) and isinstance(folded[1].drop, Negate)
    assert folded[0].bias is not None and len(report.of("folded")) == 1
    x = torch.randn(2, 4, 9, 10)
    with torch.no_grad():
        assert_rel_close(folded(x), expanded(x))
