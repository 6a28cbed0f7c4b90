"""`python -m bench`: time fnn against PyTorch eager, torch.compile and cuBLAS on a CUDA GPU.
`python -m bench --host`: fnn's host time per call on small problems, on any machine."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Sequence

import torch

from .cases import CASES

NO_CUDA = (
    "no CUDA device: python -m bench times GPU kernels and needs an NVIDIA GPU "
    "(torch.cuda.is_available() is False); nothing was measured."
)


def list_cases() -> str:
    lines = []
    for c in CASES.values():
        goals = "; ".join(g.text for g in c.all_goals)
        lines.append(f"{c.name}{' (quick)' if c.quick else ''}: {c.describe()}")
        lines.append(f"    implementations: {', '.join(c.implementations)}")
        lines.append(f"    goals: {goals}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        epilog="Results go to bench/results/<gpu-name>/: results.json, summary.md, run.log and PNG plots.",
    )
    p.add_argument("--quick", action="store_true", help="a few small cases with shorter timing (smoke run)")
    p.add_argument("--cases", nargs="+", metavar="NAME", help="run these cases (see --list)")
    p.add_argument("--out", metavar="DIR", help="write the results here (default bench/results/<gpu-name>)")
    p.add_argument("--list", action="store_true", help="list the cases and their goals, then exit")
    p.add_argument(
        "--rep", type=float, metavar="MS", help="timing budget per measurement in ms (default 100)"
    )
    p.add_argument("--commit", metavar="SHA", help="git commit to record when the tree has no .git")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--host",
        action="store_true",
        help="host overhead per call on small problems, without a GPU: kernels compiled for "
        "sm_90a, launches skipped, against eager PyTorch on the CPU (bench/host.py); with a GPU, "
        "also end to end on it. Results in bench/results/host/",
    )
    p.add_argument(
        "--breakdown", action="store_true", help="with --host: time each layer of one linear_act call"
    )
    p.add_argument("--profile", action="store_true", help="with --host: cProfile each case's fnn call")
    # Testing: every case at a tiny shape, on the CPU through Triton's interpreter when no GPU.
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile-backend", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.host:
        return _host(args)
    if args.breakdown or args.profile:
        parser().error("--breakdown and --profile go with --host")
    if args.list:
        print(list_cases())
        return 0
    if args.cases:
        unknown = [n for n in args.cases if n not in CASES]
        if unknown:
            parser().error(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(CASES)}")
    if args.rep is not None and not (math.isfinite(args.rep) and args.rep > 0):
        parser().error(f"--rep must be a finite number > 0, got {args.rep}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print(NO_CUDA)
        return 0
    if not cuda and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # fnn's kernels in Triton's interpreter
    from .runner import default_compile_options, run

    _tiny_out(args)

    compile_options = default_compile_options(args.tiny)
    if args.compile_backend:
        compile_options = {"backend": args.compile_backend}
        if args.compile_backend == "inductor":
            compile_options["mode"] = "max-autotune-no-cudagraphs"
    _, status = run(
        args.cases,
        quick=args.quick,
        tiny=args.tiny,
        out_dir=args.out,
        compile_options=compile_options,
        rep_ms=args.rep,
        progress=not args.no_progress,
        commit=args.commit,
        command=["python", "-m", "bench", *argv],
    )
    return status


def _tiny_out(args: argparse.Namespace) -> None:
    """--tiny (a test run) without --out writes to a new temporary folder, never over the
    committed results in bench/results/."""
    if args.tiny and args.out is None:
        args.out = tempfile.mkdtemp(prefix="fnn-bench-tiny-")
        print(f"--tiny: results go to {args.out}")


def _host(args: argparse.Namespace) -> int:
    from . import host

    if args.list:
        for c in host.CASES.values():
            goal = f"; goal: {c.goal.text}" if c.goal else ""
            print(f"{c.name}: {c.what} ({c.launches} launch(es){goal})")
        return 0
    if args.cases:
        unknown = [n for n in args.cases if n not in host.CASES]
        if unknown:
            parser().error(f"unknown host case(s): {', '.join(unknown)}; known: {', '.join(host.CASES)}")
    if args.rep is not None and not (math.isfinite(args.rep) and args.rep > 0):
        parser().error(f"--rep must be a finite number > 0, got {args.rep}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("python -m bench --host compiles fnn's kernels for sm_90a: unset TRITON_INTERPRET")
        return 2
    _tiny_out(args)
    host.run_host(
        args.cases,
        tiny=args.tiny,
        out_dir=args.out,
        rep_ms=args.rep,
        commit=args.commit,
        with_breakdown=args.breakdown,
        with_profile=args.profile,
    )
    return 0
