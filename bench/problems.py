"""A case made concrete on a device: its input sets, its implementations, its float64 reference
and its work (FLOPs and compulsory bytes) for the roofline.

Every implementation is a function of one input set returning a tuple of tensors: the output
for a forward case; the output and the gradients (`torch.autograd.grad` with a fixed random
output gradient, so nothing accumulates in `.grad`) for a forward+backward case; the loss for a
training case, whose implementations each train their own copy of the weights (the correctness
check reads the step they took: `Problem.observe`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import fnn
from fnn import reference

from .cases import Case

Outputs = tuple[torch.Tensor, ...]
InputSet = dict[str, Any]

ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = {
    "identity": nn.Identity,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
}


class AddmmReLU(torch.autograd.Function):
    """relu(b + x @ w^T) through `torch._addmm_activation` (cuBLASLt's ReLU epilogue).

    `_addmm_activation` has no derivative in PyTorch, so the backward is written out with
    the kernels autograd itself runs after `relu(F.linear(...))`: threshold_backward, two
    matrix products and a column sum.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = torch._addmm_activation(b, x, w.t(), use_gelu=False)
        ctx.save_for_backward(x, w, y)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, y = ctx.saved_tensors
        d = torch.ops.aten.threshold_backward(dy, y, 0)
        need_x, need_w, need_b = ctx.needs_input_grad
        return (d @ w if need_x else None, d.t() @ x if need_w else None, d.sum(0) if need_b else None)


class CublasBackward(torch.autograd.Function):
    """fnn's forward kernel, and a backward whose two products are cuBLAS's: one Triton pass
    forms D = dY * act'(Y) in the layer's dtype and db (kernels.linear_act.delta_and_bias_grad),
    then dX = D W and dW = D^T X are torch.mm. The design the GPU issue allows where a Triton
    GEMM cannot match cuBLAS ("keep that GEMM on cuBLAS and fuse around it"), measured here as
    `fnn_cublas_bwd` before it is built into fnn. For activations that save Y (sigmoid, relu)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str) -> torch.Tensor:
        from kernels.linear_act import linear_act_forward

        y = linear_act_forward(x, w, b, act)
        ctx.save_for_backward(x, w, y)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from kernels.linear_act import delta_and_bias_grad

        x, w, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        d, db = delta_and_bias_grad(dy, y, ctx.act, need_b)
        return (d @ w if need_x else None, d.t() @ x if need_w else None, db, None)


@dataclass
class Problem:
    """A case on a device. `run(name, inputs)` calls one implementation on one input set."""

    case: Case
    device: torch.device
    input_sets: list[InputSet]
    impls: dict[str, Callable[[InputSet], Outputs]]
    output_names: tuple[str, ...]
    reference: Callable[[], Outputs]  # float64 outputs for input set 0
    set_bytes: int
    flop: float
    bytes: float
    extra: dict[str, Any] = field(default_factory=dict)
    # implementations this device cannot run: name -> why (reported, not timed)
    unavailable: dict[str, str] = field(default_factory=dict)
    # what the correctness check compares for an implementation (default: its outputs on set 0)
    observer: Callable[[str], Outputs] | None = None

    def run(self, name: str, index: int = 0) -> Outputs:
        return self.impls[name](self.input_sets[index])

    def observe(self, name: str) -> Outputs:
        """The tensors the correctness check compares with `reference()`, from one call on
        input set 0: the outputs, or for a training case the loss and each parameter's step."""
        if self.observer is not None:
            return self.observer(name)
        return self.run(name, 0)

    def rotating(self, name: str) -> Callable[[], Outputs]:
        """A no-argument call of `name` that takes the next input set at each call."""
        impl, sets, state = self.impls[name], self.input_sets, [0]

        def call() -> Outputs:
            inputs = sets[state[0]]
            state[0] = (state[0] + 1) % len(sets)
            return impl(inputs)

        return call


def count_sets(set_bytes: int, l2_bytes: int, max_sets: int) -> int:
    """Input sets to rotate: one when a set alone overflows L2, else enough for the sets
    together to cover twice the L2 (at most `max_sets`)."""
    if set_bytes >= l2_bytes:
        return 1
    return max(2, min(max_sets, math.ceil(2 * l2_bytes / max(set_bytes, 1))))


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _grads(out: torch.Tensor, leaves: list[torch.Tensor], grad: torch.Tensor) -> Outputs:
    return (out, *torch.autograd.grad(out, leaves, grad))


# ---------------------------------------------------------------------------------------------
# Work: FLOPs and compulsory bytes
# ---------------------------------------------------------------------------------------------


def linear_work(case: Case) -> tuple[float, float]:
    """FLOPs of the matrix products, and the bytes the op must move at the least.

    Forward: read X, W, b; write Y. Backward (as autograd splits it, Y saved): read dY, Y,
    X and W (W only for dX); write dX (when asked), dW and db.
    """
    M, K, N = case.shape["M"], case.shape["K"], case.shape["N"]
    s = torch.empty((), dtype=case.dtype).element_size()
    nb = N if case.bias else 0
    flop = 2.0 * M * N * K
    elems = M * K + N * K + nb + M * N
    if case.mode == "fwbw":
        flop += 2.0 * M * N * K * (2 if case.input_grad else 1)
        elems += 2 * M * N + M * K + N * K + nb
        if case.input_grad:
            elems += N * K + M * K
    return flop, float(elems * s)


def network_work(case: Case) -> tuple[float, float]:
    """As `linear_work` for a whole network, its hidden activations excluded from the bytes
    (a fully fused network need not move them)."""
    rows, sizes = case.shape["rows"], case.shape["sizes"]
    s = torch.empty((), dtype=case.dtype).element_size()
    params = sum(o * i + (o if case.bias else 0) for i, o in zip(sizes[:-1], sizes[1:], strict=True))
    layer_flop = [2.0 * rows * i * o for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    flop = sum(layer_flop)
    elems = rows * sizes[0] + params + rows * sizes[-1]
    if case.mode == "fwbw":
        flop += sum(layer_flop)  # dW of every layer
        flop += sum(layer_flop[1:]) + (layer_flop[0] if case.input_grad else 0)  # dX / deltas
        elems += 2 * rows * sizes[-1] + rows * sizes[0] + 2 * params
        if case.input_grad:
            elems += rows * sizes[0]
    return flop, float(elems * s)


def train_work(case: Case) -> tuple[float, float]:
    """One SGD step: the forward, the backward without dX, the update. Bytes: X and the
    targets read, the parameters read and written back (hidden activations and gradients
    excluded: a fully fused step keeps them on chip)."""
    rows, sizes = case.shape["rows"], case.shape["sizes"]
    s = torch.empty((), dtype=case.dtype).element_size()
    params = sum(o * i + (o if case.bias else 0) for i, o in zip(sizes[:-1], sizes[1:], strict=True))
    layer_flop = [2.0 * rows * i * o for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    flop = 2 * sum(layer_flop) + sum(layer_flop[1:])  # forward, dW, deltas (no dX of layer 1)
    return flop, float((rows * (sizes[0] + sizes[-1]) + 2 * params) * s)


def work(case: Case) -> tuple[float, float]:
    if case.kind == "linear":
        return linear_work(case)
    return network_work(case) if case.kind == "network" else train_work(case)


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def build(
    case: Case,
    device: torch.device,
    compile_options: dict[str, Any],
    l2_bytes: int,
    max_sets: int,
    seed: int = 0,
) -> Problem:
    """Inputs and implementations of `case` on `device` (call inside the case's matmul
    precision). `compile_options` go to torch.compile."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    builder = {"linear": _build_linear, "network": _build_network, "train": _build_train}[case.kind]
    return builder(case, device, compile_options, l2_bytes, max_sets, gen)


def _randn(shape: tuple[int, ...], gen: torch.Generator, device: torch.device, dtype: torch.dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def _rand(shape: tuple[int, ...], gen: torch.Generator, device: torch.device, dtype: torch.dtype):
    return torch.rand(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


@contextlib.contextmanager
def configs_set(**values: Any):
    """kernels.configs' module settings set to `values` for the duration, restored after."""
    from kernels import configs

    old = {name: getattr(configs, name) for name in values}
    for name, value in values.items():
        setattr(configs, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(configs, name, value)


def forward_tma(on: bool = True) -> contextlib.AbstractContextManager:
    """kernels.configs.FORWARD_TMA set to `on` for the duration: the persistent descriptor
    forward wherever it serves (it is not part of the launch plans it bypasses)."""
    return configs_set(FORWARD_TMA=on)


def float32_highest_dot(dot: str) -> contextlib.AbstractContextManager:
    """kernels.configs.FLOAT32_HIGHEST_DOT set to `dot` for the duration (the per-layer
    kernels' float32 dot at "highest"; part of their launch keys, so no stale kernel runs)."""
    from kernels.configs import FLOAT32_HIGHEST_DOTS

    if dot not in FLOAT32_HIGHEST_DOTS:
        raise ValueError(f"FLOAT32_HIGHEST_DOT must be one of {FLOAT32_HIGHEST_DOTS}, got {dot!r}")
    return configs_set(FLOAT32_HIGHEST_DOT=dot)


def _build_linear(case, device, compile_options, l2_bytes, max_sets, gen) -> Problem:
    M, K, N = case.shape["M"], case.shape["K"], case.shape["N"]
    dt, act, fwbw = case.dtype, case.activation, case.mode == "fwbw"

    def make_set() -> InputSet:
        # W scaled by 1/sqrt(K) so that X W^T + b stays near unit size: no saturated sigmoid.
        x = _randn((M, K), gen, device, dt)
        w = _randn((N, K), gen, device, dt, K**-0.5)
        b = _randn((N,), gen, device, dt, 0.5) if case.bias else None
        inputs: InputSet = {"x": x, "w": w, "b": b}
        if fwbw:
            inputs["grad"] = _randn((M, N), gen, device, dt)
            leaves = [w] + ([b] if b is not None else [])
            if case.input_grad:
                leaves.insert(0, x)
            for t in leaves:
                t.requires_grad_(True)
            inputs["leaves"] = leaves
        return inputs

    first = make_set()
    set_bytes = _nbytes(first["x"], first["w"], first["b"], first.get("grad"))
    sets = [first] + [make_set() for _ in range(count_sets(set_bytes, l2_bytes, max_sets) - 1)]

    def eager(x, w, b):
        return reference.linear_act(x, w, b, act)

    fns: dict[str, Callable] = {
        "fnn": lambda x, w, b: fnn.linear_act(x, w, b, act),  # looked up at call time
        "eager": eager,
        "compile": torch.compile(eager, **compile_options),
        "gemm_only": lambda x, w, b: reference.linear_act(x, w, b, "identity"),
        "addmm_act": AddmmReLU.apply,
        "fnn_cublas_bwd": lambda x, w, b: CublasBackward.apply(x, w, b, act),
    }
    fns["fnn_tf32x3"] = fns["fnn_tma"] = fns["fnn"]
    contexts = {"fnn_tf32x3": lambda: float32_highest_dot("tf32x3"), "fnn_tma": forward_tma}

    def wrap(name: str) -> Callable[[InputSet], Outputs]:
        f = fns[name]
        if fwbw:
            call = lambda s: _grads(f(s["x"], s["w"], s["b"]), s["leaves"], s["grad"])  # noqa: E731
        else:
            call = lambda s: (f(s["x"], s["w"], s["b"]),)  # noqa: E731
        if name not in contexts:
            return call

        def variant(s: InputSet, context=contexts[name]) -> Outputs:
            with context():
                return call(s)

        return variant

    impls = {name: wrap(name) for name in case.implementations}
    names = ["y"]
    if fwbw:
        names += (["dx"] if case.input_grad else []) + ["dw"] + (["db"] if case.bias else [])

    def ref() -> Outputs:
        s = sets[0]
        x, w = s["x"].detach().double(), s["w"].detach().double()
        b = s["b"].detach().double() if s["b"] is not None else None
        if not fwbw:
            return (reference.linear_act(x, w, b, act),)
        leaves = ([x] if case.input_grad else []) + [w] + ([b] if b is not None else [])
        for t in leaves:
            t.requires_grad_(True)
        return _grads(reference.linear_act(x, w, b, act), leaves, s["grad"].double())

    flop, nbytes = linear_work(case)
    return Problem(case, device, sets, impls, tuple(names), ref, set_bytes, flop, nbytes)


def eager_network(model: fnn.FNN) -> nn.Sequential:
    """An nn.Sequential of nn.Linear and activation modules holding copies of `model`'s weights."""
    layers: list[nn.Module] = []
    for layer in model.layers:
        w = layer.weight
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        lin = lin.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if layer.bias is not None:
                lin.bias.copy_(layer.bias)
        layers += [lin, ACTIVATION_MODULES[layer.activation]()]
    return nn.Sequential(*layers)


FUSIONS = {"fnn_layer": "layer", "fnn_network": "network"}


def _network_model(case: Case, device: torch.device, dtype: torch.dtype, fusion: str) -> fnn.FNN:
    """The case's FNN (its `model` factory, else a fresh init after torch.manual_seed(0)),
    with `fusion`. Deterministic: every call gives the same weights."""
    torch.manual_seed(0)
    if case.model is not None:
        model = case.model(device, dtype)
    else:
        acts = case.activations
        model = fnn.FNN(
            case.shape["sizes"],
            activation=acts[0] if len(acts) == 1 else list(acts),
            bias=case.bias,
            device=device,
            dtype=dtype,
        )
    if model.sizes != list(case.shape["sizes"]):
        raise ValueError(f"{case.name}: model has sizes {model.sizes}, the case says {case.shape['sizes']}")
    model.fusion = fusion
    return model


def _fnn_models(case: Case, device: torch.device, dtype: torch.dtype) -> dict[str, fnn.FNN]:
    """One FNN per fnn variant of the case, each with its own weights (equal at the start)."""
    fusions = {name: FUSIONS.get(name, case.fusion) for name in case.fnn_variants}
    return {name: _network_model(case, device, dtype, fusion) for name, fusion in fusions.items()}


def _build_network(case, device, compile_options, l2_bytes, max_sets, gen) -> Problem:
    rows, sizes, dt = case.shape["rows"], case.shape["sizes"], case.dtype
    fwbw = case.mode == "fwbw"
    models = _fnn_models(case, device, dt)
    model = models["fnn"]
    seq = eager_network(model)
    modules: dict[str, Callable] = {
        **models,
        "eager": seq,
        "compile": torch.compile(seq, **compile_options),
    }
    params = {name: list(m.parameters()) for name, m in models.items()}
    params["eager"] = params["compile"] = list(seq.parameters())

    def make_set(i: int) -> InputSet:
        if i == 0 and case.data is not None:
            x = case.data()[:rows].to(device=device, dtype=dt)
            if tuple(x.shape) != (rows, sizes[0]):
                raise ValueError(f"{case.name}: data has shape {tuple(x.shape)}, expected {(rows, sizes[0])}")
        else:
            x = _randn((rows, sizes[0]), gen, device, dt)
        inputs: InputSet = {"x": x.requires_grad_(fwbw and case.input_grad)}
        if fwbw:
            inputs["grad"] = _randn((rows, sizes[-1]), gen, device, dt)
        return inputs

    first = make_set(0)
    set_bytes = _nbytes(first["x"], first.get("grad"))
    sets = [first] + [make_set(i) for i in range(1, count_sets(set_bytes, l2_bytes, max_sets))]

    def wrap(name: str) -> Callable[[InputSet], Outputs]:
        module, ps = modules[name], params.get(name, [])
        if fwbw:
            return lambda s: _grads(module(s["x"]), ([s["x"]] if case.input_grad else []) + ps, s["grad"])

        def forward(s: InputSet) -> Outputs:  # inference: no autograd graph is recorded
            with torch.no_grad():
                return (module(s["x"]),)

        return forward

    impls = {name: wrap(name) for name in case.implementations}
    names = ["y"]
    if fwbw:
        names += ["dx"] if case.input_grad else []
        for i, layer in enumerate(model.layers, start=1):
            names += [f"dw{i}"] + ([f"db{i}"] if layer.bias is not None else [])

    def ref() -> Outputs:
        x = sets[0]["x"].detach().double()
        ws = [layer.weight.detach().double() for layer in model.layers]
        bs = [layer.bias.detach().double() if layer.bias is not None else None for layer in model.layers]
        if not fwbw:
            return (reference.fnn_forward(x, ws, bs, model.activations),)
        leaves = [x] if case.input_grad else []
        for w, b in zip(ws, bs, strict=True):
            leaves += [w] + ([b] if b is not None else [])
        for t in leaves:
            t.requires_grad_(True)
        y = reference.fnn_forward(x, ws, bs, model.activations)
        return _grads(y, leaves, sets[0]["grad"].double())

    flop, nbytes = network_work(case)
    return Problem(
        case,
        device,
        sets,
        impls,
        tuple(names),
        ref,
        set_bytes,
        flop,
        nbytes,
        extra={"model": model, "eager_model": seq, "models": models},
    )


def _captured_step(step: Callable, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """`step(x, y)` captured in a CUDA graph, after three warm-up steps on a side stream (as
    torch.cuda.graphs asks). Returns (graph, the loss tensor each replay writes)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step(x, y)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step(x, y)
    return graph, loss


def _build_train(case, device, compile_options, l2_bytes, max_sets, gen) -> Problem:
    from fnn.trainer import LOSSES, Trainer

    rows, sizes, dt, lr = case.shape["rows"], case.shape["sizes"], case.dtype, case.lr
    loss_fn = LOSSES[case.loss]
    models = _fnn_models(case, device, dt)
    start = _network_model(case, device, dt, case.fusion)  # the weights every copy starts from

    def make_set(i: int) -> InputSet:
        if i == 0 and case.data is not None:
            x, y = (t[:rows].to(device=device, dtype=dt) for t in case.data())
        else:
            x, y = _randn((rows, sizes[0]), gen, device, dt), _rand((rows, sizes[-1]), gen, device, dt)
        for name, t, width in (("x", x, sizes[0]), ("y", y, sizes[-1])):
            if tuple(t.shape) != (rows, width):
                raise ValueError(f"{case.name}: {name} has shape {tuple(t.shape)}, expected {(rows, width)}")
        return {"x": x, "y": y}

    first = make_set(0)
    set_bytes = _nbytes(first["x"], first["y"])
    sets = [first] + [make_set(i) for i in range(1, count_sets(set_bytes, l2_bytes, max_sets))]

    impls: dict[str, Callable[[InputSet], Outputs]] = {}
    params: dict[str, list[torch.Tensor]] = {}
    unavailable: dict[str, str] = {}
    for name, model in models.items():
        trainer = Trainer(model, loss=case.loss, lr=lr)
        impls[name] = lambda s, t=trainer: (t.step(s["x"], s["y"]),)
        params[name] = list(model.parameters())

    def eager_step(seq: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        opt = torch.optim.SGD(seq.parameters(), lr=lr)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn(seq(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    for name in ("eager", "compile", "eager_graph"):
        if name not in case.implementations:
            continue
        seq = eager_network(start)
        params[name] = list(seq.parameters())
        step = eager_step(seq)
        if name == "compile":
            step = torch.compile(step, **compile_options)
        if name == "eager_graph":
            if device.type != "cuda":
                unavailable[name] = "needs CUDA (torch.cuda.graph)"
                continue
            graph, loss = _captured_step(step, first["x"], first["y"], device)

            def replay(s: InputSet, graph=graph, loss=loss) -> Outputs:  # always input set 0
                graph.replay()
                return (loss,)

            impls[name] = replay
            continue
        impls[name] = lambda s, step=step: (step(s["x"], s["y"]),)

    names = ["loss"]
    for i, layer in enumerate(start.layers, start=1):
        names += [f"step_w{i}"] + ([f"step_b{i}"] if layer.bias is not None else [])

    def observe(name: str) -> Outputs:
        """One step on input set 0: the loss and each parameter's change (new - old)."""
        before = [p.detach().clone() for p in params[name]]
        (loss,) = impls[name](sets[0])
        return (loss.detach(), *(p.detach() - b for p, b in zip(params[name], before, strict=True)))

    def ref() -> Outputs:
        x, y = sets[0]["x"].double(), sets[0]["y"].double()
        leaves = [p.detach().double().requires_grad_(True) for p in start.parameters()]
        it = iter(leaves)
        ws, bs = [], []
        for layer in start.layers:
            ws.append(next(it))
            bs.append(next(it) if layer.bias is not None else None)
        loss = loss_fn(reference.fnn_forward(x, ws, bs, start.activations), y)
        grads = torch.autograd.grad(loss, leaves)
        return (loss.detach(), *(-lr * g for g in grads))  # SGD's first step, momentum 0

    flop, nbytes = train_work(case)
    return Problem(
        case,
        device,
        sets,
        impls,
        tuple(names),
        ref,
        set_bytes,
        flop,
        nbytes,
        extra={"models": models, "start": start},
        unavailable=unavailable,
        observer=observe,
    )
