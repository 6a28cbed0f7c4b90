"""`python -m bench.compile`: compile every kernel specialization fnn would launch, for sm_90a
(H100/H200) and sm_80 (A100), without a GPU, and fail on what would go wrong on the chip.

    python -m bench.compile                       # both targets -> bench/results/compile/
    python -m bench.compile --target 90 --only network --no-fail
    python -m bench.compile --list                # the calls of the coverage (bench.coverage)

Each target runs in its own fresh process (spawned), so both compile at once and neither
interprets the kernels. The coverage (bench.coverage) runs fnn's real code paths on CPU tensors
under bench.fakecuda.compile_only: every specialization is exactly the launcher's, nothing is
launched. Records and verdicts: bench.compilecheck. Writes triton-<version>.json (both
targets; "-partial" in the name when --only or --target narrowed the run) and prints a table
of the failures. Exit status 1 on any failure unless --no-fail; 2 on bad arguments.

Library use: `from bench.compile import Call, compile_calls` (see bench.compilecheck).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .compilecheck import FAILURE_KINDS, TARGET_NAMES, Call, CheckResult, compile_calls, merge, worker
from .fakecuda import MAX_SHARED

__all__ = ["Call", "CheckResult", "compile_calls", "main", "run_check"]

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "compile"
TARGETS = (90, 80)


def _versions() -> dict[str, Any]:
    import torch
    import triton

    from .runner import git_commit

    sha, dirty = git_commit()
    return {
        "triton": triton.__version__,
        "triton_path": str(Path(triton.__file__).parent),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": sha,
        "git_dirty": dirty,
    }


def default_jobs(n_targets: int) -> int:
    """Processes per target: the CPU cores shared out between the targets, at most 8."""
    return max(1, min(8, (os.cpu_count() or 1) // max(n_targets, 1)))


def run_check(
    targets: Sequence[int] = TARGETS, only: Sequence[str] = (), jobs: int | None = None, verbose: bool = False
) -> dict[str, Any]:
    """Check every target in fresh spawned processes (`jobs` per target, each compiling a
    share of the calls); return the JSON document."""
    start = time.perf_counter()
    jobs = jobs or default_jobs(len(targets))
    ctx = multiprocessing.get_context("spawn")
    results: dict[str, Any] = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=len(targets) * jobs, mp_context=ctx) as pool:
        futures = {
            cap: [pool.submit(worker, cap, tuple(only), (i, jobs), verbose) for i in range(jobs)]
            for cap in targets
        }
        for cap, parts in futures.items():
            name = TARGET_NAMES.get(cap, f"sm_{cap}")
            try:
                results[name] = merge([f.result() for f in parts]).to_json()
            except Exception as e:  # noqa: BLE001 - a crashed target is reported, not lost
                results[name] = {"capability": cap, "crashed": f"{type(e).__name__}: {e}"}
    return {
        "tool": "python -m bench.compile",
        **_versions(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": ["python", "-m", "bench.compile", *sys.argv[1:]],
        "only": list(only),
        "seconds": round(time.perf_counter() - start, 1),
        "jobs_per_target": jobs,
        "targets": results,
    }


def failed(doc: dict[str, Any]) -> bool:
    """Whether the document holds any failure (a crashed target included)."""
    for t in doc["targets"].values():
        if "crashed" in t or t["call_errors"] or t["failing_specializations"]:
            return True
    return False


def _constexprs(rec: dict[str, Any]) -> str:
    keep = {k: v for k, v in rec["constexprs"].items() if k not in ("UPCAST",)}
    return " ".join(f"{k}={v}" for k, v in keep.items())


def table(doc: dict[str, Any], everything: bool = False) -> str:
    """A short text report: one line per target, then one per failing specialization
    (every specialization with `everything`)."""
    lines = [f"triton {doc['triton']}, torch {doc['torch']}, {doc['seconds']:.0f} s"]
    rows = []
    for name, t in doc["targets"].items():
        if "crashed" in t:
            lines.append(f"{name}: CRASHED: {t['crashed']}")
            continue
        kinds = ", ".join(f"{t['failures_by_kind'][k]} {k}" for k in FAILURE_KINDS)
        lines.append(
            f"{name}: {t['specializations']} specializations from {t['calls']} calls "
            f"({t['launches_skipped']} launches skipped), {t['failing_specializations']} failing: "
            f"{kinds}; {len(t['call_errors'])} call errors; {t['seconds']:.0f} s"
        )
        for r in t["records"]:
            if r["failures"] or everything:
                rows.append((name, r))
        for e in t["call_errors"]:
            lines.append(f"  {name} call error in {e['call']}: {e['error']}")
    if rows:
        lines.append("")
        lines.append(
            f"{'target':7} {'kernel':29} {'warps':>5} {'st':>2} {'reg':>4} {'stack':>6} {'shared':>7} "
            f"{'wgmma':>5} {'mma':>4}  failures | constexprs | first call"
        )
        for name, r in rows:
            fails = "; ".join(f"{f['kind']}: {f['detail']}" for f in r["failures"]) or "ok"

            def num(v):
                return "-" if v is None else str(v)

            lines.append(
                f"{name:7} {r['kernel']:29} {num(r['num_warps']):>5} {num(r['num_stages']):>2} "
                f"{num(r['registers']):>4} {num(r['stack']):>6} {num(r['shared']):>7} {num(r['wgmma']):>5} "
                f"{num(r['mma_sync']):>4}  {fails} | {_constexprs(r)} | {r['calls'][0]}"
                + (f" (+{len(r['calls']) - 1})" if len(r["calls"]) > 1 else "")
            )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.compile",
        description="Compile every fnn kernel specialization for sm_90a and sm_80 without a GPU; "
        "fail on compile errors, register spills, shared memory over the limit, and 16-bit GEMM "
        "tiles of >= 64 rows without wgmma on sm_90a.",
    )
    p.add_argument(
        "--target",
        type=int,
        nargs="+",
        choices=sorted(MAX_SHARED),
        default=list(TARGETS),
        help="compute capabilities: 90 (sm_90a, H100/H200), 80 (sm_80, A100), ...; default 90 80",
    )
    p.add_argument(
        "--jobs", type=int, metavar="N", help="processes per target (default: cores / targets, <= 8)"
    )
    p.add_argument(
        "--only", nargs="+", default=[], metavar="SUBSTRING", help="only the calls whose label contains one"
    )
    p.add_argument("--out", metavar="DIR", help=f"write the JSON here (default {RESULTS.relative_to(REPO)})")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even when the check finds failures")
    p.add_argument("--all", action="store_true", help="print every specialization, not only the failing ones")
    p.add_argument("--list", action="store_true", help="list the calls of the coverage and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="print each call as it runs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        from .coverage import calls

        for c in calls(args.only):
            print(c.label)
        return 0
    from .coverage import calls

    if args.only and not calls(args.only):
        parser().error(f"no call of the coverage matches {args.only} (see --list)")
    targets = list(dict.fromkeys(args.target))
    if args.jobs is not None and args.jobs < 1:
        parser().error("--jobs must be >= 1")
    doc = run_check(targets, args.only, args.jobs, args.verbose)
    partial = bool(args.only) or set(targets) != set(TARGETS)
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"triton-{doc['triton']}{'-partial' if partial else ''}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc, everything=args.all))
    bad = failed(doc)
    print(f"\n{'FAILED' if bad else 'PASSED'}: {path}")
    return 1 if bad and not args.no_fail else 0


if __name__ == "__main__":
    raise SystemExit(main())
