"""The three kernels as PyTorch operators: `torch.ops.fnn.*`, registered with torch.library.

    torch.ops.fnn.linear_act_forward(x, weight, bias, activation) -> y
    torch.ops.fnn.linear_act_backward_input(dy, y, weight, activation, x, prev_activation) -> dx
    torch.ops.fnn.linear_act_backward_weight(dy, y, x, activation, need_bias, split) -> (dw, db)

Registered ops are opaque to torch.compile (no graph break: their fake implementations give
the output shapes), to autocast (they run in the dtype of their inputs) and to dispatch modes.
The backend is chosen when an op runs, from its input's device (`fnn.functional.backend`):
the compiled Triton kernels, the same kernels in Triton's interpreter, or `fnn.reference`.

The ops have no autograd formula of their own: `fnn.LinearActFunction` and `fnn.FNNFunction`
call them in their forward and backward. The Python functions below have the launchers'
signatures (kernels.linear_act), so the Functions call either interchangeably; they turn
the empty `db` the op returns when `need_bias` is false back into None.
"""

from __future__ import annotations

import torch

__all__ = ["linear_act_backward_input", "linear_act_backward_weight", "linear_act_forward"]


def _run(name: str, t: torch.Tensor, *args):
    """Call `name` of the module serving `t`'s device: kernels.linear_act (Triton, compiled or
    interpreted) or fnn.reference. The reference runs PyTorch ops, which autocast would recast,
    so it runs with autocast off: an op computes in its inputs' dtype on every backend."""
    from . import functional, reference  # functional imports this module

    if functional.backend(t.device) == "reference":
        with torch.autocast(t.device.type, enabled=False):
            return getattr(reference, name)(*args)
    from kernels import linear_act  # imports triton, so only when a kernel will run

    return getattr(linear_act, name)(*args)


# --- forward ---------------------------------------------------------------------------------


@torch.library.custom_op(
    "fnn::linear_act_forward",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor",
)
def _forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    return _run("linear_act_forward", x, x, weight, bias, activation)


@_forward_op.register_fake
def _forward_fake(x, weight, bias, activation):
    return x.new_empty((x.shape[0], weight.shape[0]))


# --- gradient of the input -------------------------------------------------------------------


@torch.library.custom_op(
    "fnn::linear_act_backward_input",
    mutates_args=(),
    schema="(Tensor dy, Tensor y, Tensor weight, str activation, Tensor? x, str prev_activation) -> Tensor",
)
def _backward_input_op(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    activation: str,
    x: torch.Tensor | None,
    prev_activation: str,
) -> torch.Tensor:
    return _run("linear_act_backward_input", dy, dy, y, weight, activation, x, prev_activation)


@_backward_input_op.register_fake
def _backward_input_fake(dy, y, weight, activation, x, prev_activation):
    return weight.new_empty((dy.shape[0], weight.shape[1]))


# --- gradients of the weight and bias --------------------------------------------------------


@torch.library.custom_op(
    "fnn::linear_act_backward_weight",
    mutates_args=(),
    schema=(
        "(Tensor dy, Tensor y, Tensor x, str activation, bool need_bias, SymInt? split)"
        " -> (Tensor, Tensor)"
    ),
)
def _backward_weight_op(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    activation: str,
    need_bias: bool,
    split: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    dw, db = _run("linear_act_backward_weight", x, dy, y, x, activation, need_bias, split)
    if db is None:  # an op cannot return None: an empty tensor stands for "no bias gradient"
        db = x.new_empty((0,))
    return dw, db


@_backward_weight_op.register_fake
def _backward_weight_fake(dy, y, x, activation, need_bias, split):
    n, k = dy.shape[1], x.shape[1]
    return x.new_empty((n, k)), x.new_empty((n,) if need_bias else (0,))


# --- the launchers' signatures, calling the registered ops -----------------------------------


def linear_act_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    """Y = act(x @ weight^T + bias) for a 2-D x (M, K): `torch.ops.fnn.linear_act_forward`."""
    return torch.ops.fnn.linear_act_forward(x, weight, bias, activation)


def linear_act_backward_input(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    activation: str,
    x: torch.Tensor | None = None,
    prev_activation: str = "identity",
) -> torch.Tensor:
    """dX = (dy * act'(y)) @ weight, times prev_act'(x) when `prev_activation` is not identity:
    `torch.ops.fnn.linear_act_backward_input`."""
    return torch.ops.fnn.linear_act_backward_input(dy, y, weight, activation, x, prev_activation)


def linear_act_backward_weight(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    activation: str,
    need_bias: bool,
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dW = D^T @ x and db = sum of D over rows (None unless `need_bias`), D = dy * act'(y):
    `torch.ops.fnn.linear_act_backward_weight`."""
    dw, db = torch.ops.fnn.linear_act_backward_weight(dy, y, x, activation, need_bias, split)
    return dw, (db if need_bias else None)
