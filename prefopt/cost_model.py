"""Cost of one fused-head call on a GPU: FLOPs and bytes per kernel, and the time a roofline predicts.

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


def math_mode(dtype, fp32_precision="highest"):
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    return "tf32" if fp32_precision != "highest" else "fp32"


def head_costs(n, hidden, vocab, dtype, forward_blocks, backward_blocks, *, fp32_precision="highest",
               need_grad_hidden=True, need_grad_weight=True):
    """[forward KernelCost, backward KernelCost] of one call of the Triton head at n tokens (all labelled),
    `hidden` features and `vocab` entries; blocks are the launcher's (BLOCK_N, BLOCK_V) choices."""
    elem = torch.empty((), dtype=dtype).element_size()
    math = math_mode(dtype, fp32_precision)
    inputs = (n * hidden + vocab * hidden) * elem

    bn, bv = forward_blocks
    token_blocks, vocab_tiles = _cdiv(n, bn), _cdiv(vocab, bv)
    gemm = 2.0 * (token_blocks * bn) * (vocab_tiles * bv) * hidden  # padded tiles do the work too
    operands = token_blocks * vocab_tiles * (bn + bv) * hidden * elem
    forward = KernelCost("_linear_fwd_kernel", gemm, operands, 0.0, inputs + 5 * 4 * n, math)

    bn, bv = backward_blocks
    token_blocks, vocab_tiles = _cdiv(n, bn), _cdiv(vocab, bv)
    gemm = 2.0 * (token_blocks * bn) * (vocab_tiles * bv) * hidden
    products = int(need_grad_hidden) + int(need_grad_weight)
    operands = token_blocks * vocab_tiles * hidden * elem * ((bn + bv) + need_grad_hidden * bv + need_grad_weight * bn)
    atomics = 4.0 * hidden * (need_grad_hidden * n * vocab_tiles + need_grad_weight * vocab * token_blocks)
    outputs = 4.0 * hidden * (need_grad_hidden * n + need_grad_weight * vocab)
    backward = KernelCost("_linear_bwd_kernel", gemm * (1 + products), operands, atomics, inputs + outputs, math)
    return [forward, backward]
