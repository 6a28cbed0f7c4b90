"""Timers: CUDA events on a GPU, `time.perf_counter` on the CPU, with one interface.

    timer.measure(fn, graph=False) -> Timing   # median of many calls of fn()
    timer.estimate_ms(fn)                      # a rough time per call
    timer.peak_memory(fn)                      # bytes allocated at the peak of one call (CUDA only)

CudaTimer times with `triton.testing.do_bench` (median; it flushes L2 between runs), or, for
cases of a few microseconds, captures many calls in one CUDA graph and times its replays, so
that the launch overhead of Python drops out.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    method: str  # "do_bench", "cuda_graph" or "perf_counter"
    samples: int | None = None  # number of timed runs (None: chosen inside do_bench)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _quantile(values: list[float], q: float) -> float:
    """Linearly interpolated quantile of a non-empty list."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(samples_ms: list[float], method: str) -> Timing:
    if not samples_ms:
        raise ValueError("no timing samples")
    return Timing(
        median_ms=statistics.median(samples_ms),
        p20_ms=_quantile(samples_ms, 0.2),
        p80_ms=_quantile(samples_ms, 0.8),
        method=method,
        samples=len(samples_ms),
    )


class CpuTimer:
    """Wall-clock timer for CPU runs (tests and smoke runs at tiny sizes): the median of
    `time.perf_counter` around single calls, as many as fit in `rep_ms` (within bounds)."""

    name = "perf_counter"
    supports_graphs = False

    def __init__(self, rep_ms: float = 50.0, min_samples: int = 3, max_samples: int = 200) -> None:
        self.rep_ms, self.min_samples, self.max_samples = rep_ms, min_samples, max_samples

    def sync(self) -> None:
        pass

    def estimate_ms(self, fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def measure(self, fn: Callable[[], Any], graph: bool = False) -> Timing:
        if graph:
            raise ValueError("CUDA graphs need a CUDA device")
        est = max(self.estimate_ms(fn), 1e-6)
        n = int(min(max(self.rep_ms / est, self.min_samples), self.max_samples))
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return summarize(samples, "perf_counter")

    def peak_memory(self, fn: Callable[[], Any]) -> int | None:
        return None  # torch has no allocator statistics for the CPU

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "what": "median of time.perf_counter around single calls (CPU; not a performance number)",
            "rep_ms": self.rep_ms,
            "min_samples": self.min_samples,
            "max_samples": self.max_samples,
        }


class CudaTimer:
    """CUDA-event timer. `measure(fn)` is `triton.testing.do_bench`'s median (L2 flushed
    before every run); `measure(fn, graph=True)` replays a CUDA graph of many calls of `fn`
    and reports the median time per call over the replays."""

    name = "do_bench"
    supports_graphs = True

    def __init__(
        self,
        device: torch.device,
        rep_ms: float = 100.0,
        warmup_ms: float = 25.0,
        graph_below_ms: float = 0.05,
        graph_replay_ms: float = 2.0,
    ) -> None:
        self.device = device
        self.rep_ms, self.warmup_ms = rep_ms, warmup_ms
        self.graph_below_ms = graph_below_ms  # cases faster than this are timed in a graph
        self.graph_replay_ms = graph_replay_ms  # about how long one replay of the graph lasts

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def estimate_ms(self, fn: Callable[[], Any], calls: int = 5) -> float:
        """Events around `calls` back-to-back calls (launch overhead included)."""
        self.sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls

    def measure(self, fn: Callable[[], Any], graph: bool = False) -> Timing:
        if graph:
            return self._measure_graph(fn)
        import triton.testing

        p20, p50, p80 = triton.testing.do_bench(
            fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.2, 0.5, 0.8]
        )
        return Timing(median_ms=p50, p20_ms=p20, p80_ms=p80, method="do_bench")

    def _measure_graph(self, fn: Callable[[], Any]) -> Timing:
        est = max(self.estimate_ms(fn), 1e-4)
        calls = int(min(max(self.graph_replay_ms / est, 10), 1000))
        # Warm up on a side stream before capturing, as torch.cuda.graphs asks.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.sync()
        graph = torch.cuda.CUDAGraph()
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection during capture could free memory another stream still uses
        try:
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
        finally:
            if gc_was_enabled:
                gc.enable()
        graph.replay()  # first replay uploads the graph
        self.sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        per_replay = max(start.elapsed_time(end), 1e-4)
        replays = int(min(max(self.rep_ms / per_replay, 10), 200))
        samples = []
        for _ in range(replays):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / calls)
        del graph
        timing = summarize(samples, "cuda_graph")
        timing.samples = replays * calls
        return timing

    def peak_memory(self, fn: Callable[[], Any]) -> int:
        """Peak bytes allocated during one call, above what was allocated before it."""
        self.sync()
        gc.collect()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        out = fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del out
        return int(peak)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "what": (
                "CUDA events: triton.testing.do_bench median (L2 flushed before each run); cases "
                f"whose fastest implementation takes under {self.graph_below_ms * 1e3:g} us per call "
                "are timed as replays of a CUDA graph of many calls (median per call over replays)"
            ),
            "rep_ms": self.rep_ms,
            "warmup_ms": self.warmup_ms,
            "graph_below_ms": self.graph_below_ms,
            "graph_replay_ms": self.graph_replay_ms,
        }
