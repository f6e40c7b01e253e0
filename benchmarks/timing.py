"""The one timer of the benchmarks, following the timing method described in benchmarks/README.md.

One timing of a fast GPU call swings by tens of percent from launch overhead and from what the machine is
doing at that moment; what holds up is (1) warming up first, (2) on the GPU, capturing the call in a CUDA
graph and timing its replays with CUDA events (no host-side launch cost, no host clock), (3) timing the
candidates in turn, round after round (A B C A B C ...), so that a slow moment hits all of them alike, (4)
keeping the median per candidate, and (5) timing the base twice in the same run: the spread between the two
(:func:`noise_floor`) is the smallest difference the run can show. On the CPU the clock is
``time.perf_counter``. A call that cannot be captured (a training step, with its optimizer) is timed with
CUDA events around eager calls (``graph=False``).

    timers = {"original": make_timer(f, x), "original (again)": make_timer(f, x), "collapsed": make_timer(g, x)}
    stats = interleaved_medians(timers, rounds=15, target_ms=20)
    noise = noise_floor(stats, "original", "original (again)")
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Protocol, Union

import torch

__all__ = ["Timer", "make_timer", "interleaved_samples", "interleaved_medians", "noise_floor"]


class Timer(Protocol):
    """Anything with ``measure(n)``: milliseconds per call, averaged over n back-to-back calls."""

    def measure(self, calls: int) -> float: ...


class _CudaGraphTimer:
    """Captures ``fn(*args)`` in a CUDA graph after warm-up; ``measure(n)`` is ms per replay over n replays."""

    def __init__(self, fn: Callable, args: tuple, warmup: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*args)
        torch.cuda.synchronize()

    def measure(self, calls: int) -> float:
        return _cuda_events_ms(self.graph.replay, calls)


class _CudaEventTimer:
    """Eager calls of ``fn(*args)`` timed with CUDA events: for work a graph cannot hold (optimizer steps)."""

    def __init__(self, fn: Callable, args: tuple, warmup: int) -> None:
        self.fn, self.args = fn, args
        for _ in range(warmup):
            fn(*args)
        torch.cuda.synchronize()

    def measure(self, calls: int) -> float:
        return _cuda_events_ms(lambda: self.fn(*self.args), calls)


class _WallTimer:
    """CPU: ms per call of ``fn(*args)`` over n calls, by ``time.perf_counter``."""

    def __init__(self, fn: Callable, args: tuple, warmup: int) -> None:
        self.fn, self.args = fn, args
        for _ in range(warmup):
            fn(*args)

    def measure(self, calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            self.fn(*self.args)
        return (time.perf_counter() - start) * 1e3 / calls


def _cuda_events_ms(call: Callable[[], object], calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def make_timer(fn: Callable, *args, warmup: int = 5, device: Union[str, torch.device, None] = None,
               graph: bool = True) -> Timer:
    """A timer of ``fn(*args)``, warmed up by ``warmup`` calls.

    The device is the first tensor argument's, else ``device`` (default: the CPU). On a CUDA device the call
    is captured in a CUDA graph, or with ``graph=False`` run eagerly; either way timed with CUDA events.
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    kind = tensors[0].device.type if tensors else torch.device(device or "cpu").type
    if kind != "cuda":
        return _WallTimer(fn, args, warmup)
    return _CudaGraphTimer(fn, args, warmup) if graph else _CudaEventTimer(fn, args, warmup)


def interleaved_samples(timers: Dict[str, Timer], rounds: int, repeats: Dict[str, int]) -> Dict[str, List[float]]:
    """Every timer once per round, in turn (A B C A B C ...): ms per call of each round, per timer."""
    samples: Dict[str, List[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(timer.measure(repeats[name]))
    return samples


def interleaved_medians(timers: Dict[str, Timer], rounds: int, target_ms: Optional[float] = None,
                        repeats: Optional[int] = None) -> Dict[str, Dict[str, object]]:
    """Median, spread and samples per timer over ``rounds`` interleaved rounds.

    Each measurement repeats the call either enough times to last about ``target_ms`` (found by one
    calibration call per timer) or exactly ``repeats`` times.
    """
    if (target_ms is None) == (repeats is None):
        raise ValueError("give one of target_ms (a measurement's length) or repeats (calls per measurement)")
    if repeats is not None:
        counts = {name: repeats for name in timers}
    else:
        counts = {name: max(1, int(target_ms / max(t.measure(1), 1e-3))) for name, t in timers.items()}
    samples = interleaved_samples(timers, rounds, counts)
    return {name: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "rounds": len(v),
                   "repeats": counts[name], "samples_ms": v} for name, v in samples.items()}


def noise_floor(stats: Dict[str, Dict[str, object]], base: str, again: str) -> float:
    """|median of the base timed again / median of the base − 1|: a ratio closer to 1 than this is noise."""
    return abs(stats[again]["median_ms"] / stats[base]["median_ms"] - 1)
