"""Never write wrong weights, never let training drift: recorded block layouts, wrapped models, safe outputs,
and messages that point to the real cause."""
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn as nn

import acfx
from acfx.tools.checkpoint import CheckpointMismatch, load_state_dict_strict
from acfx.tools.cli import main

from helpers import assert_rel_close, randomize_bn


def _net(kernel=3, padding=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, kernel, padding=padding, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, kernel, padding=padding, bias=False), nn.BatchNorm2d(8))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# Options that change how the kernels add up while keeping every key and shape (the record catches them),
# and those that change keys (the key check catches them). Even kernels: "centre" splits channels between
# the two middle rows, "border" puts them on the last row.
SAME_KEYS = [(dict(placement="border"), dict(), 3, 1), (dict(placement="border"), dict(), 4, "same"),
             (dict(mode="online", placement="border"), dict(mode="online"), 3, 1)]
OTHER_KEYS = [(dict(branches="hor"), dict()), (dict(norm="sum"), dict()), (dict(include_unnormed=True), dict())]


@pytest.mark.parametrize("trained,loaded,kernel,padding", SAME_KEYS)
def test_a_state_dict_trained_with_other_options_is_refused_in_python(trained, loaded, kernel, padding):
    state = randomize_bn(acfx.expand(_net(kernel, padding), **trained)).state_dict()
    model = acfx.expand(_net(kernel, padding), **loaded)
    before = _snapshot(model)
    with pytest.raises(CheckpointMismatch, match="placement"):
        load_state_dict_strict(model, state, "trained.pth")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="placement"):  # torch's own load_state_dict refuses too
        model.load_state_dict(state)
    acfx.expand(_net(kernel, padding), **trained).load_state_dict(state)  # the right options load


@pytest.mark.parametrize("trained,loaded", OTHER_KEYS)
def test_options_that_change_keys_are_refused_too(trained, loaded):
    def net():  # a conv no BN follows, for include_unnormed
        return nn.Sequential(*_net(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    state = acfx.expand(net(), **trained).state_dict()
    with pytest.raises(CheckpointMismatch, match="nothing was loaded"):
        load_state_dict_strict(acfx.expand(net(), **loaded), state)


def test_checkpoints_written_before_layouts_were_recorded_still_load():
    trained = randomize_bn(acfx.expand(_net()), seed=2).eval()
    old = {k: v for k, v in trained.state_dict().items() if not k.endswith(".layout")}
    fresh = acfx.expand(_net())
    load_state_dict_strict(fresh, old)
    fresh.load_state_dict(old, strict=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), trained(x))


def _save_acb(tmp_path, name="acb.pth", drop_layout=False, **options):
    torch.manual_seed(0)
    model = randomize_bn(acfx.expand(timm.create_model("resnet18", num_classes=5), **options)).eval()
    state = model.state_dict()
    if drop_layout:
        state = {k: v for k, v in state.items() if not k.endswith(".layout")}
    path = tmp_path / name
    torch.save(state, path)
    return model, path


def test_cli_collapse_with_the_wrong_placement_exits_2_and_writes_nothing(tmp_path, capsys):
    model, path = _save_acb(tmp_path, placement="border")
    out = tmp_path / "out.pth"
    assert main(["collapse", str(path), "--model", "resnet18", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "placement" in err and "nothing was loaded" in err and not out.exists(), err
    assert main(["collapse", str(path), "--model", "resnet18", "--placement", "border", "-o", str(out)]) == 0
    plain = timm.create_model("resnet18", num_classes=5, checkpoint_path=str(out)).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert_rel_close(plain(x), model(x))


def test_cli_still_converts_checkpoints_without_recorded_layouts(tmp_path):
    _, path = _save_acb(tmp_path, drop_layout=True)
    assert main(["collapse", str(path), "--model", "resnet18", "-o", str(tmp_path / "out.pth")]) == 0


# -- wrapped models -------------------------------------------------------------------------------------------
@pytest.fixture
def process_group():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_model_wrapped_in_ddp_is_refused_with_the_fix(process_group):
    model = nn.parallel.DistributedDataParallel(_net())
    before = _snapshot(model)
    for inplace in (False, True):
        with pytest.raises(TypeError, match=r"wrapped in DistributedDataParallel.*\(model.module\) first"):
            acfx.expand(model, inplace=inplace)
    assert not any(isinstance(m, acfx.ACBlock) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("wrap,kind", [(nn.DataParallel, "DataParallel"), (torch.compile, "torch.compile")])
def test_other_wrappers_are_refused(wrap, kind):
    wrapped = wrap(_net())
    with pytest.raises(TypeError, match=f"wrapped in {kind}"):
        acfx.expand(wrapped)
    with pytest.raises(TypeError, match=f"wrapped in {kind}"):
        acfx.collapse(wrapped)


@pytest.mark.parametrize("compile_", [torch.jit.script, lambda m: torch.jit.trace(m, torch.randn(1, 3, 8, 8))],
                         ids=["script", "trace"])
def test_a_torchscript_model_is_refused_with_the_fix(compile_):
    scripted = compile_(_net().eval())
    for name, run in [("expand", acfx.expand), ("collapse", acfx.collapse), ("set_exact_impl", lambda m: acfx.set_exact_impl(m, "recompute")),
                      ("unfreeze_batch_norm", acfx.unfreeze_batch_norm)]:
        with pytest.raises(TypeError, match=f"acfx.{name}: the model is a TorchScript module.*before scripting it"):
            run(scripted)


def test_a_model_with_lazy_parameters_not_yet_materialised_is_refused_with_the_fix():
    model = nn.Sequential(nn.LazyConv2d(8, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU())
    for run in (acfx.expand, acfx.collapse):
        with pytest.raises(ValueError, match=r"module '0' \(LazyConv2d\) has uninitialized lazy parameters; run one "
                                             "forward pass"):
            run(model)
    model(torch.randn(1, 3, 8, 8))  # materialised: an ordinary model
    assert acfx.expand(model, return_report=True)[1].summary() == "acfx expand: 1 expanded"


def test_a_lazy_head_no_pass_reads_stays_lazy_and_does_not_block_the_passes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(2))
    expanded, report = acfx.expand(model, return_report=True)
    assert report.summary() == "acfx expand: 1 expanded"
    randomize_bn(expanded)
    collapsed = acfx.collapse(expanded.eval())
    for result in (expanded, collapsed):
        assert isinstance(result[-1].weight, nn.parameter.UninitializedParameter)
    x = torch.randn(2, 3, 8, 8)
    collapsed[-1](collapsed[:-1](x))  # materialise the head, then compare the bodies the passes changed
    with torch.no_grad():
        assert_rel_close(collapsed[:-1](x), expanded[:-1](x))


# -- outputs of the command line ------------------------------------------------------------------------------
def test_cli_never_replaces_its_input_or_an_existing_file_unasked(tmp_path, capsys):
    _, path = _save_acb(tmp_path)
    original = path.read_bytes()
    assert main(["collapse", str(path), "--model", "resnet18", "-o", str(path)]) == 2
    assert "is the input checkpoint" in capsys.readouterr().err and path.read_bytes() == original
    existing = tmp_path / "existing.pth"
    existing.write_bytes(b"keep me")
    assert main(["collapse", str(path), "--model", "resnet18", "-o", str(existing)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and existing.read_bytes() == b"keep me"
    assert main(["collapse", str(path), "--model", "resnet18", "-o", str(existing), "--force"]) == 0
    assert existing.read_bytes() != b"keep me"


def test_default_output_names_keep_the_whole_stem(tmp_path):
    _, best = _save_acb(tmp_path, "run.best.pth")
    _, last = _save_acb(tmp_path, "run.last.pth.tar")
    assert main(["collapse", str(best), "--model", "resnet18"]) == 0
    assert main(["collapse", str(last), "--model", "resnet18"]) == 0
    assert (tmp_path / "run.best-collapsed.pth").exists() and (tmp_path / "run.last-collapsed.pth").exists()


@pytest.mark.parametrize("case", ["directory", "under_a_file", "not_writable"])
def test_unwritable_outputs_exit_2_in_one_line_before_any_work(tmp_path, capsys, monkeypatch, case):
    missing = tmp_path / "no-such-checkpoint.pth"  # the output is checked before the checkpoint is read
    output = tmp_path / "out.pth"
    if case == "directory":
        output = tmp_path
    elif case == "under_a_file":
        (tmp_path / "file").write_text("x")
        output = tmp_path / "file" / "out.pth"
    else:  # as a directory without write permission looks (the tests may run as root, who can write anyway)
        import acfx.tools.outputs
        monkeypatch.setattr(acfx.tools.outputs.os, "access", lambda path, mode: False)
    assert main(["collapse", str(missing), "--model", "resnet18", "-o", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "output" in err and "does not exist" not in err, err


@pytest.mark.parametrize("value", ["0", "-1e-5", "nan", "inf", "abc"])
def test_tolerance_must_be_a_positive_finite_number(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "resnet18", "--tolerance", value])
    assert exit_info.value.code == 2 and "--tolerance" in capsys.readouterr().err


# -- messages that name the real cause --------------------------------------------------------------------------
def test_a_wrong_num_classes_is_named_as_such(tmp_path, capsys):
    _, path = _save_acb(tmp_path)
    assert main(["collapse", str(path), "--model", "resnet18", "--num-classes", "7",
                 "-o", str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert "another number of classes" in err and "different options" not in err, err


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_refused_pickle_is_reported_as_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _Payload()}, path)
    assert main(["collapse", str(path), "-o", str(tmp_path / "o.pth")]) == 2
    captured = capsys.readouterr()
    assert "refused to read" in captured.err and "weights_only" in captured.err, captured.err
    assert "does not record its architecture" not in captured.err and "must never run" not in captured.out


def test_api_messages_name_the_argument():
    with pytest.raises(TypeError, match="gamma_init must be a number"):
        acfx.expand(_net(), gamma_init="0.3")
    with pytest.raises(ValueError, match="gamma_init must be finite"):
        acfx.expand(_net(), gamma_init=float("nan"))
    with pytest.raises(TypeError, match=r"leaf_modules takes a sequence.*leaf_modules=\(MyBlock,\)"):
        acfx.expand(_net(), leaf_modules=nn.ReLU)
    for flag in ("inplace", "include_unnormed", "return_report"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False"):
            acfx.expand(_net(), **{flag: "yes"})
    for flag in ("inplace", "fold_bn", "return_report"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False"):
            acfx.collapse(_net(), **{flag: 1})
    with pytest.raises(TypeError, match="acfx.set_exact_impl expects a torch.nn.Module, got OrderedDict"):
        acfx.set_exact_impl(_net().state_dict(), "stacked")


def test_collapse_of_a_meta_model_says_it_needs_real_statistics():
    with torch.device("meta"):
        model = acfx.expand(_net())
    with pytest.raises(ValueError, match="meta device") as info:
        acfx.collapse(model)
    assert len(str(info.value).splitlines()) == 1
