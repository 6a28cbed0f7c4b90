"""The compile check as a library: run calls under `bench.fakecuda.compile_only`, collect every
kernel specialization they would launch, and judge each one.

    from bench.compilecheck import Call, compile_calls
    result = compile_calls([Call("fwd", lambda: fnn.linear_act(x, w, b))], 90)
    for r in result.records:            # one per distinct compiled kernel
        print(r["kernel"], r["registers"], r["stack"], [f["kind"] for f in r["failures"]])

Each call runs fnn's real code (public API, launchers) on CPU tensors; Triton compiles every
kernel exactly as it would for the GPU (bench.fakecuda) and launches nothing. Two hooks on
Triton's JIT make this a check rather than a crash at the first problem:
- a compile error is caught per specialization: it is recorded (with the compiler's own
  diagnostics, which MLIR writes to file descriptor 2) and the launch is skipped, so the rest
  of the call (e.g. the backward after a failed forward) still compiles;
- every kernel a launcher runs is noted with the call that ran it, so records name their calls.

Per record: the kernel, its constexprs and the specialization of its other arguments
(pointer and integer divisibility by 16, integers equal to 1), num_warps, num_stages,
registers, stack (spill) and local bytes (`cuobjdump --dump-resource-usage`), shared memory
(`metadata.shared`), and the tensor-core instructions in the PTX (wgmma, mma.sync).

Verdicts (`record["failures"]`, each {"kind", "detail"}):
- "compile": the kernel did not compile;
- "spill": stack > 0 bytes per thread;
- "shared": shared memory over the target's limit (bench.fakecuda.MAX_SHARED);
- "registers": registers x threads per block over the SM's register file (REGISTER_FILE):
  such a launch fails on the GPU (a raised `maxnreg` can compile a kernel that way);
- "wgmma": sm_90a only, a 16-bit (fp16/bf16) GEMM whose row tile is >= 64 without a single
  wgmma instruction;
- "unknown": a kernel missing from GEMM_TILES, so the wgmma rule cannot be applied.
Calls that raise are recorded in `result.call_errors` and fail the check too.

Needs compiled kernels: TRITON_INTERPRET must be unset when kernels are first imported
(`worker` below takes care of it in a fresh process).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

TARGET_NAMES = {90: "sm_90a", 80: "sm_80"}
FAILURE_KINDS = ("compile", "spill", "shared", "registers", "wgmma", "unknown")
# 32-bit registers per SM on sm_80 and sm_90: a block needs registers x threads of them.
REGISTER_FILE = 65536
WGMMA_MIN_ROWS = 64
HALF_TYPES = ("fp16", "bf16")


def _rows(*names: str) -> Callable[[dict[str, Any]], int]:
    return lambda c: max(int(c[n]) for n in names)


# Per kernel: (its GEMM row tile from its constexprs, the pointer argument whose dtype is the
# dot operands' dtype), or None for a kernel without tl.dot. A kernel that is not listed is a
# failure of the check ("unknown"): add it here with the kernel.
GEMM_TILES: dict[str, tuple[Callable[[dict[str, Any]], int], str] | None] = {
    # acc (BLOCK_M, BLOCK_N) += X (BLOCK_M, BLOCK_K) @ W^T
    "linear_act_fwd_kernel": (_rows("BLOCK_M"), "x_ptr"),
    # the same through tensor descriptors, persistent
    "linear_act_fwd_tma_kernel": (_rows("BLOCK_M"), "x_desc"),
    # acc (BLOCK_M, BLOCK_K) += D (BLOCK_M, BLOCK_N) @ W, D cast to W's dtype
    "linear_act_bwd_input_kernel": (_rows("BLOCK_M"), "w_ptr"),
    # acc (BLOCK_N, BLOCK_K) += D^T (BLOCK_N, BLOCK_M) @ X
    "linear_act_bwd_weight_kernel": (_rows("BLOCK_N"), "x_ptr"),
    # h (BLOCK_M, P) @ W^T (P, P)
    "network_fwd_kernel": (_rows("BLOCK_M"), "x_ptr"),
    # D^T (P, BLOCK_M) @ h (BLOCK_M, P) and D (BLOCK_M, P) @ W (P, P): the larger row tile
    "network_bwd_kernel": (_rows("BLOCK_M", "P"), "x_ptr"),
    # sums of partial gradients: no dot
    "network_reduce_kernel": None,
    # D = dY * act'(Z) for the heavy activations: elementwise, no dot
    "linear_act_delta_kernel": None,
    "linear_act_delta_sum_kernel": None,
    # dX (BLOCK_M, BLOCK_K) = D (BLOCK_M, BLOCK_N) @ W and dW (BLOCK_N, BLOCK_K) += D^T @ X: the
    # larger row tile
    "linear_act_bwd_fused_kernel": (_rows("BLOCK_M", "BLOCK_N"), "w_ptr"),
}


@dataclass(frozen=True)
class Call:
    """One thing the project does, to be compiled: `fn()` runs fnn's real code path (CPU
    tensors; under the check every kernel compiles for the target and none launches).
    `precision` is torch's float32 matmul precision while it runs (fnn follows it)."""

    label: str
    fn: Callable[[], object] = field(compare=False, repr=False)
    precision: str = "highest"


@dataclass
class CheckResult:
    """What `compile_calls` found for one target."""

    capability: int
    records: list[dict[str, Any]]
    call_errors: list[dict[str, Any]]
    calls: int
    launches_skipped: int  # launches the stand-in driver received (and skipped)
    kernel_runs: int  # launches of compiled kernels seen by the JIT hook
    cuda_initialized: bool
    seconds: float
    cpu_seconds: float  # CPU time of the process and its children (ptxas): the cost on an idle core

    @property
    def target(self) -> str:
        return TARGET_NAMES.get(self.capability, f"sm_{self.capability}")

    def failures(self) -> list[tuple[dict[str, Any], dict[str, str]]]:
        """(record, failure) for every failure of every record."""
        return [(r, f) for r in self.records for f in r["failures"]]

    @property
    def ok(self) -> bool:
        return not self.call_errors and not any(r["failures"] for r in self.records)

    def summary(self) -> dict[str, Any]:
        counts = {k: 0 for k in FAILURE_KINDS}
        for r in self.records:
            for kind in {f["kind"] for f in r["failures"]}:
                counts[kind] += 1
        return {
            "specializations": len(self.records),
            "failing_specializations": sum(1 for r in self.records if r["failures"]),
            "failures_by_kind": counts,
            "call_errors": len(self.call_errors),
            "calls": self.calls,
            "launches_skipped": self.launches_skipped,
            "kernel_runs": self.kernel_runs,
            "cuda_initialized": self.cuda_initialized,
            "seconds": round(self.seconds, 1),
            "cpu_seconds": round(self.cpu_seconds, 1),
        }

    def to_json(self) -> dict[str, Any]:
        from .fakecuda import MAX_SHARED

        return {
            "capability": self.capability,
            "max_shared": MAX_SHARED.get(self.capability),
            **self.summary(),
            "call_errors": self.call_errors,
            "records": self.records,
        }


# ---------------------------------------------------------------------------------------------
# Hooks on Triton's JIT
# ---------------------------------------------------------------------------------------------


class FailedKernel:
    """Stands in for a kernel that did not compile: cached by the JIT in its place (so the
    same specialization is not retried), "launched" as a no-op."""

    function = None
    packed_metadata = None

    def __init__(self, fn, signature, constexprs, attrs, options, error: BaseException, stderr: str):
        self.fn = fn
        self.name = fn.__name__
        self.signature = dict(signature)
        self.constants = dict(constexprs)
        self.attrs = dict(attrs)
        self.num_warps = getattr(options, "num_warps", None)
        self.num_stages = getattr(options, "num_stages", None)
        self.error, self.details = _describe_error(error, stderr)
        key = f"{self.name}-{sorted(self.signature.items())}-{sorted(self.constants.items(), key=str)}"
        key += f"-{sorted(self.attrs.items())}-{self.num_warps}-{self.num_stages}"
        self.hash = "failed-" + hashlib.sha256(key.encode()).hexdigest()

    def launch_metadata(self, *args):
        return None

    def run(self, *args, **kwargs):
        return None


class _State:
    """What the hooks collect while compile_calls runs."""

    def __init__(self) -> None:
        self.label = ""
        self.kernels: dict[str, tuple[Any, Any]] = {}  # hash -> (JITFunction, kernel)
        self.calls: dict[str, list[str]] = {}  # hash -> labels, in order
        self.launches: dict[str, int] = {}
        self.compile_seconds: dict[int, float] = {}  # id(kernel) -> seconds in _do_compile
        self.runs = 0

    def observe(self, jit_fn, kernel) -> None:
        key = kernel.hash
        if key not in self.kernels:
            self.kernels[key] = (jit_fn, kernel)
            self.calls[key] = []
            self.launches[key] = 0
        if self.label not in self.calls[key]:
            self.calls[key].append(self.label)
        self.launches[key] += 1
        if not isinstance(kernel, FailedKernel):
            self.runs += 1


_STATE: _State | None = None


@contextlib.contextmanager
def _fd2_captured() -> Iterator[list[str]]:
    """Capture what is written to file descriptor 2 (MLIR's diagnostics go there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    box: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield box
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box.append(tmp.read().decode(errors="replace"))


@contextlib.contextmanager
def _jit_hooks() -> Iterator[_State]:
    """Patch JITFunction.run (note the kernel each launch runs) and JITFunction._do_compile
    (a compile error becomes a FailedKernel) for the duration."""
    global _STATE
    from triton.runtime.jit import JITFunction

    run, do_compile = JITFunction.run, JITFunction._do_compile

    def hooked_run(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=warmup, **kwargs)
        if _STATE is not None and kernel is not None and not warmup:
            _STATE.observe(self, kernel)
        return kernel

    def hooked_do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        if _STATE is None:
            return do_compile(self, key, signature, device, constexprs, options, attrs, warmup)
        start = time.perf_counter()
        error: Exception | None = None
        with _fd2_captured() as err:
            try:
                kernel = do_compile(self, key, signature, device, constexprs, options, attrs, warmup)
            except Exception as e:  # noqa: BLE001 - every compile error is recorded, none raised
                error = e
        if error is not None:
            kernel = FailedKernel(self, signature, constexprs, attrs, options, error, err[0])
            self.device_caches[device][0][key] = kernel
        elif err[0]:
            sys.stderr.write(err[0])  # warnings of a successful compile: not ours to swallow
        _STATE.compile_seconds[id(kernel)] = time.perf_counter() - start
        return kernel

    from triton import knobs

    def enter_hook(metadata) -> None:
        """Does nothing: while a launch hook is set, kernels.launch sends every launch through
        Triton's own path (JITFunction.run, hooked above) instead of calling a cached kernel."""

    JITFunction.run, JITFunction._do_compile = hooked_run, hooked_do_compile
    knobs.runtime.launch_enter_hook.add(enter_hook)
    _STATE = _State()
    try:
        yield _STATE
    finally:
        knobs.runtime.launch_enter_hook.remove(enter_hook)
        JITFunction.run, JITFunction._do_compile = run, do_compile
        _STATE = None


def _describe_error(error: BaseException, stderr: str) -> tuple[str, str]:
    """(one line, details) for a compile error: the exception chain, the source line Triton
    points at, and MLIR's error/note lines (not its IR dump)."""
    chain, e = [], error
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    innermost = chain[-1]
    pointed = ""
    for e in chain:  # CompilationError: "at L:C:\n<source>\n    ^" -> the line above the caret
        lines = str(e).splitlines()
        for i, line in enumerate(lines):
            if line.strip() == "^" and i > 0:
                pointed = lines[i - 1].strip()
    diag = [
        line.strip()
        for line in stderr.splitlines()
        if re.search(r"\b(error|note):", line) and not line.lstrip().startswith(("%", "tt.", "#"))
    ]
    message = str(innermost).strip().splitlines()[0] if str(innermost).strip() else ""
    one = type(error).__name__
    if pointed:
        one += f" at `{pointed}`"
    if innermost is not error:
        one += f": {type(innermost).__name__}"
    if message and not message.startswith("at "):
        one += f": {message}"
    if diag:  # MLIR's last note names the failing pass; its reproducer hint is noise
        one += " | " + diag[-1].split(": ", 1)[-1].split(": reproducer generated")[0]
    details = "".join(traceback.format_exception_only(type(error), error)).strip()
    if diag:
        details += "\n" + "\n".join(diag)
    return one[:600], details[-4000:]


# ---------------------------------------------------------------------------------------------
# Reading a compiled kernel
# ---------------------------------------------------------------------------------------------

_USAGE_CACHE: dict[str, dict[str, int]] = {}


def cuobjdump_path() -> str:
    """cuobjdump from triton's wheel (triton/backends/nvidia/bin)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"cuobjdump not found beside triton at {path}")
    return path


def resource_usage(cubin: bytes, name: str) -> dict[str, int]:
    """REG, STACK, SHARED (static), LOCAL of kernel `name` in a cubin (cuobjdump)."""
    key = hashlib.sha256(cubin).hexdigest()
    if key in _USAGE_CACHE:
        return _USAGE_CACHE[key]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [cuobjdump_path(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    block = re.search(rf"Function {re.escape(name)}:\s*\n\s*(.*)", out)
    if block is None:
        raise RuntimeError(f"cuobjdump reports no function {name!r}:\n{out}")
    fields = dict(re.findall(r"(\w+):(\d+)", block.group(1)))
    usage = {k.lower(): int(fields.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}
    _USAGE_CACHE[key] = usage
    return usage


def tensor_core_ops(ptx: str) -> dict[str, int]:
    """Counts of wgmma (Hopper warpgroup MMA) and mma.sync (Ampere-style MMA) in PTX."""
    return {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync\b", ptx)),
    }


def _value(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)  # tl.dtype -> "fp32"


def describe_specialization(jit_fn, signature, constants, attrs) -> tuple[dict, dict]:
    """(constexprs {name: value}, arguments {name: "type[ %16]" or "=value"}): what Triton
    specialized the kernel on. "%16": a pointer or integer divisible by 16; "=1": an integer
    argument equal to 1, folded into the kernel as a constant."""
    constexprs: dict[str, Any] = {}
    args: dict[str, str] = {}
    for i, param in enumerate(jit_fn.params):
        name = param.name
        if param.is_constexpr:
            constexprs[name] = _value(constants.get((i,), param.default))
        elif (i,) in constants:
            args[name] = f"={_value(constants[(i,)])}"
        else:
            kind = signature.get(name, "?")
            flags = [f"%{v}" for a, v in attrs.get((i,), []) if a == "tt.divisibility"]
            args[name] = " ".join([kind, *flags])
    return constexprs, args


def _record(
    jit_fn, kernel, capability: int, calls: list[str], launches: int, seconds: float | None
) -> dict[str, Any]:
    from .fakecuda import MAX_SHARED

    rec: dict[str, Any] = {
        "kernel": jit_fn.__name__,
        "target": TARGET_NAMES.get(capability, f"sm_{capability}"),
    }
    if isinstance(kernel, FailedKernel):
        constexprs, args = describe_specialization(jit_fn, kernel.signature, kernel.constants, kernel.attrs)
        rec.update(
            id=kernel.hash[:19],
            status="compile_error",
            constexprs=constexprs,
            args=args,
            num_warps=kernel.num_warps,
            num_stages=kernel.num_stages,
            registers=None,
            stack=None,
            local=None,
            shared=None,
            wgmma=None,
            mma_sync=None,
            error=kernel.error,
            error_details=kernel.details,
        )
    else:
        src, meta = kernel.src, kernel.metadata
        constexprs, args = describe_specialization(jit_fn, src.signature, src.constants, src.attrs)
        usage = resource_usage(kernel.asm["cubin"], kernel.name)
        rec.update(
            id=f"{kernel.hash[:12]}",
            status="compiled",
            constexprs=constexprs,
            args=args,
            num_warps=meta.num_warps,
            num_stages=meta.num_stages,
            registers=usage["reg"],
            stack=usage["stack"],
            local=usage["local"],
            shared=meta.shared,
            **tensor_core_ops(kernel.asm["ptx"]),
            error=None,
            error_details=None,
        )
    gemm = GEMM_TILES.get(rec["kernel"], "unknown")
    rec["row_tile"] = rec["operand"] = None
    if gemm not in ("unknown", None):
        rows, operand = gemm
        rec["row_tile"] = rows(constexprs)
        spec = args.get(operand, "?")  # "*bf16 %16" for a pointer, "tensordesc<bf16[128, 64]>"
        if spec.startswith("tensordesc<"):
            rec["operand"] = spec.removeprefix("tensordesc<").split("[")[0]
        else:
            rec["operand"] = spec.split()[0].lstrip("*")
    rec["calls"] = calls
    rec["launches"] = launches
    rec["compile_seconds"] = None if seconds is None else round(seconds, 2)
    rec["failures"] = judge(rec, capability, gemm != "unknown", MAX_SHARED.get(capability))
    return rec


def judge(rec: dict[str, Any], capability: int, known: bool, max_shared: int | None) -> list[dict[str, str]]:
    """The failures of one record (see the module docstring)."""
    out = []
    if rec["status"] != "compiled":
        out.append({"kind": "compile", "detail": rec["error"] or "did not compile"})
    if not known:
        out.append(
            {
                "kind": "unknown",
                "detail": f"{rec['kernel']} is not in bench.compilecheck.GEMM_TILES: "
                "add its row tile and operand (or None if it has no tl.dot)",
            }
        )
    if rec["status"] != "compiled":
        return out
    if rec["stack"] > 0:
        out.append(
            {"kind": "spill", "detail": f"stack {rec['stack']} B/thread, {rec['registers']} registers"}
        )
    if max_shared is None:
        out.append({"kind": "shared", "detail": f"no shared-memory limit known for sm_{capability}"})
    elif rec["shared"] > max_shared:
        out.append({"kind": "shared", "detail": f"shared memory {rec['shared']} B > limit {max_shared}"})
    warps = rec.get("num_warps")
    if warps and rec["registers"] * 32 * warps > REGISTER_FILE:
        out.append(
            {
                "kind": "registers",
                "detail": f"{rec['registers']} registers x {32 * warps} threads > {REGISTER_FILE} per SM: "
                "the launch would fail",
            }
        )
    if (
        capability == 90
        and rec["row_tile"] is not None
        and rec["operand"] in HALF_TYPES
        and rec["row_tile"] >= WGMMA_MIN_ROWS
        and rec["wgmma"] == 0
    ):
        out.append(
            {
                "kind": "wgmma",
                "detail": f"{rec['operand']} GEMM with a {rec['row_tile']}-row tile and no wgmma "
                f"({rec['mma_sync']} mma.sync)",
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# Running calls
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    import torch

    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class _UnlimitedUtils:
    """Driver utils reporting no shared-memory limit: Triton's own check at load time would
    raise OutOfResources and stop the call half way; the check judges shared memory itself."""

    def __init__(self, utils) -> None:
        self._utils = utils

    def __getattr__(self, name):
        return getattr(self._utils, name)

    def get_device_properties(self, device) -> dict[str, int]:
        return {**self._utils.get_device_properties(device), "max_shared_mem": 1 << 40}


def compile_calls(
    calls: Sequence[Call], capability: int, progress: Callable[[str], None] | None = None
) -> CheckResult:
    """Run `calls` under bench.fakecuda.compile_only(capability); return one record per
    distinct kernel specialization they launched (see the module docstring).

    Must run where fnn's kernels are compiled functions (TRITON_INTERPRET unset when `kernels`
    was first imported). Nothing is launched; no GPU is needed or touched."""
    import torch

    from .fakecuda import compile_only

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    call_errors: list[dict[str, Any]] = []
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    with compile_only(capability, record=False) as gpu, _jit_hooks() as state:
        gpu.utils = _UnlimitedUtils(gpu.utils)
        for i, call in enumerate(calls):
            state.label = call.label
            if progress:
                progress(f"[{i + 1}/{len(calls)}] {call.label}")
            try:
                with matmul_precision(call.precision):
                    call.fn()
            except Exception as e:  # noqa: BLE001 - recorded, the check goes on
                call_errors.append(
                    {
                        "call": call.label,
                        "error": f"{type(e).__name__}: {e}"[:600],
                        "traceback": traceback.format_exc()[-3000:],
                    }
                )
        records = [
            _record(
                jit_fn,
                kernel,
                capability,
                state.calls[key],
                state.launches[key],
                state.compile_seconds.get(id(kernel)),
            )
            for key, (jit_fn, kernel) in state.kernels.items()
        ]
        runs = state.runs
        launches = gpu.count
    return CheckResult(
        capability=capability,
        records=records,
        call_errors=call_errors,
        calls=len(calls),
        launches_skipped=launches,
        kernel_runs=runs,
        cuda_initialized=torch.cuda.is_initialized(),
        seconds=time.perf_counter() - start,
        cpu_seconds=_cpu_seconds() - cpu_start,
    )


def merge(results: Sequence[CheckResult]) -> CheckResult:
    """One CheckResult from several of the same target (its calls split between processes):
    records of the same kernel specialization merged (calls, launches)."""
    records: dict[str, dict[str, Any]] = {}
    for res in results:
        for r in res.records:
            if r["id"] not in records:
                records[r["id"]] = {**r, "calls": list(r["calls"])}
            else:
                kept = records[r["id"]]
                kept["calls"] += [c for c in r["calls"] if c not in kept["calls"]]
                kept["launches"] += r["launches"]
    return CheckResult(
        capability=results[0].capability,
        records=list(records.values()),
        call_errors=[e for res in results for e in res.call_errors],
        calls=sum(res.calls for res in results),
        launches_skipped=sum(res.launches_skipped for res in results),
        kernel_runs=sum(res.kernel_runs for res in results),
        cuda_initialized=any(res.cuda_initialized for res in results),
        seconds=max(res.seconds for res in results),
        cpu_seconds=sum(res.cpu_seconds for res in results),
    )


def worker(
    capability: int, only: Sequence[str] = (), part: tuple[int, int] = (0, 1), verbose: bool = False
) -> CheckResult:
    """One target in a fresh process (bench.compile spawns these): compile the coverage
    (bench.coverage) filtered by `only`, or its share `part` = (i, n): calls i, i+n, i+2n..."""
    os.environ.pop("TRITON_INTERPRET", None)  # before kernels are imported: compiled functions
    if "kernels.linear_act" in sys.modules:
        from kernels.linear_act import INTERPRETED

        if INTERPRETED:
            raise RuntimeError("bench.compilecheck.worker needs a process where kernels are not interpreted")
    from .coverage import calls as coverage_calls

    i, n = part
    selected = coverage_calls(only)[i::n]
    name = TARGET_NAMES.get(capability, f"sm_{capability}")
    log = (lambda s: print(f"{name}.{i} {s}", file=sys.stderr, flush=True)) if verbose else None
    return compile_calls(selected, capability, progress=log)
