"""torch.compile: the kernels are registered operators (fnn.ops), so whole models compile
with fullgraph=True, without graph breaks, and match eager mode forward and backward.

Two CPU modes run in one session: "reference" (TRITON_INTERPRET unset, so CPU tensors use
fnn.reference) and "kernels" (the Triton kernels: compiled on CUDA, interpreted on CPU).
The backend is picked inside the ops when they run, so one compiled graph serves both.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import fnn
from fnn import reference


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and leaves no compiled code behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=["reference", "kernels"])
def mode_device(request, monkeypatch, device) -> torch.device:
    """The device to run on, with the backend the mode names selected (and checked)."""
    if request.param == "reference":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        dev = torch.device("cpu")
        assert fnn.backend(dev) == "reference"
    else:
        dev = device
        assert fnn.backend(dev) in ("triton", "interpreter")
    return dev


class _RecordingBackend:
    """An aot_autograd backend that runs the graphs eagerly and keeps the forward and backward
    graphs it was given, to check which operators they call."""

    def __init__(self) -> None:
        self.fw: list[torch.fx.GraphModule] = []
        self.bw: list[torch.fx.GraphModule] = []
        self.backend = aot_autograd(fw_compiler=self._keep(self.fw), bw_compiler=self._keep(self.bw))

    @staticmethod
    def _keep(into):
        def compiler(gm, example_inputs):
            into.append(gm)
            return make_boxed_func(gm.forward)

        return compiler


def _targets(graphs: list[torch.fx.GraphModule]) -> set[str]:
    return {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}


class _MLP(torch.nn.Module):
    """A module written with the functional API: two linear_act calls and a plain op between."""

    def __init__(self, device, dtype) -> None:
        super().__init__()
        self.a = fnn.FusedLinear(5, 16, activation="tanh", device=device, dtype=dtype)
        self.b = fnn.FusedLinear(16, 3, bias=False, activation="relu", device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = fnn.linear_act(x, self.a.weight, self.a.bias, "tanh")
        return fnn.linear_sigmoid(h * 2, self.b.weight)


def _reference_mlp(m: _MLP, x: torch.Tensor) -> torch.Tensor:
    h = reference.linear_act(x, m.a.weight, m.a.bias, "tanh")
    return reference.linear_act(h * 2, m.b.weight, None, "sigmoid")


def _run(fn, params, x, dy):
    """Output and gradients (of x and every parameter) of fn(x) against dy."""
    for p in params:
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in params]


def _check(actual, expected, what):
    names = ["output", "dx"] + [f"grad of parameter {i}" for i in range(len(actual) - 2)]
    for a, e, name in zip(actual, expected, names, strict=True):
        assert_close(a, e, rtol=1e-12, atol=1e-12, what=f"{what}: {name}")


def _random(shape, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device)


# ---------------------------------------------------------------------------------------------
# No graph breaks; the graphs call the registered ops
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def auto_is_network(monkeypatch):
    """fusion="auto" resolved as on CUDA: the whole-network path for narrow networks. (On the
    CPU "auto" means "layer"; the kernels still run in the interpreter.)"""
    monkeypatch.setattr(fnn.network, "backend", lambda device: "triton")
    assert fnn.network.resolve_fusion("auto", [5, 16, 3], "cpu") == "network"


# "auto" runs with auto_is_network: the path fusion="auto" takes on CUDA for these widths.
FUSIONS = ["layer", "network", "auto"]


@pytest.fixture(params=FUSIONS)
def fusion(request) -> str:
    if request.param == "auto":
        request.getfixturevalue("auto_is_network")
    return request.param


@pytest.fixture(params=["network", "auto"])
def network_fusion(request) -> str:
    """The fusions that take the whole-network path ("auto" as on CUDA)."""
    if request.param == "auto":
        request.getfixturevalue("auto_is_network")
    return request.param


def test_explain_fnn_forward_has_no_graph_break(device, fusion):
    model = fnn.FNN([5, 16, 3], ["relu", "sigmoid"], device=device, dtype=torch.float64, fusion=fusion)
    x = _random((7, 5), device, 0)
    for x_grad in (False, True):  # with x requiring grad, the backward is traced too
        explained = torch._dynamo.explain(model)(x.clone().requires_grad_(x_grad))
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_explain_linear_act_forward_and_backward_has_no_graph_break(device):
    """With inputs requiring grad, dynamo traces the autograd.Function's backward too; an
    untraceable backward would show up as a graph break here."""
    m = _MLP(device, torch.float64)
    x = _random((7, 5), device, 1).requires_grad_(True)
    explained = torch._dynamo.explain(m)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize(
    ("sizes", "backward_ops"),
    [
        ([5, 16, 3], {"fnn.linear_act_backward.default"}),  # narrow: dX, dW, db from one op per layer
        ([5, 40, 3], {"fnn.linear_act_backward_input.default", "fnn.linear_act_backward_weight.default"}),
    ],
    ids=["fused", "wide"],
)
def test_compiled_graphs_call_the_fnn_ops(device, sizes, backward_ops):
    """Forward and backward graphs hold the opaque fnn ops and no decomposed matmul: the fused
    backward op for layers whose weight fits its tile (40 > 32 in float64 does not)."""
    model = fnn.FNN(sizes, ["relu", "sigmoid"], device=device, dtype=torch.float64, fusion="layer")
    rec = _RecordingBackend()
    x = _random((7, 5), device, 2).requires_grad_(True)
    torch.compile(model, backend=rec.backend, fullgraph=True)(x).sum().backward()
    fw, bw = _targets(rec.fw), _targets(rec.bw)
    assert "fnn.linear_act_forward.default" in fw, fw
    fnn_bw = {t for t in bw if t.startswith("fnn.")}
    assert fnn_bw == backward_ops, bw
    assert not any("mm" in t or "sigmoid" in t for t in fw | bw), fw | bw


# ---------------------------------------------------------------------------------------------
# Compiled == eager, forward and backward, default (inductor) backend, both CPU modes
# ---------------------------------------------------------------------------------------------


def test_compiled_fnn_matches_eager(mode_device):
    dev = mode_device
    torch.manual_seed(0)
    model = fnn.FNN(
        [5, 16, 8, 3], activation=["relu", "tanh", "sigmoid"], device=dev, dtype=torch.float64, fusion="layer"
    )
    params = list(model.parameters())
    compiled = torch.compile(model, fullgraph=True)
    for m in (7, 9):  # the second size recompiles with a dynamic batch dimension
        x, dy = _random((m, 5), dev, m), _random((m, 3), dev, 100 + m)
        eager = _run(model, params, x, dy)
        _check(_run(compiled, params, x, dy), eager, f"compiled FNN, batch {m}")
        ref = _run(lambda x: reference.fnn_forward(x, *_unpack(model)), params, x, dy)
        _check(eager, ref, f"eager FNN vs reference, batch {m}")


def test_concat_parameters(device):
    """The flat buffer the network path concatenates, eager and traced: every weight
    row-major, then each bias that exists; `unflatten` gives the parameters back as views."""
    g = torch.Generator().manual_seed(7)
    sizes = [3, 20, 1, 5]
    weights = [torch.randn(o, i, generator=g).to(device) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    biases = [torch.randn(20, generator=g).to(device), None, torch.randn(5, generator=g).to(device)]
    expected = torch.cat([w.flatten() for w in weights] + [biases[0], biases[2]])
    cat = fnn.network.concat_parameters
    traced = torch.compile(cat, fullgraph=True, backend="aot_eager")
    for got in (cat(weights, biases), traced(weights, biases)):
        assert got.is_contiguous() and torch.equal(got, expected)
    ws, bs = fnn.network_ops.unflatten(expected, sizes, (True, False, True))
    for a, b in zip([*ws, *bs], [*weights, *biases], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(cat(weights[:1], [None]), weights[0].flatten())


def test_compiled_network_fnn_matches_eager(device, network_fusion):
    """Compiled by inductor (fullgraph), the FNN gives eager's output and every gradient bit
    for bit (eager reads the FNN's flat buffer, the graph concatenates the parameters), also
    with parameters replaced by load_state_dict(assign=True); the graphs hold the two opaque
    network ops and no matmul."""
    fusion = network_fusion
    torch.manual_seed(2)
    model = fnn.FNN(
        [5, 16, 8, 3], activation=["relu", "tanh", "sigmoid"], device=device, dtype=torch.float64,
        fusion=fusion,
    )
    params = list(model.parameters())
    rec = _RecordingBackend()
    # inductor once; "auto" takes the same path, so its graphs are only recorded (and run).
    for backend in ("inductor", rec.backend) if fusion == "network" else (rec.backend,):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        for m in (7, 9):  # the second size recompiles with a dynamic batch dimension
            x, dy = _random((m, 5), device, m), _random((m, 3), device, 100 + m)
            eager = _run(model, params, x, dy)
            _check(_run(compiled, params, x, dy), eager, f"compiled FNN({fusion}), batch {m}")
    fw, bw = _targets(rec.fw), _targets(rec.bw)
    assert "fnn.network_forward.default" in fw and "fnn.network_backward.default" in bw, (fw, bw)
    assert not any("linear_act" in t or "mm" in t for t in fw | bw), fw | bw
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    params = list(model.parameters())
    assert fnn.network.flat_buffer(model, *fnn.network._layers_parameters(model)) is None
    x, dy = _random((7, 5), device, 7), _random((7, 3), device, 107)
    eager = _run(model, params, x, dy)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _check(_run(compiled, params, x, dy), eager, f"{fusion}, assigned parameters")


def test_compiled_network_new_activations_match_eager(device, network_fusion):
    """The network path with parameters and Z-saving layers (an output layer that saves Z:
    the forward op's third output feeds the backward op), compiled by inductor without a
    graph break, gives eager's output and gradients."""
    fusion = network_fusion
    torch.manual_seed(4)
    A = fnn.Activation
    acts = ["gelu", A("leaky_relu", negative_slope=-0.2), A("softplus", threshold=2.0)]
    model = fnn.FNN([5, 16, 8, 3], activation=acts, device=device, dtype=torch.float64, fusion=fusion)
    params = list(model.parameters())
    x, dy = _random((7, 5), device, 5), _random((7, 3), device, 6)
    explained = torch._dynamo.explain(model)(x.clone().requires_grad_(True))
    assert explained.graph_break_count == 0, explained.break_reasons
    eager = _run(model, params, x, dy)
    rec = _RecordingBackend()
    for backend in ("inductor", rec.backend) if fusion == "network" else (rec.backend,):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        _check(_run(compiled, params, x, dy), eager, f"compiled FNN({fusion}), new activations")
    fw, bw = _targets(rec.fw), _targets(rec.bw)
    assert "fnn.network_forward.default" in fw and "fnn.network_backward.default" in bw, (fw, bw)
    ref = _run(lambda x: reference.fnn_forward(x, *_unpack(model)), params, x, dy)
    _check(eager, ref, "eager network vs reference")


def test_compiled_new_activations_match_eager(mode_device):
    """Activations with parameters (carried by the ops as float[]) and Z-saving ones (the
    linear_act_forward_z op, and the weight gradient recomputing a layer's output from Z)
    compile without graph breaks and match eager mode."""
    dev = mode_device
    torch.manual_seed(2)
    acts = ["gelu", fnn.Activation("leaky_relu", negative_slope=0.2), fnn.Activation("softplus", beta=2.0)]
    model = fnn.FNN([5, 16, 8, 3], activation=acts, device=dev, dtype=torch.float64, fusion="layer")
    params = list(model.parameters())
    x, dy = _random((7, 5), dev, 3), _random((7, 3), dev, 4)
    explained = torch._dynamo.explain(model)(x.requires_grad_(True))
    assert explained.graph_break_count == 0, explained.break_reasons
    eager = _run(model, params, x, dy)
    _check(_run(torch.compile(model, fullgraph=True), params, x, dy), eager, "compiled FNN, new activations")
    ref = _run(lambda x: reference.fnn_forward(x, *_unpack(model)), params, x, dy)
    _check(eager, ref, "eager vs reference")


def _unpack(model: fnn.FNN):
    return [la.weight for la in model.layers], [la.bias for la in model.layers], model.activations


def test_compiled_linear_act_module_matches_eager(mode_device):
    dev = mode_device
    torch.manual_seed(1)
    m = _MLP(dev, torch.float64)
    params = list(m.parameters())
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x, dy = _random((3, 4, 5), dev, 3), _random((3, 4, 3), dev, 4)  # a 3-D input
    eager = _run(m, params, x, dy)
    _check(_run(compiled, params, x, dy), eager, "compiled linear_act module")
    _check(eager, _run(lambda x: _reference_mlp(m, x), params, x, dy), "eager module vs reference")


def test_compiled_empty_batch(device):
    """M = 0 goes through the fake implementations and the ops' empty-batch paths."""
    model = fnn.FNN([5, 4, 3], device=device, dtype=torch.float64, fusion="layer")
    x = torch.zeros((0, 5), dtype=torch.float64, device=device, requires_grad=True)
    y = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 5)
    for p in model.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p)), "an empty batch has zero gradients"


@pytest.mark.parametrize("fusion", ["layer", "network"])
def test_compiled_widths_follow_the_weights(fusion, device):
    """A first layer given a weight of another input width (in_features left as it was) runs
    compiled with fullgraph as in eager: the traced forward reads the widths off the weights,
    as the eager plan does (before, the stale in_features failed the traced width check)."""
    model = fnn.FNN([3, 6, 3], device=device, dtype=torch.float64, fusion=fusion)
    model.layers[0].weight = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64, device=device))
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    torch._dynamo.reset()
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert model.sizes == [4, 6, 3]
    assert torch.allclose(got, model(x), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The registrations themselves
# ---------------------------------------------------------------------------------------------


def _op_samples(device):
    """(op, args) covering bias / no bias, M = 0, the optional x and need_bias False."""
    g = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(device)

    out = []
    for m in (6, 0):
        x, w, b = r(m, 5), r(4, 5), r(4)
        y, dy = torch.sigmoid(x @ w.T + b), r(m, 4)
        out += [
            (torch.ops.fnn.linear_act_forward.default, (x, w, b, "sigmoid")),
            (torch.ops.fnn.linear_act_forward.default, (x, w, None, "relu")),
            (torch.ops.fnn.linear_act_backward_input.default, (dy, y, w, "sigmoid", None, "identity")),
            (torch.ops.fnn.linear_act_backward_input.default, (dy, y, w, "sigmoid", torch.tanh(x), "tanh")),
            (torch.ops.fnn.linear_act_backward_weight.default, (dy, y, x, "sigmoid", True, None)),
            (torch.ops.fnn.linear_act_backward_weight.default, (dy, y, x, "sigmoid", False, None)),
            # Parameters as float[], the op that also writes Z, Z-saving derivatives.
            (torch.ops.fnn.linear_act_forward.default, (x, w, b, "leaky_relu", [0.2])),
            (torch.ops.fnn.linear_act_forward.default, (x, w, None, "softplus", [2.0, 5.0])),
            (torch.ops.fnn.linear_act_forward_z.default, (x, w, b, "gelu", [])),
            (torch.ops.fnn.linear_act_forward_z.default, (x, w, None, "elu", [-0.5])),
            (
                torch.ops.fnn.linear_act_backward_input.default,
                (dy, x @ w.T, w, "silu", x, "softplus", [], [1.5, 1.0]),
            ),
            (
                torch.ops.fnn.linear_act_backward_weight.default,
                (dy, x @ w.T, x, "elu", True, None, [-0.5], "gelu_tanh", []),
            ),
            # The fused backward: bias or not, a previous layer's delta, a split batch, a
            # heavy activation (D formed first), parameters.
            (torch.ops.fnn.linear_act_backward.default, (dy, y, w, x, "sigmoid", True)),
            (torch.ops.fnn.linear_act_backward.default, (dy, y, w, torch.tanh(x), "sigmoid", False, "tanh")),
            (
                torch.ops.fnn.linear_act_backward.default,
                (dy, y, w, x, "sigmoid", True, "identity", [], [], 2),
            ),
            (
                torch.ops.fnn.linear_act_backward.default,
                (dy, x @ w.T, w, torch.relu(x), "softplus", True, "leaky_relu", [1.5, 1.0], [0.3]),
            ),
        ]
    return out


def test_fake_implementations_match_real_outputs(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    for op, args in _op_samples(device):
        real = op(*args)
        real = real if isinstance(real, tuple) else (real,)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fake_args)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for r, f in zip(real, fake, strict=True):
            assert (tuple(f.shape), f.dtype, f.device) == (tuple(r.shape), r.dtype, r.device), (op, args[3:])


def test_opcheck(device):
    """torch.library.opcheck: schema, fake tensor and AOT dispatch agree with the real ops."""
    for op, args in _op_samples(device):
        torch.library.opcheck(op, args)


def _network_op_samples(device):
    """(op, args) of the network ops: one layer and three, bias on every layer, on some and on
    none, hidden outputs stored or not, dx wanted or not, M = 0; activations with parameters
    (float[] act_params) and Z-saving ones, hidden and output (the forward's third output Z_L
    is then the backward's `y`), an identity output (dY as `y`)."""
    g = torch.Generator().manual_seed(6)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(device)

    out = []
    cases = [
        ([4, 3], [True], 6, ["tanh"], []),
        ([5, 17, 8, 2], [True, False, True], 5, ["tanh", "relu", "sigmoid"], []),
        ([3, 9, 2], [False, False], 0, ["tanh", "relu"], []),
        ([4, 3], [True], 6, ["gelu"], []),
        ([5, 17, 8, 2], [True, False, True], 5, ["silu", "elu", "softplus"], [-0.5, 2.0, 1.0]),
        ([3, 9, 7, 2], [False, True, False], 4, ["leaky_relu", "gelu_tanh", "identity"], [-0.2]),
    ]
    for sizes, biased, m, acts, params in cases:
        weights = [r(o, i) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
        biases = [r(o) if b else None for o, b in zip(sizes[1:], biased, strict=True)]
        flat = fnn.network.concat_parameters(weights, biases)
        x, dy = r(m, sizes[0]), r(m, sizes[-1])
        for store in (False, True):
            out.append((torch.ops.fnn.network_forward.default, (x, flat, sizes, acts, biased, store, params)))
        y, h, z = torch.ops.fnn.network_forward(x, flat, sizes, acts, biased, True, params)
        saves = fnn.network_ops.decode(acts, params, "test")[-1].saves  # what the backward reads
        s_out = {"z": z, "y": y, "none": dy}[saves]
        for need_dx in (True, False):
            args = (dy, s_out, h, x, flat, sizes, acts, biased, need_dx, params)
            out.append((torch.ops.fnn.network_backward.default, args))
    return out


def test_network_ops_fake_implementations_match_real_outputs(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    for op, args in _network_op_samples(device):
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        for i, (r, f) in enumerate(zip(real, fake, strict=True)):
            got, want = (tuple(f.shape), f.dtype, f.device), (tuple(r.shape), r.dtype, r.device)
            assert got == want, (op, i, [a for a in args if not isinstance(a, torch.Tensor)])


def test_network_ops_opcheck(mode_device):
    for op, args in _network_op_samples(mode_device):
        torch.library.opcheck(op, args)


def test_network_ops_reference_matches_kernels(device, monkeypatch):
    """Without the interpreter the ops run fnn.reference: the same outputs, padding included."""
    samples = _network_op_samples(device)
    kernels_out = [op(*args) for op, args in samples]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for (op, args), want in zip(samples, kernels_out, strict=True):
        args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
        for i, (got, w) in enumerate(zip(op(*args), want, strict=True)):
            assert_close(got, w, rtol=1e-12, atol=1e-12, what=f"{op} output {i}")
