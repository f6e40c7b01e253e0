"""What a forward pass launches, by torch.profiler: CUDA kernel names on the GPU, aten ops on the CPU.

Two models with the same list run the same work, whatever the timer says: the exact form of "zero
inference overhead".
"""
from __future__ import annotations

import collections
from typing import Callable, Counter

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["launched"]


def launched(fn: Callable, x: torch.Tensor) -> Counter:
    """Kernel (GPU) or aten op (CPU) names and counts of one call of ``fn(x)``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if x.is_cuda:
        names = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        names = [e.name for e in events if e.name.startswith("aten::")]
    return collections.Counter(names)
