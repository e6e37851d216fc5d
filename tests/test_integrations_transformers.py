"""prefopt.integrations.transformers: logps without logits == the model's own logits path."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from prefopt.integrations.transformers import (  # noqa: E402
    head_of,
    last_hidden_states,
    packed_cu_seqlens,
    sequence_logps,
    shift_labels,
    token_logps,
)
from tests._tiny import build_tokenizer, tiny_gemma2_config, tiny_llama_config, tiny_model  # noqa: E402

V = 48


def _models():
    # initializer_range 0.2: logits of O(1-10), so the Gemma 2 softcap (3.0) really bends them
    return {
        "llama": lambda: tiny_model(tiny_llama_config(V, initializer_range=0.2), seed=1),
        "gemma2": lambda: tiny_model(tiny_gemma2_config(V, final_logit_softcapping=3.0, initializer_range=0.2),
                                     seed=2),
    }


def _batch(batch=3, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, V, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    completion_mask = torch.zeros(batch, length, dtype=torch.long)
    # row b: prompt of 2 + b tokens, completion after it, right padding of b tokens (TRL's collator layout)
    for b in range(batch):
        prompt, pad = 2 + b, b
        completion_mask[b, prompt:length - pad] = 1
        if pad:
            attention_mask[b, length - pad:] = 0
            input_ids[b, length - pad:] = 0
    return input_ids, attention_mask, completion_mask


def _reference_logps(model, input_ids, attention_mask, completion_mask, temperature=1.0, average=False):
    """The model's own path: logits (softcap applied by the model) -> log_softmax -> gather."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    target = input_ids[:, 1:]
    tok = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    mask = completion_mask[:, 1:].bool()
    total = (tok * mask).sum(-1)
    return (total / mask.sum(-1).clamp(min=1)) if average else total


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    head = model.get_output_embeddings().weight.grad.clone()
    backbone = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    return head, backbone


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_head_of(name):
    model = _models()[name]()
    spec = head_of(model)
    assert spec.weight is model.get_output_embeddings().weight
    assert spec.bias is None
    assert spec.logit_scale == 1.0
    assert spec.softcap == (3.0 if name == "gemma2" else None)


def test_head_of_logit_scales():
    model = tiny_model(tiny_llama_config(V), seed=0)
    model.config.logit_scale = 0.25          # Cohere: multiplies
    assert head_of(model).logit_scale == 0.25
    del model.config.logit_scale
    model.config.logits_scaling = 4.0        # Granite: divides
    assert head_of(model).logit_scale == 0.25


def test_head_of_granite_matches_model():
    cfg = transformers.GraniteConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=4, logits_scaling=3.0,
                                     initializer_range=0.2, tie_word_embeddings=False)
    model = tiny_model(cfg, seed=0)
    assert head_of(model).logit_scale == pytest.approx(1 / 3.0)
    input_ids, attention_mask, completion_mask = _batch()
    ref = _reference_logps(model, input_ids, attention_mask, completion_mask)
    got, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_shift_labels():
    input_ids = torch.tensor([[5, 6, 7, 8, 0]])
    completion_mask = torch.tensor([[0, 0, 1, 1, 0]])
    assert shift_labels(input_ids, completion_mask).tolist() == [[-100, 7, 8, -100, -100]]
    assert shift_labels(input_ids, None, ignore_index=-1).tolist() == [[6, 7, 8, 0, -1]]
    # packed: the last token of a sequence does not predict the first token of the next one
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    assert shift_labels(ids, None, position_ids=pos).tolist() == [[6, 7, -100, 9, -100]]
    assert packed_cu_seqlens(pos).tolist() == [0, 3, 5]


@pytest.mark.parametrize("name", ["llama", "gemma2"])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_match_model_logits(name, average):
    model = _models()[name]()
    input_ids, attention_mask, completion_mask = _batch()
    ref = _reference_logps(model, input_ids, attention_mask, completion_mask, average=average)
    ref_head, ref_backbone = _grads(model, (ref * torch.tensor([1.0, -0.5, 2.0])).sum())
    got, lengths = sequence_logps(model, input_ids, attention_mask, completion_mask, average=average)
    assert lengths.tolist() == completion_mask[:, 1:].sum(-1).tolist()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    head, backbone = _grads(model, (got * torch.tensor([1.0, -0.5, 2.0])).sum())
    torch.testing.assert_close(head, ref_head, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backbone, ref_backbone, rtol=1e-5, atol=1e-5)


def test_temperature_and_hidden_states():
    model = _models()["gemma2"]()
    input_ids, attention_mask, completion_mask = _batch()
    ref = _reference_logps(model, input_ids, attention_mask, completion_mask, temperature=0.7)
    got, _ = sequence_logps(model, input_ids, attention_mask, completion_mask, temperature=0.7)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    hidden = last_hidden_states(model, input_ids, attention_mask)
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    torch.testing.assert_close(hidden, out.hidden_states[-1], rtol=0, atol=0)


def test_token_logps_extras():
    model = _models()["llama"]()
    input_ids, attention_mask, completion_mask = _batch()
    logps, entropy, log_sum_p2, labels = token_logps(model, input_ids, attention_mask, completion_mask,
                                                     return_entropy=True, return_log_sum_p2=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logp_all = torch.log_softmax(logits, -1)
    mask = labels != -100
    ref_entropy = -(logp_all.exp() * logp_all).sum(-1)
    ref_sq = torch.logsumexp(2 * logp_all, -1)
    torch.testing.assert_close(entropy[mask], ref_entropy[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_sum_p2[mask], ref_sq[mask], rtol=1e-5, atol=1e-5)
    assert bool((logps[~mask] == 0).all())


def test_peft_lora_logps_and_reference():
    peft = pytest.importorskip("peft")
    base = _models()["llama"]()
    input_ids, attention_mask, completion_mask = _batch()
    base_ref = _reference_logps(base, input_ids, attention_mask, completion_mask).detach()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0,
                             init_lora_weights=False)  # random B: the adapter changes the outputs
    model = peft.get_peft_model(base, config)
    ref = _reference_logps(model, input_ids, attention_mask, completion_mask)
    assert not torch.allclose(ref, base_ref, atol=1e-3)
    got, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # gradients reach the adapter weights
    got.sum().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and bool(g.abs().sum() > 0) for g in lora_grads)
    # adapter disabled == the base model (the PEFT "reference")
    with torch.no_grad(), model.disable_adapter():
        ref_logps, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(ref_logps, base_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing(use_reentrant):
    model = _models()["llama"]()
    model.train()
    input_ids, attention_mask, completion_mask = _batch()
    plain, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
    plain_head, plain_backbone = _grads(model, plain.sum())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()
    assert model.model.gradient_checkpointing
    ckpt, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(ckpt, plain, rtol=1e-6, atol=1e-6)
    head, backbone = _grads(model, ckpt.sum())
    torch.testing.assert_close(head, plain_head, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(backbone, plain_backbone, rtol=1e-5, atol=1e-6)


def test_padding_free_packed_llama():
    model = _models()["llama"]()
    input_ids, attention_mask, completion_mask = _batch()
    ref = _reference_logps(model, input_ids, attention_mask, completion_mask)
    lens = attention_mask.sum(-1)
    ids = torch.cat([input_ids[b, :lens[b]] for b in range(3)]).unsqueeze(0)
    cmask = torch.cat([completion_mask[b, :lens[b]] for b in range(3)]).unsqueeze(0)
    pos = torch.cat([torch.arange(int(n)) for n in lens]).unsqueeze(0)
    got, lengths = sequence_logps(model, ids, None, cmask, position_ids=pos)
    assert lengths.tolist() == completion_mask[:, 1:].sum(-1).tolist()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_build_tokenizer_roundtrip():
    tok = build_tokenizer(["the cat sat", "a dog ran on the mat"], vocab_size=32)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 3
    ids = tok("the cat</s>")["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids[:-1]) == "the cat"


def test_peft_modules_to_save_head():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_models()["llama"](), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                       modules_to_save=["lm_head"]))
    with torch.no_grad():  # make the trainable head copy differ from the original
        head = model.base_model.model.lm_head
        head.modules_to_save["default"].weight.mul_(1.5)
    input_ids, attention_mask, completion_mask = _batch()
    spec = head_of(model)
    assert spec.weight is head.modules_to_save["default"].weight
    ref = _reference_logps(model, input_ids, attention_mask, completion_mask)
    got, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), model.disable_adapter():
        assert head_of(model).weight is head.original_module.weight
        ref = _reference_logps(model, input_ids, attention_mask, completion_mask)
        got, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_lora_on_lm_head_is_no_plain_head():
    """LoRA on lm_head runs on augmented operands (tests/test_lora_head.py); head_of, which returns a plain
    (weight, bias), refuses it rather than returning the base weight without the adapter."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_models()["llama"](), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="head_operands"):
        head_of(model)
