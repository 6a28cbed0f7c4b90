"""Converting existing PyTorch models to fused layers."""

from __future__ import annotations

from torch import nn

from kernels.checks import Activation

from .modules import FusedLinear
from .plan import has_hooks


def _activation_of(module: nn.Module) -> str | Activation | None:
    """The fnn activation that computes exactly what `module` does, or None.

    Exact classes only (a subclass may change forward). In-place variants compute the same
    values: the linear output they would overwrite never exists outside the kernel.
    """
    kind = type(module)
    try:
        if kind is nn.Sigmoid:
            return "sigmoid"
        if kind is nn.Tanh:
            return "tanh"
        if kind is nn.ReLU:
            return "relu"
        if kind is nn.SiLU:
            return "silu"
        if kind is nn.GELU:
            return Activation("gelu", approximate=module.approximate)
        if kind is nn.LeakyReLU:
            return Activation("leaky_relu", negative_slope=module.negative_slope)
        if kind is nn.ELU:
            return Activation("elu", alpha=module.alpha)
        if kind is nn.Softplus:
            return Activation("softplus", beta=module.beta, threshold=module.threshold)
    except (TypeError, ValueError):  # a parameter fnn cannot take (a tensor, NaN, beta 0, ...)
        return None
    return None


def fuse(module: nn.Module) -> nn.Module:
    """Fuse every `nn.Linear` directly followed by an activation fnn computes exactly (nn.Sigmoid,
    nn.ReLU, nn.Tanh, nn.SiLU, nn.GELU with approximate "none" or "tanh", nn.LeakyReLU,
    nn.ELU, nn.Softplus, parameters included) inside an `nn.Sequential` (at any depth of
    `module`) into one FusedLinear; returns `module`.

    Works in place: the Sequential's Linear entry becomes a FusedLinear that holds the same
    Parameter objects (`FusedLinear.from_linear`), and the activation entry becomes nn.Identity.
    Indices and parameter names therefore stay as they were: `fuse(model).state_dict()` loads
    into an unfused copy of the model and the other way round, and an optimizer built before
    fusing keeps training the model. Outputs and gradients are those of the unfused model
    (y = act(x W^T + b); with D = dy * act'(z): dx = D W, dW = D^T x, db = sum over rows of D),
    up to rounding.

    - A pair at the end of a Sequential is fused too (nothing needs to follow it).
    - In-place variants (nn.ReLU(inplace=True), nn.ELU(inplace=True), ...) are fused like the
      others: the linear output they would overwrite never exists outside the kernel.
    - Only exact nn.Linear and activation classes are fused (subclasses may change forward),
      and only with parameters fnn takes (finite numbers; softplus's beta not 0): any other
      module, or a pair split across two Sequentials or outside any Sequential, stays as it is.
      So does a pair with a hook on either module (a fused pair would never call them), and a
      Linear whose weight or bias is not its own Parameter (torch.nn.utils.weight_norm and
      spectral_norm recompute the weight before each call) or that has an empty dimension.
    - All or nothing: the pairs are found first, then replaced.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fuse needs an nn.Module, got {type(module).__name__}")
    pairs = []
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for name, next_name in zip(names[:-1], names[1:], strict=True):
            linear, act = seq._modules[name], seq._modules[next_name]
            if not _plain_linear(linear) or has_hooks(act):
                continue
            activation = _activation_of(act)
            if activation is not None:
                pairs.append((seq, name, next_name, FusedLinear.from_linear(linear, activation)))
    for seq, name, next_name, fused in pairs:
        setattr(seq, name, fused)
        setattr(seq, next_name, nn.Identity())
    return module


def _plain_linear(module: nn.Module) -> bool:
    """An exact nn.Linear, without hooks, that holds its weight (and bias, if any) as its own
    Parameters, with no empty dimension: what FusedLinear computes exactly."""
    if type(module) is not nn.Linear or has_hooks(module):
        return False
    params = module._parameters
    weight = params.get("weight")
    if type(weight) is not nn.Parameter or weight.dim() != 2 or 0 in weight.shape:
        return False
    bias = module.bias
    return bias is None or (type(params.get("bias")) is nn.Parameter and params["bias"] is bias)
