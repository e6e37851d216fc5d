"""Context parallelism (one sequence's tokens over 2 or 3 gloo processes) == one process on the same global batch.

Each test launches `torchrun --standalone` on this file (the worker half at the bottom). Every worker builds the same
global inputs, computes the one-process result on the whole batch itself (no group), then its own share through the
context-parallel path, and compares:
- attention alone (prefopt/parallel/attention.py) against SDPA on the whole sequences: outputs and the query / key /
  value gradients of its tokens, for padded rows (right padding, left padding with a hole), packed rows of uneven
  lengths (some slices empty at 3 ranks), grouped KV heads, the contiguous and the balanced layout;
- a tiny Llama through the HF integration (prefopt/integrations/context_parallel.py): per-sequence log-probs, the
  fused DPO loss and its metrics (`sequence_parallel_group`), and every parameter gradient summed over the group,
  padded and padding-free, uneven lengths.
Errors are max |a - b| / max |b| per tensor (metrics: |a - b| / max(|b|, 1)); bounds 1e-5 in float32 and 1e-10 in
float64 (the one-process run itself differs from float64 truth by ~1e-7 relative in float32: the split changes the
summation order of the attention and of the sums, nothing else). bfloat16 attention: its error against float64 at most
2x that of one-process bfloat16 SDPA.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from tests._probes import SquareTensors
from tests._torchrun import torchrun

BOUND = {"float32": 1e-5, "float64": 1e-10}
# bfloat16 attention: error against float64 at most 2x that of one-process bfloat16 SDPA (measured: <= 1.0, the
# output's single rounding; the split widens each block to float32 and rounds once)
BF16_BUDGET = 2.0


def _run(nproc, mode, tmp_path, timeout=300):
    torchrun([__file__, mode, str(tmp_path / "report.json")], tmp_path, nproc=nproc, timeout=timeout)
    with open(tmp_path / "report.json") as f:
        return json.load(f)


def _check(report):
    assert report["rows"], "no case ran"
    bad = [row for row in report["rows"] if not max((v for k, v in row.items() if k.endswith("_rel")), default=0.0)
           < BOUND.get(row["dtype"], 1.0)]
    bad += [row for row in report["rows"] if not max((v for k, v in row.items() if k.endswith("_budget")),
                                                     default=0.0) <= BF16_BUDGET]
    print(json.dumps(report["worst"], indent=1))
    assert not bad, json.dumps(bad[:5], indent=1)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_split_attention_and_model_match_one_process(nproc, tmp_path):
    report = _run(nproc, "split", tmp_path)
    cases = {(row["what"], row["layout"]) for row in report["rows"]}
    assert cases >= {("attention", "padded"), ("attention", "padded_holes"), ("attention", "packed"),
                     ("model", "padded"), ("model", "packed")}
    assert {row["balanced"] for row in report["rows"]} == {False, True}
    assert {row["dtype"] for row in report["rows"]} == {"float32", "float64", "bfloat16"}
    model_rows = [row for row in report["rows"] if row["what"] == "model"]
    assert all(row["grads"] >= 10 for row in model_rows)  # every parameter of the tiny Llama
    probe = [row for row in report["rows"] if row["what"] == "probe"]
    assert probe and all(row["square_tensors"] == 0 for row in probe), probe   # no [T, T]-like tensor anywhere
    _check(report)


@pytest.mark.slow
def test_trl_context_parallel_trainer_matches_the_dropin_in_one_process(tmp_path):
    """ContextParallelDPOTrainer.train() on 2 ranks (accelerate's DDP, 2 rows per rank, each batch split over both)
    == PrefoptDPOTrainer.train() in one process on the same 2 batches of 2 rows per step (gradient accumulation 2:
    the sft term is a token mean per batch, as under DDP): 3 logged steps, with the options whose sums need the group
    (the sft NLL term, WPO weights, LD-DPO positions)."""
    pytest.importorskip("trl")
    torchrun([__file__, "trl", str(tmp_path / "report.json")], tmp_path)
    with open(tmp_path / "report.json") as f:
        split = json.load(f)
    one = _trl_history(str(tmp_path / "one"), per_device=2, accumulation=2)
    assert len(one) == len(split) == 3 and one[0]["loss"] != one[2]["loss"]
    for a, b in zip(split, one):
        assert sorted(a) == sorted(b)
        for key in b:
            # abs: rewards at step 1 are rounding noise (~1e-8) of policy == reference
            assert a[key] == pytest.approx(b[key], rel=REL, abs=1e-6), key
    assert {"logps/chosen", "rewards/margins", "entropy", "num_tokens", "grad_norm"} <= set(one[0])


def _trl_history(output_dir, per_device, accumulation=1, group=None):
    """3 logged steps of the TRL drop-in on a tiny Llama: PrefoptDPOTrainer, or ContextParallelDPOTrainer over
    `group`."""
    import copy
    import warnings

    import trl

    from prefopt.integrations.tiny import all_words, build_tokenizer, preference_dataset, tiny_llama_config, tiny_model
    from prefopt.integrations.trl import PrefoptDPOTrainer

    tok = build_tokenizer([" ".join(all_words())], vocab_size=48)
    data = preference_dataset(16, seed=3)
    model = tiny_model(tiny_llama_config(48, hidden_size=16, heads=2, initializer_range=0.1), seed=5,
                       attn_implementation="sdpa")
    args = trl.DPOConfig(output_dir=output_dir, per_device_train_batch_size=per_device, max_steps=3, logging_steps=1,
                         gradient_accumulation_steps=accumulation,
                         learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, save_strategy="no", max_length=32,
                         disable_tqdm=True, dataloader_num_workers=0, bf16=False, loss_type=["sigmoid", "sft"],
                         loss_weights=[1.0, 0.5], use_weighting=True, ld_alpha=0.5)
    kwargs = dict(model=model, args=args, train_dataset=data, processing_class=tok, ref_model=copy.deepcopy(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if group is None:
            trainer = PrefoptDPOTrainer(**kwargs)
        else:
            from prefopt.integrations.trl_context_parallel import ContextParallelDPOTrainer
            trainer = ContextParallelDPOTrainer(context_parallel_group=group, **kwargs)
        trainer.train()
    keep = ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected",
            "rewards/margins", "rewards/accuracies", "entropy", "num_tokens", "logits/chosen", "mean_token_accuracy")
    return [{k: float(h[k]) for k in keep if k in h} for h in trainer.state.log_history if "loss" in h]


# ---- trainer --context_parallel --------------------------------------------------------------------------------
# AdamW's epsilon is raised from 1e-8 as in tests/test_fsdp.py: with 1e-8 an entry whose gradient is rounding noise
# moves by +-lr whatever its sign, so a changed summation order shows from step 2 on (Adam's conditioning, not the
# split's).
TRAIN = ["--max_steps", "3", "--logging_steps", "1", "--disable_tqdm", "--warmup_ratio", "0",
         "--model_config", '{"hidden_size": 32, "num_key_value_heads": 2}', "--adam_epsilon", "1e-3"]
REL = 1e-5   # float32 trainer runs: the bound of tests/test_fsdp.py


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _one_process(tmp_path, monkeypatch, name, **settings):
    from prefopt.trainer import TrainConfig, train
    from prefopt.trainer.loop import GRADS_ENV
    monkeypatch.setenv(GRADS_ENV, str(tmp_path / f"{name}-grads"))
    cfg = TrainConfig(max_steps=3, logging_steps=1, disable_tqdm=True, warmup_ratio=0.0, adam_epsilon=1e-3,
                      model_config={"hidden_size": 32, "num_key_value_heads": 2}, output_dir=str(tmp_path / name),
                      **settings)
    train(cfg)
    return _metrics(tmp_path / name)


def _compare_runs(split_dir, split_grads, one, one_grads):
    two = _metrics(split_dir)
    assert len(one) == len(two) == 3
    assert one[0]["loss"] != one[2]["loss"]  # the model moved: steps 2 and 3 test the updates too
    for a, b in zip(two, one):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "grad_norm"):
            # abs: at step 1 the rewards are rounding noise (~1e-8) of policy == reference
            assert a[key] == pytest.approx(b[key], rel=REL, abs=1e-6), key
    for step in (1, 2, 3):
        g1, g2 = torch.load(one_grads / f"grads-{step}.pt"), torch.load(split_grads / f"grads-{step}.pt")
        assert sorted(g1) == sorted(g2) and len(g1) >= 10
        for name in g1:
            assert _rel(g2[name], g1[name]) < REL, (step, name)


@pytest.mark.slow
def test_trainer_context_parallel_matches_one_process_and_resumes(tmp_path, monkeypatch):
    """2 ranks, padded batches: stopped after step 2, resumed from its checkpoint; == one process over 3 steps."""
    from prefopt.trainer.loop import GRADS_ENV, STOP_ENV
    out, grads = tmp_path / "split", tmp_path / "split-grads"
    common = ["-m", "prefopt", "train", "--context_parallel", "2", "--per_device_train_batch_size", "4",
              "--save_steps", "1", "--output_dir", str(out), *TRAIN]
    first = torchrun(common, tmp_path, env_extra={GRADS_ENV: str(grads), STOP_ENV: "2"})
    assert "context parallel 2 x data parallel 1" in first.stdout
    second = torchrun(common + ["--resume"], tmp_path, env_extra={GRADS_ENV: str(grads)})
    assert "resuming at step 2" in second.stdout
    one = _one_process(tmp_path, monkeypatch, "one", per_device_train_batch_size=4)
    _compare_runs(out, grads, one, tmp_path / "one-grads")
    assert (out / "checkpoint-3" / "model.safetensors").is_file() and (out / "model").is_dir()


@pytest.mark.slow
def test_trainer_balanced_context_parallel_with_fsdp_padding_free_matches_one_process(tmp_path, monkeypatch):
    """2 ranks sharding the model (--fsdp) and splitting the packed rows (--context_parallel 2, the balanced layout)
    at once."""
    from prefopt.trainer.loop import GRADS_ENV
    out, grads = tmp_path / "split", tmp_path / "split-grads"
    torchrun(["-m", "prefopt", "train", "--context_parallel", "2", "--context_parallel_balanced", "--fsdp",
              "--padding_free",
              "--per_device_train_batch_size", "2", "--output_dir", str(out), *TRAIN], tmp_path,
             env_extra={GRADS_ENV: str(grads)})
    one = _one_process(tmp_path, monkeypatch, "one", per_device_train_batch_size=2, padding_free=True)
    _compare_runs(out, grads, one, tmp_path / "one-grads")
    assert (out / "checkpoint-3" / "sharded" / ".metadata").is_file()


def test_context_parallel_settings_are_checked_before_anything_runs(tmp_path):
    from prefopt.trainer import TrainConfig, Trainer
    from prefopt.trainer.config import PrefoptInputError
    from prefopt.trainer.context_parallel import ContextParallel, check_model
    from prefopt.trainer.model import ModuleAdapter
    with pytest.raises(PrefoptInputError, match="divisible"):
        Trainer(TrainConfig(context_parallel=2, output_dir=str(tmp_path / "run")))    # one process
    with pytest.raises(PrefoptInputError, match="divisible"):
        ContextParallel(2, 0, 3)
    with pytest.raises(PrefoptInputError, match="context_parallel"):
        TrainConfig(context_parallel=0)
    with pytest.raises(PrefoptInputError, match="ld_alpha"):
        TrainConfig(context_parallel=2, context_parallel_balanced=True, ld_alpha=0.5)
    with pytest.raises(PrefoptInputError, match="needs context_parallel > 1"):
        TrainConfig(context_parallel_balanced=True)

    class Protocol(torch.nn.Module):
        def hidden_states(self, batch):
            return batch["input_ids"]

        def output_head(self):
            return torch.zeros(3, 2), None

    with pytest.raises(PrefoptInputError, match="context_parallel = True"):
        check_model(ModuleAdapter(Protocol()), 2)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# worker (run by torchrun)
# ---------------------------------------------------------------------------------------------------------------
def _rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-300))


def _dense_mask(segments):
    """[B, T, T] bool: same segment, causal, real tokens (the one-process truth may materialise it: tiny T)."""
    seg = segments
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    return same & torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool).tril()


def _global_attention(q, k, v, weights, segments, dtype):
    """SDPA over the whole rows with the dense mask, in `dtype`: output and q / k / v gradients."""
    real = segments >= 0
    leaf = [t.to(dtype).clone().requires_grad_(True) for t in (q, k, v)]
    mask = _dense_mask(segments)
    mask = mask | ~real[:, :, None] & torch.eye(segments.shape[1], dtype=torch.bool)  # padding sees itself (no NaN)
    full = torch.nn.functional.scaled_dot_product_attention(*leaf, attn_mask=mask[:, None], scale=0.37,
                                                            enable_gqa=True)
    full = full * real[:, None, :, None]
    (full * weights.to(dtype)).sum().backward()
    return [full] + [t.grad for t in leaf]


def _attention_case(split_fn, segments, dtype, group, heads=4, kv_heads=2, dim=8):
    """Errors of the split attention against SDPA on the whole rows: relative (float32 / float64), or for bfloat16
    the ratio of its error to that of one-process bfloat16 SDPA, both against float64 (the error budget)."""
    from prefopt.parallel.attention import context_attention
    B, T = segments.shape
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, heads, T, dim, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, kv_heads, T, dim, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, kv_heads, T, dim, generator=gen, dtype=torch.float64).to(dtype)
    weights = torch.randn(B, heads, T, dim, generator=gen, dtype=torch.float64).to(dtype)
    truth = _global_attention(q, k, v, weights, segments, torch.float64 if dtype == torch.bfloat16 else dtype)
    split = split_fn()
    local = [split.shard(t, dim=2).detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = context_attention(*local, split, scale=0.37)
    (out * split.shard(weights, dim=2)).sum().backward()
    mine = [out] + [t.grad for t in local]
    names = ["out_rel", "grad_q_rel", "grad_k_rel", "grad_v_rel"]
    if dtype != torch.bfloat16:
        return {name: _rel(m, split.shard(t, dim=2)) for name, m, t in zip(names, mine, truth)}
    # bfloat16: the split's error relative to one-process bfloat16 SDPA's (BF16_BUDGET)
    same = _global_attention(q, k, v, weights, segments, torch.bfloat16)
    return {name.replace("_rel", "_budget"): _rel(m, split.shard(t, dim=2)) / _rel(split.shard(o, dim=2),
                                                                                 split.shard(t, dim=2))
            for name, m, t, o in zip(names, mine, truth, same)}


def _attention_rows(group, rows):
    from prefopt.parallel.context import split_packed, split_padded
    B, T = 3, 13
    lengths = torch.tensor([13, 9, 4])
    right = (torch.arange(T)[None] < lengths[:, None])
    holes = right.clone()
    holes[1, :3] = False                       # left padding
    holes[2, 1] = False                        # a hole inside a row (prefopt_sdpa supports it too)
    holes[2, 4:9] = True
    packed_lengths = [11, 2, 7, 5, 1]          # 2 and 1 tokens over 3 ranks leave slices empty
    cu = torch.tensor([0] + packed_lengths).cumsum(0)
    packed_segments = torch.repeat_interleave(torch.arange(len(packed_lengths)), torch.tensor(packed_lengths))[None]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for balanced in (False, True):
            cases = {
                "padded": (lambda m=right: split_padded(group, m.long(), balanced=balanced),
                           torch.where(right, 0, -1)),
                "padded_holes": (lambda m=holes: split_padded(group, m.long(), balanced=balanced),
                                 torch.where(holes, 0, -1)),
                "packed": (lambda: split_packed(group, cu, balanced=balanced), packed_segments),
            }
            for layout, (make, segments) in cases.items():
                errs = _attention_case(make, segments, dtype, group)
                rows.append({"what": "attention", "layout": layout, "balanced": balanced,
                             "dtype": str(dtype).split(".")[-1], **errs})


def _model_rows(group, rows):
    """A tiny Llama (grouped KV heads): logps, fused loss, metrics, every parameter gradient."""
    import prefopt
    from prefopt.integrations import context_parallel as cp
    from prefopt.integrations.tiny import tiny_llama_config, tiny_model
    from prefopt.integrations.transformers import sequence_logps, shift_labels

    V, P = 61, 2
    lengths = [17, 12, 9, 14]                  # chosen, chosen, rejected, rejected: uneven, none divisible by 2 or 3
    prompt = 4
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(4, V, (n,), generator=gen) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(2 * P, T, dtype=torch.long)
    mask = torch.zeros(2 * P, T, dtype=torch.long)
    comp = torch.zeros(2 * P, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)], comp[i, prompt:len(s)] = s, 1, 1
    packed_ids = torch.cat(seqs)[None]
    packed_pos = torch.cat([torch.arange(n) for n in lengths])[None]
    packed_comp = torch.cat([(torch.arange(n) >= prompt).long() for n in lengths])[None]
    ref = torch.tensor([-31.0, -22.5, -19.0, -27.25], dtype=torch.float64)   # precomputed reference sums
    for dtype in (torch.float32, torch.float64):
        base = tiny_model(tiny_llama_config(V, hidden_size=32, layers=2, heads=4, num_key_value_heads=2), seed=3,
                          dtype=dtype, attn_implementation="sdpa")
        for layout in ("padded", "packed"):
            for balanced in (False, True):
                if layout == "packed":
                    inputs = dict(input_ids=packed_ids, attention_mask=None, completion_mask=packed_comp,
                                  position_ids=packed_pos)
                else:
                    inputs = dict(input_ids=ids, attention_mask=mask, completion_mask=comp, position_ids=None)

                def loss_of(model, logps_fn, **kw):
                    logps, lengths_ = logps_fn(model, inputs["input_ids"], inputs["attention_mask"],
                                               inputs["completion_mask"], position_ids=inputs["position_ids"], **kw)
                    loss, metrics = prefopt.preference_loss(logps[:P], logps[P:], ref[:P].to(logps.dtype),
                                                            ref[P:].to(logps.dtype), beta=0.1)
                    return logps, lengths_, loss, metrics

                import copy
                one = copy.deepcopy(base)
                logps1, len1, loss1, met1 = loss_of(one, sequence_logps)
                loss1.backward()
                split_model = copy.deepcopy(base)
                logps2, len2, loss2, met2 = loss_of(split_model, cp.sequence_logps, group=group, balanced=balanced)
                loss2.backward()
                grads = dict(split_model.named_parameters())
                worst, compared = 0.0, 0
                for name, p in one.named_parameters():
                    g = grads[name].grad.detach().clone()
                    torch.distributed.all_reduce(g, group=group)     # partial gradients: summed over the group
                    worst = max(worst, _rel(g, p.grad))
                    compared += 1
                met_rel = max(float((met2[k].double() - met1[k].double()).abs() / max(1.0, abs(float(met1[k]))))
                              for k in met1)
                rows.append({"what": "model", "layout": layout, "balanced": balanced,
                             "dtype": str(dtype).split(".")[-1], "logps_rel": _rel(logps2, logps1),
                             "loss_rel": _rel(loss2, loss1), "metrics_rel": met_rel, "grad_rel": worst,
                             "grads": compared, "lengths_equal": bool(torch.equal(len1, len2))})
                assert torch.equal(len1, len2)
    del shift_labels
    rows.append(_probe_row(group, base_config=tiny_llama_config(V, hidden_size=32, layers=2, heads=4,
                                                                num_key_value_heads=2)))


def _probe_row(group, base_config):
    """A packed pair long enough that every local token count exceeds the model's widths (32 hidden, 64 MLP, 61
    vocabulary): no op of the split forward, backward and checkpointed recomputation creates a tensor with two
    token-sized dimensions."""
    from prefopt.integrations import context_parallel as cp
    from prefopt.integrations.tiny import tiny_model
    model = tiny_model(base_config, seed=3, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lengths = [260 + 13, 260 + 5]   # half a share is > 64 (the widest model dimension) at 2 and 3 ranks
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, base_config.vocab_size, (1, sum(lengths)), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    local_tokens = sum(lengths) // torch.distributed.get_world_size()
    with SquareTensors(local_tokens // 2) as probe:   # half a share: not even a [T_r / 2, T_r / 2] block
        logps, _ = cp.sequence_logps(model, ids, None, torch.ones_like(ids), position_ids=pos, group=group)
        logps.sum().backward()
    return {"what": "probe", "layout": "packed", "balanced": False, "dtype": "float32",
            "square_tensors": len(probe.found), "square_examples": probe.found[:3]}


def _worker(mode, out):
    import torch.distributed as dist
    from prefopt.parallel import destroy_process_group
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    group = dist.new_group(list(range(dist.get_world_size())))
    rows = []
    try:
        if mode == "trl":
            history = _trl_history(os.path.join(os.path.dirname(out), "split"), per_device=2, group=group)
            if dist.get_rank() == 0:
                with open(out, "w") as f:
                    json.dump(history, f)
            return
        if mode == "split":
            _attention_rows(group, rows)
            _model_rows(group, rows)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, rows)        # each rank checked its own tokens: report the worst rank
        rows = [{k: max(r[k] for r in same) if k.endswith(("_rel", "_budget")) or k == "square_tensors" else v
                 for k, v in same[0].items()} for same in zip(*every)]
        worst = {}
        for row in rows:
            key = f"{row['what']}/{row['dtype']}"
            worst[key] = max(worst.get(key, 0.0), max((v for k, v in row.items() if k.endswith(("_rel", "_budget"))),
                                                      default=0))
        if dist.get_rank() == 0:
            with open(out, "w") as f:
                json.dump({"rows": rows, "worst": worst}, f)
    finally:
        destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
