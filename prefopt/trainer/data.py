"""Preference data: JSONL loading with line-accurate errors, tokenization, truncation, batching/packing.

Row formats (TRL's standard and conversational formats):
  paired   {"prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages]}
  unpaired {"prompt": ..., "completion": ..., "label": true|false}          (KTO)
Messages are {"role": ..., "content": ...} dicts. Tokenized: prompt = [bos] + prompt tokens,
completion = completion tokens + [eos]. Only completion tokens are scored.
Paired rows may carry images (TRL's vision format): `images` [file, ...] or `image` file, paths relative to the JSONL
file; such a dataset is tokenized and batched by `prefopt.trainer.images` (a processor instead of a tokenizer).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch

from prefopt.trainer.config import PrefoptInputError

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_DATASET = os.path.join(DATA_DIR, "default_pairs.jsonl")
DEFAULT_KTO_DATASET = os.path.join(DATA_DIR, "default_kto.jsonl")
DEFAULT_TOKENIZER = os.path.join(DATA_DIR, "tokenizer.json")

PAIRED_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------
# loading
def load_jsonl(path: str, skip_bad_rows: bool = False):
    """Rows of a preference JSONL file and its kind ('paired' or 'unpaired'). Errors name file:line."""
    rows, kind, _ = read_jsonl(path, skip_bad_rows)
    return rows, kind


def read_jsonl(path: str, skip_bad_rows: bool = False):
    """(rows, kind, skipped): skipped lists the 'file:line: reason' of the rows skip_bad_rows dropped.

    A row is bad when its line is not UTF-8 or not a JSON object, lacks a field, has a field of the wrong type
    or an empty text; without skip_bad_rows the first bad row stops with its file:line. A UTF-8 byte order mark
    at the start of the file is accepted. Mixing paired and unpaired rows is never skipped (the file is wrong)."""
    if os.path.isdir(path):
        raise PrefoptInputError(f"dataset {path!r} is a directory; give a JSONL file (one JSON object per line)")
    if not os.path.isfile(path):
        raise PrefoptInputError(f"dataset {path!r} does not exist")
    rows, kind, skipped = [], None, []
    try:
        f = open(path, "rb")
    except OSError as err:
        raise PrefoptInputError(f"dataset {path!r} cannot be read ({err.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                row, row_kind = _parse_row(raw, lineno, path)
            except _BadRow as err:
                if not skip_bad_rows:
                    raise PrefoptInputError(f"{err} (--skip_bad_rows skips such rows)") from None
                skipped.append(str(err))
                continue
            if row is None:
                continue
            if kind is None:
                kind = row_kind
            elif kind != row_kind:
                raise PrefoptInputError(f"{path}:{lineno}: {row_kind} row in a {kind} dataset (do not mix "
                                        "prompt/chosen/rejected rows with prompt/completion/label rows)")
            rows.append(row)
    if not rows:
        note = f" ({len(skipped)} bad rows skipped, first: {skipped[0]})" if skipped else ""
        raise PrefoptInputError(f"dataset {path!r} is empty (no JSON rows){note}")
    return rows, kind, skipped


class _BadRow(Exception):
    pass


def _parse_row(raw: bytes, lineno: int, path: str):
    """(row, kind) of one JSONL line, (None, None) for a blank line; _BadRow('file:line: reason') if bad."""
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise _BadRow(f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not line.strip():
        return None, None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise _BadRow(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise _BadRow(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
    row_kind = "unpaired" if ("completion" in row or "label" in row) else "paired"
    fields = UNPAIRED_FIELDS if row_kind == "unpaired" else PAIRED_FIELDS
    missing = [k for k in fields if k not in row]
    if missing:
        raise _BadRow(f"{path}:{lineno}: missing field(s) {', '.join(repr(m) for m in missing)} (paired rows need "
                      f"prompt, chosen, rejected; unpaired KTO rows need prompt, completion, label)")
    for k in fields:
        if k == "label":
            if not isinstance(row[k], bool) and row[k] not in (0, 1):
                raise _BadRow(f"{path}:{lineno}: 'label' must be true or false, got {row[k]!r}")
        else:
            _check_text(row[k], f"{path}:{lineno}: field {k!r}")
    if "images" in row or "image" in row:
        row["images"] = _image_files(row, f"{path}:{lineno}", os.path.dirname(os.path.abspath(path)))
        row.pop("image", None)
    return row, row_kind


def _image_files(row, where, folder):
    """The row's image files as absolute paths (TRL's `images` list, or its single `image`), each one present."""
    both = "images" in row and "image" in row
    files = row["images"] if "images" in row else [row["image"]]
    if both or not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise _BadRow(f"{where}: 'images' must be a list of image file paths (or 'image' one path), not both, "
                      f"got {str(row.get('images', row.get('image')))[:60]!r}")
    out = [os.path.join(folder, f) for f in files]
    for f, full in zip(files, out):
        if not os.path.isfile(full):
            raise _BadRow(f"{where}: image file {f!r} does not exist (paths are relative to the JSONL file)")
    return out


def _check_text(value, where):
    if isinstance(value, str):
        if not value:
            raise _BadRow(f"{where} is empty")
        return
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                 and isinstance(m["content"], str) for m in value):
        if not any(m["content"] for m in value):
            raise _BadRow(f"{where} is empty (every message has empty content)")
        return
    raise _BadRow(f"{where} must be a string or a non-empty list of {{'role', 'content'}} messages, "
                  f"got {str(value)[:60]!r}")


# ---------------------------------------------------------------------------------------------------------
# tokenizer
@dataclasses.dataclass
class TextTokenizer:
    """A minimal tokenizer interface over `tokenizers.Tokenizer` or a HF `PreTrainedTokenizer`."""
    encode: object              # str -> list[int], no special tokens
    vocab_size: int
    pad_id: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    source: str
    hf: object = None           # the HF tokenizer when loaded from a directory (chat template)

    def render_chat(self, messages, add_generation_prompt):
        if self.hf is not None and getattr(self.hf, "chat_template", None):
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")


def load_tokenizer(path: Optional[str] = None) -> TextTokenizer:
    """The shipped character tokenizer (path None), a tokenizer.json file, or a local HF tokenizer dir."""
    path = path or DEFAULT_TOKENIZER
    if os.path.isfile(path):
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_file(path)
        except Exception as err:
            raise PrefoptInputError(f"tokenizer {path!r}: cannot load ({err})") from None
        vocab = tok.get_vocab()

        def first(*names):
            return next((vocab[n] for n in names if n in vocab), None)

        eos = first("<eos>", "</s>", "<|endoftext|>", "<|eos|>")
        pad = first("<pad>", "<|pad|>")
        return TextTokenizer(encode=lambda s: tok.encode(s, add_special_tokens=False).ids,
                             vocab_size=tok.get_vocab_size(), pad_id=pad if pad is not None else (eos or 0),
                             bos_id=first("<bos>", "<s>", "<|bos|>"), eos_id=eos, source=path)
    if os.path.isdir(path):
        try:
            from transformers import AutoTokenizer
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:
            raise PrefoptInputError(f"tokenizer directory {path!r}: cannot load ({type(err).__name__}: {err})") from None
        pad = hf.pad_token_id if hf.pad_token_id is not None else (hf.eos_token_id or 0)
        return TextTokenizer(encode=lambda s: hf(s, add_special_tokens=False)["input_ids"], vocab_size=len(hf),
                             pad_id=pad, bos_id=hf.bos_token_id, eos_id=hf.eos_token_id, source=path, hf=hf)
    raise PrefoptInputError(f"tokenizer {path!r} does not exist (give a tokenizer.json file or a local HF "
                            "tokenizer directory)")


# ---------------------------------------------------------------------------------------------------------
# tokenization + truncation
@dataclasses.dataclass
class TokenizedData:
    kind: str                   # "paired" | "unpaired"
    examples: list              # dicts of int lists: prompt, chosen, rejected | prompt, completion, label
    truncated: int              # rows that max_length / max_prompt_length shortened
    source: str
    skipped: list = dataclasses.field(default_factory=list)   # 'file:line: reason' of rows skip_bad_rows dropped

    def __len__(self):
        return len(self.examples)


def _split_text(tokenizer, prompt, completion):
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        comp_msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        prompt_text = tokenizer.render_chat(prompt_msgs, add_generation_prompt=True)
        full = tokenizer.render_chat(prompt_msgs + comp_msgs, add_generation_prompt=False)
        if full.startswith(prompt_text):
            return prompt_text, full[len(prompt_text):]
        return prompt_text, "".join(m["content"] for m in comp_msgs)
    return prompt, completion


def _truncate(prompt_ids, completions, max_length, max_prompt_length, mode):
    """Cut the prompt to max_prompt_length, then completions so prompt + completion <= max_length."""
    cut = False
    limit = max_prompt_length
    if max_length is not None:
        limit = min(limit, max_length - 1) if limit is not None else max_length - 1
    if limit is not None and len(prompt_ids) > limit:
        prompt_ids = prompt_ids[-limit:] if mode == "keep_end" else prompt_ids[:limit]
        cut = True
    out = []
    for comp in completions:
        if max_length is not None and len(prompt_ids) + len(comp) > max_length:
            comp = comp[:max_length - len(prompt_ids)]
            cut = True
        out.append(comp)
    return prompt_ids, out, cut


def tokenize_rows(rows, kind, tokenizer: TextTokenizer, max_length=None, max_prompt_length=None,
                  truncation_mode="keep_end", source="") -> TokenizedData:
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    examples, truncated = [], 0
    names = ("chosen", "rejected") if kind == "paired" else ("completion",)
    for row in rows:
        texts = [_split_text(tokenizer, row["prompt"], row[n]) for n in names]
        prompt_ids = bos + tokenizer.encode(texts[0][0])
        comps = [tokenizer.encode(c) + eos for _, c in texts]
        if not prompt_ids:
            prompt_ids = eos[:1] or [tokenizer.pad_id]  # something to predict the first completion token from
        prompt_ids, comps, cut = _truncate(prompt_ids, comps, max_length, max_prompt_length, truncation_mode)
        truncated += int(cut)
        ex = {"prompt": prompt_ids, **dict(zip(names, comps))}
        if kind == "unpaired":
            ex["label"] = bool(row["label"])
        examples.append(ex)
    return TokenizedData(kind, examples, truncated, source)


def load_dataset(path, tokenizer, max_length=None, max_prompt_length=None, truncation_mode="keep_end",
                 skip_bad_rows=False):
    rows, kind, skipped = read_jsonl(path, skip_bad_rows)
    return text_dataset(rows, kind, skipped, path, tokenizer, max_length, max_prompt_length, truncation_mode)


def text_dataset(rows, kind, skipped, path, tokenizer, max_length=None, max_prompt_length=None,
                 truncation_mode="keep_end"):
    """The rows of `read_jsonl` tokenized by a text tokenizer (rows with images need a processor)."""
    if any("images" in r for r in rows):
        raise PrefoptInputError(f"{path} has rows with images: they need a processor (--processor DIR, a local HF "
                                "processor directory, or --model a local vision-language model directory with one)")
    data = tokenize_rows(rows, kind, tokenizer, max_length, max_prompt_length, truncation_mode, source=path)
    data.skipped = skipped
    bad = [i for i, ex in enumerate(data.examples)
           if any(len(ex[n]) == 0 for n in (("chosen", "rejected") if kind == "paired" else ("completion",)))]
    if bad and tokenizer.eos_id is None:
        raise PrefoptInputError(f"{path}: {len(bad)} row(s) have an empty completion after tokenization "
                                f"(first: row {bad[0] + 1})")
    return data


# ---------------------------------------------------------------------------------------------------------
# batching
def epoch_order(n: int, seed: int, epoch: int) -> list:
    g = torch.Generator().manual_seed(int(seed) * 1000003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


def sequences_of(examples, kind):
    """Flat list of (prompt_ids, completion_ids): paired -> all chosen first, then all rejected."""
    if kind == "paired":
        return ([(e["prompt"], e["chosen"]) for e in examples] + [(e["prompt"], e["rejected"]) for e in examples])
    return [(e["prompt"], e["completion"]) for e in examples]


def collate(examples, kind, pad_id, padding_free=False):
    """Tensors for a micro-batch.

    padded: input_ids/attention_mask/completion_mask [S, T] (right padding), labels [S, T] shifted
            (label t = token t+1 where that token is a completion token, else -100).
    packed: input_ids/position_ids/completion_mask/labels [1, N], cu_seqlens [S+1], no attention_mask.
    S = 2P for paired rows (P chosen first, then P rejected), else the number of rows; KTO adds `kto_labels`.
    """
    seqs = sequences_of(examples, kind)
    batch = {}
    if padding_free:
        ids, pos, comp, cu = [], [], [], [0]
        for p, c in seqs:
            ids += p + c
            pos += list(range(len(p) + len(c)))
            comp += [0] * len(p) + [1] * len(c)
            cu.append(len(ids))
        input_ids = torch.tensor([ids], dtype=torch.long)
        completion_mask = torch.tensor([comp], dtype=torch.long)
        cu_seqlens = torch.tensor(cu, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, :-1] = torch.where(completion_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE_INDEX)
        labels[0, cu_seqlens[1:] - 1] = IGNORE_INDEX  # the last token of a sequence predicts nothing
        batch.update(input_ids=input_ids, position_ids=torch.tensor([pos], dtype=torch.long),
                     completion_mask=completion_mask, labels=labels, cu_seqlens=cu_seqlens)
    else:
        length = max(len(p) + len(c) for p, c in seqs)
        input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        completion_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, (p, c) in enumerate(seqs):
            n = len(p) + len(c)
            input_ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
            attention_mask[i, :n] = 1
            completion_mask[i, len(p):n] = 1
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, :-1] = torch.where(completion_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE_INDEX)
        batch.update(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask,
                     labels=labels)
    if kind == "unpaired":
        batch["kto_labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
    return batch
