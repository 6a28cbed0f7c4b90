"""fnn written with PyTorch ops only: the CPU fallback and the tests' oracle.

Two layers of it:
- `linear_act` and `fnn_forward` are plain differentiable PyTorch (autograd does the
  backward); tests run them in float64 as the ground truth.
- `linear_act_forward`, `linear_act_backward_input`, `linear_act_backward_weight` and
  `linear_act_backward` have the signatures of the Triton launchers in kernels.linear_act and
  implement the same delta rule with PyTorch ops; the autograd Functions call them on CPU
  tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels.checks import Activation, as_activation

_LOWP = (torch.float16, torch.bfloat16)


def apply_activation(z: torch.Tensor, act: str | Activation) -> torch.Tensor:
    """act(z) for an activation name or fnn.Activation (parameters included), by torch's own
    functions: torch.sigmoid, torch.relu, torch.tanh, F.leaky_relu, F.elu, F.softplus, F.gelu
    (approximate "none" or "tanh") and F.silu."""
    a = as_activation(act)
    name = a.name
    if name == "identity":
        return z
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "relu":
        return torch.relu(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "leaky_relu":
        return F.leaky_relu(z, a.negative_slope)
    if name == "elu":
        return F.elu(z, a.alpha)
    if name == "softplus":
        return F.softplus(z, a.beta, a.threshold)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return F.silu(z)


activation = apply_activation  # the former name


def delta(g: torch.Tensor, s: torch.Tensor, act: str | Activation) -> torch.Tensor:
    """g * act'(z), read off s, what the forward saved for `act` (Activation.saves): the output
    y = act(z), or z itself.

    From y: sigmoid y(1 - y); tanh 1 - y^2; relu 1 where y > 0 (0 where y <= 0); leaky_relu 1
    where y > 0, else the slope; elu 1 where y > 0, else y + alpha; softplus 1 where beta*y >
    threshold, else 1 - exp(-beta*y). From z: gelu, gelu_tanh, silu, and leaky_relu (slope < 0),
    elu (alpha < 0), softplus (small thresholds) as torch's backward computes them. identity: 1.
    PyTorch's own backward functions (torch.ops.aten.*_backward) where they exist, so half
    precision rounds once, as PyTorch's does.
    """
    a = as_activation(act)
    name, from_y = a.name, a.saves == "y"
    aten = torch.ops.aten
    if name == "identity":
        return g
    if name == "sigmoid":
        return aten.sigmoid_backward(g, s)
    if name == "tanh":
        return aten.tanh_backward(g, s)
    if name == "relu":
        return aten.threshold_backward(g, s, 0)
    if name == "leaky_relu":
        return aten.leaky_relu_backward(g, s, a.negative_slope, from_y)
    if name == "elu":
        return aten.elu_backward(g, a.alpha, 1, 1, from_y, s)
    if name == "softplus":
        if not from_y:
            return aten.softplus_backward(g, s, a.beta, a.threshold)
        if g.dtype in _LOWP:  # one rounding, as PyTorch's backward functions
            return delta(g.float(), s.float(), a).to(g.dtype)
        t = s * a.beta
        return torch.where(t > a.threshold, g, g * -torch.expm1(-t))
    if name == "gelu":
        return aten.gelu_backward(g, s)
    if name == "gelu_tanh":
        return aten.gelu_backward(g, s, approximate="tanh")
    return aten.silu_backward(g, s)


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | Activation = "sigmoid",
) -> torch.Tensor:
    """act(F.linear(x, weight, bias)), differentiable by autograd."""
    return apply_activation(F.linear(x, weight, bias), activation)


def fnn_forward(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str | Activation],
) -> torch.Tensor:
    """A feed-forward network: layer l computes act_l(h @ W_l^T + b_l)."""
    for w, b, a in zip(weights, biases, activations, strict=True):
        x = linear_act(x, w, b, a)
    return x


# The op interface shared with kernels.linear_act: 2-D tensors, no autograd.


def linear_act_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | Activation
) -> torch.Tensor:
    """Y = act(x @ weight^T + bias) for a 2-D x."""
    return linear_act(x, weight, bias, activation)


def linear_act_forward_z(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | Activation
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, Z): Y = act(Z), Z = x @ weight^T + bias."""
    z = F.linear(x, weight, bias)
    return apply_activation(z, activation), z


def linear_act_backward_input(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    activation: str | Activation,
    x: torch.Tensor | None = None,
    prev_activation: str | Activation = "identity",
) -> torch.Tensor:
    """dX = delta(dy, y) @ weight; then delta(dX, x) for `prev_activation` when it is not
    identity (`y`, `x`: what the forward saved, see `delta`)."""
    dx = delta(dy, y, activation) @ weight
    prev = as_activation(prev_activation, "prev_activation")
    if prev.name != "identity":
        dx = delta(dx, x, prev)
    return dx


def linear_act_backward_weight(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    activation: str | Activation,
    need_bias: bool,
    split: int | None = None,
    x_activation: str | Activation = "identity",
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dW = D^T @ X and db = sum of D over rows (if `need_bias`), D = delta(dy, y); X = x, or
    x_activation(x) (the layer input recomputed from the previous layer's Z). `rows`: each
    slice of that many consecutive rows' own dW and db, (M / rows, N, K) and (M / rows, N).

    `split` is accepted for signature parity with the kernel launcher and ignored.
    """
    d = delta(dy, y, activation)
    xs = apply_activation(x, x_activation)
    if rows is not None:
        d = d.reshape(-1, rows, d.shape[-1])
        return d.transpose(1, 2) @ xs.reshape(-1, rows, xs.shape[-1]), (d.sum(1) if need_bias else None)
    return d.t() @ xs, (d.sum(0) if need_bias else None)


def linear_act_backward(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    x: torch.Tensor,
    activation: str | Activation,
    need_bias: bool,
    prev_activation: str | Activation = "identity",
    split: int | None = None,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dX, dW, db): linear_act_backward_input(dy, y, weight, activation, x, prev_activation)
    and linear_act_backward_weight(dy, y, x, activation, need_bias, rows=rows), `x` being the
    layer input (the previous layer's output where `prev_activation` is given). `split` is
    ignored."""
    dx = linear_act_backward_input(dy, y, weight, activation, x, prev_activation)
    return (dx, *linear_act_backward_weight(dy, y, x, activation, need_bias, rows=rows))
