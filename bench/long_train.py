"""`prefopt bench --long-train`: one full DPO training step on one pair of long sequences, V=128256.

A step is what a trainer does for one optimizer update: policy forward (gradient checkpointing on) and backward,
reference forward without gradient, AdamW. Every (length, implementation) runs as a fresh
`python -m bench.long_train --child` process whose address space is capped with RLIMIT_AS before torch is imported
(the pattern of bench/long.py), so "out of memory" is a measured outcome. Implementations (rows):

  prefopt       prefopt's trainer, `prefopt train --long_context N` (packed 2N-token row, prefopt_sdpa attention)
  trl           TRL's DPOTrainer as installed (TRL 1.16 scores tokens with its own chunked log-prob head)
  trl-eager     the same trainer with the eager head of older TRL releases: the model's logits, log_softmax, gather
  trl-liger     TRL's DPOTrainer with use_liger_kernel=True (Liger's layer kernels; a skip where they cannot run)
  trl-prefopt   TRL with prefopt's drop-in (prefopt.integrations.trl.PrefoptDPOTrainer)

Model: a Llama from a config (prefopt/trainer/long_context.py MODEL: hidden 128, 2 layers, 4 heads, V=128256),
random init; the reference is the same model with every weight moved by a small random amount (so the log-ratios
and `rewards/margins` are not 0 by construction). Data: the preset's generated pair (a 64-token prompt, chosen and
rejected completions filling N tokens per sequence), given to TRL as text over a word-per-id tokenizer that maps
back to the same ids. The float64 truth of a length is its loss and margins from float64 copies of both models
(transformers' own sdpa attention, an eager log_softmax over 256-token chunks of the logits, math.fsum-exact sums:
an independent computation, not prefopt's kernels), run in a capped child of its own.

Peak memory is the child's VmHWM during the step (reset with clear_refs=5 just before the trainer's train()), and
above the RSS at that moment; step seconds come from the trainer's own step boundaries. Times are for a machine
shared with other jobs: compare them only within one run.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time

from .measure import capped_child, reset_peak_rss, status_mib

BETA = 0.1
LEARNING_RATE = 1e-6
SEED = 42              # TrainConfig's default seed: the preset generates the pair from it
MODEL_SEED = 0
REF_NOISE = 0.02       # reference = policy + N(0, (REF_NOISE * std of each weight)^2): log-ratios of tens of nats
LENGTHS = (4096, 8192, 16384, 32768)
QUICK_LENGTHS = (512,)
DEFAULT_CAP_GB = 12.0
STEP_LIMIT_S = 15 * 60  # the bound on one step for the longest length
TRUTH_CHUNK = 256       # tokens per float64 logits chunk of the truth (256 x 128256 x 8 B = 250 MiB)

IMPLS = {
    "prefopt": "prefopt trainer (`prefopt train --long_context N`)",
    "trl": "TRL DPOTrainer (its chunked log-prob head)",
    "trl-eager": "TRL DPOTrainer, eager head (logits, as older TRL)",
    "trl-liger": "TRL DPOTrainer, use_liger_kernel=True",
    "trl-prefopt": "TRL + prefopt drop-in (PrefoptDPOTrainer)",
}


# ----------------------------------------------------------------------------------------------------------------
# inputs shared by every implementation
# ----------------------------------------------------------------------------------------------------------------
def build_models(n_tokens, dtype):
    """(policy, reference): the same random-init Llama, the reference's weights moved by REF_NOISE."""
    import torch
    from prefopt.integrations.tiny import tiny_llama_config, tiny_model
    from prefopt.trainer.long_context import MODEL, VOCAB

    config = tiny_llama_config(VOCAB, MODEL["hidden_size"], MODEL["layers"], MODEL["heads"],
                               max_position_embeddings=max(256, n_tokens))
    policy = tiny_model(config, seed=MODEL_SEED, dtype=dtype)
    reference = tiny_model(config, seed=MODEL_SEED, dtype=dtype)
    gen = torch.Generator().manual_seed(MODEL_SEED + 1)
    with torch.no_grad():
        for p in reference.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.add_((noise * REF_NOISE * float(p.double().std() if p.numel() > 1 else 1.0)).to(p.dtype))
    return policy, reference


def pair(n_tokens):
    """The preset's generated pair (prompt, chosen, rejected token ids) for `prefopt train --long_context n`."""
    from prefopt.trainer.long_context import generated_pairs, synthetic_tokenizer
    return generated_pairs(n_tokens, 1, synthetic_tokenizer(), SEED).examples[0]


def word_tokenizer():
    """A HF tokenizer whose word `t<i>` is token id i (specials <pad> <unk> <s> </s> = 0..3): TRL's text input."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from prefopt.trainer.long_context import VOCAB
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {name: i for i, name in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=10 ** 7)


def _text(ids):
    return " ".join(("<pad>", "<unk>", "<s>", "</s>")[i] if i < 4 else f"t{i}" for i in ids)


def trl_dataset(example):
    from datasets import Dataset
    return Dataset.from_dict({"prompt": [_text(example["prompt"])], "chosen": [" " + _text(example["chosen"])],
                              "rejected": [" " + _text(example["rejected"])]})


# ----------------------------------------------------------------------------------------------------------------
# one step of each implementation (run inside the capped child)
# ----------------------------------------------------------------------------------------------------------------
def step_prefopt(n_tokens, work):
    from prefopt.trainer import TrainConfig, Trainer
    from prefopt.trainer.long_context import synthetic_tokenizer

    policy, reference = build_models(n_tokens, None)
    cfg = TrainConfig.from_dict({"long_context": n_tokens, "max_steps": 1, "beta": BETA, "seed": SEED,
                                 "learning_rate": LEARNING_RATE, "output_dir": os.path.join(work, "prefopt"),
                                 "overwrite": True, "disable_tqdm": True, "save_total_limit": 1})
    trainer = Trainer(cfg, model=policy, tokenizer=synthetic_tokenizer(), ref_model=reference)
    assert trainer.data.examples[0] == pair(n_tokens)
    start = status_mib("VmRSS")
    reset_peak_rss()
    record = trainer.train()["history"][0]
    return dict(loss=record["loss"], margins=record["rewards/margins"], step_s=record["step_seconds"],
                peak_mib=record["peak_rss_mib"], start_mib=start)


def _eager_head(model):
    """Make `model(..., fused_lm_head=True)` (what TRL's DPOTrainer calls) compute TRL's outputs from the model's
    own logits, as older TRL releases did: log_softmax over [B, T, V] logits, gather, entropy from them."""
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    fused_forward = model.forward
    plain_forward = type(model).forward.__get__(model)

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            return fused_forward(*args, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        logits = plain_forward(*args, **kwargs).logits[:, :-1].float()
        target = labels[:, 1:]
        mask = target != -100
        logp = logits.log_softmax(-1)
        log_probs = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1).masked_fill(~mask, 0)
            mean_logits = logits.mean(-1).masked_fill(~mask, 0)
            is_top1 = (logits.argmax(-1) == target) & mask
        loss = -log_probs.sum() / mask.sum().clamp(min=1)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, mean_logits=mean_logits,
                                   is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)


def step_trl(n_tokens, work, impl):
    import warnings

    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    policy, reference = build_models(n_tokens, None)
    tokenizer = word_tokenizer()
    example = pair(n_tokens)
    timing = {}

    class Meter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timing["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            timing["step_s"] = time.perf_counter() - timing["t0"]
            timing["peak_mib"] = status_mib("VmHWM")

    cls = DPOTrainer
    if impl == "trl-prefopt":
        from prefopt.integrations.trl import PrefoptDPOTrainer as cls
    args = DPOConfig(output_dir=os.path.join(work, impl), per_device_train_batch_size=1, max_steps=1, logging_steps=1,
                     learning_rate=LEARNING_RATE, beta=BETA, max_length=n_tokens, report_to=[], use_cpu=True,
                     save_strategy="no", disable_tqdm=True, bf16=False, gradient_checkpointing=True, seed=SEED,
                     dataloader_num_workers=0, use_liger_kernel=impl == "trl-liger", warmup_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=policy, ref_model=reference, args=args, train_dataset=trl_dataset(example),
                      processing_class=tokenizer, callbacks=[Meter()])
    row = trainer.train_dataset[0]
    if (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != \
            (example["prompt"], example["chosen"], example["rejected"]):
        raise RuntimeError("TRL tokenized the generated pair differently from the ids the other rows train on")
    if impl == "trl-eager":
        _eager_head(trainer.model)
        _eager_head(trainer.ref_model)
    start = status_mib("VmRSS")
    reset_peak_rss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logs = next(h for h in trainer.state.log_history if "loss" in h and "rewards/margins" in h)
    return dict(loss=logs["loss"], margins=logs["rewards/margins"], step_s=timing["step_s"],
                peak_mib=timing["peak_mib"], start_mib=start)


def step_truth(n_tokens):
    """Loss and margins of the step from float64 copies of both models (forward only: all the loss needs)."""
    import torch

    # the float32 models' weights (initialisation draws differ between dtypes), widened
    policy, reference = (m.double() for m in build_models(n_tokens, None))
    example = pair(n_tokens)
    rows = [example["prompt"] + example[k] for k in ("chosen", "rejected")]
    ids = torch.tensor(rows)
    first = len(example["prompt"]) - 1  # hidden t predicts token t + 1: the completion's first token
    sums = {}
    start = time.perf_counter()
    for name, model in (("policy", policy), ("reference", reference)):
        model.eval()
        with torch.no_grad():
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            weight = model.lm_head.weight
            seqs = []
            for b in range(2):
                parts = []
                for s in range(first, n_tokens - 1, TRUTH_CHUNK):
                    e = min(n_tokens - 1, s + TRUTH_CHUNK)
                    logp = (hidden[b, s:e] @ weight.T).log_softmax(-1)
                    parts += logp.gather(-1, ids[b, s + 1:e + 1].unsqueeze(-1)).squeeze(-1).tolist()
                seqs.append(math.fsum(parts))
            sums[name] = seqs
    ratio_c = sums["policy"][0] - sums["reference"][0]
    ratio_r = sums["policy"][1] - sums["reference"][1]
    margin = BETA * (ratio_c - ratio_r)
    loss = math.log1p(math.exp(-margin)) if margin > -30 else -margin
    return dict(loss=loss, margins=margin, chosen_logps=sums["policy"][0], rejected_logps=sums["policy"][1],
                log_ratios=[ratio_c, ratio_r], seconds=time.perf_counter() - start)


def child(spec, out_path):
    """Runs in its own process: cap, import torch, one measured step, save the results."""
    result = dict(spec)
    try:
        capped_child(spec)
        with tempfile.TemporaryDirectory(prefix="prefopt-long-train-") as work:
            if spec["impl"] == "truth":
                out = step_truth(spec["T"])
            elif spec["impl"] == "prefopt":
                out = step_prefopt(spec["T"], work)
            else:
                out = step_trl(spec["T"], work, spec["impl"])
        result.update(status="ok", **out)
    except MemoryError as err:
        result.update(status="oom", error=f"MemoryError: {err}"[:300])
    except Exception as err:  # torch's allocator: RuntimeError "DefaultCPUAllocator: can't allocate memory"
        msg = f"{type(err).__name__}: {err}".strip()
        oom = "allocate memory" in msg or "out of memory" in msg.lower() or "cannot allocate" in msg.lower()
        result.update(status="oom" if oom else "error", error=msg.splitlines()[0][:300])
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# the parent: one child at a time
# ----------------------------------------------------------------------------------------------------------------
def _run_child(spec, work, timeout):
    out_path = os.path.join(work, f"{spec['impl']}_{spec['T']}.json")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) if __package__ == "bench" else None
    cmd = [sys.executable, "-m", f"{__package__}.long_train", "--child", json.dumps(spec), out_path]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec, status="timeout", error=f"over {timeout} s (child process)")
    if not os.path.exists(out_path):  # killed without a word: under RLIMIT_AS that is an allocation failure
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        oom = "memory" in tail[0].lower() or proc.returncode in (-9, -6, 134, 137)
        return dict(spec, status="oom" if oom else "error", error=tail[0][:300])
    with open(out_path) as f:
        res = json.load(f)
    res["child_s"] = time.perf_counter() - start
    return res


def impl_status(impl):
    """(runnable, reason) of an implementation here, before any child is started."""
    import importlib.util
    if impl == "prefopt":
        return True, ""
    if importlib.util.find_spec("trl") is None:
        return False, "trl is not installed (pip install trl)"
    if impl == "trl-liger" and importlib.util.find_spec("liger_kernel") is None:
        return False, "liger-kernel is not installed (pip install liger-kernel)"
    return True, ""


def _liger_reason(error):
    if "active drivers" in error:  # triton finds no GPU driver
        return ("Liger's kernels are Triton GPU kernels and Triton finds no GPU driver here (`" + error + "`); "
                "with use_liger_kernel=True TRL 1.16 swaps in only Liger's layer kernels (RMSNorm, RoPE, SwiGLU: it "
                "turns Liger's fused linear cross-entropy off) and keeps its own chunked head")
    return f"Liger's kernels do not run here: {error}"


def _decide(impl, T, prev, older):
    """(run, why not) for `impl` at T tokens, from its results at the previous two lengths."""
    ok, why = impl_status(impl)
    if ok and prev is not None and prev["status"] != "ok":
        return False, f"did not train at {prev['T']} tokens ({prev['status']})"
    if ok and T > 16384 and prev is not None:
        growth = 2.0 if older is None or older.get("status") != "ok" else max(2.0, prev["step_s"] / older["step_s"])
        predicted = prev["step_s"] * growth * T / (2 * prev["T"])
        if predicted > STEP_LIMIT_S:
            return False, (f"its {prev['T']}-token step took {prev['step_s']:.0f} s; growing {growth:.1f}x per "
                           f"doubling, a {T}-token step would take ~{predicted / 60:.0f} minutes (over "
                           f"{STEP_LIMIT_S // 60})")
    return ok, why


def _add_errors(res, truth):
    if res["status"] == "ok" and truth is not None and truth["status"] == "ok":
        res["loss_rel_err"] = abs(res["loss"] - truth["loss"]) / abs(truth["loss"])
        res["margins_rel_err"] = abs(res["margins"] - truth["margins"]) / abs(truth["margins"])
    return res


def run_long_train(*, lengths=LENGTHS, impls=tuple(IMPLS), cap_gb=DEFAULT_CAP_GB, timeout=3600, threads=None,
                   work=None, log=print, results_path=None, truth=True):
    """Every length x implementation in a capped child, plus a float64 truth per length -> records.

    A length beyond the first runs an implementation only if its previous length trained (a step that ran out of
    memory at N does at 2N too: recorded as skipped), and a length beyond 16384 only if the step it predicts stays
    under STEP_LIMIT_S: the last step's seconds times the growth factor of the last doubling (at least 2)."""
    work = work or tempfile.mkdtemp(prefix="prefopt-long-train-")
    records, last, before_last = [], {}, {}
    for T in lengths:
        base = dict(T=T, threads=threads, cap_gb=cap_gb)
        plan = {impl: _decide(impl, T, last.get(impl), before_last.get(impl)) for impl in impls}
        exact = dict(base, impl="truth", status="skip", error="no implementation runs at this length")
        if not truth:
            exact["error"] = "not run (--no-truth)"
        elif any(ok for ok, _ in plan.values()):
            exact = _run_child(dict(base, impl="truth"), work, timeout)
        records.append(exact)
        log(f"T={T} float64 truth: {exact['status']}" + (f" ({exact['seconds']:.0f} s)" if exact["status"] == "ok"
                                                          else f" ({exact.get('error', '')})"))
        for impl in impls:
            rec = dict(base, impl=impl)
            ok, why = plan[impl]
            if not ok:
                res = dict(rec, status="skip", error=why)
            else:
                res = _run_child(rec, work, timeout)
                if impl == "trl-liger" and res["status"] == "error":  # Liger's kernels cannot run here
                    res = dict(rec, status="skip", error=_liger_reason(res.get("error", "")))
                before_last[impl], last[impl] = last.get(impl), res
            records.append(_add_errors(res, exact))
            log(f"  {impl}: {res['status']}" + (f" peak {res['peak_mib']:.0f} MiB, step {res['step_s']:.1f} s, "
                                                f"loss {res['loss']:.6f}, margins {res['margins']:+.6f}"
                                                if res["status"] == "ok" else f" ({res.get('error', '')})"))
            if results_path:  # partial results survive an interrupted run
                with open(results_path, "w") as f:
                    json.dump(dict(records=records), f, indent=1)
    return records


def _fmt_err(value):
    return "n/a" if value is None else f"{value:.1e}"


def markdown(records, cap_gb):
    head = ("| tokens/seq | implementation | result | peak RSS MiB (step) | above start MiB | step s | loss | "
            "loss rel. err | margins | margins rel. err |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in records:
        if r["impl"] == "truth":
            if r["status"] == "ok":
                rows.append(f"| {r['T']} | float64 truth (forward) | computed | | | | {r['loss']:.6f} | | "
                            f"{r['margins']:+.6f} | |")
            else:
                rows.append(f"| {r['T']} | float64 truth (forward) | {r['status']}: {r.get('error', '')} "
                            "| | | | | | | |")
            continue
        name = IMPLS.get(r["impl"], r["impl"])
        if r["status"] == "ok":
            cells = ["trains", f"{r['peak_mib']:.0f}", f"{r['peak_mib'] - r['start_mib']:.0f}", f"{r['step_s']:.1f}",
                     f"{r['loss']:.6f}", _fmt_err(r.get("loss_rel_err")), f"{r['margins']:+.6f}",
                     _fmt_err(r.get("margins_rel_err"))]
        else:
            what = {"oom": f"out of memory under the {cap_gb:g} GiB cap", "skip": f"skipped: {r.get('error', '')}",
                    "timeout": f"timeout: {r.get('error', '')}"}
            cells = [what.get(r["status"], f"{r['status']}: {r.get('error', '')}")] + [""] * 7
        rows.append(f"| {r['T']} | {name} | " + " | ".join(cells) + " |")
    return head + "\n" + "\n".join(rows)


def plot(records, path, cap_gb):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.2))
    markers = dict(zip(IMPLS, "so^Dv"))
    colors = dict(zip(IMPLS, ("C0", "C1", "C3", "C4", "C2")))
    for impl in IMPLS:
        rows = sorted((r for r in records if r["impl"] == impl), key=lambda r: r["T"])
        ok = [r for r in rows if r["status"] == "ok"]
        oom = [r for r in rows if r["status"] == "oom"]
        if ok:
            ax_mem.plot([r["T"] for r in ok], [r["peak_mib"] for r in ok], marker=markers[impl], label=impl,
                        color=colors[impl])
            ax_time.plot([r["T"] for r in ok], [r["step_s"] for r in ok], marker=markers[impl], label=impl,
                         color=colors[impl])
        if oom:
            ax_mem.scatter([r["T"] for r in oom], [cap_gb * 1024] * len(oom), marker="x", s=90,
                           color=colors[impl], label=f"{impl}: out of memory")
    ax_mem.axhline(cap_gb * 1024, color="grey", lw=0.8, ls="--")
    ax_mem.annotate(f"{cap_gb:g} GiB address-space cap", (1.0, cap_gb * 1024), xycoords=("axes fraction", "data"),
                    xytext=(-4, -12), textcoords="offset points", ha="right", fontsize=8, color="grey")
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per sequence (one pair)")
        ax.legend(fontsize=8, loc="center right")
    ax_mem.set_ylim(0, cap_gb * 1024 * 1.08)
    ax_mem.set_ylabel("peak RSS during the step (MiB)")
    ax_time.set_ylabel("step seconds (shared 2-core CPU)")
    ax_time.set_yscale("log")
    fig.suptitle("One DPO training step, V=128256, Llama hidden 128 x 2 layers, each run in its own capped process")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def merged_records(paths):
    """The records of several saved runs (long_train.json), a later file's (T, impl) replacing an earlier one's
    where it measured something (a row skipped in a later run keeps the earlier measurement)."""
    merged, order = {}, []
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["records"]:
                key = (r["T"], r["impl"])
                if key not in merged:
                    order.append(key)
                if key not in merged or r["status"] != "skip":
                    merged[key] = r
    impl_order = ["truth"] + list(IMPLS)
    records = [merged[k] for k in sorted(order, key=lambda k: (k[0], impl_order.index(k[1])))]
    for r in records:  # against the truth of its length, whichever run computed it
        _add_errors(r, merged.get((r["T"], "truth")))
    return records


def parser(prog):
    import argparse
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None, help=f"tokens per sequence (default {LENGTHS})")
    p.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS} (a smoke run)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS), help="implementations (rows)")
    p.add_argument("--cap-gb", type=float, default=DEFAULT_CAP_GB, help="address-space cap (RLIMIT_AS) per child")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per child process")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    p.add_argument("--out", default=None, help="output directory (default: bench/results/ or ./prefopt-bench-results)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-truth", action="store_true", help="skip the float64 truth (e.g. one a saved run has: "
                   "--from-json adds the errors against it)")
    p.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                   help="run nothing: the table and plot of saved runs (long_train.json files, later ones replacing "
                   "earlier rows they measured)")
    return p


def main_long_train(args, log=None):
    from .__main__ import default_out_dir
    from .report import environment
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out_dir = args.out or default_out_dir()
    os.makedirs(out_dir, exist_ok=True)
    if args.from_json:
        records = merged_records(args.from_json)
        table = markdown(records, args.cap_gb)
        with open(os.path.join(out_dir, "long_train.md"), "w") as f:
            f.write(table + "\n")
        if not args.no_plots:
            plot(records, os.path.join(out_dir, "long_train.png"), args.cap_gb)
        print(table)
        return 0
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)
    start = time.perf_counter()
    json_path = os.path.join(out_dir, "long_train.json")
    records = run_long_train(lengths=lengths, impls=tuple(args.impls), cap_gb=args.cap_gb, timeout=args.timeout,
                             threads=args.threads, log=log, results_path=json_path, truth=not args.no_truth)
    env = environment("cpu", argv=["--long-train"] + [str(n) for n in lengths])
    env.update(cap_gb=args.cap_gb, elapsed_s=round(time.perf_counter() - start, 1), beta=BETA, ref_noise=REF_NOISE)
    table = markdown(records, args.cap_gb)
    with open(json_path, "w") as f:
        json.dump(dict(environment=env, records=records), f, indent=1)
    with open(os.path.join(out_dir, "long_train.md"), "w") as f:
        f.write(table + "\n")
    if not args.no_plots:
        plot(records, os.path.join(out_dir, "long_train.png"), args.cap_gb)
    print(table)
    log(f"wrote {json_path}, long_train.md in {env['elapsed_s']} s")
    return 1 if any(r["status"] in ("error", "timeout") for r in records) else 0


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    sys.exit(child(json.loads(sys.argv[2]), sys.argv[3]))
