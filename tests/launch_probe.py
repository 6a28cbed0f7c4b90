"""A small kernel for the launch-cache tests (tests/test_launch.py), and, run as a script, the
compile-only check of kernels.launch against Triton's own launch path.

    python tests/launch_probe.py OUT.json     # TRITON_INTERPRET unset; any triton >= 3.6

The script swaps Triton's driver for a recording stand-in (bench.fakecuda: kernels compiled
for sm_90a, launches skipped) and, for a series of calls that each change one thing Triton
specializes on, launches through `kernel[grid](...)` and through the cache (twice: the miss
that fills it, then the hit), recording every argument the compiled kernel's launcher gets.
It writes what it saw as JSON; the test asserts on it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import triton
import triton.language as tl


@triton.jit
def scaled_add_kernel(
    x_ptr,  # X (n,) read with stride_x
    y_ptr,  # Y (n,) contiguous
    out_ptr,  # OUT (n,) written: alpha * X + Y (or X + Y without SCALE)
    n,  # number of elements
    stride_x,  # stride of X in elements
    alpha,  # scale of X
    BLOCK: tl.constexpr,  # elements per program
    SCALE: tl.constexpr,  # whether alpha applies
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs * stride_x, mask=mask)
    if SCALE:
        x = x * alpha
    tl.store(out_ptr + offs, x + tl.load(y_ptr + offs, mask=mask), mask=mask)


def _describe(v):
    """A launcher argument as JSON: tensors by address and dtype, the rest by type and value."""
    if isinstance(v, torch.Tensor):
        return ["tensor", v.data_ptr(), str(v.dtype)]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return [type(v).__name__, v]
    return [type(v).__name__, repr(v)]


def main(out_path: str) -> None:
    from triton import knobs
    from triton.runtime.driver import driver

    from bench.fakecuda import FakeCudaDriver
    from kernels.launch import launcher

    class Recorder(FakeCudaDriver):
        """Records each launch: the kernel's hash and every argument of the launcher call."""

        def launcher_cls(self, src, metadata):
            def launch(*args):
                self.count += 1
                if self.record:
                    self.launches.append((metadata.hash, args))
                # As Triton's C launcher does: the enter and exit hooks get the launch metadata.
                for hook in args[7:9]:
                    if hook is not None:
                        hook(args[6])

            return launch

    previous = driver._active
    fake = Recorder(90)
    driver.set_active(fake)
    fast = launcher(scaled_add_kernel)
    report: dict = {"triton": triton.__version__, "calls": [], "errors": []}

    big = torch.randn(4096)
    other = torch.randn(4096)
    out = torch.empty(4096)
    half = big.half()

    def variant(**changes):
        call = dict(x=big, y=other, out=out, n=1000, stride_x=1, alpha=2.0, BLOCK=128, SCALE=True)
        options = {"num_warps": 4}
        for k, v in changes.items():
            (options if k in ("num_warps", "num_stages", "maxnreg") else call)[k] = v
        return call, options

    variants = {
        "base": variant(),
        "x float16": variant(x=half, y=other.half(), out=out.half()),
        "x misaligned (x[1:])": variant(x=big[1:]),
        "n = 1024 (a multiple of 16)": variant(n=1024),
        "n = 1 (a constexpr)": variant(n=1),
        "n = 2**31 + 16 (i64)": variant(n=2**31 + 16),
        "stride_x = 2": variant(stride_x=2),
        "stride_x = 16": variant(stride_x=16),
        "alpha = 3 (an int)": variant(alpha=3),
        "alpha = True (a bool)": variant(alpha=True),
        "BLOCK = 64": variant(BLOCK=64),
        "SCALE = False": variant(SCALE=False),
        "SCALE = 1 (an int constexpr)": variant(SCALE=1),
        "num_warps = 8": variant(num_warps=8),
        "num_stages = 2": variant(num_stages=2),
        "maxnreg = 128": variant(maxnreg=128),
        "base again": variant(),
    }

    def args_of(call):
        c = call
        return (c["x"], c["y"], c["out"], c["n"], c["stride_x"], c["alpha"])

    def launched(fn, *args, **kwargs):
        """fn(*args, **kwargs), which must launch once: (its result, the launch's record)."""
        before = len(fake.launches)
        kernel = fn(*args, **kwargs)
        new = fake.launches[before:]
        if len(new) != 1:
            raise AssertionError(f"expected one launch, got {len(new)}")
        h, a = new[0]
        return kernel, {
            "hash": h,
            "grid": list(a[:3]),
            "stream": a[3],
            "function": a[4],
            "packed_metadata": _describe(a[5]),
            "hooks_and_metadata": [type(v).__name__ for v in a[6:9]],
            "args": [_describe(v) for v in a[9:]],
        }

    for label, (call, options) in variants.items():
        grid = (triton.cdiv(min(call["n"], 4096), call["BLOCK"]),)
        consts = {"BLOCK": call["BLOCK"], "SCALE": call["SCALE"]}
        try:
            k_normal, normal = launched(scaled_add_kernel[grid], *args_of(call), **consts, **options)
            misses = fast.state.misses
            k_miss, miss = launched(fast, grid, *args_of(call), **consts, **options)
            filled = fast.state.misses - misses
            k_hit, hit = launched(fast, grid, *args_of(call), **consts, **options)
            report["calls"].append(
                {
                    "label": label,
                    "normal": normal,
                    "fast_first": miss,
                    "fast_cached": hit,
                    "same_kernel_object": k_normal is k_miss is k_hit,
                    "cache_filled": filled,
                }
            )
        except Exception as e:  # noqa: BLE001 - reported, the test fails on it
            report["errors"].append(f"{label}: {type(e).__name__}: {e}")
    report["cache_entries"] = len(fast.state.cache)
    report["misses"] = fast.state.misses
    report["fallbacks"] = fast.state.fallbacks

    # A cache hit dispatches no torch op: no allocation, no copy, nothing that waits on a device.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    call, options = variants["base"]
    grid = (8,)
    consts = {"BLOCK": 128, "SCALE": True}
    fast(grid, *args_of(call), **consts, **options)
    with Ops() as ops:
        fast(grid, *args_of(call), **consts, **options)
    report["ops_dispatched_by_a_hit"] = ops.seen

    # Caller-keyed launches (launch.keyed) take maxnreg as launch.launch does: the key's first
    # call finds the full key's entry, its hits launch that same kernel.
    keyed = {}
    for label, (kcall, koptions) in (("base", variants["base"]), ("maxnreg", variants["maxnreg = 128"])):
        ukey = ("probe", label)
        _, first = launched(fast.keyed, ukey, grid, *args_of(kcall), 128, True, **koptions)
        _, hit = launched(fast.keyed, ukey, grid, *args_of(kcall), 128, True, **koptions)
        keyed[label] = [first["hash"], hit["hash"]]
    report["keyed"] = keyed

    # Direct launches (launch.direct, in a session): the same launcher arguments as keyed's hit;
    # a misaligned pointer takes its own kernel; under a launch hook there is no session, and a
    # direct launch without one takes keyed's path (the hook runs).
    from kernels.launch import session

    direct = {}
    call, options = variants["base"]
    ukey = ("probe", "direct")
    _, direct["keyed"] = launched(fast.keyed, ukey, grid, *args_of(call), 128, True, **options)
    _, direct["keyed_hit"] = launched(fast.keyed, ukey, grid, *args_of(call), 128, True, **options)
    _, direct["direct"] = launched(fast.direct, session(), ukey, grid, *args_of(call), 128, True, **options)
    mis, mis_options = variants["x misaligned (x[1:])"]
    # the same caller key: its entry is the aligned kernel's, which a misaligned x must not take
    _, direct["misaligned"] = launched(
        fast.direct, session(), ukey, grid, *args_of(mis), 128, True, **mis_options
    )
    hooked = []
    knobs.runtime.launch_enter_hook.add(hooked.append)
    try:
        direct["session_under_hook"] = session()
        _, r = launched(fast.direct, None, ukey, grid, *args_of(call), 128, True, **options)
    finally:
        knobs.runtime.launch_enter_hook.remove(hooked.append)
    direct["hooked_calls"] = len(hooked)
    direct["misaligned_hash"] = report["calls"][2]["normal"]["hash"]
    report["direct"] = direct

    # Fallbacks: a callable grid, an option the key does not cover, a launch hook.
    base_hash = report["calls"][0]["normal"]["hash"] if report["calls"] else None
    fallbacks = fast.state.fallbacks
    _, r = launched(fast, lambda meta: (8,), *args_of(call), **consts, **options)
    report["callable_grid"] = {"hash": r["hash"], "grid": r["grid"]}
    _, r = launched(fast, grid, *args_of(call), **consts, **options, num_ctas=1)
    report["extra_option_hash"] = r["hash"]
    seen_hooks = []

    def hook(metadata):
        seen_hooks.append(type(metadata).__name__)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        _, r = launched(fast, grid, *args_of(call), **consts, **options)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    report["hook"] = {
        "calls": len(seen_hooks),
        "hash": r["hash"],
        "hooks_and_metadata": r["hooks_and_metadata"],
    }
    report["fallbacks_taken"] = fast.state.fallbacks - fallbacks
    report["base_hash"] = base_hash

    # Another driver (another target): the cache starts again; what launches is sm_80's kernel.
    fake80 = Recorder(80)
    driver.set_active(fake80)
    fake = fake80
    _, n80 = launched(scaled_add_kernel[grid], *args_of(call), **consts, **options)
    _, f80 = launched(fast, grid, *args_of(call), **consts, **options)
    _, h80 = launched(fast, grid, *args_of(call), **consts, **options)
    report["other_driver"] = {"normal": n80["hash"], "fast_first": f80["hash"], "fast_cached": h80["hash"]}

    # Host cost per call, the launch skipped (the stand-in launcher is a Python no-op).
    fake.record = False

    def per_call_us(fn, calls=2000, rounds=7):
        """Median over rounds of this thread's CPU time per call (bench.host's clock)."""
        for _ in range(200):
            fn()
        samples = []
        for _ in range(rounds):
            start = time.thread_time()
            for _ in range(calls):
                fn()
            samples.append((time.thread_time() - start) / calls * 1e6)
        return statistics.median(samples)

    args = args_of(call)
    report["host_us"] = {
        "kernel[grid](...)": per_call_us(lambda: scaled_add_kernel[grid](*args, **consts, **options)),
        "launch cache hit": per_call_us(lambda: fast(grid, *args, **consts, **options)),
    }
    driver._active = previous
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
