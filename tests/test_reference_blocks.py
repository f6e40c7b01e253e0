"""Blocks from the ACNet, RepVGG and DBB papers' code, in-place activations after every kind of slot, and
acb_tf_* models under timm's fx tools: every block reported, the fusable ones fused exactly."""
import itertools

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn as nn
from timm.layers import BatchNormAct2d, get_notrace_functions, get_notrace_modules

import acfx
import acfx.timm

from helpers import assert_rel_close, randomize_bn
from reference_blocks import DBBStyle, PaperACB, RepVGGStyle


def _collapse(model, x):
    model = randomize_bn(model, seed=3).eval()
    collapsed, report = acfx.collapse(model, return_report=True)
    with torch.no_grad():
        assert_rel_close(collapsed(x), model(x))
    return collapsed, report


def test_every_block_of_a_repvgg_style_net_is_in_the_report():
    """RepVGG adds the constant 0 where a block has no identity branch; 3 of 6 blocks also end in ReLU."""
    net = nn.Sequential(RepVGGStyle(4, 8, 2), RepVGGStyle(8, 8), RepVGGStyle(8, 16, 2, act=False),
                        RepVGGStyle(16, 16, act=False), RepVGGStyle(16, 16), RepVGGStyle(16, 32, 2, act=False))
    collapsed, report = _collapse(net, torch.randn(2, 4, 16, 16))
    entries = {e.name: e for e in report.entries}
    assert set(entries) == {str(i) for i in range(6)}, report
    assert all(e.action == "collapsed" for e in entries.values()), report
    for i in (2, 3, 5):  # no ReLU after the sum (+ 0, or the identity BN): one conv
        assert type(collapsed[i]) is nn.Conv2d and "replaced by one Conv2d" in entries[str(i)].detail
    for i in (0, 1, 4):  # the ReLU after the sum stays: the forward is one conv, then the ReLU
        assert isinstance(collapsed[i], torch.fx.GraphModule) and type(collapsed[i]).__name__ == "RepVGGStyle"
        assert "forward rewritten" in entries[str(i)].detail
        assert [type(m) for m in collapsed[i].children()] == [nn.Conv2d, nn.ReLU]
    assert all(" 0x0" not in e.what for e in report.entries)


def test_a_dbb_block_without_its_bias_padding_is_left_with_the_reason():
    """1×1 → BN → k×k with the k×k padding zeros is not one conv at the border (DBB pads with the BN's bias)."""
    collapsed, report = _collapse(nn.Sequential(nn.Conv2d(3, 8, 1), DBBStyle(8)), torch.randn(2, 3, 10, 10))
    (entry,) = report.entries
    assert entry.name == "1" and entry.action == "skipped" and "BNAndPadLayer" in entry.detail, report
    assert isinstance(collapsed[1], DBBStyle)


@pytest.mark.parametrize("k,padding", [(3, 1), (5, 2), (3, 0), (5, 1), (3, 2)])
@pytest.mark.parametrize("stride", [1, 2])
def test_the_papers_acb_with_identity_and_crop_layers_collapses(k, padding, stride):
    collapsed, report = _collapse(PaperACB(4, 6, k, stride, padding), torch.randn(2, 4, 11, 12))
    assert type(collapsed) is nn.Conv2d and collapsed.kernel_size == (k, k) and collapsed.padding == (padding,) * 2
    (entry,) = report.of("collapsed")
    assert entry.what.endswith(f"→ Conv2d {k}x{k}")


PADDED = [(mode, k, p, s) for mode, k, p, s in itertools.product(("reflect", "replicate", "circular"), (3, 5),
                                                                   (1, 2, 3), (1, 2)) if p < k]


@pytest.mark.parametrize("mode,k,padding,stride", PADDED)
def test_acnet_blocks_padding_in_other_modes_collapse_exactly(mode, k, padding, stride):
    """Each branch pads itself in the same mode: an index map per axis, which one conv reproduces."""
    x = torch.randn(2, 4, 11, 12, dtype=torch.float64)
    collapsed, _ = _collapse(PaperACB(4, 6, k, stride, padding, padding_mode=mode).double(), x)
    assert type(collapsed) is nn.Conv2d and collapsed.padding_mode == mode


# -- in-place activations after every kind of slot --------------------------------------------------------------
def _slot_models():
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    norm_act = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8, act_layer=nn.ReLU))
    sync = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.SyncBatchNorm(8), nn.ReLU(inplace=True))
    return {"BatchNorm2d": plain, "BatchNormAct2d": norm_act, "SyncBatchNorm": sync}


# SyncBatchNorm trains only in a process group (test_training_setups covers that); here it runs in eval.
SLOTS = [(slot, impl, training) for slot in ("BatchNorm2d", "BatchNormAct2d") for impl in
         ("branches", "stacked", "recompute") for training in (True, False)] + [("SyncBatchNorm", "branches", False)]


@pytest.mark.parametrize("slot,impl,training", SLOTS)
def test_in_place_activations_never_reach_a_tensor_the_block_returned(slot, impl, training):
    model = randomize_bn(acfx.expand(_slot_models()[slot]))
    acfx.set_exact_impl(model, impl)
    model.train(training)
    taps = []
    model[0].register_forward_hook(lambda m, args, out: taps.append((out, out.clone())))
    model(torch.randn(2, 3, 8, 8))
    (tapped, copy), = taps
    assert torch.equal(tapped, copy), "an in-place activation changed the block's output after it was returned"
    assert tapped.min() < 0  # the block's output, not the activation's


def test_every_acb_tf_model_traces_with_timms_fx_leaves():
    """timm's fx tools (FeatureGraphNet, create_feature_extractor) trace with timm's leaf lists."""
    leaves = tuple(get_notrace_modules())

    class TimmTracer(fx.Tracer):
        def __init__(self):
            super().__init__(autowrap_functions=tuple(get_notrace_functions()))

        def is_leaf_module(self, m, qualified_name):
            return isinstance(m, leaves) or super().is_leaf_module(m, qualified_name)

    model = randomize_bn(timm.create_model("acb_tf_efficientnet_b0")).eval()
    extractor = timm.models.create_feature_extractor(model, return_nodes=["conv_head"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_rel_close(extractor(x)["conv_head"], model.conv_head(model.blocks(model.bn1(model.conv_stem(x)))))
    names = [n for n in acfx.timm.registered() if n.startswith("acb_tf_")]
    assert len(names) == 38
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name)
        TimmTracer().trace(model)
