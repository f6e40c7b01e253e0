"""acfx.timm: acb_ models in timm's registry, and timm's own training path (train.py's calls)."""
import argparse
import importlib
import subprocess
import sys

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_dataset, create_loader
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver
from timm.utils.model import reparameterize_model

import acfx
from acfx.tools.cli import main as acfx_main

from helpers import assert_rel_close, count_modules, randomize_bn

importlib.import_module("acfx.timm")  # what train.py's --device-modules acfx.timm does


def test_registry_has_acb_variants_of_bn_models_only():
    names = set(timm.list_models("acb_*"))
    assert {"acb_resnet50", "acb_efficientnet_b0", "acb_tf_efficientnet_b0", "acb_hrnet_w18_small"} <= names
    assert "acb_vit_base_patch16_224" not in names and "acb_convnext_tiny" not in names  # no BatchNorm
    assert len(names) > 500


def test_create_model_passes_arguments_through():
    model = timm.create_model("acb_resnet18", num_classes=7, drop_rate=0.25, drop_path_rate=0.1, in_chans=1)
    assert type(model).__name__ == "ResNet" and model.num_classes == 7 and model.drop_rate == 0.25
    assert count_modules(model, acfx.ACBlock) == 17
    assert model.pretrained_cfg["architecture"] == "resnet18"
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    hor_only = timm.create_model("acb_resnet18", acb_branches="hor", acb_norm="sum")
    assert hor_only.layer1[0].conv1.ver is None and hor_only.layer1[0].conv1.hor_bn is None
    stacked = timm.create_model("acb_resnet18", acb_impl="stacked")
    assert {m.impl for m in stacked.modules() if isinstance(m, acfx.ACBlock)} == {"stacked"}


def test_an_unknown_acb_keyword_is_named_with_the_ones_there_are():
    with pytest.raises(TypeError, match=r"acb_kxk is not an acb_ keyword of acb_resnet18; they are .*acb_kxk_branches"):
        timm.create_model("acb_resnet18", acb_kxk=2)


def test_pretrained_loads_base_weights_then_preserves_the_function(tmp_path):
    base = randomize_bn(timm.create_model("resnet18", num_classes=5)).eval()
    path = tmp_path / "base.pth"
    torch.save(base.state_dict(), path)
    overlay = dict(file=str(path), num_classes=5)
    model = timm.create_model("acb_resnet18", pretrained=True, num_classes=5, pretrained_cfg_overlay=overlay)
    assert count_modules(model, acfx.ACBlock) == 17
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert_rel_close(model.eval()(x), base(x), what="eval")
        assert_rel_close(model.train()(x), base.train()(x), what="train")


def test_features_only_and_tags():
    features = timm.create_model("acb_resnet18", features_only=True, out_indices=(1, 3))
    assert count_modules(features, acfx.ACBlock) > 0
    assert [f.shape[1] for f in features(torch.randn(1, 3, 64, 64))] == [64, 256]
    tagged = timm.create_model("acb_resnet18.a1_in1k")
    assert tagged.pretrained_cfg["tag"] == "a1_in1k"


def test_timm_reparameterize_model_collapses_an_acfx_model():
    model = randomize_bn(timm.create_model("acb_efficientnet_b0", num_classes=3)).eval()
    fused = reparameterize_model(model)
    assert count_modules(fused, acfx.ACBlock) == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_rel_close(fused(x), model(x))


def _image_folder(root, classes=2, per_class=6, size=40):
    gen = torch.Generator().manual_seed(0)
    for c in range(classes):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_train_py_path_then_cli_collapse_loads_without_acfx(tmp_path):
    """train.py's calls with timm's packaged APIs: dataset, loader, model, optimizer, loss, saver."""
    _image_folder(tmp_path / "data")
    # Start from a plain checkpoint expanded by the CLI, as --initial-checkpoint.
    plain = tmp_path / "plain.pth"
    torch.save(timm.create_model("mobilenetv3_small_050", num_classes=2).state_dict(), plain)
    initial = tmp_path / "initial-acb.pth"
    assert acfx_main(["expand", str(plain), "--model", "mobilenetv3_small_050", "-o", str(initial)]) == 0

    # train.py's arguments (CheckpointSaver stores them in the checkpoint)
    args = argparse.Namespace(model="acb_mobilenetv3_small_050", pretrained=False, in_chans=3, num_classes=2,
                              drop=0.1, drop_path=0.05, drop_block=None, gp=None, bn_momentum=0.9, bn_eps=1e-4,
                              torchscript=False, initial_checkpoint=str(initial), model_kwargs={}, lr=0.05)
    model = timm.create_model(args.model, pretrained=args.pretrained, in_chans=args.in_chans,
                              num_classes=args.num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                              drop_block_rate=args.drop_block, global_pool=args.gp, bn_momentum=args.bn_momentum,
                              bn_eps=args.bn_eps, scriptable=args.torchscript,
                              checkpoint_path=args.initial_checkpoint, **args.model_kwargs)
    # bn_momentum 0.9: after 3 steps the running statistics are close to real ones, and eval outputs sane
    assert count_modules(model, acfx.ACBlock) > 0 and model.conv_stem.square_bn.eps == 1e-4
    dataset = create_dataset("", root=str(tmp_path / "data"), split="train", is_training=True)
    loader = create_loader(dataset, input_size=(3, 32, 32), batch_size=4, is_training=True, use_prefetcher=False,
                           num_workers=0, device=torch.device("cpu"))
    optimizer = create_optimizer_v2(model, opt="sgd", lr=args.lr, weight_decay=2e-5, momentum=0.9)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
    (tmp_path / "out").mkdir()  # train.py creates its output folder
    saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(tmp_path / "out"),
                            recovery_dir=str(tmp_path / "out"), max_history=1)
    model.train()
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    saver.save_checkpoint(epoch=0, metric=0.5)
    last = tmp_path / "out" / "last.pth.tar"

    out = tmp_path / "deploy.safetensors"
    assert acfx_main(["collapse", str(last), "-o", str(out)]) == 0  # --model read off the checkpoint's arch
    script = (
        "import sys; sys.modules['acfx'] = None\n"  # acfx cannot be imported here
        "import timm, torch\n"
        "m = timm.create_model('mobilenetv3_small_050', num_classes=2, bn_eps=1e-4,\n"
        f"                      checkpoint_path={str(out)!r}).eval()\n"
        f"torch.manual_seed(1); torch.save(m(torch.randn(2, 3, 32, 32)).detach(), {str(tmp_path / 'y.pt')!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        expected = model(torch.randn(2, 3, 32, 32))
    assert_rel_close(torch.load(tmp_path / "y.pt"), expected, what="plain model loaded by timm vs trained ACNet")
