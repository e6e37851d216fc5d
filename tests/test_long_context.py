"""The long-sequence preset (`prefopt train --long_context N`) and float64 precomputed reference sums (trainer and
TRL drop-in)."""
import json
import math
import warnings

import pytest
import torch

import prefopt
from prefopt.cli import main as cli_main
from prefopt.trainer import TrainConfig, Trainer
from prefopt.trainer import long_context as LC


# ---- the preset ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # 4-21 s measured: one step of a 33M-parameter model, its checkpoint (AdamW state) and export
def test_preset_trains_a_128k_vocabulary_llama_and_prints_progress_and_peak_memory(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", "--long_context", "1024", "--max_steps", "1", "--output_dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "1 pairs of 1024 tokens per sequence, vocabulary 128256" in out
    step_line = next(line for line in out.splitlines() if line.startswith("step    1"))
    assert "s/step" in step_line and "peak RSS" in step_line
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["loss"]) and record["peak_rss_mib"] > 0 and record["step_seconds"] > 0
    config = json.loads((run / "config.json").read_text())
    assert config["max_length"] == 1024 and config["padding_free"] and config["gradient_checkpointing"]
    model = json.loads((run / "model" / "config.json").read_text())
    assert model["vocab_size"] == 128256 and model["model_type"] == "llama" and model["hidden_size"] == 128


def test_preset_settings_give_way_to_a_config_file_and_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("long_context: 2048\nmax_steps: 7\n")
    cfg = TrainConfig.from_args(["--config", str(path), "--model_config", '{"hidden_size": 64}'])
    assert (cfg.long_context, cfg.max_length, cfg.max_steps, cfg.padding_free) == (2048, 2048, 7, True)
    assert cfg.model_config == {"hidden_size": 64} and cfg.per_device_train_batch_size == 1
    assert TrainConfig.from_args(["--long_context", "4096", "--max_length", "5000"]).max_length == 5000
    with pytest.raises(ValueError, match="long_context"):
        TrainConfig.from_args(["--long_context", "8"])


@pytest.mark.parametrize("n_tokens", [1024, 333])
def test_generated_pairs_fill_n_tokens(n_tokens):
    tok = LC.synthetic_tokenizer()
    data = LC.generated_pairs(n_tokens, 3, tok, seed=5)
    assert len(data) == 3 and data.kind == "paired"
    for ex in data.examples:
        assert ex["prompt"][0] == tok.bos_id and len(ex["prompt"]) <= LC.PROMPT_TOKENS
        for name in ("chosen", "rejected"):
            assert len(ex["prompt"]) + len(ex[name]) == n_tokens and ex[name][-1] == tok.eos_id
            assert all(4 <= t < tok.vocab_size for t in ex["prompt"][1:] + ex[name][:-1])
        period = len(ex["prompt"]) - 1  # the chosen completion copies the prompt
        assert ex["chosen"][:period] == ex["prompt"][1:]
    assert LC.generated_pairs(n_tokens, 3, tok, seed=5).examples == data.examples   # deterministic


# ---- float64 precomputed reference sums ---------------------------------------------------------------------
class _SumSpy:
    """Records every `prefopt.sequence_logps` call (inputs and output) of the block."""

    def __init__(self, monkeypatch):
        self.calls, inner = [], prefopt.sequence_logps

        def spy(values, mask=None, **kwargs):
            out = inner(values, mask, **kwargs)
            self.calls.append((values.detach().clone(), None if mask is None else mask.detach().clone(),
                               kwargs.get("cu_seqlens"), out.detach().clone()))
            return out

        monkeypatch.setattr(prefopt, "sequence_logps", spy)


def _exact_sums(values, mask, cu_seqlens):
    """math.fsum per sequence of the (float32) token values: the exactly rounded float64 sum."""
    if cu_seqlens is None:
        rows = [(v, m) for v, m in zip(values.reshape(values.shape[0], -1), mask.reshape(mask.shape[0], -1))]
    else:
        flat_v, flat_m, cu = values.reshape(-1), mask.reshape(-1), cu_seqlens.tolist()
        rows = [(flat_v[a:b], flat_m[a:b]) for a, b in zip(cu[:-1], cu[1:])]
    return [math.fsum(float(x) * float(w) for x, w in zip(v.tolist(), m.double().tolist())) for v, m in rows]


def _write_pairs(path, n=4):
    rows = [{"prompt": f"sort:{d}=", "chosen": "".join(sorted(d)) + ".", "rejected": d + "."}
            for d in ("53814", "2971", "640", "88123", "905", "7162")[:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_trainer_precomputes_float64_sums(tmp_path, monkeypatch):
    cfg = TrainConfig(dataset=_write_pairs(tmp_path / "pairs.jsonl"), output_dir=str(tmp_path / "run"),
                      precompute_ref_log_probs=True, per_device_train_batch_size=2, max_steps=1, disable_tqdm=True,
                      model_config={"hidden_size": 32}, logging_steps=1)
    trainer = Trainer(cfg)
    (tmp_path / "run").mkdir()  # what Trainer.train() does before the precompute
    spy = _SumSpy(monkeypatch)
    table, cached = trainer._precompute_reference()
    assert not cached and table.table.dtype == torch.float64
    sums = [(values, mask, cu, out) for values, mask, cu, out in spy.calls if values.dtype == torch.float64]
    assert sums, "no float64 sequence sums were formed"
    # the table holds the float64 sums of the float32 token log-probs (1e-12: summation order only; a float32
    # rounding of these ~-30-nat sums would be ~1e-6 off)
    got = torch.cat([out for *_, out in sums])
    exact = torch.tensor([s for values, mask, cu, _ in sums for s in _exact_sums(values, mask, cu)],
                         dtype=torch.float64)
    assert (got - exact).abs().max() <= 1e-12 * exact.abs().max()
    stored = torch.cat([torch.cat([table.table[idx, 0], table.table[idx, 1]]) for idx in ([0, 2], [1, 3])])
    assert set(stored.tolist()) == set(got.tolist())
    # and they reach the loss as float64
    seen = {}
    real = prefopt.fused_linear_preference_loss

    def loss_spy(*args, **kwargs):
        seen["ref"] = kwargs["ref_chosen_logps"].dtype
        return real(*args, **kwargs)

    monkeypatch.setattr(prefopt, "fused_linear_preference_loss", loss_spy)
    trainer.ref_table = table
    trainer._micro_loss([0, 1])
    assert seen["ref"] == torch.float64


def test_drop_in_precomputes_and_collates_float64_sums(tmp_path, monkeypatch):
    trl = pytest.importorskip("trl")
    from prefopt.integrations.trl import PrefoptDPOTrainer
    from tests._tiny import all_words, build_tokenizer, preference_dataset, tiny_llama_config, tiny_model

    tokenizer = build_tokenizer([" ".join(all_words())], vocab_size=48)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=1,
                         report_to=[], use_cpu=True, seed=0, save_strategy="no", max_length=32, disable_tqdm=True,
                         dataloader_num_workers=0, bf16=False, precompute_ref_log_probs=True,
                         precompute_ref_batch_size=2)
    spy = _SumSpy(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PrefoptDPOTrainer(model=tiny_model(tiny_llama_config(48, initializer_range=0.1), seed=5),
                                    args=args, train_dataset=preference_dataset(4, seed=3), processing_class=tokenizer)
    outs = torch.cat([out for *_, out in spy.calls])
    assert outs.dtype == torch.float64
    exact = torch.tensor([s for values, mask, cu, _ in spy.calls for s in _exact_sums(values, mask, cu)],
                         dtype=torch.float64)
    assert (outs - exact).abs().max() <= 1e-12 * exact.abs().max()   # float64 sums (see the trainer test)
    ds = trainer.train_dataset
    chosen, rejected = list(ds["ref_chosen_logps"]), list(ds["ref_rejected_logps"])
    stored = torch.tensor(chosen + rejected, dtype=torch.float64)
    assert set(stored.tolist()) == set(outs.tolist())                   # stored without rounding
    batch = trainer.data_collator([ds[i] for i in range(2)])
    assert batch["ref_chosen_logps"].dtype == torch.float64
    assert batch["ref_chosen_logps"].tolist() == chosen[:2]


# ---- an explicit reference model (TRL's ref_model) ----------------------------------------------------------------
def test_trainer_takes_a_reference_model(tmp_path):
    from prefopt.integrations.tiny import tiny_llama_config, tiny_model
    from prefopt.trainer.data import load_tokenizer
    vocab = load_tokenizer().vocab_size
    cfg = dict(dataset=_write_pairs(tmp_path / "pairs.jsonl"), per_device_train_batch_size=2, max_steps=1,
               disable_tqdm=True, logging_steps=1, learning_rate=0.0)
    margins = {}
    for name, ref_seed in (("copy", None), ("given", 7)):
        policy = tiny_model(tiny_llama_config(vocab, hidden_size=32), seed=1)
        ref = None if ref_seed is None else tiny_model(tiny_llama_config(vocab, hidden_size=32), seed=ref_seed)
        trainer = Trainer(TrainConfig(output_dir=str(tmp_path / name), **cfg), model=policy, ref_model=ref)
        if ref is not None:  # used in place (not copied), frozen
            assert trainer.reference.adapter.module is ref and not any(p.requires_grad for p in ref.parameters())
        margins[name] = trainer.train()["history"][0]["rewards/margins"]
    # the initial policy as its own reference: margins 0 up to rounding; another model: log-ratios of order 1
    assert abs(margins["copy"]) < 1e-5 and abs(margins["given"]) > 1e-3
    with pytest.raises(ValueError, match="uses no reference"):
        Trainer(TrainConfig(output_dir=str(tmp_path / "simpo"), loss_type="simpo", **cfg),
                model=tiny_model(tiny_llama_config(vocab, hidden_size=32)), ref_model=policy)
