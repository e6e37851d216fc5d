"""Peak memory of one DPO step (forward + backward of the loss) for the model kinds of issue 26, with and without
prefopt: LoRA on the LM head (and, for its cost, the same LoRA without the head), a mixture-of-experts model
(router loss on), a vision-language model (LLaVA).

    python -m prefopt.bench.model_kinds            # the table of docs/bench.md ("Model kinds"; duration there)
    python -m prefopt.bench.model_kinds --vocab 32000 --tokens 256
    python -m prefopt.bench.model_kinds --head     # the LoRA head alone: what the augmented operands cost

Each (model kind, path) runs in a fresh process: TRL's `DPOTrainer` loss step (`compute_loss` + `backward`, after
one warm-up step) on a tiny random model with a large vocabulary, so the head dominates. Paths:
  eager    TRL's own loss code on the model's logits (`log_softmax` of `model(...).logits`): `eager_fused_lm_head`
           below stands in for TRL's `add_fused_lm_head`; the [tokens, vocab] logits exist
  trl      TRL 1.16's own fused path (its chunked head); TRL refuses LoRA on `lm_head`, so no entry there
  prefopt  `prefopt.integrations.trl.PrefoptDPOTrainer`
Memory: the process's peak RSS over its RSS at the start of the measured step (`bench/measure.py: PeakMemory`).
prefopt's CPU logits-tile cache is off (`PREFOPT_LOGITS_CACHE_MB=0`, the CUDA default; on CPU it would add up to
its 256 MiB budget for speed, `--cache-mb`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types
import warnings

KINDS = ("lora_head", "lora_body", "moe", "vlm")
PATHS = ("eager", "trl", "prefopt")


def eager_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
    """TRL's `add_fused_lm_head` contract computed from the model's own logits (PEFT's adapters, the model's softcap,
    everything its forward does): `model(..., labels=, fused_lm_head=True)` -> TRL's per-token fields."""
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    original = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            return original(*args, **kwargs) if labels is None else original(*args, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        out = original(*args, **kwargs)
        logits = out.logits[:, :-1] / temperature
        labels = labels[:, 1:]
        mask = labels != -100
        logp = torch.log_softmax(logits, -1)
        log_probs = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
        entropy = -(logp.exp() * logp).sum(-1) * mask
        mean_logits = logits.detach().mean(-1) * mask
        is_top1 = (logits.detach().argmax(-1) == labels) & mask
        log_sum_sq = torch.logsumexp(2 * logp.detach(), -1) * mask
        return FusedCausalLMOutput(loss=-log_probs.sum() / mask.sum().clamp(min=1), log_probs=log_probs,
                                   entropy=entropy, log_sum_sq_probs=log_sum_sq, mean_logits=mean_logits,
                                   is_top1=is_top1, label_mask=mask, aux_loss=getattr(out, "aux_loss", None))

    model.forward = types.MethodType(forward, model)


def _text_kwargs(vocab, hidden):
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False,
                pad_token_id=0, bos_token_id=2, eos_token_id=3, initializer_range=0.05)


def _setup(kind, vocab, hidden, tokens):
    """(make_model, processing_class, dataset, trainer kwargs) of one model kind."""
    import numpy as np
    import torch
    from datasets import Dataset

    from prefopt.integrations.tiny import all_words, build_tokenizer, preference_texts

    words = (tokens // 2, tokens // 2)  # prompt and completion lengths (one word = one token)
    rows = preference_texts(4, seed=0, prompt_words=words, completion_words=words)
    texts = {"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows], "rejected": [r[2] for r in rows]}
    tokenizer = build_tokenizer([" ".join(all_words())], vocab_size=48)
    if kind in ("lora_head", "lora_body"):
        import peft

        from prefopt.integrations.tiny import tiny_llama_config, tiny_model

        config = tiny_llama_config(vocab, hidden_size=hidden, max_position_embeddings=4096, initializer_range=0.05)
        targets = ["q_proj", "v_proj"] + (["lm_head"] if kind == "lora_head" else [])
        lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0)
        return (lambda: tiny_model(config, seed=0)), tokenizer, Dataset.from_dict(texts), dict(peft_config=lora)
    if kind == "moe":
        from transformers import AutoModelForCausalLM, MixtralConfig

        config = MixtralConfig(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02,
                               **_text_kwargs(vocab, hidden))

        def make():
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        return make, tokenizer, Dataset.from_dict(texts), dict(ref=True)
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from prefopt.integrations.tiny import tiny_llava_parts

    processor, config = tiny_llava_parts(_text_kwargs(vocab, hidden), tokenizer_vocab=47, image_size=56,
                                         vision_hidden=32, vision_layers=2)
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))] for _ in rows]
    texts["prompt"] = ["<image> " + p for p in texts["prompt"]]

    def make():
        torch.manual_seed(0)
        return LlavaForConditionalGeneration._from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return make, processor, Dataset.from_dict({"images": images, **texts}), dict(ref=True)


def child(kind, path, vocab, hidden, tokens):
    import tempfile

    import torch
    import trl
    import trl.trainer.dpo_trainer as dpo_module

    from prefopt.bench.measure import PeakMemory, _fixed_mmap_threshold
    from prefopt.integrations.trl import PrefoptDPOTrainer, _lora_head_allowed

    _fixed_mmap_threshold()  # freed buffers go back to the OS, so peak RSS follows what is live (bench/measure.py)
    torch.set_num_threads(2)
    make, processing_class, dataset, extra = _setup(kind, vocab, hidden, tokens)
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, max_steps=1, report_to=[],
                         use_cpu=True, bf16=False, max_length=None, disable_tqdm=True, dataloader_num_workers=0)
    kwargs = dict(model=make(), args=args, train_dataset=dataset, processing_class=processing_class)
    if extra.get("ref"):
        kwargs["ref_model"] = make()
    if "peft_config" in extra:
        kwargs["peft_config"] = extra["peft_config"]
    saved = dpo_module.add_fused_lm_head
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path == "prefopt":
            trainer = PrefoptDPOTrainer(**kwargs)
        else:
            if path == "eager":
                dpo_module.add_fused_lm_head = eager_fused_lm_head
            try:
                with _lora_head_allowed():
                    trainer = trl.DPOTrainer(**kwargs)
            finally:
                dpo_module.add_fused_lm_head = saved
        batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(2)])
        model = trainer.model
        model.train()
        n_tokens = int(batch["attention_mask"].sum())
        for measured in (False, True):  # a warm-up step first: lazy buffers and thread pools are not the step's
            model.zero_grad(set_to_none=True)
            trainer._metrics = {"train": __import__("collections").defaultdict(list),
                                "eval": __import__("collections").defaultdict(list)}
            with PeakMemory() as peak:
                loss = trainer.compute_loss(model, batch)
                loss.backward()
            del loss
    return {"kind": kind, "path": path, "peak_mb": peak.extra / 2 ** 20, "tokens": n_tokens,
            "aux_loss": bool(getattr(trainer, "aux_loss_enabled", False)), "method": peak.method}


HEAD_PATHS = ("frozen_head", "lora_head", "lora_head_concat", "eager_lora_head")


def head_child(path, vocab, hidden, tokens, rank=16):
    """One forward + backward of the head alone (fp32): a frozen plain head (LoRA elsewhere: only the hidden states
    need a gradient), the LoRA head as prefopt runs it (`extra_weight`: vocabulary slabs of [W | B]), the LoRA head
    on a concatenated [V, H + r] weight, and eager logits."""
    import torch

    import prefopt
    from prefopt.bench.measure import PeakMemory, _fixed_mmap_threshold
    from prefopt.integrations.adapters import low_rank_operands

    _fixed_mmap_threshold()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    a = (torch.randn(rank, hidden, generator=g) / hidden ** 0.5).requires_grad_()
    b = (torch.randn(vocab, rank, generator=g) * 0.01).requires_grad_()
    hidden_states = torch.randn(tokens, hidden, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)

    def step():
        if path == "frozen_head":
            out = prefopt.linear_logprobs(hidden_states, weight, labels)
        elif path == "eager_lora_head":
            logits = hidden_states @ weight.T + 2.0 * (hidden_states @ a.T) @ b.T
            out = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
        else:
            ops = low_rank_operands(hidden_states, weight, None, [(a, b, 2.0)])
            if path == "lora_head":
                out = prefopt.linear_logprobs(ops.hidden, ops.weight, labels, **ops.head_kwargs())
            else:
                out = prefopt.linear_logprobs(ops.hidden, torch.cat([ops.weight, ops.extra_weight], 1), labels)
            del ops
        out.sum().backward()

    for _ in range(2):  # the second step is measured
        hidden_states.grad = a.grad = b.grad = None
        with PeakMemory() as peak:
            step()
    return {"path": path, "peak_mb": peak.extra / 2 ** 20, "weight_mb": weight.numel() * 4 / 2 ** 20,
            "aug_weight_mb": vocab * (hidden + rank) * 4 / 2 ** 20, "logits_mb": tokens * vocab * 4 / 2 ** 20}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m prefopt.bench.model_kinds", description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=64000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256, help="tokens per sequence (prompt + completion)")
    p.add_argument("--cache-mb", type=int, default=0, help="PREFOPT_LOGITS_CACHE_MB of the prefopt runs")
    p.add_argument("--head", action="store_true", help="the LoRA head alone (defaults V=128000, H=1024, 512 tokens)")
    p.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        os.environ["PREFOPT_LOGITS_CACHE_MB"] = str(args.cache_mb)
        if args.child[0] == "head":
            print(json.dumps(head_child(args.child[1], args.vocab, args.hidden, args.tokens)))
        else:
            print(json.dumps(child(*args.child, args.vocab, args.hidden, args.tokens)))
        return 0
    if args.head:
        return head_table(args)
    results = {}
    for kind in KINDS:
        for path in PATHS:
            if kind == "lora_head" and path == "trl":
                continue  # TRL 1.16 refuses a PEFT adapter on lm_head
            cmd = [sys.executable, "-m", "prefopt.bench.model_kinds", "--child", kind, path, "--vocab", str(args.vocab),
                   "--hidden", str(args.hidden), "--tokens", str(args.tokens), "--cache-mb", str(args.cache_mb)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{kind}/{path} failed")
            results[(kind, path)] = json.loads(out.stdout.strip().splitlines()[-1])
    first = next(iter(results.values()))
    print(f"V={args.vocab}, H={args.hidden}, 2 pairs of {args.tokens}-token sequences "
          f"({first['method']}; peak over the step's start, MiB)\n")
    print("| model kind | eager logits | TRL 1.16 fused | prefopt drop-in |")
    print("|---|---|---|---|")
    for kind in KINDS:
        cells = [f"{results[(kind, p)]['peak_mb']:.0f}" if (kind, p) in results else "refused" for p in PATHS]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    return 0


def head_table(args):
    vocab = 128000 if args.vocab == 64000 else args.vocab
    hidden = 1024 if args.hidden == 64 else args.hidden
    tokens = 512 if args.tokens == 256 else args.tokens
    rows = []
    for path in HEAD_PATHS:
        cmd = [sys.executable, "-m", "prefopt.bench.model_kinds", "--child", "head", path, "--vocab", str(vocab),
               "--hidden", str(hidden), "--tokens", str(tokens), "--cache-mb", str(args.cache_mb)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"head/{path} failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r = rows[0]
    print(f"head alone, fp32, V={vocab}, H={hidden}, r=16, {tokens} tokens: W {r['weight_mb']:.0f} MiB, "
          f"[W, B] {r['aug_weight_mb']:.0f} MiB, logits {r['logits_mb']:.0f} MiB (peak over the step's start, MiB)\n")
    print("| " + " | ".join(HEAD_PATHS) + " |")
    print("|" + "---|" * len(HEAD_PATHS))
    print("| " + " | ".join(f"{row['peak_mb']:.0f}" for row in rows) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
