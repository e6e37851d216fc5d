"""Per-sequence sums whose tokens are spread over the ranks of a group (context / sequence parallelism).

Each rank sums its own slice of every sequence (in float64), the partial sums are all-reduced, and a mean
divides the total by the total count of weighted tokens: a mean of per-rank means would weight the slices wrongly.
Every rank gets the same sums; backpropagating its copy of the loss gives its own tokens' gradients.
"""
from __future__ import annotations

import torch

from prefopt.functions import SegmentSumFunction
from prefopt.parallel.collectives import all_reduce_sum, sum_over_group


def sequence_parallel_sums(values, weights, cu_seqlens, average, group):
    """values [N] and weights [N] | None of this rank's tokens, cu_seqlens [S+1] of its slices (a slice may be
    empty) -> [S] sums (or means) over the whole group, float64."""
    partial = SegmentSumFunction.apply(values.double(), None if weights is None else weights.double(), cu_seqlens,
                                       False)
    total = sum_over_group(partial, group)
    if not average:
        return total
    with torch.no_grad():
        counted = values.new_ones(values.shape, dtype=torch.float64) if weights is None else (weights != 0).double()
        counts = all_reduce_sum(SegmentSumFunction.apply(counted, None, cu_seqlens, False), group)
    # A sequence with no weighted token anywhere has total 0 (its tokens are skipped), so its mean is 0.
    return total / counts.clamp(min=1.0)
