"""`prefopt train --long_context N`: the long-sequence preset (docs/trainer.md "Long sequences").

One flag sets the recipe for N tokens per sequence and, unless `--dataset` is given, trains on generated pairs:

* settings (`preset_settings`): `max_length N`, a 64-token prompt cap, `padding_free` (the pair is one packed
  2N-token row), `gradient_checkpointing`, one pair per micro-batch, 2 steps logged one by one, and a random-init
  Llama from a config (hidden 128, 2 layers, 4 heads). A config file or flags override any of them.
* data (`generated_pairs`): pairs whose prompt is `<s>` + 63 random tokens, the chosen completion repeats the
  prompt's tokens (a copy task attention can learn), the rejected one is random tokens, both ending in `</s>` and
  filling N tokens, over a 128256-token vocabulary (Llama 3's size), so the model has that vocabulary too.
* progress: each step's line adds its seconds and the process's peak RSS so far (`step_memory`).

What keeps it linear in tokens is the rest of prefopt: the fused head (no [tokens, vocab] logits), float64
per-sequence sums, and `prefopt_sdpa` attention (prefopt/integrations/attention.py: no [T, T] mask for the packed row).
"""
from __future__ import annotations

import time

import torch

from prefopt.trainer.data import TextTokenizer, TokenizedData

VOCAB = 128256          # Llama 3's vocabulary size: the regime where [tokens, vocab] logits do not fit
PROMPT_TOKENS = 64      # prompt cap (bos included); the rest of the N tokens is the completion
MODEL = {"hidden_size": 128, "layers": 2, "heads": 4}   # a small Llama: the head and the attention dominate memory
PAD, UNK, BOS, EOS = 0, 1, 2, 3                           # the special ids of prefopt.integrations.tiny's configs
ROWS_WITHOUT_MAX_STEPS = 4                                # generated pairs per global batch when epochs decide


def preset_settings(n_tokens: int) -> dict:
    """The TrainConfig values `--long_context n_tokens` stands for (below a config file and flags)."""
    return {"long_context": int(n_tokens), "max_length": int(n_tokens), "max_prompt_length": PROMPT_TOKENS,
            "padding_free": True, "gradient_checkpointing": True, "per_device_train_batch_size": 1,
            "max_steps": 2, "logging_steps": 1, "warmup_ratio": 0.0, "learning_rate": 1e-3,
            "model": "tiny-llama", "model_config": dict(MODEL)}


def synthetic_tokenizer(vocab_size: int = VOCAB) -> TextTokenizer:
    """Token ids only (the generated data is already tokenized): pad 0, unk 1, bos 2, eos 3."""
    def encode(text):
        raise ValueError("the --long_context tokenizer has no text form: it only sizes the generated pairs' "
                         "vocabulary (give --dataset and --tokenizer to train on text)")
    return TextTokenizer(encode=encode, vocab_size=int(vocab_size), pad_id=PAD, bos_id=BOS, eos_id=EOS,
                         source=f"generated ({vocab_size} token ids)")


def generated_pairs(n_tokens: int, rows: int, tokenizer: TextTokenizer, seed: int) -> TokenizedData:
    """`rows` pairs of `n_tokens` tokens per sequence (prompt + completion), deterministic for `seed`."""
    g = torch.Generator().manual_seed(int(seed))
    specials = {t for t in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) if t is not None}
    low = max(specials) + 1 if specials else 0
    if tokenizer.vocab_size - low < 2:
        raise ValueError(f"a {tokenizer.vocab_size}-token vocabulary leaves no ordinary tokens to generate from")
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    prompt_len = max(len(bos) + 1, min(PROMPT_TOKENS, n_tokens // 4))
    body = n_tokens - prompt_len - len(eos)
    examples = []
    for _ in range(rows):
        prompt = torch.randint(low, tokenizer.vocab_size, (prompt_len - len(bos),), generator=g)
        chosen = prompt.repeat(body // prompt.numel() + 1)[:body]
        rejected = torch.randint(low, tokenizer.vocab_size, (body,), generator=g)
        examples.append({"prompt": bos + prompt.tolist(), "chosen": chosen.tolist() + eos,
                         "rejected": rejected.tolist() + eos})
    return TokenizedData("paired", examples, 0, tokenizer.source)


def generated_data(cfg, tokenizer, global_batch):
    """(tokenizer, description, data) of a `--long_context` run without `--dataset`."""
    tokenizer = tokenizer if tokenizer is not None else synthetic_tokenizer()
    rows = global_batch * (cfg.max_steps if cfg.max_steps > 0 else ROWS_WITHOUT_MAX_STEPS)
    data = generated_pairs(cfg.long_context, rows, tokenizer, cfg.seed)
    where = (f"generated: {rows} pairs of {cfg.long_context} tokens per sequence, vocabulary "
             f"{tokenizer.vocab_size}, seed {cfg.seed}")
    return tokenizer, where, data


def peak_rss_mib():
    """The process's peak resident memory so far (VmHWM; ru_maxrss where /proc is missing), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepMeter:
    """Seconds per optimizer step and the peak RSS after it, for the progress lines of a long-context run."""

    def __init__(self):
        self.start = time.perf_counter()

    def record(self):
        now = time.perf_counter()
        seconds, self.start = now - self.start, now
        return {"step_seconds": seconds, "peak_rss_mib": peak_rss_mib()}
