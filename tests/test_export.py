"""Deployment paths for collapsed models: torch.export, ONNX (+ onnxruntime), timm/torchvision loading."""
import collections
import warnings

import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torchvision
from timm.models import load_checkpoint

import acfx

from helpers import assert_rel_close, randomize_bn


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    original = randomize_bn(timm.create_model("resnet18", num_classes=10)).eval()
    expanded = randomize_bn(acfx.expand(original), seed=1).eval()
    return {"original": original, "collapsed": acfx.collapse(expanded),
            "folded": acfx.collapse(expanded, fold_bn=True), "expanded": expanded}


def _aten_ops(model, x):
    program = torch.export.export(model, (x,))
    return collections.Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")


def test_torch_export_has_the_original_operators(models):
    x = torch.randn(1, 3, 64, 64)
    original, collapsed = _aten_ops(models["original"], x), _aten_ops(models["collapsed"], x)
    assert collapsed == original
    assert original["aten.conv2d.default"] == 20 and original["aten.batch_norm.default"] == 20
    folded = _aten_ops(models["folded"], x)
    assert folded["aten.conv2d.default"] == 20 and "aten.batch_norm.default" not in folded
    assert _aten_ops(models["expanded"], x)["aten.conv2d.default"] == 20 + 2 * 17


def _onnx(model, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=False, verbose=False)
    graph = onnx.load(str(path)).graph
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return collections.Counter(n.op_type for n in graph.node), torch.from_numpy(y)


def test_onnx_export_has_the_original_operators_and_runs_in_onnxruntime(models, tmp_path):
    x = torch.randn(2, 3, 64, 64)
    ops = {}
    for name in ("original", "collapsed", "folded"):
        ops[name], y = _onnx(models[name], x, tmp_path / f"{name}.onnx")
        with torch.no_grad():
            assert_rel_close(y, models[name](x), what=f"onnxruntime vs torch, {name}")
    assert ops["collapsed"] == ops["original"]
    assert ops["original"]["BatchNormalization"] == 20 and ops["original"]["Conv"] == 20
    assert "BatchNormalization" not in ops["folded"] and ops["folded"]["Conv"] == 20


def test_timm_load_checkpoint_strict(models, tmp_path):
    path = tmp_path / "collapsed.pth"
    torch.save(models["collapsed"].state_dict(), path)
    fresh = timm.create_model("resnet18", num_classes=10)
    load_checkpoint(fresh, str(path), strict=True)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), models["collapsed"](x))
    loaded = timm.create_model("resnet18", num_classes=10, checkpoint_path=str(path))
    assert torch.equal(loaded.eval()(x), fresh(x))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_builder_loads_collapsed_weights_strictly(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=7)
    collapsed = acfx.collapse(randomize_bn(acfx.expand(model)).eval())
    fresh = torchvision.models.get_model(name, weights=None, num_classes=7)
    fresh.load_state_dict(collapsed.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), collapsed(x))
