"""Liger's per-pair auxiliary outputs (what trainers log), shared by `prefopt.fused_linear_preference_loss(...,
return_aux=True)` and `prefopt.integrations.liger`. Checked against an eager reference in tests/test_liger_forms.py."""
from __future__ import annotations

import torch

from prefopt.parallel.collectives import all_reduce_sum


@torch.no_grad()
def logits_sum(hidden, weight, bias=None):
    """Sum of `hidden @ weight.T + bias` over every row and the whole vocabulary, without the logits: a row's
    logits sum is `hidden_row . weight.sum(0) + bias.sum()`, one GEMV instead of an [N, V] GEMM."""
    ct = torch.promote_types(hidden.dtype, torch.float32)
    rows = hidden.reshape(-1, hidden.shape[-1])
    total = (rows.to(ct) @ weight.to(ct).sum(0)).sum()
    if bias is not None:
        total = total + rows.shape[0] * bias.to(ct).sum()
    return total


def paired_aux(chosen, rejected, chosen_hidden, rejected_hidden, weight, bias, nll, chosen_rewards,
               rejected_rewards, *, vocab_shard=None, sequence_group=None):
    """Liger's tuple: (chosen_logps [P], rejected_logps [P], chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards [P], rejected_rewards [P]); logits means over every position of the rows (padding included)
    and the vocabulary, as Liger's. Split heads: the logits sums add up over the vocabulary shards and the
    sequence slices, the position counts over the sequence slices."""
    vocab = weight.shape[0] if vocab_shard is None else vocab_shard.vocab
    means = []
    for hidden in (chosen_hidden, rejected_hidden):
        total = logits_sum(hidden, weight, bias)
        positions = torch.tensor(float(hidden[..., 0].numel()), dtype=total.dtype, device=total.device)
        for group in (None if vocab_shard is None else vocab_shard.group, sequence_group):
            if group is not None:
                all_reduce_sum(total, group)
        if sequence_group is not None:
            all_reduce_sum(positions, sequence_group)
        means.append(total / (positions * vocab))
    return (chosen.detach(), rejected.detach(), *means, nll.detach(), chosen_rewards.detach(),
            rejected_rewards.detach())
