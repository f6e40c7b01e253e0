"""expand's recipes beyond ACNet: RepVGG's branches (a 1×1 conv and the identity, each with its BN), alone or
with ACNet's, over the geometry matrix and on real models, with the guarantees ACB has: a function-preserving
start, exact collapse into the original architecture, strict reload, TorchScript, the plug-in and the CLI."""
import copy

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

RECIPES = ["repvgg", "acb+repvgg"]


def _expected_branches(recipe: str, stride, channels_match: bool = True) -> list:
    acb = ["square", "hor", "ver"] if recipe == "acb+repvgg" else ["square"]
    identity = channels_match and stride == 1
    return acb + ["point"] + (["identity"] if identity else [])


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=_ids)
def test_recipe_preserves_the_function_and_collapses_exactly(geom, recipe):
    torch.manual_seed(0)
    model = randomize_bn(_conv_bn(geom, dtype=torch.float64)).eval()
    x = torch.randn(2, 8, 11, 12, dtype=torch.float64)
    preserved = acfx.expand(model, recipe=recipe, init="preserve").eval()
    assert preserved[0].branch_names() == _expected_branches(recipe, geom[1])
    with torch.no_grad():
        assert_rel_close(preserved(x), model(x), tol=1e-12, what=f"{recipe}: init='preserve' vs the original")
    trained = randomize_bn(acfx.expand(model, recipe=recipe), seed=3).eval()
    with torch.no_grad():
        collapsed = acfx.collapse(trained)
        assert_rel_close(collapsed(x), trained(x), tol=1e-10, what=f"{recipe}: collapsed vs expanded (float64)")
    model.load_state_dict(collapsed.state_dict(), strict=True)  # the original architecture, weight for weight


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
    with pytest.raises(ValueError, match="online.*recipe='acb' only"):
        acfx.expand(model, recipe="repvgg", mode="online")
    with pytest.raises(ValueError, match="acb\\+repvgg"):
        acfx.expand(model, recipe="repvgg", branches="hor")
    with pytest.raises(ValueError, match="recipe="):
        acfx.expand(model, recipe="dbb")
    assert acfx.expand(model, recipe="acb+repvgg", branches="hor")[0].branch_names() == [
        "square", "hor", "point", "identity"]


@pytest.mark.parametrize("norm", ["branch", "sum"])
def test_torchscript_of_a_recipe_block_is_its_eager_forward(norm):
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)))
    expanded = randomize_bn(acfx.expand(model, recipe="acb+repvgg", norm=norm), seed=2).eval()
    x = torch.randn(2, 8, 9, 9)
    scripted = torch.jit.script(copy.deepcopy(expanded))
    with torch.no_grad():
        assert_rel_close(scripted(x), expanded(x), tol=1e-6, what=f"TorchScript, norm={norm}")


def test_meta_device_build_loads_the_trained_recipe():
    torch.manual_seed(0)
    build = lambda: nn.Sequential(nn.Conv2d(8, 8, 4, padding="same", bias=False), nn.BatchNorm2d(8))  # noqa: E731
    trained = randomize_bn(acfx.expand(build(), recipe="acb+repvgg"), seed=4).eval()
    with torch.device("meta"):
        empty = acfx.expand(build(), recipe="acb+repvgg")
    empty.to_empty(device="cpu")
    empty.load_state_dict(trained.state_dict())
    x = torch.randn(2, 8, 9, 10)
    with torch.no_grad():
        assert_rel_close(empty.eval()(x), trained(x), what="meta-built recipe block after to_empty + load")


def test_timm_plugin_and_cli_take_the_recipe(tmp_path, capsys):
    model = timm.create_model("acb_resnet18", num_classes=3, acb_recipe="repvgg")
    assert model.layer1[0].conv1.branch_names() == ["square", "point", "identity"]
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
