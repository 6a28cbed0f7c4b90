"""Whole-network fused MLP kernels: every layer of a narrow network in one launch.

Parameters are packed (see fnn.network.pack_parameters): all L weights in one zero-padded
(L, P, P) buffer (layer l's W_l (n_{l+1}, n_l) in its top-left corner), biases in (L, P),
P = the widest layer rounded up to a power of two >= 16 (tl.dot needs 16), at most 128.
`meta` is an int32 tensor [n_0, ..., n_L, act_0, ..., act_{L-1}] read in the kernels, so the
number of layers and the activations are runtime values: one compile per (P, dtype, flags).

Padding never changes a result: padded units are zeroed after their activation (act(0) may
be 0.5), padded weights are zero, and every store is masked to the real widths and rows.

Forward   h_0 = X, h_{l+1} = act_l(h_l W_l^T + b_l), Y = h_L; hidden h_1..h_{L-1} are
          stored (to H) only when a backward will follow.
Backward  D_{L-1} = dY * act'(Y); for l = L-1 .. 0: dW_l += D_l^T h_l, db_l += sum_rows D_l,
          D_{l-1} = (D_l W_l) * act_{l-1}'(h_l); dX = D_0 W_0.
Train     forward, loss and its gradient, backward and the SGD update in the same launch.

Gradients are summed in float32 (float64 for float64) per program in a workspace
(G, L, P, P). With one program (G == 1) the same launch finishes: it writes the gradients, or
applies the SGD step. With G > 1, network_reduce_kernel sums the G partials in a fixed order
(deterministic, no atomics) and finishes: two launches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .activations import relu, relu_grad, sigmoid, sigmoid_grad, tanh, tanh_grad
from .checks import ACTIVATIONS
from .linear_act import INTERPRETED, _dtype_flags, mma
from .memory import empty

LOSSES: dict[str, int] = {"bce": 0, "mse": 1, "sse": 2}
MAX_WIDTH = 128
# Gradient workspace budget: caps the number of programs of the backward (G, L, P, P).
WORKSPACE_BYTES = 64 << 20
MAX_PROGRAMS = 1024

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def activation_rt(z, code):
    """act(z) for an activation code known only at run time (kernels.checks.ACTIVATIONS)."""
    # A chain of ifs, each taking the value the previous one left (only one fires): an
    # if/elif chain, or ifs that each read z, around a dot's operand crash triton 3.6's
    # TritonGPUPrefetch pass (mma v2: fp16/bf16 on sm_80, float64 everywhere).
    if code == 1:
        z = sigmoid(z)
    if code == 2:
        z = relu(z)
    if code == 3:
        z = tanh(z)
    return z


@triton.jit
def delta_rt(g, y, code):
    """g * act'(z) from y = act(z), the activation code known only at run time."""
    # A chain of ifs, as in activation_rt (triton 3.6's prefetch pass).
    if code == 1:
        g = sigmoid_grad(g, y)
    if code == 2:
        g = relu_grad(g, y)
    if code == 3:
        g = tanh_grad(g, y)
    return g


@triton.jit
def _layer_forward(
    h,
    w_l,
    b_l,
    n_out,
    code,
    offs_p,
    P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """act(h @ W_l^T + b_l) in ACC_DTYPE, padded columns (>= n_out) set to exactly zero."""
    wt = tl.load(w_l + offs_p[None, :] * P + offs_p[:, None])  # W_l^T, (P_in, P_out)
    acc = mma(h, wt, tl.zeros((h.shape[0], P), dtype=ACC_DTYPE), INPUT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_l + offs_p).to(ACC_DTYPE)[None, :]
    acc = activation_rt(acc, code)
    return tl.where((offs_p < n_out)[None, :], acc, 0)


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
def _finish(g, mask, p_ptrs, buf_ptrs, out_ptrs, lr, momentum, TRAIN: tl.constexpr, MOMENTUM: tl.constexpr):
    """Gradient mode: store g. Train mode: torch.optim.SGD's step on the parameters at p_ptrs
    (buf = momentum * buf + g, first buf = g from a zeroed buffer; p -= lr * buf)."""
    g = g.to(p_ptrs.dtype.element_ty)  # the gradient autograd would hold, in the param dtype
    if TRAIN:
        step = g.to(lr.dtype)
        if MOMENTUM:
            buf = tl.load(buf_ptrs, mask=mask, other=0).to(lr.dtype)
            step = (momentum * buf).to(p_ptrs.dtype.element_ty).to(lr.dtype) + step
            step = step.to(p_ptrs.dtype.element_ty)
            tl.store(buf_ptrs, step, mask=mask)
            step = step.to(lr.dtype)
        p = tl.load(p_ptrs, mask=mask, other=0).to(lr.dtype)
        tl.store(p_ptrs, (p - lr * step).to(p_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, g, mask=mask)


@triton.jit
def network_fwd_kernel(
    x_ptr,  # X (M, n_0), any strides
    w_ptr,  # packed weights (L, P, P), contiguous
    b_ptr,  # packed biases (L, P); not read unless HAS_BIAS
    meta_ptr,  # int32 [n_0..n_L, act_0..act_{L-1}]
    y_ptr,  # Y (M, n_L), written
    h_ptr,  # H (L-1, M, P) hidden outputs, written when STORE_H
    M,  # rows
    L,  # layers
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,
    stride_hl,  # layer stride of H (M * P); its rows are P apart
    P: tl.constexpr,  # padded width
    BLOCK_M: tl.constexpr,  # rows per program
    HAS_BIAS: tl.constexpr,
    STORE_H: tl.constexpr,  # keep the hidden outputs for the backward
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, P)
    mask_m = offs_m < M
    n_in = tl.load(meta_ptr)
    h = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + offs_p[None, :] * stride_xk,
        mask=mask_m[:, None] & (offs_p < n_in)[None, :],
        other=0,
    )

    # Layers: h stays on chip; only hidden outputs (if asked) and Y go to memory.
    w_l, b_l, h_l = w_ptr, b_ptr, h_ptr
    n_out = n_in
    for li in range(L):
        n_out = tl.load(meta_ptr + li + 1)
        code = tl.load(meta_ptr + L + 1 + li)
        acc = _layer_forward(
            h, w_l, b_l, n_out, code, offs_p, P, HAS_BIAS, ACC_DTYPE, INPUT_PRECISION, UPCAST
        )
        h = acc.to(x_ptr.dtype.element_ty)
        if STORE_H:
            if li < L - 1:
                tl.store(
                    h_l + offs_m[:, None] * P + offs_p[None, :],
                    h,
                    mask=mask_m[:, None] & (offs_p < n_out)[None, :],
                )
        w_l += P * P
        b_l += P
        h_l += stride_hl

    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_p[None, :] * stride_yn,
        h,
        mask=mask_m[:, None] & (offs_p < n_out)[None, :],
    )


@triton.jit
def network_bwd_kernel(
    x_ptr,  # X (M, n_0), any strides
    w_ptr,  # packed weights (L, P, P); updated in place by a one-program train step
    b_ptr,  # packed biases (L, P); read by TRAIN's forward, updated by its step
    meta_ptr,  # int32 [n_0..n_L, act_0..act_{L-1}]
    y_ptr,  # gradient mode: Y (M, n_L), the saved output; train mode: the target
    dy_ptr,  # gradient mode: dY (M, n_L), any strides; train mode: unused
    h_ptr,  # H: gradient mode (L-1, M, P) from the forward; train mode (G, L-1, BLOCK_M, P) scratch
    dx_ptr,  # dX (M, n_0), written when NEED_DX
    gw_ptr,  # float workspace (G, L, P, P): this program's dW sums
    gb_ptr,  # float workspace (G, L, P): this program's db sums
    outw_ptr,
    outb_ptr,  # FINISH, gradient mode: dW (L, P, P), db (L, P) written
    bufw_ptr,
    bufb_ptr,  # FINISH, train mode with MOMENTUM: momentum buffers (L, P, P), (L, P)
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
    MOMENTUM: tl.constexpr,  # momentum buffers in use (train mode)
    FINISH: tl.constexpr,  # one program (G == 1): write the final result in this launch
    GW_COLS: tl.constexpr,  # columns of dW_l accumulated per step (a power of two <= P)
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
    dtype = x_ptr.dtype.element_ty
    loss = tl.sum(tl.zeros((1,), dtype=ACC_DTYPE), axis=0)
    numel = (n_L.to(tl.int64) * M).to(ACC_DTYPE)

    for it in range(n_blocks):
        offs_m = row_start + it * BLOCK_M + offs_r
        mask_m = offs_m < row_end
        mask_out = mask_m[:, None] & (offs_p < n_L)[None, :]
        if TRAIN:
            h_base = h_ptr + pid * stride_hg
            h_rows = offs_r.to(tl.int64)
        else:
            h_base = h_ptr
            h_rows = offs_m

        # Stage 1: the output delta D_{L-1} (train mode: forward and loss gradient first).
        if TRAIN:
            h = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_p[None, :] * stride_xk,
                mask=mask_m[:, None] & (offs_p < n_0)[None, :],
                other=0,
            )
            w_l, b_l, h_l = w_ptr, b_ptr, h_base
            for li in range(L):
                n_out = tl.load(meta_ptr + li + 1)
                code = tl.load(meta_ptr + L + 1 + li)
                acc = _layer_forward(
                    h, w_l, b_l, n_out, code, offs_p, P, HAS_BIAS, ACC_DTYPE, INPUT_PRECISION, UPCAST
                )
                h = acc.to(dtype)
                if li < L - 1:
                    tl.store(
                        h_l + h_rows[:, None] * P + offs_p[None, :],
                        h,
                        mask=mask_m[:, None] & (offs_p < n_out)[None, :],
                    )
                w_l += P * P
                b_l += P
                h_l += stride_hl
            yh = h.to(ACC_DTYPE)
            t = tl.load(
                y_ptr + offs_m[:, None] * stride_ym + offs_p[None, :] * stride_yn, mask=mask_out, other=0
            ).to(ACC_DTYPE)
            part, g = _loss_grad(yh, t, mask_out, numel, LOSS)
            loss += part
            tl.debug_barrier()  # H written above is read back below, maybe by other threads
        else:
            g = tl.load(
                dy_ptr + offs_m[:, None] * stride_dym + offs_p[None, :] * stride_dyn, mask=mask_out, other=0
            ).to(ACC_DTYPE)
            yh = tl.load(
                y_ptr + offs_m[:, None] * stride_ym + offs_p[None, :] * stride_yn, mask=mask_out, other=0
            ).to(ACC_DTYPE)
        d = delta_rt(g, yh, tl.load(meta_ptr + 2 * L))

        # Stage 2: layers top-down; this program's dW_l, db_l sums kept in its workspace slice.
        w_l = w_ptr + (L - 1) * P * P
        gw_l = gw_g + (L - 1) * P * P
        gb_l = gb_g + (L - 1) * P
        h_l = h_base + (L - 2) * stride_hl
        for i in range(L):
            li = L - 1 - i
            n_in = tl.load(meta_ptr + li)
            d_op = d.to(dtype)
            # dW_l += D^T h_in, GW_COLS columns at a time: the (P, GW_COLS) accumulator and the
            # h_in columns it needs are all that is live beside D.
            for c0 in range(0, P, GW_COLS):
                offs_c = c0 + tl.arange(0, GW_COLS)
                mask_c = mask_m[:, None] & (offs_c < n_in)[None, :]
                if li == 0:
                    h_c = tl.load(
                        x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :] * stride_xk, mask=mask_c, other=0
                    )
                else:
                    h_c = tl.load(h_l + h_rows[:, None] * P + offs_c[None, :], mask=mask_c, other=0)
                gw = mma(tl.trans(d_op), h_c, tl.zeros((P, GW_COLS), dtype=ACC_DTYPE), INPUT_PRECISION, UPCAST)
                gw_ptrs = gw_l + offs_p[:, None] * P + offs_c[None, :]
                if it > 0:
                    gw += tl.load(gw_ptrs)
                tl.store(gw_ptrs, gw)
            if HAS_BIAS:
                gb = tl.sum(d, axis=0)
                if it > 0:
                    gb += tl.load(gb_l + offs_p)
                tl.store(gb_l + offs_p, gb)
            mask_in = mask_m[:, None] & (offs_p < n_in)[None, :]
            if li > 0:
                # D_{l-1} = (D_l W_l) * act'_{l-1}(h_in), h_in being act_{l-1}'s output.
                w = tl.load(w_l + offs_p[:, None] * P + offs_p[None, :])  # W_l, (P_out, P_in)
                dh = mma(d_op, w, tl.zeros((BLOCK_M, P), dtype=ACC_DTYPE), INPUT_PRECISION, UPCAST)
                h_in = tl.load(h_l + h_rows[:, None] * P + offs_p[None, :], mask=mask_in, other=0)
                d = delta_rt(dh, h_in.to(ACC_DTYPE), tl.load(meta_ptr + L + li))
            else:
                if NEED_DX:
                    w = tl.load(w_l + offs_p[:, None] * P + offs_p[None, :])
                    dx = mma(d_op, w, tl.zeros((BLOCK_M, P), dtype=ACC_DTYPE), INPUT_PRECISION, UPCAST)
                    tl.store(
                        dx_ptr + offs_m[:, None] * stride_dxm + offs_p[None, :] * stride_dxk,
                        dx.to(dx_ptr.dtype.element_ty),
                        mask=mask_in,
                    )
            w_l -= P * P
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
            tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
        else:
            tl.store(loss_ptr + pid, loss)
    if FINISH:
        tl.debug_barrier()  # the workspace is read back in another layout
        lr = tl.load(hyper_ptr)
        momentum = tl.load(hyper_ptr + 1)
        w_l, b_l, gw_l, gb_l = w_ptr, b_ptr, gw_ptr, gb_ptr
        ow_l, ob_l, bw_l, bb_l = outw_ptr, outb_ptr, bufw_ptr, bufb_ptr
        for li in range(L):
            n_in = tl.load(meta_ptr + li)
            n_out = tl.load(meta_ptr + li + 1)
            for r0 in range(0, P, GW_COLS):  # GW_COLS rows of the (P, P) tile at a time
                offs_q = r0 + tl.arange(0, GW_COLS)
                tile = offs_q[:, None] * P + offs_p[None, :]
                mask = (offs_q < n_out)[:, None] & (offs_p < n_in)[None, :]
                _finish(
                    tl.load(gw_l + tile), mask, w_l + tile, bw_l + tile, ow_l + tile, lr, momentum, TRAIN, MOMENTUM
                )
            if HAS_BIAS:
                _finish(
                    tl.load(gb_l + offs_p),
                    offs_p < n_out,
                    b_l + offs_p,
                    bb_l + offs_p,
                    ob_l + offs_p,
                    lr,
                    momentum,
                    TRAIN,
                    MOMENTUM,
                )
            w_l += P * P
            b_l += P
            gw_l += P * P
            gb_l += P
            ow_l += P * P
            ob_l += P
            bw_l += P * P
            bb_l += P


@triton.jit
def network_reduce_kernel(
    gw_ptr,  # float workspace (G, L, P, P)
    gb_ptr,  # float workspace (G, L, P)
    lossp_ptr,  # train mode: per-program loss sums (G,)
    meta_ptr,  # int32 [n_0..n_L, act_0..act_{L-1}]
    w_ptr,
    b_ptr,  # train mode: packed parameters, updated in place
    outw_ptr,
    outb_ptr,  # gradient mode: dW (L, P, P), db (L, P) written
    bufw_ptr,
    bufb_ptr,  # train mode with MOMENTUM: momentum buffers
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
        mask = (e < P * P) & (e // P < n_out) & (e % P < n_in)
        acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
        src = gw_ptr + li * P * P + e
        for _ in range(G):
            acc += tl.load(src, mask=mask, other=0)
            src += L * P * P
        base = li * P * P + e
        _finish(acc, mask, w_ptr + base, bufw_ptr + base, outw_ptr + base, lr, momentum, TRAIN, MOMENTUM)
    else:
        if HAS_BIAS:
            mask = offs < n_out
            acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
            src = gb_ptr + li * P + offs
            for _ in range(G):
                acc += tl.load(src, mask=mask, other=0)
                src += L * P
            base = li * P + offs
            _finish(acc, mask, b_ptr + base, bufb_ptr + base, outb_ptr + base, lr, momentum, TRAIN, MOMENTUM)
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
                tl.store(loss_ptr, total.to(loss_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def padded_width(sizes: Sequence[int]) -> int:
    """P: the widest layer rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(max(sizes)))


def fits_network(sizes: Sequence[int]) -> bool:
    """Whether the whole-network kernels serve these widths (all <= MAX_WIDTH)."""
    return max(sizes) <= MAX_WIDTH


@dataclass(frozen=True)
class NetConfig:
    """Launch shape of a whole-network kernel: rows per block, warps, and the columns of
    each dW_l step of the backward (GW_COLS)."""

    block_m: int
    num_warps: int
    gw_cols: int


# (kind, dtype, P) -> NetConfig; kind is "fwd" (network_fwd_kernel) or "bwd" (network_bwd_kernel,
# gradient and train modes). Every entry compiles without register spills for sm_90a and sm_80
# under triton 3.6 and the newest (`python -m bench.compile` checks each one); speed is
# not measured yet.
_NET_CONFIGS: dict[tuple[str, torch.dtype, int], NetConfig] = {}
# A batch of at most this many rows takes one program in the backward: one launch, no
# reduction kernel. Provisional until measured.
SINGLE_PROGRAM_ROWS = 512


def network_config(kind: str, m: int, p: int, dtype: torch.dtype) -> NetConfig:
    """The NetConfig of `kind` for M rows, padded width P and `dtype` (see _NET_CONFIGS)."""
    cfg = _NET_CONFIGS.get((kind, dtype, p))
    if cfg is None:  # bfloat16 shares float16's table
        cfg = _NET_CONFIGS.get((kind, torch.float16 if dtype == torch.bfloat16 else dtype, p), NetConfig(32, 4, 16))
    if INTERPRETED:
        # fewer, larger programs: the interpreter's cost is per program
        cfg = NetConfig(128, cfg.num_warps, cfg.gw_cols)
    cap = max(16, triton.next_power_of_2(max(m, 1)))
    if cfg.block_m > cap:
        cfg = NetConfig(cap, cfg.num_warps, cfg.gw_cols)
    return cfg


def network_programs(
    m: int, block_m: int, n_layers: int, p: int, dtype: torch.dtype, programs: int | None = None
) -> tuple[int, int]:
    """(G, rows per program) of the backward: one program for a batch of at most
    SINGLE_PROGRAM_ROWS rows, else one per row block, capped so that the float gradient
    workspace (G, L, P, P) stays under WORKSPACE_BYTES."""
    blocks = triton.cdiv(max(m, 1), block_m)
    if programs is None:
        acc_bytes = 8 if dtype == torch.float64 else 4
        cap = max(1, min(MAX_PROGRAMS, WORKSPACE_BYTES // (n_layers * p * (p + 1) * acc_bytes)))
        programs = 1 if m <= SINGLE_PROGRAM_ROWS else min(blocks, cap)
    if programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    rows = triton.cdiv(blocks, min(programs, blocks)) * block_m
    return triton.cdiv(max(m, 1), rows), rows


def _check_packed(
    w_pack: torch.Tensor,
    b_pack: torch.Tensor | None,
    meta: torch.Tensor,
    sizes: Sequence[int],
    like: torch.Tensor,
    who: str,
) -> int:
    """Validate the packed parameters against `sizes`; return P."""
    n_layers = len(sizes) - 1
    if n_layers < 1:
        raise ValueError(f"{who}: sizes must list at least two widths, got {list(sizes)}")
    if not fits_network(sizes):
        raise ValueError(
            f"{who}: widths {list(sizes)} exceed {MAX_WIDTH}, the widest the "
            "whole-network kernels serve; use the per-layer path"
        )
    p = padded_width(sizes)
    for name, t, shape in (
        ("w_pack", w_pack, (n_layers, p, p)),
        ("b_pack", b_pack, (n_layers, p)),
        ("meta", meta, (2 * n_layers + 1,)),
    ):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{who}: {name} must be contiguous with shape {shape}, got {tuple(t.shape)}")
        want = torch.int32 if name == "meta" else like.dtype
        if t.dtype != want or t.device != like.device:
            raise TypeError(f"{who}: {name} is {t.dtype} on {t.device}; expected {want} on {like.device}")
    return p


def _check_rows(name: str, t: torch.Tensor, shape: tuple[int, int], like: torch.Tensor, who: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{who}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{who}: {name} is {t.dtype} on {t.device}; expected {like.dtype} on {like.device}")


def network_forward(
    x: torch.Tensor,
    w_pack: torch.Tensor,
    b_pack: torch.Tensor | None,
    meta: torch.Tensor,
    sizes: Sequence[int],
    store_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Y (M, n_L) of the whole network for a 2-D x (M, n_0), in one launch; also H
    (L-1, M, P), the hidden outputs, written only when `store_hidden` (for the backward)."""
    who = "network_forward"
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != sizes[0]:
        raise ValueError(f"{who}: x must be a 2-D tensor (M, {sizes[0]})")
    p = _check_packed(w_pack, b_pack, meta, sizes, x, who)
    m, n_layers = x.shape[0], len(sizes) - 1
    y = empty((m, sizes[-1]), x)
    h = empty((max(n_layers - 1, 0), m, p) if store_hidden else (0, 0, p), x)
    if m == 0:
        return y, h
    cfg = network_config("fwd", m, p, x.dtype)
    block_m, num_warps = cfg.block_m, cfg.num_warps
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]),)  # noqa: E731
    network_fwd_kernel[grid](
        x,
        w_pack,
        b_pack if b_pack is not None else w_pack,
        meta,
        y,
        h if h.numel() else y,
        m,
        n_layers,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        m * p,
        P=p,
        BLOCK_M=block_m,
        HAS_BIAS=b_pack is not None,
        STORE_H=store_hidden and n_layers > 1,
        num_warps=num_warps,
        num_stages=1,
        **_dtype_flags(x.dtype),
    )
    return y, h


def _workspace(g: int, n_layers: int, p: int, like: torch.Tensor, has_bias: bool):
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    gw = empty((g, n_layers, p, p), like, dtype=acc)
    gb = empty((g, n_layers, p) if has_bias else (1,), like, dtype=acc)
    return gw, gb


def network_backward(
    dy: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    x: torch.Tensor,
    w_pack: torch.Tensor,
    meta: torch.Tensor,
    sizes: Sequence[int],
    has_bias: bool,
    need_dx: bool,
    programs: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(dX, dW packed (L, P, P), db packed (L, P) or None) from dY, the saved output Y, the
    hidden outputs H and the input X. One launch when the batch fits one program (G == 1),
    else two (the partial sums reduced in a fixed order). `programs` forces G (tests)."""
    who = "network_backward"
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != sizes[0]:
        raise ValueError(f"{who}: x must be a 2-D tensor (M, {sizes[0]})")
    p = _check_packed(w_pack, None, meta, sizes, x, who)
    m, n_layers = x.shape[0], len(sizes) - 1
    _check_rows("dy", dy, (m, sizes[-1]), x, who)
    _check_rows("y", y, (m, sizes[-1]), x, who)
    if n_layers > 1 and (tuple(h.shape) != (n_layers - 1, m, p) or not h.is_contiguous()):
        raise ValueError(
            f"{who}: h must be contiguous with shape {(n_layers - 1, m, p)}, got {tuple(h.shape)}"
        )
    dx = empty((m, sizes[0]), x) if need_dx else None
    if m == 0:
        dw = torch.zeros((n_layers, p, p), dtype=x.dtype, device=x.device)
        db = torch.zeros((n_layers, p), dtype=x.dtype, device=x.device) if has_bias else None
        return dx, dw, db
    cfg = network_config("bwd", m, p, x.dtype)
    block_m, num_warps, gw_cols = cfg.block_m, cfg.num_warps, cfg.gw_cols
    g, rows = network_programs(m, block_m, n_layers, p, x.dtype, programs)
    gw, gb = _workspace(g, n_layers, p, x, has_bias)
    # Only the real (n_{l+1}, n_l) corner of each layer is written: callers take views.
    dw = empty((n_layers, p, p), x)
    db = empty((n_layers, p), x) if has_bias else None
    flags = _dtype_flags(x.dtype)
    hyper = gw  # never read in gradient mode
    network_bwd_kernel[(g,)](
        x,
        w_pack,
        w_pack,
        meta,
        y,
        dy,
        h if h.numel() else y,
        dx if need_dx else x,
        gw,
        gb,
        dw,
        db if has_bias else dw,
        dw,
        dw,
        gw,
        hyper,
        m,
        n_layers,
        rows,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        dy.stride(0),
        dy.stride(1),
        dx.stride(0) if need_dx else 0,
        dx.stride(1) if need_dx else 0,
        m * p,
        0,
        P=p,
        BLOCK_M=block_m,
        HAS_BIAS=has_bias,
        NEED_DX=need_dx,
        TRAIN=False,
        LOSS=0,
        MOMENTUM=False,
        FINISH=g == 1,
        GW_COLS=gw_cols,
        num_warps=num_warps,
        num_stages=1,
        **flags,
    )
    if g > 1:
        _reduce(
            gw,
            gb,
            gw,
            meta,
            w_pack,
            w_pack,
            dw,
            db if has_bias else dw,
            dw,
            dw,
            gw,
            gw,
            g,
            n_layers,
            m,
            p,
            has_bias,
            False,
            0,
            False,
            flags["ACC_DTYPE"],
        )
    return dx, dw, db


def _reduce(
    gw,
    gb,
    lossp,
    meta,
    w,
    b,
    ow,
    ob,
    bw,
    bb,
    loss,
    hyper,
    g,
    n_layers,
    m,
    p,
    has_bias,
    train,
    loss_code,
    momentum,
    acc_dtype,
) -> None:
    block = min(p * p, 1024)
    grid = (n_layers, triton.cdiv(p * p, block) + 1)
    network_reduce_kernel[grid](
        gw,
        gb,
        lossp,
        meta,
        w,
        b,
        ow,
        ob,
        bw,
        bb,
        loss,
        hyper,
        g,
        n_layers,
        m,
        P=p,
        BLOCK=block,
        HAS_BIAS=has_bias,
        TRAIN=train,
        LOSS=loss_code,
        MOMENTUM=momentum,
        ACC_DTYPE=acc_dtype,
    )


def network_train_step(
    x: torch.Tensor,
    target: torch.Tensor,
    w_pack: torch.Tensor,
    b_pack: torch.Tensor | None,
    meta: torch.Tensor,
    sizes: Sequence[int],
    loss: str,
    hyper: torch.Tensor,
    buf_w: torch.Tensor | None,
    buf_b: torch.Tensor | None,
    programs: int | None = None,
) -> torch.Tensor:
    """One SGD step of the whole network on (x, target): forward, loss, backward, update of
    w_pack / b_pack in place (and of the momentum buffers buf_w / buf_b when given).

    `hyper` is [lr, momentum] in the accumulator dtype (float64 for float64, else float32).
    Returns the loss (a 0-dim tensor in x's dtype), computed before the update. One launch
    when the batch fits one program, two otherwise (the second sums the per-program
    gradients in a fixed order and updates)."""
    who = "network_train_step"
    if loss not in LOSSES:
        raise ValueError(f"{who}: unknown loss {loss!r}; known: {sorted(LOSSES)}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != sizes[0]:
        raise ValueError(f"{who}: x must be a 2-D tensor (M, {sizes[0]})")
    p = _check_packed(w_pack, b_pack, meta, sizes, x, who)
    m, n_layers = x.shape[0], len(sizes) - 1
    _check_rows("target", target, (m, sizes[-1]), x, who)
    if m == 0:
        raise ValueError(f"{who}: empty batch")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if hyper.shape != (2,) or hyper.dtype != acc or hyper.device != x.device:
        raise ValueError(f"{who}: hyper must be [lr, momentum] as {acc} on {x.device}")
    momentum = buf_w is not None
    if momentum:
        _check_packed(buf_w, buf_b, meta, sizes, x, who)
    has_bias = b_pack is not None
    cfg = network_config("bwd", m, p, x.dtype)
    block_m, num_warps, gw_cols = cfg.block_m, cfg.num_warps, cfg.gw_cols
    g, rows = network_programs(m, block_m, n_layers, p, x.dtype, programs)
    gw, gb = _workspace(g, n_layers, p, x, has_bias)
    h = empty((g, max(n_layers - 1, 1), block_m, p), x)
    out = empty((), x)
    lossp = empty((g,), x, dtype=acc) if g > 1 else out
    b_arg = b_pack if has_bias else w_pack
    bw = buf_w if momentum else w_pack
    bb = buf_b if (momentum and has_bias) else b_arg
    flags = _dtype_flags(x.dtype)
    network_bwd_kernel[(g,)](
        x,
        w_pack,
        b_arg,
        meta,
        target,
        target,
        h,
        x,
        gw,
        gb,
        w_pack,
        b_arg,
        bw,
        bb,
        lossp,
        hyper,
        m,
        n_layers,
        rows,
        x.stride(0),
        x.stride(1),
        target.stride(0),
        target.stride(1),
        0,
        0,
        0,
        0,
        h.stride(1),
        h.stride(0),
        P=p,
        BLOCK_M=block_m,
        HAS_BIAS=has_bias,
        NEED_DX=False,
        TRAIN=True,
        LOSS=LOSSES[loss],
        MOMENTUM=momentum,
        FINISH=g == 1,
        GW_COLS=gw_cols,
        num_warps=num_warps,
        num_stages=1,
        **flags,
    )
    if g > 1:
        _reduce(
            gw,
            gb,
            lossp,
            meta,
            w_pack,
            b_arg,
            w_pack,
            b_arg,
            bw,
            bb,
            out,
            hyper,
            g,
            n_layers,
            m,
            p,
            has_bias,
            True,
            LOSSES[loss],
            momentum,
            flags["ACC_DTYPE"],
        )
    return out


def activation_codes(activations: Sequence[str]) -> list[int]:
    return [ACTIVATIONS[a] for a in activations]
