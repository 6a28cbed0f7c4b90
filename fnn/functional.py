"""Autograd Functions and the functional API.

Backends, chosen per call from the input's device (never at import time; fnn.dispatch):
- CUDA tensors run the compiled Triton kernels (kernels.linear_act);
- CPU tensors run them in Triton's interpreter when TRITON_INTERPRET=1 is set;
- otherwise CPU tensors run fnn.reference, the same maths in PyTorch ops.

The public entries (`linear_act`, `fnn_forward`, `LinearActFunction.apply`) check their
arguments once; the Functions then call the kernels' launchers through fnn.dispatch
(directly in eager mode, the registered `torch.ops.fnn.*` under torch.compile) without
checking again. Inference (no gradient needed) skips the autograd Function altogether.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch._C import _functorch
from torch._C._functorch import unwrap_if_dead
from torch._functorch.pyfunctorch import (
    retrieve_all_functorch_interpreters,
    retrieve_current_functorch_interpreter,
)
from torch.autograd import forward_ad
from torch.autograd.function import FunctionCtx

from kernels.checks import FLOAT_DTYPES, Activation, as_activation, check_linear_args
from kernels.configs import fused_backward_fits

from . import dispatch, programs, reference
from .dispatch import backend

__all__ = ["FNNFunction", "LinearActFunction", "backend", "fnn_forward", "linear_act", "linear_sigmoid"]

_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)
_FLOATS = frozenset(FLOAT_DTYPES)
_STRIDED = torch.strided
_any_autocast = torch._C._is_any_autocast_enabled
_grad_enabled = torch.is_grad_enabled
# A Function's output of another shape than the tensor its kernel wrote: a reshape that autograd
# does not treat as a view (as F.linear's own is), so that the output can be changed in place.
_unsafe_view = torch.ops.aten._unsafe_view.default


def _autocast(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Under torch.autocast for the first tensor's device, cast the tensors as F.linear's
    autocast would: float32/16 and bfloat16 to the autocast dtype (float64 stays). The casts are
    differentiable, so float32 parameters receive float32 gradients."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not dispatch.autocast_for(first.device.type):
        return list(tensors)
    dtype = torch.get_autocast_dtype(first.device.type)
    return [
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_CASTS else t
        for t in tensors
    ]


# Activations by name, made once (an Activation is immutable): the plain names need no parsing.
_NAMED: dict[str, Activation] = {}


def _activation(activation: object) -> Activation | None:
    """`activation` as an Activation if it is one or a known name, else None (then the full
    check says what is wrong)."""
    if activation.__class__ is Activation:
        return activation  # type: ignore[return-value]
    act = _NAMED.get(activation) if activation.__class__ is str else None  # type: ignore[arg-type]
    if act is None:
        try:
            act = as_activation(activation)
        except (TypeError, ValueError):
            return None
        if activation.__class__ is str:
            _NAMED[activation] = act  # type: ignore[index]
    return act


def _linear_ok(x: object, weight: object, bias: object) -> bool:
    """A few attribute reads that are True only for arguments check_linear_args accepts (a
    float x (..., K), weight (N, K) with N, K > 0, bias (N,) or None, one dtype and device).
    False sends the call to check_linear_args, which raises the error that names the problem."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    dtype = weight.dtype
    if x.dtype is not dtype or dtype not in _FLOATS or weight.dim() != 2 or x.dim() == 0:
        return False
    if x.layout is not _STRIDED or weight.layout is not _STRIDED:  # sparse, mkldnn: raise
        return False
    n, k = weight.shape
    if x.shape[-1] != k or n == 0 or k == 0:
        return False
    device = weight.device
    if x.device != device:
        return False
    if bias is None:
        return True
    return (
        isinstance(bias, torch.Tensor)
        and bias.dtype is dtype
        and bias.dim() == 1
        and bias.shape[0] == n
        and bias.device == device
        and bias.layout is _STRIDED
    )


def has_tangents(tensors) -> bool:
    """Whether a tensor carries a forward-mode tangent (torch.func.jvp, jacfwd, hessian,
    forward_ad.dual_level). Such a call runs layer by layer through _FuncLinearAct, whose jvp
    gives the tangent: the kernels' ops would drop it. Called where forward_ad._current_level
    >= 0 only."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None:
            return True
    return False


def _check_linear(x, weight, bias, activation, who: str = "fnn.linear_act") -> Activation:
    """check_linear_args, cheap when the arguments are good; returns the Activation."""
    act = _activation(activation)
    if act is None or not _linear_ok(x, weight, bias):
        check_linear_args(x, weight, bias, activation, who=who)  # raises, naming the problem
        act = as_activation(activation)
    return act


_C_APPLY = torch._C._FunctionBase.__dict__["apply"]
_functorch_active = torch._C._are_functorch_transforms_active
_is_compiling = torch.compiler.is_compiling
_Tensor = torch.Tensor


# torch.compile of a torch.func transform over fnn. Dynamo traces the transform's own Python
# and fnn inside it, but not faithfully (torch 2.11 to 2.13): a GradTrackingTensor reads as not
# requiring grad, a forward-mode tangent is not seen, and an autograd.Function's forward runs
# on the transform's wrapped tensors, which a registered op refuses. fnn's kernels would then
# fail, or (jvp) give a wrong tangent without an error; a graph break does not help (Dynamo
# then compiles the transformed function's own frame, on wrapped tensors, and fails). So
# there fnn's public entries trace their layers as PyTorch ops (fnn.reference: F.linear and
# the activation), which Dynamo and the transform handle like any model's. One vmap of a
# call that needs no gradient traces correctly and keeps the kernels.
_VMAP = _functorch.TransformType.Vmap


def _traced_transform(tensors) -> bool:
    """Whether torch.compile is tracing fnn under a transform it cannot trace the kernels
    through: forward AD, or any functorch transform but one vmap level over a call that needs
    no gradient (`tensors`: the call's)."""
    functorch, forward = _functorch_active(), forward_ad._current_level >= 0
    if not (functorch or forward) or not _is_compiling():
        return False
    if forward or not functorch:
        return True
    top = retrieve_current_functorch_interpreter()
    if top.key() != _VMAP or top.level() != 1:
        return True
    return _grad_enabled() and any(isinstance(t, _Tensor) and t.requires_grad for t in tensors)


def _traced_layers(x, weights, biases, acts) -> torch.Tensor:
    """Checked layers as fnn.reference's PyTorch ops, autocast off (the tensors already cast:
    the output keeps their dtype, as the kernels' does), for `_traced_transform` calls."""
    with _autocast_off(x):
        return reference.fnn_forward(x, weights, biases, acts)


def fast_apply(cls: type[torch.autograd.Function], module_parameters: bool = False, functorch=None):
    """`cls.apply` without the Python layer of torch.autograd.Function.apply where it has
    nothing to do: no functorch transform active and no torch.compile tracing (else the full
    apply, which Dynamo traces: before torch 2.13 it cannot trace the C apply). Under a
    functorch transform, `functorch` (same arguments) when given, else the full apply.
    What that layer does besides, unwrapping dead functorch wrappers, is done here too: for
    every tensor argument, or, with `module_parameters` (the other tensors are a module's own
    parameters, which a finished transform leaves as they were), for the first only. For
    Functions without setup_context (all of fnn's but _FuncLinearAct)."""
    c_apply = _C_APPLY.__get__(None, cls)
    full = cls.apply
    transformed = functorch or full
    if module_parameters:

        def apply(x, *args):
            if _functorch_active():
                return transformed(x, *args)
            if _is_compiling():
                return full(x, *args)
            return c_apply(unwrap_if_dead(x), *args)

        return apply

    def apply_all(*args):
        if _functorch_active():
            return transformed(*args)
        if _is_compiling():
            return full(*args)
        return c_apply(*[unwrap_if_dead(a) if isinstance(a, _Tensor) else a for a in args])

    return apply_all


def _ops(t: torch.Tensor):
    """The per-layer launchers serving `t`'s device (fnn.dispatch.layer_ops)."""
    return dispatch.layer_ops(t.device)


# Differentiable backwards. A backward that runs the kernels gives gradients autograd cannot
# differentiate. Under create_graph=True (or an enclosing torch.func transform), wherever dY or
# a saved input requires grad, the Functions below compute the same gradients from PyTorch ops
# instead (`graph` backwards), on the saved tensors that are connected to the graph: the
# inputs x, W, b and a saved output Y, never an intermediate (Z, a hidden layer's output),
# which the forward made outside the graph.


def _requires_grad(tensors) -> bool:
    """Whether one of the tensors (None allowed) requires grad."""
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _keep(ctx: FunctionCtx, tensors: tuple) -> None:
    """Keep the inputs a differentiable backward needs beyond what the kernels' backward saves
    (the biases, x where the kernels read a reshape of it, x and W for a Z-saving layer), with
    their versions: as attributes, not saved, so that an in-place change of one fails only a
    differentiable backward (`_kept`), never the usual one, which does not read it."""
    ctx.kept = tensors
    if _is_compiling():  # a version is data to Dynamo; a compiled backward is never differentiable
        ctx.kept_versions = [None] * len(tensors)
    else:
        ctx.kept_versions = [None if t is None else t._version for t in tensors]


def _kept(ctx: FunctionCtx) -> tuple:
    """What `_keep` kept, after checking that none was changed in place since the forward."""
    for t, version in zip(ctx.kept, ctx.kept_versions, strict=True):
        if version is not None and t._version != version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: a {tuple(t.shape)} {t.dtype} input of fnn's "
                f"{type(ctx).__name__.removesuffix('Backward')} is at version {t._version}; "
                f"expected version {version} instead (fnn's differentiable backward, "
                f"create_graph=True, reads it)"
            )
    return ctx.kept


def _autocast_off(t: torch.Tensor):
    """No autocast for the graph backwards' ops: the saved tensors are already in the dtypes
    the forward ran in."""
    if dispatch.autocast_on(t):
        return torch.autocast(t.device.type, enabled=False)
    return nullcontext()


def _with_graph(graph):
    """Decorator of a Function's kernel backward: in autograd's usual backward (grad mode off)
    the kernels; under create_graph, `graph(ctx, dy)` where dY or a saved or kept (`_keep`)
    tensor requires grad (gradients that autograd can differentiate again), else the kernels
    under no_grad."""

    def decorate(fn):
        def backward(ctx, *grads):
            if not _grad_enabled():
                return fn(ctx, *grads)
            if not _is_compiling() and _requires_grad((*ctx.saved_tensors, *ctx.kept, *grads)):
                with _autocast_off(grads[0]):
                    return graph(ctx, *grads)
            with torch.no_grad():
                return fn(ctx, *grads)

        backward.__doc__ = fn.__doc__
        backward.kernels = fn  # the kernel backward itself
        return backward

    return decorate


def _delta_graph(g: torch.Tensor, s: torch.Tensor, act: Activation) -> torch.Tensor:
    """reference.delta(g, s, act) by ops that have derivatives (aten.silu_backward has none:
    PyTorch's own composite form then)."""
    if act.name == "silu":
        sig = torch.sigmoid(s)
        return g * sig * (1 + s * (1 - sig))
    return reference.delta(g, s, act)


def _graph_layer(dy, x, weight, bias, s, act: Activation, needs) -> tuple:
    """One layer's (dX, dW, db) from PyTorch ops (differentiable): D = reference.delta(dY, S),
    S the saved output Y, or Z recomputed from x, W and b for an activation that saves Z (the
    saved Z is outside the graph). `needs`: which of dX, dW, db to compute; x is None where
    only dX is, W where dX is not."""
    k = (weight if x is None else x).shape[-1]
    dy2d = _rows2d(dy)
    if act.saves == "z":
        s2d = F.linear(_rows2d(x), weight, bias)
    else:
        s2d = dy2d if act.saves == "none" else _rows2d(s)
    d = _delta_graph(dy2d, s2d, act)
    dx = (d @ weight).reshape(*dy.shape[:-1], k) if needs[0] else None
    dw = d.t() @ _rows2d(x) if needs[1] else None
    db = d.sum(0) if needs[2] else None
    return dx, dw, db


def _interleave(weights: Sequence, biases: Sequence) -> list:
    """[w_1, b_1, ..., w_L, b_L], the order fnn's Functions take the parameters in."""
    return [t for pair in zip(weights, biases, strict=True) for t in pair]


def _graph_network(dy, x, weights, biases, acts, needs) -> list:
    """A network's gradients (x, w_1, b_1, ..., w_L, b_L; None where `needs` says no) by
    recomputing its forward in PyTorch ops from the saved inputs and differentiating that
    with create_graph: differentiable to any order PyTorch's own layers are."""
    inputs = (x, *_interleave(weights, biases))
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs, strict=True)) if need and t is not None]
    if not wanted:
        return [None] * len(inputs)
    with torch.enable_grad():
        out = reference.fnn_forward(x, weights, biases, acts)
        got = torch.autograd.grad(out, [inputs[i] for i in wanted], dy, create_graph=True, allow_unused=True)
    grads: list = [None] * len(inputs)
    for i, g in zip(wanted, got, strict=True):
        grads[i] = torch.zeros_like(inputs[i]) if g is None else g
    return grads


_GRAD_TRANSFORMS = (_functorch.TransformType.Grad, _functorch.TransformType.Jvp)


def _outer_differentiates(saved, grads) -> bool:
    """Under a torch.func transform, in the backward of a Function that has setup_context:
    whether something outside the backward's own level will differentiate its gradients: an
    enclosing grad, vjp, jacrev, jvp or jacfwd (a grad-type level alive besides the one the
    saved tensors are wrapped at, which is dead after vjp), or plain autograd on the tensors
    underneath (a leaf that requires grad)."""
    first = next(t for t in saved if t is not None)
    own = _functorch.maybe_get_level(first) if _functorch.is_gradtrackingtensor(first) else None
    levels = [i.level() for i in retrieve_all_functorch_interpreters() if i.key() in _GRAD_TRANSFORMS]
    if len(levels) > (1 if own in levels else 0):
        return True
    for t in (*saved, *grads):
        if t is None:
            continue
        while _functorch.is_functorch_wrapped_tensor(t):
            t = _functorch.get_unwrapped(t)
        if t.requires_grad:
            return True
    return False


def _linear_forward(ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias, act: Activation):
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    ops = _ops(x)
    flat = x.dim() == 2
    x2d = x if flat else _rows2d(x)
    n = weight.shape[0]
    saves = act.saves
    if saves == "z" and (need_x or need_w or need_b):
        y, saved = ops.linear_act_forward_z(x2d, weight, bias, act)
        if not flat:
            y = _unsafe_view(y, (*x.shape[:-1], n))
    else:
        y = ops.linear_act_forward(x2d, weight, bias, act)
        if not flat:
            y = _unsafe_view(y, (*x.shape[:-1], n))
        saved = y if saves == "y" else None
    ctx.save_for_backward(x2d if (need_w or need_b) else None, weight if need_x else None, saved)
    # For a differentiable backward: Z is outside the graph, so recomputed from x, W and b; x2d
    # is outside it where it is a reshape of x.
    if saves == "z":
        _keep(ctx, (x, weight, bias))
    else:
        _keep(ctx, (None if flat or not (need_w or need_b) else x, None, None))
    ctx.activation = act
    ctx.x_shape = x.shape
    ctx.n_out = n
    return y


class LinearActFunction(torch.autograd.Function):
    """Y = act(Z), Z = X W^T + b, saving no more than the backward needs.

    Backward, with D = dY * act'(Z) read off the saved tensor S:
        dX = D W,   dW = D^T X,   db = sum over rows of D,
    from one kernel when all are needed and W fits its tile (kernels.configs.fused_backward_fits:
    in and out features up to 64, 32 in float64), else from two.
    S is Y for activations whose derivative the output tells (sigmoid, relu, tanh, leaky_relu,
    elu, softplus at their usual parameters), Z for gelu, gelu_tanh and silu (and elu with
    alpha < 0, leaky_relu with a negative slope, softplus with threshold < 17: see
    fnn.Activation), nothing for identity. Z is written by the forward kernel as a second
    output only when a gradient will be needed. X is saved only when dW or db is needed, W
    only when dX is, except with Z: then X, W and b too. Only the gradients
    `ctx.needs_input_grad` asks for are computed.
    Under create_graph=True, where dY or a saved tensor requires grad, the backward computes
    the same formulas with PyTorch ops instead (differentiable: double backward), D read off
    the saved Y, or off Z recomputed from X, W and b (the saved Z is outside the graph).
    Call as `LinearActFunction.apply(x, weight, bias, activation)` (a name or an fnn.Activation);
    the arguments are checked as fnn.linear_act checks them.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        activation: str | Activation,
    ) -> torch.Tensor:
        return _linear_forward(ctx, x, weight, bias, _check_linear(x, weight, bias, activation))

    @staticmethod
    def _graph(ctx: FunctionCtx, dy: torch.Tensor):
        x2d, weight, saved = ctx.saved_tensors
        x, w, bias = _kept(ctx)
        x, weight = (x2d if x is None else x), (weight if w is None else w)
        return *_graph_layer(dy, x, weight, bias, saved, ctx.activation, ctx.needs_input_grad), None

    @staticmethod
    @_with_graph(lambda ctx, dy: LinearActFunction._graph(ctx, dy))
    def backward(ctx: FunctionCtx, dy: torch.Tensor):
        x2d, weight, saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ops = _ops(dy)
        n = ctx.n_out
        dy2d = _rows2d(dy)
        s2d = dy2d if saved is None else _rows2d(saved)  # identity reads none
        dx = dw = db = None
        act = ctx.activation
        if need_x and (need_w or need_b):
            if fused_backward_fits(n, weight.shape[1], weight.dtype):  # dX, dW, db from one kernel
                dx, dw, db = ops.linear_act_backward(dy2d, s2d, weight, x2d, act, need_b)
                if dy.dim() != 2:
                    dx = dx.view(ctx.x_shape)
                return dx, (dw if need_w else None), db, None
            dy2d, s2d, act = ops.delta_once(dy2d, s2d, act)  # a heavy activation's D once for both
        if need_x:
            dx = ops.linear_act_backward_input(dy2d, s2d, weight, act)
            if dy.dim() != 2:
                dx = dx.view(ctx.x_shape)
        if need_w or need_b:
            dw, db = ops.linear_act_backward_weight(dy2d, s2d, x2d, act, need_b)
            dw = dw if need_w else None
        return dx, dw, db, None


class _CheckedLinearAct(LinearActFunction):
    """LinearActFunction for arguments fnn.linear_act has checked: its forward checks nothing."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        return _linear_forward(ctx, x, weight, bias, activation)


class _FuncLinearAct(torch.autograd.Function):
    """LinearActFunction for torch.func's transforms (grad, vjp, jacrev, vmap of them), which
    take only Functions whose forward has no ctx (the saving is in setup_context). Checked
    arguments, `activation` an Activation. The forward runs the ops fnn.dispatch picks (the
    registered ones while a transform is active at its level) and returns Y, or (Y, Z) for an
    activation that saves Z (Z not differentiable); the backward is LinearActFunction's, on
    the same saved tensors (x, W, b and Y or Z: a transform always needs a gradient), its
    kernels unless something outside the transform's own level differentiates the gradients
    (jacrev of jacrev, hessian: then LinearActFunction's differentiable form). `jvp` gives
    forward mode (torch.func.jvp, jacfwd, hessian, forward_ad), in PyTorch ops: plain
    forward-mode calls of fnn come here too. vmap batches the ops by their own rules
    (fnn/ops.py): the samples as more rows where the parameters are shared."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, activation):
        x2d = _rows2d(x)
        ops = _ops(x)
        if activation.saves == "z":
            y, z = ops.linear_act_forward_z(x2d, weight, bias, activation)
            return _unsafe_view(y, (*x.shape[:-1], weight.shape[0])), z
        y = ops.linear_act_forward(x2d, weight, bias, activation)
        return _unsafe_view(y, (*x.shape[:-1], weight.shape[0]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, activation = inputs
        if activation.saves == "z":
            y, saved = output
            ctx.mark_non_differentiable(saved)
        else:
            saved = output if activation.saves == "y" else None
        ctx.save_for_backward(x, weight, saved, bias)
        ctx.save_for_forward(x, weight, saved, bias)
        ctx.activation = activation

    @staticmethod
    def jvp(ctx, tx, tw, tb, _):
        """Forward mode: dY = act'(Z) * dZ, dZ = dx W^T + x dW^T + db (the delta rule, with dZ in
        the place of the gradient), in PyTorch ops: differentiable. Z gets no tangent: it is
        marked not differentiable."""
        x, weight, saved, _bias = ctx.saved_tensors
        act = ctx.activation
        tz = None
        for term in (
            None if tx is None else F.linear(tx, weight),
            None if tw is None else F.linear(x, tw),
            tb,
        ):
            if term is not None:  # autograd calls jvp only when one tangent is there
                tz = term if tz is None else tz + term
        if act.saves == "z":
            z = saved.view(tz.shape)
            return _delta_graph(tz, z, act), None  # Z: not differentiable
        return _delta_graph(tz, tz if saved is None else saved, act)

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, saved, bias = ctx.saved_tensors
        if (
            _outer_differentiates((x, weight, saved, bias), (dy,))  # jacrev of jacrev, hessian, ...
            if _functorch_active()
            else _grad_enabled() and _requires_grad((x, weight, saved, bias, dy))  # create_graph
        ):
            with _autocast_off(dy):
                return *_graph_layer(dy, x, weight, bias, saved, ctx.activation, ctx.needs_input_grad), None
        n = weight.shape[0]
        as_saved = SimpleNamespace(  # what LinearActFunction's forward would have saved
            saved_tensors=(_rows2d(x), weight, None if saved is None else _rows2d(saved)),
            needs_input_grad=ctx.needs_input_grad,
            activation=ctx.activation,
            n_out=n,
            x_shape=x.shape,
        )
        with torch.no_grad():
            return LinearActFunction.backward.kernels(as_saved, dy)


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    """t (..., n), n > 0, as (rows, n). The row count is spelled out: under vmap, a reshape to
    -1 rows of a batch of no samples is ambiguous (PyTorch's batching rule refuses it)."""
    return t if t.dim() == 2 else t.reshape(t.numel() // t.shape[-1], t.shape[-1])


def _func_linear_act(x, weight, bias, act: Activation) -> torch.Tensor:
    """_FuncLinearAct's Y."""
    if act.saves == "z":
        return _FuncLinearAct.apply(x, weight, bias, act)[0]
    return _FuncLinearAct.apply(x, weight, bias, act)


def _func_layers(x, acts, params) -> torch.Tensor:
    """A network under a functorch transform: layer by layer through _FuncLinearAct
    (`params` w_1, b_1, ..., `acts` Activations)."""
    h = x
    for i, act in enumerate(acts):
        h = _func_linear_act(h, params[2 * i], params[2 * i + 1], act)
    return h


_checked_linear_act = fast_apply(_CheckedLinearAct, functorch=_func_linear_act)


def _fnn_forward(ctx: FunctionCtx, x: torch.Tensor, acts: tuple, saves: tuple, has_bias: tuple, params):
    """FNNFunction's forward: `acts` as Activations, `saves` their `.saves`, `has_bias` a flag
    per layer, `params` (w_1, b_1, ..., w_L, b_L)."""
    weights = params[0::2]
    need = True in ctx.needs_input_grad
    ops = _ops(x)
    flat = x.dim() == 2
    x2d = h = x if flat else _rows2d(x)
    saved: list[torch.Tensor | None] = []
    last = len(acts) - 1
    for i, act in enumerate(acts):
        keeps = saves[i]
        if need and keeps == "z":
            h, z = ops.linear_act_forward_z(h, params[2 * i], params[2 * i + 1], act)
            saved.append(z)
        else:
            h = ops.linear_act_forward(h, params[2 * i], params[2 * i + 1], act)
            saved.append(h if keeps == "y" or (keeps == "none" and i < last) else None)
    out = h if flat else _unsafe_view(h, (*x.shape[:-1], h.shape[-1]))  # a reshape only if needed
    if saved[-1] is h:
        saved[-1] = out  # the output itself, as autograd expects a saved output to be
    ctx.save_for_backward(x2d, *saved, *weights)
    _keep(ctx, (None if flat else x, *params[1::2]))  # for a differentiable backward (_graph)
    ctx.activations = acts
    ctx.has_bias = has_bias
    ctx.x_shape = x.shape
    return out


class FNNFunction(torch.autograd.Function):
    """A whole feed-forward network as one autograd node.

    Forward: h_0 = X, h_l = act_l(Z_l), Z_l = h_{l-1} W_l^T + b_l. Saves X, every W_l and, per
    layer, one tensor S_l: h_l where act_l's derivative is read off its output; Z_l where it
    saves Z (gelu, gelu_tanh, silu, ...; see fnn.Activation), and then h_l is not kept: the
    next layer's weight-gradient kernel recomputes it on load as act_l(Z_l); h_l for a hidden
    identity layer (the next layer's input), nothing for an identity last layer. So a network
    saves as much as a sigmoid network of the same widths, whatever its activations.
    Backward, with D_L = dY * act_L'(Z_L) read off S_L:
        dW_l = D_l^T h_{l-1},   db_l = sum over rows of D_l,
        D_{l-1} = (D_l W_l) * act_{l-1}'(Z_{l-1}), read off S_{l-1} (in the epilogue of the dX kernel),
        dX = D_1 W_1.
    A layer whose W fits the fused kernel's tile, below a layer whose derivative its output
    tells (kernels.configs.fused_backward_fits), takes dW_l, db_l and D_{l-1} (or dX) from one
    kernel. No elementwise kernel runs between layers. Under create_graph=True, where dY or a
    saved tensor requires grad, the backward recomputes the network with PyTorch ops from X
    and the parameters and differentiates that (double backward). Call as
    `FNNFunction.apply(x, activations, w_1, b_1, ..., w_L, b_L)` (a bias may be None; an
    activation is a name or an fnn.Activation); `fnn_forward` checks the arguments first.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, activations: tuple[str | Activation, ...], *params
    ) -> torch.Tensor:
        acts = tuple(a if a.__class__ is Activation else as_activation(a) for a in activations)
        saves = tuple(a.saves for a in acts)
        return _fnn_forward(ctx, x, acts, saves, tuple(b is not None for b in params[1::2]), params)

    @staticmethod
    def _graph(ctx: FunctionCtx, dy: torch.Tensor):
        n_layers = len(ctx.activations)
        saved = ctx.saved_tensors
        x, *biases = _kept(ctx)
        x, weights = (saved[0] if x is None else x), saved[n_layers + 1 :]
        needs = ctx.needs_input_grad
        dx, *grads = _graph_network(dy, x, weights, biases, ctx.activations, (needs[0], *needs[2:]))
        return (dx, None, *grads)

    @staticmethod
    @_with_graph(lambda ctx, dy: FNNFunction._graph(ctx, dy))
    def backward(ctx: FunctionCtx, dy: torch.Tensor):
        acts = ctx.activations
        n_layers = len(acts)
        saved = ctx.saved_tensors
        x2d = saved[0]
        ss = list(saved[1 : n_layers + 1])  # S_1..S_L (None where nothing is saved)
        weights = saved[n_layers + 1 :]
        needs = ctx.needs_input_grad
        need_w = [needs[2 + 2 * i] for i in range(n_layers)]
        need_b = [needs[3 + 2 * i] and ctx.has_bias[i] for i in range(n_layers)]
        n_out = weights[-1].shape[0]
        flat = dy.dim() == 2
        if ss[-1] is not None and not flat:
            ss[-1] = ss[-1].reshape(-1, n_out)
        g, g_act = (dy if flat else dy.reshape(-1, n_out)), acts[-1]
        ops = _ops(dy)
        grads: list[torch.Tensor | None] = [None] * (2 * n_layers)
        dx = None
        for i in reversed(range(n_layers)):
            s_i, w_i = ss[i], weights[i]
            s_i = g if g_act.saves == "none" or s_i is None else s_i  # never read then
            wants_dx = needs[0] or any(need_w[:i]) or any(need_b[:i])  # dX, or layer i-1's delta
            prev = _IDENTITY if i == 0 else acts[i - 1]
            if wants_dx and (need_w[i] or need_b[i]):
                if fused_backward_fits(w_i.shape[0], w_i.shape[1], w_i.dtype, prev):  # one kernel
                    x_i = x2d if i == 0 else ss[i - 1]  # layer i's input: prev saves its output
                    g, dw, db = ops.linear_act_backward(g, s_i, w_i, x_i, g_act, need_b[i], prev)
                    grads[2 * i] = dw if need_w[i] else None
                    grads[2 * i + 1] = db
                    if i == 0:
                        dx = g if flat else g.view(ctx.x_shape)
                    g_act = _IDENTITY  # g is now D_{i-1}: the delta is already applied
                    continue
                g, s_i, g_act = ops.delta_once(g, s_i, g_act)  # a heavy activation's D once for both
            if need_w[i] or need_b[i]:
                if i == 0:
                    x_i, x_act = x2d, _IDENTITY
                else:  # layer i's input: S_{i-1}, or act_{i-1}(S_{i-1}) when that is Z
                    x_i = ss[i - 1]
                    x_act = acts[i - 1] if acts[i - 1].saves == "z" else _IDENTITY
                dw, db = ops.linear_act_backward_weight(g, s_i, x_i, g_act, need_b[i], None, x_act)
                grads[2 * i] = dw if need_w[i] else None
                grads[2 * i + 1] = db
            if i == 0:
                if needs[0]:
                    dx = ops.linear_act_backward_input(g, s_i, w_i, g_act)
                    if not flat:
                        dx = dx.view(ctx.x_shape)
            elif wants_dx:
                g = ops.linear_act_backward_input(g, s_i, w_i, g_act, x=ss[i - 1], prev_activation=prev)
                g_act = _IDENTITY  # g is now D_{i-1}: the delta is already applied
            else:
                break
        return (dx, None, *grads)


class _PlannedFNN(FNNFunction):
    """FNNFunction for an FNN whose arguments FNN.forward has checked: `apply(x, plan, *params)`,
    the activations and flags read off its plan (fnn.plan)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, p, *params) -> torch.Tensor:
        return _fnn_forward(ctx, x, p.acts, p.saves, p.biased, params)


class _EagerLayers(FNNFunction):
    """FNNFunction for an FNN on the layer path in plain eager mode (`use_registered_ops()`
    False), the kernels serving its device, a non-empty batch, arguments FNN.forward has
    checked: `apply(x, program, *params)`, `program` the plan's launch program for this call
    (fnn.programs). The same launches with the same arguments as _PlannedFNN, each one's
    arguments worked out once per program; so is the backward, except under create_graph or a
    dispatch mode (then FNNFunction's, from the same saved tensors)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, prog, *params) -> torch.Tensor:
        flat = x.dim() == 2
        x2d = x if flat else _rows2d(x)
        h, saved = prog.run_forward(x2d, params)
        out = h if flat else _unsafe_view(h, (*x.shape[:-1], h.shape[-1]))  # a reshape only if needed
        if saved[-1] is h:
            saved[-1] = out  # the output itself, as autograd expects a saved output to be
        ctx.save_for_backward(x2d, *saved, *params[0::2])
        kept = ctx.kept = (None if flat else x, *params[1::2])  # _keep, for a plain eager call
        ctx.kept_versions = [None if t is None else t._version for t in kept]
        ctx.program = prog
        ctx.x_shape = x.shape
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, dy: torch.Tensor):
        prog = ctx.program
        p = prog.plan
        if _grad_enabled() or dispatch.use_registered_ops():  # create_graph, a mode or a transform
            ctx.activations, ctx.has_bias = p.acts, p.biased
            return FNNFunction.backward(ctx, dy)
        n_layers = len(p.acts)
        saved = ctx.saved_tensors
        ss = list(saved[1 : n_layers + 1])
        weights = saved[n_layers + 1 :]
        flat = dy.dim() == 2
        dy_in = dy
        if not flat:
            dy = dy.reshape(-1, p.sizes[-1])
            if ss[-1] is not None:
                ss[-1] = ss[-1].reshape(-1, p.sizes[-1])
        if not prog.reads(saved[0], ss, weights):  # saved tensors given back in another layout
            ctx.activations, ctx.has_bias = p.acts, p.biased
            return FNNFunction.backward(ctx, dy_in)
        steps = prog.backward(ctx.needs_input_grad, dy.stride())
        dx, grads = prog.run_backward(steps, dy, saved[0], ss, weights)
        if dx is not None and not flat:
            dx = dx.view(ctx.x_shape)
        return (dx, None, *grads)


_IDENTITY = as_activation("identity")
_fnn_apply = fast_apply(
    FNNFunction, functorch=lambda x, acts, *params: _func_layers(x, [as_activation(a) for a in acts], params)
)
_planned_fnn = fast_apply(
    _PlannedFNN, module_parameters=True, functorch=lambda x, p, *params: _func_layers(x, p.acts, params)
)
_eager_layers = _C_APPLY.__get__(None, _EagerLayers)


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | Activation = "sigmoid",
) -> torch.Tensor:
    """act(x @ weight^T + bias), a drop-in for `act(F.linear(x, weight, bias))`.

    x: (..., in_features) or (in_features,); weight: (out_features, in_features);
    bias: (out_features,) or None; activation: a name ("sigmoid", "relu", "tanh", "identity",
    "leaky_relu", "elu", "softplus", "gelu", "gelu_tanh", "silu", with torch's default
    parameters) or an fnn.Activation such as `Activation("leaky_relu", negative_slope=0.2)`.
    Returns (..., out_features) in x's dtype. Gradients flow to x, weight and bias:
    with D = dY * act'(Z), dx = D weight, dweight = D^T x, dbias = sum over rows of D
    (act' read off the saved output, or off the saved Z: see LinearActFunction).
    Under torch.autocast the tensors are first cast to the autocast dtype, as F.linear's are.
    """
    if _any_autocast():
        x, weight, bias = _autocast((x, weight, bias))
    cls = activation.__class__
    act = activation if cls is Activation else _NAMED.get(activation) if cls is str else None  # type: ignore
    if act is None or not _linear_ok(x, weight, bias):
        act = _check_linear(x, weight, bias, activation)
    if _functorch_active() or forward_ad._current_level >= 0:  # a transform, forward mode
        if _traced_transform((x, weight, bias)):
            return _traced_layers(x, (weight,), (bias,), (act,))
        if forward_ad._current_level >= 0 and has_tangents((x, weight, bias)):
            return _func_linear_act(x, weight, bias, act)  # forward mode: its jvp
    if _grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _checked_linear_act(x, weight, bias, act)
    # inference: one kernel, nothing saved, no Z, no autograd node
    if x.dim() == 2:
        return _ops(x).linear_act_forward(x, weight, bias, act)
    y = _ops(x).linear_act_forward(_rows2d(x), weight, bias, act)
    return y.view(*x.shape[:-1], weight.shape[0])


def linear_sigmoid(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """sigmoid(x @ weight^T + bias): `linear_act` with the sigmoid activation.

    Backward: D = dY * Y (1 - Y), dx = D weight, dweight = D^T x, dbias = sum over rows of D.
    """
    return linear_act(x, weight, bias, "sigmoid")


def _layers_ok(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> bool:
    """Layers 1.. chain on layer 0 (each weight's in_features the previous out_features, one
    dtype and device, biases of the right shape): a few attribute reads per layer."""
    w0 = weights[0]
    dtype, device, n = w0.dtype, w0.device, w0.shape[0]
    for w, b in zip(weights[1:], biases[1:], strict=True):
        if not (
            isinstance(w, torch.Tensor)
            and w.dtype is dtype
            and w.dim() == 2
            and w.shape[1] == n
            and w.shape[0] > 0
            and w.device == device
            and w.layout is _STRIDED
        ):
            return False
        n = w.shape[0]
        if b is not None and not (
            isinstance(b, torch.Tensor)
            and b.dtype is dtype
            and b.dim() == 1
            and b.shape[0] == n
            and b.device == device
            and b.layout is _STRIDED
        ):
            return False
    return True


def check_layers(
    x: object,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str | Activation],
) -> list[Activation]:
    """Check a network's arguments as check_linear_args checks one layer (layer l's input being
    layer l-1's output); cheap when they are good. Returns the activations as Activations."""
    acts = []
    for a in activations:
        act = _activation(a)
        if act is None:
            break
        acts.append(act)
    else:
        if _linear_ok(x, weights[0], biases[0]) and _layers_ok(weights, biases):
            return acts
    for i, (w, b, a) in enumerate(zip(weights, biases, activations, strict=True)):
        who = f"layer {i} of the network"
        check_linear_args(layer_input(x, weights, i, who), w, b, a, who=who)
    return [as_activation(a) for a in activations]


def layer_input(x: torch.Tensor, weights: Sequence[object], i: int, who: str) -> torch.Tensor:
    """Layer i's input as check_linear_args checks it: x for layer 0, else an empty batch of
    layer i - 1's outputs, once a width that does not chain has raised an error naming both
    layers (check_linear_args would name the empty batch, which is not the caller's x)."""
    if i == 0:
        return x
    prev, w = weights[i - 1], weights[i]
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] != prev.shape[0]:
        raise ValueError(
            f"{who}: weight has in_features={w.shape[1]} (shape {tuple(w.shape)}) but layer {i - 1} "
            f"has out_features={prev.shape[0]} (weight shape {tuple(prev.shape)}): each layer's "
            "in_features must be the previous layer's out_features"
        )
    return x.new_empty((0, prev.shape[0]))


def _needs_grad(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
) -> bool:
    """Whether autograd records a call on these tensors (grad mode on, one requiring grad)."""
    if not _grad_enabled():
        return False
    if x.requires_grad:
        return True
    for w in weights:
        if w.requires_grad:
            return True
    for b in biases:
        if b is not None and b.requires_grad:
            return True
    return False


def run_layers(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    acts: Sequence[Activation],
    plan=None,
) -> torch.Tensor:
    """fnn_forward for checked arguments (no autocast cast; `acts` are Activations): the
    Function when a gradient is needed, else the launchers alone. `plan`: the FNN's plan
    (fnn.plan) when the tensors are its own input and parameters."""
    if _needs_grad(x, weights, biases):
        params = _interleave(weights, biases)
        if plan is not None:
            return _planned_fnn(x, plan, *params)
        return _fnn_apply(x, tuple(acts), *params)
    # inference: no autograd node, nothing saved
    ops = _ops(x)
    flat = x.dim() == 2
    h = x if flat else _rows2d(x)
    for w, b, a in zip(weights, biases, acts, strict=True):
        h = ops.linear_act_forward(h, w, b, a)
    return h if flat else h.view(*x.shape[:-1], h.shape[-1])


def run_program(x: torch.Tensor, p) -> torch.Tensor | None:
    """An FNN's layer path through its plan's launch program (fnn.programs.layer_call: plain
    eager mode, the kernels serving x's device, a non-empty batch, plain tensors of one dtype
    and device, the plan's shapes; x's width already checked): the output, or None where the
    call is not such a one (then run_layers, or fnn_forward, serves it)."""
    call = programs.layer_call(p, x)
    if call is None:
        return None
    prog, x2d, params, need = call
    if need:
        return _eager_layers(unwrap_if_dead(x), prog, *params)
    h = prog.run_forward(x2d, params)[0]  # inference: no autograd node, nothing saved
    return h if x2d is x else h.view(*x.shape[:-1], h.shape[-1])


def fnn_forward(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str | Activation],
) -> torch.Tensor:
    """Run a feed-forward network through FNNFunction (one autograd node for all layers).

    Layer l computes act_l(h @ weights[l]^T + biases[l]); every argument is checked first.
    The backward is FNNFunction's (D_l = dh_l * act_l'(Z_l), dW_l = D_l^T h_{l-1}, ...).
    Under torch.autocast every tensor is first cast to the autocast dtype, as F.linear's are.
    """
    if not (len(weights) == len(biases) == len(activations)) or not weights:
        raise ValueError(
            f"fnn_forward: need one weight, bias and activation per layer, got "
            f"{len(weights)} weights, {len(biases)} biases, {len(activations)} activations"
        )
    if _any_autocast():
        x, *cast = _autocast((x, *weights, *biases))
        weights, biases = cast[: len(weights)], cast[len(weights) :]
    acts = check_layers(x, weights, biases, activations)
    if _traced_transform((x, *weights, *biases)):
        return _traced_layers(x, weights, biases, acts)
    if forward_ad._current_level >= 0 and has_tangents((x, *weights, *biases)):  # forward mode
        return _func_layers(x, acts, _interleave(weights, biases))
    return run_layers(x, weights, biases, acts)
