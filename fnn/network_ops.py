"""The whole-network kernels as PyTorch operators: `torch.ops.fnn.network_*`, with torch.library.

    torch.ops.fnn.network_forward(x, w_pack, b_pack, sizes, activations, store_hidden) -> (y, h)
    torch.ops.fnn.network_backward(dy, y, h, x, w_pack, sizes, activations, biased, need_dx)
        -> (dx, grads)

The kernels read the parameters packed into zero-padded buffers (kernels.network's layout):
`w_pack` (L, P, P) with layer l's weight (n_{l+1}, n_l) in its top-left corner, `b_pack`
(L, P) or None; `sizes` = (n_0, ..., n_L). `pack_parameters` builds them from the layers'
own parameters (two launches in eager mode, a gather; under torch.compile plain padding ops
that inductor fuses); where the parameters already are views of a live pack (the fused
Trainer step keeps them so, `find_pack`), the caller passes that pack and nothing is copied.

Outputs: `y` (M, n_L); `h` the hidden outputs h_1..h_{L-1} for the backward, zero-padded to
P columns, (L-1, M, P) when `store_hidden` else (0, 0, P); `dx` (M, n_0), or (0,) when not
`need_dx`; `grads`, every parameter's gradient in one flat buffer (dW_0..dW_{L-1}, then db_l
of each layer with a bias, `gradient_layout`), gathered from the kernel's padded dW and db:
contiguous blocks, which autograd keeps as the parameters' `.grad` without a copy.

The ops change none of their inputs; their fake implementations give every output's shape,
so a compiled graph holds each as one opaque node (no graph break). The kernels also read an
int32 `meta` [n_0..n_L, activation codes]: the ops build it from `sizes` and `activations`
once per (sizes, activations, device) and cache it, so no tensor is made per call.
Activations with parameters (a slope, an alpha) would be one more argument (a float tensor
or list beside `activations`) and one more cached tensor beside `meta`; the rest of the
schema stays.

Backend per call, as for the layer ops: compiled Triton on CUDA, Triton's interpreter on the
CPU under TRITON_INTERPRET=1, else `fnn.reference`'s layers (same outputs, same padding).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.checks import ACTIVATIONS, check_activation

from . import reference
from .functional import backend

__all__ = ["NetworkPack", "find_pack", "network_backward", "network_forward", "pack_parameters"]


def padded_width(sizes: Sequence[int]) -> int:
    """P: the widest layer rounded up to a power of two, at least 16 (kernels.network)."""
    p = 16
    while p < max(sizes):
        p *= 2
    return p


def layer_sizes(weights: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """(n_0, ..., n_L) from the weights' shapes."""
    return (weights[0].shape[1], *(w.shape[0] for w in weights))


# --- packed parameters -----------------------------------------------------------------------


@dataclass(eq=False)
class NetworkPack:
    """Packed parameters: `w` (L, P, P), `b` (L, P) or None (no layer has a bias), for
    layers of `sizes`; `biased[l]` says whether layer l has a bias (a missing one packs as
    zeros). Padding is zero and stays zero: nothing writes outside the real corners."""

    w: torch.Tensor
    b: torch.Tensor | None
    sizes: tuple[int, ...]
    biased: tuple[bool, ...]


_GATHER_PACK: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _pack_index(sizes: tuple[int, ...], biased: tuple[bool, ...], like: torch.Tensor):
    """(index, zero): `cat(params flattened, zero)[index]` is the packed (L*P*P [+ L*P]) buffer;
    the padding's indices point at the one trailing zero. Made once per layout and cached."""
    key = (sizes, biased, like.dtype, like.device)
    if key not in _GATHER_PACK:
        p, n_layers = padded_width(sizes), len(sizes) - 1
        shapes = list(zip(sizes[1:], sizes[:-1], strict=True))
        n_real = sum(o * i for o, i in shapes) + sum(o for (o, _), b in zip(shapes, biased, strict=True) if b)
        index = torch.full((n_layers * p * p + (n_layers * p if any(biased) else 0),), n_real)
        off = 0
        for li, (o, i) in enumerate(shapes):
            rows = li * p * p + torch.arange(o)[:, None] * p + torch.arange(i)[None, :]
            index[rows.reshape(-1)] = torch.arange(off, off + o * i)
            off += o * i
        for li, ((o, _), b) in enumerate(zip(shapes, biased, strict=True)):
            if b:
                index[n_layers * p * p + li * p + torch.arange(o)] = torch.arange(off, off + o)
                off += o
        _GATHER_PACK[key] = (index.to(like.device), torch.zeros(1, dtype=like.dtype, device=like.device))
    return _GATHER_PACK[key]


def pack_parameters(
    weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
) -> NetworkPack:
    """New zero-padded buffers holding the parameters (a missing bias packs as zeros; no
    bias at all gives b=None). Eager: one cat and one gather (two launches, nothing made
    per call but the outputs). Traced by torch.compile: padding and stacking, which inductor
    fuses. Not differentiable (the network Function routes the gradients itself)."""
    sizes = layer_sizes(weights)
    p, n_layers, like = padded_width(sizes), len(weights), weights[0]
    biased = tuple(b is not None for b in biases)
    with torch.no_grad():
        if torch.compiler.is_compiling():
            w = torch.stack([F.pad(wl, (0, p - wl.shape[1], 0, p - wl.shape[0])) for wl in weights])
            b = None
            if any(biased):
                b = torch.stack([like.new_zeros((p,)) if bl is None else F.pad(bl, (0, p - bl.shape[0]))
                                 for bl in biases])
            return NetworkPack(w, b, sizes, biased)
        index, zero = _pack_index(sizes, biased, like)
        parts = [*(wl.reshape(-1) for wl in weights), *(bl for bl in biases if bl is not None), zero]
        packed = torch.take(torch.cat(parts), index)
    w = packed[: n_layers * p * p].view(n_layers, p, p)
    b = packed[n_layers * p * p :].view(n_layers, p) if any(biased) else None
    return NetworkPack(w, b, sizes, biased)


# Live packs whose parameters are views of them, by (address of layer 0's weight, device).
# The key is only a hint: find_pack checks the pack's current addresses. A pack leaves when
# it is garbage collected (the Trainer holding it is gone), so a pack found here is alive and
# its memory cannot belong to another tensor.
_PACKS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register_pack(pack: NetworkPack) -> None:
    """Make `pack` findable by find_pack while it lives (fnn.network.ensure_packed)."""
    _PACKS[(pack.w.data_ptr(), pack.w.device)] = pack


def find_pack(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> NetworkPack | None:
    """The registered pack whose views these parameters are (each weight at (P, 1) strides
    in its layer's corner, each bias at the start of its row, no bias where the pack has
    none), else None. A few pointer and stride comparisons per layer."""
    w0 = weights[0]
    pack = _PACKS.get((w0.data_ptr(), w0.device))
    if pack is None:
        return None
    pw, sizes = pack.w, pack.sizes
    if pw.dtype != w0.dtype or len(sizes) != len(weights) + 1:
        return None
    p = pw.shape[-1]
    stride, base, step = (p, 1), pw.data_ptr(), p * p * pw.element_size()
    for li, w in enumerate(weights):
        if (
            w.data_ptr() != base + li * step
            or w.stride() != stride
            or w.shape != (sizes[li + 1], sizes[li])
            or w.dtype != pw.dtype
        ):
            return None
    pb = pack.b
    for li, b in enumerate(biases):
        if b is None:
            if pack.biased[li]:
                return None
        elif (
            pb is None
            or not pack.biased[li]
            or b.data_ptr() != pb.data_ptr() + li * p * pb.element_size()
            or b.stride() != (1,)
            or b.shape != (sizes[li + 1],)
            or b.dtype != pb.dtype
        ):
            return None
    return pack


_META: dict[tuple, torch.Tensor] = {}


def meta(sizes: Sequence[int], activations: Sequence[str], device: torch.device) -> torch.Tensor:
    """The kernels' int32 [n_0..n_L, activation codes] on `device`, made once and cached."""
    key = (tuple(sizes), tuple(activations), device)
    t = _META.get(key)
    if t is None:
        codes = [ACTIVATIONS[a] for a in activations]
        t = _META[key] = torch.tensor([*sizes, *codes], dtype=torch.int32, device=device)
    return t


_PADDING: dict[tuple, torch.Tensor | None] = {}


def _hidden_padding(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """Bool (L-1, 1, P), true on the padded columns of each hidden output; None when every
    hidden width is P (seed 000's [2, 32, 1]: nothing to fill). Made once and cached."""
    key = (sizes, device)
    if key not in _PADDING:
        p, hidden = padded_width(sizes), sizes[1:-1]
        mask = None
        if any(n < p for n in hidden):
            mask = (torch.arange(p)[None, :] >= torch.tensor(hidden)[:, None])[:, None, :].to(device)
        _PADDING[key] = mask
    return _PADDING[key]


def _check(x, w_pack, b_pack, sizes, activations, who: str) -> None:
    """One activation per layer and known names, a 2-D x of width n_0, and packed buffers of
    the shape `sizes` implies in x's dtype and on its device (the reference backend has no
    launcher to check them; the launchers check them again)."""
    n_layers = len(sizes) - 1
    if n_layers < 1 or len(activations) != n_layers:
        raise ValueError(f"{who}: need sizes (n_0..n_L) and one activation per layer")
    for a in activations:
        check_activation(a)
    if x.dim() != 2 or x.shape[1] != sizes[0]:
        raise ValueError(f"{who}: x must be 2-D (M, {sizes[0]}), got shape {tuple(x.shape)}")
    p = padded_width(sizes)
    for name, t, shape in (("w_pack", w_pack, (n_layers, p, p)), ("b_pack", b_pack, (n_layers, p))):
        if t is not None and (tuple(t.shape) != shape or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(
                f"{who}: {name} must be {shape} {x.dtype} on {x.device}, got {tuple(t.shape)} "
                f"{t.dtype} on {t.device}"
            )


# --- fnn.reference's version (CPU without the interpreter) ----------------------------------


def _reference_forward(x, w_pack, b_pack, sizes, activations, store_hidden):
    p, n_layers, m = padded_width(sizes), len(sizes) - 1, x.shape[0]
    h = x.new_zeros((max(n_layers - 1, 0), m, p) if store_hidden else (0, 0, p))
    out = x
    for li, a in enumerate(activations):
        o, i = sizes[li + 1], sizes[li]
        b = None if b_pack is None else b_pack[li, :o]
        out = reference.linear_act_forward(out, w_pack[li, :o, :i], b, a)
        if store_hidden and li < n_layers - 1:
            h[li, :, :o] = out
    return out, h


def _reference_backward(dy, y, h, x, w_pack, sizes, activations, has_bias, need_dx):
    p, n_layers = padded_width(sizes), len(sizes) - 1
    outs = [x, *(h[li, :, : sizes[li + 1]] for li in range(n_layers - 1)), y]
    dw = x.new_zeros((n_layers, p, p))
    db = x.new_zeros((n_layers, p)) if has_bias else None
    g = dy
    for li in reversed(range(n_layers)):
        o, i = sizes[li + 1], sizes[li]
        d = reference.delta(g, outs[li + 1], activations[li])
        dw[li, :o, :i] = d.t() @ outs[li]
        if has_bias:
            db[li, :o] = d.sum(0)
        g = d @ w_pack[li, :o, :i]
    return (g if need_dx else None), dw, db


# --- forward ---------------------------------------------------------------------------------


@torch.library.custom_op(
    "fnn::network_forward",
    mutates_args=(),
    schema="(Tensor x, Tensor w_pack, Tensor? b_pack, int[] sizes, str[] activations, bool store_hidden)"
    " -> (Tensor, Tensor)",
)
def _network_forward_op(
    x: torch.Tensor,
    w_pack: torch.Tensor,
    b_pack: torch.Tensor | None,
    sizes: list[int],
    activations: list[str],
    store_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    sizes = tuple(sizes)
    _check(x, w_pack, b_pack, sizes, activations, "fnn::network_forward")
    if backend(x.device) == "reference":
        with torch.autocast(x.device.type, enabled=False):
            return _reference_forward(x, w_pack, b_pack, sizes, activations, store_hidden)
    from kernels import network as K

    mt = meta(sizes, activations, x.device)
    y, h = K.network_forward(x, w_pack, b_pack, mt, sizes, store_hidden)
    pad = _hidden_padding(sizes, x.device) if store_hidden and h.numel() else None
    if pad is not None:  # the kernel writes the real columns only; an op's output is defined
        h.masked_fill_(pad, 0)
    return y, h


@_network_forward_op.register_fake
def _network_forward_fake(x, w_pack, b_pack, sizes, activations, store_hidden):
    p, n_layers, m = padded_width(sizes), len(sizes) - 1, x.shape[0]
    h = x.new_empty((max(n_layers - 1, 0), m, p) if store_hidden else (0, 0, p))
    return x.new_empty((m, sizes[-1])), h


# --- backward --------------------------------------------------------------------------------


def gradient_layout(sizes: Sequence[int], biased: Sequence[bool]) -> list[tuple[int, int]]:
    """(offset, numel) in the backward's flat gradient of dW_0..dW_{L-1}, then of db_l for
    each layer with a bias: each block is that parameter's gradient, contiguous."""
    out, off = [], 0
    for i, o in zip(sizes[:-1], sizes[1:], strict=True):
        out.append((off, o * i))
        off += o * i
    for o, b in zip(sizes[1:], biased, strict=True):
        if b:
            out.append((off, o))
            off += o
    return out


_GATHER_GRAD: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}


def _grad_index(sizes: tuple[int, ...], biased: tuple[bool, ...], device: torch.device):
    """Flat indices into the padded dW (L, P, P) and db (L, P) of the real gradients, in the
    order of gradient_layout; made once per (sizes, biases, device) and cached."""
    key = (sizes, biased, device)
    if key not in _GATHER_GRAD:
        p = padded_width(sizes)
        iw, ib = [], []
        for li, (i, o) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            iw.append((li * p * p + torch.arange(o)[:, None] * p + torch.arange(i)[None, :]).reshape(-1))
            if biased[li]:
                ib.append(li * p + torch.arange(o))
        _GATHER_GRAD[key] = (torch.cat(iw).to(device), torch.cat(ib).to(device) if ib else None)
    return _GATHER_GRAD[key]


def _flat_gradients(dw: torch.Tensor, db: torch.Tensor | None, sizes, biased) -> torch.Tensor:
    """The real corners of the padded dW and db gathered into one flat buffer (one launch per
    padded buffer): no undefined padding in an op's output, and contiguous gradients."""
    iw, ib = _grad_index(sizes, biased, dw.device)
    n_w = iw.numel()
    flat = dw.new_empty((n_w + (ib.numel() if ib is not None else 0),))
    torch.take(dw, iw, out=flat[:n_w])
    if ib is not None:
        torch.take(db, ib, out=flat[n_w:])
    return flat


@torch.library.custom_op(
    "fnn::network_backward",
    mutates_args=(),
    schema="(Tensor dy, Tensor y, Tensor h, Tensor x, Tensor w_pack, int[] sizes, str[] activations,"
    " bool[] biased, bool need_dx) -> (Tensor, Tensor)",
)
def _network_backward_op(
    dy: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    x: torch.Tensor,
    w_pack: torch.Tensor,
    sizes: list[int],
    activations: list[str],
    biased: list[bool],
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    sizes, biased = tuple(sizes), tuple(biased)
    _check(x, w_pack, None, sizes, activations, "fnn::network_backward")
    if len(biased) != len(sizes) - 1:
        raise ValueError(f"fnn::network_backward: {len(biased)} bias flags for {len(sizes) - 1} layers")
    has_bias = any(biased)
    if backend(x.device) == "reference":
        with torch.autocast(x.device.type, enabled=False):
            dx, dw, db = _reference_backward(dy, y, h, x, w_pack, sizes, activations, has_bias, need_dx)
    else:
        from kernels import network as K

        mt = meta(sizes, activations, x.device)
        dx, dw, db = K.network_backward(dy, y, h, x, w_pack, mt, sizes, has_bias, need_dx)
    # An op returns tensors, never None: an empty dx stands for "not computed".
    return (dx if dx is not None else x.new_empty((0,))), _flat_gradients(dw, db, sizes, biased)


@_network_backward_op.register_fake
def _network_backward_fake(dy, y, h, x, w_pack, sizes, activations, biased, need_dx):
    dx = x.new_empty((x.shape[0], sizes[0]) if need_dx else (0,))
    off, n = gradient_layout(sizes, biased)[-1]
    return dx, x.new_empty((off + n,))


# --- Python signatures -----------------------------------------------------------------------


def network_forward(
    x: torch.Tensor,
    w_pack: torch.Tensor,
    b_pack: torch.Tensor | None,
    sizes: Sequence[int],
    activations: Sequence[str],
    store_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, H) of the whole network for a 2-D x, in one launch: `torch.ops.fnn.network_forward`."""
    return torch.ops.fnn.network_forward(x, w_pack, b_pack, list(sizes), list(activations), store_hidden)


def network_backward(
    dy: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    x: torch.Tensor,
    w_pack: torch.Tensor,
    sizes: Sequence[int],
    activations: Sequence[str],
    biased: Sequence[bool],
    need_dx: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor | None]]:
    """(dX or None, [dW_l], [db_l or None]) from dY and the forward's Y, H, X and packed
    weights: `torch.ops.fnn.network_backward`. The gradients are contiguous views of one
    buffer."""
    dx, flat = torch.ops.fnn.network_backward(
        dy, y, h, x, w_pack, list(sizes), list(activations), list(biased), need_dx
    )
    blocks = iter(gradient_layout(sizes, biased))
    dws = []
    for i, o in zip(sizes[:-1], sizes[1:], strict=True):
        off, n = next(blocks)
        dws.append(flat[off : off + n].view(o, i))
    dbs: list[torch.Tensor | None] = []
    for b in biased:
        if b:
            off, n = next(blocks)
            dbs.append(flat[off : off + n])
        else:
            dbs.append(None)
    return (dx if need_dx else None), dws, dbs
