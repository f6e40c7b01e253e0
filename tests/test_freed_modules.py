"""What a pass takes out of a model is freed when it returns, not at Python's next cyclic collection.

A collapsed model's old branches would otherwise keep their memory (GPU memory included) until the cyclic
collector happens to run; on a large model that is a second model's worth.
"""
import gc
import weakref

import pytest
import timm
import torch
import torch.nn as nn

import acfx
from tests.helpers import assert_rel_close, kxk_convs, randomize_bn


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def _net() -> nn.Module:
    return nn.Sequential(_conv_bn(3, 8), _conv_bn(8, 8), _conv_bn(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _leaked(run, model: nn.Module) -> tuple:
    """(``run(model)``, the names of ``model``'s modules, parameters and buffers that are out of that result
    and still alive), with the cyclic collector off."""
    gc.collect()
    gc.disable()
    try:
        named = list(model.named_modules()) + list(model.named_parameters()) + list(model.named_buffers())
        refs = {name: weakref.ref(obj) for name, obj in named}
        del named
        result = run(model)
        del model
        kept = {id(obj) for obj in [*result.modules(), *result.parameters(), *result.buffers()]}
        return result, [name for name, ref in refs.items() if ref() is not None and id(ref()) not in kept]
    finally:
        gc.enable()


@pytest.mark.parametrize("recipe,mode", [("acb", "exact"), ("dbb", "exact"), ("mobileone", "exact"),
                                         ("repvgg", "online")])
def test_collapse_frees_the_blocks_it_replaces(recipe, mode):
    torch.manual_seed(0)
    model = randomize_bn(acfx.expand(_net(), recipe=recipe, mode=mode)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    collapsed, leaked = _leaked(lambda m: acfx.collapse(m, inplace=True), model)
    assert not leaked, f"alive after collapse(inplace=True) without the cyclic collector: {leaked}"
    assert not any(isinstance(m, (acfx.ACBlock, acfx.NormTail, acfx.OnlineACConv)) for m in collapsed.modules())
    with torch.no_grad():
        assert_rel_close(collapsed(x), expected, 1e-5)


def test_expand_frees_what_it_replaces_on_a_timm_model():
    expanded, leaked = _leaked(lambda m: acfx.expand(m, inplace=True, recipe="dbb"), timm.create_model("resnet18"))
    assert sum(isinstance(m, acfx.ACBlock) for m in expanded.modules()) == kxk_convs(timm.create_model("resnet18"))
    assert not leaked, f"alive after expand(inplace=True) without the cyclic collector: {leaked}"


def test_a_tail_outside_the_collapsed_module_keeps_its_block():
    """Collapsing one block of a model leaves its NormTail (outside the collapsed module) in the model; the
    tail still reads the shift from its block, so their link must stay."""
    torch.manual_seed(0)
    model = randomize_bn(acfx.expand(_net())).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    block = model[1][0]
    model[1][0] = acfx.collapse(block)
    assert model[1][1].block() is block
    with torch.no_grad():
        assert_rel_close(model(x), expected, 1e-5)
