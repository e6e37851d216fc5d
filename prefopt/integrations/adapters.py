"""Low-rank adapters on the LM head (PEFT LoRA): the fused head on augmented operands, exact, without logits.

A LoRA adapter on a Linear head adds a low-rank term to the logits. With k active adapters a (scaling s_a,
dropout d_a, lora_A weight A_a [r_a, H], lora_B weight B_a [V, r_a] and, with `lora_bias`, bias c_a [V]):

    z = h W^T + b + sum_a s_a * (d_a(h) A_a^T B_a^T + c_a)
      = [h, u_1, ..., u_k] @ [W, B_1, ..., B_k]^T + (b + sum_a s_a c_a),      u_a = s_a * d_a(h) A_a^T  [N, r_a]

so prefopt's fused head runs on [N, H + R] hidden and [V, H + R] weight operands (R = sum r_a) and never forms
the [N, V] logits. Autograd takes the gradients of the two concatenations back to h, to A_a (through u_a), to
B_a and to W when it trains. Dropout is the adapter's own module applied to the same input as in PEFT's forward
(`peft/tuners/lora/layer.py: Linear.forward`), in the same order, so it draws the same random numbers.

Memory. The augmented weight is a [V, H + R] copy of the head (in the head's compute dtype) built for the call.
It is not kept between the forward and the backward: `HeadOperands.saving()` stores a recipe in its place in
the autograd graph and the backward concatenates it again (the same values), so the copy exists only while the
head's forward and the head's backward run. The backward's weight gradient is one [V, H + R] buffer, split into
W's and the B_a's (W's part is dropped when W is frozen): with a frozen W the head still runs the weight-gradient
GEMM over all H + R columns, the cost of training the head. `docs/design.md` ("LoRA on the LM head") has the
figures.

Merged adapters (`merge_adapter()`) are already inside W: the head is the base layer, as PEFT's forward runs it.
Disabled adapters (`disable_adapter()`, the PEFT reference) give the base head (a merged adapter is unmerged
first, as PEFT's forward does). Adapters other than plain LoRA on a Linear head (DoRA and other LoRA variants,
LoHa, LoKr, IA3, VeRA, trainable tokens, quantized heads) raise a ValueError naming what is supported.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["HeadOperands", "head_adapter", "check_head_adapter", "adapter_active", "low_rank_terms", "augment",
           "low_rank_operands"]


@dataclass
class HeadOperands:
    """What the fused head runs on: (hidden [..., H'], weight [V, H'], bias [V] | None), H' = H + R.

    `rebuild` (adapter heads only) recomputes `weight` without autograd history; `saving()` is the context in
    which the head call must run so the graph keeps that recipe instead of the [V, H'] copy.
    """
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    rebuild: Callable[[], torch.Tensor] | None = None

    def saving(self):
        if self.rebuild is None:
            return contextlib.nullcontext()
        return _recompute_when_saved(self.weight, self.rebuild)


class _Rebuild:
    """What the graph holds in place of the augmented weight."""
    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make


def _recompute_when_saved(target, make):
    # identity, not value: only the augmented weight itself is swapped for its recipe; every other saved
    # tensor (hidden rows, labels, lse) is stored as usual. The graph keeps each saved tensor's pack hook
    # alive, so the hook must hold the target weakly or it would keep the copy it replaces.
    target = weakref.ref(target)

    def pack(tensor):
        return _Rebuild(make) if tensor is target() else tensor

    def unpack(saved):
        return saved.make() if isinstance(saved, _Rebuild) else saved

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


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


def augment(hidden, weight, bias, terms, source_weight=None) -> HeadOperands:
    """The augmented operands of `hidden @ weight.T + bias` plus the low-rank `terms` (see `low_rank_terms`).

    `hidden`, `weight`, `bias` are the base head's operands, already in the compute dtype (what
    `prefopt.integrations.transformers.head_inputs` returns); each u_a, B_a and bias term is cast to it
    (differentiable casts: the gradients reach the adapter's own dtype, float32 by PEFT's default).
    `source_weight`: the parameter `weight` was cast from (under autocast), so the backward's rebuild casts it
    again rather than keeping the cast copy alive; default `weight`.
    """
    if not terms:
        return HeadOperands(hidden, weight, bias)
    dtype, device = weight.dtype, weight.device
    factors = [b_mat for _, b_mat, _ in terms]
    hidden = torch.cat([hidden] + [u.to(device=device, dtype=dtype) for u, _, _ in terms], dim=-1)
    aug_weight = torch.cat([weight] + [b.to(dtype) for b in factors], dim=1)
    for _, _, extra in terms:
        if extra is not None:
            extra = extra.to(dtype)
            bias = extra if bias is None else bias + extra
    base = (weight if source_weight is None else source_weight).detach()

    def rebuild():
        return torch.cat([base.to(dtype)] + [b.detach().to(dtype) for b in factors], dim=1)

    return HeadOperands(hidden, aug_weight, bias, rebuild)


def low_rank_operands(hidden, weight, bias=None, factors=()):
    """Operands for a head with hand-made low-rank adapters (no PEFT): `factors` = [(A [r, H], B [V, r], scaling)].

    The head is `hidden @ weight.T + bias + sum scaling * (hidden @ A.T) @ B.T`; the fused head runs as
    `ops = low_rank_operands(...)`, `with ops.saving(): prefopt.linear_logprobs(ops.hidden, ops.weight, labels,
    ops.bias)`. `hidden`, `weight`, `bias` in one dtype (A and B are cast to it).
    """
    terms = [((hidden @ a.to(hidden.dtype).T) * scaling, b, None) for a, b, scaling in factors]
    return augment(hidden, weight, bias, terms)
