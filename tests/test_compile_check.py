"""The compile check (python -m bench.compile, bench.compilecheck, bench.coverage) and
bench/gpu_session.sh, on the CPU.

The check compiles for sm_90a/sm_80 with Triton's real compiler, so it runs in subprocesses
where the kernels are compiled functions (this test session interprets them): one probe
(tests/compile_probe.py) with purpose-made kernels that spill, overflow shared memory, miss
wgmma, or fail to compile, plus a real fnn call; and one run of the command itself.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compile as cli
from bench import coverage, report
from bench.cases import CASES
from bench.compilecheck import FAILURE_KINDS, GEMM_TILES, judge
from kernels.checks import ACTIVATIONS

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("probe") / "probe.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "compile_probe.py"), str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"compile probe failed:\n{proc.stdout}\n{proc.stderr}"
    doc = json.loads(out.read_text())
    doc["results"] = {int(k): v for k, v in doc["results"].items()}
    return doc


def _record(target: dict, kernel: str, call: str, **constexprs) -> dict:
    found = [
        r
        for r in target["records"]
        if r["kernel"] == kernel
        and call in r["calls"]
        and all(r["constexprs"].get(k) == v for k, v in constexprs.items())
    ]
    assert len(found) == 1, f"expected one {kernel} record from {call!r} {constexprs}, got {len(found)}"
    return found[0]


def _kinds(rec: dict) -> set[str]:
    return {f["kind"] for f in rec["failures"]}


# --- verdicts on purpose-made kernels --------------------------------------------------------


def test_spill_is_a_failure(probe):
    rec = _record(probe["results"][90], "probe_spill_kernel", "spill")
    assert rec["stack"] > 0 and rec["registers"] <= 32, rec
    assert "spill" in _kinds(rec)


def test_kernel_missing_from_gemm_table_is_a_failure(probe):
    rec = _record(probe["results"][90], "probe_spill_kernel", "spill")
    assert "unknown" in _kinds(rec), "a kernel the wgmma rule does not know must not pass silently"


def test_shared_memory_over_the_limit_is_a_failure(probe):
    from bench.fakecuda import MAX_SHARED

    rec = _record(probe["results"][90], "probe_dot_kernel", "shared")
    assert rec["num_stages"] == 5 and rec["shared"] > MAX_SHARED[90], rec
    assert _kinds(rec) == {"shared"}


def test_wgmma_rule(probe):
    # bf16, 64-row tile: 4 warps make a warpgroup, so sm_90a uses wgmma; with 2 warps it cannot.
    hopper4 = _record(probe["results"][90], "probe_dot_kernel", "bf16 dot 4 warps", BK=64)
    hopper2 = _record(probe["results"][90], "probe_dot_kernel", "bf16 dot 2 warps")
    assert hopper4["wgmma"] > 0 and hopper4["failures"] == [], hopper4
    assert hopper2["wgmma"] == 0 and hopper2["mma_sync"] > 0 and _kinds(hopper2) == {"wgmma"}, hopper2
    # sm_80 has no wgmma: the same kernels use mma.sync and pass.
    for call in ("bf16 dot 4 warps", "bf16 dot 2 warps"):
        ampere = _record(probe["results"][80], "probe_dot_kernel", call)
        assert ampere["wgmma"] == 0 and ampere["mma_sync"] > 0 and ampere["failures"] == [], ampere
    assert hopper4["row_tile"] == 64 and hopper4["operand"] == "bf16"


def test_compile_error_is_recorded_and_the_call_goes_on(probe):
    target = probe["results"][90]
    rec = _record(target, "probe_broken_kernel", "broken then fine")
    assert rec["status"] == "compile_error" and _kinds(rec) == {"compile"}
    assert "purpose-made compile error" in rec["error"], rec["error"]
    assert rec["registers"] is None and rec["constexprs"] == {"BLOCK": 16}
    # The same call went on to the next kernel after the failed one.
    after = _record(target, "probe_dot_kernel", "broken then fine", BK=64)
    assert after["status"] == "compiled"


def test_a_call_that_raises_is_a_failure(probe):
    errors = probe["results"][90]["call_errors"]
    assert [e["call"] for e in errors] == ["raises"]
    assert "ValueError" in errors[0]["error"]
    assert cli.failed({"targets": {"sm_90a": probe["results"][90] | {"failing_specializations": 0}}})


def test_judge_without_failures_is_empty():
    rec = {
        "kernel": "linear_act_fwd_kernel",
        "status": "compiled",
        "stack": 0,
        "registers": 100,
        "shared": 1000,
        "row_tile": 128,
        "operand": "bf16",
        "wgmma": 0,
        "mma_sync": 8,
    }
    assert judge(rec, 80, True, 166912) == []
    assert [f["kind"] for f in judge(rec, 90, True, 232448)] == ["wgmma"]
    assert [f["kind"] for f in judge({**rec, "wgmma": 4, "stack": 8}, 90, True, 232448)] == ["spill"]
    # registers x threads over the register file: the launch would fail (16 warps at 200 > 128)
    big = {**rec, "wgmma": 4, "num_warps": 16, "registers": 200}
    assert [f["kind"] for f in judge(big, 90, True, 232448)] == ["registers"]
    assert judge({**big, "num_warps": 8, "registers": 255}, 90, True, 232448) == []
    assert [f["kind"] for f in judge({**rec, "operand": "fp32"}, 90, True, 232448)] == []
    assert [f["kind"] for f in judge({**rec, "row_tile": 32}, 90, True, 232448)] == []


# --- nothing is launched; the specialization is the launcher's --------------------------------


def test_nothing_is_launched(probe):
    for cap, target in probe["results"].items():
        compiled = sum(r["launches"] for r in target["records"] if r["status"] == "compiled")
        assert target["launches_skipped"] == target["kernel_runs"] == compiled, (cap, target)
        assert target["launches_skipped"] > 0
        assert target["cuda_initialized"] is False
    # fnn.linear_act forward + backward: twice narrow (dX, dW and db from the fused kernel), once
    # wide (dX, then dW with db): 7 launches, all skipped.
    fnn_launches = sum(
        r["launches"]
        for r in probe["results"][90]["records"]
        if r["kernel"].startswith("linear_act_") and r["calls"][0].startswith("fnn ")
    )
    assert fnn_launches == 7


def _tiles(record: dict) -> tuple[int, int, int]:
    c = record["constexprs"]
    return c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]


def test_fnn_specialization_is_the_launchers(probe):
    target, cfg = probe["results"][90], probe["configs"]
    fwd = _record(target, "linear_act_fwd_kernel", "fnn aligned")
    c = cfg["fwd"]
    assert _tiles(fwd) == (c["block_m"], c["block_n"], c["block_k"])
    assert (fwd["num_warps"], fwd["num_stages"]) == (c["num_warps"], c["num_stages"])
    assert fwd["constexprs"]["ACTIVATION"] == ACTIVATIONS["tanh"] and fwd["constexprs"]["HAS_BIAS"] is True
    assert fwd["constexprs"]["ACC_DTYPE"] == "fp32" and fwd["constexprs"]["UPCAST"] is False
    # Arguments: 16-byte aligned pointers, odd sizes not divisible by 16, unit strides folded.
    assert fwd["args"]["x_ptr"] == "*fp16 %16" and fwd["args"]["M"] == "i32"
    assert fwd["args"]["stride_xk"] == "=1" and fwd["args"]["stride_wk"] == "=1"
    c = cfg["bwd_fused"]
    both = _record(target, "linear_act_bwd_fused_kernel", "fnn aligned")
    assert _tiles(both) == (c["block_m"], c["block_n"], c["block_k"])
    assert (both["num_warps"], both["num_stages"]) == (c["num_warps"], c["num_stages"])
    assert both["constexprs"]["ACTIVATION"] == ACTIVATIONS["tanh"] and both["constexprs"]["HAS_BIAS"] is True
    # The wide call's two gradient kernels: (rows, reduction, cols) and (reduction, rows, cols)
    c = cfg["bwd_input"]
    dx = _record(target, "linear_act_bwd_input_kernel", "fnn wide")
    assert _tiles(dx) == (c["block_m"], c["block_k"], c["block_n"])
    c = cfg["bwd_weight"]
    dw = _record(target, "linear_act_bwd_weight_kernel", "fnn wide")
    assert _tiles(dw) == (c["block_k"], c["block_m"], c["block_n"])


def test_pointer_alignment_is_seen(probe):
    # x one fp16 element into its storage: 2-byte aligned, so Triton drops its divisibility.
    target = probe["results"][90]
    aligned = _record(target, "linear_act_fwd_kernel", "fnn aligned")
    shifted = _record(target, "linear_act_fwd_kernel", "fnn misaligned x")
    assert shifted["id"] != aligned["id"]
    assert shifted["args"]["x_ptr"] == "*fp16" and shifted["args"]["w_ptr"] == "*fp16 %16"


def test_record_fields(probe):
    rec = _record(probe["results"][90], "linear_act_fwd_kernel", "fnn aligned")
    for key in (
        "kernel",
        "target",
        "id",
        "status",
        "constexprs",
        "args",
        "num_warps",
        "num_stages",
        "registers",
        "stack",
        "local",
        "shared",
        "wgmma",
        "mma_sync",
        "row_tile",
        "operand",
        "calls",
        "launches",
        "failures",
        "compile_seconds",
    ):
        assert key in rec, key
    assert rec["target"] == "sm_90a" and isinstance(rec["registers"], int) and rec["registers"] > 0


# --- the command -------------------------------------------------------------------------------


def test_command_writes_json_and_exits_on_its_verdict(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.compile",
            "--target",
            "90",
            "--only",
            "seed:003",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.endswith("-partial.json"), (files, proc.stdout, proc.stderr)
    doc = json.loads(files[0].read_text())
    for key in ("triton", "torch", "git_commit", "targets", "only", "seconds"):
        assert key in doc, key
    assert list(doc["targets"]) == ["sm_90a"]
    target = doc["targets"]["sm_90a"]
    assert target["calls"] == 1 and target["specializations"] >= 2, target
    assert {r["kernel"] for r in target["records"]} >= {
        "linear_act_fwd_kernel",
        "linear_act_bwd_weight_kernel",
    }
    assert set(target["failures_by_kind"]) == set(FAILURE_KINDS)
    assert all(r["constexprs"]["ACC_DTYPE"] == "fp64" for r in target["records"])
    assert proc.returncode == (1 if cli.failed(doc) else 0), proc.stdout
    assert ("FAILED" if cli.failed(doc) else "PASSED") in proc.stdout


# --- the coverage ------------------------------------------------------------------------------


def test_all_pairs_covers_every_pair():
    dims = {"a": [1, 2, 3], "b": "xyzw", "c": [True, False], "d": [0, 1, 2, 3, 4]}
    rows = coverage.all_pairs(dims)
    for x, y in itertools.combinations(dims, 2):
        seen = {(r[x], r[y]) for r in rows}
        assert seen == set(itertools.product(dims[x], dims[y])), (x, y)
    assert len(rows) < 3 * 4 * 2 * 5 / 4  # far below the full product
    full = coverage.all_pairs(dims, full=("a", "d"))
    assert [(r["a"], r["d"]) for r in full[:15]] == list(itertools.product(dims["a"], dims["d"]))
    for x, y in itertools.combinations(dims, 2):
        assert {(r[x], r[y]) for r in full} == set(itertools.product(dims[x], dims[y])), (x, y)


def test_coverage_lists_every_case_seed_and_activation():
    labels = [c.label for c in coverage.calls()]
    assert len(labels) == len(set(labels)), "labels must be unique"
    for name, case in CASES.items():  # every fnn variant of every case: both fusions, tf32x3, TMA
        assert f"case:{name}" in labels
        for variant in case.fnn_variants[1:]:
            assert (f"case:{name} {variant}" in labels) != (variant in coverage.NOT_RUN), variant
    assert "case:fwbw_large_bf16 fnn_cublas_bwd" not in labels  # torch.mm at full size on the CPU
    delta_sum = [lbl for lbl in labels if lbl.startswith("grid:delta_and_bias_grad")]
    assert {lbl.split()[1] for lbl in delta_sum} == {"fp32", "tf32", "fp16", "bf16", "fp64"}
    for name in ("train_step_seed000", "mlp_fwd_w64", "mlp_train_w64", "mlp_fwd_w128"):
        for fusion in ("layer", "network"):
            assert f"case:{name} fnn_{fusion}" in labels
    assert "case:fwd_large_fp32 fnn_tf32x3" in labels
    for seed in ("000", "001", "002", "003"):
        assert any(lbl.startswith(f"seed:{seed}") for lbl in labels), seed
    grid = [lbl for lbl in labels if lbl.startswith("grid:linear_act")]
    for act in ACTIVATIONS:  # read from kernels.checks: a new activation is covered by itself
        assert any(f" {act} " in lbl for lbl in grid), act
    network = [lbl for lbl in labels if lbl.startswith("grid:network")]
    for cls in coverage.DTYPE_CLASSES:  # every dtype class at every width class
        for widths in coverage.WIDTH_CLASSES:
            assert any(f"network {t} P={p} " in lbl for t in cls for p in widths for lbl in network), (
                cls,
                widths,
            )
    for p in coverage.NETWORKS:
        assert any(f" P={p} " in lbl for lbl in network), p
    for acts in coverage.NETWORK_ACTS:  # each activation set of the network kernels
        assert any(lbl.endswith(f" {acts}") for lbl in network), acts
    for tag in ("fp32", "tf32", "fp16", "bf16", "fp64"):
        assert any(f"network {tag} " in lbl for lbl in network), tag
        assert any(f"linear_act {tag} " in lbl for lbl in grid), tag
    for cls in coverage.DTYPE_CLASSES:
        for m, k, n in coverage.ODD_SHAPES:
            assert any(f"linear_act {tag} " in lbl and f" {m}x{k}x{n} " in lbl for tag in cls for lbl in grid)
    for loss in coverage.LOSSES:
        for momentum in ("0", "0.9"):
            assert any(f"trainer {loss} momentum={momentum}" in lbl for lbl in network), (loss, momentum)
    for batch in ("one-program", "many-program"):
        assert any(batch in lbl for lbl in network), batch
    assert coverage.calls(["seed:003"])[0].label.startswith("seed:003")


def test_every_project_kernel_is_in_the_gemm_table():
    import kernels.linear_act
    import kernels.network

    names = {
        name
        for mod in (kernels.linear_act, kernels.network)
        for name in vars(mod)
        if name.endswith("_kernel")
    }
    assert names and names <= set(GEMM_TILES), names - set(GEMM_TILES)


def test_table_lists_failures():
    rec = {
        "kernel": "network_fwd_kernel",
        "constexprs": {"P": 128, "UPCAST": False},
        "num_warps": 8,
        "num_stages": 3,
        "registers": 32,
        "stack": 12000,
        "shared": 1,
        "wgmma": 0,
        "mma_sync": 0,
        "calls": ["a", "b"],
        "failures": [{"kind": "spill", "detail": "stack 12000 B/thread"}],
    }
    target = {
        "specializations": 1,
        "calls": 2,
        "launches_skipped": 3,
        "failing_specializations": 1,
        "failures_by_kind": {k: int(k == "spill") for k in FAILURE_KINDS},
        "call_errors": [],
        "seconds": 1.0,
        "cpu_seconds": 1.0,
        "records": [rec],
    }
    doc = {"triton": "x", "torch": "y", "seconds": 1.0, "targets": {"sm_90a": target}}
    text = cli.table(doc)
    assert "1 spill" in text and "stack 12000 B/thread" in text and "P=128" in text and "(+1)" in text
    assert "UPCAST" not in text
    assert cli.failed(doc)
    target.update(failing_specializations=0, records=[{**rec, "failures": []}])
    assert not cli.failed(doc)


# --- bench/gpu_session.sh ------------------------------------------------------------------------


def _session(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in _env().items() if k != "CUDA_VISIBLE_DEVICES"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, even on a machine that has one
    return subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_session.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_gpu_session_without_cuda_stops_at_once(tmp_path):
    out = tmp_path / "session"
    proc = _session(str(out))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "no CUDA device" in proc.stderr and "nothing was run or written" in proc.stderr
    assert not out.exists()


def _fits_ten_minutes(plan: str) -> None:
    """The steps' time limits, with the 5 s before a step past its limit is killed, leave the
    record step and the transfers 40 s of the lent machines' 10 minutes per command."""
    limits = [int(s) for s in re.findall(r"\[(\d+) s\]", plan)]
    assert len(limits) == 3 and sum(limits) + 5 * len(limits) <= 560, limits


def test_gpu_session_dry_run_plans_at_most_8_files(tmp_path):
    out = tmp_path / "session"
    proc = _session("--dry-run", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "bench.compile --target" in text and "pytest" in text and "bench --quick" in text
    bench_files = [report.JSON_NAME, report.SUMMARY_NAME, report.LOG_NAME, *report.PLOT_NAMES]
    for name in ["summary.txt", "session.log", *bench_files]:
        assert name in text, name
    assert 2 + len(bench_files) <= 8
    _fits_ten_minutes(text)
    assert not out.exists()
    assert _session().returncode == 2  # no OUTDIR: usage


def test_gpu_session_sweeps_dry_run_plans_8_files(tmp_path):
    out = tmp_path / "sweeps"
    proc = _session("--dry-run", "--sweeps", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for command in ("bench.backward --out", "bench.tiles --budget-s", "bench --host --out"):
        assert command in text, command
    _fits_ten_minutes(text)
    files = ["summary.txt", "session.log", "backward.json", "backward.md", "tiles.json", "tiles.md",
             "host.json", "host.md"]  # fmt: skip
    assert all(name in text for name in files) and len(files) <= 8
    assert "-m pytest" not in text and "bench.compile" not in text and not out.exists()
    proc = _session("--sweeps", str(out))  # no CUDA: stops before writing anything
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and not out.exists()
