"""Where a command writes: checked before any work, never over the input or an existing file unasked."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["default_output", "output_path"]

# Checkpoint suffixes a default output name drops (longest first), keeping the whole stem before them.
_SUFFIXES = (".pth.tar", ".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")


def default_output(checkpoint: str, suffix: str, extension: str = ".pth") -> str:
    """``run.best.pth`` -> ``run.best-<suffix>.pth`` (beside the checkpoint; ``extension`` for other files)."""
    path = Path(checkpoint)
    name = path.name
    for ext in _SUFFIXES:
        if name.endswith(ext) and len(name) > len(ext):
            name = name[:-len(ext)]
            break
    return str(path.with_name(f"{name}-{suffix}{extension}"))


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(".")


def output_path(checkpoint: str, output: Optional[str], suffix: str, force: bool, extension: str = ".pth") -> str:
    """The path to write (``output``, or the default name), or a ValueError in one line saying why not.

    ``extension``: of the default name, and added to an ``output`` without one (a plot's format)."""
    path = Path(output) if output else Path(default_output(checkpoint, suffix, extension))
    if extension != ".pth" and not path.suffix:
        path = path.with_name(path.name + extension)
    if path.is_dir():
        raise ValueError(f"output {str(path)!r} is a directory; give a file name (e.g. -o {path / ('out.pth')})")
    ancestor = _existing_ancestor(path.absolute())
    if not ancestor.is_dir():
        raise ValueError(f"output {str(path)!r} lies under {str(ancestor)!r}, which is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"output {str(path)!r} cannot be written: no permission to write in {str(ancestor)!r}")
    source = Path(checkpoint)
    if path.exists():
        if source.exists() and path.resolve() == source.resolve() and not force:
            raise ValueError(f"output {str(path)!r} is the input checkpoint; converting it in place would replace "
                             "the training checkpoint: choose another -o, or pass --force to replace it")
        if not force:
            raise ValueError(f"output {str(path)!r} exists; pass --force to replace it, or choose another -o")
        if not os.access(path, os.W_OK):
            raise ValueError(f"output {str(path)!r} cannot be written: it is read-only")
    return str(path)
