"""prefopt.trainer: learning on the shipped data, exact resume, DDP (2 gloo processes), packing, precomputed
reference, KTO, protocol modules, PEFT reference, and the failures bad input must give."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from prefopt.trainer import PrefoptInputError, TrainConfig, Trainer, train
from prefopt.trainer import data as D
from prefopt.trainer.loop import STOP_ENV
from tests._torchrun import torchrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(max_steps=6, logging_steps=1, disable_tqdm=True, per_device_train_batch_size=4, save_steps=3,
             model_config={"hidden_size": 32}, learning_rate=3e-3, warmup_ratio=0.0)


def _run(out, **kw):
    cfg = dict(SMALL, output_dir=str(out))
    cfg.update(kw)
    return train(TrainConfig(**cfg))


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(run_dir):
    return [r["loss"] for r in _metrics(run_dir)]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "run"
    _run(out)
    return str(out)


# ---- learning ---------------------------------------------------------------------------------------------
def test_short_run_improves_accuracy_and_margin(tmp_path):
    summary = _run(tmp_path / "run", max_steps=16, per_device_train_batch_size=8, logging_steps=4, save_steps=0)
    hist = summary["history"]
    assert len(hist) == 4
    assert hist[-1]["rewards/accuracies"] > hist[0]["rewards/accuracies"]
    assert hist[-1]["rewards/accuracies"] >= 0.8
    assert hist[-1]["rewards/margins"] > hist[0]["rewards/margins"] > -1e-6
    assert hist[-1]["loss"] < hist[0]["loss"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "step", "epoch"):
        assert key in hist[-1], key
    run = tmp_path / "run"
    assert (run / "checkpoint-16" / "model.safetensors").is_file()
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "config.json").is_file()
    assert not [p for p in os.listdir(run) if p.startswith(".tmp")]


def test_first_step_is_log2(baseline):
    # policy == reference at step 1: sigmoid DPO loss is log 2, rewards 0
    first = _metrics(baseline)[0]
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


# ---- resume -------------------------------------------------------------------------------------------------
def test_resume_reproduces_uninterrupted_losses(tmp_path, baseline, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(STOP_ENV, "3")
    summary = _run(out)
    assert summary["interrupted"]
    assert sorted(os.listdir(out)) == ["checkpoint-3", "config.json", "metrics.jsonl"]
    monkeypatch.delenv(STOP_ENV)
    _run(out, resume="latest")
    resumed, full = _losses(out), _losses(baseline)
    assert len(resumed) == len(full) == 6
    assert resumed == pytest.approx(full, abs=1e-6)


def test_resume_from_explicit_checkpoint_dir(tmp_path, baseline, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(STOP_ENV, "4")  # runs past checkpoint-3 then "dies": steps 4 is logged, then redone
    _run(out)
    monkeypatch.delenv(STOP_ENV)
    _run(out, resume=str(out / "checkpoint-3"))
    assert _losses(out) == pytest.approx(_losses(baseline), abs=1e-6)


def test_resume_with_other_config_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(STOP_ENV, "3")
    _run(out)
    monkeypatch.delenv(STOP_ENV)
    before = sorted(os.listdir(out))
    with pytest.raises(PrefoptInputError, match=r"different config[\s\S]*beta"):
        Trainer(TrainConfig(**dict(SMALL, output_dir=str(out), resume="latest", beta=0.5)))
    assert sorted(os.listdir(out)) == before


def test_fresh_run_into_used_output_dir_is_refused(baseline):
    with pytest.raises(PrefoptInputError, match="already holds a run"):
        Trainer(TrainConfig(**dict(SMALL, output_dir=baseline)))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from prefopt.trainer import checkpoint as ckpt

    trainer = Trainer(TrainConfig(**dict(SMALL, output_dir=str(tmp_path / "run"))))
    os.makedirs(trainer.run_dir)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        trainer._save(1)
    assert os.listdir(trainer.run_dir) == []  # neither checkpoint-1 nor a .tmp dir
    assert ckpt.latest_checkpoint(trainer.run_dir) is None


# ---- equivalent paths -------------------------------------------------------------------------------------
def _spy_fused_loss(monkeypatch):
    """The layout of every batch the trainer's fused loss receives: "packed" (cu_seqlens) or "padded"."""
    import prefopt
    layouts = []
    real = prefopt.fused_linear_preference_loss

    def spy(hidden, weight, labels, **kwargs):
        layouts.append("padded" if kwargs.get("cu_seqlens") is None else "packed")
        return real(hidden, weight, labels, **kwargs)

    monkeypatch.setattr(prefopt, "fused_linear_preference_loss", spy)
    return layouts


def test_padding_free_matches_padded(tmp_path, baseline, monkeypatch):
    layouts = _spy_fused_loss(monkeypatch)
    _run(tmp_path / "run", padding_free=True)
    assert layouts == ["packed"] * 6  # the packed path ran, one micro-batch per step
    assert _losses(tmp_path / "run") == pytest.approx(_losses(baseline), abs=1e-5)


def test_precomputed_reference_matches_live_and_is_reused(tmp_path, baseline, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(STOP_ENV, "3")
    _run(out, precompute_ref_log_probs=True)
    cache = out / "ref_logps.pt"
    assert cache.is_file()
    stamp = os.path.getmtime(cache)
    monkeypatch.delenv(STOP_ENV)
    _run(out, precompute_ref_log_probs=True, resume="latest")
    assert os.path.getmtime(cache) == stamp  # reused, not recomputed
    assert _losses(out) == pytest.approx(_losses(baseline), abs=1e-5)


def test_gradient_accumulation_matches_big_batch(tmp_path):
    _run(tmp_path / "a", max_steps=3, save_steps=0, per_device_train_batch_size=4)
    _run(tmp_path / "b", max_steps=3, save_steps=0, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert _losses(tmp_path / "b") == pytest.approx(_losses(tmp_path / "a"), abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("per_rank", [["--per_device_train_batch_size", "2"],
                                      ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2"]],
                         ids=["batch2", "batch1x2-accumulated"])
def test_two_process_gloo_matches_one_process(tmp_path, per_rank):
    """torchrun --nproc_per_node=2 (gloo, CPU, DistributedDataParallel; with gradient accumulation: no_sync on
    the first micro-batch) == one process with the same global batch."""
    common = ["--max_steps", "3", "--logging_steps", "1", "--disable_tqdm", "--save_steps", "0",
              "--model_config", '{"hidden_size": 32}', "--warmup_ratio", "0"]
    _run(tmp_path / "one", max_steps=3, save_steps=0, per_device_train_batch_size=4)
    proc = torchrun(["-m", "prefopt", "train", *per_rank, "--output_dir", str(tmp_path / "two"), *common], tmp_path)
    assert "world 2" in proc.stdout
    two, one = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert len(two) == len(one) == 3
    for a, b in zip(two, one):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
        # An accuracy is the sign of each pair's margin; while the policy equals its reference (step 1) the
        # margins are rounding noise (~1e-8) whose sign depends on how the batch is split, so it is compared
        # only once the margins stand clear of that noise.
        if abs(b["rewards/margins"]) > 1e-4:
            assert a["rewards/accuracies"] == b["rewards/accuracies"]


# ---- other losses, data and models ---------------------------------------------------------------------------
def test_kto_rows_train(tmp_path):
    summary = _run(tmp_path / "run", dataset=D.DEFAULT_KTO_DATASET, loss_type="kto", max_steps=4, save_steps=0)
    hist = summary["history"]
    assert len(hist) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert "kl" in hist[-1] and "rewards/chosen" in hist[-1]
    assert hist[0]["loss"] == pytest.approx(0.5, abs=1e-5)  # 1 - sigmoid(0) at policy == reference


def test_kto_precomputed_matches_live(tmp_path):
    _run(tmp_path / "a", dataset=D.DEFAULT_KTO_DATASET, loss_type="kto", max_steps=3, save_steps=0)
    _run(tmp_path / "b", dataset=D.DEFAULT_KTO_DATASET, loss_type="kto", max_steps=3, save_steps=0,
         precompute_ref_log_probs=True)
    assert _losses(tmp_path / "b") == pytest.approx(_losses(tmp_path / "a"), abs=1e-5)


def test_paired_loss_with_kto_rows_is_refused(tmp_path):
    with pytest.raises(PrefoptInputError, match="unpaired rows"):
        Trainer(TrainConfig(**dict(SMALL, output_dir=str(tmp_path / "run"), dataset=D.DEFAULT_KTO_DATASET)))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def uneven_pairs(tmp_path_factory):
    """8 sorting pairs whose rejected completion is longer than the chosen one in half of them and shorter in the
    other half, so length normalisation (ipo, simpo) and LD-DPO's shared length change the numbers."""
    rows = []
    for i, digits in enumerate(["3142", "97531", "2718", "60221", "1414", "86420", "5772", "31337"]):
        chosen = "".join(sorted(digits)) + "."
        rejected = (digits + digits[:3] if i % 2 else digits[:2]) + "."
        rows.append(json.dumps({"prompt": f"sort:{digits}=", "chosen": chosen, "rejected": rejected}))
    return _write(tmp_path_factory.mktemp("uneven") / "pairs.jsonl", rows)


def _first_step_truth(out, options, loss_type="sigmoid", loss_weights=None, beta=0.1, rpo_alpha=None,
                      ld_alpha=None, use_weighting=False, **config):
    """The first step's loss and metrics, in float64, from the first micro-batch and the initial model (built from
    the seed as the run builds it; a Trainer that writes nothing) with an eager head (logits, log_softmax) and TRL's
    formulas (prefopt/losses/reference.py); and how far an fp32 run may be from them.

    Each token's fp32 log-prob z_label - lse is within eps32 (H (|z_label| + |lse|) + V) of the float64 one (an
    H-term GEMM, a V-term log-sum-exp); log sum p^2 likewise. The policy's and the reference's (the same values at
    step 1, computed apart) are separate inputs of the truth, and the allowance is sum |d truth / d input| x that
    input's allowance (first order), plus a few fp32 roundings of the result."""
    from prefopt.losses.reference import reference_cpo_loss, reference_dpo_loss
    trainer = Trainer(TrainConfig(**dict(SMALL, output_dir=str(out), loss_type=loss_type, loss_weights=loss_weights,
                                         beta=beta, rpo_alpha=rpo_alpha, ld_alpha=ld_alpha,
                                         use_weighting=use_weighting, **config)))
    (rows,) = trainer._indices(0)
    batch = trainer._batch(rows)
    with torch.no_grad():
        hidden = trainer.adapter.hidden_states(batch).double()
        weight, bias = trainer.adapter.output_head()
        logits = hidden @ weight.double().T + (0 if bias is None else bias.double())
    labels, pairs = batch["labels"], len(rows)
    mask = labels != -100
    log_softmax = logits.log_softmax(-1)
    z = logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    lse = logits.logsumexp(-1)
    eps32 = torch.finfo(torch.float32).eps
    allowance = eps32 * (hidden.shape[-1] * (z.abs() + lse.abs()) + logits.shape[-1])
    tok = torch.where(mask, log_softmax.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0).requires_grad_()
    ref_tok = tok.detach().clone().requires_grad_()
    log_sum_p2 = torch.logsumexp(2 * log_softmax, -1).requires_grad_()
    lengths = mask.sum(1).double()
    weights = mask.double()
    if ld_alpha is not None:  # LD-DPO: ld_alpha on the longer completion's tokens past the pair's shared length
        shared = torch.minimum(lengths[:pairs], lengths[pairs:]).repeat(2)[:, None]
        weights = torch.where(mask.cumsum(1) <= shared, 1.0, ld_alpha) * mask
    seq, ref = (tok * weights).sum(1), (ref_tok * weights).sum(1)
    chosen_nll = -(tok * mask).sum(1)[:pairs]
    if loss_type == "simpo":
        loss = reference_cpo_loss(seq[:pairs], seq[pairs:], loss_type="simpo", beta=beta,
                                  chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:])
    else:
        wpo = None
        if use_weighting:  # WPO: exp of the mean over completion tokens of log p - log sum p^2, chosen x rejected
            per_seq = (((tok - log_sum_p2) * mask).sum(1) / lengths).exp()
            wpo = per_seq[:pairs] * per_seq[pairs:]
        loss = reference_dpo_loss(seq[:pairs], seq[pairs:], ref[:pairs], ref[pairs:],
                                  loss_type=loss_type.split(",") if "," in loss_type else loss_type, beta=beta,
                                  loss_weights=loss_weights, chosen_lengths=lengths[:pairs],
                                  rejected_lengths=lengths[pairs:], chosen_nll=chosen_nll,
                                  nll_lengths=lengths[:pairs], rpo_alpha=rpo_alpha, policy_weights=wpo)
    grads = torch.autograd.grad(loss, (tok, ref_tok, log_sum_p2), allow_unused=True)
    error = sum(float((g.abs() * allowance).sum()) for g in grads if g is not None)
    loss = float(loss.detach())
    truth = {"loss": (loss, error + 8 * eps32 * abs(loss))}
    # the logged log-probs: per-sequence sums (simpo: means, as TRL's CPO trainer reports them)
    per = lengths if loss_type == "simpo" else torch.ones_like(lengths)
    sums, sum_errors = seq.detach() / per, (weights * allowance).sum(1) / per
    unweighted = (tok.detach() * mask).sum(1) / per
    for name, part in (("logps/chosen", slice(0, pairs)), ("logps/rejected", slice(pairs, None))):
        truth[name] = (float(sums[part].mean()), float(sum_errors[part].max()))
    return truth, {"logps/chosen": float(unweighted[:pairs].mean()), "logps/rejected": float(unweighted[pairs:].mean())}


LOSS_OPTIONS = [dict(loss_type="ipo"), dict(loss_type="simpo"), dict(rpo_alpha=1.0), dict(ld_alpha=0.5),
                dict(use_weighting=True), dict(loss_type="sigmoid,sft", loss_weights=[1.0, 0.5])]


@pytest.mark.parametrize("extra", LOSS_OPTIONS, ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
def test_loss_options_pin_the_first_step(tmp_path, uneven_pairs, extra):
    """The first step of each option equals its closed form on the initial model (policy == reference: ipo is
    1 / (4 beta^2), rpo log 2 + alpha NLL, sigmoid+sft log 2 + 0.5 NLL, WPO log 2 x the mean pair weight, simpo its
    length-averaged margin; LD-DPO's loss is log 2 whatever the weights, so its logged log-probs are pinned, and they
    differ from the unweighted ones), and the second step is finite."""
    summary = _run(tmp_path / "run", max_steps=2, save_steps=0, dataset=uneven_pairs, **extra)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])
    first = summary["history"][0]
    truth, unweighted = _first_step_truth(tmp_path / "truth", extra, dataset=uneven_pairs, **extra)
    for key, (want, allowed) in truth.items():
        assert abs(first[key] - want) <= allowed, (key, first[key], want, allowed)
    if "ld_alpha" in extra:
        for key in ("logps/chosen", "logps/rejected"):
            assert abs(unweighted[key] - truth[key][0]) > 10 * truth[key][1], key
    elif extra.get("loss_type") != "simpo":
        assert abs(first["loss"] - math.log(2)) > 10 * truth["loss"][1]  # the option changed the loss


class ProtocolLM(torch.nn.Module):
    """Not an HF model: just the two protocol methods."""

    def __init__(self, vocab_size, hidden=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, hidden)
        self.mix = torch.nn.GRU(hidden, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab_size)

    def hidden_states(self, batch):
        out, _ = self.mix(self.emb(batch["input_ids"]))
        return out

    def output_head(self):
        return self.head.weight, self.head.bias


def test_protocol_module_trains(tmp_path):
    tok = D.load_tokenizer()
    torch.manual_seed(0)
    model = ProtocolLM(tok.vocab_size)
    summary = train(TrainConfig(**dict(SMALL, output_dir=str(tmp_path / "run"), max_steps=8, save_steps=0,
                                       learning_rate=1e-2)), model=model)
    hist = summary["history"]
    assert hist[-1]["rewards/margins"] > 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_protocol_errors_are_clear():
    with pytest.raises(PrefoptInputError, match="hidden_states"):
        Trainer(TrainConfig(**SMALL), model=torch.nn.Linear(2, 2))


def test_peft_reference_is_base_with_adapter_disabled(tmp_path):
    peft = pytest.importorskip("peft")
    from prefopt.integrations.tiny import tiny_llama_config, tiny_model
    tok = D.load_tokenizer()
    base = tiny_model(tiny_llama_config(tok.vocab_size, hidden_size=32), seed=0)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    trainer = Trainer(TrainConfig(**dict(SMALL, output_dir=str(tmp_path / "run"), max_steps=3, save_steps=0,
                                         learning_rate=1e-2)), model=model)
    assert trainer.reference.kind == "peft"
    n_params = sum(p.numel() for p in trainer.params)
    assert n_params < sum(p.numel() for p in base.parameters()) // 5  # only LoRA weights train
    summary = trainer.train()
    assert summary["history"][0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert summary["history"][-1]["rewards/margins"] != 0.0


# ---- data ---------------------------------------------------------------------------------------------------
def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", ['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", '])
    with pytest.raises(PrefoptInputError, match=r"bad\.jsonl:2: malformed JSON"):
        D.load_jsonl(path)


def test_missing_field_and_empty_and_mixed(tmp_path):
    path = _write(tmp_path / "m.jsonl", ['{"prompt": "a", "chosen": "b"}'])
    with pytest.raises(PrefoptInputError, match=r"m\.jsonl:1: missing field\(s\) 'rejected'"):
        D.load_jsonl(path)
    path = _write(tmp_path / "e.jsonl", ["", "  "])
    with pytest.raises(PrefoptInputError, match="is empty"):
        D.load_jsonl(path)
    path = _write(tmp_path / "x.jsonl", ['{"prompt": "a", "chosen": "b", "rejected": "c"}',
                                         '{"prompt": "a", "completion": "b", "label": true}'])
    with pytest.raises(PrefoptInputError, match=r"x\.jsonl:2: unpaired row in a paired dataset"):
        D.load_jsonl(path)
    path = _write(tmp_path / "t.jsonl", ['{"prompt": "a", "chosen": 3, "rejected": "c"}'])
    with pytest.raises(PrefoptInputError, match=r"t\.jsonl:1: field 'chosen'"):
        D.load_jsonl(path)


def test_conversational_rows_tokenize(tmp_path):
    row = {"prompt": [{"role": "user", "content": "sort:321="}],
           "chosen": [{"role": "assistant", "content": "123."}],
           "rejected": [{"role": "assistant", "content": "321."}]}
    path = _write(tmp_path / "c.jsonl", [json.dumps(row)] * 8)
    tok = D.load_tokenizer()
    data = D.load_dataset(path, tok)
    ex = data.examples[0]
    decode = {v: k for k, v in __import__("tokenizers").Tokenizer.from_file(D.DEFAULT_TOKENIZER).get_vocab().items()}
    assert "".join(decode[i] for i in ex["prompt"]).endswith("<|assistant|>\n")
    assert "".join(decode[i] for i in ex["chosen"]).startswith("123.")
    assert ex["chosen"][-1] == tok.eos_id
    summary = _run(tmp_path / "run", dataset=path, max_steps=1, save_steps=0, per_device_train_batch_size=2)
    assert summary["history"][0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


def test_truncation_counts_rows(tmp_path):
    rows = [{"prompt": "sort:" + "9" * 30 + "=", "chosen": "1" * 30, "rejected": "2" * 30},
            {"prompt": "sort:12=", "chosen": "12.", "rejected": "21."}]
    path = _write(tmp_path / "t.jsonl", [json.dumps(r) for r in rows])
    tok = D.load_tokenizer()
    data = D.load_dataset(path, tok, max_length=24, max_prompt_length=10)
    assert data.truncated == 1
    long = data.examples[0]
    assert len(long["prompt"]) == 10 and long["prompt"][-1] == tok.encode("=")[0]  # keep_end keeps the end
    assert len(long["prompt"]) + len(long["chosen"]) == 24
    assert data.examples[1]["chosen"] == tok.encode("12.") + [tok.eos_id]


def test_collate_padded_and_packed_agree():
    tok = D.load_tokenizer()
    data = D.load_dataset(D.DEFAULT_DATASET, tok)
    rows = data.examples[:3]
    padded = D.collate(rows, "paired", tok.pad_id)
    packed = D.collate(rows, "paired", tok.pad_id, padding_free=True)
    assert padded["input_ids"].shape[0] == 6 and packed["input_ids"].shape[0] == 1
    assert packed["cu_seqlens"].tolist()[-1] == packed["input_ids"].shape[1]
    lab_p = padded["labels"][padded["labels"] != -100]
    lab_k = packed["labels"][packed["labels"] != -100]
    assert torch.equal(lab_p, lab_k)
    # completion tokens of chosen row 0 are its labels
    n_prompt = len(rows[0]["prompt"])
    assert padded["labels"][0, n_prompt - 1:n_prompt - 1 + len(rows[0]["chosen"])].tolist() == rows[0]["chosen"]


def test_default_data_script_is_reproducible(tmp_path):
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_default_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("default_pairs.jsonl", "default_kto.jsonl"):
        assert (tmp_path / name).read_text() == open(os.path.join(D.DATA_DIR, name)).read()
    rows, kind = D.load_jsonl(D.DEFAULT_DATASET)
    assert kind == "paired" and 200 <= len(rows) <= 1000
    for row in rows:
        digits = row["prompt"][5:-1]
        assert row["chosen"] == "".join(sorted(digits)) + "." and row["rejected"] != row["chosen"]


# ---- config -------------------------------------------------------------------------------------------------
def test_config_file_and_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("beta: 0.3\nloss_type: [sigmoid, sft]\nloss_weights: [1.0, 0.2]\nbf16: true\n")
    cfg = TrainConfig.from_args(["--config", str(tmp_path / "c.yaml"), "--beta", "0.4", "--max_steps", "7"])
    assert (cfg.beta, cfg.loss_types, cfg.loss_weights, cfg.bf16, cfg.max_steps) == \
        (0.4, ["sigmoid", "sft"], [1.0, 0.2], True, 7)
    (tmp_path / "c.json").write_text(json.dumps({"padding_free": True, "model_config": {"hidden_size": 16}}))
    cfg = TrainConfig.from_args(["--config", str(tmp_path / "c.json"), "--bf16", "false"])
    assert cfg.padding_free and cfg.model_config == {"hidden_size": 16} and cfg.bf16 is False
    (tmp_path / "u.yaml").write_text("betta: 0.3\n")
    with pytest.raises(PrefoptInputError, match="unknown setting.*betta"):
        TrainConfig.from_args(["--config", str(tmp_path / "u.yaml")])
    with pytest.raises(PrefoptInputError, match="bad value 'abc' for beta"):
        TrainConfig.from_args(["--beta", "abc"])


def test_unknown_loss_lists_valid_names():
    with pytest.raises(PrefoptInputError) as err:
        TrainConfig(loss_type="dpo")
    msg = str(err.value)
    for name in ("sigmoid", "ipo", "hinge", "simpo", "kto"):
        assert name in msg


def test_bf16_autocast_runs(tmp_path):
    summary = _run(tmp_path / "run", max_steps=2, save_steps=0, bf16=True)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])


def test_gradient_checkpointing_matches(tmp_path, monkeypatch):
    """Same losses, and the checkpointed run did recompute: the MLP of the policy's first decoder layer runs twice
    per step (forward, and the backward's recomputation of the layer), once in the plain run."""
    from transformers.models.llama import modeling_llama

    from prefopt.trainer import loop
    policy_mlps, calls = [], []
    real_build, real_forward = loop.build_model, modeling_llama.LlamaMLP.forward

    def build(cfg, vocab_size):  # before the reference is copied from it: the copy's MLP is another object
        adapter = real_build(cfg, vocab_size)
        policy_mlps.append(adapter.module.model.layers[0].mlp)
        calls.append(0)
        return adapter

    def forward(self, *args, **kwargs):  # (module hooks would miss the recomputation: torch runs it without them)
        if self is policy_mlps[-1]:
            calls[-1] += 1
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(loop, "build_model", build)
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", forward)
    _run(tmp_path / "a", max_steps=2, save_steps=0)
    _run(tmp_path / "b", max_steps=2, save_steps=0, gradient_checkpointing=True)
    assert calls == [2, 4], calls
    assert _losses(tmp_path / "b") == pytest.approx(_losses(tmp_path / "a"), abs=1e-5)
