"""Long-sequence DPO with `prefopt train`: one pair of ~16k-token sequences, padding-free, gradient checkpointing.

The recipe (docs/trainer.md "Long sequences") is three existing settings: `max_length` >= the longest
prompt + completion, `padding_free: true` (one packed row, no padding tokens), `gradient_checkpointing: true`
(the decoder keeps one layer's activations), with `per_device_train_batch_size: 1` pair. The fused head never
forms [tokens, vocab] logits and the per-sequence log-ratios are formed in float64 (README "Dtypes"), so the
loss is right at this length. This script writes a long synthetic preference file (sort a long digit string),
trains a tiny Llama on it and prints the process's peak memory (VmHWM, and above the pre-training baseline).

  python examples/long_sequence_dpo.py                  # 16384 tokens per sequence, 2 steps
  python examples/long_sequence_dpo.py --length 4096 --steps 1
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def write_long_pairs(path, length, rows=2, prompt_digits=32, seed=0):
    """Rows whose prompt + completion fill about `length` tokens of the shipped character tokenizer."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            prompt = "sort:" + "".join(rng.choice("0123456789") for _ in range(prompt_digits)) + "="
            n = length - len(prompt) - 4  # room for <bos>, '.', <eos>
            digits = [rng.choice("0123456789") for _ in range(n)]
            chosen = "".join(sorted(digits)) + "."
            rejected = "".join(digits) + "."
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384, help="max_length (prompt + completion tokens)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args(argv)

    from prefopt.trainer.config import TrainConfig
    from prefopt.trainer.loop import train

    work = args.out or tempfile.mkdtemp(prefix="prefopt-long-")
    os.makedirs(work, exist_ok=True)
    data = write_long_pairs(os.path.join(work, "long_pairs.jsonl"), args.length)
    cfg = TrainConfig(dataset=data, output_dir=os.path.join(work, "run"), max_length=args.length,
                      max_prompt_length=64, padding_free=True, gradient_checkpointing=True,
                      per_device_train_batch_size=1, max_steps=args.steps, logging_steps=1, warmup_ratio=0.0,
                      learning_rate=1e-3, disable_tqdm=True)
    try:  # reset the peak-RSS high-water mark so VmHWM is the training peak (Linux)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    summary = train(cfg)
    peak = _status_kib("VmHWM")
    summary["tokens_per_sequence"] = args.length
    summary["peak_rss_mib"] = None if peak is None else peak / 1024
    summary["peak_above_start_mib"] = None if peak is None or before is None else (peak - before) / 1024
    summary["train_seconds"] = time.perf_counter() - start
    print(f"long-sequence DPO: max_length {args.length}, {args.steps} steps in {summary['train_seconds']:.1f} s; "
          f"peak RSS {summary['peak_rss_mib']:.0f} MiB ({summary['peak_above_start_mib']:.0f} MiB above the "
          f"process before training)", flush=True)
    return summary


if __name__ == "__main__":
    main()
