"""CUDA graphs: FusedLinear and FNN, forward and backward, captured with torch.cuda.graph and
replayed with the results of eager mode.

Capture needs launchers that never wait on the GPU (no .item(), no data-dependent shapes, no
copies to the host) and kernels compiled before capture (the block shapes come from the
problem sizes in kernels.configs, so there is no autotuning to finish). The CUDA test checks
capture itself; the CPU tests check the no-host-sync property on every dispatched op of the
launchers, the ops and the autograd Functions, and read the launchers' source.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from helpers import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import fnn

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Capture and replay on the GPU
# ---------------------------------------------------------------------------------------------


def _step(model, x, dy):
    y = model(x)
    y.backward(dy)
    return y


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("which", ["FusedLinear", "FNN-layer", "FNN-network"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capture_and_replay_forward_backward(which, dtype):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    if which == "FusedLinear":
        model = fnn.FusedLinear(96, 80, activation="tanh", device=dev, dtype=dtype)
        n_out = 80
    else:
        fusion = which.split("-")[1]
        acts = ["relu", "tanh", "sigmoid"]
        model = fnn.FNN([96, 128, 64, 10], acts, device=dev, dtype=dtype, fusion=fusion)
        n_out = 10
    params = list(model.parameters())
    static_x = torch.randn(300, 96, device=dev, dtype=dtype, requires_grad=True)
    static_dy = torch.randn(300, n_out, device=dev, dtype=dtype)

    # Warm up on a side stream: every kernel is compiled before capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            static_x.grad = None
            for p in params:
                p.grad = None
            _step(model, static_x, static_dy)
    torch.cuda.current_stream().wait_stream(side)

    static_x.grad = None
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = _step(model, static_x, static_dy)

    for seed in (1, 2):  # new data in the static buffers, replay, compare with eager
        g = torch.Generator(device=dev).manual_seed(seed)
        with torch.no_grad():
            static_x.copy_(torch.randn(static_x.shape, generator=g, device=dev, dtype=dtype))
            static_dy.copy_(torch.randn(static_dy.shape, generator=g, device=dev, dtype=dtype))
        graph.replay()
        replayed = [static_y.detach().clone(), static_x.grad.clone()] + [p.grad.clone() for p in params]

        x = static_x.detach().clone().requires_grad_(True)
        saved_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        eager = [_step(model, x, static_dy).detach(), x.grad] + [p.grad for p in params]
        for p, grad in zip(params, saved_grads, strict=True):
            p.grad = grad  # the graph's gradient buffers, for the next replay
        for i, (r, e) in enumerate(zip(replayed, eager, strict=True)):
            assert_close(r, e, rtol=0, atol=0, what=f"{which} {dtype} replay {seed}, result {i}")


# ---------------------------------------------------------------------------------------------
# No host synchronisation, checked on the CPU
# ---------------------------------------------------------------------------------------------


class NoHostSync(TorchDispatchMode):
    """Fails on every dispatched op that makes the host wait for the device: reading a value
    (.item(), bool(tensor)), an output shape that depends on the data (nonzero, masked_select),
    or a copy between devices. Records the ops it saw."""

    FORBIDDEN = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.allclose"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.seen.add(name)
        tags = getattr(func, "tags", ())
        if name in self.FORBIDDEN or torch.Tag.data_dependent_output in tags:
            raise AssertionError(f"host synchronisation: {func} reads a tensor's value on the host")
        if torch.Tag.dynamic_output_shape in tags:
            raise AssertionError(f"host synchronisation: {func} has a data-dependent output shape")
        out = func(*args, **kwargs)
        devices = {
            t.device for t in (*args, *kwargs.values(), out) if isinstance(t, torch.Tensor)
        }
        if len(devices) > 1:
            moved = sorted(map(str, devices))
            raise AssertionError(f"host synchronisation: {func} moves data between {moved}")
        return out


def test_no_host_sync_mode_catches_syncs():
    """The checker itself: each kind of synchronisation fails. (`.tolist()` reads memory without
    dispatching any op, so only the source check below can see it.)"""
    t = torch.arange(4.0)
    for bad in (lambda: t.sum().item(), lambda: bool(t[0]), lambda: t.nonzero(), lambda: t[t > 1],
                lambda: t.to("meta")):
        with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
            bad()


def _devices(device, monkeypatch):
    """The kernels on `device` (the GPU, else the CPU's interpreter), then the CPU reference."""
    yield device
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert fnn.backend("cpu") == "reference"
    yield torch.device("cpu")


@pytest.mark.parametrize("which", ["linear_act", "FusedLinear", "FNN-layer", "FNN-network"])
def test_functions_do_not_sync(which, device, monkeypatch):
    """Forward and backward of the public entry points on every backend at hand: the autograd
    Functions and the fnn ops they call dispatch nothing that waits on the device."""
    for dev in _devices(device, monkeypatch):
        torch.manual_seed(0)
        model = {
            "linear_act": fnn.FusedLinear(6, 5, activation="relu", device=dev),
            "FusedLinear": fnn.FusedLinear(6, 5, activation="sigmoid", device=dev),
            "FNN-layer": fnn.FNN([6, 16, 5], activation=["tanh", "sigmoid"], device=dev, fusion="layer"),
            "FNN-network": fnn.FNN([6, 16, 5], activation=["tanh", "sigmoid"], device=dev, fusion="network"),
        }[which]
        run = model
        if which == "linear_act":
            run = lambda x, m=model: fnn.linear_act(x, m.weight, m.bias, "relu")
        x = torch.randn(2, 7, 6, device=dev, requires_grad=True)
        dy = torch.ones(2, 7, 5, device=dev)
        if which == "FNN-network":  # the first call makes the cached meta tensor (a copy)
            run(x).backward(dy)
            x.grad = None
        mode = NoHostSync()
        with mode:
            run(x).backward(dy)
        assert x.grad is not None and all(p.grad is not None for p in model.parameters())
        assert any(op.startswith("fnn.") for op in mode.seen), mode.seen


def test_launchers_do_not_sync(device):
    """The launchers' own tensor work (allocation, NaN poisoning, the split weight-gradient's
    sum of partials) runs under the checker too; the empty-batch paths as well."""
    from kernels import linear_act as launchers

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g).to(device) for s in ((40, 6), (5, 6), (5,)))
    with NoHostSync():
        y = launchers.linear_act_forward(x, w, b, "sigmoid")
        launchers.linear_act_backward_input(y, y, w, "sigmoid", torch.tanh(x), "tanh")
        launchers.linear_act_backward_weight(y, y, x, "sigmoid", True, split=3)
        e = x[:0]
        y0 = launchers.linear_act_forward(e, w, None, "relu")
        launchers.linear_act_backward_input(y0, y0, w, "relu")
        launchers.linear_act_backward_weight(y0, y0, e, "relu", True)


SYNCING_CALLS = {"item", "tolist", "cpu", "numpy", "synchronize", "nonzero", "masked_select", "is_nonzero"}


@pytest.mark.parametrize("path", ["kernels/linear_act.py", "kernels/configs.py", "kernels/memory.py",
                                  "fnn/ops.py", "fnn/functional.py", "fnn/modules.py",
                                  "fnn/network.py", "fnn/network_ops.py", "kernels/network.py"])
def test_source_has_no_syncing_calls(path):
    """No `.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `synchronize()`, `nonzero()` in the code
    a forward or backward runs (the dispatch check above sees only what the CPU run reaches)."""
    tree = ast.parse((ROOT / path).read_text())
    found = [
        f"{path}:{node.lineno} .{node.func.attr}()"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in SYNCING_CALLS
    ]
    assert not found, f"calls that synchronise with the device: {found}"
