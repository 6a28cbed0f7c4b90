"""Correctness of the fused linear + activation layer: fnn.linear_act and its three kernels.

Every result (output, dX, dW, db) is compared with PyTorch autograd on float64 copies of the
same inputs (fnn.reference). float32 and float64 use the tolerances below; float16 and
bfloat16 use the half-precision rule of helpers.assert_close_lowp, where PyTorch's own
result in that dtype (fnn.reference in the same dtype, on the same inputs) sets the bar.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from helpers import DTYPES, RTOL, assert_close, assert_close_lowp

import fnn
import kernels.memory
from fnn import reference
from kernels import linear_act as ops
from kernels.checks import Activation, as_activation
from kernels.configs import fused_backward_fits

ACTS = ["identity", "sigmoid", "relu", "tanh"]
SHAPES = [(1, 1, 1), (100, 2, 32), (100, 32, 1), (37, 19, 23), (123, 431, 17)]
LOWP = (torch.float16, torch.bfloat16)


# IEEE float32 matmuls in every test (conftest).
pytestmark = pytest.mark.usefixtures("fp32_matmul_precision")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen, dtype, device, scale: float = 1.0) -> torch.Tensor:
    """Standard normal values drawn on the CPU in float64 (reproducible on any device), then
    rounded to `dtype`: the float64 reference sees exactly the values the kernel sees."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _copy(t: torch.Tensor | None, dtype: torch.dtype, device) -> torch.Tensor | None:
    """A detached copy of `t` in `dtype` on `device`, requiring grad like `t`."""
    if t is None:
        return None
    return t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(t.requires_grad)


def _forward_backward(fn, x, w, b, act, dy):
    """(y, {name: grad}) for the inputs that require grad. dy None: backward of y.sum(), whose
    incoming gradient is an expanded (stride 0) tensor."""
    y = fn(x, w, b, act)
    named = [(n, t) for n, t in (("dx", x), ("dw", w), ("db", b)) if t is not None and t.requires_grad]
    if not named:
        return y, {}
    if dy is None:
        grads = torch.autograd.grad(y.sum(), [t for _, t in named])
    else:
        grads = torch.autograd.grad(y, [t for _, t in named], dy)
    return y, {n: g for (n, _), g in zip(named, grads, strict=True)}


def _tolerances(dtype: torch.dtype, expected: torch.Tensor) -> tuple[float, float]:
    """(rtol, atol) for float32 / float64. atol is rtol times the largest |reference| element
    of the tensor: every element is a dot product (or an activation of one, slope <= 1) whose
    terms are at most of that scale, so rounding leaves an absolute error of a few ulps of the
    tensor's scale even where the sum cancels to almost nothing; a relative bound alone would
    demand exactness at such elements. A missing or wrong term is of the order of the scale,
    far above 1e-5 of it, so this atol hides no real bug."""
    rtol = RTOL[dtype]
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    return rtol, rtol * scale


def _assert_result(actual, expected64, torch_lowp, what: str) -> None:
    """`actual` against the float64 reference with the tolerance of its dtype."""
    assert actual.dtype == torch_lowp.dtype, f"{what}: dtype {actual.dtype}, expected {torch_lowp.dtype}"
    assert actual.shape == expected64.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    )
    if actual.dtype in LOWP:
        assert_close_lowp(actual, torch_lowp, expected64, what)
    else:
        rtol, atol = _tolerances(actual.dtype, expected64)
        assert_close(actual, expected64, rtol, atol, what)


def check_linear_act(x, w, b, act, dy=None, what=""):
    """Run fnn.linear_act on (x, w, b) as given (views, strides and requires_grad included) and
    compare its output and every requested gradient with the float64 reference; returns
    (y, grads) of the kernel for further checks."""
    dtype, device = w.dtype, w.device
    y, grads = _forward_backward(fnn.linear_act, x, w, b, act, dy)
    args64 = [_copy(t, torch.float64, "cpu") for t in (x, w, b)]
    y64, grads64 = _forward_backward(
        reference.linear_act, *args64, act, None if dy is None else dy.cpu().double()
    )
    argsp = [_copy(t, dtype, device) for t in (x, w, b)]
    yp, gradsp = _forward_backward(reference.linear_act, *argsp, act, dy)
    tag = f"{what} {act} {dtype}"
    assert y.device == x.device
    _assert_result(y, y64, yp, f"{tag} output")
    assert grads.keys() == grads64.keys()
    for name in grads:
        _assert_result(grads[name], grads64[name], gradsp[name], f"{tag} {name}")
    return y, grads


# ---------------------------------------------------------------------------------------------
# Output and gradients against float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape, act, bias, dtype, device):
    M, K, N = shape
    g = _gen(SHAPES.index(shape))
    x = _randn((M, K), g, dtype, device).requires_grad_()
    w = _randn((N, K), g, dtype, device, scale=1 / math.sqrt(K)).requires_grad_()
    b = _randn((N,), g, dtype, device).requires_grad_() if bias else None
    dy = _randn((M, N), g, dtype, device)
    check_linear_act(x, w, b, act, dy, what=str(shape))


def test_float32_high_precision(device):
    """ "high" allows tf32 in the kernels, as it does in F.linear. The interpreter computes
    tl.dot exactly whatever the precision, so on the CPU the float32 tolerance holds; on a GPU
    tf32 rounds operands to 10 mantissa bits, hence a tf32-sized tolerance there."""
    torch.set_float32_matmul_precision("high")
    assert ops.input_precision(torch.float32) == "tf32"
    g = _gen(7)
    M, K, N = 37, 19, 23
    x = _randn((M, K), g, torch.float32, device).requires_grad_()
    w = _randn((N, K), g, torch.float32, device, scale=1 / math.sqrt(K)).requires_grad_()
    b = _randn((N,), g, torch.float32, device).requires_grad_()
    dy = _randn((M, N), g, torch.float32, device)
    y, grads = _forward_backward(fnn.linear_act, x, w, b, "tanh", dy)
    y64, grads64 = _forward_backward(
        reference.linear_act, *[_copy(t, torch.float64, "cpu") for t in (x, w, b)], "tanh", dy.cpu().double()
    )
    rtol = 1e-5 if device.type == "cpu" else 4e-3  # tf32: 2^-11 relative rounding per operand
    for name, a, e in [("output", y, y64)] + [(n, grads[n], grads64[n]) for n in grads]:
        assert a.dtype == torch.float32
        scale = e.abs().max().item()
        assert_close(a, e, rtol, rtol * scale, f"high precision {name}")
    assert torch.get_float32_matmul_precision() == "high"


# ---------------------------------------------------------------------------------------------
# Shapes and layouts
# ---------------------------------------------------------------------------------------------

K_, N_ = 19, 13


def _layout(name: str, g, dtype, device):
    """(x, w, b, dy) in an unusual layout; x, w and b require grad."""
    r = lambda shape, scale=1.0: _randn(shape, g, dtype, device, scale)  # noqa: E731
    ws = 1 / math.sqrt(K_)
    x, w, b = r((21, K_)), r((N_, K_), ws), r((N_,))
    dy_shape = None
    if name == "3d":
        x = r((3, 7, K_))
    elif name == "4d":
        x = r((2, 3, 5, K_))
    elif name == "1d":
        x = r((K_,))
    elif name == "x_transposed":
        x = r((K_, 21)).t()
    elif name == "x_sliced":
        x = r((42, 3 * K_))[::2, ::3]
    elif name == "x_permuted":
        x = r((5, K_, 4)).permute(2, 0, 1)
    elif name == "x_expanded":  # stride 0 along the batch
        x = r((1, K_)).expand(21, K_)
    elif name == "w_transposed":
        w = r((K_, N_), ws).t()
    elif name == "w_sliced_b_sliced":
        w = r((2 * N_, 2 * K_), ws)[::2, 1::2]
        b = r((3 * N_,))[::3]
    elif name == "w_expanded":
        w = r((1, K_), ws).expand(N_, K_)
    elif name == "dy_transposed":
        dy_shape = "t"
    else:
        raise AssertionError(name)
    out_shape = (*x.shape[:-1], N_)
    if dy_shape == "t":
        dy = r(out_shape[::-1]).t()
    else:
        dy = r(out_shape)
    # Leaves that keep their strides (detach() is a view): the kernels see the odd layout.
    x, w, b = (t.detach().requires_grad_() if t.is_leaf else t for t in (x, w, b))
    return x, w, b, dy


LAYOUTS = [
    "3d",
    "4d",
    "1d",
    "x_transposed",
    "x_sliced",
    "x_permuted",
    "x_expanded",
    "w_transposed",
    "w_sliced_b_sliced",
    "w_expanded",
    "dy_transposed",
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, dtype, device):
    # Strides do not interact with the activation: each (layout, dtype) takes one, in turn.
    act = ACTS[(LAYOUTS.index(layout) + DTYPES.index(dtype)) % len(ACTS)]
    g = _gen(LAYOUTS.index(layout))
    x, w, b, dy = _layout(layout, g, dtype, device)
    if layout != "dy_transposed":
        assert layout in ("3d", "4d", "1d") or not (
            x.is_contiguous() and w.is_contiguous() and b.is_contiguous()
        )
    else:
        assert not dy.is_contiguous()
    x_before, w_before = x.detach().clone(), w.detach().clone()
    y, grads = check_linear_act(x, w, b, act, dy, what=layout)
    assert y.shape == (*x.shape[:-1], N_)
    assert grads["dx"].shape == x.shape
    assert torch.equal(x.detach(), x_before) and torch.equal(w.detach(), w_before), "inputs modified"


def _leaf_inputs(g, dtype, device, shape=(37, 19, 23), bias=True):
    M, K, N = shape
    x = _randn((M, K), g, dtype, device).requires_grad_()
    w = _randn((N, K), g, dtype, device, scale=1 / math.sqrt(K)).requires_grad_()
    b = _randn((N,), g, dtype, device).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_stride0_grad_sum_backward(act, dtype, device):
    """y.sum().backward() hands the backward an expanded gradient with stride 0."""
    x, w, b = _leaf_inputs(_gen(11), dtype, device)
    y = fnn.linear_act(x, w, b, act)
    y.sum().backward()
    x64, w64, b64 = (_copy(t, torch.float64, "cpu") for t in (x, w, b))
    reference.linear_act(x64, w64, b64, act).sum().backward()
    xp, wp, bp = (_copy(t, dtype, device) for t in (x, w, b))
    reference.linear_act(xp, wp, bp, act).sum().backward()
    for name, a, e, p in [("dx", x, x64, xp), ("dw", w, w64, wp), ("db", b, b64, bp)]:
        _assert_result(a.grad, e.grad, p.grad, f"sum-backward {act} {dtype} {name}")
    # The same through the helper (autograd.grad of y.sum()), 3-D input.
    x3 = _randn((3, 5, 19), _gen(12), dtype, device).requires_grad_()
    check_linear_act(x3, w, b, act, None, what="3d sum")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("frozen", ["x", "weight", "bias", "weight_and_bias"])
def test_partial_requires_grad(frozen, act, dtype, device):
    """Inputs that do not require grad get none; the others are still right."""
    x, w, b = _leaf_inputs(_gen(13), dtype, device)
    named = {"x": x, "weight": w, "bias": b}
    for name in frozen.split("_and_"):
        named[name].requires_grad_(False)
    dy = _randn((37, 23), _gen(14), dtype, device)
    y = fnn.linear_act(x, w, b, act)
    y.backward(dy)
    x64, w64, b64 = (_copy(t, torch.float64, "cpu") for t in (x, w, b))
    reference.linear_act(x64, w64, b64, act).backward(dy.cpu().double())
    xp, wp, bp = (_copy(t, dtype, device) for t in (x, w, b))
    reference.linear_act(xp, wp, bp, act).backward(dy)
    for name, a, e, p in [("x", x, x64, xp), ("weight", w, w64, wp), ("bias", b, b64, bp)]:
        if name in frozen.split("_and_"):
            assert a.grad is None, f"{name} does not require grad but got one"
        else:
            _assert_result(a.grad, e.grad, p.grad, f"frozen {frozen}: {act} {dtype} d{name}")


def test_no_grad_anywhere(device):
    """Nothing requires grad: a plain forward, no graph."""
    x, w, b = (t.detach() for t in _leaf_inputs(_gen(15), torch.float32, device))
    y = fnn.linear_act(x, w, b, "relu")
    assert not y.requires_grad and y.grad_fn is None
    expected = reference.linear_act(x.cpu().double(), w.cpu().double(), b.cpu().double(), "relu")
    assert_close(y, expected, 1e-5, 1e-5 * expected.abs().max().item(), "no-grad forward")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["sigmoid", "relu"])
@pytest.mark.parametrize("lead", [(0,), (3, 0), (0, 4)], ids=str)
def test_empty_batch(lead, act, dtype, device):
    """No rows: an empty output, an empty dX, and zero dW and db."""
    K, N = 19, 23
    g = _gen(16)
    x = _randn((*lead, K), g, dtype, device).requires_grad_()
    w = _randn((N, K), g, dtype, device).requires_grad_()
    b = _randn((N,), g, dtype, device).requires_grad_()
    y = fnn.linear_act(x, w, b, act)
    assert y.shape == (*lead, N) and y.dtype == dtype
    y.backward(torch.ones_like(y))
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)), "dW of an empty batch must be zeros"
    assert torch.equal(b.grad, torch.zeros_like(b)), "db of an empty batch must be zeros"
    # Also through the stride-0 path.
    w.grad = b.grad = None
    fnn.linear_act(x, w, b, act).sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# ---------------------------------------------------------------------------------------------
# gradcheck (float64)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_linear_act(act, device):
    g = _gen(21)
    x = _randn((3, 3), g, torch.float64, device).requires_grad_()
    w = _randn((4, 3), g, torch.float64, device).requires_grad_()
    b = _randn((4,), g, torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: fnn.linear_act(*a, activation=act), (x, w, b))


def test_gradcheck_fnn_forward(device):
    g = _gen(22)
    sizes, acts = [2, 3, 4, 2], ["relu", "tanh", "sigmoid"]
    x = _randn((3, sizes[0]), g, torch.float64, device).requires_grad_()
    ws = [
        _randn((o, i), g, torch.float64, device).requires_grad_()
        for i, o in zip(sizes, sizes[1:], strict=False)
    ]
    bs = [_randn((o,), g, torch.float64, device).requires_grad_() for o in sizes[1:]]
    bs[1] = None  # one layer without bias

    def f(x, w0, b0, w1, w2, b2):
        return fnn.fnn_forward(x, [w0, w1, w2], [b0, None, b2], acts)

    assert torch.autograd.gradcheck(f, (x, ws[0], bs[0], ws[1], ws[2], bs[2]))


# ---------------------------------------------------------------------------------------------
# The weight-gradient kernel's split path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("need_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_weight_grad_split(act, need_bias, dtype, device, monkeypatch):
    """split=3 slices the batch into 3 partial reductions (float partials summed after): same
    dW and db as split=1 and as the float64 reference."""
    M, K, N = 400, 19, 23  # 3 slices of whole row blocks for every dtype's block size
    g = _gen(31)
    x = _randn((M, K), g, dtype, device)
    w = _randn((N, K), g, dtype, device, scale=1 / math.sqrt(K))
    dy = _randn((M, N), g, dtype, device)
    y = ops.linear_act_forward(x, w, None, act)

    allocated = []
    real_new = ops.new
    monkeypatch.setattr(
        ops, "new", lambda shape, *a, **k: allocated.append(tuple(shape)) or real_new(shape, *a, **k)
    )
    dw3, db3 = ops.linear_act_backward_weight(dy, y, x, act, need_bias, split=3)
    assert (3, N, K) in allocated, f"split=3 did not allocate 3 partials: {allocated}"
    dw1, db1 = ops.linear_act_backward_weight(dy, y, x, act, need_bias, split=1)
    assert (N, K) in allocated

    args64 = [t.cpu().double() for t in (dy, y, x)]
    dw64, db64 = reference.linear_act_backward_weight(*args64, act, need_bias)
    dwp, dbp = reference.linear_act_backward_weight(dy, y, x, act, need_bias)
    for split, dw, db in [(3, dw3, db3), (1, dw1, db1)]:
        _assert_result(dw, dw64, dwp, f"split={split} {act} {dtype} dW")
        if need_bias:
            _assert_result(db, db64, dbp, f"split={split} {act} {dtype} db")
        else:
            assert db is None
    if dtype in (torch.float32, torch.float64):
        rtol, atol = _tolerances(dtype, dw64)
        assert_close(dw3, dw1, rtol, atol, "split=3 vs split=1 dW")


def test_weight_grad_split_bounds(device):
    """More slices than row blocks are clamped; split < 1 is refused."""
    g = _gen(32)
    x = _randn((40, 5), g, torch.float32, device)
    dy = _randn((40, 3), g, torch.float32, device)
    y = torch.sigmoid(_randn((40, 3), g, torch.float32, device))
    dw, db = ops.linear_act_backward_weight(dy, y, x, "sigmoid", True, split=1000)
    dw64, db64 = reference.linear_act_backward_weight(dy.double(), y.double(), x.double(), "sigmoid", True)
    assert_close(dw, dw64.cpu(), 1e-5, 1e-5 * dw64.abs().max().item(), "split=1000 dW")
    assert_close(db, db64.cpu(), 1e-5, 1e-5 * db64.abs().max().item(), "split=1000 db")
    with pytest.raises(ValueError, match="split"):
        ops.linear_act_backward_weight(dy, y, x, "sigmoid", True, split=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 5, 37])
def test_weight_grad_per_slice(rows, dtype, device):
    """rows=r: each slice of r consecutive rows gets its own dW and db (vmap's per-sample
    weight gradients), (M / r, N, K) and (M / r, N) in the layer's dtype, from one launch of
    each kernel (the weight kernel, the fused one): against each slice's float64 gradients.
    Slices that are not whole row blocks (1, 5, 37 rows) included."""
    M, K, N = rows * 7, 13, 9
    for act, x_act in [("tanh", "identity"), ("gelu", "identity"), ("sigmoid", "relu")]:
        dy, s, w, x = _fused_inputs(M, K, N, act, x_act, dtype, device, seed=rows)
        slices = [slice(i, i + rows) for i in range(0, M, rows)]
        want = [reference.linear_act_backward_weight(*(t[r].cpu().double() for t in (dy, s, x)), act, True)
                for r in slices]  # fmt: skip
        in_dtype = [reference.linear_act_backward_weight(dy[r], s[r], x[r], act, True) for r in slices]
        dw, db = ops.linear_act_backward_weight(dy, s, x, act, True, rows=rows)
        assert dw.shape == (7, N, K) and db.shape == (7, N) and dw.dtype == dtype
        for i in range(7):
            _assert_result(dw[i], want[i][0], in_dtype[i][0], f"slice {i} of {rows} rows, {act} {dtype}: dW")
            _assert_result(db[i], want[i][1], in_dtype[i][1], f"slice {i} of {rows} rows, {act} {dtype}: db")
        if fused_backward_fits(N, K, dtype, as_activation(x_act)):
            dx, dw2, db2 = ops.linear_act_backward(dy, s, w, x, act, True, x_act, rows=rows)
            assert torch.equal(dx, ops.linear_act_backward_input(dy, s, w, act, x, x_act))
            for i in range(7):
                _assert_result(dw2[i], want[i][0], in_dtype[i][0], f"fused, slice {i}, {act} {dtype}: dW")
                _assert_result(db2[i], want[i][1], in_dtype[i][1], f"fused, slice {i}, {act} {dtype}: db")
            _, dw3, db3 = ops.linear_act_backward(dy, s, w, x, act, False, x_act, rows=rows)
            assert db3 is None and dw3.shape == (7, N, K)


def test_weight_grad_per_slice_edges(device, monkeypatch):
    """More slices than a grid's second axis takes run in chunks (the limit lowered to 3 here);
    an empty batch gives (0, N, K); rows that do not divide the batch, or are not an int, are
    refused before any launch."""
    dy, s, w, x = _fused_inputs(20, 4, 3, "sigmoid", "identity", torch.float64, device, seed=60)
    want = reference.linear_act_backward_weight(dy, s, x, "sigmoid", True, rows=2)
    monkeypatch.setattr(ops, "_MAX_SLICES", 3)
    dw, db = ops.linear_act_backward_weight(dy, s, x, "sigmoid", True, rows=2)
    assert dw.shape == (10, 3, 4)
    assert_close(dw, want[0], 1e-12, 1e-12, "chunked slices: dW")
    assert_close(db, want[1], 1e-12, 1e-12, "chunked slices: db")
    e = dy[:0]
    dw0, db0 = ops.linear_act_backward_weight(e, e, x[:0], "sigmoid", True, rows=4)
    assert dw0.shape == (0, 3, 4) and db0.shape == (0, 3)
    launched = []
    monkeypatch.setattr(ops._bwd_weight, "keyed", lambda *a, **kw: launched.append(a))
    monkeypatch.setattr(ops._bwd_fused, "keyed", lambda *a, **kw: launched.append(a))
    for rows, err in [(3, ValueError), (0, ValueError), (2.0, TypeError), (True, TypeError)]:
        with pytest.raises(err, match="rows"):
            ops.linear_act_backward_weight(dy, s, x, "sigmoid", True, rows=rows)
        with pytest.raises(err, match="rows"):
            ops.linear_act_backward(dy, s, w, x, "sigmoid", True, rows=rows)
    assert launched == []


# ---------------------------------------------------------------------------------------------
# The fused backward kernel: dX, dW and db from one read of dY, S and X
# ---------------------------------------------------------------------------------------------

# (M, K, N, activation, previous layer's activation): odd sizes up to the tile (64; float64 32),
# light and heavy activations (a heavy one's D formed first), Z-saving ones (S is Z), parameters.
FUSED_CASES = [
    (1, 1, 1, "sigmoid", "identity"),
    (100, 32, 1, "sigmoid", "sigmoid"),  # seed 000's second layer, chained to its first
    (37, 19, 23, "tanh", "relu"),
    (53, 3, 17, "identity", "tanh"),
    (45, 31, 7, "gelu", "leaky_relu"),
    (26, 11, 6, Activation("leaky_relu", negative_slope=-0.2), "identity"),
    (70, 9, 30, Activation("elu", alpha=0.5), Activation("leaky_relu", negative_slope=0.1)),
    (29, 32, 32, Activation("softplus", beta=2.0, threshold=1.0), "sigmoid"),
    (33, 64, 64, "relu", "sigmoid"),  # the widest tile (not float64)
]


def _fused_inputs(m, k, n, act, prev, dtype, device, seed):
    """(dy, s, w, x) as a network's backward hands them to the fused kernel: s what the
    forward saved for `act` (Y or Z; never read for identity), x the layer input, the output of
    a `prev` layer (a fresh input for identity)."""
    g = _gen(seed)
    x = _randn((m, k), g, torch.float64, "cpu")
    if as_activation(prev).name != "identity":
        x = reference.apply_activation(x, prev)
    w = _randn((n, k), g, torch.float64, "cpu", scale=1 / math.sqrt(k))
    z = x @ w.T
    s = z if as_activation(act).saves == "z" else reference.apply_activation(z, act)
    dy = _randn((m, n), g, torch.float64, "cpu")
    return [t.to(device=device, dtype=dtype) for t in (dy, s, w, x)]


def _fused_reference(dy, s, w, x, act, prev, need_bias):
    """(dX, dW, db) by the two backward functions of fnn.reference, in the inputs' dtype."""
    dx = reference.linear_act_backward_input(dy, s, w, act, x, prev)
    return (dx, *reference.linear_act_backward_weight(dy, s, x, act, need_bias))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "x".join(map(str, c[:3])))
def test_fused_backward_matches_float64(case, dtype, device):
    m, k, n, act, prev = case
    if not fused_backward_fits(n, k, dtype, as_activation(prev)):
        assert dtype == torch.float64 and max(n, k) > 32, "a case that should fit does not"
        return
    for need_bias in (True, False):
        dy, s, w, x = _fused_inputs(m, k, n, act, prev, dtype, device, seed=m + n)
        before = [t.clone() for t in (dy, s, w, x)]
        dx, dw, db = ops.linear_act_backward(dy, s, w, x, act, need_bias, prev)
        assert all(torch.equal(a, b) for a, b in zip(before, (dy, s, w, x), strict=True)), "an input changed"
        expected = _fused_reference(*(t.cpu().double() for t in (dy, s, w, x)), act, prev, need_bias)
        in_dtype = _fused_reference(dy, s, w, x, act, prev, need_bias)
        tag = f"fused {case} {dtype} bias={need_bias}"
        _assert_result(dx, expected[0], in_dtype[0], f"{tag} dX")
        _assert_result(dw, expected[1], in_dtype[1], f"{tag} dW")
        if need_bias:
            _assert_result(db, expected[2], in_dtype[2], f"{tag} db")
        else:
            assert db is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_backward_split(dtype, device, monkeypatch):
    """split=3 slices the batch over 3 programs, whose float partials of dW and db are summed
    in order after: the same dX, and dW and db as split=1 and the float64 reference."""
    m, k, n = 300, 13, 21
    dy, s, w, x = _fused_inputs(m, k, n, "tanh", "sigmoid", dtype, device, seed=41)
    allocated = []
    real_new = ops.new
    monkeypatch.setattr(
        ops, "new", lambda shape, *a, **kw: allocated.append(tuple(shape)) or real_new(shape, *a, **kw)
    )
    dx3, dw3, db3 = ops.linear_act_backward(dy, s, w, x, "tanh", True, "sigmoid", split=3)
    assert (3, n, k) in allocated and (3, n) in allocated, f"split=3 made no partials: {allocated}"
    dx1, dw1, db1 = ops.linear_act_backward(dy, s, w, x, "tanh", True, "sigmoid", split=1)
    assert torch.equal(dx3, dx1), "dX depends on the split"
    expected = _fused_reference(*(t.cpu().double() for t in (dy, s, w, x)), "tanh", "sigmoid", True)
    in_dtype = _fused_reference(dy, s, w, x, "tanh", "sigmoid", True)
    for split, dw, db in [(3, dw3, db3), (1, dw1, db1)]:
        _assert_result(dw, expected[1], in_dtype[1], f"split={split} {dtype} dW")
        _assert_result(db, expected[2], in_dtype[2], f"split={split} {dtype} db")


def test_fused_backward_agrees_with_the_two_kernels(device):
    """float64: the fused kernel and the input- and weight-gradient kernels give the same
    gradients to rounding."""
    dy, s, w, x = _fused_inputs(61, 27, 19, "sigmoid", "tanh", torch.float64, device, seed=43)
    dx, dw, db = ops.linear_act_backward(dy, s, w, x, "sigmoid", True, "tanh")
    dx2 = ops.linear_act_backward_input(dy, s, w, "sigmoid", x, "tanh")
    dw2, db2 = ops.linear_act_backward_weight(dy, s, x, "sigmoid", True)
    for a, b, what in [(dx, dx2, "dX"), (dw, dw2, "dW"), (db, db2, "db")]:
        assert_close(a, b, 1e-12, 1e-12 * b.abs().max().item(), f"fused vs two kernels: {what}")


def test_fused_backward_empty_batch(device):
    w = torch.randn(5, 3, device=device)
    e = torch.empty(0, 5, device=device)
    dx, dw, db = ops.linear_act_backward(e, e, w, torch.empty(0, 3, device=device), "sigmoid", True)
    assert dx.shape == (0, 3)
    assert torch.equal(dw, torch.zeros(5, 3, device=device))
    assert torch.equal(db, torch.zeros(5, device=device))


def test_fused_backward_refuses_what_it_does_not_serve(device, monkeypatch):
    """Named errors before any launch, inputs untouched: a weight past the tile, a heavy or
    Z-saving previous activation, mismatched shapes and dtypes, split < 1."""
    launched = []
    monkeypatch.setattr(ops._bwd_fused, "keyed", lambda *a, **kw: launched.append(a))
    dy, s, w, x = _fused_inputs(9, 5, 4, "sigmoid", "identity", torch.float32, device, seed=47)
    before = [t.clone() for t in (dy, s, w, x)]
    wide = torch.randn(65, 5, device=device)
    with pytest.raises(ValueError, match="fused kernel does not serve weight"):
        ops.linear_act_backward(torch.randn(9, 65, device=device), torch.randn(9, 65, device=device),
                                wide, x, "sigmoid", True)
    for prev in ("gelu", "elu", Activation("leaky_relu", negative_slope=-0.1)):
        with pytest.raises(ValueError, match="prev_activation"):
            ops.linear_act_backward(dy, s, w, x, "sigmoid", True, prev)
    with pytest.raises(ValueError, match="x must have shape"):
        ops.linear_act_backward(dy, s, w, x[:, :4], "sigmoid", True)
    with pytest.raises(TypeError, match="y is torch.float64"):
        ops.linear_act_backward(dy, s.double(), w, x, "sigmoid", True)
    with pytest.raises(ValueError, match="split"):
        ops.linear_act_backward(dy, s, w, x, "sigmoid", True, split=0)
    assert not launched
    assert all(torch.equal(a, b) for a, b in zip(before, (dy, s, w, x), strict=True))


# ---------------------------------------------------------------------------------------------
# NaN, inf and saturation
# ---------------------------------------------------------------------------------------------


def _assert_same_specials(actual, expected, what):
    """Same NaN positions, same infinities, finite values close (dtype-sized tolerance)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert torch.equal(a.isnan(), e.isnan()), (
        f"{what}: NaN at {a.isnan().nonzero().tolist()}, PyTorch has NaN at {e.isnan().nonzero().tolist()}"
    )
    assert torch.equal(a.isinf(), e.isinf()) and torch.equal(a[a.isinf()], e[e.isinf()]), (
        f"{what}: inf at {a.isinf().nonzero().tolist()}, PyTorch has inf at {e.isinf().nonzero().tolist()}"
    )
    finite = e.isfinite()
    eps = torch.finfo(actual.dtype).eps
    scale = e[finite].abs().max().item() if finite.any() else 0.0
    # Both sides round the same sums in the same dtype; a few ulps of the scale apart at most.
    assert_close(a[finite], e[finite], 8 * eps, 8 * eps * scale, f"{what} (finite elements)")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_nan_inf_like_pytorch(act, dtype, device):
    g = _gen(41)
    M, K, N = 9, 6, 5
    x = _randn((M, K), g, dtype, device)
    w = _randn((N, K), g, dtype, device, scale=0.5)
    b = _randn((N,), g, dtype, device)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    x[4, 5] = -float("inf")
    w[2, 4] = float("inf")  # row 4 has -inf at column 5, not 4: stays defined unless x[., 4] = 0
    b[3] = float("nan")
    dy = _randn((M, N), g, dtype, device)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    theirs = [t.clone().requires_grad_() for t in (x, w, b)]
    y = fnn.linear_act(*ours, act)
    y_torch = {"identity": lambda z: z, "sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}[
        act
    ](F.linear(*theirs))
    _assert_same_specials(y, y_torch, f"{act} {dtype} output")
    assert y.isnan().any() and (act in ("sigmoid", "tanh") or y.isinf().any()), "the test lost its specials"
    y.backward(dy)
    y_torch.backward(dy)
    for name, a, e in zip(("dx", "dw", "db"), ours, theirs, strict=True):
        _assert_same_specials(a.grad, e.grad, f"{act} {dtype} {name}")


# numpy (interpreter) warns about the unused small-|z| branch of tanh overflowing to inf.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_saturation_is_exact(act, dtype, device):
    """sigmoid/tanh of |z| = 1e4 are exactly 0, 1 or +-1 (no overflow to NaN/inf), and their
    gradient there is exactly 0."""
    x = torch.tensor([[1e4], [-1e4], [2e4], [-3e4], [0.5]], dtype=dtype, device=device).requires_grad_()
    w = torch.tensor([[1.0], [-2.0]], dtype=dtype, device=device).requires_grad_()
    y = fnn.linear_act(x, w, None, act)
    low = 0.0 if act == "sigmoid" else -1.0
    expected = torch.tensor([[1, low], [low, 1], [1, low], [low, 1]], dtype=dtype, device=device)
    assert torch.equal(y[:4].detach(), expected), f"{act} {dtype} saturated outputs: {y[:4].tolist()}"
    assert torch.isfinite(y).all()
    y.backward(torch.ones_like(y))
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    assert torch.equal(x.grad[:4], torch.zeros_like(x.grad[:4])), f"{act} {dtype}: dx {x.grad[:4].tolist()}"
    assert x.grad[4].abs().item() > 0


# ---------------------------------------------------------------------------------------------
# Output poisoning (tests/conftest.py)
# ---------------------------------------------------------------------------------------------


def test_poisoning_is_on_and_catches_unwritten_outputs(device, monkeypatch):
    assert kernels.memory.POISON, "conftest should poison every output"
    like = torch.zeros(1, device=device)
    assert kernels.memory.empty((3, 4), like).isnan().all()
    assert kernels.memory.empty((3,), like, dtype=torch.float16).isnan().all()

    g = _gen(51)
    x = _randn((37, 19), g, torch.float32, device)
    w = _randn((23, 19), g, torch.float32, device)
    y = ops.linear_act_forward(x, w, None, "sigmoid")
    assert not y.isnan().any(), "a fully written output must hold no poison"
    assert ops.linear_act_forward(x[:0], w, None, "sigmoid").shape == (0, 23)
    dw, db = ops.linear_act_backward_weight(y[:0], y[:0], x[:0], "sigmoid", True)
    assert not dw.isnan().any() and not db.isnan().any() and not dw.any() and not db.any()

    # A kernel that writes nothing leaves NaN behind, which the comparisons then catch.
    class NoLaunch:
        def keyed(self, *args, **kwargs):
            return None

    monkeypatch.setattr(ops, "_fwd", NoLaunch())  # the forward kernel's launcher
    y_unwritten = ops.linear_act_forward(x, w, None, "sigmoid")
    assert y_unwritten.isnan().all()
    with pytest.raises(AssertionError, match="differ"):
        assert_close(y_unwritten, y.double(), 1e-5, 1e-5, "unwritten output")


# ---------------------------------------------------------------------------------------------
# Rounding of the kernels' casts (kernels.linear_act.cast)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, ops.cast(x, y_ptr.dtype.element_ty, UPCAST), mask=offs < n)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy: 3.4e38 -> fp16 inf
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cast_rounds_to_nearest_even(dtype, device):
    """float32 -> bfloat16/float16 as torch rounds it (nearest, ties to even; NaN, inf and
    overflow kept). Triton's interpreter truncates float32 -> bfloat16; `cast` corrects it."""
    g = _gen(61)
    x = torch.randn(1000, generator=g) * torch.logspace(-40, 38, 1000)
    bits = torch.randint(0, 2**16, (200,), generator=g, dtype=torch.int32)
    ties = ((bits << 16) | 0x8000).view(torch.float32)  # exactly halfway between two bfloat16
    special = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.3961e38, -3.3961e38, 1e-45]
    )
    x = torch.cat([x, ties[ties.isfinite()], special])
    if not ops.INTERPRETED:  # compiled code may flush float32 subnormals; the interpreter must not
        x = x[(x.abs() >= torch.finfo(torch.float32).tiny) | (x == 0) | ~x.isfinite()]
    x = x.to(device)
    y = torch.empty(x.shape, dtype=dtype, device=device)
    upcast = ops.INTERPRETED and dtype == torch.bfloat16
    _cast_kernel[(1,)](x, y, x.numel(), UPCAST=upcast, BLOCK=triton.next_power_of_2(x.numel()))
    expected = x.to(dtype)
    same = (y == expected) | (y.isnan() & expected.isnan())
    assert same.all(), (
        f"{int((~same).sum())} casts differ from torch's, e.g. {x[~same][:3].tolist()} -> "
        f"{y[~same][:3].tolist()}, torch: {expected[~same][:3].tolist()}"
    )
