"""The whole-network kernels as PyTorch operators: `torch.ops.fnn.network_*`, with torch.library.

    torch.ops.fnn.network_forward(x, params, sizes, activations, biased, store_hidden,
                                  act_params=[]) -> (y, h, z)
    torch.ops.fnn.network_backward(dy, y, h, x, params, sizes, activations, biased, need_dx,
                                   act_params=[]) -> (dx, grads)

`params` is the network's parameters in one flat buffer (kernels.network's layout): every
layer's weight W_l (n_{l+1}, n_l) row-major, then the bias of each layer that has one, i.e.
`torch.cat([w.reshape(-1) for w in weights] + [b for b in biases if b is not None])`
(`flat_layout` gives each block's offset). `sizes` = (n_0, ..., n_L); `biased[l]` says
whether layer l has a bias. An FNN keeps its parameters as views of such a buffer
(fnn.network), which the caller then passes as it is: nothing is copied per call.
Activations travel as their names and `act_params`, the parameter values of every layer's
activation concatenated in layer order (kernels.checks.PARAMETERS: a slope, an alpha, beta
and threshold; none for the others), or empty when every one has torch's defaults.

What the forward keeps for the backward, per layer l (Activation.saves): Z_l, the
pre-activation, where the activation's derivative needs it (gelu, gelu_tanh, silu, and
leaky_relu, elu, softplus at the parameter values that save Z), else the output h_l. Outputs:
`y` (M, n_L); `h`, the hidden layers' h_l or Z_l for the backward, zero-padded to P columns
(P: the widest layer rounded up to a power of two >= 16), (L-1, M, P) when `store_hidden`
else (0, 0, P); `z`, the output layer's Z_L (M, n_L) when `store_hidden` and its activation
saves Z, else (0, n_L). The backward takes as `y` what it needs of the output layer: Y where
the activation's derivative is read off it, Z_L (the forward's `z`) where it saves Z, and
anything of shape (M, n_L) for identity (never read; dY will do). Where a layer keeps Z_l,
the backward recomputes h_l = act_l(Z_l) on load for the next layer's weight gradient.
Further outputs: `dx` (M, n_0), or (0,) when not `need_dx`; `grads`, every parameter's
gradient in the layout of `params`: contiguous blocks, which autograd keeps as the
parameters' `.grad` without a copy (`network_backward` below returns them as views).

The ops change none of their inputs; their fake implementations give every output's shape,
so a compiled graph holds each as one opaque node (no graph break). The kernels also read an
int32 `meta` (widths, activation codes, the offsets of every weight and bias in `params`)
and `act_params` as an (L, 2) float tensor (each layer's Activation.args, float64 for a
float64 network, else float32): the ops build each once per (sizes, activations, biased,
device) and (activations, dtype, device) and cache them, so no tensor is made per call.

Backend per call, as for the layer ops: compiled Triton on CUDA, Triton's interpreter on the
CPU under TRITON_INTERPRET=1, else `fnn.reference`'s layers (same outputs, same padding).
In plain eager mode the Python entries below (`network_forward`, `network_backward`) call
kernels.network's unchecked launchers directly, for arguments their callers have checked
(fnn.dispatch); under torch.compile, a dispatch mode or a functorch transform they call the
registered ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.checks import PARAMETERS, Activation, as_activation
from kernels.checks import act_set as kernel_act_set

from . import reference
from .dispatch import backend, use_registered_ops

__all__ = [
    "activation_params",
    "flat_layout",
    "meta",
    "network_backward",
    "network_forward",
    "padded_width",
    "param_count",
]


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
_ACT_PARAMS: dict[tuple, torch.Tensor] = {}
_SPECS: dict[tuple, tuple[list[str], list[float]]] = {}
_DECODED: dict[tuple, tuple[Activation, ...]] = {}


def meta(
    sizes: Sequence[int],
    activations: Sequence[str | Activation],
    biased: Sequence[bool],
    device: torch.device,
) -> torch.Tensor:
    """The kernels' int32 `meta` (kernels.network.network_meta) on `device`, made once per
    (sizes, activations, biased, device) and cached."""
    key = (tuple(sizes), tuple(activations), tuple(biased), device)
    t = _META.get(key)
    if t is None:
        blocks = iter(flat_layout(sizes, biased))
        woff = [next(blocks)[0] for _ in range(len(sizes) - 1)]
        boff = [next(blocks)[0] if b else -1 for b in biased]
        codes = [as_activation(a).code for a in activations]
        t = _META[key] = torch.tensor([*sizes, *codes, *woff, *boff], dtype=torch.int32, device=device)
    return t


def act_set(activations: Sequence[str | Activation]) -> int:
    """The kernels' `acts` (kernels.checks.act_set): the bitmask of the activations' codes,
    for which the network kernels are compiled; cached per activations."""
    key = tuple(activations)
    bits = _ACT_SET.get(key)
    if bits is None:
        bits = _ACT_SET[key] = kernel_act_set(activations)
    return bits


_ACT_SET: dict[tuple, int] = {}


def _kernel_args(sizes, activations, biased, x: torch.Tensor, mt=None, ap=None, bits=None) -> tuple:
    """(meta, act_params, act_set) of the network kernels for x's device and dtype: those the
    caller has, the others looked up (each cached)."""
    if mt is None:
        mt = meta(sizes, activations, biased, x.device)
    if ap is None:
        ap = activation_params(activations, x.dtype, x.device)
    if bits is None:
        bits = act_set(activations)
    return mt, ap, bits


def activation_params(
    activations: Sequence[str | Activation], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The kernels' `act_params` (kernels.network.network_act_params): (L, 2), each layer's
    Activation.args, in the accumulator dtype of a `dtype` network (float64 for float64, else
    float32), on `device`; made once per (activations, dtype, device) and cached."""
    key = (tuple(activations), dtype, device)
    t = _ACT_PARAMS.get(key)
    if t is None:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        args = [list(as_activation(a).args) for a in activations]
        t = _ACT_PARAMS[key] = torch.tensor(args, dtype=acc, device=device).reshape(len(args), 2)
    return t


def spec(activations: Sequence[str | Activation]) -> tuple[list[str], list[float]]:
    """(names, act_params) of the ops' schema for a list of activations (names or
    fnn.Activation): act_params empty when every activation has torch's defaults. Cached."""
    # While torch.compile traces: no side effect in the graph, and no lookup either (Dynamo
    # before torch 2.13 breaks the graph on hashing an Activation, a class with its own hash).
    compiling = torch.compiler.is_compiling()
    key = tuple(activations)
    out = None if compiling else _SPECS.get(key)
    if out is None:
        acts = [as_activation(a) for a in activations]
        names = [a.name for a in acts]
        values = [] if all(a.is_default for a in acts) else [v for a in acts for v in a.values]
        out = (names, values)
        if not compiling:
            _SPECS[key] = out
    return out


def decode(activations: Sequence[str], act_params: Sequence[float], who: str) -> tuple[Activation, ...]:
    """The fnn.Activation of every layer from the ops' (activations, act_params); raises
    ValueError for unknown names or a wrong number of parameter values. Cached."""
    key = (tuple(activations), tuple(act_params))
    out = _DECODED.get(key)
    if out is None:
        for a in activations:
            as_activation(a)  # a clear error for a bad name
        counts = [len(PARAMETERS.get(a, ())) for a in activations]
        if act_params and len(act_params) != sum(counts):
            raise ValueError(
                f"{who}: act_params must hold the {sum(counts)} parameter value(s) of "
                f"{list(activations)} in order (or be empty for the defaults), got {len(act_params)}"
            )
        values, acts = iter(act_params), []
        for a, n in zip(activations, counts, strict=True):
            acts.append(Activation.from_values(a, [next(values) for _ in range(n)] if act_params else []))
        out = _DECODED[key] = tuple(acts)
    return out


def _check(x, params, sizes, activations, act_params, biased, who: str) -> tuple[Activation, ...]:
    """One activation and one bias flag per layer, known names and their parameter values, a
    2-D x of width n_0, and a flat `params` of the size `sizes` implies in x's dtype and on
    its device (the reference backend has no launcher to check them; the launchers check them
    again). Returns the activations."""
    n_layers = len(sizes) - 1
    if n_layers < 1 or len(activations) != n_layers:
        raise ValueError(f"{who}: need sizes (n_0..n_L) and one activation per layer")
    if len(biased) != n_layers:
        raise ValueError(f"{who}: {len(biased)} bias flags for {n_layers} layers")
    acts = decode(activations, act_params, who)
    if x.dim() != 2 or x.shape[1] != sizes[0]:
        raise ValueError(f"{who}: x must be 2-D (M, {sizes[0]}), got shape {tuple(x.shape)}")
    n = param_count(sizes, biased)
    if tuple(params.shape) != (n,) or params.dtype != x.dtype or params.device != x.device:
        raise ValueError(
            f"{who}: params must be flat ({n},) {x.dtype} on {x.device}, got {tuple(params.shape)} "
            f"{params.dtype} on {params.device}"
        )
    return acts


# --- fnn.reference's version (CPU without the interpreter) ----------------------------------


def _keeps_z(acts: Sequence[Activation], store_hidden: bool) -> bool:
    """Whether the forward returns Z_L: a backward follows and the output layer saves Z."""
    return store_hidden and acts[-1].saves == "z"


def _reference_forward(x, params, sizes, acts, biased, store_hidden):
    p, n_layers, m = padded_width(sizes), len(sizes) - 1, x.shape[0]
    h = x.new_zeros((max(n_layers - 1, 0), m, p) if store_hidden else (0, 0, p))
    weights, biases = unflatten(params, sizes, biased)
    out, z = x, None
    for li, a in enumerate(acts):
        out, z = reference.linear_act_forward_z(out, weights[li], biases[li], a)
        if store_hidden and li < n_layers - 1:
            h[li, :, : sizes[li + 1]] = z if a.saves == "z" else out
    return out, h, (z if _keeps_z(acts, store_hidden) else x.new_empty((0, sizes[-1])))


def _reference_backward(dy, y, h, x, params, sizes, acts, biased, need_dx):
    n_layers = len(sizes) - 1
    saved = [*(h[li, :, : sizes[li + 1]] for li in range(n_layers - 1)), y]  # S_1..S_L
    # Each layer's input: X, or the previous layer's output (recomputed where it kept Z).
    ins = [x] + [
        reference.apply_activation(s, a) if a.saves == "z" else s
        for s, a in zip(saved[:-1], acts[:-1], strict=True)
    ]
    weights, _ = unflatten(params, sizes, biased)
    grads = torch.empty_like(params)
    dws, dbs = unflatten(grads, sizes, biased)
    g = dy
    for li in reversed(range(n_layers)):
        d = reference.delta(g, saved[li], acts[li])
        torch.mm(d.t(), ins[li], out=dws[li])
        if dbs[li] is not None:
            torch.sum(d, 0, out=dbs[li])
        g = d @ weights[li]
    return (g if need_dx else None), grads


# --- forward ---------------------------------------------------------------------------------


@torch.library.custom_op(
    "fnn::network_forward",
    mutates_args=(),
    schema="(Tensor x, Tensor params, int[] sizes, str[] activations, bool[] biased, bool store_hidden,"
    " float[] act_params=[]) -> (Tensor, Tensor, Tensor)",
)
def _network_forward_op(
    x: torch.Tensor,
    params: torch.Tensor,
    sizes: list[int],
    activations: list[str],
    biased: list[bool],
    store_hidden: bool,
    act_params: Sequence[float] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sizes, biased = tuple(sizes), tuple(biased)
    acts = _check(x, params, sizes, activations, act_params, biased, "fnn::network_forward")
    if backend(x.device) == "reference":
        with torch.autocast(x.device.type, enabled=False):
            return _reference_forward(x, params, sizes, acts, biased, store_hidden)
    from kernels import network as K
    from kernels.memory import empty

    mt, ap, bits = _kernel_args(sizes, acts, biased, x)
    z = empty((x.shape[0] if _keeps_z(acts, store_hidden) else 0, sizes[-1]), x)
    keep = z if z.shape[0] else None
    y, h = K.network_forward(x, params, mt, sizes, biased, store_hidden, ap, keep, bits)
    return y, h, z


@_network_forward_op.register_fake
def _network_forward_fake(x, params, sizes, activations, biased, store_hidden, act_params=()):
    acts = decode(activations, act_params, "fnn::network_forward")
    p, n_layers, m = padded_width(sizes), len(sizes) - 1, x.shape[0]
    h = x.new_empty((max(n_layers - 1, 0), m, p) if store_hidden else (0, 0, p))
    z = x.new_empty((m if _keeps_z(acts, store_hidden) else 0, sizes[-1]))
    return x.new_empty((m, sizes[-1])), h, z


# --- backward --------------------------------------------------------------------------------


@torch.library.custom_op(
    "fnn::network_backward",
    mutates_args=(),
    schema="(Tensor dy, Tensor y, Tensor h, Tensor x, Tensor params, int[] sizes, str[] activations,"
    " bool[] biased, bool need_dx, float[] act_params=[]) -> (Tensor, Tensor)",
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
    act_params: Sequence[float] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    sizes, biased = tuple(sizes), tuple(biased)
    acts = _check(x, params, sizes, activations, act_params, biased, "fnn::network_backward")
    if backend(x.device) == "reference":
        with torch.autocast(x.device.type, enabled=False):
            dx, grads = _reference_backward(dy, y, h, x, params, sizes, acts, biased, need_dx)
    else:
        from kernels import network as K

        mt, ap, bits = _kernel_args(sizes, acts, biased, x)
        dx, grads = K.network_backward(dy, y, h, x, params, mt, sizes, biased, need_dx, ap, acts=bits)
    # An op returns tensors, never None: an empty dx stands for "not computed".
    return (dx if dx is not None else x.new_empty((0,))), grads


@_network_backward_op.register_fake
def _network_backward_fake(dy, y, h, x, params, sizes, activations, biased, need_dx, act_params=()):
    dx = x.new_empty((x.shape[0], sizes[0]) if need_dx else (0,))
    return dx, x.new_empty((param_count(sizes, biased),))


# --- torch.func.vmap -------------------------------------------------------------------------
# Under a transform fnn runs networks layer by layer (fnn.functional._func_layers), except an
# inference forward, which reaches network_forward: with the parameters shared, the samples
# are more rows of one launch. Anything else runs once per sample (fnn.ops._each_sample), as
# PyTorch's fallback would, without its warning.


@_network_forward_op.register_vmap
def _network_forward_vmap(info, in_dims, x, params, sizes, activations, biased, store_hidden, act_params=()):
    from .ops import _each_sample, _rows, _samples_rows

    xd, pd = in_dims[:2]
    args = (x, params, sizes, activations, biased, store_hidden, act_params)
    if pd is not None:
        return _each_sample(_network_forward_op, info, in_dims, args)
    batch = info.batch_size
    m = _samples_rows(x, xd)
    y, h, z = _network_forward_op(_rows(x, xd, batch), *args[1:])
    y = y.view(batch, m, y.shape[-1])
    h, h_dim = (h.view(h.shape[0], batch, m, h.shape[-1]), 1) if store_hidden else (h, None)
    if _keeps_z(decode(activations, act_params, "fnn::network_forward"), store_hidden):
        return (y, h, z.view(batch, m, z.shape[-1])), (0, h_dim, 0)
    return (y, h, z), (0, h_dim, None)


@_network_backward_op.register_vmap
def _network_backward_vmap(info, in_dims, *args):
    from .ops import _each_sample

    return _each_sample(_network_backward_op, info, in_dims, args)


# --- Python signatures -----------------------------------------------------------------------


def network_forward(
    x: torch.Tensor,
    params: torch.Tensor,
    sizes: Sequence[int],
    activations: Sequence[str | Activation],
    biased: Sequence[bool],
    store_hidden: bool,
    mt: torch.Tensor | None = None,
    ap: torch.Tensor | None = None,
    bits: int | None = None,
    last_saves: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(Y, H, Z_L) of the whole network for a 2-D x, in one launch (activations: names or
    fnn.Activation). H holds each hidden layer's output, or its Z where its activation saves
    Z; Z_L is kept only where the output layer saves Z and `store_hidden` (see the module
    docstring). `torch.ops.fnn.network_forward` under torch.compile or a dispatch mode
    (fnn.dispatch), which returns empty H and Z_L where nothing is kept; else the launcher
    directly, for arguments the caller has checked, which returns None for them there.
    `mt`, `ap`, `bits`, `last_saves`: the kernels' `meta` and `act_params` on x's device (and
    dtype), the activation set (`act_set`) and what the output layer saves
    (Activation.saves), if the caller has them (else they are looked up)."""
    if not use_registered_ops() and backend(x.device) != "reference":
        from kernels import network as K
        from kernels.memory import new

        mt, ap, bits = _kernel_args(sizes, activations, biased, x, mt, ap, bits)
        z = None
        if store_hidden:
            if last_saves is None:
                last_saves = as_activation(activations[-1]).saves
            if last_saves == "z":
                z = new((x.shape[0], sizes[-1]), x.dtype, x.device)
        y, h = K.forward_unchecked(x, params, mt, tuple(sizes), tuple(biased), store_hidden, ap, z, bits)
        return y, h, z
    names, values = spec(activations)
    return torch.ops.fnn.network_forward(x, params, list(sizes), names, list(biased), store_hidden, values)


def network_backward(
    dy: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor | None,
    x: torch.Tensor,
    params: torch.Tensor,
    sizes: Sequence[int],
    activations: Sequence[str | Activation],
    biased: Sequence[bool],
    need_dx: bool,
    mt: torch.Tensor | None = None,
    ap: torch.Tensor | None = None,
    bits: int | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor | None]]:
    """(dX or None, [dW_l], [db_l or None]) from dY and what the forward kept: `y` the output
    layer's Y, or its Z_L where it saves Z (dY for identity), H (None or empty for one layer),
    X and the flat parameters: `torch.ops.fnn.network_backward`, or the launcher directly, as
    network_forward (`mt`, `ap`, `bits` as there). The gradients are contiguous views of one
    flat buffer."""
    if not use_registered_ops() and backend(x.device) != "reference":
        from kernels import network as K

        mt, ap, bits = _kernel_args(sizes, activations, biased, x, mt, ap, bits)
        dx, flat = K.backward_unchecked(
            dy, y, h, x, params, mt, tuple(sizes), tuple(biased), need_dx, ap, None, bits
        )
    else:
        if h is None:  # nothing stored (one layer): the op takes an empty H
            h = x.new_empty((0, 0, padded_width(sizes)))
        names, values = spec(activations)
        dx, flat = torch.ops.fnn.network_backward(
            dy, y, h, x, params, list(sizes), names, list(biased), need_dx, values
        )
    dws, dbs = grad_views(flat, sizes, biased)
    return (dx if need_dx else None), dws, dbs


_VIEWS: dict[tuple, tuple] = {}


def _view_specs(sizes: tuple[int, ...], biased: tuple[bool, ...]) -> tuple[list, list, list]:
    """(shape, strides, offset) of each block of the flat layout, cached per network: the
    weights', the biases' (None for a layer without bias), and both interleaved in the
    autograd Functions' order (w_1, b_1, ..., w_L, b_L)."""
    key = (sizes, biased)
    specs = _VIEWS.get(key)
    if specs is None:
        blocks = iter(flat_layout(sizes, biased))
        ws = [((o, i), (i, 1), next(blocks)[0]) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
        bs = [((o,), (1,), next(blocks)[0]) if b else None for o, b in zip(sizes[1:], biased, strict=True)]
        if len(_VIEWS) >= 1024:
            _VIEWS.clear()
        specs = _VIEWS[key] = (ws, bs, [s for pair in zip(ws, bs, strict=True) for s in pair])
    return specs


def grad_views(
    flat: torch.Tensor, sizes: Sequence[int], biased: Sequence[bool]
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """`unflatten` for a contiguous flat buffer, one view op per block (`as_strided`, the
    cheapest view op); the same `unflatten` while torch.compile traces."""
    if torch.compiler.is_compiling():
        return unflatten(flat, sizes, biased)
    ws, bs, _ = _view_specs(tuple(sizes), tuple(biased))
    base = flat.storage_offset()
    weights = [flat.as_strided(shape, strides, base + off) for shape, strides, off in ws]
    biases = [flat.as_strided(s[0], s[1], base + s[2]) if s is not None else None for s in bs]
    return weights, biases


def grad_list(
    flat: torch.Tensor, sizes: tuple[int, ...], biased: tuple[bool, ...]
) -> list[torch.Tensor | None]:
    """The gradients in a flat buffer of its own (storage offset 0, as the backward launcher
    allocates it) as [dW_1, db_1, ..., dW_L, db_L], None for a layer without bias: the
    autograd Function's order."""
    view = flat.as_strided
    return [view(s[0], s[1], s[2]) if s is not None else None for s in _view_specs(sizes, biased)[2]]
