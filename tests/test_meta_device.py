"""Models built on the meta device, then materialised and loaded, compute the trained model's function.

Large models are built without memory (``with torch.device("meta")``, accelerate's init_empty_weights, FSDP's
meta init) and then materialised: ``to_empty`` + ``load_state_dict``, or ``load_state_dict(assign=True)``.
Every tensor that defines what an expanded block computes must be in its state_dict or be derived again
from what is, or the loaded model computes something else without an error (an even kernel's channel
split, the recorded layout).
"""
import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import Conv2dSame

import acfx

from helpers import assert_rel_close, randomize_bn
from test_geometry import GEOMETRIES, _ids

FLOWS = ["to_empty", "assign", "meta_context"]
MODES = ["exact", "online"]


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking weights: random BN statistics and every parameter moved off its init."""
    randomize_bn(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p) * 0.1)
    return model


def _materialise(build, flow: str, state: dict, **options) -> nn.Module:
    """The expanded model built without memory, then given the trained ``state`` by one of the flows."""
    if flow == "meta_context":
        with torch.device("meta"):
            model = acfx.expand(build(), **options)
    else:
        with torch.device("meta"):
            plain = build()
        model = acfx.expand(plain, **options)
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    if flow == "assign":
        model.load_state_dict(state, assign=True)
    else:
        model.to_empty(device="cpu")
        model.load_state_dict(state)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    assert not leftover, f"tensors left on the meta device: {leftover[:5]}"
    return model


def _check_flow(build, flow: str, x: torch.Tensor, **options) -> None:
    torch.manual_seed(0)
    trained = _perturb(acfx.expand(build(), **options)).eval()
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    with torch.no_grad():
        expected = trained(x)
    loaded = _materialise(build, flow, state, **options).eval()
    with torch.no_grad():
        assert_rel_close(loaded(x), expected, what=f"{flow}: loaded vs trained (eval)")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), f"{flow}: {key} differs from the checkpoint after loading"
    # Collapse is exact on what was loaded: in float64, where deep nets with random statistics do not amplify
    # float32 rounding past the tolerance.
    loaded, trained, x = loaded.double(), trained.double(), x.double()
    with torch.no_grad():
        assert_rel_close(acfx.collapse(loaded)(x), trained(x), what=f"{flow}: collapsed vs trained (float64)")


def _conv_bn(geom):
    k, s, p, d, g, mode = geom
    return nn.Sequential(nn.Conv2d(8, 8, k, s, p, d, g, bias=False, padding_mode=mode), nn.BatchNorm2d(8))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=_ids)
def test_meta_built_geometry_loads_the_trained_function(geom, flow, mode):
    _check_flow(lambda: _conv_bn(geom), flow, torch.randn(2, 8, 11, 12), mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("kernel", [3, 4])
def test_meta_built_conv2d_same_loads_the_trained_function(kernel, flow, mode):
    build = lambda: nn.Sequential(Conv2dSame(8, 8, kernel, 2, bias=False), nn.BatchNorm2d(8))  # noqa: E731
    _check_flow(build, flow, torch.randn(2, 8, 15, 16), mode=mode)


@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("options", [dict(placement="border"), dict(norm="sum"), dict(branches="hor"),
                                     dict(include_unnormed=True)], ids=lambda o: "-".join(map(str, o.values())))
def test_meta_built_options_load_the_trained_function(options, flow):
    build = lambda: nn.Sequential(nn.Conv2d(8, 8, 4, padding="same"), nn.ReLU())  # noqa: E731
    if not options.get("include_unnormed"):
        build = lambda: _conv_bn(((4, 4), 1, "same", 1, 1, "zeros"))  # noqa: E731
    _check_flow(build, flow, torch.randn(2, 8, 9, 10), **options)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flow", FLOWS)
@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_b0", "regnetx_002"])
def test_meta_built_timm_model_loads_the_trained_function(name, flow, mode):
    build = lambda: timm.create_model(name, num_classes=10)  # noqa: E731
    _check_flow(build, flow, torch.randn(2, 3, 64, 64), mode=mode)


@pytest.mark.parametrize("flow", ["to_empty", "assign"])
def test_timm_plugin_model_built_on_meta_loads_the_trained_function(flow):
    import acfx.timm  # noqa: F401
    torch.manual_seed(0)
    trained = _perturb(timm.create_model("acb_resnet10t", num_classes=10)).eval()
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    with torch.device("meta"):
        model = timm.create_model("acb_resnet10t", num_classes=10)
    if flow == "assign":
        model.load_state_dict(state, assign=True)
    else:
        model.to_empty(device="cpu").load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_rel_close(model.eval()(x), trained(x))


def test_checkpoint_without_layouts_loads_with_assign_and_materialises_the_layout():
    torch.manual_seed(0)
    build = lambda: _conv_bn(((4, 4), 1, "same", 1, 1, "zeros"))  # noqa: E731
    trained = _perturb(acfx.expand(build())).eval()
    old = {k: v.clone() for k, v in trained.state_dict().items() if not k.endswith(".layout")}
    with torch.device("meta"):
        plain = build()
    model = acfx.expand(plain)
    model.load_state_dict(old, assign=True)
    assert model[0].layout.device.type == "cpu"
    assert torch.equal(model[0].layout, trained[0].layout)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        assert_rel_close(model.eval()(x), trained(x))


def test_layout_of_another_placement_is_still_refused_after_to_empty():
    build = lambda: _conv_bn(((3, 3), 1, 1, 1, 1, "zeros"))  # noqa: E731
    for mode in MODES:
        state = acfx.expand(build(), mode=mode, placement="border").state_dict()
        with torch.device("meta"):
            plain = build()
        model = acfx.expand(plain, mode=mode).to_empty(device="cpu")
        with pytest.raises(RuntimeError, match="placement"):
            model.load_state_dict(state)
