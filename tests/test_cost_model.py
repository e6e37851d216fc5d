"""prefopt/cost_model.py against hand arithmetic at the head call of issue 16 (N=16384, H=4096, V=128256)."""
import math

import pytest
import torch

from prefopt.cost_model import H100_SXM, head_costs

N, H, V = 16384, 4096, 128256


def test_flops_and_atomics_at_the_issue_shape():
    fwd, bwd = head_costs(N, H, V, torch.bfloat16, (64, 128), (64, 128))
    vocab_tiles = math.ceil(V / 128)  # 1002, the last one padded
    assert fwd.flops == 2 * N * (vocab_tiles * 128) * H
    assert bwd.flops == 3 * fwd.flops  # recompute + grad_hidden + grad_weight products
    # grad_hidden: every vocabulary tile adds an [N, H] fp32 share; grad_weight: every token block a [V, H] one
    assert bwd.atomic_bytes == 4 * H * (N * vocab_tiles + V * (N // 64))
    assert bwd.atomic_bytes / 1e9 == pytest.approx(806.9, abs=0.1)
    assert bwd.seconds(H100_SXM)["math"] * 1e3 == pytest.approx(52.2, abs=0.1)


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
