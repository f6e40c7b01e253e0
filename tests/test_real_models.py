"""Real architectures from timm and torchvision: site counts, training, exactness, strict reload."""
import pytest
import timm
import torch
import torchvision

import acfx

from helpers import assert_rel_close, count_modules, kxk_convs, randomize_bn

# name -> (input size, include_unnormed). Every k x k conv of these models is followed by a BN, except
# DenseNet's 3x3 convs, which feed the concat directly (expanded with include_unnormed).
TIMM = {
    "resnet50": (64, False),               # ResNet, BatchNorm2d
    "efficientnet_b0": (64, False),        # depthwise convs, BatchNormAct2d
    "mobilenetv3_small_100": (64, False),  # BatchNormAct2d with hard-swish, 5x5 depthwise
    "tf_efficientnet_b0": (65, False),     # timm Conv2dSame (TF 'same' padding), odd input size
    "regnety_002": (64, False),            # RegNet, grouped convs
    "hrnet_w18_small": (64, False),        # multi-branch, multi-resolution
    "res2net50_14w_8s": (64, False),       # multi-branch within blocks
    "densenet121": (64, True),             # concat of un-normalised convs
    "repvgg_a0": (64, False),              # RepVGG (its own re-parameterisable blocks)
    "ghostnet_100": (64, False),           # GhostNet, cheap operations
}
TORCHVISION = {
    "resnet18": (64, False),
    "mobilenet_v2": (64, False),
    "googlenet": (64, False),
    "densenet121": (64, True),
    "regnet_y_400mf": (64, False),
    "shufflenet_v2_x0_5": (64, False),
    "mnasnet0_5": (64, False),
    "inception_v3": (80, False),           # 1x7 / 7x1 kernels are left alone
}


def _build(source, name):
    torch.manual_seed(0)
    if source == "timm":
        return timm.create_model(name, num_classes=10)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs)


CASES = [("timm", n, *v) for n, v in TIMM.items()] + [("torchvision", n, *v) for n, v in TORCHVISION.items()]


@pytest.mark.slow
@pytest.mark.parametrize("source,name,size,unnormed", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_real_model_round_trip(source, name, size, unnormed):
    model = _build(source, name)
    expanded, report = acfx.expand(model, include_unnormed=unnormed, return_report=True)
    assert type(expanded) is type(model)
    sites = kxk_convs(model)
    assert len(report.of("expanded")) == sites == count_modules(expanded, acfx.ACBlock), report.skip_reasons()
    assert not report.of("untraced")

    x = torch.randn(2, 3, size, size)
    expanded.train()
    expanded(x).logsumexp(1).mean().backward()
    for block_name, block in expanded.named_modules():
        if isinstance(block, acfx.ACBlock):
            for pname, p in block.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), f"{block_name}.{pname}"

    randomize_bn(expanded).eval()
    collapsed, creport = acfx.collapse(expanded, return_report=True)
    assert len(creport.of("collapsed")) == sites and not creport.skipped
    assert len(creport.structure_changes) == (sites - 1 if unnormed else 0)  # un-normalised convs gain a bias
    with torch.no_grad():
        assert_rel_close(collapsed(x), expanded(x), what=name)
    fresh = _build(source, name)
    if not unnormed:
        fresh.load_state_dict(collapsed.state_dict(), strict=True)
        assert [type(m) for m in fresh.modules()] == [type(m) for m in collapsed.modules()]


@pytest.mark.slow
@pytest.mark.parametrize("source,name", [("timm", "resnet50"), ("timm", "tf_efficientnet_b0"),
                                         ("timm", "hrnet_w18_small"), ("torchvision", "googlenet")])
def test_real_model_round_trip_float64(source, name):
    model = _build(source, name).double()
    expanded = randomize_bn(acfx.expand(model)).eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert_rel_close(acfx.collapse(expanded)(x), expanded(x), what=name)
        folded = acfx.collapse(expanded, fold_bn=True)
        assert count_modules(folded, torch.nn.modules.batchnorm._BatchNorm) == 0
        assert_rel_close(folded(x), expanded(x), what=f"{name} fold_bn")
