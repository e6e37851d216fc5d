"""Cost of one linear-head call on a GPU: FLOPs and bytes per kernel, the time a roofline predicts, and the rule
that picks between the two heads of the triton backend (`choose_head`, used by PREFOPT_HEAD=auto).

The Triton head (kernels/linear_logprobs.py) trades memory for traffic: no logits are stored, so

* the forward kernel re-reads a [BLOCK_N, H] slice of hidden for every vocabulary tile, and a [BLOCK_V, H]
  slice of the weight for every token block;
* the backward kernel recomputes each logits tile (the forward's GEMM again), reads both operand slices a
  second time for its two products, and adds every tile's share of grad_hidden ([BLOCK_N, H]) and
  grad_weight ([BLOCK_V, H]) to global fp32 buffers with atomics: N*H*4 bytes per vocabulary tile column
  and V*H*4 bytes per token block row.

A roofline time is the largest of: FLOPs at the tensor-core (or FMA) peak, operand + atomic bytes at the
L2 bandwidth, and the unavoidable HBM bytes (each input and output once) at the HBM bandwidth. It assumes
perfect overlap, so it is a lower bound; its use is to compare designs (tile sizes, filtering, a cuBLAS-tile
head) by what bounds them, not to promise a time. `bench/kernel_report.py` prints it next to each compiled
kernel.

The tiled head (prefopt/cpu/chunked.py's ChunkedHead on the Triton row ops, `tiled_head_costs`) runs a sequence
of separate kernels per [rows, cols] tile: a cuBLAS GEMM into a logits tile, a cast to an owned fp32 tile, the
row-op fold (forward) or the in-place gradient (backward), a cast back, two cuBLAS GEMMs for the gradients and
the fp32 accumulation of their results. No atomics, but every tile makes several HBM round trips, and the
kernels of one stream do not overlap: its device time is the *sum* of the GEMM time (math-bound at these shapes)
and of the memory passes at HBM bandwidth. Its ops are issued one by one from Python, so the host time (ops per
tile x an assumed cost per op) is a floor too, and the backward waits for the device once per tile (a
`nonzero` of the rows whose label lies in another vocabulary block): predicted = max(device, host) + syncs x
an assumed bubble. `choose_head` compares the two predictions; docs/bench.md ("Which GPU head") states the
assumptions and the numbers at the issue shape.

Gradient filtering and vocabulary sorting (docs/design.md) enter both heads: the fused backward tests each tile in
registers (no traffic) and skips the products and atomics of a negligible one, and when sorted reads the order
vector for every tile; the tiled backward reads each fp32 tile once more for the test, runs its products only over
the kept blocks (prefopt/cpu/chunked.py `_filtered_groups`, which prices a copied element by `filter_copy_macs`),
and when sorted gathers each block's weight rows and index_adds their gradient rows back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Roofline:
    name: str
    flops: dict          # peak FLOP/s by math mode
    hbm_bytes_per_s: float
    l2_bytes_per_s: float
    source: str


# NVIDIA H100 SXM5 datasheet: dense bf16/fp16 989.4 TFLOP/s, tf32 494.7, fp32 FMA 66.9, HBM3 3.35 TB/s.
# L2 bandwidth is not in the datasheet: 5.5 TB/s is a published microbenchmark reading of H100 SXM and is an
# assumption here; atomics are charged at that rate too (optimistic: a fp32 add is a read-modify-write in L2).
H100_SXM = Roofline("H100 SXM", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
                    3.35e12, 5.5e12, "datasheet FLOP/s and HBM; L2 5.5 TB/s assumed")


@dataclass(frozen=True)
class Host:
    op_s: float          # host time of one eager aten op or Triton launch issued from Python
    sync_s: float        # device idle after a device->host sync, before the host has queued work again
    source: str


# Assumed, not measured (no GPU here): eager PyTorch spends a few microseconds of CPU per op (views ~2 us, kernel
# launches 5-10 us); 5 us is the average taken. After a sync the device waits for the next few small ops to be
# queued: 20 us assumed. `prefopt bench --heads` on a GPU measures what these stand for.
EAGER_HOST = Host(5e-6, 20e-6, "assumed: 5 us per eager op, 20 us of device idle per host sync")

# aten ops (views included) the tiled head issues per tile from Python, counted with a TorchDispatchMode on
# prefopt/cpu/chunked.py with several vocabulary blocks (tests/test_cost_model.py recounts them): forward 15
# (26 when entropy is returned: the merge of E_p[z]), backward 38 (the mean of 37 for log-probs alone and 39 with an
# entropy gradient; the foreign-label correction is half of them).
FORWARD_OPS_PER_TILE = 15
FORWARD_OPS_PER_TILE_ENTROPY = 26
BACKWARD_OPS_PER_TILE = 38
# ...and what filtering adds to a backward tile, net (the test, the skipped count, the layout choice, less the GEMM
# ops of skipped tiles; counted the same way by tests/test_filter_cost.py: 4 when nothing is skipped, 8-12 when blocks
# are)
FILTER_OPS_PER_TILE = 10

# A copied element (a gathered tile or weight entry, an index_add-ed gradient entry) in multiply-adds of a GEMM, for
# the tiled head's choice between a filtered tile's whole GEMMs and its gathered kept blocks (chunked.py
# `_filtered_groups`). CPU: measured 30-60 per thread on the 2-core machine of docs/bench.md (fp32, one thread,
# process CPU time, tile-column and weight-row gathers and index_add_ against the tile's GEMMs at H=256 and 1024);
# 64 is taken, times the thread count, as GEMMs gain from more cores and copies less (an assumption that leans
# towards the whole tile, whose cost is the exact backward's). CUDA: an fp32 element read and written (8 bytes) at
# HBM bandwidth in tensor-core multiply-adds of the roofline below (~1.2k on an H100: not measured).
CPU_COPY_MACS = 64
# The same choice runs a row block's kept blocks as GEMMs of FILTER_ROWS (64) rows: per multiply-add they took 1.0-1.55x
# the time of the tile's 512-row GEMMs there (both products, H=256 and 1024), so they are charged 1.25x.
ROW_BLOCK_GEMM = 1.25


@dataclass(frozen=True)
class KernelCost:
    kernel: str
    flops: float
    operand_bytes: float   # tile loads issued to L2 (re-reads included)
    atomic_bytes: float    # fp32 atomic adds to the gradient buffers
    hbm_bytes: float       # each input read and each output written once
    math: str              # the FLOP/s entry of the roofline that applies

    def seconds(self, roofline: Roofline = H100_SXM) -> dict:
        times = {"math": self.flops / roofline.flops[self.math],
                 "l2": (self.operand_bytes + self.atomic_bytes) / roofline.l2_bytes_per_s,
                 "hbm": self.hbm_bytes / roofline.hbm_bytes_per_s}
        bound = max(times, key=times.get)
        return dict(times, predicted=times[bound], bound=bound)


def _cdiv(a, b):
    return -(-a // b)


def filter_copy_macs(device_type, threads=1, roofline=None):
    """Multiply-adds one copied element costs in the filtered tiled backward (see CPU_COPY_MACS)."""
    if device_type == "cuda":
        roofline = roofline or H100_SXM
        return round(8 / roofline.hbm_bytes_per_s * roofline.flops["bf16"] / 2)
    return CPU_COPY_MACS * max(1, int(threads))


def math_mode(dtype, fp32_precision="highest"):
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    return "tf32" if fp32_precision != "highest" else "fp32"


def head_costs(n, hidden, vocab, dtype, forward_blocks, backward_blocks, *, fp32_precision="highest",
               need_grad_hidden=True, need_grad_weight=True, skipped=0.0, filtered=None, sorted_=False):
    """[forward KernelCost, backward KernelCost] of one call of the Triton head at n tokens (all labelled),
    `hidden` features and `vocab` entries; blocks are the launcher's (BLOCK_N, BLOCK_V) choices.
    `skipped`: the fraction of backward tiles gradient filtering skips (filter_eps): such a tile still recomputes
    its logits (GEMM and operand loads) but issues neither gradient GEMM nor atomic. `filtered` (default: skipped >
    0): the FILTER kernel, whose test (|d| against the row's threshold, a max over the tile) runs in registers: 2
    FLOP per logit, no traffic. `sorted_`: the SORTED kernel reads the int64 order for each tile's columns, and the
    forward computes the order (one GEMV over the weight, an argsort of V keys, read and written once each)."""
    assert 0.0 <= skipped <= 1.0, skipped
    filtered = skipped > 0 if filtered is None else filtered
    elem = torch.empty((), dtype=dtype).element_size()
    math = math_mode(dtype, fp32_precision)
    inputs = (n * hidden + vocab * hidden) * elem

    bn, bv = forward_blocks
    token_blocks, vocab_tiles = _cdiv(n, bn), _cdiv(vocab, bv)
    gemm = 2.0 * (token_blocks * bn) * (vocab_tiles * bv) * hidden  # padded tiles do the work too
    operands = token_blocks * vocab_tiles * (bn + bv) * hidden * elem
    order_bytes = (vocab * hidden * elem + 3 * 8 * vocab) if sorted_ else 0.0  # GEMV reads W; keys, order
    forward = KernelCost("_linear_fwd_kernel", gemm + (2.0 * vocab * hidden if sorted_ else 0.0), operands, 0.0,
                         inputs + 5 * 4 * n + order_bytes, math)

    bn, bv = backward_blocks
    token_blocks, vocab_tiles = _cdiv(n, bn), _cdiv(vocab, bv)
    gemm = 2.0 * (token_blocks * bn) * (vocab_tiles * bv) * hidden
    products = int(need_grad_hidden) + int(need_grad_weight)
    kept = 1.0 - skipped
    operands = token_blocks * vocab_tiles * hidden * elem * (
        (bn + bv) + kept * (need_grad_hidden * bv + need_grad_weight * bn))
    if sorted_:
        operands += token_blocks * vocab_tiles * bv * 8.0  # the order entries of each tile's columns
    atomics = kept * 4.0 * hidden * (need_grad_hidden * n * vocab_tiles + need_grad_weight * vocab * token_blocks)
    outputs = 4.0 * hidden * (need_grad_hidden * n + need_grad_weight * vocab)
    test = 2.0 * (token_blocks * bn) * (vocab_tiles * bv) if filtered else 0.0
    backward = KernelCost("_linear_bwd_kernel", gemm * (1 + kept * products) + test, operands, atomics,
                          inputs + outputs, math)
    return [forward, backward]


@dataclass(frozen=True)
class TiledPassCost:
    """One pass (forward or backward) of the tiled head: its kernels run one after another on one stream."""
    kernel: str
    tiles: int
    flops: float             # cuBLAS GEMMs
    gemm_bytes: float        # their operand reads (re-reads included) and outputs
    reread_bytes: float      # part of gemm_bytes: hidden read once per vocabulary block, weight once per row block,
                             # beyond the first read of each
    pass_bytes: float        # elementwise / row-op kernels over the logits tiles (casts, fold, in-place gradient)
    accumulate_bytes: float  # fp32 gradient accumulators: the per-tile read-modify-write outside the GEMMs
    host_ops: int
    syncs: int
    math: str

    def seconds(self, roofline: Roofline = H100_SXM, host: Host = EAGER_HOST) -> dict:
        math = self.flops / roofline.flops[self.math]
        gemm = max(math, self.gemm_bytes / roofline.hbm_bytes_per_s)  # each GEMM at its own roofline
        memory = (self.pass_bytes + self.accumulate_bytes) / roofline.hbm_bytes_per_s
        device = gemm + memory                                        # no overlap between kernels of one stream
        host_s = self.host_ops * host.op_s
        sync = self.syncs * host.sync_s
        parts = {"gemm": gemm, "hbm": memory, "host": host_s}
        return dict(math=math, gemm=gemm, hbm=memory, device=device, host=host_s, sync=sync,
                    predicted=max(device, host_s) + sync,
                    bound="host" if host_s > device else max(("gemm", "hbm"), key=parts.get))


def tiled_head_costs(n, hidden, vocab, dtype, tile, *, fp32_precision="highest", want_entropy=False,
                     need_grad_hidden=True, need_grad_weight=True, skipped=0.0, filtered=None, sorted_=False):
    """[forward TiledPassCost, backward TiledPassCost] of one call of the tiled head (ChunkedHead on the Triton row
    ops) at n tokens (all labelled), `hidden` features, `vocab` entries and `tile` = (rows, cols) of
    prefopt/cpu/chunked.py `tile_shape`. Bytes follow what that code does with each [rows, cols] tile:
    forward   GEMM -> raw tile (input dtype) -> fp32 copy -> row_forward reads it
    backward  GEMM -> raw tile -> fp32 copy -> row_backward in place (read + write) -> cast to the input dtype ->
              grad_hidden GEMM and grad_weight GEMM read it; each GEMM's [rows|cols, H] result is added into an
              fp32 accumulator (16-bit inputs: a separate add, reading the result and the accumulator and
              writing the accumulator; fp32 inputs: addmm_ in place, read + write inside the GEMM).
    Without bias; the per-token vectors (O(n) per tile) are left out, and so are zeroing the fp32 accumulators and
    casting them to the input dtype at the end: both heads do that alike (head_costs leaves it out too).
    Filtering (`filtered`, default skipped > 0; `skipped` = fraction of blocks skipped): the test reads each fp32
    tile once more (4 bytes per logit), two host syncs and FILTER_OPS_PER_TILE ops per tile; the gradient products
    and their accumulation cover the kept fraction, whose entries are gathered once when any block is skipped
    (8 bytes per kept logit: the bound of `_filtered_groups`' copies, which choose the whole tile when the copies
    would cost more). Sorting (`sorted_`): the forward computes the order (a GEMV over the weight) and both passes
    gather each block's weight rows (read + write); the backward index_adds the weight gradient rows (reads its
    product and reads + writes the fp32 rows) instead of accumulating inside the GEMM."""
    assert 0.0 <= skipped <= 1.0, skipped
    filtered = skipped > 0 if filtered is None else filtered
    kept = 1.0 - skipped
    elem = torch.empty((), dtype=dtype).element_size()
    math = math_mode(dtype, fp32_precision)
    cast = elem != 4                                   # 16-bit inputs: the GEMM output is cast to/from fp32
    rows, cols = tile
    row_blocks, col_blocks = _cdiv(n, rows), _cdiv(vocab, cols)
    tiles = row_blocks * col_blocks
    logits = float(n) * vocab                          # every pass covers each logit once (ragged tiles unpadded)
    hidden_reads = col_blocks * n * hidden * elem      # one per vocabulary block
    weight_reads = row_blocks * vocab * hidden * elem  # one per row block
    reread = (col_blocks - 1) * n * hidden * elem + (row_blocks - 1) * vocab * hidden * elem
    to_fp32 = (elem + 4) * logits if cast else 0.0

    gathers = 2.0 * elem * row_blocks * vocab * hidden if sorted_ else 0.0  # each block's weight rows, per pass
    order = (elem * vocab * hidden + 3 * 8 * vocab) if sorted_ else 0.0  # the forward's GEMV and argsort
    forward = TiledPassCost(
        "tiles forward", tiles, 2.0 * logits * hidden + (2.0 * vocab * hidden if sorted_ else 0.0),
        hidden_reads + weight_reads + elem * logits + order, reread, to_fp32 + 4 * logits + gathers, 0.0,
        tiles * (FORWARD_OPS_PER_TILE_ENTROPY if want_entropy else FORWARD_OPS_PER_TILE), 0, math)

    products = int(need_grad_hidden) + int(need_grad_weight)
    gemm_bytes = hidden_reads + weight_reads + elem * logits                # the recomputed logits tile
    accumulate = 0.0
    result = elem if cast else 8                                            # GEMM output: 16-bit, or fp32 read+write
    if need_grad_hidden:                                                    # [rows, H] per tile
        gemm_bytes += kept * (elem * logits + weight_reads + col_blocks * n * hidden * result)
        accumulate += kept * col_blocks * n * hidden * (elem + 8) if cast else 0.0
    if need_grad_weight:                                                    # [cols, H] per tile
        if sorted_:  # the product is written out, then index_add-ed: read it, read + write the fp32 rows
            gemm_bytes += kept * (elem * logits + hidden_reads + row_blocks * vocab * hidden * elem)
            accumulate += kept * row_blocks * vocab * hidden * (elem + 8)
        else:
            gemm_bytes += kept * (elem * logits + hidden_reads + row_blocks * vocab * hidden * result)
            accumulate += kept * row_blocks * vocab * hidden * (elem + 8) if cast else 0.0
    if need_grad_hidden or need_grad_weight:
        reread *= 2  # the recompute and the gradient GEMMs re-read the same operands
    passes = to_fp32 + 8 * logits + kept * ((4 + elem) * logits if cast else 0.0) + gathers
    if filtered:
        passes += 4 * logits + (8 * kept * logits if skipped > 0 else 0.0)
    backward = TiledPassCost(
        "tiles backward", tiles, 2.0 * logits * hidden * (1 + kept * products), gemm_bytes, reread,
        passes, accumulate, tiles * (BACKWARD_OPS_PER_TILE + (FILTER_OPS_PER_TILE if filtered else 0)),
        (tiles if col_blocks > 1 else 0) + (2 * tiles if filtered else 0), math)
    return [forward, backward]


@dataclass(frozen=True)
class HeadChoice:
    head: str            # "fused" or "tiles"
    fused_s: float       # predicted forward + backward of the fused head
    tiles_s: float       # predicted forward + backward of the tiled head
    fused: list          # [forward KernelCost, backward KernelCost]
    tiles: list          # [forward TiledPassCost, backward TiledPassCost]


def choose_head(n, hidden, vocab, dtype, *, fused_forward_blocks, fused_backward_blocks, tile,
                fp32_precision="highest", roofline: Roofline = H100_SXM, host: Host = EAGER_HOST,
                need_grad_hidden=True, need_grad_weight=True) -> HeadChoice:
    """THE rule of PREFOPT_HEAD=auto: the tiled head when its predicted forward + backward time is lower than the
    fused head's, else the fused head (ties too: it holds no tile). Both predictions are for one call with both
    gradients by default; the fused head's host time (three launches) is left out."""
    fused = head_costs(n, hidden, vocab, dtype, fused_forward_blocks, fused_backward_blocks,
                       fp32_precision=fp32_precision, need_grad_hidden=need_grad_hidden,
                       need_grad_weight=need_grad_weight)
    tiles = tiled_head_costs(n, hidden, vocab, dtype, tile, fp32_precision=fp32_precision,
                             need_grad_hidden=need_grad_hidden, need_grad_weight=need_grad_weight)
    fused_s = sum(c.seconds(roofline)["predicted"] for c in fused)
    tiles_s = sum(c.seconds(roofline, host)["predicted"] for c in tiles)
    return HeadChoice("tiles" if tiles_s < fused_s else "fused", fused_s, tiles_s, fused, tiles)
