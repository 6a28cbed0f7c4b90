"""The activations beyond sigmoid, relu, tanh and identity (leaky_relu, elu, softplus, gelu,
gelu_tanh, silu), their parameters (fnn.Activation), what each saves for the backward, and
the float32 accuracy of every activation and its derivative through the real kernels.

Correctness follows tests/test_linear_act.py: output and every gradient against float64
autograd (fnn.reference), every dtype, odd shapes, NaN and inf as PyTorch gives them,
gradcheck in float64. FNN fusion="layer" is in tests/test_fnn.py; the whole-network path
with these activations in tests/test_network_activations.py.
"""

from __future__ import annotations

import copy
import math
import pickle

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, assert_close, assert_fused_like_original, spy_layer_ops
from test_linear_act import SHAPES, _assert_same_specials, _gen, _randn, check_linear_act

import fnn
import fnn.functional
from fnn import reference
from kernels import linear_act as K
from kernels.checks import ACTIVATION_VARIANTS, ACTIVATIONS, Activation, as_activation, check_activation

# The new activations, at default and non-default parameters; the second of each pair saves Z
# (a negative slope or alpha, a small threshold) where its default saves Y.
NEW_ACTS = [
    "leaky_relu",
    Activation("leaky_relu", negative_slope=-0.3),
    "elu",
    Activation("elu", alpha=-0.5),
    "softplus",
    Activation("softplus", beta=8.0, threshold=17.0),  # both of torch's regions in reach
    Activation("softplus", beta=-2.0, threshold=1.5),
    "gelu",
    "gelu_tanh",
    "silu",
]
NEW_IDS = [
    "leaky_relu",
    "leaky_relu_neg",
    "elu",
    "elu_neg",
    "softplus",
    "softplus_b8_t17",
    "softplus_neg_t1.5",
    "gelu",
    "gelu_tanh",
    "silu",
]


# IEEE float32 matmuls in every test (conftest).
pytestmark = pytest.mark.usefixtures("fp32_matmul_precision")


# ---------------------------------------------------------------------------------------------
# fnn.Activation
# ---------------------------------------------------------------------------------------------


def test_activation_parameters_and_defaults():
    assert Activation("leaky_relu").negative_slope == 0.01
    assert Activation("elu").alpha == 1.0
    sp = Activation("softplus", beta=2)
    assert (sp.beta, sp.threshold) == (2.0, 20.0) and isinstance(sp.beta, float)
    assert sp.params == {"beta": 2.0, "threshold": 20.0}
    assert Activation("gelu", approximate="tanh") == Activation("gelu_tanh")
    assert Activation("gelu", approximate="none") == Activation("gelu")
    a, b = Activation("leaky_relu", negative_slope=0.2), Activation("leaky_relu", negative_slope=0.2)
    assert a == b and hash(a) == hash(b) and a != Activation("leaky_relu")
    assert repr(a) == "Activation('leaky_relu', negative_slope=0.2)"
    assert pickle.loads(pickle.dumps(a)) == a and copy.deepcopy(a) == a
    assert Activation.from_values("softplus", [2.0, 10.0]) == Activation("softplus", beta=2.0, threshold=10.0)
    assert Activation.from_values("elu", []) == Activation("elu")
    with pytest.raises(AttributeError, match="immutable"):
        a.name = "elu"
    with pytest.raises(AttributeError, match="alpha"):
        _ = a.alpha
    # The canonical form: the plain name when every parameter is the default.
    assert check_activation(Activation("relu")) == "relu"
    assert check_activation(Activation("elu", alpha=1)) == "elu"
    assert check_activation(Activation("gelu", approximate="tanh")) == "gelu_tanh"
    assert check_activation(a) is a
    assert set(ACTIVATIONS) == {
        "identity", "sigmoid", "relu", "tanh", "leaky_relu", "elu", "softplus", "gelu", "gelu_tanh", "silu"
    }  # fmt: skip


@pytest.mark.parametrize(
    "make, exc, fragments",
    [
        (lambda: Activation("mish"), ValueError, ["'mish'", "gelu", "silu"]),
        (lambda: Activation(3), TypeError, ["string", "int"]),
        (lambda: Activation("leaky_relu", slope=0.2), TypeError, ["slope", "negative_slope"]),
        (lambda: Activation("relu", alpha=1.0), TypeError, ["alpha", "no parameters"]),
        (lambda: Activation("gelu", approximate="fast"), ValueError, ["approximate", "'fast'"]),
        (lambda: Activation("gelu_tanh", approximate="tanh"), TypeError, ["approximate"]),
        (lambda: Activation("elu", alpha="1"), TypeError, ["alpha", "str"]),
        (lambda: Activation("elu", alpha=True), TypeError, ["alpha", "bool"]),
        (lambda: Activation("elu", alpha=torch.tensor(1.0)), TypeError, ["alpha", "Tensor"]),
        (lambda: Activation("elu", alpha=float("nan")), ValueError, ["alpha", "finite"]),
        (lambda: Activation("leaky_relu", negative_slope=float("inf")), ValueError, ["finite"]),
        (lambda: Activation("softplus", beta=0), ValueError, ["beta", "0"]),
        (lambda: Activation("softplus", threshold=-float("inf")), ValueError, ["threshold", "finite"]),
        (lambda: Activation.from_values("softplus", [1.0]), ValueError, ["softplus", "2"]),
        (lambda: as_activation(None), TypeError, ["activation", "NoneType"]),
    ],
)
def test_activation_errors(make, exc, fragments):
    with pytest.raises(exc) as info:
        make()
    for fragment in fragments:
        assert fragment in str(info.value), f"{info.value!s} does not name {fragment!r}"


def test_what_each_activation_saves_is_declared():
    saves = {repr(a): a.saves for a in ACTIVATION_VARIANTS}
    assert saves == {
        "Activation('identity')": "none",
        "Activation('sigmoid')": "y",
        "Activation('relu')": "y",
        "Activation('tanh')": "y",
        "Activation('leaky_relu', negative_slope=0.01)": "y",
        "Activation('elu', alpha=1.0)": "y",
        "Activation('softplus', beta=1.0, threshold=20.0)": "y",
        "Activation('gelu')": "z",
        "Activation('gelu_tanh')": "z",
        "Activation('silu')": "z",
        "Activation('elu', alpha=-1.0)": "z",
        "Activation('softplus', beta=1.0, threshold=1.0)": "z",
    }
    assert Activation("leaky_relu", negative_slope=0).saves == "y"  # relu: y > 0 iff z > 0
    assert Activation("leaky_relu", negative_slope=-0.1).saves == "z"
    assert Activation("elu", alpha=0).saves == "y"
    assert Activation("softplus", threshold=17).saves == "y"
    assert Activation("softplus", threshold=16.9).saves == "z"
    assert len({a.code for a in ACTIVATION_VARIANTS}) == len(ACTIVATION_VARIANTS), "one variant per code"


def test_parameters_are_runtime_arguments_not_constexprs():
    """One compiled kernel serves every parameter value: the parameters are float64 arguments;
    only the activation's kind is a constexpr."""
    kernels = {
        K.linear_act_fwd_kernel: ["act_a", "act_b"],
        K.linear_act_bwd_input_kernel: ["act_a", "act_b", "prev_a", "prev_b"],
        K.linear_act_bwd_weight_kernel: ["act_a", "act_b", "x_a", "x_b"],
    }
    for kernel, params in kernels.items():
        ann = getattr(kernel, "fn", kernel).__annotations__
        for p in params:
            assert str(ann.get(p)) in ("tl.float64", "fp64"), (p, ann.get(p))
        for c in ("ACTIVATION", "PREV_ACTIVATION", "X_ACTIVATION"):
            assert c not in ann or "constexpr" in str(ann[c]), c
        assert "constexpr" in str(ann["ACTIVATION"])


def test_modules_accept_both_forms():
    slope = Activation("leaky_relu", negative_slope=0.2)
    layer = fnn.FusedLinear(3, 2, activation=slope)
    assert layer.activation == slope and "negative_slope=0.2" in repr(layer)
    assert fnn.FusedLinear(3, 2, activation=Activation("silu")).activation == "silu"
    model = fnn.FNN([3, 4, 4, 2], activation=["gelu", slope, Activation("elu")], fusion="layer")
    assert model.activations == ["gelu", slope, "elu"]
    model = fnn.FNN([3, 4, 2], activation=slope)
    assert model.activations == [slope, slope]


# ---------------------------------------------------------------------------------------------
# Output and gradients against float64 (single layer)
# ---------------------------------------------------------------------------------------------

MATCH_CASES = [
    pytest.param(act, dtype, SHAPES[(i + j) % 4], (i + j) % 2 == 0, id=f"{aid}-{dtype}")
    for i, (act, aid) in enumerate(zip(NEW_ACTS, NEW_IDS, strict=True))
    for j, dtype in enumerate(DTYPES)
]


@pytest.mark.parametrize("act, dtype, shape, bias", MATCH_CASES)
def test_matches_float64(act, dtype, shape, bias, device):
    """Every new activation in every dtype, on a shape and bias setting that rotate (the odd
    shapes of test_linear_act but its largest, which the old activations cover)."""
    M, K_, N = shape
    g = _gen(100 + SHAPES.index(shape))
    x = _randn((M, K_), g, dtype, device, scale=2.0).requires_grad_()  # |z| up to about 8
    w = _randn((N, K_), g, dtype, device, scale=1 / math.sqrt(K_)).requires_grad_()
    b = _randn((N,), g, dtype, device).requires_grad_() if bias else None
    dy = _randn((M, N), g, dtype, device)
    check_linear_act(x, w, b, act, dy, what=str(shape))


@pytest.mark.parametrize("act", ["gelu", Activation("leaky_relu", negative_slope=-0.3), "elu"], ids=str)
@pytest.mark.parametrize("frozen", ["x", "weight", "bias", "weight_and_bias"])
def test_partial_requires_grad(frozen, act, device):
    g = _gen(110)
    x = _randn((37, 19), g, torch.float32, device).requires_grad_()
    w = _randn((23, 19), g, torch.float32, device, scale=0.3).requires_grad_()
    b = _randn((23,), g, torch.float32, device).requires_grad_()
    for name, t in (("x", x), ("weight", w), ("bias", b)):
        if name in frozen.split("_and_"):
            t.requires_grad_(False)
    check_linear_act(x, w, b, act, _randn((37, 23), g, torch.float32, device), what=f"frozen {frozen}")


@pytest.mark.parametrize("act", ["silu", "softplus"])
def test_sum_backward_3d_and_empty(act, device):
    """y.sum().backward() (a stride-0 gradient) on a 3-D input, and an empty batch."""
    g = _gen(111)
    x = _randn((3, 5, 19), g, torch.float32, device).requires_grad_()
    w = _randn((13, 19), g, torch.float32, device, scale=0.3).requires_grad_()
    b = _randn((13,), g, torch.float32, device).requires_grad_()
    check_linear_act(x, w, b, act, None, what="3d sum")
    empty = torch.zeros((0, 19), device=device, requires_grad=True)
    y = fnn.linear_act(empty, w, b, act)
    assert y.shape == (0, 13)
    w.grad = b.grad = None
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("act", NEW_ACTS, ids=NEW_IDS)
def test_gradcheck(act, device):
    g = _gen(121)
    x = (_randn((3, 2), g, torch.float64, device) * 2).requires_grad_()
    w = _randn((3, 2), g, torch.float64, device).requires_grad_()
    b = _randn((3,), g, torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: fnn.linear_act(*a, activation=act), (x, w, b), fast_mode=True)


def test_gradcheck_fnn_forward(device):
    """FNNFunction's chained backward with Z-saving layers: the next layer's weight gradient
    recomputes their output from Z, and the previous layer's delta reads Z in the epilogue."""
    g = _gen(122)
    acts = ["gelu", Activation("leaky_relu", negative_slope=-0.3), "silu"]
    x = _randn((2, 2), g, torch.float64, device).requires_grad_()
    w0, w1, w2 = (_randn(s, g, torch.float64, device).requires_grad_() for s in ((3, 2), (2, 3), (2, 2)))
    b0 = _randn((3,), g, torch.float64, device).requires_grad_()

    def f(x, w0, b0, w1, w2):
        return fnn.fnn_forward(x, [w0, w1, w2], [b0, None, None], acts)

    assert torch.autograd.gradcheck(f, (x, w0, b0, w1, w2), fast_mode=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", NEW_ACTS, ids=NEW_IDS)
def test_nan_inf_like_pytorch(act, dtype, device):
    """NaN and inf in the inputs give PyTorch's NaN and inf, in the output and every gradient.
    Two PyTorch CPU quirks are sidestepped, where its vectorised code disagrees with its own
    scalar and CUDA code: gelu(+inf) (NaN in float32 and bfloat16, inf in float64, as the maths
    has it and as we do: the expectation is PyTorch's float64), and elu's derivative at NaN (NaN
    in vectorised lanes, 1 elsewhere and on CUDA, as here: the expectation spells out torch's
    rule, z <= 0 ? alpha exp(z) : 1)."""
    g = _gen(131)
    x = _randn((9, 6), g, dtype, device)
    w = _randn((5, 6), g, dtype, device, scale=0.5)
    b = _randn((5,), g, dtype, device)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    x[4, 5] = -float("inf")
    w[2, 4] = float("inf")
    b[3] = float("nan")
    dy = _randn((9, 5), g, dtype, device)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    ref_dtype = torch.float64 if as_activation(act).name == "gelu" else dtype
    theirs = [t.to(ref_dtype).requires_grad_() for t in (x, w, b)]
    y = fnn.linear_act(*ours, act)
    a = as_activation(act)
    if a.name == "elu":
        z = F.linear(*theirs)
        y_torch = torch.where(z <= 0, a.alpha * torch.expm1(z.clamp(max=0)), z)
    else:
        y_torch = reference.linear_act(*theirs, act)
    _assert_same_specials(y, y_torch.to(dtype), f"{act} {dtype} output")
    assert y.isnan().any() and y.isinf().any(), "the test lost its specials"
    y.backward(dy)
    y_torch.backward(dy.to(ref_dtype))
    for name, a, e in zip(("dx", "dw", "db"), ours, theirs, strict=True):
        _assert_same_specials(a.grad, e.grad.to(dtype), f"{act} {dtype} {name}")


# ---------------------------------------------------------------------------------------------
# What the backward saves
# ---------------------------------------------------------------------------------------------


def _saved_by(fn):
    """Run fn() under saved-tensor hooks; returns (result, the tensors autograd saved)."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a is b's value (to float32 rounding: the kernels and F.linear sum in other orders)."""
    return a.shape == b.shape and torch.allclose(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ACTIVATION_VARIANTS, ids=repr)
def test_linear_act_saves_x_w_and_y_or_z(act, device):
    """X, W and one of Y or Z (nothing for identity), and that tensor is the one the activation
    declares (Activation.saves)."""
    g = _gen(141)
    x = _randn((6, 5), g, torch.float32, device).requires_grad_()
    w = _randn((4, 5), g, torch.float32, device).requires_grad_()
    b = _randn((4,), g, torch.float32, device).requires_grad_()
    y, saved = _saved_by(lambda: fnn.linear_act(x, w, b, act))
    z = F.linear(x, w, b)
    expect = {"none": [x, w], "y": [x, w, y], "z": [x, w, z]}[act.saves]
    assert len(saved) == len(expect), f"{act}: saved {[tuple(t.shape) for t in saved]}"
    for t, e in zip(saved, expect, strict=True):
        assert _same(t, e), f"{act}: saved a tensor that is not the expected one"
    if act.saves == "z":
        assert not _same(z, y), "the test cannot tell Z from Y"
    # Only what the requested gradients need: no X without dW/db, no W without dX.
    x2, w2 = x.detach().requires_grad_(), w.detach()
    _, saved = _saved_by(lambda: fnn.linear_act(x2, w2, None, act))
    assert not any(_same(t, x2) for t in saved) and any(_same(t, w2) for t in saved)
    _, saved = _saved_by(lambda: fnn.linear_act(x.detach(), w, None, act))
    assert any(_same(t, x) for t in saved) and not any(_same(t, w) for t in saved)


def test_z_is_written_only_when_a_gradient_is_needed(device, monkeypatch):
    calls: list[str] = []
    spy_layer_ops(monkeypatch, calls)
    x = torch.randn(4, 3, device=device)
    w = torch.randn(2, 3, device=device, requires_grad=True)
    with torch.no_grad():
        fnn.linear_act(x, w, None, "gelu")
    fnn.linear_act(x, w.detach(), None, "gelu")
    fnn.fnn_forward(x, [w.detach()], [None], ["silu"])
    assert calls == ["linear_act_forward"] * 3, calls
    fnn.linear_act(x, w, None, "gelu")
    fnn.fnn_forward(x, [w], [None], ["silu"])
    assert calls[3:] == ["linear_act_forward_z"] * 2, calls


def test_fnn_saves_as_much_as_a_sigmoid_network(device):
    """The trade for FNN: a gelu/silu layer saves Z_l in place of its output h_l, and the next
    layer's weight-gradient kernel recomputes h_l = act(Z_l) on load; so whatever the
    activations, a network saves X, its weights and one (batch x width) tensor per layer, as a
    sigmoid network does (an identity last layer saves nothing). The gradients are checked in
    tests/test_fnn.py."""
    sizes = [7, 32, 16, 8, 3]
    x = torch.randn(50, 7, device=device)
    counts = {}
    for acts in (
        ["sigmoid"] * 4,
        ["gelu", "silu", Activation("elu", alpha=-0.5), "gelu_tanh"],
        ["gelu", "identity", "relu", "identity"],
    ):
        torch.manual_seed(0)
        model = fnn.FNN(sizes, activation=acts, device=device, fusion="layer")
        y, saved = _saved_by(lambda m=model: m(x))
        counts[tuple(map(str, acts))] = sum(t.numel() for t in saved)
        # Each layer's saved tensor is the one it declares: its Z or its output.
        h = x
        for i, (layer, act) in enumerate(zip(model.layers, acts, strict=True)):
            z = F.linear(h, layer.weight, layer.bias)
            h = reference.apply_activation(z, act)
            kind = as_activation(act).saves
            if kind == "none" and i == len(acts) - 1:
                continue
            want = z if kind == "z" else h
            assert not _same(z, h) or kind != "z", "the test cannot tell Z from the output"
            assert any(_same(t, want) for t in saved), f"layer {i} ({act}) did not save its {kind}"
        assert _same(y, h)
    params = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    per_layer = 50 * (32 + 16 + 8 + 3)
    assert counts[("sigmoid",) * 4] == 50 * 7 + params + per_layer
    assert len(set(list(counts.values())[:2])) == 1, counts
    assert counts[("gelu", "identity", "relu", "identity")] == 50 * 7 + params + per_layer - 50 * 3


# ---------------------------------------------------------------------------------------------
# float32 accuracy through the kernels: within 2 ulps of the exact value, or within twice
# PyTorch's own float32 error where that is larger
# ---------------------------------------------------------------------------------------------


def _sweep() -> torch.Tensor:
    """float32 values of z: 0, tiny, dense near 0 and around 0.03 (the former tanh switch),
    every 0.05 up to 12, then up to 1e30; both signs."""
    parts = [
        torch.tensor([0.0, 1e-30, 1e-10, 1e-6, 1e-4], dtype=torch.float64),
        torch.logspace(-3, 0, 60, dtype=torch.float64),
        torch.linspace(0.02, 0.06, 41, dtype=torch.float64),
        torch.linspace(0, 12, 241, dtype=torch.float64),
        torch.linspace(12, 40, 29, dtype=torch.float64),
        torch.tensor([50.0, 88.0, 100.0, 1e3, 1e6, 1e30], dtype=torch.float64),
    ]
    v = torch.cat(parts).float()
    return torch.unique(torch.cat([v, -v]))  # sorted


def _f32(v: float) -> float:
    return float(np.float32(v))


def _exact(act: Activation, z: float) -> tuple[float, float]:
    """act(z) and act'(z) to float64 (50 digits inside), parameters taken as the float32 values
    the float32 kernel computes with."""
    mp = mpmath.mp
    zf = mpmath.mpf(z)
    n = act.name
    one = mpmath.mpf(1)
    if n == "identity":
        return z, 1.0
    if n in ("relu", "leaky_relu"):
        s = mpmath.mpf(_f32(act.negative_slope)) if n == "leaky_relu" else 0
        return float(zf if zf > 0 else zf * s), float(one if zf > 0 else s)
    if n == "sigmoid":
        y = 1 / (1 + mp.exp(-zf))
        return float(y), float(y * (1 - y))
    if n == "tanh":
        y = mp.tanh(zf)
        return float(y), float(1 - y * y)
    if n == "elu":
        a = mpmath.mpf(_f32(act.alpha))
        return (z, 1.0) if zf > 0 else (float(a * mp.expm1(zf)), float(a * mp.exp(zf)))
    if n == "softplus":
        beta, thr = _f32(act.beta), _f32(act.threshold)
        if float(np.float32(z) * np.float32(beta)) > thr:  # torch's test, on the float32 product
            return z, 1.0
        t = mpmath.mpf(beta) * zf
        return float(mp.log1p(mp.exp(t)) / beta), float(1 / (1 + mp.exp(-t)))
    if n == "gelu":
        return float(zf * mp.ncdf(zf)), float(mp.ncdf(zf) + zf * mp.npdf(zf))
    if n == "gelu_tanh":
        c, k = mp.sqrt(2 / mp.pi), mpmath.mpf(0.044715)
        t = mp.tanh(c * (zf + k * zf**3))
        return float(zf / 2 * (1 + t)), float((1 + t) / 2 + zf / 2 * (1 - t * t) * c * (1 + 3 * k * zf**2))
    s = 1 / (1 + mp.exp(-zf))  # silu
    return float(zf * s), float(s * (1 + zf * (1 - s)))


def _from_output(act: Activation, y: float) -> float:
    """The derivative rule of a Y-saving activation, evaluated exactly on a float32 y."""
    yf, n = mpmath.mpf(y), act.name
    if n == "sigmoid":
        return float(yf * (1 - yf))
    if n == "tanh":
        return float(1 - yf * yf)
    if n in ("relu", "leaky_relu"):
        return 1.0 if yf > 0 else (0.0 if n == "relu" else _f32(act.negative_slope))
    if n == "elu":
        return 1.0 if yf > 0 else float(yf + _f32(act.alpha))
    beta, thr = _f32(act.beta), _f32(act.threshold)  # softplus
    if float(np.float32(y) * np.float32(beta)) > thr:
        return 1.0
    return float(-mpmath.expm1(-mpmath.mpf(beta) * yf))


def _ulp32(t: torch.Tensor) -> torch.Tensor:
    """float32's ulp at each float64 value (the smallest subnormal's for 0)."""
    _, e = torch.frexp(t)
    return torch.ldexp(torch.ones_like(t), (e - 24).clamp(min=-149))


def _windowed(err: torch.Tensor, half: int = 4) -> torch.Tensor:
    """Each element's maximum over its +-half neighbours in the sweep: PyTorch's error near a
    point, where its error at the point itself may be luckily small."""
    return F.max_pool1d(err[None, None], 2 * half + 1, 1, half)[0, 0]


def _check_ulps(ours, exact, torch32, z, what, ulps=2.0):
    """|ours - exact| <= max(ulps ulps, 2 x PyTorch's error nearby), over normal float32 results."""
    ours, torch32 = ours.detach().double().cpu(), torch32.detach().double().cpu()
    ulp = _ulp32(exact)
    theirs = _windowed(((torch32 - exact).abs() / ulp).nan_to_num(nan=0.0, posinf=1e30))
    err = (ours - exact).abs() / ulp
    # Normal results only: compiled code flushes subnormals to zero (and so can PyTorch's).
    considered = exact.isfinite() & ((exact.abs() >= 2**-126) | (exact == 0))
    bad = considered & ~(err <= torch.maximum(torch.full_like(err, ulps), 2 * theirs))
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {int(considered.sum())} values off; first at z={z[i].item()!r}: "
            f"got {ours[i].item()!r}, exact {exact[i].item()!r} ({err[i].item():.2f} ulps; PyTorch "
            f"{torch32[i].item()!r}, {theirs[i].item():.2f} ulps nearby)"
        )


ACCURACY_ACTS = [
    *ACTIVATION_VARIANTS,
    Activation("leaky_relu", negative_slope=-0.3),
    Activation("elu", alpha=0.3),
    Activation("softplus", beta=1.7),
    Activation("softplus", beta=-0.6, threshold=5.0),
]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, unused branches
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("act", ACCURACY_ACTS, ids=repr)
def test_float32_accuracy_sweep(act, device):
    """Through the real kernels (z = x exactly: K = 1, W = 1, no bias; dY = 1 so dX = act'(z)):
    - the activation within 2 ulps of the exact value, or twice PyTorch's float32 error nearby;
    - the derivative, where it needs Z, likewise against the exact act'(z);
    - where it is read off Y, within 2 ulps of the derivative rule evaluated exactly on the Y
      the kernel saved: as exact as that output allows (the output is checked above).
    Values whose exact result is subnormal are left out (compiled code flushes them)."""
    z = _sweep()
    x = z[:, None].to(device).requires_grad_()
    w = torch.ones((1, 1), device=device)
    y = fnn.linear_act(x, w, None, act)
    y.backward(torch.ones_like(y))
    ours_y, ours_d = y.detach()[:, 0].cpu(), x.grad[:, 0].cpu()
    exact = torch.tensor([_exact(act, v) for v in z.tolist()], dtype=torch.float64)
    zt = z.to(device).requires_grad_()
    yt = reference.apply_activation(zt, act)
    yt.backward(torch.ones_like(yt))
    _check_ulps(ours_y, exact[:, 0], yt, z, f"{act} output")
    if act.saves == "z" or act.name == "identity":
        _check_ulps(ours_d, exact[:, 1], zt.grad, z, f"{act} derivative")
    else:
        rule = torch.tensor([_from_output(act, v) for v in ours_y.tolist()], dtype=torch.float64)
        _check_ulps(ours_d, rule, torch.full_like(rule, float("nan")), z, f"{act} derivative from Y")


def test_tanh_near_its_former_switch_point(device):
    """The former float32 tanh was about 30 ulps off just above |z| = 0.03 (its Taylor switch,
    chosen for float64); now within 2 (1.07 measured in the interpreter)."""
    z = torch.linspace(0.025, 0.04, 301).float()
    y = fnn.linear_act(z[:, None].to(device), torch.ones((1, 1), device=device), None, "tanh")
    exact = torch.tensor([float(mpmath.tanh(mpmath.mpf(v))) for v in z.tolist()], dtype=torch.float64)
    err = ((y[:, 0].double().cpu() - exact).abs() / _ulp32(exact)).max().item()
    assert err <= 2.0, f"tanh near 0.03: {err:.2f} ulps"


# ---------------------------------------------------------------------------------------------
# fnn.fuse with the new activation modules
# ---------------------------------------------------------------------------------------------


def _fuse_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Linear(5, 8), nn.GELU(),
        nn.Linear(8, 8), nn.GELU(approximate="tanh"),
        nn.Linear(8, 8), nn.SiLU(inplace=True),
        nn.Linear(8, 8), nn.LeakyReLU(0.2),
        nn.Linear(8, 8), nn.ELU(alpha=-0.5),
        nn.Linear(8, 8), nn.Softplus(beta=2.0, threshold=5.0),
        nn.Linear(8, 8), nn.Mish(),  # not an fnn activation: stays
        nn.Linear(8, 8), nn.Hardtanh(),  # neither
        nn.Linear(8, 8), nn.Softplus(beta=0.5, threshold=30.0),
        nn.Linear(8, 3), nn.ELU(),
    ).double()  # fmt: skip


def test_fuse_converts_the_new_activation_modules(device):
    original = _fuse_model().to(device)
    fused = fnn.fuse(copy.deepcopy(original))
    acts = {name: m.activation for name, m in fused.named_modules() if isinstance(m, fnn.FusedLinear)}
    assert acts == {
        "0": "gelu",
        "2": "gelu_tanh",
        "4": "silu",
        "6": Activation("leaky_relu", negative_slope=0.2),
        "8": Activation("elu", alpha=-0.5),
        "10": Activation("softplus", beta=2.0, threshold=5.0),
        "16": Activation("softplus", beta=0.5, threshold=30.0),
        "18": "elu",
    }, acts
    for i in (12, 14):
        assert type(fused[i]) is torch.nn.Linear and type(fused[i + 1]) is type(original[i + 1]), i
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 3).to(device)
    dy = torch.randn(6, 3, generator=g, dtype=torch.float64).to(device)
    assert_fused_like_original(original, fused, x, dy, "fused")


def test_fuse_keeps_what_it_cannot_express():
    """In-place variants fuse (the overwritten linear output never exists outside the kernel);
    parameters fnn refuses (softplus beta 0, a NaN slope) and subclasses stay as they are."""
    nn = torch.nn

    class MyGELU(nn.GELU):
        pass

    model = nn.Sequential(
        nn.Linear(3, 3), nn.ELU(alpha=-0.5, inplace=True),
        nn.Linear(3, 3), nn.LeakyReLU(0.1, inplace=True),
        nn.Linear(3, 3), nn.Softplus(beta=0.0),
        nn.Linear(3, 3), nn.LeakyReLU(float("nan")),
        nn.Linear(3, 3), MyGELU(),
    )  # fmt: skip
    fnn.fuse(model)
    kinds = [type(m).__name__ for m in model]
    assert kinds == [
        "FusedLinear", "Identity", "FusedLinear", "Identity",
        "Linear", "Softplus", "Linear", "LeakyReLU", "Linear", "MyGELU",
    ], kinds  # fmt: skip
    assert model[0].activation == Activation("elu", alpha=-0.5)
    assert model[2].activation == Activation("leaky_relu", negative_slope=0.1)


# ---------------------------------------------------------------------------------------------
# The Trainer's autograd path (the network path: tests/test_network_activations.py)
# ---------------------------------------------------------------------------------------------


def test_trainer_trains_a_gelu_network_with_autograd(device):
    """The Trainer's autograd path with the new activations: its steps equal torch.optim.SGD on
    an nn.Sequential with the same weights."""
    torch.manual_seed(3)
    model = fnn.FNN([4, 16, 1], activation=["gelu", Activation("softplus", beta=2.0)], device=device)
    seq = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 1), torch.nn.Softplus(beta=2.0)
    ).to(device)
    with torch.no_grad():
        for lin, layer in zip((seq[0], seq[2]), model.layers, strict=True):
            lin.weight.copy_(layer.weight)
            lin.bias.copy_(layer.bias)
    x, y = torch.randn(20, 4, device=device), torch.randn(20, 1, device=device)
    trainer = fnn.Trainer(model, loss="mse", lr=0.1, momentum=0.5)
    opt = torch.optim.SGD(seq.parameters(), lr=0.1, momentum=0.5)
    for _ in range(3):
        loss = trainer.step(x, y)
        opt.zero_grad()
        ref = F.mse_loss(seq(x), y)
        ref.backward()
        opt.step()
        assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for lin, layer in zip((seq[0], seq[2]), model.layers, strict=True):
        assert_close(layer.weight, lin.weight.double(), 1e-5, 1e-6, "trained weight")
