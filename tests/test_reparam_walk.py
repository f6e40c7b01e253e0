"""timm's reparameterize_model (validate.py / benchmark.py --reparam) on expanded models.

timm's walk re-parameterises a block before its children: a RepVGG / MobileOne / FastViT block reads its
conv child's kernel and BN. acfx gives such blocks a stand-in that first fuses the acfx modules beneath
them back into the original conv and BN; the result must compute what the acb_ model computes and be what
the walk makes of the plain base model.
"""
import pytest
import timm
import torch
import torch.nn as nn
from timm.utils.model import reparameterize_model

import acfx
import acfx.timm
from acfx.tools.reparam_check import check_reparameterize, rep_block_modules, rep_families
from acfx.tools.zoo import input_size_for

from helpers import assert_rel_close, randomize_bn

# Found by listing: every timm family with a module defining fuse / reparameterize / switch_to_deploy, and
# in each the smallest registered acb_ model that uses one (benchmarks/reparam_coverage.py runs them all).
FAMILIES = rep_families(acfx.timm.registered(), smallest_only=True)


def test_the_listing_finds_the_known_families():
    assert {"byobnet", "fastvit", "repvit", "repghost"} <= set(rep_block_modules())
    assert {"byobnet", "fastvit", "repvit", "repghost", "levit"} <= set(FAMILIES), FAMILIES


@pytest.mark.slow
@pytest.mark.parametrize("name", [names[0] for names in FAMILIES.values()])
def test_reparameterize_model_of_an_acb_model_is_that_of_the_base_model(name):
    with torch.device("meta"):
        size = input_size_for(timm.create_model(name), name)
    result = check_reparameterize(name, torch.randn(1, *size))
    assert result.failure is None, result.failure
    assert result.exact, (f"reparameterize_model vs acb_{name}: {result.error:.2e}", result.float64)
    assert result.same_types, "the deploy form differs in module types from reparameterize_model(base)"
    assert result.strict_reload is None, result.strict_reload


class MyRepBlock(nn.Module):
    """A hand-written re-parameterisable block: 3×3 conv→BN plus 1×1 conv→BN, fused by its own method."""

    def __init__(self, c):
        super().__init__()
        self.kxk = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.fused = None

    @staticmethod
    def _fold(conv, bn):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return conv.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale

    def reparameterize(self):
        w3, b3 = self._fold(*self.kxk)  # reads its children as a conv and a BN
        w1, b1 = self._fold(*self.k1)
        self.fused = nn.Conv2d(w3.shape[1], w3.shape[0], 3, padding=1)
        self.fused.weight.data = w3 + nn.functional.pad(w1, (1, 1, 1, 1))
        self.fused.bias.data = b3 + b1
        del self.kxk, self.k1

    def forward(self, x):
        if self.fused is not None:
            return self.fused(x)
        return self.kxk(x) + self.k1(x)


def test_a_hand_written_block_with_its_own_reparameterize_sees_the_original_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), MyRepBlock(8))
    expanded = randomize_bn(acfx.expand(model)).eval()
    assert isinstance(expanded[3].kxk[0], acfx.ACBlock)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        y = expanded(x)
        deployed = reparameterize_model(expanded)
        assert_rel_close(deployed(x), y)
        direct = acfx.collapse(expanded)        # acfx.collapse gives the plain architecture instead
        assert_rel_close(direct(x), y)
    assert type(deployed[0]) is nn.Conv2d and type(deployed[1]) is nn.BatchNorm2d  # ACBlock.fuse + NormTail.fuse
    assert type(deployed[3].fused) is nn.Conv2d and not hasattr(deployed[3], "kxk")
    assert "reparameterize" not in vars(direct[3])  # the stand-in is gone with the blocks
    expanded[3].reparameterize()  # called by hand, the block's own method still sees its conv and BN
    with torch.no_grad():
        assert_rel_close(expanded(x), y)
