"""torch.func's transforms over fnn: grad, vjp, jacrev and vmap of grad (per-sample gradients),
forward mode (jvp, jacfwd, forward_ad) and second order (hessian, jacrev of jacrev, grad of
grad), against the same transforms over PyTorch's own layers in float64.

Under a functorch transform fnn runs each layer through fnn.functional._FuncLinearAct (a
Function with setup_context, which the transforms require) and the registered ops: the
kernels themselves, in the interpreter on the CPU and compiled on a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import spy_layer_ops
from test_network import LaunchCounter
from torch.func import functional_call, grad, jacrev, vjp, vmap

import fnn
import fnn.network

TORCH_ACTS = {
    "sigmoid": torch.sigmoid,
    "relu": F.relu,
    "tanh": torch.tanh,
    "identity": lambda t: t,
    "gelu": F.gelu,  # saves Z
    "silu": F.silu,  # saves Z
}
DT = torch.float64


@pytest.fixture(autouse=True)
def _no_vmap_fallback():
    """Every registered op has its own vmap rule (fnn/ops.py): PyTorch's per-sample fallback,
    which warns, never runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        yield


def _close(got, want, what):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)}, want {tuple(w.shape)}"
        if w.numel() == 0:
            continue
        err = (g - w).abs().max().item()
        assert err <= 1e-12 * max(1.0, w.abs().max().item()), f"{what}: off by {err:.3e}"


def _as_sequential(params: dict) -> dict:
    """An FNN's parameter names ("layers.1.weight") as those of its nn.Sequential twin, whose
    Linear layers alternate with activations ("2.weight")."""
    return {f"{2 * int(k.split('.')[1])}.{k.split('.')[2]}": v for k, v in params.items()}


def _randn(*shape, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=DT).to(device)


@pytest.mark.parametrize("act", list(TORCH_ACTS))
def test_grad_jacrev_and_per_sample_grads_of_linear_act(act, device):
    ref = TORCH_ACTS[act]
    x, w = _randn(7, 3, seed=1, device=device), _randn(4, 3, seed=2, device=device)
    b = _randn(4, seed=3, device=device)

    def loss(f):
        return lambda w, b, x: (f(x, w, b) ** 2).sum()

    ours = lambda x, w, b: fnn.linear_act(x, w, b, act)  # noqa: E731
    theirs = lambda x, w, b: ref(F.linear(x, w, b))  # noqa: E731
    every = (0, 1, 2)
    _close(grad(loss(ours), argnums=every)(w, b, x), grad(loss(theirs), argnums=every)(w, b, x), "grad")
    y, pull = vjp(lambda w: ours(x, w, b), w)
    y_ref, pull_ref = vjp(lambda w: theirs(x, w, b), w)
    dy = _randn(7, 4, seed=4, device=device)
    _close((y, *pull(dy)), (y_ref, *pull_ref(dy)), "vjp")
    jac, jac_ref = jacrev(lambda v: ours(v, w, b))(x[0]), jacrev(lambda v: theirs(v, w, b))(x[0])
    _close((jac,), (jac_ref,), "jacrev (1-D x)")
    per_sample = vmap(grad(lambda w, xi: ours(xi, w, b).sum()), in_dims=(None, 0))
    per_sample_ref = vmap(grad(lambda w, xi: theirs(xi, w, b).sum()), in_dims=(None, 0))
    _close((per_sample(w, x),), (per_sample_ref(w, x),), "per-sample grads")


@pytest.mark.parametrize("fusion", ["layer", "network", "auto"])
def test_grad_of_an_fnn_through_functional_call(fusion, device):
    model = fnn.FNN([3, 5, 6, 2], ["tanh", "gelu", "sigmoid"], dtype=DT, device=device, fusion=fusion)
    seq = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 6), torch.nn.GELU(),
        torch.nn.Linear(6, 2), torch.nn.Sigmoid(),
    ).to(device=device, dtype=DT)  # fmt: skip
    params = {k: v.detach() for k, v in model.named_parameters()}
    renamed = _as_sequential(params)
    x = _randn(9, 3, seed=5, device=device)
    got = grad(lambda p, x: functional_call(model, p, (x,)).square().sum(), argnums=(0, 1))(params, x)
    want = grad(lambda p, x: functional_call(seq, p, (x,)).square().sum(), argnums=(0, 1))(renamed, x)
    _close([got[0][k] for k in params] + [got[1]], [*want[0].values(), want[1]], f"FNN({fusion}) grad")
    for p in model.parameters():
        assert p.grad is None, "a transform leaves .grad alone"


def test_grad_of_the_functional_network_entry_points(device):
    x, b = _randn(6, 3, seed=6, device=device), _randn(4, seed=7, device=device)
    w1, w2 = _randn(4, 3, seed=8, device=device), _randn(2, 4, seed=9, device=device)

    def theirs(w1, w2):
        return torch.sigmoid(F.linear(F.silu(F.linear(x, w1, b)), w2)).sum()

    want = grad(theirs, argnums=(0, 1))(w1, w2)
    for entry in (fnn.fnn_forward, fnn.network.network_forward):

        def ours(w1, w2, f=entry):
            return f(x, [w1, w2], [b, None], ["silu", "sigmoid"]).sum()

        _close(grad(ours, argnums=(0, 1))(w1, w2), want, entry.__name__)


def _entry_points(x, model, params):
    """fnn's four entry points as functions of a first-layer weight w (3 -> 2 here)."""
    return {
        "fnn.linear_act": lambda w: fnn.linear_act(x, w, None, "gelu"),
        "fnn.fnn_forward": lambda w: fnn.fnn_forward(x, [w], [None], ["tanh"]),
        "fnn.network.network_forward": lambda w: fnn.network.network_forward(x, [w], [None], ["silu"]),
        "FNN": lambda w: functional_call(model, {**params, "layers.0.weight": w}, (x,)),
    }


def _reference_entry_points(x, model, params):
    b = params["layers.0.bias"]
    return {
        "fnn.linear_act": lambda w: F.gelu(F.linear(x, w)),
        "fnn.fnn_forward": lambda w: torch.tanh(F.linear(x, w)),
        "fnn.network.network_forward": lambda w: F.silu(F.linear(x, w)),
        "FNN": lambda w: torch.sigmoid(F.linear(x, w, b)),
    }


def test_forward_mode(device):
    """torch.func.jvp and jacfwd, and forward_ad's dual tensors, through every entry point:
    the call runs layer by layer through _FuncLinearAct, whose jvp gives the tangent (the
    kernels' ops alone would drop it). A dual level whose duals do not reach fnn changes
    nothing."""
    import torch.autograd.forward_ad as fwAD

    x, w = _randn(4, 3, seed=10, device=device), _randn(2, 3, seed=11, device=device)
    v = _randn(2, 3, seed=12, device=device)
    model = fnn.FNN([3, 2], dtype=DT, device=device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    theirs = _reference_entry_points(x, model, params)
    for who, call in _entry_points(x, model, params).items():
        _close(torch.func.jvp(call, (w,), (v,)), torch.func.jvp(theirs[who], (w,), (v,)), f"{who} jvp")
        _close((torch.func.jacfwd(call)(w),), (torch.func.jacfwd(theirs[who])(w),), f"{who} jacfwd")
        with fwAD.dual_level():
            got = fwAD.unpack_dual(call(fwAD.make_dual(w, v)))
            want = fwAD.unpack_dual(theirs[who](fwAD.make_dual(w, v)))
        assert got.tangent is not None, f"{who}: forward_ad dropped the tangent"
        _close((got.primal, got.tangent), (want.primal, want.tangent), f"{who} forward_ad")
    with fwAD.dual_level():
        y = fnn.linear_act(x, w)  # no dual reaches fnn
    assert torch.equal(y, fnn.linear_act(x, w))


def test_second_order(device):
    """hessian (jacfwd of jacrev), jacrev of jacrev and grad of grad through every entry point:
    the inner backward sees that an outer level differentiates it and takes the
    differentiable form (LinearActFunction's, in PyTorch ops)."""
    x, w = _randn(4, 3, seed=13, device=device), _randn(2, 3, seed=14, device=device)
    model = fnn.FNN([3, 2], dtype=DT, device=device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    theirs = _reference_entry_points(x, model, params)
    for who, call in _entry_points(x, model, params).items():
        f, g = (lambda w, c=call: c(w).square().sum()), (lambda w, c=theirs[who]: c(w).square().sum())
        _close((torch.func.hessian(f)(w),), (torch.func.hessian(g)(w),), f"{who} hessian")
        _close((jacrev(jacrev(f))(w),), (jacrev(jacrev(g))(w),), f"{who} jacrev of jacrev")
        gg, gg_ref = (grad(lambda w, h=h: grad(h)(w).sin().sum()) for h in (f, g))
        _close((gg(w),), (gg_ref(w),), f"{who} grad of grad")
        assert torch.func.hessian(g)(w).abs().max() > 1e-3, "the test cannot tell a zero hessian"


def test_one_level_of_grad_runs_the_kernel_backward(device, monkeypatch):
    """With nothing outside it to differentiate the gradients, torch.func.grad (and vmap of it)
    runs the kernels' backward; grad of grad takes the differentiable form for the inner
    gradient (the outer one, of Y through the saved output, then runs the kernels again); the
    result of grad on a leaf that requires grad is differentiable by plain autograd."""
    calls: list[str] = []
    spy_layer_ops(monkeypatch, calls)
    real_graph = fnn.functional._graph_layer
    monkeypatch.setattr(fnn.functional, "_graph_layer", lambda *a: calls.append("graph") or real_graph(*a))
    x, w = _randn(4, 3, seed=15, device=device), _randn(2, 3, seed=16, device=device)
    f = lambda w: fnn.linear_act(x, w, None, "sigmoid").square().sum()  # noqa: E731
    grad(f)(w)
    assert calls == ["linear_act_forward", "linear_act_backward_weight"], calls
    calls.clear()
    vmap(grad(f))(torch.stack([w, 2 * w]))
    assert "graph" not in calls and "linear_act_backward_weight" in calls, calls
    calls.clear()
    grad(lambda w: grad(f)(w).sum())(w)
    assert calls == ["linear_act_forward", "graph", "linear_act_backward_weight"], calls
    leaf = w.clone().requires_grad_()
    g = grad(f)(leaf)
    assert g.requires_grad
    (second,) = torch.autograd.grad(g.sum(), leaf)
    want = torch.autograd.functional.hessian(lambda w: torch.sigmoid(F.linear(x, w)).square().sum(), w)
    _close((second,), (want.sum(dim=(0, 1)),), "autograd of torch.func.grad")


def _per_sample_grads(model, seq, x, y):
    """vmap(grad) of a squared-error loss over the samples of (x, y), for the FNN and for its
    PyTorch twin `seq` (same parameters), each parameter's gradient per sample."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    renamed = _as_sequential(params)

    def loss(m):
        return lambda p, x, y: (functional_call(m, p, (x,)) - y).square().sum()

    got = vmap(grad(loss(model)), in_dims=(None, 0, 0))(params, x, y)
    want = vmap(grad(loss(seq)), in_dims=(None, 0, 0))(renamed, x, y)
    return [got[k] for k in params], list(want.values())


@pytest.mark.parametrize(
    "sizes,acts",
    [
        ([3, 16, 2], ["tanh", "sigmoid"]),  # the fused backward (dX, dW, db per sample in one)
        ([3, 40, 2], ["gelu", "relu"]),  # wider than it (float64: 32): dX and dW kernels; Z saved
        ([5, 7, 6, 1], ["silu", "elu", "sigmoid"]),
    ],
)
@pytest.mark.parametrize("rows", [None, 3])
def test_per_sample_gradients_are_one_batch(sizes, acts, rows, device, monkeypatch):
    """vmap(grad) with shared parameters (per-sample gradients) folds the samples into the
    rows: as many launches for 11 samples as for 2, each sample's gradients its own (the
    weight-gradient kernels reduce each sample's rows apart), equal to PyTorch's to 1e-12.
    A sample is one row (rows None: 1-D) or 3 rows."""
    torch.manual_seed(5)  # unseeded, the relu output layer could be dead for both samples
    model = fnn.FNN(sizes, acts, dtype=DT, device=device)
    layers = []
    for i, act in enumerate(acts):
        layers += [torch.nn.Linear(sizes[i], sizes[i + 1]), TORCH_MODULES[act]()]
    seq = torch.nn.Sequential(*layers).to(device=device, dtype=DT)
    launches = LaunchCounter(monkeypatch)
    counts = []
    for batch in (2, 11):
        shape = (batch, sizes[0]) if rows is None else (batch, rows, sizes[0])
        x = _randn(*shape, seed=20 + batch, device=device)
        y = _randn(*shape[:-1], sizes[-1], seed=30 + batch, device=device)
        launches.calls.clear()
        got, want = _per_sample_grads(model, seq, x, y)
        counts.append(len(launches.calls))
        for g in got:
            assert g.shape[0] == batch
            assert g.abs().max() > 0, "the test cannot tell a zero gradient"
        _close(got, want, f"per-sample grads of {batch} samples")
    assert counts[0] == counts[1] <= 3 * len(acts), f"launches for 2 and 11 samples: {counts}"


TORCH_MODULES = {
    "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "gelu": torch.nn.GELU, "relu": torch.nn.ReLU,
    "silu": torch.nn.SiLU, "elu": torch.nn.ELU,
}  # fmt: skip


def test_vmap_over_weights_an_ensemble(device, monkeypatch):
    """vmap over the parameters (an ensemble of models): a shared x's layer stacks the weights
    into one wider launch; a layer whose x and weight both vary runs once per model, as
    PyTorch's fallback would, without its warning. Outputs and per-model gradients against
    PyTorch's to 1e-12."""
    models, x = 4, _randn(6, 3, seed=40, device=device)
    w1, b1 = _randn(models, 5, 3, seed=41, device=device), _randn(models, 5, seed=42, device=device)
    w2 = _randn(models, 2, 5, seed=43, device=device)

    def ours(w1, b1, w2):
        return fnn.fnn_forward(x, [w1, w2], [b1, None], ["tanh", "sigmoid"])

    def theirs(w1, b1, w2):
        return torch.sigmoid(F.linear(torch.tanh(F.linear(x, w1, b1)), w2))

    launches = LaunchCounter(monkeypatch)
    got = vmap(ours)(w1, b1, w2)
    assert launches.calls.count("linear_act_fwd_kernel") == 1 + models, launches.calls
    _close((got,), (vmap(theirs)(w1, b1, w2),), "ensemble forward")
    first = vmap(lambda w, b: fnn.linear_act(x, w, b, "gelu"), in_dims=(0, None))(w1, b1[0])
    want = vmap(lambda w, b: F.gelu(F.linear(x, w, b)), in_dims=(0, None))(w1, b1[0])
    _close((first,), (want,), "a weight per model, one bias")
    every = (0, 1, 2)
    _close(
        vmap(grad(lambda *p: ours(*p).square().sum(), argnums=every))(w1, b1, w2),
        vmap(grad(lambda *p: theirs(*p).square().sum(), argnums=every))(w1, b1, w2),
        "ensemble gradients",
    )


def test_nested_vmap_of_per_sample_gradients(device):
    """vmap of vmap(grad): the outer batch folds in too, the op's row slices nesting in it."""
    model = fnn.FNN([3, 4, 2], ["tanh", "sigmoid"], dtype=DT, device=device)
    seq = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2), torch.nn.Sigmoid()
    ).to(device=device, dtype=DT)  # fmt: skip
    x, y = _randn(3, 5, 2, 3, seed=50, device=device), _randn(3, 5, 2, 2, seed=51, device=device)
    got, want = vmap(lambda x, y: _per_sample_grads(model, seq, x, y))(x, y)
    for g in got:
        assert g.shape[:2] == (3, 5)
    _close(got, want, "vmap of per-sample grads")


def test_per_sample_gradients_on_the_reference_backend(monkeypatch):
    """The vmap rules on the CPU without the interpreter: fnn.reference computes each slice's
    weight gradients (`rows`) as the kernels do."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert fnn.backend("cpu") == "reference"
    model = fnn.FNN([3, 40, 2], ["gelu", "sigmoid"], dtype=DT)
    seq = torch.nn.Sequential(
        torch.nn.Linear(3, 40), torch.nn.GELU(), torch.nn.Linear(40, 2), torch.nn.Sigmoid()
    )  # fmt: skip
    x, y = _randn(6, 4, 3, seed=60, device="cpu"), _randn(6, 4, 2, seed=61, device="cpu")
    got, want = _per_sample_grads(model, seq.to(DT), x, y)
    assert got[0].shape == (6, 40, 3)
    _close(got, want, "per-sample grads, reference backend")


@pytest.mark.parametrize("shape", [(0, 3), (0, 4, 3), (5, 0, 3)], ids=["none", "none-3d", "empty"])
@pytest.mark.parametrize("act", ["sigmoid", "gelu"])
def test_vmap_of_empty_batches(shape, act, device):
    """vmap over no samples, or over samples of no rows, with shared and with per-sample
    weights: PyTorch's shapes and values (zero gradients), as for its own layers."""
    x = _randn(*shape, seed=70, device=device)
    shared = (_randn(2, 3, seed=71, device=device), _randn(2, seed=72, device=device))
    per_sample = (_randn(shape[0], 2, 3, seed=73, device=device), _randn(shape[0], 2, seed=74, device=device))
    every = (0, 1, 2)

    def ours(w, b, x):
        return fnn.linear_act(x, w, b, act).square().sum()

    def theirs(w, b, x):
        return TORCH_ACTS[act](F.linear(x, w, b)).square().sum()

    for (w, b), in_dims in [(shared, (None, None, 0)), (per_sample, (0, 0, 0))]:
        got = vmap(grad(ours, argnums=every), in_dims=in_dims)(w, b, x)
        want = vmap(grad(theirs, argnums=every), in_dims=in_dims)(w, b, x)
        _close(got, want, f"vmap(grad) over {shape}, weights {in_dims[0]}")
        y = vmap(lambda w, b, x: fnn.linear_act(x, w, b, act), in_dims=in_dims)(w, b, x)
        assert y.shape == vmap(lambda w, b, x: F.linear(x, w, b), in_dims=in_dims)(w, b, x).shape


@pytest.mark.parametrize("fusion", ["layer", "network"])
def test_vmap_of_inference_forwards(fusion, device, monkeypatch):
    """An FNN's forward without gradients under vmap (the whole-network op on the network
    path): shared parameters take the same launches for 2 samples as for 9; parameters per
    model (functional_call over stacked ones) run once per model. Against PyTorch to 1e-12."""
    model = fnn.FNN([3, 5, 2], ["gelu", "sigmoid"], dtype=DT, device=device, fusion=fusion)
    seq = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.GELU(), torch.nn.Linear(5, 2), torch.nn.Sigmoid()
    ).to(device=device, dtype=DT)  # fmt: skip
    seq.load_state_dict(_as_sequential(model.state_dict()))
    launches = LaunchCounter(monkeypatch)
    counts = []
    with torch.no_grad():
        for batch in (2, 9):
            x = _randn(batch, 4, 3, seed=80 + batch, device=device)
            launches.calls.clear()
            got = vmap(model)(x)
            counts.append(len(launches.calls))
            _close((got,), (vmap(seq)(x),), f"vmap of {fusion} inference, {batch} samples")
        assert counts[0] == counts[1] >= 1, counts
        stacked = {k: torch.stack([v, 2 * v]) for k, v in model.state_dict().items()}
        renamed = _as_sequential(stacked)
        got = vmap(lambda p: functional_call(model, p, (x,)))(stacked)
        _close((got,), (vmap(lambda p: functional_call(seq, p, (x,)))(renamed),), "vmap over parameters")


# --- torch.compile of the transforms -----------------------------------------------------------


def _compiled(fn, fullgraph=True):
    """torch.compile(fn) with a backend that keeps the graphs Dynamo hands it (Dynamo reset
    first, so that this call compiles instead of reusing another's cache)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=keep, fullgraph=fullgraph), graphs


def _fnn_nodes(graphs) -> int:
    """Calls of fnn's registered ops (torch.ops.fnn.*) in the graphs."""
    return sum(str(n.target).startswith("fnn.") for g in graphs for n in g.graph.nodes)


def test_compiled_transforms(device):
    """torch.compile of grad, jvp, forward_ad and hessian over every entry point, fullgraph:
    the same values as the uncompiled transform of PyTorch's layers (before, grad failed while
    tracing and jvp gave a wrong tangent without an error). Dynamo cannot trace the kernels'
    Functions under these transforms, so the graph holds the layers as PyTorch ops."""
    import torch.autograd.forward_ad as fwAD

    x, w = _randn(4, 3, seed=90, device=device), _randn(2, 3, seed=91, device=device)
    v = _randn(2, 3, seed=92, device=device)
    model = fnn.FNN([3, 2], dtype=DT, device=device)
    params = {k: p.detach() for k, p in model.named_parameters()}
    theirs = _reference_entry_points(x, model, params)

    def dual(call):
        def run(w, v):
            with fwAD.dual_level():
                return fwAD.unpack_dual(call(fwAD.make_dual(w, v))).tangent

        return run

    for who, call in _entry_points(x, model, params).items():
        ref = theirs[who]
        cases = {
            "grad": (lambda c: grad(lambda w: c(w).square().sum()), (w,)),
            "jvp": (lambda c: lambda w, v: torch.func.jvp(c, (w,), (v,)), (w, v)),
            "forward_ad": (dual, (w, v)),
            "hessian": (lambda c: torch.func.hessian(lambda w: c(w).square().sum()), (w,)),
        }
        for what, (transform, args) in cases.items():
            f, graphs = _compiled(transform(call))
            got = torch.utils._pytree.tree_leaves(f(*args))
            _close(got, torch.utils._pytree.tree_leaves(transform(ref)(*args)), f"{who} compiled {what}")
            assert graphs and _fnn_nodes(graphs) == 0, f"{who} {what}: {len(graphs)} graphs"


@pytest.mark.parametrize("fusion", ["layer", "network"])
def test_compiled_per_sample_gradients(fusion, device):
    """torch.compile(vmap(grad(loss))) over an FNN (functional_call), fullgraph: PyTorch's
    per-sample gradients to 1e-12."""
    model = fnn.FNN([3, 5, 2], ["gelu", "sigmoid"], dtype=DT, device=device, fusion=fusion)
    seq = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.GELU(), torch.nn.Linear(5, 2), torch.nn.Sigmoid()
    ).to(device=device, dtype=DT)  # fmt: skip
    x, y = _randn(7, 3, seed=93, device=device), _randn(7, 2, seed=94, device=device)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(m):
        return lambda p, x, y: (functional_call(m, p, (x,)) - y).square().sum()

    f, graphs = _compiled(vmap(grad(loss(model)), in_dims=(None, 0, 0)))
    got = f(params, x, y)
    want = vmap(grad(loss(seq)), in_dims=(None, 0, 0))(_as_sequential(params), x, y)
    _close([got[k] for k in params], [want[k] for k in _as_sequential(params)], f"{fusion} per-sample grads")
    assert graphs


@pytest.mark.parametrize("fusion", ["layer", "network"])
def test_compiled_vmap_of_inference_keeps_the_kernels(fusion, device, monkeypatch):
    """One vmap over a forward that needs no gradient traces through fnn's registered ops:
    the compiled graph calls the kernels, and the values are PyTorch's."""
    model = fnn.FNN([3, 5, 2], ["gelu", "sigmoid"], dtype=DT, device=device, fusion=fusion)
    seq = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.GELU(), torch.nn.Linear(5, 2), torch.nn.Sigmoid()
    ).to(device=device, dtype=DT)  # fmt: skip
    seq.load_state_dict(_as_sequential(model.state_dict()))
    x = _randn(3, 4, 3, seed=95, device=device)
    params = dict(model.named_parameters())
    launches = LaunchCounter(monkeypatch)
    with torch.no_grad():
        # vmap(model) itself breaks Dynamo's graph for any module holding a ModuleList (vmap
        # formats the module's repr), so the module runs through functional_call
        f, graphs = _compiled(vmap(lambda x: functional_call(model, params, (x,))))
        _close((f(x),), (vmap(seq)(x),), f"compiled vmap of {fusion} inference")
    assert _fnn_nodes(graphs) >= 1 and launches.calls, (_fnn_nodes(graphs), launches.calls)
