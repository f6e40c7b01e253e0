"""Timers that hold up (shared/GPU-BENCH.md): CUDA-graph replays timed with CUDA events on the GPU, a
wall clock on the CPU; models interleaved round by round and the median per model kept."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch

__all__ = ["make_timer", "interleaved_medians"]


class _CudaGraphTimer:
    """Captures ``fn(x)`` in a CUDA graph after warm-up; ``measure(n)`` is ms per replay over n replays."""

    def __init__(self, fn: Callable, x: torch.Tensor, warmup: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(x)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(x)
        torch.cuda.synchronize()

    def measure(self, replays: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            self.graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / replays


class _WallTimer:
    """CPU: ms per call of ``fn(x)`` over n calls."""

    def __init__(self, fn: Callable, x: torch.Tensor, warmup: int) -> None:
        self.fn, self.x = fn, x
        for _ in range(warmup):
            fn(x)

    def measure(self, calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            self.fn(self.x)
        return (time.perf_counter() - start) * 1e3 / calls


def make_timer(fn: Callable, x: torch.Tensor, warmup: int = 5):
    return _CudaGraphTimer(fn, x, warmup) if x.is_cuda else _WallTimer(fn, x, warmup)


def interleaved_medians(timers: Dict[str, object], rounds: int, target_ms: float) -> Dict[str, Dict[str, float]]:
    """Time every timer once per round, in turn (A B C A B C ...); median and spread per timer.

    Each measurement repeats the call enough times to last about ``target_ms``.
    """
    repeats = {name: max(1, int(target_ms / max(t.measure(1), 1e-3))) for name, t in timers.items()}
    samples: Dict[str, List[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(timer.measure(repeats[name]))
    return {name: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "rounds": len(v),
                   "repeats": repeats[name]} for name, v in samples.items()}
