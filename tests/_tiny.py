"""Test helpers: tiny random HF models and a local tokenizer (re-exported from prefopt.integrations.tiny)."""
from prefopt.integrations.tiny import (  # noqa: F401
    SPECIAL_TOKENS,
    all_words,
    build_tokenizer,
    preference_dataset,
    preference_texts,
    tiny_gemma2_config,
    tiny_llama_config,
    tiny_llava_parts,
    tiny_model,
)
