"""Reading, checking and writing checkpoints, all or nothing.

``torch.nn.Module.load_state_dict(strict=True)`` copies every matching tensor before it raises on the
keys that do not match, so a wrong checkpoint leaves a model half-loaded. Here keys, shapes and the block
layouts an expanded model records are compared first, and the model is only written to when everything
matches. A checkpoint is read once, into one :class:`Container` record (what the file holds,
:mod:`acfx.tools.checkpoint_files`) and one :class:`Checkpoint` record (the model's state_dict in it, and
where it was found, :mod:`acfx.tools.state_location`). Writing the converted weights back in the input's
layout is :mod:`acfx.tools.container_writing`; its names, and those of the reading modules, are re-exported
here.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Set, Union

import torch
import torch.nn as nn

from ..layers.recorded_layout import LAYOUT_KEY, RecordedLayout
from ..passes.report import Report
from .atomic_write import save_safetensors, write_atomically
from .checkpoint_files import Container, ShardSet, read_container
from .container_writing import ContainerPlan, Dropped, check_container_output, plan_container, write_container
from .state_location import ModelKeys, Selection, StateLocation, locate_state, state_at

__all__ = ["Checkpoint", "Container", "ShardSet", "ModelKeys", "StateLocation", "Selection", "Dropped",
           "ContainerPlan", "read_container", "locate_state", "read_checkpoint", "read_state_dict",
           "checkpoint_info", "load_state_dict_strict", "write_state_dict", "plan_container", "write_container",
           "check_container_output", "CheckpointMismatch", "LAYOUT_KEY", "expanded_sites", "expanded_mode",
           "load_into_expanded"]

_ACB_MARKERS = (".square.weight", ".hor.weight", ".ver.weight")
_ONLINE_MARKERS = (".square_scale",)
# Keys that only an expanded site has, one per site: exact mode, online mode, and both (newer checkpoints).
_SITE_MARKERS = (".square.weight", ".square_scale", ".layout")


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
    """Read a checkpoint file or directory (see :func:`acfx.tools.checkpoint_files.read_container`; or take
    one read) and find the model's state_dict in it (see :func:`acfx.tools.state_location.locate_state`).

    With ``model`` (the plain model, or an expanded one), the weights are found by its keys in any layout:
    a plain state_dict, timm train.py's ``state_dict`` / ``state_dict_ema``, torchvision's ``model`` /
    ``model_ema``, Lightning's ``state_dict`` with its ``model.`` prefix (and ``current_model_state`` under its
    weight averaging), the tutorial's ``model_state_dict``, Hugging Face shards, with ``module.`` /
    ``_orig_mod.`` prefixes at any depth. Without one, the largest mapping of tensors is taken and its DDP /
    compile prefix stripped.
    """
    container = path if isinstance(path, Container) else read_container(path)
    selection = locate_state(container, model, use_ema, checkpoint_key, prefix)
    state = state_at(container.data, selection.chosen)
    return Checkpoint(container.path, state, container.arch, container.model_kwargs, selection, container)


def read_state_dict(path: Union[str, os.PathLike], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state_dict of a checkpoint file (see :func:`read_checkpoint`)."""
    return read_checkpoint(path, use_ema).state


def checkpoint_info(path: Union[str, os.PathLike]) -> Dict[str, object]:
    """What a timm train.py checkpoint records besides weights: {'arch': ..., 'model_kwargs': {...}}.

    Raises what :func:`acfx.tools.checkpoint_files.read_container` raises (a file that cannot be read is not a
    checkpoint without info).
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
    layouts_only = all(s.split(" ")[0].endswith("." + LAYOUT_KEY) for s in shapes)  # its length: the branches
    if model_mode and checkpoint_mode and layouts_only:
        return (" Both are expanded, with different options (recipe, branches, norm, include_unnormed) or "
                "different sites (a conv frozen or excluded in training): expand with the options the checkpoint "
                "was trained with." + _branches_hint(model_keys, checkpoint_keys))
    return " Is it a checkpoint of this architecture (and num_classes)?"


def _branches_hint(model_keys, checkpoint_keys) -> str:
    """The branches the checkpoint's blocks have beside the model's, and the built-in recipe that builds
    them, from a site both hold expanded."""
    common = sorted(expanded_sites(dict.fromkeys(model_keys)) & expanded_sites(dict.fromkeys(checkpoint_keys)))
    if not common:
        return ""
    theirs, ours = _branches_of(checkpoint_keys, common[0]), _branches_of(model_keys, common[0])
    if theirs == ours:
        return ""
    recipe = next((name for name, built in _recipe_branches().items() if built == theirs), None)
    return (f" At {common[0]} the checkpoint has the branches {', '.join(sorted(theirs))} and the model "
            f"{', '.join(sorted(ours))}" + (f": recipe='{recipe}' (--recipe {recipe}) builds those." if recipe else "."))


def _branches_of(keys, site: str) -> frozenset:
    """The branch convs of the expanded ``site`` (exact mode: its child modules other than BNs)."""
    prefix = site + "."
    return frozenset(k[len(prefix):].split(".")[0] for k in keys
                     if k.startswith(prefix) and k.endswith(".weight") and "_bn." not in k[len(prefix):])


def _recipe_branches() -> Dict[str, frozenset]:
    """Each built-in recipe's branch convs on a 3×3 conv→BN of 8 channels (what its checkpoint keys hold)."""
    from ..layers.recipe import RECIPES
    from ..passes.expand import expand
    found = {}
    for name in RECIPES:
        model = expand(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)), recipe=name)
        found[name] = _branches_of(model.state_dict(), "0")
    return found


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
    _check_arguments(model, state)
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


def load_into_expanded(model: nn.Module, report: Report, state: Mapping[str, torch.Tensor],
                       source: Optional[str] = None) -> None:
    """:func:`load_state_dict_strict` into a model ``expand`` just rewrote (``report`` is its report). On a
    mismatch, the sites the checkpoint holds expanded that expand left here are named with expand's reason:
    a model built otherwise than in training (another argument) may not trace where it did."""
    try:
        load_state_dict_strict(model, state, source)
    except CheckpointMismatch as error:
        note = _unexpanded_note(expanded_sites(state), report)
        if not note:
            raise
        raise CheckpointMismatch(f"{error}{note}") from None


def _unexpanded_note(sites: Set[str], report: Report) -> str:
    done = {e.name for e in report.of("expanded")}
    reasons = {e.name: e.detail for e in report.entries if e.name in sites and e.name not in done}
    untraced = report.of("untraced")
    for site in sorted(sites - done - set(reasons)):
        owner = max((e for e in untraced if e.name == "" or site.startswith(e.name + ".")),
                    key=lambda e: len(e.name), default=None)
        if owner is not None:
            reasons[site] = f"in '{owner.name or '<model>'}', which does not trace here ({owner.detail})"
    if not reasons:
        return ""
    listed = "; ".join(f"{name}: {detail}" for name, detail in sorted(reasons.items())[:3])
    more = f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""
    parts = "".join(f" '{e.name or '<model>'}' does not trace here ({e.detail})." for e in untraced[:2])
    return (f" The checkpoint holds {len(reasons)} site(s) expanded that expand left in this model: {listed}{more}."
            f"{parts} Build the model with the arguments it was trained with.")


def _check_arguments(model: object, state: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"acfx.load_state_dict_strict(model, state): model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if isinstance(state, (str, os.PathLike)):
        raise TypeError(f"acfx.load_state_dict_strict: state is a path ({os.fspath(state)!r}), not a state_dict: "
                        "read it first (torch.load(path, map_location='cpu'), or acfx.tools.checkpoint."
                        "read_state_dict for a train.py checkpoint)")
    if not isinstance(state, Mapping):
        raise TypeError(f"acfx.load_state_dict_strict: state must be a mapping of names to tensors (a state_dict), "
                        f"got {type(state).__name__}")
    odd = [f"{k} ({type(v).__name__})" for k, v in state.items()
           if not isinstance(v, torch.Tensor) and not str(k).endswith("_extra_state")]  # set_extra_state's: any
    if odd:
        raise TypeError("acfx.load_state_dict_strict: every value of a state_dict must be a tensor (but a module's "
                        "_extra_state); nothing was "
                        f"loaded. Not tensors: {', '.join(odd[:5])}" + (f" and {len(odd) - 5} more" if len(odd) > 5
                                                                        else ""))


def write_state_dict(state: Mapping[str, torch.Tensor], path: Union[str, os.PathLike]) -> None:
    """Write a plain state_dict: safetensors for a .safetensors path, torch.save otherwise.

    Written to a temporary file beside ``path`` and moved into place, so that a failed write (a full disk)
    leaves no partial file and an existing file as it was.
    """
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix == ".safetensors":
        write_atomically(path, lambda tmp: save_safetensors(tensors, tmp))
    else:
        write_atomically(path, lambda tmp: torch.save(tensors, tmp))
