"""Reading, checking and writing checkpoints, all or nothing.

``torch.nn.Module.load_state_dict(strict=True)`` copies every matching tensor before it raises on the
keys that do not match, so a wrong checkpoint leaves a model half-loaded. Here keys, shapes and the block
layouts an expanded model records are compared first, and the model is only written to when everything
matches. A checkpoint is read once, into one :class:`Container` record (what the file holds) and one
:class:`Checkpoint` record (the model's state_dict in it, and where it was found).

Training frameworks wrap the weights in dicts of their own: timm's train.py (``state_dict``,
``state_dict_ema``), torchvision's reference scripts (``model``, ``model_ema``), PyTorch Lightning
(``state_dict`` with the LightningModule's attribute as a key prefix, ``model.``), PyTorch's tutorial
(``model_state_dict``), Hugging Face / accelerate directories (``model.safetensors``, shards with an index),
with DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes on top. Rather than a list of container
names, every mapping of tensors in the file and every key prefix are tried against the keys the model has
(or an expansion of it can have); :func:`locate_state` picks the one that matches, and refuses, listing them,
when several match equally.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pickle
import re
import shlex
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import (
    Callable,
    Dict,
    FrozenSet,
    Iterator,
    List,
    Mapping,
    Optional,
    Set,
    Tuple,
    Union,
)

import torch
import torch.nn as nn

from ..layers.recorded_layout import LAYOUT_KEY, RecordedLayout

__all__ = ["Checkpoint", "Container", "ShardSet", "ModelKeys", "StateLocation", "Selection", "Dropped",
           "ContainerPlan", "read_container", "locate_state", "read_checkpoint", "read_state_dict",
           "checkpoint_info", "load_state_dict_strict", "write_state_dict", "plan_container", "write_container",
           "check_container_output", "CheckpointMismatch", "LAYOUT_KEY"]

_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_ACB_MARKERS = (".square.weight", ".hor.weight", ".ver.weight")
_ONLINE_MARKERS = (".square_scale",)
# Keys that only an expanded site has, one per site: exact mode, online mode, and both (newer checkpoints).
_SITE_MARKERS = (".square.weight", ".square_scale", ".layout")
# Words in a key path or prefix that mark an averaged copy of the weights (timm's state_dict_ema,
# torchvision's model_ema, an ``ema_model.`` attribute of a LightningModule, SWA's average_model_state).
_AVERAGED_WORDS = frozenset({"ema", "swa", "average", "averaged"})
# A checkpoint directory, in the order Hugging Face's from_pretrained looks for its files.
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_SHARD_NAME = re.compile(r"^.+-\d+-of-\d+\.(safetensors|bin)$")

KeyPath = Tuple[Union[str, int], ...]


def expanded_sites(state: Mapping[str, object]) -> Set[str]:
    """The names of the convs a checkpoint holds expanded (ACBlock or OnlineACConv), from its keys."""
    return {key[:-len(marker)] for key in state for marker in _SITE_MARKERS if key.endswith(marker)}


def expanded_mode(state: Mapping[str, object]) -> Optional[str]:
    """"online" or "exact" when a checkpoint's keys show how it was expanded; None for a plain one."""
    if any(key.endswith(_ONLINE_MARKERS) for key in state):
        return "online"
    return "exact" if any(key.endswith(_ACB_MARKERS) for key in state) else None


class CheckpointMismatch(ValueError):
    """The checkpoint's keys, shapes or recorded block layouts do not match the model; nothing was loaded."""


# -- reading files ---------------------------------------------------------------------------------------------
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
    index_name = next((name for name in _INDEX_FILES if (path / name).is_file()), None)
    if index_name is not None:
        weight_map, metadata = _index_files(path / index_name)
        files = list(dict.fromkeys(weight_map.values()))
    else:
        single = next((name for name in _SINGLE_FILES if (path / name).is_file()), None)
        if single is None:
            raise ValueError(f"checkpoint {str(path)!r} is a directory without a sharded checkpoint's index "
                             f"({' or '.join(_INDEX_FILES)}) or a {' / '.join(_SINGLE_FILES)}; give the "
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


def _is_lightning(data: Mapping) -> bool:
    return "pytorch-lightning_version" in data


def _layout_name(data: Mapping, fmt: str, shards: Optional[ShardSet]) -> str:
    """What wrote a checkpoint, from its top-level keys (for messages only: nothing is chosen by it)."""
    if shards is not None:
        count = len(shards.files)
        return f"sharded checkpoint, {count} shard{'s' if count > 1 else ''}" if shards.index_name else \
            f"checkpoint directory ({shards.files[0]})"
    if fmt == "safetensors":
        return "safetensors file"
    if _is_lightning(data):
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
    pytorch_model.bin) once, whatever it holds; :func:`read_checkpoint` then finds the model's weights in it."""
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


# -- finding the model's tensors in it --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelKeys:
    """The state_dict keys a model has, and where an expanded copy of it holds others."""

    # The model's own state_dict keys.
    keys: FrozenSet[str]
    # Module names of its convs: an expanded conv holds its tensors under its name (square.weight, hor_bn.*,
    # square_scale, layout, ...), and the BN after it may be gone.
    convs: FrozenSet[str]

    @classmethod
    def of(cls, model: nn.Module) -> "ModelKeys":
        convs = frozenset(name for name, module in model.named_modules() if name and isinstance(module, nn.Conv2d))
        return cls(frozenset(model.state_dict()), convs)

    def explains(self, key: str) -> bool:
        """The model has ``key``, or an expansion of it can have it (a key under one of its convs)."""
        if key in self.keys:
            return True
        parts = key.split(".")
        return any(".".join(parts[:end]) in self.convs for end in range(1, len(parts)))


@dataclasses.dataclass(frozen=True)
class StateLocation:
    """One place in a checkpoint that holds a model's tensors: a mapping at a key path, and a key prefix."""

    # Keys from the file's top level down to the mapping (() for a plain state_dict).
    path: KeyPath
    # What the model's keys start with there ("model." in a Lightning checkpoint, "module." after DDP, "").
    prefix: str
    # Tensors whose key starts with the prefix.
    tensors: int
    # Of them, those whose key, the prefix stripped, the model has or an expansion of it can have.
    matched: int
    # An averaged copy of the weights (EMA, SWA): chosen only with use_ema.
    averaged: bool = False

    @property
    def key(self) -> str:
        """The key path as --checkpoint-key takes it: keys joined by '/' ('' for the top level)."""
        return "/".join(str(part) for part in self.path)

    @property
    def label(self) -> str:
        """``state_dict['model.']``: the key path, and the prefix in brackets (none when empty)."""
        return (self.key or "<top level>") + (f"[{self.prefix!r}]" if self.prefix else "")

    @property
    def options(self) -> str:
        """The command-line options that choose this location."""
        return f"--checkpoint-key {shlex.quote(self.key)} --prefix {shlex.quote(self.prefix)}"

    def describe(self) -> str:
        unmatched = self.tensors - self.matched
        return (f"{self.label}: {self.tensors} tensors" + (", averaged (EMA)" if self.averaged else "")
                + (f", {unmatched} with keys the model does not have" if unmatched else ""))


@dataclasses.dataclass
class Selection:
    """Where :func:`locate_state` found the model's weights."""

    chosen: StateLocation
    # Other places holding a whole copy of the model's weights (an EMA, the raw weights when the EMA was
    # chosen): of the old architecture after a conversion, so --keep-container drops them.
    others: List[StateLocation]
    # False when nothing matched the model throughout and ``chosen`` is the closest (the strict load then
    # says what differs).
    full: bool


def _containers(data: object, path: KeyPath = (), seen: Optional[Set[int]] = None) -> Iterator[Tuple[KeyPath, Mapping]]:
    """Every mapping in a checkpoint (dicts in dicts and lists, any depth) with its key path, each once."""
    seen = set() if seen is None else seen
    if id(data) in seen:
        return
    seen.add(id(data))
    if isinstance(data, Mapping):
        yield path, data
        children = data.items()
    elif isinstance(data, (list, tuple)):
        children = enumerate(data)
    else:
        return
    for key, value in children:
        if isinstance(value, (Mapping, list, tuple)):
            yield from _containers(value, path + (key,), seen)


def _tensor_keys(mapping: Mapping) -> List[str]:
    return [key for key, value in mapping.items() if isinstance(key, str) and isinstance(value, torch.Tensor)]


def _key_prefixes(key: str) -> Iterator[str]:
    """'' and every dotted head of ``key``: 'model.', 'model._orig_mod.', ..."""
    yield ""
    for index, char in enumerate(key):
        if char == ".":
            yield key[:index + 1]


def _wrapper_prefix(keys: List[str]) -> str:
    """The chain of DDP / torch.compile prefixes all ``keys`` start with (for a reading without a model)."""
    prefix = ""
    while True:
        step = next((p for p in _PREFIXES if all(k.startswith(prefix + p) for k in keys)), None)
        if step is None:
            return prefix
        prefix += step


def _averaged(path: KeyPath, prefix: str, root: Mapping) -> bool:
    words = set()
    for part in [*path, prefix]:
        if isinstance(part, str):
            words.update(re.split(r"[^0-9a-z]+", part.lower()))
    lightning_average = path == ("state_dict",) and "current_model_state" in root and "averaging_state" in root
    return bool(words & _AVERAGED_WORDS) or lightning_average  # Lightning's WeightAveraging: state_dict is it


def _locations_in(path: KeyPath, mapping: Mapping, space: Optional[ModelKeys], root: Mapping,
                  prefix: Optional[str]) -> List[StateLocation]:
    """The (prefix, match) candidates of one mapping: every prefix at which some key is the model's, or the
    one ``prefix`` given; without a model, its DDP / compile prefix."""
    keys = _tensor_keys(mapping)
    if not keys:
        return []
    if space is None:
        chosen = _wrapper_prefix(keys) if prefix is None else prefix
        under = sum(key.startswith(chosen) for key in keys)
        return [StateLocation(path, chosen, under, under, _averaged(path, chosen, root))] if under else []
    matched: Dict[str, int] = collections.Counter()
    for key in keys:
        for head in _key_prefixes(key):
            if space.explains(key[len(head):]):
                matched[head] += 1
    found = []
    for head in (list(matched) if prefix is None else [prefix]):
        under = sum(key.startswith(head) for key in keys)
        if under:
            found.append(StateLocation(path, head, under, matched.get(head, 0), _averaged(path, head, root)))
    return found


def _full(location: StateLocation, space: Optional[ModelKeys]) -> bool:
    """Every tensor there is the model's, and they are most of a model (not a stray part of one)."""
    if space is None:
        return True
    return location.matched == location.tensors and 2 * location.matched >= len(space.keys)


def _state_at(data: Mapping, location: StateLocation) -> Dict[str, torch.Tensor]:
    mapping = _get(data, location.path)
    cut = len(location.prefix)
    return {key[cut:]: mapping[key] for key in _tensor_keys(mapping) if key.startswith(location.prefix)}


def _get(data, path: KeyPath):
    for part in path:
        data = data[part]
    return data


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def _same_weights(data: Mapping, first: StateLocation, second: StateLocation) -> bool:
    a, b = _state_at(data, first), _state_at(data, second)
    return a.keys() == b.keys() and all(_equal(a[key], b[key]) for key in a)


def _listing_of(locations: List[StateLocation], limit: int = 8) -> str:
    ranked = sorted(locations, key=lambda location: (-location.matched, -location.tensors))
    lines = [f"\n  {location.options}   ({location.describe()})" for location in ranked[:limit]]
    more = f"\n  ... ({len(locations) - limit} more)" if len(locations) > limit else ""
    return "".join(lines) + more


def _by_key(found: List[StateLocation], key: str, container: Container) -> List[StateLocation]:
    wanted = key.strip("/")
    kept = [location for location in found if location.key == wanted]
    if not kept:
        keys = sorted({location.key or "''" for location in found})
        raise ValueError(f"checkpoint {container.path!r} has no mapping of the model's tensors at --checkpoint-key "
                         f"{key!r}; the key paths it has ('/' between keys, '' for the top level): {keys[:12]}")
    return kept


def _averaged_only(pool: List[StateLocation], use_ema: bool, container: Container) -> List[StateLocation]:
    """The non-EMA candidates, or with ``use_ema`` the EMA ones."""
    kept = [location for location in pool if location.averaged == use_ema]
    if kept:
        return kept
    if use_ema:
        raise ValueError(f"checkpoint {container.path!r} ({container.layout}) has no EMA weights: no copy of the "
                         "model under a key or prefix naming an EMA or average (state_dict_ema, model_ema, "
                         "ema_model., Lightning's weight averaging); found:" + _listing_of(pool)
                         + "\nDrop --use-ema, or choose a copy with --checkpoint-key and --prefix.")
    raise ValueError(f"checkpoint {container.path!r} holds only averaged (EMA) weights:" + _listing_of(pool)
                     + "\nPass --use-ema (use_ema=True) to convert them.")


def _best(pool: List[StateLocation], container: Container, full: bool) -> StateLocation:
    top = max((location.matched, location.matched - location.tensors) for location in pool)
    ties = [location for location in pool if (location.matched, location.matched - location.tensors) == top]
    distinct: List[StateLocation] = []
    for location in ties:  # the same weights twice (one dict saved under two keys) are one choice
        if not any(_same_weights(container.data, location, kept) for kept in distinct):
            distinct.append(location)
    if len(distinct) > 1:
        how = "match the model equally" if full else "come equally close to the model (none matches it throughout)"
        raise ValueError(f"checkpoint {container.path!r} ({container.layout}) holds {len(distinct)} sets of "
                         f"tensors that {how}; nothing was converted. Choose one with --checkpoint-key and "
                         "--prefix (checkpoint_key= and prefix= in Python):" + _listing_of(distinct))
    return distinct[0]


def _nothing_found(container: Container, space: Optional[ModelKeys], prefix: Optional[str],
                   found: List[StateLocation]) -> ValueError:
    holders = [(path, _tensor_keys(mapping)) for path, mapping in _containers(container.data)]
    holders = [(path, keys) for path, keys in holders if keys]
    if not holders:
        keys = sorted(map(str, container.data))[:8]
        return ValueError(f"checkpoint {container.path!r} holds no tensors (keys: {keys})")
    if found:
        return ValueError(f"no tensor of checkpoint {container.path!r} under --prefix {prefix!r} has a key of the "
                          "model; under that prefix it holds:" + _listing_of(found)
                          + "\nLeave --prefix out to find the prefix that matches, or check --model.")
    if prefix is not None:
        heads = sorted({key.split(".")[0] + "." for _, keys in holders for key in keys})
        return ValueError(f"no tensor key of checkpoint {container.path!r} starts with --prefix {prefix!r}; its keys "
                          f"start with: {heads[:12]}")
    where = "; ".join(f"{'/'.join(map(str, path)) or '<top level>'}: {len(keys)} tensors ({', '.join(keys[:3])}, ...)"
                      for path, keys in holders[:4])
    model = sorted(space.keys)[:3] if space is not None else []
    return ValueError(f"checkpoint {container.path!r} ({container.layout}) holds no tensor with a key of the model "
                      f"(whose keys are like {', '.join(model)}, ...), under any prefix. It holds {where}. "
                      "Is it a checkpoint of this architecture (--model)?")


def _copies(every: List[StateLocation], chosen: StateLocation, space: Optional[ModelKeys],
            data: Mapping) -> List[StateLocation]:
    """The other whole copies of the model's weights: matching the model, or without one, with the same keys."""
    others = [location for location in every if (location.path, location.prefix) != (chosen.path, chosen.prefix)]
    if space is not None:
        return [location for location in others if _full(location, space)]
    keys = _state_at(data, chosen).keys()
    return [location for location in others if _state_at(data, location).keys() == keys]


def _all_locations(container: Container, space: Optional[ModelKeys], prefix: Optional[str]) -> List[StateLocation]:
    return [location for path, mapping in _containers(container.data)
            for location in _locations_in(path, mapping, space, container.data, prefix)]


def locate_state(container: Container, model: Union[nn.Module, ModelKeys, None] = None, use_ema: bool = False,
                 checkpoint_key: Optional[str] = None, prefix: Optional[str] = None) -> Selection:
    """Find the model's state_dict in a checkpoint by the keys the model expects.

    Every mapping of tensors in the file (any key path) and every prefix that, stripped, makes its keys the
    model's are candidates; one matches when all its keys are keys the model has or an expansion of it can
    have (so a plain and an expanded checkpoint are both found with the plain model), and there are at least
    half as many as the model has. The match with the most tensors is chosen, non-EMA ones unless ``use_ema``;
    candidates that tie (two prefixes, two containers) are refused, listed, unless ``checkpoint_key`` (the
    key path, keys joined by '/', '' for the top level; it also chooses between EMA and non-EMA) or
    ``prefix`` choose. When nothing matches, the closest candidate is chosen (``full=False``), for the strict
    load to say what differs. Without a model, the mapping with the most tensors and its DDP / compile
    prefix are taken.

    Example: a Lightning checkpoint ``{"state_dict": {"model.conv1.weight": ..., ...}, "epoch": 3, ...}`` of a
    LightningModule holding the network as ``self.model`` gives ``chosen.label == "state_dict['model.']"``.
    """
    space = ModelKeys.of(model) if isinstance(model, nn.Module) else model
    if prefix and not prefix.endswith("."):
        prefix += "."
    every = _all_locations(container, space, None)
    found = every if prefix is None else _all_locations(container, space, prefix)
    if checkpoint_key is not None:
        found = _by_key(found, checkpoint_key, container)
    if not any(location.matched for location in found):
        raise _nothing_found(container, space, prefix, found)
    full = [location for location in found if _full(location, space)]
    pool = full or found
    if checkpoint_key is None:
        pool = _averaged_only(pool, use_ema, container)
    chosen = _best(pool, container, bool(full))
    return Selection(chosen, _copies(every, chosen, space, container.data), chosen in full)


@dataclasses.dataclass
class Checkpoint:
    """What one checkpoint holds for the model, read once."""

    path: str
    # The model's state_dict, found by its keys (or the largest one, without a model), prefix stripped.
    state: Dict[str, torch.Tensor]
    # timm train.py's 'arch' (the model name it trained), when recorded.
    arch: Optional[str] = None
    # Model builder arguments train.py records that change what the weights mean (bn_eps, ...).
    model_kwargs: Dict[str, object] = dataclasses.field(default_factory=dict)
    # Where in the file ``state`` was found; None for a record made by hand.
    selection: Optional[Selection] = None
    # Everything the file holds, for writing the converted weights back into it (--keep-container).
    container: Optional[Container] = None

    @property
    def source(self) -> str:
        """The file, and where in it the weights were, for messages: ``run.ckpt, state_dict['model.']``."""
        if self.selection is None or not self.selection.chosen.path and not self.selection.chosen.prefix:
            return self.path
        return f"{self.path}, {self.selection.chosen.label}"

    def describe(self) -> str:
        """``state_dict['model.'] (Lightning checkpoint, 122 tensors)``: what was read."""
        if self.selection is None:
            return f"{self.path} ({len(self.state)} tensors)"
        chosen = self.selection.chosen
        layout = f"{self.container.layout}, " if self.container is not None else ""
        closest = "" if self.selection.full else f"; the closest match: {chosen.matched} of them are the model's"
        ema = ", averaged (EMA)" if chosen.averaged else ""
        return f"{chosen.label} ({layout}{chosen.tensors} tensors{ema}{closest})"


def read_checkpoint(path: Union[str, os.PathLike, Container], use_ema: bool = False, *,
                    model: Union[nn.Module, ModelKeys, None] = None, checkpoint_key: Optional[str] = None,
                    prefix: Optional[str] = None) -> Checkpoint:
    """Read a checkpoint file or directory (see :func:`read_container`; or take one read) and find the
    model's state_dict in it (see :func:`locate_state`).

    With ``model`` (the plain model, or an expanded one), the weights are found by its keys in any layout:
    a plain state_dict, timm train.py's ``state_dict`` / ``state_dict_ema``, torchvision's ``model`` /
    ``model_ema``, Lightning's ``state_dict`` with its ``model.`` prefix (and ``current_model_state`` under its
    weight averaging), the tutorial's ``model_state_dict``, Hugging Face shards, with ``module.`` /
    ``_orig_mod.`` prefixes at any depth. Without one, the largest mapping of tensors is taken and its DDP /
    compile prefix stripped.
    """
    container = path if isinstance(path, Container) else read_container(path)
    selection = locate_state(container, model, use_ema, checkpoint_key, prefix)
    state = _state_at(container.data, selection.chosen)
    return Checkpoint(container.path, state, container.arch, container.model_kwargs, selection, container)


def read_state_dict(path: Union[str, os.PathLike], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state_dict of a checkpoint file (see :func:`read_checkpoint`)."""
    return read_checkpoint(path, use_ema).state


def checkpoint_info(path: Union[str, os.PathLike]) -> Dict[str, object]:
    """What a timm train.py checkpoint records besides weights: {'arch': ..., 'model_kwargs': {...}}.

    Raises what :func:`read_container` raises (a file that cannot be read is not a checkpoint without info).
    """
    container = read_container(path)
    info: Dict[str, object] = {"model_kwargs": container.model_kwargs}
    if container.arch:
        info["arch"] = container.arch
    return info


def _layout_owners(model: nn.Module) -> Dict[str, RecordedLayout]:
    """state_dict key of each recorded block layout -> the block."""
    return {f"{name}.{LAYOUT_KEY}" if name else LAYOUT_KEY: module for name, module in model.named_modules()
            if isinstance(module, RecordedLayout)}


def _layout_problems(owners: Dict[str, RecordedLayout], state: Mapping[str, torch.Tensor]) -> List[str]:
    problems = []
    for key, block in owners.items():
        saved = state.get(key)
        if saved is None or tuple(saved.shape) != tuple(block.layout.shape):
            continue  # absent: written before layouts were recorded; a shape mismatch is listed with the others
        problem = block.layout_problem(saved)
        if problem:
            problems.append(f"{key[:-len(LAYOUT_KEY) - 1] or '<model>'}: {problem}")
    return problems


def _only_classifier(shapes: List[str], model: nn.Module) -> bool:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    names = [n for n, m in model.named_modules() if m is head] if isinstance(head, nn.Module) else []
    return bool(shapes and names) and all(s.split(" ")[0].startswith(names[0] + ".") for s in shapes)


def _whole_modules(keys: List[str], all_keys) -> bool:
    """Every module the ``keys`` belong to has all its keys among them (whole modules, not damaged ones)."""
    owners = {k.rsplit(".", 1)[0] for k in keys}
    return all(k in set(keys) for k in all_keys if k.rsplit(".", 1)[0] in owners)


def _hint(model: nn.Module, model_keys, checkpoint_keys, missing, unexpected, shapes) -> str:
    model_mode = expanded_mode(dict.fromkeys(model_keys))
    checkpoint_mode = expanded_mode(dict.fromkeys(checkpoint_keys))
    if checkpoint_mode and not model_mode:
        return (f" The checkpoint is of an expanded (ACNet, mode='{checkpoint_mode}') model and the model is plain: "
                "expand the model first (acfx.expand with the options used for training), or convert the "
                "checkpoint with `acfx collapse`.")
    if model_mode and not checkpoint_mode:
        return (" The checkpoint is plain (not expanded: there is nothing to collapse) and the model is expanded: "
                "load it into the plain model (and expand that with init='preserve', or `acfx expand` it).")
    if model_mode and checkpoint_mode and model_mode != checkpoint_mode:
        return (f" The checkpoint was expanded with mode='{checkpoint_mode}', the model with mode='{model_mode}': "
                f"expand with mode='{checkpoint_mode}' (--mode {checkpoint_mode}).")
    if _only_classifier(shapes, model) and not missing and not unexpected:
        return (" Only the classifier differs: the checkpoint has another number of classes (pass "
                "--num-classes / num_classes= to match it).")
    if not _whole_modules(missing, model_keys) or not _whole_modules(unexpected, checkpoint_keys):
        return (" Some modules lack only part of their tensors: the checkpoint is incomplete or was edited; "
                "use the file training wrote.")
    if model_mode and checkpoint_mode and not shapes:
        return (" Both are expanded, with different options (branches, norm, include_unnormed) or different "
                "sites (a conv frozen or excluded in training): expand with the options the checkpoint was "
                "trained with.")
    return " Is it a checkpoint of this architecture (and num_classes)?"


def _listing(title: str, keys: List[str], limit: int = 12) -> str:
    if not keys:
        return ""
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f" {title} ({len(keys)}): {', '.join(keys[:limit])}{more}."


def _uncopyable(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> List[str]:
    """Entries load_state_dict would fail on halfway through, having copied the ones before them."""
    found = []
    for key, value in state.items():
        if key not in expected:
            continue
        if not isinstance(value, torch.Tensor):
            found.append(f"{key}: a {type(value).__name__}, not a tensor")
        elif value.layout != torch.strided:
            found.append(f"{key}: {value.layout} layout, not a dense tensor")
        elif value.device.type == "meta":
            found.append(f"{key}: on the meta device, it holds no values")
        elif value.is_complex() and not expected[key].is_complex():
            found.append(f"{key}: complex values for a real tensor")
    return found


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: Optional[str] = None) -> None:
    """Load ``state`` into ``model`` if every key, shape and recorded block layout matches; else raise
    :class:`CheckpointMismatch` and load nothing. Checkpoints written before block layouts were recorded
    (no ``layout`` keys) load as they did."""
    expected = model.state_dict()
    owners = _layout_owners(model)
    optional = {k for k in owners if k not in state}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                    if k in state and tuple(state[k].shape) != tuple(v.shape))
    where = f" from {source}" if source else ""
    if missing or unexpected or shapes:
        raise CheckpointMismatch(
            f"checkpoint{where} does not match {type(model).__name__}; nothing was loaded."
            + _listing("missing keys", missing) + _listing("unexpected keys", unexpected)
            + _listing("shape mismatches (checkpoint vs model)", shapes)
            + _hint(model, expected, state, missing, unexpected, shapes))
    unusable = _uncopyable(state, expected)
    if unusable:
        raise CheckpointMismatch(
            f"checkpoint{where} holds tensors that cannot be copied into {type(model).__name__}'s weights; nothing "
            "was loaded." + _listing("tensors (what is wrong)", unusable))
    problems = _layout_problems(owners, state)
    if problems:
        raise CheckpointMismatch(
            f"checkpoint{where} was trained with other expand options than {type(model).__name__} was expanded "
            f"with; nothing was loaded. Its blocks add their kernels up differently: {problems[0]}"
            + (f" (and {len(problems) - 1} more blocks)" if len(problems) > 1 else ""))
    model.load_state_dict(state, strict=True)


def _write_atomically(path: Path, save: Callable[[str], None]) -> None:
    """``save(tmp)`` to a temporary file beside ``path``, then moved into place: a failed write (a full disk)
    leaves no partial file and an existing file as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None):
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, path, metadata=metadata)


def write_state_dict(state: Mapping[str, torch.Tensor], path: Union[str, os.PathLike]) -> None:
    """Write a plain state_dict: safetensors for a .safetensors path, torch.save otherwise.

    Written to a temporary file beside ``path`` and moved into place, so that a failed write (a full disk)
    leaves no partial file and an existing file as it was.
    """
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix == ".safetensors":
        _write_atomically(path, lambda tmp: _save_safetensors(tensors, tmp))
    else:
        _write_atomically(path, lambda tmp: torch.save(tensors, tmp))


# -- writing the converted weights back into the container (--keep-container) -----------------------------------
_OPTIMIZER = "optimizer state of the old parameters, indexed by their order: wrong for the converted model"
_SCHEDULER = "learning-rate scheduler state, tied to the old optimizer's parameter groups"
_OTHER_COPY = "a copy of the weights of the old architecture; only {} was converted"


@dataclasses.dataclass
class Dropped:
    """An entry of the input's container that --keep-container does not carry over as it was."""

    # Where it was: a key path (optimizer_states, state_dict_ema, state_dict['ema.']) or a directory's file.
    where: str
    # Why it would be wrong for the converted model.
    reason: str
    # What stands in its place: "removed", or an empty value ("[]", "None") where a loader reads the key back.
    replacement: str = "removed"


@dataclasses.dataclass
class ContainerPlan:
    """The input's container with the converted weights in it, before it is written."""

    data: Mapping
    dropped: List[Dropped]
    # Where the converted weights went (their prefix re-applied): where they were read, except under
    # Lightning's weight averaging, whose loader reads state_dict.
    target: KeyPath


def _copy_tree(data):
    """Dicts and lists copied (to edit), everything else shared."""
    if isinstance(data, Mapping):
        copy = type(data)() if type(data) in (dict, collections.OrderedDict) else {}
        for key, value in data.items():
            copy[key] = _copy_tree(value)
        return copy
    return [_copy_tree(value) for value in data] if isinstance(data, list) else data


def _path_label(path: KeyPath) -> str:
    return "/".join(str(part) for part in path) or "<top level>"


def _remove(tree: Mapping, path: KeyPath, lightning: bool) -> str:
    """Remove the entry at ``path``, or empty it where a loader reads its key back; says which."""
    parent, key = _get(tree, path[:-1]), path[-1]
    if isinstance(parent, list):
        parent[key] = None
        return "None"
    if lightning and len(path) == 1 and isinstance(parent[key], list):
        parent[key] = []  # Lightning zips these with the trainer's optimizers/schedulers: [] restores none
        return "[]"
    if lightning and path[0] == "callbacks" and len(path) > 2:
        parent[key] = None  # a callback's load_state_dict reads its keys back
        return "None"
    del parent[key]
    return "removed"


def _is_optimizer_state(value) -> bool:
    return isinstance(value, Mapping) and "state" in value and "param_groups" in value


def _is_scheduler_state(value) -> bool:
    return isinstance(value, Mapping) and "last_epoch" in value and any(
        key in value for key in ("base_lrs", "_last_lr", "min_lrs"))


def _all_of(value, test: Callable[[object], bool]) -> bool:
    return test(value) or (isinstance(value, list) and bool(value) and all(test(item) for item in value))


def _stale_reason(path: KeyPath, value, root: Mapping) -> Optional[str]:
    """Why an entry refers to the old parameters, or None: optimizer and LR scheduler states (by their
    structure anywhere, by their name at the top level), and Lightning weight averaging's own state."""
    if _all_of(value, _is_optimizer_state):
        return _OPTIMIZER
    if _all_of(value, _is_scheduler_state):
        return _SCHEDULER
    if len(path) == 1 and isinstance(path[0], str) and isinstance(value, (Mapping, list)):
        name = path[0].lower()
        if "optimizer" in name:
            return _OPTIMIZER
        if "scheduler" in name:
            return _SCHEDULER
    if path == ("averaging_state",) and "current_model_state" in root:
        return "Lightning's weight averaging state, which goes with the averaged copy of the old weights"
    return None


def _stale_entries(tree, root: Mapping, skip: KeyPath, path: KeyPath = ()) -> Iterator[Tuple[KeyPath, str]]:
    children = tree.items() if isinstance(tree, Mapping) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in list(children):
        where = path + (key,)
        if where == skip:
            continue
        reason = _stale_reason(where, value, root)
        if reason:
            yield where, reason
        elif isinstance(value, (Mapping, list)):
            yield from _stale_entries(value, root, skip, where)


def _without_prefix(mapping: Mapping, prefix: str) -> Mapping:
    """``mapping`` without the tensors whose key starts with ``prefix``."""
    kept = type(mapping)()
    for key, value in mapping.items():
        if not (isinstance(key, str) and key.startswith(prefix) and isinstance(value, torch.Tensor)):
            kept[key] = value
    return kept


def _prefixed_metadata(old: Optional[dict], new: Optional[dict], prefix: str) -> Optional[dict]:
    """A state_dict's ``_metadata`` (module versions) for the new weights under ``prefix``, others kept."""
    if old is None and new is None:
        return None
    head = prefix[:-1]
    kept = {k: v for k, v in (old or {}).items() if not (k == head or k.startswith(prefix))} if prefix else {}
    kept.update({(f"{prefix}{k}" if k else head) if prefix else k: v for k, v in (new or {}).items()})
    return kept


def _with_weights(mapping: Mapping, prefix: str, state: Mapping[str, torch.Tensor]) -> Mapping:
    """``mapping`` with its tensors under ``prefix`` replaced by ``state`` (prefix re-applied), in their place."""
    out, placed = type(mapping)(), False
    new = {prefix + key: value.detach().contiguous().cpu() for key, value in state.items()}
    for key, value in mapping.items():
        if isinstance(key, str) and key.startswith(prefix) and (isinstance(value, torch.Tensor) or key in new):
            if not placed:
                out.update(new)
                placed = True
            continue
        out[key] = value
    if not placed:
        out.update(new)
    metadata = _prefixed_metadata(getattr(mapping, "_metadata", None), getattr(state, "_metadata", None), prefix)
    if metadata is not None and isinstance(out, collections.OrderedDict):
        out._metadata = metadata
    return out


def _drop_other_copies(tree: Mapping, selection: Selection, target: KeyPath, lightning: bool) -> List[Dropped]:
    chosen, dropped = selection.chosen, []
    for other in selection.others:
        reason = _OTHER_COPY.format(chosen.label)
        if other.path == chosen.path:  # another prefix of the same state_dict: ema_model. next to model.
            parent, key = _get(tree, other.path[:-1]), other.path[-1] if other.path else None
            stripped = _without_prefix(_get(tree, other.path), other.prefix)
            if key is None:
                tree.clear()
                tree.update(stripped)
            else:
                parent[key] = stripped
            dropped.append(Dropped(other.label, reason))
        elif other.path == target:
            dropped.append(Dropped(other.label, reason, "the converted weights"))
        elif other.path:
            dropped.append(Dropped(other.label, reason, _remove(tree, other.path, lightning)))
    return dropped


def _target(container: Container, chosen: StateLocation) -> KeyPath:
    """Where the converted weights go: where they were read, but Lightning loads state_dict (its weight
    averaging moves the raw weights to current_model_state and the average to state_dict)."""
    if _is_lightning(container.data) and chosen.path == ("current_model_state",):
        return ("state_dict",)
    return chosen.path


def plan_container(checkpoint: Checkpoint, state: Mapping[str, torch.Tensor]) -> ContainerPlan:
    """The checkpoint's container with ``state`` in place of the weights it was read from (same key path,
    same prefix), every other entry kept except those that refer to the old parameters: optimizer and LR
    scheduler states, and other copies of the weights (EMA), which are of the old architecture. Nothing is
    written; the record is not changed."""
    container, selection = checkpoint.container, checkpoint.selection
    if container is None or selection is None:
        raise ValueError("keep_container needs a checkpoint read by read_checkpoint (a record made by hand has "
                         "no container to keep)")
    lightning, chosen = _is_lightning(container.data), selection.chosen
    tree, target = _copy_tree(container.data), _target(container, chosen)
    dropped = _drop_other_copies(tree, selection, target, lightning)
    weights = _with_weights(_get(tree, chosen.path), chosen.prefix, state)
    if target != chosen.path:
        _remove(tree, chosen.path, lightning)
        dropped.append(Dropped(chosen.label, f"converted into {_path_label(target)}, which Lightning loads"))
    if target:
        _get(tree, target[:-1])[target[-1]] = weights
    else:
        tree = weights
    for where, reason in list(_stale_entries(tree, container.data, target)):
        dropped.append(Dropped(_path_label(where), reason, _remove(tree, where, lightning)))
    return ContainerPlan(tree, dropped, target)


def check_container_output(checkpoint: Checkpoint, output: Union[str, os.PathLike]) -> None:
    """Raise ValueError when ``output`` cannot hold the checkpoint's container as it is (--keep-container),
    before any work."""
    container = checkpoint.container
    if container is None or checkpoint.selection is None:
        raise ValueError("--keep-container needs a checkpoint read by read_checkpoint (a record made by hand has "
                         "no container to keep)")
    output = Path(output)
    if container.fmt == "directory" and output.exists() and not output.is_dir():
        raise ValueError(f"output {str(output)!r} is a file; --keep-container writes a {container.layout} as a "
                         "directory: choose a directory name with -o")
    if container.fmt == "torch" and output.suffix == ".safetensors":
        raise ValueError(f"--keep-container writes the {container.layout} as it is, a torch pickle, and a "
                         f"safetensors file holds tensors only: choose an -o without .safetensors, or drop "
                         "--keep-container to write a plain safetensors state_dict")


def _shard_groups(keys: List[str], sizes: List[int], count: int) -> List[List[str]]:
    """``keys`` split in order into ``count`` shards of about equal bytes."""
    groups: List[List[str]] = [[] for _ in range(count)]
    total, start = max(sum(sizes), 1), 0
    for key, size in zip(keys, sizes):
        groups[min(count - 1, start * count // total)].append(key)
        start += size
    return groups


def _write_shards(flat: Mapping, shards: ShardSet, directory: Path) -> None:
    """The tensors as ``shards`` stored them: as many files, the same names, the index with a new weight_map."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in flat.items() if isinstance(v, torch.Tensor)}
    keys = list(tensors)
    groups = _shard_groups(keys, [tensors[k].numel() * tensors[k].element_size() for k in keys], len(shards.files))
    weight_map = {}
    for name, group in zip(shards.files, groups):
        part = {key: tensors[key] for key in group}
        if shards.fmt == "safetensors":
            _save_safetensors(part, str(directory / name), shards.file_metadata)
        else:
            torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(group, name))
    if shards.index_name is not None:
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        index = {"metadata": {**shards.index_metadata, "total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
        (directory / shards.index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_other_files(shards: ShardSet, directory: Path) -> List[Dropped]:
    """The directory's other files (configs, ...) copied, but not optimizer / scheduler states or other
    copies of the weights."""
    ours = set(shards.files) | {shards.index_name}
    dropped = []
    for entry in sorted(Path(shards.directory).iterdir()):
        name = entry.name
        if name in ours:
            continue
        if name in _INDEX_FILES or name in _SINGLE_FILES or _SHARD_NAME.match(name):
            dropped.append(Dropped(name, _OTHER_COPY.format(", ".join(shards.files[:1]) + ", ...")))
        elif "optimizer" in name.lower() or "scheduler" in name.lower():
            dropped.append(Dropped(name, _OPTIMIZER if "optimizer" in name.lower() else _SCHEDULER))
        elif entry.is_file():
            shutil.copy2(entry, directory / name)
        else:
            dropped.append(Dropped(name + "/", "a directory: not copied"))
    return dropped


def _write_directory(flat: Mapping, shards: ShardSet, path: Path) -> List[Dropped]:
    """Write a checkpoint directory to a temporary one beside ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _write_shards(flat, shards, tmp)
        dropped = _copy_other_files(shards, tmp)
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
        if path.exists():  # --force: the old directory set aside until the new one is in place
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists():
                os.replace(old, path)
            raise
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dropped


def write_container(checkpoint: Checkpoint, state: Mapping[str, torch.Tensor],
                    path: Union[str, os.PathLike]) -> List[Dropped]:
    """Write ``state`` in the checkpoint's own container layout (see :func:`plan_container`): a torch pickle
    as a torch pickle, a safetensors file with its metadata, a sharded directory as a directory of as many
    shards with the same names and an index. Returns what was dropped, and why.

    Example: ``write_container(read_checkpoint("last.ckpt", model=model), collapsed.state_dict(), "out.ckpt")``
    writes the Lightning checkpoint with ``state_dict['model.']`` collapsed, ``optimizer_states`` and
    ``lr_schedulers`` emptied (Lightning resumes with a fresh optimizer), epoch, loops, callbacks and
    hyper_parameters as they were.
    """
    check_container_output(checkpoint, path)
    plan, container, path = plan_container(checkpoint, state), checkpoint.container, Path(path)
    if container.fmt == "directory":
        return plan.dropped + _write_directory(plan.data, container.shards, path)
    if container.fmt == "safetensors":
        tensors = {k: v for k, v in plan.data.items() if isinstance(v, torch.Tensor)}
        _write_atomically(path, lambda tmp: _save_safetensors(tensors, tmp, container.metadata))
    else:
        _write_atomically(path, lambda tmp: torch.save(plan.data, tmp))
    return plan.dropped
