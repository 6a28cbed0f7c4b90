"""The persistent tensor-descriptor forward (kernels.linear_act.linear_act_fwd_tma_kernel),
taken when kernels.configs.FORWARD_TMA is set (off by default until a GPU run measures it):
its output against float64 in every dtype it serves, the calls it must leave to the per-tile
forward, and gradients through a forward it computed. Outputs are poisoned with NaN first
(conftest), so a tile it never stores fails the test."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_close_lowp

import fnn
from bench.problems import forward_tma
from fnn import reference
from kernels import configs
from kernels import linear_act as la

pytestmark = pytest.mark.usefixtures("fp32_matmul_precision")

# (M, K, N): K and N multiples of 8 (16-byte rows in 16 bits), rows and columns past the tiles
SHAPES = [(200, 64, 136), (37, 40, 24), (1, 8, 8), (130, 96, 200)]
ACTS = ["sigmoid", "relu", "gelu", "tanh", fnn.Activation("leaky_relu", negative_slope=0.2)]


@pytest.fixture
def tma_calls(monkeypatch):
    """The descriptor forward, on, its launches counted."""
    calls: list[tuple[int, int, int]] = []
    real = la._launch_forward_tma

    def counted(x, weight, bias, activation, y, M, N, K, prec):
        calls.append((M, N, K))
        return real(x, weight, bias, activation, y, M, N, K, prec)

    monkeypatch.setattr(la, "_launch_forward_tma", counted)
    with forward_tma():
        yield calls


def _inputs(M, K, N, dtype, device, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5
    b = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in (x, w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_descriptor_forward_matches_float64(tma_calls, device, dtype, shape):
    M, K, N = shape
    for i, act in enumerate(ACTS):
        x, w, b = _inputs(M, K, N, dtype, device, seed=i, bias=i % 2 == 0)
        y = fnn.linear_act(x, w, b, act)
        ref = reference.linear_act(x.double(), w.double(), None if b is None else b.double(), act)
        assert_close_lowp(y, reference.linear_act(x, w, b, act), ref, f"{dtype} {shape} {act}")
    assert tma_calls == [(M, N, K)] * len(ACTS)


def test_descriptor_forward_in_tf32(tma_calls, device):
    """float32 takes it on the tensor cores only: "high" (tf32) yes, "highest" (FMA) no."""
    x, w, b = _inputs(70, 48, 40, torch.float32, device, seed=9)
    ref = reference.linear_act(x.double(), w.double(), b.double(), "sigmoid")
    y = fnn.linear_act(x, w, b, "sigmoid")  # "highest": the per-tile kernel
    assert tma_calls == []
    assert_close(y, ref, 1e-5, 1e-5, "highest")
    torch.set_float32_matmul_precision("high")
    y = fnn.linear_act(x, w, b, "sigmoid")
    assert tma_calls == [(70, 40, 48)]
    tol = 1e-5 if device.type == "cpu" else 2e-3  # the interpreter's dot is exact; tf32 rounds to 10 bits
    assert_close(y, ref, tol, tol, "high")


def test_calls_it_does_not_serve_take_the_per_tile_forward(tma_calls, device):
    dt = torch.bfloat16
    x, w, b = _inputs(50, 30, 24, dt, device, seed=1)  # 60-byte rows: no descriptor
    y = fnn.linear_act(x, w, b, "tanh")
    xt, _, _ = _inputs(40, 50, 24, dt, device, seed=2)
    x2 = xt.t()  # (50, 40) with a unit outer stride: no descriptor
    w2 = _inputs(24, 40, 8, dt, device, seed=3)[0]  # (24, 40)
    y2 = fnn.linear_act(x2, w2, None, "relu")
    x3, w3, b3 = _inputs(33, 16, 8, torch.float64, device, seed=4)  # float64: never
    y3 = fnn.linear_act(x3, w3, b3, "sigmoid")
    assert tma_calls == []
    ref = reference.linear_act(x.double(), w.double(), b.double(), "tanh")
    assert_close_lowp(y, reference.linear_act(x, w, b, "tanh"), ref, "60-byte rows")
    ref2 = reference.linear_act(x2.double(), w2.double(), None, "relu")
    assert_close_lowp(y2, reference.linear_act(x2, w2, None, "relu"), ref2, "transposed x")
    assert_close(y3, reference.linear_act(x3, w3, b3, "sigmoid"), 1e-10, 1e-10, "float64")
    x4, w4, b4 = _inputs(64, 16, 16, dt, device, seed=5)
    with forward_tma(False):
        fnn.linear_act(x4, w4, b4, "sigmoid")
    assert tma_calls == [] and configs.FORWARD_TMA  # off for that call only
    assert la.tma_fits(x4, w4, torch.empty(64, 16, dtype=dt, device=device), "ieee")


def test_gradients_through_a_descriptor_forward(tma_calls, device):
    """The backward reads the Y the descriptor forward stored: dX, dW and db against float64.
    A Z-saving activation (elu with alpha < 0 saves Z) takes the per-tile forward, which stores
    Z beside Y."""
    dt = torch.bfloat16
    x, w, b = _inputs(96, 32, 40, dt, device, seed=6)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    dy = _inputs(96, 40, 8, dt, device, seed=7)[0]
    y = fnn.linear_act(x, w, b, "sigmoid")
    grads = torch.autograd.grad(y, (x, w, b), dy)
    assert tma_calls == [(96, 40, 32)]
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = reference.linear_act(x64, w64, b64, "sigmoid")
    want = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    xl, wl, bl = (t.detach().clone().requires_grad_() for t in (x, w, b))
    yl = reference.linear_act(xl, wl, bl, "sigmoid")
    lowp = torch.autograd.grad(yl, (xl, wl, bl), dy)
    assert_close_lowp(y, yl, y64, "y")
    for name, ours, theirs, ref in zip(("dx", "dw", "db"), grads, lowp, want, strict=True):
        assert_close_lowp(ours, theirs, ref, name)
    elu = fnn.Activation("elu", alpha=-0.5)
    assert elu.saves == "z"
    fnn.linear_act(x, w, b, elu)
    assert tma_calls == [(96, 40, 32)]  # unchanged: the Z-storing forward is the per-tile one


def test_descriptor_tile():
    assert configs.FORWARD_TMA is False  # off by default: not measured on a GPU yet
    big = configs.tma_forward_config(8192, 4096, 4096, torch.bfloat16)
    assert (big.block_m, big.block_n, big.block_k, big.num_warps, big.num_stages) == (128, 128, 64, 8, 3)
    tf32 = configs.tma_forward_config(8192, 4096, 4096, torch.float32)
    assert (tf32.block_k, tf32.num_warps) == (32, 8)
    small = configs.tma_forward_config(37, 24, 40, torch.float16)
    assert (small.block_m, small.block_n, small.block_k, small.num_warps) == (64, 32, 64, 4)


# --- the delta-and-db pass of fnn_cublas_bwd (kernels.linear_act.delta_and_bias_grad) ------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_delta_and_bias_grad_matches_float64(device, dtype):
    """D = dY * act'(Z) in the layer's dtype and db = its column sums, read off what the
    forward saved (Y, Z for gelu, nothing for identity), on a shape past the 64 x 64 tile in
    both directions. D and the float partials start as NaN (poisoned): a tile left unwritten
    fails."""
    M, N = 130, 70
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    for i, name in enumerate(["sigmoid", "relu", "tanh", "gelu", "identity"]):
        act = fnn.Activation(name)
        g = torch.Generator().manual_seed(10 + i)
        z = torch.randn(M, N, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        dy = torch.randn(M, N, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        s = {"z": z, "y": reference.apply_activation(z, act)}.get(act.saves, dy)
        d, db = la.delta_and_bias_grad(dy, s, act, True)
        assert d.dtype == db.dtype == dtype and d.shape == (M, N) and db.shape == (N,)
        d_ref = reference.delta(dy.double(), s.double(), act)
        assert_close(d, d_ref, tol, tol, f"D {name}")
        assert_close(db, d_ref.sum(0), tol, tol * M**0.5, f"db {name}")
    d, db = la.delta_and_bias_grad(dy, s, "sigmoid", False)
    assert db is None and not d.isnan().any()
    d, db = la.delta_and_bias_grad(dy[:0], s[:0], "sigmoid", True)  # an empty batch: db is zero
    assert d.shape == (0, N) and torch.equal(db, torch.zeros(N, dtype=dtype, device=device))
