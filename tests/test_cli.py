"""The command line: `acfx check` (its output and exit codes)."""
import dataclasses
import subprocess
import sys

import pytest
import timm
import torch

import acfx
from acfx.tools.cli import main

from helpers import assert_rel_close, randomize_bn


def test_check_reports_sites_error_and_reload(capsys):
    assert main(["check", "resnet18", "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "acfx expand: 17 expanded, 3 skipped" in out
    assert "skipped    3: kernel (1, 1) has a side of 1" in out
    assert "acfx collapse: 17 collapsed" in out
    assert "strict reload of the collapsed state_dict into a fresh resnet18: OK" in out
    error = float(out.split("max|Δ|/max|y| = ")[1].split(";")[0])
    assert error <= 1e-5, out
    assert "exact: OK" in out


def test_check_torchvision_densenet_with_unnormed_convs(capsys):
    assert main(["check", "tv:densenet121", "--img-size", "64", "--include-unnormed"]) == 0
    out = capsys.readouterr().out
    assert "acfx expand: 59 expanded" in out and "strict reload: not expected (58 structure changes)" in out


def test_check_fails_with_exit_code_1_when_tolerance_is_impossible(capsys):
    assert main(["check", "resnet18", "--img-size", "32", "--tolerance", "1e-30"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["check", "nonet"]) == 2
    assert "acfx check: error: unknown model 'nonet'" in capsys.readouterr().err


def test_every_command_has_help():
    for command in ([], ["check"], ["collapse"], ["expand"], ["kernels"]):
        done = subprocess.run([sys.executable, "-m", "acfx", *command, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "usage: acfx" in done.stdout


def _save_plain(tmp_path, name="resnet18", classes=10):

    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, num_classes=classes)).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_expand_then_collapse_checkpoints_keep_the_function(tmp_path, capsys):

    model, plain = _save_plain(tmp_path, classes=7)
    acb = tmp_path / "acb.pth"
    assert main(["expand", str(plain), "--model", "resnet18", "-o", str(acb)]) == 0
    back = tmp_path / "back.safetensors"
    assert main(["collapse", str(acb), "--model", "resnet18", "-o", str(back)]) == 0
    out = capsys.readouterr().out
    assert "acfx collapse: 17 collapsed" in out and "num_classes=7" in out
    reloaded = timm.create_model("resnet18", num_classes=7, checkpoint_path=str(back)).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert_rel_close(reloaded(x), model(x))


def test_collapse_of_a_mismatched_checkpoint_writes_nothing(tmp_path, capsys):
    _, plain = _save_plain(tmp_path, "resnet34")
    out = tmp_path / "out.pth"
    assert main(["collapse", str(plain), "--model", "resnet18", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not match ResNet; nothing was loaded" in err and "missing keys" in err
    assert not out.exists()
    assert main(["collapse", str(tmp_path / "missing.pth"), "--model", "resnet18"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_kernels_prints_the_grid_and_writes_a_heatmap(tmp_path, capsys):

    _, plain = _save_plain(tmp_path)
    png = tmp_path / "k.png"
    assert main(["kernels", str(plain), "--model", "resnet18", "-o", str(png)]) == 0
    out = capsys.readouterr().out
    assert "resnet18 (plain, BN folded), 16 layers of 3x3" in out
    grid = [[float(v) for v in line.split()] for line in out.splitlines()[1:4]]
    assert len(grid) == 3 and all(len(row) == 3 and all(0 < v <= 1 for v in row) for row in grid)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    acb = tmp_path / "acb.pth"
    torch.save(acfx.expand(timm.create_model("resnet18")).state_dict(), acb)
    before = png.read_bytes()
    assert main(["kernels", str(acb), "--model", "resnet18", "-o", str(png)]) == 2  # exists: --force to replace
    assert "exists" in capsys.readouterr().err and png.read_bytes() == before
    assert main(["kernels", str(acb), "--model", "resnet18", "-o", str(png), "--force"]) == 0
    assert "(expanded (ACNet), fused), 16 layers of 3x3" in capsys.readouterr().out


def test_kernels_without_matplotlib_prints_the_grid_then_says_what_to_install(tmp_path, capsys, monkeypatch):
    _, plain = _save_plain(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    png = tmp_path / "k.png"
    assert main(["kernels", str(plain), "--model", "resnet18", "-o", str(png)]) == 2
    captured = capsys.readouterr()
    assert "16 layers of 3x3" in captured.out and "pip install 'acfx[plot]'" in captured.err, captured.err
    assert not png.exists()


def test_collapse_of_a_wrong_fusion_writes_nothing(tmp_path, capsys, monkeypatch):
    """A conversion that is not exact (here a sabotaged fusion, 1% off) exits 1 and writes no checkpoint."""
    import acfx.layers.block as block
    _, plain = _save_plain(tmp_path)
    acb = tmp_path / "acb.pth"
    assert main(["expand", str(plain), "--model", "resnet18", "-o", str(acb)]) == 0
    real = block.fit
    monkeypatch.setattr(block, "fit", lambda *a, **k: dataclasses.replace(real(*a, **k), kernel=real(*a, **k).kernel * 1.01))
    out = tmp_path / "out.pth"
    assert main(["collapse", str(acb), "--model", "resnet18", "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert "repeated in float64" in captured.out and "NOT written" in captured.err, captured
    assert not out.exists()


def test_collapse_of_a_model_whose_float32_output_overflows_is_judged_in_float64(tmp_path, capsys):
    """A trained model whose float32 output overflows (inf, so the float32 error is NaN) says nothing
    about the conversion: it is repeated in float64 and written when exact there (failed before: NaN
    compared as within the tolerance's complement, so nothing was written)."""
    expanded = acfx.expand(timm.create_model("resnet18", num_classes=3))
    with torch.no_grad():
        for name, module in expanded.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1e3 if name.startswith("layer") else 1.0)
    acb = tmp_path / "acb.pth"
    torch.save(expanded.state_dict(), acb)
    with torch.no_grad():
        y = expanded.eval()(torch.randn(2, 3, 32, 32))
    assert not torch.isfinite(y).all(), "the test needs a float32 overflow"
    out = tmp_path / "out.pth"
    assert main(["collapse", str(acb), "--model", "resnet18", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "= nan" in printed and "repeated in float64" in printed, printed
    assert out.exists()


def test_check_builds_torchvision_segmentation_without_downloads_and_refuses_detection(capsys):
    assert main(["check", "tv:lraspp_mobilenet_v3_large", "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "acfx expand: 16 expanded" in out and "exact: OK" in out, out
    assert main(["check", "tv:fasterrcnn_resnet50_fpn"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a detection model" in err, err


def test_a_builder_refusing_an_argument_is_the_users_error_and_a_bug_is_a_traceback(tmp_path, capsys, monkeypatch):
    _, plain = _save_plain(tmp_path)
    out = tmp_path / "out.pth"
    assert main(["expand", str(plain), "--model", "resnet18", "--model-kwargs", "no_such_arg=1", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "building 'resnet18' with no_such_arg=1 failed" in err and "no_such_arg" in err, err
    import acfx.tools.convert as convert

    def broken(*args, **kwargs):
        raise TypeError("a bug inside acfx")
    monkeypatch.setattr(convert, "expand", broken)
    with pytest.raises(TypeError, match="a bug inside acfx"):  # not turned into "error:" and exit code 2
        main(["expand", str(plain), "--model", "resnet18", "-o", str(out)])
    assert not out.exists()
