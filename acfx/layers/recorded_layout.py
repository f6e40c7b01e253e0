"""Modules whose arithmetic depends on integers they record, saved with their weights as a ``layout`` buffer.

An ACBlock adds its branch kernels up at offsets decided by the expand options; an OnlineACConv merges
its kernels the same way. Those integers are not learned, but a checkpoint is only meaningful with the
ones it was trained with, so they travel in the state_dict and a checkpoint recording others is refused
on load (one check, :meth:`RecordedLayout.layout_problem`, for ``load_state_dict`` and
:func:`acfx.load_state_dict_strict` alike).

The module's own record (computed from its configuration, never from the buffer) is the truth; the
buffer is a copy for checkpoints, written back from the record whenever it may hold something else:
after ``to_empty`` (uninitialised memory), after any other ``_apply``, and after a load (``assign=True``
with a checkpoint that has no layout leaves the buffer on the meta device).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["RecordedLayout", "LAYOUT_KEY"]

# The buffer's name, and the last part of its state_dict key.
LAYOUT_KEY = "layout"


class RecordedLayout(nn.Module):
    """Base for modules recording a layout: subclasses give :meth:`layout_values` and :meth:`layout_problem`."""

    def layout_values(self) -> Sequence[int]:
        """The integers this module's arithmetic depends on, from its own configuration."""
        raise NotImplementedError

    def layout_problem(self, saved: torch.Tensor) -> Optional[str]:
        """What differs between a checkpoint's recorded layout and this module's, with the expand option to
        fix (None: they agree)."""
        raise NotImplementedError

    def _register_layout(self, device: Optional[torch.device]) -> None:
        self.register_buffer(LAYOUT_KEY, torch.tensor(list(self.layout_values()), dtype=torch.int64, device=device))

    def _refresh_layout(self, device: Optional[torch.device] = None) -> None:
        """Write the record into the buffer; a buffer on the meta device is materialised on ``device`` (or that
        of the module's tensors, once they have one)."""
        buffer = self._buffers.get(LAYOUT_KEY)
        if buffer is None:
            return
        values = torch.tensor(list(self.layout_values()), dtype=torch.int64)
        if buffer.device.type == "meta":
            device = device or next((t.device for t in self.parameters() if t.device.type != "meta"), None)
            if device is not None:
                self._buffers[LAYOUT_KEY] = values.to(device)
            return
        if tuple(buffer.shape) != tuple(values.shape):
            self._buffers[LAYOUT_KEY] = values.to(buffer.device)
            return
        with torch.no_grad():
            buffer.copy_(values)

    def _apply(self, fn, *args, **kwargs):
        """Moves and materialisations (``to_empty`` leaves uninitialised memory) keep the recorded layout."""
        module = super()._apply(fn, *args, **kwargs)
        self._refresh_layout()
        return module

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + LAYOUT_KEY
        saved = state_dict.get(key)
        if saved is not None:
            problem = self.layout_problem(saved)
            if problem:
                error_msgs.append(f"{prefix or '<model>.'}{LAYOUT_KEY}: {problem}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if saved is None and key in missing_keys:  # checkpoints from before the layout was recorded
            missing_keys.remove(key)
        self._refresh_layout(self._loaded_device(state_dict, prefix))

    def _loaded_device(self, state_dict, prefix: str) -> Optional[torch.device]:
        """Where this module's tensors will live when its buffer is still on the meta device: children load
        after this, and with assign=True their tensors are the state_dict's."""
        buffer = self._buffers.get(LAYOUT_KEY)
        if buffer is None or buffer.device.type != "meta":
            return None
        return next((v.device for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)
                     and v.device.type != "meta"), None)
