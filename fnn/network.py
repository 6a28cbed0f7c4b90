"""The whole-network path: a narrow network (every width <= 128) run by one kernel.

The kernels read the parameters from one flat buffer (kernels.network's layout: every
layer's weight row-major, then the bias of each layer that has one). An FNN keeps its
parameters as contiguous views of a flat buffer of its own, as nn.RNN keeps its flat weights
(`flatten_parameters`), so forwards, backwards and the fused Trainer step read and update
that buffer directly: nothing is copied per call. Each network-path forward checks, with a
few pointer comparisons (`flat_buffer`), that the parameters still are those views; where
they are not (replaced by `load_state_dict(assign=True)`, sharded or gathered by FSDP2, set
by `p.data = ...`, substituted by `torch.func.functional_call`, or while torch.compile
traces), the network Function concatenates them for the call (one `torch.cat`,
`concat_parameters`) and the model stays as it is. Only `flatten_parameters` re-points
parameters: FNN's constructor, its `_apply` (`to()`, `cuda()`, `double()`, ...), unpickling
(`copy.deepcopy`, `torch.load`) and the fused Trainer step call it; a forward never does
(under FSDP that would corrupt its gathered parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch._C._functorch import unwrap_if_dead
from torch.autograd import forward_ad
from torch.autograd.function import FunctionCtx
from torch.nn.utils import parametrize

from kernels.checks import Activation, as_activation, check_linear_args

from . import network_ops
from .dispatch import backend, use_registered_ops
from .functional import (
    _C_APPLY,
    _func_layers,
    _functorch_active,
    _grad_enabled,
    _graph_network,
    _interleave,
    _keep,
    _kept,
    _requires_grad,
    _rows2d,
    _traced_layers,
    _traced_transform,
    _unsafe_view,
    _with_graph,
    fast_apply,
    has_tangents,
    layer_input,
)
from .network_ops import layer_sizes, padded_width
from .plan import FNNPlan, flat_views, plan

__all__ = [
    "NetworkFunction",
    "check_fusion",
    "concat_parameters",
    "fits_network",
    "train_step_fits",
    "flat_buffer",
    "flatten_parameters",
    "network_forward",
    "padded_width",
    "resolve_fusion",
]

FUSIONS = ("auto", "layer", "network")
MAX_WIDTH = 128  # kernels.network.MAX_WIDTH, repeated here so this module imports no triton
TRAIN_STEP_MAX_WIDTH_FLOAT64 = 64  # kernels.network.TRAIN_STEP_MAX_WIDTH_FLOAT64


def train_step_fits(sizes: Sequence[int], dtype: torch.dtype) -> bool:
    """Whether the one-launch training step (kernels.network.network_train_step) serves a
    network of these widths in `dtype`: float64 only up to width 64. At width 128 its float64
    kernel spills registers on every launch shape tried (bench/NOTES.md, compile check); the
    Trainer then steps through autograd (the network path's forward and backward kernels,
    which do not spill, and torch.optim.SGD)."""
    return dtype != torch.float64 or max(sizes) <= TRAIN_STEP_MAX_WIDTH_FLOAT64


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


def _plain(t: torch.Tensor) -> bool:
    """A parameter flatten_parameters may re-point: a plain tensor with real storage."""
    return (type(t) is nn.Parameter or type(t) is torch.Tensor) and not t.is_meta


def _layers_parameters(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    layers = model.layers
    return [layer.weight for layer in layers], [layer.bias for layer in layers]


def flat_buffer(
    model: nn.Module, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
) -> torch.Tensor | None:
    """The FNN's flat parameter buffer if `weights` and `biases` (its current parameters) are
    exactly its contiguous views in the kernels' layout (each weight, then each bias, back to
    back, same dtype and device, plain tensors), else None. None as well while torch.compile
    traces. A few pointer comparisons per parameter; changes nothing."""
    if torch.compiler.is_compiling():
        return None
    flat = model.__dict__.get("_flat")
    if flat is None:
        return None
    dtype, device, size = flat.dtype, flat.device, flat.element_size()
    start = addr = flat.data_ptr()
    try:
        for p in (*weights, *biases):
            if p is None:
                continue
            if (
                (type(p) is not nn.Parameter and type(p) is not torch.Tensor)
                or p.data_ptr() != addr
                or p.dtype != dtype
                or not p.is_contiguous()
                or p.device != device
            ):
                return None
            addr += p.numel() * size
    except RuntimeError:  # a tensor without storage (functorch's wrappers): not a view
        return None
    return flat if addr == start + flat.numel() * size else None


def flatten_parameters(model: nn.Module) -> bool:
    """Make an FNN's parameters contiguous views of one new flat buffer of its own, in the
    kernels' layout (every weight, then every bias), holding their current values: the
    Parameter objects stay the same (each one's `.data` is pointed at its slice), so
    optimizers and hooks holding them see no change. Nothing happens where they already are
    such views. Returns whether the parameters are now the flat buffer's views.

    Refuses (returns False) where a parameter is not a plain tensor of a real device (FSDP's
    sharded DTensors, fake or meta tensors), where the parameters differ in dtype or device,
    where one Parameter serves two layers (tied weights), where a layer is parametrized
    (torch.nn.utils.parametrize: its weight is computed, its Parameters are others), and while
    torch.compile traces. A refusal changes no parameter; it drops the module's reference to
    a flat buffer the parameters no longer all view (after `to("meta")` or FSDP's sharding,
    the old parameters' memory is then freed, as for any module)."""
    if torch.compiler.is_compiling():
        return False
    weights, biases = _layers_parameters(model)
    if flat_buffer(model, weights, biases) is not None:
        return True
    params = [*weights, *(b for b in biases if b is not None)]
    first = params[0]
    if (
        any(parametrize.is_parametrized(layer) for layer in model.layers)
        or not all(_plain(p) and p.dtype == first.dtype and p.device == first.device for p in params)
        or len({id(p) for p in params}) != len(params)
    ):
        model.__dict__["_flat"] = None
        return False
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        off = 0
        for p in params:
            n = p.numel()
            p.data = flat[off : off + n].view(p.shape)
            off += n
    model.__dict__["_flat"] = flat
    return True


def concat_parameters(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The parameters in one flat buffer, in the kernels' layout: one `torch.cat` (for a
    single layer without bias, the weight itself, flattened: a view when it is contiguous).
    Not differentiable (the network Function routes the gradients itself)."""
    parts = [w.reshape(-1) for w in weights] + [b for b in biases if b is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _network_forward(ctx: FunctionCtx, x, sizes, activations, biased, flat, params, p: FNNPlan | None = None):
    """NetworkFunction's forward; `p`: the FNN's plan, which has the kernels' meta, act_params
    and activation set at hand (else network_ops looks them up)."""
    if flat is None:
        flat = concat_parameters(params[0::2], params[1::2])
    x2d = _rows2d(x)
    need = any(ctx.needs_input_grad)
    if p is not None:
        device = x.device
        kernel_args = (p.meta(device), p.act_params(x.dtype, device), p.bits)
        last = p.last_saves
    else:
        kernel_args = (None, None, None)
        last = as_activation(activations[-1]).saves
    y, h, z = network_ops.network_forward(x2d, flat, sizes, activations, biased, need, *kernel_args, last)
    out = y if x2d is x else _unsafe_view(y, (*x.shape[:-1], y.shape[-1]))  # a reshape if needed
    ctx.kernel_args = kernel_args
    if need:  # the parameters only so that autograd sees their in-place changes, as for a layer
        # Y saved as the output itself, so that an in-place change of the output raises
        s_out = z if last == "z" else (out if last == "y" else None)
        ctx.save_for_backward(x2d, s_out, h, flat, *params)
        _keep(ctx, (None if x2d is x else x,))  # for a differentiable backward (_graph)
    ctx.activations = activations
    ctx.sizes = sizes
    ctx.biased = biased
    ctx.x_shape = x.shape
    return out


class NetworkFunction(torch.autograd.Function):
    """A whole network as one autograd node and one kernel per direction (fnn.network_ops).

    Forward: h_0 = X, Z_l = h_l W_l^T + b_l, h_{l+1} = act_l(Z_l), in one launch; when a
    gradient is needed, saves X, the flat parameters and the parameters (so that an in-place
    change of one before the backward raises, as for a layer), and per layer one tensor S_l
    (fnn.Activation.saves): for each hidden layer its output h_{l+1}, or Z_l where its
    activation saves Z (gelu, gelu_tanh, silu, ...), in H (zero-padded to P columns); for the
    output layer Y, or Z_L where it saves Z, or nothing for identity.
    Backward, one launch when the batch fits one program (else two, the second summing the
    per-program partial gradients in a fixed order), with D_{L-1} = dY * act'(Z_{L-1}) read
    off S_L:
        dW_l = D_l^T h_l,   db_l = sum over rows of D_l,
        D_{l-1} = (D_l W_l) * act_{l-1}'(Z_{l-1}) read off S_{l-1},   dX = D_0 W_0,
    where h_l is recomputed on load as act_{l-1}(Z_{l-1}) for a layer that keeps Z.
    Under create_graph=True, where dY or a saved tensor requires grad, the backward recomputes
    the network with PyTorch ops from X and the parameters and differentiates that (double
    backward). Call as `NetworkFunction.apply(x, activations, flat, w_1, b_1, ..., w_L, b_L)` (a bias
    may be None; an activation is a name or an fnn.Activation). `flat` is the parameters'
    flat buffer when they are its views
    (`flat_buffer`), read as it is; None concatenates them for the call (`concat_parameters`).
    The gradients are contiguous views of one flat buffer in the same layout.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, activations: tuple[str, ...], flat: torch.Tensor | None, *params
    ):
        weights, biases = params[0::2], params[1::2]
        sizes = layer_sizes(weights)
        biased = tuple(b is not None for b in biases)
        return _network_forward(ctx, x, sizes, tuple(activations), biased, flat, params)

    @staticmethod
    def _graph(ctx: FunctionCtx, dy: torch.Tensor):
        """The gradients from PyTorch ops, differentiable (create_graph): the network recomputed
        from the saved inputs (x, or x2d where that is x, and the parameters)."""
        saved = ctx.saved_tensors
        (x,) = _kept(ctx)
        x, params, needs = (saved[0] if x is None else x), saved[4:], ctx.needs_input_grad
        weights, biases = params[0::2], params[1::2]
        dx, *grads = _graph_network(dy, x, weights, biases, ctx.activations, (needs[0], *needs[3:]))
        return (dx, None, None, *grads)

    @staticmethod
    @_with_graph(lambda ctx, dy: NetworkFunction._graph(ctx, dy))
    def backward(ctx: FunctionCtx, dy: torch.Tensor):
        x2d, s_out, h, flat = ctx.saved_tensors[:4]
        needs = ctx.needs_input_grad
        flat_dy = dy.dim() == 2
        dy2d = dy if flat_dy else dy.reshape(-1, ctx.sizes[-1])
        # identity: nothing saved, nothing read; Y: the output, of x's leading shape
        s_out = dy2d if s_out is None else (s_out if s_out.dim() == 2 else s_out.reshape(dy2d.shape))
        dx, dws, dbs = network_ops.network_backward(
            dy2d, s_out, h, x2d, flat, ctx.sizes, ctx.activations, ctx.biased, needs[0], *ctx.kernel_args
        )
        grads: list[torch.Tensor | None] = []
        for li, (dw, db) in enumerate(zip(dws, dbs, strict=True)):
            grads.append(dw if needs[3 + 2 * li] else None)
            grads.append(db if needs[4 + 2 * li] else None)
        if dx is not None and not flat_dy:
            dx = dx.view(ctx.x_shape)
        return (dx, None, None, *grads)


class _PlannedNetwork(NetworkFunction):
    """NetworkFunction for an FNN whose arguments fnn_network_forward has checked: the widths,
    activations and bias flags come from its plan (`apply(x, plan, flat, *params)`)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, p: FNNPlan, flat: torch.Tensor | None, *params):
        return _network_forward(ctx, x, p.sizes, p.acts, p.biased, flat, params, p)


_planned_network = fast_apply(  # under a functorch transform: layer by layer (_FuncLinearAct)
    _PlannedNetwork,
    module_parameters=True,
    functorch=lambda x, p, flat, *params: _func_layers(x, p.acts, params),
)
_K = None  # kernels.network, imported on first use (importing it imports triton)


def _kernels():
    global _K
    if _K is None:
        from kernels import network

        _K = network
    return _K


class _EagerNetwork(NetworkFunction):
    """NetworkFunction for an FNN in plain eager mode (`use_registered_ops()` False: no
    torch.compile, dispatch mode or functorch transform) whose arguments fnn_network_forward
    has checked, with a gradient needed: `apply(x, plan, flat, *params)`. The same kernels with
    the same arguments as _PlannedNetwork, called straight from the plan, without
    network_ops' routing; so is the backward, except under create_graph or a dispatch mode
    (then NetworkFunction's)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, p: FNNPlan, flat: torch.Tensor | None, *params):
        if flat is None:
            flat = concat_parameters(params[0::2], params[1::2])
        flat_x = x.dim() == 2
        x2d = x if flat_x else x.reshape(-1, x.shape[-1])
        device = x.device
        mt, ap = p.meta(device), p.act_params(x.dtype, device)
        last = p.last_saves
        K = _K or _kernels()
        z = K.new((x2d.shape[0], p.sizes[-1]), x.dtype, device) if last == "z" else None
        y, h = K.forward_unchecked(x2d, flat, mt, p.sizes, p.biased, True, ap, z, p.bits)
        out = y if flat_x else _unsafe_view(y, (*x.shape[:-1], y.shape[-1]))  # a reshape if needed
        s_out = z if last == "z" else (out if last == "y" else None)  # Y: the output itself
        ctx.save_for_backward(x2d, s_out, h, flat, *params)
        if flat_x:  # _keep, for a plain eager call (no versions to take)
            ctx.kept, ctx.kept_versions = _NOTHING_KEPT
        else:
            _keep(ctx, (x,))
        ctx.plan = p
        ctx.kernel_args = (mt, ap, p.bits)
        ctx.x_shape = x.shape
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, dy: torch.Tensor):
        p = ctx.plan
        if _grad_enabled() or use_registered_ops():  # create_graph, a mode or a transform
            ctx.sizes, ctx.activations, ctx.biased = p.sizes, p.acts, p.biased
            return NetworkFunction.backward(ctx, dy)
        x2d, s_out, h, flat = ctx.saved_tensors[:4]
        needs = ctx.needs_input_grad
        flat_dy = dy.dim() == 2
        dy2d = dy if flat_dy else dy.reshape(-1, p.sizes[-1])
        mt, ap, bits = ctx.kernel_args
        # identity: nothing saved, nothing read; Y: the output, of x's leading shape
        s_out = dy2d if s_out is None else (s_out if s_out.dim() == 2 else s_out.reshape(dy2d.shape))
        dx, grads = (_K or _kernels()).backward_unchecked(
            dy2d, s_out, h, x2d, flat, mt, p.sizes, p.biased, needs[0], ap, None, bits
        )
        views = network_ops.grad_list(grads, p.sizes, p.biased)  # w_1, b_1, ..., None for no bias
        if False in needs[3:]:
            views = [g if need else None for g, need in zip(views, needs[3:], strict=True)]
        if dx is not None and not flat_dy:
            dx = dx.view(ctx.x_shape)
        return (dx, None, None, *views)


_eager_network = _C_APPLY.__get__(None, _EagerNetwork)
_NOTHING_KEPT = ((None,), (None,))


def check_network_args(
    x: object,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str | Activation],
) -> None:
    """Every layer checked as fnn.functional.fnn_forward checks it, plus the width limit."""
    if not (len(weights) == len(biases) == len(activations)) or not weights:
        raise ValueError(
            f"network_forward: need one weight, bias and activation per layer, got "
            f"{len(weights)} weights, {len(biases)} biases, {len(activations)} activations"
        )
    for i, (w, b, a) in enumerate(zip(weights, biases, activations, strict=True)):
        who = f"layer {i} of the network"
        check_linear_args(layer_input(x, weights, i, who), w, b, a, who=who)
    sizes = [weights[0].shape[1], *(w.shape[0] for w in weights)]
    check_fusion("network", sizes)


def network_forward(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str | Activation],
) -> torch.Tensor:
    """`fnn.fnn_forward` through the whole-network kernel (widths <= 128), one autograd node
    (NetworkFunction), the parameters concatenated into one flat buffer for the call (one
    `torch.cat`). On the reference backend it runs fnn.reference's layers."""
    check_network_args(x, weights, biases, activations)
    if _traced_transform((x, *weights, *biases)):
        return _traced_layers(x, weights, biases, [as_activation(a) for a in activations])
    if backend(x.device) == "reference":
        from .functional import fnn_forward

        return fnn_forward(x, weights, biases, activations)
    params = _interleave(weights, biases)
    if _functorch_active() or (  # torch.func, forward mode: layer by layer
        forward_ad._current_level >= 0 and has_tangents((x, *params))
    ):
        return _func_layers(x, [as_activation(a) for a in activations], params)
    return NetworkFunction.apply(x, tuple(activations), None, *params)


def fnn_network_forward(model: nn.Module, x: torch.Tensor, p: FNNPlan | None = None) -> torch.Tensor:
    """An FNN's forward on the network path (NetworkFunction): the kernels read the model's
    flat buffer where its parameters are that buffer's views, else a concatenation of them
    made for the call. Changes nothing in the model. `p`: the model's plan (fnn.plan), if
    the caller has it; x's width is then taken as checked."""
    if torch.compiler.is_compiling():  # the traced path: plain attribute reads, the registered ops
        weights, biases = _layers_parameters(model)
        activations = model.activations
        check_network_args(x, weights, biases, activations)
        params = _interleave(weights, biases)
        return NetworkFunction.apply(x, tuple(activations), None, *params)
    if p is None:
        p = plan(model)
    params = p.parameters()  # w_1, b_1, ..., w_L, b_L
    weights, biases = params[0::2], params[1::2]
    flat = model.__dict__.get("_flat")
    if not (
        flat_views(p, flat, weights, biases)
        and isinstance(x, torch.Tensor)
        and x.dtype is flat.dtype
        and x.device == flat.device
        and x.dim() > 0
        and x.shape[-1] == p.sizes[0]
    ):
        check_network_args(x, weights, biases, p.acts)  # raises where an argument is wrong
        # The parameters are not the flat buffer's views: concatenate them. The buffer stays
        # (functional_call substitutes parameters for one call; flatten_parameters drops it).
        flat = None
    if _grad_enabled() and (x.requires_grad or _requires_grad(params)):
        if use_registered_ops():
            return _planned_network(x, p, flat, *params)
        return _eager_network(unwrap_if_dead(x), p, flat, *params)
    # inference: no autograd node, nothing stored for a backward
    if flat is None:
        flat = concat_parameters(weights, biases)
    x2d = _rows2d(x)
    y, _, _ = network_ops.network_forward(
        x2d, flat, p.sizes, p.acts, p.biased, False, p.meta(x.device), p.act_params(x.dtype, x.device), p.bits
    )
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
