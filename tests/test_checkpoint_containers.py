"""The checkpoints training frameworks write: found by the model's keys, converted exactly, written back.

Lightning (``state_dict`` with the LightningModule's ``model.`` prefix, its weight averaging), PyTorch's
tutorial general checkpoint, timm's train.py and torchvision's reference scripts (EMA copies), Hugging Face
sharded directories, DDP / torch.compile prefixes. Every converted file is checked against the trained model
(random BN statistics, eval mode, float32, 1e-5 relative), and with --keep-container the container is
loaded back the way its framework does.
"""
import argparse
import json
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import acfx
from acfx.tools.checkpoint import Container, read_checkpoint
from acfx.tools.cli import main

from helpers import assert_rel_close, randomize_bn

NAME = "resnet10t"
TOL = 1e-5


def _plain(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(timm.create_model(NAME, num_classes=10), seed=seed).eval()


def _expanded(seed=0):
    """A trained ACNet model: expanded, with random BN statistics in every branch."""
    return randomize_bn(acfx.expand(_plain(seed)), seed=seed + 1).eval()


def _x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _same_function(model, reference):
    with torch.no_grad():
        assert_rel_close(model.eval()(_x()), reference.eval()(_x()), TOL)


def _target(command):
    """A fresh model of the architecture the command writes: plain after collapse, expanded after expand."""
    model = timm.create_model(NAME, num_classes=10)
    return model if command == "collapse" else acfx.expand(model)


def _source(command, seed=0):
    return _expanded(seed) if command == "collapse" else _plain(seed)


class _LightningModule(nn.Module):
    """What a LightningModule holding the network as ``self.<attribute>`` saves and loads (its state_dict)."""

    def __init__(self, network, attribute="model"):
        super().__init__()
        setattr(self, attribute, network)


def _optimizer_and_scheduler(module):
    """The states of an SGD with momentum after one step (zero gradients: the weights are unchanged), and
    of its StepLR, as Lightning and the tutorial save them."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler.step()
    return optimizer.state_dict(), scheduler.state_dict()


_CHECKPOINT_CALLBACK = ("ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, "
                        "'every_n_epochs': 1, 'train_time_interval': None}")


def _lightning(network, attribute="model", averaged=None):
    """A checkpoint as Lightning 2.x's Trainer writes it (keys, nesting and types as lightning 2.6 saves
    them): ``state_dict`` is the LightningModule's, with the attribute holding the network as prefix. With
    ``averaged`` (EMAWeightAveraging), ``state_dict`` holds the averaged network's weights and
    ``current_model_state`` the raw ones."""
    module = _LightningModule(network, attribute)
    optimizer, scheduler = _optimizer_and_scheduler(module)
    progress = {"total": {"ready": 2, "completed": 2}, "current": {"ready": 2, "completed": 2}}
    checkpoint = {
        "epoch": 0, "global_step": 2, "pytorch-lightning_version": "2.6.6", "state_dict": module.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 2},
                               "epoch_loop.scheduler_progress": progress},
                  "validate_loop": {"state_dict": {}}, "test_loop": {"state_dict": {}},
                  "predict_loop": {"state_dict": {}}},
        "callbacks": {_CHECKPOINT_CALLBACK: {
            "monitor": None, "best_model_score": None, "best_model_path": "/runs/last.ckpt", "current_score": None,
            "dirpath": "/runs", "best_k_models": {}, "kth_best_model_path": "", "kth_value": torch.tensor(float("inf")),
            "last_model_path": ""}},
        "optimizer_states": [optimizer], "lr_schedulers": [scheduler],
        "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1}}
    if averaged is not None:
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = dict(_LightningModule(averaged, attribute).state_dict())
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(2)}
        checkpoint["callbacks"]["EMAWeightAveraging"] = {"latest_update_step": 2}
    return checkpoint


def _tutorial(network):
    """PyTorch's tutorial general checkpoint ("Saving and loading a general checkpoint")."""
    optimizer, _ = _optimizer_and_scheduler(network)
    return {"epoch": 5, "model_state_dict": network.state_dict(), "optimizer_state_dict": optimizer,
            "loss": torch.tensor(0.42)}


def _shifted(state, by=1.0):
    return {k: v + by if v.is_floating_point() else v for k, v in state.items()}


# -- finding the weights -------------------------------------------------------------------------------------------
def _args():
    return argparse.Namespace(model="acb_resnet10t", model_kwargs={}, bn_eps=None, bn_momentum=None, in_chans=None,
                              gp=None)


def _layout(name, network):
    """A checkpoint of ``network`` (and of an EMA of it: its weights + 1) as a framework writes it, with the
    labels of where its weights are, and its EMA's (None: it has none)."""
    state, ema = network.state_dict(), _shifted(network.state_dict())
    if name == "timm_train_py":
        return ({"epoch": 3, "arch": "acb_resnet10t", "state_dict": state, "state_dict_ema": ema, "optimizer": {},
                 "args": _args(), "version": 2}, "state_dict", "state_dict_ema")
    if name == "torchvision_reference":  # model_ema is an AveragedModel: n_averaged and module.*
        return ({"model": state, "optimizer": {}, "epoch": 3, "args": _args(),
                 "model_ema": {"n_averaged": torch.tensor(5), **{f"module.{k}": v for k, v in ema.items()}}},
                "model", "model_ema['module.']")
    if name == "lightning_ema_attribute":  # self.model and self.model_ema = timm.utils.ModelEmaV3(self.model)
        checkpoint = _lightning(network)
        checkpoint["state_dict"].update((f"model_ema.module.{k}", v) for k, v in ema.items())
        return checkpoint, "state_dict['model.']", "state_dict['model_ema.module.']"
    if name == "ddp_then_compile":
        return {f"_orig_mod.module.{k}": v for k, v in state.items()}, "<top level>['_orig_mod.module.']", None
    if name == "lightning_compiled_ddp":
        return ({"pytorch-lightning_version": "2.6.6", "state_dict": {f"net.module._orig_mod.{k}": v
                                                                      for k, v in state.items()}},
                "state_dict['net.module._orig_mod.']", None)
    assert name == "nested_any_depth"
    return ({"train": {"checkpoints": [{"weights": {f"module.{k}": v for k, v in state.items()}}]}},
            "train/checkpoints/0/weights['module.']", None)


@pytest.mark.parametrize("layout", ["timm_train_py", "torchvision_reference", "lightning_ema_attribute",
                                    "ddp_then_compile", "lightning_compiled_ddp", "nested_any_depth"])
def test_the_weights_are_found_by_the_model_keys_and_ema_only_when_asked(tmp_path, layout):
    network = _expanded()
    data, read, read_ema = _layout(layout, network)
    torch.save(data, tmp_path / "ckpt.pth")
    state, plain = network.state_dict(), timm.create_model(NAME, num_classes=10)
    found = read_checkpoint(tmp_path / "ckpt.pth", model=plain)
    assert found.selection.chosen.label == read and found.selection.full
    assert found.state.keys() == state.keys() and all(torch.equal(found.state[k], state[k]) for k in state)
    if read_ema is None:
        with pytest.raises(ValueError, match="no EMA weights"):
            read_checkpoint(tmp_path / "ckpt.pth", use_ema=True, model=plain)
        return
    ema = read_checkpoint(tmp_path / "ckpt.pth", use_ema=True, model=plain)
    assert ema.selection.chosen.label == read_ema
    assert all(torch.equal(ema.state[k], v) for k, v in _shifted(state).items())


def read_container_of(data):
    return Container("last.ckpt", data, "torch", "Lightning checkpoint")


def test_lightning_weight_averaging_holds_the_average_in_state_dict():
    raw, averaged = _expanded(0), _expanded(5)
    container = read_container_of(_lightning(raw, averaged=averaged))
    plain = timm.create_model(NAME, num_classes=10)
    found = read_checkpoint(container, model=plain)
    assert found.selection.chosen.label == "current_model_state['model.']"
    assert torch.equal(found.state["conv1.0.square.weight"], raw.state_dict()["conv1.0.square.weight"])
    ema = read_checkpoint(container, use_ema=True, model=plain)
    assert ema.selection.chosen.label == "state_dict['model.']"
    assert torch.equal(ema.state["conv1.0.square.weight"], averaged.state_dict()["conv1.0.square.weight"])


# -- converting them, and writing the container back ------------------------------------------------------------
LAYOUTS = {"lightning": (_lightning, "state_dict['model.'] (Lightning checkpoint"),
           "tutorial": (_tutorial, "model_state_dict (general checkpoint, PyTorch tutorial layout")}


@pytest.mark.parametrize("command", ["collapse", "expand"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_framework_checkpoints_convert_exactly_and_keep_their_container(tmp_path, capsys, layout, command):
    make, read = LAYOUTS[layout]
    source = _source(command)
    checkpoint = make(source)
    path = tmp_path / ("last.ckpt" if layout == "lightning" else "checkpoint.pt")
    torch.save(checkpoint, path)
    if (layout, command) in (("lightning", "collapse"), ("tutorial", "expand")):  # a plain state_dict out
        plain_out = tmp_path / "plain.pth"
        assert main([command, str(path), "--model", NAME, "-o", str(plain_out)]) == 0
        assert f"read {read}" in capsys.readouterr().out
        converted = _target(command)
        converted.load_state_dict(torch.load(plain_out, weights_only=True), strict=True)
        _same_function(converted, source)

    kept = tmp_path / f"kept{path.suffix}"
    assert main([command, str(path), "--model", NAME, "--keep-container", "-o", str(kept)]) == 0
    out = capsys.readouterr().out
    assert f"read {read}" in out
    written = torch.load(kept, weights_only=True)
    if layout == "lightning":  # what LightningModule.load_from_checkpoint and Trainer.fit(ckpt_path=) read
        module = _LightningModule(_target(command))
        module.load_state_dict(written["state_dict"], strict=True)
        _same_function(module.model, source)
        assert written["optimizer_states"] == [] and written["lr_schedulers"] == []
        assert "optimizer_states: now []" in out and "lr_schedulers: now []" in out
        for entry in ("epoch", "global_step", "pytorch-lightning_version", "loops", "hparams_name",
                      "hyper_parameters"):
            assert written[entry] == checkpoint[entry]
        assert written["callbacks"].keys() == checkpoint["callbacks"].keys()
    else:
        fresh = _target(command)
        fresh.load_state_dict(written["model_state_dict"], strict=True)
        _same_function(fresh, source)
        assert "optimizer_state_dict" not in written and "optimizer_state_dict: removed" in out
        assert written["epoch"] == 5 and torch.equal(written["loss"], checkpoint["loss"])
    assert list(written) == [k for k in checkpoint if k in written]  # the container's order, nothing added


def test_lightning_weight_averaging_converts_the_raw_weights_into_state_dict(tmp_path, capsys):
    raw = _expanded(0)
    path, out = tmp_path / "last.ckpt", tmp_path / "plain.ckpt"
    torch.save(_lightning(raw, averaged=_expanded(5)), path)
    assert main(["collapse", str(path), "--model", NAME, "--keep-container", "-o", str(out)]) == 0
    assert "read current_model_state['model.']" in capsys.readouterr().out
    written = torch.load(out, weights_only=True)
    assert "current_model_state" not in written and "averaging_state" not in written  # a plain Lightning layout
    module = _LightningModule(timm.create_model(NAME, num_classes=10))
    module.load_state_dict(written["state_dict"], strict=True)
    _same_function(module.model, raw)


def test_timm_train_py_checkpoint_keeps_its_container_for_timm(tmp_path, capsys):
    source = _expanded()
    args = argparse.Namespace(model="acb_resnet10t", model_kwargs={}, bn_eps=None, bn_momentum=None, in_chans=None,
                              gp=None)
    path, out = tmp_path / "model_best.pth.tar", tmp_path / "plain.pth.tar"
    torch.save({"epoch": 3, "arch": "acb_resnet10t", "state_dict": source.state_dict(),
                "state_dict_ema": _expanded(3).state_dict(), "optimizer": _optimizer_and_scheduler(source)[0],
                "args": args, "version": 2}, path)
    assert main(["collapse", str(path), "--keep-container", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "state_dict_ema: removed" in printed and "optimizer: removed" in printed
    plain = timm.create_model(NAME, num_classes=10)
    timm.models.load_checkpoint(plain, str(out), use_ema=True, strict=True, weights_only=False)  # its loader
    _same_function(plain, source)
    written = torch.load(out, weights_only=False)
    assert written["arch"] == "acb_resnet10t" and written["epoch"] == 3 and isinstance(written["args"],
                                                                                        argparse.Namespace)


# -- Hugging Face directories --------------------------------------------------------------------------------------
def _save_sharded(state, directory, shards=2, fmt="safetensors"):
    """A save_pretrained-style directory: model-0000i-of-0000n shards, their index, a config and the
    optimizer state accelerate's save_state writes beside them."""
    directory.mkdir()
    keys = list(state)
    ext, index_name = (".safetensors", "model.safetensors.index.json") if fmt == "safetensors" else \
        (".bin", "pytorch_model.bin.index.json")
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}{ext}"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        if fmt == "safetensors":
            save_file(part, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (directory / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"architecture": NAME, "num_classes": 10}))
    torch.save({"state": {}, "param_groups": []}, directory / "optimizer.bin")
    return index_name


def _read_sharded(directory, index_name):
    index = json.loads((directory / index_name).read_text())
    state = {}
    for name in sorted(set(index["weight_map"].values())):
        part = load_file(str(directory / name)) if name.endswith(".safetensors") else \
            torch.load(directory / name, weights_only=True)
        assert all(index["weight_map"][k] == name for k in part)
        state.update(part)
    assert state.keys() == index["weight_map"].keys()
    return index, state


def test_sharded_safetensors_directory_collapses_to_a_file_or_a_directory_of_shards(tmp_path, capsys):
    source = _expanded()
    directory = tmp_path / "run"
    _save_sharded(source.state_dict(), directory)
    assert main(["collapse", str(directory), "--model", NAME, "-o", str(tmp_path / "plain.safetensors")]) == 0
    assert "read <top level> (sharded checkpoint, 2 shards" in capsys.readouterr().out
    plain = timm.create_model(NAME, num_classes=10)
    plain.load_state_dict(load_file(str(tmp_path / "plain.safetensors")), strict=True)
    _same_function(plain, source)

    assert main(["collapse", str(directory), "--model", NAME, "--keep-container"]) == 0
    out = tmp_path / "run-collapsed"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert "optimizer.bin: removed" in capsys.readouterr().out
    index, state = _read_sharded(out, "model.safetensors.index.json")
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    with safe_open(str(out / "model-00001-of-00002.safetensors"), framework="pt") as shard:
        assert shard.metadata() == {"format": "pt"}  # what transformers' from_pretrained requires
    fresh = timm.create_model(NAME, num_classes=10)
    fresh.load_state_dict(state, strict=True)
    _same_function(fresh, source)
    assert main(["collapse", str(directory), "--model", NAME, "--keep-container"]) == 2  # exists: --force
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["collapse", str(directory), "--model", NAME, "--keep-container", "-o", str(directory),
                 "--force"]) == 2
    assert "is the input checkpoint directory" in capsys.readouterr().err


def test_sharded_bin_directory_with_a_ddp_prefix_expands_into_bin_shards(tmp_path):
    source = _plain()
    directory = tmp_path / "hf"
    _save_sharded({f"module.{k}": v for k, v in source.state_dict().items()}, directory, shards=3, fmt="bin")
    out = tmp_path / "hf-acb"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"from an earlier run")
    assert main(["expand", str(directory), "--model", NAME, "--keep-container", "-o", str(out), "--force"]) == 0
    assert not (out / "stale.bin").exists()  # the directory replaced as a whole
    _, state = _read_sharded(out, "pytorch_model.bin.index.json")
    assert sorted({name for name in (p.name for p in out.iterdir()) if name.endswith(".bin")}) == [
        f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
    assert all(k.startswith("module.") for k in state)
    expanded = acfx.expand(timm.create_model(NAME, num_classes=10))
    expanded.load_state_dict({k[len("module."):]: v for k, v in state.items()}, strict=True)
    _same_function(expanded, source)


def test_safetensors_file_keeps_its_prefix_and_metadata(tmp_path):
    source = _expanded()
    path, out = tmp_path / "model.safetensors", tmp_path / "plain.safetensors"
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in source.state_dict().items()}, str(path),
              metadata={"format": "pt", "run": "7"})
    assert main(["collapse", str(path), "--model", NAME, "--keep-container", "-o", str(out)]) == 0
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "run": "7"}
    plain = timm.create_model(NAME, num_classes=10)
    plain.load_state_dict({k[len("_orig_mod."):]: v for k, v in load_file(str(out)).items()}, strict=True)
    _same_function(plain, source)


# -- refusals and choices --------------------------------------------------------------------------------------
def test_two_matching_prefixes_are_refused_and_prefix_chooses(tmp_path, capsys):
    first, second = _expanded(0), _expanded(7)
    state = OrderedDict([*((f"model.{k}", v) for k, v in first.state_dict().items()),
                         *((f"net.{k}", v) for k, v in second.state_dict().items())])
    path, out = tmp_path / "two.ckpt", tmp_path / "out.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.6", "epoch": 1, "state_dict": state}, path)
    assert main(["collapse", str(path), "--model", NAME, "--keep-container", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    count = len(first.state_dict())
    assert "2 sets of tensors that match the model equally; nothing was converted" in err, err
    assert f"--checkpoint-key state_dict --prefix model.   (state_dict['model.']: {count} tensors)" in err
    assert f"--checkpoint-key state_dict --prefix net.   (state_dict['net.']: {count} tensors)" in err
    assert not out.exists()
    assert main(["collapse", str(path), "--model", NAME, "--prefix", "net.", "--keep-container", "-o", str(out)]) == 0
    written = torch.load(out, weights_only=True)
    module = _LightningModule(timm.create_model(NAME, num_classes=10), "net")
    module.load_state_dict({k: v for k, v in written["state_dict"].items() if k.startswith("net.")}, strict=True)
    _same_function(module.net, second)
    assert not any(k.startswith("model.") for k in written["state_dict"])  # the other copy: old architecture
    assert "state_dict['model.']: removed" in capsys.readouterr().out


def test_two_containers_are_refused_and_checkpoint_key_chooses(tmp_path, capsys):
    first, second = _plain(0), _plain(7)
    path = tmp_path / "two.pt"
    torch.save({"model_state_dict": first.state_dict(), "state_dict": second.state_dict(), "epoch": 2}, path)
    out = tmp_path / "acb.pth"
    assert main(["expand", str(path), "--model", NAME, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint-key model_state_dict --prefix ''" in err and "--checkpoint-key state_dict --prefix ''" in err
    assert not out.exists()
    assert main(["expand", str(path), "--model", NAME, "--checkpoint-key", "state_dict", "-o", str(out)]) == 0
    expanded = acfx.expand(timm.create_model(NAME, num_classes=10))
    expanded.load_state_dict(torch.load(out, weights_only=True), strict=True)
    _same_function(expanded, second)
    same = tmp_path / "same.pt"  # one dict saved under two keys is one choice
    torch.save({"model_state_dict": first.state_dict(), "state_dict": first.state_dict()}, same)
    assert read_checkpoint(same, model=first).selection.chosen.key == "model_state_dict"


def test_a_checkpoint_of_another_model_names_the_closest_candidate(tmp_path, capsys):
    path, out = tmp_path / "last.ckpt", tmp_path / "out.pth"
    torch.save(_lightning(_expanded()), path)
    assert main(["collapse", str(path), "--model", "resnet18", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint from" in err and "state_dict['model.'] does not match ResNet" in err, err
    assert "missing keys" in err and "unexpected keys" in err
    assert not out.exists()
    assert main(["collapse", str(path), "--model", NAME, "--prefix", "module.", "-o", str(out)]) == 2
    assert "starts with --prefix 'module.'" in capsys.readouterr().err
    assert main(["collapse", str(path), "--model", NAME, "--use-ema", "-o", str(out)]) == 2
    assert "no EMA weights" in capsys.readouterr().err and not out.exists()


def test_help_states_the_new_options(capsys):
    for command in ("collapse", "expand"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--keep-container" in text and "--checkpoint-key KEY" in text and "--prefix PREFIX" in text
        assert "sharded checkpoint directory" in text and "Lightning" in text
