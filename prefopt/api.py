"""Public core ops: validate, flatten, drop ignored rows, call the autograd Function, restore shapes."""
from __future__ import annotations

import torch

from prefopt import _validation as check
from prefopt._options import HeadParams
from prefopt.functions import LinearLogprobsFunction, LogprobsFromLogitsFunction, SegmentSumFunction
from prefopt.split_weight import SplitWeight, SplitWeightLinearLogprobsFunction
from prefopt.parallel import VocabParallelLinearLogprobsFunction, check_group, sequence_parallel_sums, \
    settle_vocab_shard


def _pack_outputs(outputs, want_entropy, want_sqsum):
    logp, entropy, log_sum_p2 = outputs
    result = [logp]
    if want_entropy:
        result.append(entropy)
    if want_sqsum:
        result.append(log_sum_p2)
    return result[0] if len(result) == 1 else tuple(result)


def _autocast_inputs(hidden, weight, bias):
    """Under autocast the head runs in the autocast dtype, as `nn.Linear` would (the casts are differentiable, so
    fp32 master weights get fp32 gradients). The Function then runs with autocast off: its backward recomputes
    exactly the tiles the forward folded."""
    tensors = (hidden, weight, bias)
    if not all(t is None or isinstance(t, torch.Tensor) for t in tensors):
        return tensors
    device_type = hidden.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def logprobs_from_logits(logits, labels, *, ignore_index=-100, temperature=1.0, softcap=None, logit_scale=1.0,
                         return_entropy=False, return_log_sum_p2=False):
    """Per-token log p(label) under softmax(transform(logits)), for trainers that already hold logits.

    logits [..., V] (fp32/bf16/fp16/fp64), labels [...] ints in [0, V) or `ignore_index` (-> 0).
    Returns fp32 log-probs shaped like labels (fp64 for fp64 logits); with `return_entropy`, also the
    per-token entropy; with `return_log_sum_p2`, also log(sum_v p_v^2) (WPO weights; no gradient).
    The backward writes g * (onehot - p) straight into the gradient, with no other [N, V] temporary.
    """
    params = check.settle_logprobs(logits, labels, ignore_index, temperature, softcap, logit_scale, return_entropy,
                                   return_log_sum_p2)
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    if not flat_logits.is_contiguous():
        flat_logits = flat_logits.contiguous()
    labels = labels.long()  # ignore_index and V compare in int64 below and in every backend
    outputs = LogprobsFromLogitsFunction.apply(flat_logits, labels.reshape(-1), params)
    logp, entropy, log_sum_p2 = (o.view(labels.shape) if o.numel() else o for o in outputs)
    # Ignored positions report 0 entropy and log_sum_p2, as in linear_logprobs where they are skipped.
    if params.want_entropy:
        entropy = torch.where(labels != params.ignore_index, entropy, torch.zeros((), dtype=entropy.dtype))
    if params.want_sqsum:
        log_sum_p2 = torch.where(labels != params.ignore_index, log_sum_p2, torch.zeros((), dtype=log_sum_p2.dtype))
    return _pack_outputs((logp, entropy, log_sum_p2), params.want_entropy, params.want_sqsum)


def linear_logprobs(hidden, weight, labels, bias=None, *, ignore_index=-100, temperature=1.0, softcap=None,
                    logit_scale=1.0, chunk_size=None, logits_cache_mb=None, return_entropy=False,
                    return_log_sum_p2=False, filter_eps=None, vocab_sort=False, vocab_parallel_group=None,
                    vocab_start=None, extra_weight=None):
    """Fused `log_softmax(transform(hidden @ weight.T + bias)).gather(labels)` without the logits.

    hidden [..., H], weight [V, H], bias [V] | None, labels [...] (same leading shape as hidden).
    Label i is the token predicted from hidden i (shift labels yourself, as HF's loss does).
    Positions with `ignore_index` get log-prob 0 (and entropy 0) and cost no GEMM work.
    Gradients flow to hidden, weight and bias. Peak extra memory is O(tile + tokens) plus the fixed logits
    cache budget (CPU), independent of V.
    `chunk_size` sets the token rows per tile of the CPU backends (default: sized so a tile is ~32 MiB).
    `logits_cache_mb` (CPU backends) lets the forward keep up to that many MiB of logits tiles so the backward
    skips their recompute GEMM: faster, peak memory + at most the budget; results are identical with any budget.
    Default: $PREFOPT_LOGITS_CACHE_MB, else 256 MiB for CPU tensors and 0 for CUDA ones; 0 turns it off.
    `filter_eps` (gradient filtering, as Cut Cross-Entropy): None or 0 (default) = exact backward; "auto" = 2**-12
    for bf16/fp16 inputs and exact for fp32/fp64; a float > 0 = the backward skips the two GEMMs of every block of
    (tokens x vocabulary entries) in which each entry's logit gradient is small: with
    s = |logit_scale| / temperature and G_i = |dL/dlogp_i| + |dL/dentropy_i|, |dL/draw_iv| <= filter_eps * s * G_i
    (raw: the untransformed logits). Error bound (docs/design.md, "Gradient filtering"):
    |grad_hidden[i, k] - exact| <= filter_eps * s * G_i * sum_v |weight[v, k]|,
    |grad_weight[v, k] - exact| <= filter_eps * s * sum_i G_i |hidden[i, k]|, and
    |grad_bias[v] - exact| <= filter_eps * s * sum_i G_i (plus the rounding of a bf16/fp16 result).
    `prefopt.filtering.skip_counter` counts the skipped blocks.
    `vocab_sort` (with filtering; as Cut Cross-Entropy): False (default), True, or "auto" (= on when filtering is
    on). On, the head visits the vocabulary by decreasing average logit (labels first; docs/design.md "Vocabulary
    sorting"), so the negligible entries fill whole blocks even when the vocabulary is not frequency-ordered; the
    gradients are the same up to float summation order, and the filtering bound still holds.
    `vocab_parallel_group` (a torch.distributed ProcessGroup; tensor parallelism of the head): `weight` and `bias`
    hold this rank's contiguous vocabulary rows (ranks in group order, any split; or each rank gives
    `vocab_start`), labels are global ids, and `hidden` and `labels` are the same on every rank. Every rank gets
    the log-probs over the whole vocabulary, the gradient of its own weight rows and the full hidden-state
    gradient; no rank holds the full weight or a full logits row.
    `extra_weight` [V, R]: the weight is `[weight | extra_weight]` (column blocks) and `hidden` has H + R features;
    the head runs the vocabulary in slabs and never forms the concatenation (prefopt/split_weight.py): LoRA on the
    LM head (`prefopt.integrations.adapters`). Gradients flow to both blocks. Not with `vocab_parallel_group`.
    """
    hidden, weight, bias, labels, params, shard = prepare_linear(
        hidden, weight, labels, bias, ignore_index, temperature, softcap, logit_scale, chunk_size, logits_cache_mb,
        return_entropy, return_log_sum_p2, filter_eps=filter_eps, vocab_sort=vocab_sort,
        vocab_parallel_group=vocab_parallel_group,
        vocab_start=vocab_start, extra_weight=extra_weight)
    return settled_linear_logprobs(hidden, weight, labels, bias, params, shard)


def prepare_linear(hidden, weight, labels, bias, ignore_index, temperature, softcap, logit_scale, chunk_size,
                  logits_cache_mb, return_entropy=False, return_log_sum_p2=False, names=("hidden", "weight", "bias"),
                  filter_eps=None, vocab_parallel_group=None, vocab_start=None, vocab_sort=False, extra_weight=None):
    """Autocast, check and settle one head call -> (hidden, weight, bias, int64 labels, HeadParams, layout), the
    layout being None, a VocabShard or a SplitWeight (`extra_weight`); no kernel runs. A vocabulary-parallel call
    settles its layout first (one all-gather on every rank), so the labels are checked against the whole
    vocabulary."""
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    shard = None
    if extra_weight is not None:
        if vocab_parallel_group is not None:
            raise ValueError("extra_weight with vocab_parallel_group is not supported")
        _, extra_weight, _ = _autocast_inputs(hidden, extra_weight, None)
    if vocab_parallel_group is not None:
        shard = settle_vocab_shard(vocab_parallel_group, weight, vocab_start, labels)
    elif vocab_start is not None:
        raise ValueError("vocab_start needs vocab_parallel_group")
    params = check.settle_linear(hidden, weight, labels, bias, ignore_index, temperature, softcap, logit_scale,
                                 chunk_size, logits_cache_mb, return_entropy, return_log_sum_p2, names=names,
                                 vocab=None if shard is None else shard.vocab, filter_eps=filter_eps,
                                 vocab_sort=vocab_sort, extra_weight=extra_weight)
    if extra_weight is not None:
        shard = SplitWeight(extra_weight.contiguous())
    return hidden, weight, bias, labels.long(), params, shard


def settled_linear_logprobs(hidden, weight, labels, bias, params: HeadParams, shard=None):
    """`linear_logprobs` on the output of `prepare_linear`."""
    n_features = hidden.shape[-1]
    flat_hidden = hidden.reshape(-1, n_features)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != params.ignore_index
    all_valid = bool(valid.all())
    if all_valid:
        rows_hidden, rows_labels = flat_hidden, flat_labels
    else:
        # Only rows with a label do GEMM work; their results are scattered back below.
        rows = valid.nonzero().squeeze(1)
        rows_hidden, rows_labels = flat_hidden.index_select(0, rows), flat_labels.index_select(0, rows)
    if not rows_hidden.is_contiguous():
        rows_hidden = rows_hidden.contiguous()
    if rows_labels.numel() == 0:
        # Everything ignored: zeros that still connect to the graph so .backward() works.
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        anchor = flat_hidden.sum() * 0 + weight.sum() * 0 + (0 if bias is None else bias.sum() * 0)
        if isinstance(shard, SplitWeight):
            anchor = anchor + shard.extra.sum() * 0
        connected = anchor.to(acc).expand(flat_labels.shape)
        zeros = torch.zeros(flat_labels.shape, dtype=acc, device=hidden.device)
        empty = zeros.new_empty(0)
        outputs = (connected, zeros if params.want_entropy else empty, zeros if params.want_sqsum else empty)
    else:
        weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
        with torch.autocast(hidden.device.type, enabled=False):  # the backward must recompute the same tiles
            if shard is None:
                outputs = LinearLogprobsFunction.apply(rows_hidden, weight, bias, rows_labels, params)
            elif isinstance(shard, SplitWeight):
                outputs = SplitWeightLinearLogprobsFunction.apply(rows_hidden, weight, shard.extra, bias, rows_labels,
                                                                  params)
            else:
                outputs = VocabParallelLinearLogprobsFunction.apply(rows_hidden, weight, bias, rows_labels, params,
                                                                    shard)
        if not all_valid:
            outputs = tuple(o if o.numel() == 0 else
                            o.new_zeros(flat_labels.shape).index_copy(0, rows, o) for o in outputs)
    shaped = tuple(o.reshape(labels.shape) if o.numel() else o for o in outputs)
    return _pack_outputs(shaped, params.want_entropy, params.want_sqsum)


def sequence_logps(token_logps, mask=None, *, cu_seqlens=None, average=False, group=None):
    """Masked per-sequence sum (or mean over unmasked tokens) of per-token log-probs.

    Padded: token_logps [B, T] with mask [B, T] (bool, or float weights) -> [B].
    Packed (padding-free): token_logps [N] (or [1, N]) with cu_seqlens [S+1] -> [S].
    A fully masked sequence gives 0 with zero gradient. Float masks weight tokens (LD-DPO); the mean
    divides by the count of tokens with non-zero weight.
    `group` (a torch.distributed ProcessGroup; sequence / context parallelism): each rank holds a slice of every
    sequence's tokens (padded [B, T_local], or packed with the cu_seqlens of its slices, empty slices allowed).
    The partial sums (float64) and counts are all-reduced, so every rank gets the sums over all slices, and
    backpropagating gives each rank its own tokens' gradients (sum parameter gradients over the group yourself,
    as for any data-parallel split).
    """
    check.check_sequence_inputs(token_logps, mask, cu_seqlens, average)
    if group is not None:
        check_group("group", group)
    return settled_sequence_logps(token_logps, mask, cu_seqlens, average, group)


def settled_sequence_logps(token_logps, mask, cu_seqlens, average, group=None):
    """`sequence_logps` on inputs already checked by `check.check_sequence_inputs`."""
    acc = torch.float64 if token_logps.dtype == torch.float64 else torch.float32
    values = token_logps.reshape(-1).to(acc).contiguous()
    weights = None if mask is None else mask.reshape(-1).to(acc).contiguous()
    if cu_seqlens is None:
        batch, length = token_logps.shape
        cu_seqlens = torch.arange(batch + 1, device=token_logps.device, dtype=torch.int64) * length
    cu_seqlens = cu_seqlens.to(torch.int64).contiguous()
    if group is not None:
        return sequence_parallel_sums(values, weights, cu_seqlens, average, group).to(acc)
    return SegmentSumFunction.apply(values, weights, cu_seqlens, average)
