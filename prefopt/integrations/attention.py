"""Attention whose memory is linear in tokens, for transformers models: `attn_implementation="prefopt_sdpa"`.

transformers' `sdpa` attention gets a materialised `[B, 1, T, T]` mask whenever the batch is not one plain causal
sequence per row: a padding-free row (several sequences packed with `position_ids` restarting per sequence) or a
padded batch. At 16384 tokens per sequence a packed pair is a 32768-token row: a 1 GiB boolean mask, an fp32 bias of
4 GiB in the math kernel, and memory that grows with the square of the length. This module registers one attention
implementation through transformers' own extension points (nothing of a model is forked):

* a mask function (`AttentionMaskInterface`) that returns, instead of the `[T, T]` mask, a `[B, T]` int32 map of
  *segment ids*: tokens with the same id form one causal sequence, -1 marks padding. The segments are read off the
  mask transformers would build (its `mask_function`, which already encodes packing detected from `position_ids` and
  chunked attention) with O(B T) evaluations: a token starts a segment when it cannot see its predecessor. Three more
  O(B T) probes check that the mask really is causal within segments (no token sees its successor, every token sees
  its segment's first token and not the token before it); any other mask (bidirectional image blocks, sliding windows
  shorter than a segment, custom `or`/`and` mask functions, decoding with a cache) gets transformers' own `sdpa`
  mask instead, unchanged.
* an attention function (`AttentionInterface`) that runs `torch.nn.functional.scaled_dot_product_attention` with
  `is_causal=True` and no mask on each segment (PyTorch's flash kernel on CPU and CUDA: memory linear in tokens,
  forward and backward), one call for the whole batch when every row is a single sequence. Segments that are not
  contiguous (padding inside a row) are gathered first. Outputs at padding positions are 0 (only real tokens are
  attended to, so nothing reaches a real token from them). Any call with a 4D mask, no mask, a query shorter than the
  keys, or options this path does not cover (`softcap`, `position_bias`, sinks, non-causal modules) goes to
  transformers' `sdpa_attention_forward` as it is.

`use_linear_attention(model)` switches a model whose attention is `sdpa` to it (`set_attn_implementation`, so every
layer, sub-model and the gradient-checkpointing recomputation see the same function). prefopt's HF integration
(`install_prefopt_forward`: `sequence_logps`, `token_logps`, `last_hidden_states`, the trainer, the TRL drop-in)
calls it, so a padding-free row with `position_ids` and `attention_mask=None` gets it with no further setup. Models on
`eager`, `flash_attention_*` or `flex_attention` are left as they are; `model.set_attn_implementation("sdpa")` switches
back. tests/test_linear_attention.py checks it against the unpatched model (padded, packed, left padding, holes, GQA,
generation, gradients) and that no `[T, T]` tensor is created.
"""
from __future__ import annotations

import torch

__all__ = ["ATTENTION_NAME", "register", "register_with_transformers", "use_linear_attention", "linear_attention_forward",
           "segment_mask", "segments_of"]

ATTENTION_NAME = "prefopt_sdpa"

# keywords of an attention call whose semantics the per-segment path does not implement (transformers' sdpa either
# handles them with a materialised mask or raises its own error)
_STOCK_ONLY = ("softcap", "position_bias", "s_aux", "sinks")
_registered: set = set()  # names registered with transformers by this process


def register() -> bool:
    """Register `prefopt_sdpa` with transformers' attention and mask interfaces (idempotent).

    False when this transformers has no `AttentionMaskInterface` (older than the mask-interface refactor): the
    models then keep their own attention."""
    return register_with_transformers(ATTENTION_NAME, linear_attention_forward, segment_mask)


def register_with_transformers(name, attention, mask) -> bool:
    """Register an attention function and its mask function under `name` with transformers' `AttentionInterface`
    and `AttentionMaskInterface` (idempotent); False when this transformers has no mask interface."""
    if name in _registered:
        return True
    try:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError:  # pragma: no cover - transformers < 4.53
        return False
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
    _registered.add(name)
    return True


def use_linear_attention(model) -> bool:
    """Switch `model` (a transformers `PreTrainedModel`) from `sdpa` to `prefopt_sdpa`; True when it runs it now.

    Only `sdpa` is switched: the new function is sdpa on every call it does not handle itself, so nothing else changes.
    The switch is kept (not undone after a forward): a gradient-checkpointed layer recomputes its forward in the
    backward and must meet the same attention there.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == ATTENTION_NAME:
        return True
    if current != "sdpa" or not callable(getattr(model, "set_attn_implementation", None)) or not register():
        return False
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        return False
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, ImportError, KeyError):  # the model cannot dispatch sdpa-based attention
        return False
    return getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME


# ----------------------------------------------------------------------------------------------------------------
# the mask function: segment ids instead of a [T, T] mask
# ----------------------------------------------------------------------------------------------------------------
def segment_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 **kwargs):
    """`AttentionMaskInterface` entry: a `[B, T]` int32 segment-id map, or transformers' sdpa mask where the
    per-segment path would not be exact (see the module docstring)."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    ids = None
    if not kwargs.get("use_vmap") and q_length == kv_length and isinstance(q_offset, int) and \
            isinstance(kv_offset, int) and q_offset == 0 and kv_offset == 0 and q_length > 0:
        device = kwargs.get("device", "cpu")
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        ids = segments_of(mask_function, batch_size, q_length, padding, device)
    if ids is not None:
        return ids
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def segments_of(mask_function, batch_size, length, padding=None, device="cpu"):
    """Segment ids `[B, T]` (int32, -1 at padding) of a mask that is causal within contiguous blocks, or None.

    `mask_function(b, h, q, kv)` is transformers' index-based mask (broadcasting tensors); `padding` the 2D
    `[B, >= T]` padding mask (True: a real token) or None. A token whose predecessor it cannot see starts a block;
    None when the mask is not of that form (a token sees a later one, misses its block's first token, or sees the
    token before its block)."""
    T = length
    b = torch.arange(batch_size, device=device).unsqueeze(1)
    h = torch.zeros((), dtype=torch.long, device=device)
    t = torch.arange(T, device=device).unsqueeze(0)

    def sees(q, kv):
        return torch.as_tensor(mask_function(b, h, q, kv), device=device).expand(batch_size, q.shape[1]).bool()

    if not bool(sees(t, t).all()):  # a token that does not see itself: not a causal mask
        return None
    starts = torch.ones(batch_size, T, dtype=torch.bool, device=device)
    if T > 1:
        if bool(sees(t[:, :-1], t[:, 1:]).any()):  # a token sees its successor
            return None
        starts[:, 1:] = ~sees(t[:, 1:], t[:, :-1])
    # first token of each position's block, and its check (sees it, does not see the token before it)
    first = torch.where(starts, t.expand(batch_size, T), torch.zeros_like(starts, dtype=torch.long))
    first = torch.cummax(first, dim=1).values
    if not bool(sees(t, first).all()):
        return None
    later = first > 0
    if bool(later.any()) and bool((sees(t, (first - 1).clamp(min=0)) & later).any()):
        return None
    ids = (torch.cumsum(starts, dim=1) - 1).to(torch.int32)
    if padding is not None:
        ids = ids.masked_fill(~padding[:, :T].to(device=device, dtype=torch.bool), -1)
    return ids


# ----------------------------------------------------------------------------------------------------------------
# the attention function
# ----------------------------------------------------------------------------------------------------------------
def linear_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                             **kwargs):
    """`AttentionInterface` entry: query `[B, Hq, T, D]`, key/value `[B, Hkv, T, D]` -> (`[B, T, Hq, D]`, None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    own = (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and
           attention_mask.dtype == torch.int32 and causal and query.shape[2] == key.shape[2] and
           not any(kwargs.get(name) is not None for name in _STOCK_ONLY))
    if not own:
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and \
                attention_mask.dtype == torch.int32:
            raise ValueError(f"{ATTENTION_NAME}: segment ids reached an attention call it cannot run per segment "
                             f"(is_causal={causal}, query {tuple(query.shape)} vs key {tuple(key.shape)}, options "
                             f"{sorted(k for k in _STOCK_ONLY if kwargs.get(k) is not None)}); use "
                             "attn_implementation='sdpa' for this model")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1) or 1
    window = kwargs.get("sliding_window")
    sdpa = dict(dropout_p=dropout, scale=scaling, is_causal=True)
    if groups > 1:  # grouped-query attention without repeating the keys and values
        sdpa["enable_gqa"] = True
    out = _segment_attention(query, key, value, attention_mask, window, sdpa)
    return out.transpose(1, 2).contiguous(), None


def _segment_attention(query, key, value, ids, window, sdpa):
    """Causal SDPA within each segment of each row; 0 at padding. Returns `[B, Hq, T, D]`."""
    attend = torch.nn.functional.scaled_dot_product_attention
    B, T = ids.shape
    plan = _row_plans(ids)
    longest = max((stop - start for row in plan for kind, start, stop in row if kind == "slice"), default=0)
    longest = max([longest] + [int(idx.numel()) for row in plan for kind, idx, _ in row if kind == "index"])
    if window is not None and longest > window:  # segment_mask only hands out ids when every segment fits the window
        raise RuntimeError(f"{ATTENTION_NAME}: a {longest}-token segment under a {window}-token sliding window")
    if all(len(row) == 1 and row[0][0] == "slice" and row[0][1:] == (0, T) for row in plan):
        return attend(query, key, value, **sdpa)  # every row one causal sequence: one call, no mask
    rows = []
    for b, row in enumerate(plan):
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        pieces, covered = [], 0
        for kind, where, stop in row:
            if kind == "slice":
                pieces.append((slice(where, stop), attend(q[:, :, where:stop], k[:, :, where:stop],
                                                          v[:, :, where:stop], **sdpa)))
                covered += stop - where
            else:
                pieces.append((where, attend(q.index_select(2, where), k.index_select(2, where),
                                             v.index_select(2, where), **sdpa)))
                covered += int(where.numel())
        if covered == T and all(isinstance(w, slice) for w, _ in pieces):  # contiguous segments tile the row
            rows.append(torch.cat([o for _, o in pieces], dim=2) if len(pieces) > 1 else pieces[0][1])
            continue
        out = q.new_zeros(1, q.shape[1], T, value.shape[-1])
        for where, o in pieces:
            if isinstance(where, slice):
                out[:, :, where] = o
            else:
                out = out.index_copy(2, where, o)
        rows.append(out)
    return torch.cat(rows, dim=0) if B > 1 else rows[0]


def _row_plans(ids):
    """Per row, its segments as ("slice", start, stop) when contiguous, else ("index", LongTensor, None)."""
    plans = []
    ids_cpu = ids.detach().to("cpu", torch.int64)
    for row in ids_cpu:
        real = row >= 0
        if not bool(real.any()):
            plans.append([])
            continue
        positions = real.nonzero().squeeze(1)
        seg = row[positions]
        # boundaries between runs of equal ids over the real tokens (ids are non-decreasing along a row)
        change = torch.ones(seg.numel(), dtype=torch.bool)
        change[1:] = seg[1:] != seg[:-1]
        run_starts = change.nonzero().squeeze(1).tolist() + [seg.numel()]
        plan = []
        for i in range(len(run_starts) - 1):
            pos = positions[run_starts[i]:run_starts[i + 1]]
            first, last = int(pos[0]), int(pos[-1])
            if last - first + 1 == pos.numel():
                plan.append(("slice", first, last + 1))
            else:
                plan.append(("index", pos.to(ids.device), None))
        plans.append(plan)
    return plans
