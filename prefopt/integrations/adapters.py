"""Low-rank adapters on the LM head (PEFT LoRA): the fused head on augmented operands, exact, without logits.

A LoRA adapter on a Linear head adds a low-rank term to the logits. With k active adapters a (scaling s_a,
dropout d_a, lora_A weight A_a [r_a, H], lora_B weight B_a [V, r_a] and, with `lora_bias`, bias c_a [V]):

    z = h W^T + b + sum_a s_a * (d_a(h) A_a^T B_a^T + c_a)
      = [h, u_1, ..., u_k] @ [W | B_1 | ... | B_k]^T + (b + sum_a s_a c_a),      u_a = s_a * d_a(h) A_a^T  [N, r_a]

so prefopt's fused head runs on the hidden states with the u_a appended ([N, H + R], R = sum r_a) and the weight
in two column blocks, W and E = [B_1 | ... | B_k] ([V, R]): `prefopt.linear_logprobs(..., extra_weight=E)`
(prefopt/split_weight.py) goes over the vocabulary in slabs and never forms [V, H + R], let alone [N, V].
Autograd takes the gradients back to h, to A_a (through u_a), to B_a (through E) and to W when it trains. Dropout is
the adapter's own module applied to the same input as in PEFT's forward (`peft/tuners/lora/layer.py:
Linear.forward`), in the same order, so it draws the same random numbers.

Memory: the [N, R] columns u_a and the [V, R] block E (a copy when there are several adapters or a dtype cast), next
to one slab of [W | E] rows and its gradient at a time (prefopt/split_weight.py). Measured in docs/bench.md
("Model kinds").

Merged adapters (`merge_adapter()`) are already inside W: the head is the base layer, as PEFT's forward runs it.
Disabled adapters (`disable_adapter()`, the PEFT reference) give the base head (a merged adapter is unmerged
first, as PEFT's forward does). Adapters other than plain LoRA on a Linear head (DoRA and other LoRA variants,
LoHa, LoKr, IA3, VeRA, trainable tokens, quantized heads) raise a ValueError naming what is supported.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["HeadOperands", "head_adapter", "check_head_adapter", "adapter_active", "low_rank_terms", "augment",
           "low_rank_operands"]


@dataclass
class HeadOperands:
    """What the fused head runs on: `prefopt.linear_logprobs(ops.hidden, ops.weight, labels, ops.bias,
    extra_weight=ops.extra_weight)` (and `fused_linear_preference_loss(..., extra_weight=)`).

    hidden [..., H + R], weight [V, H], bias [V] | None, extra_weight [V, R] | None (None: a plain head, R = 0).
    """
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    extra_weight: torch.Tensor | None = None

    def head_kwargs(self):
        """`bias` and `extra_weight` as keywords of `prefopt.linear_logprobs` / `fused_linear_preference_loss`."""
        return {"bias": self.bias} | ({} if self.extra_weight is None else {"extra_weight": self.extra_weight})


# ------------------------------------------------------------------------------------------------------------
# what PEFT put on the head
# ------------------------------------------------------------------------------------------------------------
def _lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - peft is optional
        return None
    return Linear


def _tuner_layer_class():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return None
    return BaseTunerLayer


def head_adapter(module) -> str | None:
    """"lora" for a PEFT LoRA layer on a Linear head, None for a head without a PEFT tuner layer.

    Raises ValueError for any other tuner layer on the head, and for LoRA variants (DoRA, ...) in use.
    """
    tuner = _tuner_layer_class()
    if tuner is None or not isinstance(module, tuner):
        return None
    lora = _lora_linear_class()
    if type(module) is not lora:  # exact class: quantized (bnb, gptq, ...) LoRA layers subclass other bases
        raise ValueError(f"a PEFT {type(module).__module__}.{type(module).__name__} adapter on the LM head is not "
                         "supported: prefopt's fused head takes plain LoRA (peft.tuners.lora.layer.Linear, any "
                         "rank, scaling, rsLoRA, lora_bias, lora_dropout, several active adapters) on a Linear head")
    variants = sorted(set(getattr(module, "lora_variant", {})) & set(_active(module)))
    if variants:
        kinds = sorted({type(module.lora_variant[a]).__name__ for a in variants})
        raise ValueError(f"LoRA variant(s) {kinds} (adapters {variants}) on the LM head are not supported: the fused "
                         "head takes the plain additive form h W^T + s (h A^T) B^T (no DoRA magnitude, no other "
                         "variant); use plain LoRA on `lm_head` or keep the variant off it")
    return "lora"


def check_head_adapter(module) -> None:
    """Raise the ValueError `head_adapter` raises for an adapter the fused head cannot run."""
    head_adapter(module)


def adapter_active(module) -> bool:
    """Whether a LoRA adapter changes the head's logits now (enabled, not merged, an active adapter on it)."""
    if head_adapter(module) is None or module.disable_adapters or module.merged:
        return False
    return any(name in module.lora_A.keys() for name in _active(module))


def _active(module):
    active = module.active_adapters
    return [active] if isinstance(active, str) else list(active)


def low_rank_terms(module, hidden):
    """[(u_a [..., r_a], B_a [V, r_a], s_a * c_a [V] | None)] of the adapters acting on `module` now.

    Empty for a plain head, with adapters disabled (a merged adapter is unmerged first, as PEFT's forward does)
    or merged. `hidden` is the head's input as the model hands it over; u_a is formed as PEFT forms the
    adapter's input (cast to lora_A's dtype, the adapter's dropout module), so dropout draws the same numbers.
    """
    if head_adapter(module) is None:
        return []
    if module.disable_adapters:
        if module.merged:
            module.unmerge()
        return []
    if module.merged:
        return []
    terms = []
    for name in _active(module):
        if name not in module.lora_A.keys():
            continue
        lora_a, lora_b = module.lora_A[name], module.lora_B[name]
        scaling = module.scaling[name]
        x = module._cast_input_dtype(hidden, lora_a.weight.dtype)
        u = lora_a(module.lora_dropout[name](x)) * scaling
        extra_bias = None if lora_b.bias is None else lora_b.bias * scaling
        terms.append((u, lora_b.weight, extra_bias))
    return terms


def augment(hidden, weight, bias, terms) -> HeadOperands:
    """The operands of `hidden @ weight.T + bias` plus the low-rank `terms` (see `low_rank_terms`).

    `hidden`, `weight`, `bias` are the base head's operands, already in the compute dtype (what
    `prefopt.integrations.transformers.head_inputs` returns); each u_a, B_a and bias term is cast to it
    (differentiable casts: the gradients reach the adapter's own dtype, float32 by PEFT's default).
    """
    if not terms:
        return HeadOperands(hidden, weight, bias)
    dtype, device = weight.dtype, weight.device
    hidden = torch.cat([hidden] + [u.to(device=device, dtype=dtype) for u, _, _ in terms], dim=-1)
    factors = [b_mat.to(dtype) for _, b_mat, _ in terms]
    extra = factors[0] if len(factors) == 1 else torch.cat(factors, dim=1)
    for _, _, extra_bias in terms:
        if extra_bias is not None:
            extra_bias = extra_bias.to(dtype)
            bias = extra_bias if bias is None else bias + extra_bias
    return HeadOperands(hidden, weight, bias, extra)


def low_rank_operands(hidden, weight, bias=None, factors=()):
    """Operands for a head with hand-made low-rank adapters (no PEFT): `factors` = [(A [r, H], B [V, r], scaling)].

    The head is `hidden @ weight.T + bias + sum scaling * (hidden @ A.T) @ B.T`; run it as
    `prefopt.linear_logprobs(ops.hidden, ops.weight, labels, **ops.head_kwargs())`. `hidden`, `weight`, `bias` in
    one dtype (A and B are cast to it).
    """
    terms = [((hidden @ a.to(hidden.dtype).T) * scaling, b, None) for a, b, scaling in factors]
    return augment(hidden, weight, bias, terms)
