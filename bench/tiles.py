"""`python -m bench.tiles`: the per-layer GEMM kernels' tiles, measured against the heuristic.

`kernels.configs.matmul_config` picks every tile of the forward, input-gradient and
weight-gradient kernels from the shape alone, by a rule written without a GPU. A measured
tile goes into `kernels.configs.TUNED_TILES`, keyed on the kernel and the bucketed shape
(`kernels.configs.tile_config`), and serves every shape of its bucket from the first call on:
a table lookup when the launch plan is made, no timing at run time. This finds those tiles.

A problem is one kernel ("fwd", "dx" or "dw") at the shape, dtype and matmul precision of a
linear case of the benchmark registry (bench.cases); `fwd_large_fp32` also with the tf32x3
dot. The backward kernels of a layer the fused backward serves (`fwbw_small_bf16`) are left
to `python -m bench.backward`. Per problem:

1. candidates: the heuristic's tile, then a fixed list for the kind of dot (tensor cores for
   16-bit, tf32 and tf32x3; FMA for float32 "ieee"), each kept where it fits the shape;
2. pruned by the compile check (`bench.compilecheck`, compile only, in spawned processes, for
   the GPU's capability, else sm_90a): a candidate that spills, overflows shared memory or the
   register file, or lacks wgmma where a 16-bit tile needs it, is reported and dropped;
3. each survivor run once and its outputs checked against float64 with the harness's rule
   (bench.check: at most twice eager's error plus one unit of the dtype), then timed
   (triton.testing.do_bench's median on a GPU).

Writes tiles.json and tiles.md: per problem every candidate (fastest first, the pruned and the
disagreeing ones with the reason), the best one's speedup over the heuristic, and the
TUNED_TILES entries that would make the winners the default (a winner must beat the heuristic
by `--margin`, 3% by default).

    python -m bench.tiles --out DIR                         # a GPU: every problem
    python -m bench.tiles --problems fwd_large_bf16:fwd --out DIR
    python -m bench.tiles --compile-only --out DIR          # no GPU: the pruning alone
    TRITON_INTERPRET=1 python -m bench.tiles --small        # no GPU: every step, small shapes

Without CUDA, timing runs only in Triton's interpreter, at small shapes (`--small`: the times
show that every candidate runs, nothing about speed); `--compile-only` needs no interpreter.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

KERNEL_FIELDS = ("kernel", "registers", "stack", "shared", "wgmma")  # what tiles.json keeps per kernel
SMALL_SHAPE = {"M": 160, "K": 96, "N": 80}  # --small: odd sizes, every tile up to 256 rows fits
MARGIN = 0.03


@dataclasses.dataclass(frozen=True)
class Problem:
    """One kernel at one layer shape: X (M, K), W (N, K), Y (M, N)."""

    case: str
    kernel: str  # "fwd", "dx" or "dw"
    M: int
    K: int
    N: int
    dtype: torch.dtype
    precision: str  # torch's float32 matmul precision
    activation: str
    bias: bool
    dot: str | None = None  # kernels.configs.FLOAT32_HIGHEST_DOT for the run (None: the default)

    @property
    def name(self) -> str:
        return f"{self.case}:{self.kernel}" + (f":{self.dot}" if self.dot else "")

    @property
    def output(self) -> tuple[int, int, int]:
        """(rows, cols, reduction) of the kernel's output tile, as tile_config takes them."""
        M, K, N = self.M, self.K, self.N
        return {"fwd": (M, N, K), "dx": (M, K, N), "dw": (N, K, M)}[self.kernel]

    def input_precision(self) -> str:
        """The kernel's INPUT_PRECISION under this problem's settings."""
        if self.dtype != torch.float32:
            return "ieee"
        if self.precision != "highest":
            return "tf32"
        return self.dot or "ieee"

    def table_key(self) -> tuple:
        """The problem's key in kernels.configs.TUNED_TILES. The epilogue is heavy only for a
        forward of a HEAVY_DELTA activation (the backward kernels here read a light one)."""
        from kernels.checks import as_activation
        from kernels.configs import HEAVY_DELTA, shape_bucket

        rows, cols, red = self.output
        heavy = self.kernel == "fwd" and as_activation(self.activation).code in HEAVY_DELTA
        bucket = (shape_bucket(rows), shape_bucket(cols), shape_bucket(red))
        return (self.kernel, self.dtype, self.input_precision(), heavy, *bucket)

    def flop(self) -> float:
        return 2.0 * self.M * self.N * self.K

    def at(self, M: int, K: int, N: int) -> Problem:
        return dataclasses.replace(self, M=M, K=K, N=N)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "case": self.case, "kernel": self.kernel,
            "shape": {"M": self.M, "K": self.K, "N": self.N},
            "dtype": str(self.dtype).removeprefix("torch."), "precision": self.precision,
            "input_precision": self.input_precision(), "activation": self.activation, "bias": self.bias,
        }  # fmt: skip


def problems() -> list[Problem]:
    """Every problem of the registry's linear cases, each (kernel, dtype, dot, shape) once."""
    from kernels.configs import fused_backward_fits

    from .cases import CASES

    out: dict[tuple, Problem] = {}
    for case in CASES.values():
        if case.kind != "linear":
            continue
        M, K, N = case.shape["M"], case.shape["K"], case.shape["N"]
        kernels = ["fwd"]
        if case.mode == "fwbw" and not fused_backward_fits(N, K, case.dtype):
            kernels += ["dx", "dw"]
        dots: list[str | None] = [None]
        if "fnn_tf32x3" in case.extra_baselines:
            dots.append("tf32x3")
        for kernel in kernels:
            for dot in dots:
                p = Problem(case.name, kernel, M, K, N, case.dtype, case.matmul_precision,
                            case.activation, case.bias, dot)  # fmt: skip
                out.setdefault((kernel, p.dtype, p.input_precision(), M, K, N), p)
    return list(out.values())


def select(names: Sequence[str] | None) -> list[Problem]:
    everything = problems()
    if not names:
        return everything
    by_name = {p.name: p for p in everything}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown problem(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in dict.fromkeys(names)]


# ---------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------

# (block rows, block cols, block reduction, warps, stages), by the kind of dot.
TENSOR_CORE_16 = (
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 32, 8, 4), (64, 64, 64, 4, 3),
    (64, 64, 64, 4, 2), (128, 64, 64, 8, 2), (256, 64, 64, 8, 2), (128, 64, 64, 4, 1),
)  # fmt: skip
TENSOR_CORE_32 = (
    (64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 128, 32, 8, 4),
    (64, 128, 32, 4, 4), (128, 128, 16, 8, 4), (128, 64, 16, 4, 4),
)  # fmt: skip
FMA_32 = (
    (128, 64, 16, 8, 3), (64, 128, 16, 8, 3), (128, 128, 16, 8, 2), (64, 64, 16, 4, 3),
    (32, 64, 16, 4, 3), (64, 64, 32, 8, 2),
)  # fmt: skip


def _fits(block: int, size: int) -> bool:
    from kernels.configs import next_power_of_2

    return block <= max(16, next_power_of_2(size))


def candidates(problem: Problem) -> list[tuple[str, Any]]:
    """(name, TileConfig) to try: the heuristic's tile first ("heuristic BMxBNxBK wW sS"), then the list for
    the problem's kind of dot, each kept where every block fits its dimension."""
    from kernels.configs import TileConfig, matmul_config

    rows, cols, red = problem.output
    default = matmul_config(rows, cols, red, problem.dtype)
    prec = problem.input_precision()
    if problem.dtype in (torch.float16, torch.bfloat16):
        table = TENSOR_CORE_16
    elif problem.dtype == torch.float32 and prec != "ieee":
        table = TENSOR_CORE_32
    elif problem.dtype == torch.float32:
        table = FMA_32
    else:
        table = ()
    out = [(f"heuristic {_tile_name(default)}", default)]
    seen = {default}
    for bm, bn, bk, warps, stages in table:
        cfg = TileConfig(bm, bn, bk, num_warps=warps, num_stages=stages)
        if cfg in seen or not (_fits(bm, rows) and _fits(bn, cols) and _fits(bk, red)):
            continue
        seen.add(cfg)
        out.append((_tile_name(cfg), cfg))
    return out


def _tile_name(cfg: Any) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"


def is_heuristic(name: str) -> bool:
    return name.startswith("heuristic")


@contextlib.contextmanager
def tuned(entries: dict[tuple, Any]) -> Iterator[None]:
    """kernels.configs.TUNED_TILES with `entries` added, for the launches made inside. The
    per-layer launchers' cached plans and launch entries are dropped on entry and on exit
    (they are keyed on the shape, not on the tile)."""
    from kernels import configs, linear_act

    def forget() -> None:
        for steps in (linear_act._FWD_STEPS, linear_act._BWD_INPUT_STEPS, linear_act._BWD_WEIGHT_STEPS):
            steps.clear()
        for launch in (linear_act._fwd, linear_act._bwd_input, linear_act._bwd_weight):
            launch.state.clear()

    saved = dict(configs.TUNED_TILES)
    forget()
    configs.TUNED_TILES.update(entries)
    try:
        yield
    finally:
        configs.TUNED_TILES.clear()
        configs.TUNED_TILES.update(saved)
        forget()


@contextlib.contextmanager
def settings(problem: Problem) -> Iterator[None]:
    """The problem's matmul precision and float32 "highest" dot, for the duration."""
    from .problems import float32_highest_dot
    from .runner import matmul_precision

    with matmul_precision(problem.precision):
        with float32_highest_dot(problem.dot) if problem.dot else contextlib.nullcontext():
            yield


# ---------------------------------------------------------------------------------------------
# Running one problem
# ---------------------------------------------------------------------------------------------


def inputs(problem: Problem, device: torch.device, empty: bool = False) -> dict[str, torch.Tensor | None]:
    """x, w, b, dy and y (the forward's output, what the backward kernels read) on `device`;
    left uninitialised with `empty` (the compile check: nothing is computed)."""
    from .problems import _randn

    M, K, N, dt = problem.M, problem.K, problem.N, problem.dtype
    if empty:
        t = {"x": (M, K), "w": (N, K), "b": (N,), "dy": (M, N), "y": (M, N)}
        out = {k: torch.empty(s, dtype=dt, device=device) for k, s in t.items()}
        out["b"] = out["b"] if problem.bias else None
        return out
    from fnn import reference

    g = torch.Generator(device=device).manual_seed(0)
    x, w = _randn((M, K), g, device, dt), _randn((N, K), g, device, dt, K**-0.5)
    b = _randn((N,), g, device, dt, 0.5) if problem.bias else None
    dy = _randn((M, N), g, device, dt)
    with settings(problem):
        y = reference.linear_act(x, w, b, problem.activation)  # what the forward gives, to the dtype
    return {"x": x, "w": w, "b": b, "dy": dy, "y": y}


def runner(problem: Problem, t: dict[str, torch.Tensor | None]) -> Callable[[], tuple[torch.Tensor, ...]]:
    """fnn's launcher of the problem's kernel on `t`: its outputs (db only with a bias)."""
    from kernels import linear_act as la

    act = problem.activation
    if problem.kernel == "fwd":
        return lambda: (la.linear_act_forward(t["x"], t["w"], t["b"], act),)
    if problem.kernel == "dx":
        return lambda: (la.linear_act_backward_input(t["dy"], t["y"], t["w"], act),)

    def dw() -> tuple[torch.Tensor, ...]:
        grads = la.linear_act_backward_weight(t["dy"], t["y"], t["x"], act, problem.bias)
        return tuple(g for g in grads if g is not None)

    return dw


def reference(problem: Problem, t: dict[str, torch.Tensor | None], dtype: torch.dtype | None):
    """(output names, the problem's outputs computed by PyTorch from `t` cast to `dtype`:
    float64 for the reference, None for eager in the problem's dtype)."""
    from fnn import reference as ref

    c = {k: (v if v is None or dtype is None else v.to(dtype)) for k, v in t.items()}
    act = problem.activation
    if problem.kernel == "fwd":
        return ("y",), (ref.linear_act(c["x"], c["w"], c["b"], act),)
    dx, dw, db = ref.linear_act_backward(c["dy"], c["y"], c["w"], c["x"], act, problem.bias)
    if problem.kernel == "dx":
        return ("dx",), (dx,)
    return (("dw", "db"), (dw, db)) if problem.bias else (("dw",), (dw,))


# ---------------------------------------------------------------------------------------------
# Pruning: the compile check, in spawned processes
# ---------------------------------------------------------------------------------------------


def _label(problem: Problem, name: str) -> str:
    return f"{problem.name} | {name}"


def prune_worker(capability: int, jobs: list[tuple[Problem, str, Any]]) -> dict[str, Any]:
    """In a fresh process: compile each (problem, candidate name, tile) for `capability`
    without a GPU (bench.compilecheck); {label: {"failures": [...], "registers", "stack",
    "shared"}} per candidate (failures empty: it passes)."""
    os.environ.pop("TRITON_INTERPRET", None)  # before kernels are imported: compiled functions
    from .compilecheck import Call, compile_calls

    calls = []
    for problem, name, cfg in jobs:

        def run(problem=problem, cfg=cfg) -> None:
            with tuned({problem.table_key(): cfg}), settings(problem):
                runner(problem, inputs(problem, torch.device("cpu"), empty=True))()

        calls.append(Call(_label(problem, name), run, problem.precision))
    result = compile_calls(calls, capability)
    verdicts: dict[str, Any] = {c.label: {"failures": [], "kernels": []} for c in calls}
    for rec in result.records:
        for label in rec["calls"]:
            if label in verdicts:
                v = verdicts[label]
                v["kernels"].append({k: rec.get(k) for k in KERNEL_FIELDS})
                v["failures"] += [f"{f['kind']}: {f['detail']}" for f in rec["failures"]]
    for err in result.call_errors:
        if err["call"] in verdicts:
            verdicts[err["call"]]["failures"].append(f"error: {err['error']}")
    return verdicts


def prune(
    jobs: list[tuple[Problem, str, Any]], capability: int, processes: int | None = None
) -> dict[str, Any]:
    """prune_worker over `processes` spawned processes (default: the cores, at most 8)."""
    if not jobs:
        return {}
    n = max(1, min(processes or min(8, os.cpu_count() or 1), len(jobs)))
    ctx = multiprocessing.get_context("spawn")
    verdicts: dict[str, Any] = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
        for part in pool.map(prune_worker, [capability] * n, [jobs[i::n] for i in range(n)]):
            verdicts.update(part)
    return verdicts


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _target(capability: int) -> str:
    from .compilecheck import TARGET_NAMES

    return TARGET_NAMES.get(capability, f"sm_{capability}")


def _timer(device: torch.device, rep_ms: float):
    from .timing import CpuTimer, CudaTimer

    if device.type == "cuda":
        return CudaTimer(device, rep_ms=rep_ms)
    return CpuTimer(rep_ms=rep_ms, max_samples=10)


def _tile_json(cfg: Any) -> dict[str, int]:
    return dataclasses.asdict(cfg)


def entry_text(problem: Problem, cfg: Any) -> str:
    """The TUNED_TILES line that makes `cfg` the tile of the problem's bucket."""
    kernel, dtype, prec, heavy, rows, cols, red = problem.table_key()
    return (
        f'("{kernel}", torch.{str(dtype).removeprefix("torch.")}, "{prec}", {heavy}, {rows}, {cols}, {red}): '
        f"TileConfig({cfg.block_m}, {cfg.block_n}, {cfg.block_k}, group_m={cfg.group_m}, "
        f"num_warps={cfg.num_warps}, num_stages={cfg.num_stages}),"
    )


def measure(
    chosen: Sequence[Problem],
    device: torch.device,
    *,
    small: bool = False,
    compile_only: bool = False,
    max_candidates: int | None = None,
    rep_ms: float = 100.0,
    margin: float = MARGIN,
    processes: int | None = None,
    budget_s: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Prune, check and time the candidates of each problem (at SMALL_SHAPE with `small`;
    pruned only with `compile_only`); the results document. Past `budget_s` seconds from the
    start, only each problem's heuristic tile is still timed (the others: status "skipped"),
    so that a run under a time limit ends with a report."""
    from .check import compare

    deadline = None if budget_s is None else time.perf_counter() + budget_s

    capability = 90
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        capability = major * 10 + minor
    plan = []
    for problem in chosen:
        run_problem = problem.at(**SMALL_SHAPE) if small else problem
        cands = candidates(run_problem)[: max_candidates or None]
        plan.append((problem, run_problem, cands))
    jobs = [(run_problem, name, cfg) for _, run_problem, cands in plan for name, cfg in cands]
    log(f"compile check of {len(jobs)} candidates for {_target(capability)}")
    start = time.perf_counter()
    verdicts = prune(jobs, capability, processes)
    log(f"compile check: {time.perf_counter() - start:.1f} s")
    timer = None if compile_only else _timer(device, rep_ms)
    results = []
    for problem, run_problem, cands in plan:
        log(f"== {problem.name}: {run_problem.to_json()['shape']}, {problem.to_json()['dtype']}, "
            f"{problem.input_precision()}")  # fmt: skip
        rows: list[dict[str, Any]] = []
        t = None if compile_only else inputs(run_problem, device)
        if t is not None:
            names, ref = reference(run_problem, t, torch.float64)
            with settings(run_problem):
                _, eager = reference(run_problem, t, None)
        for name, cfg in cands:
            row: dict[str, Any] = {"name": name, "tile": _tile_json(cfg)}
            verdict = verdicts.get(_label(run_problem, name), {"failures": ["not compiled"], "kernels": []})
            row["compile"] = verdict
            rows.append(row)
            if verdict["failures"]:
                row.update(status="pruned", message="; ".join(verdict["failures"])[:400])
                log(f"{name:<22} PRUNED {row['message']}")
                continue
            if compile_only:
                row["status"] = "compiles"
                regs = max((k["registers"] or 0 for k in verdict["kernels"]), default=0)
                log(f"{name:<22} compiles ({regs} registers)")
                continue
            if deadline is not None and not is_heuristic(name) and time.perf_counter() > deadline:
                row.update(status="skipped", message=f"the time budget ({budget_s:g} s) was spent")
                log(f"{name:<22} SKIPPED {row['message']}")
                continue
            with tuned({run_problem.table_key(): cfg}), settings(run_problem):
                run = runner(run_problem, t)
                try:
                    out = run()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                except Exception as e:  # a tile that does not launch: reported, not timed
                    row.update(status="error", message=f"{type(e).__name__}: {e}"[:400])
                    log(f"{name:<22} ERROR {row['message']}")
                    continue
                check = compare(names, out, eager, ref, run_problem.dtype)
                row["check"] = check
                if not check["passed"]:
                    row.update(status="disagrees", message=check["message"][:400])
                    log(f"{name:<22} DISAGREES {row['message']}")
                    continue
                timing = timer.measure(run)
            tflops = run_problem.flop() / (timing.median_ms * 1e-3) / 1e12
            row.update(status="ok", **timing.to_json(), tflops=tflops)
            log(f"{name:<22} {timing.median_ms * 1e3:10.1f} us  {row['tflops']:8.2f} TFLOP/s")
        timed = [r for r in rows if r["status"] == "ok"]
        heuristic = next((r for r in timed if is_heuristic(r["name"])), None)
        best = min(timed, key=lambda r: r["median_ms"]) if timed else None
        gain = heuristic["median_ms"] / best["median_ms"] if best and heuristic else None
        doc: dict[str, Any] = {
            **problem.to_json(),
            "run_shape": run_problem.to_json()["shape"],
            "table_key": list(map(str, run_problem.table_key())),
            "candidates": rows,
            "best": best["name"] if best else None,
            "best_over_heuristic": gain,
            "tuned_entry": None,
        }
        if gain and best is not heuristic and gain >= 1 + margin:
            cfg = next(cfg for name, cfg in cands if name == best["name"])
            doc["tuned_entry"] = entry_text(run_problem, cfg)
        results.append(doc)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "capability": capability,
        "small": small,
        "compile_only": compile_only,
        "margin": margin,
        "timer": timer.describe() if timer else None,
        "performance_numbers": device.type == "cuda" and not small and not compile_only,
        "problems": results,
    }


def table(doc: dict[str, Any]) -> str:
    what = "compile check only" if doc["compile_only"] else "checked and timed"
    lines = [
        "# Per-layer GEMM tiles against the heuristic (python -m bench.tiles)",
        "",
        f"On {doc['device']} (compile check for {_target(doc['capability'])}), {what}.",
    ]
    if not doc["performance_numbers"] and not doc["compile_only"]:
        lines.append("Not a performance run (no GPU, or small shapes): the times show that every tile runs.")
    entries = []
    for p in doc["problems"]:
        s = p["run_shape"]
        shape = f"M={s['M']} K={s['K']} N={s['N']}"
        lines += ["", f"## {p['name']}: {shape}, {p['dtype']}, {p['input_precision']}", ""]
        lines += ["| tile | status | median us (p20-p80) | TFLOP/s |", "|---|---|---|---|"]
        ok = sorted((r for r in p["candidates"] if r["status"] == "ok"), key=lambda r: r["median_ms"])
        for r in ok:
            lines.append(f"| {r['name']} | ok | {r['median_ms'] * 1e3:.1f} ({r['p20_ms'] * 1e3:.1f}-"
                         f"{r['p80_ms'] * 1e3:.1f}) | {r['tflops']:.2f} |")  # fmt: skip
        for r in p["candidates"]:
            if r["status"] != "ok":
                why = f": {r['message'][:150]}" if "message" in r else ""
                lines.append(f"| {r['name']} | {r['status']}{why} | - | - |")
        if p["best_over_heuristic"]:
            lines.append(f"\nbest: {p['best']}, {p['best_over_heuristic']:.3f}x the heuristic")
        if p["tuned_entry"]:
            entries.append(p["tuned_entry"])
    lines += ["", "## TUNED_TILES entries (kernels/configs.py)", ""]
    if doc["compile_only"]:
        lines.append("none: compile check only, nothing timed")
    elif entries:
        lines += ["```python", *entries, "```"]
    else:
        lines.append(f"none: no timed tile beat the heuristic by {doc['margin']:.0%} or more")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tiles", description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", metavar="CASE:KERNEL", help="these problems only (--list)")
    p.add_argument("--list", action="store_true", help="list the problems and their candidates")
    p.add_argument("--compile-only", action="store_true", help="the pruning alone (no GPU needed)")
    p.add_argument("--small", action="store_true", help="small shapes (the interpreter; not performance)")
    p.add_argument("--max-candidates", type=int, help="the first N candidates of each problem (N >= 1)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="timing budget per candidate")
    p.add_argument("--margin", type=float, default=MARGIN, help="how much faster a tuned entry must be")
    p.add_argument("--processes", type=int, help="compile-check processes (default: the cores, at most 8)")
    p.add_argument(
        "--budget-s", type=float, help="past this many seconds, time only each problem's heuristic tile"
    )
    p.add_argument("--out", metavar="DIR", help="write tiles.json and tiles.md here")
    args = p.parse_args(argv)
    for name, value, low in (
        ("--max-candidates", args.max_candidates, 1),
        ("--processes", args.processes, 1),
    ):
        if value is not None and value < low:
            p.error(f"{name} must be >= {low}, got {value}")
    for name, value, strict in (
        ("--rep-ms", args.rep_ms, True),
        ("--budget-s", args.budget_s, False),
        ("--margin", args.margin, False),
    ):
        if value is not None and not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
            p.error(f"{name} must be a finite number {'> 0' if strict else '>= 0'}, got {value}")
    try:
        chosen = select(args.problems)
    except ValueError as e:
        print(f"bench.tiles: {e}", file=sys.stderr)
        return 2
    if args.list:
        for prob in chosen:
            names = [name for name, _ in candidates(prob)]
            print(f"{prob.name}: M={prob.M} K={prob.K} N={prob.N} {prob.to_json()['dtype']} "
                  f"{prob.input_precision()}: {', '.join(names)}")  # fmt: skip
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and not args.compile_only and os.environ.get("TRITON_INTERPRET") != "1":
        print(
            "bench.tiles: no CUDA device. Without one: --compile-only (the pruning), or "
            "TRITON_INTERPRET=1 python -m bench.tiles --small (every step; the times mean nothing)",
            file=sys.stderr,
        )
        return 2
    small = args.small or (not cuda and not args.compile_only)
    device = torch.device("cuda" if cuda else "cpu")
    start = time.time()
    doc = measure(
        chosen, device, small=small, compile_only=args.compile_only, max_candidates=args.max_candidates,
        rep_ms=args.rep_ms, margin=args.margin, processes=args.processes, budget_s=args.budget_s,
    )  # fmt: skip
    from .report import write_sweep

    write_sweep(doc, table(doc), args.out, "tiles", start)
    rows = [r for prob in doc["problems"] for r in prob["candidates"]]
    bad = any(r["status"] in ("error", "disagrees") for r in rows)
    heuristic_pruned = any(is_heuristic(r["name"]) and r["status"] == "pruned" for r in rows)
    return 1 if bad or heuristic_pruned else 0


if __name__ == "__main__":
    sys.exit(main())
