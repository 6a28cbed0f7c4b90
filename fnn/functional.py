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

from kernels.checks import Activation, as_activation, check_linear_args

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


def _grad_needed(tensors: Sequence[torch.Tensor | None]) -> bool:
    """Whether autograd will record the call: grad mode on and some tensor requiring grad.
    (Inside a Function's forward, ctx.needs_input_grad ignores torch.no_grad.)"""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class LinearActFunction(torch.autograd.Function):
    """Y = act(Z), Z = X W^T + b, saving no more than the backward needs.

    Backward, with D = dY * act'(Z) read off the saved tensor S:
        dX = D W,   dW = D^T X,   db = sum over rows of D.
    S is Y for activations whose derivative the output tells (sigmoid, relu, tanh, leaky_relu,
    elu, softplus at their usual parameters), Z for gelu, gelu_tanh and silu (and elu with
    alpha < 0, leaky_relu with a negative slope, softplus with threshold < 17: see
    fnn.Activation), nothing for identity. Z is written by the forward kernel as a second
    output only when a gradient will be needed. X is saved only when dW or db is needed, W
    only when dX is. Only the gradients `ctx.needs_input_grad` asks for are computed.
    Call as `LinearActFunction.apply(x, weight, bias, activation)` (a name or an fnn.Activation).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        activation: str | Activation,
    ) -> torch.Tensor:
        check_linear_args(x, weight, bias, activation)
        act = as_activation(activation)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ops = _ops(x)
        x2d = x.reshape(-1, x.shape[-1])
        n = weight.shape[0]
        if act.saves == "z" and (need_x or need_w or need_b):
            y, z = ops.linear_act_forward_z(x2d, weight, bias, act)
            y = y.view(*x.shape[:-1], n)
            saved = z
        else:
            y = ops.linear_act_forward(x2d, weight, bias, act).view(*x.shape[:-1], n)
            saved = y if act.saves == "y" else None
        ctx.save_for_backward(x2d if (need_w or need_b) else None, weight if need_x else None, saved)
        ctx.activation = act
        ctx.x_shape = x.shape
        ctx.n_out = n
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dy: torch.Tensor):
        x2d, weight, saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ops = _ops(dy)
        dy2d = dy.reshape(-1, ctx.n_out)
        s2d = saved.reshape(-1, ctx.n_out) if saved is not None else dy2d  # identity reads none
        dx = dw = db = None
        if need_x:
            dx = ops.linear_act_backward_input(dy2d, s2d, weight, ctx.activation)
            dx = dx.view(ctx.x_shape)
        if need_w or need_b:
            dw, db = ops.linear_act_backward_weight(dy2d, s2d, x2d, ctx.activation, need_b)
            dw = dw if need_w else None
        return dx, dw, db, None


class FNNFunction(torch.autograd.Function):
    """A whole feed-forward network as one autograd node.

    Forward: h_0 = X, h_l = act_l(Z_l), Z_l = h_{l-1} W_l^T + b_l. Saves X, every W_l and, per
    layer, one tensor S_l: h_l where act_l's derivative is read off its output; Z_l where it
    saves Z (gelu, gelu_tanh, silu, ...; see fnn.Activation), and then h_l is not kept: the
    next layer's weight-gradient kernel recomputes it on load as act_l(Z_l); h_l for a hidden
    identity layer (the next layer's input), nothing for an identity last layer. So a network
    saves as much as a sigmoid network of the same widths, whatever its activations.
    Backward, with D_L = dY * act_L'(Z_L) read off S_L:
        dW_l = D_l^T h_{l-1},   db_l = sum over rows of D_l,
        D_{l-1} = (D_l W_l) * act_{l-1}'(Z_{l-1}), read off S_{l-1} (in the epilogue of the dX kernel),
        dX = D_1 W_1.
    No elementwise kernel runs between layers. Call as
    `FNNFunction.apply(x, activations, w_1, b_1, ..., w_L, b_L)` (a bias may be None; an
    activation is a name or an fnn.Activation).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, activations: tuple[str | Activation, ...], *params
    ) -> torch.Tensor:
        weights, biases = params[0::2], params[1::2]
        acts = [as_activation(a) for a in activations]
        need = any(ctx.needs_input_grad)
        ops = _ops(x)
        x2d = h = x.reshape(-1, x.shape[-1])
        saved: list[torch.Tensor | None] = []
        n_layers = len(acts)
        for i, (w, b, act) in enumerate(zip(weights, biases, acts, strict=True)):
            if need and act.saves == "z":
                h, z = ops.linear_act_forward_z(h, w, b, act)
                saved.append(z)
            else:
                h = ops.linear_act_forward(h, w, b, act)
                keep = act.saves == "y" or (act.saves == "none" and i < n_layers - 1)
                saved.append(h if keep else None)
        out = h if x.dim() == 2 else h.view(*x.shape[:-1], h.shape[-1])  # a view only if needed
        if saved[-1] is h:
            saved[-1] = out  # the output itself, as autograd expects a saved output to be
        ctx.save_for_backward(x2d, *saved, *weights)
        ctx.activations = acts
        ctx.has_bias = [b is not None for b in biases]
        ctx.x_shape = x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dy: torch.Tensor):
        acts = ctx.activations
        n_layers = len(acts)
        saved = ctx.saved_tensors
        x2d = saved[0]
        ss = list(saved[1 : n_layers + 1])  # S_1..S_L (None where nothing is saved)
        weights = saved[n_layers + 1 :]
        needs = ctx.needs_input_grad
        need_w = [needs[2 + 2 * i] for i in range(n_layers)]
        need_b = [needs[3 + 2 * i] and ctx.has_bias[i] for i in range(n_layers)]
        n_out = weights[-1].shape[0]
        if ss[-1] is not None:
            ss[-1] = ss[-1].reshape(-1, n_out)
        g, g_act = dy.reshape(-1, n_out), acts[-1]
        ops = _ops(dy)
        grads: list[torch.Tensor | None] = [None] * (2 * n_layers)
        dx = None
        for i in reversed(range(n_layers)):
            s_i, w_i = ss[i], weights[i]
            s_i = g if g_act.saves == "none" or s_i is None else s_i  # never read then
            if need_w[i] or need_b[i]:
                if i == 0:
                    x_i, x_act = x2d, "identity"
                else:  # layer i's input: S_{i-1}, or act_{i-1}(S_{i-1}) when that is Z
                    x_i = ss[i - 1]
                    x_act = acts[i - 1] if acts[i - 1].saves == "z" else "identity"
                dw, db = ops.linear_act_backward_weight(g, s_i, x_i, g_act, need_b[i], None, x_act)
                grads[2 * i] = dw if need_w[i] else None
                grads[2 * i + 1] = db
            if i == 0:
                if needs[0]:
                    dx = ops.linear_act_backward_input(g, s_i, w_i, g_act).view(ctx.x_shape)
            elif needs[0] or any(need_w[:i]) or any(need_b[:i]):
                prev = acts[i - 1]
                g = ops.linear_act_backward_input(g, s_i, w_i, g_act, x=ss[i - 1], prev_activation=prev)
                g_act = as_activation("identity")  # g is now D_{i-1}: the delta is already applied
            else:
                break
        return (dx, None, *grads)


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | Activation = "sigmoid",
) -> torch.Tensor:
    """act(x @ weight^T + bias), a drop-in for `act(F.linear(x, weight, bias))`.

    x: (..., in_features) or (in_features,); weight: (out_features, in_features);
    bias: (out_features,) or None; activation: a name ("sigmoid", "relu", "tanh", "identity",
    "leaky_relu", "elu", "softplus", "gelu", "gelu_tanh", "silu", with torch's default
    parameters) or an fnn.Activation such as `Activation("leaky_relu", negative_slope=0.2)`.
    Returns (..., out_features) in x's dtype. Gradients flow to x, weight and bias:
    with D = dY * act'(Z), dx = D weight, dweight = D^T x, dbias = sum over rows of D
    (act' read off the saved output, or off the saved Z: see LinearActFunction).
    Under torch.autocast the tensors are first cast to the autocast dtype, as F.linear's are.
    """
    x, weight, bias = _autocast((x, weight, bias))
    if not _grad_needed((x, weight, bias)):  # inference: one kernel, nothing saved, no Z
        check_linear_args(x, weight, bias, activation)
        y = _ops(x).linear_act_forward(x.reshape(-1, x.shape[-1]), weight, bias, activation)
        return y.view(*x.shape[:-1], weight.shape[0])
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
    activations: Sequence[str | Activation],
) -> torch.Tensor:
    """Run a feed-forward network through FNNFunction (one autograd node for all layers).

    Layer l computes act_l(h @ weights[l]^T + biases[l]); every argument is checked first.
    The backward is FNNFunction's (D_l = dh_l * act_l'(Z_l), dW_l = D_l^T h_{l-1}, ...).
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
    if not _grad_needed((x, *weights, *biases)):  # inference: no autograd node, nothing saved
        ops, h = _ops(x), x.reshape(-1, x.shape[-1])
        for w, b, a in zip(weights, biases, activations, strict=True):
            h = ops.linear_act_forward(h, w, b, a)
        return h.view(*x.shape[:-1], h.shape[-1])
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    return FNNFunction.apply(x, tuple(activations), *params)
