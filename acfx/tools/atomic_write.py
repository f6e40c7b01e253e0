"""Writing a file all or nothing, and the safetensors save every writer uses.

Both the plain state_dict writer (:func:`acfx.tools.checkpoint.write_state_dict`) and the container writer
(:mod:`acfx.tools.container_writing`) save this way; the helpers live here, below both, so that neither has
to import the other.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import torch

__all__ = ["write_atomically", "save_safetensors"]


def write_atomically(path: Path, save: Callable[[str], None]) -> None:
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


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None):
    """Save ``tensors`` with safetensors, each first copied to contiguous CPU memory of its own (safetensors
    refuses tensors that share storage)."""
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, path, metadata=metadata)
