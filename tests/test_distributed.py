"""DistributedDataParallel: two processes (gloo, on the CPU) training an FNN on halves of a
batch end with the weights of one process training on the whole batch.

DDP averages the gradients of the ranks, and each rank's loss is the mean over its half, so
the averaged gradient is that of the mean over the whole batch. The children inherit
TRITON_INTERPRET from this process (conftest sets it without CUDA), so they run the same
backend; every wait has a timeout, so a stuck rendezvous fails the test instead of hanging.
"""

from __future__ import annotations

import datetime
import socket
import time
from pathlib import Path

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
TIMEOUT_S = 120


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, SIZES[0], generator=g, dtype=torch.float64)
    y = torch.rand(12, SIZES[-1], generator=g, dtype=torch.float64)
    return x, y


def _model(state=None) -> fnn.FNN:
    torch.manual_seed(0)
    model = fnn.FNN(SIZES, activation=ACTS, dtype=torch.float64)
    if state is not None:
        model.load_state_dict(state)
    return model


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()


def _worker(rank: int, port: int, state: dict, out_dir: str) -> None:
    """One rank: DDP around an FNN, trained on its half of the batch; saves its weights."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        x, y = _data()
        half = x.shape[0] // WORLD
        rows = slice(rank * half, (rank + 1) * half)
        model = _model(state)
        _train(DistributedDataParallel(model), x[rows], y[rows])
        torch.save(
            {"state": model.state_dict(), "backend": fnn.backend("cpu")},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path):
    init = {k: v.clone() for k, v in _model().state_dict().items()}
    ctx = mp.start_processes(
        _worker, args=(_free_port(), init, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):  # raises if a rank failed
            assert time.monotonic() < deadline, f"DDP ranks still running after {TIMEOUT_S} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()

    single = _model(init)
    _train(single, *_data())
    expected = single.state_dict()
    for k in expected:
        assert not torch.equal(expected[k], init[k]), f"{k} did not change: the test would prove nothing"
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["backend"] == fnn.backend("cpu"), "the ranks ran another backend than this process"
        for k, v in expected.items():
            assert_close(saved["state"][k], v, rtol=1e-12, atol=1e-14, what=f"rank {rank}: {k}")

