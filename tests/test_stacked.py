"""What is particular to the stacked ACB forward (its equivalence with the branch forward is in
test_exact_impls.py): it really runs one conv and one BN, and the blocks it cannot compute keep the
branch forward."""
import copy

import pytest
import torch
import torch.nn as nn
from test_exact_impls import pair

import acfx
from acfx.layers.stacked import stacked_unsupported

from helpers import assert_rel_close, randomize_bn


def test_blocks_that_keep_the_branch_forward_are_reported():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8))
    summed = acfx.expand(model, norm="sum")
    same, report = acfx.set_exact_impl(summed, "stacked", return_report=True)
    assert same is summed and [e.name for e in report.skipped] == ["0"] and "norm='branch'" in report.skipped[0].detail
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(acfx.expand(model))
    _, report = acfx.set_exact_impl(synced, "stacked", return_report=True)
    assert "SyncBatchNorm" in report.skipped[0].detail
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
    reference, stacked = pair("stacked", model)
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


