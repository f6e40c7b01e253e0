"""Init modes and the paper's variants: each builds what it says and still collapses exactly."""
import math

import pytest
import torch
import torch.nn as nn

import acfx

from helpers import assert_rel_close, randomize_bn


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 5, stride=2, padding=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class DenseLike(nn.Module):
    """A 3x3 conv whose output feeds a concat, with no BN after it (as in DenseNet)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.out = nn.Conv2d(10, 2, 3, padding=1, bias=False)

    def forward(self, x):
        new = self.conv(torch.relu(self.bn(x)))
        return self.out(torch.cat([x, new], 1))


def _round_trip_error(expanded, x):
    expanded = randomize_bn(expanded, seed=5).eval()
    collapsed = acfx.collapse(expanded)
    with torch.no_grad():
        return assert_rel_close(collapsed(x), expanded(x)), collapsed


@pytest.mark.parametrize("branches,has", [("both", ("hor", "ver")), ("hor", ("hor",)), ("ver", ("ver",))])
@pytest.mark.parametrize("norm", ["branch", "sum"])
@pytest.mark.parametrize("placement", ["centre", "border"])
def test_variants_build_what_they_say_and_collapse(branches, has, norm, placement):
    torch.manual_seed(0)
    model = TwoLayer()
    expanded = acfx.expand(model, branches=branches, norm=norm, placement=placement)
    block = expanded.conv2
    for name in ("hor", "ver"):
        assert (getattr(block, name) is not None) == (name in has)
        assert (getattr(block, name + "_bn") is not None) == (name in has and norm == "branch")
    assert (block.square_bn is not None) == (norm == "branch")
    assert type(expanded.bn2) is (acfx.NormTail if norm == "branch" else nn.BatchNorm2d)
    _, collapsed = _round_trip_error(expanded, torch.randn(2, 3, 13, 12))
    TwoLayer().load_state_dict(collapsed.state_dict(), strict=True)


@pytest.mark.parametrize("norm", ["branch", "sum"])
def test_preserve_is_exact_in_train_and_eval(norm):
    torch.manual_seed(0)
    model = randomize_bn(TwoLayer())
    expanded = acfx.expand(model, init="preserve", norm=norm)
    x = torch.randn(4, 3, 12, 12)
    for train in (True, False):
        with torch.no_grad():
            assert_rel_close(expanded.train(train)(x), model.train(train)(x), what=f"train={train}")
    if norm == "branch":
        bns = (expanded.conv1.hor_bn, expanded.conv1.ver_bn)
        assert all(bn.weight.abs().sum() == 0 and bn.bias.abs().sum() == 0 for bn in bns)
    else:
        assert expanded.conv1.hor.weight.abs().sum() == 0


def test_scratch_initialises_new_branches_like_nn_conv2d():
    torch.manual_seed(0)
    block = acfx.expand(TwoLayer()).conv2
    for conv, bn in ((block.hor, block.hor_bn), (block.ver, block.ver_bn)):
        fan_in = conv.weight[0].numel()
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), nn.Conv2d's default
        assert conv.weight.abs().max() <= bound
        assert conv.weight.std() > 0.4 * bound
        assert torch.equal(bn.weight, torch.ones(8)) and torch.equal(bn.bias, torch.zeros(8))


def test_gamma_init_sets_all_three_branch_scales_and_leaves_the_input_alone():
    model = TwoLayer()
    expanded = acfx.expand(model, gamma_init=1 / 3)
    for bn in (expanded.conv1.square_bn, expanded.conv1.hor_bn, expanded.conv1.ver_bn):
        assert torch.allclose(bn.weight, torch.full((8,), 1 / 3))
    assert torch.equal(model.bn1.weight, torch.ones(8))


@pytest.mark.parametrize("init", ["scratch", "preserve"])
def test_expanded_model_trains_with_finite_gradients_on_every_branch(init):
    torch.manual_seed(0)
    expanded = acfx.expand(TwoLayer(), init=init).train()
    expanded(torch.randn(4, 3, 12, 12)).square().mean().backward()
    for name, param in expanded.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    for block in (expanded.conv1, expanded.conv2):
        assert block.hor_bn.weight.grad.abs().sum() > 0 and block.ver_bn.weight.grad.abs().sum() > 0
        if init == "scratch":
            assert block.hor.weight.grad.abs().sum() > 0 and block.ver.weight.grad.abs().sum() > 0


def test_include_unnormed_expands_convs_without_bn_and_reports_the_new_bias():
    torch.manual_seed(0)
    model = randomize_bn(DenseLike())
    expanded, report = acfx.expand(model, return_report=True)
    assert not report.of("expanded")
    expanded, report = acfx.expand(model, include_unnormed=True, init="preserve", return_report=True)
    names = {e.name for e in report.of("expanded")}
    assert names == {"conv", "out"}
    assert [e.name for e in report.structure_changes] == ["out"]  # conv had a bias already
    assert expanded.conv.square_bn is None and expanded.conv.hor_bn is not None
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert_rel_close(expanded.eval()(x), model.eval()(x))
    _, collapsed = _round_trip_error(expanded, x)
    assert collapsed.out.bias is not None and type(collapsed.out) is nn.Conv2d


def test_filter_fn_chooses_the_convs():
    seen = []

    def only_conv2(module, name):
        seen.append((type(module), name))
        return name == "conv2"

    expanded, report = acfx.expand(TwoLayer(), filter_fn=only_conv2, return_report=True)
    assert isinstance(expanded.conv2, acfx.ACBlock) and type(expanded.conv1) is nn.Conv2d
    assert (nn.Conv2d, "conv1") in seen
    assert [e.detail for e in report.skipped] == ["excluded by filter_fn"]


@pytest.mark.parametrize("kwargs,error,text", [
    (dict(init="pretrained"), ValueError, "init='pretrained' is not one of"),
    (dict(branches="diag"), ValueError, "branches="),
    (dict(norm="none"), ValueError, "norm="),
    (dict(placement="left"), ValueError, "placement="),
    (dict(gamma_init=0.3, init="preserve"), ValueError, "init='scratch'"),
    (dict(gamma_init=0.3, norm="sum"), ValueError, "no branch BNs"),
    (dict(filter_fn="conv"), TypeError, "filter_fn must be callable"),
    (dict(leaf_modules=["Conv2d"]), TypeError, "leaf_modules"),
])
def test_bad_options_raise_with_the_fix(kwargs, error, text):
    with pytest.raises(error, match=text):
        acfx.expand(TwoLayer(), **kwargs)


# -- one record of the options: everything that offers them is derived from it or tested against it ---------
def test_expand_takes_the_options_record_and_its_fields_as_overrides():
    import dataclasses
    import inspect

    from acfx.passes.options import ExpandOptions
    parameters = inspect.signature(acfx.expand).parameters
    assert list(parameters) == ["model", "options", "inplace", "return_report", "overrides"]
    assert parameters["overrides"].kind is inspect.Parameter.VAR_KEYWORD
    record = ExpandOptions(placement="border", init="preserve")
    assert ExpandOptions.resolve(record, {}) == record
    assert ExpandOptions.resolve(record, {"init": "scratch"}) == dataclasses.replace(record, init="scratch")
    assert ExpandOptions.resolve(None, {"mode": "online"}).norm is None
    by_record = acfx.expand(TwoLayer(), record)
    by_keywords = acfx.expand(TwoLayer(), placement="border", init="preserve")
    assert [type(m) for m in by_record.modules()] == [type(m) for m in by_keywords.modules()]
    assert torch.equal(by_record.conv1.layout, by_keywords.conv1.layout)
    with pytest.raises(TypeError, match="unknown option 'placment'; the options are"):
        acfx.expand(TwoLayer(), placment="border")
    with pytest.raises(TypeError, match="must be an acfx.ExpandOptions"):
        acfx.expand(TwoLayer(), {"init": "preserve"})
    assert ExpandOptions.choices("placement") == ("centre", "border")
    assert ExpandOptions.choices("norm") == ("branch", "sum") and ExpandOptions.choices("gamma_init") == ()


def test_readme_table_lists_every_option_with_its_choices():
    import re
    from pathlib import Path

    from acfx.passes.options import ExpandOptions
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("| option | values (default first) | meaning |")[1].split("\n\n")[0]
    rows = {}
    for line in table.strip().splitlines()[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = re.findall(r'"([^"]+)"', cells[1])
    assert set(rows) == {f.name for f in ExpandOptions.fields()}
    for field in ExpandOptions.fields():
        choices = list(ExpandOptions.choices(field.name))
        if choices:  # the default first (norm's None means "branch" in exact mode)
            assert sorted(rows[field.name]) == sorted(choices), (field.name, rows[field.name])
            assert rows[field.name][0] == (field.default or choices[0]), field.name


def test_cli_and_timm_offer_the_records_options():
    import acfx.timm
    from acfx.passes.options import ExpandOptions
    from acfx.tools.cli import _parser
    flags = {a.dest for a in _parser()._subparsers._group_actions[0].choices["collapse"]._actions}
    assert {f.name for f in ExpandOptions.fields(structural=True)} <= flags
    assert set(acfx.timm._OPTIONS) == {f.name for f in ExpandOptions.fields(timm=True)}


@pytest.mark.parametrize("recipe", ["acb", "repvgg", "dbb", "mobileone", "acb+dbb"])
@pytest.mark.parametrize("stride", [1, 2])  # stride 2: no identity branch, one branch fewer
def test_balanced_gamma_is_one_over_each_blocks_branches(recipe, stride):
    from acfx.layers.block import ACBlock
    model = nn.Sequential(nn.Conv2d(8, 8, 3, stride, 1, bias=False), nn.BatchNorm2d(8))
    expanded = acfx.expand(model, recipe=recipe, gamma_init="balanced")
    block = next(m for m in expanded.modules() if isinstance(m, ACBlock))
    branches = block.branches()
    assert len(branches) > 1
    for branch in branches:  # the BN the branch ends with: the one its output is summed through
        gamma = branch.modules[-1].weight
        assert torch.allclose(gamma, torch.full_like(gamma, 1 / len(branches))), (recipe, branch.name, gamma)
    assert torch.equal(model[1].weight, torch.ones(8))  # the user's BN is not touched
    online = acfx.expand(model, recipe=recipe, gamma_init="balanced", mode="online")
    scales = [p for n, p in online.named_parameters() if n.endswith("_scale")]
    assert len(scales) == len(branches)
    for scale in scales:
        assert torch.allclose(scale, torch.full_like(scale, 1 / len(branches))), (recipe, scale)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(gamma_init="balanced", init="preserve"), ValueError, "init='scratch'"),
    (dict(gamma_init="balanced", norm="sum"), ValueError, "no branch BNs"),
    (dict(gamma_init="even"), TypeError, "or 'balanced'"),
])
def test_balanced_gamma_is_refused_where_it_cannot_apply(kwargs, error, match):
    with pytest.raises(error, match=match):
        acfx.expand(TwoLayer(), **kwargs)
