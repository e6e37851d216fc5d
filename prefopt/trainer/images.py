"""Preference rows with images: tokenized and batched by a local HF processor as TRL 1.16's vision collator does
(`DataCollatorForVisionPreference` in trl/trainer/dpo_trainer.py), so `prefopt train` takes TRL's vision datasets.

Rows: paired rows (prompt/chosen/rejected, standard or conversational) with `images` [file, ...] or `image` file,
relative to the JSONL file (`prefopt.trainer.data` reads and checks them). Tokens, as TRL's collator makes them:
  prompt      processor(images=the row's images, text=prompt): the processor expands each image placeholder into the
              model's image tokens (conversational prompts: the processor's chat template, with one image entry per
              image before the first user message's text);
  completion  processor(text=completion);
no special tokens are added (no BOS / EOS; a chat template writes its own). The prompt is never cut: its image tokens
must match the image features, so a prompt of max_length tokens or more is an error; completions are cut to
max_length (TRL's keep_start), and max_prompt_length / truncation_mode do not apply.
Batch: the trainer's padded collate of those tokens, plus what the processor returns for the micro-batch's images
(`pixel_values`, `image_grid_thw`, `image_sizes`, `pixel_attention_mask`, ...: one processor call on the chosen
rows' prompts then the rejected rows', as TRL's), and its per-token `token_type_ids` / `mm_token_type_ids` on the
prompt positions, 0 elsewhere (TRL's). The model adapter passes every such key to the backbone.
Not with padding_free (one packed row has no per-sequence image layout to give the backbone), context_parallel (a
rank's share of the tokens would not hold all image tokens) or unpaired rows.
"""
from __future__ import annotations

import hashlib
import io
import os

import torch

from prefopt.trainer.config import PrefoptInputError
from prefopt.trainer.data import TextTokenizer, TokenizedData, _split_text

PER_TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")   # processor outputs aligned with input_ids (TRL's list)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def has_images(rows) -> bool:
    return any("images" in row for row in rows)


def processor_path(cfg):
    """--processor, else --model when it is a local directory that holds a processor, else None."""
    if cfg.processor:
        return cfg.processor
    if os.path.isdir(cfg.model) and any(os.path.isfile(os.path.join(cfg.model, f)) for f in PROCESSOR_FILES):
        return cfg.model
    return None


def open_image(path):
    """(PIL image, sha256 of the file): decoded as `datasets` decodes an image column (no mode conversion; the
    processor converts), hashed so the precomputed reference log-probs' cache key covers the pixels."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            blob = f.read()
        image = Image.open(io.BytesIO(blob))
        image.load()
    except Exception as err:  # PIL raises several types for a damaged or foreign file
        raise PrefoptInputError(f"image {path!r}: cannot read ({type(err).__name__}: {err})") from None
    return image, hashlib.sha256(blob).hexdigest()


class ImageRows:
    """A local HF processor: it tokenizes image rows and adds the image inputs to the trainer's batches."""

    def __init__(self, path):
        from transformers import AutoProcessor

        if not os.path.isdir(path):
            raise PrefoptInputError(f"processor {path!r} is not a directory (give a local HF processor directory)")
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        except Exception as err:
            raise PrefoptInputError(f"processor {path!r}: cannot load ({type(err).__name__}: {err})") from None
        tok = getattr(processor, "tokenizer", None)
        if tok is None or getattr(processor, "image_processor", None) is None:
            raise PrefoptInputError(f"processor {path!r} is a {type(processor).__name__}, not a processor with an "
                                    "image processor and a tokenizer (rows with images need one)")
        self.processor = processor
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id   # TRL: pad token, else eos
        # hf=processor: the final model directory gets the processor (save_pretrained), not only its tokenizer
        self.tokenizer = TextTokenizer(encode=self._encode, vocab_size=len(tok), pad_id=pad if pad is not None else 0,
                                       bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, source=path, hf=processor)

    @staticmethod
    def check(cfg, tokenizer):
        """The settings image rows cannot run with, refused before anything loads."""
        if tokenizer is not None or cfg.tokenizer is not None:
            raise PrefoptInputError("rows with images are tokenized by the processor (its tokenizer): drop "
                                    "--tokenizer")
        if cfg.padding_free:
            raise PrefoptInputError("padding_free with rows with images: a packed row has no per-sequence layout "
                                    "for the image inputs; drop --padding_free")
        if cfg.context_parallel > 1:
            raise PrefoptInputError("context_parallel with rows with images: a rank's share of a sequence would not "
                                    "hold all of its image tokens")

    def _encode(self, text):
        return self.processor(text=[text], add_special_tokens=False)["input_ids"][0]

    def tokenize(self, rows, kind, max_length, source) -> TokenizedData:
        if kind != "paired":
            raise PrefoptInputError(f"{source}: rows with images must be paired (prompt, chosen, rejected)")
        examples, truncated = [], 0
        for n, row in enumerate(rows, 1):
            opened = [open_image(p) for p in row.get("images", [])]
            images, digests = [im for im, _ in opened], [h for _, h in opened]
            chat = _ImageChat(self.processor, len(images))
            texts = [_split_text(chat, row["prompt"], row[k]) for k in ("chosen", "rejected")]
            prompt_text = texts[0][0]
            out = self.processor(images=[images] if images else None, text=[prompt_text], add_special_tokens=False)
            prompt = list(out["input_ids"][0])
            completions = [self._encode(c) for _, c in texts]
            if any(not c for c in completions):
                raise PrefoptInputError(f"{source}: row {n}: a completion has no tokens")
            if max_length is not None:
                if len(prompt) >= max_length:
                    raise PrefoptInputError(
                        f"{source}: row {n}: the prompt has {len(prompt)} tokens with its image tokens and max_length "
                        f"is {max_length}; a prompt with images is never cut (its image tokens must match the image "
                        "features): raise --max_length")
                cut = [c[:max_length - len(prompt)] for c in completions]
                truncated += int(cut != completions)
                completions = cut
            examples.append({"prompt": prompt, "chosen": completions[0], "rejected": completions[1],
                             "prompt_text": prompt_text, "images": list(row.get("images", [])),
                             "image_sha256": digests})
        return TokenizedData(kind, examples, truncated, source)

    def inputs(self, examples, shape):
        """The processor's image inputs for a padded micro-batch of `shape` [2P, T] (P chosen rows, then P rejected
        rows of the same `examples`)."""
        rows = list(examples) * 2
        images = [[open_image(p)[0] for p in e["images"]] for e in rows]
        out = self.processor(images=images if any(images) else None,  # the processor wants no images, not empties
                             text=[e["prompt_text"] for e in rows], padding=True, padding_side="right",
                             return_tensors="pt", add_special_tokens=False)
        ids = out.pop("input_ids")
        out.pop("attention_mask", None)
        for i, e in enumerate(rows):  # the tokens were made at load time by the same call on the same text
            assert ids[i, :len(e["prompt"])].tolist() == e["prompt"], "processor tokens changed since loading"
        batch = {}
        for key, value in out.items():
            if key in PER_TOKEN_KEYS:
                full = torch.zeros(shape, dtype=value.dtype)
                for i, e in enumerate(rows):
                    full[i, :len(e["prompt"])] = value[i, :len(e["prompt"])]
                value = full
            batch[key] = value if torch.is_tensor(value) else torch.as_tensor(value)
        return batch


class _ImageChat:
    """Renders conversational rows with the processor's chat template, TRL's way: string contents become text
    entries and the first user message gets one image entry per image before its text."""

    def __init__(self, processor, n_images):
        self.processor, self.n_images = processor, n_images

    def render_chat(self, messages, add_generation_prompt):
        if not getattr(self.processor, "chat_template", None):
            raise PrefoptInputError("conversational rows with images need the processor's chat template; this "
                                    "processor has none")
        structured, placed = [], False
        for m in messages:
            content = m["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
                if m["role"] == "user" and not placed:
                    content = [{"type": "image"}] * self.n_images + content
                    placed = True
            structured.append({**m, "content": content})
        return self.processor.apply_chat_template(structured, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
