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
def _quiet_vmap_fallback():
    """vmap batches fnn's registered ops through PyTorch's per-sample fallback, which warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        yield


def _close(got, want, what):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)}, want {tuple(w.shape)}"
        err = (g - w).abs().max().item()
        assert err <= 1e-12 * max(1.0, w.abs().max().item()), f"{what}: off by {err:.3e}"


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
    renamed = {f"{2 * int(k.split('.')[1])}.{k.split('.')[2]}": v for k, v in params.items()}
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
