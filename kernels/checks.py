"""Argument checks shared by the Triton launchers and the PyTorch fallback.

Pure PyTorch: importing this module never imports triton, so the CPU fallback and its
error messages work on machines without triton.
"""

from __future__ import annotations

import torch

# Name -> the integer the kernels take as their ACTIVATION constexpr.
ACTIVATIONS: dict[str, int] = {"identity": 0, "sigmoid": 1, "relu": 2, "tanh": 3}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_activation(activation: object, what: str = "activation") -> str:
    """Return `activation` if it names a known activation, else raise."""
    if not isinstance(activation, str):
        raise TypeError(
            f"{what} must be a string, one of {sorted(ACTIVATIONS)}; got {type(activation).__name__}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown {what} {activation!r}; known activations: {sorted(ACTIVATIONS)}")
    return activation


def _check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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
    _check_tensor(x, "x")
    _check_tensor(weight, "weight")
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
        _check_tensor(bias, "bias")
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
