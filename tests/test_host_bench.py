"""`python -m bench --host` at tiny size: a subprocess with TRITON_INTERPRET unset (the kernels
compile for sm_90a, launches are skipped). Checks the JSON's structure and that fnn launches
what the code says it launches, per call of each case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compiled_env

from bench.cli import main
from bench.host import CASES, HostGoal, Settings, gpu_end_to_end, one_thread

ROOT = Path(__file__).resolve().parents[1]

# Launches per call, read off fnn/functional.py, fnn/network.py and kernels/network.py.
EXPECTED_LAUNCHES = {
    "linear_act_fwd_2x32": 1,
    "linear_act_fwd_32x1": 1,
    "linear_act_fwbw_2x32": 2,  # forward; dW (x is data: no dX)
    "linear_act_fwbw_32x1": 2,  # forward; dX and dW from the fused backward kernel
    # 2 forward; layer 2's fused backward (dW, and dX with layer 1's delta in its epilogue), dW
    # of layer 1 (the input needs no gradient: no dX of layer 1).
    "fnn_2_32_1_fwbw_layer": 4,
    "fnn_2_32_1_fwbw_network": 2,  # forward; backward (100 rows fit one program)
    "trainer_step_seed000": 1,  # the whole step in one kernel
    "fnn_64x5_fwbw_layer": 8,  # 4 forward; 3 fused (dW, db, dX with the delta); layer 1's dW (with db)
    "fnn_64x5_fwbw_network": 2,  # forward; backward (256 rows <= SINGLE_PROGRAM_ROWS: one program)
}
# The forward + backward cases: timed beside bench.host._Floor (autograd around a Python
# Function that computes nothing).
FLOORS = {name for name in EXPECTED_LAUNCHES if "fwbw" in name}
GOALS = {
    "linear_act_fwd_2x32": ("fnn/eager", 3.0),
    "linear_act_fwd_32x1": ("fnn/eager", 3.0),
    "fnn_2_32_1_fwbw_layer": ("eager/fnn", 1.0),
    "fnn_2_32_1_fwbw_network": ("eager/fnn", 2.0),
    "trainer_step_seed000": ("eager/fnn", 10.0),
}


@pytest.fixture(scope="module")
def host_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("host")
    env = compiled_env()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--host", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads((out / "host.json").read_text()), (out / "host.md").read_text()


def test_tiny_without_out_leaves_the_committed_results_alone():
    """--tiny is for tests: without --out it writes to a new temporary folder, which it names,
    and bench/results/host/ stays as committed."""
    results = ROOT / "bench" / "results" / "host"
    before = {f.name: f.read_bytes() for f in results.iterdir()}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--host", "--tiny", "--cases", "linear_act_fwd_2x32"],
        cwd=ROOT, env=compiled_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {f.name: f.read_bytes() for f in results.iterdir()} == before
    out = Path(proc.stdout.split("--tiny: results go to ", 1)[1].split("\n", 1)[0])
    assert out != results and (out / "host.json").exists()


def test_host_json_structure(host_run):
    stdout, doc, summary = host_run
    assert doc["benchmark"] == "host"
    env = doc["environment"]
    for key in (
        "host",
        "cpu_count",
        "torch",
        "triton",
        "git_commit",
        "load_average_start",
        "load_average_end",
    ):
        assert key in env, key
    assert doc["method"]["launch_us_added"] == 4.0
    assert [c["name"] for c in doc["cases"]] == list(EXPECTED_LAUNCHES)
    for c in doc["cases"]:
        for impl in ("fnn_host_us", "eager_us"):
            t = c[impl]
            assert 0 < t["min"] <= t["p20"] <= t["median"] <= t["p80"], (c["name"], impl, t)
            assert t["batches"] == 3
        assert c["fnn_plus_launch_us"] == pytest.approx(c["fnn_host_us"]["median"] + 4.0 * c["launches"])
        assert c["eager_over_fnn"] == pytest.approx(c["eager_us"]["median"] / c["fnn_plus_launch_us"])
        want = GOALS.get(c["name"])
        if want is None:
            assert c["goal"] is None, c["name"]
        else:
            g = c["goal"]
            assert (g["ratio"], g["threshold"]) == want
            fnn_us, eager_us = c["fnn_plus_launch_us"], c["eager_us"]["median"]
            value = fnn_us / eager_us if want[0] == "fnn/eager" else eager_us / fnn_us
            assert g["value"] == pytest.approx(value)
            assert g["passed"] == (value <= want[1] if want[0] == "fnn/eager" else value >= want[1])
        assert c["name"] in stdout and c["name"] in summary
        floor = c["floor"]
        if c["name"] in FLOORS:
            assert 0 < floor["us"]["min"] <= floor["us"]["median"], c["name"]
            assert floor["plus_launch_us"] == pytest.approx(floor["us"]["median"] + 4.0 * c["launches"])
            best = c["eager_us"]["median"] / floor["plus_launch_us"]
            assert floor["eager_over_floor"] == pytest.approx(best)
        else:
            assert floor is None, c["name"]
    goals = [c["goal"] for c in doc["cases"] if c["goal"]]
    assert doc["goals"] == {
        "passed": sum(g["passed"] for g in goals),
        "failed": sum(not g["passed"] for g in goals),
    }
    assert doc["gpu"] is None or doc["gpu"]["cases"]
    assert "| case | fnn host µs" in stdout


@pytest.mark.parametrize("name", list(EXPECTED_LAUNCHES))
def test_host_launch_counts(host_run, name):
    (case,) = [c for c in host_run[1]["cases"] if c["name"] == name]
    want = EXPECTED_LAUNCHES[name]
    assert case["launches_per_call"] == [want] * 3, case["launches_per_call"]
    assert case["launches_per_call_timed"] == want  # every timed call launched as many
    assert case["launches"] == case["expected_launches"] == want


def test_host_cases_and_goals_match_the_issue():
    assert set(CASES) == set(EXPECTED_LAUNCHES)
    for name, (ratio, threshold) in GOALS.items():
        assert CASES[name].goal == HostGoal(ratio, threshold)
    assert HostGoal("fnn/eager", 3.0).evaluate(30.0, 10.0) == (3.0, True)
    assert HostGoal("fnn/eager", 3.0).evaluate(31.0, 10.0)[1] is False
    assert HostGoal("eager/fnn", 2.0).evaluate(10.0, 19.0) == (1.9, False)


def test_host_cli_list_and_interpreter_refusal(capsys):
    assert main(["--host", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in CASES)
    with pytest.raises(SystemExit):
        main(["--host", "--cases", "no_such_case"])
    with pytest.raises(SystemExit):
        main(["--breakdown"])  # only with --host
    # The test process runs the interpreter (conftest): --host must refuse, not mis-measure.
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert main(["--host", "--tiny"]) == 2
        assert "unset TRITON_INTERPRET" in capsys.readouterr().out


def test_end_to_end_timer_on_the_reference_backend(monkeypatch):
    """The GPU part's code path (not run on a GPU yet), on the CPU with fnn's reference."""
    import fnn

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert fnn.backend("cpu") == "reference"
    tiny = Settings.for_budget(None, tiny=True)
    with one_thread():  # as in the CPU measurement: no OpenMP stalls on a busy machine
        doc = gpu_end_to_end(list(CASES.values()), tiny, device=torch.device("cpu"), log=lambda *a: None)
    assert doc["device"] == "cpu"
    assert [r["name"] for r in doc["cases"]] == list(CASES)
    for r in doc["cases"]:
        assert r["fnn_us"]["median"] > 0 and r["eager_us"]["median"] > 0
        assert r["eager_over_fnn"] == pytest.approx(r["eager_us"]["median"] / r["fnn_us"]["median"])
        has_goal = r["name"] in ("fnn_2_32_1_fwbw_network", "trainer_step_seed000")
        assert (r["goal"] is not None) == has_goal, r["name"]


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_floor_call_returns_the_cases_gradients(name):
    """The floor of a forward + backward case differentiates what the case differentiates: one
    gradient per tensor, each of that tensor's shape (so that autograd accepts it)."""
    floor = CASES[name].floor(torch.device("cpu"))
    fnn_call, _ = CASES[name].build(torch.device("cpu"))
    want = [g.shape for g in fnn_call()]
    got = [g.shape for g in floor()]
    assert got == want
