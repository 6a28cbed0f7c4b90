"""Run the cases: ceilings first, then per case build, check, warm up, time, measure memory,
and evaluate the goals. `run(...)` returns the results document (the JSON) and writes the
report files as it goes (the JSON after every case, so an interrupted run keeps what it did).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import fnn

from . import report
from .cases import Case, Goal, select
from .check import check
from .problems import Problem, build
from .timing import CpuTimer, CudaTimer

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

GEMM_DTYPES = {
    "bf16": (torch.bfloat16, "highest"),
    "fp16": (torch.float16, "highest"),
    "tf32": (torch.float32, "high"),
    "fp32": (torch.float32, "highest"),
    "fp64": (torch.float64, "highest"),
}


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch.set_float32_matmul_precision for the duration (fnn reads the same setting)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def device_slug(name: str) -> str:
    """A folder name for a device: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") or "device"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository, BENCH_GIT_COMMIT overriding; (None, None) without git."""
    env = os.environ.get("BENCH_GIT_COMMIT")
    if env:
        return env, None
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip(), (bool(status.stdout.strip()) if status.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment(device: torch.device, commit: str | None) -> dict[str, Any]:
    import triton

    sha, dirty = (commit, None) if commit else git_commit()
    env: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": sha,
        "git_dirty": dirty,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fnn_backend": fnn.backend(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["capability"] = f"{props.major}.{props.minor}"
        env["multiprocessors"] = props.multi_processor_count
        env["l2_bytes"] = getattr(props, "L2_cache_size", None)
        env["memory_bytes"] = props.total_memory
    return env


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------


def measure_ceilings(timer, device: torch.device, gemm_tags: Sequence[str], tiny: bool, log, bar) -> dict:
    """Copy bandwidth (bytes read + written over time) and GEMM TFLOP/s at 8192^3, per dtype."""
    ceilings: dict[str, Any] = {}
    n = (1 << 16) if tiny else (1 << 28)
    gen = torch.Generator(device=device)
    gen.manual_seed(1)
    src = torch.randn(n, generator=gen, device=device)
    dst = torch.empty_like(src)
    bar.set_postfix_str("copy bandwidth")
    timing = timer.measure(lambda src=src, dst=dst: dst.copy_(src))
    moved = 2 * n * src.element_size()
    ceilings["copy"] = {
        "GBps": moved / (timing.median_ms * 1e-3) / 1e9,
        "bytes": moved,
        "what": f"dst.copy_(src), {n * src.element_size() / 2**20:g} MiB float32, bytes read + written",
        "timing": timing.to_json(),
    }
    log(f"ceiling copy: {ceilings['copy']['GBps']:.1f} GB/s ({ceilings['copy']['what']})")
    del src, dst
    bar.update()
    size = 64 if tiny else 8192
    for tag in gemm_tags:
        dtype, precision = GEMM_DTYPES[tag]
        bar.set_postfix_str(f"gemm {tag}")
        with matmul_precision(precision):
            a = torch.randn((size, size), generator=gen, device=device).to(dtype)
            b = torch.randn((size, size), generator=gen, device=device).to(dtype)
            c = torch.empty((size, size), device=device, dtype=dtype)
            torch.mm(a, b, out=c)
            timing = timer.measure(lambda a=a, b=b, c=c: torch.mm(a, b, out=c))
        ceilings[f"gemm_{tag}"] = {
            "TFLOPs": 2.0 * size**3 / (timing.median_ms * 1e-3) / 1e12,
            "shape": [size, size, size],
            "what": f"torch.mm {size}^3 {tag} (float32 matmul precision {precision!r})",
            "timing": timing.to_json(),
        }
        log(f"ceiling gemm_{tag}: {ceilings[f'gemm_{tag}']['TFLOPs']:.2f} TFLOP/s ({size}^3)")
        del a, b, c
        bar.update()
    return ceilings


# ---------------------------------------------------------------------------------------------
# Goals
# ---------------------------------------------------------------------------------------------


def evaluate_goal(goal: Goal, result: dict[str, Any], ceilings: dict[str, Any]) -> dict[str, Any]:
    """{text, kind, baseline, target, measured, passed, note}; passed is None when unmeasured."""
    out = {**goal.to_json(), "measured": None, "passed": None, "note": ""}
    if result.get("status") == "failed":
        out["passed"] = False
        out["note"] = "the case failed its correctness check: fnn disagrees with eager"
        return out
    med = result.get("median_ms") or {}
    fnn_ms = med.get("fnn")
    if fnn_ms is None:
        out["note"] = "fnn was not timed"
        return out
    if goal.kind in ("speedup", "at_most"):
        base = med.get(goal.baseline)
        if base is None:
            why = (result.get("skipped") or {}).get(goal.baseline) or (result.get("errors") or {}).get(
                goal.baseline
            )
            out["note"] = f"{goal.baseline} was not timed" + (f": {why}" if why else "")
            return out
        if goal.kind == "speedup":
            out["measured"] = base / fnn_ms
            out["passed"] = out["measured"] >= goal.target
        else:
            out["measured"] = fnn_ms / base
            out["passed"] = out["measured"] <= goal.target
    elif goal.kind == "bandwidth":
        copy = ceilings.get("copy", {}).get("GBps")
        if not copy:
            out["note"] = "no copy bandwidth was measured"
            return out
        out["measured"] = result["gbps"]["fnn"] / copy
        out["passed"] = out["measured"] >= goal.target
    elif goal.kind == "error":
        tensors = (result.get("check") or {}).get("tensors") or {}
        if not tensors:
            out["note"] = "no correctness check was recorded"
            return out
        ratios = []
        for t in tensors.values():
            ours, theirs = t["max_err_fnn"], t["max_err_eager"]
            ratios.append(ours / theirs if theirs else (0.0 if ours == 0 else math.inf))
        out["measured"] = max(ratios)
        out["passed"] = out["measured"] <= goal.target
        out["note"] = "largest ratio over the outputs of fnn's max error to eager's, against float64"
    elif goal.kind == "memory":
        mem = result.get("peak_memory_bytes") or {}
        ours, theirs = mem.get("fnn"), mem.get(goal.baseline)
        if ours is None or theirs is None:
            out["note"] = result.get("peak_memory_note") or "peak memory was not measured"
            return out
        out["measured"] = ours / theirs if theirs else math.inf
        out["passed"] = ours <= goal.target * theirs
    return out


def goals_verdict(goals: list[dict[str, Any]]) -> bool | None:
    """False if any goal failed, True if all passed, None if some were not measured."""
    verdicts = [g["passed"] for g in goals]
    if any(v is False for v in verdicts):
        return False
    if all(v is True for v in verdicts):
        return True
    return None


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------


def case_result_skeleton(case: Case) -> dict[str, Any]:
    return {
        **case.to_json(),
        "description": case.describe(),
        "status": "pending",
        "error": None,
        "errors": {},
        "skipped": {},
        "check": None,
        "timing_method": None,
        "input_sets": None,
        "median_ms": {name: None for name in case.implementations},
        "timings": {},
        "median_ms_no_graph": {},
        "warmup_s": {},
        "peak_memory_bytes": None,
        "peak_memory_note": None,
        "flop": None,
        "bytes": None,
        "bound": None,
        "roofline_ms": None,
        "roofline_ceilings": None,
        "tflops": {},
        "gbps": {},
        "roofline_fraction": {},
        "speedup": {},
        "goals": [],
        "goals_passed": None,
    }


def derive(result: dict[str, Any], problem: Problem, case: Case, ceilings: dict[str, Any]) -> None:
    """Achieved TFLOP/s and GB/s, the roofline time and fraction, fnn's speedups."""
    result["flop"], result["bytes"] = problem.flop, problem.bytes
    gemm = ceilings.get(f"gemm_{case.gemm_tag}", {}).get("TFLOPs")
    copy = ceilings.get("copy", {}).get("GBps")
    if gemm and copy:
        t_flop = problem.flop / (gemm * 1e12) * 1e3
        t_bytes = problem.bytes / (copy * 1e9) * 1e3
        result["roofline_ms"] = max(t_flop, t_bytes)
        result["bound"] = "compute" if t_flop >= t_bytes else "memory"
        result["roofline_ceilings"] = {"gemm": f"gemm_{case.gemm_tag}", "copy": "copy"}
    for name, ms in result["median_ms"].items():
        if ms is None:
            continue
        result["tflops"][name] = problem.flop / (ms * 1e-3) / 1e12
        result["gbps"][name] = problem.bytes / (ms * 1e-3) / 1e9
        if result["roofline_ms"]:
            result["roofline_fraction"][name] = result["roofline_ms"] / ms
    fnn_ms = result["median_ms"].get("fnn")
    for name in case.baselines:
        ms = result["median_ms"].get(name)
        result["speedup"][name] = (ms / fnn_ms) if (ms is not None and fnn_ms) else None


def run_case(
    case: Case,
    device: torch.device,
    timer,
    compile_options: dict[str, Any],
    l2_bytes: int,
    max_sets: int,
    warmup_calls: int,
    ceilings: dict[str, Any],
    log,
    bar,
) -> dict[str, Any]:
    result = case_result_skeleton(case)
    problem = None
    try:
        with matmul_precision(case.matmul_precision):
            torch._dynamo.reset()
            bar.set_postfix_str(f"{case.name}: inputs")
            problem = build(case, device, compile_options, l2_bytes, max_sets)
            result["input_sets"] = len(problem.input_sets)
            result["flop"], result["bytes"] = problem.flop, problem.bytes

            bar.set_postfix_str(f"{case.name}: check")
            verdict = check(problem)
            result["check"] = verdict
            bar.update()
            if not verdict["passed"]:
                result["status"] = "failed"
                result["error"] = f"fnn disagrees with eager: {verdict['message']}"
                log(f"!!! {case.name} FAILED its check, not timed: {result['error']}", error=True)
                bar.update(len(case.implementations))
                return result
            log(f"{case.name}: check passed ({_check_line(verdict)})")
            for name, v in verdict.get("variants", {}).items():
                if v["passed"]:
                    log(f"{case.name}/{name}: check passed ({_check_line(v)})")
                else:
                    result["errors"][name] = f"disagrees with eager: {v['message']}"
                    log(f"!!! {case.name}/{name} FAILED its check, not timed: {v['message']}", error=True)

            calls = {}
            estimates = {}
            for name in case.implementations:
                if name in result["errors"]:
                    continue
                if name in problem.unavailable:
                    result["skipped"][name] = problem.unavailable[name]
                    log(f"{case.name}/{name}: not run here ({problem.unavailable[name]})")
                    continue
                bar.set_postfix_str(f"{case.name}: warm-up {name}")
                fn = problem.rotating(name)
                try:
                    start = time.perf_counter()
                    for _ in range(warmup_calls):
                        fn()
                    timer.sync()
                    result["warmup_s"][name] = time.perf_counter() - start
                    estimates[name] = timer.estimate_ms(fn)
                    calls[name] = fn
                except Exception as exc:  # one broken implementation must not hide the others
                    result["errors"][name] = f"{type(exc).__name__}: {exc}"
                    log(f"!!! {case.name}/{name} failed in warm-up: {result['errors'][name]}", error=True)
                    log(traceback.format_exc(), error=True)
            # CUDA graphs for the cases of a few microseconds (as the case says, else by estimate).
            use_graph = case.cuda_graph
            if use_graph is None:
                use_graph = bool(estimates) and min(estimates.values()) < getattr(timer, "graph_below_ms", 0)
            use_graph = bool(use_graph and timer.supports_graphs)
            result["timing_method"] = "cuda_graph" if use_graph else timer.name
            for name in case.implementations:
                if name not in calls:
                    result["median_ms"][name] = None
                    bar.update()
                    continue
                bar.set_postfix_str(f"{case.name}: time {name}")
                try:
                    timing = timer.measure(calls[name], graph=use_graph)
                except Exception as exc:
                    result["errors"][name] = f"timing failed: {type(exc).__name__}: {exc}"
                    log(f"!!! {case.name}/{name}: {result['errors'][name]}", error=True)
                    result["median_ms"][name] = None
                    bar.update()
                    continue
                result["timings"][name] = timing.to_json()
                result["median_ms"][name] = timing.median_ms
                log(f"{case.name}/{name}: median {timing.median_ms:.4f} ms ({timing.method})")
                bar.update()
            if use_graph:  # also without the graph: what an eager training loop would see
                for name, fn in calls.items():
                    bar.set_postfix_str(f"{case.name}: {name} without graph")
                    try:
                        result["median_ms_no_graph"][name] = timer.measure(fn).median_ms
                    except Exception as exc:
                        result["errors"][name] = f"timing without graph failed: {type(exc).__name__}: {exc}"
                        log(f"!!! {case.name}/{name}: {result['errors'][name]}", error=True)
                log(
                    f"{case.name} without CUDA graph (launch overhead included): "
                    + ", ".join(f"{n} {ms:.4f} ms" for n, ms in result["median_ms_no_graph"].items())
                )
            if case.mode in ("fwbw", "step"):
                if device.type == "cuda":
                    result["peak_memory_bytes"] = {}
                    for name in calls:
                        fn = lambda n=name, p=problem: p.run(n, 0)
                        result["peak_memory_bytes"][name] = timer.peak_memory(fn)
                    result["peak_memory_note"] = (
                        "torch.cuda.max_memory_allocated during one forward+backward, above the "
                        "memory allocated before it (inputs excluded)"
                    )
                else:
                    result["peak_memory_note"] = "needs CUDA (torch.cuda.max_memory_allocated)"
            derive(result, problem, case, ceilings)
            result["status"] = "error" if result["errors"] else "ok"
    except Exception as exc:
        result["status"] = "error"
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"!!! {case.name} raised {result['error']}", error=True)
        log(traceback.format_exc(), error=True)
    finally:
        del problem
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _check_line(verdict: dict[str, Any]) -> str:
    parts = []
    for name, t in verdict["tensors"].items():
        parts.append(f"{name} err {t['max_err_fnn']:.2e} vs eager {t['max_err_eager']:.2e}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def default_compile_options(tiny: bool) -> dict[str, Any]:
    if tiny:
        return {"backend": "aot_eager"}
    return {"backend": "inductor", "mode": "max-autotune-no-cudagraphs"}


def run(
    case_names: Sequence[str] | None = None,
    *,
    quick: bool = False,
    tiny: bool = False,
    device: torch.device | str | None = None,
    out_dir: str | Path | None = None,
    compile_options: dict[str, Any] | None = None,
    rep_ms: float | None = None,
    warmup_calls: int = 3,
    max_sets: int | None = None,
    progress: bool = True,
    commit: str | None = None,
    command: Sequence[str] | None = None,
) -> tuple[dict[str, Any], int]:
    """Run the cases and write the report; return (results, exit status).

    The exit status is 1 when a case failed its check or raised, else 0 (goals that are not
    met are reported, not turned into a failing status). `tiny` runs every case at a tiny
    shape (tests, smoke runs on the CPU through Triton's interpreter).
    """
    cases = select(case_names, quick=quick)
    if tiny:
        cases = [c.at_tiny() for c in cases]
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        timer = CudaTimer(dev, rep_ms=rep_ms or (40.0 if quick else 100.0))
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 50 * 2**20
    elif tiny:
        timer = CpuTimer(rep_ms=rep_ms or 20.0)
        l2 = 1 << 20  # stands in for a cache, so that tiny cases exercise the rotation
    else:
        raise ValueError("benchmarks at full size need a CUDA device (use tiny=True on the CPU)")
    if max_sets is None:
        max_sets = 3 if tiny else 8
    compile_options = dict(compile_options or default_compile_options(tiny))

    env = environment(dev, commit)
    folder = device_slug(env["device"]) + ("-tiny" if tiny else "")
    out = Path(out_dir) if out_dir is not None else RESULTS / folder
    out.mkdir(parents=True, exist_ok=True)
    gemm_tags = list(dict.fromkeys(["bf16", *(c.gemm_tag for c in cases)]))

    from tqdm import tqdm

    steps = 1 + len(gemm_tags) + sum(1 + len(c.implementations) for c in cases)
    results: dict[str, Any] = {
        "schema": 1,
        **env,
        "command": list(command) if command is not None else None,
        "tiny": tiny,
        "compile": compile_options,
        "timer": timer.describe(),
        "l2_bytes_for_rotation": l2,
        "ceilings": {},
        "cases": [],
    }
    header = " ".join(command) if command is not None else f"bench.run({[c.name for c in cases]})"
    with (
        report.RunLog(out / report.LOG_NAME, header=header) as log,
        tqdm(
            total=steps,
            desc="bench",
            unit="step",
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 5.0,
        ) as bar,
    ):
        log.bar = bar
        log(f"python -m bench: {len(cases)} case(s) on {env['device']} ({env['fnn_backend']} fnn kernels)")
        log(
            f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {env['git_commit']}, "
            f"compile {compile_options}"
        )
        if tiny:
            log("tiny mode: every case at a tiny shape; the numbers test the harness, not performance")
        results["ceilings"] = measure_ceilings(timer, dev, gemm_tags, tiny, log, bar)
        report.write_json(results, out)
        for case in cases:
            log(f"== {case.name}: {case.describe()}")
            result = run_case(
                case, dev, timer, compile_options, l2, max_sets, warmup_calls, results["ceilings"], log, bar
            )
            result["goals"] = [evaluate_goal(g, result, results["ceilings"]) for g in case.all_goals]
            result["goals_passed"] = goals_verdict(result["goals"])
            results["cases"].append(result)
            report.write_json(results, out)
        bar.set_postfix_str("report")
        results["summary"] = report.tally(results)
        report.write_json(results, out)
        table = report.format_table(results)
        log("")
        log(table)
        report.write_summary(results, out)
        plots = report.write_plots(results, out)
        log(
            f"wrote {out / report.JSON_NAME}, {out / report.SUMMARY_NAME}, "
            f"{', '.join(str(p) for p in plots)} and {out / report.LOG_NAME}"
        )
    status = 1 if any(c["status"] in ("failed", "error") for c in results["cases"]) else 0
    return results, status
