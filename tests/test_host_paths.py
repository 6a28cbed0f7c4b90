"""The host fast paths (issue 9): what they skip must not change a result.

fnn's eager calls take fast paths: the launchers directly instead of the registered ops
(fnn.dispatch), an FNN's cached call plan (fnn.plan), one cheap check at the public entry,
inference without the autograd Function, the Trainer's planned step, launches keyed by the
caller (kernels.launch `keyed`). Each is compared here with the full path it shortcuts,
bit for bit, in the interpreter; a compile-only subprocess (kernels compiled for sm_90a and
sm_80, launches recorded, bench.fakecuda) checks that every launch of the public API picks
the specialization Triton's own path picks, whatever the dtype, layout, alignment or target.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import run_script
from test_cuda_graphs import NoHostSync

import fnn
import fnn.dispatch
import fnn.functional
from fnn.plan import plan

ROOT = Path(__file__).resolve().parents[1]


def _randn(shape, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


@pytest.fixture
def registered_ops(monkeypatch):
    """Every fnn call through the registered `torch.ops.fnn.*`, as under torch.compile or a
    dispatch mode (the full path), instead of the launchers directly."""
    monkeypatch.setattr(fnn.dispatch, "_dispatch_modes", lambda: 1)
    assert fnn.dispatch.use_registered_ops()


def _grads(run, tensors, dy):
    out = run()
    grads = torch.autograd.grad(out, [t for t in tensors if t.requires_grad], dy)
    return [out.detach(), *grads]


def _same(a, b, what):
    assert len(a) == len(b), what
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        assert u.shape == v.shape and u.dtype == v.dtype, (what, i)
        assert torch.equal(u, v), f"{what}: result {i} differs between the fast and the full path"


# ---------------------------------------------------------------------------------------------
# Fast path == full path, bit for bit (interpreter)
# ---------------------------------------------------------------------------------------------

LINEAR_CASES = [
    # (x shape, out features, bias, activation, dtype, x requires grad)
    ((37, 19), 23, True, "sigmoid", torch.float32, True),
    ((3, 5, 7), 4, False, "tanh", torch.float64, True),
    ((9, 16), 1, True, fnn.Activation("leaky_relu", negative_slope=-0.2), torch.float32, False),
    ((6, 8), 5, True, "gelu", torch.bfloat16, True),
    ((8,), 3, False, "relu", torch.float16, True),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{c[0]}-{c[4]}".replace("torch.", ""))
def test_linear_act_fast_and_full_paths_agree(case, device, monkeypatch):
    """fnn.linear_act forward and every gradient: launchers directly == registered ops; the
    inference path (no Function) == the Function's forward."""
    shape, n, bias, act, dtype, x_grad = case
    x = _randn(shape, 1, dtype, device).requires_grad_(x_grad)
    w = _randn((n, shape[-1]), 2, dtype, device).requires_grad_()
    b = _randn((n,), 3, dtype, device).requires_grad_() if bias else None
    dy = _randn((*shape[:-1], n), 4, dtype, device)
    tensors = [t for t in (x, w, b) if t is not None]
    fast = _grads(lambda: fnn.linear_act(x, w, b, act), tensors, dy)
    with torch.no_grad():
        inference = fnn.linear_act(x, w, b, act)
    with monkeypatch.context() as m:
        m.setattr(fnn.dispatch, "_dispatch_modes", lambda: 1)
        full = _grads(lambda: fnn.linear_act(x, w, b, act), tensors, dy)
        with torch.no_grad():
            full_inference = fnn.linear_act(x, w, b, act)
    _same(fast, full, f"linear_act {case}")
    _same([inference, full_inference], [fast[0], fast[0]], f"linear_act inference {case}")


NETS = [
    ([2, 32, 1], "sigmoid", False),
    ([5, 17, 9, 3], ["relu", "tanh", "identity"], True),
    ([4, 8, 6], ["silu", "gelu"], True),  # heavy activations (the kernels' scratch), Z saved
    ([3, 8, 8, 2], [fnn.Activation("leaky_relu", negative_slope=-0.5), "elu", "softplus"], True),
]


@pytest.mark.parametrize("fusion", ["layer", "network", "auto"])
@pytest.mark.parametrize("net", NETS, ids=["seed000", "deep-bias", "silu-gelu", "parameters"])
def test_fnn_plan_and_traced_paths_agree(net, fusion, device, monkeypatch):
    """FNN forward and gradients: the cached plan with the launchers directly == the plain
    attribute reads with the registered ops (the path torch.compile traces), and inference
    (no Function) == the Function's forward."""
    sizes, acts, bias = net
    torch.manual_seed(0)
    model = fnn.FNN(sizes, activation=acts, bias=bias, device=device, fusion=fusion)
    params = list(model.parameters())
    x = _randn((13, sizes[0]), 5, device=device).requires_grad_()
    dy = _randn((13, sizes[-1]), 6, device=device)
    fast = _grads(lambda: model(x), [x, *params], dy)
    with torch.no_grad():
        inference = model(x)
    with monkeypatch.context() as m:
        m.setattr(fnn.dispatch, "_dispatch_modes", lambda: 1)
        full = _grads(lambda: model._traced_forward(x), [x, *params], dy)
    _same(fast, full, f"FNN {sizes} {fusion}")
    _same([inference], [fast[0]], f"FNN {sizes} {fusion} inference")


# fusion -> (sizes, activations, the eager Function's backward node, the full path's)
EAGER_FUNCTIONS = {
    "network": ([4, 8, 6, 3], ["tanh", "relu", "gelu"], "_EagerNetworkBackward", "_PlannedNetworkBackward"),
    "layer": ([4, 8, 6, 5, 3], ["tanh", "identity", "relu", "gelu"], "_EagerLayersBackward",
              "FNNFunctionBackward"),
}


@pytest.mark.parametrize("route", ["plain", "dispatch_mode", "partial"])
@pytest.mark.parametrize("fusion", ["network", "layer"])
def test_eager_functions_routes_agree(fusion, route, device, monkeypatch):
    """The eager Functions == the full path bit for bit: the network path's (fnn.network.
    _EagerNetwork: forward and backward call the launchers straight from the plan) and the
    layer path's launch program (fnn.programs, applied by fnn.functional._EagerLayers). A 3-D
    input, a heavy Z-saving output layer (its D formed first; an identity hidden layer on the
    layer path), some gradients only, and a backward that is not plain eager: under a dispatch
    mode it hands over to the full Function's backward (the registered ops). (create_graph
    takes the differentiable backward: tests/test_double_backward.py.)"""
    sizes, acts, eager_node, full_node = EAGER_FUNCTIONS[fusion]
    torch.manual_seed(0)
    model = fnn.FNN(sizes, activation=acts, device=device, fusion=fusion)
    if route == "partial":  # neither x nor layer 1's parameters need a gradient
        model.layers[1].weight.requires_grad_(False)
        model.layers[1].bias.requires_grad_(False)
    params = list(model.parameters())
    x = _randn((2, 5, 4), 8, device=device).requires_grad_(route != "partial")
    dy = _randn((2, 5, 3), 9, device=device)
    inputs = [t for t in (x, *params) if t.requires_grad]
    out = model(x)
    assert type(out.grad_fn).__name__ == eager_node
    if route == "dispatch_mode":
        with monkeypatch.context() as m:
            m.setattr(fnn.dispatch, "_dispatch_modes", lambda: 1)
            other = torch.autograd.grad(out, inputs, dy)
    else:
        other = torch.autograd.grad(out, inputs, dy)
    with monkeypatch.context() as m:
        m.setattr(fnn.dispatch, "_dispatch_modes", lambda: 1)
        full_out = model._traced_forward(x)
        assert type(full_out.grad_fn).__name__ == full_node
        full = torch.autograd.grad(full_out, inputs, dy)
    _same([out.detach(), *other], [full_out.detach(), *full], f"eager {fusion} Function, {route}")


def test_layer_program_takes_its_own_program(device, monkeypatch):
    """A call that differs in anything that decides a launch gets its own program, never a
    stale one: another batch, x's layout, the dtype, a parameter re-laid out, the float32
    matmul precision (also between forward and backward), no gradient, dY's layout. Each call
    == the full path bit for bit; a parameter of another dtype still raises the full path's
    error; an empty batch and a dispatch mode take the full path."""
    torch.manual_seed(0)
    model = fnn.FNN([5, 7, 3], activation=["relu", "sigmoid"], device=device, fusion="layer")
    p = plan(model)

    def check(x, what, dy=None, precision=None):
        params = [t for t in model.parameters() if t.requires_grad]
        dy = _randn((x.shape[0], 3), 11, x.dtype, device) if dy is None else dy
        out = model(x)
        with monkeypatch.context() as m:
            m.setattr(fnn.dispatch, "_dispatch_modes", lambda: 1)
            full_out = model._traced_forward(x)
        start = torch.get_float32_matmul_precision()
        if precision is not None:  # the backwards at another precision than the forwards
            torch.set_float32_matmul_precision(precision)
        try:
            grads = torch.autograd.grad(out, params, dy)
            with monkeypatch.context() as m:
                m.setattr(fnn.dispatch, "_dispatch_modes", lambda: 1)
                full = torch.autograd.grad(full_out, params, dy)
        finally:
            torch.set_float32_matmul_precision(start)
        _same([out.detach(), *grads], [full_out.detach(), *full], what)

    x = _randn((13, 5), 1, device=device)
    check(x, "first")
    programs = [(key, id(prog)) for key, prog in p.programs.items()]
    assert len(programs) == 1
    check(x, "again")
    assert [(key, id(prog)) for key, prog in p.programs.items()] == programs, "the program was made again"
    check(_randn((4, 5), 2, device=device), "another batch")
    check(_randn((5, 13), 3, device=device).t(), "x transposed")
    check(x, "dy expanded", dy=torch.ones(1, 3, device=device).expand(13, 3))
    w = model.layers[1].weight
    w.data = w.data.t().contiguous().t()  # same shape, other strides
    check(x, "weight transposed")
    assert len(p.programs) == 4, len(p.programs)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model._traced_forward(x), rtol=0, atol=0)
    assert len(p.programs) == 5  # inference: nothing saved, no Z
    start = torch.get_float32_matmul_precision()
    other = "highest" if start != "highest" else "high"
    check(x, "precision changed for the backward", precision=other)
    torch.set_float32_matmul_precision(other)
    try:
        check(x, "precision changed")
    finally:
        torch.set_float32_matmul_precision(start)
    model.double()
    check(x.double(), "float64")
    keys = list(p.programs)
    assert len({k[2] for k in keys}) == 2 and len({k[4] for k in keys}) == 2, keys  # dtypes, precisions
    backwards = [list(prog.backwards) for prog in p.programs.values()]  # (needs, dy strides, precision)
    assert any(len({k[1] for k in keys}) == 2 for keys in backwards), backwards  # dy contiguous, expanded
    assert any(len({k[2] for k in keys}) == 2 for keys in backwards), backwards  # the backward's precision
    with torch.no_grad():
        model.layers[0].bias.data = model.layers[0].bias.data.float()
    with pytest.raises(TypeError, match="bias"):
        model(x.double())
    model.layers[0].bias.data = model.layers[0].bias.data.double()
    before = len(p.programs)
    empty = model(x.double()[:0])
    assert empty.shape == (0, 3) and len(p.programs) == before
    with monkeypatch.context() as m:
        m.setattr(fnn.dispatch, "_dispatch_modes", lambda: 1)
        assert type(model(x.double()).grad_fn).__name__ == "_PlannedFNNBackward"


@pytest.mark.parametrize(("width", "step"), [(4, 8), (80, 3)], ids=["fused", "two-kernels"])
def test_layer_program_weight_gradient_in_slices(device, width, step):
    """A long batch with few weight tiles: the program's backward steps (the fused kernel's for
    narrow layers, the weight-gradient kernel's for a 80-wide one) reduce the batch in slices
    (float partials summed after, as the launchers do), == the full path."""
    torch.manual_seed(0)
    model = fnn.FNN([3, width, 2], activation=["tanh", "sigmoid"], device=device, fusion="layer")
    x = _randn((4500, 3), 4, device=device).requires_grad_()
    dy = _randn((4500, 2), 5, device=device)
    params = [x, *model.parameters()]
    fast = _grads(lambda: model(x), params, dy)
    (prog,) = plan(model).programs.values()
    (steps,) = prog.backwards.values()
    assert [layer[step][3] for layer in steps] == [2, 2], "the weight gradients were not split"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(fnn.dispatch, "_dispatch_modes", lambda: 1)
        full = _grads(lambda: model._traced_forward(x), params, dy)
    _same(fast, full, "layer program, weight gradient in slices")


def test_fnn_plan_follows_the_model(device):
    """The plan is made again when a layer's activation, the fusion or a layer changes; a
    parameter replaced or re-laid out (same address, other strides) is read as it now is."""
    torch.manual_seed(0)
    model = fnn.FNN([3, 3, 3], activation="sigmoid", device=device, fusion="network")
    x = _randn((7, 3), 7, device=device)
    first = plan(model)
    assert plan(model) is first and model.sizes == [3, 3, 3]

    def reference():
        h = x
        for layer in model.layers:
            h = fnn.reference.linear_act(h, layer.weight, layer.bias, layer.activation)
        return h

    with torch.no_grad():
        torch.testing.assert_close(model(x), reference())
        model.layers[1].activation = "tanh"
        assert plan(model) is not first and plan(model).names == ("sigmoid", "tanh")
        torch.testing.assert_close(model(x), reference())
        model.fusion = "layer"
        torch.testing.assert_close(model(x), reference())
        model.fusion = "network"
        model.layers[0] = fnn.FusedLinear(3, 3, activation="relu", device=device)
        assert plan(model).names == ("relu", "tanh")
        torch.testing.assert_close(model(x), reference())
        assert model.flatten_parameters()
        w = model.layers[0].weight
        ptr = w.data_ptr()
        w.data = w.data.t()  # the same address, transposed: no longer the flat buffer's view
        assert w.data_ptr() == ptr and not w.is_contiguous()
        torch.testing.assert_close(model(x), reference())
        model.layers[1].bias = None
        assert plan(model).biased == (True, False)
        torch.testing.assert_close(model(x), reference())
        with pytest.raises(ValueError, match="unknown fusion"):
            model.fusion = "bogus"
            model(x)


def test_trainer_planned_and_full_steps_agree(device, monkeypatch):
    """Trainer.step's planned path (cheap checks, cached scratch) == the full path (every check,
    fused() per step), bit for bit over several steps, with momentum; bad batches still raise."""
    results = []
    for planned in (True, False):
        torch.manual_seed(0)
        model = fnn.FNN([2, 16, 1], activation=["tanh", "sigmoid"], device=device, fusion="network")
        trainer = fnn.Trainer(model, loss="mse", lr=0.1, momentum=0.9)
        with monkeypatch.context() as m:
            if not planned:
                m.setattr(fnn.Trainer, "_planned_step", lambda *a: None)
            losses = [trainer.step(_randn((20, 2), s, device=device), _randn((20, 1), 9, device=device))
                      for s in range(4)]
        results.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()]))
    _same([results[0][0], *results[0][1]], [results[1][0], *results[1][1]], "Trainer steps")
    with pytest.raises(ValueError, match="shape"):
        trainer.step(_randn((20, 2), 0, device=device), _randn((20, 2), 0, device=device))
    with pytest.raises(TypeError, match="float64"):
        trainer.step(_randn((20, 2), 0, torch.float64, device), _randn((20, 1), 0, torch.float64, device))


# ---------------------------------------------------------------------------------------------
# The direct path: no host synchronisation, no constant or scratch allocated per call
# ---------------------------------------------------------------------------------------------


class _Allocations(NoHostSync):
    """NoHostSync, also counting the allocating and copying ops."""

    ALLOC = {"aten.empty", "aten.empty_strided", "aten.zeros", "aten.zeros_like", "aten.empty_like",
             "aten.new_empty", "aten.new_zeros", "aten.full", "aten.scalar_tensor", "aten.lift_fresh",
             "aten._to_copy", "aten.copy_", "aten.clone", "aten.cat"}

    def __init__(self) -> None:
        super().__init__()
        self.allocs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.ALLOC:
            self.allocs.append(name)
        return super().__torch_dispatch__(func, types, args, kwargs)


def _skip_launches(monkeypatch) -> None:
    """Every launcher of kernels.linear_act and kernels.network (kernels.launch) does nothing:
    what is left of a call is fnn's own host work (outputs then hold their poison)."""
    import kernels.linear_act
    import kernels.network
    from kernels.launch import CachedLauncher

    class NoLaunch:
        def __call__(self, *args, **kwargs):
            return None

        def keyed(self, *args, **kwargs):
            return None

        def direct(self, *args, **kwargs):
            return None

    patched = 0
    for module in (kernels.linear_act, kernels.network):
        for name, obj in list(vars(module).items()):
            if isinstance(getattr(obj, "state", None), CachedLauncher):
                monkeypatch.setattr(module, name, NoLaunch())
                patched += 1
    assert patched >= 6, patched  # forward, backward input and weight; the network's three


@pytest.mark.parametrize("which", ["linear_act", "FNN-layer", "FNN-network", "Trainer"])
def test_direct_path_allocates_outputs_only_and_never_syncs(which, device, monkeypatch):
    """The launchers called directly (a dispatch mode normally routes fnn through the
    registered ops; here the mode only watches), the launches skipped: after a warm-up call,
    a call dispatches no
    op that waits on the device and allocates its outputs and nothing else (no constant,
    no workspace: the network's scratch buffers are kept per stream, meta per device)."""
    monkeypatch.setattr(fnn.dispatch, "_dispatch_modes", lambda: 0)
    _skip_launches(monkeypatch)  # Triton's interpreter allocates and copies per launch: not fnn's
    torch.manual_seed(0)
    x = _randn((9, 6), 1, device=device)
    dy = _randn((9, 5), 2, device=device)
    if which == "linear_act":
        w = _randn((5, 6), 3, device=device).requires_grad_()

        def run():
            return torch.autograd.grad(fnn.linear_act(x, w, None, "relu"), [w], dy)

        outputs = 2  # y, dW
    elif which == "Trainer":
        model = fnn.FNN([6, 16, 5], activation=["tanh", "sigmoid"], device=device, fusion="network")
        trainer = fnn.Trainer(model, loss="mse", lr=0.1, momentum=0.5)
        target = torch.rand(9, 5, device=device)

        def run():
            return trainer.step(x, target)

        outputs = 1  # the loss
    else:
        fusion = which.split("-")[1]
        model = fnn.FNN([6, 16, 5], activation=["tanh", "sigmoid"], device=device, fusion=fusion)
        params = list(model.parameters())

        def run():
            return torch.autograd.grad(model(x), params, dy)

        # layer: h1, y; dW2, db2, dX2 (with layer 1's delta), dW1, db1. network: y, H; the flat gradients
        outputs = 7 if fusion == "layer" else 3
    run()  # warm-up: compiles, makes meta and the scratch buffers
    mode = _Allocations()
    with mode:
        run()
    empties = [a for a in mode.allocs if a in ("aten.empty", "aten.empty_strided", "aten.new_empty")]
    assert len(empties) == outputs and len(mode.allocs) == outputs, mode.allocs
    assert not any(op.startswith("fnn.") for op in mode.seen), "the registered ops were used"


# ---------------------------------------------------------------------------------------------
# Compiled for a GPU target: every cached launch is the specialization Triton picks
# ---------------------------------------------------------------------------------------------

SPECIALIZATION_SCRIPT = r"""
import json, sys
import torch
from triton import knobs
import fnn
from bench.fakecuda import compile_only
from kernels import launch

launch.verify_keys(True)  # every caller-key hit is checked against the full key (AssertionError)

def calls(small):
    g = torch.Generator().manual_seed(0)
    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)
    base = r(64, 40)
    for dtype in (torch.float32,) if small else (torch.float32, torch.bfloat16, torch.float64):
        w = r(24, 40, dtype=dtype).requires_grad_()
        b = r(24, dtype=dtype).requires_grad_()
        layouts = (
            ("contiguous", base.to(dtype)),
            ("rows 1", base[:1].to(dtype)),
            ("transposed", base.to(dtype).t().contiguous().t()),
            ("strided", base.to(dtype)[::2]),
            ("misaligned", base.to(dtype).reshape(-1)[1:1 + 63 * 40].view(63, 40)),
        )
        for label, x in layouts[:2] if small else layouts:
            for act in ("sigmoid", "gelu"):
                y = fnn.linear_act(x, w, b, act)
                y.backward(torch.ones_like(y))
                with torch.no_grad():
                    fnn.linear_act(x, w, None, act)
    for fusion in ("layer", "network"):
        for dtype in (torch.float32,) if small else (torch.float32, torch.float64):
            torch.manual_seed(0)
            model = fnn.FNN([40, 32, 7], activation=["relu", "sigmoid"], dtype=dtype, fusion=fusion)
            # mse: bce would read its input, which the skipped launches leave unwritten
            trainer = fnn.Trainer(model, loss="mse", lr=0.1, momentum=0.9)
            for rows in (100, 3) if small else (100, 3, 600):
                x = base.to(dtype).repeat(10, 1)[:rows].requires_grad_()
                model(x).sum().backward()
                trainer.step(x.detach(), torch.rand(rows, 7, generator=g).to(dtype))
    if not small:  # the same widths, two activation sets (ACTS; silu/gelu: scratches, Z kept)
        for acts in (["relu", "sigmoid"], ["silu", "gelu"]):
            torch.manual_seed(0)
            model = fnn.FNN([8, 16, 3], activation=acts, fusion="network")
            trainer = fnn.Trainer(model, loss="mse", lr=0.1)
            x = base[:20, :8].contiguous().requires_grad_()
            model(x).sum().backward()
            trainer.step(x.detach(), torch.rand(20, 3, generator=g))

def hook(metadata):  # a launch hook sends every launch through Triton's own path
    pass

result = {}
for capability, small in ((90, False), (80, True)):
    passes = []
    with compile_only(capability) as gpu:
        for hooked in (True, False, False):  # Triton's path; the cache's first calls; its hits
            if hooked:
                knobs.runtime.launch_enter_hook.add(hook)
            start = len(gpu.launches)
            try:
                calls(small)
            finally:
                if hooked:
                    knobs.runtime.launch_enter_hook.remove(hook)
            passes.append([(l.kernel, l.metadata.hash, list(l.grid)) for l in gpu.launches[start:]])
    result[str(capability)] = passes
from kernels import linear_act, network
launchers = (linear_act._fwd, linear_act._bwd_input, linear_act._bwd_weight, linear_act._bwd_fused,
             linear_act._delta, network._fwd, network._bwd, network._red)
states = [k.state for k in launchers]
result["keyed_entries"] = sum(len(s.ucache) for s in states)
print("RESULT " + json.dumps(result))
"""


def test_every_cached_launch_is_tritons_specialization(tmp_path):
    """Compiled for sm_90a (then for sm_80, another device for the launch cache), launches
    skipped: fnn.linear_act forward, backward and inference over three dtypes, five layouts
    (rows 1, a transposed and a strided view, a misaligned one), two activations, with and
    without bias, then FNN under both fusions and Trainer steps at three batch sizes (one
    needs two programs), and two networks of the same widths with other activation sets (the
    kernels' ACTS; gelu and silu use the scratches and keep Z). With a launch hook installed
    every launch takes Triton's own path; without, the launch cache's (first its misses, then
    its hits, every hit also checked against the full key). The kernels launched, their
    binaries and their grids are the same sequence in all three passes."""
    result = run_script(SPECIALIZATION_SCRIPT, tmp_path, timeout=900)
    for capability in ("90", "80"):
        tritons, first, hits = result[capability]
        # sm_80 (one dtype, two layouts): 36 launches today, 184 on sm_90a
        assert len(tritons) >= (36 if capability == "80" else 150), (capability, len(tritons))
        assert first == tritons, f"sm_{capability}: the cache's first calls launched other kernels"
        assert hits == tritons, f"sm_{capability}: a cache hit launched another specialization"
    hashes = {c: {h for _, h, _ in result[c][0]} for c in ("90", "80")}
    assert not hashes["90"] & hashes["80"], "a kernel compiled for one target was launched on the other"
    # The caller-keyed fast path served the hits: one entry per distinct caller key (a new
    # driver empties a launcher's cache when it next launches), 39 today.
    assert result["keyed_entries"] >= 30, result["keyed_entries"]


DELTA_SCRIPT = """
import json, torch, fnn
from bench.fakecuda import compile_only

out = {}
with compile_only(90) as gpu:
    def launches(fn):
        fn()  # compiles
        gpu.launches.clear()
        fn()
        return [launch.kernel for launch in gpu.launches]

    def fwbw(act, x, w, dy, inputs):
        return lambda: torch.autograd.grad(fnn.linear_act(x, w, None, act), inputs, dy)

    torch.manual_seed(0)
    x = torch.randn(64, 8, requires_grad=True)
    w = torch.randn(16, 8, requires_grad=True)
    dy = torch.randn(64, 16)
    out["gelu"] = launches(fwbw("gelu", x, w, dy, (x, w)))
    out["sigmoid"] = launches(fwbw("sigmoid", x, w, dy, (x, w)))
    out["gelu, w only"] = launches(fwbw("gelu", x.detach(), w, dy, (w,)))
    wide = torch.randn(80, 8, requires_grad=True)  # past the fused backward's tile
    out["gelu, wide"] = launches(fwbw("gelu", x, wide, torch.randn(64, 80), (x, wide)))
    model = fnn.FNN([8, 16, 4], activation=["gelu", "silu"], fusion="layer")
    dy2 = torch.randn(64, 4)
    out["FNN"] = launches(lambda: torch.autograd.grad(model(x), [x, *model.parameters()], dy2))
print("RESULT " + json.dumps(out))
"""


def test_heavy_delta_formed_once_per_layer_backward(tmp_path):
    """Compiled for sm_90a, launches recorded: a backward that launches both dX and dW of a
    heavy-activation layer (gelu, silu: D comes from its own kernel, HEAVY_DELTA) forms D once
    for both (the fused kernel, or the two GEMMs of a wide layer); a sigmoid layer (D formed on
    load) launches no D kernel."""
    out = run_script(DELTA_SCRIPT, tmp_path)
    fwd, d = "linear_act_fwd_kernel", "linear_act_delta_kernel"
    dx, dw = "linear_act_bwd_input_kernel", "linear_act_bwd_weight_kernel"
    both = "linear_act_bwd_fused_kernel"
    assert out["gelu"] == [fwd, d, both], out
    assert out["sigmoid"] == [fwd, both], out
    assert out["gelu, w only"] == [fwd, d, dw], out
    assert out["gelu, wide"] == [fwd, d, dx, dw], out
    # Layer 2 (silu): one D for its dW and for the dX that carries layer 1's gelu delta (two
    # kernels: the fused one takes no heavy previous activation); layer 1 then starts from that
    # delta (identity): no D kernel of its own, and dX, dW and db from the fused kernel.
    assert out["FNN"] == [fwd, fwd, d, dw, dx, both], out
