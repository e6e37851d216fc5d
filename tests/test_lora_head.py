"""LoRA on the LM head (prefopt.integrations.adapters): the fused head on augmented operands equals the PEFT model's
own logits + log_softmax, values and gradients, in float64; merged / disabled adapters give the base head; other
adapters on the head are refused; the TRL drop-in and the trainer run it (the split head itself:
tests/test_split_weight.py)."""
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import prefopt  # noqa: E402
from prefopt.integrations import adapters  # noqa: E402
from prefopt.integrations.transformers import (head_of, head_operands, install_prefopt_forward,  # noqa: E402
                                               sequence_logps, token_logps)
from tests._tiny import tiny_gemma2_config, tiny_llama_config, tiny_model  # noqa: E402

V = 48
# float64 end to end: the fused head and PEFT's eager logits differ only by summation order (~1e-15 here)
TOL = dict(rtol=1e-10, atol=1e-10)


def _base(kind="llama"):
    if kind == "gemma2":  # tied embeddings and a final-logit softcap: the cap bends the adapted logits
        config = tiny_gemma2_config(V, final_logit_softcapping=3.0, initializer_range=0.2)
    else:
        config = tiny_llama_config(V, initializer_range=0.2)
    return tiny_model(config, seed=1, dtype=torch.float64)


def _lora(model, name="default", **overrides):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0,
                  init_lora_weights=False)  # random B: the adapter moves the logits
    kwargs.update(overrides)
    config = peft.LoraConfig(**kwargs)
    with torch.random.fork_rng(devices=[]):  # the adapter's random init, the same on every run
        torch.manual_seed(11)
        if isinstance(model, peft.PeftModel):
            model.add_adapter(name, config)
            return model
        return peft.get_peft_model(model, config, adapter_name=name)


def _batch(batch=3, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, V, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    completion_mask = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):  # prompt of 2 + b tokens, right padding of b tokens
        completion_mask[b, 2 + b:length - b] = 1
        if b:
            attention_mask[b, length - b:] = 0
            input_ids[b, length - b:] = 0
    return input_ids, attention_mask, completion_mask


def _eager_token_logps(model, input_ids, attention_mask, completion_mask):
    """The PEFT model's own path: logits (adapter on lm_head applied by PEFT) -> log_softmax -> gather."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    tok = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return tok * completion_mask[:, 1:]


def _head(model):
    return model.base_model.model.lm_head


def _watched(model):
    """Every trainable parameter, plus W when it trains."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _grads(params, loss):
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return dict(zip(params, grads))


CASES = {
    "llama-r4": dict(),
    "rslora-lora_bias": dict(use_rslora=True, lora_bias=True, r=3),
    "gemma2-softcap-tied": dict(kind="gemma2"),
    "two-adapters": dict(second=dict(r=2, lora_alpha=3)),
    "head-weight-trains": dict(train_base_head=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_head_matches_peft_logits_float64(case):
    opts = dict(CASES[case])
    model = _lora(_base(opts.pop("kind", "llama")), **{k: v for k, v in opts.items()
                                                       if k not in ("second", "train_base_head")})
    if "second" in opts:
        _lora(model, "second", **opts["second"])
        model.base_model.set_adapter(["default", "second"])
    if opts.get("train_base_head"):
        _head(model).base_layer.weight.requires_grad_(True)
    assert adapters.head_adapter(_head(model)) == "lora"
    input_ids, attention_mask, completion_mask = _batch()
    params = _watched(model)
    assert any("lm_head.lora_B" in n for n in params)
    want = _eager_token_logps(model, input_ids, attention_mask, completion_mask)
    got, labels = token_logps(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(got[:, :-1], want, **TOL)
    # a loss that weights the tokens unevenly, so the gradients are not those of a plain sum
    weights = torch.linspace(0.5, 1.5, want.numel(), dtype=torch.float64).reshape(want.shape)
    g_want = _grads(params, (want * weights).sum())
    g_got = _grads(params, (got[:, :-1] * weights).sum())
    for name in params:
        assert g_want[name] is not None and g_got[name] is not None, name
        torch.testing.assert_close(g_got[name], g_want[name], **TOL, msg=lambda m: f"{name}: {m}")
    head_names = [n for n in params if "lm_head" in n]
    assert head_names and all(g_got[n].abs().sum() > 0 for n in head_names)
    if opts.get("train_base_head"):
        assert "base_model.model.lm_head.base_layer.weight" in head_names


def test_lora_dropout_on_the_head_is_honoured():
    """Training mode, lora_dropout 0.3: the adapter's own dropout module draws the same numbers as in PEFT's forward."""
    model = _lora(_base(), lora_dropout=0.3)
    model.train()
    input_ids, attention_mask, completion_mask = _batch()
    params = _watched(model)
    torch.manual_seed(7)
    want = _eager_token_logps(model, input_ids, attention_mask, completion_mask)
    g_want = _grads(params, want.sum())
    torch.manual_seed(7)
    got, _ = token_logps(model, input_ids, attention_mask, completion_mask)
    g_got = _grads(params, got.sum())
    torch.testing.assert_close(got[:, :-1], want, **TOL)
    for name in params:
        torch.testing.assert_close(g_got[name], g_want[name], **TOL)
    torch.manual_seed(8)  # another draw gives other values: the dropout really acts
    other, _ = token_logps(model, input_ids, attention_mask, completion_mask)
    assert not torch.allclose(other, got, atol=1e-6)


def test_merged_and_disabled_adapter_give_the_base_head():
    base = _base()
    input_ids, attention_mask, completion_mask = _batch()
    with torch.no_grad():
        base_logps, _ = sequence_logps(base, input_ids, attention_mask, completion_mask)
    model = _lora(base)
    with torch.no_grad():
        adapted, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
        assert not torch.allclose(adapted, base_logps, atol=1e-3)
        with model.disable_adapter():  # the PEFT reference: base head, head_of usable again
            disabled, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
            assert head_of(model).weight is _head(model).base_layer.weight
        torch.testing.assert_close(disabled, base_logps, **TOL)
        model.merge_adapter()   # the delta now lives in W: the fused head runs the base layer alone
        assert _head(model).merged and not adapters.adapter_active(_head(model))
        merged, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
        torch.testing.assert_close(merged, adapted, **TOL)
        with model.disable_adapter():  # disabled while merged: unmerged first, as PEFT's forward does
            again, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
        torch.testing.assert_close(again, base_logps, **TOL)


def test_head_of_refuses_an_active_head_adapter_and_head_operands_applies_it():
    model = _lora(_base())
    with pytest.raises(ValueError, match="active LoRA adapter"):
        head_of(model)
    input_ids, attention_mask, completion_mask = _batch()
    hidden = model.get_base_model().model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    ops = head_operands(model, hidden)
    r = _head(model).lora_A["default"].weight.shape[0]
    assert ops.weight is _head(model).base_layer.weight and ops.extra_weight.shape == (V, r)
    assert ops.hidden.shape[-1] == hidden.shape[-1] + r
    labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], 1)
    got = prefopt.linear_logprobs(ops.hidden, ops.weight, labels, **ops.head_kwargs())
    want = _eager_token_logps(model, input_ids, attention_mask, torch.ones_like(completion_mask))
    torch.testing.assert_close(got[:, :-1], want, **TOL)


def test_low_rank_operands_by_hand():
    """The documented form for a plain module: factors [(A, B, scaling)] -> the same logps as materialised logits."""
    g = torch.Generator().manual_seed(0)
    n, h, v, r = 10, 6, 23, 3
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g)
    bias = torch.randn(v, dtype=torch.float64, generator=g)
    a = torch.randn(r, h, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(v, r, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3] = -100
    ops = adapters.low_rank_operands(hidden, weight, bias, [(a, b, 0.7)])
    got = prefopt.linear_logprobs(ops.hidden, ops.weight, labels, **ops.head_kwargs())
    logits = hidden @ weight.T + bias + 0.7 * (hidden @ a.T) @ b.T
    want = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) * (labels != -100)
    torch.testing.assert_close(got, want, **TOL)
    for x, y in zip(torch.autograd.grad(got.sum(), [hidden, a, b]), torch.autograd.grad(want.sum(), [hidden, a, b])):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("config", [dict(use_dora=True), dict(kind="loha")], ids=["dora", "loha"])
def test_other_head_adapters_are_refused(config):
    if config.get("kind") == "loha":
        model = peft.get_peft_model(_base(), peft.LoHaConfig(r=2, target_modules=["q_proj", "lm_head"]))
        match = "not supported"
    else:
        model = _lora(_base(), **config)
        match = "variant"
    input_ids, attention_mask, completion_mask = _batch()
    with pytest.raises(ValueError, match=match):
        sequence_logps(model, input_ids, attention_mask, completion_mask)


def test_patched_head_keeps_peft_forward():
    """After install_prefopt_forward, a plain call of the PEFT model still gives PEFT's own logits."""
    model = _lora(_base())
    input_ids, attention_mask, _ = _batch()
    before = model(input_ids=input_ids, attention_mask=attention_mask).logits
    install_prefopt_forward(model)
    token_logps(model, input_ids, attention_mask)
    torch.testing.assert_close(model(input_ids=input_ids, attention_mask=attention_mask).logits, before, rtol=0,
                               atol=0)


# ------------------------------------------------------------------------------------------------------------
# the TRL drop-in and the trainer
# ------------------------------------------------------------------------------------------------------------
def test_trl_drop_in_with_lora_on_the_head(tmp_path):
    """PrefoptDPOTrainer with LoRA on lm_head (which TRL 1.16's constructor refuses) equals TRL's own DPO loss code
    run on the PEFT model's eager logits: losses, gradient norms and metrics over three steps."""
    trl = pytest.importorskip("trl")
    import trl.trainer.dpo_trainer as dpo_module

    from prefopt.bench.model_kinds import eager_fused_lm_head
    from prefopt.integrations.trl import PrefoptDPOTrainer, _lora_head_allowed
    from tests._tiny import all_words, build_tokenizer, preference_dataset
    from tests.test_integrations_trl import COMPARED, _assert_same, _spy

    tokenizer = build_tokenizer([" ".join(all_words())], vocab_size=V)
    dataset = preference_dataset(8, seed=3)

    def lora():
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0,
                               init_lora_weights=False)

    def run(cls, out):
        torch.set_num_threads(1)
        args = trl.DPOConfig(output_dir=str(tmp_path / out), per_device_train_batch_size=2, max_steps=3,
                             logging_steps=1, learning_rate=5e-2, report_to=[], use_cpu=True, seed=0,
                             save_strategy="no", max_length=32, disable_tqdm=True, dataloader_num_workers=0,
                             bf16=False)
        model = tiny_model(tiny_llama_config(V, initializer_range=0.1), seed=5)
        with warnings.catch_warnings(), _spy(cls is PrefoptDPOTrainer) as calls:
            warnings.simplefilter("ignore")
            if cls is PrefoptDPOTrainer:
                trainer = cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=lora())
            else:  # TRL refuses the head adapter: built as the drop-in is, with TRL's head contract on eager logits
                saved = dpo_module.add_fused_lm_head
                dpo_module.add_fused_lm_head = eager_fused_lm_head
                try:
                    with _lora_head_allowed():
                        trainer = cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                      peft_config=lora())
                finally:
                    dpo_module.add_fused_lm_head = saved
            trainer.train()
        if cls is PrefoptDPOTrainer:
            assert calls["prefopt"] > 0 and calls["trl"] == 0 and not getattr(trainer, "_prefopt_warned", False)
        logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        assert len(logs) == 3
        return trainer, logs

    with pytest.raises(ValueError, match="lm_head"):  # TRL's own constructor refuses the head adapter
        trl.DPOTrainer(model=tiny_model(tiny_llama_config(V), seed=5), processing_class=tokenizer,
                       train_dataset=dataset, peft_config=lora(),
                       args=trl.DPOConfig(output_dir=str(tmp_path / "refused"), report_to=[], use_cpu=True,
                                          bf16=False))
    _, ref = run(trl.DPOTrainer, "eager")
    trainer, got = run(PrefoptDPOTrainer, "prefopt")
    head = trainer.model.base_model.model.lm_head
    assert adapters.head_adapter(head) == "lora" and head.lora_B["default"].weight.requires_grad
    assert ref[2]["rewards/margins"] != 0.0  # the adapters moved away from the (adapter-disabled) reference
    _assert_same(ref, got, keys=COMPARED)


def test_trainer_with_lora_on_the_head(tmp_path):
    """prefopt's trainer on a PEFT model with LoRA on lm_head: one micro-batch's loss and the gradients of every
    adapter (head included) equal an eager DPO loss on the PEFT model's logits; a short run trains the head
    adapter."""
    from prefopt.losses.reference import reference_dpo_loss
    from prefopt.trainer import TrainConfig, Trainer
    from prefopt.trainer.data import load_tokenizer

    tokenizer = load_tokenizer(None)
    base = tiny_model(tiny_llama_config(tokenizer.vocab_size, initializer_range=0.2), seed=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                          lora_dropout=0.0, init_lora_weights=False))
    cfg = TrainConfig(max_steps=2, per_device_train_batch_size=2, output_dir=str(tmp_path / "run"),
                      learning_rate=1e-2, logging_steps=1, disable_tqdm=True, max_length=48, seed=0)
    trainer = Trainer(cfg, model=model, tokenizer=tokenizer)
    assert trainer.reference.kind == "peft"
    trainer.ref_table = None  # live reference (what _train sets without precompute_ref_log_probs)
    indices = trainer._indices(0)[0]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss, _ = trainer._micro_loss(indices)
    got = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    batch = trainer._batch(indices)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    tok = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref_tok = torch.log_softmax(ref_logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        ref_tok = ref_tok * (labels != -100)
    P = len(indices)
    seq, ref_seq = tok.sum(-1), ref_tok.sum(-1)
    want_loss = reference_dpo_loss(seq[:P], seq[P:], ref_seq[:P], ref_seq[P:], beta=cfg.beta)
    want = dict(zip(params, torch.autograd.grad(want_loss, list(params.values()))))
    # float32 model: the fused head and eager logits differ by float32 summation order
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    head_names = [n for n in params if "lm_head" in n]
    assert len(head_names) == 2
    for name in params:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    before = {n: p.detach().clone() for n, p in params.items() if "lm_head" in n}
    trainer.train()
    assert all(not torch.equal(before[n], params[n].detach()) for n in before)
