"""Two roundings the kernels' accuracy rests on, as a GPU does them, wherever the tests run.

- float32 -> bfloat16 rounds to nearest, ties to even (the GPU's cvt.rn). Triton's interpreter
  truncates; tests/conftest.py makes it round, and this checks that it does, bit for bit
  against PyTorch's conversion, on the GPU too.
- kernels.activations.fma rounds once. Triton 3.6's interpreter computes tl.fma as a product
  and then a sum; the compensated formulas of kernels/activations.py (silu's derivative,
  gelu's exp(-z^2/2), softplus) carry error terms that only a single rounding gives.

Both run through a kernel on `device`: the interpreter on CPU, compiled code on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import fnn
from kernels.activations import fma


@triton.jit
def _to_bfloat16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=mask).to(tl.bfloat16), mask=mask)


@triton.jit
def _product_error_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    a = tl.load(a_ptr + i, mask=mask)
    b = tl.load(b_ptr + i, mask=mask)
    p = a * b
    tl.store(out_ptr + i, fma(a, b, -p), mask=mask)  # a * b - p: exact, if rounded once


def _sweep(n: int, seed: int) -> torch.Tensor:
    """float32 values over the whole range (subnormals to near overflow, both signs), the
    specials, and ties: values exactly halfway between two bfloat16 numbers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-44, 38, n).float()
    ties = (torch.randint(0, 1 << 16, (256,), generator=g, dtype=torch.int32) << 16) | (1 << 15)
    ties = ties.view(torch.float32)
    ties = ties[ties.isfinite()]
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.4e38, -3.4e38, 1e-45])
    return torch.cat([specials, ties, x])


def test_float32_to_bfloat16_rounds_to_nearest_even(device):
    x = _sweep(1 << 14, seed=0).to(device)
    y = torch.full_like(x, float("nan"), dtype=torch.bfloat16)
    n = x.numel()
    _to_bfloat16_kernel[(triton.cdiv(n, 1024),)](x, y, n, BLOCK=1024)
    want = x.bfloat16()
    same = (y.view(torch.int16) == want.view(torch.int16)) | (y.isnan() & want.isnan())
    bad = (~same).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{bad.numel()} of {n} conversions differ from round-to-nearest-even; first: "
        f"{x[bad[0]].item()!r} -> {y[bad[0]].item()!r}, want {want[bad[0]].item()!r}"
    )


def test_fma_rounds_once(device):
    g = torch.Generator().manual_seed(1)
    n = 4096
    a = (torch.rand(n, generator=g) + 0.5) * 2.0 ** torch.randint(-20, 20, (n,), generator=g)
    b = (torch.rand(n, generator=g) + 0.5) * 2.0 ** torch.randint(-20, 20, (n,), generator=g)
    a, b = a.float(), b.float()
    out = torch.full_like(a, float("nan")).to(device)
    _product_error_kernel[(triton.cdiv(n, 1024),)](a.to(device), b.to(device), out, n, BLOCK=1024)
    # a * b - fl(a * b), exact in float64 (a float32 product has 48 bits) and in float32 (the
    # error of a rounded product is representable)
    want = a.double() * b.double() - (a * b).double()
    assert want.abs().max() > 0  # the sweep has products that round
    assert torch.equal(out.cpu().double(), want), (
        f"{int((out.cpu().double() != want).sum())} of {n} residuals are not a * b - fl(a * b)"
    )


def test_network_kernels_round_bfloat16_without_the_test_patch(device, monkeypatch):
    """The whole-network kernels round every bfloat16 store to nearest even (kernels.linear_act.
    cast) in the interpreter too, without conftest's fix: the forward's output, dX, dW and db,
    and the fused SGD step's update. The values are small multiples of powers of two, so every
    float32 sum is exact and PyTorch's float32 result, converted, is the exact answer rounded;
    truncation would miss about half of them. On a GPU, compiled code rounds by itself."""
    if device.type == "cuda":
        pytest.skip("compiled code converts with cvt.rn; the interpreter's truncation is what this checks")
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter, "_convert_float", interpreter._convert_float.truncating)
    g = torch.Generator().manual_seed(4)
    bf = torch.bfloat16

    def ints(*shape, scale):
        return (torch.randint(-99, 100, shape, generator=g).float() * scale).to(bf)  # 7 bits: exact

    model = fnn.FNN([6, 5], "identity", dtype=bf, fusion="network")
    with torch.no_grad():
        model.layers[0].weight.copy_(ints(5, 6, scale=2.0**-4))
        model.layers[0].bias.copy_(ints(5, scale=2.0**-9))
    w, b = (t.detach().float() for t in (model.layers[0].weight, model.layers[0].bias))
    x = ints(40, 6, scale=2.0**-3).requires_grad_()
    dy = ints(40, 5, scale=2.0**-5)
    y = model(x)
    z = x.detach().float() @ w.T + b  # exact in float32
    assert torch.equal(y.view(torch.int16), z.to(bf).view(torch.int16)), "Y truncated, not rounded"
    gx, gw, gb = torch.autograd.grad(y, (x, *model.parameters()), dy)
    d = dy.float()
    for got, want, what in ((gx, d @ w, "dX"), (gw, d.T @ x.detach().float(), "dW"), (gb, d.sum(0), "db")):
        assert not torch.equal(want, want.to(bf).float()), f"{what}: nothing to round"
        assert torch.equal(got.view(torch.int16), want.to(bf).view(torch.int16)), f"{what} truncated"

    t = ints(40, 5, scale=2.0**-2)
    trainer = fnn.Trainer(model, loss="sse", lr=0.5)
    assert trainer.fused(device)
    trainer.step(x.detach(), t)
    d = (z.to(bf).float() - t.float()).to(bf).float()  # sse: D = Y - T, kept in bfloat16 as autograd's
    grad_w = (d.T @ x.detach().float()).to(bf).float()
    want = (w - 0.5 * grad_w).to(bf)
    assert torch.equal(model.layers[0].weight.detach().view(torch.int16), want.view(torch.int16)), (
        "the fused step's update truncated"
    )
