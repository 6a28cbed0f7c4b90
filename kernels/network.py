"""Whole-network fused MLP kernels: every layer of a narrow network in one launch.

Parameters live in one flat buffer `params` in the network's dtype: every layer's weight W_l
(n_{l+1}, n_l), row-major, then the bias b_l of each layer that has one. That is the
concatenation of the parameters flattened, so the parameters of an FNN can be views of it
(fnn.network) and nothing is copied per call. `meta` is int32,
    [n_0..n_L | act_0..act_{L-1} | woff_0..woff_{L-1} | boff_0..boff_{L-1}]
(`network_meta`): the widths, the activation codes (kernels.checks.Activation.code), and
where each weight and bias starts in `params` (boff -1: no bias). `act_params` is (L, 2) in
the accumulator dtype (float64 for float64, else float32): each layer's activation
parameters (Activation.args: a slope, an alpha, softplus's beta and threshold). The number
of layers, the widths, the activation codes and their parameters are runtime values: one
compile per (P, dtype, flags), where P is the widest layer rounded up to a power of two >= 16
(tl.dot needs 16), at most 128.

Each layer works on (rows, P) tiles: W_l is loaded as a (P, P) tile masked to its real
corner, and padded units are set to exactly zero before and after their activation (act(0)
may be 0.5), so padding never changes a result. Stores are masked to the real rows and widths.

Forward   Z_l = h_l W_l^T + b_l, h_{l+1} = act_l(Z_l), h_0 = X, Y = h_L. When a backward
          will follow, H (P columns, zero padding) keeps for each hidden layer what its
          derivative needs (Activation.saves): its output h_{l+1}, or its Z_l where the
          activation saves Z (gelu, gelu_tanh, silu, leaky_relu with a negative slope, elu
          with alpha < 0, softplus with threshold < 17: `saves_z_rt`); and Z_L, the output
          layer's Z, goes to its own (M, n_L) output where that layer saves Z.
Backward  D_{L-1} = dY * act'(Z_{L-1}), read off Y or Z_L; for l = L-1 .. 0:
          dW_l += D_l^T h_l, db_l += sum_rows D_l, D_{l-1} = (D_l W_l) * act_{l-1}'(Z_{l-1})
          read off what H holds; dX = D_0 W_0. Where H holds Z_{l-1}, h_l = act_{l-1}(Z_{l-1})
          is recomputed for dW_l, a few rows at a time, into a per-program scratch.
Train     forward, loss and its gradient, backward and the SGD update in the same launch;
          its per-program H scratch holds the same as H (and Z_L in a last slot), plus the
          outputs of the layers that keep Z (nothing recomputed there).

Activation codes are dispatched at run time by chains of ifs (activation_rt, delta_rt; see
there for why chains), compiled only for the set of codes the network uses (ACTS, a bitmask:
kernels.checks.act_set). elu, softplus, gelu, gelu_tanh and silu (`heavy_rt`) are too heavy
in registers for a whole (rows, P) tile: they run through a per-program scratch, ACT_ROWS rows at a time
(`_act_tile`, `_delta_tile`); identity, sigmoid, relu, tanh and leaky_relu act on the tile in
registers.

Gradients are summed in float32 (float64 for float64) per program in a workspace
(G, L, P, P). With one program (G == 1) the same launch finishes: it writes the gradients
(in the layout of `params`), or applies the SGD step to `params`. With G > 1,
network_reduce_kernel sums the G partials in a fixed order (deterministic, no atomics) and
finishes: two launches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.runtime.driver import driver as triton_driver

from .activations import (
    device_fn,
    elu,
    elu_grad,
    elu_grad_z,
    gelu,
    gelu_grad,
    gelu_tanh,
    gelu_tanh_grad,
    leaky_relu,
    leaky_relu_grad,
    relu,
    relu_grad,
    sigmoid,
    sigmoid_grad,
    silu,
    silu_grad,
    softplus,
    softplus_grad,
    softplus_grad_z,
    tanh,
    tanh_grad,
)
from .checks import Activation, as_activation, check_2d, check_tensor
from .configs import cached_plan, cdiv
from .launch import launcher
from .linear_act import INTERPRETED, _acc_dtype, cast, input_precision, mma
from .memory import empty, new

LOSSES: dict[str, int] = {"bce": 0, "mse": 1, "sse": 2}
MAX_WIDTH = 128
# network_train_step takes float64 networks up to this width (padded width 64): at 128 the
# float64 train kernel spilled on every launch shape tried. Wider float64 networks train
# through the forward and backward kernels (fnn.Trainer does so by itself).
TRAIN_STEP_MAX_WIDTH_FLOAT64 = 64
# Gradient workspace budget: caps the number of programs of the backward (G, L, P, P).
WORKSPACE_BYTES = 64 << 20
MAX_PROGRAMS = 1024
# Activation-code bitmasks (bit c: Activation.code c). A kernel is compiled for the set of codes
# its network uses (ACTS, `act_set`): the branches of the others are left out, which keeps
# register pressure to what the network needs. The codes themselves are read at run time.
ALL_ACTS = (1 << 12) - 1
HEAVY_BITS = (1 << 12) - (1 << 5)  # codes 5..11 (heavy_rt): elu, softplus, gelu, gelu_tanh, silu and
# ELU_FROM_Z, SOFTPLUS_FROM_Z
Z_BITS = (1 << 4) | (0b11111 << 7)  # the codes whose layers may keep Z (saves_z_rt)

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@device_fn
def activation_rt(z, code, a, b, ACTS: tl.constexpr):
    """act(z) for an activation code known only at run time (Activation.code), with its
    parameters a, b (Activation.args, in z's dtype), the code one of the set ACTS (a bitmask
    of codes, `act_set`: only their branches are compiled). Every code: for small tiles (the
    scratch's chunks); full tiles take `activation_light` and `_act_tile`."""
    # A chain of ifs, each taking the value the previous one left (only one fires): an
    # if/elif chain, or ifs that each read z, around a dot's operand crash triton 3.6's
    # TritonGPUPrefetch pass (mma v2: fp16/bf16 on sm_80, float64 everywhere).
    z = activation_light(z, code, a, b, ACTS)
    if ACTS & ((1 << 5) | (1 << 10)):
        if (code == 5) | (code == 10):
            z = elu(z, a)
    if ACTS & ((1 << 6) | (1 << 11)):
        if (code == 6) | (code == 11):
            z = softplus(z, a, b)
    if ACTS & (1 << 7):
        if code == 7:
            z = gelu(z)
    if ACTS & (1 << 8):
        if code == 8:
            z = gelu_tanh(z)
    if ACTS & (1 << 9):
        if code == 9:
            z = silu(z)
    return z


@device_fn
def activation_light(z, code, a, b, ACTS: tl.constexpr):
    """act(z) for the light codes of ACTS (identity, sigmoid, relu, tanh, leaky_relu: cheap
    enough in registers for a whole (rows, P) tile); the heavy ones (`heavy_rt`) leave z as
    it is."""
    # A chain of ifs, as in activation_rt (triton 3.6's prefetch pass).
    if ACTS & (1 << 1):
        if code == 1:
            z = sigmoid(z)
    if ACTS & (1 << 2):
        if code == 2:
            z = relu(z)
    if ACTS & (1 << 3):
        if code == 3:
            z = tanh(z)
    if ACTS & (1 << 4):
        if code == 4:
            z = leaky_relu(z, a)
    return z


@device_fn
def delta_rt(g, s, code, a, b, ACTS: tl.constexpr):
    """g * act'(z) read off s, what the forward saved (Y, or Z where `saves_z_rt`), the
    activation code (one of ACTS) and its parameters known only at run time. Every code: for
    small tiles; full tiles take `delta_light` and `_delta_tile`."""
    g = delta_light(g, s, code, a, b, ACTS)
    if ACTS & (1 << 5):
        if code == 5:
            g = elu_grad(g, s, a)
    if ACTS & (1 << 6):
        if code == 6:
            g = softplus_grad(g, s, a, b)
    if ACTS & (1 << 10):
        if code == 10:
            g = elu_grad_z(g, s, a)
    if ACTS & (1 << 11):
        if code == 11:
            g = softplus_grad_z(g, s, a, b)
    if ACTS & (1 << 7):
        if code == 7:
            g = gelu_grad(g, s)
    if ACTS & (1 << 8):
        if code == 8:
            g = gelu_tanh_grad(g, s)
    if ACTS & (1 << 9):
        if code == 9:
            g = silu_grad(g, s)
    return g


@device_fn
def delta_light(g, s, code, a, b, ACTS: tl.constexpr):
    """delta_rt for every code of ACTS but the heavy ones (`heavy_rt`), which leave g as it is."""
    # A chain of ifs, as in activation_rt (triton 3.6's prefetch pass).
    if ACTS & (1 << 1):
        if code == 1:
            g = sigmoid_grad(g, s)
    if ACTS & (1 << 2):
        if code == 2:
            g = relu_grad(g, s)
    if ACTS & (1 << 3):
        if code == 3:
            g = tanh_grad(g, s)
    if ACTS & (1 << 4):
        if code == 4:
            g = leaky_relu_grad(g, s, a)
    return g


@device_fn
def in_set_rt(code, ACTS: tl.constexpr):
    """Whether the run-time code is one of ACTS (a code outside the set the kernel was
    compiled for has no branch: its layer gives NaN, never a silently wrong value)."""
    return ((ACTS >> code) & 1) != 0


@device_fn
def heavy_rt(code):
    """Whether the code's activation and derivative are too heavy in registers for a whole
    tile: elu and softplus (exp, expm1, log1p), gelu (erfc, erfcx), gelu_tanh, silu
    (compensated quotients), and the Z-reading elu and softplus (codes 5..11). They are
    evaluated a few rows at a time through a scratch instead (`_act_tile`, `_delta_tile`)."""
    return code >= 5


@device_fn
def saves_z_rt(code, a):
    """Whether a layer of this code and first parameter keeps Z rather than its output
    (kernels.checks.Activation.saves == "z"): gelu, gelu_tanh, silu, ELU_FROM_Z,
    SOFTPLUS_FROM_Z (codes 7..11) and leaky_relu with a negative slope."""
    return (code >= 7) | ((code == 4) & (a < 0))


@triton.jit
def _layer_act(act_ptr, meta_ptr, li, L):
    """(code, a, b, saves Z) of layer li: its Activation.code, its parameters, and whether
    the backward reads its Z (saves_z_rt)."""
    code = tl.load(meta_ptr + L + 1 + li)
    a = tl.load(act_ptr + 2 * li)
    b = tl.load(act_ptr + 2 * li + 1)
    return code, a, b, saves_z_rt(code, a)


@triton.jit
def _act_tile(z, code, a, b, asc, BLOCK_M: tl.constexpr, P: tl.constexpr, ACT_ROWS: tl.constexpr, ACTS: tl.constexpr):
    """act(z) for a (BLOCK_M, P) tile. Light codes act in registers; a heavy one (heavy_rt)
    goes through this program's scratch `asc` (BLOCK_M, P), ACT_ROWS rows at a time, so that
    few elements per thread are live in its branch. No branch around the tile: the scratch's
    stores and loads are masked off, its loop empty, for a light code. Without a heavy code
    in ACTS there is no scratch (asc unused). A code outside ACTS gives NaN."""
    # if/else, not an early return: triton compiles the statements after a return too (for a
    # float16 network the scratch path, on a float16 stand-in for asc, failed to compile).
    if (ACTS & ((1 << 12) - (1 << 5))) == 0:  # no heavy code (HEAVY_BITS)
        out = tl.where(in_set_rt(code, ACTS), activation_light(z, code, a, b, ACTS), float("nan"))
    else:
        offs_r = tl.arange(0, BLOCK_M)
        offs_p = tl.arange(0, P)
        n = tl.where(heavy_rt(code), BLOCK_M, 0)  # rows that go through the scratch
        tile = asc + offs_r[:, None] * P + offs_p[None, :]
        tl.debug_barrier()  # the scratch's previous readers are done
        tl.store(tile, z, mask=(offs_r < n)[:, None])
        h = tl.where(in_set_rt(code, ACTS), activation_light(z, code, a, b, ACTS), float("nan"))
        tl.debug_barrier()
        for r0 in range(0, n, ACT_ROWS):
            ptrs = asc + (r0 + tl.arange(0, ACT_ROWS))[:, None] * P + offs_p[None, :]
            tl.store(ptrs, activation_rt(tl.load(ptrs), code, a, b, ACTS))  # each thread its own elements
        tl.debug_barrier()
        out = tl.where(n > 0, tl.load(tile, mask=(offs_r < n)[:, None], other=0), h)
    return out


@triton.jit
def _delta_tile(
    g,
    s,
    code,
    a,
    b,
    asc,
    s_ptr,
    stride_sm,
    stride_sp,
    n_rows,
    n_cols,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    P: tl.constexpr,
    ACT_ROWS: tl.constexpr,
    ACTS: tl.constexpr,
):
    """g * act'(z) for a (BLOCK_M, P) tile, read off s (the same tile: S's rows at s_ptr,
    stride_sm apart, n_rows x n_cols of them real). Light codes in registers; a heavy one
    through the scratch `asc`, ACT_ROWS rows at a time, S's rows read again from s_ptr (none
    without a heavy code in ACTS). A code outside ACTS gives NaN."""
    if (ACTS & ((1 << 12) - (1 << 5))) == 0:  # no heavy code (HEAVY_BITS); if/else as in _act_tile
        out = tl.where(in_set_rt(code, ACTS), delta_light(g, s, code, a, b, ACTS), float("nan"))
    else:
        offs_r = tl.arange(0, BLOCK_M)
        offs_p = tl.arange(0, P)
        n = tl.where(heavy_rt(code), BLOCK_M, 0)
        tile = asc + offs_r[:, None] * P + offs_p[None, :]
        tl.debug_barrier()  # the scratch's previous readers are done
        tl.store(tile, g, mask=(offs_r < n)[:, None])
        d = tl.where(in_set_rt(code, ACTS), delta_light(g, s, code, a, b, ACTS), float("nan"))
        tl.debug_barrier()
        for r0 in range(0, n, ACT_ROWS):
            offs = r0 + tl.arange(0, ACT_ROWS)
            ptrs = asc + offs[:, None] * P + offs_p[None, :]
            sc = tl.load(
                s_ptr + offs[:, None] * stride_sm + offs_p[None, :] * stride_sp,
                mask=(offs < n_rows)[:, None] & (offs_p < n_cols)[None, :],
                other=0,
            )
            tl.store(ptrs, delta_rt(tl.load(ptrs), sc.to(ACC_DTYPE), code, a, b, ACTS))
        tl.debug_barrier()
        out = tl.where(n > 0, tl.load(tile, mask=(offs_r < n)[:, None], other=0), d)
    return out


@triton.jit
def _weight_tile(params_ptr, woff, n_out, n_in, offs_p, TRANS: tl.constexpr):
    """W_l as a (P_out, P_in) tile, or its transpose (P_in, P_out) when TRANS; zero outside
    the real (n_out, n_in) corner. W_l starts at params_ptr + woff, rows n_in apart."""
    if TRANS:
        ptrs = params_ptr + woff + offs_p[None, :] * n_in + offs_p[:, None]
        mask = (offs_p[None, :] < n_out) & (offs_p[:, None] < n_in)
    else:
        ptrs = params_ptr + woff + offs_p[:, None] * n_in + offs_p[None, :]
        mask = (offs_p[:, None] < n_out) & (offs_p[None, :] < n_in)
    return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _rows_if(offs_m, end, cond):
    """The (rows, 1) mask offs_m < end where the scalar `cond` holds, all false elsewhere (the
    scalar folded into the comparison: no branch, and no scalar-and-tensor `&`, which Triton's
    interpreter turns into an int32 mask)."""
    return (offs_m < tl.where(cond, end, 0))[:, None]


@triton.jit
def _layer_z(acc, params_ptr, meta_ptr, li, L, n_out, offs_p, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Z_l = acc + b_l, its padded columns (>= n_out) set to exactly zero (a product of an
    infinite input with a padded zero weight would leave NaN there)."""
    if HAS_BIAS:
        boff = tl.load(meta_ptr + 3 * L + 1 + li)
        b = tl.load(params_ptr + boff + offs_p, mask=offs_p < tl.where(boff >= 0, n_out, 0), other=0)
        acc += b.to(ACC_DTYPE)[None, :]
    return tl.where((offs_p < n_out)[None, :], acc, 0)


@triton.jit
def _layer_out(
    z, code, a, b, n_out, asc, BLOCK_M: tl.constexpr, P: tl.constexpr, ACT_ROWS: tl.constexpr, ACTS: tl.constexpr
):
    """act_l(Z_l) (`_act_tile`), its padded columns set to exactly zero (act(0) may be 0.5)."""
    h = _act_tile(z, code, a, b, asc, BLOCK_M, P, ACT_ROWS, ACTS)
    return tl.where((tl.arange(0, P) < n_out)[None, :], h, 0)


@triton.jit
def _layer_forward(
    h,
    params_ptr,
    meta_ptr,
    li,
    L,
    offs_p,
    P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """(Z_l = h @ W_l^T + b_l in ACC_DTYPE with padded columns exactly zero, n_{l+1})."""
    n_in = tl.load(meta_ptr + li)
    n_out = tl.load(meta_ptr + li + 1)
    wt = _weight_tile(params_ptr, tl.load(meta_ptr + 2 * L + 1 + li), n_out, n_in, offs_p, True)
    acc = mma(h, wt, tl.zeros((h.shape[0], P), dtype=ACC_DTYPE), INPUT_PRECISION, UPCAST)
    acc = _layer_z(acc, params_ptr, meta_ptr, li, L, n_out, offs_p, HAS_BIAS, ACC_DTYPE)
    return acc, n_out


@triton.jit
def _loss_grad(yh, t, valid, numel, LOSS: tl.constexpr):
    """(sum of the loss terms over `valid`, dLoss/dyhat); mean losses divide by numel."""
    if LOSS == 0:  # bce, as nn.BCELoss: logs clamped at -100, denominator at 1e-12
        safe = tl.where(valid, yh, 0.5)  # no log(0) in padding
        lg = tl.maximum(tl.log(safe), -100)
        lg1 = tl.maximum(tl.log(1 - safe), -100)
        term = -(t * lg + (1 - t) * lg1)
        g = (yh - t) / tl.maximum((1 - yh) * yh, 1e-12) / numel
    elif LOSS == 1:  # mse, as nn.MSELoss
        term = (yh - t) * (yh - t)
        g = (2 / numel) * (yh - t)
    else:  # sse: 0.5 * sum((yhat - y)^2)
        term = (yh - t) * (yh - t)
        g = yh - t
    return tl.sum(tl.sum(tl.where(valid, term, 0), axis=1), axis=0), tl.where(valid, g, 0)


@triton.jit
def _finish(
    g, mask, p_ptrs, buf_ptrs, out_ptrs, lr, momentum,
    TRAIN: tl.constexpr, MOMENTUM: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Gradient mode: store g. Train mode: torch.optim.SGD's step on the parameters at p_ptrs
    (buf = momentum * buf + g, first buf = g from a zeroed buffer; p -= lr * buf). Every
    rounding to the parameters' dtype is `cast`'s (to nearest even, in the interpreter too)."""
    dtype = p_ptrs.dtype.element_ty
    g = cast(g, dtype, UPCAST)  # the gradient autograd would hold, in the param dtype
    if TRAIN:
        step = g.to(lr.dtype)
        if MOMENTUM:
            buf = tl.load(buf_ptrs, mask=mask, other=0).to(lr.dtype)
            step = cast(momentum * buf, dtype, UPCAST).to(lr.dtype) + step
            step = cast(step, dtype, UPCAST)
            tl.store(buf_ptrs, step, mask=mask)
            step = step.to(lr.dtype)
        p = tl.load(p_ptrs, mask=mask, other=0).to(lr.dtype)
        tl.store(p_ptrs, cast(p - lr * step, dtype, UPCAST), mask=mask)
    else:
        tl.store(out_ptrs, g, mask=mask)


@triton.jit
def network_fwd_kernel(
    x_ptr,  # X (M, n_0), any strides
    params_ptr,  # flat parameters: weights W_0..W_{L-1}, then biases (offsets in meta)
    meta_ptr,  # int32 [n_0..n_L | act codes | weight offsets | bias offsets]
    act_ptr,  # (L, 2) activation parameters per layer (Activation.args), accumulator dtype
    y_ptr,  # Y (M, n_L), written
    h_ptr,  # H (L-1, M, P): what the backward reads of each hidden layer, written when STORE_H
    z_ptr,  # Z_L (M, n_L) with y's strides: the output layer's Z, written when STORE_Z
    asc_ptr,  # a heavy code in ACTS: (programs, BLOCK_M, P) accumulator-dtype scratch of _act_tile
    M,  # rows
    L,  # layers
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,
    stride_hl,  # layer stride of H (M * P); its rows are P apart
    P: tl.constexpr,  # padded width
    BLOCK_M: tl.constexpr,  # rows per program
    HAS_BIAS: tl.constexpr,  # some layer has a bias
    STORE_H: tl.constexpr,  # keep the hidden layers' h_l or Z_l for the backward
    STORE_Z: tl.constexpr,  # keep the output layer's Z (its activation saves Z)
    ACT_ROWS: tl.constexpr,  # rows per step of a heavy activation through the scratch
    ACTS: tl.constexpr,  # bitmask of the activation codes the layers use (act_set)
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    asc = asc_ptr + pid * BLOCK_M * P
    offs_p = tl.arange(0, P)
    mask_m = offs_m < M
    dtype = x_ptr.dtype.element_ty
    n_out = tl.load(meta_ptr)
    h = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + offs_p[None, :] * stride_xk,
        mask=mask_m[:, None] & (offs_p < n_out)[None, :],
        other=0,
    )

    # Layers: h stays on chip; only what the backward reads (if asked) and Y go to memory.
    h_l = h_ptr
    z_last = h  # STORE_Z: the last layer's Z, stored with Y (a store in the loop would keep its
    # loop-invariant addresses live throughout)
    for li in range(L):
        code, a, b, sz = _layer_act(act_ptr, meta_ptr, li, L)
        z, n_out = _layer_forward(
            h, params_ptr, meta_ptr, li, L, offs_p, P, HAS_BIAS, ACC_DTYPE, INPUT_PRECISION, UPCAST
        )
        # Masked stores, no branches (triton 3.6's prefetch pass): a layer that saves Z keeps
        # Z_l, the others their output h_l; all P columns, the padding written as zeros.
        h_ptrs = h_l + offs_m[:, None] * P + offs_p[None, :]
        if STORE_H:
            tl.store(h_ptrs, cast(z, dtype, UPCAST), mask=_rows_if(offs_m, M, sz & (li < L - 1)))
        if STORE_Z:
            z_last = cast(z, dtype, UPCAST)
        h = cast(_layer_out(z, code, a, b, n_out, asc, BLOCK_M, P, ACT_ROWS, ACTS), dtype, UPCAST)
        if STORE_H:
            tl.store(h_ptrs, h, mask=_rows_if(offs_m, M, ~sz & (li < L - 1)))
        h_l += stride_hl

    offs_y = offs_m[:, None] * stride_ym + offs_p[None, :] * stride_yn
    tl.store(y_ptr + offs_y, h, mask=mask_m[:, None] & (offs_p < n_out)[None, :])
    if STORE_Z:
        tl.store(z_ptr + offs_y, z_last, mask=mask_m[:, None] & (offs_p < n_out)[None, :])


@triton.jit
def network_bwd_kernel(
    x_ptr,  # X (M, n_0), any strides
    params_ptr,  # flat parameters; a one-program train step updates them in place
    meta_ptr,  # int32 [n_0..n_L | act codes | weight offsets | bias offsets]
    act_ptr,  # (L, 2) activation parameters per layer (Activation.args), accumulator dtype
    y_ptr,  # gradient mode: S_L (M, n_L), the output layer's Y, or its Z where it saves Z;
    # train mode: the target
    dy_ptr,  # gradient mode: dY (M, n_L), any strides; train mode: unused
    h_ptr,  # H, each layer's h_l or Z_l: gradient mode (L-1, M, P) from the forward; train mode
    # (G, L, BLOCK_M, P) scratch, Z_L of a Z-saving output layer in its last slot
    dsc_ptr,  # scratch (G, BLOCK_M, P) for this program's delta D_l
    asc_ptr,  # scratch (G, BLOCK_M, P), accumulator dtype: heavy activations and deltas (_act_tile)
    hsc_ptr,  # scratch (G, HS, BLOCK_M, P): the outputs of layers that keep Z, for the products
    # that read them (train mode: HS = L, one per layer; gradient mode: HS = 1, recomputed)
    dx_ptr,  # dX (M, n_0), written when NEED_DX
    gw_ptr,  # float workspace (G, L, P, P): this program's dW sums
    gb_ptr,  # float workspace (G, L, P): this program's db sums
    grad_ptr,  # FINISH, gradient mode: the gradients, written in the layout of params
    buf_ptr,  # FINISH, train mode with MOMENTUM: momentum buffer, in the layout of params
    loss_ptr,  # train mode: the loss (FINISH) or this program's loss sum (G,)
    hyper_ptr,  # train mode: [lr, momentum] in the accumulator dtype
    M,
    L,
    rows_per_program,  # a multiple of BLOCK_M
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,
    stride_dym,
    stride_dyn,
    stride_dxm,
    stride_dxk,
    stride_hl,  # layer stride of H
    stride_hg,  # program stride of H (train mode)
    P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NEED_DX: tl.constexpr,
    TRAIN: tl.constexpr,  # run the forward and the loss here; FINISH then updates parameters
    LOSS: tl.constexpr,  # LOSSES code (train mode)
    MOMENTUM: tl.constexpr,  # momentum buffer in use (train mode)
    FINISH: tl.constexpr,  # one program (G == 1): write the final result in this launch
    GW_COLS: tl.constexpr,  # columns of dW_l accumulated per step (a power of two <= P)
    CHUNK_K: tl.constexpr,  # reduction step of the products that read D back from its scratch
    STREAM_FWD: tl.constexpr,  # train mode: the forward products read X and H CHUNK_K columns
    # at a time from memory, rather than h from registers (FMA dots: float32 "ieee", float64)
    ACT_ROWS: tl.constexpr,  # rows per step of a heavy activation through the scratch
    ACTS: tl.constexpr,  # bitmask of the activation codes the layers use (act_set)
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_p = tl.arange(0, P)
    offs_r = tl.arange(0, BLOCK_M)
    row_start = pid * rows_per_program
    row_end = tl.minimum(M, row_start + rows_per_program)
    n_blocks = tl.cdiv(row_end - row_start, BLOCK_M)
    n_0 = tl.load(meta_ptr)
    n_L = tl.load(meta_ptr + L)
    gw_g = gw_ptr + pid * L * P * P
    gb_g = gb_ptr + pid * L * P
    dsc = dsc_ptr + pid * BLOCK_M * P
    asc = asc_ptr + pid * BLOCK_M * P
    hsc = hsc_ptr + pid * (L if TRAIN else 1) * BLOCK_M * P
    dtype = x_ptr.dtype.element_ty
    loss = tl.sum(tl.zeros((1,), dtype=ACC_DTYPE), axis=0)
    numel = (n_L.to(tl.int64) * M).to(ACC_DTYPE)
    code_o, a_o, b_o, sz_o = _layer_act(act_ptr, meta_ptr, L - 1, L)  # the output layer's

    for it in range(n_blocks):
        blk0 = row_start + it * BLOCK_M  # first row of this block
        offs_m = blk0 + offs_r
        mask_m = offs_m < row_end
        mask_out = mask_m[:, None] & (offs_p < n_L)[None, :]
        if TRAIN:  # H rows of the block: local in train mode, global otherwise
            h_base = h_ptr + pid * stride_hg
            h_rows = offs_r.to(tl.int64)
            h0 = blk0 * 0
        else:
            h_base = h_ptr
            h_rows = offs_m
            h0 = blk0

        # Stage 1: the output delta D_{L-1} (train mode: forward and loss gradient first).
        if TRAIN:
            tl.debug_barrier()  # the previous block's readers of the H scratch are done
            if STREAM_FWD:
                h = tl.zeros((BLOCK_M, P), dtype=dtype)  # the products read X and H from memory
            else:
                h = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_p[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_p < n_0)[None, :],
                    other=0,
                )
            h_l = h_base
            for li in range(L):
                code, a, b, sz = _layer_act(act_ptr, meta_ptr, li, L)
                if STREAM_FWD:
                    # h_l @ W_l^T, CHUNK_K columns of h_l at a time, read back from X, H, or
                    # (where the previous layer keeps Z in H) the copy of its output in hsc.
                    n_in = tl.load(meta_ptr + li)
                    n_out = tl.load(meta_ptr + li + 1)
                    woff = tl.load(meta_ptr + 2 * L + 1 + li)
                    _, _, _, psz = _layer_act(act_ptr, meta_ptr, tl.maximum(li - 1, 0), L)
                    src = tl.where(psz, hsc + (li - 1) * BLOCK_M * P, h_l - stride_hl)
                    acc = tl.zeros((BLOCK_M, P), dtype=ACC_DTYPE)
                    for k0 in range(0, n_in, CHUNK_K):
                        offs_k = k0 + tl.arange(0, CHUNK_K)
                        if li == 0:
                            hk = tl.load(
                                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                                mask=mask_m[:, None] & (offs_k < n_in)[None, :],
                                other=0,
                            )
                        else:
                            hk = tl.load(src + h_rows[:, None] * P + offs_k[None, :], mask=mask_m[:, None], other=0)
                        wt = tl.load(  # W_l^T rows k0.., (CHUNK_K, P_out)
                            params_ptr + woff + offs_p[None, :] * n_in + offs_k[:, None],
                            mask=(offs_p < n_out)[None, :] & (offs_k < n_in)[:, None],
                            other=0,
                        )
                        acc = mma(hk, wt, acc, INPUT_PRECISION, UPCAST)
                    z = _layer_z(acc, params_ptr, meta_ptr, li, L, n_out, offs_p, HAS_BIAS, ACC_DTYPE)
                else:
                    z, n_out = _layer_forward(
                        h, params_ptr, meta_ptr, li, L, offs_p, P, HAS_BIAS, ACC_DTYPE, INPUT_PRECISION, UPCAST
                    )
                # As in network_fwd_kernel: Z_l where the layer saves Z (the output layer's too,
                # in the last slot), else h_l for the hidden layers; masked stores, no branches.
                # A hidden layer that keeps Z also leaves its output in hsc, for the products of
                # the next layer and of dW (this scratch is the program's own: nothing saved).
                # An output layer whose derivative is read off Y by a heavy code (elu, softplus
                # saving Y) leaves Y in the last slot: _delta_tile reads it back from there.
                h_ptrs = h_l + h_rows[:, None] * P + offs_p[None, :]
                tl.store(h_ptrs, cast(z, dtype, UPCAST), mask=_rows_if(offs_m, row_end, sz))
                h = cast(_layer_out(z, code, a, b, n_out, asc, BLOCK_M, P, ACT_ROWS, ACTS), dtype, UPCAST)
                keep_h = ~sz & ((li < L - 1) | heavy_rt(code))
                tl.store(h_ptrs, h, mask=_rows_if(offs_m, row_end, keep_h))
                hs_ptrs = hsc + li * BLOCK_M * P + offs_r[:, None] * P + offs_p[None, :]
                tl.store(hs_ptrs, h, mask=_rows_if(offs_m, row_end, sz & (li < L - 1)))
                if STREAM_FWD:
                    tl.debug_barrier()  # the next layer reads these rows back in other threads
                h_l += stride_hl
            yh = h.to(ACC_DTYPE)
            t = tl.load(
                y_ptr + offs_m[:, None] * stride_ym + offs_p[None, :] * stride_yn, mask=mask_out, other=0
            ).to(ACC_DTYPE)
            part, g = _loss_grad(yh, t, mask_out, numel, LOSS)
            loss += part
            tl.debug_barrier()  # H written above is read back below, maybe by other threads
            # The output layer's derivative from Z_L where it saves Z, else from Y.
            s_ptr, stride_sm, stride_sp = h_l - stride_hl, P, 1
            z_o = tl.load(
                s_ptr + h_rows[:, None] * P + offs_p[None, :],
                mask=_rows_if(offs_m, row_end, sz_o) & (offs_p < n_L)[None, :],
                other=0,
            )
            yh = tl.where(sz_o, z_o.to(ACC_DTYPE), yh)
        else:
            g = tl.load(
                dy_ptr + offs_m[:, None] * stride_dym + offs_p[None, :] * stride_dyn, mask=mask_out, other=0
            ).to(ACC_DTYPE)
            yh = tl.load(
                y_ptr + offs_m[:, None] * stride_ym + offs_p[None, :] * stride_yn, mask=mask_out, other=0
            ).to(ACC_DTYPE)
            s_ptr, stride_sm, stride_sp = y_ptr + blk0 * stride_ym, stride_ym, stride_yn
        d = _delta_tile(
            g, yh, code_o, a_o, b_o, asc, s_ptr, stride_sm, stride_sp, row_end - blk0, n_L,
            ACC_DTYPE, BLOCK_M, P, ACT_ROWS, ACTS,
        )  # fmt: skip

        # Stage 2: layers top-down; this program's dW_l, db_l sums kept in its workspace slice.
        gw_l = gw_g + (L - 1) * P * P
        gb_l = gb_g + (L - 1) * P
        h_l = h_base + (L - 2) * stride_hl
        for i in range(L):
            li = L - 1 - i
            n_in = tl.load(meta_ptr + li)
            n_out = tl.load(meta_ptr + li + 1)
            woff = tl.load(meta_ptr + 2 * L + 1 + li)
            # The previous layer's activation. Where H holds its Z, dW_l reads its output h_l
            # from hsc: left there by the train-mode forward, or recomputed here from Z, a few
            # rows at a time (no activation on the products' operand tiles, whose layouts
            # hold many copies of each element per thread).
            pcode, pa, pb, psz = _layer_act(act_ptr, meta_ptr, tl.maximum(li - 1, 0), L)
            psz = psz & (li > 0)
            if TRAIN:
                src = tl.where(psz, hsc + (li - 1) * BLOCK_M * P, h_l)
            else:
                if ACTS & ((1 << 4) | (0b11111 << 7)):  # a code that may keep Z (Z_BITS)
                    for r0 in range(0, tl.where(psz, BLOCK_M, 0), ACT_ROWS):
                        offs = r0 + tl.arange(0, ACT_ROWS)
                        zc = tl.load(
                            h_l + (h0 + offs)[:, None] * P + offs_p[None, :],
                            mask=(h0 + offs < row_end)[:, None],
                            other=0,
                        )
                        zc = activation_rt(zc.to(ACC_DTYPE), pcode, pa, pb, ACTS)
                        tl.store(hsc + offs[:, None] * P + offs_p[None, :], cast(zc, dtype, UPCAST))
                    tl.debug_barrier()  # the products read hsc in other threads
                src = tl.where(psz, hsc, h_l + h0 * P)
            # D goes through this program's scratch, and its products read it back CHUNK_K rows
            # or columns at a time: short reductions for FMA dots (which hold all of theirs in
            # registers), and no dot operand derived in registers from D (triton 3.9 then moved
            # relu's mask into the dot operand's layout through shared memory, which fails).
            # The chunk loops run to the layer's real width (n_in, n_out) and the block's real
            # rows, not to P: padding is skipped, and a run-time trip count is not unrolled
            # (unrolled, float64 at P = 128 spilled).
            tl.debug_barrier()  # the previous layer's readers of the scratch are done
            # D's padded units set to exactly zero, as the forward's are: an inf in a real unit
            # times a padded weight's zero made NaN there (in D_l W_l), which the next layer's
            # chunked product then spread to the real units of its row.
            d = tl.where((offs_p < n_out)[None, :], d, 0)
            tl.store(dsc + offs_r[:, None] * P + offs_p[None, :], cast(d, dtype, UPCAST))
            if HAS_BIAS:  # db_l += column sums of D; D itself is not needed in registers again
                gb = tl.sum(d, axis=0)
                if it > 0:
                    gb += tl.load(gb_l + offs_p)
                tl.store(gb_l + offs_p, gb)
            tl.debug_barrier()
            # dW_l += D^T h_in, GW_COLS columns at a time.
            for c0 in range(0, n_in, GW_COLS):
                offs_c = c0 + tl.arange(0, GW_COLS)
                gw = tl.zeros((P, GW_COLS), dtype=ACC_DTYPE)
                for k0 in range(0, tl.minimum(row_end - blk0, BLOCK_M), CHUNK_K):
                    offs_k = k0 + tl.arange(0, CHUNK_K)
                    mask_k = ((blk0 + offs_k) < row_end)[:, None] & (offs_c < n_in)[None, :]
                    if li == 0:
                        h_c = tl.load(
                            x_ptr + (blk0 + offs_k)[:, None] * stride_xm + offs_c[None, :] * stride_xk,
                            mask=mask_k,
                            other=0,
                        )
                    else:
                        h_c = tl.load(src + offs_k[:, None] * P + offs_c[None, :], mask=mask_k, other=0)
                    dt_k = tl.load(dsc + offs_p[:, None] + offs_k[None, :] * P)  # D^T, (P, CHUNK_K)
                    gw = mma(dt_k, h_c, gw, INPUT_PRECISION, UPCAST)
                gw_ptrs = gw_l + offs_p[:, None] * P + offs_c[None, :]
                if it > 0:
                    gw += tl.load(gw_ptrs)
                tl.store(gw_ptrs, gw)
            mask_in = mask_m[:, None] & (offs_p < n_in)[None, :]
            if li > 0 or NEED_DX:
                # D_l W_l: the previous layer's delta before its activation's derivative, or dX.
                dh = tl.zeros((BLOCK_M, P), dtype=ACC_DTYPE)
                for k0 in range(0, n_out, CHUNK_K):
                    offs_k = k0 + tl.arange(0, CHUNK_K)
                    d_k = tl.load(dsc + offs_r[:, None] * P + offs_k[None, :])  # (BLOCK_M, CHUNK_K)
                    w_k = tl.load(  # W_l rows k0.., (CHUNK_K, P_in)
                        params_ptr + woff + offs_k[:, None] * n_in + offs_p[None, :],
                        mask=(offs_k < n_out)[:, None] & (offs_p < n_in)[None, :],
                        other=0,
                    )
                    dh = mma(d_k, w_k, dh, INPUT_PRECISION, UPCAST)
                if li > 0:
                    # D_{l-1} = (D_l W_l) * act'_{l-1}(Z_{l-1}), read off what H holds: the
                    # previous layer's output, or its Z.
                    s_in = tl.load(h_l + h_rows[:, None] * P + offs_p[None, :], mask=mask_in, other=0)
                    d = _delta_tile(
                        dh, s_in.to(ACC_DTYPE), pcode, pa, pb, asc, h_l + h0 * P, P, 1, row_end - blk0, n_in,
                        ACC_DTYPE, BLOCK_M, P, ACT_ROWS, ACTS,
                    )  # fmt: skip
                else:
                    tl.store(
                        dx_ptr + offs_m[:, None] * stride_dxm + offs_p[None, :] * stride_dxk,
                        cast(dh, dx_ptr.dtype.element_ty, UPCAST),
                        mask=mask_in,
                    )
            gw_l -= P * P
            gb_l -= P
            h_l -= stride_hl

    # Stage 3: the loss, then (one program) the gradients or the SGD step.
    if TRAIN:
        if FINISH:
            if LOSS == 2:
                loss = loss / 2
            else:
                loss = loss / numel
            tl.store(loss_ptr, cast(loss, loss_ptr.dtype.element_ty, UPCAST))
        else:
            tl.store(loss_ptr + pid, loss)
    if FINISH:
        tl.debug_barrier()  # the workspace is read back in another layout
        lr = tl.load(hyper_ptr)
        momentum = tl.load(hyper_ptr + 1)
        for li in range(L):
            n_in = tl.load(meta_ptr + li)
            n_out = tl.load(meta_ptr + li + 1)
            woff = tl.load(meta_ptr + 2 * L + 1 + li)
            for r0 in range(0, n_out, GW_COLS):  # GW_COLS rows of the (P, P) tile at a time
                offs_q = r0 + tl.arange(0, GW_COLS)
                g = tl.load(gw_ptr + li * P * P + offs_q[:, None] * P + offs_p[None, :])
                dst = woff + offs_q[:, None] * n_in + offs_p[None, :]
                mask = (offs_q < n_out)[:, None] & (offs_p < n_in)[None, :]
                _finish(g, mask, params_ptr + dst, buf_ptr + dst, grad_ptr + dst, lr, momentum, TRAIN, MOMENTUM, UPCAST)
            if HAS_BIAS:
                boff = tl.load(meta_ptr + 3 * L + 1 + li)
                dst = boff + offs_p
                mask = offs_p < tl.where(boff >= 0, n_out, 0)  # no bias: nothing
                g = tl.load(gb_ptr + li * P + offs_p)
                _finish(g, mask, params_ptr + dst, buf_ptr + dst, grad_ptr + dst, lr, momentum, TRAIN, MOMENTUM, UPCAST)


@triton.jit
def network_reduce_kernel(
    gw_ptr,  # float workspace (G, L, P, P)
    gb_ptr,  # float workspace (G, L, P)
    lossp_ptr,  # train mode: per-program loss sums (G,)
    meta_ptr,  # int32 [n_0..n_L | act codes | weight offsets | bias offsets]
    params_ptr,  # train mode: flat parameters, updated in place
    grad_ptr,  # gradient mode: the gradients, written in the layout of params
    buf_ptr,  # train mode with MOMENTUM: momentum buffer, in the layout of params
    loss_ptr,  # train mode: the loss, written by program (0, 0)
    hyper_ptr,  # train mode: [lr, momentum]
    G,
    L,
    M,
    P: tl.constexpr,
    BLOCK: tl.constexpr,  # weight elements per program; the last column of programs does db
    HAS_BIAS: tl.constexpr,
    TRAIN: tl.constexpr,
    LOSS: tl.constexpr,
    MOMENTUM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter + bfloat16: round the stores as compiled code does (`cast`)
):
    li = tl.program_id(0)
    tile = tl.program_id(1)
    n_in = tl.load(meta_ptr + li)
    n_out = tl.load(meta_ptr + li + 1)
    lr = tl.load(hyper_ptr)
    momentum = tl.load(hyper_ptr + 1)
    offs = tl.arange(0, BLOCK)
    n_tiles = tl.cdiv(P * P, BLOCK)
    # Sum the G partials in program order (fixed, hence deterministic), then finish.
    if tile < n_tiles:
        e = tile * BLOCK + offs
        row, col = e // P, e % P
        mask = (e < P * P) & (row < n_out) & (col < n_in)
        acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
        src = gw_ptr + li * P * P + e
        for _ in range(G):
            acc += tl.load(src, mask=mask, other=0)
            src += L * P * P
        dst = tl.load(meta_ptr + 2 * L + 1 + li) + row * n_in + col
        _finish(acc, mask, params_ptr + dst, buf_ptr + dst, grad_ptr + dst, lr, momentum, TRAIN, MOMENTUM, UPCAST)
    else:
        if HAS_BIAS:
            boff = tl.load(meta_ptr + 3 * L + 1 + li)
            mask = offs < tl.where(boff >= 0, n_out, 0)  # no bias: nothing
            acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
            src = gb_ptr + li * P + offs
            for _ in range(G):
                acc += tl.load(src, mask=mask, other=0)
                src += L * P
            dst = boff + offs
            _finish(acc, mask, params_ptr + dst, buf_ptr + dst, grad_ptr + dst, lr, momentum, TRAIN, MOMENTUM, UPCAST)
    if TRAIN:
        if li == 0:
            if tile == 0:
                total = tl.sum(tl.zeros((1,), dtype=ACC_DTYPE), axis=0)
                for g in range(G):
                    total += tl.load(lossp_ptr + g)
                numel = (tl.load(meta_ptr + L).to(tl.int64) * M).to(ACC_DTYPE)
                if LOSS == 2:
                    total = total / 2
                else:
                    total = total / numel
                tl.store(loss_ptr, cast(total, loss_ptr.dtype.element_ty, UPCAST))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def padded_width(sizes: Sequence[int]) -> int:
    """P: the widest layer rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    p = 16
    while p < max(sizes):
        p *= 2
    return p


def fits_network(sizes: Sequence[int]) -> bool:
    """Whether the whole-network kernels serve these widths (all <= MAX_WIDTH)."""
    return max(sizes) <= MAX_WIDTH


def param_count(sizes: Sequence[int], biased: Sequence[bool]) -> int:
    """Elements of the flat parameter buffer: every weight, then the biases that exist."""
    n = sum(o * i for i, o in zip(sizes[:-1], sizes[1:], strict=True))
    return n + sum(o for o, b in zip(sizes[1:], biased, strict=True) if b)


def network_meta(
    sizes: Sequence[int], activations: Sequence[str | Activation], biased: Sequence[bool]
) -> list[int]:
    """The kernels' `meta` as a list: widths, activation codes (Activation.code), weight and
    bias offsets in the flat parameter buffer (-1 where a layer has no bias). Put it in an
    int32 tensor."""
    n_layers = len(sizes) - 1
    if len(activations) != n_layers or len(biased) != n_layers:
        raise ValueError(f"need one activation and one bias flag per layer of {list(sizes)}")
    woff, off = [], 0
    for i, o in zip(sizes[:-1], sizes[1:], strict=True):
        woff.append(off)
        off += o * i
    boff = []
    for o, b in zip(sizes[1:], biased, strict=True):
        boff.append(off if b else -1)
        off += o if b else 0
    return [*sizes, *(as_activation(a).code for a in activations), *woff, *boff]


def network_act_params(activations: Sequence[str | Activation]) -> list[list[float]]:
    """The kernels' `act_params` as a list: each layer's two activation parameters
    (Activation.args). Put it in an (L, 2) tensor of the accumulator dtype (float64 for
    float64 networks, else float32)."""
    return [list(as_activation(a).args) for a in activations]


@dataclass(frozen=True)
class NetConfig:
    """Launch shape of a whole-network kernel: rows per block, warps, and for the backward
    the columns of each dW_l step (GW_COLS), the reduction step of D's products through its
    scratch (CHUNK_K), and whether the train step's forward streams h from memory."""

    block_m: int
    num_warps: int
    gw_cols: int = 0
    chunk_k: int = 16
    stream_fwd: bool = True


# (kind, dtype, P) -> NetConfig; kind "fwd" is network_fwd_kernel, "bwd" network_bwd_kernel
# (gradient and train modes). bfloat16 uses float16's entries. Each entry is the first of a
# candidate list (rows, warps, GW_COLS, CHUNK_K, STREAM_FWD) that compiled without register
# spills for sm_90a and sm_80 under triton 3.6 and 3.9 with every activation code compiled in
# (bench/NOTES.md, "Compile check"); `python -m bench.compile` checks the specializations fnn
# launches. Exception: the float64 P=128 train step spilled with every candidate, and the
# Trainer does not launch it (TRAIN_STEP_MAX_WIDTH_FLOAT64). None is timed yet.
_F16, _F32, _F64 = torch.float16, torch.float32, torch.float64
_NET_CONFIGS: dict[tuple[str, torch.dtype, int], NetConfig] = {
    ("fwd", _F32, 16): NetConfig(64, 4),
    ("fwd", _F32, 32): NetConfig(64, 8),
    ("fwd", _F32, 64): NetConfig(64, 8),
    ("fwd", _F32, 128): NetConfig(32, 8),
    ("fwd", _F16, 16): NetConfig(64, 4),
    ("fwd", _F16, 32): NetConfig(64, 4),
    ("fwd", _F16, 64): NetConfig(64, 8),
    ("fwd", _F16, 128): NetConfig(32, 8),
    ("fwd", _F64, 16): NetConfig(32, 4),
    ("fwd", _F64, 32): NetConfig(32, 4),
    ("fwd", _F64, 64): NetConfig(32, 8),
    ("fwd", _F64, 128): NetConfig(16, 8),
    ("bwd", _F32, 16): NetConfig(32, 4, 16, 32, True),
    ("bwd", _F32, 32): NetConfig(16, 4, 32, 16, True),
    ("bwd", _F32, 64): NetConfig(32, 8, 32, 16, True),
    ("bwd", _F32, 128): NetConfig(16, 8, 32, 16, True),
    ("bwd", _F16, 16): NetConfig(128, 8, 16, 32, False),
    ("bwd", _F16, 32): NetConfig(64, 8, 32, 64, False),
    ("bwd", _F16, 64): NetConfig(64, 8, 32, 32, False),
    ("bwd", _F16, 128): NetConfig(16, 8, 32, 32, True),
    ("bwd", _F64, 16): NetConfig(16, 8, 16, 16, True),
    ("bwd", _F64, 32): NetConfig(16, 8, 32, 16, True),
    ("bwd", _F64, 64): NetConfig(16, 8, 32, 16, True),
    ("bwd", _F64, 128): NetConfig(16, 8, 32, 16, True),
}
# A batch of at most this many rows takes one program in the backward: one launch, no
# reduction kernel. Provisional until measured.
SINGLE_PROGRAM_ROWS = 512


def network_config(kind: str, m: int, p: int, dtype: torch.dtype) -> NetConfig:
    """The NetConfig of `kind` for M rows, padded width P and `dtype` (see _NET_CONFIGS)."""
    key = (kind, _F16 if dtype == torch.bfloat16 else dtype, p)
    cfg = _NET_CONFIGS.get(key)
    if cfg is None:
        cfg = NetConfig(32, 4, 16, 16, True)
    if INTERPRETED:
        # fewer, larger programs: the interpreter's cost is per program
        cfg = replace(cfg, block_m=128)
    cap = max(16, triton.next_power_of_2(max(m, 1)))
    if cfg.block_m > cap:
        cfg = replace(cfg, block_m=cap)
    if cfg.chunk_k > min(cfg.block_m, p):
        cfg = replace(cfg, chunk_k=min(cfg.block_m, p))
    return cfg


def network_programs(
    m: int, block_m: int, n_layers: int, p: int, dtype: torch.dtype, programs: int | None = None
) -> tuple[int, int]:
    """(G, rows per program) of the backward: one program for a batch of at most
    SINGLE_PROGRAM_ROWS rows, else one per row block, capped so that the float gradient
    workspace (G, L, P, P) stays under WORKSPACE_BYTES."""
    blocks = cdiv(max(m, 1), block_m)
    if programs is None:
        acc_bytes = 8 if dtype == torch.float64 else 4
        cap = max(1, min(MAX_PROGRAMS, WORKSPACE_BYTES // (n_layers * p * (p + 1) * acc_bytes)))
        programs = 1 if m <= SINGLE_PROGRAM_ROWS else min(blocks, cap)
    if programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    rows = cdiv(blocks, min(programs, blocks)) * block_m
    return cdiv(max(m, 1), rows), rows


def _check_net(
    params: torch.Tensor,
    meta: torch.Tensor,
    act_params: torch.Tensor,
    sizes: Sequence[int],
    biased: Sequence[bool],
    like,
    who: str,
) -> int:
    """Validate the flat parameters, `meta` and `act_params` against `sizes`/`biased`; return P."""
    n_layers = len(sizes) - 1
    if n_layers < 1:
        raise ValueError(f"{who}: sizes must list at least two widths, got {list(sizes)}")
    if any(n < 1 for n in sizes):
        raise ValueError(f"{who}: every width must be >= 1, got {list(sizes)}")
    if len(biased) != n_layers:
        raise ValueError(f"{who}: {len(biased)} bias flags for {n_layers} layers")
    if not fits_network(sizes):
        raise ValueError(
            f"{who}: widths {list(sizes)} exceed {MAX_WIDTH}, the widest the "
            "whole-network kernels serve; use the per-layer path"
        )
    for name, t, shape, dtype in (
        ("params", params, (param_count(sizes, biased),), like.dtype),
        ("meta", meta, (4 * n_layers + 1,), torch.int32),
        ("act_params", act_params, (n_layers, 2), torch.float64 if like.dtype == torch.float64 else torch.float32),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{who}: {name} must be contiguous with shape {shape}, got {tuple(t.shape)}")
        if t.dtype != dtype or t.device != like.device:
            raise TypeError(f"{who}: {name} is {t.dtype} on {t.device}; expected {dtype} on {like.device}")
    return padded_width(sizes)


def _check_x(x: object, sizes: Sequence[int], who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != sizes[0]:
        raise ValueError(f"{who}: x must be a 2-D tensor (M, {sizes[0]})")
    check_tensor(x, f"{who}: x")


def act_rows(cfg: NetConfig, p: int) -> int:
    """Rows per step of a heavy activation through the scratch: at most two elements per
    thread of the (rows, P) chunk."""
    return max(1, min(cfg.block_m, 64 * cfg.num_warps // p))


# Each kernel launched through the launch cache (kernels.launch), with a caller key built from
# what decides its specialization: the plan's key (sizes, rows, dtype, programs), the flags,
# the activation set `acts` (which also decides the dtype of the scratch pointers passed in
# the unused ones' place), the strides and the matmul precision.
_fwd = launcher(network_fwd_kernel)
_bwd = launcher(network_bwd_kernel)
_red = launcher(network_reduce_kernel)
# occupancy is no concern for the network kernels (few programs): every register ptxas can give
_MAXNREG = 255

# (kind, rows, sizes, dtype, ...) -> the launch plan (P, config, programs, flags), plain Python
# made once per key (a workload cycling through more keys starts it again empty).
_PLANS: dict[tuple, tuple] = {}


def _plan(key: tuple, make) -> tuple:
    return cached_plan(_PLANS, key, make)  # _PLANS read at call time: tests may replace it


def _fwd_plan(m: int, sizes: tuple[int, ...], dtype: torch.dtype) -> tuple:
    """(P, grid, NetConfig, ACT_ROWS, ACC_DTYPE, UPCAST, accumulator torch dtype) of the
    forward kernel."""
    p = padded_width(sizes)
    cfg = network_config("fwd", m, p, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (p, (cdiv(m, cfg.block_m),), cfg, act_rows(cfg, p), _acc_dtype(dtype),
            INTERPRETED and dtype == torch.bfloat16, acc)


def _bwd_plan(m: int, sizes: tuple[int, ...], dtype: torch.dtype, programs: int | None) -> tuple:
    """(P, G, rows per program, NetConfig, ACT_ROWS, ACC_DTYPE, UPCAST, accumulator torch
    dtype) of the backward kernel."""
    p = padded_width(sizes)
    cfg = network_config("bwd", m, p, dtype)
    g, rows = network_programs(m, cfg.block_m, len(sizes) - 1, p, dtype, programs)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return p, g, rows, cfg, act_rows(cfg, p), _acc_dtype(dtype), INTERPRETED and dtype == torch.bfloat16, acc


# Scratch buffers of the kernels (the heavy activations' scratch, the float gradient
# workspace, the D, H and hidden-output scratches, the per-program losses), kept between calls
# per (name, shape, dtype, device, stream): calls on one stream run in order, so one call's
# scratch is free again when the next one's kernel starts; another stream gets its own. Small
# ones only (a single program's is a few kilobytes); larger ones are allocated per call, where
# that costs little. No kernel reads a scratch before writing it in the same launch.
_SCRATCH: dict[tuple, object] = {}
SCRATCH_MAX_BYTES = 1 << 20
_SCRATCH_MAX_ENTRIES = 256


def _stream() -> object:
    """The stream the next launch goes to (the launch cache's: Triton's current device and
    stream); None in the interpreter, which runs each launch to completion."""
    if INTERPRETED:
        return None
    d = triton_driver.active
    return d.get_current_stream(d.get_current_device())


def _scratch(name: str, shape: tuple, dtype: torch.dtype, device: torch.device, stream: object) -> torch.Tensor:
    """A scratch tensor: the cached one for (name, shape, dtype, device, stream), or a new one."""
    key = (name, shape, dtype, device, stream)
    t = _SCRATCH.get(key)
    if t is None:
        t = new(shape, dtype, device)
        numel = 1
        for n in shape:
            numel *= n
        if numel * t.element_size() <= SCRATCH_MAX_BYTES:
            if len(_SCRATCH) >= _SCRATCH_MAX_ENTRIES:
                _SCRATCH.clear()
            _SCRATCH[key] = t
    return t


def _bwd_scratch(
    train: bool, g: int, n_layers: int, p: int, cfg: NetConfig, has_bias: bool, acts: int, acc_t, dtype, device,
    stream
) -> tuple:
    """(gw, gb, dsc, asc or None, hsc or None, h or None, lossp or None): the backward's
    scratch buffers, from one lookup: asc where `acts` has a heavy activation, hsc where it has
    one that may keep Z (train mode: one slot per layer, else one), and in train mode the H
    scratch (G, L, BLOCK_M, P) (its last slot: Z_L of a Z-saving output layer) and, for
    G > 1, the per-program losses."""
    heavy, keeps_z = bool(acts & HEAVY_BITS), bool(acts & Z_BITS)
    key = (train, g, n_layers, p, cfg.block_m, has_bias, heavy, keeps_z, dtype, device, stream)
    scr = _SCRATCH.get(key)
    if scr is None:
        bm = cfg.block_m
        scr = (
            _scratch("gw", (g, n_layers, p, p), acc_t, device, stream),
            _scratch("gb", (g, n_layers, p) if has_bias else (1,), acc_t, device, stream),
            _scratch("dsc", (g, bm, p), dtype, device, stream),
            _scratch("asc", (g, bm, p), acc_t, device, stream) if heavy else None,
            _scratch("hsc", (g, n_layers if train else 1, bm, p), dtype, device, stream) if keeps_z else None,
            _scratch("h", (g, n_layers, bm, p), dtype, device, stream) if train else None,
            _scratch("lossp", (g,), acc_t, device, stream) if train and g > 1 else None,
        )
        if g == 1:  # small: all of it kept (larger ones are looked up by buffer in _scratch)
            if len(_SCRATCH) >= _SCRATCH_MAX_ENTRIES:
                _SCRATCH.clear()
            _SCRATCH[key] = scr
    return scr


# --- unchecked entries: the arguments are known good (fnn checks them at its public entry) --


def forward_unchecked(
    x: torch.Tensor,
    params: torch.Tensor,
    meta: torch.Tensor,
    sizes: tuple[int, ...],
    biased: tuple[bool, ...],
    store_hidden: bool,
    act_params: torch.Tensor,
    z_out: torch.Tensor | None = None,
    acts: int = ALL_ACTS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """network_forward for arguments known good (x 2-D of width sizes[0], params flat and
    contiguous in x's dtype and device, meta and act_params matching sizes, z_out None or a
    contiguous (M, n_L) tensor like x, acts covering meta's codes); H is None where nothing is
    stored (no backward, or a one-layer network)."""
    if sizes.__class__ is not tuple:
        sizes = tuple(sizes)
    m, n_layers = x.shape[0], len(sizes) - 1
    dtype, device = x.dtype, x.device
    has_bias = True in biased
    pkey = ("fwd", m, sizes, dtype)
    plan = _PLANS.get(pkey)
    if plan is None:
        plan = _plan(pkey, lambda: _fwd_plan(m, sizes, dtype))
    p, grid, cfg, rows_act, acc, upcast, acc_t = plan
    n_out = sizes[-1]
    y = new((m, n_out), dtype, device)
    store = store_hidden and n_layers > 1
    h = new((n_layers - 1, m, p), dtype, device) if store else None
    if m == 0:
        return y, h
    store_z = z_out is not None
    asc = _scratch("asc", (grid[0], cfg.block_m, p), acc_t, device, _stream()) if acts & HEAVY_BITS else y
    prec = input_precision(dtype)
    sxm, sxk = x.stride()
    _fwd.keyed(
        (pkey, has_bias, store, store_z, acts, sxm, sxk, prec),
        grid,
        x, params, meta, act_params, y,
        h if store else y, z_out if store_z else y, asc,  # h, z unused unless STORE_H, STORE_Z
        m, n_layers,
        sxm, sxk, n_out, 1,  # x; y: a fresh (m, n_L) tensor (z_out: y's strides)
        m * p,  # stride_hl
        p, cfg.block_m, has_bias, store, store_z,  # P, BLOCK_M, HAS_BIAS, STORE_H, STORE_Z
        rows_act, acts,  # ACT_ROWS, ACTS
        acc, prec, upcast,  # ACC_DTYPE, INPUT_PRECISION, UPCAST
        num_warps=cfg.num_warps, num_stages=1, maxnreg=_MAXNREG,
    )
    return y, h


def backward_unchecked(
    dy: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor | None,
    x: torch.Tensor,
    params: torch.Tensor,
    meta: torch.Tensor,
    sizes: tuple[int, ...],
    biased: tuple[bool, ...],
    need_dx: bool,
    act_params: torch.Tensor,
    programs: int | None = None,
    acts: int = ALL_ACTS,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """network_backward for arguments known good (`h` may be None for a one-layer network)."""
    if sizes.__class__ is not tuple:
        sizes = tuple(sizes)
    m, n_layers = x.shape[0], len(sizes) - 1
    dtype, device = x.dtype, x.device
    dx = new((m, sizes[0]), dtype, device) if need_dx else None
    if m == 0:
        return dx, torch.zeros_like(params)
    has_bias = True in biased
    pkey = ("bwd", m, sizes, dtype, programs)
    plan = _PLANS.get(pkey)
    if plan is None:
        plan = _plan(pkey, lambda: _bwd_plan(m, sizes, dtype, programs))
    p, g, rows, cfg, rows_act, acc, upcast, acc_t = plan
    gw, gb, dsc, asc, hsc, _, _ = _bwd_scratch(
        False, g, n_layers, p, cfg, has_bias, acts, acc_t, dtype, device, _stream()
    )
    grads = new(params.shape, dtype, device)
    prec = input_precision(dtype)
    dxa = dx if need_dx else x
    sxm, sxk = x.stride()
    sym, syn = y.stride()
    sdm, sdn = dy.stride()
    sdxm, sdxk = dxa.stride()
    store = n_layers > 1
    _bwd.keyed(
        (pkey, has_bias, need_dx, acts, sxm, sxk, sym, syn, sdm, sdn, sdxm, sdxk, prec),
        (g,),
        x, params, meta, act_params, y, dy, h if store else y, dsc,
        gw if asc is None else asc, x if hsc is None else hsc,  # asc, hsc unused without such codes
        dxa, gw, gb,
        grads, grads, gw, gw,  # grad_ptr; buf_ptr, loss_ptr, hyper_ptr unused in gradient mode
        m, n_layers, rows,
        sxm, sxk, sym, syn, sdm, sdn, sdxm, sdxk,
        m * p, 0,  # stride_hl, stride_hg
        p, cfg.block_m, has_bias, need_dx,  # P, BLOCK_M, HAS_BIAS, NEED_DX
        False, 0, False, g == 1,  # TRAIN, LOSS, MOMENTUM, FINISH
        cfg.gw_cols, cfg.chunk_k, cfg.stream_fwd,  # GW_COLS, CHUNK_K, STREAM_FWD
        rows_act, acts,  # ACT_ROWS, ACTS
        acc, prec, upcast,  # ACC_DTYPE, INPUT_PRECISION, UPCAST
        num_warps=cfg.num_warps, num_stages=1, maxnreg=_MAXNREG,
    )
    if g > 1:
        _reduce(gw, gb, gw, meta, params, grads, grads, gw, gw, g, n_layers, m, p, has_bias, False, 0, False, acc)
    return dx, grads


def _reduce(gw, gb, lossp, meta, params, grads, buf, loss, hyper, g, n_layers, m, p, has_bias, train, loss_code,
            momentum, acc_dtype) -> None:
    block = min(p * p, 1024)
    grid = (n_layers, cdiv(p * p, block) + 1)
    _red.keyed(
        (g, n_layers, m, p, has_bias, train, loss_code, momentum, acc_dtype, gw.dtype, params.dtype,
         lossp.dtype, loss.dtype),
        grid,
        gw, gb, lossp, meta, params, grads, buf, loss, hyper,
        g, n_layers, m,
        p, block, has_bias, train, loss_code, momentum, acc_dtype,  # P, BLOCK, HAS_BIAS, TRAIN, LOSS, MOMENTUM, ACC_DTYPE
        INTERPRETED and params.dtype is torch.bfloat16,  # UPCAST
    )


def train_step_unchecked(
    x: torch.Tensor,
    target: torch.Tensor,
    params: torch.Tensor,
    meta: torch.Tensor,
    sizes: tuple[int, ...],
    biased: tuple[bool, ...],
    loss: str,
    hyper: torch.Tensor,
    buf: torch.Tensor | None,
    act_params: torch.Tensor,
    programs: int | None = None,
    acts: int = ALL_ACTS,
) -> torch.Tensor:
    """network_train_step for arguments known good."""
    if sizes.__class__ is not tuple:
        sizes = tuple(sizes)
    m, n_layers = x.shape[0], len(sizes) - 1
    dtype, device = x.dtype, x.device
    has_bias = True in biased
    pkey = ("bwd", m, sizes, dtype, programs)
    plan = _PLANS.get(pkey)
    if plan is None:
        plan = _plan(pkey, lambda: _bwd_plan(m, sizes, dtype, programs))
    p, g, rows, cfg, rows_act, acc, upcast, acc_t = plan
    gw, gb, dsc, asc, hsc, h, lossp = _bwd_scratch(
        True, g, n_layers, p, cfg, has_bias, acts, acc_t, dtype, device, _stream()
    )
    out = new((), dtype, device)
    if lossp is None:
        lossp = out
    momentum = buf is not None
    bufa = buf if momentum else params
    loss_code = LOSSES[loss]
    prec = input_precision(dtype)
    sxm, sxk = x.stride()
    stm, stn = target.stride()
    bmp = cfg.block_m * p
    _bwd.keyed(
        (pkey, has_bias, loss_code, momentum, acts, sxm, sxk, stm, stn, prec),
        (g,),
        x, params, meta, act_params, target, target, h, dsc,
        gw if asc is None else asc, x if hsc is None else hsc,  # asc, hsc unused without such codes
        x, gw, gb,  # dx_ptr unused in train mode
        params, bufa, lossp, hyper,  # grad_ptr unused in train mode
        m, n_layers, rows,
        sxm, sxk, stm, stn, 0, 0, 0, 0,
        bmp, n_layers * bmp,  # stride_hl, stride_hg of the H scratch (G, L, BLOCK_M, P)
        p, cfg.block_m, has_bias, False,  # P, BLOCK_M, HAS_BIAS, NEED_DX
        True, loss_code, momentum, g == 1,  # TRAIN, LOSS, MOMENTUM, FINISH
        cfg.gw_cols, cfg.chunk_k, cfg.stream_fwd,  # GW_COLS, CHUNK_K, STREAM_FWD
        rows_act, acts,  # ACT_ROWS, ACTS
        acc, prec, upcast,  # ACC_DTYPE, INPUT_PRECISION, UPCAST
        num_warps=cfg.num_warps, num_stages=1, maxnreg=_MAXNREG,
    )
    if g > 1:
        _reduce(gw, gb, lossp, meta, params, params, bufa, out, hyper, g, n_layers, m, p, has_bias, True,
                loss_code, momentum, acc)
    return out


# --- the launchers: check the arguments, then the unchecked entries above --------------------


def network_forward(
    x: torch.Tensor,
    params: torch.Tensor,
    meta: torch.Tensor,
    sizes: Sequence[int],
    biased: Sequence[bool],
    store_hidden: bool,
    act_params: torch.Tensor,
    z_out: torch.Tensor | None = None,
    acts: int = ALL_ACTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Y (M, n_L) of the whole network for a 2-D x (M, n_0), in one launch; also H
    (L-1, M, P), written only when `store_hidden`: per hidden layer what the backward reads,
    its Z_l where its activation saves Z (Activation.saves, as `saves_z_rt` decides it from
    meta's code and act_params), else its output h_l; P columns, zero padding.
    `act_params`: (L, 2), each layer's Activation.args in the accumulator dtype.
    `z_out`: an (M, n_L) contiguous tensor that receives Z_L, the output layer's Z (what the
    backward reads where the output activation saves Z); None: not kept. `acts`: the set of
    activation codes in meta (`act_set`), for which the kernel is compiled; a layer whose code
    is outside it gives NaN. A heavy one (gelu, gelu_tanh, silu) runs through a scratch of
    (M, P) floats."""
    who = "network_forward"
    _check_x(x, sizes, who)
    p = _check_net(params, meta, act_params, sizes, biased, x, who)
    m = x.shape[0]
    if z_out is not None:
        check_2d("z_out", z_out, (m, sizes[-1]), x, who)
        if not z_out.is_contiguous():
            raise ValueError(f"{who}: z_out must be contiguous")
    y, h = forward_unchecked(x, params, meta, tuple(sizes), tuple(biased), store_hidden, act_params, z_out, acts)
    if h is None:
        h = empty((0, m, p) if store_hidden else (0, 0, p), x)
    return y, h


def network_backward(
    dy: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    x: torch.Tensor,
    params: torch.Tensor,
    meta: torch.Tensor,
    sizes: Sequence[int],
    biased: Sequence[bool],
    need_dx: bool,
    act_params: torch.Tensor,
    programs: int | None = None,
    acts: int = ALL_ACTS,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(dX or None, the gradients in the layout of `params`) from dY, the output layer's saved
    tensor `y` (its output Y, or Z_L where its activation saves Z: network_forward's z_out),
    H and the input X (`act_params` as for network_forward). One launch when the batch fits
    one program (G == 1), else two (the partial sums reduced in a fixed order). `programs`
    forces G (tests). `acts`: as for network_forward."""
    who = "network_backward"
    _check_x(x, sizes, who)
    p = _check_net(params, meta, act_params, sizes, biased, x, who)
    m, n_layers = x.shape[0], len(sizes) - 1
    check_2d("dy", dy, (m, sizes[-1]), x, who)
    check_2d("y", y, (m, sizes[-1]), x, who)
    if n_layers > 1:
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"{who}: h must be a torch.Tensor, got {type(h).__name__}")
        if tuple(h.shape) != (n_layers - 1, m, p) or not h.is_contiguous():
            raise ValueError(
                f"{who}: h must be contiguous with shape {(n_layers - 1, m, p)}, got {tuple(h.shape)}"
            )
        if h.dtype != x.dtype or h.device != x.device:
            raise TypeError(f"{who}: h is {h.dtype} on {h.device}; expected {x.dtype} on {x.device}")
    if programs is not None and programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    return backward_unchecked(
        dy, y, h, x, params, meta, tuple(sizes), tuple(biased), need_dx, act_params, programs, acts
    )


def network_train_step(
    x: torch.Tensor,
    target: torch.Tensor,
    params: torch.Tensor,
    meta: torch.Tensor,
    sizes: Sequence[int],
    biased: Sequence[bool],
    loss: str,
    hyper: torch.Tensor,
    buf: torch.Tensor | None,
    act_params: torch.Tensor,
    programs: int | None = None,
    acts: int = ALL_ACTS,
) -> torch.Tensor:
    """One SGD step of the whole network on (x, target): forward, loss, backward, update of
    `params` in place (and of the momentum buffer `buf`, in the layout of `params`, when given).

    `hyper` is [lr, momentum] in the accumulator dtype (float64 for float64, else float32);
    `act_params` and `acts` as for network_forward. The kernel's H scratch holds, per layer, what
    network_forward's H and z_out would (Z_l where the activation saves Z, else h_l).
    Returns the loss (a 0-dim tensor in x's dtype), computed before the update. One launch
    when the batch fits one program, two otherwise (the second sums the per-program
    gradients in a fixed order and updates)."""
    who = "network_train_step"
    if loss not in LOSSES:
        raise ValueError(f"{who}: unknown loss {loss!r}; known: {sorted(LOSSES)}")
    _check_x(x, sizes, who)
    if x.dtype == torch.float64 and max(sizes) > TRAIN_STEP_MAX_WIDTH_FLOAT64:
        raise ValueError(
            f"{who}: float64 networks up to width {TRAIN_STEP_MAX_WIDTH_FLOAT64} only (got widths "
            f"{list(sizes)}): train them through network_forward and network_backward"
        )
    _check_net(params, meta, act_params, sizes, biased, x, who)
    m = x.shape[0]
    check_2d("target", target, (m, sizes[-1]), x, who)
    if m == 0:
        raise ValueError(f"{who}: empty batch")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if hyper.shape != (2,) or hyper.dtype != acc or hyper.device != x.device:
        raise ValueError(f"{who}: hyper must be [lr, momentum] as {acc} on {x.device}")
    momentum = buf is not None
    if momentum and (buf.shape != params.shape or buf.dtype != params.dtype or buf.device != x.device
                     or not buf.is_contiguous()):
        raise ValueError(f"{who}: buf must be contiguous like params {tuple(params.shape)} {params.dtype}")
    if programs is not None and programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    return train_step_unchecked(
        x, target, params, meta, tuple(sizes), tuple(biased), loss, hyper, buf, act_params, programs, acts
    )
