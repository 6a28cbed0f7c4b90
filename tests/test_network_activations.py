"""The whole-network path with every activation: leaky_relu, elu and softplus (parameters as
runtime values beside the activation codes) and the Z-saving ones (gelu, gelu_tanh, silu,
and the parameter values of the others that save Z), through FNN(fusion="network"), the
network ops and the fused Trainer.

As tests/test_network.py does for identity, sigmoid, relu and tanh: network == layer path ==
float64 autograd (fnn.reference) for the output and every gradient, every dtype, odd shapes,
the two-launch backward (G > 1), both forms of the train step's forward products (h from
registers, and streamed back from memory), NaN and inf as PyTorch, the train step against
torch.optim.SGD with momentum; and what the forward saves.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import RTOL, assert_close, assert_close_lowp
from test_activations import NEW_ACTS, NEW_IDS, _same, _saved_by
from test_linear_act import _assert_same_specials
from test_network import LaunchCounter, _model, _reference, away_from_kink

import fnn
import kernels.network
from fnn import network_ops, reference
from kernels.checks import ACTIVATION_VARIANTS, Activation, as_activation

A = Activation


# IEEE float32 matmuls in every test (conftest).
pytestmark = pytest.mark.usefixtures("fp32_matmul_precision")


def _products(form: str, monkeypatch) -> None:
    """The train-mode forward's products: h streamed back from X and H in CHUNK_K columns
    ("scratch", STREAM_FWD, what the table gives float32 and float64) or kept in registers
    ("registers", what it gives float16 and bfloat16). Gradient mode reads H either way."""
    real = kernels.network.network_config

    def config(kind, m, p, dtype):
        cfg = real(kind, m, p, dtype)
        return replace(cfg, stream_fwd=form == "scratch") if kind == "bwd" else cfg

    monkeypatch.setattr(kernels.network, "network_config", config)
    # the launch plans made from the configs are cached per shape: a fresh cache for the test
    monkeypatch.setattr(kernels.network, "_PLANS", {})


def _params(model):
    it = iter(model.parameters())
    weights, biases = [], []
    for layer in model.layers:
        weights.append(next(it))
        biases.append(next(it) if layer.bias is not None else None)
    return weights, biases


def _run(model, x, dy):
    x = x.detach().clone().requires_grad_()
    for p in model.parameters():
        p.grad = None
    y = model(x)
    y.backward(dy)
    return y, [x.grad, *(p.grad for p in model.parameters())]


def _all(result):
    """[y, dx, every parameter's gradient] from (y, [dx, ...])."""
    return [result[0], *result[1]]


def _names(model):
    return ["y", "dx", *(f"d{name}" for name, _ in model.named_parameters())]


# (sizes, activations, bias, batch, dtype): every activation variant of tests/test_activations
# (defaults, and parameters that save Z where the default saves Y) as a hidden and as an
# output layer, depths 1..4, widths 1..128 (P = 16..128), batches 0, 1, 7, 100, 1000 (1000:
# the backward in several programs and the reduction), every dtype.
CASES = [
    ([1, 1], ["gelu"], True, 7, torch.float32),
    ([3, 1], [A("softplus", beta=2.0, threshold=1.0)], False, 0, torch.float32),
    ([2, 32, 1], ["silu", "gelu_tanh"], False, 100, torch.float64),
    ([5, 17, 3], ["leaky_relu", A("elu", alpha=-0.5)], True, 1, torch.float32),
    ([16, 128, 9, 2], [A("leaky_relu", negative_slope=-0.3), "gelu", "elu"], True, 100, torch.float32),
    ([7, 64, 65, 127, 1], ["softplus", "silu", "identity", "gelu_tanh"], False, 7, torch.float32),
    ([4, 20, 20, 2], ["gelu", A("softplus", beta=-2.0, threshold=1.5), "silu"], True, 1000, torch.float32),
    ([9, 33, 6], ["elu", "softplus"], True, 100, torch.float16),
    ([6, 40, 17, 3], ["gelu", "silu", A("elu", alpha=-0.5)], True, 100, torch.bfloat16),
    ([6, 12, 3], [A("softplus", beta=8.0, threshold=17.0), "gelu_tanh"], True, 7, torch.float64),
]


def _case_id(case) -> str:
    sizes, acts, _, batch, dtype = case
    names = "-".join(a if isinstance(a, str) else f"{a.name}{list(a.values)}" for a in acts)
    return f"{'x'.join(map(str, sizes))}-{names}-m{batch}-{str(dtype).split('.')[-1]}"


def test_cases_cover_every_activation_variant():
    hidden, output = set(), set()
    for _, acts, *_ in CASES:
        hidden |= {as_activation(a) for a in acts[:-1]}
        output.add(as_activation(acts[-1]))
    for a in NEW_ACTS:
        assert as_activation(a) in hidden | output, a
    assert {a.saves for a in hidden} == {"y", "z", "none"} and {a.saves for a in output} == {"y", "z"}
    assert {c[4] for c in CASES} == {torch.float32, torch.float64, torch.float16, torch.bfloat16}


@pytest.mark.parametrize("sizes,acts,bias,batch,dtype", CASES, ids=[_case_id(c) for c in CASES])
def test_network_matches_layer_and_reference(device, sizes, acts, bias, batch, dtype):
    net = _model(sizes, acts, bias, dtype, device)
    layer = copy.deepcopy(net)
    layer.fusion = "layer"
    torch.manual_seed(1)
    x = torch.randn(batch, sizes[0], device=device).to(dtype)
    dy = torch.randn(batch, sizes[-1], device=device).to(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dy = away_from_kink(net, x, dy)
    want = _all(_reference(net, x, dy, torch.float64))
    got = _all(_run(net, x, dy))
    lay = _all(_run(layer, x, dy))
    names = _names(net)
    if dtype in (torch.float16, torch.bfloat16):
        # Half precision: at most twice PyTorch's own error in the same dtype.
        low = _all(_reference(net, x, dy, dtype))
        for path, out in (("network", got), ("layer", lay)):  # the same rule holds for both paths
            for what, g, lo, w in zip(names, out, low, want, strict=True):
                assert g.dtype == dtype, what
                assert_close_lowp(g, lo, w, f"{path} {dtype} {what}")
        return
    rtol = RTOL[dtype]
    # Errors relative to each tensor's scale: cancellation in long sums makes single small
    # elements meaningless at float32 precision.
    for what, g, w, la in zip(names, got, want, lay, strict=True):
        scale = w.abs().max().item() if w.numel() else 0.0
        assert g.dtype == dtype, what
        assert_close(g, w, rtol, rtol * scale, f"network {what}")
        assert_close(g, la, rtol, rtol * scale, f"network vs layer {what}")


@pytest.mark.parametrize("form", ["scratch", "registers"])
def test_backward_programs_with_z_saving_layers(device, form, monkeypatch):
    """The launchers directly: H holds Z for the Z-saving hidden layers, z_out Z_L for a
    Z-saving output layer; the backward split over 3 programs (two launches) equals the
    reference, bit for bit the same in two runs."""
    from kernels.network import network_backward, network_forward

    _products(form, monkeypatch)
    programs = 3
    sizes = [5, 24, 19, 3]
    acts = ["silu", A("leaky_relu", negative_slope=-0.2), "gelu_tanh"]
    biased = (True, True, True)
    net = _model(sizes, acts, True, torch.float32, device)
    meta = network_ops.meta(sizes, acts, biased, device)
    ap = network_ops.activation_params(acts, torch.float32, device)
    torch.manual_seed(3)
    x = torch.randn(300, 5, device=device)
    dy = torch.randn(300, 3, device=device)
    z_out = torch.empty(300, 3, device=device)
    y, h = network_forward(x, net._flat, meta, sizes, biased, True, ap, z_out)
    args = (dy, z_out, h, x, net._flat, meta, sizes, biased, True, ap, programs)
    runs = [network_backward(*args) for _ in range(2)]
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), "two identical backwards differ"
    want_y, want = _reference(net, x, dy, torch.float64)
    assert_close(y, want_y, 1e-5, 1e-5 * want_y.abs().max().item(), "y")
    dx, grads = runs[0]
    dws, dbs = network_ops.unflatten(grads, sizes, biased)
    got = [dx, *(t for pair in zip(dws, dbs, strict=True) for t in pair)]
    for what, a, e in zip(_names(net)[1:], got, want, strict=True):
        assert_close(a, e, 1e-5, 1e-5 * e.abs().max().item(), f"G={programs} {form} {what}")


def test_saved_tensors(device):
    """What the network path saves: X, and per layer one tensor, the same kind as on the layer
    path (fnn.Activation.saves): in H (P columns) a hidden layer's output, or its Z; for the
    output layer Y, or Z_L where it saves Z, or nothing for identity. So a network of
    Z-saving activations saves as many bytes as a sigmoid network of the same widths; the
    parameters are saved as views of the flat buffer (no copy)."""
    sizes, m = [7, 32, 16, 3], 50
    p = 32
    x = torch.randn(m, 7, device=device)
    counts = {}
    for acts in (
        ["sigmoid"] * 3,
        ["gelu", A("leaky_relu", negative_slope=-0.5), "silu"],
        ["gelu", "identity", A("softplus", threshold=5.0)],
        ["silu", "elu", "identity"],
    ):
        model = _model(sizes, acts, True, torch.float32, device, seed=4)
        y, saved = _saved_by(lambda m_=model: m_(x))
        flat = model._flat
        lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
        own = [t for t in saved if not (lo <= t.data_ptr() < hi)]  # not the parameters (views of flat)
        counts[tuple(map(str, acts))] = sum(t.numel() for t in own)
        # The tensors themselves: X, S_L (unless identity), H with each hidden layer's S_l.
        h = x
        zs, outs = [], []
        for layer, act in zip(model.layers, acts, strict=True):
            z = F.linear(h, layer.weight, layer.bias)
            h = reference.apply_activation(z, act)
            zs.append(z)
            outs.append(h)
        assert _same(y, h)
        want = [x]
        last = as_activation(acts[-1]).saves
        if last != "none":
            want.append(zs[-1] if last == "z" else outs[-1])
        hid = [t for t in own if t.dim() == 3]
        assert len(hid) == 1 and hid[0].shape == (2, m, p), [tuple(t.shape) for t in own]
        assert len(own) == len(want) + 1, f"{acts}: saved {[tuple(t.shape) for t in own]}"
        for t in want:
            assert any(_same(s, t) for s in own), f"{acts}: {tuple(t.shape)} not saved"
        for li, act in enumerate(acts[:-1]):
            kind = as_activation(act).saves
            expect = zs[li] if kind == "z" else outs[li]
            assert _same(hid[0][li, :, : sizes[li + 1]], expect), f"{acts}: slot {li} is not its {kind}"
            assert not hid[0][li, :, sizes[li + 1] :].any(), "padding is zero"
            if kind == "z":
                assert not _same(zs[li], outs[li]), "the test cannot tell Z from the output"
    base = m * 7 + 2 * m * p
    assert counts[("sigmoid",) * 3] == base + m * 3
    assert counts[("gelu", str(A("leaky_relu", negative_slope=-0.5)), "silu")] == base + m * 3
    assert counts[("gelu", "identity", str(A("softplus", threshold=5.0)))] == base + m * 3
    assert counts[("silu", "elu", "identity")] == base


@pytest.mark.parametrize("route", ["direct", "registered op"])
def test_z_is_kept_only_when_a_gradient_is_needed(device, route, monkeypatch):
    """Inference stores neither H nor Z_L; an output activation that saves Y leaves z empty
    (the registered op) or None (the launcher called directly, fnn.dispatch)."""
    if route == "registered op":  # as under a dispatch mode: the route torch.compile takes
        monkeypatch.setattr(fnn.dispatch, "_dispatch_modes", lambda: 1)
    empty = (lambda t, shape: t is None) if route == "direct" else (lambda t, shape: t.shape == shape)
    sizes, acts, biased = [3, 8, 2], ["gelu", "silu"], [True, True]
    model = _model(sizes, acts, True, torch.float32, device)
    x = torch.randn(5, 3, device=device)
    y, h, z = network_ops.network_forward(x, model._flat, sizes, acts, biased, False)
    assert empty(h, (0, 0, 16)) and empty(z, (0, 2))
    y2, h, z = network_ops.network_forward(x, model._flat, sizes, acts, biased, True)
    assert torch.equal(y, y2) and h.shape == (1, 5, 16) and z.shape == (5, 2)
    want_z = F.linear(reference.apply_activation(F.linear(x, *_lin(model, 0)), "gelu"), *_lin(model, 1))
    assert_close(z, want_z, 1e-5, 1e-6, "Z_L")
    _, _, z = network_ops.network_forward(x, model._flat, sizes, ["gelu", "tanh"], biased, True)
    assert empty(z, (0, 2))


def _lin(model, i):
    return model.layers[i].weight, model.layers[i].bias


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("act", NEW_ACTS, ids=NEW_IDS)
def test_nan_inf_like_pytorch(act, device):
    """NaN and inf in the input and the weights give PyTorch's NaN and inf in the output and
    every gradient of a two-layer network (float32; the expectation is float64 autograd, which
    sidesteps PyTorch CPU's float32 gelu(+inf) quirk, and spells out elu's rule at NaN as
    tests/test_activations.py does)."""
    g = torch.Generator().manual_seed(131)
    model = _model([6, 5, 4], [act, act], True, torch.float32, device)
    with torch.no_grad():
        model.layers[0].weight[2, 4] = float("inf")
        model.layers[1].bias[3] = float("nan")
    x = torch.randn(9, 6, generator=g).to(device)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    x[4, 5] = -float("inf")
    dy = torch.randn(9, 4, generator=g).to(device)
    got = _run(model, x, dy)
    a = as_activation(act)

    def elu_rule(z, _act):
        return torch.where(z <= 0, a.alpha * torch.expm1(z.clamp(max=0)), z)

    apply = elu_rule if a.name == "elu" else reference.apply_activation
    xr = x.double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in model.parameters()]
    h = xr
    for i in range(2):
        h = apply(F.linear(h, params[2 * i], params[2 * i + 1]), act)
    h.backward(dy.double())
    want = [h, xr.grad, *(p.grad for p in params)]
    for what, o, e in zip(_names(model), [got[0], *got[1]], want, strict=True):
        _assert_same_specials(o, e.float(), f"{act} {what}")
    specials = [t for t in [got[0], *got[1]]]
    assert any(t.isnan().any() for t in specials) and any(t.isinf().any() for t in specials), (
        "the test lost its specials"
    )


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_inf_in_the_backward_stays_inf(dtype, device):
    """An inf reaching the backward (in dY, or a float16 delta that overflows) gives PyTorch's
    inf, not NaN, through layers narrower than the padded tile: padded units of D are zero,
    as the forward's are (before, inf times a padded weight's zero made NaN, which the next
    layer's product spread to every real unit of the row)."""
    model = _model([3, 5, 4, 2], ["tanh", "identity", "identity"], True, dtype, device)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5 if dtype == torch.float32 else 2.0)  # float16: D_l W_l overflows
    x = torch.full((4, 3), 0.25, dtype=dtype, device=device)
    dy = torch.ones(4, 2, dtype=dtype, device=device)
    dy[0, 0] = float("inf") if dtype == torch.float32 else 60000.0
    got = _run(model, x, dy)
    layer = copy.deepcopy(model)
    layer.fusion = "layer"
    want = _run(layer, x, dy)
    xr = x.double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in model.parameters()]
    h = xr
    for i, act in enumerate(model.activations):
        h = reference.apply_activation(F.linear(h, params[2 * i], params[2 * i + 1]), act)
    h.backward(dy.double())
    for what, o, lay, e in zip(_names(model), _all(got), _all(want), [h, xr.grad, *(p.grad for p in params)],
                               strict=True):  # fmt: skip
        same = torch.equal(o.isnan(), lay.isnan()) and torch.equal(o.isinf(), lay.isinf())
        assert same, f"{what}: NaN or inf where the layer path has none"
        if dtype == torch.float32:
            _assert_same_specials(o, e.float(), what)
    assert got[1][0].isinf().any() and not any(t.isnan().any() for t in _all(got)), "no inf reached dX"


@pytest.mark.parametrize(
    "acts,loss,batch,form",
    [
        (["gelu", A("softplus", beta=2.0, threshold=1.0)], "mse", 37, "scratch"),
        (["gelu", A("softplus", beta=2.0, threshold=1.0)], "mse", 37, "registers"),
        (["silu", A("leaky_relu", negative_slope=-0.1), "gelu_tanh"], "sse", 520, "scratch"),
        ([A("elu", alpha=-0.5), "leaky_relu", "sigmoid"], "bce", 37, "registers"),
        # Heavy output layers that save Y: their delta reads Y back from the H scratch's last
        # slot, which the step's forward left unwritten before (wrong steps, NaN for softplus).
        (["tanh", "elu"], "mse", 37, "scratch"),
        (["gelu", "softplus"], "sse", 520, "registers"),
    ],
    ids=["gelu-softplus_z-mse", "gelu-softplus_z-mse-registers", "silu-leaky_neg-gelu_tanh-sse-G>1",
         "elu_neg-leaky-sigmoid-bce-registers", "tanh-elu-mse",
         "gelu-softplus-sse-G>1-registers"],  # fmt: skip
)
def test_train_step_equals_torch_sgd(device, acts, loss, batch, form, launches, monkeypatch):
    """Three fused steps (one kernel launch each, or two for 520 rows: several programs and
    the reduction) equal autograd on an nn.Sequential of torch's modules followed by
    torch.optim.SGD with momentum."""
    _products(form, monkeypatch)
    nn = torch.nn
    sizes = [3, 16, 12, 2][: len(acts) + 1]
    model = _model(sizes, acts, True, torch.float32, device)
    modules = []
    for layer, act in zip(model.layers, acts, strict=True):
        lin = nn.Linear(layer.in_features, layer.out_features, device=device)
        with torch.no_grad():
            lin.weight.copy_(layer.weight)
            lin.bias.copy_(layer.bias)
        modules += [lin, _torch_module(as_activation(act))]
    seq = nn.Sequential(*modules)
    torch.manual_seed(5)
    x = torch.randn(batch, sizes[0], device=device)
    y = torch.randint(0, 2, (batch, sizes[-1]), device=device).float() if loss == "bce" else torch.randn(
        batch, sizes[-1], device=device
    )
    trainer = fnn.Trainer(model, loss=loss, lr=0.05, momentum=0.9)
    assert trainer.fused(device)
    opt = torch.optim.SGD(seq.parameters(), lr=0.05, momentum=0.9)
    losses = {
        "bce": F.binary_cross_entropy,
        "mse": F.mse_loss,
        "sse": lambda a, b: 0.5 * ((a - b) ** 2).sum(),
    }
    for step in range(3):
        launches.calls.clear()
        got = trainer.step(x, y)
        assert launches.calls == ["network_bwd_kernel"] + (["network_reduce_kernel"] if batch > 512 else [])
        opt.zero_grad()
        want = losses[loss](seq(x), y)
        want.backward()
        opt.step()
        assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()), f"step {step} loss"
        for i, layer in enumerate(model.layers):
            for name in ("weight", "bias"):
                p, q = getattr(layer, name), getattr(seq[2 * i], name)
                scale = q.abs().max().item()
                assert_close(p, q, 1e-5, 1e-5 * scale + 1e-7, f"step {step} layer {i} {name}")


def _torch_module(act: Activation) -> torch.nn.Module:
    nn = torch.nn
    n = act.name
    if n == "leaky_relu":
        return nn.LeakyReLU(act.negative_slope)
    if n == "elu":
        return nn.ELU(act.alpha)
    if n == "softplus":
        return nn.Softplus(act.beta, act.threshold)
    return {
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "silu": nn.SiLU,
    }[n]()


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> LaunchCounter:
    return LaunchCounter(monkeypatch)


def test_every_path_serves_every_activation(device, launches, monkeypatch):
    """fusion="network", "auto" where it picks the network kernels, and the fused Trainer
    take every activation variant: no refusal, no per-layer fallback."""
    acts = list(ACTIVATION_VARIANTS) + [A("leaky_relu", negative_slope=-0.3)]
    sizes = [3] + [4] * len(acts)
    model = _model(sizes, acts, True, torch.float32, device)
    x = torch.randn(5, 3, device=device)
    model(x).sum().backward()
    assert launches.calls == ["network_fwd_kernel", "network_bwd_kernel"], launches.calls
    auto = _model(sizes, acts, True, torch.float32, device, fusion="auto")
    monkeypatch.setattr(fnn.modules, "resolve_fusion", lambda *a: "network")
    monkeypatch.setattr(fnn.trainer, "resolve_fusion", lambda *a: "network")
    launches.calls.clear()
    y = auto(x)
    assert launches.calls == ["network_fwd_kernel"]
    weights, biases = _params(auto)
    want = reference.fnn_forward(x.double(), [w.double() for w in weights], [b.double() for b in biases],
                                 auto.activations)  # fmt: skip
    assert_close(y, want, 1e-5, 1e-5 * want.abs().max().item(), "auto, every activation")
    trainer = fnn.Trainer(auto, loss="mse")
    assert trainer.fused(x.device)
    launches.calls.clear()
    trainer.step(x, torch.zeros(5, 4, device=device))
    assert launches.calls == ["network_bwd_kernel"]


def test_bad_activation_parameters_raise_before_launch(device, launches):
    model = _model([3, 4, 2], ["gelu", "elu"], True, torch.float32, device)
    x = torch.randn(4, 3, device=device)
    op = torch.ops.fnn.network_forward
    sizes, biased = [3, 4, 2], [True, True]
    with pytest.raises(ValueError, match="act_params must hold the 1 parameter"):
        op(x, model._flat, sizes, ["gelu", "elu"], biased, False, [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        op(x, model._flat, sizes, ["gelu", "elu"], biased, False, [float("nan")])
    with pytest.raises(ValueError, match="unknown activation"):
        op(x, model._flat, sizes, ["mish", "elu"], biased, False, [])
    from kernels.network import network_forward

    meta = network_ops.meta(sizes, ["gelu", "elu"], biased, device)
    with pytest.raises(TypeError, match="act_params"):
        network_forward(x, model._flat, meta, sizes, biased, False, torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="act_params"):
        network_forward(x, model._flat, meta, sizes, biased, False, torch.zeros(2, 3))
    assert launches.calls == []


def test_parameters_and_codes_are_cached_runtime_values(device):
    """One (L, 2) parameter tensor per (activations, dtype, device), made once; the kernels
    take codes and parameters as runtime values (no constexpr for either)."""
    acts = [A("elu", alpha=0.3), "gelu", A("softplus", beta=2.0, threshold=5.0)]
    t = network_ops.activation_params(acts, torch.float16, device)
    assert t is network_ops.activation_params(list(acts), torch.float16, device)
    assert t.dtype == torch.float32 and t.shape == (3, 2)
    assert torch.equal(t, torch.tensor([[0.3, 0.0], [0.0, 0.0], [2.0, 5.0]], device=device))
    assert network_ops.activation_params(acts, torch.float64, device).dtype == torch.float64
    m = network_ops.meta([2, 3, 3, 1], acts, [True] * 3, device)
    assert m[4:7].tolist() == [as_activation(a).code for a in acts]
    for kernel in (kernels.network.network_fwd_kernel, kernels.network.network_bwd_kernel):
        fn = getattr(kernel, "fn", kernel)
        ann = fn.__annotations__
        assert "act_ptr" in fn.__code__.co_varnames and "constexpr" not in str(ann.get("act_ptr", ""))
        assert not any("ACTIVATION" in name for name in ann), ann
