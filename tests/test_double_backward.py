"""Double backward: gradients taken with create_graph=True can be differentiated again.

fnn's kernels compute gradients autograd cannot differentiate. Under create_graph=True, where
dY or a saved tensor requires grad, each Function computes its gradients from PyTorch ops on
the saved tensors instead (fnn.functional._with_graph): D off the saved Y, or off Z recomputed
from X, W and b for a layer; the whole network recomputed for FNNFunction and
NetworkFunction. These tests differentiate those gradients (a gradient penalty, gradgradcheck,
a third derivative) against PyTorch's own layers in float64, and check that the plain
backward still runs the kernels. The forward runs the kernels in every case.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, spy_layer_ops

import fnn
import fnn.functional
import fnn.network
from fnn import reference
from kernels.checks import ACTIVATION_VARIANTS

DT = torch.float64


def _randn(shape, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=DT).to(device)


def _penalized(f, inputs, wrt):
    """d/d(inputs) of sum(y) + sum over `wrt` of |d sum(y^2) / d input|^2, y = f(*inputs): the
    gradient penalty, whose gradient needs the second derivatives."""
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip(inputs, wrt, strict=True)]
    y = f(*leaves)
    first = torch.autograd.grad((y * y).sum(), [t for t in leaves if t.requires_grad], create_graph=True)
    penalty = sum((g * g).sum() for g in first)
    assert penalty.requires_grad, "the gradients taken with create_graph are not differentiable"
    second = torch.autograd.grad(y.sum() + penalty, [t for t in leaves if t.requires_grad])
    return [g.detach() for g in first], second


def _agree(ours, theirs, what):
    for i, (a, e) in enumerate(zip(ours, theirs, strict=True)):
        assert_close(a, e, 1e-10, 1e-10 * max(1.0, e.abs().max().item()), f"{what} [{i}]")


@pytest.mark.parametrize("act", ACTIVATION_VARIANTS, ids=repr)
def test_gradient_penalty_through_linear_act(act, device):
    """Every activation, a 2-D and a 3-D input, and each of x-only and weight-only gradients (a
    layer that saves Y then has only X or only W saved, not both)."""
    w, b = _randn((4, 3), 2, device), _randn((4,), 3, device)
    for shape in ((6, 3), (2, 5, 3)):
        x = _randn(shape, 1, device)
        for wrt in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
            ours = _penalized(lambda x, w, b: fnn.linear_act(x, w, b, act), (x, w, b), wrt)
            theirs = _penalized(lambda x, w, b: reference.linear_act(x, w, b, act), (x, w, b), wrt)
            _agree([*ours[0], *ours[1]], [*theirs[0], *theirs[1]], f"{act} x{shape} wrt={wrt}")


@pytest.mark.parametrize("fusion", ["layer", "network"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradient_penalty_through_an_fnn(fusion, bias, device):
    """FNNFunction and NetworkFunction (and the eager Functions that hand their create_graph
    backward to them): a Z-saving hidden layer, an identity one, 2-D and 3-D inputs."""
    acts = ["tanh", "gelu", "identity", "sigmoid"]
    model = fnn.FNN([3, 5, 6, 4, 2], acts, bias=bias, dtype=DT, device=device, fusion=fusion)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]

    def ours(x, *ps):
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))

    def theirs(x, *ps):
        weights = ps[0::2] if bias else ps
        biases = ps[1::2] if bias else [None] * len(ps)
        return reference.fnn_forward(x, weights, biases, acts)

    node = "NetworkFunction" if fusion == "network" else "FNNFunction"
    for shape in ((7, 3), (2, 4, 3)):
        x = _randn(shape, 5, device)
        y = model(x.requires_grad_())
        assert node in type(y.grad_fn).__name__ or "Eager" in type(y.grad_fn).__name__
        n = len(params)
        for wrt in ((True,) * (1 + n), (False,) + (True,) * n, (True,) + (False,) * n):
            got = _penalized(ours, (x, *params), wrt)
            want = _penalized(theirs, (x, *params), wrt)
            what = f"FNN {fusion} bias={bias} x{shape} wrt={wrt[:2]}"
            _agree([*got[0], *got[1]], [*want[0], *want[1]], what)
    # The module's own parameters (on the network path: views of its flat buffer), not a
    # functional_call's.
    x = _randn((7, 3), 5, device).requires_grad_()
    y = model(x)
    first = torch.autograd.grad((y * y).sum(), [x, *model.parameters()], create_graph=True)
    got = torch.autograd.grad(y.sum() + sum((g * g).sum() for g in first), [x, *model.parameters()])
    want = _penalized(theirs, (x, *params), (True,) * (1 + len(params)))
    _agree([*first, *got], [*want[0], *want[1]], f"FNN {fusion} bias={bias}, its own parameters")


def test_functional_network_entry_points(device):
    """fnn.fnn_forward (FNNFunction) and fnn.network.network_forward (NetworkFunction, the
    parameters concatenated for the call)."""
    x, b = _randn((6, 3), 6, device), _randn((4,), 7, device)
    w1, w2 = _randn((4, 3), 8, device), _randn((2, 4), 9, device)
    acts = ["silu", "sigmoid"]
    ref = lambda x, w1, w2: reference.fnn_forward(x, [w1, w2], [b, None], acts)  # noqa: E731
    want = _penalized(ref, (x, w1, w2), [True] * 3)
    for entry in (fnn.fnn_forward, fnn.network.network_forward):
        got = _penalized(lambda x, w1, w2, f=entry: f(x, [w1, w2], [b, None], acts), (x, w1, w2), (True,) * 3)
        _agree([*got[0], *got[1]], [*want[0], *want[1]], entry.__name__)


def test_gradgradcheck(device):
    """torch.autograd's numerical check of the second derivatives (finite differences of the
    differentiable backward), with respect to x, W, b and dY."""
    x = _randn((3, 2), 10, device).requires_grad_()
    w = _randn((2, 2), 11, device).requires_grad_()
    b = _randn((2,), 12, device).requires_grad_()
    for act in ("sigmoid", "gelu"):
        assert torch.autograd.gradgradcheck(lambda x, w, b, a=act: fnn.linear_act(x, w, b, a), (x, w, b))
    model = fnn.FNN([2, 3, 1], ["tanh", "sigmoid"], dtype=DT, device=device, fusion="network")
    assert torch.autograd.gradgradcheck(model, (x,))


def test_third_derivative(device):
    """Higher orders too: d^3/dx^3 of sum(sigmoid(x w^T + b)) for a one-feature x."""
    x = _randn((5, 1), 13, device)
    w, b = _randn((3, 1), 14, device), _randn((3,), 15, device)

    def third(f):
        t = x.clone().requires_grad_()
        (g1,) = torch.autograd.grad(f(t).sum(), t, create_graph=True)
        (g2,) = torch.autograd.grad(g1.sum(), t, create_graph=True)
        (g3,) = torch.autograd.grad(g2.sum(), t)
        return g3

    ours = third(lambda t: fnn.linear_act(t, w, b, "sigmoid"))
    assert_close(ours, third(lambda t: torch.sigmoid(F.linear(t, w, b))), 1e-10, 1e-12, "d3/dx3")
    assert ours.abs().max() > 1e-3, "the test cannot tell a zero third derivative"


def test_plain_backward_runs_the_kernels_and_create_graph_does_not(device, monkeypatch):
    """The usual backward (no create_graph) calls the kernels' launchers; create_graph computes
    the same gradients with PyTorch ops, and agrees with the kernels' to rounding."""
    calls: list[str] = []
    spy_layer_ops(monkeypatch, calls)
    x = _randn((6, 3), 16, device).requires_grad_()
    w = _randn((4, 3), 17, device).requires_grad_()
    y = fnn.linear_act(x, w, None, "gelu")
    plain = torch.autograd.grad(y, (x, w), torch.ones_like(y), retain_graph=True)
    assert any("backward" in c for c in calls), calls
    calls.clear()
    graph = torch.autograd.grad(y, (x, w), torch.ones_like(y), create_graph=True)
    assert not any("backward" in c for c in calls), calls
    assert all(g.requires_grad for g in graph)
    _agree(graph, plain, "create_graph against the kernels")


def test_create_graph_under_autocast_keeps_the_forward_dtypes(device):
    """A create_graph backward called inside torch.autocast computes in the dtypes the forward
    ran in (float32 here), not in the autocast dtype."""
    x = _randn((6, 3), 18, device).float().requires_grad_()
    w = _randn((4, 3), 19, device).float().requires_grad_()
    y = fnn.linear_act(x, w, None, "sigmoid")
    with torch.autocast(device.type, dtype=torch.bfloat16):
        (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert gx.dtype == torch.float32
    want = ((y * (1 - y)).detach() @ w.detach()).double()
    assert_close(gx, want, 1e-5, 1e-6, "dx under autocast")


def test_frozen_parameters_and_a_penalty_on_the_input(device):
    """Input-gradient penalties on a frozen model (saliency, adversarial training): x alone
    requires grad; the layer path saves only W and Y, and still differentiates."""
    model = fnn.FNN([3, 8, 1], ["relu", "sigmoid"], dtype=DT, device=device, fusion="layer")
    model.requires_grad_(False)
    ref = [(layer.weight, layer.bias) for layer in model.layers]
    x = _randn((9, 3), 20, device).requires_grad_()
    weights, biases = [w for w, _ in ref], [b for _, b in ref]
    got = []
    for f in (model, lambda t: reference.fnn_forward(t, weights, biases, ["relu", "sigmoid"])):
        (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
        got.append(torch.autograd.grad((g * g).sum(), x)[0])
    assert_close(got[0], got[1], 1e-10, 1e-12, "input-gradient penalty, frozen model")
    assert got[1].abs().max() > 1e-6, "the test cannot tell a zero second derivative"


def test_in_place_changes_fail_only_the_backward_that_reads_them(device):
    """What only the differentiable backward reads (the biases, x and W of a Z-saving layer) is
    kept beside the saved tensors, not saved: changing it in place after the forward leaves the
    usual backward alone, as PyTorch's layers do, and makes a create_graph backward raise."""
    x = _randn((5, 3), 21, device)

    def changed(make, create_graph):
        w = _randn((4, 3), 22, device).requires_grad_()
        b = _randn((4,), 23, device).requires_grad_()
        y = make(x, w, b)
        with torch.no_grad():
            b.add_(1.0)
        return torch.autograd.grad(y.sum(), (w, b), create_graph=create_graph)

    model = fnn.FNN([3, 4], activation="gelu", dtype=DT, device=device, fusion="layer")
    makers = {
        "linear_act (gelu)": lambda x, w, b: fnn.linear_act(x, w, b, "gelu"),
        "fnn_forward": lambda x, w, b: fnn.fnn_forward(x, [w], [b], ["sigmoid"]),
        "FNN (layer)": lambda x, w, b: torch.func.functional_call(
            model, {"layers.0.weight": w, "layers.0.bias": b}, (x,)
        ),
        "torch": lambda x, w, b: F.gelu(F.linear(x, w, b)),
    }
    for what, make in makers.items():
        changed(make, create_graph=False)  # no error, as for PyTorch's layers
        if what != "torch":
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                changed(make, create_graph=True)
    # x of a Z-saving layer whose weight is frozen: kept for the recomputation of Z only
    xl = x.clone().requires_grad_()
    w = _randn((4, 3), 24, device)
    y = fnn.linear_act(xl, w, None, "silu")
    with torch.no_grad():
        xl.mul_(2.0)
    torch.autograd.grad(y.sum(), xl)


@pytest.mark.parametrize("act", ["gelu", "sigmoid"])
def test_a_constant_dy_and_one_gradient(act, device):
    """dY that does not require grad (y.sum()), and W the only input that does: the graph runs
    through what the layer keeps (gelu: W, for Z) or saves (sigmoid: Y), and dW comes out
    differentiable: d/dW of |dW|^2 against PyTorch's."""
    x, c = _randn((5, 3), 25, device), _randn((5, 4), 26, device)
    got = []
    for f in (fnn.linear_act, reference.linear_act):
        w = _randn((4, 3), 27, device).requires_grad_()
        (dw,) = torch.autograd.grad((f(x, w, None, act) * c).sum(), w, create_graph=True)
        assert dw.requires_grad, f"{f.__module__}: dW is not differentiable"
        got.append(torch.autograd.grad((dw * dw).sum(), w)[0])
    _agree(got[:1], got[1:], f"{act}: d|dW|^2/dW")
