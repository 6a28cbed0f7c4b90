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

from .activations import apply_activation, apply_delta, param
from .checks import Activation, as_activation, check_linear_args
from .configs import matmul_config, weight_grad_split
from .memory import empty

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


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _input_precision(dtype: torch.dtype) -> str:
    """tf32 for float32 only when torch allows it, as F.linear does."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
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
# GEMMs read it as an identity layer's dY: one more launch and one more pass over (M, N).
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
    d = empty((m, n), dy, dtype=acc)
    if m and n:
        bm, bn = 16, 64
        linear_act_delta_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            dy, s, d, m, n, dy.stride(0), dy.stride(1), s.stride(0), s.stride(1), *act.args,
            ACTIVATION=act.code, ACC_DTYPE=_acc_dtype(dy.dtype), BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
        )
    return d


def _check_2d(name: str, t: torch.Tensor, shape: tuple[int, int], like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(
            f"{name} is {t.dtype} on {t.device}; expected {like.dtype} on {like.device}"
        )


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
    M, K = x.shape
    N = weight.shape[0]
    y = empty((M, N), x)
    z = empty((M, N), x) if store_z else None
    if M == 0:
        return y, z
    zs = z if store_z else y  # never written unless STORE_Z
    cfg = matmul_config(M, N, K, x.dtype)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    linear_act_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, y, zs,
        M, N, K,
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        y.stride(0), y.stride(1),
        zs.stride(0), zs.stride(1),
        *act.args,
        ACTIVATION=act.code,
        HAS_BIAS=bias is not None,
        STORE_Z=store_z,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=MAXNREG,
        **_dtype_flags(x.dtype),
    )
    return y, z


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
    dx = empty((M, K), weight)
    if M == 0:
        return dx
    if act.code in HEAVY_DELTA:
        dy = y = _delta_first(dy, y, act)
        act = _IDENTITY
    xp = x if prev.code != 0 else dx  # never read when prev is identity
    cfg = matmul_config(M, K, N, weight.dtype)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_K"]),)  # noqa: E731
    linear_act_bwd_input_kernel[grid](
        dy, y, weight, xp, dx,
        M, N, K,
        dy.stride(0), dy.stride(1),
        y.stride(0), y.stride(1),
        weight.stride(0), weight.stride(1),
        xp.stride(0), xp.stride(1),
        dx.stride(0), dx.stride(1),
        *act.args, *prev.args,
        ACTIVATION=act.code,
        PREV_ACTIVATION=prev.code,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_k, BLOCK_K=cfg.block_n, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=MAXNREG,
        **_dtype_flags(weight.dtype),
    )
    return dx


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
    if M == 0:
        dw = torch.zeros((N, K), dtype=x.dtype, device=x.device)
        return dw, (torch.zeros((N,), dtype=x.dtype, device=x.device) if need_bias else None)
    if act.code in HEAVY_DELTA:
        dy = y = _delta_first(dy, y, act)
        act = _IDENTITY
    cfg = matmul_config(N, K, M, x.dtype)  # rows N, cols K, reduced over M
    if split is None:
        split = weight_grad_split(M, N, K, cfg)
    if split < 1:
        raise ValueError(f"split must be >= 1, got {split}")
    rows_per_split = triton.cdiv(triton.cdiv(M, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(M, rows_per_split)
    if split == 1:
        dw = empty((N, K), x)
        db = empty((N,), x) if need_bias else None
        dws, dbs = dw.unsqueeze(0), (db.unsqueeze(0) if need_bias else None)
    else:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        dws = empty((split, N, K), x, dtype=acc)
        dbs = empty((split, N), x, dtype=acc) if need_bias else None
    dbs_arg = dbs if need_bias else dws
    grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]) * triton.cdiv(K, META["BLOCK_K"]), split)  # noqa: E731
    linear_act_bwd_weight_kernel[grid](
        dy, y, x, dws, dbs_arg,
        M, N, K, rows_per_split,
        dy.stride(0), dy.stride(1),
        y.stride(0), y.stride(1),
        x.stride(0), x.stride(1),
        dws.stride(0), dws.stride(1), dws.stride(2),
        dbs_arg.stride(0), dbs_arg.stride(1),
        *act.args, *xact.args,
        ACTIVATION=act.code,
        X_ACTIVATION=xact.code,
        HAS_BIAS=need_bias,
        BLOCK_M=cfg.block_k, BLOCK_N=cfg.block_m, BLOCK_K=cfg.block_n, GROUP_N=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=MAXNREG,
        **_dtype_flags(x.dtype),
    )
    if split == 1:
        return dw, db
    dw = dws.sum(0).to(x.dtype)
    return dw, (dbs.sum(0).to(x.dtype) if need_bias else None)
