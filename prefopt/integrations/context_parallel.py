"""Context parallelism for transformers models: one sequence's tokens split over the ranks of a group.

`attn_implementation="prefopt_cp"` (registered with transformers' `AttentionInterface`; `use_context_parallel(model)`
switches an `sdpa` / `prefopt_sdpa` model to it) runs prefopt/parallel/attention.py on every attention call that
carries a `context_split` keyword (a `prefopt.parallel.context.SequenceSplit`), and `prefopt_sdpa` on every other
call, so the model is unchanged outside a context-parallel forward. transformers hands a model's forward keywords
down to each attention call, gradient-checkpointed recomputations included, so the split travels with the forward:

    model(input_ids=local_ids, position_ids=local_positions, context_split=split)

Each rank gives the model its own tokens and their *global* position ids (RoPE), and the attention gathers the
keys and values of the whole group. Labels must be shifted on the whole sequence before the split: the label of a
rank's last token is the next rank's first token.

`sequence_logps(model, ..., group=)` is `prefopt.integrations.transformers.sequence_logps` on a split batch: every
rank passes the same global batch and gets the same per-sequence sums; backpropagating them gives each rank the
gradients of its own tokens, to be summed over the group (docs/trainer.md "Context parallelism").
"""
from __future__ import annotations

import torch

import prefopt
from prefopt.integrations.attention import (_STOCK_ONLY, linear_attention_forward, register_with_transformers,
                                            segment_mask)
from prefopt.integrations.transformers import (_call_target, install_prefopt_forward, packed_cu_seqlens, shift_labels,
                                               unwrap_model)
from prefopt.parallel.attention import context_attention
from prefopt.parallel.collectives import all_reduce_sum
from prefopt.parallel.context import split_batch

__all__ = ["ATTENTION_NAME", "SPLIT_KEYWORD", "register", "use_context_parallel", "context_attention_forward",
           "shard_inputs", "sequence_logps"]

ATTENTION_NAME = "prefopt_cp"
SPLIT_KEYWORD = "context_split"      # the forward keyword (and the trainer's batch key) that carries the split


def register() -> bool:
    """Register `prefopt_cp` with transformers' attention and mask interfaces (idempotent); False when this
    transformers has no mask interface."""
    # the mask of a call without a split is prefopt_sdpa's (segment ids); a split call ignores it: the rank's own
    # mask says nothing about the other ranks' tokens
    return register_with_transformers(ATTENTION_NAME, context_attention_forward, segment_mask)


def use_context_parallel(model):
    """Switch `model` (a transformers model, possibly wrapped: DDP, FSDP, PEFT) to `prefopt_cp`; returns it.

    Only models on `sdpa` or `prefopt_sdpa` switch (the attention is SDPA's causal attention either way); any other
    attention raises ValueError, since a split sequence would otherwise attend to this rank's tokens only."""
    target = unwrap_model(model)
    config = getattr(target, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == ATTENTION_NAME:
        return model
    if current not in ("sdpa", "prefopt_sdpa") or not callable(getattr(target, "set_attn_implementation", None)):
        raise ValueError(f"context parallelism needs a model on sdpa attention ({type(target).__name__} runs "
                         f"{current!r}); load it with attn_implementation='sdpa'")
    if not register():
        raise RuntimeError("context parallelism needs transformers' AttentionMaskInterface (transformers >= 4.53)")
    target.set_attn_implementation(ATTENTION_NAME)
    if getattr(target.config, "_attn_implementation", None) != ATTENTION_NAME:
        raise ValueError(f"{type(target).__name__} did not take attn_implementation={ATTENTION_NAME!r}")
    return model


def context_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                              **kwargs):
    """`AttentionInterface` entry: with a `context_split` keyword, this rank's queries over the group's keys and
    values (prefopt/parallel/attention.py); without, `prefopt_sdpa`."""
    split = kwargs.pop(SPLIT_KEYWORD, None)
    if split is None:
        return linear_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    problems = [f"{name}" for name in _STOCK_ONLY if kwargs.get(name) is not None]
    if not causal:
        problems.append("a non-causal attention")
    if query.shape[2] != key.shape[2]:
        problems.append(f"a key/value cache ({key.shape[2]} keys for {query.shape[2]} queries)")
    if dropout:
        problems.append(f"attention dropout {dropout}")
    window = kwargs.get("sliding_window")
    if window is not None and window < split.longest_segment():
        problems.append(f"a {window}-token sliding window over {split.longest_segment()}-token sequences")
    if problems:
        raise ValueError(f"{ATTENTION_NAME}: context-parallel attention is causal SDPA without a cache; this call has "
                         f"{', '.join(problems)}")
    out = context_attention(query, key, value, split, scaling)
    return out.transpose(1, 2).contiguous(), None


def shard_inputs(group, input_ids, attention_mask=None, completion_mask=None, *, position_ids=None,
                 ignore_index=-100, balanced=False):
    """This rank's share of a global batch: padded `[B, T]` (`attention_mask`; None = no padding) or padding-free
    `[1, N]` (`position_ids` restarting at 0 per sequence, `attention_mask=None`).

    Returns a dict of local tensors: `input_ids`, `position_ids` (global positions of the local tokens),
    `attention_mask` (padded), `labels` (shifted on the whole sequence, `ignore_index` off the completion),
    `completion_mask`, `cu_seqlens` (packed: the local slices of the sequences), and `context_split`."""
    packed = position_ids is not None and attention_mask is None
    labels = shift_labels(input_ids, completion_mask, ignore_index, position_ids=position_ids if packed else None)
    batch = {"input_ids": input_ids, "labels": labels}
    if attention_mask is not None:
        batch["attention_mask"] = attention_mask
    if completion_mask is not None:
        batch["completion_mask"] = completion_mask
    if position_ids is not None:
        batch["position_ids"] = position_ids.reshape(input_ids.shape)
    if packed:
        batch["cu_seqlens"] = packed_cu_seqlens(position_ids).to(input_ids.device)
    return split_batch(batch, group, balanced=balanced)


def sequence_logps(model, input_ids, attention_mask, completion_mask, *, group, temperature=1.0, average=False,
                   position_ids=None, ignore_index=-100, chunk_size=None, balanced=False):
    """`prefopt.integrations.transformers.sequence_logps` with every sequence split over `group`.

    Every rank of `group` passes the same global batch; each runs the model on its share (`shard_inputs`) and gets
    the per-sequence sums (or means) over the whole group: `(logps [S], lengths [S])`, float64 sums rounded to the
    token dtype as one process has them. Backpropagating gives each rank its own tokens' parameter gradients; their
    sum over the group is the one-process gradient. The model runs through `model(...)` (DDP / FSDP / ZeRO-3 hooks
    see a normal forward)."""
    local = shard_inputs(group, input_ids, attention_mask, completion_mask, position_ids=position_ids,
                         ignore_index=ignore_index, balanced=balanced)
    use_context_parallel(model)
    install_prefopt_forward(model)
    labels = local["labels"]
    request = dict(labels=labels, temperature=temperature, ignore_index=ignore_index, chunk_size=chunk_size)
    res = _call_target(model)(input_ids=local["input_ids"], attention_mask=local.get("attention_mask"),
                              position_ids=local["position_ids"], prefopt=request,
                              **{SPLIT_KEYWORD: local[SPLIT_KEYWORD]})
    logps = res.log_probs
    mask = labels.to(logps.device) != ignore_index
    cu = local.get("cu_seqlens")
    if cu is None:
        seq = prefopt.sequence_logps(logps, mask, average=average, group=group)
        counts = mask.sum(dim=-1)
    else:
        cu = cu.to(logps.device)
        seq = prefopt.sequence_logps(logps.reshape(-1), mask.reshape(-1), cu_seqlens=cu, average=average, group=group)
        csum = torch.cat([mask.new_zeros(1, dtype=torch.int64), mask.reshape(-1).to(torch.int64).cumsum(0)])
        counts = csum[cu[1:]] - csum[cu[:-1]]
    return seq, all_reduce_sum(counts.to(torch.int64).clone(), group)
