"""The command line on the checkpoints and arguments users actually have.

Each case crashed with a traceback, refused a valid checkpoint, overwrote a file or named the wrong cause
before. Every file written is checked against the trained model, with random BN statistics.
"""
import argparse

import pytest
import timm
import torch

import acfx
import acfx.timm  # noqa: F401  (registers acb_ models)
from acfx.tools.checkpoint import CheckpointMismatch, load_state_dict_strict, read_checkpoint
from acfx.tools.cli import main

from helpers import assert_rel_close, randomize_bn


def _trained(name="resnet10t", seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_bn(timm.create_model(name, **kwargs), seed=seed).eval()


def _collapses_to(path, plain_name, trained, x, **plain_kwargs):
    """The written plain checkpoint computes what the trained expanded model computes."""
    plain = timm.create_model(plain_name, **plain_kwargs).eval()
    plain.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        assert_rel_close(_first(plain(x)), _first(trained(x)))


def _first(out):
    return out[-1] if isinstance(out, (list, tuple)) else out


def test_train_py_checkpoint_with_acb_keywords_converts_with_those_options(tmp_path, capsys):
    # train.py --model acb_resnet10t --model-kwargs acb_impl=recompute acb_placement=border
    model = _trained("acb_resnet10t", num_classes=5, acb_impl="recompute", acb_placement="border")
    args = argparse.Namespace(model="acb_resnet10t", model_kwargs={"acb_impl": "recompute", "acb_placement": "border"},
                              bn_eps=None, bn_momentum=None, in_chans=None, gp=None)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"arch": "acb_resnet10t", "state_dict": model.state_dict(), "args": args}, path)
    out = tmp_path / "plain.pth"
    assert main(["collapse", str(path), "-o", str(out)]) == 0
    assert "'placement': 'border'" in capsys.readouterr().out
    _collapses_to(out, "resnet10t", model, torch.randn(2, 3, 64, 64), num_classes=5)


@pytest.mark.parametrize("name,kwargs,size", [
    ("resnet10t", {"in_chans": 1}, 64),  # channels from the model, not from its pretrained_cfg
    ("resnet10t", {"features_only": True, "out_indices": (1, 3)}, 64),  # a list of feature maps
    ("levit_128s", {}, 224),  # a fixed input size: probed at that size
])
def test_collapse_checks_models_that_are_not_plain_classifiers(tmp_path, name, kwargs, size):
    model = _trained(f"acb_{name}", **kwargs)
    path, out = tmp_path / "acb.pth", tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    extra = [f"{k}={v!r}" for k, v in kwargs.items()]
    assert main(["collapse", str(path), "--model", name, "-o", str(out)] + (["--model-kwargs", *extra] if extra
                                                                             else [])) == 0
    channels = kwargs.get("in_chans", 3)
    _collapses_to(out, name, model, torch.randn(2, channels, size, size), **kwargs)


def test_online_checkpoint_is_recognised_by_collapse_and_kernels(tmp_path, capsys):
    model = _trained("acb_resnet10t", acb_mode="online")
    path = tmp_path / "online.pth"
    torch.save(model.state_dict(), path)
    out = tmp_path / "plain.pth"
    assert main(["collapse", str(path), "--model", "resnet10t", "-o", str(out)]) == 0
    _collapses_to(out, "resnet10t", model, torch.randn(2, 3, 64, 64))
    assert main(["kernels", str(path), "--model", "resnet10t", "-o", str(tmp_path / "k.png")]) == 0
    exact = tmp_path / "exact.pth"
    torch.save(_trained("acb_resnet10t").state_dict(), exact)
    assert main(["collapse", str(exact), "--model", "resnet10t", "--mode", "online", "-o", str(out), "--force"]) == 2
    assert "checkpoint was expanded with mode='exact'" in capsys.readouterr().err


def test_checkpoint_of_a_partly_expanded_model_converts(tmp_path):
    # A frozen stem is skipped by expand: the checkpoint holds it plain.
    plain = _trained("resnet10t")
    for p in plain.conv1.parameters():
        p.requires_grad_(False)
    model = randomize_bn(acfx.expand(plain), seed=2).eval()
    assert type(model.conv1[0]).__name__ == "Conv2d"
    path, out = tmp_path / "acb.pth", tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    assert main(["collapse", str(path), "--model", "resnet10t", "-o", str(out)]) == 0
    _collapses_to(out, "resnet10t", model, torch.randn(2, 3, 64, 64))


def test_checkpoint_formats_and_wrong_inputs(tmp_path, capsys):
    model = _trained("acb_resnet10t")
    reference = tmp_path / "ref.pth"  # torchvision's reference scripts: {"model": ..., "epoch": ...}
    torch.save({"model": model.state_dict(), "epoch": 3}, reference)
    assert read_checkpoint(reference).state.keys() == model.state_dict().keys()
    from safetensors.torch import save_file
    misnamed = tmp_path / "weights.bin"  # a safetensors file with another suffix
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(misnamed))
    assert read_checkpoint(misnamed).state.keys() == model.state_dict().keys()
    folder = tmp_path / "run.pth"
    folder.mkdir()
    assert main(["collapse", str(folder), "--model", "resnet10t"]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_strict_load_refuses_tensors_it_cannot_copy_and_loads_nothing():
    model = _trained("resnet10t")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in state.items()}
    keys = list(state)
    state[keys[0]] = state[keys[0]] + 1.0
    state[keys[-1]] = torch.empty_like(state[keys[-1]], device="meta")
    with pytest.raises(CheckpointMismatch, match="meta device"):
        load_state_dict_strict(model, state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("flag,value", [("--batch-size", "-2"), ("--img-size", "0")])
def test_check_sizes_must_be_positive(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["check", "resnet10t", flag, value])
    assert exit_.value.code == 2 and "must be a positive integer" in capsys.readouterr().err


def test_check_refuses_video_models_in_one_line(capsys):
    assert main(["check", "tv:r3d_18"]) == 2
    assert "is a video model" in capsys.readouterr().err


def test_checkpoint_without_recorded_layouts_warns_and_num_classes_may_come_as_a_model_kwarg(tmp_path, capsys):
    model = _trained("acb_resnet10t", num_classes=10)
    path, out = tmp_path / "old.pth", tmp_path / "plain.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith(".layout")}, path)
    assert main(["collapse", str(path), "--model", "resnet10t", "--model-kwargs", "num_classes=10",
                 "-o", str(out)]) == 0
    assert "records no block layouts" in capsys.readouterr().err
    _collapses_to(out, "resnet10t", model, torch.randn(2, 3, 64, 64), num_classes=10)


def test_a_model_argument_that_stops_tracing_is_named_when_the_checkpoint_does_not_load(tmp_path, capsys):
    """--model-kwargs drop_rate=abc builds a resnet whose forward no longer traces, so its stem conv is not
    expanded: the mismatch names that site and why, not only 'other expand options'."""
    path = tmp_path / "acb.pth"
    torch.save(_trained("acb_resnet10t").state_dict(), path)
    assert main(["collapse", str(path), "--model", "resnet10t", "--model-kwargs", "drop_rate=abc",
                 "-o", str(tmp_path / "plain.pth")]) == 2
    err = capsys.readouterr().err
    assert "expand left in this model: conv1.6" in err and "'<model>' does not trace here" in err, err
    assert not (tmp_path / "plain.pth").exists()


def test_a_checkpoint_of_another_recipe_is_refused_with_the_recipe_named(tmp_path, capsys):
    path = tmp_path / "dbb.pth"
    torch.save(acfx.expand(_trained("resnet10t"), recipe="dbb").state_dict(), path)
    assert main(["collapse", str(path), "--model", "resnet10t", "-o", str(tmp_path / "plain.pth")]) == 2
    err = capsys.readouterr().err
    assert "recipe='dbb' (--recipe dbb) builds those" in err, err
    assert not (tmp_path / "plain.pth").exists()
    assert main(["collapse", str(path), "--model", "resnet10t", "--recipe", "dbb",
                 "-o", str(tmp_path / "plain.pth")]) == 0
