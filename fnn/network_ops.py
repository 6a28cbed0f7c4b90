"""The whole-network kernels as PyTorch operators: `torch.ops.fnn.network_*`, with torch.library.

    torch.ops.fnn.network_forward(x, params, sizes, activations, biased, store_hidden) -> (y, h)
    torch.ops.fnn.network_backward(dy, y, h, x, params, sizes, activations, biased, need_dx)
        -> (dx, grads)

`params` is the network's parameters in one flat buffer (kernels.network's layout): every
layer's weight W_l (n_{l+1}, n_l) row-major, then the bias of each layer that has one, i.e.
`torch.cat([w.reshape(-1) for w in weights] + [b for b in biases if b is not None])`
(`flat_layout` gives each block's offset). `sizes` = (n_0, ..., n_L); `biased[l]` says
whether layer l has a bias. An FNN keeps its parameters as views of such a buffer
(fnn.network), which the caller then passes as it is: nothing is copied per call.

Outputs: `y` (M, n_L); `h` the hidden outputs h_1..h_{L-1} for the backward, zero-padded to
P columns (P: the widest layer rounded up to a power of two >= 16), (L-1, M, P) when
`store_hidden` else (0, 0, P); `dx` (M, n_0), or (0,) when not `need_dx`; `grads`, every
parameter's gradient in the layout of `params`: contiguous blocks, which autograd keeps as the
parameters' `.grad` without a copy (`network_backward` below returns them as views).

The ops change none of their inputs; their fake implementations give every output's shape,
so a compiled graph holds each as one opaque node (no graph break). The kernels also read an
int32 `meta` (widths, activation codes, the offsets of every weight and bias in `params`):
the ops build it once per (sizes, activations, biased, device) and cache it, so no tensor is
made per call. Activations with parameters (a slope, an alpha) would be one more argument (a
float tensor or list beside `activations`) and one more cached tensor beside `meta`.

Backend per call, as for the layer ops: compiled Triton on CUDA, Triton's interpreter on the
CPU under TRITON_INTERPRET=1, else `fnn.reference`'s layers (same outputs, same padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.checks import ACTIVATIONS, NETWORK_ACTIVATIONS, check_activation

from . import reference
from .dispatch import backend, use_registered_ops

__all__ = ["flat_layout", "meta", "network_backward", "network_forward", "padded_width", "param_count"]


def padded_width(sizes: Sequence[int]) -> int:
    """P: the widest layer rounded up to a power of two, at least 16 (kernels.network)."""
    p = 16
    while p < max(sizes):
        p *= 2
    return p


def layer_sizes(weights: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """(n_0, ..., n_L) from the weights' shapes."""
    return (weights[0].shape[1], *(w.shape[0] for w in weights))


def flat_layout(sizes: Sequence[int], biased: Sequence[bool]) -> list[tuple[int, int]]:
    """(offset, numel) in the flat parameter buffer (and the flat gradient) of W_0..W_{L-1},
    then of b_l for each layer with a bias."""
    out, off = [], 0
    for i, o in zip(sizes[:-1], sizes[1:], strict=True):
        out.append((off, o * i))
        off += o * i
    for o, b in zip(sizes[1:], biased, strict=True):
        if b:
            out.append((off, o))
            off += o
    return out


def param_count(sizes: Sequence[int], biased: Sequence[bool]) -> int:
    """Elements of the flat parameter buffer (kernels.network.param_count, without triton)."""
    n = sum(o * i for i, o in zip(sizes[:-1], sizes[1:], strict=True))
    return n + sum(o for o, b in zip(sizes[1:], biased, strict=True) if b)


def unflatten(
    flat: torch.Tensor, sizes: Sequence[int], biased: Sequence[bool]
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """([W_l], [b_l or None]): contiguous views of a flat buffer in the layout of `params`."""
    blocks = iter(flat_layout(sizes, biased))
    weights = []
    for i, o in zip(sizes[:-1], sizes[1:], strict=True):
        off, n = next(blocks)
        weights.append(flat[off : off + n].view(o, i))
    biases: list[torch.Tensor | None] = []
    for b in biased:
        if b:
            off, n = next(blocks)
            biases.append(flat[off : off + n])
        else:
            biases.append(None)
    return weights, biases


_META: dict[tuple, torch.Tensor] = {}


def meta(
    sizes: Sequence[int], activations: Sequence[str], biased: Sequence[bool], device: torch.device
) -> torch.Tensor:
    """The kernels' int32 `meta` (kernels.network.network_meta) on `device`, made once per
    (sizes, activations, biased, device) and cached."""
    key = (tuple(sizes), tuple(activations), tuple(biased), device)
    t = _META.get(key)
    if t is None:
        blocks = iter(flat_layout(sizes, biased))
        woff = [next(blocks)[0] for _ in range(len(sizes) - 1)]
        boff = [next(blocks)[0] if b else -1 for b in biased]
        codes = [ACTIVATIONS[a] for a in activations]
        t = _META[key] = torch.tensor([*sizes, *codes, *woff, *boff], dtype=torch.int32, device=device)
    return t


def _check(x, params, sizes, activations, biased, who: str) -> None:
    """One activation and one bias flag per layer, known names that the network kernels serve,
    a 2-D x of width n_0, and a flat `params` of the size `sizes` implies in x's dtype and on
    its device (the reference backend has no launcher to check them; the launchers check them
    again)."""
    n_layers = len(sizes) - 1
    if n_layers < 1 or len(activations) != n_layers:
        raise ValueError(f"{who}: need sizes (n_0..n_L) and one activation per layer")
    if len(biased) != n_layers:
        raise ValueError(f"{who}: {len(biased)} bias flags for {n_layers} layers")
    for a in activations:
        check_activation(a)
        if a not in NETWORK_ACTIVATIONS:  # known, but the whole-network kernels lack it
            raise ValueError(
                f"{who}: the whole-network kernels do not serve activation {a!r} yet (they serve "
                f"{', '.join(NETWORK_ACTIVATIONS)}); run such a network per layer"
            )
    if x.dim() != 2 or x.shape[1] != sizes[0]:
        raise ValueError(f"{who}: x must be 2-D (M, {sizes[0]}), got shape {tuple(x.shape)}")
    n = param_count(sizes, biased)
    if tuple(params.shape) != (n,) or params.dtype != x.dtype or params.device != x.device:
        raise ValueError(
            f"{who}: params must be flat ({n},) {x.dtype} on {x.device}, got {tuple(params.shape)} "
            f"{params.dtype} on {params.device}"
        )


# --- fnn.reference's version (CPU without the interpreter) ----------------------------------


def _reference_forward(x, params, sizes, activations, biased, store_hidden):
    p, n_layers, m = padded_width(sizes), len(sizes) - 1, x.shape[0]
    h = x.new_zeros((max(n_layers - 1, 0), m, p) if store_hidden else (0, 0, p))
    weights, biases = unflatten(params, sizes, biased)
    out = x
    for li, a in enumerate(activations):
        out = reference.linear_act_forward(out, weights[li], biases[li], a)
        if store_hidden and li < n_layers - 1:
            h[li, :, : sizes[li + 1]] = out
    return out, h


def _reference_backward(dy, y, h, x, params, sizes, activations, biased, need_dx):
    n_layers = len(sizes) - 1
    outs = [x, *(h[li, :, : sizes[li + 1]] for li in range(n_layers - 1)), y]
    weights, _ = unflatten(params, sizes, biased)
    grads = torch.empty_like(params)
    dws, dbs = unflatten(grads, sizes, biased)
    g = dy
    for li in reversed(range(n_layers)):
        d = reference.delta(g, outs[li + 1], activations[li])
        torch.mm(d.t(), outs[li], out=dws[li])
        if dbs[li] is not None:
            torch.sum(d, 0, out=dbs[li])
        g = d @ weights[li]
    return (g if need_dx else None), grads


# --- forward ---------------------------------------------------------------------------------


@torch.library.custom_op(
    "fnn::network_forward",
    mutates_args=(),
    schema="(Tensor x, Tensor params, int[] sizes, str[] activations, bool[] biased, bool store_hidden)"
    " -> (Tensor, Tensor)",
)
def _network_forward_op(
    x: torch.Tensor,
    params: torch.Tensor,
    sizes: list[int],
    activations: list[str],
    biased: list[bool],
    store_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    sizes, biased = tuple(sizes), tuple(biased)
    _check(x, params, sizes, activations, biased, "fnn::network_forward")
    if backend(x.device) == "reference":
        with torch.autocast(x.device.type, enabled=False):
            return _reference_forward(x, params, sizes, activations, biased, store_hidden)
    from kernels import network as K

    mt = meta(sizes, activations, biased, x.device)
    return K.network_forward(x, params, mt, sizes, biased, store_hidden)


@_network_forward_op.register_fake
def _network_forward_fake(x, params, sizes, activations, biased, store_hidden):
    p, n_layers, m = padded_width(sizes), len(sizes) - 1, x.shape[0]
    h = x.new_empty((max(n_layers - 1, 0), m, p) if store_hidden else (0, 0, p))
    return x.new_empty((m, sizes[-1])), h


# --- backward --------------------------------------------------------------------------------


@torch.library.custom_op(
    "fnn::network_backward",
    mutates_args=(),
    schema="(Tensor dy, Tensor y, Tensor h, Tensor x, Tensor params, int[] sizes, str[] activations,"
    " bool[] biased, bool need_dx) -> (Tensor, Tensor)",
)
def _network_backward_op(
    dy: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    x: torch.Tensor,
    params: torch.Tensor,
    sizes: list[int],
    activations: list[str],
    biased: list[bool],
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    sizes, biased = tuple(sizes), tuple(biased)
    _check(x, params, sizes, activations, biased, "fnn::network_backward")
    if backend(x.device) == "reference":
        with torch.autocast(x.device.type, enabled=False):
            dx, grads = _reference_backward(dy, y, h, x, params, sizes, activations, biased, need_dx)
    else:
        from kernels import network as K

        mt = meta(sizes, activations, biased, x.device)
        dx, grads = K.network_backward(dy, y, h, x, params, mt, sizes, biased, need_dx)
    # An op returns tensors, never None: an empty dx stands for "not computed".
    return (dx if dx is not None else x.new_empty((0,))), grads


@_network_backward_op.register_fake
def _network_backward_fake(dy, y, h, x, params, sizes, activations, biased, need_dx):
    dx = x.new_empty((x.shape[0], sizes[0]) if need_dx else (0,))
    return dx, x.new_empty((param_count(sizes, biased),))


# --- Python signatures -----------------------------------------------------------------------


def network_forward(
    x: torch.Tensor,
    params: torch.Tensor,
    sizes: Sequence[int],
    activations: Sequence[str],
    biased: Sequence[bool],
    store_hidden: bool,
    mt: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Y, H) of the whole network for a 2-D x, in one launch: `torch.ops.fnn.network_forward`
    under torch.compile or a dispatch mode (fnn.dispatch), else the launcher directly, for
    arguments the caller has checked (then H is None where nothing is stored). `mt`: the
    `meta` tensor on x's device, if the caller has it (else it is looked up)."""
    if not use_registered_ops() and backend(x.device) != "reference":
        from kernels import network as K

        if mt is None:
            mt = meta(sizes, activations, biased, x.device)
        return K.forward_unchecked(x, params, mt, tuple(sizes), tuple(biased), store_hidden)
    return torch.ops.fnn.network_forward(
        x, params, list(sizes), list(activations), list(biased), store_hidden
    )


def network_backward(
    dy: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor | None,
    x: torch.Tensor,
    params: torch.Tensor,
    sizes: Sequence[int],
    activations: Sequence[str],
    biased: Sequence[bool],
    need_dx: bool,
    mt: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor | None]]:
    """(dX or None, [dW_l], [db_l or None]) from dY and the forward's Y, H, X and flat
    parameters: `torch.ops.fnn.network_backward` (or the launcher directly, as
    network_forward). The gradients are contiguous views of one flat buffer."""
    if not use_registered_ops() and backend(x.device) != "reference":
        from kernels import network as K

        if mt is None:
            mt = meta(sizes, activations, biased, x.device)
        dx, flat = K.backward_unchecked(dy, y, h, x, params, mt, tuple(sizes), tuple(biased), need_dx)
    else:
        if h is None:  # nothing stored (one layer): the op takes an empty H
            h = x.new_empty((0, 0, padded_width(sizes)))
        dx, flat = torch.ops.fnn.network_backward(
            dy, y, h, x, params, list(sizes), list(activations), list(biased), need_dx
        )
    dws, dbs = grad_views(flat, sizes, biased)
    return (dx if need_dx else None), dws, dbs


_VIEWS: dict[tuple, tuple] = {}


def grad_views(
    flat: torch.Tensor, sizes: Sequence[int], biased: Sequence[bool]
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """`unflatten` for a contiguous flat buffer, one view op per block (`as_strided`, the
    cheapest view op); the same `unflatten` while torch.compile traces."""
    if torch.compiler.is_compiling():
        return unflatten(flat, sizes, biased)
    key = (tuple(sizes), tuple(biased))
    specs = _VIEWS.get(key)
    if specs is None:  # ((shape, strides, offset) of each weight, the same or None per bias)
        blocks = iter(flat_layout(sizes, biased))
        ws = [((o, i), (i, 1), next(blocks)[0]) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
        bs = [((o,), (1,), next(blocks)[0]) if b else None for o, b in zip(sizes[1:], biased, strict=True)]
        if len(_VIEWS) >= 1024:
            _VIEWS.clear()
        specs = _VIEWS[key] = (ws, bs)
    base = flat.storage_offset()
    if base == 0:
        weights = [flat.as_strided(shape, strides, off) for shape, strides, off in specs[0]]
        biases = [flat.as_strided(s[0], s[1], s[2]) if s is not None else None for s in specs[1]]
    else:
        weights = [flat.as_strided(shape, strides, base + off) for shape, strides, off in specs[0]]
        biases = [flat.as_strided(s[0], s[1], base + s[2]) if s is not None else None for s in specs[1]]
    return weights, biases
