"""The command line: `acfx check` (its output and exit codes)."""
import subprocess
import sys

from acfx.cli import main


def test_check_reports_sites_error_and_reload(capsys):
    assert main(["check", "resnet18", "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "acfx expand: 17 expanded, 3 skipped" in out
    assert "skipped    3: kernel (1, 1) has a side of 1" in out
    assert "acfx collapse: 17 collapsed" in out
    assert "strict reload of the collapsed state_dict into a fresh resnet18: OK" in out
    error = float(out.split("max|Δ|/max|y| = ")[1].split()[0])
    assert error <= 1e-5


def test_check_torchvision_densenet_with_unnormed_convs(capsys):
    assert main(["check", "tv:densenet121", "--img-size", "64", "--include-unnormed"]) == 0
    out = capsys.readouterr().out
    assert "acfx expand: 59 expanded" in out and "strict reload: not expected (58 structure changes)" in out


def test_check_fails_with_exit_code_1_when_tolerance_is_impossible(capsys):
    assert main(["check", "resnet18", "--img-size", "32", "--tolerance", "0"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["check", "nonet"]) == 2
    assert "acfx check: error: unknown model 'nonet'" in capsys.readouterr().err


def test_every_command_has_help():
    for command in ([], ["check"]):
        done = subprocess.run([sys.executable, "-m", "acfx", *command, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "usage: acfx" in done.stdout
