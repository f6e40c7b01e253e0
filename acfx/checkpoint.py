"""Reading, checking and writing checkpoints, all or nothing.

``torch.nn.Module.load_state_dict(strict=True)`` copies every matching tensor before it raises on the
keys that do not match, so a wrong checkpoint leaves a model half-loaded. Here keys and shapes are
compared first, and the model is only written to when everything matches.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

__all__ = ["read_state_dict", "checkpoint_info", "load_state_dict_strict", "write_state_dict", "CheckpointMismatch"]

_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_ACB_MARKERS = (".square.weight", ".hor.weight", ".ver.weight")


class CheckpointMismatch(ValueError):
    """The checkpoint's keys or shapes do not match the model; nothing was loaded."""


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _load_weights_only(path: Path):
    # timm's train.py saves its argparse.Namespace next to the weights: allow that one class.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_info(path: Union[str, os.PathLike]) -> Dict[str, object]:
    """What a timm train.py checkpoint records besides weights: 'arch' and the model keyword arguments
    that change the weights' meaning (bn_eps is not in the state_dict), as {'arch': ..., 'model_kwargs': {...}}."""
    try:
        data = _load_weights_only(Path(path))
    except Exception:
        return {}
    if not isinstance(data, Mapping):
        return {}
    info: Dict[str, object] = {}
    if isinstance(data.get("arch"), str):
        info["arch"] = data["arch"]
    args = data.get("args")
    if isinstance(args, argparse.Namespace):
        kwargs = dict(getattr(args, "model_kwargs", None) or {})
        for name in ("bn_eps", "bn_momentum", "in_chans"):
            if getattr(args, name, None) is not None:
                kwargs[name] = getattr(args, name)
        info["model_kwargs"] = kwargs
    return info


def read_state_dict(path: Union[str, os.PathLike], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """A state_dict from a .pth/.pt/.bin (read with ``weights_only=True``) or .safetensors file.

    Accepts a plain state_dict or timm train.py's checkpoint dict (``state_dict``, or ``state_dict_ema``
    with ``use_ema=True``), and strips ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            data = load_file(str(path))
        else:
            data = _load_weights_only(path)
    except Exception as error:
        raise ValueError(f"could not read checkpoint {str(path)!r} ({type(error).__name__}: {error}); the file "
                         "may be truncated, or not a PyTorch or safetensors checkpoint") from error
    if not isinstance(data, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(data).__name__}, not a state_dict")
    key = "state_dict_ema" if use_ema else "state_dict"
    if use_ema and key not in data:
        raise ValueError(f"checkpoint {str(path)!r} has no 'state_dict_ema' (keys: {sorted(data)[:8]})")
    if key in data and isinstance(data[key], Mapping):
        data = data[key]
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"checkpoint {str(path)!r} holds no tensors (keys: {sorted(data)[:8]})")
    return _strip_prefixes(tensors)


def _hint(model_keys, checkpoint_keys) -> str:
    model_acb, checkpoint_acb = (any(k.endswith(_ACB_MARKERS) for k in keys) for keys in (model_keys, checkpoint_keys))
    if checkpoint_acb and not model_acb:
        return (" The checkpoint is of an expanded (ACNet) model and the model is plain: expand the model "
                "first (acfx.expand with the options used for training), or convert the checkpoint with "
                "`acfx collapse`.")
    if model_acb and not checkpoint_acb:
        return (" The model is expanded and the checkpoint is plain: load it into the plain model and expand "
                "that (init='preserve'), or convert it with `acfx expand`.")
    if model_acb and checkpoint_acb:
        return (" Both are expanded, with different options (branches, norm, include_unnormed): expand with "
                "the options the checkpoint was trained with.")
    return " Is it a checkpoint of this architecture (and num_classes)?"


def _listing(title: str, keys: List[str], limit: int = 12) -> str:
    if not keys:
        return ""
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f" {title} ({len(keys)}): {', '.join(keys[:limit])}{more}."


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: Optional[str] = None) -> None:
    """Load ``state`` into ``model`` if every key and shape matches; else raise and load nothing."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                    if k in state and tuple(state[k].shape) != tuple(v.shape))
    if missing or unexpected or shapes:
        where = f" from {source}" if source else ""
        raise CheckpointMismatch(
            f"checkpoint{where} does not match {type(model).__name__}; nothing was loaded."
            + _listing("missing keys", missing) + _listing("unexpected keys", unexpected)
            + _listing("shape mismatches (checkpoint vs model)", shapes) + _hint(expected, state))
    model.load_state_dict(state, strict=True)


def write_state_dict(state: Mapping[str, torch.Tensor], path: Union[str, os.PathLike]) -> None:
    """Write a plain state_dict: safetensors for a .safetensors path, torch.save otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.clone() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)
