"""Where a benchmark writes its result files: STEM.json, STEM.md, STEM.png beside each other."""
from __future__ import annotations

from pathlib import Path
from typing import Union

__all__ = ["output_file"]


def output_file(stem: Union[str, Path], suffix: str) -> Path:
    """``stem`` with ``suffix`` appended. Not Path.with_suffix: a stem with a dot in its name
    (accuracy_digits_frac0.25) would lose what follows the dot and overwrite another run's files."""
    stem = Path(stem)
    return stem.with_name(stem.name + suffix)
