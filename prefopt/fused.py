"""Preference losses straight from hidden states: policy head, reference head, sequence sums, loss.

No [tokens, vocab] logits exist at any point: both heads go through `linear_logprobs`, the per-sequence
sums through `sequence_logps`, and the per-pair loss through the fused loss Function. Layout follows TRL
and Liger: `hidden` is [2P, T, H] with the P chosen sequences first, then the P rejected ones, or packed
[N, H] with `cu_seqlens` [2P + 1] (chosen segments first).
"""
from __future__ import annotations

import torch

from prefopt import _validation as check
from prefopt._aux_outputs import paired_aux
from prefopt.api import prepare_linear, settled_linear_logprobs, settled_sequence_logps
from prefopt.losses.api import settled_preference_loss
from prefopt.parallel import check_group
from prefopt.weights import ld_dpo_token_weights, wpo_pair_weights


def fused_linear_preference_loss(hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None,
                                 ref_bias=None, ref_chosen_logps=None, ref_rejected_logps=None, cu_seqlens=None,
                                 ignore_index=-100, temperature=1.0, softcap=None, logit_scale=1.0, chunk_size=None,
                                 logits_cache_mb=None, loss_type="sigmoid", beta=0.1, ld_alpha=None,
                                 use_weighting=False, rpo_alpha=None, average_log_prob=False, nll_target=None,
                                 return_aux=False, filter_eps=None, vocab_sort=False, sequence_parallel_group=None,
                                 vocab_parallel_group=None, vocab_start=None, extra_weight=None, **loss_options):
    """DPO-family loss from the final hidden states, with the policy (and optional live reference) head fused.

    hidden [2P, T, H] / labels [2P, T] (label t is the token predicted from hidden t; prompt and padding
    positions hold `ignore_index`), or packed hidden [N, H] / labels [N] with cu_seqlens [2P + 1].
    Reference: live (`ref_hidden` + `ref_weight` [+ `ref_bias`], run without gradient and without logits)
    or precomputed per-sequence sums (`ref_chosen_logps`, `ref_rejected_logps`, shape [P]); none for the
    reference-free losses. `ld_alpha` (LD-DPO), `use_weighting` (WPO) and `rpo_alpha` (RPO) come from the
    same fused pass; every other keyword goes to `prefopt.preference_loss` (TRL DPOConfig names).
    `logits_cache_mb` is the policy head's logits-tile budget (see `linear_logprobs`); the reference head runs
    without gradient and keeps nothing. `filter_eps` (gradient filtering, see `linear_logprobs`) applies to the
    heads that have a backward: the policy head and the `nll_target` head, and so does `vocab_sort`.
    Liger's options: `average_log_prob=True` scores every loss type on per-sequence means instead of sums (the
    length-normalising losses then divide by nothing more; a precomputed reference must then be means too);
    `nll_target` (same layout as `labels`; its chosen rows are read) gives the NLL term its own targets, e.g.
    prompt + completion for ORPO.
    Split over ranks (torch.distributed ProcessGroups; see README "Sequence- and vocabulary-parallel loss"):
    `sequence_parallel_group`: each rank holds a slice of every sequence's tokens ([2P, T_local, H], or packed with
    the cu_seqlens of its slices); the per-sequence sums are all-reduced, every rank gets the same loss and metrics
    and its own tokens' gradients. `vocab_parallel_group`: `weight`/`bias` (and `ref_weight`/`ref_bias`) hold this
    rank's vocabulary rows as in `linear_logprobs`; labels are global ids. Both at once for a 2-D layout.
    `extra_weight` [V, R]: the policy head's weight is `[weight | extra_weight]` and `hidden` has H + R features, as in
    `linear_logprobs` (LoRA on the LM head); not with `return_aux` nor `vocab_parallel_group`.
    Returns (loss, metrics) as `preference_loss` does; with `return_aux=True`, (loss, aux) with Liger's aux
    tuple: (chosen_logps [P], rejected_logps [P], chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards [P], rejected_rewards [P]) (logits means of the untransformed head, over every position).
    """
    # Every check runs before the first head pass: a bad option must not cost up to five passes over the vocabulary.
    hidden, labels, ref_hidden, n_pairs = check.check_pair_layout(hidden, labels, cu_seqlens, ref_hidden)
    sequence_group = None
    if sequence_parallel_group is not None:
        sequence_group = check_group("sequence_parallel_group", sequence_parallel_group)
    split_vocab = dict(vocab_parallel_group=vocab_parallel_group, vocab_start=vocab_start)
    check.check_forwarded_loss_options(loss_options)
    use_weighting = check.check_flag("use_weighting", use_weighting)
    average_log_prob = check.check_flag("average_log_prob", average_log_prob)
    return_aux = check.check_flag("return_aux", return_aux)
    ld_alpha = check.check_real("ld_alpha", ld_alpha, allow_none=True, lo=0.0, hi=1.0)
    options = check.loss_options(loss_type=loss_type, beta=beta, rpo_alpha=rpo_alpha,
                                 has_policy_weights=use_weighting, **loss_options)
    live = check.check_reference(ref_hidden, ref_weight, ref_chosen_logps, ref_rejected_logps, options.ref_free,
                                 n_pairs, hidden.device)
    # Lengths and the per-pair chosen NLL sums come from the pass itself, so check_reference was the last
    # presence check (see check_loss_presence).
    head = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                chunk_size=chunk_size)
    if extra_weight is not None and return_aux:
        raise ValueError("return_aux (Liger's logits means) is not available with extra_weight")
    hidden, weight, bias, labels, policy, shard = prepare_linear(hidden, weight, labels, bias,
                                                                logits_cache_mb=logits_cache_mb,
                                                                return_log_sum_p2=use_weighting, filter_eps=filter_eps,
                                                                vocab_sort=vocab_sort, extra_weight=extra_weight,
                                                                **head, **split_vocab)
    if nll_target is not None:
        split = n_pairs if cu_seqlens is None else int(cu_seqlens[n_pairs])
        nll_target = check.check_nll_target(nll_target, labels, cu_seqlens)[:split]
        nll_hidden, _, _, nll_target, nll_head, _ = prepare_linear(hidden[:split], weight, nll_target, bias,
                                                                  logits_cache_mb=logits_cache_mb,
                                                                  filter_eps=filter_eps, vocab_sort=vocab_sort,
                                                                  extra_weight=extra_weight, **head, **split_vocab)
    if live:
        # Detached, so its settled cache budget is 0: no backward comes through the reference head.
        ref_hidden, ref_weight, ref_bias, _, ref_head, ref_shard = prepare_linear(
            ref_hidden.detach(), ref_weight.detach(), labels, None if ref_bias is None else ref_bias.detach(),
            logits_cache_mb=0, names=("ref_hidden", "ref_weight", "ref_bias"), **head, **split_vocab)

    def sums(values, weights, cu, average):
        return settled_sequence_logps(values, weights, cu, average, sequence_group)

    outputs = settled_linear_logprobs(hidden, weight, labels, bias, policy, shard)
    token_logps, log_sum_p2 = outputs if use_weighting else (outputs, None)
    mask = (labels != ignore_index).to(token_logps.dtype)
    weights = mask if ld_alpha is None else ld_dpo_token_weights(mask, n_pairs, ld_alpha, cu_seqlens, sequence_group)

    # Per-sequence sums in float64 (README "Dtypes"): the loss sees only policy - reference differences of
    # 1-10 nats, which two float32 sums of ~1e5-1e6 (spacing up to 0.125 at 131072 tokens) cannot carry. The
    # casts copy [N] token values, not logits; the gradient flows back to the float32 token log-probs.
    exact_tokens, exact_weights = token_logps.double(), weights.double()
    logps = sums(exact_tokens, exact_weights, cu_seqlens, average_log_prob)
    lengths = sums(mask, None, cu_seqlens, False).detach()  # completion token counts
    # The NLL (sft / RPO / CPO / ORPO) is the plain token mean over chosen completions, even under LD-DPO.
    plain = logps if ld_alpha is None and not average_log_prob else \
        sums(exact_tokens, mask.double(), cu_seqlens, False)
    chosen_nll, nll_lengths = -plain[:n_pairs], lengths[:n_pairs]
    if nll_target is not None:
        nll_tokens = settled_linear_logprobs(nll_hidden, weight, nll_target, bias, nll_head, shard)
        keep = (nll_target != ignore_index).to(nll_tokens.dtype)
        chosen_cu = None if cu_seqlens is None else cu_seqlens[:n_pairs + 1]
        chosen_nll = -sums(nll_tokens.double(), keep.double(), chosen_cu, False)
        nll_lengths = sums(keep, None, chosen_cu, False).detach()
    seq_lengths = torch.ones_like(lengths) if average_log_prob else lengths  # means are already length-normalised

    if live:
        with torch.no_grad():
            ref_tokens = settled_linear_logprobs(ref_hidden, ref_weight, labels, ref_bias, ref_head, ref_shard)
            ref_logps = sums(ref_tokens.double(), exact_weights, cu_seqlens, average_log_prob)
        ref_chosen_logps, ref_rejected_logps = ref_logps[:n_pairs], ref_logps[n_pairs:]

    policy_weights = wpo_pair_weights(token_logps, log_sum_p2, mask, n_pairs, cu_seqlens,
                                      sequence_group) if use_weighting else None

    total, metrics = settled_preference_loss(options, logps[:n_pairs], logps[n_pairs:], ref_chosen_logps,
                                             ref_rejected_logps, chosen_lengths=seq_lengths[:n_pairs],
                                             rejected_lengths=seq_lengths[n_pairs:], chosen_nll=chosen_nll,
                                             nll_lengths=nll_lengths, policy_weights=policy_weights)
    # The loss keeps the dtype of the token log-probs (float32, or float64 for float64 inputs); the metrics stay
    # float64, so rewards/margins are the exact log-ratios' differences.
    total = total.to(token_logps.dtype)
    if not return_aux:
        return total, metrics
    # Liger's aux tuple in the token dtype; the rewards are formed from the float64 sums before that rounding.
    chosen, rejected = logps[:n_pairs].detach(), logps[n_pairs:].detach()
    if ref_chosen_logps is not None:
        chosen_rewards = options.beta * (chosen - ref_chosen_logps.detach().to(chosen.dtype))
        rejected_rewards = options.beta * (rejected - ref_rejected_logps.detach().to(chosen.dtype))
    else:
        chosen_rewards, rejected_rewards = options.beta * chosen, options.beta * rejected
    chosen, rejected, chosen_rewards, rejected_rewards = (t.to(token_logps.dtype) for t in
                                                          (chosen, rejected, chosen_rewards, rejected_rewards))
    split = n_pairs if cu_seqlens is None else int(cu_seqlens[n_pairs])
    nll = metrics.get("nll_loss", torch.zeros((), dtype=chosen.dtype, device=chosen.device))
    return total, paired_aux(chosen, rejected, hidden[:split], hidden[split:], weight, bias, nll, chosen_rewards,
                             rejected_rewards, vocab_shard=shard, sequence_group=sequence_group)


# The DPO-named shortcut users of Liger / TRL look for.
fused_linear_dpo_loss = fused_linear_preference_loss
