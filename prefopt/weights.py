"""Per-token and per-pair weights of the DPO variants that reweight sequences (LD-DPO, WPO).

Shared by the fused loss and the TRL drop-in, so each rule is written once. Chosen sequences come first,
then rejected ones: [2P] padded rows, or 2P packed segments of `cu_seqlens`.
"""
from __future__ import annotations

import torch

from prefopt.api import sequence_logps
from prefopt.parallel.collectives import all_reduce_sum, exclusive_prefix_over_group


def ld_dpo_token_weights(mask, n_pairs, ld_alpha, cu_seqlens=None, sequence_group=None):
    """LD-DPO (TRL `ld_alpha`): weight 1 on the first min(len_chosen, len_rejected) completion tokens of a pair,
    `ld_alpha` on the longer completion's tokens past that shared length, 0 off the completion.
    With `sequence_group`, rank r of the group holds the r-th slice of every sequence: positions count the
    completion tokens of the earlier ranks' slices, lengths those of all slices."""
    mask = mask.to(torch.float32) if not mask.dtype.is_floating_point else mask
    if cu_seqlens is None:
        position = mask.cumsum(dim=1)                       # 1-based index among completion tokens
        lengths = mask.sum(dim=1)
    else:
        segment_lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        segment = torch.repeat_interleave(torch.arange(segment_lengths.numel(), device=mask.device), segment_lengths,
                                          output_size=mask.numel())
        running = mask.cumsum(0)
        before = torch.cat([running.new_zeros(1), running])[cu_seqlens[:-1]]  # completion tokens before a segment
        position = running - before[segment]
        lengths = torch.cat([running.new_zeros(1), running])[cu_seqlens[1:]] - before
    if sequence_group is not None:
        earlier = exclusive_prefix_over_group(lengths, sequence_group)
        position = position + (earlier.unsqueeze(1) if cu_seqlens is None else earlier[segment])
        lengths = all_reduce_sum(lengths.clone(), sequence_group)
    shared = torch.minimum(lengths[:n_pairs], lengths[n_pairs:]).repeat(2)
    shared = shared.unsqueeze(1) if cu_seqlens is None else shared[segment]
    return torch.where(position <= shared, 1.0, float(ld_alpha)) * mask


@torch.no_grad()
def wpo_pair_weights(token_logps, log_sum_p2, mask, n_pairs, cu_seqlens=None, sequence_group=None):
    """WPO (TRL `use_weighting`, Eq. 2 of the paper): per sequence w = exp(mean_t (log p_t - log sum_v p_v^2))
    over completion tokens; the pair weight is w_chosen * w_rejected. Detached."""
    aligned = sequence_logps(token_logps.detach() - log_sum_p2, mask, cu_seqlens=cu_seqlens, average=True,
                             group=sequence_group)
    sequence_weights = aligned.exp()
    return sequence_weights[:n_pairs] * sequence_weights[n_pairs:]
