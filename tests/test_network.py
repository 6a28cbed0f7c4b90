"""fusion="network": the whole network in one kernel per direction (kernels.network).

Every result is checked against fusion="layer" and against fnn.reference in float64 through
PyTorch's autograd; launches are counted by wrapping the jit kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import RTOL, assert_close, assert_close_lowp

import fnn
import kernels.linear_act
import kernels.network
from fnn import network_ops, reference
from fnn.network import ensure_packed, resolve_fusion

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
    """Wraps every `*_kernel` of kernels.network and kernels.linear_act to count launches."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for module in (kernels.network, kernels.linear_act):
            for name in dir(module):
                if name.endswith("_kernel"):
                    monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name: str, kernel):
        counter = self

        class Counted:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*args, **kwargs):
                    counter.calls.append(name)
                    return launch(*args, **kwargs)

                return run

        return Counted()


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> LaunchCounter:
    return LaunchCounter(monkeypatch)


def _model(sizes, acts, bias, dtype, device, fusion, seed=0):
    torch.manual_seed(seed)
    model = fnn.FNN(sizes, activation=acts, bias=bias, dtype=dtype, device=device, fusion=fusion)
    with torch.no_grad():  # weights large enough that every activation leaves its linear range
        for p in model.parameters():
            p.mul_(2)
    return model


def _reference(model, x, dy):
    """Output and gradients (x, then every parameter) by autograd on fnn.reference in float64."""
    xr = x.detach().double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in model.parameters()]
    it = iter(params)
    weights, biases = [], []
    for layer in model.layers:
        weights.append(next(it))
        biases.append(next(it) if layer.bias is not None else None)
    y = reference.fnn_forward(xr, weights, biases, model.activations)
    y.backward(dy.double())
    return y, [xr.grad, *(p.grad for p in params)]


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
    net = _model(sizes, acts, True, torch.float32, device, "network")
    pack = ensure_packed(net)
    meta = network_ops.meta(pack.sizes, acts, device)
    torch.manual_seed(3)
    x = torch.randn(1000, 5, device=device)
    dy = torch.randn(1000, 2, device=device)
    y, h = kernels.network.network_forward(x, pack.w, pack.b, meta, pack.sizes, True)
    runs = [
        network_backward(dy, y, h, x, pack.w, meta, pack.sizes, True, True, programs) for _ in range(2)
    ]
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), "two identical backwards differ"
    _, g_ref = _reference(net, x, dy)
    dx, dw, db = runs[0]
    got = [dx]
    for li, layer in enumerate(net.layers):
        o, i = layer.weight.shape
        got += [dw[li, :o, :i], db[li, :o]]
    for what, a, e in zip(_grad_names(net), got, g_ref, strict=True):
        assert_close(a, e, 1e-5, 1e-5 * e.abs().max().item(), f"G={programs} {what}")


def test_launch_counts(device, launches):
    net = _model([2, 32, 1], ["sigmoid", "sigmoid"], False, torch.float32, device, "network")
    x = torch.randn(100, 2, device=device, requires_grad=True)
    # Triton launches only: the packing (a cat and a take) and the gradient gather are torch ops.
    with torch.no_grad():
        net(x)
    assert launches.calls == ["network_fwd_kernel"]
    launches.calls.clear()
    y = net(x)
    assert launches.calls == ["network_fwd_kernel"]
    launches.calls.clear()
    y.sum().backward()
    assert launches.calls == ["network_bwd_kernel"]
    # A batch over one program: the backward adds the fixed-order reduction.
    launches.calls.clear()
    net(torch.randn(1000, 2, device=device)).sum().backward()
    assert launches.calls == ["network_fwd_kernel", "network_bwd_kernel", "network_reduce_kernel"]


# ---------------------------------------------------------------------------------------------
# Packing survives what users do to a model
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def packs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the packings (a gather of every parameter), by a forward or by ensure_packed."""
    calls: list[int] = []
    real = network_ops.pack_parameters
    counted = lambda *a: calls.append(1) or real(*a)  # noqa: E731
    monkeypatch.setattr(network_ops, "pack_parameters", counted)
    monkeypatch.setattr(fnn.network, "pack_parameters", counted)
    return calls


def _views_of(model, pack) -> bool:
    """Whether every parameter is its slice of `pack` (and the padding is zero)."""
    layers = model.layers
    if network_ops.find_pack([la.weight for la in layers], [la.bias for la in layers]) is not pack:
        return False
    pad = torch.ones_like(pack.w, dtype=torch.bool)
    for li, la in enumerate(layers):
        pad[li, : la.weight.shape[0], : la.weight.shape[1]] = False
    assert (pack.w[pad] == 0).all(), "padding of the packed weights is not zero"
    return True


def _plain(model) -> bool:
    return all(p.is_contiguous() and p.storage_offset() == 0 for p in model.parameters())


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


def test_parameters_stay_plain_and_forwards_change_nothing(device, packs):
    """An FNN's parameters are ordinary contiguous tensors; a forward and backward on the
    network path packs them once (the backward reuses the forward's pack) and changes none."""
    net = _net(device)
    ptrs = [p.data_ptr() for p in net.parameters()]
    assert _plain(net) and packs == []
    _check_model(net, "plain parameters")
    assert packs == [1], "one packing per forward, none in the backward"
    assert [p.data_ptr() for p in net.parameters()] == ptrs and _plain(net)
    assert all(p.grad.is_contiguous() for p in net.parameters())


def test_trainer_pack_is_read_without_copies(device, packs):
    """The Trainer's arrangement: parameters are views of a pack it keeps; forwards and
    backwards read it (no packing); an in-place change of a parameter is a change of the pack."""
    net = _net(device)
    params = list(net.parameters())
    pack = fnn.network.ensure_packed(net)
    assert _views_of(net, pack) and list(net.parameters()) == params and packs == [1]
    assert fnn.network.ensure_packed(net) is pack and packs == [1]
    with torch.no_grad():
        net.layers[1].bias.add_(1.0)
    assert torch.equal(pack.b[1, :2], net.layers[1].bias.detach())
    _check_model(net, "packed views")
    assert packs == [1], "a forward or backward packed parameters that are the pack's views"
    del pack  # nothing keeps the pack: the ops no longer find it, and pack for the call
    _check_model(net, "views of a dropped pack")
    assert packs == [1, 1]


@pytest.mark.parametrize("when", ["before", "after"])
def test_optimizers_built_before_or_after_packing(device, when):
    """A torch optimizer and the fused Trainer take turns on the same Parameter objects:
    built before the Trainer packs them or after, every update is seen by the other."""
    net, twin = _net(device), _net(device, fusion="layer")
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


def test_to_after_packing(device):
    net, twin = _net(device), _net(device, fusion="layer")
    x, y = torch.randn(9, 3, device=device), torch.rand(9, 2, device=device)
    _train_both(net, twin, x, y)
    params = list(net.parameters())
    for m in (net, twin):
        m.double()
    assert list(net.parameters()) == params, "to() keeps the Parameter objects"
    _check_model(net, "after double()")
    _train_both(net, twin, x.double(), y.double())
    _check_model(net, "trained after double()")


def test_load_state_dict_in_place_and_assign(device):
    src, net = _net(device, seed=1), _net(device, seed=2)
    x, y = torch.randn(9, 3, device=device), torch.rand(9, 2, device=device)
    trainer = fnn.Trainer(net, loss="mse", lr=0.5)
    trainer.step(x, y)
    pack = trainer._pack
    net.load_state_dict(src.state_dict())
    assert _views_of(net, pack), "an in-place load keeps the views"
    for p, q in zip(net.parameters(), src.parameters(), strict=True):
        assert torch.equal(p, q)
    _check_model(net, "load_state_dict")
    fresh = {k: v.clone() + 1 for k, v in src.state_dict().items()}
    net.load_state_dict(fresh, assign=True)
    for k, p in net.named_parameters():
        assert torch.equal(p, fresh[k]), k
    _check_model(net, "load_state_dict(assign=True)")
    trainer.step(x, y)
    assert _views_of(net, trainer._pack), "the next fused step packs the new tensors"
    # An FNN's state_dict loads into a layer-path FNN and back.
    layer = _net(device, fusion="layer", seed=3)
    layer.load_state_dict(net.state_dict())
    assert torch.equal(layer(x), net(x))


def test_deepcopy_and_save_load_whole_model(device, tmp_path):
    net = _net(device)
    x, y = torch.randn(9, 3, device=device), torch.rand(9, 2, device=device)
    fnn.Trainer(net, loss="mse", lr=0.5).step(x, y)  # net's parameters are now a pack's views
    twin = copy.deepcopy(net)
    assert _plain(twin), "deepcopy gives plain parameters"
    before = [p.detach().clone() for p in net.parameters()]
    fnn.Trainer(twin, loss="mse", lr=1.0).step(x, y)
    for p, q, r in zip(net.parameters(), before, twin.parameters(), strict=True):
        assert torch.equal(p, q), "training the copy changed the original"
        assert not torch.equal(p, r)
    _check_model(twin, "deepcopy")
    torch.save(net, tmp_path / "net.pt")
    loaded = torch.load(tmp_path / "net.pt", weights_only=False)
    assert torch.equal(loaded(x), net(x))
    _check_model(loaded, "torch.load")


def test_unpack_parameters_after_trainer_steps(device):
    net = _net(device)
    x, y = torch.randn(9, 3, device=device), torch.rand(9, 2, device=device)
    trainer = fnn.Trainer(net, loss="mse", lr=0.5)
    trainer.step(x, y)
    params, values = list(net.parameters()), [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError):
        torch.nn.utils.parameters_to_vector(net.parameters())  # views of the pack: not contiguous
    fnn.network.unpack_parameters(net)
    assert _plain(net) and list(net.parameters()) == params
    for p, v in zip(net.parameters(), values, strict=True):
        assert torch.equal(p, v)
    torch.nn.utils.parameters_to_vector(net.parameters())
    trainer.step(x, y)
    assert _views_of(net, trainer._pack)
    _check_model(net, "unpacked, then packed again")


def test_parameters_replaced_or_substituted(device):
    """A replaced parameter, torch.func.functional_call, vector_to_parameters and
    parameters_to_vector: every one sees the parameters as they are."""
    net = _net(device)
    with torch.no_grad():
        net.layers[1].weight = torch.nn.Parameter(torch.randn(2, 10, device=device))
    _check_model(net, "replaced weight")
    other = {k: v.detach() * 0.5 for k, v in net.named_parameters()}
    x = torch.randn(4, 3, device=device)
    weights = [other[f"layers.{i}.weight"] for i in range(2)]
    want = reference.fnn_forward(x, weights, [other[f"layers.{i}.bias"] for i in range(2)], net.activations)
    assert_close(torch.func.functional_call(net, other, (x,)), want, 1e-5, 1e-6, "functional_call")
    vec = torch.nn.utils.parameters_to_vector(net.parameters())
    torch.nn.utils.vector_to_parameters(vec * 2, net.parameters())
    _check_model(net, "vector_to_parameters")


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
    # The registered ops check what packing hides from the launchers.
    pack = network_ops.pack_parameters([la.weight for la in net.layers], [la.bias for la in net.layers])
    x = torch.randn(4, 3, device=device)
    op = torch.ops.fnn.network_forward
    with pytest.raises(ValueError, match="w_pack must be"):
        op(x, pack.w[:1], pack.b, [3, 5, 2], ["relu", "sigmoid"], False)
    with pytest.raises(ValueError, match="one activation per layer"):
        op(x, pack.w, pack.b, [3, 5, 2], ["relu"], False)
    with pytest.raises(ValueError, match="unknown activation"):
        op(x, pack.w, pack.b, [3, 5, 2], ["relu", "softsign"], False)
    with pytest.raises(ValueError, match="x must be 2-D"):
        op(x[:, :2], pack.w, pack.b, [3, 5, 2], ["relu", "sigmoid"], False)
    with pytest.raises(ValueError, match="b_pack must be"):
        op(x, pack.w, pack.b.double(), [3, 5, 2], ["relu", "sigmoid"], False)
    assert launches.calls == []
