"""Preference losses straight from hidden states: policy head, reference head, sequence sums, loss.

No [tokens, vocab] logits exist at any point: both heads go through `linear_logprobs`, the per-sequence
sums through `sequence_logps`, and the per-pair loss through the fused loss Function. Layout follows TRL
and Liger: `hidden` is [2P, T, H] with the P chosen sequences first, then the P rejected ones, or packed
[N, H] with `cu_seqlens` [2P + 1] (chosen segments first).
"""
from __future__ import annotations

import torch

from prefopt import _validation as check
from prefopt.api import prepare_linear, settled_linear_logprobs, settled_sequence_logps
from prefopt.losses.api import settled_preference_loss
from prefopt.weights import ld_dpo_token_weights, wpo_pair_weights


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
    # Every check runs before the first head pass: a bad option must not cost up to five passes over the vocabulary.
    hidden, labels, ref_hidden, n_pairs = check.check_pair_layout(hidden, labels, cu_seqlens, ref_hidden)
    check.check_forwarded_loss_options(loss_options)
    use_weighting = check.check_flag("use_weighting", use_weighting)
    ld_alpha = check.check_real("ld_alpha", ld_alpha, allow_none=True, lo=0.0, hi=1.0)
    options = check.loss_options(loss_type=loss_type, beta=beta, rpo_alpha=rpo_alpha,
                                 has_policy_weights=use_weighting, **loss_options)
    live = check.check_reference(ref_hidden, ref_weight, ref_chosen_logps, ref_rejected_logps, options.ref_free,
                                 n_pairs, hidden.device)
    # Lengths and the per-pair chosen NLL sums come from the pass itself, so check_reference was the last
    # presence check (see check_loss_presence).
    head = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                chunk_size=chunk_size)
    hidden, weight, bias, labels, policy = prepare_linear(hidden, weight, labels, bias, logits_cache_mb=logits_cache_mb,
                                                          return_log_sum_p2=use_weighting, **head)
    if live:
        # Detached, so its settled cache budget is 0: no backward comes through the reference head.
        ref_hidden, ref_weight, ref_bias, _, ref_head = prepare_linear(
            ref_hidden.detach(), ref_weight.detach(), labels, None if ref_bias is None else ref_bias.detach(),
            logits_cache_mb=0, names=("ref_hidden", "ref_weight", "ref_bias"), **head)

    outputs = settled_linear_logprobs(hidden, weight, labels, bias, policy)
    token_logps, log_sum_p2 = outputs if use_weighting else (outputs, None)
    mask = (labels != ignore_index).to(token_logps.dtype)
    weights = mask if ld_alpha is None else ld_dpo_token_weights(mask, n_pairs, ld_alpha, cu_seqlens)

    # Per-sequence sums in float64 (README "Dtypes"): the loss sees only policy - reference differences of
    # 1-10 nats, which two float32 sums of ~1e5-1e6 (spacing up to 0.125 at 131072 tokens) cannot carry. The
    # casts copy [N] token values, not logits; the gradient flows back to the float32 token log-probs.
    exact_weights = weights.double()
    logps = settled_sequence_logps(token_logps.double(), exact_weights, cu_seqlens, False)
    lengths = settled_sequence_logps(mask, None, cu_seqlens, False).detach()  # completion token counts
    # The NLL (sft / RPO / CPO / ORPO) is the plain token mean over chosen completions, even under LD-DPO.
    plain = logps if ld_alpha is None else settled_sequence_logps(token_logps.double(), mask.double(), cu_seqlens,
                                                                  False)
    chosen_nll = -plain[:n_pairs]

    if live:
        with torch.no_grad():
            ref_tokens = settled_linear_logprobs(ref_hidden, ref_weight, labels, ref_bias, ref_head)
            ref_logps = settled_sequence_logps(ref_tokens.double(), exact_weights, cu_seqlens, False)
        ref_chosen_logps, ref_rejected_logps = ref_logps[:n_pairs], ref_logps[n_pairs:]

    policy_weights = wpo_pair_weights(token_logps, log_sum_p2, mask, n_pairs, cu_seqlens) if use_weighting else None

    loss, metrics = settled_preference_loss(options, logps[:n_pairs], logps[n_pairs:], ref_chosen_logps,
                                            ref_rejected_logps, chosen_lengths=lengths[:n_pairs],
                                            rejected_lengths=lengths[n_pairs:], chosen_nll=chosen_nll,
                                            nll_lengths=lengths[:n_pairs], policy_weights=policy_weights)
    # The loss keeps the dtype of the token log-probs (float32, or float64 for float64 inputs); the metrics stay
    # float64, so rewards/margins are the exact log-ratios' differences.
    return loss.to(token_logps.dtype), metrics


# The DPO-named shortcut users of Liger / TRL look for.
fused_linear_dpo_loss = fused_linear_preference_loss
