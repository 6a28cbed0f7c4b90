"""GPU benchmarks of fnn against PyTorch eager, torch.compile and cuBLAS: `python -m bench`.

    from bench import run
    results, status = run(["fwd_small_bf16"], tiny=True)   # CPU, tiny shapes (tests)

The cases live in bench.cases (a registry: add one with `register(linear_case(...))`).
"""

from .cases import CASES, Case, Goal, at_most, bandwidth, linear_case, network_case, register, select, speedup


def run(*args, **kwargs):
    """bench.runner.run (imported lazily: it needs triton)."""
    from .runner import run as _run

    return _run(*args, **kwargs)


__all__ = [
    "CASES",
    "Case",
    "Goal",
    "at_most",
    "bandwidth",
    "linear_case",
    "network_case",
    "register",
    "run",
    "select",
    "speedup",
]
