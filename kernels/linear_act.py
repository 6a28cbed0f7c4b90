"""Fused linear + activation kernels and their launchers.

Forward   Y  = act(Z), Z = X @ W^T + b               X (M, K), W (N, K), b (N,), Y and Z (M, N)
          (Z is stored too, as a second output, for the activations that save it)
Delta     D  = dY * act'(Z), read off S              formed in the load path, never stored;
                                                     S is Y, or Z (kernels.checks.Activation.saves)
Backward  dX = D @ W          (optionally times act'_prev: the previous layer's delta)
          dW = D^T @ X,  db = sum_m D                 one kernel, the same reduction over M
                              (X optionally recomputed on load as act_prev(Z_prev))

The activation's kind is a constexpr code (Activation.code); its parameters are two float64
runtime arguments (Activation.args), so a new parameter value compiles nothing.

Each launcher checks its inputs, allocates its outputs and launches on a `lambda META` grid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import memory
from .activations import apply_activation, apply_delta, param
from .checks import Activation, as_activation, check_linear_args
from .configs import cached_plan, cdiv, matmul_config, weight_grad_split
from .launch import launcher
from .memory import new

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: bf16 operands go through float32 (exact products), because the
    Triton interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        # out_dtype spelled out: triton 3.6 defaults it to float32 even for a float64 acc.
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def cast(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(DTYPE), rounded to nearest even. UPCAST (interpreter + bf16): the interpreter
    truncates float32 -> bfloat16 casts (compiled Triton rounds them), so round on the bits:
    add 0x7FFF plus the lowest kept bit, keep the high half; a NaN stays a (quiet) NaN."""
    if UPCAST:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            kept = tl.where(x != x, (bits >> 16) | 0x40, rounded)
            return kept.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def tile_ids(pid, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """Map a 1-D program id to a (row tile, col tile), GROUP row tiles at a time (L2 reuse)."""
    n_r = tl.cdiv(rows, BLOCK_R)
    n_c = tl.cdiv(cols, BLOCK_C)
    per_group = GROUP * n_c
    first_r = (pid // per_group) * GROUP
    group_rows = tl.minimum(n_r - first_r, GROUP)
    pid_r = first_r + (pid % per_group) % group_rows
    pid_c = (pid % per_group) // group_rows
    return pid_r, pid_c


@triton.jit
def linear_act_fwd_kernel(
    x_ptr,  # X (M, K), any strides
    w_ptr,  # W (N, K), any strides
    b_ptr,  # b (N,); not read unless HAS_BIAS
    y_ptr,  # Y (M, N), written
    z_ptr,  # Z (M, N), the pre-activation, written only when STORE_Z
    M,  # rows of X and Y
    N,  # out_features
    K,  # in_features
    stride_xm, stride_xk,  # strides of X
    stride_wn, stride_wk,  # strides of W
    stride_b,  # stride of b
    stride_ym, stride_yn,  # strides of Y
    stride_zm, stride_zn,  # strides of Z
    act_a: tl.float64, act_b: tl.float64,  # the activation's parameters (Activation.args)
    ACTIVATION: tl.constexpr,  # Activation.code
    HAS_BIAS: tl.constexpr,  # add b before the activation
    STORE_Z: tl.constexpr,  # also store Z
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 inputs
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (float32 inputs only)
    UPCAST: tl.constexpr,  # interpreter + bf16: see mma and cast
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row tiles per group in the launch order
):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    wt_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # W^T tile

    # Main loop: acc = X_tile @ W_tile^T over K.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
        wt = tl.load(wt_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = mma(x, wt, acc, INPUT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        wt_ptrs += BLOCK_K * stride_wk

    # Epilogue: bias and activation on the accumulator, one cast at each store.
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0)
        acc += b.to(ACC_DTYPE)[None, :]
    if STORE_Z:
        z_ptrs = z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn
        tl.store(z_ptrs, cast(acc, z_ptr.dtype.element_ty, UPCAST), mask=mask_mn)
    acc = apply_activation(acc, ACTIVATION, param(act_a, ACC_DTYPE), param(act_b, ACC_DTYPE))
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, cast(acc, y_ptr.dtype.element_ty, UPCAST), mask=mask_mn)


@triton.jit
def linear_act_bwd_input_kernel(
    dy_ptr,  # dY (M, N), any strides (stride 0 for an expanded gradient)
    y_ptr,  # S (M, N), what the forward saved (Y, or Z); not read when ACTIVATION is identity
    w_ptr,  # W (N, K)
    x_ptr,  # S_prev (M, K), the previous layer's saved tensor (its output X, or its Z); read only when PREV_ACTIVATION is not identity
    dx_ptr,  # dX (M, K), written: D @ W, times act'_prev when PREV_ACTIVATION is set
    M, N, K,
    stride_dym, stride_dyn,
    stride_ym, stride_yn,
    stride_wn, stride_wk,
    stride_xm, stride_xk,
    stride_dxm, stride_dxk,
    act_a: tl.float64, act_b: tl.float64,  # this layer's activation parameters
    prev_a: tl.float64, prev_b: tl.float64,  # the previous layer's activation parameters
    ACTIVATION: tl.constexpr,  # this layer's Activation.code: D = dY * act'(Z), read off S
    PREV_ACTIVATION: tl.constexpr,  # the previous layer's Activation.code (identity: none)
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_k = tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < M
    mask_k = offs_k < K
    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk

    # Main loop over N: D tile formed on load, acc += D @ W.
    a, b = param(act_a, ACC_DTYPE), param(act_b, ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        mask_n = offs_n < N - n0
        mask_mn = mask_m[:, None] & mask_n[None, :]
        d = tl.load(dy_ptrs, mask=mask_mn, other=0).to(ACC_DTYPE)
        if ACTIVATION != 0:
            y = tl.load(y_ptrs, mask=mask_mn, other=0).to(ACC_DTYPE)
            d = apply_delta(d, y, ACTIVATION, a, b)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0)
        acc = mma(cast(d, w.dtype, UPCAST), w, acc, INPUT_PRECISION, UPCAST)
        dy_ptrs += BLOCK_N * stride_dyn
        y_ptrs += BLOCK_N * stride_yn
        w_ptrs += BLOCK_N * stride_wn

    # Epilogue: the previous layer's delta, (D @ W) * act'_prev, when chaining layers.
    mask_mk = mask_m[:, None] & mask_k[None, :]
    if PREV_ACTIVATION != 0:
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_mk, other=0)
        acc = apply_delta(acc, x.to(ACC_DTYPE), PREV_ACTIVATION,
                          param(prev_a, ACC_DTYPE), param(prev_b, ACC_DTYPE))
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, cast(acc, dx_ptr.dtype.element_ty, UPCAST), mask=mask_mk)


@triton.jit
def linear_act_bwd_weight_kernel(
    dy_ptr,  # dY (M, N), any strides
    y_ptr,  # S (M, N), what the forward saved (Y, or Z); not read when ACTIVATION is identity
    x_ptr,  # X (M, K), or Z_prev when X_ACTIVATION is set (then X = act_x(Z_prev))
    dw_ptr,  # dW (N, K), or float partials (SPLIT, N, K) when SPLIT > 1
    db_ptr,  # db (N,), or partials (SPLIT, N); written only when HAS_BIAS
    M, N, K,
    rows_per_split,  # rows of the batch each split reduces (a multiple of BLOCK_M)
    stride_dym, stride_dyn,
    stride_ym, stride_yn,
    stride_xm, stride_xk,
    stride_dws, stride_dwn, stride_dwk,  # split, row and column strides of dW
    stride_dbs, stride_dbn,  # split and element strides of db
    act_a: tl.float64, act_b: tl.float64,  # this layer's activation parameters
    x_a: tl.float64, x_b: tl.float64,  # X_ACTIVATION's parameters
    ACTIVATION: tl.constexpr,  # this layer's Activation.code
    X_ACTIVATION: tl.constexpr,  # Activation.code applied to x_ptr's tiles on load (0: none)
    HAS_BIAS: tl.constexpr,  # also reduce db = sum_m D
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    pid_n, pid_k = tile_ids(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_N)
    split = tl.program_id(1).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_k = offs_k < K
    m_start = split * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)

    # Main loop over this split's rows: acc += D^T @ X, acc_b += column sums of D.
    a, b = param(act_a, ACC_DTYPE), param(act_b, ACC_DTYPE)
    xa, xb = param(x_a, ACC_DTYPE), param(x_b, ACC_DTYPE)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    acc_b = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + offs_r
        mask_m = offs_m < m_end
        mask_mn = mask_m[:, None] & mask_n[None, :]
        d = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                    mask=mask_mn, other=0).to(ACC_DTYPE)
        if ACTIVATION != 0:
            y = tl.load(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                        mask=mask_mn, other=0).to(ACC_DTYPE)
            d = apply_delta(d, y, ACTIVATION, a, b)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0)
        if X_ACTIVATION != 0:  # the layer input, recomputed from the previous layer's Z
            x = cast(apply_activation(x.to(ACC_DTYPE), X_ACTIVATION, xa, xb), x.dtype, UPCAST)
        acc = mma(tl.trans(cast(d, x.dtype, UPCAST)), x, acc, INPUT_PRECISION, UPCAST)
        if HAS_BIAS:
            acc_b += tl.sum(d, axis=0)

    # Epilogue: store this split's dW tile; the first column of tiles also stores db.
    dw_ptrs = dw_ptr + split * stride_dws + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
    tl.store(dw_ptrs, cast(acc, dw_ptr.dtype.element_ty, UPCAST), mask=mask_n[:, None] & mask_k[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            db_ptrs = db_ptr + split * stride_dbs + offs_n * stride_dbn
            tl.store(db_ptrs, cast(acc_b, db_ptr.dtype.element_ty, UPCAST), mask=mask_n)


@triton.jit
def linear_act_delta_kernel(
    dy_ptr,  # dY (M, N), any strides
    s_ptr,  # S (M, N), what the forward saved for ACTIVATION (Y, or Z)
    d_ptr,  # D (M, N), contiguous, accumulator dtype: written
    M, N,
    stride_dym, stride_dyn,
    stride_sm, stride_sn,
    act_a: tl.float64, act_b: tl.float64,  # the activation's parameters
    ACTIVATION: tl.constexpr,  # Activation.code: D = dY * act'(Z), read off S
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """D = dY * act'(Z) alone, for the heavy activations (HEAVY_DELTA): a few elements per
    thread, where the GEMM kernels would form it on a whole operand tile beside the
    accumulator and spill."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    g = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0)
    v = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=mask, other=0)
    d = apply_delta(g.to(ACC_DTYPE), v.to(ACC_DTYPE), ACTIVATION, param(act_a, ACC_DTYPE), param(act_b, ACC_DTYPE))
    tl.store(d_ptr + offs_m[:, None] * N + offs_n[None, :], d, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

# Whether @triton.jit produced interpreted functions (TRITON_INTERPRET=1 at import time).
INTERPRETED = type(linear_act_fwd_kernel).__name__ == "InterpretedFunction"

# Each kernel launched through the launch cache (kernels.launch): after a specialization's
# first call, the compiled kernel's launcher is called directly. The launchers below pass a
# caller key (`launch.keyed`) built from what decides every specialization: the sizes, the
# strides, the dtype, the matmul precision and the flags (the cache itself checks the
# pointers' alignment and the launch hooks).
_fwd = launcher(linear_act_fwd_kernel)
_bwd_input = launcher(linear_act_bwd_input_kernel)
_bwd_weight = launcher(linear_act_bwd_weight_kernel)
_delta = launcher(linear_act_delta_kernel)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_F32 = torch.float32
_matmul_precision = torch.get_float32_matmul_precision


def _input_precision(dtype: torch.dtype) -> str:
    """tf32 for float32 only when torch allows it, as F.linear does."""
    if dtype is _F32 and _matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _dtype_flags(dtype: torch.dtype) -> dict:
    return {
        "ACC_DTYPE": _acc_dtype(dtype),
        "INPUT_PRECISION": _input_precision(dtype),
        "UPCAST": INTERPRETED and dtype == torch.bfloat16,
    }


# Activation codes whose derivative the backward GEMMs do not form on load: elu, softplus,
# gelu, gelu_tanh, silu and the Z-reading elu and softplus (exp, log1p, erfc, erfcx on a whole
# operand tile spilled hundreds of bytes). linear_act_delta_kernel forms D first, in the
# accumulator dtype (the products then see exactly the D they would have formed), and the
# GEMMs read it as an identity layer's dY: one more launch and one more pass over (M, N). A
# launcher called alone forms its own D; a backward that needs dX and dW forms it once for
# both (`delta_once`, called by fnn's autograd Functions in eager mode).
HEAVY_DELTA = frozenset(range(5, 12))
# Register limit handed to ptxas for the GEMM kernels: every register it wants. Left to
# itself (triton passes --regAllocOptLevel=2), ptxas held some kernels at 64-80 registers and
# spilled 8-24 B there; with the limit they use 150-215 and spill nothing. The occupancy this
# costs on large problems is for a GPU session to measure.
MAXNREG = 255
_IDENTITY = as_activation("identity")


def _delta_first(dy: torch.Tensor, s: torch.Tensor, act: Activation) -> torch.Tensor:
    """D = dy * act'(Z) read off s, (M, N) contiguous in the accumulator dtype."""
    m, n = dy.shape
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    d = new((m, n), acc, dy.device)
    if m and n:
        bm, bn = 16, 64
        code, a, b = act.kernel_args
        _delta.keyed(
            (m, n, *dy.stride(), *s.stride(), code, dy.dtype, s.dtype),
            (cdiv(m, bm), cdiv(n, bn)),
            dy, s, d, m, n, *dy.stride(), *s.stride(), a, b,
            code, _acc_dtype(dy.dtype), bm, bn,  # ACTIVATION, ACC_DTYPE, BLOCK_M, BLOCK_N
            num_warps=4, num_stages=1,
        )
    return d


def delta_once(
    dy: torch.Tensor, s: torch.Tensor, activation: Activation
) -> tuple[torch.Tensor, torch.Tensor, Activation]:
    """For a backward about to launch both dX and dW of one layer (2-D dy, s as the launchers
    take them): with a heavy activation (HEAVY_DELTA), D = dy * act'(Z) formed once and
    returned as (D, D, identity), which both launchers then read as the D they would each have
    formed (the same values, bit for bit); with any other activation the arguments unchanged
    (the GEMM kernels form D on load)."""
    if activation.__class__ is not Activation:
        activation = as_activation(activation)
    if activation.kernel_args[0] in HEAVY_DELTA:
        d = _delta_first(dy, s, activation)
        return d, d, _IDENTITY
    return dy, s, activation


# (kind, sizes..., dtype) -> the launch plan: grid and every constexpr the shape decides. Plain
# Python, made once per shape (a workload cycling through more shapes starts it again empty).
_PLANS: dict[tuple, tuple] = {}


def _plan(key: tuple, make) -> tuple:
    return cached_plan(_PLANS, key, make)  # _PLANS read at call time: tests may replace it


def _mm_plan(rows: int, cols: int, red: int, dtype: torch.dtype, grid_rows: int, grid_cols: int) -> tuple:
    """(grid, block_m, block_n, block_k, group_m, num_warps, num_stages, ACC_DTYPE, UPCAST) for
    matmul_config(rows, cols, red); the grid tiles (grid_rows, grid_cols) by (block_m, block_n)."""
    cfg = matmul_config(rows, cols, red, dtype)
    grid = (cdiv(grid_rows, cfg.block_m) * cdiv(grid_cols, cfg.block_n),)
    return (grid, cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m, cfg.num_warps, cfg.num_stages,
            _acc_dtype(dtype), INTERPRETED and dtype == torch.bfloat16)


def _check_2d(name: str, t: torch.Tensor, shape: tuple[int, int], like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(
            f"{name} is {t.dtype} on {t.device}; expected {like.dtype} on {like.device}"
        )


# --- unchecked entries: the arguments are known good (fnn checks them once, at its public entry)


def _fwd_plan(ukey: tuple) -> tuple:
    M, N, K, dtype = ukey[0], ukey[1], ukey[2], ukey[11]
    return _plan(ukey, lambda: _mm_plan(M, N, K, dtype, M, N))


def _launch_forward(x, weight, bias, activation: Activation, y, z, M: int, N: int, K: int) -> None:
    """Launch the forward kernel for Y (and Z when given), M > 0."""
    if activation.__class__ is not Activation:
        activation = as_activation(activation)
    dtype = x.dtype
    prec = "tf32" if dtype is _F32 and _matmul_precision() != "highest" else "ieee"
    code, act_a, act_b = activation.kernel_args
    sxm, sxk = x.stride()
    swn, swk = weight.stride()
    if bias is None:
        b, sb, has_bias = x, 0, False  # b unused without HAS_BIAS
    else:
        b, sb, has_bias = bias, bias.stride(0), True
    store_z = z is not None
    # The caller key: everything that decides the specialization and the plan.
    ukey = (M, N, K, sxm, sxk, swn, swk, sb, code, has_bias, store_z, dtype, prec)
    plan = _PLANS.get(ukey)
    if plan is None:
        plan = _fwd_plan(ukey)
    grid, bm, bn, bk, gm, warps, stages, acc, upcast = plan
    _fwd.keyed(
        ukey,
        grid,
        x, weight, b, y, z if store_z else y,  # z unused unless STORE_Z
        M, N, K,
        sxm, sxk, swn, swk, sb,
        N, 1, N, 1,  # y and z: fresh (M, N) tensors
        act_a, act_b,
        code, has_bias, store_z,  # ACTIVATION, HAS_BIAS, STORE_Z
        acc, prec, upcast,  # ACC_DTYPE, INPUT_PRECISION, UPCAST
        bm, bn, bk, gm,  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
        num_warps=warps, num_stages=stages, maxnreg=MAXNREG,
    )


def forward_unchecked(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: Activation
) -> torch.Tensor:
    """Y = act(x @ weight^T + bias) for a 2-D x whose arguments passed check_linear_args."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)  # sizes as ints: parsed faster than a tuple
    if memory.POISON:
        y.fill_(float("nan"))
    if M:
        _launch_forward(x, weight, bias, activation, y, None, M, N, K)
    return y


def forward_z_unchecked(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: Activation
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, Z) for a 2-D x whose arguments passed check_linear_args."""
    M, K = x.shape
    N = weight.shape[0]
    y = new((M, N), x.dtype, x.device)
    z = new((M, N), x.dtype, x.device)
    if M:
        _launch_forward(x, weight, bias, activation, y, z, M, N, K)
    return y, z


def backward_input_unchecked(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    activation: Activation,
    x: torch.Tensor | None = None,
    prev_activation: Activation | str = "identity",
) -> torch.Tensor:
    """linear_act_backward_input for arguments known good (2-D, matching shapes, one dtype)."""
    if activation.__class__ is not Activation:
        activation = as_activation(activation)
    if prev_activation.__class__ is not Activation:
        prev_activation = as_activation(prev_activation)
    N, K = weight.shape
    M = dy.shape[0]
    dtype = weight.dtype
    dx = new((M, K), dtype, weight.device)
    if M == 0:
        return dx
    prec = "tf32" if dtype is _F32 and _matmul_precision() != "highest" else "ieee"
    code, act_a, act_b = activation.kernel_args
    if code in HEAVY_DELTA:  # D first, then the product as for identity (see HEAVY_DELTA)
        dy = y = _delta_first(dy, y, activation)
        code, act_a, act_b = 0, 0.0, 0.0
    plan = _PLANS.get(("bwd_input", M, N, K, dtype))
    if plan is None:
        plan = _plan(("bwd_input", M, N, K, dtype), lambda: _mm_plan(M, K, N, dtype, M, K))
    grid, bm, bn, bk, gm, warps, stages, acc, upcast = plan
    prev_code, prev_a, prev_b = prev_activation.kernel_args
    sdm, sdn = dy.stride()
    sym, syn = y.stride()
    swn, swk = weight.stride()
    if prev_code != 0:
        xp, (sxm, sxk) = x, x.stride()
    else:
        xp, sxm, sxk = dx, K, 1  # never read when prev is identity
    _bwd_input.keyed(
        (M, N, K, sdm, sdn, sym, syn, swn, swk, sxm, sxk, code, prev_code, dtype, dy.dtype, prec),
        grid,
        dy, y, weight, xp, dx,
        M, N, K,
        sdm, sdn, sym, syn, swn, swk, sxm, sxk,
        K, 1,  # dx: a fresh (M, K) tensor
        act_a, act_b, prev_a, prev_b,
        code, prev_code,  # ACTIVATION, PREV_ACTIVATION
        acc, prec, upcast,  # ACC_DTYPE, INPUT_PRECISION, UPCAST
        bm, bk, bn, gm,  # BLOCK_M, BLOCK_N (the reduction: the config's block_k), BLOCK_K, GROUP_M
        num_warps=warps, num_stages=stages, maxnreg=MAXNREG,
    )
    return dx


def _weight_plan(M: int, N: int, K: int, dtype: torch.dtype, split: int | None) -> tuple:
    """(grid, split, rows_per_split, block_m, block_n, block_k, group_n, num_warps, num_stages,
    ACC_DTYPE, UPCAST) of the weight-gradient kernel."""
    cfg = matmul_config(N, K, M, dtype)  # rows N, cols K, reduced over M
    if split is None:
        split = weight_grad_split(M, N, K, cfg)
    if split < 1:
        raise ValueError(f"split must be >= 1, got {split}")
    rows_per_split = cdiv(cdiv(M, split), cfg.block_k) * cfg.block_k
    split = cdiv(M, rows_per_split)
    grid = (cdiv(N, cfg.block_m) * cdiv(K, cfg.block_n), split)
    return (grid, split, rows_per_split, cfg.block_k, cfg.block_m, cfg.block_n, cfg.group_m, cfg.num_warps,
            cfg.num_stages, _acc_dtype(dtype), INTERPRETED and dtype == torch.bfloat16)


def backward_weight_unchecked(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    activation: Activation,
    need_bias: bool,
    split: int | None = None,
    x_activation: Activation | str = "identity",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """linear_act_backward_weight for arguments known good (2-D, matching shapes, one dtype)."""
    if activation.__class__ is not Activation:
        activation = as_activation(activation)
    if x_activation.__class__ is not Activation:
        x_activation = as_activation(x_activation)
    M, K = x.shape
    N = dy.shape[1]
    dtype, device = x.dtype, x.device
    if M == 0:
        dw = torch.zeros((N, K), dtype=dtype, device=device)
        return dw, (torch.zeros((N,), dtype=dtype, device=device) if need_bias else None)
    plan = _PLANS.get(("bwd_weight", M, N, K, dtype, split))
    if plan is None:
        plan = _plan(("bwd_weight", M, N, K, dtype, split), lambda: _weight_plan(M, N, K, dtype, split))
    grid, split, rows_per_split, bm, bn, bk, gn, warps, stages, acc, upcast = plan
    if split == 1:
        dws = dw = new((N, K), dtype, device)
        dbs = db = new((N,), dtype, device) if need_bias else None
    else:
        acc_t = torch.float64 if dtype == torch.float64 else torch.float32
        dws = new((split, N, K), acc_t, device)
        dbs = new((split, N), acc_t, device) if need_bias else None
    prec = "tf32" if dtype is _F32 and _matmul_precision() != "highest" else "ieee"
    code, act_a, act_b = activation.kernel_args
    if code in HEAVY_DELTA:  # D first, then the product as for identity (see HEAVY_DELTA)
        dy = y = _delta_first(dy, y, activation)
        code, act_a, act_b = 0, 0.0, 0.0
    xcode, x_a, x_b = x_activation.kernel_args
    sdm, sdn = dy.stride()
    sym, syn = y.stride()
    sxm, sxk = x.stride()
    _bwd_weight.keyed(
        (M, N, K, split, sdm, sdn, sym, syn, sxm, sxk, code, xcode, need_bias, dtype, dy.dtype, prec),
        grid,
        dy, y, x, dws, dbs if need_bias else dws,  # db unused without HAS_BIAS
        M, N, K, rows_per_split,
        sdm, sdn, sym, syn, sxm, sxk,
        N * K, K, 1,  # dW: (N, K), or the partials (split, N, K), contiguous
        N, 1,  # db: (N,), or the partials (split, N), contiguous
        act_a, act_b, x_a, x_b,
        code, xcode, need_bias,  # ACTIVATION, X_ACTIVATION, HAS_BIAS
        acc, prec, upcast,  # ACC_DTYPE, INPUT_PRECISION, UPCAST
        bm, bn, bk, gn,  # BLOCK_M (the reduction over M), BLOCK_N, BLOCK_K, GROUP_N
        num_warps=warps, num_stages=stages, maxnreg=MAXNREG,
    )
    if split == 1:
        return dw, db
    dw = dws.sum(0).to(dtype)
    return dw, (dbs.sum(0).to(dtype) if need_bias else None)


# --- the launchers: check the arguments, then the unchecked entries above ----------------------


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | Activation,
    store_z: bool,
    who: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_linear_args(x, weight, bias, activation, who=who)
    if x.dim() != 2:
        raise ValueError(f"{who}: x must be 2-D (M, K), got shape {tuple(x.shape)}")
    act = as_activation(activation)
    if store_z:
        return forward_z_unchecked(x, weight, bias, act)
    return forward_unchecked(x, weight, bias, act), None


def linear_act_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | Activation
) -> torch.Tensor:
    """Y = act(x @ weight^T + bias) for a 2-D x (M, K); returns a new (M, N) tensor.
    `activation` is a name or a kernels.checks.Activation (parameters included)."""
    return _forward(x, weight, bias, activation, False, "linear_act_forward")[0]


def linear_act_forward_z(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | Activation
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, Z): Y = act(Z) and the pre-activation Z = x @ weight^T + bias, both (M, N), from one
    launch (Z is stored from the accumulator before the activation, cast to x's dtype)."""
    y, z = _forward(x, weight, bias, activation, True, "linear_act_forward_z")
    return y, z


def linear_act_backward_input(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    activation: str | Activation,
    x: torch.Tensor | None = None,
    prev_activation: str | Activation = "identity",
) -> torch.Tensor:
    """dX = D @ weight, an (M, K) tensor, with D = dy * act'(Z) read off `y`: what the forward
    saved for `activation` (Y, or Z where Activation.saves is "z"; never read for identity).

    With `prev_activation` other than identity, returns (D @ W) * prev_act'(Z_prev) instead: the
    delta of the previous layer, read off `x`, that layer's saved tensor (its output, which is
    this layer's input, or its Z). The FNN backward chains layers through this.
    """
    act = as_activation(activation)
    prev = as_activation(prev_activation, "prev_activation")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("linear_act_backward_input: weight must be a 2-D tensor")
    N, K = weight.shape
    M = dy.shape[0] if isinstance(dy, torch.Tensor) and dy.dim() == 2 else -1
    _check_2d("dy", dy, (M, N), weight)
    _check_2d("y", y, (M, N), weight)
    if prev.code != 0:
        if x is None:
            raise ValueError(
                "linear_act_backward_input: prev_activation needs x, the previous layer's saved tensor"
            )
        _check_2d("x", x, (M, K), weight)
    return backward_input_unchecked(dy, y, weight, act, x, prev)


def linear_act_backward_weight(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    activation: str | Activation,
    need_bias: bool,
    split: int | None = None,
    x_activation: str | Activation = "identity",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dW = D^T @ X (N, K) and, if `need_bias`, db = D summed over rows (N,); D = dy * act'(Z)
    read off `y`, what the forward saved (as in linear_act_backward_input).

    X is `x`, or x_activation(x) when `x_activation` is not identity: the layer input recomputed
    on load from the previous layer's saved Z (FNN saves Z, not the output, of a gelu layer).
    `split` (default: chosen from the shape) slices the batch into that many parts reduced
    in parallel, their float partials summed afterwards in a fixed order.
    """
    act = as_activation(activation)
    xact = as_activation(x_activation, "x_activation")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError("linear_act_backward_weight: x must be a 2-D tensor (M, K)")
    M, K = x.shape
    N = dy.shape[1] if isinstance(dy, torch.Tensor) and dy.dim() == 2 else -1
    _check_2d("dy", dy, (M, N), x)
    _check_2d("y", y, (M, N), x)
    if split is not None and split < 1:
        raise ValueError(f"split must be >= 1, got {split}")
    return backward_weight_unchecked(dy, y, x, act, need_bias, split, xact)
