"""Checkpoints: every format train.py writes is read, and a mismatch loads nothing and says why."""
import pytest
import timm
import torch
from safetensors.torch import save_file

import acfx
from acfx.tools.checkpoint import CheckpointMismatch, load_state_dict_strict, read_state_dict, write_state_dict


def _resnet(name="resnet18", classes=10):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=classes)


def _frozen_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("layout", ["plain", "train_py", "train_py_ema", "ddp", "compiled", "safetensors"])
def test_reads_every_checkpoint_layout(tmp_path, layout):
    state = acfx.expand(_resnet()).state_dict()
    path = tmp_path / ("ckpt.safetensors" if layout == "safetensors" else "ckpt.pth")
    if layout == "plain":
        torch.save(state, path)
    elif layout.startswith("train_py"):
        ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
        torch.save({"epoch": 3, "arch": "resnet18", "state_dict": state, "state_dict_ema": ema,
                    "optimizer": {}, "version": 2}, path)
    elif layout == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif layout == "compiled":
        torch.save({f"_orig_mod.module.{k}": v for k, v in state.items()}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    read = read_state_dict(path, use_ema=layout == "train_py_ema")
    assert read.keys() == state.keys()
    offset = 1 if layout == "train_py_ema" else 0
    assert all(torch.equal(read[k], state[k] + offset if state[k].is_floating_point() else state[k]) for k in state)


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(_resnet().state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="may be truncated"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="no EMA weights"):
        torch.save(_resnet().state_dict(), path)
        read_state_dict(path, use_ema=True)


def test_wrong_architecture_loads_nothing_and_lists_keys():
    model = _resnet("resnet18")
    before = _frozen_copy(model)
    with pytest.raises(CheckpointMismatch, match=r"unexpected keys \(\d+\): layer1.2") as info:
        load_state_dict_strict(model, _resnet("resnet34").state_dict(), "resnet34.pth")
    assert "nothing was loaded" in str(info.value) and "from resnet34.pth" in str(info.value)
    assert _unchanged(model, before)  # torch's own strict load would have copied the matching tensors


def test_wrong_number_of_classes_names_the_shapes():
    model = _resnet(classes=10)
    with pytest.raises(CheckpointMismatch, match=r"fc.weight \(5, 512\) vs \(10, 512\)"):
        load_state_dict_strict(model, _resnet(classes=5).state_dict())


def test_wrong_expand_options_and_plain_expanded_mixups_are_explained():
    both = acfx.expand(_resnet())
    before = _frozen_copy(both)
    with pytest.raises(CheckpointMismatch, match="different options"):
        load_state_dict_strict(both, acfx.expand(_resnet(), branches="hor").state_dict())
    assert _unchanged(both, before)
    with pytest.raises(CheckpointMismatch, match="expand the model first"):
        load_state_dict_strict(_resnet(), both.state_dict())
    with pytest.raises(CheckpointMismatch, match="checkpoint is plain.*`acfx expand` it"):
        load_state_dict_strict(both, _resnet().state_dict())


def test_write_then_read_round_trip(tmp_path):
    state = _resnet().state_dict()
    for name in ("w.pth", "w.safetensors"):
        write_state_dict(state, tmp_path / name)
        read = read_state_dict(tmp_path / name)
        assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)


@pytest.mark.parametrize("assign", [False, True])
def test_expanded_on_the_meta_device_then_materialised_loads_its_checkpoint(assign):
    # Large models are built on the meta device; to_empty leaves uninitialised memory, which must not
    # become the recorded layout (a checkpoint of the same options would then be refused).
    import torch.nn as nn
    make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))  # noqa: E731
    state = acfx.expand(make(), placement="border").state_dict()
    with torch.device("meta"):
        expanded = acfx.expand(make(), placement="border")
    if not assign:
        expanded.to_empty(device="cpu")
    expanded.load_state_dict(state, assign=assign)
    assert torch.equal(expanded[0].layout, state["0.layout"])
    assert torch.equal(expanded.state_dict()["0.layout"], state["0.layout"])


@pytest.mark.parametrize("case", ["path", "list value", "model is a dict", "not a mapping"])
def test_load_state_dict_strict_names_a_wrong_argument(case, tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    state = model.state_dict()
    path = tmp_path / "plain.pth"
    torch.save(state, path)
    args, match = {
        "path": ((model, str(path)), "is a path .* not a state_dict: read it first"),
        "list value": ((model, {**state, "0.weight": [1.0]}), r"must be a tensor.*0\.weight \(list\)"),
        "model is a dict": ((state, state), "model must be a torch.nn.Module, got OrderedDict"),
        "not a mapping": ((model, list(state.values())), "must be a mapping .* got list"),
    }[case]
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(TypeError, match=match):
        load_state_dict_strict(*args)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
