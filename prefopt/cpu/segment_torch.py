"""Masked per-segment sums in plain torch (the `torch` backend of sequence_logps).

Sums accumulate in float64 whatever the input dtype, then round once to the output dtype: a float32 sum of
131072 log-probs around -10 is then within one float32 spacing of the exact sum, where a float32 accumulator
(sequential or pairwise) drifts by 0.04-8 nats (README "Dtypes"). A token with weight 0 is left out, not
multiplied by 0, so -inf or NaN at masked positions cannot reach the sum.
"""
from __future__ import annotations

import torch


def _segment_ids(cu_seqlens, n_tokens):
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=n_tokens)


def segment_forward(values, weights, cu_seqlens, average):
    n_segments = cu_seqlens.numel() - 1
    seg = _segment_ids(cu_seqlens, values.numel())
    exact = values.double()
    weighted = exact if weights is None else torch.where(weights != 0, exact * weights.double(), 0.0)
    sums = torch.zeros(n_segments, dtype=torch.float64, device=values.device).index_add_(0, seg, weighted)
    present = torch.ones_like(exact) if weights is None else (weights != 0).double()
    counts = torch.zeros_like(sums).index_add_(0, seg, present)
    if average:
        sums = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return sums.to(values.dtype), counts.to(values.dtype)


def segment_backward(grad_out, weights, cu_seqlens, counts, average, n_tokens):
    seg = _segment_ids(cu_seqlens, n_tokens)
    per_segment = grad_out
    if average:
        per_segment = torch.where(counts > 0, grad_out / counts.clamp_min(1), torch.zeros_like(grad_out))
    grad = per_segment[seg]
    return grad if weights is None else grad * weights
