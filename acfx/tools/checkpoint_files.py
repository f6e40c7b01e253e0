"""What a checkpoint file or directory holds, read once and without running code from it.

A .pth/.pt/.bin/.ckpt file is read with ``torch.load(weights_only=True)`` (timm train.py's argparse.Namespace
allowed), a .safetensors file (or one in safetensors' layout whatever its name) with safetensors, a Hugging
Face / accelerate directory as its index and shards merged into one dict. The result is one
:class:`Container` record: the data, what wrote it (for messages), and what is needed to write it again
(safetensors metadata, the :class:`ShardSet`). Finding the model's weights in it is
:mod:`acfx.tools.state_location`'s job.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

__all__ = ["Container", "ShardSet", "read_container", "is_lightning", "INDEX_FILES", "SINGLE_FILES",
           "SHARD_NAME"]

# A checkpoint directory, in the order Hugging Face's from_pretrained looks for its files.
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
# A shard's file name (model-00001-of-00004.safetensors), as save_pretrained writes it.
SHARD_NAME = re.compile(r"^.+-\d+-of-\d+\.(safetensors|bin)$")


@dataclasses.dataclass
class ShardSet:
    """How a checkpoint directory (Hugging Face ``save_pretrained``, accelerate) stores its tensors."""

    directory: str
    # The index file's name (model.safetensors.index.json, ...); None for a directory holding one weights file.
    index_name: Optional[str]
    # The weights files (shards), in the order the index first names them.
    files: List[str]
    # "safetensors" or "torch" (.bin files, read with weights_only=True).
    fmt: str
    # The index's "metadata" (total_size, ...), written again with the new total size.
    index_metadata: Dict[str, object] = dataclasses.field(default_factory=dict)
    # The safetensors header metadata of the first shard ({"format": "pt"}), written again.
    file_metadata: Optional[Dict[str, str]] = None


@dataclasses.dataclass
class Container:
    """What one checkpoint file or directory holds, read once: the weights and everything around them."""

    path: str
    # What torch.load (weights_only=True) or safetensors returned; a directory's shards merged into one dict.
    data: Mapping
    # "torch" (a pickle), "safetensors" (one file) or "directory" (shards with an index, or one weights file).
    fmt: str
    # What wrote it, for messages: "Lightning checkpoint", "timm train.py checkpoint", ...
    layout: str
    # safetensors header metadata of a single file, written again by --keep-container.
    metadata: Optional[Dict[str, str]] = None
    shards: Optional[ShardSet] = None
    # timm train.py's 'arch' (the model name it trained), when recorded.
    arch: Optional[str] = None
    # Model builder arguments train.py records that change what the weights mean (bn_eps, ...).
    model_kwargs: Dict[str, object] = dataclasses.field(default_factory=dict)


def _load_weights_only(path: Path):
    # timm's train.py saves its argparse.Namespace next to the weights: allow that one class.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors' layout whatever the file's name: an 8-byte header length, then a JSON header."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors" or _looks_like_safetensors(path)


def _safetensors_metadata(path: Path) -> Optional[Dict[str, str]]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def _read_file(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file
            return load_file(str(path))
        return _load_weights_only(path)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
            raise ValueError(f"refused to read checkpoint {str(path)!r}: it holds Python objects that are not "
                             f"weights ({first}); acfx reads checkpoints with weights_only=True and never runs "
                             "code from them. Re-save it as a state_dict (or .safetensors) from a trusted "
                             "environment") from error
        raise ValueError(f"could not read checkpoint {str(path)!r} ({type(error).__name__}: {first}); the file "
                         "may be truncated, or not a PyTorch or safetensors checkpoint") from error


def _index_files(index_path: Path) -> Tuple[Dict[str, str], Dict[str, object]]:
    """An index's weight_map (key -> shard file name) and metadata, checked to name files in its directory."""
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"could not read the index {str(index_path)!r} of a sharded checkpoint ({error})") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{str(index_path)!r} has no 'weight_map' of key -> shard file name; it is not the index "
                         "of a sharded checkpoint")
    strays = sorted({f for f in weight_map.values() if Path(f).name != f or f in ("", ".", "..")})
    if strays:
        raise ValueError(f"{str(index_path)!r} names shards outside its directory ({strays[0]!r}); refused")
    metadata = index.get("metadata")
    return weight_map, dict(metadata) if isinstance(metadata, dict) else {}


def _directory_files(path: Path) -> ShardSet:
    """Which files of a checkpoint directory hold the weights."""
    index_name = next((name for name in INDEX_FILES if (path / name).is_file()), None)
    if index_name is not None:
        weight_map, metadata = _index_files(path / index_name)
        files = list(dict.fromkeys(weight_map.values()))
    else:
        single = next((name for name in SINGLE_FILES if (path / name).is_file()), None)
        if single is None:
            raise ValueError(f"checkpoint {str(path)!r} is a directory without a sharded checkpoint's index "
                             f"({' or '.join(INDEX_FILES)}) or a {' / '.join(SINGLE_FILES)}; give the "
                             "checkpoint file in it")
        files, metadata = [single], {}
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise ValueError(f"sharded checkpoint {str(path)!r} lacks {len(missing)} of the {len(files)} shards its "
                         f"index names ({missing[0]}, ...); copy the whole directory")
    fmt = "safetensors" if _is_safetensors(path / files[0]) else "torch"
    file_metadata = _safetensors_metadata(path / files[0]) if fmt == "safetensors" else None
    return ShardSet(str(path), index_name, files, fmt, metadata, file_metadata)


def _read_directory(path: Path) -> Tuple[Dict[str, object], ShardSet]:
    shards = _directory_files(path)
    merged: Dict[str, object] = {}
    for name in shards.files:
        part = _read_file(path / name)
        if not isinstance(part, Mapping):
            raise ValueError(f"shard {str(path / name)!r} holds a {type(part).__name__}, not a state_dict")
        merged.update(part)
    if shards.index_name is not None:
        weight_map, _ = _index_files(path / shards.index_name)
        absent = [key for key in weight_map if key not in merged]
        if absent:
            raise ValueError(f"sharded checkpoint {str(path)!r}: its index names {len(absent)} keys no shard holds "
                             f"({absent[0]!r} in {weight_map[absent[0]]}, ...); the directory is incomplete")
    return merged, shards


def _recorded_kwargs(data: Mapping) -> Dict[str, object]:
    args = data.get("args")
    if not isinstance(args, argparse.Namespace):
        return {}
    kwargs = dict(getattr(args, "model_kwargs", None) or {})
    for name, keyword in (("bn_eps", "bn_eps"), ("bn_momentum", "bn_momentum"), ("in_chans", "in_chans"),
                          ("gp", "global_pool")):
        if getattr(args, name, None) is not None:
            kwargs[keyword] = getattr(args, name)
    return kwargs


def is_lightning(data: Mapping) -> bool:
    """A PyTorch Lightning checkpoint (its loader, not the layout name, decides where weights are written)."""
    return "pytorch-lightning_version" in data


def _layout_name(data: Mapping, fmt: str, shards: Optional[ShardSet]) -> str:
    """What wrote a checkpoint, from its top-level keys (for messages only: nothing is chosen by it)."""
    if shards is not None:
        count = len(shards.files)
        return f"sharded checkpoint, {count} shard{'s' if count > 1 else ''}" if shards.index_name else \
            f"checkpoint directory ({shards.files[0]})"
    if fmt == "safetensors":
        return "safetensors file"
    if is_lightning(data):
        return "Lightning checkpoint"
    if "state_dict" in data and ("arch" in data or "args" in data):
        return "timm train.py checkpoint"
    if "model_state_dict" in data:
        return "general checkpoint, PyTorch tutorial layout"
    if isinstance(data.get("model"), Mapping) and ("epoch" in data or "args" in data or "optimizer" in data):
        return "torchvision reference-script checkpoint"
    if data and all(isinstance(value, torch.Tensor) for value in data.values()):
        return "state_dict"
    return "checkpoint dict"


def read_container(path: Union[str, os.PathLike]) -> Container:
    """Read a checkpoint file (.pth/.pt/.bin/.ckpt with ``weights_only=True``, or .safetensors) or a checkpoint
    directory (a sharded checkpoint's index and shards, or a directory holding model.safetensors /
    pytorch_model.bin) once, whatever it holds; :func:`acfx.tools.checkpoint.read_checkpoint` then finds the
    model's weights in it."""
    path = Path(path)
    metadata, shards = None, None
    if path.is_dir():
        data, shards = _read_directory(path)
        fmt = "directory"
    else:
        data = _read_file(path)
        fmt = "safetensors" if _is_safetensors(path) else "torch"
        metadata = _safetensors_metadata(path) if fmt == "safetensors" else None
    if not isinstance(data, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(data).__name__}, not a state_dict")
    arch = data.get("arch") if isinstance(data.get("arch"), str) else None
    return Container(str(path), data, fmt, _layout_name(data, fmt, shards), metadata, shards, arch,
                     _recorded_kwargs(data))
