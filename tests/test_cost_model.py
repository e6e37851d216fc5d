"""prefopt/cost_model.py against hand arithmetic at the head call of issue 16 (N=16384, H=4096, V=128256)."""
import math

import pytest
import torch

from prefopt.cost_model import H100_SXM, head_costs

N, H, V = 16384, 4096, 128256


def test_flops_and_atomics_at_the_issue_shape():
    fwd, bwd = head_costs(N, H, V, torch.bfloat16, (64, 128), (64, 128))
    vocab_tiles = math.ceil(V / 128)  # 1002: 128256 = 1002 x 128, no tile padded
    assert fwd.flops == 2 * N * (vocab_tiles * 128) * H
    assert bwd.flops == 3 * fwd.flops  # recompute + grad_hidden + grad_weight products
    # grad_hidden: every vocabulary tile adds an [N, H] fp32 share; grad_weight: every token block a [V, H] one
    assert bwd.atomic_bytes == 4 * H * (N * vocab_tiles + V * (N // 64))
    assert bwd.atomic_bytes / 1e9 == pytest.approx(806.9, abs=0.1)
    assert bwd.seconds(H100_SXM)["math"] * 1e3 == pytest.approx(52.2, abs=0.1)


def test_filtered_backward_keeps_the_recompute_and_drops_the_skipped_tiles_products():
    exact = head_costs(N, H, V, torch.bfloat16, (64, 128), (64, 128))[1]
    filtered = head_costs(N, H, V, torch.bfloat16, (64, 128), (64, 128), skipped=0.9)[1]
    recompute = exact.flops / 3
    test = 2 * N * math.ceil(V / 128) * 128  # the filter test: |d| against the threshold, 2 FLOP per padded logit
    assert filtered.flops == pytest.approx(recompute + 0.1 * 2 * recompute + test)
    assert filtered.atomic_bytes == pytest.approx(0.1 * exact.atomic_bytes)
    # operand loads: each tile's (BLOCK_N + BLOCK_V) x H recompute always, its two products' operands 10% of the time
    tiles = (N // 64) * math.ceil(V / 128)
    assert filtered.operand_bytes == pytest.approx(tiles * H * 2 * ((64 + 128) + 0.1 * (128 + 64)))
    assert filtered.hbm_bytes == exact.hbm_bytes
    assert head_costs(N, H, V, torch.bfloat16, (64, 128), (64, 128), skipped=0.0)[1] == exact


def test_bytes_follow_the_tiles_and_the_requested_gradients():
    wide = head_costs(N, H, V, torch.bfloat16, (64, 256), (64, 256))
    narrow = head_costs(N, H, V, torch.bfloat16, (64, 128), (64, 128))
    # doubling BLOCK_V halves the hidden re-reads and the grad_hidden atomics, not the weight's
    assert wide[1].atomic_bytes < narrow[1].atomic_bytes
    hidden_only = head_costs(N, H, V, torch.bfloat16, (64, 128), (64, 128), need_grad_weight=False)[1]
    assert hidden_only.atomic_bytes == 4 * H * N * math.ceil(V / 128)
    assert hidden_only.flops == 2 * narrow[0].flops
    fp32 = head_costs(N, H, V, torch.float32, (64, 128), (64, 64))
    assert fp32[0].operand_bytes == 2 * narrow[0].operand_bytes  # 4-byte operands
    assert fp32[0].math == "fp32" and head_costs(N, H, V, torch.float32, (64, 128), (64, 64),
                                                 fp32_precision="high")[0].math == "tf32"


def test_roofline_names_its_bound():
    fwd, _ = head_costs(N, H, V, torch.bfloat16, (64, 128), (64, 128))
    t = fwd.seconds(H100_SXM)
    assert t["bound"] == "l2" and t["predicted"] == max(t["math"], t["l2"], t["hbm"])
    exact = head_costs(N, H, V, torch.float32, (64, 128), (64, 64))[0].seconds(H100_SXM)
    assert exact["bound"] == "math"


# ------------------------------------------------------------------------------- the tiled head and the choice
from prefopt.cost_model import (BACKWARD_OPS_PER_TILE, EAGER_HOST, FORWARD_OPS_PER_TILE,  # noqa: E402
                                FORWARD_OPS_PER_TILE_ENTROPY, Host, choose_head, tiled_head_costs)

TILE = (1024, 8192)  # prefopt/cpu/chunked.py tile_shape(16384, 128256, None): 1024 rows (TARGET_ROWS) x 8M / 1024


def test_tile_shape_at_the_issue_shape():
    from prefopt.cpu.chunked import tile_shape
    assert tile_shape(N, V, None) == TILE


def test_tiled_head_bytes_and_flops_by_hand():
    fwd, bwd = tiled_head_costs(N, H, V, torch.bfloat16, TILE)
    row_blocks, col_blocks = N // 1024, math.ceil(V / 8192)  # 16 x 16 (the last vocabulary block 5376 wide)
    assert (row_blocks, col_blocks, fwd.tiles) == (16, 16, 256)
    assert fwd.flops == 2 * N * V * H and bwd.flops == 3 * fwd.flops  # unpadded: ragged tiles do no extra work
    # forward: hidden read once per vocabulary block, weight once per row block, the bf16 logits written once
    assert fwd.gemm_bytes == 16 * N * H * 2 + 16 * V * H * 2 + 2 * N * V
    assert fwd.reread_bytes == 15 * N * H * 2 + 15 * V * H * 2
    # bf16 -> fp32 copy (read 2, write 4), row_forward reads the fp32 tile (4): 10 bytes per logit
    assert fwd.pass_bytes == 10 * N * V and fwd.accumulate_bytes == 0
    # backward: copy (6), in-place gradient (read 4 + write 4), cast back to bf16 (read 4 + write 2): 20 per logit
    assert bwd.pass_bytes == 20 * N * V
    # accumulators: each tile's bf16 [rows|cols, H] product read (2) + fp32 accumulator read and written (8), per
    # vocabulary block for grad_hidden and per row block for grad_weight (zeroing and the final cast: both heads)
    assert bwd.accumulate_bytes == 16 * N * H * 10 + 16 * V * H * 10 == 160 * H * (N + V)
    assert bwd.accumulate_bytes / 1e9 == pytest.approx(94.8, abs=0.1)  # no atomics; the fused head adds 806.9 GB
    assert (fwd.syncs, bwd.syncs) == (0, 256)  # one `nonzero` per backward tile (rows labelled in another block)
    assert (fwd.host_ops, bwd.host_ops) == (256 * FORWARD_OPS_PER_TILE, 256 * BACKWARD_OPS_PER_TILE)


def test_tiled_head_seconds_by_hand():
    fwd, bwd = tiled_head_costs(N, H, V, torch.bfloat16, TILE)
    t = fwd.seconds(H100_SXM, EAGER_HOST)
    gemm = 2 * N * V * H / 989.4e12  # math-bound: its bytes take 6.9 ms at 3.35 TB/s
    assert t["gemm"] == pytest.approx(gemm) and gemm * 1e3 == pytest.approx(17.4, abs=0.1)
    assert t["hbm"] == pytest.approx(10 * N * V / 3.35e12)
    assert t["device"] == pytest.approx(t["gemm"] + t["hbm"])  # kernels of one stream add up
    assert t["host"] == pytest.approx(256 * 15 * 5e-6)         # 19.2 ms < 23.7 ms of device time
    assert t["predicted"] * 1e3 == pytest.approx(23.7, abs=0.1) and t["bound"] == "gemm"
    b = bwd.seconds(H100_SXM, EAGER_HOST)
    assert b["hbm"] == pytest.approx((20 * N * V + 160 * H * (N + V)) / 3.35e12)
    assert b["predicted"] == pytest.approx(3 * gemm + b["hbm"] + 256 * 20e-6)
    assert b["predicted"] * 1e3 == pytest.approx(98.2, abs=0.1)
    slow_host = Host(1e-3, 0.0, "test")  # 1 ms per op: the head is host-bound
    assert fwd.seconds(H100_SXM, slow_host)["bound"] == "host"


def test_fp32_tiles_accumulate_inside_the_gemm():
    fwd, bwd = tiled_head_costs(N, H, V, torch.float32, TILE)
    assert fwd.pass_bytes == 4 * N * V  # no cast: row_forward reads the GEMM's fp32 output
    assert bwd.pass_bytes == 8 * N * V and bwd.accumulate_bytes == 0  # addmm_ accumulates inside the GEMM
    assert fwd.math == "fp32"


def test_choose_head_at_the_issue_shape():
    pick = choose_head(N, H, V, torch.bfloat16, fused_forward_blocks=(64, 128), fused_backward_blocks=(64, 128),
                       tile=TILE)
    # fused: 73.4 (forward, L2) + 293.4 (backward, L2: atomics); tiles: 23.7 + 98.2
    assert pick.fused_s * 1e3 == pytest.approx(73.4 + 293.4, abs=0.2)
    assert pick.tiles_s * 1e3 == pytest.approx(23.7 + 98.2, abs=0.2)
    assert pick.head == "tiles"


def test_choose_head_is_the_lower_prediction():
    from prefopt.cpu.chunked import tile_shape
    # 64 tokens: one [64, V] tile; the fused head's forward splits the vocabulary over the SMs and is predicted faster
    small = choose_head(64, H, V, torch.bfloat16, fused_forward_blocks=(64, 128), fused_backward_blocks=(64, 128),
                        tile=tile_shape(64, V, None))
    assert small.head == ("tiles" if small.tiles_s < small.fused_s else "fused") == "fused"
    free = Host(0.0, 0.0, "test")
    assert choose_head(N, H, V, torch.bfloat16, fused_forward_blocks=(64, 128), fused_backward_blocks=(64, 128),
                       tile=TILE, host=free).head == "tiles"
    from dataclasses import replace
    slow = replace(H100_SXM, hbm_bytes_per_s=1e9)  # HBM-starved: the tiled head's passes dominate
    assert choose_head(N, H, V, torch.bfloat16, fused_forward_blocks=(64, 128), fused_backward_blocks=(64, 128),
                       tile=TILE, roofline=slow).head == "fused"


def _count_ops(want_entropy, n, v):
    """aten ops the tiled head issues on an [n, 16] x [v, 16] bf16 call (row ops counted as one launch each), forward
    and backward."""
    import prefopt.cpu.chunked as chunked
    from prefopt.cpu import rowops_torch
    from tests._probes import OpCounter

    mode = OpCounter()
    head = chunked.ChunkedHead(mode.one_launch(rowops_torch))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, 16, generator=gen).bfloat16()
    weight = torch.randn(v, 16, generator=gen).bfloat16()
    labels = torch.randint(0, v, (n,), generator=gen)
    with mode:
        stats = head.linear_forward(hidden, weight, None, labels, 1.0, None, 1.0, want_entropy, False)
    forward = mode.n
    mode.n = 0
    with mode:
        head.linear_backward(hidden, weight, None, labels, stats.lse, stats.entropy, torch.randn(n, generator=gen),
                             torch.randn(n, generator=gen) if want_entropy else None, 1.0, None, 1.0)
    return forward, mode.n


def test_host_op_counts_match_the_head(monkeypatch):
    """The per-tile counts are deterministic, so they are compared exactly: the ops one more tile adds (2 row blocks
    x 8 vocabulary blocks against 2 x 4, 64 x 64 tiles: the per-call and per-row-block ops cancel). The backward
    issues 37 per tile for log-probs alone and 39 with an entropy gradient (16-bit: each tile's grad_hidden share is
    added in place, no setitem copy); the model charges their mean."""
    import prefopt.cpu.chunked as chunked
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 64 * 64)
    monkeypatch.setattr(chunked, "TARGET_ROWS", 64)
    per_tile = {}
    for want_entropy in (False, True):
        big, small = _count_ops(want_entropy, 128, 512), _count_ops(want_entropy, 128, 256)
        per_tile[want_entropy] = [(b - s) / (2 * 4) for b, s in zip(big, small)]
    assert per_tile[False][0] == FORWARD_OPS_PER_TILE
    assert per_tile[True][0] == FORWARD_OPS_PER_TILE_ENTROPY
    assert (per_tile[False][1], per_tile[True][1]) == (37, 39)
    assert BACKWARD_OPS_PER_TILE == (37 + 39) / 2
