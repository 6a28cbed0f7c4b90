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

import torch
import triton
import triton.language as tl

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
