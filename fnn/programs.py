"""An FNN's layer path as launch programs: every launch's arguments worked out once per shape.

On the layer path an FNN's forward launches one kernel per layer, its backward up to three per
layer (a heavy activation's D, dW and db, dX or the previous layer's delta; dX, dW and db come
from one kernel for a narrow layer: kernels.configs.fused_backward_fits). FNNFunction works
out each launch's arguments on every call (which tensors, the launchers' keys, strides, tile
plans); for a small network that Python is most of the host time. A program holds those
arguments for one forward, as kernels.linear_act's steps (`forward_step`, ...), and launches
them with only the tensors supplied; each backward's steps are made once per (gradients needed,
dY's strides, matmul precision) and kept with the forward's program. The steps are the ones
the launchers make for the same call: the same kernels with the same arguments, the same
results bit for bit.

A forward program is keyed on everything that decides its launches: the batch, x's strides,
the dtype and device, the float32 matmul precision, whether a gradient is needed (then a
Z-saving layer stores Z) and every parameter's strides; the FNN's plan (fnn.plan) keeps the
programs, as it keeps everything else that depends only on the layers. A forward's or a
backward's launches share one launch session (kernels.launch.session: the launch hooks, the
device and the stream read once); the launch cache still checks each pointer's alignment, the
kernel's globals and the driver on every launch.

fnn.functional applies programs in plain eager mode (no torch.compile, dispatch mode or
functorch transform) where the kernels serve the device and the batch is not empty.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kernels.checks import FLOAT_DTYPES
from kernels.configs import fused_backward_fits as fits

from .dispatch import backend, use_registered_ops
from .plan import FNNPlan

__all__ = ["LayerProgram", "layer_call"]

MAX_PROGRAMS = 64  # per plan (and backward programs per forward program); past it, start again
_K: Any = None  # kernels.linear_act, imported on first use (importing it imports triton)
_Parameter, _Tensor = nn.Parameter, torch.Tensor
_FLOATS = frozenset(FLOAT_DTYPES)
_STRIDED = torch.strided
_grad_enabled = torch.is_grad_enabled


def _kernels() -> Any:
    global _K
    if _K is None:
        from kernels import linear_act

        _K = linear_act
    return _K


class LayerProgram:
    """One forward's launches (see the module docstring), and its backwards' as they are asked
    for (`backward`)."""

    __slots__ = ("plan", "m", "x_strides", "dtype", "device", "param_strides", "forward", "backwards")

    def __init__(
        self, p: FNNPlan, m: int, x_strides: tuple, dtype: torch.dtype, device: torch.device,
        prec: str, need: bool, param_strides: tuple,
    ) -> None:
        K = _kernels()
        self.plan, self.m, self.x_strides, self.dtype, self.device = p, m, x_strides, dtype, device
        self.param_strides = param_strides  # (w_1, b_1, ..., w_L, b_L), None for no bias
        sizes, last = p.sizes, len(p.acts) - 1
        steps = []
        strides = x_strides
        for i, act in enumerate(p.acts):
            n, k = sizes[i + 1], sizes[i]
            store_z = need and act.saves == "z"
            b_strides = param_strides[2 * i + 1]
            step = K.forward_step(
                m, n, k, strides, param_strides[2 * i], None if b_strides is None else b_strides[0],
                act, store_z, dtype, prec,
            )
            # what the layer keeps for the backward (as fnn.functional._fnn_forward keeps it):
            # Z, else its output where its derivative is read off it or the next layer reads it
            keep = act.saves == "y" or (act.saves == "none" and i < last)
            steps.append((*step, n, store_z, keep))
            strides = (n, 1)
        self.forward = tuple(steps)
        self.backwards: dict[tuple, tuple] = {}

    def run_forward(self, x2d: torch.Tensor, params) -> tuple[torch.Tensor, list]:
        """(output, saved): the network's output (m, N_L) and, per layer, what it keeps for the
        backward (Z, its output, or None). `params`: (w_1, b_1, ..., w_L, b_L)."""
        new = _K.memory.new
        m, dtype, device = self.m, self.dtype, self.device
        session = _K.session()
        launcher = _K._fwd  # looked up per call, as the launchers do (tests wrap it)
        h = x2d
        saved = []
        i = 0
        for key, grid, args, n, store_z, keep in self.forward:
            w, b = params[i], params[i + 1]
            y = new((m, n), dtype, device)
            z = new((m, n), dtype, device) if store_z else y  # z unused unless STORE_Z
            # b unused without a bias
            launcher.direct(session, key, grid, h, w, h if b is None else b, y, z, *args)
            saved.append(z if store_z else (y if keep else None))
            h = y
            i += 2
        return h, saved

    def reads(self, x2d: torch.Tensor, saved, weights) -> bool:
        """Whether the backward's tensors are as this program's backward steps read them: x and
        the weights in the forward's dtype and strides, every saved output contiguous. Not
        so where autograd's saved-tensor hooks give them back in another layout
        (`torch.autograd.graph.save_on_cpu` returns contiguous copies of a sliced or
        transposed x), or after `p.data = ...` between the forward and the backward: then
        FNNFunction's backward serves, which reads every tensor's own strides."""
        dtype = self.dtype
        if x2d.dtype is not dtype or x2d.stride() != self.x_strides:
            return False
        strides = self.param_strides
        for i, w in enumerate(weights):
            if w.dtype is not dtype or w.stride() != strides[2 * i]:
                return False
        for s in saved:  # the forward's own outputs: only their layout can have changed
            if s is not None and not s.is_contiguous():
                return False
        return True

    def backward(self, needs: tuple, dy_strides: tuple) -> tuple:
        """The backward's steps for `needs` (ctx.needs_input_grad: x, program, w_1, b_1, ...),
        dY's strides and the matmul precision now, made on first use."""
        prec = _K.layer_precision(self.dtype)
        key = (needs, dy_strides, prec)
        steps = self.backwards.get(key)
        if steps is None:
            if len(self.backwards) >= MAX_PROGRAMS:
                self.backwards.clear()
            steps = self.backwards[key] = self._backward_steps(needs, dy_strides, prec)
        return steps

    def _backward_steps(self, needs: tuple, dy_strides: tuple, prec: str) -> tuple:
        """FNNFunction.backward's launches, layer by layer from the last: per layer
        (i, s_saved, delta, weight, need_w, need_b, input, prev_read, fused), where s_saved says
        whether the layer's S is its saved tensor (else the incoming gradient), `delta`,
        `weight`, `input` and `fused` are steps or None (`fused`: dX, dW and db from one
        kernel, and then `weight` and `input` None), and prev_read whether the input-gradient
        kernel reads the previous layer's saved tensor."""
        K = _kernels()
        p, m, dtype = self.plan, self.m, self.dtype
        acts, sizes, n_layers = p.acts, p.sizes, len(p.acts)
        identity = K._IDENTITY
        need_w = [needs[2 + 2 * i] for i in range(n_layers)]
        need_b = [needs[3 + 2 * i] and p.biased[i] for i in range(n_layers)]
        g_strides, g_dtype, g_act = dy_strides, dtype, acts[-1]
        layers = []
        for i in reversed(range(n_layers)):
            k, n = sizes[i], sizes[i + 1]
            s_saved = i == n_layers - 1 and g_act.saves != "none"
            s_strides, s_dtype = ((n, 1), dtype) if s_saved else (g_strides, g_dtype)
            wants_w = need_w[i] or need_b[i]
            if i == 0:
                wants_dx = needs[0]
            else:  # dX, or layer i-1's delta, for a gradient further down
                wants_dx = needs[0] or any(need_w[:i]) or any(need_b[:i])
            if not (wants_w or wants_dx):
                break
            delta = None
            if g_act.kernel_args[0] in K.HEAVY_DELTA:  # D first, read as an identity layer's dY
                delta = K.delta_step(m, n, g_strides, s_strides, g_act, g_dtype, s_dtype)
                g_strides = s_strides = (n, 1)
                g_dtype = s_dtype = K.delta_dtype(dtype)
                g_act = identity  # run_backward then reads D as both dY and S
            prev = identity if i == 0 else acts[i - 1]
            if wants_w and wants_dx and fits(n, k, dtype, prev):  # dX (or D_{i-1}), dW, db: one kernel
                x_strides = self.x_strides if i == 0 else (k, 1)
                fused = K.backward_fused_step(
                    m, n, k, g_strides, s_strides, self.param_strides[2 * i], x_strides, g_act, prev,
                    need_b[i], None, dtype, g_dtype, prec,
                )
                layers.append((i, s_saved, delta, None, need_w[i], need_b[i], None, False, fused))
                g_strides, g_dtype, g_act = (k, 1), dtype, identity
                continue
            weight = None
            if wants_w:
                if i == 0:
                    x_strides, x_act = self.x_strides, identity
                else:  # layer i's input: S_{i-1}, or act_{i-1}(S_{i-1}) when that is Z
                    x_strides = (k, 1)
                    x_act = acts[i - 1] if acts[i - 1].saves == "z" else identity
                weight = K.backward_weight_step(
                    m, n, k, g_strides, s_strides, x_strides, g_act, x_act, need_b[i], None,
                    dtype, g_dtype, prec,
                )
            step_in, prev_read = None, False
            if wants_dx:
                step_in = K.backward_input_step(
                    m, n, k, g_strides, s_strides, self.param_strides[2 * i], (k, 1), g_act, prev,
                    dtype, g_dtype, prec,
                )
                prev_read = prev.kernel_args[0] != 0
                g_strides, g_dtype, g_act = (k, 1), dtype, identity  # g is D_{i-1} (or dX)
            layers.append((i, s_saved, delta, weight, need_w[i], need_b[i], step_in, prev_read, None))
        return tuple(layers)

    def run_backward(
        self, steps: tuple, dy2d: torch.Tensor, x2d: torch.Tensor, saved, weights
    ) -> tuple[torch.Tensor | None, list]:
        """(dX or None, [dw_1, db_1, ..., dw_L, db_L]) from `steps` (`backward`): dy2d the
        output's gradient, `saved` what run_forward kept (the last as a 2-D tensor)."""
        K = _K
        new = K.memory.new
        session = K.session()
        delta_launcher, weight_launcher, input_launcher = K._delta, K._bwd_weight, K._bwd_input
        fused_launcher = K._bwd_fused
        m, dtype, device = self.m, self.dtype, self.device
        sizes = self.plan.sizes
        grads: list[torch.Tensor | None] = [None] * (2 * len(weights))
        g = dy2d
        dx = None
        for i, s_saved, delta, weight, need_w, need_b, step_in, prev_read, fused in steps:
            k, n = sizes[i], sizes[i + 1]
            s = saved[i] if s_saved else g
            if delta is not None:
                d = new((m, n), K.delta_dtype(dtype), device)
                delta_launcher.direct(session, delta[0], delta[1], g, s, d, *delta[2])
                g = s = d
            if fused is not None:
                out = new((m, k), dtype, device)
                split = fused[3]
                dw, db = K.weight_grad_outputs(split, n, k, dtype, device, need_b)
                x = x2d if i == 0 else saved[i - 1]
                fused_launcher.direct(session, fused[0], fused[1], g, s, weights[i], x, out, dw,
                                      dw if db is None else db, *fused[2])  # db unused without a bias
                if split != 1:
                    dw, db = K.sum_partials(dw, db, dtype)
                grads[2 * i] = dw if need_w else None
                grads[2 * i + 1] = db
                if i == 0:
                    dx = out
                g = out
                continue
            if weight is not None:
                split = weight[3]
                dw, db = K.weight_grad_outputs(split, n, k, dtype, device, need_b)
                weight_launcher.direct(session, weight[0], weight[1], g, s, x2d if i == 0 else saved[i - 1],
                                       dw, dw if db is None else db, *weight[2])  # db unused without a bias
                if split != 1:
                    dw, db = K.sum_partials(dw, db, dtype)
                grads[2 * i] = dw if need_w else None
                grads[2 * i + 1] = db
            if step_in is not None:
                out = new((m, k), dtype, device)
                input_launcher.direct(session, step_in[0], step_in[1], g, s, weights[i],
                                      saved[i - 1] if prev_read else out, out,
                                      *step_in[2])  # the previous layer's S read only for its delta
                if i == 0:
                    dx = out
                g = out
        return dx, grads


def layer_call(p: FNNPlan, x: torch.Tensor) -> tuple | None:
    """(program, x2d, params, need) for an FNN's forward on `x` (its width checked) where the
    layer path's program serves it: plain eager mode (no torch.compile, dispatch mode or
    functorch transform), the kernels serving x's device, a non-empty batch, x and every
    parameter a plain tensor (or Parameter) of one float dtype and device with the plan's
    shapes; else None. `params` is (w_1, b_1, ..., w_L, b_L), `need` whether a gradient is
    needed (grad mode on and a tensor requiring one). One pass over the parameters checks
    them and reads their strides for the program's key."""
    if x.__class__ is not _Tensor and x.__class__ is not _Parameter:
        return None
    dtype, device = x.dtype, x.device
    if dtype not in _FLOATS or not x.numel() or use_registered_ops() or backend(device) == "reference":
        return None
    need = x.requires_grad
    params: list[torch.Tensor | None] = [None] * (2 * len(p.acts))
    strides = []  # of the parameters the layers have, in order
    for i, d, name, shape in p.param_specs:
        t = d.get(name)
        if (
            (t.__class__ is not _Parameter and t.__class__ is not _Tensor)
            or t.dtype is not dtype
            or t.layout is not _STRIDED
            or t.shape != shape
            or t.device != device
        ):
            return None
        params[i] = t
        strides.append(t.stride())
        need = need or t.requires_grad
    need = need and _grad_enabled()
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    prec = (_K or _kernels()).layer_precision(dtype)
    x_strides = x2d.stride()
    key = (x2d.shape[0], x_strides, dtype, device, prec, need, tuple(strides))
    programs = p.programs
    prog = programs.get(key)
    if prog is None:
        if len(programs) >= MAX_PROGRAMS:
            programs.clear()
        param_strides = [None] * len(params)
        for (i, *_), st in zip(p.param_specs, strides, strict=True):
            param_strides[i] = st
        m = x2d.shape[0]
        prog = programs[key] = LayerProgram(p, m, x_strides, dtype, device, prec, need, tuple(param_strides))
    return prog, x2d, params, need
