"""Writing converted weights back in the input's own container layout (``--keep-container``).

A framework resumes from its own layout: a Lightning checkpoint with its loops and callbacks, a train.py
checkpoint with its epoch and args, a sharded directory as a directory of shards. :func:`write_container`
puts the converted state_dict where it was read (same key path, same prefix) and keeps everything else,
except what refers to the old parameters and would be wrong for the converted model: optimizer and LR
scheduler states, and other copies of the weights (EMA). It says what it dropped, in :class:`Dropped`
records.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator, List, Mapping, Optional, Protocol, Tuple, Union

import torch

from .atomic_write import save_safetensors, write_atomically
from .checkpoint_files import INDEX_FILES, SHARD_NAME, SINGLE_FILES, Container, ShardSet, is_lightning
from .state_location import KeyPath, Selection, StateLocation, value_at

__all__ = ["Dropped", "ContainerPlan", "ReadCheckpoint", "plan_container", "check_container_output",
           "write_container"]


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


class ReadCheckpoint(Protocol):
    """What the writer uses of a :class:`acfx.tools.checkpoint.Checkpoint`: the container it was read from,
    and where in it the weights were. Named by what it holds, not imported, because checkpoint.py imports
    this module (the imports point one way)."""

    container: Optional[Container]
    selection: Optional[Selection]


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
    parent, key = value_at(tree, path[:-1]), path[-1]
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
            parent, key = value_at(tree, other.path[:-1]), other.path[-1] if other.path else None
            stripped = _without_prefix(value_at(tree, other.path), other.prefix)
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
    if is_lightning(container.data) and chosen.path == ("current_model_state",):
        return ("state_dict",)
    return chosen.path


def plan_container(checkpoint: ReadCheckpoint, state: Mapping[str, torch.Tensor]) -> ContainerPlan:
    """The checkpoint's container with ``state`` in place of the weights it was read from (same key path,
    same prefix), every other entry kept except those that refer to the old parameters: optimizer and LR
    scheduler states, and other copies of the weights (EMA), which are of the old architecture. Nothing is
    written; the record is not changed."""
    container, selection = checkpoint.container, checkpoint.selection
    if container is None or selection is None:
        raise ValueError("keep_container needs a checkpoint read by read_checkpoint (a record made by hand has "
                         "no container to keep)")
    lightning, chosen = is_lightning(container.data), selection.chosen
    tree, target = _copy_tree(container.data), _target(container, chosen)
    dropped = _drop_other_copies(tree, selection, target, lightning)
    weights = _with_weights(value_at(tree, chosen.path), chosen.prefix, state)
    if target != chosen.path:
        _remove(tree, chosen.path, lightning)
        dropped.append(Dropped(chosen.label, f"converted into {_path_label(target)}, which Lightning loads"))
    if target:
        value_at(tree, target[:-1])[target[-1]] = weights
    else:
        tree = weights
    for where, reason in list(_stale_entries(tree, container.data, target)):
        dropped.append(Dropped(_path_label(where), reason, _remove(tree, where, lightning)))
    return ContainerPlan(tree, dropped, target)


def check_container_output(checkpoint: ReadCheckpoint, output: Union[str, os.PathLike]) -> None:
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
            save_safetensors(part, str(directory / name), shards.file_metadata)
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
        if name in INDEX_FILES or name in SINGLE_FILES or SHARD_NAME.match(name):
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


def write_container(checkpoint: ReadCheckpoint, state: Mapping[str, torch.Tensor],
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
        write_atomically(path, lambda tmp: save_safetensors(tensors, tmp, container.metadata))
    else:
        write_atomically(path, lambda tmp: torch.save(plan.data, tmp))
    return plan.dropped
