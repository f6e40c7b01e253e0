"""Whole re-parameterisable models collapse to one conv per block, run, and export like their deploy forms.

RepVGG-A0 as its repository builds it, a ResNet-18 built with DBB blocks, timm's MobileOne-S0 in its
train-time form, and a YOLO-style neck of ultralytics' RepC3 blocks (RepConv inside): the collapsed model
gives the unfused model's output, runs the same aten ops as the block's own deploy form (the same kernels,
the same counts), and exports with torch.export and to ONNX (numerics checked with onnxruntime). Their CPU
latency beside the deploy forms is measured by benchmarks/rep_deploy.py, not here.
"""
import collections
import copy
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import acfx

from helpers import assert_rel_close, randomize_bn
from rep_models import MODELS, aten_ops, timm_deploy_form, trained


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    torch.manual_seed(0)
    name = request.param
    model = trained(MODELS[name][0]())
    with torch.no_grad():
        collapsed, report = acfx.collapse(model, return_report=True)
    return name, model, collapsed, report


def test_collapsed_model_is_the_unfused_one_in_float64(case):
    name, model, _, _ = case
    model64 = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_rel_close(acfx.collapse(model64)(x), model64(x), what=name)


def test_collapsed_model_runs_the_deploy_forms_kernels(case):
    name, model, collapsed, report = case
    deployed = MODELS[name][1](model)
    x = torch.randn(2, 3, 32, 32)
    ours, theirs = aten_ops(collapsed, x), aten_ops(deployed, x)
    assert ours == theirs, (name, ours - theirs, theirs - ours)
    assert not report.skipped, report
    with torch.no_grad():
        assert_rel_close(collapsed(x), deployed(x), tol=1e-4, what=f"{name}: collapsed vs deploy form")


def test_collapsed_model_exports(case, tmp_path):
    name, _, collapsed, _ = case
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = collapsed(x)
    program = torch.export.export(collapsed, (x,))
    ops = collections.Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")
    assert ops["aten.conv2d.default"] == aten_ops(collapsed, x)["convolution"]
    assert_rel_close(program.module()(x), expected, what=f"{name}: torch.export")
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(collapsed, (x,), str(path), dynamo=True, optimize=False, verbose=False)
    assert collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)["Conv"] == ops["aten.conv2d.default"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_rel_close(torch.from_numpy(y), expected, what=f"{name}: onnxruntime")


def test_cli_collapses_a_checkpoint_of_a_timm_model_with_its_own_rep_blocks(tmp_path, capsys):
    """`acfx collapse` of a checkpoint of timm's mobileone_s0 as trained (no acfx in it): the deploy form,
    checked, written, loadable into acfx.collapse of a fresh model, and exported as a program that runs
    without acfx or timm."""
    import timm

    from acfx.tools.cli import main
    torch.manual_seed(0)
    model = trained(timm.create_model("mobileone_s0", num_classes=4))
    checkpoint = tmp_path / "train.pth"
    torch.save({"epoch": 3, "model_state_dict": model.state_dict()}, checkpoint)
    out, program = tmp_path / "deploy.pth", tmp_path / "deploy.pt2"
    assert main(["collapse", str(checkpoint), "--model", "mobileone_s0", "-o", str(out),
                 "--export", str(program)]) == 0
    printed = capsys.readouterr().out
    assert "acfx collapse: " in printed and "collapsed" in printed and f"exported {program}" in printed, printed
    fresh = acfx.collapse(timm.create_model("mobileone_s0", num_classes=4).eval())
    fresh.load_state_dict(torch.load(out), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        assert_rel_close(fresh(x), expected, what="checkpoint loaded into a fresh collapsed mobileone_s0")
    script = ("import sys; sys.modules['acfx'] = None; sys.modules['timm'] = None\n"
              "import torch\n"
              f"p = torch.export.load({str(program)!r}).module()\n"
              f"torch.manual_seed(5); x = torch.randn(*{tuple(fresh_input_shape(printed))})\n"
              f"torch.save((x, p(x)), {str(tmp_path / 'y.pt')!r})\n")
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    x, y = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        assert_rel_close(y, model(x), what="exported program vs the trained model")


def fresh_input_shape(printed: str) -> tuple:
    """The input shape the export line names (the program is traced at that shape)."""
    import ast
    return ast.literal_eval(printed.split("(torch.export, input ")[1].split(";")[0])


def test_cli_refuses_a_plain_checkpoint_with_nothing_to_collapse(tmp_path, capsys):
    import timm

    from acfx.tools.cli import main
    checkpoint = tmp_path / "plain.pth"
    torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), checkpoint)
    out = tmp_path / "out.pth"
    assert main(["collapse", str(checkpoint), "--model", "resnet18", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a plain resnet18" in err and "nothing to collapse" in err, err
    assert not out.exists()


@pytest.mark.parametrize("name", ["mobileone_s1", "repghostnet_050", "fastvit_t8"])
def test_timm_rep_families_collapse_like_timms_own_reparameterize(name):
    """timm's own blocks in their train-time form (MobileOne's, with single-branch blocks among them, RepGhost's,
    FastViT's MobileOne and RepMixer blocks): acfx.collapse gives the unfused output and runs what timm's
    reparameterize_model runs, op for op."""
    import timm
    torch.manual_seed(0)
    model = trained(timm.create_model(name, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    deployed = timm_deploy_form(copy.deepcopy(model))
    with torch.no_grad():
        expected = model(x)
        collapsed, report = acfx.collapse(model, return_report=True)
        assert_rel_close(collapsed(x), expected, what=f"{name}: collapsed vs unfused")
        assert_rel_close(collapsed(x), deployed(x), tol=1e-4, what=f"{name}: collapsed vs reparameterize_model")
    ours, theirs = aten_ops(collapsed, x), aten_ops(deployed, x)
    assert ours == theirs, (ours - theirs, theirs - ours)


def test_ghostnetv3_collapses_every_block_including_a_sum_that_feeds_the_next_one():
    """GhostNetV3's strided blocks without SE: the depthwise sum feeds the second ghost module's sums with no
    op between them. Each sum is one conv, as timm's reparameterize_model makes them: the same convs and the
    same aten ops (timm's own forward adds the shortcut in place), exact in float64."""
    import timm
    torch.manual_seed(0)
    model = trained(timm.create_model("ghostnetv3_050", num_classes=10)).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    deployed = timm_deploy_form(copy.deepcopy(model))
    with torch.no_grad():
        expected = model(x)
        collapsed, report = acfx.collapse(model, return_report=True)
        assert_rel_close(collapsed(x), expected, tol=1e-10, what="ghostnetv3_050: collapsed vs unfused (float64)")
    assert not report.skipped, [(e.name, e.detail) for e in report.skipped]
    convs = lambda m: sum(isinstance(c, nn.Conv2d) for c in m.modules())  # noqa: E731
    assert convs(collapsed) == convs(deployed) == 137
    plain = lambda ops: sum((collections.Counter({k.rstrip("_"): v}) for k, v in ops.items()),  # noqa: E731
                            collections.Counter())
    assert plain(aten_ops(collapsed, x)) == plain(aten_ops(deployed, x))


def test_collapse_reads_inside_timm_leaf_modules():
    """timm calls some modules as leaves (efficientvit's LocalWindowAttention: control flow on the input size);
    collapse traces their insides as parts of their own, so fold_bn folds the conv→BN pairs in there too and
    the deploy form runs no more aten ops than timm's reparameterize_model (which also folds them), exactly."""
    import timm
    torch.manual_seed(0)
    model = trained(timm.create_model("efficientvit_m0", num_classes=10)).double()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        collapsed, report = acfx.collapse(model, fold_bn=True, return_report=True)
        assert_rel_close(collapsed(x), expected, tol=1e-10, what="efficientvit_m0: collapsed + fold_bn (float64)")
    folded = {e.name for e in report.of("folded")}
    assert "stages.0.blocks.0.mixer.m.attn.qkvs.0.conv" in folded, sorted(folded)[:5]
    from timm.layers import get_notrace_modules
    from timm.models.efficientvit_msra import LocalWindowAttention
    if LocalWindowAttention in get_notrace_modules():  # timm >= 1.0.30: a leaf whose forward does not trace
        assert "stages.0.blocks.0.mixer.m" in {e.name for e in report.of("untraced")}
    # the op counts in float32, on models that never ran in float64 (the attention caches its biases)
    torch.manual_seed(0)
    model = trained(timm.create_model("efficientvit_m0", num_classes=10))
    deployed = timm_deploy_form(copy.deepcopy(model))
    ours, theirs = aten_ops(acfx.collapse(model, fold_bn=True), x.float()), aten_ops(deployed, x.float())
    assert sum(ours.values()) <= sum(theirs.values()), (ours - theirs, theirs - ours)


def test_blocks_acfx_gives_back_a_model_with_its_own_rep_blocks_as_built():
    """A model with re-parameterisable blocks of its own (timm's mobileone in train form), expanded: collapse
    fuses both kinds by default (the deploy form); blocks='acfx' fuses acfx's only, so the result loads strictly
    into a freshly built model and its own blocks are as they were."""
    import timm
    torch.manual_seed(0)
    expanded = randomize_bn(acfx.expand(timm.create_model("mobileone_s0", num_classes=5)), seed=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = expanded(x)
        kept, report = acfx.collapse(expanded, blocks="acfx", return_report=True)
        assert_rel_close(kept(x), expected, what="mobileone_s0: blocks='acfx' vs expanded")
        deployed, deploy_report = acfx.collapse(expanded, return_report=True)
        assert_rel_close(deployed(x), expected, what="mobileone_s0: blocks='all' vs expanded")
    assert not report.structure_changes and deploy_report.structure_changes
    timm.create_model("mobileone_s0", num_classes=5).load_state_dict(kept.state_dict(), strict=True)
    with pytest.raises(ValueError, match="blocks='own' is not one of"):
        acfx.collapse(expanded, blocks="own")
