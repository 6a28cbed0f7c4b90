"""Does fnn agree with eager? Checked on every case before it is timed, for `fnn` and for
every other fnn variant of the case.

Both are compared with a float64 reference computed by PyTorch autograd (`fnn.reference` on
upcast inputs). fnn agrees when, for every output and gradient, its largest error is at most
twice eager's largest error plus one unit of the dtype's precision at the reference's scale:
the rule the tests apply to half precision (tests/helpers.py, assert_close_lowp). A NaN or a
shape or dtype mismatch fails.
"""

from __future__ import annotations

from typing import Any

import torch

from .problems import Problem


def _max_err(t: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return (t.detach().double() - ref).abs().max().item()


def compare(names, ours, theirs, ref, dtype: torch.dtype) -> dict[str, Any]:
    """Per-tensor errors of `ours` (fnn) and `theirs` (eager) against `ref` (float64)."""
    tensors: dict[str, Any] = {}
    failures: list[str] = []
    if not (len(ours) == len(theirs) == len(ref) == len(names)):
        return {
            "passed": False,
            "tensors": {},
            "message": f"output count differs: fnn {len(ours)}, eager {len(theirs)}, reference {len(ref)}",
        }
    eps = torch.finfo(dtype).eps
    for name, o, e, r in zip(names, ours, theirs, ref, strict=True):
        r = r.detach()
        if o is None or tuple(o.shape) != tuple(r.shape) or o.dtype != dtype:
            got = "None" if o is None else f"{tuple(o.shape)} {o.dtype}"
            msg = f"{name}: fnn gave {got}, expected {tuple(r.shape)} {dtype}"
            tensors[name] = {"passed": False, "message": msg}
            failures.append(msg)
            continue
        err_fnn, err_eager = _max_err(o, r), _max_err(e, r)
        scale = r.abs().max().item() if r.numel() else 0.0
        bound = 2 * err_eager + eps * scale
        passed = bool(err_fnn <= bound)  # False for NaN
        tensors[name] = {
            "passed": passed,
            "max_err_fnn": err_fnn,
            "max_err_eager": err_eager,
            "bound": bound,
            "max_abs_ref": scale,
        }
        if not passed:
            failures.append(
                f"{name}: fnn's max error {err_fnn:.3e} against float64 exceeds the bound {bound:.3e} "
                f"(2 x eager's {err_eager:.3e} + eps x {scale:.3e})"
            )
    return {"passed": not failures, "tensors": tensors, "message": "; ".join(failures) or "agrees"}


def check(problem: Problem) -> dict[str, Any]:
    """Run fnn and eager on input set 0 and compare both with the float64 reference (for a
    training case: the loss and the step each took, `Problem.observe`). Every other fnn
    variant of the case (`fnn_layer`, `fnn_tf32x3`, ...) is compared too, under `variants`:
    one that disagrees, or raises, is reported and not timed."""
    case = problem.case
    ref = problem.reference()
    theirs = problem.observe("eager")
    verdict = compare(problem.output_names, problem.observe("fnn"), theirs, ref, case.dtype)
    variants: dict[str, Any] = {}
    for name in case.fnn_variants:
        if name == "fnn":
            continue
        try:
            variants[name] = compare(problem.output_names, problem.observe(name), theirs, ref, case.dtype)
        except Exception as exc:  # reported by the runner as that variant's error
            message = f"raised {type(exc).__name__}: {exc}"
            variants[name] = {"passed": False, "tensors": {}, "message": message}
    verdict["variants"] = variants
    return verdict
