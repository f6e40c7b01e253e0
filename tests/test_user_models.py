"""Models written the way users write them: custom convs, hooks, feature extractors, other convs.

Each case was silently wrong, corrupted the model or crashed before; each must now be exact or a clear
refusal, with the user's model left as it was.
"""
import copy
import warnings

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import acfx

from helpers import assert_rel_close, randomize_bn


class WSConv2d(nn.Conv2d):
    """Weight standardisation, as BiT / NFNet-style code writes it: the conv's _conv_forward changes the weight."""

    def _conv_forward(self, x, weight, bias):
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)
        std = weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5
        return super()._conv_forward(x, (weight - mean) / std, bias)


class ReflectConv2d(nn.Conv2d):
    """Hand-made padding inside _conv_forward (padding given to F.pad, the conv itself unpadded)."""

    def _conv_forward(self, x, weight, bias):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, bias, self.stride, 0, self.dilation,
                        self.groups)


class TaggedConv2d(nn.Conv2d):
    """A subclass that only adds a method: it computes what nn.Conv2d computes."""

    def describe(self):
        return f"tagged {self.kernel_size}"


class RepBlock(nn.Module):
    """3×3 + 1×1 conv branches, each with its BN, summed (RepVGG-style) with a given conv class."""

    def __init__(self, conv, c=8):
        super().__init__()
        self.kxk = nn.Sequential(conv(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        one = conv(c, c, 1, bias=False) if conv is not ReflectConv2d else nn.Conv2d(c, c, 1, bias=False)
        self.k1 = nn.Sequential(one, nn.BatchNorm2d(c))

    def forward(self, x):
        return self.kxk(x) + self.k1(x)


def _net(block):
    return nn.Sequential(nn.Conv2d(3, 8, 1), block, nn.ReLU(), nn.Conv2d(8, 2, 1))


@pytest.mark.parametrize("conv", [WSConv2d, ReflectConv2d])
def test_convs_that_override_conv_forward_are_never_fused(conv):
    model = randomize_bn(_net(RepBlock(conv))).eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        y = model(x)
    collapsed, report = acfx.collapse(model, return_report=True)
    (entry,) = report.entries
    assert entry.action == "skipped" and entry.name == "1", report
    assert f"conv type {conv.__name__} is not supported: it overrides _conv_forward" in entry.detail, entry.detail
    with torch.no_grad():
        assert torch.equal(collapsed(x), y)
    _, expand_report = acfx.expand(model, return_report=True)
    assert "1.kxk.0" in {e.name for e in expand_report.skipped}
    assert not any(e.name == "1.kxk.0" for e in expand_report.of("expanded"))
    folded, fold_report = acfx.collapse(model, fold_bn=True, return_report=True)
    assert type(folded[1].kxk[1]) is nn.BatchNorm2d  # not folded into a conv acfx does not know
    assert any(e.name == "1.kxk.0" and "_conv_forward" in e.detail for e in fold_report.skipped), fold_report
    with torch.no_grad():
        assert_rel_close(folded(x), y)


def test_a_subclass_computing_what_conv2d_computes_round_trips_as_itself():
    model = randomize_bn(nn.Sequential(TaggedConv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)))
    expanded = randomize_bn(acfx.expand(model), seed=3).eval()
    assert isinstance(expanded[0], acfx.ACBlock) and type(expanded[0].square) is TaggedConv2d
    collapsed = acfx.collapse(expanded)
    assert type(collapsed[0]) is TaggedConv2d and collapsed[0].describe() == "tagged (3, 3)"
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert_rel_close(collapsed(x), expanded(x))


def test_a_parametrized_conv_is_left_alone_with_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    expanded, report = acfx.expand(model, return_report=True)
    (entry,) = report.entries
    assert entry.action == "skipped" and "parametrized" in entry.detail and "remove_parametrizations" in entry.detail
    assert type(expanded[0]) is type(model[0])


# -- hooks ------------------------------------------------------------------------------------------------
def _two_sites():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)))


def test_a_bn_forward_hook_moves_to_the_module_left_in_its_slot():
    model = _two_sites()
    seen = []
    model[1].register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    expanded = acfx.expand(model, init="preserve").eval()  # preserve: the normalised sum is the BN's output
    assert isinstance(expanded[1], acfx.NormTail) and len(expanded[1]._forward_hooks) == 1
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.eval()(x)
        expanded(x)
    assert len(seen) == 2
    assert_rel_close(seen[1], seen[0], what="the hook sees what the BN returned")
    collapsed = acfx.collapse(randomize_bn(expanded, seed=5))
    assert type(collapsed[1]) is nn.BatchNorm2d and len(collapsed[1]._forward_hooks) == 1
    with torch.no_grad():
        expanded(x)
        collapsed(x)
    assert_rel_close(seen[3], seen[2], what="the hook after collapse")


@pytest.mark.parametrize("where,kind", [(0, "forward"), (0, "forward_pre"), (1, "forward_pre"), (1, "backward")])
def test_hooks_whose_meaning_would_change_leave_the_site_alone_with_a_warning(where, kind):
    model = _two_sites()
    module = model[where]
    if kind == "forward":
        module.register_forward_hook(lambda m, a, o: None)
    elif kind == "forward_pre":
        module.register_forward_pre_hook(lambda m, a: None)
    else:
        module.register_full_backward_hook(lambda m, gi, go: None)
    with pytest.warns(UserWarning, match="because of module hooks"):
        expanded, report = acfx.expand(model, return_report=True)
    skipped = {e.name: e.detail for e in report.skipped}
    assert "0" in skipped and "hook" in skipped["0"] and "remove the hook" in skipped["0"], report
    assert [e.name for e in report.of("expanded")] == ["3"]
    assert type(expanded[0]) is nn.Conv2d and type(expanded[1]) is nn.BatchNorm2d
    assert len(getattr(expanded[where], f"_{kind}_hooks" if kind != "backward" else "_backward_hooks")) == 1


def test_collapse_carries_block_hooks_and_refuses_hooks_inside_a_block():
    expanded = randomize_bn(acfx.expand(_two_sites()), seed=1).eval()
    calls = []
    expanded[0].register_forward_pre_hook(lambda m, args: calls.append("pre"))
    expanded[3].register_forward_hook(lambda m, args, out: calls.append("post"))
    expanded[3].hor_bn.register_forward_hook(lambda m, args, out: None)  # inside the block
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="because of module hooks"):
        collapsed, report = acfx.collapse(expanded, return_report=True)
    assert [e.name for e in report.of("collapsed")] == ["0"]
    (skipped,) = report.skipped
    assert skipped.name == "3" and "3.hor_bn" in skipped.detail and "remove the hook" in skipped.detail
    assert type(collapsed[0]) is nn.Conv2d and isinstance(collapsed[3], acfx.ACBlock)
    with torch.no_grad():
        assert_rel_close(collapsed(x), expanded(x))
    assert calls == ["pre", "post", "pre", "post"]


def test_fold_bn_carries_the_hooks_that_hold_and_leaves_the_others():
    model = _two_sites().eval()
    outputs = []
    model[1].register_forward_hook(lambda m, a, out: outputs.append(out.clone()))
    model[3].register_forward_hook(lambda m, a, out: None)  # sees the conv's output, which folding changes
    with pytest.warns(UserWarning, match="because of module hooks"):
        folded, report = acfx.collapse(model, fold_bn=True, return_report=True)
    assert [e.name for e in report.of("folded")] == ["0"]
    assert [e.name for e in report.skipped] == ["3"] and "forward hook" in report.skipped[0].detail
    assert type(folded[1]) is nn.Identity and len(folded[1]._forward_hooks) == 1
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert_rel_close(folded(x), model(x))
    assert_rel_close(outputs[1], outputs[0], what="the BN's hook on the folded slot")


# -- tracing leaves nothing behind; timm feature extractors -------------------------------------------------
def _proxies(obj, seen=None, depth=0):
    """fx Proxies reachable from ``obj`` through module attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return []
    seen.add(id(obj))
    if isinstance(obj, fx.Proxy):
        return [obj]
    found = []
    if isinstance(obj, nn.Module):
        for module in obj.modules():
            if module is not obj:
                found += _proxies(module, seen, depth + 1)
        values = [v for k, v in vars(obj).items() if k not in ("_parameters", "_buffers", "_modules")]
    elif isinstance(obj, dict):
        values = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        values = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.Tensor)) and not callable(obj):
        values = list(vars(obj).values())
    elif hasattr(obj, "__self__") or hasattr(obj, "func"):  # bound methods, partials (hooks)
        values = [getattr(obj, "__self__", None), getattr(obj, "func", None), *getattr(obj, "args", ())]
    else:
        values = []
    for value in values:
        found += _proxies(value, seen, depth + 1)
    return found


FEATURE_FORMS = [
    ("resnet18", dict()),                                    # FeatureListNet
    ("resnet18", dict(feature_cls="dict")),                  # FeatureDictNet
    ("resnet18", dict(feature_cls="hook")),                  # FeatureHookNet
    ("efficientnet_b0", dict(feature_location="expansion")),  # EfficientNetFeatures with FeatureHooks
]


@pytest.mark.parametrize("name,kwargs", FEATURE_FORMS, ids=lambda v: str(v))
def test_timm_feature_extractors_round_trip_and_keep_no_proxies(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=True, **kwargs)
    reference = timm.create_model(name, features_only=True, **kwargs)
    expanded, report = acfx.expand(model, return_report=True)
    sites = 17
    assert len(report.of("expanded")) == sites, report.summary()
    assert not _proxies(model) and not _proxies(expanded), "tracing left Proxies behind"
    copy.deepcopy(model), copy.deepcopy(expanded)
    x = torch.randn(2, 3, 64, 64)
    expanded.train()(x)
    randomize_bn(expanded).eval()
    collapsed = acfx.collapse(expanded)
    assert not _proxies(collapsed)
    with torch.no_grad():
        before, after = expanded(x), collapsed(x)
    before = list(before.values()) if isinstance(before, dict) else before
    after = list(after.values()) if isinstance(after, dict) else after
    assert len(before) == len(after) == len(model.feature_info.channels())
    for i, (a, b) in enumerate(zip(after, before)):
        assert_rel_close(a, b, what=f"feature {i}")
    reference.load_state_dict(collapsed.state_dict(), strict=True)


def test_a_forward_that_keeps_its_input_is_traced_without_touching_the_model():
    class Caching(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.last_input = None

        def forward(self, x):
            self.last_input = x
            return self.bn(self.conv(x))

    model = Caching()
    acfx.expand(model, inplace=True)
    assert model.last_input is None and isinstance(model.conv, acfx.ACBlock)


# -- collapse in train mode ---------------------------------------------------------------------------------
def test_collapse_of_a_model_in_train_mode_warns_with_the_fix():
    expanded = acfx.expand(_two_sites())
    with pytest.warns(UserWarning, match=r"train mode.*acfx.collapse\(model.eval\(\)\)"):
        collapsed = acfx.collapse(expanded)
    assert collapsed.training
    with pytest.warns(UserWarning, match=r"train mode"):  # folded BNs in train mode: the eval function is fused
        acfx.collapse(expanded.train(), fold_bn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acfx.collapse(expanded.eval())
        acfx.collapse(expanded.eval(), fold_bn=True)


# -- other convolutions ---------------------------------------------------------------------------------------
class OtherConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)
        self.c3, self.b3 = nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4)
        self.up, self.bup = nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)
        self.weight, self.bf = nn.Parameter(torch.randn(4, 3, 3, 3)), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.b1(self.c1(x.mean(-1)))
        b = self.b3(self.c3(x.unsqueeze(2)))
        c = self.bup(self.up(x))
        d = self.bf(F.conv2d(x, self.weight, padding=1))
        return a.mean() + b.mean() + c.mean() + d.mean()


def test_other_convolutions_followed_by_a_bn_are_reported_not_invisible():
    model = OtherConvs()
    _, report = acfx.expand(model, return_report=True)
    details = {e.what: e.detail for e in report.skipped}
    assert "not a 2-d convolution" in details["Conv1d 3 → BatchNorm1d"]
    assert "not a 2-d convolution" in details["Conv3d 3x3x3 → BatchNorm3d"]
    assert "not a 2-d convolution" in details["ConvTranspose2d 3x3 → BatchNorm2d"]
    assert "functional convolution" in details["F.conv2d → BatchNorm2d"]
    _, fold_report = acfx.collapse(model.eval(), fold_bn=True, return_report=True)  # fold_bn folds Conv1d too
    assert [e.name for e in fold_report.of("folded")] == ["c1"], fold_report
    details = {e.name: e.detail for e in fold_report.skipped}
    assert list(details) == ["c3", "up", "<model>:conv2d"], fold_report
    assert all("neither a 1-d nor a 2-d convolution" in details[name] for name in ("c3", "up")), details


def test_frozen_batchnorm_sites_expand_once_unfrozen():
    from torchvision.ops.misc import FrozenBatchNorm2d
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8))
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
    _, report = acfx.expand(model, return_report=True)
    assert "acfx.unfreeze_batch_norm" in report.skipped[0].detail
    unfrozen = acfx.unfreeze_batch_norm(copy.deepcopy(model)).eval()
    assert type(unfrozen[1]) is nn.BatchNorm2d and unfrozen[1].weight.requires_grad
    with torch.no_grad():
        assert_rel_close(unfrozen(x), y)
    assert len(acfx.expand(unfrozen, return_report=True)[1].of("expanded")) == 1


# -- a torchvision detector, trained as an ACNet -----------------------------------------------------------
def _detector():
    """Faster R-CNN as a pretrained backbone builds it: FrozenBatchNorm2d and the first stages frozen."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    return FasterRCNN(backbone, num_classes=3, min_size=96, max_size=96, box_score_thresh=0.0)


@pytest.mark.slow
def test_fasterrcnn_trains_as_an_acnet_and_collapses_to_the_same_detections():
    torch.manual_seed(0)
    detector = _detector()
    _, report = acfx.expand(detector, return_report=True)
    assert not report.of("expanded")  # frozen BNs and frozen stages: nothing can train, nothing expanded
    reasons = " ".join(report.skip_reasons())
    assert "acfx.unfreeze_batch_norm" in reasons and "frozen (requires_grad=False)" in reasons

    acfx.unfreeze_batch_norm(detector)
    detector.backbone.body.requires_grad_(True)  # as trainable_backbone_layers=5 does
    acnet, report = acfx.expand(detector, return_report=True)
    assert len(report.of("expanded")) == 17, report.summary()
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    targets = [dict(boxes=torch.tensor([[10.0, 10.0, 60.0, 70.0]]), labels=torch.tensor([1])),
               dict(boxes=torch.tensor([[5.0, 20.0, 90.0, 70.0]]), labels=torch.tensor([2]))]
    optimizer = torch.optim.SGD(acnet.parameters(), lr=0.01)
    for _ in range(2):  # train-mode loss steps: every branch learns, the BN statistics become the data's
        losses = acnet.train()(images, targets)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        optimizer.zero_grad()
        sum(losses.values()).backward()
        assert acnet.backbone.body.layer1[0].conv2.hor.weight.grad.abs().sum() > 0
        optimizer.step()

    acnet.eval()
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-9)):  # box decoding amplifies rounding
        model = acnet.to(dtype)
        collapsed = acfx.collapse(model)  # in float64, the fusion itself is checked to float64 rounding
        inputs = [i.to(dtype) for i in images]
        with torch.no_grad():
            before, after = model(inputs), collapsed(inputs)
        for b, a in zip(before, after):
            assert len(b["boxes"]) > 10 and len(a["boxes"]) == len(b["boxes"])
            assert torch.equal(a["labels"], b["labels"]), (a["labels"], b["labels"])
            assert_rel_close(a["boxes"], b["boxes"], tol, what=f"boxes {dtype}")
            assert_rel_close(a["scores"], b["scores"], tol, what=f"scores {dtype}")
    fresh = acfx.unfreeze_batch_norm(_detector())
    fresh.load_state_dict(collapsed.float().state_dict(), strict=True)


def test_a_carried_bn_hook_that_reads_its_input_gets_a_clear_error():
    # The BN's input (the pre-normalisation sum) does not exist once each branch has its own BN.
    model = _two_sites()
    model[1].register_forward_hook(lambda module, args, out: out + args[0])
    expanded = acfx.expand(model).eval()
    with pytest.raises(RuntimeError, match=r"BatchNorm2d '1'.*input no longer exists"):
        expanded(torch.randn(2, 3, 8, 8))
    assert len(acfx.collapse(expanded)[1]._forward_hooks) == 1  # back on a BN: its input is real again


def test_a_hook_handle_still_removes_the_carried_hook_and_collapse_does_not_bring_it_back():
    model = _two_sites()
    handle = model[1].register_forward_hook(lambda module, args, out: out * 2)
    expanded = acfx.expand(model, inplace=True).eval()
    assert len(expanded[1]._forward_hooks) == 1
    handle.remove()
    assert not expanded[1]._forward_hooks, "the user's handle no longer removes the hook it returned"
    x = torch.randn(2, 3, 8, 8)
    randomize_bn(expanded, seed=3)
    with torch.no_grad():
        y = expanded(x)
        collapsed = acfx.collapse(expanded)
        assert not collapsed[1]._forward_hooks
        assert_rel_close(collapsed(x), y)


def test_unfreeze_leaves_frozen_bns_it_cannot_reproduce_with_a_warning():
    from torchvision.ops.misc import FrozenBatchNorm2d

    class ClampedFrozen(FrozenBatchNorm2d):
        def forward(self, x):
            return super().forward(x).clamp(min=-1.0)

    x = torch.randn(2, 3, 8, 8)
    for make in (lambda: ClampedFrozen(8), lambda: FrozenBatchNorm2d(8)):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), make())
        with torch.no_grad():
            model[1].running_mean.uniform_(-1, 1)
        if type(model[1]) is FrozenBatchNorm2d:
            model[1].register_forward_hook(lambda module, args, out: out * 3)
        with torch.no_grad():
            y = model(x)
        with pytest.warns(UserWarning, match="left frozen"):
            unfrozen = acfx.unfreeze_batch_norm(model)
        assert isinstance(unfrozen[1], FrozenBatchNorm2d)
        with torch.no_grad():
            assert_rel_close(unfrozen(x), y)


def test_ssdlite_heads_expand_under_code_that_does_not_trace_and_collapse_exactly():
    # SSD's heads do not trace; their convs sit in ModuleLists, traced item by item (12 of the 32 sites).
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    model = randomize_bn(model.double()).eval()
    x = torch.randn(1, 3, 128, 128, dtype=torch.float64)

    def head(m):
        out = m.head(list(m.backbone(x).values()))
        return torch.cat([out["bbox_regression"].flatten(), out["cls_logits"].flatten()])

    with torch.no_grad():
        y = head(model)
        acnet, report = acfx.expand(model, init="preserve", return_report=True)
        assert sum(".module_list." in e.name for e in report.of("expanded")) == 12, report
        assert_rel_close(head(acnet.eval()), y, what="expanded heads (float64)")
        randomize_bn(acnet, seed=3)
        y = head(acnet)
        collapsed = acfx.collapse(acnet)
        assert_rel_close(head(collapsed), y, what="collapsed heads (float64)")
    fresh = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    fresh.double().load_state_dict(collapsed.state_dict(), strict=True)


def test_timm_frozen_norm_act_layers_are_unfrozen_and_their_convs_expand():
    from timm.layers import BatchNormAct2d, ConvNormAct, FrozenBatchNormAct2d, freeze_batch_norm_2d
    torch.manual_seed(0)
    model = nn.Sequential(ConvNormAct(3, 8, 3), ConvNormAct(8, 8, 3))
    randomize_bn(model)
    frozen = freeze_batch_norm_2d(model).eval()
    assert isinstance(frozen[0].bn, FrozenBatchNormAct2d)
    x = torch.randn(2, 3, 8, 8)
    expected = frozen(x)
    unfrozen, report = acfx.unfreeze_batch_norm(frozen, inplace=False, return_report=True)
    assert [e.action for e in report.entries] == ["unfrozen", "unfrozen"], report
    assert isinstance(frozen[0].bn, FrozenBatchNormAct2d), "inplace=False changed the model it was given"
    assert type(unfrozen[0].bn) is BatchNormAct2d and type(unfrozen[0].bn.act) is type(frozen[0].bn.act)
    assert_rel_close(unfrozen.eval()(x), expected)
    acnet, expand_report = acfx.expand(unfrozen, init="preserve", return_report=True)
    assert len(expand_report.of("expanded")) == 2
    assert_rel_close(acnet.eval()(x), expected)
