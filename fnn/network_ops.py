"""The whole-network kernels as PyTorch operators: `torch.ops.fnn.network_*`, with torch.library.

    torch.ops.fnn.network_forward(x, weights, biases, activations, store_hidden) -> (y, h)
    torch.ops.fnn.network_backward(dy, y, h, x, weights, activations, biased, need_dx)
        -> (dx, grads)

The ops take the layers' own parameters (`weights[l]` (n_{l+1}, n_l), `biases[l]` (n_{l+1},)
or None) and find the zero-padded packed buffers the kernels read (kernels.network's layout:
weights (L, P, P), biases (L, P)) when the ops run:
- fast path: the parameters are views of a live pack made by `fnn.network.ensure_packed` (an
  FNN on the network path keeps its parameters so). A few pointer and stride comparisons
  prove it, and the kernels read the pack itself: no copy.
- otherwise the op packs them into fresh buffers for this call (one zero-fill and one copy per
  tensor). This serves every case where the parameters are not the pack's views: FSDP's
  gathered parameters, `torch.func.functional_call`, a parameter replaced by the user, the
  functional `fnn.network.network_forward`.
Either way an op never changes its inputs or any module: it is a pure function, as
torch.compile, FSDP and opcheck require. Its fake implementation gives every output's shape,
so a compiled graph holds it as one opaque node (no graph break).

Outputs: `y` (M, n_L); `h` the hidden outputs h_1..h_{L-1}, zero-padded to P columns, shape
(L-1, M, P) when `store_hidden` (for the backward) else (0, 0, P); `dx` (M, n_0), or (0,) when
not `need_dx`; `grads`, every parameter's gradient in one flat buffer (dW_0..dW_{L-1}, then
db_l of each layer with a bias; `gradient_layout`), gathered from the kernel's padded
dW (L, P, P) and db (L, P): contiguous blocks, so autograd keeps each as the parameter's
`.grad` without a copy.

The kernels also read an int32 `meta` [n_0..n_L, activation codes]: the ops build it from
the sizes and activation names once per (sizes, activations, device) and cache it, so no
tensor is made per call. Activations with parameters (a slope, an alpha) would be one more
argument (a float list beside `activations`) and one more cached tensor beside `meta`; the
rest of the schema stays as it is.

Backend per call, as for the layer ops: compiled Triton on CUDA, Triton's interpreter on the
CPU under TRITON_INTERPRET=1, else `fnn.reference`'s layers (same outputs, same padding).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

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


def pack_parameters(
    weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
) -> NetworkPack:
    """Copy the parameters into new zero-padded buffers (no bias at all gives b=None)."""
    sizes = layer_sizes(weights)
    p, n_layers, like = padded_width(sizes), len(weights), weights[0]
    biased = tuple(b is not None for b in biases)
    with torch.no_grad():
        w = torch.zeros((n_layers, p, p), dtype=like.dtype, device=like.device)
        for li, wl in enumerate(weights):
            w[li, : wl.shape[0], : wl.shape[1]] = wl
        b = None
        if any(biased):
            b = torch.zeros((n_layers, p), dtype=like.dtype, device=like.device)
            for li, bl in enumerate(biases):
                if bl is not None:
                    b[li, : bl.shape[0]] = bl
    return NetworkPack(w, b, sizes, biased)


# Live packs whose parameters are views of them, by (address of layer 0's weight, device).
# The key is only a hint: find_pack checks the pack's current addresses. A pack leaves when
# it is garbage collected (its FNN dropped it or died), so a pack found here is alive and its
# memory cannot belong to another tensor.
_PACKS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register_pack(pack: NetworkPack) -> None:
    """Make `pack` findable by find_pack (fnn.network.ensure_packed calls this)."""
    _PACKS[(pack.w.data_ptr(), pack.w.device)] = pack


def find_pack(
    weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None
) -> NetworkPack | None:
    """The registered pack whose views these parameters are, else None. `biases=None` checks
    the weights only (the backward reads no bias)."""
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
    if biases is None:
        return pack
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


def _packed(weights, biases) -> NetworkPack:
    pack = find_pack(weights, biases)
    return pack if pack is not None else pack_parameters(weights, biases)


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


def _check(x: torch.Tensor, weights, biases, activations, who: str) -> None:
    """What the launchers cannot see through packing: one activation per layer, the layers
    chaining, every parameter in x's dtype and on its device."""
    n = len(weights)
    if not n or len(activations) != n or (biases is not None and len(biases) != n):
        raise ValueError(f"{who}: need one weight, bias and activation per layer")
    if x.dim() != 2:
        raise ValueError(f"{who}: x must be 2-D (M, n_0), got shape {tuple(x.shape)}")
    for a in activations:
        check_activation(a)
    for li, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != (x.shape[1] if li == 0 else weights[li - 1].shape[0]):
            raise ValueError(f"{who}: weight {li} has shape {tuple(w.shape)}; the layers do not chain")
    for t in (*weights, *(biases or ())):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{who}: a parameter is {t.dtype} on {t.device}; x is {x.dtype} on {x.device}")


# --- fnn.reference's version (CPU without the interpreter) ----------------------------------


def _reference_forward(x, weights, biases, activations, store_hidden):
    sizes = layer_sizes(weights)
    p, n_layers, m = padded_width(sizes), len(weights), x.shape[0]
    h = x.new_zeros((max(n_layers - 1, 0), m, p) if store_hidden else (0, 0, p))
    out = x
    for li, (w, b, a) in enumerate(zip(weights, biases, activations, strict=True)):
        out = reference.linear_act_forward(out, w, b, a)
        if store_hidden and li < n_layers - 1:
            h[li, :, : out.shape[1]] = out
    return out, h


def _reference_backward(dy, y, h, x, weights, activations, has_bias, need_dx):
    sizes = layer_sizes(weights)
    p, n_layers = padded_width(sizes), len(weights)
    outs = [x, *(h[li, :, : sizes[li + 1]] for li in range(n_layers - 1)), y]
    dw = x.new_zeros((n_layers, p, p))
    db = x.new_zeros((n_layers, p)) if has_bias else x.new_empty((0,))
    g = dy
    for li in reversed(range(n_layers)):
        d = reference.delta(g, outs[li + 1], activations[li])
        dw[li, : sizes[li + 1], : sizes[li]] = d.t() @ outs[li]
        if has_bias:
            db[li, : sizes[li + 1]] = d.sum(0)
        g = d @ weights[li]
    return (g if need_dx else x.new_empty((0,))), dw, db


# --- forward ---------------------------------------------------------------------------------


@torch.library.custom_op(
    "fnn::network_forward",
    mutates_args=(),
    schema="(Tensor x, Tensor[] weights, Tensor?[] biases, str[] activations, bool store_hidden)"
    " -> (Tensor, Tensor)",
)
def _network_forward_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    activations: list[str],
    store_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weights, biases, activations, "fnn::network_forward")
    if backend(x.device) == "reference":
        with torch.autocast(x.device.type, enabled=False):
            return _reference_forward(x, weights, biases, activations, store_hidden)
    from kernels import network as K

    pack = _packed(weights, biases)
    mt = meta(pack.sizes, activations, x.device)
    y, h = K.network_forward(x, pack.w, pack.b, mt, pack.sizes, store_hidden)
    pad = _hidden_padding(pack.sizes, x.device) if store_hidden and h.numel() else None
    if pad is not None:  # the kernel writes the real columns only; an op's output is defined
        h.masked_fill_(pad, 0)
    return y, h


@_network_forward_op.register_fake
def _network_forward_fake(x, weights, biases, activations, store_hidden):
    sizes = layer_sizes(weights)
    p, n_layers, m = padded_width(sizes), len(weights), x.shape[0]
    h = x.new_empty((max(n_layers - 1, 0), m, p) if store_hidden else (0, 0, p))
    return x.new_empty((m, sizes[-1])), h


# --- backward --------------------------------------------------------------------------------


def gradient_layout(weights: Sequence[torch.Tensor], biased: Sequence[bool]) -> list[tuple[int, int]]:
    """(offset, numel) in the backward's flat gradient of dW_0..dW_{L-1}, then of db_l for
    each layer with a bias: each block is that parameter's gradient, contiguous."""
    out, off = [], 0
    for w in weights:
        out.append((off, w.shape[0] * w.shape[1]))
        off += w.shape[0] * w.shape[1]
    for w, b in zip(weights, biased, strict=True):
        if b:
            out.append((off, w.shape[0]))
            off += w.shape[0]
    return out


_GATHER: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}


def _gather_index(sizes: tuple[int, ...], biased: tuple[bool, ...], device: torch.device):
    """Flat indices into the padded dW (L, P, P) and db (L, P) of the real gradients, in the
    order of gradient_layout; made once per (sizes, biases, device) and cached."""
    key = (sizes, biased, device)
    if key not in _GATHER:
        p = padded_width(sizes)
        iw, ib = [], []
        for li, (i, o) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            iw.append((li * p * p + torch.arange(o)[:, None] * p + torch.arange(i)[None, :]).reshape(-1))
            if biased[li]:
                ib.append(li * p + torch.arange(o))
        _GATHER[key] = (
            torch.cat(iw).to(device),
            torch.cat(ib).to(device) if ib else None,
        )
    return _GATHER[key]


def _flat_gradients(dw: torch.Tensor, db: torch.Tensor | None, sizes, biased) -> torch.Tensor:
    """The real corners of the padded dW and db, gathered into one flat buffer (one launch per
    padded buffer): each parameter's gradient a contiguous block, which autograd keeps as the
    parameter's .grad without a copy, and no padding left undefined in an op output."""
    iw, ib = _gather_index(tuple(sizes), tuple(biased), dw.device)
    n_w = iw.numel()
    flat = dw.new_empty((n_w + (ib.numel() if ib is not None else 0),))
    torch.take(dw, iw, out=flat[:n_w])
    if ib is not None:
        torch.take(db, ib, out=flat[n_w:])
    return flat


@torch.library.custom_op(
    "fnn::network_backward",
    mutates_args=(),
    schema="(Tensor dy, Tensor y, Tensor h, Tensor x, Tensor[] weights, str[] activations,"
    " bool[] biased, bool need_dx) -> (Tensor, Tensor)",
)
def _network_backward_op(
    dy: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    activations: list[str],
    biased: list[bool],
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weights, None, activations, "fnn::network_backward")
    if len(biased) != len(weights):
        raise ValueError(f"fnn::network_backward: {len(biased)} bias flags for {len(weights)} layers")
    sizes, has_bias = layer_sizes(weights), any(biased)
    if backend(x.device) == "reference":
        with torch.autocast(x.device.type, enabled=False):
            dx, dw, db = _reference_backward(dy, y, h, x, weights, activations, has_bias, need_dx)
    else:
        from kernels import network as K

        pack = find_pack(weights, None)
        w = pack.w if pack is not None else pack_parameters(weights, [None] * len(weights)).w
        mt = meta(sizes, activations, x.device)
        dx, dw, db = K.network_backward(dy, y, h, x, w, mt, sizes, has_bias, need_dx)
    # An op returns tensors, never None: an empty dx stands for "not computed".
    return (dx if dx is not None else x.new_empty((0,))), _flat_gradients(dw, db, sizes, biased)


@_network_backward_op.register_fake
def _network_backward_fake(dy, y, h, x, weights, activations, biased, need_dx):
    sizes = layer_sizes(weights)
    dx = x.new_empty((x.shape[0], sizes[0]) if need_dx else (0,))
    off, n = gradient_layout(weights, biased)[-1]
    return dx, x.new_empty((off + n,))


# --- Python signatures -----------------------------------------------------------------------


def network_forward(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
    store_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, H) of the whole network for a 2-D x, in one launch: `torch.ops.fnn.network_forward`."""
    return torch.ops.fnn.network_forward(x, list(weights), list(biases), list(activations), store_hidden)


def network_backward(
    dy: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    activations: Sequence[str],
    biased: Sequence[bool],
    need_dx: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor | None]]:
    """(dX or None, [dW_l], [db_l or None]) from dY and the forward's Y, H and X:
    `torch.ops.fnn.network_backward`. The gradients are contiguous views of one buffer."""
    dx, flat = torch.ops.fnn.network_backward(
        dy, y, h, x, list(weights), list(activations), list(biased), need_dx
    )
    blocks = iter(gradient_layout(weights, biased))
    dws = []
    for w in weights:
        off, n = next(blocks)
        dws.append(flat[off : off + n].view(w.shape))
    dbs = []
    for b in biased:
        if b:
            off, n = next(blocks)
            dbs.append(flat[off : off + n])
        else:
            dbs.append(None)
    return (dx if need_dx else None), dws, dbs
