"""The recompute ACB forward (branches whose conv→BN keeps only its input) against the branch forward.

Same checks as the stacked forward (outputs, running statistics after several steps, gradients, over the
geometry matrix, in float64), plus what it is for: no conv output kept for backward.
"""
import copy

import pytest
import torch
import torch.nn as nn
from timm.layers import Conv2dSame

import acfx
from acfx.recompute import recompute_unsupported
from helpers import assert_rel_close, randomize_bn
from test_geometry import GEOMETRIES, _conv_bn, _ids
from test_stacked import _train_and_compare


def _pair(model: nn.Module, **expand_kwargs):
    """The same expanded model twice: branch forward (reference) and recompute forward."""
    reference = randomize_bn(acfx.expand(model, **expand_kwargs), seed=5).train()
    recompute = copy.deepcopy(reference)
    assert acfx.set_exact_impl(recompute, "recompute") == {}
    return reference, recompute


@pytest.mark.parametrize("geom", GEOMETRIES, ids=_ids)
def test_recompute_matches_branches_in_training_and_eval(geom):
    torch.manual_seed(0)
    reference, recompute = _pair(_conv_bn(geom, bias=True, dtype=torch.float64))
    _train_and_compare(reference, recompute, torch.randn(4, 8, 11, 12, dtype=torch.float64), _ids(geom))


@pytest.mark.parametrize("expand_kwargs", [dict(branches="hor"), dict(placement="border"), dict(init="preserve")],
                         ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_recompute_matches_branches_for_variants(expand_kwargs):
    torch.manual_seed(0)
    reference, recompute = _pair(_conv_bn(((3, 3), 2, 1, 1, 2, "zeros"), dtype=torch.float64), **expand_kwargs)
    _train_and_compare(reference, recompute, torch.randn(4, 8, 12, 12, dtype=torch.float64), str(expand_kwargs))


def test_recompute_with_conv2d_same_momentum_none_and_channels_last():
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(8, 16, 3, 2, bias=False), nn.BatchNorm2d(16, momentum=None), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16))
    reference, recompute = _pair(model)
    x = torch.randn(4, 8, 15, 16).to(memory_format=torch.channels_last)
    _train_and_compare(reference, recompute, x, "Conv2dSame, momentum=None, channels_last, float32", steps=1)


def test_recompute_under_bf16_autocast_matches_branches():
    """Backward recomputes under the forward's autocast state, so it runs the same bf16 convs."""
    torch.manual_seed(0)
    reference, recompute = _pair(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()))
    x = torch.randn(4, 8, 12, 12)
    grads = []
    for model in (reference, recompute):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert_rel_close(grads[1], grads[0], tol=1e-2, what="bf16 autocast gradients")


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward, inputs and parameters excluded."""
    exclude = {t.untyped_storage().data_ptr() for t in (x, *model.parameters())}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def test_recompute_keeps_no_conv_output_for_backward():
    """What the implementation is for: the branch forward keeps three C_out×H×W conv outputs per block
    (the BNs' inputs); the recompute forward keeps none."""
    torch.manual_seed(0)
    reference, recompute = _pair(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)))
    x = torch.randn(4, 8, 12, 12, requires_grad=True)
    conv_output = 4 * 16 * 12 * 12 * 4  # bytes of one float32 conv output
    kept_by_branches, kept_by_recompute = _saved_bytes(reference, x), _saved_bytes(recompute, x)
    assert kept_by_branches >= 3 * conv_output, kept_by_branches
    assert kept_by_recompute < conv_output, kept_by_recompute


def test_recompute_is_used_in_training_only_and_collapses():
    import timm
    torch.manual_seed(0)
    reference, recompute = _pair(timm.create_model("resnet18", num_classes=10))
    block = recompute.layer1[0].conv1
    assert recompute_unsupported(block) is None
    block.eval()
    assert "eval mode" in recompute_unsupported(block)
    x = torch.randn(2, 3, 64, 64)
    opt = torch.optim.SGD(recompute.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        recompute.train()(x).logsumexp(-1).mean().backward()
        opt.step()
    recompute.eval()
    collapsed = acfx.collapse(recompute)
    with torch.no_grad():
        assert_rel_close(collapsed(x), recompute(x), what="collapse of a recompute-trained resnet18")
    timm.create_model("resnet18", num_classes=10).load_state_dict(collapsed.state_dict(), strict=True)


def test_sync_batchnorm_blocks_keep_the_branch_forward():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(acfx.expand(model))
    assert "SyncBatchNorm" in acfx.set_exact_impl(synced, "recompute")["0"]
    assert "norm='branch'" in acfx.set_exact_impl(acfx.expand(model, norm="sum"), "recompute")["0"]


def test_recompute_under_torch_compile_matches_eager():
    torch.manual_seed(0)
    eager, recompute = _pair(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU()))
    compiled = torch.compile(recompute)
    x = torch.randn(2, 4, 9, 9)
    outs = [eager(x), compiled(x)]
    for out in outs:
        out.square().mean().backward()
    assert_rel_close(outs[1], outs[0], what="compiled recompute training forward")
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (eager, recompute)]
    assert_rel_close(grads[1], grads[0], what="compiled recompute gradients")
    for name, buffer in eager.named_buffers():
        assert_rel_close(recompute.get_buffer(name).float(), buffer.float(), what=f"{name} after one step")
