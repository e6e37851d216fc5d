"""Tile configurations of the fused head (kernels/linear_logprobs.py): the per-architecture tables, the candidate
space of the opt-in autotune and its pruning rule. The tuner that times the candidates is kernels/_autotune.py.

A tile is (BLOCK_N tokens, BLOCK_V vocabulary entries, BLOCK_K slice of H, num_warps, num_stages). What bounds
it is the register file: a program keeps its [BLOCK_N, BLOCK_V] fp32 logits tile (forward: plus its fold
temporaries; backward: plus the dlogits tile, its 16-bit copy and two [*, BLOCK_K] product accumulators) in
registers, 255 per thread at most. ptxas decides, so every tile here was compiled for sm_80 and sm_90 on the
launches that really run (bench/aot_launches.py) and spills nothing; tests/test_aot_compile.py compiles the
tables and every autotune candidate again and fails on a spill. What was tried and why each entry won is in
docs/bench.md, "Tile choice".

Architectures. The table is picked by the device's shared memory per block, the resource that differs:
Hopper and datacenter Blackwell (sm_90, sm_100: 227 KiB) take the "sm_90" table; everything from Ampere on with
less (sm_80: 163 KiB; sm_86/89/120: 99 KiB) takes the "sm_80" table, whose tiles and candidates fit the 99 KiB
parts too (the AOT test asserts it of every sm_80 compile). Only sm_80 and sm_90 are compiled here.
A tensor not on a CUDA device (the interpreter, the meta tensors of the AOT recorder) is assumed to be sm_90,
as the cost model (an H100 roofline) is; `assume_arch` changes that for the recorder.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from prefopt._source_tree import require_prefopt_name

require_prefopt_name(__name__)

ASSUMED_ARCH = 90
_ARCH = contextvars.ContextVar("prefopt_head_arch", default=None)
_CUDA_ARCH = {}

# opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes
SMEM_PER_BLOCK = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
_SMALL_SMEM = 101376  # what an arch missing from the map is assumed to have


@dataclass(frozen=True)
class Tile:
    block_n: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int = 3

    def launch_kwargs(self) -> dict:
        return dict(BLOCK_N=self.block_n, BLOCK_V=self.block_v, BLOCK_K=self.block_k, num_warps=self.num_warps,
                    num_stages=self.num_stages)

    def __str__(self):
        return f"{self.block_n}x{self.block_v}x{self.block_k} w{self.num_warps} s{self.num_stages}"


def math_mode(dtype) -> str:
    """The dot flavour a tile runs: "16bit" (bf16/fp16 tensor cores), "tf32", "ieee" (exact fp32 FMA) or
    "fp64". fp32 follows torch.get_float32_matmul_precision() as the launcher does."""
    if dtype in (torch.bfloat16, torch.float16):
        return "16bit"
    if dtype == torch.float64:
        return "fp64"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def device_arch(device) -> int:
    """Compute capability as 80, 90, ... of a CUDA device; ASSUMED_ARCH (or what `assume_arch` set) otherwise."""
    forced = _ARCH.get()
    if forced is not None:
        return forced
    if getattr(device, "type", None) != "cuda":
        return ASSUMED_ARCH
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CUDA_ARCH:
        major, minor = torch.cuda.get_device_capability(index)
        _CUDA_ARCH[index] = 10 * major + minor
    return _CUDA_ARCH[index]


@contextlib.contextmanager
def assume_arch(arch: int):
    """Launchers inside pick the tiles of `arch` (bench/aot_launches.py records each target's launches so)."""
    token = _ARCH.set(int(arch))
    try:
        yield
    finally:
        _ARCH.reset(token)


def smem_limit(arch: int) -> int:
    return SMEM_PER_BLOCK.get(arch, _SMALL_SMEM)


def table_arch(arch: int) -> int:
    """Which table an architecture uses (see the module docstring)."""
    return 90 if arch >= 90 and smem_limit(arch) >= SMEM_PER_BLOCK[90] else 80


# (table, kernel, math mode) -> Tile. What each entry beat, compiled on the launched specialisations (ptxas of
# triton 3.9; the heaviest one, bias + softcap + filter + sorted, unless said; docs/bench.md, "Tile choice"):
# * sm_90 forward, 16-bit and tf32: 64 x 256 (255 registers, no spill in any launched specialisation). The cost
#   model's operand traffic at the issue shape is 336 GB against 403 GB at 64 x 128 (hidden is re-read once per
#   vocabulary tile, the weight once per token block): 61.1 against 73.4 ms predicted. 128 x 128 (269 GB) compiled
#   spill-free for the heaviest specialisation (bias, softcap, filter) but spilled 8-28 bytes without bias or
#   softcap and at the ragged shape; 128 x 256 spilled 1.2 KB; exact fp32 at 64 x 256 spilled 120-188 bytes.
# * sm_80 forward, 16-bit: 64 x 256 with 32-wide K slices (the 64-wide slices spilled 4-8 bytes; 128 x 128 spilled
#   8-40 bytes). tf32 stays 64 x 128 (64 x 256 spilled 4-8 bytes, 128 x 128 36-40).
# * backward, 16-bit: 64 x 128. 128 x 128 compiled spill-free on sm_80 only for the two-gradient backward (the
#   one-gradient ones spilled 28 bytes, sm_90 28-56); 16 warps capped registers at 128 and spilled (12-272 bytes);
#   so did 64 x 256 at 16 warps. 4-byte inputs run 32 x 64 (64 x 64 spilled 160-380 bytes in the one-gradient exact
#   fp32 backwards).
TABLES = {
    (90, "forward", "16bit"): Tile(64, 256, 64, 8),
    (90, "forward", "tf32"): Tile(64, 256, 32, 8),
    (90, "forward", "ieee"): Tile(64, 128, 32, 8),
    (90, "backward", "16bit"): Tile(64, 128, 32, 8),
    (90, "backward", "tf32"): Tile(32, 64, 32, 8),
    (90, "backward", "ieee"): Tile(32, 64, 32, 8),
    (80, "forward", "16bit"): Tile(64, 256, 32, 8),
    (80, "forward", "tf32"): Tile(64, 128, 32, 8),
    (80, "forward", "ieee"): Tile(64, 128, 32, 8),
    (80, "backward", "16bit"): Tile(64, 128, 32, 8),
    (80, "backward", "tf32"): Tile(32, 64, 32, 8),
    (80, "backward", "ieee"): Tile(32, 64, 32, 8),
}


def table_tile(dtype, backward: bool, arch: int = ASSUMED_ARCH) -> Tile:
    """The tile a launch of `dtype` runs on `arch` without autotuning. fp64 (interpreter only) takes the exact
    fp32 entry."""
    mode = math_mode(dtype)
    return TABLES[(table_arch(arch), "backward" if backward else "forward", "ieee" if mode == "fp64" else mode)]


# The autotune candidates per table: variations of the table entry (listed first) that compiled without spills for
# that table's arch on every launched specialisation (tests/test_aot_compile.py compiles them all). A fourth stage
# trades shared memory for latency hiding and the tile's shape trades hidden re-reads against weight re-reads, which
# only a GPU can weigh; shorter tiles (32 rows) waste less on short inputs and put more programs on the GPU. Two
# stages are not offered: for every tile here the registers limit the CTAs per SM at least as much as the shared
# memory does (e.g. 212 registers x 256 threads: one CTA), so saving shared memory buys no occupancy. Compiled and
# left out because they spilled: 32 x 128 forwards at 8 warps on sm_90 (8 bytes; they cap at 128 registers), every
# 4-warp 16-bit or tf32 forward on sm_90 (4-16 bytes), 4-warp exact-fp32 forwards on sm_80 (8-16 bytes), the 4-warp
# exact-fp32 32 x 64 backward (16-472 bytes), the 128 x 128 forwards (above) and the 64 x 256 forwards at 4 stages on
# sm_90 (spill-free in the heaviest specialisation, 4 bytes without bias).
_16BIT_BACKWARD = (Tile(64, 128, 32, 8), Tile(64, 128, 32, 8, 4), Tile(64, 64, 32, 4),
                   Tile(32, 128, 32, 4))
CANDIDATES = {
    (90, "forward", "16bit"): (Tile(64, 256, 64, 8), Tile(64, 128, 64, 8), Tile(64, 128, 64, 8, 4),
                               Tile(32, 256, 64, 8)),
    (90, "forward", "tf32"): (Tile(64, 256, 32, 8), Tile(64, 128, 32, 8), Tile(64, 128, 32, 8, 4)),
    (90, "forward", "ieee"): (Tile(64, 128, 32, 8), Tile(64, 64, 32, 4), Tile(32, 128, 32, 4)),
    (90, "backward", "16bit"): _16BIT_BACKWARD,
    (90, "backward", "tf32"): (Tile(32, 64, 32, 8), Tile(32, 64, 32, 4), Tile(16, 64, 32, 4)),
    (90, "backward", "ieee"): (Tile(32, 64, 32, 8), Tile(16, 64, 32, 4)),
    (80, "forward", "16bit"): (Tile(64, 256, 32, 8), Tile(64, 256, 32, 8, 4), Tile(64, 128, 64, 8),
                               Tile(64, 128, 64, 8, 4), Tile(32, 128, 64, 8)),
    (80, "forward", "tf32"): (Tile(64, 128, 32, 8), Tile(64, 128, 32, 8, 4), Tile(32, 128, 32, 8)),
    (80, "forward", "ieee"): (Tile(64, 128, 32, 8), Tile(32, 128, 32, 8)),
    (80, "backward", "16bit"): _16BIT_BACKWARD,
    (80, "backward", "tf32"): (Tile(32, 64, 32, 8), Tile(32, 64, 32, 4), Tile(16, 64, 32, 4)),
    (80, "backward", "ieee"): (Tile(32, 64, 32, 8), Tile(16, 64, 32, 4)),
}


def smem_bytes(tile: Tile, elem_bytes: int, backward: bool) -> int:
    """Upper bound of a tile's shared memory: num_stages buffers of one [BLOCK_N + BLOCK_V, BLOCK_K] operand
    slice each for the logits loop (Triton's pipeliner); the backward adds two more for its product loop, the
    staged dlogits tile in the input dtype and a [BLOCK_N, BLOCK_K] fp32 staging of grad_hidden's share.
    Fitted to the compiled kernels: equal to sm_90's figure for its 16-bit tiles of 64 rows or more, above the rest
    (sm_80 keeps one buffer less; exact fp32 does not pipeline); tests/test_aot_compile.py checks that it bounds
    every compiled table tile and candidate."""
    stage = (tile.block_n + tile.block_v) * tile.block_k * elem_bytes
    if not backward:
        return tile.num_stages * stage
    return (tile.num_stages + 2) * stage + tile.block_n * tile.block_v * elem_bytes + tile.block_n * tile.block_k * 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def candidates(dtype, backward: bool, arch: int, n: int, vocab: int) -> list:
    """The autotune candidates of a launch after pruning, table tile first:

    * shared memory above the arch's limit per block (smem_bytes, an upper bound);
    * tiles taller than the problem: BLOCK_N above the next power of two of n (>= 16, tl.dot's minimum), or
      BLOCK_V above that of the vocabulary; several such tiles would run the same masked work;
    * duplicates of a kept tile once clamped so.
    The table tile stays even when it is pruned (it is what runs without tuning)."""
    mode = math_mode(dtype)
    mode = "ieee" if mode == "fp64" else mode
    kind = "backward" if backward else "forward"
    elem = {torch.float64: 8, torch.float32: 4}.get(dtype, 2)
    limit = smem_limit(arch)
    first = table_tile(dtype, backward, arch)
    kept = [first]
    for tile in CANDIDATES[(table_arch(arch), kind, mode)]:
        if tile in kept or smem_bytes(tile, elem, backward) > limit:
            continue
        if tile.block_n > max(16, _next_pow2(n)) or tile.block_v > max(16, _next_pow2(vocab)):
            continue
        kept.append(tile)
    return kept
