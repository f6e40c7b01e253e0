"""What is particular to the recompute ACB forward (its equivalence with the branch forward is in
test_exact_impls.py): it keeps no conv output for backward, and runs in training mode only."""
import timm
import torch
import torch.nn as nn
from test_exact_impls import pair

import acfx
from acfx.layers.recompute import recompute_unsupported
from acfx.tools.diagnostics import saved_activation_bytes


def test_recompute_keeps_no_conv_output_for_backward():
    """What the implementation is for: the branch forward keeps three C_out×H×W conv outputs per block
    (the BNs' inputs); the recompute forward keeps none."""
    torch.manual_seed(0)
    reference, recompute = pair("recompute", nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False),
                                                           nn.BatchNorm2d(16)))
    x = torch.randn(4, 8, 12, 12, requires_grad=True)
    conv_output = 4 * 16 * 12 * 12 * 4  # bytes of one float32 conv output
    kept = {name: saved_activation_bytes(lambda: model(x), (x, *model.parameters()))
            for name, model in (("branches", reference), ("recompute", recompute))}
    assert kept["branches"] >= 3 * conv_output, kept
    assert kept["recompute"] < conv_output, kept


def test_recompute_runs_in_training_mode_only():
    torch.manual_seed(0)
    _, recompute = pair("recompute", timm.create_model("resnet18", num_classes=10))
    block = recompute.layer1[0].conv1
    assert recompute_unsupported(block) is None
    recompute.eval()
    assert "eval mode" in recompute_unsupported(block)
    calls = []
    block.square.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        recompute(torch.randn(1, 3, 32, 32))
    assert calls, "in eval mode the branch forward runs"


def test_sync_batchnorm_and_summed_norm_blocks_keep_the_branch_forward():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(acfx.expand(model))
    _, report = acfx.set_exact_impl(synced, "recompute", return_report=True)
    assert "SyncBatchNorm" in report.skipped[0].detail
    _, report = acfx.set_exact_impl(acfx.expand(model, norm="sum"), "recompute", return_report=True)
    assert "norm='branch'" in report.skipped[0].detail


def test_recompute_compiles_without_graph_breaks():
    """Forward and backward of the Function are plain aten ops, so torch.compile keeps one graph."""
    torch.manual_seed(0)
    _, recompute = pair("recompute", nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    explained = torch._dynamo.explain(recompute)(torch.randn(2, 4, 9, 9))
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
