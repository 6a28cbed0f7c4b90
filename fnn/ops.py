"""The layer kernels as PyTorch operators: `torch.ops.fnn.*`, registered with torch.library.

    torch.ops.fnn.linear_act_forward(x, weight, bias, activation, act_params) -> y
    torch.ops.fnn.linear_act_forward_z(x, weight, bias, activation, act_params) -> (y, z)
    torch.ops.fnn.linear_act_backward_input(dy, y, weight, activation, x, prev_activation,
                                            act_params, prev_params) -> dx
    torch.ops.fnn.linear_act_backward_weight(dy, y, x, activation, need_bias, split, act_params,
                                             x_activation, x_params, rows) -> (dw, db)
    torch.ops.fnn.linear_act_backward(dy, y, weight, x, activation, need_bias, prev_activation,
                                      act_params, prev_params, split, rows) -> (dx, dw, db)

An activation travels as its name and its parameter values in order (`float[]`, empty for the
defaults; kernels.checks.PARAMETERS); `y` (and `x` for a previous layer) is what the forward
saved: the output, or the pre-activation Z for the activations that save it.

Registered ops are opaque to torch.compile (no graph break: their fake implementations give
the output shapes), to autocast (they run in the dtype of their inputs) and to dispatch modes.
The backend is chosen when an op runs, from its input's device (`fnn.dispatch.backend`):
the compiled Triton kernels, the same kernels in Triton's interpreter, or `fnn.reference`.

The ops have no autograd formula of their own: `fnn.LinearActFunction` and `fnn.FNNFunction`
call them in their forward and backward while torch.compile traces, or under a dispatch mode
or a functorch transform; in plain eager mode they call the launchers directly (fnn.dispatch
decides). The Python functions below have the launchers' signatures (kernels.linear_act), so
the Functions call either interchangeably; they turn the empty `db` the op returns when
`need_bias` is false back into None.

`rows` (None, or a divisor of the batch) asks for each slice of that many rows' own dW and db,
(M / rows, N, K) and (M / rows, N): the ops' torch.func.vmap rules below use it for per-sample
weight gradients in one launch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.checks import CALL_CHECKS, Activation, as_activation

__all__ = [
    "linear_act_backward",
    "linear_act_backward_input",
    "linear_act_backward_weight",
    "linear_act_forward",
    "linear_act_forward_z",
]


def _run(name: str, t: torch.Tensor, *args):
    """Call `name` of the module serving `t`'s device: kernels.linear_act (Triton, compiled or
    interpreted), whose launchers check their arguments, or fnn.reference, after the same checks
    (kernels.checks.CALL_CHECKS), so that a bad call fails alike on every backend. The reference
    runs PyTorch ops, which autocast would recast, so it runs with autocast off: an op computes
    in its inputs' dtype on every backend."""
    from . import reference
    from .dispatch import backend

    if backend(t.device) == "reference":
        CALL_CHECKS[name](*args)
        with torch.autocast(t.device.type, enabled=False):
            return getattr(reference, name)(*args)
    from kernels import linear_act  # imports triton, so only when a kernel will run

    return getattr(linear_act, name)(*args)


def _act(name: str, params: Sequence[float]) -> Activation:
    return Activation.from_values(name, params)


def _spec(activation: str | Activation, what: str = "activation") -> tuple[str, list[float]]:
    """(name, parameter values) of an activation, as the op schemas carry it."""
    act = as_activation(activation, what)
    return act.name, list(act.values)


# --- forward ---------------------------------------------------------------------------------


@torch.library.custom_op(
    "fnn::linear_act_forward",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, str activation, float[] act_params=[]) -> Tensor",
)
def _forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    act_params: Sequence[float] = (),
) -> torch.Tensor:
    return _run("linear_act_forward", x, x, weight, bias, _act(activation, act_params))


@_forward_op.register_fake
def _forward_fake(x, weight, bias, activation, act_params=()):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op(
    "fnn::linear_act_forward_z",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor? bias, str activation, float[] act_params=[]) -> (Tensor, Tensor)"
    ),
)
def _forward_z_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    act_params: Sequence[float] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("linear_act_forward_z", x, x, weight, bias, _act(activation, act_params))


@_forward_z_op.register_fake
def _forward_z_fake(x, weight, bias, activation, act_params=()):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


# --- gradient of the input -------------------------------------------------------------------


@torch.library.custom_op(
    "fnn::linear_act_backward_input",
    mutates_args=(),
    schema=(
        "(Tensor dy, Tensor y, Tensor weight, str activation, Tensor? x, str prev_activation,"
        " float[] act_params=[], float[] prev_params=[]) -> Tensor"
    ),
)
def _backward_input_op(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    activation: str,
    x: torch.Tensor | None,
    prev_activation: str,
    act_params: Sequence[float] = (),
    prev_params: Sequence[float] = (),
) -> torch.Tensor:
    act, prev = _act(activation, act_params), _act(prev_activation, prev_params)
    return _run("linear_act_backward_input", dy, dy, y, weight, act, x, prev)


@_backward_input_op.register_fake
def _backward_input_fake(dy, y, weight, activation, x, prev_activation, act_params=(), prev_params=()):
    return weight.new_empty((dy.shape[0], weight.shape[1]))


# --- gradients of the weight and bias --------------------------------------------------------


@torch.library.custom_op(
    "fnn::linear_act_backward_weight",
    mutates_args=(),
    schema=(
        "(Tensor dy, Tensor y, Tensor x, str activation, bool need_bias, SymInt? split,"
        " float[] act_params=[], str x_activation='identity', float[] x_params=[], SymInt? rows=None)"
        " -> (Tensor, Tensor)"
    ),
)
def _backward_weight_op(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    activation: str,
    need_bias: bool,
    split: int | None,
    act_params: Sequence[float] = (),
    x_activation: str = "identity",
    x_params: Sequence[float] = (),
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    act, xact = _act(activation, act_params), _act(x_activation, x_params)
    dw, db = _run("linear_act_backward_weight", x, dy, y, x, act, need_bias, split, xact, rows)
    if db is None:  # an op cannot return None: an empty tensor stands for "no bias gradient"
        db = x.new_empty((0,))
    return dw, db


def _weight_grad_shape(n: int, k: int, m: int, rows: int | None) -> tuple[int, ...]:
    """dW's shape: (n, k), or (m / rows, n, k) per slice of `rows` rows."""
    return (n, k) if rows is None else (m // rows, n, k)


@_backward_weight_op.register_fake
def _backward_weight_fake(
    dy, y, x, activation, need_bias, split, act_params=(), x_activation="identity", x_params=(), rows=None
):
    shape = _weight_grad_shape(dy.shape[1], x.shape[1], x.shape[0], rows)
    return x.new_empty(shape), x.new_empty(shape[:-1] if need_bias else (0,))


# --- the whole backward of a narrow layer, from one kernel ------------------------------------


@torch.library.custom_op(
    "fnn::linear_act_backward",
    mutates_args=(),
    schema=(
        "(Tensor dy, Tensor y, Tensor weight, Tensor x, str activation, bool need_bias,"
        " str prev_activation='identity', float[] act_params=[], float[] prev_params=[],"
        " SymInt? split=None, SymInt? rows=None) -> (Tensor, Tensor, Tensor)"
    ),
)
def _backward_op(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    x: torch.Tensor,
    activation: str,
    need_bias: bool,
    prev_activation: str = "identity",
    act_params: Sequence[float] = (),
    prev_params: Sequence[float] = (),
    split: int | None = None,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    act, prev = _act(activation, act_params), _act(prev_activation, prev_params)
    dx, dw, db = _run("linear_act_backward", x, dy, y, weight, x, act, need_bias, prev, split, rows)
    if db is None:  # as in linear_act_backward_weight: empty for "no bias gradient"
        db = x.new_empty((0,))
    return dx, dw, db


@_backward_op.register_fake
def _backward_fake(
    dy, y, weight, x, activation, need_bias, prev_activation="identity", act_params=(), prev_params=(),
    split=None, rows=None,
):
    n, k = weight.shape
    shape = _weight_grad_shape(n, k, x.shape[0], rows)
    return x.new_empty((dy.shape[0], k)), x.new_empty(shape), x.new_empty(shape[:-1] if need_bias else (0,))


# --- torch.func.vmap -------------------------------------------------------------------------
# The ops see vmap's batch as one more leading dimension of their 2-D arguments. Where the
# weight is shared (per-sample gradients: vmap(grad(f), in_dims=(None, 0, ...))), the batch
# folds into the rows: one launch for the whole batch, the weight gradients per sample from
# the kernels' row slices (`rows`). A batched weight (an ensemble) runs the op once per sample,
# as PyTorch's own fallback would, except a forward whose x is shared, which stacks the
# weights into one wider layer.


def _rows(t: torch.Tensor | None, dim: int | None, batch: int) -> torch.Tensor | None:
    """A 2-D op argument with vmap's batch folded into its rows, batch-major: (batch * m, n);
    an unbatched one repeated for every sample."""
    if t is None:
        return None
    t = t.expand(batch, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape(batch * t.shape[1], t.shape[2])  # no -1: ambiguous for an empty batch


def _each_sample(op, info, in_dims: tuple, args: tuple):
    """The op once per sample, the results stacked (dim 0); an empty bias gradient (no bias)
    stays unbatched. No samples: the op on one zero sample gives the shapes of the (empty)
    results."""
    batch = info.batch_size
    # in_dims: an int for a batched tensor; None, or Nones in the argument's shape, otherwise
    pairs = [(a, d if d.__class__ is int else None) for a, d in zip(args, in_dims, strict=False)]
    if batch == 0:
        sample = op(*(a if d is None else a.new_zeros(a.shape[:d] + a.shape[d + 1 :]) for a, d in pairs))
        if isinstance(sample, torch.Tensor):
            return sample.new_empty((0, *sample.shape)), 0
        results, dims = _stacked([sample])
        return tuple(r if d is None else r[:0] for r, d in zip(results, dims, strict=True)), dims
    outs = [op(*(a if d is None else a.select(d, i) for a, d in pairs)) for i in range(batch)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    return _stacked(outs)


def _stacked(outs: list) -> tuple:
    results, dims = [], []
    for parts in zip(*outs, strict=True):
        if parts[0].numel() == 0 and parts[0].dim() == 1:  # the "no bias gradient" stand-in
            results.append(parts[0])
            dims.append(None)
        else:
            results.append(torch.stack(parts))
            dims.append(0)
    return tuple(results), tuple(dims)


def _samples_rows(t: torch.Tensor, dim: int) -> int:
    """Rows per sample of a batched 2-D argument."""
    return t.shape[1] if dim == 0 else t.movedim(dim, 0).shape[1]


def _slice_rows(rows: int | None, m: int, batch: int) -> tuple[int, tuple[int, ...]]:
    """(rows per slice of the folded batch, the per-sample leading dims of dW): each sample's
    m rows are one slice, or its own slices of `rows` when the op was asked for them."""
    if rows is None:
        return m, (batch,)
    return rows, (batch, m // rows)


@_forward_op.register_vmap
def _forward_vmap(info, in_dims, x, weight, bias, activation, act_params=()):
    xd, wd, bd = in_dims[:3]
    batch = info.batch_size
    if wd is None and bd is None:  # a shared layer: the batch is more rows
        m = _samples_rows(x, xd)
        y = _forward_op(_rows(x, xd, batch), weight, bias, activation, act_params)
        return y.view(batch, m, y.shape[-1]), 0
    if xd is None and wd is not None:  # one x, a weight per sample: the weights side by side
        w = weight.movedim(wd, 0)
        n = w.shape[1]
        if bias is not None:
            bias = (bias.expand(batch, n) if bd is None else bias.movedim(bd, 0)).reshape(-1)
        y = _forward_op(x, w.reshape(batch * n, w.shape[-1]), bias, activation, act_params)
        return y.view(x.shape[0], batch, n), 1
    return _each_sample(_forward_op, info, in_dims, (x, weight, bias, activation, act_params))


@_forward_z_op.register_vmap
def _forward_z_vmap(info, in_dims, x, weight, bias, activation, act_params=()):
    xd, wd, bd = in_dims[:3]
    if wd is None and bd is None:
        batch, m = info.batch_size, _samples_rows(x, xd)
        y, z = _forward_z_op(_rows(x, xd, batch), weight, bias, activation, act_params)
        return (y.view(batch, m, y.shape[-1]), z.view(batch, m, z.shape[-1])), (0, 0)
    return _each_sample(_forward_z_op, info, in_dims, (x, weight, bias, activation, act_params))


@_backward_input_op.register_vmap
def _backward_input_vmap(
    info, in_dims, dy, y, weight, activation, x, prev_activation, act_params=(), prev_params=()
):
    dyd, yd, wd, _, xd = in_dims[:5]
    args = (dy, y, weight, activation, x, prev_activation, act_params, prev_params)
    if wd is not None:
        return _each_sample(_backward_input_op, info, in_dims, args)
    batch = info.batch_size
    m = dy.shape[0] if dyd is None else _samples_rows(dy, dyd)
    dx = _backward_input_op(
        _rows(dy, dyd, batch), _rows(y, yd, batch), weight, activation, _rows(x, xd, batch),
        prev_activation, act_params, prev_params,
    )
    return dx.view(batch, m, dx.shape[-1]), 0


@_backward_weight_op.register_vmap
def _backward_weight_vmap(
    info, in_dims, dy, y, x, activation, need_bias, split, act_params=(), x_activation="identity",
    x_params=(), rows=None,
):
    dyd, yd, xd = in_dims[:3]
    batch = info.batch_size
    m = x.shape[0] if xd is None else _samples_rows(x, xd)
    if m == 0:
        args = (dy, y, x, activation, need_bias, split, act_params, x_activation, x_params, rows)
        return _each_sample(_backward_weight_op, info, in_dims, args)
    slice_rows, lead = _slice_rows(rows, m, batch)
    dw, db = _backward_weight_op(
        _rows(dy, dyd, batch), _rows(y, yd, batch), _rows(x, xd, batch), activation, need_bias, None,
        act_params, x_activation, x_params, slice_rows,
    )
    dw = dw.view(*lead, *dw.shape[-2:])
    if need_bias:
        return (dw, db.view(*lead, db.shape[-1])), (0, 0)
    return (dw, db), (0, None)


@_backward_op.register_vmap
def _backward_vmap(
    info, in_dims, dy, y, weight, x, activation, need_bias, prev_activation="identity", act_params=(),
    prev_params=(), split=None, rows=None,
):
    dyd, yd, wd, xd = in_dims[:4]
    batch = info.batch_size
    m = x.shape[0] if xd is None else _samples_rows(x, xd)
    if wd is not None or m == 0:
        args = (dy, y, weight, x, activation, need_bias, prev_activation, act_params, prev_params)
        return _each_sample(_backward_op, info, in_dims, (*args, split, rows))
    slice_rows, lead = _slice_rows(rows, m, batch)
    dx, dw, db = _backward_op(
        _rows(dy, dyd, batch), _rows(y, yd, batch), weight, _rows(x, xd, batch), activation, need_bias,
        prev_activation, act_params, prev_params, None, slice_rows,
    )
    dx, dw = dx.view(batch, m, dx.shape[-1]), dw.view(*lead, *dw.shape[-2:])
    if need_bias:
        return (dx, dw, db.view(*lead, db.shape[-1])), (0, 0, 0)
    return (dx, dw, db), (0, 0, None)


# --- the launchers' signatures, calling the registered ops -----------------------------------


def delta_once(dy: torch.Tensor, y: torch.Tensor, activation: str | Activation) -> tuple:
    """kernels.linear_act.delta_once's signature: the arguments unchanged. Each registered op
    forms its own D (an op's dy is in the layer's dtype, D in the accumulator's), so a compiled
    backward with a heavy activation forms D once per op: twice where it needs dX and dW."""
    return dy, y, activation


def linear_act_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | Activation
) -> torch.Tensor:
    """Y = act(x @ weight^T + bias) for a 2-D x (M, K): `torch.ops.fnn.linear_act_forward`."""
    return torch.ops.fnn.linear_act_forward(x, weight, bias, *_spec(activation))


def linear_act_forward_z(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | Activation
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, Z), Y = act(Z), Z = x @ weight^T + bias, from one kernel:
    `torch.ops.fnn.linear_act_forward_z`."""
    return torch.ops.fnn.linear_act_forward_z(x, weight, bias, *_spec(activation))


def linear_act_backward_input(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    activation: str | Activation,
    x: torch.Tensor | None = None,
    prev_activation: str | Activation = "identity",
) -> torch.Tensor:
    """dX = (dy * act'(Z)) @ weight, act' read off `y` (what the forward saved), times the previous
    layer's derivative read off `x` when `prev_activation` is not identity:
    `torch.ops.fnn.linear_act_backward_input`."""
    name, params = _spec(activation)
    prev_name, prev_params = _spec(prev_activation, "prev_activation")
    return torch.ops.fnn.linear_act_backward_input(dy, y, weight, name, x, prev_name, params, prev_params)


def linear_act_backward_weight(
    dy: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    activation: str | Activation,
    need_bias: bool,
    split: int | None = None,
    x_activation: str | Activation = "identity",
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dW = D^T @ X and db = sum of D over rows (None unless `need_bias`), D = dy * act'(Z) read off
    `y`; X = x, or x_activation(x) recomputed from the previous layer's Z (`rows`: per slice of
    that many rows): `torch.ops.fnn.linear_act_backward_weight`."""
    name, params = _spec(activation)
    x_name, x_params = _spec(x_activation, "x_activation")
    dw, db = torch.ops.fnn.linear_act_backward_weight(
        dy, y, x, name, need_bias, split, params, x_name, x_params, rows
    )
    return dw, (db if need_bias else None)


def linear_act_backward(
    dy: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    x: torch.Tensor,
    activation: str | Activation,
    need_bias: bool,
    prev_activation: str | Activation = "identity",
    split: int | None = None,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dX, dW, db) of a layer the fused kernel serves (kernels.configs.fused_backward_fits), from
    one kernel: `torch.ops.fnn.linear_act_backward`. `x` is the layer input (the previous
    layer's output where `prev_activation` is given: dX is then that layer's delta); `rows` as
    in linear_act_backward_weight."""
    name, params = _spec(activation)
    prev_name, prev_params = _spec(prev_activation, "prev_activation")
    dx, dw, db = torch.ops.fnn.linear_act_backward(
        dy, y, weight, x, name, need_bias, prev_name, params, prev_params, split, rows
    )
    return dx, dw, (db if need_bias else None)
