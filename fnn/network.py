"""The whole-network path: a narrow network (every width <= 128) run by one kernel.

Parameters are packed into zero-padded buffers (kernels.network's layout): weights
(L, P, P), biases (L, P), and an int32 `meta` [n_0..n_L, act codes]. An FNN on this path
keeps its parameters as *views* of its packed buffers (`ensure_packed`): the kernels read
the buffers directly (no copy per call), and an in-place update of the buffers (the fused
Trainer step) is an update of `model.parameters()`, which stay the source of truth. When a
parameter no longer is such a view (replaced, moved, cast), the next call packs again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

from kernels.checks import NETWORK_ACTIVATIONS, as_activation, check_linear_args

from .functional import backend

FUSIONS = ("auto", "layer", "network")
MAX_WIDTH = 128  # kernels.network.MAX_WIDTH, repeated here so this module imports no triton


def fits_network(sizes: Sequence[int]) -> bool:
    """Whether `fusion="network"` serves these widths: all of them <= 128."""
    return max(sizes) <= MAX_WIDTH


def padded_width(sizes: Sequence[int]) -> int:
    """P: the widest layer rounded up to a power of two, at least 16."""
    p = 16
    while p < max(sizes):
        p *= 2
    return p


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


@dataclass
class NetworkPack:
    """Packed parameters of a network: `w` (L, P, P), `b` (L, P) or None, `meta` int32."""

    w: torch.Tensor
    b: torch.Tensor | None
    meta: torch.Tensor
    sizes: tuple[int, ...]
    activations: tuple[str, ...]


def _meta(sizes: Sequence[int], activations: Sequence[str], device: torch.device) -> torch.Tensor:
    codes = [as_activation(a).code for a in activations]
    return torch.tensor([*sizes, *codes], dtype=torch.int32, device=device)


def pack_parameters(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
) -> NetworkPack:
    """Copy the parameters into new zero-padded buffers (missing biases pack as zeros;
    no bias at all gives b=None)."""
    sizes = (weights[0].shape[1], *(w.shape[0] for w in weights))
    p, n_layers = padded_width(sizes), len(weights)
    like = weights[0]
    with torch.no_grad():
        w = torch.zeros((n_layers, p, p), dtype=like.dtype, device=like.device)
        for li, wl in enumerate(weights):
            w[li, : wl.shape[0], : wl.shape[1]] = wl
        b = None
        if any(bl is not None for bl in biases):
            b = torch.zeros((n_layers, p), dtype=like.dtype, device=like.device)
            for li, bl in enumerate(biases):
                if bl is not None:
                    b[li, : bl.shape[0]] = bl
    return NetworkPack(w, b, _meta(sizes, activations, like.device), sizes, tuple(activations))


def _is_view(t: torch.Tensor, base: torch.Tensor, offset: int, stride: tuple[int, ...]) -> bool:
    return (
        t.dtype == base.dtype
        and t.device == base.device
        and t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        and t.storage_offset() == offset
        and t.stride() == stride
    )


def ensure_packed(model: nn.Module) -> NetworkPack:
    """The packed buffers of an FNN whose parameters are views of them, packing first (and
    re-pointing every parameter's `.data` at its view) when they are not or no longer."""
    layers = model.layers
    sizes, acts = tuple(model.sizes), tuple(model.activations)
    pack: NetworkPack | None = getattr(model, "_network_pack", None)
    if pack is not None and pack.sizes == sizes and pack.activations == acts:
        p = pack.w.shape[-1]
        ok = all(
            _is_view(layer.weight, pack.w, li * p * p, (p, 1))
            and (
                (layer.bias is None and pack.b is None)
                or (
                    layer.bias is not None
                    and pack.b is not None
                    and _is_view(layer.bias, pack.b, li * p, (1,))
                )
            )
            for li, layer in enumerate(layers)
        )
        if ok:
            return pack
    pack = pack_parameters([layer.weight for layer in layers], [layer.bias for layer in layers], acts)
    with torch.no_grad():
        for li, layer in enumerate(layers):
            o, i = layer.weight.shape
            layer.weight.data = pack.w[li, :o, :i]
            if layer.bias is not None:
                layer.bias.data = pack.b[li, :o]
    model._network_pack = pack
    return pack


class NetworkFunction(torch.autograd.Function):
    """A whole network as one autograd node and one kernel per direction.

    Forward: h_0 = X, h_{l+1} = act_l(h_l W_l^T + b_l), in one launch; saves X, the output
    and (only when a gradient is needed) the hidden outputs h_1..h_{L-1}.
    Backward, one launch when the batch fits one program (else two, the second summing the
    per-program partial gradients in a fixed order), with D_{L-1} = dY * act'(Y):
        dW_l = D_l^T h_l,   db_l = sum over rows of D_l,
        D_{l-1} = (D_l W_l) * act_{l-1}'(h_l),   dX = D_0 W_0.
    Call as `NetworkFunction.apply(x, pack, w_1, b_1, ..., w_L, b_L)`: the kernels read the
    packed buffers of `pack`; the parameters are inputs so that their gradients route.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, pack: NetworkPack, *params):
        from kernels import network as K

        x2d = x.reshape(-1, x.shape[-1])
        need = any(ctx.needs_input_grad)
        y, h = K.network_forward(x2d, pack.w, pack.b, pack.meta, pack.sizes, store_hidden=need)
        ctx.save_for_backward(x2d, y, h, pack.w, pack.meta, *params)
        ctx.sizes = pack.sizes
        ctx.has_bias = pack.b is not None
        ctx.param_shapes = [None if t is None else tuple(t.shape) for t in params]
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, dy: torch.Tensor):
        from kernels import network as K

        x2d, y, h, w, meta = ctx.saved_tensors[:5]
        needs = ctx.needs_input_grad
        dx, dw, db = K.network_backward(
            dy.reshape(-1, y.shape[-1]), y, h, x2d, w, meta, ctx.sizes, ctx.has_bias, needs[0]
        )
        grads: list[torch.Tensor | None] = []
        for i, shape in enumerate(ctx.param_shapes):
            li, is_bias = i // 2, i % 2 == 1
            if shape is None or not needs[2 + i]:
                grads.append(None)
            elif is_bias:
                grads.append(db[li, : shape[0]])
            else:
                grads.append(dw[li, : shape[0], : shape[1]])
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
    """`fnn.fnn_forward` through the whole-network kernel (widths <= 128). Packs the
    parameters on every call (copies); FNN(fusion="network") keeps them packed instead.
    On the reference backend it runs fnn.reference's layers."""
    check_network_args(x, weights, biases, activations)
    if backend(x.device) == "reference":
        from .functional import fnn_forward

        return fnn_forward(x, weights, biases, activations)
    pack = pack_parameters(weights, biases, activations)
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    return NetworkFunction.apply(x, pack, *params)


def fnn_network_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An FNN's forward on the network path, its parameters kept packed (ensure_packed)."""
    weights = [layer.weight for layer in model.layers]
    biases = [layer.bias for layer in model.layers]
    check_network_args(x, weights, biases, model.activations)
    pack = ensure_packed(model)
    params = [t for layer in model.layers for t in (layer.weight, layer.bias)]
    return NetworkFunction.apply(x, pack, *params)
