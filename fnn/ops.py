"""The layer kernels as PyTorch operators: `torch.ops.fnn.*`, registered with torch.library.

    torch.ops.fnn.linear_act_forward(x, weight, bias, activation, act_params) -> y
    torch.ops.fnn.linear_act_forward_z(x, weight, bias, activation, act_params) -> (y, z)
    torch.ops.fnn.linear_act_backward_input(dy, y, weight, activation, x, prev_activation,
                                            act_params, prev_params) -> dx
    torch.ops.fnn.linear_act_backward_weight(dy, y, x, activation, need_bias, split, act_params,
                                             x_activation, x_params) -> (dw, db)
    torch.ops.fnn.linear_act_backward(dy, y, weight, x, activation, need_bias, prev_activation,
                                      act_params, prev_params, split) -> (dx, dw, db)

An activation travels as its name and its parameter values in order (`float[]`, empty for the
defaults; kernels.checks.PARAMETERS); `y` (and `x` for a previous layer) is what the forward
saved: the output, or the pre-activation Z for the activations that save it.

Registered ops are opaque to torch.compile (no graph break: their fake implementations give
the output shapes), to autocast (they run in the dtype of their inputs) and to dispatch modes.
The backend is chosen when an op runs, from its input's device (`fnn.dispatch.backend`):
the compiled Triton kernels, the same kernels in Triton's interpreter, or `fnn.reference`.

The ops have no autograd formula of their own: `fnn.LinearActFunction` and `fnn.FNNFunction`
call them in their forward and backward while torch.compile traces, or under a dispatch mode
or a functorch transform; in plain eager mode they call the launchers directly (fnn.dispatch
decides). The Python functions below have the launchers' signatures (kernels.linear_act), so
the Functions call either interchangeably; they turn the empty `db` the op returns when
`need_bias` is false back into None.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.checks import Activation, as_activation

__all__ = [
    "linear_act_backward",
    "linear_act_backward_input",
    "linear_act_backward_weight",
    "linear_act_forward",
    "linear_act_forward_z",
]


def _run(name: str, t: torch.Tensor, *args):
    """Call `name` of the module serving `t`'s device: kernels.linear_act (Triton, compiled or
    interpreted) or fnn.reference. The reference runs PyTorch ops, which autocast would recast,
    so it runs with autocast off: an op computes in its inputs' dtype on every backend."""
    from . import reference
    from .dispatch import backend

    if backend(t.device) == "reference":
        with torch.autocast(t.device.type, enabled=False):
            return getattr(reference, name)(*args)
    from kernels import linear_act  # imports triton, so only when a kernel will run

    return getattr(linear_act, name)(*args)


def _act(name: str, params: Sequence[float]) -> Activation:
    return Activation.from_values(name, params)


def _spec(activation: str | Activation, what: str = "activation") -> tuple[str, list[float]]:
    """(name, parameter values) of an activation, as the op schemas carry it."""
    act = as_activation(activation, what)
    return act.name, list(act.values)


# --- forward ---------------------------------------------------------------------------------


@torch.library.custom_op(
    "fnn::linear_act_forward",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, str activation, float[] act_params=[]) -> Tensor",
)
def _forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    act_params: Sequence[float] = (),
) -> torch.Tensor:
    return _run("linear_act_forward", x, x, weight, bias, _act(activation, act_params))


@_forward_op.register_fake
def _forward_fake(x, weight, bias, activation, act_params=()):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op(
    "fnn::linear_act_forward_z",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor? bias, str activation, float[] act_params=[]) -> (Tensor, Tensor)"
    ),
)
def _forward_z_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    act_params: Sequence[float] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("linear_act_forward_z", x, x, weight, bias, _act(activation, act_params))


@_forward_z_op.register_fake
def _forward_z_fake(x, weight, bias, activation, act_params=()):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


# --- gradient of the input -------------------------------------------------------------------


@torch.library.custom_op(
    "fnn::linear_act_backward_input",
    mutates_args=(),
    schema=(
        "(Tensor dy, Tensor y, Tensor weight, str activation, Tensor? x, str prev_activation,"
        " float[] act_params=[], float[] prev_params=[]) -> Tensor"
    ),
)
def _backward_input_op(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    activation: str,
    x: torch.Tensor | None,
    prev_activation: str,
    act_params: Sequence[float] = (),
    prev_params: Sequence[float] = (),
) -> torch.Tensor:
    act, prev = _act(activation, act_params), _act(prev_activation, prev_params)
    return _run("linear_act_backward_input", dy, dy, y, weight, act, x, prev)


@_backward_input_op.register_fake
def _backward_input_fake(dy, y, weight, activation, x, prev_activation, act_params=(), prev_params=()):
    return weight.new_empty((dy.shape[0], weight.shape[1]))


# --- gradients of the weight and bias --------------------------------------------------------


@torch.library.custom_op(
    "fnn::linear_act_backward_weight",
    mutates_args=(),
    schema=(
        "(Tensor dy, Tensor y, Tensor x, str activation, bool need_bias, SymInt? split,"
        " float[] act_params=[], str x_activation='identity', float[] x_params=[]) -> (Tensor, Tensor)"
    ),
)
def _backward_weight_op(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    activation: str,
    need_bias: bool,
    split: int | None,
    act_params: Sequence[float] = (),
    x_activation: str = "identity",
    x_params: Sequence[float] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    act, xact = _act(activation, act_params), _act(x_activation, x_params)
    dw, db = _run("linear_act_backward_weight", x, dy, y, x, act, need_bias, split, xact)
    if db is None:  # an op cannot return None: an empty tensor stands for "no bias gradient"
        db = x.new_empty((0,))
    return dw, db


@_backward_weight_op.register_fake
def _backward_weight_fake(
    dy, y, x, activation, need_bias, split, act_params=(), x_activation="identity", x_params=()
):
    n, k = dy.shape[1], x.shape[1]
    return x.new_empty((n, k)), x.new_empty((n,) if need_bias else (0,))


# --- the whole backward of a narrow layer, from one kernel ------------------------------------


@torch.library.custom_op(
    "fnn::linear_act_backward",
    mutates_args=(),
    schema=(
        "(Tensor dy, Tensor y, Tensor weight, Tensor x, str activation, bool need_bias,"
        " str prev_activation='identity', float[] act_params=[], float[] prev_params=[],"
        " SymInt? split=None) -> (Tensor, Tensor, Tensor)"
    ),
)
def _backward_op(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    x: torch.Tensor,
    activation: str,
    need_bias: bool,
    prev_activation: str = "identity",
    act_params: Sequence[float] = (),
    prev_params: Sequence[float] = (),
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    act, prev = _act(activation, act_params), _act(prev_activation, prev_params)
    dx, dw, db = _run("linear_act_backward", x, dy, y, weight, x, act, need_bias, prev, split)
    if db is None:  # as in linear_act_backward_weight: empty for "no bias gradient"
        db = x.new_empty((0,))
    return dx, dw, db


@_backward_op.register_fake
def _backward_fake(
    dy, y, weight, x, activation, need_bias, prev_activation="identity", act_params=(), prev_params=(),
    split=None,
):
    n, k = weight.shape
    return x.new_empty((dy.shape[0], k)), x.new_empty((n, k)), x.new_empty((n,) if need_bias else (0,))


# --- the launchers' signatures, calling the registered ops -----------------------------------


def delta_once(dy: torch.Tensor, y: torch.Tensor, activation: str | Activation) -> tuple:
    """kernels.linear_act.delta_once's signature: the arguments unchanged. Each registered op
    forms its own D (an op's dy is in the layer's dtype, D in the accumulator's), so a compiled
    backward with a heavy activation forms D once per op: twice where it needs dX and dW."""
    return dy, y, activation


def linear_act_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | Activation
) -> torch.Tensor:
    """Y = act(x @ weight^T + bias) for a 2-D x (M, K): `torch.ops.fnn.linear_act_forward`."""
    return torch.ops.fnn.linear_act_forward(x, weight, bias, *_spec(activation))


def linear_act_forward_z(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | Activation
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, Z), Y = act(Z), Z = x @ weight^T + bias, from one kernel:
    `torch.ops.fnn.linear_act_forward_z`."""
    return torch.ops.fnn.linear_act_forward_z(x, weight, bias, *_spec(activation))


def linear_act_backward_input(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    activation: str | Activation,
    x: torch.Tensor | None = None,
    prev_activation: str | Activation = "identity",
) -> torch.Tensor:
    """dX = (dy * act'(Z)) @ weight, act' read off `y` (what the forward saved), times the previous
    layer's derivative read off `x` when `prev_activation` is not identity:
    `torch.ops.fnn.linear_act_backward_input`."""
    name, params = _spec(activation)
    prev_name, prev_params = _spec(prev_activation, "prev_activation")
    return torch.ops.fnn.linear_act_backward_input(dy, y, weight, name, x, prev_name, params, prev_params)


def linear_act_backward_weight(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    activation: str | Activation,
    need_bias: bool,
    split: int | None = None,
    x_activation: str | Activation = "identity",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dW = D^T @ X and db = sum of D over rows (None unless `need_bias`), D = dy * act'(Z) read off
    `y`; X = x, or x_activation(x) recomputed from the previous layer's Z:
    `torch.ops.fnn.linear_act_backward_weight`."""
    name, params = _spec(activation)
    x_name, x_params = _spec(x_activation, "x_activation")
    dw, db = torch.ops.fnn.linear_act_backward_weight(
        dy, y, x, name, need_bias, split, params, x_name, x_params
    )
    return dw, (db if need_bias else None)


def linear_act_backward(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    x: torch.Tensor,
    activation: str | Activation,
    need_bias: bool,
    prev_activation: str | Activation = "identity",
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dX, dW, db) of a layer the fused kernel serves (kernels.configs.fused_backward_fits), from
    one kernel: `torch.ops.fnn.linear_act_backward`. `x` is the layer input (the previous
    layer's output where `prev_activation` is given: dX is then that layer's delta)."""
    name, params = _spec(activation)
    prev_name, prev_params = _spec(prev_activation, "prev_activation")
    dx, dw, db = torch.ops.fnn.linear_act_backward(
        dy, y, weight, x, name, need_bias, prev_name, params, prev_params, split
    )
    return dx, dw, (db if need_bias else None)
