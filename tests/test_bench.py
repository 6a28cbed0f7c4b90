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
from dataclasses import replace
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
from bench.problems import AddmmReLU, count_sets, float32_highest_dot, linear_work, network_work, train_work
from bench.runner import evaluate_goal, goals_verdict
from bench.timing import CpuTimer

REPO = Path(__file__).resolve().parent.parent
RUN_CASES = [
    "fwd_small_bf16",
    "fwbw_relu_bf16",
    "fwd_large_fp32",
    "fnn_seed000_fwbw",
    "train_step_seed000",
    "mlp_fwd_w64",
    "mlp_train_w64",
]
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
    "fwd_large_fp32": ((4096, 4096, 4096), FP32, "fwd", "highest", "sigmoid",
                       {"speedup vs eager >= 1.5x", "error vs float64 <= eager's"}),
    "fwbw_relu_bf16": (BIG, BF16, "fwbw", "highest", "relu",
                       {"speedup vs eager >= 1x", "speedup vs addmm_act >= 1x"}),
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
    expected_impls += ["fnn_tf32x3"] if name == "fwd_large_fp32" else []
    expected_impls += ["fnn_tma"] if name in ("fwd_large_bf16", "fwd_small_bf16", "fwd_large_tf32") else []
    expected_impls += ["fnn_cublas_bwd"] if name in ("fwbw_large_bf16", "fwbw_relu_bf16") else []
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
    assert [g.text for g in case.all_goals] == ["speedup vs eager >= 4x", "peak memory <= eager's"]
    assert list(case.implementations) == ["fnn", "eager", "compile", "fnn_layer", "fnn_network"]
    assert case.fusion == "auto" and case.fnn_variants == ("fnn", "fnn_layer", "fnn_network")
    model = case.model(torch.device("cpu"), torch.float32)
    assert isinstance(model, fnn.FNN) and model.sizes == [2, 32, 1]
    assert all(layer.bias is None for layer in model.layers)
    assert tuple(case.data().shape) == (100, 2)


# The issue's network and training cases (bench/NOTES.md spells them out):
# name -> (kind, rows, sizes, dtype, activations, loss, implementations, goals).
MLP = [64] * 5 + [16]
MLP_ACTS = ("relu",) * 4 + ("sigmoid",)
BASE, FNNS, FP16 = ["fnn", "eager", "compile"], ["fnn_layer", "fnn_network"], torch.float16
NETWORK_CASES = {
    "train_step_seed000": ("train", 100, [2, 32, 1], FP32, "sigmoid", "sse", [*BASE, "eager_graph", *FNNS],
                           {"speedup vs eager >= 10x", "speedup vs eager_graph >= 3x"}),
    "mlp_fwd_w64": ("network", 1 << 20, MLP, FP16, MLP_ACTS, None, [*BASE, *FNNS],
                    {"speedup vs eager >= 3x", "speedup vs compile >= 1.5x"}),
    "mlp_train_w64": ("train", 1 << 20, MLP, FP16, MLP_ACTS, "mse", [*BASE, *FNNS],
                      {"speedup vs eager >= 2x", "speedup vs compile >= 1.3x"}),
    "mlp_fwd_w128": ("network", 1 << 20, [128] * 5 + [16], FP16, MLP_ACTS, None, [*BASE, *FNNS],
                     {"speedup vs eager >= 2x"}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NETWORK_CASES))
def test_network_and_training_cases_match_the_issue(name):
    kind, rows, sizes, dtype, acts, loss, impls, goals = NETWORK_CASES[name]
    case = bc.CASES[name]
    assert (case.kind, case.shape, case.dtype, case.activation, case.fusion) == (
        kind, {"rows": rows, "sizes": sizes}, dtype, acts, "auto",
    )  # fmt: skip
    assert case.mode == ("step" if kind == "train" else "fwd")
    if kind == "train":
        assert (case.loss, case.lr, case.cuda_graph) == (loss, 1e-3, False)
        goals = goals | {"peak memory <= eager's"}
    assert list(case.implementations) == impls
    assert {g.text for g in case.all_goals} == goals
    assert case.at_tiny().shape["sizes"] == sizes and case.at_tiny().shape["rows"] <= 100
    json.dumps(case.to_json())  # the report can write it


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
    with pytest.raises(ValueError, match="training case"):
        bc.network_case("x5", 8, [2, 3, 1], torch.float32, "fwd", extra_baselines=["eager_graph"])
    with pytest.raises(ValueError, match="network or training"):
        bc.linear_case("x6", 8, 8, 8, torch.float32, "fwd", extra_baselines=["fnn_layer"])
    with pytest.raises(ValueError, match="tf32x3"):
        bc.linear_case("x7", 8, 8, 8, torch.float32, "fwd", precision="high", extra_baselines=["fnn_tf32x3"])
    with pytest.raises(ValueError, match="tf32x3"):
        bc.linear_case("x8", 8, 8, 8, torch.bfloat16, "fwd", extra_baselines=["fnn_tf32x3"])
    with pytest.raises(ValueError, match="fnn_tma"):
        bc.linear_case("x14", 8, 8, 8, torch.float32, "fwd", extra_baselines=["fnn_tma"])  # "highest": FMA
    with pytest.raises(ValueError, match="fnn_tma"):
        bc.linear_case("x15", 8, 8, 8, torch.bfloat16, "fwbw", extra_baselines=["fnn_tma"])
    with pytest.raises(ValueError, match="fnn_cublas_bwd"):
        bc.linear_case("x16", 8, 8, 8, torch.bfloat16, "fwd", extra_baselines=["fnn_cublas_bwd"])
    with pytest.raises(ValueError, match="fnn_cublas_bwd"):
        bc.linear_case("x17", 8, 8, 8, torch.bfloat16, "fwbw", activation="gelu",
                       extra_baselines=["fnn_cublas_bwd"])  # fmt: skip
    with pytest.raises(ValueError, match="3 activations for 2 layers"):
        bc.network_case("x9", 8, [2, 3, 1], torch.float32, "fwd", activation=["relu"] * 3)
    with pytest.raises(ValueError, match="unknown activation"):
        bc.network_case("x10", 8, [2, 3, 1], torch.float32, "fwd", activation=["relu", "mish"])
    with pytest.raises(ValueError, match="fusion"):
        bc.network_case("x11", 8, [2, 3, 1], torch.float32, "fwd", fusion="whole")
    with pytest.raises(ValueError, match="loss"):
        bc.train_case("x12", 8, [2, 3, 1], torch.float32, loss="hinge")
    with pytest.raises(ValueError, match="one activation name"):
        bc.linear_case("x13", 8, 8, 8, torch.float32, "fwd", activation=("relu",))
    with pytest.raises(ValueError, match="mode"):
        bc._validate(replace(bc.CASES["mlp_train_w64"], mode="fwd"))
    assert not {f"x{i}" for i in range(1, 18)} & set(bc.CASES)


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


def test_training_work():
    flop, nbytes = train_work(bc.CASES["train_step_seed000"])
    # forward 2*100*(2*32 + 32*1); dW of both layers; the delta of layer 1 (no dX of the input)
    assert flop == 2 * 100 * (2 * 32 + 32) * 2 + 2 * 100 * 32
    assert nbytes == 4 * (100 * (2 + 1) + 2 * 96)  # X, targets, parameters read and written


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
    skipped = {**_result({"fnn": 1.0, "eager_graph": None}), "skipped": {"eager_graph": "needs CUDA"}}
    g = evaluate_goal(bc.speedup("eager_graph", 3.0), skipped, {})
    assert g["passed"] is None and g["note"] == "eager_graph was not timed: needs CUDA"
    # error: fnn's largest error at most eager's, output by output
    check = {"tensors": {"y": {"max_err_fnn": 1e-6, "max_err_eager": 2e-6},
                         "dw": {"max_err_fnn": 3e-6, "max_err_eager": 4e-6}}}  # fmt: skip
    g = evaluate_goal(bc.error_at_most(1.0), {**_result(med), "check": check}, {})
    assert g["passed"] is True and g["measured"] == pytest.approx(0.75)
    assert g["text"] == "error vs float64 <= eager's"
    check["tensors"]["dw"]["max_err_fnn"] = 5e-6
    g = evaluate_goal(bc.error_at_most(1.0), {**_result(med), "check": check}, {})
    assert g["passed"] is False and g["measured"] == pytest.approx(1.25)
    assert evaluate_goal(bc.error_at_most(1.0), _result(med), {})["passed"] is None
    assert goals_verdict([{"passed": True}, {"passed": None}]) is None
    assert goals_verdict([{"passed": True}, {"passed": False}]) is False
    assert goals_verdict([{"passed": True}]) is True


@pytest.mark.usefixtures("fp32_matmul_precision")
def test_tf32x3_variant_takes_its_own_kernel_and_the_default_comes_back(device):
    """fwd_large_fp32's fnn_tf32x3: the per-layer kernels' float32 "highest" dot switched for
    the call only, with its own kernel specialization (the dot is part of the launch key)."""
    from kernels import configs
    from kernels import linear_act as la

    assert configs.FLOAT32_HIGHEST_DOT == "ieee" and la.layer_precision(torch.float32) == "ieee"
    g = torch.Generator(device=device).manual_seed(5)
    x = torch.randn(37, 19, generator=g, device=device)
    w = torch.randn(23, 19, generator=g, device=device) / 19**0.5
    la._FWD_STEPS.clear()
    y = fnn.linear_act(x, w, None, "tanh")
    with float32_highest_dot("tf32x3"):
        assert la.layer_precision(torch.float32) == "tf32x3"
        assert la.layer_precision(torch.bfloat16) == "ieee"
        assert la.input_precision(torch.float32) == "ieee"  # the network kernels keep theirs
        y3 = fnn.linear_act(x, w, None, "tanh")
    assert configs.FLOAT32_HIGHEST_DOT == "ieee"
    assert sorted(key[-1] for key in la._FWD_STEPS) == ["ieee", "tf32x3"]
    torch.testing.assert_close(y3, y, atol=1e-5, rtol=1e-5)  # tf32x3: about float32's accuracy
    torch.set_float32_matmul_precision("high")
    with float32_highest_dot("tf32x3"):
        assert la.layer_precision(torch.float32) == "tf32"  # "high" still means tf32
    with pytest.raises(ValueError, match="FLOAT32_HIGHEST_DOT must be one of"):
        with float32_highest_dot("tf32"):
            pass
    assert configs.FLOAT32_HIGHEST_DOT == "ieee"


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


CHECKED = {
    "fwd_small_bf16": ["y"],
    "fwbw_relu_bf16": ["y", "dx", "dw", "db"],
    "fwd_large_fp32": ["y"],
    "fnn_seed000_fwbw": ["y", "dw1", "dw2"],
    "train_step_seed000": ["loss", "step_w1", "step_w2"],
    "mlp_fwd_w64": ["y"],
    "mlp_train_w64": ["loss"] + [f"step_{p}{i}" for i in range(1, 6) for p in "wb"],
}


def test_tiny_run_checks_and_times_every_case(tiny_run):
    results, status, _ = tiny_run
    assert status == 0
    assert [c["name"] for c in results["cases"]] == RUN_CASES
    cuda = torch.cuda.is_available()
    for c in results["cases"]:
        assert c["status"] == "ok", (c["name"], c["error"], c["errors"])
        assert c["check"]["passed"], c["check"]["message"]
        assert list(c["check"]["tensors"]) == CHECKED[c["name"]]
        variants = c["check"]["variants"]  # every other fnn variant checked as well
        assert set(variants) == set(bc.CASES[c["name"]].fnn_variants[1:])
        for name, v in variants.items():
            assert v["passed"] and list(v["tensors"]) == CHECKED[c["name"]], (name, v["message"])
        assert set(c["median_ms"]) == set(c["implementations"])
        # eager_graph (a CUDA graph) is reported as not run on the CPU, never left out silently
        skipped = set() if cuda or "eager_graph" not in c["implementations"] else {"eager_graph"}
        assert set(c["skipped"]) == skipped and all("CUDA" in why for why in c["skipped"].values())
        assert all(c["median_ms"][n] is None for n in skipped)
        assert all(v > 0 for n, v in c["median_ms"].items() if n not in skipped)
        for name, base in c["speedup"].items():
            if name in skipped:
                assert base is None
            else:
                assert base == pytest.approx(c["median_ms"][name] / c["median_ms"]["fnn"])
        assert set(c["roofline_fraction"]) == set(c["implementations"]) - skipped
        assert c["input_sets"] >= 2  # tiny inputs fit in the cache: rotated
        assert c["timing_method"] in ("perf_counter", "cuda_graph", "do_bench")
        assert all(g["passed"] in (True, False, None) for g in c["goals"])
        assert len(c["goals"]) == len(bc.CASES[c["name"]].all_goals)
    by_name = {c["name"]: c for c in results["cases"]}
    assert "gemm_only" in by_name["fwd_small_bf16"]["median_ms"]
    assert "addmm_act" in by_name["fwbw_relu_bf16"]["median_ms"]
    assert by_name["train_step_seed000"]["timing_method"] != "cuda_graph"  # eager_graph is the graph
    (error_goal,) = [g for g in by_name["fwd_large_fp32"]["goals"] if g["kind"] == "error"]
    assert error_goal["measured"] is not None and error_goal["passed"] is not None
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
        assert c["dtype"] in ("bfloat16", "float16", "float32")
        assert isinstance(c["shape"], dict) and c["shape"]
        times = c["median_ms"]
        assert all(isinstance(times[n], float) for n in times if n not in c["skipped"])
        assert all(times[n] is None for n in c["skipped"])
        for g in c["goals"]:
            assert {"text", "kind", "baseline", "target", "measured", "passed"} <= set(g)
        if c["mode"] in ("fwbw", "step"):
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


def test_a_wrong_training_step_of_one_fnn_variant_is_reported_not_timed(monkeypatch, tmp_path):
    """fnn_network's Trainer takes each step twice: its check fails (the loss agrees, the
    parameters' steps are twice the reference's), it is not timed, the others are."""
    from fnn.trainer import Trainer

    step = Trainer.step

    def twice(self, x, y):
        loss = step(self, x, y)
        if self.model.fusion == "network":
            step(self, x, y)
        return loss

    monkeypatch.setattr(Trainer, "step", twice)
    status = main(["--tiny", "--cases", "train_step_seed000", "--out", str(tmp_path), "--rep", "1"])
    assert status == 1
    (c,) = json.loads((tmp_path / report.JSON_NAME).read_text())["cases"]
    assert c["status"] == "error" and c["check"]["passed"] is True
    bad = c["check"]["variants"]["fnn_network"]
    assert not bad["passed"] and bad["tensors"]["loss"]["passed"]
    assert not bad["tensors"]["step_w1"]["passed"] and not bad["tensors"]["step_w2"]["passed"]
    assert c["check"]["variants"]["fnn_layer"]["passed"]
    assert c["errors"]["fnn_network"].startswith("disagrees with eager: step_w1:")
    assert c["median_ms"]["fnn_network"] is None and c["speedup"]["fnn_network"] is None
    assert all(c["median_ms"][n] > 0 for n in ("fnn", "eager", "compile", "fnn_layer"))


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
    for rep in ("0", "nan", "inf", "-1"):
        with pytest.raises(SystemExit) as exc:
            main(["--rep", rep])
        assert exc.value.code == 2 and "--rep must be a finite number > 0" in capsys.readouterr().err


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


@pytest.mark.parametrize(
    "args", [["--m", "-5"], ["--m", "0"], ["--n", "0"], ["--k", "-1"], ["--rep-ms", "0"], ["--rep-ms", "nan"]]
)
def test_backward_sweep_refuses_bad_numbers(args, capsys):
    """Bad sizes and budgets: a usage error naming the option (exit 2), before anything runs."""
    from bench import backward

    with pytest.raises(SystemExit) as exc:
        backward.main(args)
    assert exc.value.code == 2 and args[0] in capsys.readouterr().err


def test_backward_sweep_without_cuda_asks_for_the_interpreter(monkeypatch, capsys):
    """On a CPU, outside Triton's interpreter, the kernels cannot run: it says so, exit 2."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    from bench import backward

    monkeypatch.delenv("TRITON_INTERPRET")
    assert backward.main(BACKWARD_ARGS) == 2
    assert "TRITON_INTERPRET=1 python -m bench.backward" in capsys.readouterr().err
