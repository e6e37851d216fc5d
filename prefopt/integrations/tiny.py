"""Tiny random Hugging Face models and a local tokenizer, built without any download.

Used by the tests, the examples and the package's own default trainer (smoke runs). Everything here is
deterministic given the seed, runs on CPU in milliseconds and needs only `transformers` and `tokenizers`.

    cfg = tiny_llama_config(vocab_size=64)
    model = tiny_model(cfg, seed=0)
    tok = build_tokenizer(["the cat sat", "a dog ran"], vocab_size=64)
"""
from __future__ import annotations

import torch

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")


def tiny_llama_config(vocab_size, hidden_size=32, layers=2, heads=4, **overrides):
    """A `LlamaConfig` with `layers` decoder layers (fp32, no tied embeddings unless overridden)."""
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                  max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2,
                  eos_token_id=3, attention_dropout=0.0)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_gemma2_config(vocab_size, hidden_size=32, layers=2, heads=4, final_logit_softcapping=30.0, **overrides):
    """A `Gemma2Config` (final-logit and attention softcapping, tied embeddings as in Gemma 2)."""
    from transformers import Gemma2Config

    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                  head_dim=hidden_size // heads, max_position_embeddings=256, sliding_window=16,
                  final_logit_softcapping=final_logit_softcapping, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                  attention_dropout=0.0)
    kwargs.update(overrides)
    return Gemma2Config(**kwargs)


def tiny_model(config, seed=0, dtype=torch.float32, attn_implementation=None):
    """A randomly initialised causal LM for `config` (deterministic for a given seed)."""
    from transformers import AutoModelForCausalLM

    if attn_implementation is None:
        # Gemma 2 wants eager attention (its attention softcapping is not in sdpa)
        attn_implementation = "eager" if getattr(config, "model_type", "") == "gemma2" else "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model


def tiny_llava_parts(text_kwargs, *, tokenizer_vocab, image_size=28, vision_hidden=16, vision_layers=1,
                     vision_feature_layer=-2):
    """(processor, config) of a tiny LLaVA, a CLIP vision tower + Llama (`LlamaConfig(**text_kwargs)`), assembled from
    local parts (no download): image_size x image_size pixels in 14 x 14 patches, the CLS feature dropped
    ("default" strategy), the word-level tokenizer of `build_tokenizer` plus an `<image>` token."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer([" ".join(all_words())], vocab_size=tokenizer_vocab)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                                     crop_size={"height": image_size,
                                                                                "width": image_size}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               image_token="<image>", num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                              patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text_kwargs), image_token_id=image_id,
                         vision_feature_select_strategy="default", vision_feature_layer=vision_feature_layer,
                         tie_word_embeddings=False)
    return processor, config


def build_tokenizer(texts, vocab_size=None, *, model_max_length=256):
    """A whitespace WordLevel `PreTrainedTokenizerFast` trained in-process on `texts`.

    Special tokens: `<pad>` = 0, `<unk>` = 1, `<s>` (bos) = 2, `</s>` (eos) = 3 (they match the tiny configs).
    Special tokens are split out before whitespace splitting, so `"word</s>"` -> `["word", "</s>"]`.
    `vocab_size` caps the vocabulary (specials included); None keeps every word.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer_kwargs = dict(special_tokens=list(SPECIAL_TOKENS), min_frequency=1, show_progress=False)
    if vocab_size is not None:
        trainer_kwargs["vocab_size"] = int(vocab_size)
    tok.train_from_iterator(list(texts), trainer=trainers.WordLevelTrainer(**trainer_kwargs))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=model_max_length)


_WORDS = ("the cat dog bird sat ran flew on under over a mat log tree red blue big small happy sad fast slow "
          "yes no maybe good bad answer question why how what it is was").split()


def preference_texts(n, *, seed=0, prompt_words=(2, 5), completion_words=(1, 4)):
    """`n` deterministic random (prompt, chosen, rejected) string triples over a small word list.

    Completions start with a space so `prompt + chosen` tokenizes as prompt tokens + chosen tokens.
    """
    g = torch.Generator().manual_seed(seed)

    def sentence(lo, hi):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return " ".join(_WORDS[int(i)] for i in torch.randint(len(_WORDS), (k,), generator=g))

    return [(sentence(*prompt_words), " " + sentence(*completion_words), " " + sentence(*completion_words))
            for _ in range(n)]


def preference_dataset(n, *, seed=0):
    """A `datasets.Dataset` with string columns prompt / chosen / rejected (TRL's standard preference format)."""
    from datasets import Dataset

    rows = preference_texts(n, seed=seed)
    return Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                              "rejected": [r[2] for r in rows]})


def all_words():
    """The word list of `preference_texts` (to train a tokenizer that covers it)."""
    return list(_WORDS)
