"""Where an fnn call runs, decided in one place.

Backends, chosen per call from the input's device (never at import time; `backend`):
- CUDA tensors run the compiled Triton kernels (kernels.linear_act, kernels.network);
- CPU tensors run the same kernels in Triton's interpreter when TRITON_INTERPRET=1 is set;
- otherwise CPU tensors (and meta tensors) run fnn.reference, the same maths in PyTorch ops.

How a kernel is reached (`use_registered_ops`): in plain eager mode fnn's autograd Functions
call the launchers directly (kernels.linear_act's unchecked entries: the public entry has
already checked the arguments once). While torch.compile traces, under a
TorchDispatchMode (FakeTensorMode, FlopCounterMode, a tracer's proxy mode, ...) or a functorch
transform, they call the registered operators instead (fnn.ops, fnn.network_ops:
`torch.ops.fnn.*`), so a compiled graph holds one opaque node per kernel and a mode sees the
op whole. Both routes run the same launchers with the same arguments.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["FORCE_BACKEND", "backend", "layer_ops", "use_registered_ops"]

# Set by bench.fakecuda.compile_only: every device is served by the compiled kernels (which
# are then compiled for a GPU target and never launched). None in normal use.
FORCE_BACKEND: str | None = None

_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active


def backend(device: torch.device | str) -> str:
    """Which implementation serves tensors on `device`: "triton", "interpreter" or "reference"."""
    if FORCE_BACKEND is not None:
        return FORCE_BACKEND
    device = torch.device(device) if device.__class__ is not torch.device else device
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter"
    return "reference"


def use_registered_ops() -> bool:
    """Whether fnn calls its kernels through the registered `torch.ops.fnn.*` (torch.compile
    tracing, a TorchDispatchMode or a functorch transform active) rather than directly."""
    return _is_compiling() or _dispatch_modes() > 0 or _functorch_active()


_any_autocast = torch._C._is_any_autocast_enabled


def autocast_on(x: torch.Tensor) -> bool:
    """Whether torch.autocast is on for x's device (asked of CPU and CUDA tensors only:
    torch.is_autocast_enabled raises for others, e.g. meta)."""
    return _any_autocast() and autocast_for(x.device.type)


def autocast_for(device_type: str) -> bool:
    """Whether torch.autocast is on for a device type (CPU and CUDA; False for any other)."""
    return device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)


def _reference_call(name: str):
    """fnn.reference's `name`, run with autocast off: it computes in its inputs' dtype, as the
    kernels do (autocast would recast its PyTorch ops)."""

    def call(*args: Any, **kwargs: Any):
        from . import reference

        fn = getattr(reference, name)
        if autocast_on(args[0]):
            with torch.autocast(args[0].device.type, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    call.__name__ = name
    return call


def _keep(dy: torch.Tensor, s: torch.Tensor, activation: Any) -> tuple:
    """`delta_once` where each backward call forms its own D (fnn.reference, the registered
    ops): the arguments unchanged."""
    return dy, s, activation


_REFERENCE = SimpleNamespace(
    delta_once=_keep,
    linear_act_forward=_reference_call("linear_act_forward"),
    linear_act_forward_z=_reference_call("linear_act_forward_z"),
    linear_act_backward_input=_reference_call("linear_act_backward_input"),
    linear_act_backward_weight=_reference_call("linear_act_backward_weight"),
    linear_act_backward=_reference_call("linear_act_backward"),
)
_KERNELS: SimpleNamespace | None = None


def _kernels() -> SimpleNamespace:
    """kernels.linear_act's unchecked entries under the launchers' names and signatures
    (imported on first use: importing the kernels imports triton)."""
    global _KERNELS
    if _KERNELS is None:
        from kernels import linear_act as k

        _KERNELS = SimpleNamespace(
            delta_once=k.delta_once,
            linear_act_forward=k.forward_unchecked,
            linear_act_forward_z=k.forward_z_unchecked,
            linear_act_backward_input=k.backward_input_unchecked,
            linear_act_backward_weight=k.backward_weight_unchecked,
            linear_act_backward=k.backward_unchecked,
        )
    return _KERNELS


def layer_ops(device: torch.device) -> Any:
    """The per-layer functions for tensors on `device`, with kernels.linear_act's launcher
    names and signatures (linear_act_forward, linear_act_forward_z, linear_act_backward_input,
    linear_act_backward_weight, linear_act_backward (dX, dW and db from one kernel, for the
    layers kernels.configs.fused_backward_fits), and delta_once: a heavy activation's D formed
    once for a backward that launches both dX and dW), for arguments fnn has checked: fnn.ops
    (the registered ops) when `use_registered_ops()`, else the kernels' unchecked launchers or
    fnn.reference."""
    if _is_compiling() or _dispatch_modes() > 0 or _functorch_active():
        from . import ops

        return ops
    if backend(device) == "reference":
        return _REFERENCE
    return _KERNELS if _KERNELS is not None else _kernels()
