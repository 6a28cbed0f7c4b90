"""Autocast: under torch.autocast, fnn layers compute in the autocast dtype as F.linear followed
by the activation does, and float32 parameters receive float32 gradients.

Each result is held to the half-precision rule (helpers.assert_close_lowp): its error against
float64 is at most twice that of PyTorch's own `act(F.linear(...))` under the same autocast.
The float64 reference sees the inputs rounded to the autocast dtype, as both computations do.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_close_lowp

import fnn
from fnn import reference

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# (device type, autocast dtype); CPU autocast in float16 is exercised too, as torch supports it.
CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=_CUDA),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=_CUDA),
]
ACTS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh, "identity": lambda z: z}


@pytest.fixture(params=["kernels", "reference"])
def backend_mode(request, monkeypatch) -> str:
    """On the CPU, run the kernels (interpreter) and, separately, the reference fallback."""
    if request.param == "reference":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param


def _random(shape, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def _grads(fn, tensors, dy):
    """Output of fn(*tensors) and the gradients of every tensor, against dy (given already
    rounded to the autocast dtype, so that the float64 reference sees the same values)."""
    y = fn(*tensors)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad for t in tensors if t is not None]


def _reference64(fn, tensors, dtype, dy):
    """fn in float64 on the tensors rounded to `dtype`: the exact value of the autocast maths."""
    rounded = _leaves(*[t.detach().to(dtype).double() if t is not None else None for t in tensors])
    return _grads(fn, rounded, dy.double())


def _check_lowp(ours, theirs, ref, what):
    """The half-precision rule on the output and on each (float32) gradient."""
    (y, gs), (ty, tgs), (ry, rgs) = ours, theirs, ref
    assert y.dtype == ty.dtype, f"{what}: output dtype {y.dtype}, F.linear under autocast gives {ty.dtype}"
    assert_close_lowp(y, ty, ry, f"{what}: output")
    for i, (g, tg, rg) in enumerate(zip(gs, tgs, rgs, strict=True)):
        assert g.dtype == tg.dtype == torch.float32, f"{what}: gradient {i} is {g.dtype}, not float32"
        assert_close_lowp(g, tg, rg, f"{what}: gradient {i}")


@pytest.mark.parametrize("device_type, dtype", CASES)
@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh", "identity"])
def test_linear_act_under_autocast(device_type, dtype, activation, backend_mode):
    if device_type == "cuda" and backend_mode == "reference":
        pytest.skip("the reference fallback serves CPU tensors only")
    x, w = _random((13, 24), device_type, 0), _random((20, 24), device_type, 1, 0.3)
    b = _random(20, device_type, 2)
    dy = _random((13, 20), device_type, 3).to(dtype).float()
    act = ACTS[activation]
    with torch.autocast(device_type, dtype=dtype):
        ours = _grads(lambda x, w, b: fnn.linear_act(x, w, b, activation), _leaves(x, w, b), dy)
        theirs = _grads(lambda x, w, b: act(F.linear(x, w, b)), _leaves(x, w, b), dy)
    assert ours[0].dtype == dtype
    ref = _reference64(lambda x, w, b: act(F.linear(x, w, b)), (x, w, b), dtype, dy)
    what = f"linear_act {activation} under {device_type} autocast {dtype}"
    _check_lowp(ours, theirs, ref, what)


@pytest.mark.parametrize("device_type, dtype", CASES)
def test_fused_linear_and_fnn_under_autocast(device_type, dtype, backend_mode):
    if device_type == "cuda" and backend_mode == "reference":
        pytest.skip("the reference fallback serves CPU tensors only")
    torch.manual_seed(0)
    layer = fnn.FusedLinear(24, 20, activation="tanh", device=device_type)
    model = fnn.FNN([24, 32, 16, 3], activation=["relu", "tanh", "sigmoid"], device=device_type)
    x = _random((13, 24), device_type, 4)
    dy1, dy2 = (_random((13, n), device_type, 5 + n).to(dtype).float() for n in (20, 3))

    def by_torch(m):
        """The same module's maths as PyTorch ops (F.linear, then the activation)."""
        if isinstance(m, fnn.FusedLinear):
            return lambda x, w, b: reference.linear_act(x, w, b, m.activation)
        return lambda x, *p: reference.fnn_forward(x, p[0::2], p[1::2], m.activations)

    for m, dy in ((layer, dy1), (model, dy2)):
        params = [p for p in m.parameters()]
        assert all(p.dtype == torch.float32 for p in params)
        with torch.autocast(device_type, dtype=dtype):
            xl = _leaves(x)[0]
            y = m(xl)
            assert y.dtype == dtype, f"{type(m).__name__}: output {y.dtype}"
            y.backward(dy.to(dtype))
        ours = (y.detach(), [xl.grad] + [p.grad for p in params])
        with torch.autocast(device_type, dtype=dtype):
            theirs = _grads(by_torch(m), _leaves(x, *params), dy)
        ref = _reference64(by_torch(m), (x, *params), dtype, dy)
        what = f"{type(m).__name__} under {device_type} autocast {dtype}"
        _check_lowp(ours, theirs, ref, what)


def test_float64_is_not_cast(device):
    """Autocast leaves float64 alone, for F.linear and so for fnn."""
    x, w = _random((5, 4), device, 7).double(), _random((3, 4), device, 8).double()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = fnn.linear_act(x, w, None, "tanh")
        assert y.dtype == torch.tanh(F.linear(x, w)).dtype == torch.float64
    assert_close(y, reference.linear_act(x, w, None, "tanh"), rtol=1e-10, atol=1e-12, what="float64 output")


def test_compiled_fnn_under_autocast(device):
    """torch.compile traces the autocast casts: same dtype and values as eager autocast."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    model = fnn.FNN([24, 16, 3], activation=["relu", "sigmoid"], device=device)
    x = _random((9, 24), device, 9)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.autocast(device.type, dtype=torch.bfloat16):
        eager = model(x)
        out = compiled(x)
    out.float().sum().backward()
    torch._dynamo.reset()
    assert out.dtype == eager.dtype == torch.bfloat16
    assert torch.equal(out, eager.detach()), "compiled autocast output differs from eager"
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
