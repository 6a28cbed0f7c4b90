"""Correctness of the network API: fnn.FNN, fnn.fnn_forward (FNNFunction) and FusedLinear.

Outputs and every gradient are compared with PyTorch autograd through fnn.reference.fnn_forward
on float64 copies of the same parameters and inputs.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from helpers import DTYPES, RTOL, assert_close, assert_close_lowp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fnn
import fnn.functional
from fnn import reference
from kernels.checks import Activation, as_activation
from kernels.configs import fused_backward_fits

LOWP = (torch.float16, torch.bfloat16)

# (sizes, activation(s), bias): depths 1 to 4, widths 1, 3 and 32, mixed activations; the last
# two mix the activations that save Z (gelu, gelu_tanh, silu, a negative-slope leaky_relu, a
# negative-alpha elu, a small-threshold softplus: the next layer's weight gradient recomputes
# their output from Z) with those that save Y, and an identity between them.
NETS = [
    ([5, 1], "sigmoid", True),
    ([2, 32, 1], "sigmoid", False),  # seed 000's network
    ([2, 3, 2, 1], ["relu", "relu", "sigmoid"], True),  # seed 001's network
    ([3, 3, 32, 1], ["tanh", "relu", "identity"], True),
    ([4, 32, 3, 1, 3], ["tanh", "relu", "sigmoid", "identity"], False),
    (
        [4, 32, 3, 7, 2],
        ["gelu", Activation("leaky_relu", negative_slope=-0.3), "silu", Activation("elu", alpha=0.5)],
        True,
    ),
    (
        [3, 16, 5, 8, 1],
        ["gelu_tanh", "identity", Activation("softplus", beta=2.0, threshold=1.0), "leaky_relu"],
        False,
    ),
]
NET_IDS = ["1layer", "2-32-1", "2-3-2-1", "3-3-32-1", "4layers", "new-4layers", "new-z-id-z"]


# IEEE float32 matmuls in every test (conftest).
pytestmark = pytest.mark.usefixtures("fp32_matmul_precision")


def _randn(shape, seed: int, dtype, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _model(sizes, act, bias, dtype, device, seed=0) -> fnn.FNN:
    torch.manual_seed(seed)
    return fnn.FNN(sizes, activation=act, bias=bias, device=device, dtype=dtype)


def _reference(model: fnn.FNN, x: torch.Tensor, dtype: torch.dtype, device):
    """fnn.reference.fnn_forward on copies of `model`'s parameters and `x` in `dtype`, each
    requiring grad as the original does: (output, input copy, weight copies, bias copies)."""

    def copy(t):
        return (
            None
            if t is None
            else t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(t.requires_grad)
        )

    xs = copy(x)
    ws = [copy(layer.weight) for layer in model.layers]
    bs = [copy(layer.bias) for layer in model.layers]
    return reference.fnn_forward(xs, ws, bs, model.activations), xs, ws, bs


def _assert_result(actual, expected64, torch_lowp, what):
    assert actual is not None, f"{what}: missing gradient"
    assert actual.dtype == torch_lowp.dtype and actual.shape == expected64.shape, what
    if actual.dtype in LOWP:
        assert_close_lowp(actual, torch_lowp, expected64, what)
    else:
        # atol: rtol times the tensor's largest |element| (see test_linear_act._tolerances:
        # rounding leaves errors of the tensor's scale where sums cancel).
        rtol = RTOL[actual.dtype]
        assert_close(actual, expected64, rtol, rtol * expected64.abs().max().item(), what)


def _check_model(model: fnn.FNN, x: torch.Tensor, dy: torch.Tensor, what: str) -> None:
    """Forward and backward of `model` against float64 autograd: the output, x.grad and every
    parameter's grad; parameters (and x) that do not require grad must get none."""
    dtype, device = x.dtype, x.device
    y = model(x)
    assert y.dtype == dtype and y.device == x.device
    assert y.shape == (*x.shape[:-1], model.sizes[-1])
    y64, x64, w64, b64 = _reference(model, x, torch.float64, "cpu")
    yp, xp, wp, bp = _reference(model, x, dtype, device)
    _assert_result(y, y64, yp, f"{what} output")
    if not y64.requires_grad:
        assert not y.requires_grad, f"{what}: nothing requires grad, yet the output does"
        return
    y.backward(dy)
    y64.backward(dy.cpu().double())
    yp.backward(dy)
    pairs = [("x", x, x64, xp)]
    for i, layer in enumerate(model.layers):
        pairs.append((f"layers[{i}].weight", layer.weight, w64[i], wp[i]))
        if layer.bias is not None:
            pairs.append((f"layers[{i}].bias", layer.bias, b64[i], bp[i]))
    for name, ours, ref64, refp in pairs:
        if not ours.requires_grad:
            assert ours.grad is None, f"{what}: {name} does not require grad but got one"
        else:
            _assert_result(ours.grad, ref64.grad, refp.grad, f"{what} grad of {name}")


def _freeze(model: fnn.FNN, pattern: str) -> None:
    params = list(model.parameters())
    if pattern == "first_layer":
        frozen = list(model.layers[0].parameters())
    elif pattern == "last_bias":
        last = model.layers[-1]
        frozen = [last.bias if last.bias is not None else last.weight]
    elif pattern == "alternate":
        frozen = params[::2]
    elif pattern == "none":
        frozen = []
    else:
        raise AssertionError(pattern)
    for p in frozen:
        p.requires_grad_(False)


@pytest.mark.parametrize("x_grad", [False, True], ids=["x", "x_grad"])
@pytest.mark.parametrize("frozen", ["none", "first_layer", "last_bias", "alternate"])
@pytest.mark.parametrize("net", NETS, ids=NET_IDS)
def test_fnn_matches_float64(net, frozen, x_grad, device):
    sizes, act, bias = net
    i = NETS.index(net)
    lead = (37,) if i % 2 == 0 else (3, 5)  # every other network gets a 3-D input
    model = _model(sizes, act, bias, torch.float32, device, seed=i)
    _freeze(model, frozen)
    x = _randn((*lead, sizes[0]), 100 + i, torch.float32, device).requires_grad_(x_grad)
    dy = _randn((*lead, sizes[-1]), 200 + i, torch.float32, device)
    _check_model(model, x, dy, f"FNN{sizes} frozen={frozen}")


# Half-precision networks: the 2x-PyTorch rule compares maximum errors, a fair statistic only
# over tensors of some size (a 2-element gradient's error is a lottery, ours and PyTorch's
# alike), and only with smooth activations: where a ReLU input lies within rounding distance
# of 0, either side may switch the unit off and change a whole gradient row.
WIDE_NETS = [
    ([8, 32, 16, 4], ["tanh", "sigmoid", "identity"], True),
    ([16, 32, 8], ["sigmoid", "tanh"], False),
    ([6, 24, 12, 10, 5], ["tanh", "identity", "sigmoid", "tanh"], True),
    ([8, 32, 16, 6], ["gelu", "silu", Activation("softplus", beta=2.0)], True),
    ([12, 24, 16, 4], ["gelu_tanh", "elu", "silu"], False),
]
DTYPE_CASES = [
    pytest.param(net, dtype, id=f"{'-'.join(map(str, net[0]))}-{dtype}")
    for dtype in DTYPES
    for net in (WIDE_NETS if dtype in LOWP else NETS + WIDE_NETS)
]


@pytest.mark.parametrize("net,dtype", DTYPE_CASES)
def test_fnn_dtypes(net, dtype, device):
    """Every dtype; the output and the gradients have the input's dtype."""
    sizes, act, bias = net
    i = (NETS + WIDE_NETS).index(net)
    model = _model(sizes, act, bias, dtype, device, seed=10 + i)
    x = _randn((33, sizes[0]), 300 + i, dtype, device).requires_grad_()
    dy = _randn((33, sizes[-1]), 400 + i, dtype, device)
    _check_model(model, x, dy, f"FNN{sizes} {dtype}")


def test_fnn_1d_and_empty_input(device):
    model = _model([3, 4, 2], ["relu", "tanh"], True, torch.float32, device)
    x = _randn((3,), 5, torch.float32, device).requires_grad_()
    _check_model(model, x, _randn((2,), 6, torch.float32, device), "FNN 1-D input")
    model.zero_grad(set_to_none=True)
    empty = torch.zeros((0, 3), device=device, requires_grad=True)
    y = model(empty)
    assert y.shape == (0, 2)
    y.sum().backward()
    assert empty.grad.shape == (0, 3)
    for p in model.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p)), "an empty batch gives zero gradients"



@pytest.mark.parametrize("fusion", ["layer", "network", "auto"])
def test_meta_tensors_give_shapes(fusion):
    """Meta tensors (shape inference, `device="meta"` construction) run fnn.reference: every
    entry point gives meta outputs and gradients of the right shapes. torch raises on asking
    whether autocast is on for "meta", so the reference wrapper must not ask."""
    assert fnn.backend("meta") == "reference"
    x = torch.randn(4, 3, device="meta", requires_grad=True)
    model = fnn.FNN([3, 5, 2], ["gelu", "sigmoid"], device="meta", fusion=fusion)
    y = model(x)
    assert y.device.type == "meta" and y.shape == (4, 2)
    y.sum().backward()
    assert x.grad.shape == (4, 3) and x.grad.device.type == "meta"
    for p in model.parameters():
        assert p.grad.shape == p.shape and p.grad.device.type == "meta"
    with torch.no_grad():
        assert model(x).shape == (4, 2)
    layer = fnn.FusedLinear(3, 5, activation="relu", device="meta")
    assert layer(x).shape == (4, 5)
    assert fnn.linear_act(x[0], layer.weight, None, "tanh").shape == (5,)
    trainer = fnn.Trainer(fnn.FNN([3, 4, 1], device="meta", fusion=fusion), loss="mse", lr=0.1)
    loss = trainer.step(torch.randn(4, 3, device="meta"), torch.randn(4, 1, device="meta"))
    assert loss.shape == () and loss.device.type == "meta"

# ---------------------------------------------------------------------------------------------
# What FNNFunction's backward launches
# ---------------------------------------------------------------------------------------------


class _CountingOps:
    """Stands in for the ops module fnn.functional uses: records every call (name and all its
    arguments by parameter name, defaults included) and whether one is running, then calls
    the real op."""

    def __init__(self, real):
        self.real, self.calls, self.inside = real, [], False

    def __getattr__(self, name):
        fn = getattr(self.real, name)

        def call(*args, **kwargs):
            bound = inspect.signature(fn).bind(*args, **kwargs)
            bound.apply_defaults()
            self.calls.append((name, dict(bound.arguments)))
            self.inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside = False

        return call


class _RecordTorchOps(TorchDispatchMode):
    """Records every aten op dispatched while no fnn op is running."""

    def __init__(self, counting: _CountingOps):
        super().__init__()
        self.counting, self.ops = counting, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.counting.inside:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


# (net, x requires grad, first layer frozen); a 1-layer net with everything frozen has no backward.
LAUNCH_CASES = [
    pytest.param(net, x_grad, frozen_first, id=f"{nid}-{case}")
    for net, nid in zip(NETS, NET_IDS, strict=True)
    for x_grad, frozen_first, case in [
        (False, False, "x"),
        (True, False, "x_grad"),
        (False, True, "frozen_first"),
    ]
    if not (frozen_first and len(net[0]) == 2)
]


@pytest.mark.parametrize("net,x_grad,frozen_first", LAUNCH_CASES)
def test_fnn_backward_launches(net, x_grad, frozen_first, device, monkeypatch):
    """Per layer from the last, a layer that needs both its weight gradient and a dX (layer
    0's, or the previous layer's delta) makes one fused call (dX, dW, db) where its weight fits
    the fused kernel's tile and the layer below saves its output with a light derivative (see
    kernels.configs.fused_backward_fits); else a weight-gradient call and an input-gradient call
    applying the previous layer's activation derivative in its epilogue. Fewer when the first
    layer is frozen; and no other tensor work than views between them."""
    sizes, act, bias = net
    n_layers = len(sizes) - 1
    model = _model(sizes, act, bias, torch.float32, device)
    if frozen_first:
        _freeze(model, "first_layer")
    x = _randn((17, sizes[0]), 7, torch.float32, device).requires_grad_(x_grad)
    weights = [layer.weight for layer in model.layers]
    biases = [layer.bias for layer in model.layers]
    y = fnn.fnn_forward(x, weights, biases, model.activations)  # FNN's per-layer path

    counting = _CountingOps(fnn.functional._ops(x))
    monkeypatch.setattr(fnn.functional, "_ops", lambda t: counting)
    recorder = _RecordTorchOps(counting)
    original = fnn.FNNFunction.backward

    def recorded_backward(ctx, *grads):
        with recorder:
            return original(ctx, *grads)

    monkeypatch.setattr(fnn.FNNFunction, "backward", staticmethod(recorded_backward))
    y.backward(_randn(y.shape, 8, torch.float32, device))

    acts = [as_activation(a) for a in model.activations]
    identity = as_activation("identity")
    need_w = [not (frozen_first and i == 0) for i in range(n_layers)]
    expected = []  # (call, the previous layer's activation it applies, layer), in order
    for i in reversed(range(n_layers)):
        wants_dx = x_grad or any(need_w[:i])
        prev = identity if i == 0 else acts[i - 1]
        if need_w[i] and wants_dx and fused_backward_fits(sizes[i + 1], sizes[i], torch.float32, prev):
            expected.append(("linear_act_backward", prev, i))
            continue
        if need_w[i] and wants_dx:  # a pass-through for light activations, D formed for heavy ones
            expected.append(("delta_once", None, i))
        if need_w[i]:
            expected.append(("linear_act_backward_weight", None, i))
        if wants_dx:
            expected.append(("linear_act_backward_input", prev, i))
    assert [name for name, _ in counting.calls] == [name for name, _, _ in expected]
    fused = sum(1 for name, _, _ in expected if name == "linear_act_backward")
    if net in (NETS[1], NETS[4]):  # narrow sigmoid/relu/tanh networks: every such layer fused
        assert fused == sum(1 for i in range(n_layers) if need_w[i] and (x_grad or any(need_w[:i])))
    for (name, kw), (_, prev, i) in zip(counting.calls, expected, strict=True):
        if name in ("linear_act_backward", "linear_act_backward_input"):
            # the activation derivative of the layer below, read off what it saved
            assert as_activation(kw["prev_activation"]) == prev, (i, kw["prev_activation"])
            if prev.name != "identity" or name == "linear_act_backward":
                assert kw["x"] is not None and kw["x"].shape == (17, sizes[i]), f"layer {i}: no input given"
    other = [str(f) for f in recorder.ops if not (f.is_view or f.overloadpacket.__name__ == "_unsafe_view")]
    assert not other, f"FNN backward ran tensor work outside the fnn kernels: {other}"
    # The grads are still right with the spies in place.
    for layer in model.layers[1 if frozen_first else 0 :]:
        assert layer.weight.grad is not None and layer.weight.grad.isfinite().all()
    assert (x.grad is not None) == x_grad


def test_backward_launch_check_can_fail(device, monkeypatch):
    """The recorder sees elementwise work done between kernels (a separate delta multiply)."""
    counting = _CountingOps(fnn.functional._ops(torch.zeros(1, device=device)))
    recorder = _RecordTorchOps(counting)
    a = torch.ones(3, device=device)
    with recorder:
        (a * 2).view(3, 1)
    names = [str(f) for f in recorder.ops if not f.is_view]
    assert names == ["aten.mul.Tensor"], names


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def test_fnn_attributes_and_repr():
    model = fnn.FNN([2, 32, 1], activation="sigmoid", bias=False)
    assert model.sizes == [2, 32, 1]
    assert model.activations == ["sigmoid", "sigmoid"]
    assert len(model.layers) == 2 and all(isinstance(m, fnn.FusedLinear) for m in model.layers)
    assert all(layer.bias is None for layer in model.layers)
    text = repr(model)
    assert "sizes=[2, 32, 1]" in text, text
    assert "FusedLinear(in_features=2, out_features=32, bias=False, activation='sigmoid')" in text, text
    assert "FusedLinear(in_features=32, out_features=1, bias=False, activation='sigmoid')" in text, text

    mixed = fnn.FNN([4, 3, 2, 1], activation=["relu", "tanh", "identity"])
    assert mixed.sizes == [4, 3, 2, 1]
    assert mixed.activations == ["relu", "tanh", "identity"]
    assert [layer.activation for layer in mixed.layers] == ["relu", "tanh", "identity"]
    assert all(layer.bias is not None and layer.bias.shape == (layer.out_features,) for layer in mixed.layers)
    assert [tuple(layer.weight.shape) for layer in mixed.layers] == [(3, 4), (2, 3), (1, 2)]
    assert "activation='tanh'" in repr(mixed)


def test_fused_linear_loads_nn_linear_state_dict(device):
    torch.manual_seed(3)
    linear = nn.Linear(7, 5, device=device)
    fused = fnn.FusedLinear(7, 5, activation="tanh", device=device)
    fused.load_state_dict(linear.state_dict())
    assert torch.equal(fused.weight, linear.weight) and torch.equal(fused.bias, linear.bias)
    x = _randn((11, 7), 4, torch.float32, device)
    expected = torch.tanh(linear(x)).double()
    assert_close(fused(x), expected, 1e-5, 1e-5 * expected.abs().max().item(), "FusedLinear vs nn.Linear")
    # And back: FusedLinear's state_dict loads into nn.Linear.
    linear2 = nn.Linear(7, 5, device=device)
    linear2.load_state_dict(fused.state_dict())
    assert torch.equal(linear2.weight, fused.weight)
    # Without bias.
    nobias = fnn.FusedLinear(7, 5, bias=False, device=device)
    nobias.load_state_dict(nn.Linear(7, 5, bias=False, device=device).state_dict())
    assert set(nobias.state_dict()) == {"weight"}


@pytest.mark.parametrize("in_features,out_features", [(1, 3), (7, 64), (300, 40)])
def test_fused_linear_init_matches_nn_linear(in_features, out_features):
    """nn.Linear's initialisation: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias, drawn in the
    same order (equal parameters from the same seed)."""
    bound = 1 / math.sqrt(in_features)
    torch.manual_seed(5)
    fused = fnn.FusedLinear(in_features, out_features)
    torch.manual_seed(5)
    linear = nn.Linear(in_features, out_features)
    for name in ("weight", "bias"):
        ours, theirs = getattr(fused, name).detach(), getattr(linear, name).detach()
        assert ours.shape == theirs.shape
        assert ours.abs().max().item() <= bound, f"{name} outside +-{bound}"
        assert torch.equal(ours, theirs), f"{name}: not nn.Linear's initialisation"
    # The bound is reached: the values spread over the interval, not a narrower one.
    big = fnn.FusedLinear(in_features, 4000 // in_features + 64)
    assert big.weight.abs().max().item() > 0.95 * bound
    assert big.weight.min().item() < 0 < big.weight.max().item()


@pytest.mark.parametrize("net", NETS, ids=NET_IDS)
def test_fnn_equals_layers_one_by_one(net, device):
    """FNN = its FusedLinear layers applied in turn (each its own autograd node)."""
    sizes, act, bias = net
    model = _model(sizes, act, bias, torch.float32, device, seed=9)
    x = _randn((23, sizes[0]), 10, torch.float32, device)
    dy = _randn((23, sizes[-1]), 11, torch.float32, device)
    y = model(x)
    y.backward(dy)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    h = x
    for layer in model.layers:
        h = layer(h)
    assert h.grad_fn is not None and "LinearAct" in type(h.grad_fn).__name__
    h.backward(dy)
    rtol = RTOL[torch.float32]
    assert_close(y, h, rtol, rtol * h.abs().max().item(), "FNN vs layer by layer: output")
    for (name, p), g in zip(model.named_parameters(), grads, strict=True):
        assert_close(g, p.grad, rtol, rtol * p.grad.abs().max().item(), f"FNN vs layer by layer: {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fnn_output_dtype(dtype, device):
    model = fnn.FNN([3, 4, 2], activation=["relu", "sigmoid"], dtype=dtype, device=device)
    assert all(p.dtype == dtype for p in model.parameters())
    y = model(_randn((5, 3), 12, dtype, device))
    assert y.dtype == dtype and y.device.type == device.type
    assert fnn.FusedLinear(3, 2, dtype=dtype, device=device)(_randn((5, 3), 13, dtype, device)).dtype == dtype


@pytest.mark.parametrize("act", ["gelu", "identity", "tanh"])
def test_outputs_of_nd_inputs_can_be_changed_in_place(act, device):
    """`y += r` on the output of a 3-D input (a residual, an in-place dropout), as PyTorch allows
    on `act(F.linear(x, w, b))`: the Functions return their output reshaped by a reshape that
    autograd does not count as a view made inside them (which it forbids changing in place).
    Where the backward reads the output (tanh), the change raises, as it does in PyTorch."""
    g = torch.Generator().manual_seed(31)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(device)
    layer = fnn.FNN([4, 5, 3], activation=[act, act], dtype=torch.float64, device=device, fusion="layer")
    network = fnn.FNN([4, 5, 3], activation=[act, act], dtype=torch.float64, device=device, fusion="network")
    network.load_state_dict(layer.state_dict())
    w, b = layer.layers[0].weight, layer.layers[0].bias
    ps = [t.detach() for lin in layer.layers for t in (lin.weight, lin.bias)]
    cases = {
        "linear_act": (lambda x: fnn.linear_act(x, w, b, act), lambda x: reference.linear_act(x, w, b, act)),
        "FNN layer": (layer, lambda x: reference.fnn_forward(x, ps[0::2], ps[1::2], [act, act])),
        "FNN network": (network, lambda x: reference.fnn_forward(x, ps[0::2], ps[1::2], [act, act])),
    }
    for what, (ours, theirs) in cases.items():
        grads = []
        for f in (ours, theirs):
            xl = x.clone().requires_grad_()
            y = f(xl)
            y.add_(1.0)
            try:
                (y * y).sum().backward()
            except RuntimeError as e:
                assert "inplace" in str(e), e
                grads.append(None)
                continue
            grads.append(xl.grad)
        if act == "tanh":
            assert grads == [None, None], f"{what}: the in-place change of a saved output did not raise"
        else:
            assert_close(grads[0], grads[1], 1e-12, 1e-12, f"{what} ({act}): dx after an in-place change")


@pytest.mark.parametrize("fusion", ["layer", "network"])
def test_hooks_on_the_layers_run(fusion, device):
    """A forward, forward-pre or backward hook on one of an FNN's layers runs as it would in an
    nn.Sequential of the same layers (the FNN then calls its layers one by one; before, the
    hooks were skipped without a word), a hook that replaces the output included. Without
    hooks the FNN is one autograd node again."""
    model = _model([3, 5, 4, 2], "tanh", True, torch.float64, device, seed=12)
    seq = torch.nn.Sequential(*model.layers)  # the same layers, hooks and all
    x = _randn((6, 3), 13, torch.float64, device)
    seen = []
    handles = [
        model.layers[0].register_forward_pre_hook(lambda m, i: seen.append("pre 0")),
        model.layers[1].register_forward_hook(lambda m, i, o: o * 2),  # replaces the output
        model.layers[2].register_full_backward_hook(lambda m, gi, go: seen.append("backward 2")),
    ]
    for what, net in (("FNN", model), ("Sequential", seq)):
        seen.clear()
        x.grad = None
        xg = x.clone().requires_grad_()
        y = net(xg)
        y.square().sum().backward()
        assert seen == ["pre 0", "backward 2"], (what, seen)
        if what == "FNN":
            got = (y.detach(), xg.grad, *(p.grad.clone() for p in model.parameters()))
            model.zero_grad(set_to_none=True)
    want = (y.detach(), xg.grad, *(p.grad for p in model.parameters()))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, 1e-12, 1e-12, f"{fusion}: FNN with hooks vs Sequential")
    for h in handles:
        h.remove()
    y = model(x.clone().requires_grad_())
    assert "LinearAct" not in type(y.grad_fn).__name__, type(y.grad_fn).__name__  # one node again


def _grads_vs_float64(model, x, what, fwd=None):
    """model(x) (or fwd()) and its gradients for x and every parameter against the same network
    in float64 PyTorch (fnn.reference) on the model's parameters as they are now."""
    y = model(x) if fwd is None else fwd()
    dy = _randn(tuple(y.shape), 31, y.dtype, y.device)
    y.backward(dy)
    want, xs, ws, bs = _reference(model, x, torch.float64, x.device)
    want.backward(dy.double())
    assert_close(y, want, 1e-12, 1e-12, f"{what}: output")
    pairs = [(x.grad, xs.grad)]
    for layer, w, b in zip(model.layers, ws, bs, strict=True):
        pairs += [(layer.weight.grad, w.grad)] + ([] if b is None else [(layer.bias.grad, b.grad)])
    for got, want_g in pairs:
        assert got is not None and want_g is not None, what
        assert_close(got, want_g, 1e-12, 1e-12, f"{what}: gradient")


@pytest.mark.parametrize("fusion", ["layer", "network"])
def test_saved_tensors_given_back_in_another_layout(fusion, device):
    """The backward reads the tensors autograd gives back, whatever their layout: under
    save_on_cpu (contiguous copies of a column slice and of a transposed x), and after
    `w.data = ...` of another layout between the forward and the backward. Before, the layer
    path's launch program read them with the forward's strides: wrong gradients, and reads
    past the end of a sliced x's copy."""
    model = _model([5, 7, 3], "tanh", True, torch.float64, device, seed=14)
    wide = _randn((6, 40), 15, torch.float64, device)
    for what, x in (("sliced x", wide[:, :5]), ("transposed x", wide[:5, :6].t())):
        x = x.detach().requires_grad_()
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.save_on_cpu(pin_memory=False):
            _grads_vs_float64(model, x, f"{fusion}, save_on_cpu, {what}")
    x = _randn((6, 5), 16, torch.float64, device).requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    w = model.layers[1].weight
    w.data = w.detach().t().contiguous().t()  # same values, column-major
    _grads_vs_float64(model, x, f"{fusion}, weight relaid out before the backward", fwd=lambda: y)


@pytest.mark.parametrize("fusion", ["layer", "network"])
def test_layers_resized_or_parametrized_after_a_call(fusion, device):
    """The plan follows the layers: a hidden layer pruned in place (new, smaller weight
    Parameters) after a first call computes the new network (before, the network path kept the
    old widths: wrong outputs, writes out of bounds), and a layer under
    torch.nn.utils.parametrize (weight_norm: the weight computed on access) is called as a
    module, as in an nn.Sequential (before: a TypeError)."""
    model = _model([5, 7, 3], "tanh", True, torch.float64, device, seed=17)
    x = _randn((6, 5), 18, torch.float64, device).requires_grad_()
    model(x).sum().backward()
    l0, l1 = model.layers
    with torch.no_grad():
        l0.weight, l0.bias = nn.Parameter(l0.weight[:4].clone()), nn.Parameter(l0.bias[:4].clone())
        l1.weight = nn.Parameter(l1.weight[:, :4].clone())
    l0.out_features = l1.in_features = 4
    x.grad = None
    model.zero_grad(set_to_none=True)
    _grads_vs_float64(model, x, f"{fusion}, resized")
    assert model.sizes == [5, 4, 3]
    torch.nn.utils.parametrizations.weight_norm(model.layers[0])
    seq = nn.Sequential(*model.layers)
    xs = x.detach().clone().requires_grad_()
    x.grad = None
    model.zero_grad(set_to_none=True)
    y, want = model(x), seq(xs)
    assert_close(y, want, 1e-12, 1e-12, f"{fusion}, parametrized: output")
    y.sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    want.sum().backward()
    for got, w in zip(grads, [xs.grad] + [p.grad for p in model.parameters()], strict=True):
        assert_close(got, w, 1e-12, 1e-12, f"{fusion}, parametrized: gradient")
