"""One record of a traced model: everything the passes need to know of its graphs, built in one place.

Every pass asks the same questions of a model before it rewrites anything: which parts traced (and the
graphs), which did not (and what their code may reach), which modules are registered twice or hold tied
tensors, which have hooks running code tracing never sees, and, for expand, what the forward of the other
mode looks like. :func:`trace_model` answers them once, into a :class:`TracedModel` that is complete when
built and read by the finders (find_sites.py, find_linear_regions.py) and the passes.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch.fx as fx
import torch.nn as nn

from .tracing import TracedPart, UntracedPart, module_calls, shared_module_names, tied_tensor_names, trace_parts
from .untraced_reach import HookOwner, hook_owners

__all__ = ["TracedModel", "trace_model"]

MakeTracer = Callable[[], fx.Tracer]


@dataclasses.dataclass(frozen=True)
class TracedModel:
    """A model as one mode of its forward shows it (see the module docstring)."""

    root: nn.Module
    # The mode traced: True (train), False (eval).
    training: bool
    parts: Tuple[TracedPart, ...]
    untraced: Tuple[UntracedPart, ...]
    # Qualified name -> every name of a module registered under several.
    shared: Mapping[str, Tuple[str, ...]]
    # Qualified name -> the other holders of a parameter or buffer it holds (tied weights).
    tied: Mapping[str, Tuple[str, ...]]
    hooks: Tuple[HookOwner, ...]
    # Qualified name of every module called in a traced part -> its number of calls there.
    calls: Mapping[str, int]

    @property
    def owners(self) -> Tuple[object, ...]:
        """The code tracing does not see: untraced parts and modules with hooks (untraced_reach's owners)."""
        return self.untraced + self.hooks

    @property
    def mode(self) -> str:
        return "train" if self.training else "eval"

    def part_of(self, name: str) -> Optional[TracedPart]:
        """The traced part ``name`` lies in (its graph shows it), or None."""
        best = None
        for part in self.parts:
            if not part.name or name == part.name or name.startswith(part.name + "."):
                if best is None or len(part.name) > len(best.name):
                    best = part
        return best

    def untraced_owner(self, name: str) -> Optional[UntracedPart]:
        """The innermost untraced part above ``name``, or None."""
        above = [p for p in self.untraced if not p.name or name.startswith(p.name + ".")]
        return max(above, key=lambda p: len(p.name), default=None)


def _calls(parts: Tuple[TracedPart, ...]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for part in parts:
        for target, count in module_calls(part.graph).items():
            counts[part.qualify(target)] = counts.get(part.qualify(target), 0) + count
    return counts


def trace_model(root: nn.Module, make_tracer: MakeTracer, training: Optional[bool] = None) -> TracedModel:
    """Trace ``root`` (in ``training`` mode: True, False, or None for its own) into one complete record."""
    parts, untraced = trace_parts(root, make_tracer, training=training)
    shared = {name: tuple(names) for name, names in shared_module_names(root).items()}
    tied = {name: tuple(names) for name, names in tied_tensor_names(root).items()}
    return TracedModel(root, root.training if training is None else training, tuple(parts), tuple(untraced),
                       shared, tied, tuple(hook_owners(root)), _calls(tuple(parts)))
