"""Fused linear + activation kernels and their launchers.

Forward   Y  = act(Z), Z = X @ W^T + b               X (M, K), W (N, K), b (N,), Y and Z (M, N)
          (Z is stored too, as a second output, for the activations that save it)
Delta     D  = dY * act'(Z), read off S              formed in the load path, never stored;
                                                     S is Y, or Z (kernels.checks.Activation.saves)
Backward  dX = D @ W          (optionally times act'_prev: the previous layer's delta)
          dW = D^T @ X,  db = sum_m D                 one kernel, the same reduction over M
                              (X optionally recomputed on load as act_prev(Z_prev))
Fused     dX, dW and db from one kernel, one read of dY, S and X, for a narrow layer (W one
          tile: kernels.configs.fused_backward_fits); each program takes a slice of the batch

The activation's kind is a constexpr code (Activation.code); its parameters are two float64
runtime arguments (Activation.args), so a new parameter value compiles nothing.

Each launcher checks its inputs, allocates its outputs and launches its kernel's step (the
launch's arguments, made once per key: see "launch steps") through the launch cache
(kernels.launch); the unchecked entries do the same for arguments fnn has checked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, memory
from .activations import apply_activation, apply_delta, param
from .checks import (
    Activation,
    as_activation,
    check_backward_call,
    check_backward_input_call,
    check_backward_weight_call,
    check_forward_call,
)
from .configs import (
    HEAVY_DELTA,
    cached_plan,
    cdiv,
    fused_backward_config,
    fused_backward_fits,
    tile_config,
    tma_forward_config,
    weight_grad_split,
)
from .launch import launcher
from .launch import session as launch_session
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
def delta_tile(dy_ptrs, s_ptrs, mask, ACTIVATION: tl.constexpr, a, b, ACC_DTYPE: tl.constexpr):
    """D = dY * act'(Z) on one tile, in ACC_DTYPE: dY loaded (0 where masked), S (what the
    forward saved, Y or Z) loaded only when ACTIVATION is not identity."""
    d = tl.load(dy_ptrs, mask=mask, other=0).to(ACC_DTYPE)
    if ACTIVATION != 0:
        s = tl.load(s_ptrs, mask=mask, other=0).to(ACC_DTYPE)
        d = apply_delta(d, s, ACTIVATION, a, b)
    return d


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
def linear_act_fwd_tma_kernel(
    x_desc,  # X (M, K): a tensor descriptor of [BLOCK_M, BLOCK_K] blocks
    w_desc,  # W (N, K): [BLOCK_N, BLOCK_K] blocks
    y_desc,  # Y (M, N): [BLOCK_M, BLOCK_N] blocks, written
    b_ptr,  # b (N,); not read unless HAS_BIAS
    M, N, K,
    stride_b,
    programs,  # how many programs run: each takes the output tiles pid, pid + programs, ...
    act_a: tl.float64, act_b: tl.float64,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """The forward as linear_act_fwd_kernel computes it, persistent and through tensor
    descriptors (TMA on Hopper): a fixed number of programs loop over the output tiles in the
    grouped order, X and W blocks are loaded whole (out-of-range elements read as zero) and Y
    blocks stored whole (out-of-range elements dropped), so no masks in the main loop."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, programs, flatten=True):
        pid_m, pid_n = tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for ks in range(k_steps):
            x = x_desc.load([off_m, ks * BLOCK_K])
            w = w_desc.load([off_n, ks * BLOCK_K])
            acc = mma(x, w.T, acc, INPUT_PRECISION, UPCAST)
        if HAS_BIAS:
            offs_n = off_n + tl.arange(0, BLOCK_N)
            b = tl.load(b_ptr + offs_n * stride_b, mask=offs_n < N, other=0)
            acc += b.to(ACC_DTYPE)[None, :]
        acc = apply_activation(acc, ACTIVATION, param(act_a, ACC_DTYPE), param(act_b, ACC_DTYPE))
        y_desc.store([off_m, off_n], cast(acc, y_desc.dtype, UPCAST))


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
        d = delta_tile(dy_ptrs, y_ptrs, mask_mn, ACTIVATION, a, b, ACC_DTYPE)
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
        d = delta_tile(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                       y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                       mask_mn, ACTIVATION, a, b, ACC_DTYPE)
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
    d = delta_tile(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                   s_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
                   mask, ACTIVATION, param(act_a, ACC_DTYPE), param(act_b, ACC_DTYPE), ACC_DTYPE)
    tl.store(d_ptr + offs_m[:, None] * N + offs_n[None, :], d, mask=mask)


@triton.jit
def linear_act_delta_sum_kernel(
    dy_ptr,  # dY (M, N), any strides
    s_ptr,  # S (M, N), what the forward saved for ACTIVATION (Y, or Z)
    d_ptr,  # D (M, N), contiguous, written in its own dtype (the layer's: what a GEMM library reads)
    db_ptr,  # (cdiv(M, BLOCK_M), N) float partials of db, contiguous: written when HAS_BIAS
    M, N,
    stride_dym, stride_dyn,
    stride_sm, stride_sn,
    act_a: tl.float64, act_b: tl.float64,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """D = dY * act'(Z) in the layer's dtype, for a backward whose two products another
    library computes, and with HAS_BIAS each program's column sums of D (from the unrounded
    values) as row pid_m of db's partials: the activation's backward and db in one pass."""
    pid_m = tl.program_id(0)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    d = delta_tile(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                   s_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
                   mask, ACTIVATION, param(act_a, ACC_DTYPE), param(act_b, ACC_DTYPE), ACC_DTYPE)
    tl.store(d_ptr + offs_m[:, None] * N + offs_n[None, :], cast(d, d_ptr.dtype.element_ty, UPCAST), mask=mask)
    if HAS_BIAS:
        tl.store(db_ptr + pid_m * N + offs_n, tl.sum(d, axis=0), mask=mask_n)  # masked rows hold D = 0


@triton.jit
def linear_act_bwd_fused_kernel(
    dy_ptr,  # dY (M, N), any strides
    s_ptr,  # S (M, N), what the forward saved (Y, or Z); not read when ACTIVATION is identity
    w_ptr,  # W (N, K)
    x_ptr,  # X (M, K), the layer input (with PREV_ACTIVATION: the previous layer's output)
    dx_ptr,  # dX (M, K), written: D @ W, times act'_prev when PREV_ACTIVATION is set
    dw_ptr,  # dW (N, K), or float partials (SPLIT, N, K) when the grid has more than one program
    db_ptr,  # db (N,), or partials (SPLIT, N); written only when HAS_BIAS
    M, N, K,
    rows_per_split,  # rows of the batch each program takes (a multiple of BLOCK_M)
    stride_dym, stride_dyn,
    stride_sm, stride_sn,
    stride_wn, stride_wk,
    stride_xm, stride_xk,
    stride_dxm, stride_dxk,
    stride_dws, stride_dwn, stride_dwk,
    stride_dbs, stride_dbn,
    act_a: tl.float64, act_b: tl.float64,  # this layer's activation parameters
    prev_a: tl.float64, prev_b: tl.float64,  # the previous layer's activation parameters
    ACTIVATION: tl.constexpr,  # this layer's Activation.code: D = dY * act'(Z), read off S
    PREV_ACTIVATION: tl.constexpr,  # the previous layer's Activation.code (identity: none), one that saves its output
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per step
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # >= N and >= K: W is one tile
):
    """The whole backward of one narrow layer from one read of dY, S and X: each program takes
    a slice of the batch, BLOCK_M rows at a time; per step it forms D once and computes that
    step's dX rows (D @ W, W held in registers), and adds D^T @ X and D's column sums to the
    slice's dW and db."""
    split = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_k = offs_k < K
    mask_nk = mask_n[:, None] & mask_k[None, :]
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask_nk, other=0)
    m_start = split * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)

    a, b = param(act_a, ACC_DTYPE), param(act_b, ACC_DTYPE)
    pa, pb = param(prev_a, ACC_DTYPE), param(prev_b, ACC_DTYPE)
    acc_w = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    acc_b = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + offs_r
        mask_m = offs_m < m_end
        mask_mn = mask_m[:, None] & mask_n[None, :]
        mask_mk = mask_m[:, None] & mask_k[None, :]
        d = delta_tile(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                       s_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
                       mask_mn, ACTIVATION, a, b, ACC_DTYPE)
        dc = cast(d, w.dtype, UPCAST)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask_mk, other=0)

        # dX rows: D @ W, then the previous layer's delta read off the same X tile
        dx = mma(dc, w, tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE), INPUT_PRECISION, UPCAST)
        if PREV_ACTIVATION != 0:
            dx = apply_delta(dx, x.to(ACC_DTYPE), PREV_ACTIVATION, pa, pb)
        tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                 cast(dx, dx_ptr.dtype.element_ty, UPCAST), mask=mask_mk)

        # dW and db: this step's rows added to the slice's sums
        acc_w = mma(tl.trans(dc), x, acc_w, INPUT_PRECISION, UPCAST)
        if HAS_BIAS:
            acc_b += tl.sum(d, axis=0)

    tl.store(dw_ptr + split * stride_dws + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
             cast(acc_w, dw_ptr.dtype.element_ty, UPCAST), mask=mask_nk)
    if HAS_BIAS:
        tl.store(db_ptr + split * stride_dbs + offs_n * stride_dbn,
                 cast(acc_b, db_ptr.dtype.element_ty, UPCAST), mask=mask_n)


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
_delta_sum = launcher(linear_act_delta_sum_kernel)
_bwd_fused = launcher(linear_act_bwd_fused_kernel)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_F32 = torch.float32
_matmul_precision = torch.get_float32_matmul_precision


def input_precision(dtype: torch.dtype) -> str:
    """The whole-network kernels' dot: tf32 for float32 only when torch allows it, as F.linear
    does; "ieee" otherwise."""
    if dtype is _F32 and _matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def layer_precision(dtype: torch.dtype) -> str:
    """The per-layer kernels' dot: as `input_precision`, except float32 at "highest", which
    takes `kernels.configs.FLOAT32_HIGHEST_DOT` ("ieee" or "tf32x3")."""
    if dtype is _F32:
        return "tf32" if _matmul_precision() != "highest" else configs.FLOAT32_HIGHEST_DOT
    return "ieee"


def _dtype_flags(dtype: torch.dtype) -> dict:
    return {
        "ACC_DTYPE": _acc_dtype(dtype),
        "INPUT_PRECISION": layer_precision(dtype),
        "UPCAST": INTERPRETED and dtype == torch.bfloat16,
    }


# Register limit handed to ptxas for the GEMM kernels: every register it wants. Left to
# itself (triton passes --regAllocOptLevel=2), ptxas held some kernels at 64-80 registers and
# spilled 8-24 B there; with the limit they use 150-215 and spill nothing. The occupancy this
# costs on large problems is for a GPU session to measure.
MAXNREG = 255
_IDENTITY = as_activation("identity")


# --- launch steps: what a launch needs besides its tensors, made once per key --------------------
#
# A step is `(key, grid, args)`, launched as `launcher.keyed(key, grid, *tensors, *args)` or, in
# a row of launches, `launcher.direct(session, key, grid, *tensors, *args)` (kernels.launch;
# `session()` below), `launcher` being the step's kernel's cached launcher (_fwd, _bwd_input,
# _bwd_weight or _delta, looked up when it launches). `key` is that launcher's caller key and
# the step's cache key: the sizes, the strides, the activations' codes and parameters, the
# flags, the dtypes and the matmul precision, everything that decides the arguments. `args`
# holds every non-tensor argument in the kernel's order, then num_warps, num_stages and
# maxnreg. Plain Python, made once per key (a workload cycling through more keys starts a
# cache again empty). The launchers below build each call's key and launch its step; fnn's
# layer programs (fnn.programs) build a whole network's steps once and launch them in a row.
# The GEMM steps take the activation whose D the kernel forms on load: never a HEAVY_DELTA one
# (whose D is formed first, by a delta step, and then read as an identity layer's dY).

_FWD_STEPS: dict[tuple, tuple] = {}
_BWD_INPUT_STEPS: dict[tuple, tuple] = {}
_BWD_WEIGHT_STEPS: dict[tuple, tuple] = {}
_DELTA_STEPS: dict[tuple, tuple] = {}
_FUSED_STEPS: dict[tuple, tuple] = {}


def _light(code: int) -> None:
    if code in HEAVY_DELTA:
        raise ValueError(f"activation code {code} forms its delta first (kernels.linear_act.HEAVY_DELTA)")


def _make_forward(key: tuple) -> tuple:
    M, N, K, sxm, sxk, swn, swk, sb, code, a, b, store_z, dtype, prec = key
    cfg = tile_config("fwd", M, N, K, dtype, prec, code in HEAVY_DELTA)
    grid = (cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n),)
    args = (
        M, N, K,
        sxm, sxk, swn, swk, 0 if sb is None else sb,
        N, 1, N, 1,  # y and z: fresh (M, N) tensors
        a, b,
        code, sb is not None, store_z,  # ACTIVATION, HAS_BIAS, STORE_Z
        _acc_dtype(dtype), prec, INTERPRETED and dtype == torch.bfloat16,  # ACC_DTYPE, INPUT_PRECISION, UPCAST
        cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m,  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M
        cfg.num_warps, cfg.num_stages, MAXNREG,
    )
    return (key, grid, args)


def forward_step(
    M: int, N: int, K: int, x_strides: tuple, w_strides: tuple, b_stride: int | None,
    activation: Activation, store_z: bool, dtype: torch.dtype, prec: str,
) -> tuple:
    """The forward kernel's step (tensors: x, weight, bias or x, y, z or y), M > 0;
    `b_stride` None for no bias."""
    code, a, b = activation.kernel_args
    key = (M, N, K, *x_strides, *w_strides, b_stride, code, a, b, store_z, dtype, prec)
    return _FWD_STEPS.get(key) or cached_plan(_FWD_STEPS, key, lambda: _make_forward(key))


def _make_backward_input(key: tuple) -> tuple:
    M, N, K, sdm, sdn, sym, syn, swn, swk, sxm, sxk, code, a, b, pcode, pa, pb, dtype, _, prec = key
    _light(code)
    cfg = tile_config("dx", M, K, N, dtype, prec, pcode in HEAVY_DELTA)
    grid = (cdiv(M, cfg.block_m) * cdiv(K, cfg.block_n),)
    args = (
        M, N, K,
        sdm, sdn, sym, syn, swn, swk, sxm, sxk,
        K, 1,  # dx: a fresh (M, K) tensor
        a, b, pa, pb,
        code, pcode,  # ACTIVATION, PREV_ACTIVATION
        _acc_dtype(dtype), prec, INTERPRETED and dtype == torch.bfloat16,  # ACC_DTYPE, INPUT_PRECISION, UPCAST
        cfg.block_m, cfg.block_k, cfg.block_n, cfg.group_m,  # BLOCK_M, BLOCK_N (the reduction), BLOCK_K, GROUP_M
        cfg.num_warps, cfg.num_stages, MAXNREG,
    )
    return (key, grid, args)


def backward_input_step(
    M: int, N: int, K: int, dy_strides: tuple, s_strides: tuple, w_strides: tuple,
    x_strides: tuple | None, activation: Activation, prev_activation: Activation,
    dtype: torch.dtype, dy_dtype: torch.dtype, prec: str,
) -> tuple:
    """The input-gradient kernel's step (tensors: dy, s, weight, x or dx, dx), M > 0; `x_strides`
    those of the previous layer's saved tensor, read only when `prev_activation` is not identity."""
    code, a, b = activation.kernel_args
    pcode, pa, pb = prev_activation.kernel_args
    sxm, sxk = x_strides if pcode != 0 else (K, 1)  # x is then dx, never read
    key = (M, N, K, *dy_strides, *s_strides, *w_strides, sxm, sxk, code, a, b, pcode, pa, pb, dtype, dy_dtype, prec)
    return _BWD_INPUT_STEPS.get(key) or cached_plan(_BWD_INPUT_STEPS, key, lambda: _make_backward_input(key))


_MAX_SLICES = 65535  # CUDA's limit on a grid's second axis: the weight kernel's slices


def _rows_per_split(M: int, split: int | None, auto: int, block: int) -> int:
    """Rows each program of a split weight gradient reduces: M over `split` slices (`auto`
    when None), rounded up to whole blocks."""
    if split is None:
        split = auto
    if split < 1:
        raise ValueError(f"split must be >= 1, got {split}")
    return cdiv(cdiv(M, split), block) * block


def _make_backward_weight(key: tuple) -> tuple:
    M, N, K, split, sdm, sdn, sym, syn, sxm, sxk, code, a, b, xcode, xa, xb, need_bias, dtype, _, prec, rows = key
    _light(code)
    cfg = tile_config("dw", N, K, M, dtype, prec, xcode in HEAVY_DELTA)  # rows N, cols K, reduced over M
    rows_per_split = rows
    if rows is None:
        rows_per_split = _rows_per_split(M, split, weight_grad_split(M, N, K, cfg), cfg.block_k)
    split = cdiv(M, rows_per_split)
    grid = (cdiv(N, cfg.block_m) * cdiv(K, cfg.block_n), split)
    args = (
        M, N, K, rows_per_split,
        sdm, sdn, sym, syn, sxm, sxk,
        N * K, K, 1,  # dW: (N, K), or the partials (split, N, K), contiguous
        N, 1,  # db: (N,), or the partials (split, N), contiguous
        a, b, xa, xb,
        code, xcode, need_bias,  # ACTIVATION, X_ACTIVATION, HAS_BIAS
        _acc_dtype(dtype), prec, INTERPRETED and dtype == torch.bfloat16,  # ACC_DTYPE, INPUT_PRECISION, UPCAST
        cfg.block_k, cfg.block_m, cfg.block_n, cfg.group_m,  # BLOCK_M (the reduction over M), BLOCK_N, BLOCK_K, GROUP_N
        cfg.num_warps, cfg.num_stages, MAXNREG,
    )
    return (key, grid, args, split)


def backward_weight_step(
    M: int, N: int, K: int, dy_strides: tuple, s_strides: tuple, x_strides: tuple,
    activation: Activation, x_activation: Activation, need_bias: bool, split: int | None,
    dtype: torch.dtype, dy_dtype: torch.dtype, prec: str, rows: int | None = None,
) -> tuple:
    """The weight-gradient kernel's step (tensors: dy, s, x, dW, db or dW), M > 0, with a fourth
    entry: the number of batch slices (1: dW (N, K) and db (N,); more: float partials
    (split, N, K) and (split, N), to be summed in order). `split` None: chosen from the shape.
    `rows` (M a multiple of it; `split` then unused): slices of exactly that many rows, whose
    gradients are the result, (M / rows, N, K) and (M / rows, N) (`weight_grad_outputs` with
    `slices`)."""
    code, a, b = activation.kernel_args
    xcode, xa, xb = x_activation.kernel_args
    key = (M, N, K, split, *dy_strides, *s_strides, *x_strides, code, a, b, xcode, xa, xb, need_bias, dtype,
           dy_dtype, prec, rows)
    return _BWD_WEIGHT_STEPS.get(key) or cached_plan(_BWD_WEIGHT_STEPS, key, lambda: _make_backward_weight(key))


def _make_delta(key: tuple) -> tuple:
    m, n, sdm, sdn, ssm, ssn, code, a, b, dy_dtype, _ = key
    bm, bn = 16, 64
    # ..., ACTIVATION, ACC_DTYPE, BLOCK_M, BLOCK_N; num_warps, num_stages, maxnreg
    args = (m, n, sdm, sdn, ssm, ssn, a, b, code, _acc_dtype(dy_dtype), bm, bn, 4, 1, None)
    return (key, (cdiv(m, bm), cdiv(n, bn)), args)


def delta_step(
    m: int, n: int, dy_strides: tuple, s_strides: tuple, activation: Activation,
    dy_dtype: torch.dtype, s_dtype: torch.dtype,
) -> tuple:
    """The delta kernel's step (tensors: dy, s, D), m and n > 0; D is (m, n) contiguous in the
    accumulator dtype (`delta_dtype`)."""
    code, a, b = activation.kernel_args
    key = (m, n, *dy_strides, *s_strides, code, a, b, dy_dtype, s_dtype)
    return _DELTA_STEPS.get(key) or cached_plan(_DELTA_STEPS, key, lambda: _make_delta(key))


def _make_backward_fused(key: tuple, prev: Activation) -> tuple:
    M, N, K, split, sdm, sdn, ssm, ssn, swn, swk, sxm, sxk, code, a, b, pcode, pa, pb, need_bias, dtype, _, prec, rows = key
    _light(code)
    if not fused_backward_fits(N, K, dtype, prev):
        raise ValueError(f"the fused backward does not serve ({N}, {K}) in {dtype} after {prev!r}")
    cfg, auto_split = fused_backward_config(M, N, K, dtype)
    rows_per_split = rows if rows is not None else _rows_per_split(M, split, auto_split, cfg.block_m)
    split = cdiv(M, rows_per_split)
    args = (
        M, N, K, rows_per_split,
        sdm, sdn, ssm, ssn, swn, swk, sxm, sxk,
        K, 1,  # dx: a fresh (M, K) tensor
        N * K, K, 1,  # dW: (N, K), or the partials (split, N, K), contiguous
        N, 1,  # db: (N,), or the partials (split, N), contiguous
        a, b, pa, pb,
        code, pcode, need_bias,  # ACTIVATION, PREV_ACTIVATION, HAS_BIAS
        _acc_dtype(dtype), prec, INTERPRETED and dtype == torch.bfloat16,  # ACC_DTYPE, INPUT_PRECISION, UPCAST
        cfg.block_m, cfg.block_n, cfg.block_k,
        cfg.num_warps, cfg.num_stages, MAXNREG,
    )
    return (key, (split,), args, split)


def backward_fused_step(
    M: int, N: int, K: int, dy_strides: tuple, s_strides: tuple, w_strides: tuple, x_strides: tuple,
    activation: Activation, prev_activation: Activation, need_bias: bool, split: int | None,
    dtype: torch.dtype, dy_dtype: torch.dtype, prec: str, rows: int | None = None,
) -> tuple:
    """The fused backward kernel's step (tensors: dy, s, weight, x, dx, dW, db or dW), M > 0,
    `fused_backward_fits(N, K, dtype, prev_activation)`, with a fourth entry: the number of batch
    slices (1: dW (N, K) and db (N,); more: float partials, as backward_weight_step's). `x` is
    the layer input (with a `prev_activation`: the previous layer's output). `rows`: slices of
    exactly that many rows, as in backward_weight_step."""
    code, a, b = activation.kernel_args
    pcode, pa, pb = prev_activation.kernel_args
    key = (M, N, K, split, *dy_strides, *s_strides, *w_strides, *x_strides, code, a, b, pcode, pa, pb,
           need_bias, dtype, dy_dtype, prec, rows)
    return _FUSED_STEPS.get(key) or cached_plan(
        _FUSED_STEPS, key, lambda: _make_backward_fused(key, prev_activation)
    )


def delta_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a D formed first (the accumulator's)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def session() -> tuple | None:
    """kernels.launch.session, for a row of `direct` launches of this module's kernels; None
    under the interpreter, whose launches all take Triton's path."""
    return None if INTERPRETED else launch_session()


def _delta_first(dy: torch.Tensor, s: torch.Tensor, act: Activation) -> torch.Tensor:
    """D = dy * act'(Z) read off s, (M, N) contiguous in the accumulator dtype."""
    m, n = dy.shape
    d = new((m, n), delta_dtype(dy.dtype), dy.device)
    if m and n:
        step = delta_step(m, n, dy.stride(), s.stride(), act, dy.dtype, s.dtype)
        _delta.keyed(step[0], step[1], dy, s, d, *step[2])
    return d


DELTA_SUM_ROWS, DELTA_SUM_COLS = 64, 64  # the delta-and-db pass's tile (4 warps)


def delta_and_bias_grad(
    dy: torch.Tensor, s: torch.Tensor, activation: str | Activation, need_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(D, db) of one layer for 2-D dy and s (what the forward saved for `activation`), both
    (M, N) of the layer's dtype: D = dy * act'(Z) in that dtype, contiguous, and db = D summed
    over the rows (float partials from the same pass, summed in order) or None. For a backward
    whose dX = D W and dW = D^T X another library computes (the bench's `fnn_cublas_bwd`)."""
    if activation.__class__ is not Activation:
        activation = as_activation(activation)
    m, n = dy.shape
    d = new((m, n), dy.dtype, dy.device)
    if m == 0 or n == 0:
        return d, (torch.zeros(n, dtype=dy.dtype, device=dy.device) if need_bias else None)
    acc = delta_dtype(dy.dtype)
    rows = cdiv(m, DELTA_SUM_ROWS)
    partials = new((rows, n), acc, dy.device) if need_bias else d  # not written without a bias
    code, a, b = activation.kernel_args
    _delta_sum(
        (rows, cdiv(n, DELTA_SUM_COLS)),
        dy, s, d, partials, m, n, *dy.stride(), *s.stride(), a, b,
        code, need_bias, _acc_dtype(dy.dtype), INTERPRETED and dy.dtype == torch.bfloat16,
        DELTA_SUM_ROWS, DELTA_SUM_COLS,
        num_warps=4,
    )
    return d, (partials.sum(0).to(dy.dtype) if need_bias else None)


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


# --- unchecked entries: the arguments are known good (fnn checks them once, at its public entry)


def _launch_forward(x, weight, bias, activation: Activation, y, z, M: int, N: int, K: int) -> None:
    """Launch the forward kernel for Y (and Z when given), M > 0."""
    if activation.__class__ is not Activation:
        activation = as_activation(activation)
    dtype = x.dtype
    prec = "ieee"  # layer_precision(dtype), inline: this runs on every launch
    if dtype is _F32:
        prec = "tf32" if _matmul_precision() != "highest" else configs.FLOAT32_HIGHEST_DOT
    if configs.FORWARD_TMA and z is None and tma_fits(x, weight, y, prec):
        _launch_forward_tma(x, weight, bias, activation, y, M, N, K, prec)
        return
    code, a, b = activation.kernel_args
    sxm, sxk = x.stride()
    swn, swk = weight.stride()
    sb = None if bias is None else bias.stride(0)
    key = (M, N, K, sxm, sxk, swn, swk, sb, code, a, b, z is not None, dtype, prec)
    step = _FWD_STEPS.get(key) or cached_plan(_FWD_STEPS, key, lambda: _make_forward(key))
    # bias unused without HAS_BIAS, z unless STORE_Z
    _fwd.keyed(key, step[1], x, weight, x if bias is None else bias, y, y if z is None else z, *step[2])


_TMA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TMA_DEVICES: dict[torch.device, bool] = {}


def _tma_device(device: torch.device) -> bool:
    """Whether tensor descriptors pay on `device`: a CUDA GPU of capability 9.0 or more (TMA),
    or the CPU (Triton's interpreter, or the compile check, which compiles for its target)."""
    ok = _TMA_DEVICES.get(device)
    if ok is None:
        ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)
        _TMA_DEVICES[device] = ok
    return ok


def _tma_ready(t: torch.Tensor) -> bool:
    """A 2-D tensor a descriptor can address: unit inner stride, outer stride and address
    multiples of 16 bytes."""
    size = t.element_size()
    return t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0


def tma_fits(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, prec: str) -> bool:
    """Whether the descriptor forward (linear_act_fwd_tma_kernel) serves this call: 16-bit
    inputs, or float32 on the tensor cores (tf32, tf32x3), every tensor descriptor-ready, on a
    device with TMA. Only consulted when kernels.configs.FORWARD_TMA is set."""
    if x.dtype not in _TMA_DTYPES or (x.dtype is _F32 and prec == "ieee"):
        return False
    return _tma_device(x.device) and _tma_ready(x) and _tma_ready(weight) and _tma_ready(y)


_SMS: dict[torch.device, int] = {}


def _tma_programs(device: torch.device, tiles: int) -> int:
    """One program per SM (at most one per tile); 4 off a GPU (interpreter, compile check)."""
    sms = _SMS.get(device)
    if sms is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        _SMS[device] = sms
    return max(1, min(sms, tiles))


def _launch_forward_tma(x, weight, bias, activation: Activation, y, M: int, N: int, K: int, prec: str) -> None:
    """The descriptor forward for Y, M > 0 (tma_fits holds)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    cfg = tma_forward_config(M, N, K, x.dtype)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    tiles = cdiv(M, bm) * cdiv(N, bn)
    programs = _tma_programs(x.device, tiles)
    code, a, b = activation.kernel_args
    linear_act_fwd_tma_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [bm, bk]),
        TensorDescriptor.from_tensor(weight, [bn, bk]),
        TensorDescriptor.from_tensor(y, [bm, bn]),
        x if bias is None else bias,  # not read without HAS_BIAS
        M, N, K, 0 if bias is None else bias.stride(0), programs,
        a, b,
        code, bias is not None,  # ACTIVATION, HAS_BIAS
        _acc_dtype(x.dtype), prec, INTERPRETED and x.dtype == torch.bfloat16,  # ACC_DTYPE, INPUT_PRECISION, UPCAST
        bm, bn, bk, cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def forward_unchecked(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: Activation
) -> torch.Tensor:
    """Y = act(x @ weight^T + bias) for a 2-D x whose arguments passed check_linear_args."""
    M, K = x.shape
    N = weight.shape[0]
    y = x.new_empty(M, N)  # x's dtype and device; sizes as ints: about 0.2 us under torch.empty(...)
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
    prec = "ieee"  # layer_precision(dtype), inline: this runs on every launch
    if dtype is _F32:
        prec = "tf32" if _matmul_precision() != "highest" else configs.FLOAT32_HIGHEST_DOT
    if activation.kernel_args[0] in HEAVY_DELTA:  # D first, then the product as for identity
        dy = y = _delta_first(dy, y, activation)
        activation = _IDENTITY
    step = backward_input_step(
        M, N, K, dy.stride(), y.stride(), weight.stride(), None if x is None else x.stride(),
        activation, prev_activation, dtype, dy.dtype, prec,
    )
    xp = dx if prev_activation.kernel_args[0] == 0 else x  # x read only for a prev activation
    _bwd_input.keyed(step[0], step[1], dy, y, weight, xp, dx, *step[2])
    return dx


def backward_weight_unchecked(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    activation: Activation,
    need_bias: bool,
    split: int | None = None,
    x_activation: Activation | str = "identity",
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """linear_act_backward_weight for arguments known good (2-D, matching shapes, one dtype;
    M a multiple of `rows` when given)."""
    if activation.__class__ is not Activation:
        activation = as_activation(activation)
    if x_activation.__class__ is not Activation:
        x_activation = as_activation(x_activation)
    M, K = x.shape
    N = dy.shape[1]
    dtype, device = x.dtype, x.device
    if M == 0:
        shape = (N, K) if rows is None else (0, N, K)
        dw = torch.zeros(shape, dtype=dtype, device=device)
        return dw, (torch.zeros(shape[:-1], dtype=dtype, device=device) if need_bias else None)
    if rows is not None and M > _MAX_SLICES * rows:  # the slices are the grid's second axis
        parts = [
            backward_weight_unchecked(dy[i : i + _MAX_SLICES * rows], y[i : i + _MAX_SLICES * rows],
                                      x[i : i + _MAX_SLICES * rows], activation, need_bias, None,
                                      x_activation, rows)
            for i in range(0, M, _MAX_SLICES * rows)
        ]
        return torch.cat([p[0] for p in parts]), (torch.cat([p[1] for p in parts]) if need_bias else None)
    prec = "ieee"  # layer_precision(dtype), inline: this runs on every launch
    if dtype is _F32:
        prec = "tf32" if _matmul_precision() != "highest" else configs.FLOAT32_HIGHEST_DOT
    if activation.kernel_args[0] in HEAVY_DELTA:  # D first, then the product as for identity
        dy = y = _delta_first(dy, y, activation)
        activation = _IDENTITY
    step = backward_weight_step(
        M, N, K, dy.stride(), y.stride(), x.stride(), activation, x_activation, need_bias, split,
        dtype, dy.dtype, prec, rows,
    )
    dw, db = weight_grad_outputs(step[3], N, K, dtype, device, need_bias, rows is not None)
    _bwd_weight.keyed(step[0], step[1], dy, y, x, dw, dw if db is None else db, *step[2])  # db unused without HAS_BIAS
    if step[3] == 1 or rows is not None:
        return dw, db
    return sum_partials(dw, db, dtype)


def backward_unchecked(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    x: torch.Tensor,
    activation: Activation,
    need_bias: bool,
    prev_activation: Activation | str = "identity",
    split: int | None = None,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """linear_act_backward for arguments known good (2-D, matching shapes, one dtype, and
    `fused_backward_fits`; M a multiple of `rows` when given)."""
    if activation.__class__ is not Activation:
        activation = as_activation(activation)
    if prev_activation.__class__ is not Activation:
        prev_activation = as_activation(prev_activation)
    N, K = weight.shape
    M = dy.shape[0]
    dtype, device = weight.dtype, weight.device
    dx = new((M, K), dtype, device)
    if M == 0:
        shape = (N, K) if rows is None else (0, N, K)
        dw = torch.zeros(shape, dtype=dtype, device=device)
        return dx, dw, (torch.zeros(shape[:-1], dtype=dtype, device=device) if need_bias else None)
    prec = "ieee"  # layer_precision(dtype), inline: this runs on every launch
    if dtype is _F32:
        prec = "tf32" if _matmul_precision() != "highest" else configs.FLOAT32_HIGHEST_DOT
    if activation.kernel_args[0] in HEAVY_DELTA:  # D first, then the products as for identity
        dy = y = _delta_first(dy, y, activation)
        activation = _IDENTITY
    step = backward_fused_step(
        M, N, K, dy.stride(), y.stride(), weight.stride(), x.stride(), activation, prev_activation,
        need_bias, split, dtype, dy.dtype, prec, rows,
    )
    dw, db = weight_grad_outputs(step[3], N, K, dtype, device, need_bias, rows is not None)
    _bwd_fused.keyed(step[0], step[1], dy, y, weight, x, dx, dw, dw if db is None else db, *step[2])
    if step[3] == 1 or rows is not None:
        return dx, dw, db
    return (dx, *sum_partials(dw, db, dtype))


def weight_grad_outputs(
    split: int, N: int, K: int, dtype: torch.dtype, device: torch.device, need_bias: bool,
    slices: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the weight-gradient kernel writes: dW (N, K) and db (N,) in `dtype` for one slice,
    else float partials (split, N, K) and (split, N) (db None without a bias); with `slices`,
    each slice's own gradients, (split, N, K) and (split, N) in `dtype`."""
    if slices:
        return new((split, N, K), dtype, device), (new((split, N), dtype, device) if need_bias else None)
    if split == 1:
        return new((N, K), dtype, device), (new((N,), dtype, device) if need_bias else None)
    acc = delta_dtype(dtype)
    return new((split, N, K), acc, device), (new((split, N), acc, device) if need_bias else None)


def sum_partials(
    dws: torch.Tensor, dbs: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight-gradient kernel's partials summed over the slices, in order, cast to `dtype`."""
    return dws.sum(0).to(dtype), (None if dbs is None else dbs.sum(0).to(dtype))


# --- the launchers: check the arguments, then the unchecked entries above ----------------------


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | Activation,
    store_z: bool,
    who: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    act = check_forward_call(x, weight, bias, activation, who)
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
    act, prev = check_backward_input_call(dy, y, weight, activation, x, prev_activation)
    return backward_input_unchecked(dy, y, weight, act, x, prev)


def linear_act_backward(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    x: torch.Tensor,
    activation: str | Activation,
    need_bias: bool,
    prev_activation: str | Activation = "identity",
    split: int | None = None,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dX, dW, db) of one layer from one kernel that reads dy, `y` and `x` once: what
    linear_act_backward_input and linear_act_backward_weight return, for a layer whose weight
    (N, K) fits the fused kernel's tile (kernels.configs.fused_backward_fits: N and K up to 64,
    32 in float64). D = dy * act'(Z) read off `y` (what the forward saved); db is None unless
    `need_bias`.

    `x` is the layer input. With `prev_activation` other than identity, dX is the previous
    layer's delta (D @ W) * prev_act'(Z_prev), read off `x`, that layer's output, as the FNN
    backward chains layers (prev_activation one whose derivative its output tells: see
    fused_backward_fits). `split` slices the batch as in linear_act_backward_weight (default:
    chosen from the shape); `rows` gives each slice's own dW and db, as there.
    """
    act, prev = check_backward_call(dy, y, weight, x, activation, need_bias, prev_activation, split, rows)
    return backward_unchecked(dy, y, weight, x, act, need_bias, prev, split, rows)


def linear_act_backward_weight(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    activation: str | Activation,
    need_bias: bool,
    split: int | None = None,
    x_activation: str | Activation = "identity",
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dW = D^T @ X (N, K) and, if `need_bias`, db = D summed over rows (N,); D = dy * act'(Z)
    read off `y`, what the forward saved (as in linear_act_backward_input).

    X is `x`, or x_activation(x) when `x_activation` is not identity: the layer input recomputed
    on load from the previous layer's saved Z (FNN saves Z, not the output, of a gelu layer).
    `split` (default: chosen from the shape) slices the batch into that many parts reduced
    in parallel, their float partials summed afterwards in a fixed order. `rows` (dividing M)
    instead returns each slice of that many consecutive rows' own gradients, dW (M / rows, N, K)
    and db (M / rows, N): per-sample gradients in one launch (torch.func.vmap's rule).
    """
    act, xact = check_backward_weight_call(dy, y, x, activation, need_bias, split, x_activation, rows)
    return backward_weight_unchecked(dy, y, x, act, need_bias, split, xact, rows)
