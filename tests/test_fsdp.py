"""FSDP2 (`fully_shard`) with 2 gloo processes on CPU == one unsharded process on the same global input.

Each check launches `torchrun --nproc_per_node=2` on this file (the worker half at the bottom). A worker
builds the same tiny model on every rank, computes the unsharded reference on the whole global batch, then
shards a copy (`fully_shard` per decoder layer + root), runs its half of the batch through it and compares
log-probs (all-gathered), losses and gradients (`DTensor.full_tensor()`) with the reference. Float32 throughout;
the bound is 1e-5 relative (max |a - b| / max |b| per tensor); the worker prints the measured maxima.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

from tests._torchrun import torchrun  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = 1e-5


def _torchrun(args, tmp_path, timeout=240, env_extra=None):
    return torchrun(args, tmp_path, timeout=timeout, env_extra=env_extra)


def _report(tmp_path):
    with open(tmp_path / "report.json") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_hf_sequence_logps_fsdp2_matches_one_process(tmp_path):
    _torchrun([__file__, "hf", str(tmp_path / "report.json")], tmp_path)
    rep = _report(tmp_path)
    print(rep)
    assert rep["grads_compared"] >= 10  # every parameter of the tiny Llama (embeddings, layers, norm, head)
    assert rep["logps_rel"] < REL and rep["loss_rel"] < REL and rep["grad_rel"] < REL
    assert rep["hidden_rel"] < REL
    assert rep["generate_same"]


@pytest.mark.slow
def test_trl_dropin_step_fsdp2_matches_one_process(tmp_path):
    pytest.importorskip("trl")
    _torchrun([__file__, "trl", str(tmp_path / "report.json")], tmp_path)
    rep = _report(tmp_path)
    print(rep)
    assert rep["sharded_type"].startswith("FSDP") and rep["grads_compared"] >= 10
    assert rep["grad_norm"] > 1e-3  # a real gradient is compared
    assert rep["logps_rel"] < REL and rep["loss_rel"] < REL and rep["grad_rel"] < REL
    assert rep["metrics_rel"] < REL and "logps/chosen" in rep["metrics"]


# ---- trainer --fsdp ---------------------------------------------------------------------------------------------
# AdamW's epsilon is raised from 1e-8 in these runs: with 1e-8 an entry whose gradient is rounding noise (~1e-9)
# moves by +-lr whatever its sign, so any change of summation order (DDP does the same) shows up as 1e-4 relative
# gradient differences from step 2 on; that is Adam's conditioning, not the sharding's.
ADAM_EPS = 1e-3
TRAIN = ["--max_steps", "3", "--logging_steps", "1", "--disable_tqdm", "--save_steps", "2", "--warmup_ratio", "0",
         "--model_config", '{"hidden_size": 32}', "--adam_epsilon", str(ADAM_EPS)]


def _train_fsdp(tmp_path, out, *extra, env_extra=None):
    return _torchrun(["-m", "prefopt", "train", "--fsdp", "--per_device_train_batch_size", "1",
                      "--gradient_accumulation_steps", "2", "--output_dir", str(out), *TRAIN, *extra], tmp_path,
                     env_extra=env_extra)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """An uninterrupted 3-step --fsdp run (2 processes x 1 row x 2 accumulated micro-batches), gradients dumped."""
    from prefopt.trainer.loop import GRADS_ENV

    root = tmp_path_factory.mktemp("fsdp_run")
    proc = _train_fsdp(root, root / "run", env_extra={GRADS_ENV: str(root / "grads")})
    assert "world 2" in proc.stdout
    return root


@pytest.mark.slow
def test_trainer_fsdp_matches_one_process(fsdp_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from prefopt.trainer import TrainConfig, train
    from prefopt.trainer.loop import GRADS_ENV

    monkeypatch.setenv(GRADS_ENV, str(tmp_path / "grads"))
    cfg = TrainConfig(max_steps=3, logging_steps=1, disable_tqdm=True, save_steps=0, warmup_ratio=0.0,
                      model_config={"hidden_size": 32}, adam_epsilon=ADAM_EPS,
                      per_device_train_batch_size=4, output_dir=str(tmp_path / "one"))
    train(cfg)
    one, two = _metrics(tmp_path / "one"), _metrics(fsdp_run / "run")
    assert len(one) == len(two) == 3
    assert one[0]["loss"] != one[2]["loss"]  # the model moved: steps 2 and 3 test the sharded optimizer step too
    for a, b in zip(two, one):  # (margins are differences of near-equal rewards: compared through their parts)
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "grad_norm"):
            # abs: at step 1 the rewards are rounding noise (~1e-8) of policy == reference, not a signal
            assert a[key] == pytest.approx(b[key], rel=REL, abs=1e-6), key
    for step in (1, 2, 3):
        g1 = torch.load(tmp_path / "grads" / f"grads-{step}.pt")
        g2 = torch.load(fsdp_run / "grads" / f"grads-{step}.pt")
        assert sorted(g1) == sorted(g2) and len(g1) >= 10
        for name in g1:
            assert _rel(g2[name], g1[name]) < REL, (step, name)
    # sharded checkpoint, no leftovers; the final export is a full (unsharded) model
    ckpt = fsdp_run / "run" / "checkpoint-2"
    assert (ckpt / "sharded" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    assert not [p for p in os.listdir(fsdp_run / "run") if p.startswith(".tmp")]
    w1, w2 = load_file(tmp_path / "one" / "model" / "model.safetensors"), \
        load_file(fsdp_run / "run" / "model" / "model.safetensors")
    assert sorted(w1) == sorted(w2) and all(w1[k].shape == w2[k].shape for k in w1)
    # values too: each weight is its initial value plus 3 AdamW steps whose (normalised) updates come from gradients
    # within REL of each other (checked above), so the exports agree within REL of each weight's scale
    for k in w1:
        assert _rel(w2[k], w1[k]) < REL, k


@pytest.mark.slow
def test_trainer_fsdp_resume_reproduces_uninterrupted_run(fsdp_run, tmp_path):
    from safetensors.torch import load_file

    from prefopt.trainer.loop import STOP_ENV

    out = tmp_path / "run"
    _train_fsdp(tmp_path, out, env_extra={STOP_ENV: "2"})
    assert [r["step"] for r in _metrics(out)] == [1, 2] and not (out / "model").exists()
    proc = _train_fsdp(tmp_path, out, "--resume", "latest")
    assert "resuming at step 2" in proc.stdout
    resumed, full = _metrics(out), _metrics(fsdp_run / "run")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(resumed, full):
        for key in ("loss", "logps/chosen", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    w_res, w_full = load_file(out / "model" / "model.safetensors"), \
        load_file(fsdp_run / "run" / "model" / "model.safetensors")
    for k in w_full:
        assert _rel(w_res[k], w_full[k]) < 1e-6, k


def test_fsdp_needs_several_processes(tmp_path):
    from prefopt.trainer import PrefoptInputError, TrainConfig, Trainer

    with pytest.raises(PrefoptInputError, match="torchrun"):
        Trainer(TrainConfig(fsdp=True, max_steps=1, output_dir=str(tmp_path / "run"), model_config={"hidden_size": 32}))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# workers (run by torchrun on this file)
# ---------------------------------------------------------------------------------------------------------------
def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _shard(model):
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _tiny_llama():
    from prefopt.integrations.tiny import tiny_llama_config, tiny_model
    return tiny_model(tiny_llama_config(vocab_size=61, hidden_size=16, layers=2, heads=2), seed=3)


def _global_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 61, (4, 9), generator=g)
    attn = torch.ones(4, 9, dtype=torch.long)
    attn[1, 7:] = 0
    attn[3, 6:] = 0
    comp = attn.clone()
    comp[:, :3] = 0
    return ids, attn, comp


def _worker_hf(out_path):
    """HF integration: sequence_logps / last_hidden_states under FSDP2 == one process; generate unchanged."""
    import copy

    import torch.distributed as dist

    from prefopt.integrations.transformers import last_hidden_states, sequence_logps

    rank, world = dist.get_rank(), dist.get_world_size()
    ids, attn, comp = _global_batch()
    weights = torch.tensor([1.0, -0.5, 2.0, 0.75])
    model = _tiny_llama()
    sharded = _shard(copy.deepcopy(model))
    # reference: one process, the whole batch
    ref, _ = sequence_logps(model, ids, attn, comp)
    ref_loss = (ref * weights).sum()
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    ref_hidden = last_hidden_states(model, ids, attn).detach()
    # sharded: rank r takes rows [2r, 2r + 2); FSDP averages gradients over ranks, so scale by world
    rows = slice(2 * rank, 2 * rank + 2)
    got, _ = sequence_logps(sharded, ids[rows], attn[rows], comp[rows])
    loss = (got * weights[rows]).sum()
    (loss * world).backward()
    got_all = [torch.zeros_like(got) for _ in range(world)]
    dist.all_gather(got_all, got.detach())
    got_all = torch.cat(got_all)
    loss_all = loss.detach().clone()
    dist.all_reduce(loss_all)
    grad_rel, compared = 0.0, 0
    for name, p in sharded.named_parameters():
        grad_rel = max(grad_rel, _rel(_full(p.grad), ref_grads[name]))
        compared += 1
    hidden = last_hidden_states(sharded, ids[rows], attn[rows]).detach()
    # the model's own forward and generation are unchanged by the patched forward
    with torch.no_grad():
        gen_ref = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
        gen = sharded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    report = dict(logps_rel=_rel(got_all, ref), loss_rel=_rel(loss_all, ref_loss), grad_rel=grad_rel,
                  grads_compared=compared, hidden_rel=_rel(hidden, ref_hidden[rows]),
                  generate_same=bool(torch.equal(gen, gen_ref)))
    _write_worst_over_ranks(report, out_path)


def _write_worst_over_ranks(report, out_path):
    """Rank 0 writes each entry's worst value over the ranks (each rank compares its own rows and gradients): the
    largest error, the fewest tensors compared, and a flag only if it holds on every rank."""
    import torch.distributed as dist

    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    worst = {}
    for key, value in report.items():
        values = [r[key] for r in reports]
        worst[key] = (all(values) if isinstance(value, bool) else min(values) if key == "grads_compared"
                      else max(values) if key.endswith("_rel") else value)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(worst, f)
        print(worst, flush=True)


def _worker_trl(out_path):
    """PrefoptDPOTrainer's loss step with FSDP2-sharded policy and reference == the same step unsharded.

    accelerate turns FSDP on only for accelerator devices (on CPU it picks DDP), so the models are sharded here
    as accelerate's FSDP2 preparation does (`fully_shard` per decoder layer, then the root) and the drop-in's
    `compute_loss` (what `training_step` calls) runs on each rank's half of one padded global batch.
    """
    import copy
    import warnings

    import torch.distributed as dist
    import trl

    from prefopt.integrations.tiny import all_words, build_tokenizer, preference_dataset, tiny_llama_config, tiny_model
    from prefopt.integrations.trl import PrefoptDPOTrainer

    rank, world = dist.get_rank(), dist.get_world_size()
    tok = build_tokenizer([" ".join(all_words())], vocab_size=48)
    data = preference_dataset(8, seed=3)
    model = tiny_model(tiny_llama_config(48, hidden_size=16, heads=2, initializer_range=0.1), seed=5)
    args = trl.DPOConfig(output_dir=os.path.dirname(out_path), per_device_train_batch_size=4, max_steps=1,
                         report_to=[], use_cpu=True, seed=0, save_strategy="no", max_length=32, disable_tqdm=True,
                         dataloader_num_workers=0, bf16=False)  # float32 (TRL's DPOConfig defaults to bf16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PrefoptDPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                    ref_model=copy.deepcopy(model))
    policy, reference = trainer.model, trainer.ref_model
    policy.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])  # [chosen x 4; rejected x 4]
    batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}

    def metrics():
        return {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(("logps/", "rewards/m"))}

    # unsharded: the whole global batch
    ref_loss = trainer.compute_loss(policy, batch)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in policy.named_parameters()}
    ref_metrics = metrics()
    with torch.no_grad():
        ref_tok = trainer._prefopt_forward(policy, batch).log_probs
    # sharded: rank r takes pairs 2r, 2r + 1 (its chosen and rejected rows of the same padded batch)
    trainer.model = sharded = _shard(copy.deepcopy(policy))
    trainer.ref_model = _shard(copy.deepcopy(reference))
    sharded.zero_grad(set_to_none=True)
    rows = torch.tensor([2 * rank, 2 * rank + 1, 4 + 2 * rank, 4 + 2 * rank + 1])
    local = {k: v[rows] for k, v in batch.items()}
    loss = trainer.compute_loss(sharded, local)
    loss.backward()  # the loss is a mean over pairs: FSDP's average over ranks gives the global mean's gradient
    # gathered now: a later forward leaves the root's parameters unsharded (FSDP2 keeps the root gathered)
    grads = {n: _full(p.grad) for n, p in sharded.named_parameters()}
    got_metrics = metrics()
    with torch.no_grad():
        tok = trainer._prefopt_forward(sharded, local).log_probs
    parts = [torch.zeros_like(tok) for _ in range(world)]
    dist.all_gather(parts, tok)
    order = torch.cat([torch.tensor([2 * r, 2 * r + 1, 4 + 2 * r, 4 + 2 * r + 1]) for r in range(world)])
    tok_all = torch.empty_like(ref_tok)
    tok_all[order] = torch.cat(parts)
    loss_all = loss.detach().clone()
    dist.all_reduce(loss_all)
    grad_rel = max(_rel(g, ref_grads[n]) for n, g in grads.items())
    compared = len(grads)
    report = dict(logps_rel=_rel(tok_all, ref_tok), loss_rel=_rel(loss_all / world, ref_loss), grad_rel=grad_rel,
                  grads_compared=compared,
                  metrics_rel=max(_rel(torch.tensor(got_metrics[k]), torch.tensor(ref_metrics[k]))
                                  for k in ref_metrics if abs(ref_metrics[k]) > 1e-6),
                  metrics=sorted(ref_metrics), sharded_type=type(sharded).__name__,
                  grad_norm=float(sum(float(g.double().pow(2).sum()) for g in ref_grads.values()) ** 0.5))
    _write_worst_over_ranks(report, out_path)


if __name__ == "__main__":
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        {"hf": _worker_hf, "trl": _worker_trl}[sys.argv[1]](*sys.argv[2:])
    finally:
        from prefopt.parallel import destroy_process_group
        destroy_process_group()
