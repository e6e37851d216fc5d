"""The fused linear head for CPU backends: token chunks x the full vocabulary.

Each chunk is one GEMM (torch/BLAS does that best) into an owned fp32 tile, folded by the row ops of the
chosen backend (torch or C++) into per-token statistics. The backward recomputes the tile, turns it into
the logits gradient *in place* and feeds two GEMMs. The chunk height shrinks as V grows, so the tile stays
about TILE_ELEMENTS and peak extra memory does not grow with V.
"""
from __future__ import annotations

import torch

from prefopt._types import RowStats

TILE_ELEMENTS = 1 << 23  # 8M fp32 = 32 MiB per tile


def chunk_rows(n_rows: int, vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, min(n_rows, TILE_ELEMENTS // max(vocab, 1)))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile(hidden_rows, weight, bias):
    """Raw logits of a chunk as an owned accumulator-dtype tensor."""
    if bias is None:
        raw = hidden_rows @ weight.T
    else:
        raw = torch.addmm(bias, hidden_rows, weight.T)
    acc = _acc(raw.dtype)
    return raw if raw.dtype == acc else raw.to(acc)


class ChunkedHead:
    """linear_forward / linear_backward (docs/design.md) on top of a row-ops module."""

    def __init__(self, rowops):
        self.rowops = rowops

    def linear_forward(self, hidden, weight, bias, labels, logit_scale, softcap, temperature, want_entropy,
                       want_sqsum, chunk_size=None):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        step = chunk_rows(n_rows, vocab, chunk_size)
        parts = []
        for start in range(0, n_rows, step):
            stop = min(n_rows, start + step)
            raw = _tile(hidden[start:stop], weight, bias)
            parts.append(self.rowops.row_forward(raw, labels[start:stop], -1, logit_scale, softcap, temperature,
                                                 want_entropy, want_sqsum))
            del raw
        return RowStats(*(None if parts[0][i] is None else torch.cat([p[i] for p in parts])
                          for i in range(len(RowStats._fields))))

    def linear_backward(self, hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, logit_scale,
                        softcap, temperature, chunk_size=None, needs_input_grad=(True, True, True)):
        need_h, need_w, need_b = needs_input_grad
        need_b = need_b and bias is not None
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        acc = _acc(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
        step = chunk_rows(n_rows, vocab, chunk_size)
        for start in range(0, n_rows, step):
            stop = min(n_rows, start + step)
            rows = slice(start, stop)
            tile = _tile(hidden[rows], weight, bias)
            self.rowops.row_backward(tile, labels[rows], lse[rows], None if entropy is None else entropy[rows],
                                     grad_logp[rows], None if grad_entropy is None else grad_entropy[rows],
                                     -1, logit_scale, softcap, temperature, out=tile)
            grad_tile = tile if tile.dtype == hidden.dtype else tile.to(hidden.dtype)
            if need_h:
                torch.matmul(grad_tile, weight, out=grad_hidden[rows])
            if need_w:
                if grad_tile.dtype == acc:
                    grad_weight.addmm_(grad_tile.T, hidden[rows])
                else:  # bf16/fp16 GEMM, fp32 accumulation across chunks
                    grad_weight += grad_tile.T @ hidden[rows]
            if need_b:
                grad_bias += tile.sum(0)
            del tile, grad_tile
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None and grad_bias.dtype != bias.dtype:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias
