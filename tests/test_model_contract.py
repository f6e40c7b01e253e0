"""What both passes promise about the model object: class, attributes, dtype, modes, flags, copies."""
import copy
import io

import pytest
import timm
import torch
import torch.nn as nn

import acfx

from helpers import assert_rel_close, randomize_bn


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10)


def _signature(model):
    return [(name, type(m)) for name, m in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()}


def _same(model, signature):
    modules, state = signature
    now_modules, now_state = _signature(model)
    return modules == now_modules and state.keys() == now_state.keys() and all(
        torch.equal(state[k], now_state[k]) for k in state)


def test_class_methods_and_attributes_survive(resnet):
    expanded = acfx.expand(resnet)
    collapsed = acfx.collapse(randomize_bn(expanded).eval())
    x = torch.randn(2, 3, 64, 64)
    # The cfg names real parameters: the expanded model's first conv is its k×k branch.
    assert expanded.pretrained_cfg == {**resnet.pretrained_cfg, "first_conv": "conv1.square"}
    assert collapsed.pretrained_cfg == resnet.pretrained_cfg
    for model in (expanded, collapsed):
        assert type(model) is type(resnet)
        assert model.num_classes == 10
        assert model.forward_features(x).shape == resnet.forward_features(x).shape
    collapsed.reset_classifier(5)
    expanded.reset_classifier(5)
    assert collapsed(x).shape == expanded(x).shape == (2, 5)


def test_inplace_false_never_touches_the_input(resnet):
    before = _signature(resnet)
    expanded = acfx.expand(resnet)
    acfx.collapse(expanded, fold_bn=True)
    assert _same(resnet, before)
    expanded_before = _signature(expanded)
    acfx.collapse(expanded.eval())
    assert _same(expanded, expanded_before)


def test_inplace_true_rewrites_the_model_itself():
    model = timm.create_model("resnet18", num_classes=10)
    conv_weight = model.layer1[0].conv1.weight
    same = acfx.expand(model, inplace=True)
    assert same is model and isinstance(model.layer1[0].conv1, acfx.ACBlock)
    # the k x k branch shares the original parameter objects: an optimizer built before still holds them
    assert model.layer1[0].conv1.square.weight is conv_weight
    again = acfx.collapse(model.eval(), inplace=True)
    assert again is model and type(model.layer1[0].conv1) is nn.Conv2d


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_is_kept(dtype):
    model = timm.create_model("resnet18", num_classes=10).to(dtype)
    expanded = acfx.expand(model)
    assert {p.dtype for p in expanded.parameters()} == {dtype}
    collapsed = acfx.collapse(randomize_bn(expanded).eval())
    assert {p.dtype for p in collapsed.parameters()} == {dtype}
    assert {b.dtype for b in collapsed.buffers() if b.is_floating_point()} == {dtype}
    if dtype == torch.float64:
        x = torch.randn(2, 3, 32, 32, dtype=dtype)
        with torch.no_grad():
            assert_rel_close(collapsed(x), expanded(x))


def test_modes_and_requires_grad_flags_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)).train()
    model[1].eval()                    # frozen statistics and affine parameters on the first BN
    model[1].requires_grad_(False)
    expanded = acfx.expand(model)
    first, second = expanded[0], expanded[2]
    assert expanded.training and first.training and second.training
    assert not any(bn.training for bn in (first.square_bn, first.hor_bn, first.ver_bn))
    assert all(bn.training for bn in (second.square_bn, second.hor_bn, second.ver_bn))
    assert not any(p.requires_grad for bn in (first.square_bn, first.hor_bn, first.ver_bn) for p in bn.parameters())
    assert all(p.requires_grad for p in (first.square.weight, first.hor.weight, first.ver.weight))
    assert all(p.requires_grad for p in second.parameters())
    collapsed = acfx.collapse(expanded.eval()).train()
    collapsed[1].eval()
    assert not collapsed[1].weight.requires_grad and collapsed[3].weight.requires_grad
    assert collapsed[0].weight.requires_grad


@pytest.mark.parametrize("mode", ["exact", "online"])
@pytest.mark.parametrize("init", ["scratch", "preserve"])
def test_frozen_convs_keep_their_function_and_the_report_says_so(mode, init):
    """A frozen conv would get random branches that can never train: it is left alone, with the reason."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)))
    model[0].requires_grad_(False)     # a frozen stem, as detectors freeze theirs
    expanded, report = acfx.expand(model, mode=mode, init=init, return_report=True)
    (skipped,) = report.skipped
    assert skipped.name == "0" and "frozen (requires_grad=False)" in skipped.detail, skipped
    assert [e.name for e in report.of("expanded")] == ["3"]
    assert type(expanded[0]) is nn.Conv2d and expanded[0].weight is not model[0].weight
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # the frozen layer computes what it computed
        assert torch.equal(expanded[:3].eval()(x), model[:3].eval()(x))


def test_expanded_model_can_be_saved_copied_and_reloaded():
    model = timm.create_model("efficientnet_b0", num_classes=4)
    expanded = randomize_bn(acfx.expand(model)).eval()
    buffer = io.BytesIO()
    torch.save(expanded, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), expanded(x))
        assert torch.equal(copy.deepcopy(expanded)(x), expanded(x))
    collapsed = acfx.collapse(loaded)
    fresh = timm.create_model("efficientnet_b0", num_classes=4)
    fresh.load_state_dict(collapsed.state_dict(), strict=True)


def test_state_dict_of_expanded_model_reloads_into_a_fresh_expansion():
    torch.manual_seed(0)
    trained = randomize_bn(acfx.expand(timm.create_model("resnet18", num_classes=10)))
    fresh = acfx.expand(timm.create_model("resnet18", num_classes=10))
    fresh.load_state_dict(trained.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), trained.eval()(x))


def test_new_modules_are_built_on_the_models_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    expanded = acfx.expand(model)
    assert {p.device.type for p in expanded.parameters()} == {"meta"}
    assert {b.device.type for b in expanded.buffers()} == {"meta"}


def test_online_mode_leaves_the_wrapped_conv_flags_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    model[0].bias.requires_grad_(False)
    bias = model[0].bias
    expanded = acfx.expand(model, mode="online", inplace=True)
    assert expanded[0].conv.bias is bias and not bias.requires_grad
    assert expanded[0].hor_weight.requires_grad  # new weights follow the conv's weight
