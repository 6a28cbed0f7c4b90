"""Block shapes for the kernels, in one place.

Chosen from the problem sizes alone (no device query, so it works in the interpreter and at
import time): a tile never exceeds the next power of two of a dimension, and never goes below
16, the smallest `tl.dot` accepts.

The launchers call these on every launch, so they are plain Python (no `triton.cdiv` or
`triton.next_power_of_2`, Triton constexpr functions costing microseconds per call) and
`matmul_config` is cached per (rows, cols, red, dtype): the decision logic below runs once
per shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checks import Activation

# The dot of the per-layer kernels (kernels.linear_act) for float32 at torch's "highest"
# matmul precision: "ieee" (FMA, float32 products) or "tf32x3" (tensor cores: three TF32
# products per product, about float32's accuracy). "ieee" until a GPU run has measured
# tf32x3's speed and error: `python -m bench fwd_large_fp32` times it as `fnn_tf32x3` and
# checks its error against float64 and PyTorch's. The whole-network kernels keep "ieee".
FLOAT32_HIGHEST_DOTS = ("ieee", "tf32x3")
FLOAT32_HIGHEST_DOT = "ieee"


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2, in plain Python."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, as triton.cdiv, in plain Python."""
    return -(-a // b)


def _fit(size: int, cap: int) -> int:
    return max(16, min(cap, next_power_of_2(max(size, 1))))


def _caps(dtype: torch.dtype) -> tuple[int, int, int]:
    """Largest (rows, cols, reduction) tile for a dtype: wider types keep tiles smaller.
    float32 and float64 reduce 16 at a time: FMA dots ("highest", float64) hold both operands
    of their whole reduction step in registers. 16-bit tiles stop at 64 columns: the
    activation epilogue on a 128 x 128 tile (64 elements per thread at 8 warps) spilled."""
    if dtype == torch.float64:
        return 32, 32, 16
    if dtype == torch.float32:
        return 64, 64, 16
    return 128, 64, 64


# Output-tile elements from which a kernel takes 8 warps rather than 4 (fewer accumulator
# elements, and fewer operand elements for FMA and mma.sync, per thread): the smallest tiles
# that spilled at 4 warps in `python -m bench.compile`.
_EIGHT_WARPS = {torch.float64: 32 * 16, torch.float32: 64 * 32}
_EIGHT_WARPS_16BIT = 128 * 32


@functools.lru_cache(maxsize=4096)
def matmul_config(rows: int, cols: int, red: int, dtype: torch.dtype) -> TileConfig:
    """Tile for an output of (rows, cols) reduced over `red`, as every kernel here computes."""
    cap_r, cap_c, cap_k = _caps(dtype)
    block_m, block_n, block_k = _fit(rows, cap_r), _fit(cols, cap_c), _fit(red, cap_k)
    num_warps = 8 if block_m * block_n >= _EIGHT_WARPS.get(dtype, _EIGHT_WARPS_16BIT) else 4
    return TileConfig(block_m, block_n, block_k, num_warps=num_warps)


# Tiles measured on a GPU (`python -m bench.tiles`), by kernel and bucketed shape:
# (kernel, dtype, dot precision, heavy, rows, cols, reduction) -> TileConfig, where kernel is
# "fwd" (rows M, cols N, reduction K), "dx" (M, K, N) or "dw" (N, K, M); the precision is the
# kernel's INPUT_PRECISION ("ieee", "tf32", "tf32x3"); heavy says whether the kernel's
# epilogue computes a HEAVY_DELTA activation (gelu, silu, elu, softplus: more registers, so a
# tile measured with a light one does not serve it); each size is its bucket (`shape_bucket`:
# the next power of two). A shape without an entry takes matmul_config's heuristic. Empty
# until a GPU run has measured a tile that beats the heuristic.
TUNED_TILES: dict[tuple[str, torch.dtype, str, bool, int, int, int], TileConfig] = {}


def shape_bucket(n: int) -> int:
    """The bucket a size falls in for TUNED_TILES: the next power of two (at least 1)."""
    return next_power_of_2(n)


def tile_config(
    kernel: str, rows: int, cols: int, red: int, dtype: torch.dtype, precision: str, heavy: bool = False
) -> TileConfig:
    """The tile of one per-layer GEMM kernel ("fwd", "dx" or "dw") for an output of (rows,
    cols) reduced over `red`: TUNED_TILES' entry for the bucketed shape, else matmul_config's.
    Called once per launch plan (the launchers cache their plans), not per launch."""
    if TUNED_TILES:
        key = (kernel, dtype, precision, heavy, shape_bucket(rows), shape_bucket(cols), shape_bucket(red))
        tuned = TUNED_TILES.get(key)
        if tuned is not None:
            return tuned
    return matmul_config(rows, cols, red, dtype)


# The persistent descriptor forward (kernels.linear_act.linear_act_fwd_tma_kernel: one program
# per SM looping over the output tiles, X, W and Y moved by TMA on Hopper) in place of the
# per-tile forward, where it serves (kernels.linear_act.tma_fits). Off until a GPU run has
# measured it: `python -m bench` times it as `fnn_tma` beside `fnn` in the forward cases.
FORWARD_TMA = False


@functools.lru_cache(maxsize=1024)
def tma_forward_config(m: int, n: int, k: int, dtype: torch.dtype) -> TileConfig:
    """The descriptor forward's tile: 128 x 128 outputs (smaller where the output is), 64
    16-bit or 32 float32 elements of the reduction a step, 8 warps, 3 stages (sm_90a: about
    130 KiB of shared memory for 16-bit, no spill; the compile check covers it)."""
    cap_k = 64 if dtype in (torch.float16, torch.bfloat16) else 32
    block_m, block_n, block_k = _fit(m, 128), _fit(n, 128), _fit(k, cap_k)
    num_warps = 8 if block_m * block_n >= 128 * 64 else 4
    return TileConfig(block_m, block_n, block_k, group_m=8, num_warps=num_warps, num_stages=3)


def weight_grad_split(m: int, n: int, k: int, cfg: TileConfig) -> int:
    """How many slices of the batch the weight-gradient kernel reduces in parallel.

    The weight gradient has only (N/BLOCK_N)*(K/BLOCK_K) tiles; when the batch is long and
    that grid is small, split the batch so enough programs run, and sum the fp32 partials
    in a fixed order afterwards (deterministic, unlike atomics).
    """
    tiles = cdiv(n, cfg.block_n) * cdiv(k, cfg.block_k)
    rows_per_tile = 4096
    if tiles >= 128 or m <= rows_per_tile:
        return 1
    return max(1, min(cdiv(m, rows_per_tile), 128 // tiles, 64))


def cached_plan(cache: dict, key: tuple, make: Callable[[], tuple], limit: int = 4096) -> tuple:
    """cache[key], made by `make()` on its first use: the launchers' plans (grid and every
    constexpr a shape decides), plain Python, made once per key. A workload cycling through
    more than `limit` keys starts the cache again empty."""
    plan = cache.get(key)
    if plan is None:
        if len(cache) >= limit:
            cache.clear()
        plan = cache[key] = make()
    return plan


# Activation codes whose derivative the backward GEMMs do not form on load: elu, softplus,
# gelu, gelu_tanh, silu and the Z-reading elu and softplus (exp, log1p, erfc, erfcx on a whole
# operand tile spilled hundreds of bytes). kernels.linear_act.linear_act_delta_kernel forms D first, in the
# accumulator dtype (the products then see exactly the D they would have formed), and the
# GEMMs read it as an identity layer's dY: one more launch and one more pass over (M, N). A
# launcher called alone forms its own D; a backward that needs dX and dW forms it once for
# both (`delta_once`, called by fnn's autograd Functions in eager mode).
HEAVY_DELTA = frozenset(range(5, 12))

# The fused backward (kernels.linear_act.linear_act_bwd_fused_kernel) holds W whole in one
# tile, and dW's accumulator beside it: it serves layers whose out_features and in_features
# are both at most this. Wider layers take the two backward GEMM kernels.
FUSED_BACKWARD_MAX = {torch.float64: 32, torch.float32: 64, torch.float16: 64, torch.bfloat16: 64}
# Rows per program of the fused backward before the batch is split across programs (whose float
# partials of dW and db are then summed in order, as the weight-gradient kernel's are).
FUSED_BACKWARD_ROWS = 4096
FUSED_BACKWARD_MAX_SPLIT = 128


def fused_backward_fits(n: int, k: int, dtype: torch.dtype, prev: Activation | None = None) -> bool:
    """Whether one layer's backward (dX, dW, db) takes the fused kernel: W of (n, k) one tile,
    and `prev`, the previous layer's activation whose delta the kernel applies to dX (None:
    identity), a light one read off that layer's output. A HEAVY_DELTA one's derivative on the
    dX tile, beside dW's accumulator and W, spilled hundreds of bytes, and so did recomputing
    the layer input from a saved Z: those layers take the two GEMM kernels."""
    cap = FUSED_BACKWARD_MAX.get(dtype, 0)
    if n > cap or k > cap:
        return False
    return prev is None or (prev.saves != "z" and prev.code not in HEAVY_DELTA)


@functools.lru_cache(maxsize=1024)
def fused_backward_config(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[TileConfig, int]:
    """(tile, slices of the batch) for the fused backward of an (m, n, k) layer that fits:
    block_m rows per step, block_n >= n and block_k >= k."""
    wide = dtype in (torch.float32, torch.float64)
    block_m = 16 if wide else 32
    cap = FUSED_BACKWARD_MAX[dtype]
    block_n, block_k = _fit(n, cap), _fit(k, cap)
    # A 64 x 64 W and dW's accumulator take 8 warps. 32- and 64-bit types take one stage: the
    # loads of the next rows in flight beside them spilled 32 B in float32 "highest" (sm_90a).
    num_warps = 8 if block_n * block_k >= 64 * 64 else 4
    cfg = TileConfig(block_m, block_n, block_k, group_m=1, num_warps=num_warps, num_stages=1 if wide else 2)
    split = 1 if m <= FUSED_BACKWARD_ROWS else min(cdiv(m, FUSED_BACKWARD_ROWS), FUSED_BACKWARD_MAX_SPLIT)
    return cfg, split
