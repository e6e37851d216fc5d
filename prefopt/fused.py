"""Preference losses straight from hidden states: policy head, reference head, sequence sums, loss.

No [tokens, vocab] logits exist at any point: both heads go through `linear_logprobs`, the per-sequence
sums through `sequence_logps`, and the per-pair loss through the fused loss Function. Layout follows TRL
and Liger: `hidden` is [2P, T, H] with the P chosen sequences first, then the P rejected ones, or packed
[N, H] with `cu_seqlens` [2P + 1] (chosen segments first).
"""
from __future__ import annotations

import torch

from prefopt.api import linear_logprobs, sequence_logps
from prefopt.losses import preference_loss
from prefopt.losses.table import REF_FREE_LOSSES
from prefopt.weights import ld_dpo_token_weights, wpo_pair_weights


def _is_ref_free(loss_type) -> bool:
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    return all(name in REF_FREE_LOSSES for name in names)


def _check_layout(hidden, labels, cu_seqlens, ref_hidden):
    if not isinstance(hidden, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("hidden and labels must be tensors")
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(f"padded input: hidden must be [2P, T, H] (chosen rows first, then rejected), got "
                             f"shape {tuple(hidden.shape)}; for packed [N, H] input pass cu_seqlens")
        n_sequences = hidden.shape[0]
    else:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError("cu_seqlens must be a tensor")
        if hidden.dim() == 3 and hidden.shape[0] == 1:
            hidden, labels = hidden[0], labels.reshape(labels.shape[-1])
        if hidden.dim() != 2:
            raise ValueError(f"packed input: hidden must be [N, H] (or [1, N, H]), got shape {tuple(hidden.shape)}")
        n_sequences = cu_seqlens.numel() - 1
    if n_sequences < 2 or n_sequences % 2:
        raise ValueError(f"need an even number of sequences (P chosen, then P rejected), got {n_sequences}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden shape without the feature "
                         f"dimension {tuple(hidden.shape[:-1])}")
    if ref_hidden is not None:
        ref_hidden = ref_hidden.reshape(hidden.shape[:-1] + ref_hidden.shape[-1:]) if cu_seqlens is not None and \
            ref_hidden.dim() == 3 and ref_hidden.shape[0] == 1 else ref_hidden
        if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(f"ref_hidden shape {tuple(ref_hidden.shape)} must match hidden shape "
                             f"{tuple(hidden.shape)} except the feature dimension")
    return hidden, labels, ref_hidden, n_sequences // 2


def _check_reference(ref_hidden, ref_weight, ref_chosen_logps, ref_rejected_logps, ref_free):
    live = ref_hidden is not None or ref_weight is not None
    precomputed = ref_chosen_logps is not None or ref_rejected_logps is not None
    if live and (ref_hidden is None or ref_weight is None):
        raise ValueError("a live reference needs both ref_hidden and ref_weight")
    if precomputed and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError("precomputed reference logps need both ref_chosen_logps and ref_rejected_logps")
    if live and precomputed:
        raise ValueError("give the reference either live (ref_hidden + ref_weight) or precomputed "
                         "(ref_chosen_logps + ref_rejected_logps), not both")
    if ref_free and (live or precomputed):
        raise ValueError("reference-free losses (simpo, cpo*, orpo) take no reference")
    if not ref_free and not (live or precomputed):
        raise ValueError("this loss needs a reference: pass ref_hidden + ref_weight (live reference head) or "
                         "ref_chosen_logps + ref_rejected_logps (precomputed)")
    return live


def fused_linear_preference_loss(hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None,
                                 ref_bias=None, ref_chosen_logps=None, ref_rejected_logps=None, cu_seqlens=None,
                                 ignore_index=-100, temperature=1.0, softcap=None, logit_scale=1.0, chunk_size=None,
                                 logits_cache_mb=None, loss_type="sigmoid", beta=0.1, ld_alpha=None,
                                 use_weighting=False, rpo_alpha=None, **loss_options):
    """DPO-family loss from the final hidden states, with the policy (and optional live reference) head fused.

    hidden [2P, T, H] / labels [2P, T] (label t is the token predicted from hidden t; prompt and padding
    positions hold `ignore_index`), or packed hidden [N, H] / labels [N] with cu_seqlens [2P + 1].
    Reference: live (`ref_hidden` + `ref_weight` [+ `ref_bias`], run without gradient and without logits)
    or precomputed per-sequence sums (`ref_chosen_logps`, `ref_rejected_logps`, shape [P]); none for the
    reference-free losses. `ld_alpha` (LD-DPO), `use_weighting` (WPO) and `rpo_alpha` (RPO) come from the
    same fused pass; every other keyword goes to `prefopt.preference_loss` (TRL DPOConfig names).
    `logits_cache_mb` is the policy head's logits-tile budget (see `linear_logprobs`); the reference head runs
    without gradient and keeps nothing.
    Returns (loss, metrics) as `preference_loss` does.
    """
    hidden, labels, ref_hidden, n_pairs = _check_layout(hidden, labels, cu_seqlens, ref_hidden)
    live = _check_reference(ref_hidden, ref_weight, ref_chosen_logps, ref_rejected_logps, _is_ref_free(loss_type))
    if ld_alpha is not None and not (0.0 <= float(ld_alpha) <= 1.0):
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    head = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                chunk_size=chunk_size)
    policy_head = dict(head, logits_cache_mb=logits_cache_mb)

    outputs = linear_logprobs(hidden, weight, labels, bias, return_log_sum_p2=use_weighting, **policy_head)
    token_logps, log_sum_p2 = outputs if use_weighting else (outputs, None)
    mask = (labels != ignore_index).to(token_logps.dtype)
    weights = mask if ld_alpha is None else ld_dpo_token_weights(mask, n_pairs, ld_alpha, cu_seqlens)

    logps = sequence_logps(token_logps, weights, cu_seqlens=cu_seqlens)
    lengths = sequence_logps(mask, cu_seqlens=cu_seqlens).detach()  # completion token counts
    # The NLL (sft / RPO / CPO / ORPO) is the plain token mean over chosen completions, even under LD-DPO.
    plain = logps if ld_alpha is None else sequence_logps(token_logps, mask, cu_seqlens=cu_seqlens)
    chosen_nll = -plain[:n_pairs]

    if live:
        with torch.no_grad():
            ref_tokens = linear_logprobs(ref_hidden.detach(), ref_weight.detach(), labels,
                                         None if ref_bias is None else ref_bias.detach(), **head)
            ref_logps = sequence_logps(ref_tokens, weights, cu_seqlens=cu_seqlens)
        ref_chosen_logps, ref_rejected_logps = ref_logps[:n_pairs], ref_logps[n_pairs:]

    policy_weights = wpo_pair_weights(token_logps, log_sum_p2, mask, n_pairs, cu_seqlens) if use_weighting else None

    return preference_loss(logps[:n_pairs], logps[n_pairs:], ref_chosen_logps, ref_rejected_logps,
                           loss_type=loss_type, beta=beta, chosen_lengths=lengths[:n_pairs],
                           rejected_lengths=lengths[n_pairs:], chosen_nll=chosen_nll, nll_lengths=lengths[:n_pairs],
                           rpo_alpha=rpo_alpha, policy_weights=policy_weights, **loss_options)


# The DPO-named shortcut users of Liger / TRL look for.
fused_linear_dpo_loss = fused_linear_preference_loss
