"""fnn written with PyTorch ops only: the CPU fallback and the tests' oracle.

Two layers of it:
- `linear_act` and `fnn_forward` are plain differentiable PyTorch (autograd does the
  backward); tests run them in float64 as the ground truth.
- `linear_act_forward`, `linear_act_backward_input` and `linear_act_backward_weight` have
  the signatures of the Triton launchers in kernels.linear_act and implement the same
  delta rule with PyTorch ops; the autograd Functions call them on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels.checks import check_activation

_ACTIVATIONS = {
    "identity": lambda z: z,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "tanh": torch.tanh,
}


def activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """act(z) for an activation name."""
    return _ACTIVATIONS[check_activation(name)](z)


def delta(g: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
    """g * act'(z), with the derivative taken from the output y = act(z).

    sigmoid: y(1 - y); tanh: 1 - y^2; relu: 1 where y > 0 (0 where y <= 0); identity: 1.
    """
    check_activation(name)
    if name in ("sigmoid", "tanh") and g.dtype in (torch.float16, torch.bfloat16):
        # One rounding, as PyTorch's sigmoid/tanh backward and the kernels do, not one per op.
        return delta(g.float(), y.float(), name).to(g.dtype)
    if name == "sigmoid":
        return g * (1 - y) * y
    if name == "tanh":
        return g * (1 - y * y)
    if name == "relu":
        return torch.where(y <= 0, torch.zeros_like(g), g)
    return g


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "sigmoid",
) -> torch.Tensor:
    """act(F.linear(x, weight, bias)), differentiable by autograd."""
    return _ACTIVATIONS[check_activation(activation)](F.linear(x, weight, bias))


def fnn_forward(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
) -> torch.Tensor:
    """A feed-forward network: layer l computes act_l(h @ W_l^T + b_l)."""
    for w, b, a in zip(weights, biases, activations, strict=True):
        x = linear_act(x, w, b, a)
    return x


# The op interface shared with kernels.linear_act: 2-D tensors, no autograd.


def linear_act_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    """Y = act(x @ weight^T + bias) for a 2-D x."""
    return linear_act(x, weight, bias, activation)


def linear_act_backward_input(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    activation: str,
    x: torch.Tensor | None = None,
    prev_activation: str = "identity",
) -> torch.Tensor:
    """dX = (dy * act'(y)) @ weight; times prev_act'(x) when `prev_activation` is given."""
    dx = delta(dy, y, activation) @ weight
    if check_activation(prev_activation, "prev_activation") != "identity":
        dx = delta(dx, x, prev_activation)
    return dx


def linear_act_backward_weight(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    activation: str,
    need_bias: bool,
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dW = D^T @ x and db = sum of D over rows (if `need_bias`), D = dy * act'(y).

    `split` is accepted for signature parity with the kernel launcher and ignored.
    """
    d = delta(dy, y, activation)
    return d.t() @ x, (d.sum(0) if need_bias else None)
