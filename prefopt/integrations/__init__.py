"""Integrations with the Hugging Face stack (imported lazily: `transformers`, `peft`, `trl` stay optional).

* `prefopt.integrations.transformers` - `head_of`, `last_hidden_states`, `shift_labels`, `sequence_logps`:
  per-sequence log-probs of a causal LM without materialising its logits.
* `prefopt.integrations.trl` - `PrefoptDPOTrainer` / `patch_dpo_trainer`: TRL's `DPOTrainer` on prefopt's
  fused path (one-line switch).
* `prefopt.integrations.liger` - Liger-Kernel's chunked preference losses (DPO, ORPO, SimPO, CPO, KTO) with
  Liger's names, argument order and return structure, on prefopt's fused head (swap one import).
* `prefopt.integrations.adapters` - LoRA on the LM head: the fused head on augmented operands (no logits).
* `prefopt.integrations.moe` - the mixture-of-experts router load-balancing loss, as TRL adds it.
* `prefopt.integrations.tiny` - tiny random HF models and a local tokenizer (tests, examples, smoke runs).
"""
import importlib

__all__ = ["transformers", "trl", "liger", "adapters", "moe", "tiny"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
