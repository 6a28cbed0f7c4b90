"""Compile for a CUDA GPU without one: a stand-in Triton driver that skips every launch.

Triton's compiler needs no GPU: given a target, it produces the PTX and the cubin on any
machine (ptxas ships in triton's wheel). What needs a GPU is the driver, which Triton asks
for the current target, device and stream, and which loads and launches the cubin. This
module swaps the driver for one that answers for a chosen target (sm_90a by default) and
records each launch instead of making it. fnn's launchers then run unchanged on CPU tensors
(a tensor is only a pointer, strides and a dtype to them), so:

- every kernel is specialised exactly as the launcher would on a GPU (constexprs, tiles,
  num_warps, num_stages, and the divisibility-by-16 attributes that Triton infers from the
  pointers and integers it is given), then compiled for the target: `bench.compile` reads
  registers, spills and shared memory off these cubins;
- the host time of a call is measurable without the GPU: everything fnn does per call,
  Triton's launcher included, except the final C launch (`bench.host`).

    with compile_only(90) as gpu:          # sm_90a; 80 for sm_80 (A100)
        y = fnn.linear_act(x_cpu, w_cpu)   # compiles, records, launches nothing
    gpu.launches                           # [Launch(kernel, grid, compiled), ...]

Nothing here touches real memory through a kernel: outputs come back as allocated
(uninitialised, or NaN under kernels.memory.POISON). TRITON_INTERPRET must be unset when the
kernels are first imported, else they are interpreted functions and never compile.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Per-target limits the driver would report (cudaDevAttrMaxSharedMemoryPerBlockOptin).
MAX_SHARED = {90: 232448, 80: 166912, 86: 101376, 89: 101376}
SM_COUNT = {90: 132, 80: 108, 86: 84, 89: 128}


@dataclass
class Launch:
    """One launch that was skipped: the kernel's name, its grid and its compiled metadata
    (num_warps, num_stages, shared, hash, ...)."""

    kernel: str
    grid: tuple[int, int, int]
    metadata: Any


class _Utils:
    """The subset of the driver's `utils` that CompiledKernel and the runtime call."""

    def __init__(self, capability: int) -> None:
        self.capability = capability

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads): nothing is loaded.
        return 1, 1, 0, 0, 1024

    def unload_module(self, module) -> None:
        pass

    def get_device_properties(self, device) -> dict[str, int]:
        cap = self.capability
        return {
            "max_shared_mem": MAX_SHARED.get(cap, 101376),
            "multiprocessor_count": SM_COUNT.get(cap, 100),
            "max_num_regs": 65536,
            "warpSize": 32,
            "sm_clock_rate": 0,
            "mem_clock_rate": 0,
            "mem_bus_width": 0,
        }


@dataclass
class FakeCudaDriver:
    """A Triton driver for a CUDA target of `capability` (90 = sm_90a, 80 = sm_80) that
    compiles everything it is asked to and launches nothing (see the module docstring).

    `launches` lists the skipped launches when `record` is set; `count` counts them always.
    The device id it reports is the capability, so Triton's per-device caches keep the
    specialisations of different targets apart within one process.
    """

    capability: int = 90
    record: bool = True
    launches: list[Launch] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", self.capability, 32)
        self.utils = _Utils(self.capability)

    # What triton.runtime.jit and triton.compiler ask of the active driver.
    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.capability

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_interface(self):
        import torch

        return torch.cuda

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("FakeCudaDriver cannot benchmark: no GPU")

    def launcher_cls(self, src, metadata):
        """The launcher of one compiled kernel: records (or counts) and returns."""
        name = getattr(src, "name", None) or getattr(metadata, "name", "?")

        if self.record:

            def launch(gx, gy, gz, stream, function, packed_metadata, *rest):
                self.count += 1
                self.launches.append(Launch(name, (gx, gy, gz), metadata))

        else:

            def launch(*args):
                self.count += 1

        return launch


_ACTIVE: FakeCudaDriver | None = None


def active() -> FakeCudaDriver | None:
    """The FakeCudaDriver in use, or None."""
    return _ACTIVE


@contextlib.contextmanager
def compile_only(capability: int = 90, record: bool = True) -> Iterator[FakeCudaDriver]:
    """Within the block, Triton compiles for CUDA `capability` and launches nothing, and fnn
    runs its Triton kernels for CPU tensors (its backend is forced to "triton")."""
    global _ACTIVE
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "compile_only needs compiled kernels: unset TRITON_INTERPRET before importing triton"
        )
    from triton.runtime.driver import driver

    import fnn.dispatch as dispatch

    fake = FakeCudaDriver(capability, record)
    previous = driver._active
    previous_backend = dispatch.FORCE_BACKEND
    driver.set_active(fake)
    dispatch.FORCE_BACKEND = "triton"
    _ACTIVE = fake
    try:
        yield fake
    finally:
        driver._active = previous
        dispatch.FORCE_BACKEND = previous_backend
        _ACTIVE = None

