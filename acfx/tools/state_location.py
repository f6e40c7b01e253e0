"""Finding the model's state_dict inside a checkpoint's container, by the keys the model has.

Training frameworks wrap the weights in dicts of their own: timm's train.py (``state_dict``,
``state_dict_ema``), torchvision's reference scripts (``model``, ``model_ema``), PyTorch Lightning
(``state_dict`` with the LightningModule's attribute as a key prefix, ``model.``), PyTorch's tutorial
(``model_state_dict``), Hugging Face / accelerate directories (``model.safetensors``, shards with an index),
with DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes on top. Rather than a list of container
names, every mapping of tensors in the file and every key prefix are tried against the keys the model has
(or an expansion of it can have); :func:`locate_state` picks the one that matches, and refuses, listing them,
when several match equally. It returns a :class:`Selection` record that reading
(:func:`acfx.tools.checkpoint.read_checkpoint`) and writing back (:mod:`acfx.tools.container_writing`) share.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import shlex
from typing import Dict, FrozenSet, Iterator, List, Mapping, Optional, Set, Tuple, Union

import torch
import torch.nn as nn

from .checkpoint_files import Container

__all__ = ["ModelKeys", "StateLocation", "Selection", "KeyPath", "locate_state", "state_at", "value_at"]

_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
# Words in a key path or prefix that mark an averaged copy of the weights (timm's state_dict_ema,
# torchvision's model_ema, an ``ema_model.`` attribute of a LightningModule, SWA's average_model_state).
_AVERAGED_WORDS = frozenset({"ema", "swa", "average", "averaged"})
# Keys from a checkpoint's top level down to a value: dict keys and list indexes.
KeyPath = Tuple[Union[str, int], ...]


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


def state_at(data: Mapping, location: StateLocation) -> Dict[str, torch.Tensor]:
    """The tensors at ``location``, its prefix stripped: the model's state_dict as the file holds it."""
    mapping = value_at(data, location.path)
    cut = len(location.prefix)
    return {key[cut:]: mapping[key] for key in _tensor_keys(mapping) if key.startswith(location.prefix)}


def value_at(data, path: KeyPath):
    """What a checkpoint holds at a key path."""
    for part in path:
        data = data[part]
    return data


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def _same_weights(data: Mapping, first: StateLocation, second: StateLocation) -> bool:
    a, b = state_at(data, first), state_at(data, second)
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
    keys = state_at(data, chosen).keys()
    return [location for location in others if state_at(data, location).keys() == keys]


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
