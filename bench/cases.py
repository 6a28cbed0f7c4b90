"""The case registry: what is timed, at which shape and dtype, and the goals each case must meet.

A case is one problem timed under every implementation side by side:
- `fnn`: ours (`fnn.linear_act`, or `fnn.FNN` for a network case);
- `eager`: `act(F.linear(x, w, b))` from `fnn.reference` (an nn.Sequential of nn.Linear and
  activation modules for a network case), differentiated by PyTorch autograd;
- `compile`: the eager function under `torch.compile`;
- `gemm_only`: `F.linear` alone, the cuBLAS floor (forward linear cases only);
- `addmm_act`: `torch._addmm_activation`, cuBLASLt's ReLU epilogue (ReLU cases that ask for it).

Add a case with `register(linear_case(...))` or `register(network_case(...))`; its goals are
`Goal`s made by `speedup`, `at_most` and `bandwidth`. Every forward+backward case also gets
the goal "peak memory of fnn <= eager's".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from kernels.checks import check_activation

Mode = Literal["fwd", "fwbw"]
Kind = Literal["linear", "network"]

IMPLEMENTATIONS = ("fnn", "eager", "compile", "gemm_only", "addmm_act")
EXTRA_BASELINES = ("addmm_act",)
PRECISIONS = ("highest", "high", "medium")

# Shape of every linear case when run at tiny size (tests, CPU smoke runs): odd enough that
# M, K and N differ, small enough for Triton's interpreter.
TINY_LINEAR = {"M": 96, "K": 32, "N": 48}


@dataclass(frozen=True)
class Goal:
    """One performance goal of a case.

    kind "speedup":   baseline median / fnn median >= target;
    kind "at_most":   fnn median / baseline median <= target (e.g. fnn <= 1.05 x gemm_only);
    kind "bandwidth": fnn's achieved bytes/s / measured copy bandwidth >= target;
    kind "memory":    fnn peak memory / baseline peak memory <= target.
    """

    kind: Literal["speedup", "at_most", "bandwidth", "memory"]
    baseline: str
    target: float

    @property
    def text(self) -> str:
        if self.kind == "speedup":
            return f"speedup vs {self.baseline} >= {self.target:g}x"
        if self.kind == "at_most":
            return f"fnn <= {self.target:g} x {self.baseline}"
        if self.kind == "bandwidth":
            return f">= {self.target:.0%} of copy bandwidth"
        if self.target == 1:
            return f"peak memory <= {self.baseline}'s"
        return f"peak memory <= {self.target:g} x {self.baseline}'s"

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "kind": self.kind, "baseline": self.baseline, "target": self.target}


def speedup(baseline: str, target: float) -> Goal:
    """fnn at least `target` times faster than `baseline` (median against median)."""
    return Goal("speedup", baseline, target)


def at_most(baseline: str, target: float) -> Goal:
    """fnn's median at most `target` times `baseline`'s."""
    return Goal("at_most", baseline, target)


def bandwidth(fraction: float) -> Goal:
    """fnn moves its compulsory bytes at >= `fraction` of the measured copy bandwidth."""
    return Goal("bandwidth", "copy", fraction)


DTYPE_NAMES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}


@dataclass(frozen=True)
class Case:
    """One benchmark case. Build with `linear_case` or `network_case`.

    shape: {"M", "K", "N"} for a linear case (X (M, K), W (N, K)); {"rows", "sizes"} for a
    network case. precision: torch's float32 matmul precision while the case runs ("highest"
    when None). input_grad: whether the backward also computes dX.
    """

    name: str
    kind: Kind
    mode: Mode
    dtype: torch.dtype
    shape: dict[str, Any] = field(hash=False)
    activation: str = "sigmoid"
    bias: bool = True
    precision: str | None = None
    input_grad: bool = True
    extra_baselines: tuple[str, ...] = ()
    goals: tuple[Goal, ...] = ()
    quick: bool = False
    cuda_graph: bool | None = None  # None: decided from the measured time (few-microsecond cases)
    tiny_shape: dict[str, Any] | None = field(default=None, hash=False)
    model: Callable[[torch.device, torch.dtype], Any] | None = field(default=None, compare=False, repr=False)
    data: Callable[[], torch.Tensor] | None = field(default=None, compare=False, repr=False)
    note: str = ""
    tiny: bool = False

    @property
    def implementations(self) -> tuple[str, ...]:
        impls = ["fnn", "eager", "compile"]
        if self.mode == "fwd" and self.kind == "linear":
            impls.append("gemm_only")
        impls.extend(self.extra_baselines)
        return tuple(impls)

    @property
    def baselines(self) -> tuple[str, ...]:
        return self.implementations[1:]

    @property
    def all_goals(self) -> tuple[Goal, ...]:
        """The case's goals, plus "peak memory <= eager's" for forward+backward cases."""
        if self.mode == "fwbw":
            return (*self.goals, Goal("memory", "eager", 1.0))
        return self.goals

    @property
    def matmul_precision(self) -> str:
        return self.precision or "highest"

    @property
    def gemm_tag(self) -> str:
        """Which GEMM ceiling this case's roofline uses: bf16, fp16, tf32, fp32 or fp64."""
        if self.dtype == torch.float32 and self.matmul_precision != "highest":
            return "tf32"
        return DTYPE_NAMES[self.dtype]

    def describe_shape(self) -> str:
        if self.kind == "linear":
            return f"M={self.shape['M']} K={self.shape['K']} N={self.shape['N']}"
        return f"rows={self.shape['rows']} sizes={'-'.join(str(s) for s in self.shape['sizes'])}"

    def describe(self) -> str:
        what = "forward" if self.mode == "fwd" else "forward+backward"
        prec = f" (float32 matmul precision {self.precision!r})" if self.precision else ""
        bias = "bias" if self.bias else "no bias"
        return f"{self.gemm_tag} {what}{prec}, {self.describe_shape()}, {self.activation}, {bias}"

    def at_tiny(self) -> Case:
        """The same case at a shape small enough for the CPU (Triton's interpreter)."""
        return replace(self, shape=dict(self.tiny_shape or self.shape), tiny=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "mode": self.mode,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": dict(self.shape),
            "activation": self.activation,
            "bias": self.bias,
            "precision": self.matmul_precision,
            "input_grad": self.input_grad,
            "implementations": list(self.implementations),
            "tiny": self.tiny,
            "note": self.note,
        }


def _validate(case: Case) -> Case:
    if not case.name or not case.name.replace("_", "").isalnum():
        raise ValueError(f"case name must be letters, digits and '_', got {case.name!r}")
    if case.mode not in ("fwd", "fwbw"):
        raise ValueError(f"{case.name}: mode must be 'fwd' or 'fwbw', got {case.mode!r}")
    if case.dtype not in DTYPE_NAMES:
        raise ValueError(f"{case.name}: unsupported dtype {case.dtype}")
    check_activation(case.activation)
    if case.precision is not None and case.precision not in PRECISIONS:
        raise ValueError(f"{case.name}: precision must be one of {PRECISIONS}, got {case.precision!r}")
    for extra in case.extra_baselines:
        if extra not in EXTRA_BASELINES:
            raise ValueError(f"{case.name}: unknown extra baseline {extra!r}; known: {EXTRA_BASELINES}")
    if "addmm_act" in case.extra_baselines and (
        case.kind != "linear" or case.activation != "relu" or not case.bias
    ):
        raise ValueError(f"{case.name}: addmm_act (addmm's ReLU epilogue) needs a linear ReLU case with bias")
    for goal in case.all_goals:
        if goal.kind == "bandwidth":
            continue
        if goal.baseline not in case.baselines:
            raise ValueError(
                f"{case.name}: goal {goal.text!r} names {goal.baseline!r}, not a baseline of this "
                f"case ({', '.join(case.baselines)})"
            )
    return case


def linear_case(
    name: str,
    M: int,
    K: int,
    N: int,
    dtype: torch.dtype,
    mode: Mode,
    *,
    activation: str = "sigmoid",
    bias: bool = True,
    precision: str | None = None,
    goals: Sequence[Goal] = (),
    extra_baselines: Sequence[str] = (),
    quick: bool = False,
    cuda_graph: bool | None = None,
    note: str = "",
) -> Case:
    """act(X W^T + b) with X (M, K), W (N, K); backward gives dX, dW and db."""
    return _validate(
        Case(
            name=name,
            kind="linear",
            mode=mode,
            dtype=dtype,
            shape={"M": M, "K": K, "N": N},
            activation=activation,
            bias=bias,
            precision=precision,
            extra_baselines=tuple(extra_baselines),
            goals=tuple(goals),
            quick=quick,
            cuda_graph=cuda_graph,
            tiny_shape=dict(TINY_LINEAR),
            note=note,
        )
    )


def network_case(
    name: str,
    rows: int,
    sizes: Sequence[int],
    dtype: torch.dtype,
    mode: Mode,
    *,
    activation: str = "sigmoid",
    bias: bool = True,
    precision: str | None = None,
    input_grad: bool = False,
    model: Callable[[torch.device, torch.dtype], Any] | None = None,
    data: Callable[[], torch.Tensor] | None = None,
    goals: Sequence[Goal] = (),
    quick: bool = False,
    cuda_graph: bool | None = None,
    tiny_rows: int | None = None,
    note: str = "",
) -> Case:
    """`fnn.FNN(sizes)` against an eager nn.Sequential of nn.Linear and activation modules
    holding the same weights. `model(device, dtype)` builds the FNN (default: fresh init);
    `data()` gives the first input set (default: random normal). Gradients go to the
    parameters (and to the input if `input_grad`)."""
    shape = {"rows": rows, "sizes": list(sizes)}
    tiny = {"rows": min(rows, tiny_rows or rows), "sizes": list(sizes)}
    return _validate(
        Case(
            name=name,
            kind="network",
            mode=mode,
            dtype=dtype,
            shape=shape,
            activation=activation,
            bias=bias,
            precision=precision,
            input_grad=input_grad,
            goals=tuple(goals),
            quick=quick,
            cuda_graph=cuda_graph,
            tiny_shape=tiny,
            model=model,
            data=data,
            note=note,
        )
    )


CASES: dict[str, Case] = {}


def register(case: Case) -> Case:
    """Add a case to the registry (names are unique)."""
    if case.name in CASES:
        raise ValueError(f"a case named {case.name!r} is already registered")
    CASES[case.name] = case
    return case


def select(names: Iterable[str] | None = None, quick: bool = False) -> list[Case]:
    """The cases to run: `names` in the order given, else the quick ones, else all."""
    if names:
        names = list(names)
        unknown = [n for n in names if n not in CASES]
        if unknown:
            raise ValueError(f"unknown case(s) {', '.join(unknown)}; known cases: {', '.join(CASES)}")
        return [CASES[n] for n in dict.fromkeys(names)]
    if quick:
        return [c for c in CASES.values() if c.quick]
    return list(CASES.values())


def _seed000_model(device: torch.device, dtype: torch.dtype):
    from fnn.cli import seed000_model

    return seed000_model(2, device).to(dtype)


def _seed000_x() -> torch.Tensor:
    from fnn.data import seed000_data

    return seed000_data()[0]


BF16, FP32 = torch.bfloat16, torch.float32
BIG, SMALL = (8192, 4096, 4096), (1 << 20, 64, 64)

register(
    linear_case(
        "fwd_large_bf16", *BIG, BF16, "fwd", goals=[speedup("eager", 1.08), at_most("gemm_only", 1.05)]
    )
)
register(
    linear_case(
        "fwd_small_bf16",
        *SMALL,
        BF16,
        "fwd",
        quick=True,
        goals=[speedup("eager", 1.8), speedup("compile", 1.2), bandwidth(0.85)],
    )
)
register(
    linear_case(
        "fwbw_large_bf16", *BIG, BF16, "fwbw", goals=[speedup("eager", 1.05), speedup("compile", 1.0)]
    )
)
register(
    linear_case(
        "fwbw_small_bf16",
        *SMALL,
        BF16,
        "fwbw",
        quick=True,
        goals=[speedup("eager", 1.6), speedup("compile", 1.2)],
    )
)
register(linear_case("fwd_large_tf32", *BIG, FP32, "fwd", precision="high", goals=[speedup("eager", 1.0)]))
register(
    linear_case(
        "fwd_large_fp32", 4096, 4096, 4096, FP32, "fwd", precision="highest", goals=[speedup("eager", 0.9)]
    )
)
register(
    linear_case(
        "fwbw_relu_bf16",
        *BIG,
        BF16,
        "fwbw",
        activation="relu",
        extra_baselines=["addmm_act"],
        goals=[speedup("eager", 1.0)],
        note="addmm_act: cuBLASLt ReLU epilogue forward, eager-PyTorch backward (reported, no goal)",
    )
)
register(
    network_case(
        "fnn_seed000_fwbw",
        100,
        [2, 32, 1],
        FP32,
        "fwbw",
        bias=False,
        quick=True,
        cuda_graph=True,
        model=_seed000_model,
        data=_seed000_x,
        goals=[speedup("eager", 2.0)],
        note="seed 000's network and data (torch.manual_seed(2) weights, 100 Iris rows)",
    )
)
