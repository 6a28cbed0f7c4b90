"""Measured tiles: kernels.configs.TUNED_TILES (a tile per kernel and bucketed shape, taking
precedence over the heuristic) and `python -m bench.tiles`, which finds them: candidates
pruned by the compile check (compiled for sm_90a in a spawned process, without a GPU), each
survivor checked against float64 and timed (here in Triton's interpreter, at small shapes)."""

from __future__ import annotations

import json

import pytest
import torch

import fnn
from bench import tiles
from kernels import configs
from kernels import linear_act as la
from kernels.configs import TileConfig

pytestmark = pytest.mark.usefixtures("fp32_matmul_precision")


def test_tile_config_takes_a_tuned_entry_for_its_bucket_only():
    base = configs.matmul_config(8192, 4096, 4096, torch.bfloat16)
    tile = TileConfig(128, 128, 64, num_warps=8, num_stages=4)
    assert configs.TUNED_TILES == {}  # nothing measured yet: the heuristic everywhere
    with tiles.tuned({("fwd", torch.bfloat16, "ieee", False, 8192, 4096, 4096): tile}):
        assert configs.tile_config("fwd", 8192, 4096, 4096, torch.bfloat16, "ieee") is tile
        assert configs.tile_config("fwd", 5000, 3000, 2049, torch.bfloat16, "ieee") is tile  # same buckets
        assert configs.tile_config("fwd", 8193, 4096, 4096, torch.bfloat16, "ieee") == configs.matmul_config(
            8193, 4096, 4096, torch.bfloat16
        )  # the next bucket of rows
        for other in (("dx", torch.bfloat16, "ieee"), ("fwd", torch.float16, "ieee")):
            assert configs.tile_config(other[0], 8192, 4096, 4096, other[1], other[2]) == base
        assert configs.tile_config("fwd", 8192, 4096, 4096, torch.float32, "tf32") != tile
        # a tile measured with a light epilogue does not serve a heavy one (gelu, silu, ...)
        assert configs.tile_config("fwd", 8192, 4096, 4096, torch.bfloat16, "ieee", heavy=True) == base
    assert configs.TUNED_TILES == {}
    assert configs.shape_bucket(1) == 1 and configs.shape_bucket(4097) == 8192


def test_a_tuned_tile_reaches_the_launch_and_is_forgotten_after(device):
    """The forward kernel launches with the tuned tile (its plan's BLOCK_M/N/K, warps and
    stages), gives the same result as with the heuristic's, and the heuristic's plan comes
    back once the table is restored."""
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(70, 40, generator=g, device=device)
    w = torch.randn(24, 40, generator=g, device=device) / 40**0.5
    la._FWD_STEPS.clear()
    y = la.linear_act_forward(x, w, None, "sigmoid")
    (plan,) = la._FWD_STEPS.values()
    heuristic = configs.matmul_config(70, 24, 40, torch.float32)
    assert plan[2][-7:-3] == (heuristic.block_m, heuristic.block_n, heuristic.block_k, heuristic.group_m)
    tile = TileConfig(32, 32, 16, group_m=4, num_warps=4, num_stages=2)
    with tiles.tuned({("fwd", torch.float32, "ieee", False, 128, 32, 64): tile}):
        assert la._FWD_STEPS == {}  # plans are keyed on the shape: dropped
        y_tuned = la.linear_act_forward(x, w, None, "sigmoid")
        (plan,) = la._FWD_STEPS.values()
        assert plan[2][-7:] == (32, 32, 16, 4, 4, 2, la.MAXNREG)
        assert plan[1] == (3 * 1,)  # the grid follows the tile: 3 row blocks of 32, 1 column block
    torch.testing.assert_close(y_tuned, y, rtol=1e-6, atol=1e-6)
    assert la._FWD_STEPS == {}
    la.linear_act_forward(x, w, None, "sigmoid")
    (plan,) = la._FWD_STEPS.values()
    assert plan[2][-7:-3] == (heuristic.block_m, heuristic.block_n, heuristic.block_k, heuristic.group_m)


def test_problems_and_candidates():
    problems = {p.name: p for p in tiles.problems()}
    assert list(problems) == [
        "fwd_large_bf16:fwd", "fwd_small_bf16:fwd", "fwbw_large_bf16:dx", "fwbw_large_bf16:dw",
        "fwd_large_tf32:fwd", "fwd_large_fp32:fwd", "fwd_large_fp32:fwd:tf32x3",
    ]  # fmt: skip  (fwbw_small_bf16's backward is the fused kernel's: python -m bench.backward)
    assert problems["fwbw_large_bf16:dw"].output == (4096, 4096, 8192)
    assert problems["fwd_large_tf32:fwd"].input_precision() == "tf32"
    key = ("fwd", torch.float32, "tf32x3", False, 4096, 4096, 4096)
    assert problems["fwd_large_fp32:fwd:tf32x3"].table_key() == key
    for p in problems.values():
        cands = tiles.candidates(p)
        name, first = cands[0]
        assert tiles.is_heuristic(name) and first == configs.matmul_config(*p.output, p.dtype)
        assert len({cfg for _, cfg in cands}) == len(cands) >= 5
        rows, cols, red = p.output
        for _, cfg in cands:
            blocks = ((cfg.block_m, rows), (cfg.block_n, cols), (cfg.block_k, red))
            assert all(b <= max(16, n) for b, n in blocks)
    small = [cfg for _, cfg in tiles.candidates(problems["fwd_small_bf16:fwd"])]
    assert all(cfg.block_n == 64 and cfg.block_k == 64 for cfg in small)  # N = K = 64
    with pytest.raises(ValueError, match="unknown problem"):
        tiles.select(["fwd_small_bf16:dx"])


def test_small_run_prunes_checks_and_times(monkeypatch, tmp_path, capsys):
    """Three candidates at the small shape: the heuristic's (checked, timed), a 2-warp tile
    without wgmma (pruned by the compile check, which ran for sm_90a in a spawned process),
    and a tile whose outputs are made wrong here (reported, not timed); exit status 1."""
    problem = tiles.select(["fwd_small_bf16:fwd"])[0]
    real = tiles.candidates

    def three(p):
        heuristic = real(p)[0]
        return [
            heuristic,
            ("64x64x64 w2 s1", TileConfig(64, 64, 64, num_warps=2, num_stages=1)),
            ("32x32x32 w4 s2", TileConfig(32, 32, 32, num_warps=4, num_stages=2)),
        ]

    run = tiles.runner

    def wrong_for_block_32(p, t):
        f = run(p, t)
        if any(cfg.block_k == 32 for cfg in configs.TUNED_TILES.values()):
            return lambda: tuple(o * 1.1 for o in f())  # 10%: far past bfloat16 rounding
        return f

    monkeypatch.setattr(tiles, "candidates", three)
    monkeypatch.setattr(tiles, "runner", wrong_for_block_32)
    status = tiles.main(["--problems", problem.name, "--small", "--rep-ms", "1", "--processes", "1",
                         "--out", str(tmp_path)])  # fmt: skip
    assert status == 1
    doc = json.loads((tmp_path / "tiles.json").read_text())
    (p,) = doc["problems"]
    assert p["run_shape"] == tiles.SMALL_SHAPE and doc["capability"] == 90 and not doc["performance_numbers"]
    by = {r["name"]: r for r in p["candidates"]}
    h = next(r for r in p["candidates"] if tiles.is_heuristic(r["name"]))
    assert h["status"] == "ok" and h["check"]["passed"] and h["median_ms"] > 0
    assert h["compile"]["kernels"][0]["kernel"] == "linear_act_fwd_kernel"
    assert by["64x64x64 w2 s1"]["status"] == "pruned" and "wgmma" in by["64x64x64 w2 s1"]["message"]
    assert by["32x32x32 w4 s2"]["status"] == "disagrees" and "y:" in by["32x32x32 w4 s2"]["message"]
    assert p["best"] == h["name"] and p["best_over_heuristic"] == 1.0 and p["tuned_entry"] is None
    md = (tmp_path / "tiles.md").read_text()
    assert "| 64x64x64 w2 s1 | pruned: wgmma" in md and "disagrees" in md
    assert configs.TUNED_TILES == {}
    assert "DISAGREES" in capsys.readouterr().out


def test_a_spent_time_budget_still_times_the_heuristic(monkeypatch, tmp_path):
    """--budget-s 0: past the budget only each problem's heuristic tile is checked and timed,
    the others are reported as skipped, and the run ends with its report (exit status 0)."""
    problem = tiles.select(["fwd_small_bf16:fwd"])[0]
    real = tiles.candidates
    monkeypatch.setattr(
        tiles, "candidates", lambda p: [real(p)[0], ("32x32x32 w4 s2", TileConfig(32, 32, 32, num_warps=4))]
    )
    status = tiles.main(["--problems", problem.name, "--small", "--rep-ms", "1", "--processes", "1",
                         "--budget-s", "0", "--out", str(tmp_path)])  # fmt: skip
    assert status == 0
    (p,) = json.loads((tmp_path / "tiles.json").read_text())["problems"]
    heuristic, other = p["candidates"]
    assert tiles.is_heuristic(heuristic["name"]) and heuristic["status"] == "ok"
    assert heuristic["median_ms"] > 0
    assert other["status"] == "skipped" and "budget" in other["message"]
    assert "| 32x32x32 w4 s2 | skipped: the time budget" in (tmp_path / "tiles.md").read_text()


@pytest.mark.parametrize(
    "args",
    [
        ["--max-candidates", "0"], ["--processes", "0"], ["--rep-ms", "nan"], ["--margin", "-1"],
        ["--budget-s", "inf"],
    ],  # fmt: skip
)
def test_bad_numbers_are_refused(args, capsys):
    with pytest.raises(SystemExit) as info:
        tiles.main(["--compile-only", *args])
    assert info.value.code == 2 and args[0] in capsys.readouterr().err


def test_tuned_entry_text_is_python_that_builds_the_tile():
    problem = tiles.select(["fwd_large_bf16:fwd"])[0]
    tile = TileConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3)
    text = tiles.entry_text(problem, tile)
    key, value = eval("{" + text + "}", {"torch": torch, "TileConfig": TileConfig}).popitem()
    assert key == ("fwd", torch.bfloat16, "ieee", False, 8192, 4096, 4096) and value == tile


def test_compile_only_and_without_a_gpu(monkeypatch, tmp_path, capsys):
    status = tiles.main(["--problems", "fwd_large_fp32:fwd:tf32x3", "--compile-only", "--max-candidates", "1",
                         "--processes", "1", "--out", str(tmp_path)])  # fmt: skip
    assert status == 0
    (p,) = json.loads((tmp_path / "tiles.json").read_text())["problems"]
    (row,) = p["candidates"]
    assert row["status"] == "compiles" and row["compile"]["kernels"][0]["wgmma"] > 0  # tf32x3: tensor cores
    assert "compile check only" in (tmp_path / "tiles.md").read_text()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert tiles.main(["--problems", "fwd_small_bf16:fwd"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
    assert tiles.main(["--problems", "nope:fwd"]) == 2


def test_the_library_answer_is_unchanged_by_the_table(device):
    """fnn.linear_act gives the same result under a tuned tile as under the heuristic's
    (a tile changes the blocking, not the maths), forward and backward."""
    g = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(90, 70, generator=g, device=device, requires_grad=True)
    w = (torch.randn(80, 70, generator=g, device=device) / 70**0.5).requires_grad_()
    b = torch.randn(80, generator=g, device=device, requires_grad=True)
    dy = torch.randn(90, 80, generator=g, device=device)
    y = fnn.linear_act(x, w, b, "tanh")
    grads = torch.autograd.grad(y, (x, w, b), dy)
    tile = TileConfig(32, 64, 32, num_warps=4, num_stages=2)
    # every size here (90, 80, 70) falls in the bucket 128; 80 x 70 takes the two backward kernels
    table = {(kernel, torch.float32, "ieee", False, 128, 128, 128): tile for kernel in ("fwd", "dx", "dw")}
    with tiles.tuned(table):
        y2 = fnn.linear_act(x, w, b, "tanh")
        grads2 = torch.autograd.grad(y2, (x, w, b), dy)
        for steps in (la._FWD_STEPS, la._BWD_INPUT_STEPS, la._BWD_WEIGHT_STEPS):  # each took the tile
            (plan,) = steps.values()
            assert sorted(plan[2][-7:-4]) == [32, 32, 64] and plan[2][-3:-1] == (4, 2)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads2, grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_backward_kernels_are_checked_and_timed_too(tmp_path):
    """The input- and weight-gradient problems (dX; dW and db) at the small shape, with the
    heuristic's tile and one other: each checked against float64 and timed."""
    status = tiles.main(["--problems", "fwbw_large_bf16:dx", "fwbw_large_bf16:dw", "--small",
                         "--max-candidates", "2", "--rep-ms", "1", "--processes", "1",
                         "--out", str(tmp_path)])  # fmt: skip
    assert status == 0
    doc = json.loads((tmp_path / "tiles.json").read_text())
    assert [p["name"] for p in doc["problems"]] == ["fwbw_large_bf16:dx", "fwbw_large_bf16:dw"]
    for p, outputs in zip(doc["problems"], (["dx"], ["dw", "db"]), strict=True):
        assert len(p["candidates"]) == 2
        for r in p["candidates"]:
            assert r["status"] == "ok" and list(r["check"]["tensors"]) == outputs, (p["name"], r)
        assert p["best"] is not None and p["best_over_heuristic"] >= 1.0
