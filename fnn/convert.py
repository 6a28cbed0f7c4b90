"""Converting existing PyTorch models to fused layers."""

from __future__ import annotations

from torch import nn

from .modules import FusedLinear

# Activation modules a Linear can be fused with, and the activation name FusedLinear takes.
_FUSABLE: dict[type[nn.Module], str] = {nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.Tanh: "tanh"}


def fuse(module: nn.Module) -> nn.Module:
    """Fuse every `nn.Linear` directly followed by `nn.Sigmoid`, `nn.ReLU` or `nn.Tanh` inside an
    `nn.Sequential` (at any depth of `module`) into one FusedLinear; returns `module`.

    Works in place: the Sequential's Linear entry becomes a FusedLinear that holds the same
    Parameter objects (`FusedLinear.from_linear`), and the activation entry becomes nn.Identity.
    Indices and parameter names therefore stay as they were: `fuse(model).state_dict()` loads
    into an unfused copy of the model and the other way round, and an optimizer built before
    fusing keeps training the model. Outputs and gradients are those of the unfused model
    (y = act(x W^T + b); with D = dy * act'(y): dx = D W, dW = D^T x, db = sum over rows of D),
    up to rounding.

    - A pair at the end of a Sequential is fused too (nothing needs to follow it).
    - nn.ReLU(inplace=True) is fused like nn.ReLU(): the linear output it would overwrite never
      exists outside the kernel.
    - Only exact nn.Linear, nn.Sigmoid, nn.ReLU and nn.Tanh instances are fused (subclasses may
      change forward); pairs split across two Sequentials or outside any Sequential stay as
      they are, and so do hooks: those registered on a fused Linear or activation are dropped.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fuse needs an nn.Module, got {type(module).__name__}")
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for name, next_name in zip(names[:-1], names[1:], strict=True):
            linear, act = seq._modules[name], seq._modules[next_name]
            if type(linear) is nn.Linear and type(act) in _FUSABLE:
                setattr(seq, name, FusedLinear.from_linear(linear, _FUSABLE[type(act)]))
                setattr(seq, next_name, nn.Identity())
    return module
