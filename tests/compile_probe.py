"""Run by tests/test_compile_check.py in a fresh process (kernels compiled, not interpreted):
the compile check on purpose-made kernels and on one real fnn call, results as JSON.

    python tests/compile_probe.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton and the kernels are imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fnn  # noqa: E402
from bench.compilecheck import GEMM_TILES, Call, compile_calls  # noqa: E402
from kernels.configs import fused_backward_config, matmul_config  # noqa: E402


@triton.jit
def probe_spill_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # One warp holds BLOCK values per 32 threads across a reduction; maxnreg=32 forces spills.
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    s = tl.sum(x * x, axis=0)
    tl.store(y_ptr + offs, x / s)


@triton.jit
def probe_dot_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # C (BM, BN) = A (BM, K) @ B (K, BN), pipelined over K: num_stages buffers in shared memory.
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def probe_broken_kernel(x_ptr, BLOCK: tl.constexpr):
    tl.static_assert(BLOCK < 0, "a purpose-made compile error")
    tl.store(x_ptr + tl.arange(0, BLOCK), 0)


GEMM_TILES["probe_dot_kernel"] = (lambda c: c["BM"], "a_ptr")
GEMM_TILES["probe_broken_kernel"] = None
# probe_spill_kernel is left out of GEMM_TILES on purpose: the check must call it "unknown".


def spill() -> None:
    x = torch.empty(2048)
    probe_spill_kernel[(1,)](x, torch.empty_like(x), BLOCK=2048, num_warps=1, maxnreg=32)


def dot(dtype: torch.dtype, warps: int, stages: int, k: int = 64, bk: int = 64) -> None:
    a, c = torch.empty(64 * k, dtype=dtype), torch.empty(64 * 64)
    probe_dot_kernel[(1,)](a, a, c, k, BM=64, BN=64, BK=bk, num_warps=warps, num_stages=stages)


def broken_then_fine() -> None:
    x = torch.empty(64, dtype=torch.bfloat16)
    probe_broken_kernel[(1,)](x, BLOCK=16)  # fails to compile: recorded, the call goes on
    dot(torch.bfloat16, 4, 1)


def fnn_call(m: int, k: int, n: int, offset: int) -> None:
    """fnn.linear_act fp16 forward and backward; x starts `offset` elements into its storage."""
    x = torch.empty(m * k + offset, dtype=torch.float16)[offset:].view(m, k).requires_grad_()
    w = torch.empty(n, k, dtype=torch.float16, requires_grad=True)
    b = torch.empty(n, dtype=torch.float16, requires_grad=True)
    y = fnn.linear_act(x, w, b, "tanh")
    y.backward(torch.empty_like(y))


def main(out: str) -> None:
    m, k, n = 37, 19, 23
    wide = 70  # out_features past the fused backward's tile: dX and dW from two kernels
    calls90 = [
        Call("spill", spill),
        Call("shared", lambda: dot(torch.float16, 4, 5, k=1024, bk=256)),
        Call("bf16 dot 4 warps", lambda: dot(torch.bfloat16, 4, 1)),
        Call("bf16 dot 2 warps", lambda: dot(torch.bfloat16, 2, 1)),
        Call("broken then fine", broken_then_fine),
        Call("fnn aligned", lambda: fnn_call(m, k, n, 0)),
        Call("fnn misaligned x", lambda: fnn_call(m, k, n, 1)),
        Call("fnn wide", lambda: fnn_call(m, k, wide, 0)),
        Call("raises", lambda: fnn.linear_act(torch.empty(2, 3), torch.empty(4, 5))),
    ]
    calls80 = [
        Call("bf16 dot 4 warps", lambda: dot(torch.bfloat16, 4, 1)),
        Call("bf16 dot 2 warps", lambda: dot(torch.bfloat16, 2, 1)),
    ]
    results = {}
    for cap, calls in ((90, calls90), (80, calls80)):
        results[cap] = compile_calls(calls, cap).to_json()
    configs = {
        "fwd": matmul_config(m, n, k, torch.float16).__dict__,
        "bwd_fused": fused_backward_config(m, n, k, torch.float16)[0].__dict__,
        "bwd_input": matmul_config(m, k, wide, torch.float16).__dict__,
        "bwd_weight": matmul_config(wide, k, m, torch.float16).__dict__,
    }
    Path(out).write_text(json.dumps({"results": results, "configs": configs, "shape": [m, k, n, wide]}))


if __name__ == "__main__":
    main(sys.argv[1])
