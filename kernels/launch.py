"""A per-specialization launch cache for @triton.jit kernels.

`kernel[grid](*args, **kwargs)` goes through `JITFunction.run` on every call: it binds the
arguments, asks Triton's C specializer for every argument's type and attributes, builds a
string key, looks the kernel up, builds the launch metadata and only then calls the compiled
kernel's launcher. For a small problem that is most of the host time of a launch.

    fwd = launcher(my_kernel)                    # once, at import (no device query)
    fwd((grid_x,), x, w, y, M, N, BLOCK=64, num_warps=4)

The first call of a specialization goes through Triton's normal `kernel[grid](...)` path
(compile or cache lookup, launch); the cache then keeps that CompiledKernel's launcher, and
later calls with the same specialization call it directly with the same arguments Triton
would pass it. The key is complete, as Triton's own is (it may be finer, never coarser):

- every tensor argument's dtype and whether its address is a multiple of 16;
- every int argument's Triton specialization: 1 becomes a constexpr, a multiple of 16 gets
  the divisibility attribute, and the range picks i32, i64 or u64 (the small ints -15..15
  are keyed by value); bools, floats and None are keyed by type;
- every constexpr's value and type, num_warps, num_stages and maxnreg;
- the current device of the active Triton driver (a change of driver empties the cache):
  Triton keys its kernels on that device, not on the tensors' (a tensor on another device
  is launched as Triton's own path would launch it).

The stream is read on every call (it is not part of the kernel), so CUDA-graph capture on a
side stream works; the fast path allocates no tensor and never synchronises.

Building that complete key costs about as much as the rest of the call for a kernel with 30
arguments, so a launcher that knows what decides its kernel's specialization can name it:

    fwd.keyed(key, (grid_x,), x, w, y, M, N, 64, num_warps=4)   # constexprs may be positional

`key` (any hashable) must determine every argument's dtype, every int's specialization and
every constexpr, num_warps, num_stages and maxnreg: the launchers here pass their sizes, strides,
dtype, flags and matmul precision. The cache itself checks the pointers' 16-byte alignment
(a misaligned one takes the full-key path), the hooks and options below, the driver and the
current device. A key's first call looks the full key up (or takes Triton's path) and maps
the key to that entry; later calls go straight to it. FNN_VERIFY_LAUNCH_KEYS=1 (or
`verify_keys(True)`) also computes the full key on every such hit and raises if a caller key
ever maps to a specialization its arguments do not have (the tests run with it).

The globals a kernel read when it was compiled are checked as Triton checks them, on every
launch, but by identity once a full comparison has passed (a rebound global is compared again).

A row of caller-keyed launches made in one go (fnn's layer programs: a network's forward or
backward) can share what does not change between them:

    s = session()                                   # launch hooks checked, device, stream read
    fwd.direct(s, key, (grid_x,), x, w, y, M, N, 64, 4)   # keyed's hit, without those reads

`session()` is None when a launch hook, a debug or instrumentation mode or a stage-inspection
hook is set; `direct` with None, or on a key not cached yet, a misaligned pointer, another
driver, a kernel's own debug flag or pre-run hooks, takes `keyed`'s path. Launch options may
follow the arguments positionally (num_warps, num_stages, maxnreg), in `keyed` and `direct`.

The normal path serves every call, uncached, when anything the key does not cover is in
play: Triton's interpreter (TRITON_INTERPRET=1), launch enter/exit hooks, pre-run hooks,
TRITON_DEBUG or a kernel's debug flag, an instrumentation mode, a pipeline-inspection hook,
options other than num_warps/num_stages/maxnreg, a grid that is not a tuple, or an
argument of another type (a tensor descriptor, a tuple). Triton 3.6 and 3.9 call the
compiled kernel's launcher the same way:
`run(grid0, grid1, grid2, stream, function, packed_metadata, launch_metadata,
enter_hook, exit_hook, *all_arguments_in_signature_order)`.
"""

from __future__ import annotations

import keyword
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import triton
from triton import knobs
from triton.runtime.driver import driver

__all__ = ["CachedLauncher", "UnsupportedArgument", "launcher", "session", "value_spec", "verify_keys"]

# A cache holds at most this many specializations; past it, it starts again empty (a
# workload that cycles through more than this many is served, only slower).
MAX_ENTRIES = 512
# Tests: every caller-key hit (`launch.keyed`) also computes the full key and checks that the
# two agree (FNN_VERIFY_LAUNCH_KEYS=1 at import, or verify_keys(True) later).
VERIFY = os.environ.get("FNN_VERIFY_LAUNCH_KEYS") == "1"
_STATES: list[CachedLauncher] = []

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT64_MAX = 2**64 - 1


class UnsupportedArgument(Exception):
    """An argument the key does not describe: the call takes the normal path, uncached."""


def value_spec(a: object) -> Any:
    """The key part of a non-constexpr argument that is not a plain int in the i32 range.

    Matches what Triton specializes on: tensors by dtype and 16-byte alignment; ints by
    range (i32 / i64 / u64), == 1 and divisibility by 16; bools, floats and None by type.
    """
    if isinstance(a, torch.Tensor):
        return ("tensor", a.dtype, a.data_ptr() & 15 == 0)
    cls = a.__class__
    if cls is int:
        if -16 < a < 16:
            return a
        if _INT32[0] <= a <= _INT32[1]:
            return (a & 15) | 16
        if _INT64[0] <= a <= _INT64[1]:
            return ("i64", a & 15 == 0)
        if 0 <= a <= _UINT64_MAX:
            return ("u64", a & 15 == 0)
        raise UnsupportedArgument(a)  # Triton rejects it too: let its path say so
    if cls is bool or cls is float or a is None:
        return (cls,)
    raise UnsupportedArgument(a)


# The end of `launch` and `keyed` once they hold a cache entry `_hit` for device `_dev`:
# Triton's check of the kernel's globals (by identity once passed), then its launcher.
_RUN_HIT = """    _g = _fn.used_global_vals
    if _g:  # the globals the kernel read when compiled: still the objects that passed the check?
        _seen = _state.seen_globals
        if _seen[0] is not _g or len(_g) != _seen[1]:
            _state.check_globals()
        else:
            for _gd, _name, _obj in _seen[2]:
                if _gd.get(_name, _gd) is not _obj:
                    _state.check_globals()
                    break
    _n = len(_grid)
    _hit[0](_grid[0], _grid[1] if _n > 1 else 1, _grid[2] if _n > 2 else 1,
            _STREAM_, _hit[1], _hit[2], None, None, None, {args})
    return _hit[3]
"""

_TEMPLATE = """
def full_key(_d, {params}, num_warps=None, num_stages=None, maxnreg=None):
    return (_d.get_current_device(), {key}, num_warps, num_warps.__class__, num_stages,
            num_stages.__class__, maxnreg, maxnreg.__class__)


def launch(_grid, {params}, num_warps=None, num_stages=None, maxnreg=None, **_options):
    _d = _driver.active
    _hit = _key = None
    try:
        if _grid.__class__ is tuple and not (
            _options or _rt.debug or _fn.debug or _comp.instrumentation_mode or _fn.pre_run_hooks
            or _rt.launch_enter_hook.calls or _rt.launch_exit_hook.calls
            or _rt.add_stages_inspection_hook is not None
        ):
            if _state.driver is not _d:  # another driver: what was cached belongs to the old one
                _state.use_driver(_d)
            _key = (_d.get_current_device(), {key}, num_warps, num_warps.__class__, num_stages,
                    num_stages.__class__, maxnreg, maxnreg.__class__)
            _hit = _cache.get(_key)
    except (AttributeError, TypeError, UnsupportedArgument):
        _key = None
    if _hit is None:
        return _slow(_key, _grid, ({args}), num_warps, num_stages, maxnreg, _options)
    _dev = _key[0]
""" + _RUN_HIT.replace("_STREAM_", "_d.get_current_stream(_dev)") + """


def keyed(_ukey, _grid, {params}, num_warps=None, num_stages=None, maxnreg=None):
    _d = _driver.active
    _hit = None
    try:
        if (
            _grid.__class__ is tuple and _state.driver is _d and ({align}) & 15 == 0 and not (
                _rt.debug or _fn.debug or _comp.instrumentation_mode or _fn.pre_run_hooks
                or _rt.launch_enter_hook.calls or _rt.launch_exit_hook.calls
                or _rt.add_stages_inspection_hook is not None
            )
        ):
            _dev = _d.get_current_device()
            _hit = _ucache.get((_dev, _ukey))
            if _hit is None:  # this caller key's first call: the full key finds (or makes) the entry
                _key = full_key(_d, {args}, num_warps, num_stages, maxnreg)
                _hit = _cache.get(_key)
                if _hit is None:
                    _kernel = _slow(_key, _grid, ({args}), num_warps, num_stages, maxnreg, {{}})
                    _hit = _cache.get(_key)
                    if _hit is not None:
                        _state.remember(_dev, _ukey, _hit)
                    return _kernel
                _state.remember(_dev, _ukey, _hit)
            elif _state.verify:
                _state.check_caller_key(_ukey, _hit, full_key(_d, {args}, num_warps, num_stages, maxnreg))
    except (AttributeError, TypeError, UnsupportedArgument):
        _hit = None
    if _hit is None:
        return launch(_grid, {args}, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)
""" + _RUN_HIT.replace("_STREAM_", "_d.get_current_stream(_dev)") + """


def direct(_session, _ukey, _grid, {params}, num_warps=None, num_stages=None, maxnreg=None):
    if _session is None:
        return keyed(_ukey, _grid, {args}, num_warps, num_stages, maxnreg)
    _d, _dev, _stream = _session
    _hit = _ucache.get((_dev, _ukey))
    if (
        _hit is None or _state.driver is not _d or ({align}) & 15 or _fn.debug or _fn.pre_run_hooks
        or _grid.__class__ is not tuple
    ):
        return keyed(_ukey, _grid, {args}, num_warps, num_stages, maxnreg)
    if _state.verify:
        _state.verify_direct(_session, _ukey, _hit, full_key(_d, {args}, num_warps, num_stages, maxnreg))
""" + _RUN_HIT.replace("_STREAM_", "_stream")


class CachedLauncher:
    """Statistics and state of one kernel's launch cache (see `launcher`)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.cache: dict[tuple, tuple] = {}  # full key -> (run, function, packed metadata, kernel)
        self.ucache: dict[tuple, tuple] = {}  # (device, caller key) -> the same entries (`keyed`)
        self.misses = 0  # calls that took Triton's path, their specialization then cached
        self.fallbacks = 0  # calls that took Triton's path uncached
        self.driver: Any = None  # the Triton driver the cached launchers belong to
        # Tests: on every caller-key hit, also compute the full key and check that it maps to
        # the same entry (AssertionError if a caller key ever serves a stale specialization).
        self.verify = VERIFY
        self.seen_globals: tuple = (None, 0, ())  # see check_globals
        _STATES.append(self)

    def check_globals(self) -> None:
        """Triton's check that the globals the kernel read when it was compiled are unchanged
        (RuntimeError if one is not); then remember the objects that passed, so that later
        launches compare identities only (a global rebound to another object is checked again)."""
        g = self.fn.used_global_vals
        _check_globals(self.fn)
        self.seen_globals = (g, len(g), tuple((gd, name, gd.get(name, gd)) for (name, _), (_, gd) in g.items()))

    def verify_direct(self, session: tuple, ukey: Any, entry: tuple, key: tuple) -> None:
        """The caller-key check for a `direct` launch: the session is still the driver's
        current device and stream, and the caller key maps to its arguments' specialization."""
        d, device, stream = session
        if d.get_current_device() != device or d.get_current_stream(device) != stream:
            raise AssertionError(f"kernels.launch: a session of {self.fn.__name__} outlived its device or stream")
        self.check_caller_key(ukey, entry, key)

    def check_caller_key(self, ukey: Any, entry: tuple, key: tuple) -> None:
        """The caller-key check (`verify`): caller key `ukey`'s entry is the one its arguments'
        full key `key` maps to, else AssertionError."""
        if self.cache.get(key) is not entry:
            raise AssertionError(
                f"kernels.launch: caller key {ukey!r} of {self.fn.__name__} maps to a specialization "
                "its arguments do not have"
            )

    def use_driver(self, driver: Any) -> None:
        """Start an empty cache for another active Triton driver."""
        self.clear()
        self.driver = driver

    def remember(self, device: Any, ukey: Any, entry: tuple) -> None:
        """Serve caller key `ukey` on `device` with `entry` (a full key's entry) from now on."""
        if len(self.ucache) >= MAX_ENTRIES:
            self.ucache.clear()
        self.ucache[(device, ukey)] = entry

    def clear(self) -> None:
        """Forget every cached specialization (the next call of each takes Triton's path)."""
        self.cache.clear()
        self.ucache.clear()


def session() -> tuple | None:
    """What the launches of one call share, read once for all of them: (driver, device,
    stream) for `launch.direct`, or None when a launch must take `keyed`'s path (a debug or
    instrumentation mode, a launch hook or a stage-inspection hook is set). Valid for launches
    made right after it, in a row, by the thread that made it: fnn uses one per forward or
    backward of a layer program. A kernel's own debug flag and pre-run hooks, its cache's
    driver, the pointers' alignment and the globals are still checked on every launch."""
    rt = knobs.runtime
    if (
        rt.debug or knobs.compilation.instrumentation_mode or rt.launch_enter_hook.calls
        or rt.launch_exit_hook.calls or rt.add_stages_inspection_hook is not None
    ):
        return None
    d = driver.active
    device = d.get_current_device()
    return (d, device, d.get_current_stream(device))


def verify_keys(flag: bool) -> None:
    """Turn the caller-key check (CachedLauncher.verify) on or off for every launcher."""
    global VERIFY
    VERIFY = flag
    for state in _STATES:
        state.verify = flag


def _check_globals(fn: Any) -> None:
    """Triton's check that the globals a kernel read when it was compiled are unchanged."""
    missing = object()
    for (name, _), (val, globals_dict) in fn.used_global_vals.items():
        if (new := globals_dict.get(name, missing)) != val:
            raise RuntimeError(
                f"Global variable {name} has changed since we compiled this kernel, from {val} to {new}"
            )


def launcher(fn: Any, tensor_params: Iterable[str] | None = None) -> Callable[..., Any]:
    """A launch function for the @triton.jit kernel `fn`, with a per-specialization cache.

    `launch(grid, *args, num_warps=None, num_stages=None, maxnreg=None, **kwargs)` does what
    `fn[grid](*args, num_warps=..., num_stages=..., maxnreg=..., **kwargs)` does (and returns the
    CompiledKernel as it does); `grid` is a tuple of one to three ints (a callable grid or
    other options take the normal path every time). `tensor_params` names the parameters
    that take tensors (default: those ending in `_ptr`, the house naming); it only decides
    which key expression is tried first, never correctness.

    `launch.keyed(key, grid, *args, num_warps=None, num_stages=None, maxnreg=None)` launches the
    same way with the caller's key (see the module docstring); it takes no other option.
    `launch.direct(session, key, grid, *args, ...)` is `keyed` inside a `session()` (under the
    interpreter, Triton's path every time, as `keyed`).

    The returned function carries `.state` (a CachedLauncher: the cache, counters, clear()).
    Under Triton's interpreter (or for anything that is not a JITFunction: an autotuner,
    heuristics) it is a thin wrapper over `fn[grid](...)`.
    """
    state = CachedLauncher(fn)
    params = getattr(fn, "params", None)
    if not isinstance(fn, triton.runtime.jit.JITFunction) or params is None:

        def passthrough(grid, *args, **kwargs):
            state.fallbacks += 1
            return fn[grid](*args, **kwargs)

        arg_names = getattr(fn, "arg_names", None)
        n_args = len(arg_names) if arg_names is not None else None

        def passthrough_keyed(ukey, grid, *args, **kwargs):
            if n_args is not None and len(args) > n_args:  # the launch options, given positionally
                options = zip(("num_warps", "num_stages", "maxnreg"), args[n_args:], strict=False)
                kwargs.update((name, v) for name, v in options if v is not None)
                args = args[:n_args]
            return passthrough(grid, *args, **kwargs)

        def passthrough_direct(session, ukey, grid, *args, **kwargs):
            return passthrough_keyed(ukey, grid, *args, **kwargs)

        passthrough.keyed = passthrough_keyed  # type: ignore[attr-defined]
        passthrough.direct = passthrough_direct  # type: ignore[attr-defined]
        passthrough.state = state  # type: ignore[attr-defined]
        return passthrough

    names = [p.name for p in params]
    for name in names:
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            raise ValueError(f"launcher: cannot generate code for kernel parameter {name!r}")
        if name in ("num_warps", "num_stages", "maxnreg"):
            raise ValueError(f"launcher: kernel parameter {name!r} clashes with a launch option")
    tensors = set(tensor_params) if tensor_params is not None else {n for n in names if n.endswith("_ptr")}
    namespace: dict[str, Any] = {
        "_driver": driver,
        "_rt": knobs.runtime,
        "_comp": knobs.compilation,
        "_fn": fn,
        "_cache": state.cache,
        "_ucache": state.ucache,
        "_state": state,
        "UnsupportedArgument": UnsupportedArgument,
        "_spec": value_spec,
        "_check_globals": _check_globals,
        "_lo": _INT32[0],
        "_hi": _INT32[1],
    }
    signature, keys = [], []
    for p in params:
        n = p.name
        if p.has_default:
            namespace[f"_default_{n}"] = p.default
            signature.append(f"{n}=_default_{n}")
        else:
            signature.append(n)
        if p.is_constexpr:
            keys.append(f"{n}, {n}.__class__")
        elif n in tensors:
            # A non-tensor here raises AttributeError: the call takes the normal path.
            keys.append(f"{n}.dtype, {n}.data_ptr() & 15 == 0")
        else:
            keys.append(
                f"({n} if -16 < {n} < 16 else ({n} & 15) | 16 if _lo <= {n} <= _hi else _spec({n}))"
                f" if {n}.__class__ is int else _spec({n})"
            )
    if len(signature) > 250:
        raise ValueError("launcher: too many kernel parameters")

    def slow(key, grid, args, num_warps, num_stages, maxnreg, options):
        """Triton's path; with a key (a fast-path candidate), cache what it launched."""
        if num_warps is not None:
            options["num_warps"] = num_warps
        if num_stages is not None:
            options["num_stages"] = num_stages
        if maxnreg is not None:
            options["maxnreg"] = maxnreg
        kernel = fn.run(*args, grid=grid, warmup=False, **options)  # what fn[grid](...) calls
        if key is None or kernel is None:
            state.fallbacks += 1
            return kernel
        if hasattr(kernel, "result"):  # an asynchronous compile (a future)
            kernel = kernel.result()
        if len(state.cache) >= MAX_ENTRIES:
            state.clear()
        # kernel.run is the launcher that the launch which just happened created.
        state.cache[key] = (kernel.run, kernel.function, kernel.packed_metadata, kernel)
        state.misses += 1
        return kernel

    namespace["_slow"] = slow
    pointers = [n for n in names if n in tensors] or ["0"]
    src = _TEMPLATE.format(
        params=", ".join(signature),
        key=", ".join(keys),
        align=" | ".join(f"{n}.data_ptr()" if n != "0" else n for n in pointers),
        args=", ".join(names) + ("," if len(names) == 1 else ""),
    )
    exec(compile(src, f"<kernels.launch: {getattr(fn, '__name__', fn)}>", "exec"), namespace)
    launch = namespace["launch"]
    launch.keyed = namespace["keyed"]
    launch.direct = namespace["direct"]
    launch.state = state
    launch.__doc__ = f"Launch {getattr(fn, '__name__', fn)} through its launch cache (kernels.launch)."
    return launch
