"""Vocabulary-parallel fused linear head: each rank holds contiguous rows of `weight` (and `bias`).

Forward: every rank runs the ordinary head (any backend) on its rows, with labels it does not hold pointed at its
row 0, and all-gathers its per-token (lse, log-prob of the label, entropy, log sum p^2). Every rank then merges
the same table the same way (`merge_vocab_shards`), so all ranks hold identical results.

Backward: the head's backward is called with the *merged* lse and entropy, which makes its softmax term the
global one (p_v = exp(z_v - lse)) and its entropy term -p_v (z_v - (lse - H)) the global one. Its onehot term is
right for the labels this rank holds; for the others it landed on row 0 and is subtracted here (an O(n H)
correction, no logits). The hidden-state gradient is the sum of every rank's part (all-reduced in fp32); the
weight and bias gradients are this rank's rows only. No rank holds the full weight or a full logits row.
"""
from __future__ import annotations

import torch

from prefopt._types import RowStats
from prefopt.cpu.rowops_torch import acc_dtype, mixture_entropy, transform_with_slope
from prefopt.functions import finish_forward, head_call_kwargs, head_impl, upstream_grads, vocab_order_kwargs
from prefopt.parallel.collectives import all_reduce_sum, gather_rows


def merge_vocab_shards(lse, logp, entropy, log_sum_p2, owner) -> RowStats:
    """Per-token statistics over the whole vocabulary from those of its shards, in float64.

    lse, logp, entropy, log_sum_p2: [world, n] (entropy / log_sum_p2 may be None); shard r's values are over its
    own rows, and its logp is that of the label where r is the label's owner (`owner` [n], group ranks).
    The shard weights w_r = exp(lse_r - lse) sum to 1: H = sum_r w_r (H_r - log w_r) and
    log sum p^2 = log sum_r w_r^2 exp(log_sum_p2_r). A shard with w_r = 0 (all its logits -inf) adds exactly 0
    and never 0 * NaN; a NaN anywhere stays NaN, as on one rank.
    """
    lse, logp = lse.double(), logp.double()
    top = lse.amax(0)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    merged_lse = shift + (lse - shift).exp().sum(0).log()
    owner_lse = lse.gather(0, owner[None]).squeeze(0)
    owner_logp = logp.gather(0, owner[None]).squeeze(0)
    # logp_r + (lse_r - lse): both terms are <= 0 exactly (lse >= max_r lse_r after rounding), so the sum is too.
    merged_logp = owner_logp + (owner_lse - merged_lse)
    # An owner whose rows are all -inf has the label's logit -inf: logp is -inf, or NaN when the merged lse is not
    # finite (every row -inf or a NaN somewhere); `merged_lse - merged_lse` is 0, or NaN in exactly those cases.
    merged_logp = torch.where(owner_lse == float("-inf"), float("-inf") + (merged_lse - merged_lse), merged_logp)
    merged_entropy = merged_sqsum = None
    if entropy is not None:
        merged_entropy = mixture_entropy(lse, entropy.double(), merged_lse)
    if log_sum_p2 is not None:
        w = (lse - merged_lse).exp()
        merged_sqsum = torch.where(w == 0, 0.0, w * w * log_sum_p2.double().exp()).sum(0).log()
    return RowStats(merged_logp, merged_lse, merged_entropy, merged_sqsum)


def _gathered_stats(stats, foreign, shard):
    rows = [stats.lse, torch.where(foreign, torch.zeros_like(stats.logp), stats.logp)]
    rows += [r for r in (stats.entropy, stats.log_sum_p2) if r is not None]
    table = gather_rows(torch.stack([r.double() for r in rows]), shard.group)
    columns = iter(table.unbind(1))
    lse, logp = next(columns), next(columns)
    entropy = next(columns) if stats.entropy is not None else None
    log_sum_p2 = next(columns) if stats.log_sum_p2 is not None else None
    return lse, logp, entropy, log_sum_p2


class VocabParallelLinearLogprobsFunction(torch.autograd.Function):
    """hidden [n, H] (the same on every rank), weight [V_r, H] and bias [V_r] | None (this rank's rows), labels [n]
    (global ids, all valid, the same on every rank), params: HeadParams, shard: VocabShard
    -> like LinearLogprobsFunction, identical on every rank of the group."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, params, shard):
        impl = head_impl(hidden, weight)
        kwargs = head_call_kwargs(impl, params)
        local_labels, foreign = shard.local_labels(labels)
        kwargs |= vocab_order_kwargs(params, hidden, weight, bias, local_labels)  # this rank's rows only
        local = impl.linear_forward(hidden, weight, bias, local_labels, *params.linear_forward_args(), **kwargs)
        merged = merge_vocab_shards(*_gathered_stats(local, foreign, shard), shard.owners(labels))
        stats = RowStats(*(None if r is None else r.to(local.lse.dtype) for r in merged))
        ctx.impl, ctx.backward_kwargs, ctx.params, ctx.shard = impl, kwargs, params, shard
        ctx.save_for_backward(hidden, weight, bias, local_labels, foreign, stats.lse, stats.entropy)
        return finish_forward(ctx, stats)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_sqsum):
        hidden, weight, bias, local_labels, foreign, lse, entropy = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if not any(needs) or (grad_logp is None and grad_entropy is None):
            ctx.backward_kwargs = {}
            return None, None, None, None, None, None
        grad_logp, grad_entropy = upstream_grads(grad_logp, grad_entropy, lse)
        grad_hidden, grad_weight, grad_bias = ctx.impl.linear_backward(
            hidden, weight, bias, local_labels, lse, entropy, grad_logp, grad_entropy,
            *ctx.params.linear_backward_args(), needs, **ctx.backward_kwargs)
        acc = acc_dtype(hidden.dtype)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(acc)
        grad_hidden, grad_weight, grad_bias = _remove_foreign_onehot(
            hidden, weight, bias, foreign, grad_logp, ctx.params, grad_hidden, grad_weight, grad_bias)
        if grad_hidden is not None:
            grad_hidden = all_reduce_sum(grad_hidden, ctx.shard.group).to(hidden.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _remove_foreign_onehot(hidden, weight, bias, foreign, grad_logp, params, grad_hidden, grad_weight, grad_bias):
    """Subtract g_i * dz/draw at row 0 for every token i whose label another rank holds: the head's backward put
    the onehot term of those tokens on row 0 (VocabShard.local_labels). Done in the accumulation dtype; row 0 of
    the weight and bias gradients is rounded once more to their dtype."""
    rows = foreign.nonzero().squeeze(1)
    if rows.numel() == 0:
        return grad_hidden, grad_weight, grad_bias
    acc = acc_dtype(hidden.dtype)
    foreign_hidden = hidden.index_select(0, rows).to(acc)
    row0 = weight[0].to(acc)
    if params.softcap:
        raw = foreign_hidden @ row0
        if bias is not None:
            raw = raw + bias[0].to(acc)
        _, slope = transform_with_slope(raw, params.logit_scale, params.softcap, params.temperature)
    else:
        slope = params.logit_scale / params.temperature
    onehot = grad_logp.index_select(0, rows).to(acc) * slope  # [k]: d loss / d raw logit at row 0
    if grad_hidden is not None:
        grad_hidden.index_add_(0, rows, onehot[:, None] * row0, alpha=-1)
    if grad_weight is not None:
        grad_weight[0] = (grad_weight[0].to(acc) - onehot @ foreign_hidden).to(grad_weight.dtype)
    if grad_bias is not None:
        grad_bias[0] = (grad_bias[0].to(acc) - onehot.sum()).to(grad_bias.dtype)
    return grad_hidden, grad_weight, grad_bias
