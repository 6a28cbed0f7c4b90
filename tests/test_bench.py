"""The benchmark harness (`python -m bench`) at tiny shapes: on the CPU through Triton's
interpreter (CUDA events and graphs when a GPU is present). The numbers it times here mean
nothing; what is tested is the machinery: cases, the correctness check, timing, goals and
every report file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bench
import fnn
from bench import cases as bc
from bench import report
from bench.check import compare
from bench.cli import main
from bench.problems import AddmmReLU, count_sets, linear_work, network_work
from bench.runner import evaluate_goal, goals_verdict
from bench.timing import CpuTimer

REPO = Path(__file__).resolve().parent.parent
RUN_CASES = ["fwd_small_bf16", "fwbw_relu_bf16", "fnn_seed000_fwbw"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

# The issue's table: name -> (shape, dtype, mode, precision, activation, goals).
BIG, SMALL, BF16, FP32 = (8192, 4096, 4096), (1 << 20, 64, 64), torch.bfloat16, torch.float32
ISSUE_CASES = {
    "fwd_large_bf16": (BIG, BF16, "fwd", "highest", "sigmoid",
                       {"speedup vs eager >= 1.08x", "fnn <= 1.05 x gemm_only"}),
    "fwd_small_bf16": (SMALL, BF16, "fwd", "highest", "sigmoid",
                       {"speedup vs eager >= 1.8x", "speedup vs compile >= 1.2x",
                        ">= 85% of copy bandwidth"}),
    "fwbw_large_bf16": (BIG, BF16, "fwbw", "highest", "sigmoid",
                        {"speedup vs eager >= 1.05x", "speedup vs compile >= 1x"}),
    "fwbw_small_bf16": (SMALL, BF16, "fwbw", "highest", "sigmoid",
                        {"speedup vs eager >= 1.6x", "speedup vs compile >= 1.2x"}),
    "fwd_large_tf32": (BIG, FP32, "fwd", "high", "sigmoid", {"speedup vs eager >= 1x"}),
    "fwd_large_fp32": ((4096, 4096, 4096), FP32, "fwd", "highest", "sigmoid", {"speedup vs eager >= 0.9x"}),
    "fwbw_relu_bf16": (BIG, BF16, "fwbw", "highest", "relu", {"speedup vs eager >= 1x"}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ISSUE_CASES))
def test_linear_cases_match_the_issue(name):
    shape, dtype, mode, precision, activation, goals = ISSUE_CASES[name]
    case = bc.CASES[name]
    assert case.kind == "linear"
    assert (case.shape["M"], case.shape["K"], case.shape["N"]) == shape
    assert (case.dtype, case.mode, case.matmul_precision, case.activation, case.bias) == (
        dtype, mode, precision, activation, True,
    )  # fmt: skip
    expected_impls = ["fnn", "eager", "compile"] + (["gemm_only"] if mode == "fwd" else [])
    expected_impls += ["addmm_act"] if name == "fwbw_relu_bf16" else []
    assert list(case.implementations) == expected_impls
    if mode == "fwbw":
        goals = goals | {"peak memory <= eager's"}
    assert {g.text for g in case.all_goals} == goals


def test_network_case_is_seed000():
    case = bc.CASES["fnn_seed000_fwbw"]
    assert (case.kind, case.mode, case.dtype, case.bias, case.activation) == (
        "network", "fwbw", torch.float32, False, "sigmoid",
    )  # fmt: skip
    assert case.shape == {"rows": 100, "sizes": [2, 32, 1]}
    assert [g.text for g in case.all_goals] == ["speedup vs eager >= 2x", "peak memory <= eager's"]
    assert list(case.implementations) == ["fnn", "eager", "compile"]
    model = case.model(torch.device("cpu"), torch.float32)
    assert isinstance(model, fnn.FNN) and model.sizes == [2, 32, 1]
    assert all(layer.bias is None for layer in model.layers)
    assert tuple(case.data().shape) == (100, 2)


def test_quick_selection_and_unknown_names():
    assert [c.name for c in bc.select(quick=True)] == [
        "fwd_small_bf16",
        "fwbw_small_bf16",
        "fnn_seed000_fwbw",
    ]
    assert [c.name for c in bc.select()] == list(bc.CASES)
    assert [c.name for c in bc.select(["fwd_large_fp32", "fwd_small_bf16"])] == [
        "fwd_large_fp32",
        "fwd_small_bf16",
    ]
    with pytest.raises(ValueError, match="unknown case"):
        bc.select(["fwd_small_bf16", "no_such_case"])


def test_registry_rejects_bad_cases():
    with pytest.raises(ValueError, match="already registered"):
        bc.register(bc.CASES["fwd_small_bf16"])
    with pytest.raises(ValueError, match="not a baseline"):
        bc.linear_case("x1", 8, 8, 8, torch.float32, "fwbw", goals=[bc.at_most("gemm_only", 1.0)])
    with pytest.raises(ValueError, match="ReLU"):
        bc.linear_case("x2", 8, 8, 8, torch.float32, "fwbw", extra_baselines=["addmm_act"])
    with pytest.raises(ValueError, match="unknown activation"):
        bc.linear_case("x3", 8, 8, 8, torch.float32, "fwd", activation="mish")
    with pytest.raises(ValueError, match="precision"):
        bc.linear_case("x4", 8, 8, 8, torch.float32, "fwd", precision="low")
    assert "x1" not in bc.CASES


def test_work_matches_the_roofline_notes():
    # ROOFLINE.md: forward M=8192, K=N=4096 is 275 GFLOP; at M=2^20, K=N=64 the fused
    # forward moves 256 MB and forward+backward about 0.77 GB (6 passes over a 128 MiB tensor).
    flop, _ = linear_work(bc.CASES["fwd_large_bf16"])
    assert flop == 2 * 8192 * 4096 * 4096 and round(flop / 1e9) == 275
    _, fwd_bytes = linear_work(bc.CASES["fwd_small_bf16"])
    assert abs(fwd_bytes / 2**20 - 256) < 0.1
    flop, fwbw_bytes = linear_work(bc.CASES["fwbw_small_bf16"])
    assert abs(fwbw_bytes / 2**20 - 768) < 0.2
    assert flop == 3 * 2 * (1 << 20) * 64 * 64
    flop, nbytes = network_work(bc.CASES["fnn_seed000_fwbw"])
    # forward 2*100*(2*32 + 32*1); backward: dW of both layers and the delta of layer 1.
    assert flop == 2 * 100 * (2 * 32 + 32) * 2 + 2 * 100 * 32
    assert nbytes == 4 * (100 * 2 + 96 + 100 + 2 * 100 + 100 * 2 + 2 * 96)


def test_count_sets_rotates_only_what_fits_in_l2():
    l2 = 50 * 2**20
    assert count_sets(128 * 2**20, l2, 8) == 1
    assert count_sets(l2, l2, 8) == 1
    assert count_sets(30 * 2**20, l2, 8) == 4
    assert count_sets(1024, l2, 8) == 8


# ---------------------------------------------------------------------------------------------
# Pieces: timer, comparison rule, goals, the ReLU-epilogue baseline
# ---------------------------------------------------------------------------------------------


def test_cpu_timer_reports_the_median():
    timer = CpuTimer(rep_ms=10.0, min_samples=3, max_samples=50)
    timing = timer.measure(lambda: time.sleep(0.002))
    assert timing.method == "perf_counter" and 3 <= timing.samples <= 50
    assert 2.0 <= timing.median_ms < 200.0
    assert timing.p20_ms <= timing.median_ms <= timing.p80_ms
    with pytest.raises(ValueError, match="CUDA"):
        timer.measure(lambda: None, graph=True)
    assert timer.peak_memory(lambda: None) is None


def test_compare_rule():
    ref = (torch.linspace(-1, 1, 50, dtype=torch.float64),)
    eager = (ref[0].float() + 1e-3,)
    names = ("y",)
    ok = compare(names, (ref[0].float() + 1.5e-3,), eager, ref, torch.float32)
    assert ok["passed"] and ok["tensors"]["y"]["max_err_eager"] == pytest.approx(1e-3, rel=1e-3)
    far = compare(names, (ref[0].float() + 3e-3,), eager, ref, torch.float32)
    assert not far["passed"] and "y:" in far["message"]
    nan = ref[0].float().clone()
    nan[7] = float("nan")
    assert not compare(names, (nan,), eager, ref, torch.float32)["passed"]
    assert not compare(names, (ref[0].float()[:10],), eager, ref, torch.float32)["passed"]
    assert not compare(names, (ref[0].double(),), eager, ref, torch.float32)["passed"]


def _result(median, status="ok", gbps=None, mem=None):
    return {"status": status, "median_ms": median, "gbps": gbps or {}, "peak_memory_bytes": mem}


def test_goal_evaluation():
    med = {"fnn": 1.0, "eager": 1.9, "compile": 1.1, "gemm_only": 0.97}
    g = evaluate_goal(bc.speedup("eager", 1.8), _result(med), {})
    assert g["passed"] is True and g["measured"] == pytest.approx(1.9)
    assert evaluate_goal(bc.speedup("compile", 1.2), _result(med), {})["passed"] is False
    g = evaluate_goal(bc.at_most("gemm_only", 1.05), _result(med), {})
    assert g["passed"] is True and g["measured"] == pytest.approx(1 / 0.97)
    assert evaluate_goal(bc.at_most("gemm_only", 1.01), _result(med), {})["passed"] is False
    ceil = {"copy": {"GBps": 3000.0}}
    assert evaluate_goal(bc.bandwidth(0.85), _result(med, gbps={"fnn": 2700.0}), ceil)["passed"] is True
    assert evaluate_goal(bc.bandwidth(0.85), _result(med, gbps={"fnn": 2400.0}), ceil)["passed"] is False
    memory = bc.Goal("memory", "eager", 1.0)
    assert evaluate_goal(memory, _result(med, mem={"fnn": 10, "eager": 10}), {})["passed"] is True
    assert evaluate_goal(memory, _result(med, mem={"fnn": 11, "eager": 10}), {})["passed"] is False
    unmeasured = evaluate_goal(memory, _result(med), {})
    assert unmeasured["passed"] is None and unmeasured["note"]
    assert evaluate_goal(bc.speedup("eager", 1.0), _result({"fnn": None, "eager": 1.0}), {})["passed"] is None
    failed = evaluate_goal(bc.speedup("eager", 1.0), _result({"fnn": None}, status="failed"), {})
    assert failed["passed"] is False
    assert goals_verdict([{"passed": True}, {"passed": None}]) is None
    assert goals_verdict([{"passed": True}, {"passed": False}]) is False
    assert goals_verdict([{"passed": True}]) is True


def test_addmm_relu_baseline_matches_autograd():
    torch.manual_seed(0)
    x = torch.randn(13, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(13, 5, dtype=torch.float64)
    y = AddmmReLU.apply(x, w, b)
    got = torch.autograd.grad(y, (x, w, b), g)
    y_ref = fnn.reference.linear_act(x, w, b, "relu")
    want = torch.autograd.grad(y_ref, (x, w, b), g)
    torch.testing.assert_close(y, y_ref)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)
    assert torch.equal(y, torch.relu(F.linear(x, w, b)))


# ---------------------------------------------------------------------------------------------
# One run of the harness at tiny shapes, then its report files
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, device):
    out = tmp_path_factory.mktemp("bench")
    results, status = bench.run(
        RUN_CASES,
        tiny=True,
        device=device,
        out_dir=out,
        compile_options={"backend": "aot_eager"},
        rep_ms=1.0,
        warmup_calls=2,
        progress=False,
    )
    return results, status, out


def test_tiny_run_checks_and_times_every_case(tiny_run):
    results, status, _ = tiny_run
    assert status == 0
    assert [c["name"] for c in results["cases"]] == RUN_CASES
    for c in results["cases"]:
        assert c["status"] == "ok", (c["name"], c["error"], c["errors"])
        assert c["check"]["passed"], c["check"]["message"]
        assert set(c["check"]["tensors"]) == set(
            {"fwd_small_bf16": ["y"], "fwbw_relu_bf16": ["y", "dx", "dw", "db"],
             "fnn_seed000_fwbw": ["y", "dw1", "dw2"]}[c["name"]]
        )  # fmt: skip
        assert set(c["median_ms"]) == set(c["implementations"])
        assert all(v > 0 for v in c["median_ms"].values())
        for name, base in c["speedup"].items():
            assert base == pytest.approx(c["median_ms"][name] / c["median_ms"]["fnn"])
        assert set(c["roofline_fraction"]) == set(c["implementations"])
        assert c["input_sets"] >= 2  # tiny inputs fit in the cache: rotated
        assert c["timing_method"] in ("perf_counter", "cuda_graph", "do_bench")
        assert all(g["passed"] in (True, False, None) for g in c["goals"])
        assert len(c["goals"]) == len(bc.CASES[c["name"]].all_goals)
    by_name = {c["name"]: c for c in results["cases"]}
    assert "gemm_only" in by_name["fwd_small_bf16"]["median_ms"]
    assert "addmm_act" in by_name["fwbw_relu_bf16"]["median_ms"]
    assert set(results["ceilings"]) >= {"copy", "gemm_bf16", "gemm_fp32"}
    assert results["ceilings"]["copy"]["GBps"] > 0 and results["ceilings"]["gemm_bf16"]["TFLOPs"] > 0


def test_tiny_run_json_schema(tiny_run):
    results, _, out = tiny_run
    doc = json.loads((out / report.JSON_NAME).read_text())
    for key in report.REQUIRED_KEYS:
        assert key in doc, key
    assert doc["torch"] == torch.__version__ and doc["timestamp"] and doc["device"]
    assert doc["cuda"] == torch.version.cuda
    assert doc["tiny"] is True and doc["summary"]["cases"] == len(RUN_CASES)
    for c in doc["cases"]:
        for key in report.REQUIRED_CASE_KEYS:
            assert key in c, (c["name"], key)
        assert c["dtype"] in ("bfloat16", "float32")
        assert isinstance(c["shape"], dict) and c["shape"]
        assert all(isinstance(v, float) for v in c["median_ms"].values())
        for g in c["goals"]:
            assert {"text", "kind", "baseline", "target", "measured", "passed"} <= set(g)
        if c["mode"] == "fwbw":
            assert "peak_memory_bytes" in c
            if torch.cuda.is_available():
                assert c["peak_memory_bytes"]["fnn"] > 0 and c["peak_memory_bytes"]["eager"] > 0
            else:
                assert c["peak_memory_bytes"] is None and "CUDA" in c["peak_memory_note"]


def test_tiny_run_table_summary_plots_and_log(tiny_run):
    results, _, out = tiny_run
    table = report.format_table(results)
    summary = (out / report.SUMMARY_NAME).read_text()
    log = (out / report.LOG_NAME).read_text()
    for c in results["cases"]:
        assert c["name"] in table and c["name"] in summary and f"== {c['name']}" in log
        assert f"{c['name']}: check passed" in log
        for g in c["goals"]:
            assert report.goal_line(g) in table
            assert g["text"] in summary
    assert "[PASS]" in table or "[FAIL]" in table
    assert "## Goals" in summary and "## Ceilings" in summary
    assert table.splitlines()[-1] in log  # the table is in the log
    for name in report.PLOT_NAMES:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name


class _GraphTimer(CpuTimer):
    """A CPU timer that claims CUDA graphs, to drive the runner's graph branch on the CPU."""

    supports_graphs = True
    graph_below_ms = 1e9

    def __init__(self) -> None:
        super().__init__(rep_ms=1.0)
        self.graph_flags: list[bool] = []

    def measure(self, fn, graph=False):
        self.graph_flags.append(graph)
        return super().measure(fn)


def test_runner_times_few_microsecond_cases_with_and_without_graph():
    from tqdm import tqdm

    from bench.runner import run_case

    case = bc.CASES["fwd_small_bf16"].at_tiny()
    timer = _GraphTimer()
    lines: list[str] = []
    with tqdm(disable=True) as bar:
        result = run_case(
            case, torch.device("cpu"), timer, {"backend": "eager"}, 1 << 20, 2, 1, {},
            lambda msg, error=False: lines.append(msg), bar,
        )  # fmt: skip
    assert result["status"] == "ok", result["errors"]
    assert result["timing_method"] == "cuda_graph"
    n = len(case.implementations)
    assert timer.graph_flags == [True] * n + [False] * n
    assert set(result["median_ms_no_graph"]) == set(case.implementations)
    assert any("without CUDA graph" in line for line in lines)
    assert "without CUDA graph" in report.format_table({"device": "x", "cases": [{**result, "goals": []}]})


# ---------------------------------------------------------------------------------------------
# Failures and the command line
# ---------------------------------------------------------------------------------------------


def test_disagreeing_fnn_fails_the_case_loudly(monkeypatch, tmp_path, capsys):
    original = fnn.linear_act
    monkeypatch.setattr(fnn, "linear_act", lambda x, w, b, act: original(x, w, b, act) * 1.05)
    status = main(["--tiny", "--cases", "fwd_small_bf16", "--out", str(tmp_path), "--rep", "1"])
    assert status == 1
    doc = json.loads((tmp_path / report.JSON_NAME).read_text())
    (c,) = doc["cases"]
    assert c["status"] == "failed" and c["check"]["passed"] is False
    assert not c["check"]["tensors"]["y"]["passed"]
    assert "fnn disagrees with eager" in c["error"]
    assert all(v is None for v in c["median_ms"].values())  # not timed
    assert all(g["passed"] is False for g in c["goals"])
    assert "FAILED" in capsys.readouterr().err
    assert "FAILED CHECK" in (tmp_path / report.SUMMARY_NAME).read_text()
    assert "FAILED: fnn disagrees" in (tmp_path / report.LOG_NAME).read_text()


def test_cli_without_cuda_says_so_and_exits_0(tmp_path):
    out = tmp_path / "never"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout and "nothing was measured" in proc.stdout
    assert not out.exists()


def test_cli_list_and_bad_arguments(capsys):
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    for name in bc.CASES:
        assert name in listed
    with pytest.raises(SystemExit) as exc:
        main(["--cases", "no_such_case"])
    assert exc.value.code == 2
    assert "unknown case" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--rep", "0"])


# ---------------------------------------------------------------------------------------------
# python -m bench.backward: the fused layer backward against the two kernels
# ---------------------------------------------------------------------------------------------

BACKWARD_ARGS = ["--m", "64", "--n", "24", "--k", "20", "--dtype", "float32", "--rep-ms", "1"]


def test_backward_sweep_checks_and_times_every_variant(tmp_path):
    """Every variant (eager, the two kernels, the fused kernel as called, other slicings and
    launch configs) agrees with float64 and is timed; the files say what ran where. The
    fused kernel's config is its own again afterwards."""
    import kernels.linear_act
    from bench import backward

    real = kernels.linear_act.fused_backward_config
    assert backward.main([*BACKWARD_ARGS, "--out", str(tmp_path)]) == 0
    assert kernels.linear_act.fused_backward_config is real
    result = json.loads((tmp_path / "backward.json").read_text())
    names = [v["name"] for v in result["variants"]]
    assert names[:3] == ["eager", "two_kernels", "fused"], names
    assert any("split=" in n for n in names) and any("stages=" in n for n in names), names
    default = result["default"]
    assert f"fused warps={default['num_warps']} stages={default['num_stages']}" not in names  # not twice
    for v in result["variants"]:
        assert v["status"] == "ok", v
        assert v["check"]["passed"] and v["median_ms"] > 0, v
        assert set(v["check"]["tensors"]) == {"dx", "dw", "db"}
    assert result["two_kernels_over_fused"] > 0
    assert result["performance_numbers"] == torch.cuda.is_available()
    assert result["environment"]["torch"] == torch.__version__
    text = (tmp_path / "backward.md").read_text()
    assert text.count("| ok |") == len(names)


def test_backward_sweep_reports_a_disagreeing_variant(monkeypatch, capsys):
    """A fused kernel that writes a wrong dW is reported as disagreeing and not timed; the two
    kernels still are; the exit status is 1."""
    import kernels.linear_act
    from bench import backward

    real = kernels.linear_act.backward_unchecked

    def wrong(*args, **kwargs):
        dx, dw, db = real(*args, **kwargs)
        return dx, dw * 1.01, db

    monkeypatch.setattr(kernels.linear_act, "backward_unchecked", wrong)
    only = ["two_kernels", "fused"]
    result = backward.measure(64, 24, 20, torch.float32, rep_ms=1, only=only, log=lambda s: None)
    status = {v["name"]: v for v in result["variants"]}
    assert set(status) == {"eager", "two_kernels", "fused"}
    assert status["two_kernels"]["status"] == "ok"
    assert status["fused"]["status"] == "disagrees" and "median_ms" not in status["fused"]
    assert "dw" in status["fused"]["message"]
    assert backward.main([*BACKWARD_ARGS, "--variants", "fused"]) == 1
    with pytest.raises(ValueError, match="unknown variants"):
        backward.measure(64, 24, 20, torch.float32, rep_ms=1, only=["fused split=3000"])
    assert backward.main([*BACKWARD_ARGS, "--n", "80"]) == 2  # the fused kernel does not serve it
    assert "does not serve" in capsys.readouterr().err


def test_backward_sweep_without_cuda_asks_for_the_interpreter(monkeypatch, capsys):
    """On a CPU, outside Triton's interpreter, the kernels cannot run: it says so, exit 2."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    from bench import backward

    monkeypatch.delenv("TRITON_INTERPRET")
    assert backward.main(BACKWARD_ARGS) == 2
    assert "TRITON_INTERPRET=1 python -m bench.backward" in capsys.readouterr().err
