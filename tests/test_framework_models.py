"""Backbones held the way frameworks hold them: ultralytics' YOLO detection model built from its yaml, and
torchvision's feature extractors (fx GraphModules with a graph per mode). Each expands its backbone and
neck sites, trains a step, and collapses exactly; the passes return models in the modes they were given.

ultralytics is AGPL-3.0: a test-only dependency, which acfx itself never imports.
"""
import os

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import acfx

from helpers import assert_rel_close, randomize_bn

os.environ.setdefault("YOLO_OFFLINE", "1")


def _modes(model: nn.Module) -> list:
    return [(name, m.training) for name, m in model.named_modules()]


def _train_step(model: nn.Module, x: torch.Tensor, loss_of) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = loss_of(model(x))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()


def _collapse_exactly(acnet: nn.Module, x: torch.Tensor, outputs) -> nn.Module:
    """Random BN statistics, then collapse in float64: the collapsed model gives the expanded one's outputs."""
    randomize_bn(acnet, seed=1)
    acnet = acnet.double().eval()
    x = x.double()
    with torch.no_grad():
        expected = outputs(acnet(x))
        collapsed = acfx.collapse(acnet)
        for name, (got, want) in enumerate(zip(outputs(collapsed(x)), expected)):
            assert_rel_close(got, want, what=f"collapsed output {name} (float64)")
    return collapsed


# -- ultralytics YOLO ---------------------------------------------------------------------------------------
def _yolo():
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    return tasks.DetectionModel("yolov8n.yaml", verbose=False)


def _yolo_outputs(out):
    """The decoded predictions of an eval-mode YOLO forward ((y, raw) in eval)."""
    return [out[0]] if isinstance(out, tuple) else [out]


def _yolo_loss(out):
    raw = out["one2many"] if "one2many" in out else out
    return sum(v.float().pow(2).mean() for v in raw.values() if torch.is_tensor(v))


@pytest.mark.slow
def test_yolov8_detection_model_expands_its_backbone_and_neck_and_collapses_exactly():
    torch.manual_seed(0)
    model = _yolo()
    kxk = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and min(m.kernel_size) > 1]
    acnet, report = acfx.expand(model, return_report=True)
    expanded = {e.name for e in report.of("expanded")}
    assert expanded == set(kxk), f"left: {sorted(set(kxk) - expanded)}: {report.skip_reasons()}"
    assert any(n.startswith("model.22.") for n in expanded) and any(n.startswith("model.2.") for n in expanded)
    left = [e for e in report.skipped if not e.detail.startswith("kernel (1, 1)")]
    assert not left, left
    x = torch.randn(2, 3, 64, 64)
    _train_step(acnet, x, _yolo_loss)
    collapsed = _collapse_exactly(acnet, x, _yolo_outputs)
    fresh = _yolo().double()
    fresh.load_state_dict(collapsed.state_dict(), strict=True)


# -- torchvision feature extractors (DualGraphModule) ---------------------------------------------------------
def _extractor(builder, nodes, mode):
    model = builder()
    return create_feature_extractor(model.train(mode == "train"), nodes)


EXTRACTORS = [
    ("resnet18", lambda: torchvision.models.resnet18(), {"layer2": "c3", "layer4": "c5"}),
    ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(), {"features.12": "out"}),
]


@pytest.mark.parametrize("name,builder,nodes", EXTRACTORS, ids=[e[0] for e in EXTRACTORS])
def test_torchvision_feature_extractor_expands_trains_and_collapses_exactly(name, builder, nodes):
    torch.manual_seed(0)
    extractor = _extractor(builder, nodes, "eval")
    kxk = {n for n, m in extractor.named_modules() if isinstance(m, nn.Conv2d) and min(m.kernel_size) > 1}
    acnet, report = acfx.expand(extractor, return_report=True)
    assert {e.name for e in report.of("expanded")} == kxk, report.skip_reasons()
    x = torch.randn(2, 3, 64, 64)
    _train_step(acnet, x, lambda out: sum(v.pow(2).mean() for v in out.values()))
    collapsed = _collapse_exactly(acnet, x, lambda out: [out[k] for k in sorted(out)])
    assert not collapsed.training


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_passes_return_the_modes_they_were_given_for_graph_modules_that_copy_into_train_mode(mode):
    torch.manual_seed(0)
    extractor = _extractor(lambda: torchvision.models.resnet18(), {"layer4": "c5"}, mode)
    randomize_bn(extractor)
    before = _modes(extractor)
    acnet = acfx.expand(extractor, init="preserve")
    assert [flag for _, flag in _modes(acnet)][:1] == [mode == "train"]
    assert all(m.training == (mode == "train") for m in acnet.modules())
    x = torch.randn(2, 3, 64, 64)
    extractor.eval()
    with torch.no_grad():
        expected = extractor(x)["c5"]
        collapsed, report = acfx.collapse(acnet.eval(), return_report=True)
        assert not any(m.training for m in collapsed.modules()), "collapse of an eval model returned train-mode modules"
        assert_rel_close(collapsed(x)["c5"], expected)
    assert _modes(extractor) == [(n, False) for n, _ in before]


def test_expand_keeps_mixed_modes_of_the_input():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8)).train()
    model[1].eval()  # a BN frozen in eval inside a model in train mode
    acnet = acfx.expand(model)
    assert [acnet.training] + [m.training for m in acnet] == [True, True, False, True, True]
    assert not acnet[0].square_bn.training and not acnet[0].hor_bn.training  # a frozen BN stays frozen
