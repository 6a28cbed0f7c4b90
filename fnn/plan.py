"""What an FNN's calls need that changes only when its layers change: made once, checked cheaply.

An FNN's forward, its whole-network path and the fused Trainer step all need the network's
widths, its activations (as fnn.Activation objects and as names), which layers have a bias,
whether the widths fit the whole-network kernels, the padded width, the `meta` tensor on each
device, the `act_params` tensor per dtype and device, the activation set of the network
kernels (`bits`), what the output layer saves, and the expected shape of each parameter.
Rebuilding those from the ModuleList on every call costs more than the rest of a small call
(nn.Module attribute lookups, a list per property access), so `plan(model)` keeps them in an
FNNPlan and reuses it while the model's layers are the same objects with the same activations
and its `fusion` is unchanged (a tuple comparison per call). Parameters are not part of the
plan: they may be replaced at any time (load_state_dict(assign=True), FSDP2, functional_call),
so each call reads them and checks them (`flat_views`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

from kernels.checks import Activation, act_set, as_activation

__all__ = ["FNNPlan", "flat_views", "global_hooks", "has_hooks", "must_call", "plan", "parameters"]

MAX_WIDTH = 128  # kernels.network.MAX_WIDTH (this module imports no triton)
_is_compiling = torch.compiler.is_compiling
_Parameter, _Tensor = nn.Parameter, torch.Tensor
FUSIONS = ("auto", "layer", "network")


class FNNPlan:
    """The call plan of one FNN (see the module docstring). Read-only after construction."""

    __slots__ = (
        "layers",
        "activation_attrs",
        "fusion",
        "sizes",
        "acts",
        "saves",
        "names",
        "biased",
        "has_bias",
        "bits",
        "last_saves",
        "fits",
        "padded",
        "shapes",
        "param_specs",
        "metas",
        "act_tensors",
        "param_dicts",
        "programs",
        "hook_dicts",
        "model_hook_dicts",
        "unplanned",
    )

    def __init__(self, layers: tuple, activation_attrs: tuple, fusion: object, model: nn.Module) -> None:
        check_layers(layers)
        self.layers = layers  # the FusedLinear objects, in order
        # (each layer's `activation` attribute, whether it has no bias, its weight's shape (None
        # without a weight Parameter of its own)), as read: see `plan`
        self.activation_attrs = activation_attrs
        self.fusion = fusion  # the model's `fusion` attribute, as read (validated by its user)
        shapes = [shape for _, _, shape in activation_attrs]
        # A layer whose weight is not its own Parameter (torch.nn.utils.parametrize computes it
        # on access) or is not 2-D: the FNN calls its layers (`calls_layers`), whose own checks
        # and forward serve it.
        self.unplanned = any(shape is None or len(shape) != 2 for shape in shapes) or any(
            parametrize.is_parametrized(layer) for layer in layers
        )
        if self.unplanned:
            sizes = [layers[0].in_features] + [layer.out_features for layer in layers]
        else:  # the weights' shapes: what the kernels read (in/out_features may be stale)
            sizes = [shapes[0][1]] + [shape[0] for shape in shapes]
        self.sizes: tuple[int, ...] = tuple(sizes)
        self.acts: tuple[Activation, ...] = tuple(as_activation(a) for a, _, _ in activation_attrs)
        self.saves: tuple[str, ...] = tuple(a.saves for a in self.acts)  # what each layer saves
        self.names: tuple[str, ...] = tuple(a.name for a in self.acts)
        self.biased: tuple[bool, ...] = tuple(not no_bias for _, no_bias, _ in activation_attrs)
        self.has_bias = any(self.biased)
        self.bits = act_set(self.acts)  # the network kernels' activation set
        self.last_saves = self.saves[-1]  # what the output layer keeps for the backward
        self.fits = max(sizes) <= MAX_WIDTH
        p = 16
        while p < max(sizes):
            p *= 2
        self.padded = p
        # Each parameter's shape, in the flat buffer's order: every weight, then every bias.
        self.shapes: tuple[tuple[int, ...], ...] = (
            *((o, i) for i, o in zip(sizes[:-1], sizes[1:], strict=True)),
            *((o,) for o, b in zip(sizes[1:], self.biased, strict=True) if b),
        )
        self.param_dicts = tuple(layer._parameters for layer in layers)  # each layer's own dict
        # Per parameter the layers have: (its index in [w_1, b_1, ..., w_L, b_L], its layer's
        # parameter dict, its name there, its shape).
        self.param_specs: tuple[tuple, ...] = tuple(
            (2 * layer + j, self.param_dicts[layer], name, shape)
            for layer, (i, o, b) in enumerate(zip(sizes[:-1], sizes[1:], self.biased, strict=True))
            for j, (name, shape) in enumerate((("weight", (o, i)), ("bias", (o,) if b else None)))
            if shape is not None
        )
        self.metas: dict[torch.device, torch.Tensor] = {}
        self.act_tensors: dict[tuple, torch.Tensor] = {}
        self.programs: dict[tuple, object] = {}  # the layer path's launch programs (fnn.programs)
        self.hook_dicts = tuple(d for layer in layers for d in _hook_dicts(layer))  # see calls_layers
        self.model_hook_dicts = _hook_dicts(model)  # the FNN's own (the Trainer's fused step checks them)

    def meta(self, device: torch.device) -> torch.Tensor:
        """The network kernels' int32 `meta` on `device` (fnn.network_ops.meta, cached)."""
        t = self.metas.get(device)
        if t is None:
            from .network_ops import meta

            t = self.metas[device] = meta(self.sizes, self.acts, self.biased, device)
        return t

    def act_params(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The network kernels' (L, 2) `act_params` for a `dtype` network on `device`
        (fnn.network_ops.activation_params, cached)."""
        key = (dtype, device)
        t = self.act_tensors.get(key)
        if t is None:
            from .network_ops import activation_params

            t = self.act_tensors[key] = activation_params(self.acts, dtype, device)
        return t

    def calls_layers(self) -> bool:
        """Whether the FNN calls its layers one by one, as an nn.Sequential of them would (the
        usual path reads the layers' parameters and never calls them): a layer has a forward,
        forward-pre or backward hook of its own, or a global module hook is registered (module
        trackers, FLOP counters), which runs for a layer only if the layer is called, or a
        weight is not its layer's own Parameter (`unplanned`)."""
        return self.unplanned or any(self.hook_dicts) or global_hooks()

    def parameters(self) -> list[torch.Tensor | None]:
        """The layers' current parameters, [w_1, b_1, ..., w_L, b_L] (None for no bias), read
        from each layer's parameter dict, as nn.Module's attribute lookup finds them, without
        its Python __getattr__."""
        return [d.get(name) for d in self.param_dicts for name in ("weight", "bias")]


def check_layers(layers: tuple) -> None:
    """An FNN's layers (`model.layers`, which users may edit): at least one, each a
    FusedLinear; else a ValueError or TypeError that says so."""
    from .modules import FusedLinear  # fnn.modules imports this module

    if not layers:
        raise ValueError("FNN: model.layers is empty; an FNN needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, FusedLinear):
            raise TypeError(
                f"FNN: layers[{i}] is a {type(layer).__name__}; an FNN's layers must be fnn.FusedLinear "
                "(fnn.FusedLinear.from_linear converts an nn.Linear, fnn.fuse a model's Linear + "
                "activation pairs)"
            )


def _hook_dicts(module: nn.Module) -> tuple:
    """A module's own hook dicts (nn.Module fills them in place: the same objects for its life)."""
    return (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
    )


def has_hooks(module: nn.Module) -> bool:
    """Whether `module` has a forward, forward-pre or backward hook of its own."""
    return any(_hook_dicts(module))


# nn.Module's global hooks (torch.nn.modules.module.register_module_forward_hook and its
# siblings), which apply to every module call: dicts that torch fills and empties in place.
_G_FORWARD = _module._global_forward_hooks
_G_FORWARD_PRE = _module._global_forward_pre_hooks
_G_BACKWARD = _module._global_backward_hooks
_G_BACKWARD_PRE = _module._global_backward_pre_hooks


def global_hooks() -> bool:
    """Whether a global forward, forward-pre or backward module hook is registered."""
    return bool(_G_FORWARD or _G_FORWARD_PRE or _G_BACKWARD or _G_BACKWARD_PRE)


def must_call(layer: nn.Module) -> bool:
    """Whether an FNN must call `layer` rather than read its parameters (FNNPlan.calls_layers,
    for the traced forward, which has no plan): hooks (its own or global ones), or a
    parametrized weight or bias."""
    return has_hooks(layer) or global_hooks() or parametrize.is_parametrized(layer)


def plan(model: nn.Module) -> FNNPlan:
    """The FNN's plan: the cached one while its layers, their activations, which of them have
    a bias, their weights' shapes and its fusion are those it was made from, else a new one
    (which then replaces it). A layer resized in place gets a new plan; so does one that
    torch.nn.utils.parametrize takes over (its weight, or bias, leaves `_parameters`)."""
    layers = tuple(model._modules["layers"]._modules.values())
    try:
        attrs = tuple(
            [
                (
                    layer.activation,
                    (d := layer._parameters).get("bias") is None,
                    getattr(d.get("weight"), "shape", None),
                )
                for layer in layers
            ]
        )
    except AttributeError:  # a layer that is not a FusedLinear (no `activation`)
        check_layers(layers)
        raise
    fusion = model.__dict__.get("fusion")
    p = model.__dict__.get("_fnn_plan")
    if p is not None and p.layers == layers and p.activation_attrs == attrs and p.fusion == fusion:
        return p
    p = FNNPlan(layers, attrs, fusion, model)
    model.__dict__["_fnn_plan"] = p
    return p


def parameters(p: FNNPlan) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The layers' current weights and biases (FNNPlan.parameters, split)."""
    params = p.parameters()
    return params[0::2], params[1::2]


def flat_views(
    p: FNNPlan, flat: torch.Tensor | None, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> bool:
    """Whether the parameters are exactly the contiguous views of `flat` in the kernels' layout
    (each weight then each bias, back to back, with the plan's shapes and flat's dtype, plain
    tensors). Equal addresses also mean the same device (CUDA's unified addressing; a meta
    tensor has address 0). A few attribute reads per parameter; never while torch.compile
    traces."""
    if flat is None or _is_compiling():
        return False
    dtype, size = flat.dtype, flat.element_size()
    start = addr = flat.data_ptr()
    params = [*weights, *(b for b in biases if b is not None)] if p.has_bias else weights
    if len(params) != len(p.shapes):
        return False
    try:
        for t, shape in zip(params, p.shapes, strict=True):
            if (
                (t.__class__ is not _Parameter and t.__class__ is not _Tensor)
                or t.data_ptr() != addr
                or t.dtype is not dtype
                or t.shape != shape
                or not t.is_contiguous()
            ):
                return False
            addr += t.numel() * size
    except RuntimeError:  # a tensor without storage (functorch's wrappers): not a view
        return False
    return addr == start + flat.numel() * size and flat.is_contiguous()
