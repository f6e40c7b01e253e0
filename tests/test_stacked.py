"""The stacked ACB forward (one conv, one BN, one sum) against the branch forward it must equal.

Outputs, running statistics after several training steps, and every parameter's gradient, over the
geometry matrix; then collapse of a model trained with it, and the cases that keep the branch forward.
Several optimizer steps are compared in float64, where the two differ only by rounding (1e-10); in float32
the optimizer would amplify each step's rounding, so float32 is compared over one step.
"""
import copy

import pytest
import torch
import torch.nn as nn
from timm.layers import Conv2dSame

import acfx
from acfx.stacked import stacked_unsupported
from helpers import assert_rel_close, randomize_bn
from test_geometry import GEOMETRIES, _conv_bn, _ids


def _pair(model: nn.Module, **expand_kwargs):
    """The same expanded model twice: branch forward (reference) and stacked forward."""
    reference = randomize_bn(acfx.expand(model, **expand_kwargs), seed=5).train()
    stacked = copy.deepcopy(reference)
    assert acfx.set_exact_impl(stacked, "stacked") == {}
    return reference, stacked


def _train_and_compare(reference, stacked, x, what, steps=3):
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, stacked)]
    for step in range(steps):
        outs = []
        for model, opt in zip((reference, stacked), optimizers):
            opt.zero_grad()
            out = model(x)
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            outs.append(out)
        assert_rel_close(outs[1], outs[0], what=f"{what} step {step}: training output")
        # All gradients as one vector: a conv bias before a training-mode BN has a zero gradient, which
        # each implementation rounds differently.
        grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (reference, stacked)]
        assert_rel_close(grads[1], grads[0], what=f"{what} step {step}: gradients")
        for opt in optimizers:
            opt.step()
    for (name, b_ref), (_, b_st) in zip(reference.named_buffers(), stacked.named_buffers()):
        if b_ref.is_floating_point():
            assert_rel_close(b_st, b_ref, what=f"{what}: {name} after {steps} steps")
        else:
            assert torch.equal(b_st, b_ref), f"{what}: {name} {b_st} != {b_ref}"
    reference.eval(), stacked.eval()
    with torch.no_grad():
        assert_rel_close(stacked(x), reference(x), what=f"{what}: eval output")


@pytest.mark.parametrize("geom", GEOMETRIES, ids=_ids)
def test_stacked_matches_branches_in_training_and_eval(geom):
    torch.manual_seed(0)
    reference, stacked = _pair(_conv_bn(geom, bias=True, dtype=torch.float64))
    _train_and_compare(reference, stacked, torch.randn(4, 8, 11, 12, dtype=torch.float64), _ids(geom))


@pytest.mark.parametrize("expand_kwargs", [dict(branches="hor"), dict(branches="ver"), dict(placement="border"),
                                           dict(init="preserve"), dict(gamma_init=1 / 3)],
                         ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_stacked_matches_branches_for_variants(expand_kwargs):
    torch.manual_seed(0)
    reference, stacked = _pair(_conv_bn(((3, 3), 2, 1, 1, 2, "zeros"), dtype=torch.float64), **expand_kwargs)
    _train_and_compare(reference, stacked, torch.randn(4, 8, 12, 12, dtype=torch.float64), str(expand_kwargs))


def test_stacked_with_conv2d_same_momentum_none_and_channels_last():
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(8, 16, 3, 2, bias=False), nn.BatchNorm2d(16, momentum=None), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16))
    reference, stacked = _pair(model)
    x = torch.randn(4, 8, 15, 16).to(memory_format=torch.channels_last)
    _train_and_compare(reference, stacked, x, "Conv2dSame, momentum=None, channels_last, float32", steps=1)


def test_a_model_trained_stacked_collapses_exactly():
    torch.manual_seed(0)
    import timm
    reference, stacked = _pair(timm.create_model("resnet18", num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    opt = torch.optim.SGD(stacked.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        stacked(x).logsumexp(-1).mean().backward()
        opt.step()
    stacked.eval()
    collapsed = acfx.collapse(stacked)  # tracing sees the branches, whatever the impl
    with torch.no_grad():
        assert_rel_close(collapsed(x), stacked(x), what="collapse of a stacked-trained resnet18")
    timm.create_model("resnet18", num_classes=10).load_state_dict(collapsed.state_dict(), strict=True)


def test_blocks_that_keep_the_branch_forward_are_reported():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8))
    summed = acfx.expand(model, norm="sum")
    kept = acfx.set_exact_impl(summed, "stacked")
    assert list(kept) == ["0"] and "norm='branch'" in kept["0"]
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(acfx.expand(model))
    kept = acfx.set_exact_impl(synced, "stacked")
    assert "SyncBatchNorm" in kept["0"]
    x = torch.randn(2, 4, 9, 9)
    reference = randomize_bn(acfx.expand(model), seed=1).eval()
    fallback = copy.deepcopy(reference)
    fallback[0].impl = "stacked"
    fallback[0].square_bn.eps = 1e-3  # BNs that differ: the stacked forward would be wrong, so it is not used
    assert stacked_unsupported(fallback[0]) is not None
    with torch.no_grad():
        fallback[0].square_bn.eps = reference[0].square_bn.eps
        assert stacked_unsupported(fallback[0]) is None
        assert_rel_close(fallback(x), reference(x))


def test_bad_impl_or_model_is_a_clear_error():
    with pytest.raises(ValueError, match="impl must be one of"):
        acfx.set_exact_impl(acfx.expand(nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8))), "fast")
    with pytest.raises(ValueError, match="Sequential has no ACBlock: call acfx.expand"):
        acfx.set_exact_impl(nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8)), "stacked")


def test_stacked_runs_one_conv_and_one_bn():
    """The stacked forward really replaces the branches: their modules are not called."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8))
    reference, stacked = _pair(model)
    calls = []
    for block in (reference[0], stacked[0]):
        for name, child in block.named_children():
            child.register_forward_hook(lambda mod, args, out, key=(id(block), name): calls.append(key))
    x = torch.randn(2, 4, 9, 9)
    reference(x)
    assert len(calls) == 6  # three convs, three BNs
    calls.clear()
    stacked(x)
    assert calls == [], calls


def test_stacked_under_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU())
    eager, stacked = _pair(model)
    acfx.set_exact_impl(eager, "stacked")
    compiled_copy = copy.deepcopy(stacked)
    compiled = torch.compile(compiled_copy)
    x = torch.randn(2, 4, 9, 9)
    assert_rel_close(compiled(x), eager(x), what="compiled stacked training forward")
    for name, buffer in eager.named_buffers():
        assert_rel_close(compiled_copy.get_buffer(name).float(), buffer.float(), what=f"{name} after one step")
