#!/usr/bin/env python
"""Regenerate the embedded default data shipped in prefopt/data/ (deterministic; no downloads).

Writes
  prefopt/data/default_pairs.jsonl   paired preference rows  {"prompt", "chosen", "rejected"}
  prefopt/data/default_kto.jsonl     unpaired KTO rows       {"prompt", "completion", "label"}
  prefopt/data/tokenizer.json        character-level tokenizer (printable ASCII + <pad> <bos> <eos> <unk>)

The task is "sort the digits": prompt "sort:53814=" ; chosen "13458." (ascending) ; rejected a
permutation that is NOT sorted (60% one adjacent swap, 25% a random shuffle, 15% the descending order).
The preference is learnable by a tiny randomly initialised transformer in seconds: sorted strings
only contain non-decreasing digit bigrams, rejected ones contain descending bigrams.

    python scripts/make_default_data.py            # rewrite the files in prefopt/data/
    python scripts/make_default_data.py --rows 400 --seed 0 --out prefopt/data
"""
from __future__ import annotations

import argparse
import json
import os
import random
import string

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def make_pairs(rows: int, seed: int):
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        n = rng.randint(3, 7)
        digits = [rng.choice("0123456789") for _ in range(n)]
        while len(set(digits)) == 1:  # a constant string has no unsorted permutation
            digits = [rng.choice("0123456789") for _ in range(n)]
        chosen = "".join(sorted(digits))
        kind = rng.random()
        if kind < 0.15:
            rejected = "".join(sorted(digits, reverse=True))
        elif kind < 0.75:
            swapped = list(chosen)  # near miss: one adjacent pair out of order
            i = rng.choice([j for j in range(n - 1) if swapped[j] != swapped[j + 1]])
            swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
            rejected = "".join(swapped)
        else:
            rejected = chosen
            while rejected == chosen:
                shuffled = digits[:]
                rng.shuffle(shuffled)
                rejected = "".join(shuffled)
        out.append({"prompt": "sort:" + "".join(digits) + "=", "chosen": chosen + ".", "rejected": rejected + "."})
    return out


def make_kto(pairs, rows: int, seed: int):
    rng = random.Random(seed + 1)
    out = []
    for pair in pairs[:rows]:
        good = rng.random() < 0.5
        out.append({"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good})
    return out


def make_tokenizer_json() -> str:
    """A character-level tokenizer.json (WordLevel over single characters) built with `tokenizers`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tok.add_special_tokens(SPECIALS)
    return tok.to_str(pretty=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400, help="paired rows (default 400)")
    parser.add_argument("--kto_rows", type=int, default=200, help="unpaired KTO rows (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "prefopt", "data"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    pairs = make_pairs(args.rows, args.seed)
    with open(os.path.join(args.out, "default_pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in pairs)
    with open(os.path.join(args.out, "default_kto.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in make_kto(pairs, args.kto_rows, args.seed))
    with open(os.path.join(args.out, "tokenizer.json"), "w") as f:
        f.write(make_tokenizer_json())
    print(f"wrote {len(pairs)} pairs, {args.kto_rows} KTO rows and tokenizer.json to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
