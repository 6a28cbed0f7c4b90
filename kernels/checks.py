"""Argument checks shared by the Triton launchers and the PyTorch fallback.

Pure PyTorch: importing this module never imports triton, so the CPU fallback and its
error messages work on machines without triton.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Name -> the integer the layer kernels take as their ACTIVATION constexpr (the activation's kind;
# its parameters are runtime arguments). bench's compile check reads this table.
ACTIVATIONS: dict[str, int] = {
    "identity": 0,
    "sigmoid": 1,
    "relu": 2,
    "tanh": 3,
    "leaky_relu": 4,
    "elu": 5,
    "softplus": 6,
    "gelu": 7,
    "gelu_tanh": 8,
    "silu": 9,
}
# Kernel codes of parameter values whose derivative cannot be read off the output: the same
# forward as ACTIVATIONS[name], the derivative taken from the saved pre-activation Z instead.
ELU_FROM_Z = 10  # elu with alpha < 0
SOFTPLUS_FROM_Z = 11  # softplus with threshold < SOFTPLUS_Y_THRESHOLD
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Parameters of each activation, in the order the kernels take them, with torch's defaults.
PARAMETERS: dict[str, tuple[tuple[str, float], ...]] = {
    "leaky_relu": (("negative_slope", 0.01),),
    "elu": (("alpha", 1.0),),
    "softplus": (("beta", 1.0), ("threshold", 20.0)),
}
# softplus's derivative is read off Y (1 where beta*y > threshold, else 1 - exp(-beta*y)) when
# the threshold is at least this: pre-activations just below the threshold then have outputs
# above it only where sigmoid(beta*z) >= 1 - exp(-17) = 1 - 4e-8, below float32's resolution
# at 1, so taking the derivative there as 1 errs by < 4.2e-8 (2.1e-9 at torch's default 20).
# Below this threshold the two sides overlap visibly: softplus saves Z.
SOFTPLUS_Y_THRESHOLD = 17.0
# What the backward needs besides X and W: "y" (the output), "z" (the pre-activation), "none".
_SAVES = {
    "identity": "none",
    "sigmoid": "y",
    "relu": "y",
    "tanh": "y",
    "gelu": "z",
    "gelu_tanh": "z",
    "silu": "z",
}


def _known() -> str:
    return ", ".join(sorted(ACTIVATIONS))


class Activation:
    """An activation and its parameters, for every fnn entry point that takes `activation`.

        Activation("leaky_relu", negative_slope=0.2)      # torch.nn.LeakyReLU(0.2)
        Activation("elu", alpha=0.5)                      # torch.nn.ELU(0.5)
        Activation("softplus", beta=2.0, threshold=10.0)  # torch.nn.Softplus(2.0, 10.0)
        Activation("gelu", approximate="tanh")            # the same as "gelu_tanh"

    A plain name (`activation="leaky_relu"`) means the defaults, torch's: negative_slope 0.01,
    alpha 1.0, beta 1.0 and threshold 20.0. Parameters are keyword-only, each a finite real
    number; softplus's beta must not be 0. Unknown names or parameters raise ValueError or
    TypeError. Instances are immutable, hashable and compare by name and parameter values;
    `act.negative_slope` etc. read a parameter.

    What the backward saves besides X and W (`saves`): "y" (the output) for sigmoid, relu, tanh,
    leaky_relu with negative_slope >= 0, elu with alpha >= 0 and softplus with threshold >= 17;
    "z" (the pre-activation) for gelu, gelu_tanh, silu and the other parameter values, where the
    output no longer tells the derivative; "none" for identity.
    """

    __slots__ = ("name", "values", "_kernel")
    name: str
    values: tuple[float, ...]

    def __init__(self, name: str, **params: object) -> None:
        if not isinstance(name, str):
            raise TypeError(f"activation name must be a string, got {type(name).__name__}")
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; known activations: {_known()}")
        if name == "gelu" and "approximate" in params:
            approximate = params.pop("approximate")
            if approximate not in ("none", "tanh"):
                raise ValueError(
                    f"gelu's approximate must be 'none' or 'tanh' (as torch's), got {approximate!r}"
                )
            if approximate == "tanh":
                name = "gelu_tanh"
        spec = PARAMETERS.get(name, ())
        allowed = [p for p, _ in spec]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no parameters"
            if name == "gelu":
                takes += " (but approximate='none' or 'tanh')"
            raise TypeError(
                f"Activation({name!r}) got unexpected parameter(s) {', '.join(unknown)}; {name} {takes}"
            )
        values = []
        for pname, default in spec:
            value = params.get(pname, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}'s {pname} must be a real number, got {type(value).__name__}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{name}'s {pname} must be finite, got {value}")
            values.append(value)
        if name == "softplus" and values[0] == 0:
            raise ValueError("softplus's beta must not be 0 (softplus divides by it)")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "values", tuple(values))
        object.__setattr__(self, "_kernel", None)  # kernel_args, made on first use

    @classmethod
    def from_values(cls, name: str, values: Sequence[float]) -> Activation:
        """The activation `name` with its parameters given in order (PARAMETERS[name]); an empty
        `values` means the defaults. The registered ops carry activations this way."""
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; known activations: {_known()}")
        spec = PARAMETERS.get(name, ())
        if len(values) not in (0, len(spec)):
            raise ValueError(
                f"{name} takes {len(spec)} parameter value(s), got {len(values)}: {list(values)}"
            )
        return cls(name, **{p: v for (p, _), v in zip(spec, values, strict=False)})

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError("Activation is immutable")

    def __getattr__(self, key: str) -> float:
        if key in ("name", "values", "_kernel"):  # __slots__ not yet set: only while unpickling/copying
            raise AttributeError(key)
        for (pname, _), value in zip(PARAMETERS.get(self.name, ()), self.values, strict=True):
            if pname == key:
                return value
        raise AttributeError(f"Activation({self.name!r}) has no parameter {key!r}")

    def __reduce__(self):
        return (Activation.from_values, (self.name, self.values))

    @property
    def params(self) -> dict[str, float]:
        """The parameters by name, defaults included."""
        return {p: v for (p, _), v in zip(PARAMETERS.get(self.name, ()), self.values, strict=True)}

    @property
    def is_default(self) -> bool:
        """Whether every parameter has torch's default value (the plain name means the same)."""
        return all(v == d for (_, d), v in zip(PARAMETERS.get(self.name, ()), self.values, strict=True))

    @property
    def saves(self) -> str:
        """What the backward needs besides X and W: "y", "z" or "none" (see the class docstring)."""
        if self.name in _SAVES:
            return _SAVES[self.name]
        if self.name == "leaky_relu":
            return "y" if self.values[0] >= 0 else "z"
        if self.name == "elu":
            return "y" if self.values[0] >= 0 else "z"
        return "y" if self.values[1] >= SOFTPLUS_Y_THRESHOLD else "z"  # softplus

    @property
    def code(self) -> int:
        """The layer kernels' ACTIVATION constexpr: ACTIVATIONS[name], or ELU_FROM_Z /
        SOFTPLUS_FROM_Z where those save Z (leaky_relu's derivative reads either alike)."""
        if self.saves == "z" and self.name == "elu":
            return ELU_FROM_Z
        if self.saves == "z" and self.name == "softplus":
            return SOFTPLUS_FROM_Z
        return ACTIVATIONS[self.name]

    @property
    def kernel_args(self) -> tuple[int, float, float]:
        """(code, *args): what a layer kernel takes for this activation, computed once (the
        launchers read it on every launch)."""
        k = self._kernel
        if k is None:
            k = (self.code, *self.args)
            object.__setattr__(self, "_kernel", k)
        return k

    @property
    def args(self) -> tuple[float, float]:
        """The two runtime float arguments of the kernels (unused ones are 0.0)."""
        return (*self.values, 0.0, 0.0)[:2]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Activation):
            return self.name == other.name and self.values == other.values
        return NotImplemented

    def __hash__(self) -> int:
        return hash((Activation, self.name, self.values))

    def __repr__(self) -> str:
        params = "".join(f", {p}={v!r}" for p, v in self.params.items())
        return f"Activation({self.name!r}{params})"


# Every distinct kernel code, as an Activation: what a compile check should cover.
ACTIVATION_VARIANTS: tuple[Activation, ...] = (
    *(Activation(name) for name in ACTIVATIONS),
    Activation("elu", alpha=-1.0),
    Activation("softplus", threshold=1.0),
)


def act_set(activations: Sequence[str | Activation]) -> int:
    """The whole-network launchers' `acts`: the bitmask of the activations' codes (bit c for
    Activation.code c), the set the network kernels are compiled for."""
    bits = 0
    for a in activations:
        bits |= 1 << as_activation(a).code
    return bits


def as_activation(activation: object, what: str = "activation") -> Activation:
    """`activation` (a name or an Activation) as an Activation; raises TypeError or ValueError."""
    if isinstance(activation, Activation):
        return activation
    if not isinstance(activation, str):
        raise TypeError(
            f"{what} must be a name (one of {_known()}) or an fnn.Activation; got {type(activation).__name__}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown {what} {activation!r}; known activations: {_known()}")
    return Activation(activation)


def check_activation(activation: object, what: str = "activation") -> str | Activation:
    """Validate `activation` and return its canonical form: the plain name when every parameter
    has its default (so `Activation("relu")` and `"relu"` are stored alike), else the Activation."""
    act = as_activation(activation, what)
    return act.name if act.is_default else act


def check_tensor(t: object, name: str) -> torch.Tensor:
    """`t` a dense floating point tensor, else a TypeError naming it (`name`)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout is not torch.strided:
        raise TypeError(f"{name} is a {t.layout} tensor; fnn takes dense (torch.strided) tensors")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; fnn supports floating point tensors only "
            f"({', '.join(str(d) for d in FLOAT_DTYPES)})"
        )
    return t


def check_linear_args(
    x: object, weight: object, bias: object, activation: object, who: str = "fnn.linear_act"
) -> None:
    """Validate the arguments of `act(x @ weight.T + bias)` before anything is launched.

    Raises TypeError for non-tensors, non-float or mixed dtypes and a bad activation type;
    ValueError for bad shapes, mixed devices and unknown activation names.
    """
    check_tensor(x, f"{who}: x")
    check_tensor(weight, f"{who}: weight")
    check_activation(activation)
    if weight.dim() != 2:
        raise ValueError(
            f"{who}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if x.dim() == 0:
        raise ValueError(f"{who}: x must have at least one dimension (..., in_features), got a scalar")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{who}: x has {x.shape[-1]} features in its last dimension (shape {tuple(x.shape)}) "
            f"but weight has in_features={weight.shape[1]} (shape {tuple(weight.shape)})"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{who}: weight shape {tuple(weight.shape)} has an empty dimension")
    tensors = {"x": x, "weight": weight}
    if bias is not None:
        check_tensor(bias, f"{who}: bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{who}: bias must have shape ({weight.shape[0]},) to match weight "
                f"{tuple(weight.shape)}, got {tuple(bias.shape)}"
            )
        tensors["bias"] = bias
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"{who}: all tensors must share one dtype, got {listed}")
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n}: {d}" for n, d in devices.items())
        raise ValueError(f"{who}: all tensors must be on one device, got {listed}")


# --- the per-layer launchers' calls ----------------------------------------------------------
# Each takes the arguments of the launcher of the same name in kernels.linear_act (and of the
# registered op torch.ops.fnn.* that calls it), raises before anything runs where one is wrong,
# and returns the parsed activations. The launchers and the ops on the reference backend run
# them, so a bad call fails the same way on every backend.


def check_2d(name: str, t: object, shape: tuple[int, int], like: torch.Tensor, who: str = "") -> None:
    """`t` a tensor of `shape` with `like`'s dtype and device; `who`, if given, prefixes the
    message."""
    if who:
        name = f"{who}: {name}"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{name} is {t.dtype} on {t.device}; expected {like.dtype} on {like.device}")


def check_split(split: object, rows: object, M: int) -> None:
    """`split` None or >= 1; `rows` None or a positive divisor of M (0 when M is 0)."""
    if split is not None:
        if isinstance(split, bool) or not isinstance(split, int):
            raise TypeError(f"split must be an int or None, got {type(split).__name__}")
        if split < 1:
            raise ValueError(f"split must be >= 1, got {split}")
    if rows is not None:
        if isinstance(rows, bool) or not isinstance(rows, int):
            raise TypeError(f"rows must be an int or None, got {type(rows).__name__}")
        if rows < 1 or M % rows:
            raise ValueError(f"rows must be a positive divisor of the batch's {M} rows, got {rows}")


def check_forward_call(
    x: object, weight: object, bias: object, activation: object, who: str = "linear_act_forward"
) -> Activation:
    """linear_act_forward(_z)'s arguments: check_linear_args, and x 2-D (M, K)."""
    check_linear_args(x, weight, bias, activation, who=who)
    if x.dim() != 2:  # type: ignore[union-attr]
        raise ValueError(f"{who}: x must be 2-D (M, K), got shape {tuple(x.shape)}")  # type: ignore[union-attr]
    return as_activation(activation)


def _weight_2d(weight: object, who: str) -> tuple[int, int]:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{who}: weight must be a 2-D tensor")
    check_tensor(weight, f"{who}: weight")
    return weight.shape[0], weight.shape[1]


def _rows(dy: object) -> int:
    """dy's row count, or -1 where dy is not a 2-D tensor (check_2d then names it)."""
    return dy.shape[0] if isinstance(dy, torch.Tensor) and dy.dim() == 2 else -1


def check_backward_input_call(
    dy: object,
    y: object,
    weight: object,
    activation: object,
    x: object = None,
    prev_activation: object = "identity",
) -> tuple[Activation, Activation]:
    """linear_act_backward_input's arguments; returns (activation, prev_activation)."""
    act = as_activation(activation)
    prev = as_activation(prev_activation, "prev_activation")
    N, K = _weight_2d(weight, "linear_act_backward_input")
    M = _rows(dy)
    check_2d("dy", dy, (M, N), weight)  # type: ignore[arg-type]
    check_2d("y", y, (M, N), weight)  # type: ignore[arg-type]
    if prev.code != 0:
        if x is None:
            raise ValueError(
                "linear_act_backward_input: prev_activation needs x, the previous layer's saved tensor"
            )
        check_2d("x", x, (M, K), weight)  # type: ignore[arg-type]
    return act, prev


def check_backward_call(
    dy: object,
    y: object,
    weight: object,
    x: object,
    activation: object,
    need_bias: object,
    prev_activation: object = "identity",
    split: object = None,
    rows: object = None,
) -> tuple[Activation, Activation]:
    """linear_act_backward's arguments, the weight one tile of the fused kernel
    (kernels.configs.fused_backward_fits); returns (activation, prev_activation)."""
    from .configs import fused_backward_fits  # configs imports this module

    act = as_activation(activation)
    prev = as_activation(prev_activation, "prev_activation")
    N, K = _weight_2d(weight, "linear_act_backward")
    M = _rows(dy)
    check_2d("dy", dy, (M, N), weight)  # type: ignore[arg-type]
    check_2d("y", y, (M, N), weight)  # type: ignore[arg-type]
    check_2d("x", x, (M, K), weight)  # type: ignore[arg-type]
    if not fused_backward_fits(N, K, weight.dtype, prev):  # type: ignore[union-attr]
        raise ValueError(
            f"linear_act_backward: the fused kernel does not serve weight {(N, K)} in "
            f"{weight.dtype} with prev_activation {prev.name!r} (kernels.configs.fused_backward_fits: "  # type: ignore[union-attr]
            "N and K up to FUSED_BACKWARD_MAX, a light prev_activation that saves its output); use "
            "linear_act_backward_input and linear_act_backward_weight"
        )
    check_split(split, rows, M)
    return act, prev


def check_backward_weight_call(
    dy: object,
    y: object,
    x: object,
    activation: object,
    need_bias: object,
    split: object = None,
    x_activation: object = "identity",
    rows: object = None,
) -> tuple[Activation, Activation]:
    """linear_act_backward_weight's arguments; returns (activation, x_activation)."""
    act = as_activation(activation)
    xact = as_activation(x_activation, "x_activation")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError("linear_act_backward_weight: x must be a 2-D tensor (M, K)")
    check_tensor(x, "linear_act_backward_weight: x")
    M, K = x.shape
    N = dy.shape[1] if isinstance(dy, torch.Tensor) and dy.dim() == 2 else -1
    if K == 0 or N == 0:  # as for the forward: no empty layer (its db would go unwritten)
        raise ValueError(f"linear_act_backward_weight: x and dy need K, N >= 1, got K={K}, N={N}")
    check_2d("dy", dy, (M, N), x)
    check_2d("y", y, (M, N), x)
    check_split(split, rows, M)
    return act, xact


# Launcher name -> the check of its call (fnn.ops runs it before fnn.reference's version).
CALL_CHECKS = {
    "linear_act_forward": check_forward_call,
    "linear_act_forward_z": lambda x, w, b, a: check_forward_call(x, w, b, a, "linear_act_forward_z"),
    "linear_act_backward_input": check_backward_input_call,
    "linear_act_backward": check_backward_call,
    "linear_act_backward_weight": check_backward_weight_call,
}
