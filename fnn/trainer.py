"""`fnn.Trainer`: full-batch SGD steps, one kernel launch per step for narrow FNNs."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import network, network_ops
from .dispatch import autocast_for, autocast_on, backend
from .modules import FNN
from .network import fits_network, flat_buffer, resolve_fusion, train_step_fits
from .plan import FNNPlan, flat_views, has_hooks, parameters, plan

_is_compiling = torch.compiler.is_compiling
_any_autocast = torch._C._is_any_autocast_enabled
_grad_enabled = torch.is_grad_enabled

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "bce": F.binary_cross_entropy,  # mean, as nn.BCELoss
    "mse": F.mse_loss,  # mean, as nn.MSELoss
    "sse": lambda y_hat, y: 0.5 * ((y_hat - y) ** 2).sum(),  # seeds 000 and 002
}


def _check_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_hyper(lr: object, momentum: object) -> tuple[float, float]:
    lr, momentum = _check_number(lr, "lr"), _check_number(momentum, "momentum")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if momentum < 0:
        raise ValueError(f"momentum must be >= 0, got {momentum}")
    return lr, momentum


class Trainer:
    """Full-batch training by SGD: `step(x, y)` = forward, loss, backward, update.

    loss: "bce" (mean binary cross-entropy, as nn.BCELoss), "mse" (mean, as nn.MSELoss) or
    "sse" (0.5 * sum((y_hat - y)^2)). lr > 0; momentum >= 0 with torch.optim.SGD's meaning
    (buf = momentum * buf + grad, the first buf = grad; p -= lr * buf).

    Fused path: an `FNN` whose `fusion` resolves to "network" (fnn.network.resolve_fusion)
    on a kernel backend, outside torch.autocast, without module hooks (its own, its layers'
    or global ones), parameter hooks or a forward of its own, every parameter requiring grad,
    x not requiring grad (and, for "bce", a sigmoid output
    layer, whose outputs lie in [0, 1] as nn.BCELoss requires), runs the whole step in one
    kernel launch when the batch fits one program of the backward
    (kernels.network.network_programs), else in two (the second sums the per-program
    gradients in a fixed order and updates). The kernel updates the FNN's flat parameter
    buffer in place, whose views its parameters are (FNN.flatten_parameters), so
    `model.parameters()` hold the new values. Where they are not its views (replaced by
    `load_state_dict(assign=True)`, `p.data = ...`), the step first calls
    `model.flatten_parameters()` (same Parameter objects, same values). `.grad` is not
    touched; bce targets are not checked for [0, 1] (that would sync). The momentum buffer
    is one flat buffer in the same layout, owned by the Trainer; a new flat parameter buffer
    for the same Parameter objects (`to()`, a new flattening) takes it over. Otherwise (a
    frozen parameter included: SGD leaves it as it is): autograd and torch.optim.SGD, the same
    maths. A model that changes path
    between steps (a layer frozen, then thawed) keeps its momentum: the flat buffer's slices
    become the optimizer's momentum buffers, and back, so the steps are one SGD run's. The
    momentum starts again from zero when the model's Parameter objects are replaced. A step
    with grad mode off (torch.no_grad, torch.inference_mode) raises, as a backward would.

    torch.compile: the fused step is one launch already, with nothing around it for a
    compiler to fuse, so the Trainer is not meant to be compiled. A model given as
    `torch.compile(fnn.FNN(...))` still takes the fused step (on the FNN it wraps); models
    on the autograd path run compiled as given. Called inside a compiled function, `step`
    runs eagerly (a graph break), never traced.
    """

    def __init__(self, model: nn.Module, loss: str = "bce", lr: float = 1e-3, momentum: float = 0.0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Trainer needs an nn.Module (e.g. fnn.FNN), got {type(model).__name__}")
        if not isinstance(loss, str):
            raise TypeError(f"loss must be a string, one of {sorted(LOSSES)}; got {type(loss).__name__}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}")
        lr, momentum = _check_hyper(lr, momentum)
        if not any(True for _ in model.parameters()):
            raise ValueError("Trainer: the model has no parameters to train")
        self.model = model
        self.loss = loss
        self.lr = lr
        self.momentum = momentum
        self._optimizer: torch.optim.SGD | None = None
        self._hyper: tuple[tuple, torch.Tensor] | None = None
        # (the flat parameter buffer it belongs to, weakly; the flat momentum buffer; the
        # Parameter objects it holds the momentum of, in the flat buffer's order, weakly, with
        # their shapes)
        self._momentum: tuple[weakref.ref, torch.Tensor, tuple] | None = None
        # Which path's momentum is current: "fused" (the flat buffer above) or "autograd" (the
        # optimizer's state); the other's is handed over when the model changes path.
        self._momentum_at: str | None = None
        self._model_fnn: tuple = (None, None)  # (self.model, the FNN it is or wraps, or None)

    def _check_hyper(self) -> None:
        """lr and momentum as the constructor checks them (they may be set between steps)."""
        self.lr, self.momentum = _check_hyper(self.lr, self.momentum)

    def _fnn(self) -> FNN | None:
        """The FNN the fused step would train: the model, or the one torch.compile wraps. None
        for an FNN subclass whose forward is its own (the fused step computes FNN.forward's)."""
        model = self.model
        cached = self._model_fnn
        if cached[0] is model:
            inner = cached[1]
        else:
            inner = getattr(model, "_orig_mod", model)
            inner = inner if isinstance(inner, FNN) and type(inner).forward is FNN.forward else None
            self._model_fnn = (model, inner)
        # A forward set on the FNN instance (wrappers such as accelerate's do that), at any
        # time. (torch.compile's wrapper sets its own `forward`: the FNN's is what counts.)
        if inner is not None and "forward" in inner.__dict__:
            return None
        return inner

    def _hooked(self, model: FNN, p: FNNPlan) -> bool:
        """Whether a hook would run in `self.model(x)` (a forward, forward-pre or backward hook
        of the model, of the FNN torch.compile wraps, or of a layer): the fused step, which
        never calls the modules, would skip it, so the step takes autograd's path."""
        return (
            p.calls_layers()
            or any(p.model_hook_dicts)
            or (self.model is not model and has_hooks(self.model))
        )

    def fused(self, device: torch.device | str) -> bool:
        """Whether `step` on tensors on `device` runs the whole-network kernel: an FNN whose
        fusion resolves to "network", on a kernel backend, with plain parameters (FSDP's
        sharded DTensors train through autograd, where FSDP's hooks run)."""
        model = self._fnn()
        if model is None:
            return False
        p = plan(model)
        sizes = list(p.sizes)
        return (
            not self._hooked(model, p)
            and fits_network(sizes)
            and train_step_fits(sizes, next(model.parameters()).dtype)
            and resolve_fusion(model.fusion, sizes, device) == "network"
            and backend(device) != "reference"
            and not autocast_for(torch.device(device).type)  # autograd follows it, as FNN.forward does
            and all(type(t) is nn.Parameter or type(t) is torch.Tensor for t in model.parameters())
            and _trainable(*parameters(p))  # frozen ones: autograd's SGD skips them; hooks
            and (self.loss != "bce" or p.names[-1] == "sigmoid")  # outputs in [0, 1]
        )

    def _check_batch(self, x: object, y: object) -> tuple[torch.Tensor, torch.Tensor]:
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Trainer: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.layout is not torch.strided:
                raise TypeError(
                    f"Trainer: {name} is a {t.layout} tensor; fnn takes dense (torch.strided) tensors"
                )
        param = next(self.model.parameters())
        model = self._fnn()
        if model is not None:
            n_in, n_out = model.sizes[0], model.sizes[-1]
            if x.dim() == 0 or x.shape[-1] != n_in:
                raise ValueError(f"Trainer: x must have shape (..., {n_in}), got {tuple(x.shape)}")
            want = (*x.shape[:-1], n_out)
            if tuple(y.shape) != want:
                raise ValueError(
                    f"Trainer: y must have the model output's shape {want}, got {tuple(y.shape)}"
                )
        if x.numel() == 0:
            raise ValueError("Trainer: empty batch")
        for name, t in (("x", x), ("y", y)):
            if t.dtype != param.dtype or t.device != param.device:
                raise TypeError(
                    f"Trainer: {name} is {t.dtype} on {t.device}; the model's parameters are "
                    f"{param.dtype} on {param.device}"
                )
        return x, y

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One SGD step on the batch (x, y); returns the loss before the update (0-dim)."""
        if _is_compiling():
            return _step_outside_graph(self, x, y)
        if not _grad_enabled():  # the fused step needs no autograd, but a step is a backward
            raise RuntimeError(
                "Trainer.step needs gradients: it was called with grad mode off (under torch.no_grad() "
                "or torch.inference_mode())"
            )
        model = self._fnn()
        if model is not None:  # the fused step with every check cheap (None: take the full path)
            loss = self._planned_step(model, plan(model), x, y)
            if loss is not None:
                return loss
        x, y = self._check_batch(x, y)
        if self.fused(x.device) and not x.requires_grad:  # x.grad: the fused step computes no dX
            loss = self._fused_step(x, y)
            if loss is not None:
                return loss
        return self._autograd_step(x, y)

    def fit(self, x: torch.Tensor, y: torch.Tensor, epochs: int) -> list[float]:
        """`epochs` full-batch steps; returns the loss of each (before its update)."""
        if isinstance(epochs, bool) or not isinstance(epochs, int):
            raise TypeError(f"epochs must be an int, got {type(epochs).__name__}")
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        return [self.step(x, y).item() for _ in range(epochs)]

    def _autograd_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check_hyper()
        params = list(self.model.parameters())
        opt = self._optimizer
        if opt is None or not _same_objects(opt.param_groups[0]["params"], params):
            # first step, or Parameter objects replaced (load_state_dict(assign=True), a new
            # layer): an optimizer over the old ones would step tensors the model no longer has
            self._optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        for group in self._optimizer.param_groups:
            group["lr"], group["momentum"] = self.lr, self.momentum
        if self.momentum > 0:
            if self._momentum_at == "fused":
                self._momentum_to_optimizer(params)
            self._momentum_at = "autograd"
        self._optimizer.zero_grad()
        if y.requires_grad:
            y = y.detach()
        loss = LOSSES[self.loss](self.model(x), y)
        loss.backward()
        self._optimizer.step()
        return loss.detach()

    def _planned_step(self, model: FNN, p: FNNPlan, x: object, y: object) -> torch.Tensor | None:
        """The fused step when everything is as usual: the model's plan says the whole-network
        kernel serves it, its parameters are its flat buffer's views (flattened first if they
        are not), the batch has the model's widths and the flat buffer's dtype and device.
        None where anything differs: `step` then takes the full path (whose checks raise the
        errors, and which decides between the fused step and autograd)."""
        if not p.fits or p.fusion == "layer" or self.loss not in LOSSES or self._hooked(model, p):
            return None
        if self.loss == "bce" and p.names[-1] != "sigmoid":  # nn.BCELoss's range check: autograd's
            return None
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            return None
        if _any_autocast() and autocast_on(x):  # the fused step computes in the model's dtype
            return None
        device = x.device
        if backend(device) == "reference":
            return None
        if p.fusion != "network" and network.resolve_fusion(p.fusion, p.sizes, device) != "network":
            return None
        weights, biases = parameters(p)
        if not _trainable(weights, biases):  # frozen or hooked parameters: autograd's step
            return None
        flat = model.__dict__.get("_flat")
        if not flat_views(p, flat, weights, biases):
            if not model.flatten_parameters():
                return None
            weights, biases = parameters(p)
            flat = model.__dict__.get("_flat")
            if not flat_views(p, flat, weights, biases):
                return None
        n_in, n_out = p.sizes[0], p.sizes[-1]
        dtype = flat.dtype
        if (
            x.dim() == 0
            or x.shape[-1] != n_in
            or y.dim() != x.dim()
            or y.shape[-1] != n_out
            or y.shape[:-1] != x.shape[:-1]
            or x.numel() == 0
            or x.layout is not torch.strided
            or y.layout is not torch.strided
            or x.requires_grad  # x.grad: autograd's step fills it, the fused one computes no dX
            or x.dtype is not dtype
            or y.dtype is not dtype
            or device != flat.device
            or y.device != device
            or not train_step_fits(p.sizes, dtype)
        ):
            return None
        hyper, buf = self._step_state(flat, device, weights, biases)
        from kernels.network import train_step_unchecked

        return train_step_unchecked(
            x if x.dim() == 2 else x.reshape(-1, n_in),
            y if y.dim() == 2 else y.reshape(-1, n_out),
            flat,
            p.meta(device),
            p.sizes,
            p.biased,
            self.loss,
            hyper,
            buf,
            p.act_params(dtype, device),
            None,  # programs: the kernels' choice
            p.bits,
        )

    def _step_state(
        self, flat: torch.Tensor, device: torch.device, weights: list, biases: list
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hyper, momentum buffer or None) for the fused step on `flat` (whose views are the
        parameters `weights` and `biases`): the (lr, momentum) tensor in the accumulator dtype,
        built once per (lr, momentum, dtype, device) rather than every step, and the momentum
        buffer. A new flat buffer for the same Parameter objects (the model moved by `to()`,
        or flattened again after `p.data = ...`) takes over the old momentum, in the new dtype
        and device, as torch.optim.SGD's state follows its Parameters; new Parameter objects
        (`load_state_dict(assign=True)`, a new layer) start from zero, as a new optimizer."""
        acc = torch.float64 if flat.dtype is torch.float64 else torch.float32
        key = (self.lr, self.momentum, acc, device)
        if self._hyper is None or self._hyper[0] != key:
            self._check_hyper()
            self._hyper = (key, torch.tensor([self.lr, self.momentum], dtype=acc, device=device))
        buf = None
        if self.momentum > 0:
            state = self._momentum
            if state is None or state[0]() is not flat:  # a new flat buffer
                params = [t for t in (*weights, *biases) if t is not None]
                new_buf = torch.zeros_like(flat)
                if (
                    state is not None
                    and state[1].numel() == flat.numel()
                    and len(state[2]) == len(params)
                    and all(r() is t and s == t.shape for (r, s), t in zip(state[2], params, strict=True))
                ):
                    new_buf.copy_(state[1])
                held = tuple((weakref.ref(t), t.shape) for t in params)
                state = self._momentum = (weakref.ref(flat), new_buf, held)
            buf = state[1]
            if self._momentum_at == "autograd":
                self._momentum_from_optimizer(flat, buf)
            self._momentum_at = "fused"
        return self._hyper[1], buf

    def _momentum_to_optimizer(self, params: list) -> None:
        """Fused path -> autograd path: each parameter's slice of the flat momentum buffer
        becomes its torch.optim.SGD momentum buffer (what the fused steps left), in place of
        whatever an earlier autograd phase left there. The slices are found by the Parameter
        objects the buffer was made for (not by address: the flat parameter buffer may have
        been replaced since, by `to()` or `p.data = ...`, the Parameters staying). Where the
        model's Parameters are not those objects (one replaced), every one starts from zero,
        as the new optimizer the autograd path then makes would."""
        state = self._optimizer.state
        views = _momentum_views(self._momentum, params)
        for p in params:
            state[p].pop("momentum_buffer", None)
            view = views.get(id(p))
            if view is not None:
                state[p]["momentum_buffer"] = view.clone()

    def _momentum_from_optimizer(self, flat: torch.Tensor, buf: torch.Tensor) -> None:
        """Autograd path -> fused path: the flat momentum buffer `buf` (of the parameter
        buffer `flat`) takes each parameter's torch.optim.SGD momentum buffer, zero where it
        has none (SGD's first step, buf = grad, is the fused step's from zero)."""
        opt = self._optimizer
        params = list(self.model.parameters())
        carried = opt is not None and _same_objects(opt.param_groups[0]["params"], params)
        with torch.no_grad():
            buf.zero_()
            if not carried:
                return
            for p in params:
                src = opt.state.get(p, {}).get("momentum_buffer")
                view = _flat_slice(flat, buf, p)
                if src is not None and view is not None:
                    view.copy_(src)

    def _fused_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The one-launch step on the FNN's flat parameter buffer (flattening its parameters
        first if they are not its views); None where they cannot be flattened."""
        from kernels.network import network_train_step

        model = self._fnn()
        layers = model.layers
        weights, biases = [la.weight for la in layers], [la.bias for la in layers]
        flat = flat_buffer(model, weights, biases)
        if flat is None:
            if not model.flatten_parameters():
                return None
            weights, biases = [la.weight for la in layers], [la.bias for la in layers]
            flat = flat_buffer(model, weights, biases)
        hyper, buf = self._step_state(flat, x.device, weights, biases)
        sizes = network_ops.layer_sizes(weights)
        biased = tuple(b is not None for b in biases)
        with torch.no_grad():
            return network_train_step(
                x.reshape(-1, x.shape[-1]),
                y.reshape(-1, y.shape[-1]),
                flat,
                network_ops.meta(sizes, model.activations, biased, x.device),
                sizes,
                biased,
                self.loss,
                hyper,
                buf,
                network_ops.activation_params(model.activations, x.dtype, x.device),
                acts=network_ops.act_set(model.activations),
            )


def _trainable(weights: list, biases: list) -> bool:
    """Whether every parameter requires grad (the fused step updates the whole flat buffer)
    and none has a hook of its own (`register_hook`, `register_post_accumulate_grad_hook`:
    the fused step makes no gradient for them to see)."""
    for t in (*weights, *biases):
        if t is not None and (not t.requires_grad or t._backward_hooks or t._post_accumulate_grad_hooks):
            return False
    return True


# Under torch.compile, `step` is run as it is, outside any graph (see Trainer's docstring).
_step_outside_graph = torch.compiler.disable(Trainer.step)


def _momentum_views(momentum: tuple | None, params: list) -> dict[int, torch.Tensor]:
    """id(p) -> p's slice of the fused path's momentum buffer, shaped as p, for every p of
    `params`; empty unless `params` are exactly the Parameter objects (and shapes) the buffer
    holds the momentum of (`Trainer._momentum`: the flat buffer's order, every weight then
    every bias)."""
    if momentum is None:
        return {}
    _, buf, held = momentum
    views, offset = {}, 0
    for ref, shape in held:
        t, n = ref(), shape.numel()
        if t is None or t.shape != shape:
            return {}
        views[id(t)] = buf[offset : offset + n].view(shape)
        offset += n
    if len(views) != len(params) or any(id(p) not in views for p in params):
        return {}
    return views


def _flat_slice(flat: torch.Tensor | None, buf: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor | None:
    """The part of `buf` (laid out as the flat parameter buffer `flat`) at parameter p, shaped
    as p; None where p is not a contiguous view of `flat`."""
    if flat is None or buf is None or p.dtype != flat.dtype or p.device != flat.device:
        return None
    if not p.is_contiguous():
        return None
    size = flat.element_size()
    start, rem = divmod(p.data_ptr() - flat.data_ptr(), size)
    if rem or start < 0 or start + p.numel() > flat.numel():
        return None
    return buf[start : start + p.numel()].view(p.shape)


def _same_objects(a: list, b: list) -> bool:
    return len(a) == len(b) and all(p is q for p, q in zip(a, b, strict=True))
