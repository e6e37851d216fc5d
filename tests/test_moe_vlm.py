"""Mixture-of-experts router loss and vision-language batches on prefopt's fused path: the TRL drop-in equals TRL's
own DPOTrainer steps (losses, gradient norms, metrics, `aux_loss`), and the HF integration / trainer equal the
models' eager logits and their own `aux_loss`."""
import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

from prefopt.integrations.trl import PrefoptDPOTrainer  # noqa: E402
from prefopt.integrations.transformers import last_hidden_states, token_logps  # noqa: E402
from tests._tiny import all_words, build_tokenizer, preference_dataset, preference_texts, tiny_llava_parts  # noqa: E402
from tests.test_integrations_trl import COMPARED, _assert_same, _train_logged  # noqa: E402

V = 48
MOE_KINDS = ("mixtral", "qwen2_moe", "olmoe")


# ------------------------------------------------------------------------------------------------------------
# tiny models built from configs (random weights)
# ------------------------------------------------------------------------------------------------------------
def _text_kwargs(vocab=V, **overrides):
    kwargs = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
                  bos_token_id=2, eos_token_id=3, initializer_range=0.1)
    kwargs.update(overrides)
    return kwargs


def _moe_model(kind, vocab=V, dtype=torch.float32, coef=0.1):
    from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    if kind == "mixtral":
        config = MixtralConfig(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=coef,
                               **_text_kwargs(vocab))
    elif kind == "qwen2_moe":  # shared expert + routed experts
        config = Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                shared_expert_intermediate_size=32, decoder_sparse_step=1, router_aux_loss_coef=coef,
                                **_text_kwargs(vocab))
    else:
        config = OlmoeConfig(num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=coef, **_text_kwargs(vocab))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        # torch._grouped_mm (the default experts path) has no float64 kernel: the eager loop over experts there
        experts = "eager" if dtype == torch.float64 else None
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa",
                                                experts_implementation=experts)


def _llava_parts():
    """A tiny LLaVA (CLIP vision tower + Llama) and its processor assembled from local parts (no download)."""
    # 28 x 28 pixels, 14 x 14 patches: 4 image tokens per image (the CLS feature is dropped, "default" strategy)
    return tiny_llava_parts(_text_kwargs(), tokenizer_vocab=V - 1, image_size=28, vision_hidden=16, vision_layers=1,
                            vision_feature_layer=-1)


def _llava(config, dtype=torch.float32):
    from transformers import LlavaForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")


def _images(n, seed=0, size=28):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _vision_dataset(n=8, seed=3):
    from datasets import Dataset

    rows = preference_texts(n, seed=seed)
    return Dataset.from_dict({"images": [[im] for im in _images(n, seed)],
                              "prompt": ["<image> " + p for p, _, _ in rows],
                              "chosen": [c for _, c, _ in rows], "rejected": [r for _, _, r in rows]})


# ------------------------------------------------------------------------------------------------------------
# the TRL drop-in against TRL's own DPOTrainer
# ------------------------------------------------------------------------------------------------------------
def _run(trainer_cls, make_model, processing_class, dataset, tmp_path, **config):
    torch.set_num_threads(1)
    args = trl.DPOConfig(output_dir=str(tmp_path / trainer_cls.__name__), per_device_train_batch_size=2,
                         max_steps=3, logging_steps=1, learning_rate=5e-3, report_to=[], use_cpu=True, seed=0,
                         save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, bf16=False, **config)
    prefopt_run = trainer_cls is PrefoptDPOTrainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model=make_model(), ref_model=make_model(), args=args, train_dataset=dataset,
                              processing_class=processing_class)
        return trainer, _train_logged(trainer, prefopt_run)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_moe_drop_in_matches_trl(kind, tmp_path):
    tokenizer = build_tokenizer([" ".join(all_words())], vocab_size=V)
    dataset = preference_dataset(8, seed=3)
    ref_trainer, ref = _run(trl.DPOTrainer, lambda: _moe_model(kind), tokenizer, dataset, tmp_path, max_length=32)
    trainer, got = _run(PrefoptDPOTrainer, lambda: _moe_model(kind), tokenizer, dataset, tmp_path, max_length=32)
    assert ref_trainer.aux_loss_enabled and trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.1
    assert all("aux_loss" in r for r in ref) and ref[0]["loss"] != ref[2]["loss"]
    _assert_same(ref, got, keys=COMPARED + ("aux_loss",))


def test_moe_drop_in_router_aux_loss_coef_option(tmp_path):
    """DPOConfig.router_aux_loss_coef overrides the config's coefficient (0 turns the loss off), as in TRL."""
    tokenizer = build_tokenizer([" ".join(all_words())], vocab_size=V)
    dataset = preference_dataset(8, seed=3)
    for coef in (0.5, 0.0):
        _, ref = _run(trl.DPOTrainer, lambda: _moe_model("mixtral"), tokenizer, dataset, tmp_path, max_length=32,
                      router_aux_loss_coef=coef)
        trainer, got = _run(PrefoptDPOTrainer, lambda: _moe_model("mixtral"), tokenizer, dataset, tmp_path,
                            max_length=32, router_aux_loss_coef=coef)
        assert trainer.aux_loss_enabled == (coef != 0) and ("aux_loss" in got[0]) == (coef != 0)
        _assert_same(ref, got, keys=COMPARED + ("aux_loss",))


def test_vlm_drop_in_matches_trl(tmp_path):
    """LLaVA with TRL's vision collator (pixel_values in the batch): the drop-in's steps equal TRL's."""
    processor, config = _llava_parts()
    dataset = _vision_dataset()
    _, ref = _run(trl.DPOTrainer, lambda: _llava(config), processor, dataset, tmp_path, max_length=None)
    trainer, got = _run(PrefoptDPOTrainer, lambda: _llava(config), processor, dataset, tmp_path, max_length=None)
    assert trainer._is_vlm and ref[0]["loss"] != ref[2]["loss"]
    batch = trainer.data_collator([dict(dataset[i]) for i in range(2)])
    assert "pixel_values" in batch
    _assert_same(ref, got, keys=COMPARED)


# ------------------------------------------------------------------------------------------------------------
# the HF integration and the trainer against eager logits
# ------------------------------------------------------------------------------------------------------------
def _padded_batch(vocab, batch=4, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    completion_mask = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        completion_mask[b, 3:length - b] = 1
        attention_mask[b, length - b:] = 0
    return input_ids, attention_mask, completion_mask


def _eager(model, input_ids, attention_mask, completion_mask, **inputs):
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs)
    tok = torch.log_softmax(out.logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return tok * completion_mask[:, 1:], out


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_moe_router_loss_equals_the_models_own_float64(kind):
    model = _moe_model(kind, dtype=torch.float64)
    model.train()
    input_ids, attention_mask, completion_mask = _padded_batch(V)
    want, out = _eager(model, input_ids, attention_mask, completion_mask, output_router_logits=True)
    got_hidden, got_aux = last_hidden_states(model, input_ids, attention_mask, return_router_aux_loss=True)
    got, _ = token_logps(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(got_aux, out.aux_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[:, :-1], want, rtol=1e-10, atol=1e-10)
    params = [p for n, p in model.named_parameters() if "gate" in n and p.dim() == 2][:2]
    g_want = torch.autograd.grad(out.aux_loss, params)
    g_got = torch.autograd.grad(got_aux, params)
    for x, y in zip(g_got, g_want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def _trainer(model, tmp_path, **cfg):
    from prefopt.trainer import TrainConfig, Trainer
    from prefopt.trainer.data import load_tokenizer

    config = TrainConfig(max_steps=2, per_device_train_batch_size=2, output_dir=str(tmp_path / "run"),
                         learning_rate=1e-2, logging_steps=1, disable_tqdm=True, max_length=40, seed=0, **cfg)
    trainer = Trainer(config, model=model, tokenizer=load_tokenizer(None))
    trainer.ref_table = None  # live reference (what _train sets without precompute_ref_log_probs)
    return trainer


def test_trainer_adds_the_moe_router_loss(tmp_path):
    """prefopt's trainer: micro-batch loss = DPO loss on eager logits + coef * the model's own aux_loss, same
    gradients; `aux_loss` is logged; router_aux_loss_coef 0 turns it off; a dense model refuses a coefficient."""
    from prefopt.losses.reference import reference_dpo_loss
    from prefopt.trainer import PrefoptInputError
    from prefopt.trainer.data import load_tokenizer

    vocab = load_tokenizer(None).vocab_size
    model = _moe_model("qwen2_moe", vocab=vocab, coef=0.05)
    trainer = _trainer(model, tmp_path, router_aux_loss_coef=0.3)
    assert trainer.router_aux_coef == 0.3
    indices = trainer._indices(0)[0]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss, stats = trainer._micro_loss(indices)
    got = torch.autograd.grad(loss, list(params.values()))
    batch = trainer._batch(indices)
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    tok = torch.log_softmax(out.logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
    with torch.no_grad():
        ref_tok = trainer.reference.adapter.module(input_ids=batch["input_ids"],
                                                   attention_mask=batch["attention_mask"]).logits
        ref_tok = torch.log_softmax(ref_tok, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        ref_tok = ref_tok * (labels != -100)
    P = len(indices)
    seq, ref_seq = tok.sum(-1), ref_tok.sum(-1)
    want_loss = reference_dpo_loss(seq[:P], seq[P:], ref_seq[:P], ref_seq[P:], beta=trainer.cfg.beta)
    want_loss = want_loss + 0.3 * out.aux_loss
    want = torch.autograd.grad(want_loss, list(params.values()))
    # float32 model: the fused head and the eager logits differ by float32 summation order
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert stats["aux_loss"][0] / stats["aux_loss"][1] == pytest.approx(float(out.aux_loss.detach()), rel=1e-5)
    for name, x, y in zip(params, got, want):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    history = trainer.train()["history"]
    assert all("aux_loss" in h and math.isfinite(h["aux_loss"]) for h in history)

    off = _trainer(_moe_model("mixtral", vocab=vocab), tmp_path / "off", router_aux_loss_coef=0.0)
    assert off.router_aux_coef == 0.0
    default = _trainer(_moe_model("mixtral", vocab=vocab, coef=0.02), tmp_path / "default")
    assert default.router_aux_coef == 0.02  # null: the model config's coefficient, as TRL
    from tests._tiny import tiny_llama_config, tiny_model
    with pytest.raises(PrefoptInputError, match="router_aux_loss_coef"):
        _trainer(tiny_model(tiny_llama_config(vocab)), tmp_path / "dense", router_aux_loss_coef=0.1)


def test_vlm_image_inputs_reach_the_backbone_float64():
    """LLaVA: token_logps with pixel_values equals the VLM's eager logits (values and the vision tower's gradients),
    and another image gives other log-probs."""
    processor, config = _llava_parts()
    model = _llava(config, dtype=torch.float64)
    rows = preference_texts(3, seed=1)
    batch = processor(images=_images(3), text=["<image> " + p + c for p, c, _ in rows], padding=True,
                      padding_side="right", return_tensors="pt")
    pixel_values = batch["pixel_values"].double()
    completion_mask = batch["attention_mask"].clone()
    completion_mask[:, :6] = 0  # the image tokens and the first words are the prompt
    want, _ = _eager(model, batch["input_ids"], batch["attention_mask"], completion_mask, pixel_values=pixel_values)
    got, _ = token_logps(model, batch["input_ids"], batch["attention_mask"], completion_mask,
                         pixel_values=pixel_values)
    torch.testing.assert_close(got[:, :-1], want, rtol=1e-10, atol=1e-10)
    vision = [p for n, p in model.named_parameters() if "vision_tower" in n and p.dim() == 2][:2]
    vision += [p for n, p in model.named_parameters() if "multi_modal_projector" in n][:1]
    for x, y in zip(torch.autograd.grad(got.sum(), vision), torch.autograd.grad(want.sum(), vision)):
        assert y.abs().sum() > 0
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    other, _ = token_logps(model, batch["input_ids"], batch["attention_mask"], completion_mask,
                           pixel_values=pixel_values.flip(0))
    assert not torch.allclose(other, got, atol=1e-6)


def test_qwen2_vl_image_grid_float64():
    """Qwen2-VL (image_grid_thw, mm_token_type_ids, multimodal RoPE computed by the backbone) against its eager
    logits. Its processor needs a video processor, which needs torchvision (not installed here), so the batch is
    assembled from the PIL image processor and the token ids by hand, and TRL's collator is not used."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision_start, image_pad, vision_end = V, V + 1, V + 2
    config = Qwen2VLConfig(
        text_config=dict(_text_kwargs(V + 3, num_key_value_heads=2),
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        vision_start_token_id=vision_start, image_token_id=image_pad, vision_end_token_id=vision_end,
        tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.float64)
    processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                         temporal_patch_size=2)
    images = processor(images=_images(2, size=28)[:1] + _images(1, seed=2, size=28), return_tensors="pt")
    n_image = int(images["image_grid_thw"][0].prod()) // 4  # merge_size 2 x 2 patches per token
    g = torch.Generator().manual_seed(0)
    input_ids = torch.tensor([[2, 5, vision_start] + [image_pad] * n_image + [vision_end]
                              + torch.randint(4, V, (6,), generator=g).tolist() for _ in range(2)])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, -6:] = 1
    completion_mask[1, -2:] = 0
    inputs = dict(pixel_values=images["pixel_values"].double(), image_grid_thw=images["image_grid_thw"],
                  mm_token_type_ids=(input_ids == image_pad).long())
    want, _ = _eager(model, input_ids, attention_mask, completion_mask, **inputs)
    got, _ = token_logps(model, input_ids, attention_mask, completion_mask, **inputs)
    torch.testing.assert_close(got[:, :-1], want, rtol=1e-10, atol=1e-10)
    vision = [p for n, p in model.named_parameters() if "visual" in n and p.dim() == 2][:2]
    for x, y in zip(torch.autograd.grad(got.sum(), vision), torch.autograd.grad(want.sum(), vision)):
        assert y.abs().sum() > 0
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_trainer_takes_a_vlm(tmp_path):
    """prefopt's trainer on a LLaVA model: its text rows train through the VLM's language model, and image inputs in
    a batch go to the backbone through the trainer's model adapter (equal to the eager logits)."""
    from prefopt.trainer.data import load_tokenizer
    from prefopt.trainer.model import head_operands

    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = load_tokenizer(None).vocab_size
    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=28, patch_size=14),
                         text_config=LlamaConfig(**_text_kwargs(vocab + 1)), image_token_id=vocab,
                         vision_feature_select_strategy="default", tie_word_embeddings=False)
    model = _llava(config)
    trainer = _trainer(model, tmp_path)
    processor, _ = _llava_parts()
    pixel_values = processor.image_processor(images=_images(2), return_tensors="pt")["pixel_values"]
    input_ids = torch.tensor([[2] + [vocab] * 4 + [5, 6, 7, 8], [2] + [vocab] * 4 + [9, 10, 11, 12]])
    labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], 1)
    labels[:, :4] = -100
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                 pixel_values=pixel_values)
    hidden, aux = trainer.adapter.policy_outputs(batch)
    assert aux is None
    import prefopt
    ops = head_operands(trainer.adapter, hidden)
    got = prefopt.linear_logprobs(ops.hidden, ops.weight, labels, ops.bias)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], pixel_values=pixel_values).logits
    want = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    history = trainer.train()["history"]
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)


def test_fallback_warning_names_only_prompt_learning(tmp_path):
    """What the drop-in still hands to TRL's own loss: prompt-learning PEFT (virtual tokens around the backbone),
    and the one-time warning says so."""
    peft = pytest.importorskip("peft")
    from tests._tiny import tiny_llama_config, tiny_model

    tokenizer = build_tokenizer([" ".join(all_words())], vocab_size=V)
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[],
                         use_cpu=True, bf16=False, max_length=32, disable_tqdm=True, save_strategy="no")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PrefoptDPOTrainer(model=tiny_model(tiny_llama_config(V), seed=5), args=args,
                                    train_dataset=preference_dataset(4, seed=3), processing_class=tokenizer,
                                    peft_config=peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.warns(UserWarning, match="prompt-learning PEFT") as caught:
        trainer.train()
    messages = [str(w.message) for w in caught if "prefopt" in str(w.message)]
    assert len(messages) == 1 and "vision" not in messages[0] and "MoE" not in messages[0]
