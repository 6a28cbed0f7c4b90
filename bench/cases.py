"""The case registry: what is timed, at which shape and dtype, and the goals each case must meet.

A case is one problem timed under every implementation side by side:
- `fnn`: ours (`fnn.linear_act`, or `fnn.FNN` for a network case);
- `eager`: `act(F.linear(x, w, b))` from `fnn.reference` (an nn.Sequential of nn.Linear and
  activation modules for a network case), differentiated by PyTorch autograd;
- `compile`: the eager function under `torch.compile`;
- `gemm_only`: `F.linear` alone, the cuBLAS floor (forward linear cases only);
- `addmm_act`: `torch._addmm_activation`, cuBLASLt's ReLU epilogue (ReLU cases that ask for it);
- `eager_graph`: the eager training step captured once in a CUDA graph and replayed (training
  cases that ask for it; CUDA only);
- `fnn_layer`, `fnn_network`: fnn with `fusion="layer"` or `"network"` forced (network and
  training cases), the measurements behind the `fusion="auto"` rule;
- `fnn_tf32x3`: fnn with float32 "highest" computed by `tl.dot(input_precision="tf32x3")`
  (tensor cores, three TF32 products) instead of the FMA dot (float32 "highest" linear cases).
- `fnn_tma`: fnn with the persistent tensor-descriptor forward (`kernels.configs.FORWARD_TMA`;
  16-bit and tf32 forward linear cases).
- `fnn_cublas_bwd`: fnn's forward kernel with a backward whose two products are cuBLAS's
  (torch.mm) and whose D and db come from one Triton pass (bench.problems.CublasBackward;
  forward+backward linear cases of an activation that saves Y).

A training case (`train_case`) times one full-batch SGD step: `fnn.Trainer(model, loss, lr).step`
against the eager step (zero_grad, loss, backward, `torch.optim.SGD.step`).

Add a case with `register(linear_case(...))`, `register(network_case(...))` or
`register(train_case(...))`; its goals are `Goal`s made by `speedup`, `at_most`, `bandwidth`
and `error_at_most`. Every forward+backward or training case also gets the goal "peak memory
of fnn <= eager's". Every fnn variant (`fnn` and the `fnn_*` baselines) must pass the
correctness check before anything is timed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from kernels.checks import check_activation

Mode = Literal["fwd", "fwbw", "step"]
Kind = Literal["linear", "network", "train"]

EXTRA_BASELINES = (
    "addmm_act", "eager_graph", "fnn_layer", "fnn_network", "fnn_tf32x3", "fnn_tma", "fnn_cublas_bwd",
)
IMPLEMENTATIONS = ("fnn", "eager", "compile", "gemm_only", *EXTRA_BASELINES)
# fnn itself, configured otherwise, or (fnn_cublas_bwd) a design measured before it is built in
FNN_VARIANTS = ("fnn_layer", "fnn_network", "fnn_tf32x3", "fnn_tma", "fnn_cublas_bwd")
FUSIONS = ("auto", "layer", "network")
LOSSES = ("bce", "mse", "sse")  # fnn.trainer.LOSSES
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
    kind "memory":    fnn peak memory / baseline peak memory <= target;
    kind "error":     fnn's largest error against float64 <= target x the baseline's, for every
                      output the correctness check compares (the baseline is eager).
    """

    kind: Literal["speedup", "at_most", "bandwidth", "memory", "error"]
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
        if self.kind == "error":
            if self.target == 1:
                return f"error vs float64 <= {self.baseline}'s"
            return f"error vs float64 <= {self.target:g} x {self.baseline}'s"
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


def error_at_most(target: float = 1.0) -> Goal:
    """fnn's largest error against float64 at most `target` times eager's, output by output."""
    return Goal("error", "eager", target)


DTYPE_NAMES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}


@dataclass(frozen=True)
class Case:
    """One benchmark case. Build with `linear_case`, `network_case` or `train_case`.

    shape: {"M", "K", "N"} for a linear case (X (M, K), W (N, K)); {"rows", "sizes"} for a
    network or training case. activation: one name, or one per layer (network and training
    cases). precision: torch's float32 matmul precision while the case runs ("highest" when
    None). input_grad: whether the backward also computes dX. fusion: the FNN's `fusion` for
    `fnn` (network and training cases). loss, lr: the training step's (training cases).
    """

    name: str
    kind: Kind
    mode: Mode
    dtype: torch.dtype
    shape: dict[str, Any] = field(hash=False)
    activation: str | tuple[str, ...] = "sigmoid"
    bias: bool = True
    precision: str | None = None
    input_grad: bool = True
    extra_baselines: tuple[str, ...] = ()
    goals: tuple[Goal, ...] = ()
    quick: bool = False
    cuda_graph: bool | None = None  # None: decided from the measured time (few-microsecond cases)
    tiny_shape: dict[str, Any] | None = field(default=None, hash=False)
    model: Callable[[torch.device, torch.dtype], Any] | None = field(default=None, compare=False, repr=False)
    data: Callable[[], Any] | None = field(default=None, compare=False, repr=False)
    note: str = ""
    tiny: bool = False
    fusion: str = "auto"
    loss: str | None = None
    lr: float = 1e-3

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
    def fnn_variants(self) -> tuple[str, ...]:
        """The implementations that are fnn: `fnn` and the `fnn_*` baselines of this case."""
        return tuple(n for n in self.implementations if n == "fnn" or n in FNN_VARIANTS)

    @property
    def activations(self) -> tuple[str, ...]:
        """The activation names: one per layer when the case gives a list, else the one name."""
        return (self.activation,) if isinstance(self.activation, str) else tuple(self.activation)

    @property
    def all_goals(self) -> tuple[Goal, ...]:
        """The case's goals, plus "peak memory <= eager's" for forward+backward and training
        cases."""
        if self.mode in ("fwbw", "step"):
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

    def describe_activation(self) -> str:
        acts = self.activations
        if len(acts) == 1:
            return acts[0]
        runs: list[str] = []  # "relu x4, sigmoid"
        for name, group in itertools.groupby(acts):
            n = len(list(group))
            runs.append(f"{name} x{n}" if n > 1 else name)
        return ", ".join(runs)

    def describe(self) -> str:
        what = {
            "fwd": "forward",
            "fwbw": "forward+backward",
            "step": f"SGD step ({self.loss} loss, lr {self.lr:g})",
        }
        prec = f" (float32 matmul precision {self.precision!r})" if self.precision else ""
        bias = "bias" if self.bias else "no bias"
        fusion = f", fusion {self.fusion!r}" if self.kind != "linear" else ""
        return (
            f"{self.gemm_tag} {what[self.mode]}{prec}, {self.describe_shape()}, "
            f"{self.describe_activation()}, {bias}{fusion}"
        )

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
            "activation": self.activation if isinstance(self.activation, str) else list(self.activation),
            "bias": self.bias,
            "precision": self.matmul_precision,
            "input_grad": self.input_grad,
            "implementations": list(self.implementations),
            "tiny": self.tiny,
            "note": self.note,
            **({"fusion": self.fusion} if self.kind != "linear" else {}),
            **({"loss": self.loss, "lr": self.lr} if self.kind == "train" else {}),
        }


def _validate(case: Case) -> Case:
    if not case.name or not case.name.replace("_", "").isalnum():
        raise ValueError(f"case name must be letters, digits and '_', got {case.name!r}")
    modes = {"linear": ("fwd", "fwbw"), "network": ("fwd", "fwbw"), "train": ("step",)}
    if case.kind not in modes:
        raise ValueError(f"{case.name}: kind must be one of {tuple(modes)}, got {case.kind!r}")
    if case.mode not in modes[case.kind]:
        raise ValueError(
            f"{case.name}: mode of a {case.kind} case must be one of {modes[case.kind]}, got {case.mode!r}"
        )
    if case.dtype not in DTYPE_NAMES:
        raise ValueError(f"{case.name}: unsupported dtype {case.dtype}")
    acts = case.activations
    if case.kind == "linear" and not isinstance(case.activation, str):
        raise ValueError(f"{case.name}: a linear case takes one activation name, got {case.activation!r}")
    if not acts:
        raise ValueError(f"{case.name}: no activation given")
    for act in acts:
        check_activation(act)
    if case.kind != "linear":
        layers = len(case.shape["sizes"]) - 1
        if len(acts) not in (1, layers):
            raise ValueError(f"{case.name}: {len(acts)} activations for {layers} layers")
        if case.fusion not in FUSIONS:
            raise ValueError(f"{case.name}: fusion must be one of {FUSIONS}, got {case.fusion!r}")
    if case.kind == "train" and case.loss not in LOSSES:
        raise ValueError(f"{case.name}: loss must be one of {LOSSES}, got {case.loss!r}")
    if case.precision is not None and case.precision not in PRECISIONS:
        raise ValueError(f"{case.name}: precision must be one of {PRECISIONS}, got {case.precision!r}")
    for extra in case.extra_baselines:
        if extra not in EXTRA_BASELINES:
            raise ValueError(f"{case.name}: unknown extra baseline {extra!r}; known: {EXTRA_BASELINES}")
    extras = set(case.extra_baselines)
    if "addmm_act" in extras and (case.kind != "linear" or case.activation != "relu" or not case.bias):
        raise ValueError(f"{case.name}: addmm_act (addmm's ReLU epilogue) needs a linear ReLU case with bias")
    if "eager_graph" in extras and case.kind != "train":
        raise ValueError(f"{case.name}: eager_graph (a captured eager training step) needs a training case")
    if extras & {"fnn_layer", "fnn_network"} and case.kind == "linear":
        raise ValueError(f"{case.name}: fnn_layer and fnn_network need a network or training case")
    if "fnn_tf32x3" in extras and (
        case.kind != "linear" or case.dtype != torch.float32 or case.matmul_precision != "highest"
    ):
        raise ValueError(f"{case.name}: fnn_tf32x3 needs a linear float32 case at precision 'highest'")
    if "fnn_tma" in extras and (
        case.kind != "linear"
        or case.mode != "fwd"
        or (case.dtype == torch.float32 and case.matmul_precision == "highest")
        or case.dtype not in (torch.float16, torch.bfloat16, torch.float32)
    ):
        raise ValueError(f"{case.name}: fnn_tma needs a forward linear case in 16 bits or tf32")
    if "fnn_cublas_bwd" in extras and (
        case.kind != "linear" or case.mode != "fwbw" or case.activation not in ("sigmoid", "relu", "tanh")
    ):
        raise ValueError(f"{case.name}: fnn_cublas_bwd needs a linear fwbw case of sigmoid, relu or tanh")
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
    activation: str | Sequence[str] = "sigmoid",
    bias: bool = True,
    precision: str | None = None,
    input_grad: bool = False,
    fusion: str = "auto",
    model: Callable[[torch.device, torch.dtype], Any] | None = None,
    data: Callable[[], torch.Tensor] | None = None,
    goals: Sequence[Goal] = (),
    extra_baselines: Sequence[str] = ("fnn_layer", "fnn_network"),
    quick: bool = False,
    cuda_graph: bool | None = None,
    tiny_rows: int | None = None,
    note: str = "",
) -> Case:
    """`fnn.FNN(sizes, activation, fusion=fusion)` against an eager nn.Sequential of nn.Linear
    and activation modules holding the same weights. `model(device, dtype)` builds the FNN
    (default: fresh init after torch.manual_seed(0)); `data()` gives the first input set
    (default: random normal). A forward case runs under torch.no_grad (inference); in a
    forward+backward case gradients go to the parameters (and to the input if `input_grad`)."""
    return _validate(
        Case(
            name=name,
            kind="network",
            mode=mode,
            dtype=dtype,
            shape={"rows": rows, "sizes": list(sizes)},
            activation=activation if isinstance(activation, str) else tuple(activation),
            bias=bias,
            precision=precision,
            input_grad=input_grad,
            extra_baselines=tuple(extra_baselines),
            goals=tuple(goals),
            quick=quick,
            cuda_graph=cuda_graph,
            tiny_shape={"rows": min(rows, tiny_rows or rows), "sizes": list(sizes)},
            model=model,
            data=data,
            note=note,
            fusion=fusion,
        )
    )


def train_case(
    name: str,
    rows: int,
    sizes: Sequence[int],
    dtype: torch.dtype,
    *,
    loss: str,
    lr: float = 1e-3,
    activation: str | Sequence[str] = "sigmoid",
    bias: bool = True,
    fusion: str = "auto",
    model: Callable[[torch.device, torch.dtype], Any] | None = None,
    data: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
    goals: Sequence[Goal] = (),
    extra_baselines: Sequence[str] = ("fnn_layer", "fnn_network"),
    quick: bool = False,
    tiny_rows: int | None = None,
    note: str = "",
) -> Case:
    """One full-batch SGD step (momentum 0) of `fnn.FNN(sizes, activation, fusion=fusion)`:
    `fnn.Trainer(model, loss, lr).step(x, y)` against the eager step on an nn.Sequential
    holding the same weights (`opt.zero_grad()`, the loss, `backward()`, `opt.step()` of
    torch.optim.SGD), and against that step under torch.compile. `model` as for
    `network_case`; `data()` gives the first batch (x, y) (default: x random normal, y uniform
    in [0, 1)). Each implementation trains its own copy of the weights, so every step timed is
    a real step. Timed call by call, without a CUDA graph (the `eager_graph` baseline is the
    graph)."""
    return _validate(
        Case(
            name=name,
            kind="train",
            mode="step",
            dtype=dtype,
            shape={"rows": rows, "sizes": list(sizes)},
            activation=activation if isinstance(activation, str) else tuple(activation),
            bias=bias,
            input_grad=False,
            extra_baselines=tuple(extra_baselines),
            goals=tuple(goals),
            quick=quick,
            cuda_graph=False,
            tiny_shape={"rows": min(rows, tiny_rows or rows), "sizes": list(sizes)},
            model=model,
            data=data,
            note=note,
            fusion=fusion,
            loss=loss,
            lr=lr,
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


def _seed000_xy() -> tuple[torch.Tensor, torch.Tensor]:
    from fnn.data import seed000_data

    return seed000_data()


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
MLP_ROWS, MLP_ACTS = 1 << 20, ("relu",) * 4 + ("sigmoid",)
BIG, SMALL = (8192, 4096, 4096), (1 << 20, 64, 64)

register(
    linear_case(
        "fwd_large_bf16",
        *BIG,
        BF16,
        "fwd",
        extra_baselines=["fnn_tma"],
        goals=[speedup("eager", 1.08), at_most("gemm_only", 1.05)],
    )
)
register(
    linear_case(
        "fwd_small_bf16",
        *SMALL,
        BF16,
        "fwd",
        quick=True,
        extra_baselines=["fnn_tma"],
        goals=[speedup("eager", 1.8), speedup("compile", 1.2), bandwidth(0.85)],
    )
)
register(
    linear_case(
        "fwbw_large_bf16",
        *BIG,
        BF16,
        "fwbw",
        extra_baselines=["fnn_cublas_bwd"],
        goals=[speedup("eager", 1.05), speedup("compile", 1.0)],
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
register(
    linear_case(
        "fwd_large_tf32",
        *BIG,
        FP32,
        "fwd",
        precision="high",
        extra_baselines=["fnn_tma"],
        goals=[speedup("eager", 1.0)],
    )
)
register(
    linear_case(
        "fwd_large_fp32",
        4096,
        4096,
        4096,
        FP32,
        "fwd",
        precision="highest",
        extra_baselines=["fnn_tf32x3"],
        goals=[speedup("eager", 1.5), error_at_most(1.0)],
        note="fnn_tf32x3: the kernel with tl.dot(input_precision=\"tf32x3\"); fnn keeps ieee until measured",
    )
)
register(
    linear_case(
        "fwbw_relu_bf16",
        *BIG,
        BF16,
        "fwbw",
        activation="relu",
        extra_baselines=["addmm_act", "fnn_cublas_bwd"],
        goals=[speedup("eager", 1.0), speedup("addmm_act", 1.0)],
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
        goals=[speedup("eager", 4.0)],
        note="seed 000's network and data (torch.manual_seed(2) weights, 100 Iris rows)",
    )
)
register(
    train_case(
        "train_step_seed000",
        100,
        [2, 32, 1],
        FP32,
        loss="sse",
        lr=1e-3,
        bias=False,
        model=_seed000_model,
        data=_seed000_xy,
        extra_baselines=["eager_graph", "fnn_layer", "fnn_network"],
        goals=[speedup("eager", 10.0), speedup("eager_graph", 3.0)],
        note="seed 000's training step: its network, its 100 Iris rows and labels, 0.5 x sum of squares",
    )
)
register(
    network_case(
        "mlp_fwd_w64",
        MLP_ROWS,
        [64] * 5 + [16],
        FP16,
        "fwd",
        activation=MLP_ACTS,
        tiny_rows=64,
        goals=[speedup("eager", 3.0), speedup("compile", 1.5)],
    )
)
register(
    train_case(
        "mlp_train_w64",
        MLP_ROWS,
        [64] * 5 + [16],
        FP16,
        loss="mse",
        lr=1e-3,
        activation=MLP_ACTS,
        tiny_rows=64,
        goals=[speedup("eager", 2.0), speedup("compile", 1.3)],
    )
)
register(
    network_case(
        "mlp_fwd_w128",
        MLP_ROWS,
        [128] * 5 + [16],
        FP16,
        "fwd",
        activation=MLP_ACTS,
        tiny_rows=64,
        goals=[speedup("eager", 2.0)],
    )
)
