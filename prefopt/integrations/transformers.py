"""Hugging Face `transformers` integration: per-sequence log-probs of a causal LM without its logits.

The model's own forward computes `lm_head(hidden)` -> `[B, T, V]` logits. Here the backbone runs alone and its
last hidden states go through `prefopt.linear_logprobs` (the fused head: GEMM tiles, log-softmax and gather,
no `[tokens, vocab]` buffer), with the logit transform the model applies read from its config:

    x = raw * logit_scale      (Cohere `logit_scale` multiplies, Granite `logits_scaling` divides)
    x = cap * tanh(x / cap)    (Gemma 2 `final_logit_softcapping`)
    z = x / temperature

Works on plain `PreTrainedModel`s, PEFT-wrapped models (`PeftModel`: the base model with its adapters active;
inside `model.disable_adapter()` the reference), DDP / DataParallel / torch.compile wrappers, and with gradient
checkpointing enabled (it lives in the decoder layers, which the backbone call runs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import prefopt

__all__ = ["HeadSpec", "head_of", "last_hidden_states", "shift_labels", "token_logps", "sequence_logps",
           "packed_cu_seqlens", "head_inputs", "unwrap_model", "backbone_of", "is_peft_model"]


@dataclass(frozen=True)
class HeadSpec:
    """The LM head of a causal LM and the transform its forward applies to the raw logits."""
    weight: torch.Tensor            # [V, H]  (the live parameter: gradients flow to it)
    bias: torch.Tensor | None       # [V] | None
    softcap: float | None           # final_logit_softcapping (None: no cap)
    logit_scale: float              # multiplier applied before the softcap (1.0: none)


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is optional
        return False
    return isinstance(model, PeftModel)


def unwrap_model(model):
    """Strip DDP / DataParallel / DeepSpeed / torch.compile wrappers and PEFT's `PeftModel` shell.

    For a `PeftModel` this returns the underlying transformers model, whose modules carry the injected adapters
    (active unless inside `peft_model.disable_adapter()`), so running it is running the PEFT model.
    """
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):  # torch.compile
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine") and \
                isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            break
    if is_peft_model(model):
        config = model.peft_config.get(model.active_adapter) if hasattr(model, "peft_config") else None
        if config is not None and getattr(config, "is_prompt_learning", False):
            raise NotImplementedError("prompt-learning PEFT adapters (prefix / prompt tuning) add virtual tokens "
                                      "around the backbone; prefopt's HF integration supports adapters injected "
                                      "into the layers (LoRA, IA3, ...) only")
        model = model.get_base_model()
    return model


def _text_config(model):
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def backbone_of(model):
    """The module that maps input_ids to the last hidden states (`model.model` for `*ForCausalLM`)."""
    model = unwrap_model(model)
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    if isinstance(backbone, torch.nn.Module) and backbone is not model:
        return backbone
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        if decoder is not model:
            return decoder
    raise ValueError(f"cannot find the backbone of {type(model).__name__}: expected a `{prefix}` sub-module or "
                     "`get_decoder()`")


def head_of(model) -> HeadSpec:
    """The LM head (weight, bias) and logit transform (softcap, logit scale) of a causal LM.

    Reads `final_logit_softcapping`, `logit_scale` (Cohere, multiplies), `output_multiplier` /
    `lm_head_multiplier` (multiply) and `logits_scaling` (Granite / MiniCPM3, divides; HyperCLOVA X multiplies)
    from the (text) config.
    """
    model = unwrap_model(model)
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        BaseTunerLayer = ()
    if BaseTunerLayer and isinstance(lm_head, BaseTunerLayer):
        raise ValueError("a PEFT adapter on `lm_head` is not supported: prefopt reads `lm_head.weight` directly, so "
                         "the adapter would be ignored. Remove 'lm_head' from `target_modules` (use "
                         "`modules_to_save=['lm_head']` to train the head)")
    if hasattr(lm_head, "modules_to_save") and hasattr(lm_head, "active_adapters"):  # PEFT ModulesToSaveWrapper
        active = lm_head.active_adapters
        lm_head = lm_head.modules_to_save[active[0]] if active and not lm_head.disable_adapters and \
            active[0] in lm_head.modules_to_save else lm_head.original_module
    weight = lm_head.weight
    bias = getattr(lm_head, "bias", None)
    config = _text_config(model)
    softcap = getattr(config, "final_logit_softcapping", None) or None
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = config.logits_scaling
        scale = scaling if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / scaling
    scale = 1.0 if scale is None else float(scale)
    return HeadSpec(weight, bias, None if softcap is None else float(softcap), scale)


def last_hidden_states(model, input_ids, attention_mask=None, position_ids=None, **backbone_kwargs):
    """Run only the backbone: `[B, T]` input_ids -> `[B, T, H]` last hidden states (final norm applied).

    Padding-free input: one row `[1, N]` of concatenated sequences with `position_ids` restarting at 0 for each
    sequence and `attention_mask=None` (transformers then builds the block-diagonal causal mask).
    """
    backbone = backbone_of(model)
    outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, **backbone_kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden


def head_inputs(hidden, spec: HeadSpec):
    """(hidden, weight, bias) on the head's device, in one dtype, as the model's `lm_head` call would see them.

    Under autocast (e.g. accelerate / Trainer mixed precision, which wraps `model.forward`) the head runs in the
    autocast dtype, as `nn.Linear` would (the cast of the weight is differentiable: its gradient reaches the
    fp32 master weight). Otherwise the hidden states are cast to the weight's dtype.
    """
    weight, bias = spec.weight, spec.bias
    if hidden.device != weight.device:  # model split across devices: the backbone ends elsewhere than the head
        hidden = hidden.to(weight.device)
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    dtype = weight.dtype
    if hidden.dtype != dtype:
        hidden = hidden.to(dtype)
    return hidden, weight, bias


def packed_cu_seqlens(position_ids):
    """`[1, N]` (or `[N]`) position_ids restarting at 0 per sequence -> cu_seqlens `[S + 1]` (int64)."""
    pos = position_ids.reshape(-1)
    if pos.numel() == 0 or int(pos[0]) != 0:
        raise ValueError("packed position_ids must start at 0")
    starts = (pos == 0).nonzero().squeeze(1)
    return torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int64)


def shift_labels(input_ids, completion_mask=None, ignore_index=-100, *, position_ids=None):
    """Labels aligned with the hidden states: label t = input_ids[t + 1] where completion_mask[t + 1] is set.

    The last position (and, for packed input with `position_ids`, the last position of every sequence) gets
    `ignore_index`; so do prompt and padding tokens (completion_mask 0). `completion_mask=None`: every token.
    """
    labels = torch.full_like(input_ids, ignore_index, dtype=torch.int64)
    nxt = input_ids[..., 1:].to(torch.int64)
    if completion_mask is not None:
        nxt = nxt.masked_fill(completion_mask[..., 1:] == 0, ignore_index)
    if position_ids is not None:
        nxt = nxt.masked_fill(position_ids.reshape(input_ids.shape)[..., 1:] == 0, ignore_index)
    labels[..., :-1] = nxt
    return labels


def token_logps(model, input_ids, attention_mask=None, completion_mask=None, *, temperature=1.0,
                position_ids=None, ignore_index=-100, return_entropy=False, return_log_sum_p2=False,
                chunk_size=None, head=None, **backbone_kwargs):
    """Per-token log-probs `[B, T]` (position t scores token t + 1) and the labels used, without logits.

    Returns `(logps, labels)`, or `(logps, entropy, labels)` / `(logps, entropy, log_sum_p2, labels)` with the
    `return_*` flags (the extras are 0 at ignored positions). `head` overrides `head_of(model)`.
    """
    hidden = last_hidden_states(model, input_ids, attention_mask, position_ids, **backbone_kwargs)
    spec = head_of(model) if head is None else head
    labels = shift_labels(input_ids, completion_mask, ignore_index, position_ids=position_ids)
    hidden, weight, bias = head_inputs(hidden, spec)
    labels = labels.to(weight.device)
    out = prefopt.linear_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index,
                                  temperature=float(temperature), softcap=spec.softcap, logit_scale=spec.logit_scale,
                                  chunk_size=chunk_size, return_entropy=return_entropy,
                                  return_log_sum_p2=return_log_sum_p2)
    out = out if isinstance(out, tuple) else (out,)
    return out + (labels,)


def sequence_logps(model, input_ids, attention_mask, completion_mask, *, temperature=1.0, average=False,
                   position_ids=None, ignore_index=-100, chunk_size=None):
    """Per-sequence sum (or mean, `average=True`) of the completion tokens' log-probs: `(logps [B], lengths [B])`.

    `completion_mask[b, t] = 1` marks token t as scored (TRL's convention: prompt and padding are 0); the logits
    are never materialised. `lengths` are the number of scored tokens (int64).
    Padding-free: `input_ids` / `completion_mask` `[1, N]`, `position_ids` `[1, N]` restarting at 0 per sequence,
    `attention_mask=None` -> `[S]` outputs, one per packed sequence.
    """
    logps, labels = token_logps(model, input_ids, attention_mask, completion_mask, temperature=temperature,
                                position_ids=position_ids, ignore_index=ignore_index, chunk_size=chunk_size)
    mask = labels != ignore_index
    if position_ids is None:
        seq = prefopt.sequence_logps(logps, mask, average=average)
        lengths = mask.sum(dim=-1)
    else:
        cu = packed_cu_seqlens(position_ids).to(logps.device)
        seq = prefopt.sequence_logps(logps.reshape(-1), mask.reshape(-1), cu_seqlens=cu, average=average)
        csum = torch.cat([mask.new_zeros(1, dtype=torch.int64), mask.reshape(-1).to(torch.int64).cumsum(0)])
        lengths = csum[cu[1:]] - csum[cu[:-1]]
    return seq, lengths
