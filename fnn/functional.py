"""Autograd Functions and the functional API.

Backends, chosen per call from the input's device (never at import time):
- CUDA tensors run the compiled Triton kernels (kernels.linear_act);
- CPU tensors run them in Triton's interpreter when TRITON_INTERPRET=1 is set;
- otherwise CPU tensors run fnn.reference, the same maths in PyTorch ops.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from kernels.checks import check_linear_args

from . import ops

# Set by bench.fakecuda.compile_only: every device is served by the compiled kernels (which
# are then compiled for a GPU target and never launched). None in normal use.
FORCE_BACKEND: str | None = None


def backend(device: torch.device | str) -> str:
    """Which implementation serves tensors on `device`: "triton", "interpreter" or "reference"."""
    if FORCE_BACKEND is not None:
        return FORCE_BACKEND
    device = torch.device(device)
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter"
    return "reference"


def _ops(t: torch.Tensor) -> ModuleType:
    """The registered operators (fnn.ops, `torch.ops.fnn.*`); each picks its backend when it runs,
    so torch.compile sees one opaque op per kernel, whatever the device."""
    return ops


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def _autocast(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Under torch.autocast for the first tensor's device, cast the tensors as F.linear's
    autocast would: float32/16 and bfloat16 to the autocast dtype (float64 stays). The casts are
    differentiable, so float32 parameters receive float32 gradients."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or first.device.type not in ("cpu", "cuda"):
        return list(tensors)
    if not torch.is_autocast_enabled(first.device.type):
        return list(tensors)
    dtype = torch.get_autocast_dtype(first.device.type)
    return [
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_CASTS else t
        for t in tensors
    ]


class LinearActFunction(torch.autograd.Function):
    """Y = act(X W^T + b), saving only X, W and Y.

    Backward, with D = dY * act'(Y) formed from the saved output:
        dX = D W,   dW = D^T X,   db = sum over rows of D.
    Only the gradients `ctx.needs_input_grad` asks for are computed.
    Call as `LinearActFunction.apply(x, weight, bias, activation)`.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        activation: str,
    ) -> torch.Tensor:
        check_linear_args(x, weight, bias, activation)
        x2d = x.reshape(-1, x.shape[-1])
        y = _ops(x).linear_act_forward(x2d, weight, bias, activation)
        y = y.view(*x.shape[:-1], weight.shape[0])
        ctx.save_for_backward(x2d, weight, y)
        ctx.activation = activation
        ctx.x_shape = x.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dy: torch.Tensor):
        x2d, weight, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ops = _ops(dy)
        n = weight.shape[0]
        dy2d, y2d = dy.reshape(-1, n), y.reshape(-1, n)
        dx = dw = db = None
        if need_x:
            dx = ops.linear_act_backward_input(dy2d, y2d, weight, ctx.activation)
            dx = dx.view(ctx.x_shape)
        if need_w or need_b:
            dw, db = ops.linear_act_backward_weight(dy2d, y2d, x2d, ctx.activation, need_b)
            dw = dw if need_w else None
        return dx, dw, db, None


class FNNFunction(torch.autograd.Function):
    """A whole feed-forward network as one autograd node.

    Forward: h_0 = X, h_l = act_l(h_{l-1} W_l^T + b_l); saves X, every W_l and every h_l.
    Backward, with D_L = dY * act_L'(h_L):
        dW_l = D_l^T h_{l-1},   db_l = sum over rows of D_l,
        D_{l-1} = (D_l W_l) * act_{l-1}'(h_{l-1})   (in the epilogue of the dX kernel),
        dX = D_1 W_1.
    No elementwise kernel runs between layers. Call as
    `FNNFunction.apply(x, activations, w_1, b_1, ..., w_L, b_L)` (a bias may be None).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, activations: tuple[str, ...], *params) -> torch.Tensor:
        weights, biases = params[0::2], params[1::2]
        ops = _ops(x)
        h = x.reshape(-1, x.shape[-1])
        hs = [h]
        for w, b, a in zip(weights, biases, activations, strict=True):
            h = ops.linear_act_forward(h, w, b, a)
            hs.append(h)
        out = h if x.dim() == 2 else h.view(*x.shape[:-1], h.shape[-1])  # a view only if needed
        ctx.save_for_backward(*hs[:-1], out, *weights)
        ctx.activations = activations
        ctx.has_bias = [b is not None for b in biases]
        ctx.x_shape = x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dy: torch.Tensor):
        n_layers = len(ctx.activations)
        saved = ctx.saved_tensors
        hs = list(saved[: n_layers + 1])  # h_0 (= X, 2-D), ..., h_L (output shape)
        weights = saved[n_layers + 1 :]
        needs = ctx.needs_input_grad
        need_w = [needs[2 + 2 * i] for i in range(n_layers)]
        need_b = [needs[3 + 2 * i] and ctx.has_bias[i] for i in range(n_layers)]
        n_out = weights[-1].shape[0]
        hs[-1] = hs[-1].reshape(-1, n_out)
        g, g_act = dy.reshape(-1, n_out), ctx.activations[-1]
        ops = _ops(dy)
        grads: list[torch.Tensor | None] = [None] * (2 * n_layers)
        dx = None
        for i in reversed(range(n_layers)):
            x_i, y_i, w_i = hs[i], hs[i + 1], weights[i]
            if need_w[i] or need_b[i]:
                dw, db = ops.linear_act_backward_weight(g, y_i, x_i, g_act, need_b[i])
                grads[2 * i] = dw if need_w[i] else None
                grads[2 * i + 1] = db
            if i == 0:
                if needs[0]:
                    dx = ops.linear_act_backward_input(g, y_i, w_i, g_act).view(ctx.x_shape)
            elif needs[0] or any(need_w[:i]) or any(need_b[:i]):
                prev = ctx.activations[i - 1]
                g = ops.linear_act_backward_input(g, y_i, w_i, g_act, x=x_i, prev_activation=prev)
                g_act = "identity"  # g is now D_{i-1}: the delta is already applied
            else:
                break
        return (dx, None, *grads)


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "sigmoid",
) -> torch.Tensor:
    """act(x @ weight^T + bias), a drop-in for `act(F.linear(x, weight, bias))`.

    x: (..., in_features) or (in_features,); weight: (out_features, in_features);
    bias: (out_features,) or None; activation: "sigmoid", "relu", "tanh" or "identity".
    Returns (..., out_features) in x's dtype. Gradients flow to x, weight and bias:
    with D = dY * act'(Y), dx = D weight, dweight = D^T x, dbias = sum over rows of D.
    Under torch.autocast the tensors are first cast to the autocast dtype, as F.linear's are.
    """
    x, weight, bias = _autocast((x, weight, bias))
    return LinearActFunction.apply(x, weight, bias, activation)


def linear_sigmoid(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """sigmoid(x @ weight^T + bias): `linear_act` with the sigmoid activation.

    Backward: D = dY * Y (1 - Y), dx = D weight, dweight = D^T x, dbias = sum over rows of D.
    """
    return linear_act(x, weight, bias, "sigmoid")


def fnn_forward(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
) -> torch.Tensor:
    """Run a feed-forward network through FNNFunction (one autograd node for all layers).

    Layer l computes act_l(h @ weights[l]^T + biases[l]); every argument is checked first.
    The backward is FNNFunction's (D_l = dh_l * act_l'(h_l), dW_l = D_l^T h_{l-1}, ...).
    Under torch.autocast every tensor is first cast to the autocast dtype, as F.linear's are.
    """
    if not (len(weights) == len(biases) == len(activations)) or not weights:
        raise ValueError(
            f"fnn_forward: need one weight, bias and activation per layer, got "
            f"{len(weights)} weights, {len(biases)} biases, {len(activations)} activations"
        )
    x, *cast = _autocast((x, *weights, *biases))
    weights, biases = cast[: len(weights)], cast[len(weights) :]
    for i, (w, b, a) in enumerate(zip(weights, biases, activations, strict=True)):
        who = f"layer {i} of the network"
        if i == 0:
            check_linear_args(x, w, b, a, who=who)
        else:
            # The input of layer i is the output of layer i - 1: check it as an empty batch.
            check_linear_args(x.new_empty((0, weights[i - 1].shape[0])), w, b, a, who=who)
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    return FNNFunction.apply(x, tuple(activations), *params)
