"""Masked per-segment sums in plain torch (the `torch` backend of sequence_logps)."""
from __future__ import annotations

import torch


def _segment_ids(cu_seqlens, n_tokens):
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=n_tokens)


def segment_forward(values, weights, cu_seqlens, average):
    n_segments = cu_seqlens.numel() - 1
    seg = _segment_ids(cu_seqlens, values.numel())
    weighted = values if weights is None else values * weights
    sums = torch.zeros(n_segments, dtype=values.dtype, device=values.device).index_add_(0, seg, weighted)
    present = torch.ones_like(values) if weights is None else (weights != 0).to(values.dtype)
    counts = torch.zeros_like(sums).index_add_(0, seg, present)
    if average:
        sums = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return sums, counts


def segment_backward(grad_out, weights, cu_seqlens, counts, average, n_tokens):
    seg = _segment_ids(cu_seqlens, n_tokens)
    per_segment = grad_out
    if average:
        per_segment = torch.where(counts > 0, grad_out / counts.clamp_min(1), torch.zeros_like(grad_out))
    grad = per_segment[seg]
    return grad if weights is None else grad * weights
