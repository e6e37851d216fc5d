"""The collectives of the parallel heads, with the gradients the loss needs.

Every rank of a group computes the same loss from the same all-reduced sums, and backpropagates it itself: the
gradient of a rank's partial sum is then the gradient of the total (an identity), not a second all-reduce.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class SumOverGroup(torch.autograd.Function):
    """Forward: the sum of `partial` over `group` (every rank gets it). Backward: identity, because every rank
    holds the whole loss and differentiates it with respect to its own partial sum."""

    @staticmethod
    def forward(ctx, partial, group):
        total = partial.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return grad_total, None


def sum_over_group(partial, group):
    return SumOverGroup.apply(partial, group)


def all_reduce_sum(tensor, group):
    """In-place sum over `group` of a tensor outside autograd (counts, the hidden gradient)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def gather_rows(rows, group):
    """rows [k, n] on every rank -> [world, k, n] in group-rank order (no gradient)."""
    rows = rows.contiguous()
    parts = [torch.empty_like(rows) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, rows, group=group)
    return torch.stack(parts)


def exclusive_prefix_over_group(values, group):
    """values [n] on every rank -> sum of the values of the ranks before this one in group-rank order."""
    table = gather_rows(values.unsqueeze(0), group)[:, 0]
    return table[:dist.get_rank(group)].sum(0)
