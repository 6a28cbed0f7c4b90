"""`python -m bench --host`: fnn's host time per call on small problems, against eager PyTorch.

On a GPU a small problem's kernels finish in a few microseconds, so what a call costs is the
host's work: Python, the autograd machinery, argument checks, Triton's launcher. This measures
that work on any machine, without a GPU:

- fnn runs under `bench.fakecuda.compile_only(90)`: its kernels are compiled for sm_90a and
  every launch is skipped (CPU tensors stand in for GPU ones; nothing is computed). The time
  per call is fnn's host time minus the final C launch; `LAUNCH_US` per launch is added back
  for that launch (the issue's accounting; a raw cuLaunchKernel costs about 3 us).
- eager PyTorch runs the same problem on the CPU in the same run. At these sizes its compute
  is negligible and its time is dispatch, as on a GPU.

The two are timed in alternating batches (many calls per batch, warm-up excluded, the median
over batches), so a change of load on a shared machine affects both alike. Each case counts
fnn's launches per call. On a machine with CUDA the same cases are also timed end to end on
the GPU (`gpu_end_to_end`).
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LAUNCH_US = 4.0  # added per launch for the C launch that compile_only skips
RESULTS = Path(__file__).resolve().parent / "results" / "host"

Call = Callable[[], Any]


@dataclass(frozen=True)
class HostGoal:
    """A goal on the ratio of one case: "fnn/eager" <= threshold or "eager/fnn" >= threshold,
    with fnn's time counted as host time + LAUNCH_US per launch."""

    ratio: str  # "fnn/eager" or "eager/fnn"
    threshold: float

    @property
    def text(self) -> str:
        if self.ratio == "fnn/eager":
            return f"fnn <= {self.threshold:g} x eager"
        return f"eager / fnn >= {self.threshold:g}"

    def evaluate(self, fnn_us: float, eager_us: float) -> tuple[float, bool]:
        if self.ratio == "fnn/eager":
            value = fnn_us / eager_us
            return value, value <= self.threshold
        value = eager_us / fnn_us
        return value, value >= self.threshold


@dataclass(frozen=True)
class HostCase:
    """One problem, built on a device as two zero-argument calls: fnn's and eager's."""

    name: str
    what: str
    fnn: str  # what fnn runs
    eager: str  # what eager runs
    build: Callable[[torch.device], tuple[Call, Call]]
    launches: int  # fnn's launches per call, read off the current code (the test checks it)
    goal: HostGoal | None = None
    gpu_goal: HostGoal | None = None  # the matching goal for the end-to-end GPU timing
    # The same call through a Python autograd.Function that does nothing but allocate its
    # output and its gradients (`_Floor`): what torch's autograd costs any such design.
    floor: Callable[[torch.device], Call] | None = None


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _seed000(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from fnn.data import seed000_data

    x, y = seed000_data()
    return x.to(device), y.to(device)


def _linear_inputs(device: torch.device, k: int, n: int, seed: int):
    """Seed 000's layer shapes: 100 rows; the first layer reads the seed's data."""
    x = _seed000(device)[0] if k == 2 else _randn(100, k, seed=seed).to(device)
    w = _randn(n, k, seed=seed + 1, scale=k**-0.5).to(device)
    return x, w


def _linear_fwd(k: int, n: int):
    def build(device: torch.device) -> tuple[Call, Call]:
        import fnn

        x, w = _linear_inputs(device, k, n, seed=k * 100 + n)
        return (lambda: fnn.linear_act(x, w)), (lambda: torch.sigmoid(F.linear(x, w)))

    return build


def _linear_fwbw(k: int, n: int, x_grad: bool):
    def build(device: torch.device) -> tuple[Call, Call]:
        import fnn

        x, w = _linear_inputs(device, k, n, seed=k * 100 + n)
        x.requires_grad_(x_grad)
        w.requires_grad_(True)
        inputs = (x, w) if x_grad else (w,)
        gy = _randn(x.shape[0], n, seed=7).to(device)

        def run_fnn():
            return torch.autograd.grad(fnn.linear_act(x, w), inputs, gy)

        def run_eager():
            return torch.autograd.grad(torch.sigmoid(F.linear(x, w)), inputs, gy)

        return run_fnn, run_eager

    return build


def _eager_like(model: nn.Module) -> nn.Sequential:
    """An nn.Sequential of nn.Linear and nn.Sigmoid with an FNN's weights (sigmoid only)."""
    layers: list[nn.Module] = []
    for layer in model.layers:
        if layer.activation != "sigmoid":
            raise ValueError("the host cases use sigmoid networks")
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(layer.weight)
            if layer.bias is not None:
                lin.bias.copy_(layer.bias)
        layers += [lin, nn.Sigmoid()]
    return nn.Sequential(*layers).to(model.layers[0].weight.device)


def _network_fwbw(sizes: Sequence[int], rows: int, bias: bool, fusion: str):
    def build(device: torch.device) -> tuple[Call, Call]:
        from fnn import FNN

        torch.manual_seed(0)
        model = FNN(list(sizes), bias=bias, fusion=fusion, device=device)
        eager = _eager_like(model)
        if list(sizes) == [2, 32, 1] and rows == 100:
            x = _seed000(device)[0]
        else:
            x = _randn(rows, sizes[0], seed=3).to(device)
        gy = _randn(rows, sizes[-1], seed=4).to(device)
        params, eager_params = tuple(model.parameters()), tuple(eager.parameters())

        def run_fnn():
            return torch.autograd.grad(model(x), params, gy)

        def run_eager():
            return torch.autograd.grad(eager(x), eager_params, gy)

        return run_fnn, run_eager

    return build


class _Floor(torch.autograd.Function):
    """A network as one autograd node that computes nothing: the forward allocates the output
    (rows, n_out) and saves its inputs, the backward allocates a gradient for each input that
    needs one. Timed as `torch.autograd.grad(_Floor.apply(n_out, x, *params), params, gy)`, it
    is the autograd machinery's cost around any Python autograd.Function of the same inputs and
    output, fnn's included: a design built on one can take less only by saving fewer tensors
    (under 1 us each here)."""

    @staticmethod
    def forward(ctx, n_out: int, x: torch.Tensor, *params: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, *params)
        return x.new_empty((x.shape[0], n_out))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad
        return (None, *(torch.empty_like(t) if t is not None and need else None
                        for t, need in zip(saved, needs[1:], strict=True)))


def _linear_floor(k: int, n: int, x_grad: bool):
    def build(device: torch.device) -> Call:
        x, w = _linear_inputs(device, k, n, seed=k * 100 + n)
        x.requires_grad_(x_grad)
        w.requires_grad_(True)
        inputs = (x, w) if x_grad else (w,)
        gy = _randn(x.shape[0], n, seed=7).to(device)
        return lambda: torch.autograd.grad(_Floor.apply(n, x, w), inputs, gy)

    return build


def _network_floor(sizes: Sequence[int], rows: int, bias: bool):
    def build(device: torch.device) -> Call:
        from fnn import FNN

        torch.manual_seed(0)
        model = FNN(list(sizes), bias=bias, device=device)
        x = _randn(rows, sizes[0], seed=3).to(device)
        gy = _randn(rows, sizes[-1], seed=4).to(device)
        params = [t for layer in model.layers for t in (layer.weight, layer.bias)]
        needed = tuple(t for t in params if t is not None)
        return lambda: torch.autograd.grad(_Floor.apply(sizes[-1], x, *params), needed, gy)

    return build


def _trainer_seed000(device: torch.device) -> tuple[Call, Call]:
    from fnn import Trainer
    from fnn.cli import seed000_model

    x, y = _seed000(device)
    model = seed000_model(2, device)
    trainer = Trainer(model, loss="sse", lr=1e-3)
    eager = _eager_like(model)
    opt = torch.optim.SGD(eager.parameters(), lr=1e-3)

    def run_eager():
        opt.zero_grad()
        loss = 0.5 * ((eager(x) - y) ** 2).sum()
        loss.backward()
        opt.step()
        return loss

    return (lambda: trainer.step(x, y)), run_eager


SEQ = "nn.Sequential(nn.Linear, nn.Sigmoid, ...), autograd"
FWBW = "forward + torch.autograd.grad w.r.t. the parameters"

CASES: dict[str, HostCase] = {
    c.name: c
    for c in [
        HostCase(
            "linear_act_fwd_2x32",
            "linear_act forward, 100 rows, 2 -> 32, float32, sigmoid, no bias, no grad",
            "fnn.linear_act(x, w)",
            "torch.sigmoid(F.linear(x, w))",
            _linear_fwd(2, 32),
            launches=1,
            goal=HostGoal("fnn/eager", 3.0),
        ),
        HostCase(
            "linear_act_fwd_32x1",
            "linear_act forward, 100 rows, 32 -> 1, float32, sigmoid, no bias, no grad",
            "fnn.linear_act(x, w)",
            "torch.sigmoid(F.linear(x, w))",
            _linear_fwd(32, 1),
            launches=1,
            goal=HostGoal("fnn/eager", 3.0),
        ),
        HostCase(
            "linear_act_fwbw_2x32",
            "linear_act forward + backward, 100 rows, 2 -> 32, grad of w only (x is data)",
            "fnn.linear_act(x, w), " + FWBW,
            "torch.sigmoid(F.linear(x, w)), " + FWBW,
            _linear_fwbw(2, 32, x_grad=False),
            launches=2,  # forward, dW
            floor=_linear_floor(2, 32, x_grad=False),
        ),
        HostCase(
            "linear_act_fwbw_32x1",
            "linear_act forward + backward, 100 rows, 32 -> 1, grads of x and w",
            "fnn.linear_act(x, w), " + FWBW + " and x",
            "torch.sigmoid(F.linear(x, w)), " + FWBW + " and x",
            _linear_fwbw(32, 1, x_grad=True),
            launches=2,  # forward; dX, dW from the fused backward kernel
            floor=_linear_floor(32, 1, x_grad=True),
        ),
        HostCase(
            "fnn_2_32_1_fwbw_layer",
            'FNN([2, 32, 1], bias=False, fusion="layer") forward + backward, seed 000\'s X',
            'FNN(fusion="layer"), ' + FWBW,
            SEQ,
            _network_fwbw([2, 32, 1], 100, bias=False, fusion="layer"),
            # 2 forward; backward: layer 2's fused kernel (its dW, and its dX with layer 1's delta
            # in the epilogue), dW of layer 1 (X needs no gradient: no dX of layer 1).
            launches=4,
            goal=HostGoal("eager/fnn", 1.0),
            floor=_network_floor([2, 32, 1], 100, bias=False),
        ),
        HostCase(
            "fnn_2_32_1_fwbw_network",
            'FNN([2, 32, 1], bias=False, fusion="network") forward + backward, seed 000\'s X',
            'FNN(fusion="network"), ' + FWBW,
            SEQ,
            _network_fwbw([2, 32, 1], 100, bias=False, fusion="network"),
            launches=2,  # one forward, one backward (100 rows fit one program)
            goal=HostGoal("eager/fnn", 2.0),
            gpu_goal=HostGoal("eager/fnn", 4.0),
            floor=_network_floor([2, 32, 1], 100, bias=False),
        ),
        HostCase(
            "trainer_step_seed000",
            'Trainer(seed000_model, loss="sse", lr=1e-3).step(x, y) on seed 000',
            "fnn.Trainer.step (FNN fusion='auto': the whole-network step)",
            "zero_grad; 0.5 * ((m(x) - y) ** 2).sum(); backward; torch.optim.SGD.step",
            _trainer_seed000,
            launches=1,
            goal=HostGoal("eager/fnn", 10.0),
            gpu_goal=HostGoal("eager/fnn", 10.0),
        ),
        HostCase(
            "fnn_64x5_fwbw_layer",
            'FNN([64] * 5) (4 layers, bias) forward + backward, 256 rows, fusion="layer"',
            'FNN(fusion="layer"), ' + FWBW,
            SEQ,
            _network_fwbw([64] * 5, 256, bias=True, fusion="layer"),
            launches=8,  # 4 forward; backward: 3 fused (dW, db, dX with the delta), layer 1's dW (+db)
            floor=_network_floor([64] * 5, 256, bias=True),
        ),
        HostCase(
            "fnn_64x5_fwbw_network",
            'FNN([64] * 5) (4 layers, bias) forward + backward, 256 rows, fusion="network"',
            'FNN(fusion="network"), ' + FWBW,
            SEQ,
            _network_fwbw([64] * 5, 256, bias=True, fusion="network"),
            launches=2,  # forward; backward (256 rows fit one program: kernels.network.SINGLE_PROGRAM_ROWS)
            floor=_network_floor([64] * 5, 256, bias=True),
        ),
    ]
}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """How long to time: `rounds` alternating batches per implementation, each batch about
    `batch_s` long (at least `min_calls` calls), after `warmup` calls."""

    rounds: int = 21
    batch_s: float = 0.02
    min_calls: int = 5
    warmup: int = 200

    @classmethod
    def for_budget(cls, rep_ms: float | None, tiny: bool) -> Settings:
        if tiny:
            return cls(rounds=3, batch_s=0.0, min_calls=3, warmup=2)
        s = cls()
        if rep_ms is not None:  # the time per implementation and case
            s.batch_s = rep_ms / 1e3 / s.rounds
        return s


# The clock: this thread's CPU time, not the wall clock. On a shared machine the process
# is descheduled now and then; CPU time leaves those gaps out, and a host thread that owns
# its core (as on a GPU machine) has CPU time = wall time.
CLOCK = time.thread_time


def _batch(fn: Call, calls: int) -> float:
    """Seconds of this thread's CPU time per call over `calls` back-to-back calls."""
    start = CLOCK()
    for _ in range(calls):
        fn()
    return (CLOCK() - start) / calls


def _stats(samples_s: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in samples_s)

    def q(p: float) -> float:
        pos = p * (len(us) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(us) - 1)
        return us[lo] + (us[hi] - us[lo]) * (pos - lo)

    return {"median": statistics.median(us), "p20": q(0.2), "p80": q(0.8), "min": us[0], "batches": len(us)}


def time_calls(fns: dict[str, Call], s: Settings) -> tuple[dict[str, dict], dict[str, int]]:
    """Time the calls in alternating batches (the order reversed every other round); returns
    each one's stats (us per call) and its number of calls per batch. Garbage collection is
    off while the batches run."""
    for _ in range(s.warmup):
        for fn in fns.values():
            fn()
    calls = {}
    for name, fn in fns.items():
        probe = max(_batch(fn, 10), 1e-7)
        calls[name] = max(s.min_calls, int(s.batch_s / probe))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    enabled = gc.isenabled()
    gc.collect()  # once: a full collection of this heap takes a fraction of a second
    gc.disable()
    try:
        order = list(fns.items())
        for r in range(s.rounds):
            for name, fn in order if r % 2 == 0 else order[::-1]:
                samples[name].append(_batch(fn, calls[name]))
    finally:
        if enabled:
            gc.enable()
    return {name: _stats(v) for name, v in samples.items()}, calls


def time_pair(fnn_call: Call, eager_call: Call, s: Settings) -> tuple[dict, dict, dict]:
    """time_calls for fnn and eager: (fnn's stats, eager's stats, calls per batch)."""
    stats, calls = time_calls({"fnn": fnn_call, "eager": eager_call}, s)
    return stats["fnn"], stats["eager"], calls


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread: eager's tiny ops then never wait on an OpenMP thread that a
    busy machine has descheduled (on a GPU, dispatch is one host thread too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def count_launches(gpu, fn: Call, calls: int = 3) -> list[int]:
    """Launches of each of `calls` calls of fn (compile_only's counter)."""
    counts = []
    for _ in range(calls):
        before = gpu.count
        fn()
        counts.append(gpu.count - before)
    return counts


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def _environment(commit: str | None) -> dict[str, Any]:
    import triton

    from .runner import git_commit

    sha, dirty = (commit, None) if commit else git_commit()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "host": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": 1,  # one_thread()
        "load_average_start": _load(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_commit": sha,
        "git_dirty": dirty,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def select(names: Sequence[str] | None) -> list[HostCase]:
    if not names:
        return list(CASES.values())
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown host case(s): {', '.join(unknown)}; known: {', '.join(CASES)}")
    return [CASES[n] for n in names]


def measure_host(
    cases: Sequence[HostCase], settings: Settings, capability: int = 90, log=print
) -> list[dict]:
    """Each case under compile_only(capability): fnn's host time and launches, eager's time."""
    from .fakecuda import compile_only

    device = torch.device("cpu")
    rows = []
    with compile_only(capability, record=False) as gpu, one_thread():
        for case in cases:
            fnn_call, eager_call = case.build(device)
            t0 = time.perf_counter()
            fnn_call()  # compiles this case's kernels for the target
            eager_call()
            compile_s = time.perf_counter() - t0
            launches = count_launches(gpu, fnn_call)
            fns = {"fnn": fnn_call, "eager": eager_call}
            if case.floor is not None:
                fns["floor"] = case.floor(device)
            before = gpu.count
            stats, calls = time_calls(fns, settings)
            timed_calls = settings.warmup + 10 + settings.rounds * calls["fnn"]
            per_call_timed = (gpu.count - before) / timed_calls
            row = _row(case, stats["fnn"], stats["eager"], launches, per_call_timed, calls, compile_s,
                       stats.get("floor"))
            log(_line(row))
            rows.append(row)
    return rows


def _row(
    case, fnn_stats, eager_stats, launches, per_call_timed, calls, compile_s, floor_stats=None
) -> dict[str, Any]:
    n = launches[-1]
    total = fnn_stats["median"] + LAUNCH_US * n
    floor = None
    if floor_stats is not None:
        # The best any Python-Function design with fnn's launches could do: the floor's time
        # plus the same launches.
        floor_total = floor_stats["median"] + LAUNCH_US * n
        floor = {"us": floor_stats, "plus_launch_us": floor_total,
                 "eager_over_floor": eager_stats["median"] / floor_total}
    row: dict[str, Any] = {
        "name": case.name,
        "what": case.what,
        "fnn": case.fnn,
        "eager": case.eager,
        "launches": n,
        "launches_per_call": launches,
        "launches_per_call_timed": per_call_timed,
        "expected_launches": case.launches,
        "fnn_host_us": fnn_stats,
        "fnn_plus_launch_us": total,
        "eager_us": eager_stats,
        "eager_over_fnn": eager_stats["median"] / total,
        "calls_per_batch": calls,
        "first_call_s": compile_s,
        "floor": floor,
        "goal": None,
    }
    if case.goal is not None:
        value, passed = case.goal.evaluate(total, eager_stats["median"])
        row["goal"] = {
            "text": case.goal.text,
            "ratio": case.goal.ratio,
            "threshold": case.goal.threshold,
            "value": value,
            "passed": passed,
        }
    return row


def _line(row: dict[str, Any]) -> str:
    goal = row["goal"]
    verdict = (
        ""
        if goal is None
        else f"  {goal['ratio']} {goal['value']:.2f} ({'PASS' if goal['passed'] else 'FAIL'})"
    )
    return (
        f"{row['name']}: fnn {row['fnn_host_us']['median']:.1f} us host, {row['launches']} launch(es), "
        f"{row['fnn_plus_launch_us']:.1f} us with launches; eager {row['eager_us']['median']:.1f} us; "
        f"eager/fnn {row['eager_over_fnn']:.2f}{verdict}"
    )


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"| case | fnn host µs (p20-p80) | launches | fnn + {LAUNCH_US:g} µs/launch | eager µs (p20-p80) "
        "| eager/fnn | floor µs | eager/(floor + launches) | goal | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, e, g, fl = r["fnn_host_us"], r["eager_us"], r["goal"], r.get("floor")
        goal = "-" if g is None else f"{g['text']}: {g['ratio']} = {g['value']:.2f}"
        verdict = "-" if g is None else ("PASS" if g["passed"] else "FAIL")
        floor = "-" if fl is None else f"{fl['us']['median']:.1f}"
        best = "-" if fl is None else f"{fl['eager_over_floor']:.2f}"
        lines.append(
            f"| {r['name']} | {f['median']:.1f} ({f['p20']:.1f}-{f['p80']:.1f}) | {r['launches']} "
            f"| {r['fnn_plus_launch_us']:.1f} | {e['median']:.1f} ({e['p20']:.1f}-{e['p80']:.1f}) "
            f"| {r['eager_over_fnn']:.2f} | {floor} | {best} | {goal} | {verdict} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# End to end on a GPU (written without a GPU; not yet run)
# ---------------------------------------------------------------------------------------------


def gpu_end_to_end(
    cases: Sequence[HostCase], settings: Settings, device: torch.device | None = None, log=print
) -> dict[str, Any]:
    """The same cases on the GPU, real launches: wall clock around a batch of calls between
    two torch.cuda.synchronize(), fnn and eager alternating, median per call over batches.
    (`device` is for the tests, which run this code on the CPU with fnn's reference.)"""
    device = device or torch.device("cuda")
    cuda = device.type == "cuda"

    def batch(fn: Call, calls: int) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / calls

    rows = []
    for case in cases:
        fnn_call, eager_call = case.build(device)
        for _ in range(max(settings.warmup, 1)):
            fnn_call()
            eager_call()
        calls = {
            name: max(settings.min_calls, int(settings.batch_s / max(batch(fn, 10), 1e-7)))
            for name, fn in (("fnn", fnn_call), ("eager", eager_call))
        }
        samples: dict[str, list[float]] = {"fnn": [], "eager": []}
        for r in range(settings.rounds):
            order = (("fnn", fnn_call), ("eager", eager_call))
            for name, fn in order if r % 2 == 0 else order[::-1]:
                samples[name].append(batch(fn, calls[name]))
        f, e = _stats(samples["fnn"]), _stats(samples["eager"])
        row: dict[str, Any] = {
            "name": case.name,
            "fnn_us": f,
            "eager_us": e,
            "eager_over_fnn": e["median"] / f["median"],
            "calls_per_batch": calls,
            "goal": None,
        }
        if case.gpu_goal is not None:
            value, passed = case.gpu_goal.evaluate(f["median"], e["median"])
            row["goal"] = {"text": case.gpu_goal.text, "value": value, "passed": passed}
        log(
            f"GPU {case.name}: fnn {f['median']:.1f} us, eager {e['median']:.1f} us, "
            f"eager/fnn {row['eager_over_fnn']:.2f}"
        )
        rows.append(row)
    return {"device": torch.cuda.get_device_name(device) if cuda else str(device), "cases": rows}


# ---------------------------------------------------------------------------------------------
# Where the time goes (current code): layers of one linear_act forward, and a profile per case
# ---------------------------------------------------------------------------------------------


class _Trivial(torch.autograd.Function):
    """Saves its inputs and allocates its outputs, nothing else: the cost of the autograd
    machinery alone, for a one-node network of 100 x 1 output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, *weights)
        return x.new_empty((x.shape[0], 1))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        saved = ctx.saved_tensors
        return (None, *(torch.empty_like(w) for w in saved[1:]))


def breakdown(settings: Settings, log=print) -> dict[str, Any]:
    """Host time of each layer of `fnn.linear_act(x, w)` (100 x 2 -> 32, no gradient) and of
    the pieces it calls, each timed alone under compile_only (launch skipped), with the full
    path's layers beside them (the autograd Function, the registered op, the checked launcher,
    Triton's own launch). Layers that do not exist in the code being measured are left out."""
    import triton

    import fnn
    from fnn.functional import _check_linear
    from kernels import configs, linear_act
    from kernels.launch import launcher

    from .fakecuda import compile_only

    x, w = _linear_inputs(torch.device("cpu"), 2, 32, seed=232)
    out = torch.empty(100, 32)
    act = fnn.Activation("sigmoid")
    probes: dict[str, Call] = {}
    with compile_only(90, record=False), one_thread():
        probes["fnn.linear_act (inference: no Function)"] = lambda: fnn.linear_act(x, w)
        probes["kernels.linear_act.forward_unchecked"] = lambda: linear_act.forward_unchecked(x, w, None, act)
        fn_cls = getattr(fnn.functional, "LinearActFunction", None)
        if fn_cls is not None:
            probes["full path: LinearActFunction.apply"] = lambda: fn_cls.apply(x, w, None, "sigmoid")
        op = getattr(getattr(torch.ops, "fnn", None), "linear_act_forward", None)
        if op is not None:
            probes["full path: torch.ops.fnn.linear_act_forward"] = lambda: op(x, w, None, "sigmoid")
        probes["full path: kernels.linear_act.linear_act_forward (checked)"] = (
            lambda: linear_act.linear_act_forward(x, w, None, "sigmoid")
        )
        kernel = linear_act.linear_act_fwd_kernel
        cfg = configs.matmul_config(100, 32, 2, torch.float32)
        flags = linear_act._dtype_flags(torch.float32)
        consts = (1, False, False, flags["ACC_DTYPE"], flags["INPUT_PRECISION"], flags["UPCAST"],
                  cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m)
        strides = (*x.stride(), *w.stride(), 0, *out.stride(), *out.stride())
        args = (x, w, x, out, out, 100, 32, 2, *strides, 0.0, 0.0)
        names = ("ACTIVATION", "HAS_BIAS", "STORE_Z", "ACC_DTYPE", "INPUT_PRECISION", "UPCAST", "BLOCK_M",
                 "BLOCK_N", "BLOCK_K", "GROUP_M")
        kw = dict(zip(names, consts, strict=True), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        grid = (configs.cdiv(100, cfg.block_m) * configs.cdiv(32, cfg.block_n),)
        probes["kernel[grid](...) (JITFunction.run)"] = lambda: kernel[grid](*args, **kw)
        fast = launcher(kernel)
        probes["launch cache, full key"] = lambda: fast(grid, *args, **kw)
        ukey = ("breakdown", 100, 32, 2)
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        probes["launch cache, caller key (launch.keyed)"] = (
            lambda: fast.keyed(ukey, grid, *args, *consts, **opts)
        )
        compiled = kernel[grid](*args, **kw)
        run, function, packed = compiled.run, compiled.function, compiled.packed_metadata
        probes["CompiledKernel.run (the stand-in launcher alone)"] = lambda: run(
            grid[0], 1, 1, 0, function, packed, None, None, None, *args, *consts
        )
        probes["fnn's argument check (good arguments)"] = lambda: _check_linear(x, w, None, "sigmoid")
        probes["matmul_config (cached)"] = lambda: configs.matmul_config(100, 32, 2, torch.float32)
        probes["triton.cdiv"] = lambda: triton.cdiv(100, 64)
        probes["kernels.configs.cdiv (plain Python)"] = lambda: configs.cdiv(100, 64)
        probes["torch.empty((100, 32))"] = lambda: torch.empty((100, 32))
        probes["x.reshape + y.view"] = lambda: x.reshape(-1, 2).view(100, 2)
        # Floors of any autograd.Function design: a Function that only allocates its outputs.
        w1, w2 = torch.randn(32, 2, requires_grad=True), torch.randn(1, 32, requires_grad=True)
        gy = torch.randn(100, 1)
        probes["trivial autograd.Function.apply (no grad needed)"] = lambda: _Trivial.apply(x)
        probes["torch.autograd.grad through a trivial Function (2 weights)"] = lambda: torch.autograd.grad(
            _Trivial.apply(x, w1, w2), (w1, w2), gy
        )
        results = {}
        for name, fn in probes.items():
            fn()
            stats, _, _ = time_pair(fn, lambda: None, settings)
            results[name] = stats
            log(f"  {name}: {stats['median']:.2f} us (p20 {stats['p20']:.2f}, p80 {stats['p80']:.2f})")
    return results


def profile_cases(cases: Sequence[HostCase], calls: int = 2000, top: int = 25, log=print) -> dict[str, str]:
    """cProfile over `calls` calls of each case's fnn call under compile_only: the functions
    with the most own time (cProfile's own overhead inflates every figure; read the shares)."""
    from .fakecuda import compile_only

    reports = {}
    with compile_only(90, record=False), one_thread():
        for case in cases:
            fnn_call, _ = case.build(torch.device("cpu"))
            for _ in range(50):
                fnn_call()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                fnn_call()
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
            reports[case.name] = buf.getvalue()
            log(f"--- profile of {case.name} ({calls} calls) ---\n{buf.getvalue()}")
    return reports


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def run_host(
    names: Sequence[str] | None = None,
    tiny: bool = False,
    out_dir: str | os.PathLike | None = None,
    rep_ms: float | None = None,
    commit: str | None = None,
    gpu: bool = True,
    with_breakdown: bool = False,
    with_profile: bool = False,
    log=print,
) -> dict[str, Any]:
    """Measure the cases, print the table, write `host.json` and `host.md` to `out_dir`
    (default bench/results/host/); returns the results document."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "python -m bench --host compiles the kernels for a GPU target: unset TRITON_INTERPRET"
        )
    cases = select(names)
    settings = Settings.for_budget(rep_ms, tiny)
    env = _environment(commit)
    log(
        f"host overhead on {env['host']} ({env['cpu_count']} CPUs, load {env['load_average_start']}), "
        f"torch {env['torch']}, triton {env['triton']}: fnn's kernels compiled for sm_90a, launches "
        f"skipped, {LAUNCH_US:g} us added per launch"
    )
    results: dict[str, Any] = {
        "benchmark": "host",
        "environment": env,
        "method": {
            "fnn": "bench.fakecuda.compile_only(90): kernels compiled for sm_90a, launches skipped, "
            "CPU tensors; fnn's backend forced to its Triton kernels",
            "eager": "PyTorch eager on the CPU (torch.set_num_threads(1)), same problem, same process",
            "launch_us_added": LAUNCH_US,
            "timing": "alternating batches of back-to-back calls, gc off, warm-up excluded; the "
            "clock is the thread's CPU time (time.thread_time: descheduled gaps left out); "
            "median (p20, p80) over batches of the time per call",
            "rounds": settings.rounds,
            "batch_s": settings.batch_s,
            "warmup_calls": settings.warmup,
            "floor": "forward + backward cases: the same call through bench.host._Floor, a Python "
            "autograd.Function that only allocates its output and gradients, in the same "
            "alternation; eager_over_floor = eager / (floor + launch_us_added per fnn launch)",
            "note": "a shared, noisy machine: compare ratios within one run, not across runs",
        },
        "cases": measure_host(cases, settings, log=log),
        "gpu": None,
    }
    env["load_average_end"] = _load()
    goals = [r["goal"] for r in results["cases"] if r["goal"] is not None]
    results["goals"] = {
        "passed": sum(g["passed"] for g in goals),
        "failed": sum(not g["passed"] for g in goals),
    }
    if with_breakdown:
        log("breakdown of fnn.linear_act forward (100 x 2 -> 32), each piece timed alone:")
        results["breakdown_us"] = breakdown(settings, log=log)
    if with_profile:
        results["profiles"] = profile_cases(cases, calls=50 if tiny else 2000, log=log)
    if gpu and torch.cuda.is_available():
        results["gpu"] = gpu_end_to_end(cases, settings, log=log)
    table = format_table(results["cases"])
    log("")
    log(table)
    log(f"goals: {results['goals']['passed']} passed, {results['goals']['failed']} failed")
    out = Path(out_dir) if out_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "host.json").write_text(json.dumps(_clean(results), indent=2) + "\n")
    (out / "host.md").write_text(_summary(results, table))
    log(f"wrote {out / 'host.json'} and {out / 'host.md'}")
    return results


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _summary(results: dict[str, Any], table: str) -> str:
    env = results["environment"]
    lines = [
        "# Host overhead per call (python -m bench --host)",
        "",
        f"{env['host']}, {env['cpu_count']} CPUs (load average {env['load_average_start']} at the start, "
        f"{env.get('load_average_end')} at the end), torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}, {env['timestamp']}.",
        "",
        "CPU host times: fnn's kernels compiled for sm_90a and their launches skipped, "
        f"{LAUNCH_US:g} µs added per launch; eager PyTorch on the CPU in the same run. "
        "A shared, noisy machine: compare the ratios, not the absolute times across runs. "
        "Floor: the same call through a Python autograd.Function that only allocates its output "
        "and gradients (bench.host._Floor), timed in the same alternation; eager/(floor + "
        "launches) is the best ratio any design built on a Python autograd.Function with "
        "fnn's launches could reach.",
        "",
        table,
        "",
    ]
    gpu = results.get("gpu")
    if gpu:
        lines += [
            f"## End to end on {gpu['device']}",
            "",
            "| case | fnn µs | eager µs | eager/fnn | goal |",
            "|---|---|---|---|---|",
        ]
        for r in gpu["cases"]:
            g = r["goal"]
            goal = "-" if g is None else f"{g['text']}: {'PASS' if g['passed'] else 'FAIL'}"
            lines.append(
                f"| {r['name']} | {r['fnn_us']['median']:.1f} | {r['eager_us']['median']:.1f} "
                f"| {r['eager_over_fnn']:.2f} | {goal} |"
            )
        lines.append("")
    else:
        lines += ["End to end on a GPU: not measured (no CUDA device in this run).", ""]
    return "\n".join(lines)
