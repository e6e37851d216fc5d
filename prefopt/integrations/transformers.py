"""Hugging Face `transformers` integration: per-sequence log-probs of a causal LM without its logits.

The model's own forward computes `lm_head(hidden)` -> `[B, T, V]` logits. Here the backbone runs alone and its
last hidden states go through `prefopt.linear_logprobs` (the fused head: GEMM tiles, log-softmax and gather,
no `[tokens, vocab]` buffer), with the logit transform the model applies read from its config:

    x = raw * logit_scale      (Cohere `logit_scale` multiplies, Granite `logits_scaling` divides)
    x = cap * tanh(x / cap)    (Gemma 2 `final_logit_softcapping`)
    z = x / temperature

Works on plain `PreTrainedModel`s, PEFT-wrapped models (`PeftModel`: the base model with its adapters active;
inside `model.disable_adapter()` the reference; LoRA on the LM head itself runs on augmented operands,
`prefopt.integrations.adapters`), vision-language models (image inputs go to the backbone with the text; the head
runs on the language model's hidden states), mixture-of-experts models (the router load-balancing loss on request,
`prefopt.integrations.moe`), DDP / DataParallel / torch.compile wrappers, and with gradient checkpointing enabled
(it lives in the decoder layers, which the backbone call runs).

Sharded engines (FSDP1, FSDP2 `fully_shard`, DeepSpeed ZeRO-3) gather a module's parameters in that module's
forward hooks, so nothing here reads a parameter outside a forward: `install_prefopt_forward` patches the
transformers model's `forward` (a `prefopt=` keyword switches it to backbone + fused head; without it the forward
and generation are unchanged) and the LM head module's `forward` (a `prefopt=` keyword makes `lm_head(hidden)`
return the fused head's per-token outputs instead of logits). `token_logps` / `sequence_logps` call the model
*as given* (`model(...)`: through its DDP / FSDP / DeepSpeed / PEFT wrappers, torch.compile stripped), so the
root hooks gather the embeddings and final norm, each decoder layer's hooks its own shard, and the head
module's hooks `lm_head.weight` (ZeRO-3 and a separately wrapped FSDP head gather it only there). Gradients
reach the live (unsharded) parameters and the engines reduce them to the shards as for any forward.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

import prefopt
from prefopt.integrations import adapters, moe
from prefopt.versions import check_tested

__all__ = ["HeadSpec", "head_of", "head_operands", "last_hidden_states", "shift_labels", "token_logps",
           "sequence_logps", "packed_cu_seqlens", "head_inputs", "unwrap_model", "backbone_of", "is_peft_model",
           "install_prefopt_forward", "PrefoptOutput", "lm_head_module", "logit_transform"]


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
    """Strip DDP / DataParallel / DeepSpeed / FSDP1 / torch.compile wrappers and PEFT's `PeftModel` shell.

    (FSDP2's `fully_shard` wraps nothing: the model stays itself.)

    For a `PeftModel` this returns the underlying transformers model, whose modules carry the injected adapters
    (active unless inside `peft_model.disable_adapter()`), so running it is running the PEFT model.
    """
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):  # torch.compile
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine",
                                      "FullyShardedDataParallel") and \
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


def lm_head_module(model):
    """The module that plays `lm_head` now: the output embeddings, or PEFT's active `modules_to_save` copy.

    Resolved at call time: inside `peft_model.disable_adapter()` it is the original head. A PEFT LoRA layer on
    the head (`target_modules=[..., "lm_head"]`) is returned as it is (`prefopt.integrations.adapters` runs it);
    any other tuner layer there raises a ValueError.
    """
    model = unwrap_model(model)
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    adapters.check_head_adapter(lm_head)  # LoRA runs on augmented operands; other tuner layers raise here
    if hasattr(lm_head, "modules_to_save") and hasattr(lm_head, "active_adapters"):  # PEFT ModulesToSaveWrapper
        active = lm_head.active_adapters
        lm_head = lm_head.modules_to_save[active[0]] if active and not lm_head.disable_adapters and \
            active[0] in lm_head.modules_to_save else lm_head.original_module
    return lm_head


def logit_transform(model):
    """(softcap | None, logit_scale) of a causal LM, read from its (text) config (no parameter is touched).

    Reads `final_logit_softcapping`, `logit_scale` (Cohere, multiplies), `output_multiplier` /
    `lm_head_multiplier` (multiply) and `logits_scaling` (Granite / MiniCPM3, divides; HyperCLOVA X multiplies).
    """
    config = _text_config(unwrap_model(model))
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
    return None if softcap is None else float(softcap), scale


def head_of(model) -> HeadSpec:
    """The LM head (weight, bias) and logit transform (softcap, logit scale) of a causal LM.

    Reads the head's parameters as they are now: under a sharded engine (FSDP, ZeRO-3) call it only inside the
    model's forward (`install_prefopt_forward` does); outside, the weight may be a shard.
    A head with an active LoRA adapter is no (weight, bias) pair: ValueError, use `head_operands` (its base head,
    e.g. inside `disable_adapter()` or after `merge_adapter()`, is returned as usual).
    """
    lm_head = lm_head_module(model)
    if adapters.adapter_active(lm_head):
        raise ValueError("the LM head carries an active LoRA adapter, so its logits are not hidden @ weight.T: use "
                         "head_operands(model, hidden) (augmented operands for prefopt.linear_logprobs) or the "
                         "model-level calls (token_logps, sequence_logps), which apply it")
    return _head_spec(model, lm_head)


def _head_spec(model, lm_head):
    softcap, scale = logit_transform(model)
    return HeadSpec(lm_head.weight, getattr(lm_head, "bias", None), softcap, scale)


def head_operands(model, hidden) -> "adapters.HeadOperands":
    """The operands of the LM head as it acts now on `hidden` (`prefopt.integrations.adapters.HeadOperands`): with
    active LoRA adapters on the head, the hidden states gain the adapters' inputs and the weight a second column
    block; run `prefopt.linear_logprobs(ops.hidden, ops.weight, labels, **ops.head_kwargs())`. The logit transform
    is `logit_transform(model)`. Same sharding caveat as `head_of`.
    """
    lm_head = lm_head_module(model)
    return _head_operands(hidden, _head_spec(model, lm_head), lm_head)


def _head_operands(hidden, spec: HeadSpec, module=None):
    """`head_inputs`, then the low-rank terms of the adapters on `module` (if any) appended to the operands."""
    if hidden.device != spec.weight.device:
        hidden = hidden.to(spec.weight.device)
    base_hidden, weight, bias = head_inputs(hidden, spec)
    terms = adapters.low_rank_terms(module, hidden) if module is not None else []
    return adapters.augment(base_hidden, weight, bias, terms)


def last_hidden_states(model, input_ids, attention_mask=None, position_ids=None, *, return_router_aux_loss=False,
                       **backbone_kwargs):
    """Run only the backbone: `[B, T]` input_ids -> `[B, T, H]` last hidden states (final norm applied).

    Runs inside `model(...)` (the patched forward, see `install_prefopt_forward`), so sharded engines gather
    the parameters. Padding-free input: one row `[1, N]` of concatenated sequences with `position_ids`
    restarting at 0 for each sequence and `attention_mask=None` (transformers then builds the block-diagonal
    causal mask). Other keywords go to the backbone (a vision-language model's image inputs).
    `return_router_aux_loss=True` (mixture-of-experts models): returns `(hidden, aux_loss)`, the router
    load-balancing loss of this forward, unweighted (`prefopt.integrations.moe`).
    """
    install_prefopt_forward(model)
    out = _call_target(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              prefopt={"hidden_only": True, "router_aux_loss": return_router_aux_loss},
                              **backbone_kwargs)
    return (out.hidden_states, out.aux_loss) if return_router_aux_loss else out.hidden_states


def _backbone_hidden(model, input_ids, attention_mask=None, position_ids=None, **backbone_kwargs):
    """The backbone call itself (run inside the model's forward)."""
    return _last_hidden(_backbone_outputs(model, input_ids, attention_mask, position_ids, **backbone_kwargs))


def _backbone_outputs(model, input_ids, attention_mask=None, position_ids=None, **backbone_kwargs):
    """The backbone's whole output (last hidden states, and router logits when asked). Extra keywords (a
    vision-language model's `pixel_values`, `image_grid_thw`, `pixel_attention_mask`, `image_sizes`,
    `token_type_ids`, ...) go to the backbone, which merges the image features into the sequence."""
    backbone = backbone_of(model)
    return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    **backbone_kwargs)


def _last_hidden(outputs):
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]


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
    `return_*` flags (the extras are 0 at ignored positions). Runs as one call of `model(...)` (see
    `install_prefopt_forward`). `head` (a `HeadSpec`) overrides the model's head; its tensors are then used
    outside any forward, so it is not for sharded (FSDP / ZeRO-3) models.
    """
    if head is not None:
        hidden = last_hidden_states(model, input_ids, attention_mask, position_ids, **backbone_kwargs)
        labels = shift_labels(input_ids, completion_mask, ignore_index, position_ids=position_ids)
        out = _fused_head(hidden, head, labels, dict(ignore_index=ignore_index, temperature=temperature,
                                                     chunk_size=chunk_size, entropy=return_entropy,
                                                     log_sum_p2=return_log_sum_p2))
        return tuple(out) + (labels.to(out[0].device),)
    install_prefopt_forward(model)
    request = dict(completion_mask=completion_mask, temperature=temperature, ignore_index=ignore_index,
                   chunk_size=chunk_size, entropy=return_entropy, log_sum_p2=return_log_sum_p2)
    res = _call_target(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              prefopt=request, **backbone_kwargs)
    out = (res.log_probs,)
    if return_entropy:
        out += (res.entropy,)
    if return_log_sum_p2:
        out += (res.log_sum_sq_probs,)
    return out + (res.labels,)


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


# ----------------------------------------------------------------------------------------------------------------
# the fused head inside the model's forward (what sharded engines need; see the module docstring)
# ----------------------------------------------------------------------------------------------------------------
# keywords callers (TRL, PEFT's forward) pass that the backbone call must not see
_DROP_KWARGS = ("labels", "output_attentions", "output_hidden_states", "return_dict", "use_cache", "fused_lm_head",
                "shift_labels", "num_items_in_batch", "logits_to_keep")
_STATS_TILE_BYTES = 32 * 2 ** 20


@dataclass
class PrefoptOutput(ModelOutput):
    """What `model(..., prefopt=request)` returns. A `ModelOutput`, so it is a pytree: FSDP2 and DeepSpeed
    find its tensors and hook the backward on them, as they do for the model's usual output.

    `log_probs` [B, T] (position t scores token t + 1; 0 where not a completion token), `labels`, `label_mask`,
    the requested extras (`entropy`, `log_sum_sq_probs`, `mean_logits`, `is_top1`, 0 / False where ignored),
    or only `hidden_states` (the last hidden states) for a `{"hidden_only": True}` request. `aux_loss`: the
    mixture-of-experts load-balancing loss (unweighted) for a `{"router_aux_loss": True}` request
    (`prefopt.integrations.moe`).
    """
    log_probs: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def _call_target(model):
    """What to call: the model as given (its DDP / FSDP / DeepSpeed / PEFT wrappers run), minus torch.compile
    (the patched forward is plain eager code; the compiled graph would not know the `prefopt` keyword)."""
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
        model = model._orig_mod
    return model


@torch.no_grad()
def _logit_stats(hidden, weight, bias, labels, softcap, logit_scale, temperature, extra_weight=None):
    """Mean transformed logit and is-argmax of each labelled row (no grad; one extra forward GEMM, tiled).
    `extra_weight`: the weight's second column block (LoRA on the head), applied to hidden's last columns."""
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    width = weight.shape[1]
    rows = max(1, _STATS_TILE_BYTES // (4 * weight.shape[0]))
    means, top1 = [], []
    for start in range(0, hidden.shape[0], rows):
        tile = hidden[start:start + rows].to(weight.dtype)
        z = torch.nn.functional.linear(tile[:, :width], weight, bias)
        if extra_weight is not None:
            z = z + torch.nn.functional.linear(tile[:, width:], extra_weight.detach())
        z = z.float()
        z = z * logit_scale
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        means.append(z.mean(-1))
        top1.append(z.argmax(-1) == labels[start:start + rows])
    return torch.cat(means), torch.cat(top1)


def _fused_head(hidden, spec: HeadSpec, labels, request, module=None):
    """The fused head on `spec`'s tensors (and the LoRA adapters of the head `module`, if any):
    [logps, (entropy), (log_sum_p2), (mean_logits, is_top1)]."""
    operands = _head_operands(hidden, spec, module)
    hidden, weight, bias = operands.hidden, operands.weight, operands.bias
    labels = labels.to(weight.device)
    ignore_index = request.get("ignore_index", -100)
    temperature = float(request.get("temperature", 1.0))
    out = prefopt.linear_logprobs(hidden, weight, labels, ignore_index=ignore_index, temperature=temperature,
                                  softcap=spec.softcap, logit_scale=spec.logit_scale,
                                  chunk_size=request.get("chunk_size"), return_entropy=bool(request.get("entropy")),
                                  return_log_sum_p2=bool(request.get("log_sum_p2")), **operands.head_kwargs())
    out = list(out) if isinstance(out, tuple) else [out]
    if request.get("logit_stats"):
        mask = labels != ignore_index
        mean_rows, top1_rows = _logit_stats(hidden.detach()[mask], weight, bias, labels[mask], spec.softcap,
                                            spec.logit_scale, temperature, operands.extra_weight)
        mean_logits = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        mean_logits[mask] = mean_rows
        is_top1 = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        is_top1[mask] = top1_rows
        out += [mean_logits, is_top1]
    return out


def _head_forward(self, *args, prefopt=None, **kwargs):
    """Forward of the patched LM head: the usual one, or (with `prefopt=`) the fused head on its own weight."""
    if prefopt is None:
        return self._prefopt_previous_forward(*args, **kwargs)
    hidden = args[0] if args else kwargs.pop("input")
    spec = HeadSpec(self.weight, getattr(self, "bias", None), prefopt.get("softcap"),
                    float(prefopt.get("logit_scale", 1.0)))
    return tuple(_fused_head(hidden, spec, prefopt["labels"], prefopt, module=self))


def _model_forward(self, *args, prefopt=None, **kwargs):
    """Forward of the patched transformers model: the usual one, or (with `prefopt=`) backbone + fused head."""
    if prefopt is None:
        return self._prefopt_previous_forward(*args, **kwargs)
    for key in _DROP_KWARGS:
        kwargs.pop(key, None)
    if kwargs.get("inputs_embeds", None) is None:
        kwargs.pop("inputs_embeds", None)
    input_ids = args[0] if args else kwargs.pop("input_ids")
    attention_mask = kwargs.pop("attention_mask", None)
    position_ids = kwargs.pop("position_ids", None)
    router_aux = bool(prefopt.get("router_aux_loss"))
    if router_aux:
        kwargs["output_router_logits"] = True
    outputs = _backbone_outputs(self, input_ids, attention_mask, position_ids, **kwargs)
    hidden = _last_hidden(outputs)
    aux = {"aux_loss": moe.router_aux_loss(self, outputs, attention_mask)} if router_aux else {}
    if prefopt.get("hidden_only"):
        return PrefoptOutput(hidden_states=hidden, **aux)
    ignore_index = prefopt.get("ignore_index", -100)
    labels = shift_labels(input_ids, prefopt.get("completion_mask"), ignore_index, position_ids=position_ids)
    softcap, scale = logit_transform(self)
    head = lm_head_module(self)
    _patch_forward(_innermost(head), _head_forward, "_prefopt_head_installed")
    # the head runs as a module call: its hooks (ZeRO-3, a separately wrapped FSDP head) gather its weight
    out = list(head(hidden, prefopt=dict(prefopt, labels=labels, softcap=softcap, logit_scale=scale)))
    labels = labels.to(out[0].device)
    # every field given to the constructor: a ModelOutput's pytree holds only the keys set there
    fields = dict(log_probs=out.pop(0), labels=labels, label_mask=labels != ignore_index)
    if prefopt.get("entropy"):
        fields["entropy"] = out.pop(0)
    if prefopt.get("log_sum_p2"):
        fields["log_sum_sq_probs"] = out.pop(0)
    if prefopt.get("logit_stats"):
        fields["mean_logits"], fields["is_top1"] = out
    return PrefoptOutput(**fields, **aux)


def _innermost(module):
    """The module an FSDP1 wrapper holds (its forward passes keywords through to it)."""
    while isinstance(getattr(module, "_fsdp_wrapped_module", None), torch.nn.Module):
        module = module._fsdp_wrapped_module
    return module


def _patch_forward(module, forward, flag):
    # the previous forward is kept on the instance (not in a closure) so copy.deepcopy rebinds it to the copy
    if module.__dict__.get(flag, False):
        return
    module._prefopt_previous_forward = module.forward
    module.forward = types.MethodType(forward, module)
    module.__dict__[flag] = True


def install_prefopt_forward(model):
    """Patch the forward of the transformers model inside `model` (idempotent; returns the patched module).

    `model(input_ids=..., attention_mask=..., prefopt={"completion_mask": m, "entropy": bool, "log_sum_p2": bool,
    "logit_stats": bool, "router_aux_loss": bool, "temperature": t, "ignore_index": i, "chunk_size": c})` then
    returns a `PrefoptOutput` with per-token `log_probs` [B, T], `labels`, `label_mask` and the requested extras,
    without logits (other keywords, e.g. a vision-language model's image inputs, go to the backbone); the
    backbone runs as the model's forward would run it and the head as a call of the LM head module (patched
    likewise on first use). Without the `prefopt` keyword the forward is the previous one (generation and
    every other caller unchanged).
    """
    target = unwrap_model(model)
    if not target.__dict__.get("_prefopt_forward_installed", False):
        # the patch reads the model through public transformers API only (output embeddings, the backbone
        # prefix, ModelOutput); a transformers outside the tested range still gets one line saying so
        check_tested("transformers", "prefopt's HF integration")
    _patch_forward(target, _model_forward, "_prefopt_forward_installed")
    return target
