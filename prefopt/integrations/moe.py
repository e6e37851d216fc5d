"""Mixture-of-experts router load-balancing loss on the fused path, as TRL's `DPOTrainer` adds it.

A model whose (text) config has `output_router_logits` (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE, GPT-OSS, Jamba ...)
returns its router logits when asked; TRL 1.16 (`trl/trainer/dpo_trainer.py`, `trl/trainer/utils.py:
add_fused_lm_head`) then adds `router_aux_loss_coef * aux_loss` to the preference loss, with

    aux_loss = transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func(
        router_logits, text_config.num_experts, text_config.num_experts_per_tok, attention_mask)

(Mixtral's function is the one the MoE families share through transformers' modular files), and
`router_aux_loss_coef` = `DPOConfig.router_aux_loss_coef` if set, else the config's own (0.0 when it declares
none); the loss is on when the config has `output_router_logits` and the coefficient is not 0. The reference
forward never needs it. The computation runs inside the model's forward (`transformers.py: _model_forward`), so
sharded engines see the router weights as any forward does.
"""
from __future__ import annotations

__all__ = ["returns_router_logits", "router_aux_coef", "router_aux_loss"]


def _text_config(model):
    from prefopt.integrations.transformers import unwrap_model

    config = unwrap_model(model).config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def returns_router_logits(model) -> bool:
    """Whether the model can return router logits (its text config has `output_router_logits`)."""
    return hasattr(_text_config(model), "output_router_logits")


def router_aux_coef(model, coef=None) -> float:
    """The coefficient TRL uses: `coef` if given, else the config's `router_aux_loss_coef` (0.0 without one).

    A non-zero `coef` for a model that returns no router logits is an error (there is no loss to weight).
    """
    config = _text_config(model)
    if coef is None:
        return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    if coef and not hasattr(config, "output_router_logits"):
        raise ValueError(f"router_aux_loss_coef is {coef} but {type(model).__name__} is not a mixture-of-experts "
                         "model that returns its router logits, so there is no auxiliary loss to weight")
    return float(coef)


def router_aux_loss(model, backbone_outputs, attention_mask=None):
    """The load-balancing loss of one backbone output (called with `output_router_logits=True`); unweighted."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    router_logits = getattr(backbone_outputs, "router_logits", None)
    if router_logits is None:
        raise ValueError(f"{type(model).__name__}'s backbone returned no router logits with "
                         "output_router_logits=True")
    config = _text_config(model)
    return load_balancing_loss_func(router_logits, config.num_experts, config.num_experts_per_tok, attention_mask)
