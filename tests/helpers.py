"""Comparison helpers shared by the tests."""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    """Elementwise |actual - expected| <= atol + rtol * |expected| (NaN equal to NaN);
    on failure, name the worst element: its index, value and reference."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    both_nan = a.isnan() & e.isnan()
    same_inf = a.isinf() & e.isinf() & (a == e)
    err = (a - e).abs().nan_to_num(nan=float("inf"))
    bad = ~(both_nan | same_inf) & (err > atol + rtol * e.abs())
    if bad.any():
        excess = torch.where(bad, err - rtol * e.abs(), torch.full_like(err, -float("inf")))
        idx = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements differ; worst at {idx}: "
            f"got {a[idx].item()!r}, reference {e[idx].item()!r} (rtol={rtol}, atol={atol})"
        )


def assert_close_lowp(
    actual: torch.Tensor, torch_lowp: torch.Tensor, reference: torch.Tensor, what: str
) -> None:
    """Half precision rule: our max error against the float64 reference is at most twice
    PyTorch's own max error in the same dtype (plus one ulp of the output's scale, so that
    an exact PyTorch result does not demand an exact one from us)."""
    ref = reference.detach().double().cpu()
    ours = (actual.detach().double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
    theirs = (torch_lowp.detach().double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
    ulp = torch.finfo(actual.dtype).eps * (ref.abs().max().item() if ref.numel() else 0.0)
    assert ours <= 2 * theirs + ulp, (
        f"{what}: max error {ours:.3e} against float64 exceeds twice PyTorch's "
        f"{actual.dtype} error {theirs:.3e} (+ ulp {ulp:.1e})"
    )
