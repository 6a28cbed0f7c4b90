"""What the phase-2 items of issue 9 would save, measured on the code as it is (before them).

    python -m bench.host_whatif [--rep MS] [--cases NAME ...] [--out FILE.json]

Each host case of `bench.host` is timed as it is, then with one change patched in for the
duration of its measurement (nothing in fnn/ or kernels/ is edited):

- "configs": tile configs cached per shape (functools.lru_cache on kernels.configs'
  functions as the launchers see them) and `triton.cdiv` / `triton.next_power_of_2`
  replaced by plain Python arithmetic (they are Triton constexpr functions);
- "launch cache": every `kernel[grid](...)` served by kernels.launch (the grid evaluated
  first, as the phase-2 launchers will pass a tuple);
- "no custom op": the autograd Functions call the launchers directly instead of the
  registered `torch.ops.fnn.*` ops (what eager mode would do, torch.compile keeping the ops);
- "all three" together; "all three + inference path" adds `fnn.linear_act` without the
  autograd Function when no gradient is needed (it changes only the forward-only cases).

All variants of a case, and eager, are timed in the same rounds (one batch of each per
round, the order rotating), so a change of load on a shared machine hits them alike. This module is a
measurement of the pre-phase-2 code; the patches are not how phase 2 will be written.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .host import CASES, LAUNCH_US, Settings, _batch, _stats, one_thread


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@contextlib.contextmanager
def cached_configs() -> Iterator[None]:
    import triton

    from kernels import configs, linear_act

    with contextlib.ExitStack() as stack:
        stack.enter_context(
            _patched(linear_act, "tile_config", functools.lru_cache(None)(configs.tile_config))
        )
        stack.enter_context(
            _patched(linear_act, "weight_grad_split", functools.lru_cache(None)(configs.weight_grad_split))
        )
        stack.enter_context(_patched(triton, "cdiv", _cdiv))
        stack.enter_context(_patched(triton, "next_power_of_2", _next_power_of_2))
        yield


@contextlib.contextmanager
def launch_cache() -> Iterator[None]:
    from triton.runtime.jit import JITFunction

    from kernels.launch import launcher

    fast: dict[Any, Any] = {}

    def getitem(self, grid):
        run = fast.get(self)
        if run is None:
            run = fast[self] = launcher(self)

        def call(*args, **kwargs):
            return run(tuple(grid(kwargs) if callable(grid) else grid), *args, **kwargs)

        return call

    with _patched(JITFunction, "__getitem__", getitem):
        yield


@contextlib.contextmanager
def no_custom_op() -> Iterator[None]:
    import fnn.ops
    from kernels import linear_act

    with contextlib.ExitStack() as stack:
        for name in ("linear_act_forward", "linear_act_backward_input", "linear_act_backward_weight"):
            stack.enter_context(_patched(fnn.ops, name, getattr(linear_act, name)))
        yield


@contextlib.contextmanager
def all_three() -> Iterator[None]:
    with cached_configs(), launch_cache(), no_custom_op():
        yield


@contextlib.contextmanager
def all_four() -> Iterator[None]:
    """All three, and `fnn.linear_act` without the autograd Function when no gradient is
    needed: the argument check once, then the launcher (the inference path)."""
    import fnn
    from kernels import linear_act
    from kernels.checks import check_linear_args

    full = fnn.linear_act

    def inference(x, weight, bias=None, activation="sigmoid"):
        if torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        ):
            return full(x, weight, bias, activation)
        check_linear_args(x, weight, bias, activation)
        y = linear_act.linear_act_forward(x.reshape(-1, x.shape[-1]), weight, bias, activation)
        return y.view(*x.shape[:-1], weight.shape[0])

    with all_three(), _patched(fnn, "linear_act", inference):
        yield


VARIANTS = {
    "as is": contextlib.nullcontext,
    "configs": cached_configs,
    "launch cache": launch_cache,
    "no custom op": no_custom_op,
    "all three": all_three,
    "all three + inference path": all_four,
}


def measure(names: Sequence[str] | None, settings: Settings, log=print) -> list[dict[str, Any]]:
    """Per case: every variant (and eager) timed in the same rounds, the order rotating from
    round to round, so that a change of load hits them alike; medians over the rounds."""
    from .fakecuda import compile_only

    rows = []
    with compile_only(90, record=False) as gpu, one_thread():
        for name in names or list(CASES):
            case = CASES[name]
            fnn_call, eager_call = case.build(torch.device("cpu"))
            fnn_call()
            impls = list(VARIANTS) + ["eager"]
            calls, launches = {}, {}
            for impl in impls:
                fn = eager_call if impl == "eager" else fnn_call
                with VARIANTS.get(impl, contextlib.nullcontext)():
                    before = gpu.count
                    fn()
                    launches[impl] = gpu.count - before
                    for _ in range(settings.warmup):
                        fn()
                    calls[impl] = max(settings.min_calls, int(settings.batch_s / max(_batch(fn, 10), 1e-7)))
            samples: dict[str, list[float]] = {impl: [] for impl in impls}
            gc.collect()
            gc.disable()
            try:
                for r in range(settings.rounds):
                    for impl in impls[r % len(impls) :] + impls[: r % len(impls)]:
                        fn = eager_call if impl == "eager" else fnn_call
                        with VARIANTS.get(impl, contextlib.nullcontext)():
                            samples[impl].append(_batch(fn, calls[impl]))
            finally:
                gc.enable()
            stats = {impl: _stats(v) for impl, v in samples.items()}
            base = stats["as is"]["median"]
            row: dict[str, Any] = {"name": name, "eager_us": stats["eager"], "variants": {}}
            for variant in VARIANTS:
                st = stats[variant]
                row["variants"][variant] = {
                    "fnn_us": st,
                    "saving_us": base - st["median"],
                    "launches": launches[variant],
                }
            log(
                f"{name}: "
                + ", ".join(f"{k} {v['fnn_us']['median']:.1f}" for k, v in row["variants"].items())
                + f"; eager {stats['eager']['median']:.1f} us"
            )
            rows.append(row)
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = " | ".join(VARIANTS)
    lines = [f"| case | {head} | eager µs |", "|---|" + "---|" * (len(VARIANTS) + 1)]
    for r in rows:
        v = r["variants"]
        cells = [f"{v['as is']['fnn_us']['median']:.1f}"] + [
            f"{v[k]['fnn_us']['median']:.1f} ({-v[k]['saving_us']:+.1f})" for k in list(VARIANTS)[1:]
        ]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['eager_us']['median']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_whatif", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES))
    p.add_argument("--rep", type=float, default=600.0, help="ms per implementation, case and variant")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = measure(args.cases, Settings.for_budget(args.rep, tiny=False))
    print(f"\nfnn host µs per call, launches skipped (add {LAUNCH_US:g} µs per launch); (change)\n")
    print(table(rows))
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
