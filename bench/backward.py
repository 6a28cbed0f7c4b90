"""`python -m bench.backward`: one narrow layer's backward, fused kernel against the two kernels.

Issue 12's fwbw_small_bf16 needs the single-pass backward (kernels.linear_act's fused kernel:
dX, dW and db from one read of dY, Y and X); the two-kernel backward reads dY and Y twice.
Neither has run on a GPU yet, and the fused kernel's batch slicing (`split`: programs, each
summing its rows' dW and db partials) and launch config (warps, pipeline stages) were chosen
from the compile check only. This times, in one run, on one layer's saved tensors:

- `eager`: fnn.reference.linear_act_backward (PyTorch: the delta, two matmuls, a column sum);
- `two_kernels`: the input-gradient and weight-gradient kernels (their default slicing);
- `fused`: the fused kernel as fnn calls it (kernels.configs.fused_backward_config);
- `fused split=S`: other slicings (multiples of the GPU's SM count, and a few more);
- `fused warps=W stages=S`: other launch configs at the default slicing.

Every variant is first checked against a float64 reference (bench.check's rule: at most twice
eager's error plus one unit of the dtype at the reference's scale); one that disagrees is
reported and not timed. On a GPU, times are CUDA-event medians (triton.testing.do_bench, L2
flushed); without one it runs only in Triton's interpreter (TRITON_INTERPRET=1, else it says
so and exits with status 2), at a small shape, with wall-clock times that only show that
everything runs, not how fast.

    python -m bench.backward --out bench/results/<gpu-name>/backward   # fwbw_small_bf16's layer
    python -m bench.backward --m 65536 --n 32 --k 48 --dtype float16 --activation tanh

Writes backward.json and backward.md (a table, fastest first, with GB/s against the bytes one
pass must move: dY, Y and X read, dX written, W read and dW and db written once).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64
}
GPU_SHAPE = {"m": 1 << 20, "n": 64, "k": 64}  # fwbw_small_bf16's layer (bench.cases)
CPU_SHAPE = {"m": 300, "n": 24, "k": 20}  # the interpreter: every variant runs, nothing is fast
Outputs = tuple[torch.Tensor, ...]


@dataclasses.dataclass
class Variant:
    name: str
    kind: str  # "eager", "two_kernels", "fused"
    split: int | None = None  # fused: batch slices (None: the launcher's choice)
    num_warps: int | None = None  # fused: launch config overrides (None: the config's)
    num_stages: int | None = None


@contextlib.contextmanager
def fused_config(num_warps: int | None, num_stages: int | None) -> Iterator[None]:
    """The fused kernel's launch config with `num_warps` and `num_stages` replaced (None: kept),
    for launches made inside. Its cached steps and launch entries are dropped on entry and on
    exit: they are keyed on the shape, not on the config."""
    from kernels import linear_act

    real = linear_act.fused_backward_config

    def config(m, n, k, dtype):
        cfg, split = real(m, n, k, dtype)
        changes = {"num_warps": num_warps, "num_stages": num_stages}
        return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None}), split

    def forget() -> None:
        linear_act._FUSED_STEPS.clear()
        linear_act._bwd_fused.state.clear()

    forget()
    linear_act.fused_backward_config = config
    try:
        yield
    finally:
        linear_act.fused_backward_config = real
        forget()


def variants(sm_count: int | None, m: int, default: Any, default_split: int) -> list[Variant]:
    """The variants timed: eager, the two kernels, the fused kernel as called (`default`, a
    TileConfig, and `default_split`), then other slicings (halves and multiples of the SM
    count, and a few round numbers, at least block_m rows per slice) and launch configs."""
    out = [Variant("eager", "eager"), Variant("two_kernels", "two_kernels"), Variant("fused", "fused")]
    if sm_count is None:
        splits = {1, 2, 4}
    else:
        splits = {sm_count // 2, sm_count, 2 * sm_count, 4 * sm_count, 64, 256, 512}
    for s in sorted(splits):
        if s != default_split and s >= 1 and m // s >= default.block_m:
            out.append(Variant(f"fused split={s}", "fused", split=s))
    for warps, stages in ((4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3)):
        if (warps, stages) != (default.num_warps, default.num_stages):
            name = f"fused warps={warps} stages={stages}"
            out.append(Variant(name, "fused", num_warps=warps, num_stages=stages))
    return out


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, activation: str, bias: bool):
    """x, w, b, y (fnn's forward kernel's output: what the backward reads) and dy."""
    from kernels.linear_act import linear_act_forward

    from .problems import _randn

    g = torch.Generator(device=device).manual_seed(0)
    x, w = _randn((m, k), g, device, dtype), _randn((n, k), g, device, dtype, k**-0.5)
    b = _randn((n,), g, device, dtype, 0.5) if bias else None
    return x, w, b, linear_act_forward(x, w, b, activation), _randn((m, n), g, device, dtype)


def _present(outputs) -> Outputs:
    """The gradients that exist (db is None without a bias)."""
    return tuple(t for t in outputs if t is not None)


def _runner(v: Variant, x, w, y, dy, activation: str, bias: bool) -> Callable[[], Outputs]:
    from fnn import reference
    from kernels import linear_act as la

    if v.kind == "eager":
        return lambda: _present(reference.linear_act_backward(dy, y, w, x, activation, bias))
    if v.kind == "two_kernels":

        def two() -> Outputs:
            dx = la.linear_act_backward_input(dy, y, w, activation)
            return _present((dx, *la.linear_act_backward_weight(dy, y, x, activation, bias)))

        return two

    def fused() -> Outputs:
        return _present(la.linear_act_backward(dy, y, w, x, activation, bias, split=v.split))

    return fused


def _timer(device: torch.device, rep_ms: float):
    from .timing import CpuTimer, CudaTimer

    if device.type == "cuda":
        return CudaTimer(device, rep_ms=rep_ms)
    return CpuTimer(rep_ms=rep_ms, max_samples=20)


def measure(
    m: int, n: int, k: int, dtype: torch.dtype, activation: str = "sigmoid", bias: bool = True,
    device: torch.device | None = None, rep_ms: float = 100.0, only: list[str] | None = None, log=print,
) -> dict[str, Any]:
    """Check and time every variant (`only`: those names) on one (m, n, k) layer; the results."""
    from fnn import reference
    from kernels.configs import fused_backward_config, fused_backward_fits

    from .check import compare

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not fused_backward_fits(n, k, dtype):
        raise ValueError(f"the fused backward does not serve a ({n}, {k}) weight in {dtype}")
    cfg, default_split = fused_backward_config(m, n, k, dtype)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
    chosen = variants(sms, m, cfg, default_split)
    if only:
        unknown = set(only) - {v.name for v in chosen}
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}; known: {[v.name for v in chosen]}")
        chosen = [v for v in chosen if v.name in only or v.name in ("eager",)]
    x, w, b, y, dy = _inputs(m, n, k, dtype, device, activation, bias)
    ref = _present(
        reference.linear_act_backward(dy.double(), y.double(), w.double(), x.double(), activation, bias)
    )
    names = ("dx", "dw", "db") if bias else ("dx", "dw")
    timer = _timer(device, rep_ms)
    eager_out = _runner(chosen[0], x, w, y, dy, activation, bias)()
    size = dtype.itemsize
    nbytes = (2 * m * n + 2 * m * k + 2 * n * k + (n if bias else 0)) * size  # dY, Y, X, dX; W, dW; db
    rows = []
    for v in chosen:
        row: dict[str, Any] = {"name": v.name, "kind": v.kind, "split": v.split, "num_warps": v.num_warps,
                               "num_stages": v.num_stages}
        with fused_config(v.num_warps, v.num_stages) if v.kind == "fused" else contextlib.nullcontext():
            run = _runner(v, x, w, y, dy, activation, bias)
            try:
                out = run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as e:  # a config that does not compile or launch: reported, not timed
                row.update(status="error", message=f"{type(e).__name__}: {e}"[:500])
                rows.append(row)
                log(f"{v.name:<28} ERROR {row['message']}")
                continue
            check = compare(names, out, eager_out, ref, dtype)
            row["check"] = check
            if not check["passed"]:
                row.update(status="disagrees", message=check["message"])
                rows.append(row)
                log(f"{v.name:<28} DISAGREES {check['message']}")
                continue
            t = timer.measure(run)
        row.update(status="ok", **t.to_json(), gb_per_s=nbytes / (t.median_ms * 1e-3) / 1e9)
        rows.append(row)
        log(f"{v.name:<28} {t.median_ms * 1e3:10.1f} us  ({row['gb_per_s']:7.1f} GB/s)")
    timed = [r for r in rows if r["status"] == "ok"]
    fused_ms = next((r["median_ms"] for r in timed if r["name"] == "fused"), None)
    two_ms = next((r["median_ms"] for r in timed if r["name"] == "two_kernels"), None)
    best = min(timed, key=lambda r: r["median_ms"]) if timed else None
    return {
        "shape": {"m": m, "n": n, "k": k},
        "dtype": str(dtype).replace("torch.", ""),
        "activation": activation,
        "bias": bias,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
        "sm_count": sms,
        "timer": timer.describe(),
        "bytes_one_pass": nbytes,
        "default": {"split": default_split, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                    "block_m": cfg.block_m},
        "variants": rows,
        "two_kernels_over_fused": (two_ms / fused_ms) if fused_ms and two_ms else None,
        "best": best["name"] if best else None,
        "performance_numbers": device.type == "cuda",
    }


def table(result: dict[str, Any]) -> str:
    s = result["shape"]
    lines = [
        "# One layer's backward: fused kernel against two kernels (python -m bench.backward)",
        "",
        f"({s['m']}, {s['k']}) -> {s['n']}, {result['dtype']}, {result['activation']}, "
        f"bias={result['bias']}, on {result['device']}; default fused config: {result['default']}.",
        "" if result["performance_numbers"] else
        "CPU run in Triton's interpreter: the times show that every variant runs, not how fast.",
        "",
        "| variant | status | median us (p20-p80) | GB/s (one pass) |",
        "|---|---|---|---|",
    ]
    ok = sorted((r for r in result["variants"] if r["status"] == "ok"), key=lambda r: r["median_ms"])
    for r in ok:
        lines.append(f"| {r['name']} | ok | {r['median_ms'] * 1e3:.1f} ({r['p20_ms'] * 1e3:.1f}-"
                     f"{r['p80_ms'] * 1e3:.1f}) | {r['gb_per_s']:.1f} |")
    for r in result["variants"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['status']}: {r['message'][:120]} | - | - |")
    ratio = result["two_kernels_over_fused"]
    lines += ["", f"two kernels / fused: {ratio:.2f}" if ratio else "two kernels / fused: not measured",
              f"fastest: {result['best']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backward", description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, help="batch rows (default: 2^20 on a GPU, 300 on the CPU)")
    p.add_argument("--n", type=int, help="out features (default 64 on a GPU, 24 on the CPU)")
    p.add_argument("--k", type=int, help="in features (default 64 on a GPU, 20 on the CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--activation", default="sigmoid")
    p.add_argument("--no-bias", action="store_true")
    p.add_argument(
        "--variants", nargs="+", metavar="NAME", help="time only these (eager always runs)"
    )
    p.add_argument("--rep-ms", type=float, default=100.0, help="timing budget per variant")
    p.add_argument("--out", metavar="DIR", help="write backward.json and backward.md here")
    args = p.parse_args(argv)
    for name in ("m", "n", "k"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    if not (math.isfinite(args.rep_ms) and args.rep_ms > 0):
        p.error(f"--rep-ms must be a finite number > 0, got {args.rep_ms}")
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print(
            "bench.backward: no CUDA device. On the CPU it runs in Triton's interpreter only: "
            "TRITON_INTERPRET=1 python -m bench.backward (the times then mean nothing)",
            file=sys.stderr,
        )
        return 2
    shape = GPU_SHAPE if cuda else CPU_SHAPE
    m, n, k = (shape[d] if getattr(args, d) is None else getattr(args, d) for d in ("m", "n", "k"))
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    start = time.time()
    try:
        result = measure(
            m, n, k, dtype, args.activation, not args.no_bias, rep_ms=args.rep_ms, only=args.variants
        )
    except ValueError as e:
        print(f"bench.backward: {e}", file=sys.stderr)
        return 2
    from .report import write_sweep

    write_sweep(result, table(result), args.out, "backward", start)
    failed = any(r["status"] != "ok" and r["name"] in ("fused", "two_kernels") for r in result["variants"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
