"""The fused linear head with its weight given in two column blocks, [W | E], never concatenated whole.

`linear_logprobs(hidden, weight, labels, bias, extra_weight=E)`: hidden [n, H + R], W [V, H], E [V, R], and the
logits are `hidden @ [W | E].T + bias`. This is LoRA on the LM head (`prefopt/integrations/adapters.py`: E = B, the
last R hidden columns u = s * dropout(h) A^T) without a [V, H + R] copy of the head.

The vocabulary is cut into slabs of rows [s, e) (`slab_rows`: about SLAB_BYTES of [W | E] rows each). Each slab's
block [W[s:e] | E[s:e]] is formed, given to the ordinary backend head (any backend: the kernels never see the split)
and dropped. The slabs are merged as the vocabulary-parallel head merges its ranks (`prefopt/parallel/vocab.py`,
with a loop where that one has collectives): a label in another slab points at the slab's row 0, the per-token
(lse, label log-prob, entropy, log sum p^2) of the slabs are merged in float64 by `merge_vocab_shards`, and the
backward calls each slab's head backward with the merged lse and entropy, takes the foreign labels' onehot term back
out of row 0 and adds the slabs' hidden-state gradients. The weight gradient of slab rows [s, e) is split into W's
(when W trains) and E's columns.

Memory: one slab block and its weight gradient at a time (2 x SLAB_BYTES at most) instead of the [V, H + R] copy
and its [V, H + R] gradient; the merge holds [slabs, n] float64 statistics. Cost: each slab is one more pass over the
token rows, and the weight-gradient GEMM runs over all H + R columns of a slab even when W is frozen.
The CPU head's logits-tile cache budget is shared out over the slabs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from prefopt._types import RowStats
from prefopt.cpu.rowops_torch import acc_dtype
from prefopt.functions import finish_forward, head_call_kwargs, head_impl, upstream_grads, vocab_order_kwargs
from prefopt.parallel.vocab import _remove_foreign_onehot, merge_vocab_shards

# Bytes of one slab block [W[s:e] | E[s:e]]: at H + R = 4112 in bf16, 8192 vocabulary rows (64 MiB); the block's
# weight gradient is as large again. Rows are a multiple of 128, the widest vocabulary tile of the heads.
SLAB_BYTES = 64 * 2 ** 20
SLAB_ALIGN = 128


@dataclass(frozen=True)
class SplitWeight:
    """The second column block E [V, R] of a head's weight (the first is the `weight` argument)."""
    extra: torch.Tensor


def slab_rows(vocab, features, element_size, budget=None):
    """Vocabulary rows per slab: `budget` (default SLAB_BYTES) of [W | E] rows, a multiple of SLAB_ALIGN."""
    rows = (SLAB_BYTES if budget is None else budget) // max(1, features * element_size)
    rows = max(SLAB_ALIGN, rows // SLAB_ALIGN * SLAB_ALIGN)
    return min(vocab, rows)


def _slabs(vocab, rows):
    return [(s, min(s + rows, vocab)) for s in range(0, vocab, rows)]


def _block(weight, extra, start, stop):
    return torch.cat([weight[start:stop], extra[start:stop]], dim=1)


def _local(labels, start, stop):
    foreign = (labels < start) | (labels >= stop)
    return torch.where(foreign, torch.zeros_like(labels), labels - start), foreign


class SplitWeightLinearLogprobsFunction(torch.autograd.Function):
    """hidden [n, H + R], weight [V, H], extra [V, R], bias [V] | None, labels [n] (all valid), params: HeadParams
    -> like LinearLogprobsFunction on the weight [weight | extra]."""

    @staticmethod
    def forward(ctx, hidden, weight, extra, bias, labels, params):
        vocab = weight.shape[0]
        slabs = _slabs(vocab, slab_rows(vocab, hidden.shape[1], hidden.element_size()))
        slab_params = replace(params, cache_bytes=params.cache_bytes // len(slabs))
        lse, logp, entropy, sqsum, calls = [], [], [], [], []
        for start, stop in slabs:
            block = _block(weight, extra, start, stop)
            block_bias = None if bias is None else bias[start:stop]
            impl = head_impl(hidden, block)
            local, foreign = _local(labels, start, stop)
            kwargs = head_call_kwargs(impl, slab_params) | vocab_order_kwargs(params, hidden, block, block_bias,
                                                                               local)
            stats = impl.linear_forward(hidden, block, block_bias, local, *params.linear_forward_args(), **kwargs)
            lse.append(stats.lse)
            logp.append(torch.where(foreign, torch.zeros_like(stats.logp), stats.logp))
            entropy.append(stats.entropy)
            sqsum.append(stats.log_sum_p2)
            calls.append((impl, kwargs))
        owner = torch.bucketize(labels, torch.tensor([e for _, e in slabs], device=labels.device), right=True)
        merged = merge_vocab_shards(torch.stack(lse), torch.stack(logp),
                                    None if entropy[0] is None else torch.stack(entropy),
                                    None if sqsum[0] is None else torch.stack(sqsum), owner)
        stats = RowStats(*(None if r is None else r.to(lse[0].dtype) for r in merged))
        ctx.slabs, ctx.calls, ctx.params = slabs, calls, params
        ctx.save_for_backward(hidden, weight, extra, bias, labels, stats.lse, stats.entropy)
        return finish_forward(ctx, stats)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_sqsum):
        hidden, weight, extra, bias, labels, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_extra, need_bias = ctx.needs_input_grad[:4]
        if not any((need_hidden, need_weight, need_extra, need_bias)) or (grad_logp is None
                                                                          and grad_entropy is None):
            ctx.calls = []  # drop any kept tiles with the graph's other buffers
            return None, None, None, None, None, None
        grad_logp, grad_entropy = upstream_grads(grad_logp, grad_entropy, lse)
        acc = acc_dtype(hidden.dtype)
        width = weight.shape[1]
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_extra = torch.empty_like(extra) if need_extra else None
        grad_bias = torch.empty_like(bias) if need_bias else None
        needs = (need_hidden, need_weight or need_extra, need_bias)
        for (start, stop), (impl, kwargs) in zip(ctx.slabs, ctx.calls):
            block = _block(weight, extra, start, stop)
            block_bias = None if bias is None else bias[start:stop]
            local, foreign = _local(labels, start, stop)
            g_hidden, g_block, g_bias = impl.linear_backward(
                hidden, block, block_bias, local, lse, entropy, grad_logp, grad_entropy,
                *ctx.params.linear_backward_args(), needs, **kwargs)
            if g_hidden is not None:
                g_hidden = g_hidden.to(acc)
            g_hidden, g_block, g_bias = _remove_foreign_onehot(hidden, block, block_bias, foreign, grad_logp,
                                                               ctx.params, g_hidden, g_block, g_bias)
            del block
            if grad_hidden is not None:
                grad_hidden += g_hidden
            if grad_weight is not None:
                grad_weight[start:stop] = g_block[:, :width]
            if grad_extra is not None:
                grad_extra[start:stop] = g_block[:, width:]
            if grad_bias is not None:
                grad_bias[start:stop] = g_bias
        ctx.calls = []
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, grad_extra, grad_bias, None, None
