"""Several processes: DistributedDataParallel and FSDP2 (`fully_shard`) around an FNN, under
both fusions, two processes (gloo, on the CPU) training on halves of a batch end with the
weights of one process training on the whole batch.

DDP averages the gradients of the ranks, and so does FSDP2's reduce-scatter; each rank's loss
is the mean over its half, so the averaged gradient is that of the mean over the whole batch.
On the network path DDP trains the FNN's own parameters, views of its flat buffer, which the
kernels read as they are; under FSDP2 the parameters are sharded DTensors, gathered for each
forward into FSDP's own buffers, which the network path concatenates per call (one cat), and
fnn.Trainer trains such a model through autograd (FSDP's hooks run).
One spawn runs every configuration, to keep the processes few. The children inherit
TRITON_INTERPRET from this process (conftest sets it without CUDA), so they run the same
backend; every wait has a timeout, so a stuck rendezvous fails the test instead of hanging.
"""

from __future__ import annotations

import datetime
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close
from torch.nn.parallel import DistributedDataParallel

import fnn

WORLD = 2
STEPS = 3
LR = 0.5
SIZES, ACTS = [4, 16, 3], ["tanh", "sigmoid"]
TIMEOUT_S = 180
# (wrapper, fusion, trained by): every configuration the ranks run.
CONFIGS = [
    ("ddp", "layer", "sgd"),
    ("ddp", "network", "sgd"),
    ("fsdp2", "layer", "sgd"),
    ("fsdp2", "network", "sgd"),
    ("fsdp2", "network", "trainer"),
]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, SIZES[0], generator=g, dtype=torch.float64)
    y = torch.rand(12, SIZES[-1], generator=g, dtype=torch.float64)
    return x, y


def _model(fusion: str, state=None) -> fnn.FNN:
    torch.manual_seed(0)
    model = fnn.FNN(SIZES, activation=ACTS, dtype=torch.float64, fusion=fusion)
    if state is not None:
        model.load_state_dict(state)
    return model


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, by: str) -> None:
    if by == "trainer":  # "mse" is the mean below; the Trainer's SGD is torch.optim.SGD's
        trainer = fnn.Trainer(model, loss="mse", lr=LR)
        assert not trainer.fused(x.device), "sharded parameters must train through autograd"
        trainer.fit(x, y, STEPS)
        return
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()


def _worker(rank: int, port: int, state: dict, out_dir: str) -> None:
    """One rank: each configuration trained on its half of the batch; saves the weights."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        x, y = _data()
        half = x.shape[0] // WORLD
        rows = slice(rank * half, (rank + 1) * half)
        results, paths = {}, {}
        # Which path each network-path forward took: "flat" (the FNN's flat buffer read as it
        # is) or "cat" (the parameters concatenated for the call).
        # Every network-path forward ends in kernels.network.forward_unchecked.
        import kernels.network

        calls, cats = [], []
        real_cat, real_forward = fnn.network.concat_parameters, kernels.network.forward_unchecked
        fnn.network.concat_parameters = lambda *a: cats.append(1) or real_cat(*a)

        def forward(*a):
            calls.append("cat" if cats else "flat")
            cats.clear()
            return real_forward(*a)

        kernels.network.forward_unchecked = forward
        for wrapper, fusion, by in CONFIGS:
            calls.clear()
            model = _model(fusion, state)
            if wrapper == "ddp":
                _train(DistributedDataParallel(model), x[rows], y[rows], by)
                weights = model.state_dict()
            else:
                fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
                assert model._flat is not None  # the pre-shard buffer: fully_shard does not say
                assert not model.flatten_parameters(), "sharded parameters must be left alone"
                assert model._flat is None, "flatten_parameters drops the pre-shard buffer"
                _train(model, x[rows], y[rows], by)
                weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
            results[(wrapper, fusion, by)] = {k: v.detach().clone() for k, v in weights.items()}
            views = fnn.network.flat_buffer(model, *fnn.network._layers_parameters(model)) is not None
            paths[(wrapper, fusion, by)] = [*calls, f"views={views}"]
        saved = {"results": results, "paths": paths, "backend": fnn.backend("cpu")}
        torch.save(saved, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[dict, list[dict]]:
    """The initial weights and what each rank saved, from one spawn of WORLD processes."""
    out = tmp_path_factory.mktemp("ranks")
    init = {k: v.clone() for k, v in _model("layer").state_dict().items()}
    ctx = mp.start_processes(
        _worker, args=(_free_port(), init, str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):  # raises if a rank failed
            assert time.monotonic() < deadline, f"ranks still running after {TIMEOUT_S} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return init, [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("config", CONFIGS, ids=["-".join(c) for c in CONFIGS])
def test_two_processes_match_one_process(ranks, config):
    init, saved = ranks
    wrapper, fusion, by = config
    single = _model(fusion, init)
    _train(single, *_data(), "sgd")
    expected = single.state_dict()
    for k in expected:
        assert not torch.equal(expected[k], init[k]), f"{k} did not change: the test would prove nothing"
    for rank in range(WORLD):
        assert saved[rank]["backend"] == fnn.backend("cpu"), "the ranks ran another backend than this process"
        got = saved[rank]["results"][config]
        # Proof of which path ran: under DDP each network-path forward reads the FNN's flat
        # buffer; under FSDP2 it concatenates the gathered parameters; the layer path neither.
        # After training, DDP's FNN still holds its parameters as views of its flat buffer.
        want = {"layer": [], "network": ["flat" if wrapper == "ddp" else "cat"] * STEPS}[fusion]
        want.append(f"views={wrapper == 'ddp'}")
        assert saved[rank]["paths"][config] == want, (config, saved[rank]["paths"][config])
        for k, v in expected.items():
            assert_close(got[k], v, rtol=1e-12, atol=1e-14, what=f"{wrapper} {fusion} {by}, rank {rank}: {k}")
