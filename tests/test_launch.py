"""kernels.launch: the per-specialization launch cache.

In the interpreter the cache is a pass-through to `kernel[grid](...)`: same results. Compiled
(a subprocess with TRITON_INTERPRET unset, kernels compiled for sm_90a and launches recorded
by bench.fakecuda's stand-in driver), the cached path must hand the compiled kernel's
launcher exactly what Triton's own path hands it, and a change of anything Triton
specializes on (dtype, alignment, an int's specialization, a constexpr, num_warps, num_stages,
maxnreg, the device) must take its own entry, never a stale one. Triton 3.6 is checked too when it is
unpacked at $FNN_TRITON36 (default /tmp/t36; the lent GPU machines run 3.6).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from helpers import compiled_env
from launch_probe import scaled_add_kernel
from test_cuda_graphs import SYNCING_CALLS

from kernels.launch import UnsupportedArgument, launcher, value_spec

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "launch_probe.py"
TRITON36 = Path(os.environ.get("FNN_TRITON36", "/tmp/t36"))


def test_cached_launches_give_the_results_of_tritons_launches(device):
    """On the GPU the cache serves every call after a specialization's first; in the
    interpreter (CPU) every call takes Triton's path. Same results either way."""
    fast = launcher(scaled_add_kernel)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(300, generator=g).to(device) for _ in range(2))
    variants = ((300, 1, 2.0, True), (150, 2, -0.5, True), (1, 1, 3.0, False), (300, 1, 2.0, True))
    for n, stride, alpha, scale in variants:
        expected = (alpha * x[: n * stride : stride] if scale else x[: n * stride : stride]) + y[:n]
        outs = []
        for run in (lambda grid, *a, **k: scaled_add_kernel[grid](*a, **k), fast, fast):
            out = torch.full((300,), float("nan"), device=device)
            run((triton.cdiv(n, 64),), x, y, out, n, stride, alpha, BLOCK=64, SCALE=scale)
            outs.append(out)
        assert torch.equal(outs[0][:n], outs[1][:n]) and torch.equal(outs[0][:n], outs[2][:n])
        torch.testing.assert_close(outs[2][:n], expected)
    if device.type == "cuda":
        assert fast.state.misses == 3 and fast.state.fallbacks == 0
    else:
        assert fast.state.fallbacks == 2 * len(variants) and not fast.state.cache


def _probe(python_path: str, tmp_path: Path) -> dict:
    env = compiled_env(python_path)
    out = tmp_path / "probe.json"
    proc = subprocess.run(
        [sys.executable, str(PROBE), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("version", ["installed", "3.6"])
def test_cached_launch_matches_tritons_launch_under_compile_only(version, tmp_path):
    path = str(ROOT)
    if version == "3.6":
        if not (TRITON36 / "triton").is_dir():
            pytest.skip(f"triton 3.6 is not unpacked at {TRITON36} (set FNN_TRITON36)")
        path = f"{TRITON36}{os.pathsep}{ROOT}"
    report = _probe(path, tmp_path)
    if version == "3.6":
        assert report["triton"].startswith("3.6"), report["triton"]
    assert not report["errors"], report["errors"]
    calls = {c["label"]: c for c in report["calls"]}
    assert len(calls) == 17, list(calls)
    base = calls["base"]["normal"]["hash"]
    same = ("hash", "grid", "stream", "function", "packed_metadata", "args")
    for label, c in calls.items():
        normal, first, cached = c["normal"], c["fast_first"], c["fast_cached"]
        for key in same:
            assert normal[key] == first[key] == cached[key], f"{label}: {key} differs"
        assert c["same_kernel_object"], label
        # The cached path skips the hooks' metadata (no hook is set): None, None, None.
        assert cached["hooks_and_metadata"] == ["NoneType"] * 3, label
        # Every variant takes one new entry; "base again" finds base's (not the last one's).
        assert c["cache_filled"] == (0 if label == "base again" else 1), label
        if label not in ("base", "base again", "SCALE = 1 (an int constexpr)"):
            assert normal["hash"] != base, f"{label}: Triton compiled nothing new?"
    # True and 1 compile to the same binary, but Triton keys them apart, and so does the cache.
    assert calls["SCALE = 1 (an int constexpr)"]["normal"]["hash"] == base
    assert report["misses"] == report["cache_entries"] == 16
    assert report["fallbacks"] == 0
    assert report["ops_dispatched_by_a_hit"] == []  # no allocation, no sync, no torch op at all
    # launch.keyed with maxnreg: each caller key launches its own full key's kernel.
    assert report["keyed"]["base"] == [base, base]
    maxnreg = calls["maxnreg = 128"]["normal"]["hash"]
    assert report["keyed"]["maxnreg"] == [maxnreg, maxnreg] and maxnreg != base
    # launch.direct in a session: what keyed's hit hands the launcher; a misaligned pointer
    # takes the misaligned kernel; no session under a hook, and then keyed's path (hook run).
    direct = report["direct"]
    for key in same:
        assert direct["keyed"][key] == direct["keyed_hit"][key] == direct["direct"][key], f"direct: {key}"
    assert direct["direct"]["hash"] == base
    assert direct["misaligned"]["hash"] == direct["misaligned_hash"] != base
    assert direct["session_under_hook"] is None and direct["hooked_calls"] == 1
    # Fallbacks to Triton's path: a callable grid, an option outside the key, a launch hook.
    assert report["fallbacks_taken"] == 3
    assert report["callable_grid"] == {"hash": base, "grid": [8, 1, 1]}
    assert report["extra_option_hash"] == base
    assert report["hook"]["calls"] == 1 and report["hook"]["hooks_and_metadata"][0] == "LazyDict"
    # Another driver (sm_80): its own kernel, through both paths.
    other = report["other_driver"]
    assert other["normal"] == other["fast_first"] == other["fast_cached"] != base
    host = report["host_us"]
    assert host["kernel[grid](...)"] > 0 and host["launch cache hit"] > 0
    print(f"triton {report['triton']}: host us per launch (launch skipped): {host}")


def test_value_spec_follows_tritons_int_rules():
    """Distinct keys for everything Triton specializes apart; ints keyed as the fast path
    keys them (small ones by value, others by residue mod 16 and range)."""

    def spec(v):
        return value_spec(v)

    assert spec(1) == 1 and spec(True) == (bool,) and spec(1.0) == (float,) and spec(None) == (type(None),)
    assert spec(False) == (bool,) and spec(0) == 0 and spec(2) == 2 and spec(15) == 15
    assert spec(16) == spec(32) == spec(-16) == spec(2**31 - 16) == 16 and spec(17) == 17
    assert spec(2**31) == ("i64", True) and spec(2**31 + 1) == ("i64", False)
    assert spec(2**63) == ("u64", True)
    t = torch.empty(8)
    assert value_spec(t) == ("tensor", torch.float32, t.data_ptr() % 16 == 0)
    for bad in (2**64, "text", (1, 2)):
        with pytest.raises(UnsupportedArgument):
            value_spec(bad)


def test_source_has_no_syncing_calls():
    tree = ast.parse((ROOT / "kernels" / "launch.py").read_text())
    found = [
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in SYNCING_CALLS
    ]
    assert not found
