"""Every alternative ACB forward (acfx.set_exact_impl) against the branch forward it must equal.

Outputs, running statistics after several training steps, and every parameter's gradient, over the
geometry matrix and the expand variants; then autocast, torch.compile, and collapse of a model trained with
each. Several optimizer steps are compared in float64, where the implementations differ only by rounding
(1e-10); in float32 the optimizer would amplify each step's rounding, so float32 is compared over one step.
"""
import copy

import pytest
import torch
import torch.nn as nn
from timm.layers import Conv2dSame

import acfx

from helpers import assert_rel_close, randomize_bn
from test_geometry import GEOMETRIES, _conv_bn, _ids

IMPLS = ("stacked", "recompute")


def pair(impl: str, model: nn.Module, **expand_kwargs):
    """The same expanded model twice: branch forward (reference) and ``impl``."""
    reference = randomize_bn(acfx.expand(model, **expand_kwargs), seed=5).train()
    other = copy.deepcopy(reference)
    _, report = acfx.set_exact_impl(other, impl, return_report=True)
    assert not report.skipped and report.of("switched"), report
    return reference, other


def _train_and_compare(reference, other, x, what, steps=3):
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, other)]
    for step in range(steps):
        outs = []
        for model, opt in zip((reference, other), optimizers):
            opt.zero_grad()
            out = model(x)
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
            outs.append(out)
        assert_rel_close(outs[1], outs[0], what=f"{what} step {step}: training output")
        # All gradients as one vector: a conv bias before a training-mode BN has a zero gradient, which
        # each implementation rounds differently.
        grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (reference, other)]
        assert_rel_close(grads[1], grads[0], what=f"{what} step {step}: gradients")
        for opt in optimizers:
            opt.step()
    for (name, b_ref), (_, b_other) in zip(reference.named_buffers(), other.named_buffers()):
        if b_ref.is_floating_point():
            assert_rel_close(b_other, b_ref, what=f"{what}: {name} after {steps} steps")
        else:
            assert torch.equal(b_other, b_ref), f"{what}: {name} {b_other} != {b_ref}"
    reference.eval(), other.eval()
    with torch.no_grad():
        assert_rel_close(other(x), reference(x), what=f"{what}: eval output")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=_ids)
def test_matches_branches_in_training_and_eval(impl, geom):
    torch.manual_seed(0)
    reference, other = pair(impl, _conv_bn(geom, bias=True, dtype=torch.float64))
    _train_and_compare(reference, other, torch.randn(4, 8, 11, 12, dtype=torch.float64), f"{impl} {_ids(geom)}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("expand_kwargs", [dict(branches="hor"), dict(branches="ver"), dict(placement="border"),
                                           dict(init="preserve"), dict(gamma_init=1 / 3)],
                         ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_matches_branches_for_variants(impl, expand_kwargs):
    torch.manual_seed(0)
    model = _conv_bn(((3, 3), 2, 1, 1, 2, "zeros"), dtype=torch.float64)
    reference, other = pair(impl, model, **expand_kwargs)
    _train_and_compare(reference, other, torch.randn(4, 8, 12, 12, dtype=torch.float64), f"{impl} {expand_kwargs}")


@pytest.mark.parametrize("impl", IMPLS)
def test_conv2d_same_momentum_none_and_channels_last(impl):
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(8, 16, 3, 2, bias=False), nn.BatchNorm2d(16, momentum=None), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16))
    reference, other = pair(impl, model)
    x = torch.randn(4, 8, 15, 16).to(memory_format=torch.channels_last)
    _train_and_compare(reference, other, x, f"{impl}: Conv2dSame, momentum=None, channels_last, float32", steps=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_autocast_matches_branches(impl):
    torch.manual_seed(0)
    reference, other = pair(impl, nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()))
    x = torch.randn(4, 8, 12, 12)
    grads = []
    for model in (reference, other):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert_rel_close(grads[1], grads[0], tol=1e-2, what=f"{impl}: bf16 autocast gradients")


@pytest.mark.parametrize("impl", IMPLS)
def test_a_model_trained_with_it_collapses_exactly(impl):
    import timm
    torch.manual_seed(0)
    _, other = pair(impl, timm.create_model("resnet18", num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    opt = torch.optim.SGD(other.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        other.train()(x).logsumexp(-1).mean().backward()
        opt.step()
    other.eval()
    collapsed = acfx.collapse(other)  # tracing sees the branches, whatever the impl
    with torch.no_grad():
        assert_rel_close(collapsed(x), other(x), what=f"collapse of a resnet18 trained with {impl}")
    timm.create_model("resnet18", num_classes=10).load_state_dict(collapsed.state_dict(), strict=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_under_torch_compile_matches_eager(impl):
    torch.manual_seed(0)
    eager, other = pair(impl, nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU()))
    acfx.set_exact_impl(eager, impl)
    compiled_copy = copy.deepcopy(other)
    compiled = torch.compile(compiled_copy)
    x = torch.randn(2, 4, 9, 9)
    outs = [eager(x), compiled(x)]
    for out in outs:
        out.square().mean().backward()
    assert_rel_close(outs[1], outs[0], what=f"compiled {impl} training forward")
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (eager, compiled_copy)]
    assert_rel_close(grads[1], grads[0], what=f"compiled {impl} gradients")
    for name, buffer in eager.named_buffers():
        assert_rel_close(compiled_copy.get_buffer(name).float(), buffer.float(), what=f"{name} after one step")


@pytest.mark.parametrize("impl", IMPLS)
def test_momentum_none_with_a_pretrained_bn_counts_each_branch_apart(impl):
    # preserve init from a BN that has counted batches: the new branch BNs start their own count, so with
    # momentum=None each branch averages with its own factor (1/n), as its nn.BatchNorm2d would.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, momentum=None))
    model[1].num_batches_tracked.fill_(100)
    reference, other = pair(impl, randomize_bn(model).double(), init="preserve")
    _train_and_compare(reference, other, torch.randn(4, 8, 12, 12, dtype=torch.float64), f"{impl}: momentum=None")
