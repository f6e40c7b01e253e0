"""expand's recipes beyond ACNet: RepVGG's branches (a 1×1 conv and the identity, each with its BN), DBB's (1×1,
1×1→k×k, 1×1→average), MobileOne's (k k×k branches, 1×1, identity), alone or with ACNet's, and recipes a user
defines from branch kinds: over the geometry matrix and on real models, with the guarantees ACB has: a
function-preserving start, exact collapse into the original architecture, strict reload, the recorded layout,
TorchScript, the meta device, the plug-in and the CLI."""
import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import acfx
import acfx.timm  # noqa: F401  (registers acb_ models)
from acfx.tools.checkpoint import CheckpointMismatch
from acfx.tools.cli import main

from helpers import assert_rel_close, randomize_bn
from test_geometry import GEOMETRIES, _conv_bn, _ids

RECIPES = ["repvgg", "acb+repvgg", "dbb", "acb+dbb", "mobileone"]


def _expected_branches(recipe: str, stride, channels_match: bool = True, dilation=1) -> list:
    acb = ["square", "hor", "ver"] if recipe.startswith("acb+") else ["square"]
    identity = ["identity"] if channels_match and stride == 1 else []
    if recipe.endswith("dbb"):
        return acb + ["point", "chain"] + (["avg"] if dilation == 1 else [])
    if recipe == "mobileone":
        return acb + ["square_1", "square_2", "square_3", "point"] + identity
    return acb + ["point"] + identity


def _preserving(geom, recipe, **options):
    """The conv→BN of ``geom`` (float64, random statistics), an input, and its expansion with init='preserve',
    checked to compute the conv→BN's function."""
    torch.manual_seed(0)
    model = randomize_bn(_conv_bn(geom, dtype=torch.float64)).eval()
    x = torch.randn(2, 8, 11, 12, dtype=torch.float64)
    preserved = acfx.expand(model, recipe=recipe, init="preserve", **options).eval()
    with torch.no_grad():
        assert_rel_close(preserved(x), model(x), tol=1e-12, what=f"{recipe} {options}: init='preserve' vs the original")
    return model, x, preserved


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=_ids)
def test_recipe_preserves_the_function_and_collapses_exactly(geom, recipe):
    model, x, preserved = _preserving(geom, recipe)
    assert preserved[0].branch_names() == _expected_branches(recipe, geom[1], dilation=geom[3])
    trained = randomize_bn(acfx.expand(model, recipe=recipe), seed=3).eval()
    with torch.no_grad():
        collapsed = acfx.collapse(trained)
        assert_rel_close(collapsed(x), trained(x), tol=1e-10, what=f"{recipe}: collapsed vs expanded (float64)")
    model.load_state_dict(collapsed.state_dict(), strict=True)  # the original architecture, weight for weight


@pytest.mark.parametrize("recipe", ["acb+dbb", "mobileone"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=_ids)
def test_eval_shift_is_the_bias_of_the_fused_conv(geom, recipe):
    """An eval forward subtracts the block's shift and its BN slot adds it back: the model's output cannot
    show a wrong shift, so it is checked against the fused conv's bias (composed kernels, float64)."""
    from acfx.layers.block import ACBlock
    torch.manual_seed(0)
    model = _conv_bn(geom, dtype=torch.float64)
    block = next(m for m in randomize_bn(acfx.expand(model, recipe=recipe), seed=5).eval().modules()
                 if isinstance(m, ACBlock))
    with torch.no_grad():
        shift, (_, bias) = block.eval_shift(), block.fused()
    assert_rel_close(shift, bias, tol=1e-12, what=f"{recipe}: eval_shift vs the fused conv's bias")


@pytest.mark.parametrize("recipe", RECIPES)
def test_channel_changing_and_strided_convs_get_no_identity(recipe):
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
    assert acfx.expand(model, recipe=recipe)[0].branch_names() == _expected_branches(recipe, 1, False)


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_timm_model_trains_and_collapses_into_the_plain_model(recipe):
    torch.manual_seed(0)
    expanded = acfx.expand(timm.create_model("resnet18", num_classes=5), recipe=recipe)
    optimizer = torch.optim.SGD(expanded.parameters(), lr=0.05)
    for _ in range(2):
        loss = expanded(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expanded = randomize_bn(expanded, seed=1).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        collapsed = acfx.collapse(expanded)
        assert_rel_close(collapsed(x), expanded(x), tol=1e-10, what=f"resnet18 {recipe}: collapsed vs trained")
    plain = timm.create_model("resnet18", num_classes=5).double()
    plain.load_state_dict(collapsed.state_dict(), strict=True)
    assert type(collapsed.layer1[0].conv1) is nn.Conv2d


def test_a_checkpoint_of_another_recipe_is_refused():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    repvgg = acfx.expand(model, recipe="repvgg")
    with pytest.raises(CheckpointMismatch, match="missing keys|unexpected keys"):
        acfx.load_state_dict_strict(acfx.expand(model), repvgg.state_dict())
    with pytest.raises(RuntimeError):
        acfx.expand(model, recipe="acb+repvgg").load_state_dict(acfx.expand(model).state_dict())


def test_recipe_options_that_do_not_apply_are_refused():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="acb\\+repvgg"):
        acfx.expand(model, recipe="repvgg", branches="hor")
    with pytest.raises(ValueError, match="recipe='dbb\\+mobileone' is not one of.*acfx.RECIPES\\['acb'\\]"):
        acfx.expand(model, recipe="dbb+mobileone")
    for count in (0, 9, 2.5, True):
        with pytest.raises(ValueError, match="kxk_branches must be an integer from 1 to 8"):
            acfx.expand(model, recipe="mobileone", kxk_branches=count)
    with pytest.raises(ValueError, match="identity.*init='preserve' cannot keep the function"):
        acfx.expand(model, recipe="repvgg", norm="sum", init="preserve")
    with pytest.raises(ValueError, match="mode='online' has no branch BNs"):
        acfx.expand(model, recipe="dbb", mode="online", norm="branch")
    assert acfx.expand(model, recipe="acb+repvgg", branches="hor")[0].branch_names() == [
        "square", "hor", "point", "identity"]


@pytest.mark.parametrize("recipe", ["acb+repvgg", "acb+dbb", "mobileone"])
@pytest.mark.parametrize("norm", ["branch", "sum"])
def test_torchscript_of_a_recipe_block_is_its_eager_forward(norm, recipe):
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)))
    expanded = randomize_bn(acfx.expand(model, recipe=recipe, norm=norm, kxk_branches=8 if recipe == "mobileone"
                                        else None), seed=2).eval()
    x = torch.randn(2, 8, 9, 9)
    scripted = torch.jit.script(copy.deepcopy(expanded))
    with torch.no_grad():
        assert_rel_close(scripted(x), expanded(x), tol=1e-6, what=f"TorchScript of {recipe}, norm={norm}")


@pytest.mark.parametrize("recipe", ["acb+repvgg", "dbb", "mobileone"])
def test_meta_device_build_loads_the_trained_recipe(recipe):
    torch.manual_seed(0)
    build = lambda: nn.Sequential(nn.Conv2d(8, 8, 4, padding="same", bias=False), nn.BatchNorm2d(8))  # noqa: E731
    trained = randomize_bn(acfx.expand(build(), recipe=recipe), seed=4).eval()
    with torch.device("meta"):
        empty = acfx.expand(build(), recipe=recipe)
    empty.to_empty(device="cpu")
    empty.load_state_dict(trained.state_dict())
    x = torch.randn(2, 8, 9, 10)
    with torch.no_grad():
        assert_rel_close(empty.eval()(x), trained(x), what="meta-built recipe block after to_empty + load")


def test_timm_plugin_and_cli_take_the_recipe(tmp_path, capsys):
    model = timm.create_model("acb_resnet18", num_classes=3, acb_recipe="repvgg")
    assert model.layer1[0].conv1.branch_names() == ["square", "point", "identity"]
    model = timm.create_model("acb_resnet18", num_classes=3, acb_recipe="mobileone", acb_kxk_branches=2)
    assert model.layer1[0].conv1.branch_names() == ["square", "square_1", "point", "identity"]
    model = timm.create_model("acb_resnet18", num_classes=3, acb_recipe="dbb")
    assert model.layer2[0].conv1.branch_names() == ["square", "point", "chain", "avg"]
    plain = tmp_path / "plain.pth"
    source = randomize_bn(timm.create_model("resnet18", num_classes=3)).eval()
    torch.save(source.state_dict(), plain)
    expanded, back = tmp_path / "rep.pth", tmp_path / "back.pth"
    assert main(["expand", str(plain), "--model", "resnet18", "--recipe", "repvgg", "-o", str(expanded)]) == 0
    assert main(["collapse", str(expanded), "--model", "resnet18", "--recipe", "repvgg", "-o", str(back)]) == 0
    out = capsys.readouterr().out
    assert "acfx collapse: 17 collapsed" in out, out
    reloaded = timm.create_model("resnet18", num_classes=3, checkpoint_path=str(back)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # expanded with init='preserve', collapsed: the plain model's function again
        assert_rel_close(reloaded(x), source(x), what="expand --recipe repvgg, then collapse, reloaded by timm")
    assert main(["check", "resnet18", "--img-size", "32", "--recipe", "acb+repvgg"]) == 0
    assert "exact: OK" in capsys.readouterr().out
    one = tmp_path / "one.pth"
    assert main(["expand", str(plain), "--model", "resnet18", "--recipe", "mobileone", "--kxk-branches", "2",
                 "-o", str(one)]) == 0
    assert "layer1.0.conv1.square_1.weight" in torch.load(one)
    assert main(["collapse", str(one), "--model", "resnet18", "--recipe", "mobileone", "--kxk-branches", "2",
                 "-o", str(tmp_path / "one_back.pth")]) == 0
    assert "acfx collapse: 17 collapsed" in capsys.readouterr().out
    assert main(["check", "resnet18", "--img-size", "32", "--recipe", "dbb"]) == 0
    assert "exact: OK" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["dbb", acfx.RECIPES["mobileone"].with_kxk_branches(3).branches[:-1]])
@pytest.mark.parametrize("geom", [GEOMETRIES[0], GEOMETRIES[4], GEOMETRIES[11], GEOMETRIES[17], GEOMETRIES[19]],
                         ids=_ids)
def test_recipe_without_branch_norms_preserves_and_collapses(geom, recipe):
    recipe = recipe if isinstance(recipe, str) else acfx.Recipe("mobileone without identity", recipe)
    model, x, _ = _preserving(geom, recipe, norm="sum")
    trained = acfx.expand(model, recipe=recipe, norm="sum")
    with torch.no_grad():
        for name, param in trained.named_parameters():
            param.add_(torch.randn_like(param) * 0.1)
        trained = randomize_bn(trained, seed=2).eval()
        collapsed = acfx.collapse(trained)
        assert_rel_close(collapsed(x), trained(x), tol=1e-10, what=f"{recipe}, norm='sum': collapsed vs expanded")
    model.load_state_dict(collapsed.state_dict(), strict=True)


def test_recipe_blocks_collapse_exactly_in_float32():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16))).eval()
    x = torch.randn(2, 8, 12, 12)
    for recipe in RECIPES:
        trained = randomize_bn(acfx.expand(model, recipe=recipe), seed=1).eval()
        with torch.no_grad():
            assert_rel_close(acfx.collapse(trained)(x), trained(x), tol=1e-5, what=f"{recipe} in float32")


def test_the_built_in_recipes_are_records_of_the_public_api():
    assert set(acfx.RECIPES) == set(acfx.ExpandOptions.choices("recipe"))
    assert acfx.RECIPES["acb"] + acfx.RECIPES["dbb"] == acfx.Recipe("acb+dbb", acfx.RECIPES["acb+dbb"].branches)
    assert acfx.RECIPES["acb+repvgg"].branches == ("hor", "ver", "point", "identity")
    assert acfx.RECIPES["mobileone"].with_kxk_branches(2).branches == ("square", "point", "identity")


def test_a_recipe_defined_from_branch_kinds_trains_and_collapses():
    torch.manual_seed(0)
    mine = acfx.Recipe("mine", ("hor", "square", "chain"))
    model = randomize_bn(nn.Sequential(nn.Conv2d(8, 8, 5, padding=2, bias=False), nn.BatchNorm2d(8))).double().eval()
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    expanded = acfx.expand(model, recipe=mine)
    assert expanded[0].branch_names() == ["square", "hor", "square_1", "chain"]
    with torch.no_grad():
        assert_rel_close(acfx.expand(model, recipe=mine, init="preserve").eval()(x), model(x), tol=1e-12,
                         what="a user's recipe: preserve")
    expanded = randomize_bn(expanded, seed=6).eval()
    with torch.no_grad():
        assert_rel_close(acfx.collapse(expanded)(x), expanded(x), tol=1e-10, what="a user's recipe: collapse")
    with pytest.raises(ValueError, match="unknown branch kind 'diag'"):
        acfx.Recipe("bad", ("diag",))
    with pytest.raises(ValueError, match="one 'chain' branch at most"):
        acfx.Recipe("bad", ("chain", "chain"))
    with pytest.raises(TypeError, match="tuple of branch kinds"):
        acfx.Recipe("bad", "hor")
    with pytest.raises(ValueError, match="recipe='mine' does not have"):
        acfx.expand(model, recipe=acfx.Recipe("mine", ("point",)), branches="hor")


def test_a_checkpoint_whose_branches_are_in_another_order_is_refused():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    first = acfx.expand(model, recipe=acfx.Recipe("a", ("square", "point")))
    second = acfx.expand(model, recipe=acfx.Recipe("b", ("point", "square")))
    assert set(first.state_dict()) == set(second.state_dict())  # same keys: only the recorded layout tells
    with pytest.raises(RuntimeError, match="branches \\['square', 'square', 'point'\\], this one \\['square', "
                                           "'point', 'square'\\]"):
        second.load_state_dict(first.state_dict())
    with pytest.raises(RuntimeError, match="recipe"):
        acfx.expand(model, recipe="mobileone", kxk_branches=2).load_state_dict(
            acfx.expand(model, recipe="acb+repvgg", kxk_branches=2).state_dict(), strict=False)


def test_dbb_branches_are_built_as_dbb_writes_them():
    conv = nn.Conv2d(8, 16, 3, 2, 1, bias=False)
    block = acfx.expand(nn.Sequential(conv, nn.BatchNorm2d(16)), recipe="dbb")[0]
    # the 1×1 before the k×k conv pads (its BN then gives what DBB's BNAndPadLayer pads with) and starts as the
    # identity (DBB's IdentityBasedConv1x1); the k×k conv and the average pooling read it without padding
    assert block.chain_pre.padding == (1, 1) and block.chain_pre.stride == (1, 1)
    assert torch.equal(block.chain_pre.weight[:, :, 0, 0], torch.eye(8))
    assert block.chain.padding == (0, 0) and block.chain.stride == (2, 2) and block.chain.in_channels == 8
    assert block.avg.kernel_size == (3, 3) and block.avg.stride == (2, 2) and block.avg.padding == 0
    assert block.avg_pre.out_channels == 16
    depthwise = acfx.expand(nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.BatchNorm2d(8)), recipe="dbb")[0]
    assert depthwise.chain_pre.out_channels == 16  # DBB widens a depthwise conv's 1×1 → k×k branch


def test_the_readme_recipe_example_runs_and_builds_what_it_says():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Your own recipe.**"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 9)]
    scope = {"acfx": acfx, "model": nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))}
    exec(code, scope)
    assert scope["acnet"][0].branch_names() == ["square", "hor", "ver", "chain"]
    assert len(acfx.expand(scope["model"], recipe=scope["both"])[0].branch_names()) == 8


def _copy_online_into_exact(online: nn.Module, exact: nn.Module) -> None:
    """Give the exact form with norm='sum' (each branch its real modules, no BN of its own) the kernels of the
    online form, each scale folded in: both then compute the same function, one by running the branches, the
    other by merging kernels."""
    with torch.no_grad():
        for on, ex in zip([m for m in online.modules() if isinstance(m, acfx.OnlineACConv)],
                          [m for m in exact.modules() if isinstance(m, acfx.ACBlock)]):
            scaled = lambda name: getattr(on, name + "_weight") * getattr(on, name + "_scale").view(-1, 1, 1, 1)  # noqa: E731
            ex.square.weight.copy_(on.conv.weight * on.square_scale.view(-1, 1, 1, 1))
            for name in ex.branch_names()[1:]:
                if name == "identity":
                    on.identity_scale.fill_(1.0)  # the exact form adds the input itself
                elif name == "chain":
                    ex.chain_pre.weight.copy_(on.chain_pre_weight)
                    ex.chain.weight.copy_(scaled("chain"))
                elif name == "avg":
                    ex.avg_pre.weight.copy_(on.avg_pre_weight * on.avg_scale.view(-1, 1, 1, 1))
                else:
                    getattr(ex, name).weight.copy_(scaled(name))


@pytest.mark.parametrize("recipe", ["acb+repvgg", "acb+dbb", "mobileone"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=_ids)
def test_online_form_merges_what_the_branches_compute(geom, recipe):
    model, x, _ = _preserving(geom, recipe, mode="online")
    online = acfx.expand(model, recipe=recipe, mode="online").eval()
    with torch.no_grad():  # the kernels and scales (the BN after them is the model's, in both forms)
        for param in online[0].parameters():
            param.add_(torch.randn_like(param) * 0.1)
    exact = acfx.expand(model, recipe=recipe, norm="sum").eval()
    _copy_online_into_exact(online, exact)
    with torch.no_grad():
        assert_rel_close(online(x), exact(x), tol=1e-10, what=f"online {recipe}: merged kernel vs its branches run")
        collapsed = acfx.collapse(online)
        assert_rel_close(collapsed(x), online(x), tol=1e-12, what=f"online {recipe}: collapsed")
    model.load_state_dict(collapsed.state_dict(), strict=True)


def test_online_checkpoint_of_another_recipe_is_refused():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    first = acfx.expand(model, mode="online", recipe=acfx.Recipe("a", ("square", "point")))
    second = acfx.expand(model, mode="online", recipe=acfx.Recipe("b", ("point", "square")))
    assert set(first.state_dict()) == set(second.state_dict())
    with pytest.raises(RuntimeError, match="other branches \\['square', 'point'\\], this one \\['point', 'square'\\]"):
        second.load_state_dict(first.state_dict())
    with pytest.raises(RuntimeError, match="recipe"):
        acfx.expand(model, mode="online").load_state_dict(
            acfx.expand(model, mode="online", recipe="dbb").state_dict(), strict=False)


@pytest.mark.parametrize("mode", ["exact", "online"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_expand_safety_rules_hold_for_every_recipe(recipe, mode):
    """What expand leaves and why does not depend on the recipe: a frozen conv, a hooked one."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)))
    model[0].requires_grad_(False)
    model[3].register_forward_hook(lambda m, a, o: None)
    with pytest.warns(UserWarning, match="because of module hooks"):
        expanded, report = acfx.expand(model, recipe=recipe, mode=mode, return_report=True)
    skipped = {e.name: e.detail for e in report.skipped}
    assert "frozen (requires_grad=False)" in skipped["0"] and "hook" in skipped["3"], skipped
    assert [e.name for e in report.of("expanded")] == ["6"]
    assert type(expanded[0]) is nn.Conv2d and type(expanded[3]) is nn.Conv2d
