"""Comparison helpers shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

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


def assert_fused_like_original(original, fused, x: torch.Tensor, dy: torch.Tensor, what: str) -> None:
    """A model and its fnn-fused copy (float64) give the same output, input gradient and
    parameter gradients, by name, for input x and output gradient dy (rtol and atol 1e-12)."""
    results = []
    for model in (original, fused):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.backward(dy)
        results.append((y.detach(), xi.grad, {k: p.grad for k, p in model.named_parameters()}))
    (y0, dx0, g0), (y1, dx1, g1) = results
    assert_close(y1, y0, rtol=1e-12, atol=1e-12, what=f"{what}: output")
    assert_close(dx1, dx0, rtol=1e-12, atol=1e-12, what=f"{what}: dx")
    assert g1.keys() == g0.keys(), what
    for k in g0:
        assert_close(g1[k], g0[k], rtol=1e-12, atol=1e-12, what=f"{what}: gradient of {k}")


def compiled_env(python_path: str = str(ROOT)) -> dict[str, str]:
    """The environment for a subprocess whose kernels compile (TRITON_INTERPRET unset), with
    `python_path` (default: the repository) as its PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = python_path
    return env


def run_script(script: str, cwd: Path, timeout: int = 600) -> dict:
    """Run `python -c script` with compiled kernels (compiled_env) and return the JSON that
    its last line starting with "RESULT " carries; fails the test on a non-zero exit."""
    run = subprocess.run(
        [sys.executable, "-c", script], env=compiled_env(), cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def spy_layer_ops(monkeypatch, calls: list[str]) -> None:
    """Make fnn.functional's per-layer launchers (what its `_ops(t)` returns for t's device)
    append their name to `calls` before they run."""
    import fnn.functional

    real = fnn.functional._ops

    class Spy:
        def __init__(self, t: torch.Tensor):
            self._ops = real(t)

        def __getattr__(self, name: str):
            fn = getattr(self._ops, name)
            return lambda *a, **k: calls.append(name) or fn(*a, **k)

    monkeypatch.setattr(fnn.functional, "_ops", Spy)
