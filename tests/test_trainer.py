"""fnn.Trainer: one fused launch per SGD step for narrow FNNs, autograd + torch.optim.SGD
otherwise; every fused step checked against autograd + loss.backward() + SGD.step()."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close
from test_network import LaunchCounter

import fnn
from fnn.cli import seed000_model
from fnn.data import seed000_data

TORCH_LOSSES = {
    "bce": torch.nn.BCELoss(),
    "mse": torch.nn.MSELoss(),
    "sse": lambda y_hat, y: 0.5 * ((y_hat - y) ** 2).sum(),
}


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> LaunchCounter:
    return LaunchCounter(monkeypatch)


def _assert_params(model, expected, what, rtol=1e-5):
    for (name, p), q in zip(model.named_parameters(), expected, strict=True):
        err = (p.detach().double() - q.detach().double()).abs().max().item()
        scale = q.detach().double().abs().max().item()
        assert err <= rtol * scale + 1e-7, f"{what}: {name} off by {err:.3e} (scale {scale:.3e})"


def _steps_match_sgd(trainer, model, ref, x, y, loss, lr, momentum, rtol, steps=3):
    """`steps` Trainer steps on `model` against autograd on `ref` (a copy) and
    torch.optim.SGD: the same loss each step (within rtol) and the same parameters."""
    opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=momentum)
    for step in range(steps):
        got = trainer.step(x, y)
        opt.zero_grad()
        want = TORCH_LOSSES[loss](ref(x), y)
        want.backward()
        opt.step()
        assert got.shape == () and got.dtype == x.dtype
        assert abs(got.item() - want.item()) <= rtol * abs(want.item()), f"step {step} loss"
        _assert_params(model, list(ref.parameters()), f"step {step}", rtol=max(rtol, 1e-12))


@pytest.mark.parametrize("loss", ["bce", "mse", "sse"])
@pytest.mark.parametrize("momentum,batch", [(0.0, 37), (0.9, 37), (0.9, 1000)])
def test_step_equals_autograd_and_sgd(device, loss, momentum, batch):
    """Three fused steps (one program for 37 rows, several and the reduction for 1000) equal
    autograd on the same loss followed by torch.optim.SGD.step()."""
    torch.manual_seed(0)
    model = fnn.FNN([3, 24, 9, 2], activation=["tanh", "relu", "sigmoid"], device=device, fusion="network")
    ref = copy.deepcopy(model)
    ref.fusion = "layer"
    x = torch.randn(batch, 3, device=device)
    y = (
        torch.rand(batch, 2, device=device)
        if loss != "bce"
        else torch.randint(0, 2, (batch, 2), device=device).float()
    )
    trainer = fnn.Trainer(model, loss=loss, lr=0.05, momentum=momentum)
    assert trainer.fused(device)
    flat, params = model._flat, list(model.parameters())
    _steps_match_sgd(trainer, model, ref, x, y, loss, 0.05, momentum, rtol=1e-5)
    # The kernel updated the FNN's flat buffer in place: the same Parameter objects, still its
    # views; the momentum buffer is the Trainer's, flat, in the same layout.
    assert model._flat is flat and list(model.parameters()) == params
    assert fnn.network.flat_buffer(model, *fnn.network._layers_parameters(model)) is flat
    assert all(p.grad is None for p in model.parameters()), ".grad is not touched"
    if momentum:
        buf = trainer._momentum[1]
        assert buf.shape == flat.shape and buf.dtype == flat.dtype and buf.abs().sum() > 0


def test_float64_step(device):
    torch.manual_seed(1)
    model = fnn.FNN([4, 16, 1], activation="sigmoid", dtype=torch.float64, device=device, fusion="network")
    ref = copy.deepcopy(model)
    ref.fusion = "layer"
    x = torch.randn(50, 4, dtype=torch.float64, device=device)
    y = torch.rand(50, 1, dtype=torch.float64, device=device)
    trainer = fnn.Trainer(model, loss="mse", lr=0.3, momentum=0.5)
    _steps_match_sgd(trainer, model, ref, x, y, "mse", 0.3, 0.5, rtol=1e-12)


def _seed000_manual(x, y, w1, w2, lr, epochs):
    """Seed 000's manual loop, transcribed: forward, "delta" backprop, gradient descent."""

    def sigmoid(s):
        return 1 / (1 + torch.exp(-s))

    def sigmoid_first_order_derivative(s):
        return s * (1 - s)

    for _ in range(epochs):
        y1 = torch.matmul(x, w1)
        y2 = sigmoid(y1)
        y3 = torch.matmul(y2, w2)
        y4 = sigmoid(y3)
        dC_dy4 = y4 - y
        y4_delta = dC_dy4 * sigmoid_first_order_derivative(y4)
        dC_dw2 = torch.matmul(torch.t(y2), y4_delta)
        y2_delta = torch.matmul(y4_delta, torch.t(w2)) * sigmoid_first_order_derivative(y2)
        dC_dw1 = torch.matmul(torch.t(x), y2_delta)
        w1 -= lr * dC_dw1
        w2 -= lr * dC_dw2
    return w1, w2


def test_seed000_through_trainer_equals_manual_loop(device, launches):
    x, y = (t.to(device) for t in seed000_data())
    model = seed000_model(2, device)
    model.fusion = "network"
    w1 = model.layers[0].weight.detach().T.clone()
    w2 = model.layers[1].weight.detach().T.clone()
    w1, w2 = _seed000_manual(x, y, w1, w2, 0.001, 101)
    trainer = fnn.Trainer(model, loss="sse", lr=0.001)
    for _ in range(2):
        launches.calls.clear()
        trainer.step(x, y)
        assert launches.calls == ["network_bwd_kernel"], "one launch per training step"
    history = trainer.fit(x, y, 99)
    assert len(history) == 99
    _assert_params(model, [w1.T, w2.T], "seed 000 after 101 epochs")


def test_fit_returns_the_step_losses(device):
    torch.manual_seed(4)
    model = fnn.FNN([2, 8, 1], device=device, fusion="network")
    ref = copy.deepcopy(model)
    x = torch.randn(20, 2, device=device)
    y = torch.randint(0, 2, (20, 1), device=device).float()
    history = fnn.Trainer(model, lr=0.5).fit(x, y, 4)
    trainer = fnn.Trainer(ref, lr=0.5)
    expected = [trainer.step(x, y).item() for _ in range(4)]
    assert history == expected
    assert fnn.Trainer(model, lr=0.5).fit(x, y, 0) == []


def test_fallback_is_autograd_and_sgd(device, launches):
    """Models the fused step does not serve (wide, fusion="layer", not an FNN) train through
    autograd and torch.optim.SGD."""
    torch.manual_seed(5)
    seq = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sigmoid()).to(device)
    ref = copy.deepcopy(seq)
    x = torch.randn(10, 3, device=device)
    y = torch.rand(10, 4, device=device)
    trainer = fnn.Trainer(seq, loss="mse", lr=0.1, momentum=0.9)
    assert not trainer.fused(device)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        got = trainer.step(x, y)
        opt.zero_grad()
        want = torch.nn.functional.mse_loss(ref(x), y)
        want.backward()
        opt.step()
        assert torch.equal(got, want.detach())
    for p, q in zip(seq.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    wide = fnn.Trainer(fnn.FNN([2, 130, 1], device=device), lr=0.1)
    assert not wide.fused(device)
    layer = fnn.FNN([2, 3, 1], device=device, fusion="layer")
    assert not fnn.Trainer(layer, lr=0.1).fused(device)
    launches.calls.clear()
    fnn.Trainer(layer, lr=0.1).step(torch.randn(4, 2, device=device), torch.rand(4, 1, device=device))
    assert "network_bwd_kernel" not in launches.calls


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_frozen_parameters_stay_as_they_are(device, launches, momentum):
    """A parameter with requires_grad=False is not trained, as torch.optim.SGD leaves it: the
    fused step (which updates the whole flat buffer) gives way to autograd, and comes back once
    every parameter trains again. Every parameter frozen: autograd's error, as for SGD."""
    torch.manual_seed(8)
    model = fnn.FNN([3, 6, 1], ["tanh", "sigmoid"], device=device, fusion="network")
    ref = copy.deepcopy(model)
    x, y = torch.randn(12, 3, device=device), torch.rand(12, 1, device=device)
    trainer = fnn.Trainer(model, loss="bce", lr=0.5, momentum=momentum)
    assert trainer.fused(device)
    for m in (model, ref):
        m.layers[0].weight.requires_grad_(False)
    frozen = model.layers[0].weight.detach().clone()
    assert not trainer.fused(device)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=momentum)
    for _ in range(3):
        launches.calls.clear()
        got = trainer.step(x, y)
        # autograd's step: a forward and a backward launch (the fused step: one backward launch)
        assert launches.calls == ["network_fwd_kernel", "network_bwd_kernel"], launches.calls
        opt.zero_grad()
        want = TORCH_LOSSES["bce"](ref(x), y)
        want.backward()
        opt.step()
        assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    assert torch.equal(model.layers[0].weight, frozen), "a frozen weight changed"
    _assert_params(model, list(ref.parameters()), "the step with a frozen weight")
    model.layers[0].weight.requires_grad_(True)
    assert trainer.fused(device)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(RuntimeError):
        trainer.step(x, y)


def test_bce_needs_a_sigmoid_output_for_the_fused_step(device, launches):
    """nn.BCELoss requires outputs in [0, 1]; only a sigmoid output layer guarantees them, so a
    bce Trainer of any other output activation takes autograd's step (and its range check)."""
    torch.manual_seed(9)
    model = fnn.FNN([3, 6, 1], ["tanh", "relu"], device=device, fusion="network")
    with torch.no_grad():
        model.layers[1].weight.zero_()
        model.layers[1].bias.fill_(0.5)  # outputs 0.5: in range, so CUDA's BCE has nothing to assert
    trainer = fnn.Trainer(model, loss="bce", lr=0.1)
    assert not trainer.fused(device)
    assert fnn.Trainer(model, loss="mse", lr=0.1).fused(device)
    x, y = torch.randn(12, 3, device=device), torch.rand(12, 1, device=device)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    launches.calls.clear()
    got = trainer.step(x, y)
    assert launches.calls == ["network_fwd_kernel", "network_bwd_kernel"], launches.calls  # autograd's
    want = TORCH_LOSSES["bce"](ref(x), y)
    want.backward()
    opt.step()
    assert abs(got.item() - want.item()) <= 1e-6
    _assert_params(model, list(ref.parameters()), "a bce step of a relu output layer")
    if device.type == "cpu":  # on CUDA nn.BCELoss's check is a device-side assert
        with torch.no_grad():
            model.layers[1].bias.fill_(3.0)
        with pytest.raises(RuntimeError, match="between 0 and 1"):
            trainer.step(x, y)


def test_argument_validation(device, launches):
    model = fnn.FNN([2, 3, 1], device=device, fusion="network")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="nn.Module"):
        fnn.Trainer("model")
    with pytest.raises(ValueError, match="unknown loss"):
        fnn.Trainer(model, loss="hinge")
    with pytest.raises(TypeError, match="loss must be a string"):
        fnn.Trainer(model, loss=None)
    for lr in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lr"):
            fnn.Trainer(model, lr=lr)
    with pytest.raises(TypeError, match="lr"):
        fnn.Trainer(model, lr="0.1")
    with pytest.raises(ValueError, match="momentum"):
        fnn.Trainer(model, lr=0.1, momentum=-0.5)
    trainer = fnn.Trainer(model, lr=0.1)
    x = torch.randn(5, 2, device=device)
    with pytest.raises(ValueError, match="shape"):
        trainer.step(x, torch.rand(5, 2, device=device))
    with pytest.raises(ValueError, match="shape"):
        trainer.step(torch.randn(5, 3, device=device), torch.rand(5, 1, device=device))
    with pytest.raises(TypeError, match="float64"):
        trainer.step(x, torch.rand(5, 1, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        trainer.step(x[:0], torch.rand(0, 1, device=device))
    with pytest.raises(TypeError, match="epochs"):
        trainer.fit(x, torch.rand(5, 1, device=device), 2.0)
    assert launches.calls == []
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_trainer_and_torch_compile(device, launches):
    """The fused step is one launch, so it is not compiled: a compiled function calling
    `step` runs it eagerly (same losses and weights as eager, the same single launch), and a
    Trainer given `torch.compile(model)` takes the fused step on the FNN inside."""
    torch._dynamo.reset()
    torch.manual_seed(6)
    models = [fnn.FNN([3, 12, 2], activation=["tanh", "sigmoid"], device=device, fusion="network")]
    models += [copy.deepcopy(models[0]) for _ in range(2)]
    x = torch.randn(20, 3, device=device)
    y = torch.rand(20, 2, device=device)
    eager = fnn.Trainer(models[0], loss="mse", lr=0.2, momentum=0.5)
    in_graph = fnn.Trainer(models[1], loss="mse", lr=0.2, momentum=0.5)
    compiled_step = torch.compile(in_graph.step, backend="aot_eager")
    wrapped = fnn.Trainer(torch.compile(models[2], backend="aot_eager"), loss="mse", lr=0.2, momentum=0.5)
    assert wrapped.fused(device)
    for _ in range(2):
        want = eager.step(x, y)
        launches.calls.clear()
        got = compiled_step(x, y)
        assert launches.calls == ["network_bwd_kernel"], launches.calls
        launches.calls.clear()
        got_wrapped = wrapped.step(x, y)
        assert launches.calls == ["network_bwd_kernel"], launches.calls
        assert torch.equal(got, want) and torch.equal(got_wrapped, want)
    for m in models[1:]:
        for p, q in zip(m.parameters(), models[0].parameters(), strict=True):
            assert torch.equal(p, q)
    torch._dynamo.reset()


def test_momentum_follows_the_parameters(device):
    """The flat momentum buffer is kept from step to step. A new flat parameter buffer for the
    same Parameter objects (`to()`, or the step's flattening again after `p.data = ...`) takes
    the momentum over, in its dtype, as torch.optim.SGD's state follows its Parameters
    (before, the fused step restarted from zero there, and differed from SGD by 1e-1); new
    Parameter objects (`load_state_dict(assign=True)`) start from zero, as a new optimizer
    over them would."""
    torch.manual_seed(7)
    model = fnn.FNN([3, 8, 2], activation=["tanh", "sigmoid"], device=device, fusion="network")
    ref = copy.deepcopy(model)
    ref.fusion = "layer"
    x, y = torch.randn(10, 3, device=device), torch.rand(10, 2, device=device)
    trainer = fnn.Trainer(model, loss="mse", lr=0.3, momentum=0.9)
    opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)

    def steps(what, rtol=1e-5):
        for step in range(2):
            assert trainer.fused(device), what
            trainer.step(x, y)
            opt.zero_grad()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            opt.step()
            _assert_params(model, list(ref.parameters()), f"{what}, step {step}", rtol)

    steps("float32")
    buf = trainer._momentum[1]
    for change in ("double", "p.data", "assign"):
        flat = model._flat
        if change == "double":  # SGD keeps its float32 momentum buffers: equal to float32's rounding
            model.double()
            ref.double()
            x, y = x.double(), y.double()
        elif change == "p.data":
            for m in (model, ref):
                vec = torch.nn.utils.parameters_to_vector(m.parameters())
                torch.nn.utils.vector_to_parameters(vec * 0.5, m.parameters())
        else:
            for m in (model, ref):
                m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
            opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)
        steps(f"after {change}", 1e-5 if change == "double" else 1e-12)
        assert model._flat is not flat, change
        assert trainer._momentum[1] is not buf and trainer._momentum[1].dtype == torch.float64
        buf = trainer._momentum[1]


def _fused_and_sgd(device, width: int, seed: int):
    """A float64 FNN on the network path and its copy on the layer path, a batch, a Trainer
    (mse, lr 0.3, momentum 0.9) over the first and a torch.optim.SGD over the copy."""
    torch.manual_seed(seed)
    dt = torch.float64
    model = fnn.FNN([3, width, 2], activation=["tanh", "sigmoid"], device=device, dtype=dt, fusion="network")
    ref = copy.deepcopy(model)
    ref.fusion = "layer"
    x, y = torch.randn(10, 3, device=device, dtype=dt), torch.rand(10, 2, device=device, dtype=dt)
    trainer = fnn.Trainer(model, loss="mse", lr=0.3, momentum=0.9)
    return model, ref, x, y, trainer, torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)


@pytest.mark.parametrize("change", ["p.data", "float-double"])
def test_momentum_reaches_the_optimizer_after_a_new_flat_buffer(device, launches, change):
    """Fused steps, then a new flat parameter buffer for the same Parameter objects, then
    autograd's steps (a forward hook), then fused again: one torch.optim.SGD run throughout.
    Before, the hand-over to the optimizer found the momentum by address in the old flat
    buffer, gone by then: it restarted from zero (off by 9e-2)."""
    model, ref, x, y, trainer, opt = _fused_and_sgd(device, 6, seed=12)

    def steps(n, fused, what):
        for step in range(n):
            assert trainer.fused(device) == fused, what
            launches.calls.clear()
            trainer.step(x, y)
            assert (launches.calls == ["network_bwd_kernel"]) == fused, (what, launches.calls)
            opt.zero_grad()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            opt.step()
            _assert_params(model, list(ref.parameters()), f"{what}, step {step}", rtol=1e-12)

    steps(2, True, "fused")
    for m in (model, ref):
        if change == "p.data":
            m.layers[0].weight.data = m.layers[0].weight.data.clone()
        else:
            m.float().double()
    handle = model.register_forward_hook(lambda mod, inp, out: out)
    steps(2, False, f"autograd after {change}")
    handle.remove()
    steps(1, True, "fused again")


def test_a_forward_set_on_the_instance_takes_the_autograd_step(device):
    """`model.forward = ...` on the FNN instance (as wrappers such as accelerate's do) is what
    `model(x)` runs: the step takes autograd's path with it (before, the fused step computed
    FNN.forward: a wrong loss, wrong updates)."""
    torch.manual_seed(13)
    model = fnn.FNN([3, 4, 1], fusion="network", device=device, dtype=torch.float64)
    ref = copy.deepcopy(model)
    trainer = fnn.Trainer(model, loss="mse", lr=0.5)
    x = torch.rand(9, 3, device=device, dtype=torch.float64)
    y = torch.rand(9, 1, device=device, dtype=torch.float64)
    trainer.step(x, y)  # fused, and the model cached
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_opt.zero_grad()
    torch.nn.functional.mse_loss(ref(x), y).backward()
    ref_opt.step()
    for m in (model, ref):
        m.forward = lambda x, m=m: 2 * fnn.FNN.forward(m, x)
    assert not trainer.fused(device)
    _steps_match_sgd(trainer, model, ref, x, y, "mse", 0.5, 0.0, 1e-12)
    del model.forward
    assert trainer.fused(device)


def test_lr_and_momentum_set_between_steps_are_checked(device):
    """lr and momentum assigned after construction are checked as the constructor checks
    them, on either path (before, the fused step took momentum -0.5 as 0 and autograd's
    raised torch's error)."""
    x, y = torch.rand(9, 3, device=device), torch.rand(9, 1, device=device)
    for fusion in ("network", "layer"):
        trainer = fnn.Trainer(fnn.FNN([3, 4, 1], fusion=fusion, device=device), loss="mse", lr=0.5)
        trainer.step(x, y)
        bad = (("momentum", -0.5, ValueError), ("lr", 0.0, ValueError), ("lr", "0.1", TypeError))
        for name, value, exc in bad:
            setattr(trainer, name, value)
            with pytest.raises(exc, match=name):
                trainer.step(x, y)
            setattr(trainer, name, 0.5 if name == "lr" else 0.0)


def test_parameter_hooks_take_the_autograd_step(device, launches):
    """A hook on a parameter tensor (`register_hook`, here a gradient mask that freezes rows
    of a weight, or `register_post_accumulate_grad_hook`) runs only where autograd makes the
    gradient: such a model trains through autograd and torch.optim.SGD, hooks and all
    (before, the fused step skipped them and the masked rows moved). Removing the hooks
    brings the fused step back."""
    x = torch.rand(9, 3, device=device, dtype=torch.float64)
    y = torch.rand(9, 2, device=device, dtype=torch.float64)
    mask = torch.tensor([[1.0], [0.0], [1.0], [0.0]], device=device, dtype=torch.float64)
    torch.manual_seed(8)
    model = fnn.FNN([3, 4, 2], fusion="network", device=device, dtype=torch.float64)
    ref = copy.deepcopy(model)
    ref.fusion = "layer"
    calls = []
    handles = []
    for m in (model, ref):
        w = m.layers[0].weight
        handles.append(w.register_hook(lambda g: g * mask))
        handles.append(w.register_post_accumulate_grad_hook(lambda p: calls.append(p.shape)))
    frozen = model.layers[0].weight.detach()[1].clone()
    trainer = fnn.Trainer(model, loss="mse", lr=0.5, momentum=0.9)
    assert not trainer.fused(device)
    _steps_match_sgd(trainer, model, ref, x, y, "mse", 0.5, 0.9, 1e-12)
    assert torch.equal(model.layers[0].weight.detach()[1], frozen), "the masked row moved"
    assert len(calls) == 6, calls  # 3 steps, model and reference
    for h in handles:
        h.remove()
    assert trainer.fused(device)
    launches.calls.clear()
    trainer.step(x, y)
    assert launches.calls == ["network_bwd_kernel"], launches.calls


def test_global_module_hooks_see_the_layers(device, launches):
    """A global module hook (torch.nn.modules.module.register_module_forward_hook: module
    trackers, FLOP counters) sees every module call. The FNN then calls its layers, as an
    nn.Sequential would, and the Trainer takes autograd's step (before, the hook saw the FNN
    alone, and nothing at all in a fused step)."""
    x = torch.rand(9, 3, device=device)
    y = torch.rand(9, 2, device=device)
    model = fnn.FNN([3, 4, 2], fusion="network", device=device)
    ref = copy.deepcopy(model)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, inp, out: seen.append(type(mod).__name__)
    )
    try:
        out = model(x)
        assert seen == ["FusedLinear", "FusedLinear", "FNN"], seen
        assert_close(out, ref.layers[1](ref.layers[0](x)), 1e-6, 1e-7, "the layers called")
        trainer = fnn.Trainer(model, loss="mse", lr=0.5)
        assert not trainer.fused(device)
        seen.clear()
        trainer.step(x, y)
        assert seen == ["FusedLinear", "FusedLinear", "FNN"], seen
    finally:
        handle.remove()
    assert trainer.fused(device)
    seen.clear()
    launches.calls.clear()
    trainer.step(x, y)
    assert seen == [] and launches.calls == ["network_bwd_kernel"], (seen, launches.calls)


def test_step_needs_grad_mode(device):
    """Under torch.no_grad() or torch.inference_mode() a step raises, as autograd's backward
    would, and changes nothing (before, the fused step trained there, and could turn the
    parameters into inference tensors that no later step could train)."""
    model = fnn.FNN([3, 4, 2], fusion="network", device=device)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)  # not flat
    before = [p.detach().clone() for p in model.parameters()]
    trainer = fnn.Trainer(model, loss="mse", lr=0.5)
    x, y = torch.rand(9, 3, device=device), torch.rand(9, 2, device=device)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), pytest.raises(RuntimeError, match="grad mode off"):
            trainer.step(x, y)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q) and not p.is_inference()
    trainer.step(x, y)  # and it trains afterwards
    assert not torch.equal(model.layers[0].weight, before[0])


def test_an_input_that_requires_grad_gets_its_gradient(device):
    """x.requires_grad: the step takes autograd's path, which fills x.grad (the fused step
    computes no dX: before, x.grad stayed None)."""
    torch.manual_seed(9)
    model = fnn.FNN([3, 4, 2], fusion="network", device=device, dtype=torch.float64)
    ref = copy.deepcopy(model)
    x = torch.rand(9, 3, device=device, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = torch.rand(9, 2, device=device, dtype=torch.float64)
    fnn.Trainer(model, loss="mse", lr=0.5).step(x, y)
    torch.nn.functional.mse_loss(ref(x_ref), y).backward()
    assert x.grad is not None and x.grad.abs().max() > 0
    assert_close(x.grad, x_ref.grad, 1e-12, 1e-14, "x.grad")


@pytest.mark.parametrize("switch", ["freeze", "fusion"])
def test_momentum_carries_across_path_changes(device, launches, switch):
    """A model that changes path between steps (a layer frozen and thawed, or its fusion
    switched) keeps its momentum, as one torch.optim.SGD run throughout would: the fused
    step's flat buffer is handed to the optimizer and back (each used to start from zero, or
    from its stale state)."""
    model, ref, x, y, trainer, opt = _fused_and_sgd(device, 8, seed=11)
    paths = []
    for phase, fused in enumerate((True, False, True, False)):
        for m in (model, ref):
            if switch == "freeze":
                m.layers[1].bias.requires_grad_(fused)
            elif m is model:
                m.fusion = "network" if fused else "layer"
        assert trainer.fused(device) == fused
        for step in range(2):
            launches.calls.clear()
            got = trainer.step(x, y)
            paths.append("fused" if launches.calls == ["network_bwd_kernel"] else "autograd")
            opt.zero_grad()
            want = torch.nn.functional.mse_loss(ref(x), y)
            want.backward()
            opt.step()
            assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item()), f"phase {phase}, step {step}"
            _assert_params(model, list(ref.parameters()), f"phase {phase}, step {step}", rtol=1e-12)
    assert paths == ["fused"] * 2 + ["autograd"] * 2 + ["fused"] * 2 + ["autograd"] * 2, paths


def test_float64_wider_than_64_trains_through_autograd(device, launches):
    """The one-launch step takes float64 up to width 64 (its width-128 kernel spills, see
    kernels.network.TRAIN_STEP_MAX_WIDTH_FLOAT64): a wider float64 network steps through the
    network path's forward and backward and torch.optim.SGD, with the same result as a
    float64 autograd step; the launcher itself refuses it before any launch."""
    from kernels.network import network_meta, network_train_step, param_count

    torch.manual_seed(11)
    model = fnn.FNN([3, 70, 2], fusion="network", dtype=torch.float64, device=device)
    ref = copy.deepcopy(model)
    x = torch.randn(9, 3, dtype=torch.float64, device=device)
    y = torch.rand(9, 2, dtype=torch.float64, device=device)
    trainer = fnn.Trainer(model, loss="mse", lr=0.1, momentum=0.9)
    assert not trainer.fused(device)
    narrow = fnn.FNN([3, 64, 2], dtype=torch.float64, device=device, fusion="network")
    assert fnn.Trainer(narrow).fused(device)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    launches.calls.clear()
    for _ in range(2):
        got = trainer.step(x, y)
        opt.zero_grad()
        want = torch.nn.functional.mse_loss(fnn.reference.fnn_forward(x, *_wb(ref), ["sigmoid"] * 2), y)
        want.backward()
        opt.step()
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    assert "network_bwd_kernel" in launches.calls  # the network path's backward, gradient mode
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    sizes, biased = [3, 70, 2], [True, True]
    params = torch.zeros(param_count(sizes, biased), dtype=torch.float64, device=device)
    before = params.clone()
    meta = torch.tensor(network_meta(sizes, ["sigmoid"] * 2, biased), dtype=torch.int32, device=device)
    launches.calls.clear()
    with pytest.raises(ValueError, match="float64 networks up to width 64"):
        network_train_step(x, y, params, meta, sizes, biased, "mse",
                           torch.tensor([0.1, 0.0], dtype=torch.float64, device=device), None,
                           torch.zeros(2, 2, dtype=torch.float64, device=device))
    assert launches.calls == [] and torch.equal(params, before)


def _wb(model):
    return [la.weight for la in model.layers], [la.bias for la in model.layers]


def test_autograd_step_follows_replaced_parameters(device):
    """On the autograd path (a layer-fused model here), load_state_dict(assign=True) replaces the
    Parameter objects; the step then trains the new ones, as a fresh torch.optim.SGD over them
    would (it stepped the old, detached ones before)."""
    torch.manual_seed(0)
    dt = torch.float64
    model = fnn.FNN([3, 4, 1], activation=["tanh", "sigmoid"], device=device, dtype=dt, fusion="layer")
    x, y = torch.randn(8, 3, device=device, dtype=dt), torch.rand(8, 1, device=device, dtype=dt)
    trainer = fnn.Trainer(model, loss="mse", lr=0.5, momentum=0.9)
    trainer.step(x, y)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    _steps_match_sgd(trainer, model, copy.deepcopy(model), x, y, "mse", 0.5, 0.9, rtol=1e-12)


class _Scaled(fnn.FNN):
    """An FNN subclass whose forward is its own, with one more parameter."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x):
        return super().forward(x) * self.scale


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_hooks_and_own_forwards_take_the_autograd_step(device, launches):
    """The fused step computes FNN.forward without calling any module: an FNN subclass with its
    own forward, and a model with a forward, forward-pre or backward hook (on the FNN or on a
    layer), train through autograd and torch.optim.SGD instead, hooks and all (before, the
    fused step skipped them: a wrong loss, an extra parameter never trained). Removing the
    hook brings the fused step back."""
    x = torch.rand(9, 3, device=device, dtype=torch.float64)
    y = torch.rand(9, 1, device=device, dtype=torch.float64)
    torch.manual_seed(6)
    scaled = _Scaled([3, 4, 1], fusion="network", device=device, dtype=torch.float64)
    trainer = fnn.Trainer(scaled, loss="mse", lr=0.5)
    assert not trainer.fused(device)
    _steps_match_sgd(trainer, scaled, copy.deepcopy(scaled), x, y, "mse", 0.5, 0.0, 1e-12)
    assert scaled.scale.item() != 0.5
    hooks = {
        "pre": lambda m: m.register_forward_pre_hook(lambda mod, inp: (inp[0] * 0.5,)),
        "forward": lambda m: m.register_forward_hook(lambda mod, inp, out: out * 0.5),
        "backward": lambda m: m.register_full_backward_hook(
            lambda mod, gi, go: (None if gi[0] is None else gi[0] * 0.5,)
        ),
    }
    for where in ("model", "layer"):
        for kind, register in hooks.items():
            torch.manual_seed(7)
            model = fnn.FNN([3, 4, 1], fusion="network", device=device, dtype=torch.float64)
            ref = copy.deepcopy(model)
            target, ref_target = (model, ref) if where == "model" else (model.layers[1], ref.layers[1])
            handle = register(target)
            register(ref_target)
            trainer = fnn.Trainer(model, loss="mse", lr=0.5, momentum=0.9)
            assert not trainer.fused(device), (where, kind)
            launches.calls.clear()
            _steps_match_sgd(trainer, model, ref, x, y, "mse", 0.5, 0.9, 1e-12)
            forwards = sum(name.endswith("fwd_kernel") for name in launches.calls)
            assert forwards >= 3, (where, kind, launches.calls)  # a forward launch per step: autograd's
            handle.remove()
            assert trainer.fused(device), (where, kind)


def test_a_step_under_autocast_follows_it(device, launches):
    """Under torch.autocast the step takes autograd's path, which follows autocast as
    FNN.forward does (before, the fused step computed in float32 and ignored it): the same
    parameters as autograd + torch.optim.SGD under the same autocast."""
    torch.manual_seed(8)
    model = fnn.FNN([3, 4, 1], fusion="network", device=device)
    ref = copy.deepcopy(model)
    x, y = torch.rand(9, 3, device=device), torch.rand(9, 1, device=device)
    trainer = fnn.Trainer(model, loss="mse", lr=0.5)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for _ in range(2):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            launches.calls.clear()
            got = trainer.step(x, y)
            assert launches.calls != ["network_bwd_kernel"], "the fused step ran under autocast"
            opt.zero_grad()
            want = torch.nn.functional.mse_loss(ref(x), y)
        want.backward()
        opt.step()
        assert got.dtype == want.dtype and torch.equal(got, want.detach())
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
