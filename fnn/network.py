"""The whole-network path: a narrow network (every width <= 128) run by one kernel.

The kernels read the parameters packed into zero-padded buffers (kernels.network's layout):
weights (L, P, P), biases (L, P). An FNN on this path keeps its parameters as *views* of its
packed buffers (`ensure_packed`), so the registered ops (fnn.network_ops) read the buffers
without copying, and an in-place update of the buffers (the fused Trainer step) is an update
of `model.parameters()`, which stay the source of truth. The FNN restores that arrangement
after whatever may replace its parameters' storage (`to()`, `load_state_dict`, deepcopy,
unpickling: `sync_pack`). Where the parameters are not such views (FSDP's gathered
parameters, `torch.func.functional_call`, a parameter the user replaced), the ops pack them
on the fly: correct, at the cost of a copy per call. A forward never changes a module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

from kernels.checks import check_linear_args

from . import network_ops
from .functional import backend
from .network_ops import NetworkPack, find_pack, meta, pack_parameters, padded_width, register_pack

__all__ = [
    "NetworkFunction",
    "NetworkPack",
    "check_fusion",
    "ensure_packed",
    "fits_network",
    "network_forward",
    "pack_parameters",
    "padded_width",
    "resolve_fusion",
    "sync_pack",
]

FUSIONS = ("auto", "layer", "network")
MAX_WIDTH = 128  # kernels.network.MAX_WIDTH, repeated here so this module imports no triton


def fits_network(sizes: Sequence[int]) -> bool:
    """Whether `fusion="network"` serves these widths: all of them <= 128."""
    return max(sizes) <= MAX_WIDTH


def check_fusion(fusion: object, sizes: Sequence[int]) -> str:
    """Validate a `fusion` argument against the network's widths."""
    if not isinstance(fusion, str):
        raise TypeError(f"fusion must be a string, one of {FUSIONS}; got {type(fusion).__name__}")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}")
    if fusion == "network" and not fits_network(sizes):
        raise ValueError(
            f'fusion="network" serves networks whose widths are all <= {MAX_WIDTH}; sizes '
            f'{list(sizes)} have width {max(sizes)}. Use fusion="layer" (or "auto").'
        )
    return fusion


def resolve_fusion(fusion: str, sizes: Sequence[int], device: torch.device | str) -> str:
    """The path an FNN takes: "layer" or "network".

    "auto" is a heuristic, PROVISIONAL until benchmarked on a GPU: the whole-network kernel
    when every width is <= 128 and the tensors are on CUDA, the per-layer kernels otherwise
    (in the interpreter too, where launches cost nothing worth saving). Where the backend is
    fnn.reference (CPU without TRITON_INTERPRET=1) both paths run the reference.
    """
    check_fusion(fusion, sizes)
    if fusion == "auto":
        return "network" if fits_network(sizes) and backend(device) == "triton" else "layer"
    return fusion


def _plain(t: torch.Tensor | None) -> bool:
    return t is None or type(t) is nn.Parameter or type(t) is torch.Tensor


def _views_hold(model: nn.Module, pack: NetworkPack | None) -> bool:
    """Whether every parameter of the FNN is still its slice of `pack`."""
    if pack is None:
        return False
    layers = model.layers
    return find_pack([layer.weight for layer in layers], [layer.bias for layer in layers]) is pack


def ensure_packed(model: nn.Module) -> NetworkPack | None:
    """The packed buffers of an FNN, its parameters made views of them first if they are not
    (or no longer) such views: a new zero-padded pack receives their values, and each
    parameter's `.data` is pointed at its slice. The Parameter objects stay the same, so
    optimizers and hooks holding them see no change.

    Returns None, packing nothing, where the parameters are not plain tensors of a real
    device (FSDP's DTensors, fake or meta tensors) or while torch.compile traces: there the
    ops pack on the fly instead. FNN calls it (through `sync_pack`) on construction, after
    `to()`/`cuda()`/`half()`, `load_state_dict`, `copy.deepcopy` and unpickling, and so does
    the Trainer's fused step; a forward never does."""
    if torch.compiler.is_compiling():
        return None
    pack: NetworkPack | None = model.__dict__.get("_network_pack")
    if _views_hold(model, pack):
        return pack
    layers = model.layers
    weights = [layer.weight for layer in layers]
    biases = [layer.bias for layer in layers]
    if not all(_plain(t) for t in (*weights, *biases)) or weights[0].device.type == "meta":
        return None
    pack = pack_parameters(weights, biases)
    with torch.no_grad():
        for li, layer in enumerate(layers):
            o, i = layer.weight.shape
            layer.weight.data = pack.w[li, :o, :i]
            if layer.bias is not None:
                layer.bias.data = pack.b[li, :o]
    register_pack(pack)
    model.__dict__["_network_pack"] = pack
    meta(pack.sizes, model.activations, pack.w.device)  # made now, not during a CUDA-graph capture
    return pack


def wants_pack(model: nn.Module) -> bool:
    """Whether an FNN's forward takes the whole-network path on its parameters' device."""
    device = model.layers[0].weight.device
    return resolve_fusion(model.fusion, model.sizes, device) == "network" and backend(device) != "reference"


def sync_pack(model: nn.Module) -> None:
    """After anything that may have replaced an FNN's parameters or changed its path: pack
    them when the model takes the network path, else drop a pack they no longer view (it
    would only hold memory)."""
    if wants_pack(model):
        ensure_packed(model)
    elif not _views_hold(model, model.__dict__.get("_network_pack")):
        model.__dict__.pop("_network_pack", None)


class NetworkFunction(torch.autograd.Function):
    """A whole network as one autograd node and one kernel per direction (fnn.network_ops).

    Forward: h_0 = X, h_{l+1} = act_l(h_l W_l^T + b_l), in one launch; saves X, the output
    and (only when a gradient is needed) the hidden outputs h_1..h_{L-1}.
    Backward, one launch when the batch fits one program (else two, the second summing the
    per-program partial gradients in a fixed order), with D_{L-1} = dY * act'(Y):
        dW_l = D_l^T h_l,   db_l = sum over rows of D_l,
        D_{l-1} = (D_l W_l) * act_{l-1}'(h_l),   dX = D_0 W_0.
    Call as `NetworkFunction.apply(x, activations, w_1, b_1, ..., w_L, b_L)` (a bias may be
    None). The ops read the packed buffers the parameters are views of, or pack them.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, activations: tuple[str, ...], *params):
        weights, biases = list(params[0::2]), list(params[1::2])
        x2d = x.reshape(-1, x.shape[-1])
        need = any(ctx.needs_input_grad)
        y, h = network_ops.network_forward(x2d, weights, biases, activations, need)
        ctx.save_for_backward(x2d, y, h, *weights)
        ctx.activations = activations
        ctx.biased = [b is not None for b in biases]
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dy: torch.Tensor):
        x2d, y, h, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dws, dbs = network_ops.network_backward(
            dy.reshape(-1, y.shape[-1]), y, h, x2d, weights, ctx.activations, ctx.biased, needs[0]
        )
        grads: list[torch.Tensor | None] = []
        for li, (dw, db) in enumerate(zip(dws, dbs, strict=True)):
            grads.append(dw if needs[2 + 2 * li] else None)
            grads.append(db if needs[3 + 2 * li] else None)
        return (dx.view(ctx.x_shape) if dx is not None else None, None, *grads)


def check_network_args(
    x: object,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
) -> None:
    """Every layer checked as fnn.functional.fnn_forward checks it, plus the width limit."""
    if not (len(weights) == len(biases) == len(activations)) or not weights:
        raise ValueError(
            f"network_forward: need one weight, bias and activation per layer, got "
            f"{len(weights)} weights, {len(biases)} biases, {len(activations)} activations"
        )
    for i, (w, b, a) in enumerate(zip(weights, biases, activations, strict=True)):
        who = f"layer {i} of the network"
        xi = x if i == 0 else x.new_empty((0, weights[i - 1].shape[0]))
        check_linear_args(xi, w, b, a, who=who)
    sizes = [weights[0].shape[1], *(w.shape[0] for w in weights)]
    check_fusion("network", sizes)


def network_forward(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
) -> torch.Tensor:
    """`fnn.fnn_forward` through the whole-network kernel (widths <= 128), one autograd node
    (NetworkFunction). The op packs the parameters on every call (copies) unless they are
    views of an FNN's pack. On the reference backend it runs fnn.reference's layers."""
    check_network_args(x, weights, biases, activations)
    if backend(x.device) == "reference":
        from .functional import fnn_forward

        return fnn_forward(x, weights, biases, activations)
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    return NetworkFunction.apply(x, tuple(activations), *params)


def fnn_network_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An FNN's forward on the network path: the ops read its pack when its parameters are
    the pack's views (see ensure_packed), else pack them for the call. Changes nothing."""
    weights = [layer.weight for layer in model.layers]
    biases = [layer.bias for layer in model.layers]
    activations = model.activations
    check_network_args(x, weights, biases, activations)
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    return NetworkFunction.apply(x, tuple(activations), *params)
