"""fusion="network": the whole network in one kernel per direction (kernels.network).

Every result is checked against fusion="layer" and against fnn.reference in float64 through
PyTorch's autograd; launches are counted by wrapping the jit kernels.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from helpers import RTOL, assert_close, assert_close_lowp, run_script

import fnn
import kernels.linear_act
import kernels.network
from fnn import network_ops, reference
from fnn.network import flat_buffer, resolve_fusion
from kernels.checks import as_activation
from kernels.launch import CachedLauncher

ACTS = ["identity", "sigmoid", "relu", "tanh"]

# (sizes, activations, bias, batch): sampled so that every depth 1..6, every activation, both
# bias settings, every batch in (0, 1, 7, 100, 1000) and widths 1..128 (with 16, 17, 64, 65,
# 127, 128 around the padding edges) appear.
CASES = [
    ([1, 1], ["sigmoid"], True, 7),
    ([3, 1], ["identity"], False, 0),
    ([2, 32, 1], ["sigmoid", "sigmoid"], False, 100),
    ([5, 17, 3], ["relu", "tanh"], True, 1),
    ([16, 128, 9, 2], ["tanh", "relu", "sigmoid"], True, 100),
    ([7, 64, 65, 127, 1], ["sigmoid", "identity", "relu", "tanh"], False, 7),
    ([128, 33, 1, 40, 6, 3], ["relu", "sigmoid", "tanh", "identity", "sigmoid"], True, 1000),
    ([4, 20, 20, 20, 20, 20, 2], ["tanh", "tanh", "relu", "sigmoid", "identity", "sigmoid"], False, 1000),
    ([9, 128, 128, 8], ["sigmoid", "relu", "identity"], True, 0),
    ([2, 100, 1], ["relu", "identity"], True, 1),
]


class LaunchCounter:
    """Wraps the launch function of every kernel of kernels.network and kernels.linear_act
    (kernels.launch) to count launches by kernel name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for module in (kernels.network, kernels.linear_act):
            for name, obj in list(vars(module).items()):
                if isinstance(getattr(obj, "state", None), CachedLauncher):
                    monkeypatch.setattr(module, name, self._wrap(obj))

    def _wrap(self, launch):
        counter = self
        name = launch.state.fn.__name__

        class Counted:
            state = launch.state

            def __call__(self, grid, *args, **kwargs):
                counter.calls.append(name)
                return launch(grid, *args, **kwargs)

            def keyed(self, ukey, grid, *args, **kwargs):
                counter.calls.append(name)
                return launch.keyed(ukey, grid, *args, **kwargs)

            def direct(self, session, ukey, grid, *args, **kwargs):
                counter.calls.append(name)
                return launch.direct(session, ukey, grid, *args, **kwargs)

        return Counted()


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> LaunchCounter:
    return LaunchCounter(monkeypatch)


def _model(sizes, acts, bias, dtype, device, fusion="network", seed=0):
    # 16-bit models are drawn in float32 and cast: torch's initialisers draw other values in
    # 16-bit dtypes from one release to the next (2.11 and 2.13 differ), float32's stay.
    torch.manual_seed(seed)
    draw = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    model = fnn.FNN(sizes, activation=acts, bias=bias, dtype=draw, device=device, fusion=fusion).to(dtype)
    with torch.no_grad():  # weights large enough that every activation leaves its linear range
        for p in model.parameters():
            p.mul_(2)
    return model


def _reference(model, x, dy, dtype=torch.float64, activations=None):
    """Output and gradients (x, then every parameter) by autograd on fnn.reference in `dtype`
    (with `activations` in place of the model's, if given)."""
    xr = x.detach().to(dtype).requires_grad_()
    params = [p.detach().to(dtype).requires_grad_() for p in model.parameters()]
    it = iter(params)
    weights, biases = [], []
    for layer in model.layers:
        weights.append(next(it))
        biases.append(next(it) if layer.bias is not None else None)
    y = reference.fnn_forward(xr, weights, biases, activations or model.activations)
    y.backward(dy.to(dtype))
    return y, [xr.grad, *(p.grad for p in params)]


def away_from_kink(model, x, dy):
    """dY, with 0 wherever the last layer's float64 pre-activation lies within two epsilons of
    dY's dtype (times its largest) of 0, when the last activation's derivative jumps there
    (relu, leaky_relu, elu with alpha != 1). In 16-bit arithmetic such a pre-activation may
    round to either side, PyTorch's too, and D is dY times one slope or the other: a dY of 0
    leaves the gradients to what rounding decides elsewhere. Other activations: dY as given."""
    last = as_activation(model.activations[-1])
    kinked = last.name in ("relu", "leaky_relu") or (last.name == "elu" and last.values[0] != 1.0)
    if not (kinked and dy.numel()):
        return dy
    acts = [*model.activations[:-1], "identity"]
    z = _reference(model, x, dy, activations=acts)[0].detach()
    near = z.abs() < 2 * torch.finfo(dy.dtype).eps * z.abs().max()
    assert near.sum() <= 0.1 * near.numel(), f"{int(near.sum())} of {near.numel()} near the kink"
    return dy.masked_fill(near.to(dy.device), 0)


def _run(model, x, dy):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(dy)
    return y, [x.grad, *(p.grad for p in model.parameters())]


def _grad_names(model):
    return ["dx", *(f"d{name}" for name, _ in model.named_parameters())]


@pytest.mark.parametrize("sizes,acts,bias,batch", CASES)
def test_network_matches_layer_and_reference(device, sizes, acts, bias, batch):
    dtype = torch.float32
    net = _model(sizes, acts, bias, dtype, device, "network")
    layer = copy.deepcopy(net)
    layer.fusion = "layer"
    torch.manual_seed(1)
    x = torch.randn(batch, sizes[0], dtype=dtype, device=device)
    dy = torch.randn(batch, sizes[-1], dtype=dtype, device=device)
    y_ref, g_ref = _reference(net, x, dy)
    y_net, g_net = _run(net, x, dy)
    y_lay, g_lay = _run(layer, x, dy)
    # Errors relative to each tensor's scale: cancellation in long sums makes single small
    # elements meaningless at float32 precision.
    for what, got, want in [("y", y_net, y_ref), *zip(_grad_names(net), g_net, g_ref, strict=True)]:
        scale = want.abs().max().item() if want.numel() else 0.0
        assert_close(got, want, RTOL[dtype], RTOL[dtype] * scale, f"network {what}")
    for what, got, want in [("y", y_net, y_lay), *zip(_grad_names(net), g_net, g_lay, strict=True)]:
        scale = want.abs().max().item() if want.numel() else 0.0
        assert_close(got, want.float(), RTOL[dtype], RTOL[dtype] * scale, f"network vs layer {what}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_network_dtypes(device, dtype):
    sizes, acts = [6, 40, 17, 3], ["tanh", "sigmoid", "relu"]
    net = _model(sizes, acts, True, dtype, device, "network")
    torch.manual_seed(2)
    x = torch.randn(100, sizes[0], device=device).to(dtype)
    dy = torch.randn(100, sizes[-1], device=device).to(dtype)
    if dtype != torch.float64:
        dy = away_from_kink(net, x, dy)
    y_ref, g_ref = _reference(net, x, dy)
    y_net, g_net = _run(net, x, dy)
    names = ["y", *_grad_names(net)]
    if dtype == torch.float64:
        for what, got, want in zip(names, [y_net, *g_net], [y_ref, *g_ref], strict=True):
            assert_close(got, want, RTOL[dtype], RTOL[dtype] * want.abs().max().item(), what)
        return
    # Half precision: at most twice PyTorch's own error in the same dtype (on the reference).
    lowp = copy.deepcopy(net).cpu()
    xl, dyl = x.cpu(), dy.cpu()
    xl = xl.clone().requires_grad_()
    params = list(lowp.parameters())
    it = iter(params)
    weights, biases = [], []
    for _layer in lowp.layers:
        weights.append(next(it))
        biases.append(next(it))
    y_low = reference.fnn_forward(xl, weights, biases, lowp.activations)
    y_low.backward(dyl)
    g_low = [xl.grad, *(p.grad for p in params)]
    for what, got, low, want in zip(names, [y_net, *g_net], [y_low, *g_low], [y_ref, *g_ref], strict=True):
        assert got.dtype == dtype, what
        assert_close_lowp(got, low, want, f"{dtype} {what}")


@pytest.mark.parametrize("programs", [1, 2, 3, 8])
def test_backward_programs_agree_and_are_deterministic(device, programs):
    """The backward split over G programs (their partial sums reduced in a fixed order)
    equals the reference, and two runs give the same bits."""
    from kernels.network import network_backward

    sizes, acts = [5, 24, 24, 2], ["sigmoid", "tanh", "identity"]
    biased = (True, True, True)
    net = _model(sizes, acts, True, torch.float32, device, "network")
    flat = net._flat
    meta = network_ops.meta(sizes, acts, biased, device)
    ap = network_ops.activation_params(acts, torch.float32, device)
    torch.manual_seed(3)
    x = torch.randn(1000, 5, device=device)
    dy = torch.randn(1000, 2, device=device)
    y, h = kernels.network.network_forward(x, flat, meta, sizes, biased, True, ap)
    runs = [network_backward(dy, y, h, x, flat, meta, sizes, biased, True, ap, programs) for _ in range(2)]
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), "two identical backwards differ"
    _, g_ref = _reference(net, x, dy)
    dx, grads = runs[0]
    dws, dbs = network_ops.unflatten(grads, sizes, biased)
    got = [dx]
    for dw, db in zip(dws, dbs, strict=True):
        got += [dw, db]
    for what, a, e in zip(_grad_names(net), got, g_ref, strict=True):
        assert_close(a, e, 1e-5, 1e-5 * e.abs().max().item(), f"G={programs} {what}")


def test_launch_counts(device, launches, cats):
    net = _model([2, 32, 1], ["sigmoid", "sigmoid"], False, torch.float32, device, "network")
    x = torch.randn(100, 2, device=device, requires_grad=True)
    # Triton launches; `cats` counts the concatenations of the parameters (a torch op).
    with torch.no_grad():
        net(x)
    assert launches.calls == ["network_fwd_kernel"]
    launches.calls.clear()
    y = net(x)
    assert launches.calls == ["network_fwd_kernel"]
    launches.calls.clear()
    y.sum().backward()
    assert launches.calls == ["network_bwd_kernel"] and cats == []
    # A batch over one program: the backward adds the fixed-order reduction.
    launches.calls.clear()
    net(torch.randn(1000, 2, device=device)).sum().backward()
    assert launches.calls == ["network_fwd_kernel", "network_bwd_kernel", "network_reduce_kernel"]
    assert cats == []
    # Parameters that are not the flat buffer's views: the same kernels and one cat per forward.
    net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, assign=True)
    launches.calls.clear()
    net(x).sum().backward()
    assert launches.calls == ["network_fwd_kernel", "network_bwd_kernel"] and cats == [1]


FAST_PATH_SCRIPT = """
import json, torch, fnn, fnn.network
from torch.utils._python_dispatch import TorchDispatchMode
from bench.fakecuda import compile_only

cats = []
real = fnn.network.concat_parameters
fnn.network.concat_parameters = lambda *a: cats.append(1) or real(*a)
# What dispatches no GPU work: views, allocations, metadata; every other aten op would launch.
FREE = ("view", "_unsafe_view", "slice", "as_strided", "alias", "detach", "t", "transpose",
        "expand", "unsqueeze", "squeeze", "select", "reshape", "empty", "empty_strided",
        "new_empty", "new_empty_strided", "empty_like")

class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.namespace == "aten" and name in FREE):
            self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

out = {}
with compile_only(90) as gpu:
    torch.manual_seed(0)
    model = fnn.FNN([2, 32, 1], bias=False, fusion="network")
    x, y, dy = torch.randn(100, 2), torch.rand(100, 1), torch.randn(100, 1)
    trainer = fnn.Trainer(model, loss="sse", lr=1e-3)

    def measure(what, fn):
        fn()  # compiles
        gpu.launches.clear(); cats.clear()
        mode = Ops()
        with mode:
            fn()
        out[what] = {"launches": [l.kernel for l in gpu.launches], "cats": len(cats), "ops": mode.ops}

    def fwbw():
        for p in model.parameters():
            p.grad = None
        model(x).backward(dy)

    measure("fwbw", fwbw)
    measure("step", lambda: trainer.step(x, y))
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    measure("fwbw_assigned", fwbw)
    measure("step_assigned", lambda: trainer.step(x, y))  # flattens on the first of the two calls
    measure("fwbw_after_step", fwbw)
print("RESULT " + json.dumps(out))
"""


def test_fast_path_launch_counts_compiled_for_sm90(tmp_path):
    """Compiled for sm_90a with the launches skipped (bench.fakecuda), seed 000's network on
    the network path: forward + backward is exactly two launches and no other GPU work, the
    Trainer step exactly one; parameters replaced by load_state_dict(assign=True) cost one
    torch.cat per forward, until the Trainer's next step flattens them again."""
    out = run_script(FAST_PATH_SCRIPT, tmp_path)
    fwbw, bwd = ["network_fwd_kernel", "network_bwd_kernel"], ["network_bwd_kernel"]
    assert out["fwbw"] == {"launches": fwbw, "cats": 0,
                           "ops": ["fnn.network_forward", "fnn.network_backward"]}, out["fwbw"]
    assert out["step"] == {"launches": bwd, "cats": 0, "ops": []}, out["step"]
    assert out["fwbw_assigned"] == {"launches": fwbw, "cats": 1,
                                    "ops": ["aten.cat", "fnn.network_forward", "fnn.network_backward"]}
    assert out["step_assigned"] == {"launches": bwd, "cats": 0, "ops": []}, out["step_assigned"]
    assert out["fwbw_after_step"] == out["fwbw"]


# ---------------------------------------------------------------------------------------------
# The flat parameter buffer survives what users do to a model
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def cats(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the concatenations of the parameters made for a forward (the slow path)."""
    calls: list[int] = []
    real = fnn.network.concat_parameters
    monkeypatch.setattr(fnn.network, "concat_parameters", lambda *a: calls.append(1) or real(*a))
    return calls


def _layout(model):
    """The parameters in the flat buffer's order: every weight, then every bias."""
    layers = model.layers
    return [la.weight for la in layers] + [la.bias for la in layers if la.bias is not None]


def _views_of_own_flat(model) -> bool:
    """Whether every parameter is its slice of the model's own flat buffer (checked by
    storage, offset and value, independently of fnn.network.flat_buffer, which must agree)."""
    flat = model._flat
    if flat is None:
        assert flat_buffer(model, *fnn.network._layers_parameters(model)) is None
        return False
    off, ok = 0, True
    for p in _layout(model):
        ok &= (
            p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
            and p.storage_offset() == flat.storage_offset() + off
            and p.is_contiguous()
        )
        off += p.numel()
    ok &= off == flat.numel()
    if ok:
        joined = torch.cat([p.detach().reshape(-1) for p in _layout(model)])
        assert torch.equal(flat.view(torch.uint8), joined.view(torch.uint8))  # bitwise: NaN too
    assert (flat_buffer(model, *fnn.network._layers_parameters(model)) is flat) == ok
    return ok


def _check_model(model, what, seed=0):
    """Output and every gradient equal float64 autograd on the model's current parameters."""
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, model.sizes[0], generator=g).to(p)
    dy = torch.randn(7, model.sizes[-1], generator=g).to(p)
    for q in model.parameters():
        q.grad = None
    y_ref, g_ref = _reference(model, x, dy)
    y, grads = _run(model, x, dy)
    rtol = RTOL[p.dtype]
    for name, got, want in [("y", y, y_ref), *zip(_grad_names(model), grads, g_ref, strict=True)]:
        assert got.dtype == p.dtype, f"{what}: {name} is {got.dtype}"
        assert_close(got, want, rtol, rtol * want.abs().max().item(), f"{what}: {name}")


def _net(device, fusion="network", seed=0):
    return _model([3, 10, 2], ["relu", "sigmoid"], True, torch.float32, device, fusion, seed)


def _train_both(net, twin, x, y, steps=2):
    """`steps` fused Trainer steps on net and autograd + SGD steps on its layer-path twin."""
    for model in (net, twin):
        trainer = fnn.Trainer(model, loss="mse", lr=0.5)
        assert trainer.fused(x.device) == (model is net)
        trainer.fit(x, y, steps)
    for (name, p), q in zip(net.named_parameters(), twin.parameters(), strict=True):
        assert_close(p, q, 1e-5, 1e-6, f"trained {name}")


def test_parameters_are_views_of_the_flat_buffer(device, cats):
    """An FNN's parameters are contiguous views of its flat buffer from the start: a forward
    and backward read it (no cat) and change nothing; an in-place change of a parameter is a
    change of the buffer; parameters_to_vector works on them."""
    net = _net(device)
    flat, params = net._flat, list(net.parameters())
    ptrs = [p.data_ptr() for p in params]
    assert _views_of_own_flat(net) and all(isinstance(p, torch.nn.Parameter) for p in params)
    _check_model(net, "views of the flat buffer")
    assert cats == [], "a forward concatenated parameters that are the flat buffer's views"
    assert net._flat is flat and [p.data_ptr() for p in net.parameters()] == ptrs
    assert all(p.grad.is_contiguous() for p in net.parameters())
    with torch.no_grad():
        net.layers[1].bias.add_(1.0)
    assert torch.equal(flat[-2:], net.layers[1].bias.detach())
    vec = torch.nn.utils.parameters_to_vector(net.parameters())
    assert torch.equal(vec, torch.cat([p.detach().reshape(-1) for p in params]))
    assert net.flatten_parameters() and net._flat is flat, "flattening views again copies nothing"
    y = net(torch.randn(4, 3, device=device))
    with torch.no_grad():
        net.layers[0].weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()  # autograd sees an in-place change, as on the layer path


@pytest.mark.parametrize("when", ["before", "after"])
def test_optimizers_built_before_or_after_training(device, when, cats):
    """A torch optimizer and the fused Trainer take turns on the same Parameter objects:
    built before the Trainer's first step or after, every update is seen by the other, and
    the parameters stay the flat buffer's views throughout (no cat)."""
    net, twin = _net(device), _net(device, fusion="layer")
    flat = net._flat
    x, y = torch.randn(9, 3, device=device), torch.rand(9, 2, device=device)
    opts = None
    if when == "before":
        opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (net, twin)]
    _train_both(net, twin, x, y)
    if when == "after":
        opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (net, twin)]
    for _ in range(2):
        for m, opt in zip((net, twin), opts, strict=True):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    _train_both(net, twin, x, y)
    _check_model(net, f"optimizer built {when}")
    assert net._flat is flat and _views_of_own_flat(net) and cats == []


def test_to_flattens_again(device, cats):
    net, twin = _net(device), _net(device, fusion="layer")
    x, y = torch.randn(9, 3, device=device), torch.rand(9, 2, device=device)
    _train_both(net, twin, x, y)
    params, flat = list(net.parameters()), net._flat
    assert net.to(device) is net and net._flat is flat, "a no-op to() keeps the buffer"
    for m in (net, twin):
        m.double()
    assert list(net.parameters()) == params, "to() keeps the Parameter objects"
    assert net._flat.dtype == torch.float64 and _views_of_own_flat(net)
    _check_model(net, "after double()")
    _train_both(net, twin, x.double(), y.double())
    _check_model(net, "trained after double()")
    assert cats == []


def test_load_state_dict_in_place_and_assign(device, cats):
    src, net = _net(device, seed=1), _net(device, seed=2)
    x, y = torch.randn(9, 3, device=device), torch.rand(9, 2, device=device)
    trainer = fnn.Trainer(net, loss="mse", lr=0.5)
    trainer.step(x, y)
    flat = net._flat
    net.load_state_dict(src.state_dict())
    assert net._flat is flat and _views_of_own_flat(net), "an in-place load keeps the views"
    for p, q in zip(net.parameters(), src.parameters(), strict=True):
        assert torch.equal(p, q)
    _check_model(net, "load_state_dict")
    assert cats == []
    fresh = {k: v.clone() + 1 for k, v in src.state_dict().items()}
    net.load_state_dict(fresh, assign=True)
    assert not _views_of_own_flat(net)
    _check_model(net, "load_state_dict(assign=True)")
    assert cats == [1], "parameters that are not the buffer's views are concatenated per forward"
    for k, p in net.named_parameters():  # the forward left the assigned tensors in place
        assert p.data_ptr() == fresh[k].data_ptr(), k
    trainer.step(x, y)
    assert _views_of_own_flat(net) and net._flat is not flat, "the fused step flattens them again"
    before = [p.detach().clone() for p in net.parameters()]
    trainer.step(x, y)
    assert all(not torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))
    _check_model(net, "trained after load_state_dict(assign=True)")
    # An FNN's state_dict loads into a layer-path FNN and back.
    layer = _net(device, fusion="layer", seed=3)
    layer.load_state_dict(net.state_dict())
    assert torch.equal(layer(x), net(x))


def test_deepcopy_and_save_load_whole_model(device, tmp_path, cats):
    net = _net(device)
    x, y = torch.randn(9, 3, device=device), torch.rand(9, 2, device=device)
    fnn.Trainer(net, loss="mse", lr=0.5).step(x, y)
    twin = copy.deepcopy(net)
    assert _views_of_own_flat(twin), "the copy's parameters are views of its own flat buffer"
    assert twin._flat.data_ptr() != net._flat.data_ptr() and _views_of_own_flat(net)
    before = [p.detach().clone() for p in net.parameters()]
    fnn.Trainer(twin, loss="mse", lr=1.0).step(x, y)
    for p, q, r in zip(net.parameters(), before, twin.parameters(), strict=True):
        assert torch.equal(p, q), "training the copy changed the original"
        assert not torch.equal(p, r)
    _check_model(twin, "deepcopy")
    torch.save(net, tmp_path / "net.pt")
    loaded = torch.load(tmp_path / "net.pt", weights_only=False)
    assert _views_of_own_flat(loaded)
    assert torch.equal(loaded(x), net(x))
    _check_model(loaded, "torch.load")
    assert cats == []


def test_parameters_replaced_or_substituted(device, cats):
    """A replaced parameter, torch.func.functional_call, vector_to_parameters: every one sees
    the parameters as they are (one cat per forward), and none changes the model's own."""
    net = _net(device)
    with torch.no_grad():
        net.layers[1].weight = torch.nn.Parameter(torch.randn(2, 10, device=device))
    assert not _views_of_own_flat(net)
    _check_model(net, "replaced weight")
    assert cats == [1]
    assert net.flatten_parameters() and _views_of_own_flat(net)
    flat = net._flat
    other = {k: v.detach() * 0.5 for k, v in net.named_parameters()}
    x = torch.randn(4, 3, device=device)
    weights = [other[f"layers.{i}.weight"] for i in range(2)]
    want = reference.fnn_forward(x, weights, [other[f"layers.{i}.bias"] for i in range(2)], net.activations)
    assert_close(torch.func.functional_call(net, other, (x,)), want, 1e-5, 1e-6, "functional_call")
    assert cats == [1, 1] and net._flat is flat and _views_of_own_flat(net)
    vec = torch.nn.utils.parameters_to_vector(net.parameters())
    torch.nn.utils.vector_to_parameters(vec * 2, net.parameters())
    _check_model(net, "vector_to_parameters")


def test_flatten_refuses_what_it_cannot_flatten(device, cats):
    """Meta parameters, a parametrized layer and tied weights are left as they are (the
    forward concatenates); to_empty() from meta flattens; tied weights keep their single
    gradient by autograd. A refusal drops the module's old flat buffer, which no parameter
    views any more (before, `to("meta")` kept the old parameters' memory alive, and
    flatten_parameters said True for a parametrized layer whose Parameters it never moved)."""
    meta = fnn.FNN([3, 4, 2], device="meta", fusion="network")
    assert meta._flat is None and not meta.flatten_parameters()
    meta.to_empty(device=device)
    assert _views_of_own_flat(meta)
    old = weakref.ref(meta._flat)
    meta.to("meta")
    gc.collect()
    assert meta._flat is None and old() is None, "to('meta') keeps no real memory alive"
    normed = _model([3, 5, 2], ["tanh", "sigmoid"], True, torch.float32, device, "network")
    torch.nn.utils.parametrizations.weight_norm(normed.layers[0])
    assert not normed.flatten_parameters() and normed._flat is None
    tied = _model([4, 4, 4], ["tanh", "sigmoid"], False, torch.float32, device, "network")
    tied.layers[1].weight = tied.layers[0].weight
    assert not tied.flatten_parameters() and not _views_of_own_flat(tied)
    ref = copy.deepcopy(tied)  # deepcopy keeps the tie (memo); the layer path as the reference
    ref.fusion = "layer"
    assert ref.layers[1].weight is ref.layers[0].weight
    x, y = torch.randn(5, 4, device=device), torch.rand(5, 4, device=device)
    for m in (tied, ref):
        m(x).square().sum().backward()
    assert_close(tied.layers[0].weight.grad, ref.layers[0].weight.grad, 1e-5, 1e-6, "tied weight's gradient")
    assert len(cats) == 1
    trainer = fnn.Trainer(tied, loss="mse", lr=0.1)
    trainer.step(x, y)  # cannot flatten: autograd and torch.optim.SGD
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt.zero_grad()
    torch.nn.functional.mse_loss(ref(x), y).backward()
    opt.step()
    assert_close(tied.layers[0].weight, ref.layers[0].weight, 1e-6, 1e-7, "tied weight trained")


def test_leading_dims_and_strided_input(device):
    net = _model([4, 12, 3], ["tanh", "sigmoid"], True, torch.float32, device, "network")
    base = torch.randn(5, 6, 8, device=device)
    x = base[..., ::2]  # (5, 6, 4), not contiguous
    dy = torch.randn(5, 6, 3, device=device)
    y_ref, g_ref = _reference(net, x.reshape(-1, 4), dy.reshape(-1, 3))
    y, g = _run(net, x, dy)
    assert y.shape == (5, 6, 3) and g[0].shape == (5, 6, 4)
    assert_close(y.reshape(-1, 3), y_ref, 1e-5, 1e-6, "y")
    assert_close(g[0].reshape(-1, 4), g_ref[0], 1e-5, 1e-6, "dx")


def test_fusion_argument():
    with pytest.raises(ValueError, match="<= 128"):
        fnn.FNN([2, 129, 1], fusion="network")
    with pytest.raises(ValueError, match="unknown fusion"):
        fnn.FNN([2, 3], fusion="fast")
    with pytest.raises(TypeError, match="fusion must be a string"):
        fnn.FNN([2, 3], fusion=1)
    assert fnn.FNN([2, 129, 1], fusion="auto").fusion == "auto"
    assert resolve_fusion("auto", [2, 129, 1], "cuda") == "layer"
    assert resolve_fusion("auto", [2, 128, 1], "cuda") == "network"
    assert resolve_fusion("auto", [2, 128, 1], "cpu") == "layer"
    assert resolve_fusion("layer", [2, 8, 1], "cuda") == "layer"
    assert resolve_fusion("network", [2, 8, 1], "cpu") == "network"


def test_bad_inputs_raise_before_launch(device, launches):
    net = _model([3, 5, 2], ["relu", "sigmoid"], True, torch.float32, device, "network")
    with pytest.raises(ValueError, match="width 3"):
        net(torch.randn(4, 2, device=device))
    with pytest.raises(TypeError, match="dtype"):
        net(torch.randn(4, 3, device=device, dtype=torch.float64))
    with pytest.raises(TypeError):
        net([[1.0, 2.0, 3.0]])
    assert launches.calls == []
    # The registered ops check what the launchers would, before any launch.
    flat = net._flat
    x = torch.randn(4, 3, device=device)
    op = torch.ops.fnn.network_forward
    args = ([3, 5, 2], ["relu", "sigmoid"], [True, True], False)
    with pytest.raises(ValueError, match="params must be flat"):
        op(x, flat[:-1], *args)
    with pytest.raises(ValueError, match="params must be flat"):
        op(x, flat.double(), *args)
    with pytest.raises(ValueError, match="params must be flat"):
        op(x, flat, [3, 5, 2], ["relu", "sigmoid"], [True, False], False)
    with pytest.raises(ValueError, match="one activation per layer"):
        op(x, flat, [3, 5, 2], ["relu"], [True, True], False)
    with pytest.raises(ValueError, match="bias flags"):
        op(x, flat, [3, 5, 2], ["relu", "sigmoid"], [True], False)
    with pytest.raises(ValueError, match="unknown activation"):
        op(x, flat, [3, 5, 2], ["relu", "softsign"], [True, True], False)
    with pytest.raises(ValueError, match="x must be 2-D"):
        op(x[:, :2], flat, *args)
    assert launches.calls == []
