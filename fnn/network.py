"""The whole-network path: a narrow network (every width <= 128) run by one kernel.

The kernels read the parameters packed into zero-padded buffers (kernels.network's layout):
weights (L, P, P), biases (L, P). An FNN's parameters are ordinary contiguous tensors, as in
nn.Linear, so everything PyTorch does with parameters works on them (FSDP2 included, which
refuses non-contiguous ones); the network Function packs them for each call, one gather
(fnn.network_ops.pack_parameters). The fused Trainer step instead points the parameters at
slices of a pack it keeps (`ensure_packed`), so that its in-place update of the pack is the
update of `model.parameters()` in one launch; while that holds, forwards read the pack
without copying. Nothing else changes a model's parameters: a forward never does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

from kernels.checks import NETWORK_ACTIVATIONS, as_activation, check_linear_args

from . import network_ops
from .functional import backend
from .network_ops import NetworkPack, find_pack, pack_parameters, padded_width, register_pack

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
    "unpack_parameters",
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


def ensure_packed(model: nn.Module) -> NetworkPack | None:
    """The packed buffers whose views an FNN's parameters are, making them first if there are
    none: a new zero-padded pack receives the parameters' values, and each parameter's `.data`
    is pointed at its slice. The Parameter objects stay the same, so optimizers and hooks
    holding them see no change. The caller must keep the pack (the fused Trainer step does):
    while it lives, the ops find it and read it without copying (fnn.network_ops.find_pack).

    Returns None, changing nothing, where the parameters are not plain tensors of a real
    device (FSDP's sharded DTensors, fake or meta tensors) or while torch.compile traces.
    Only the Trainer calls this: an FNN's own forward never changes its parameters."""
    if torch.compiler.is_compiling():
        return None
    layers = model.layers
    weights = [layer.weight for layer in layers]
    biases = [layer.bias for layer in layers]
    pack = find_pack(weights, biases)
    if pack is not None:
        return pack
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
    return pack


def unpack_parameters(model: nn.Module) -> None:
    """Give an FNN's parameters their own contiguous storage again (same Parameter objects,
    same values), undoing the packed views the fused Trainer step leaves them as. Needed only
    by code that requires contiguous parameters: FSDP2's `fully_shard`, `param.view(-1)`
    (torch.nn.utils.parameters_to_vector). The next fused step packs them again."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_contiguous() or p.untyped_storage().nbytes() != p.numel() * p.element_size():
                p.data = p.data.clone(memory_format=torch.contiguous_format)


class NetworkFunction(torch.autograd.Function):
    """A whole network as one autograd node and one kernel per direction (fnn.network_ops).

    Forward: h_0 = X, h_{l+1} = act_l(h_l W_l^T + b_l), in one launch; saves X, the output,
    the packed weights and (only when a gradient is needed) the hidden outputs h_1..h_{L-1}.
    Backward, one launch when the batch fits one program (else two, the second summing the
    per-program partial gradients in a fixed order), with D_{L-1} = dY * act'(Y):
        dW_l = D_l^T h_l,   db_l = sum over rows of D_l,
        D_{l-1} = (D_l W_l) * act_{l-1}'(h_l),   dX = D_0 W_0.
    Call as `NetworkFunction.apply(x, activations, w_1, b_1, ..., w_L, b_L)` (a bias may be
    None). The parameters are packed for the call (fnn.network_ops.pack_parameters), unless
    they are views of a live pack (the fused Trainer's), which is then read as it is.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, activations: tuple[str, ...], *params):
        weights, biases = params[0::2], params[1::2]
        pack = None if torch.compiler.is_compiling() else find_pack(weights, biases)
        if pack is None:
            pack = pack_parameters(weights, biases)
        x2d = x.reshape(-1, x.shape[-1])
        need = any(ctx.needs_input_grad)
        y, h = network_ops.network_forward(x2d, pack.w, pack.b, pack.sizes, activations, need)
        ctx.save_for_backward(x2d, y, h, pack.w)
        ctx.activations = activations
        ctx.sizes = pack.sizes
        ctx.biased = pack.biased
        ctx.x_shape = x.shape
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])  # a view only if needed

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dy: torch.Tensor):
        x2d, y, h, w_pack = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dws, dbs = network_ops.network_backward(
            dy.reshape(-1, y.shape[-1]), y, h, x2d, w_pack, ctx.sizes, ctx.activations, ctx.biased, needs[0]
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
        if as_activation(a).name not in NETWORK_ACTIVATIONS:  # temporary: the kernels know these
            raise ValueError(f"{who}: the whole-network kernels do not serve activation {a!r} yet")
    sizes = [weights[0].shape[1], *(w.shape[0] for w in weights)]
    check_fusion("network", sizes)


def network_forward(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
) -> torch.Tensor:
    """`fnn.fnn_forward` through the whole-network kernel (widths <= 128), one autograd node
    (NetworkFunction), the parameters packed for the call. On the reference backend it runs
    fnn.reference's layers."""
    check_network_args(x, weights, biases, activations)
    if backend(x.device) == "reference":
        from .functional import fnn_forward

        return fnn_forward(x, weights, biases, activations)
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    return NetworkFunction.apply(x, tuple(activations), *params)


def fnn_network_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An FNN's forward on the network path (NetworkFunction). Changes nothing in the model."""
    weights = [layer.weight for layer in model.layers]
    biases = [layer.bias for layer in model.layers]
    activations = model.activations
    check_network_args(x, weights, biases, activations)
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    return NetworkFunction.apply(x, tuple(activations), *params)
