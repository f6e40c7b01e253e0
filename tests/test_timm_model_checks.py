"""The checks timm's own test suite makes of every timm model, made of acb_ models across families.

Written in acfx's words after timm's tests/test_models.py: forward (and gradient checkpointing), backward
(every parameter gets a gradient), the default cfg (first conv and classifier name real parameters,
feature and head shapes), features_only and forward_intermediates, torch.fx feature extraction with
timm's own leaf lists, and TorchScript of the expanded model in eval and of both deploy forms.

Checks of timm's that cannot apply to a training-time model, and why:
* inference against hosted ``test_*`` weights: there are no acb_ weights (``pretrained=True`` loads the
  base model's weights and expands them, which test_timm_plugin.py covers);
* scripting in train mode with a chosen ``acfx.set_exact_impl``: TorchScript always compiles the branch
  forward (the same mathematics), so the stacked / recompute forwards are not scripted;
* ``set_input_size`` and pos-embed resizing: none of these families has it (they are CNNs).
"""
import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules, set_scriptable
from timm.utils.model import reparameterize_model
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import acfx
import acfx.timm  # noqa: F401  (registers the acb_ models)

from helpers import assert_rel_close, randomize_bn

# One per family: plain ResNet, depthwise EfficientNet, TF-'same' padding, RegNet, GhostNet (taps its stem
# conv in forward_intermediates), DenseNet (concatenations), RepVGG (its own re-parameterisable blocks).
FAMILIES = ["acb_resnet18", "acb_efficientnet_b0", "acb_tf_efficientnet_b0", "acb_regnety_002",
            "acb_ghostnet_100", "acb_densenet121", "acb_repvgg_a0"]
X = torch.randn(2, 3, 64, 64)


def _model(name, **kwargs):
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, **kwargs)).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_and_grad_checkpointing(name):
    model = _model(name)
    with torch.no_grad():
        out = model(X)
        assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
        model.set_grad_checkpointing(True)
        assert_rel_close(model(X), out, 1e-5, what="with gradient checkpointing")


@pytest.mark.parametrize("name", FAMILIES)
def test_backward_reaches_every_parameter(name):
    model = _model(name, num_classes=7).train()
    out = model(X)
    assert out.shape == (2, 7)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]


@pytest.mark.parametrize("name", FAMILIES)
def test_default_cfg_names_real_parameters_and_shapes_agree(name):
    model = _model(name)
    state, cfg = model.state_dict(), model.pretrained_cfg
    assert cfg is model.default_cfg or cfg == model.default_cfg
    for key in ("first_conv", "classifier"):
        names = (cfg[key],) if isinstance(cfg[key], str) else cfg[key]
        for module in names:
            assert f"{module}.weight" in state, f"{key} {module} has no weight in the expanded model"
    with torch.no_grad():
        features = model.forward_features(X)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert features.shape[1] == model.num_features
        assert pre_logits.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        assert model(X).shape == (2, model.head_hidden_size)
    deploy = acfx.collapse(model)  # the collapsed model's cfg names its own (plain) modules again
    assert all(f"{m}.weight" in deploy.state_dict() for m in
               ((deploy.pretrained_cfg["first_conv"],) if isinstance(deploy.pretrained_cfg["first_conv"], str)
                else deploy.pretrained_cfg["first_conv"]))
    with pytest.raises(TypeError):
        timm.create_model(name, not_a_model_arg=1)


@pytest.mark.parametrize("name", ["acb_resnet18", "acb_ghostnet_100", "acb_densenet121"])
def test_features_only(name):
    features = _model(name, features_only=True)
    with torch.no_grad():
        outs = features(X)
    assert [o.shape[1] for o in outs] == features.feature_info.channels()


# (timm < 1.0.31's DenseNet has no forward_intermediates.)
@pytest.mark.parametrize("name", ["acb_resnet18", "acb_ghostnet_100", "acb_efficientnet_b0"])
def test_forward_intermediates_mean_the_same_before_and_after_collapse(name):
    model = _model(name)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(X)
        assert_rel_close(final, model.forward_features(X), what="forward_intermediates vs forward_features")
        collapsed = acfx.collapse(model)
        final_c, intermediates_c = collapsed.forward_intermediates(X)
    assert len(intermediates) == len(model.feature_info)
    for i, (a, b) in enumerate(zip(intermediates_c, intermediates)):  # the same meaning before and after collapse
        assert_rel_close(a, b, what=f"intermediate {i}")


def test_densenet_features_with_gradient_checkpointing_backward():
    """In-place activations after a NormTail must not modify a tensor autograd or a caller still holds."""
    model = timm.create_model("acb_densenet121", features_only=True)
    model.set_grad_checkpointing(True)
    sum(o.mean() for o in model.train()(X)).backward()
    assert model.features_conv0.hor.weight.grad is not None


def _fx_model(model):
    """timm's fx feature extractor returning the model's output node, traced with timm's leaf lists."""
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=kwargs)


@pytest.mark.parametrize("name", ["acb_resnet18", "acb_tf_efficientnet_b0", "acb_ghostnet_100"])
def test_fx_feature_extraction_with_timm_leaves(name):
    model = _model(name)
    fx_model = _fx_model(model)
    with torch.no_grad():
        (out,) = fx_model.eval()(X).values()
        assert_rel_close(out, model(X), what="fx graph vs eager, eval")
    (out,) = fx_model.train()(X).values()
    out.mean().backward()
    missing = [n for n, p in fx_model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]


@pytest.mark.parametrize("name", ["acb_resnet18", "acb_tf_efficientnet_b0", "acb_repvgg_a0"])
def test_torchscript_of_the_expanded_model_and_both_deploy_forms(name):
    with set_scriptable(True):
        model = _model(name)
    with torch.no_grad():
        y = model(X)
        for label, form in (("expanded (eval)", model), ("reparameterize_model", reparameterize_model(model)),
                            ("acfx.collapse", acfx.collapse(model))):
            scripted = torch.jit.script(form)
            assert_rel_close(scripted(X), y, what=f"TorchScript of the {label} model")
