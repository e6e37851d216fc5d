"""prefopt_sdpa (prefopt/integrations/attention.py): the unpatched model's results, without a [T, T] mask.

Every comparison runs in float64 against a deep copy of the same model on transformers' own `sdpa` attention, so the
only differences are summation-order rounding (1e-12 on values of order 1).
"""
import contextlib
import copy

import pytest
import torch

pytest.importorskip("transformers")

import prefopt.integrations.attention as attention  # noqa: E402
from prefopt.integrations import transformers as hf  # noqa: E402
from prefopt.integrations.attention import ATTENTION_NAME, segments_of, use_linear_attention  # noqa: E402
from tests._probes import SquareTensors  # noqa: E402
from tests._tiny import tiny_gemma2_config, tiny_llama_config, tiny_model  # noqa: E402

VOCAB = 61
TOL = 1e-10  # float64: rounding of a few hundred products of order 1, far below any real difference (1e-3 here)


def _pair(kv_heads=4, **overrides):
    """(stock, patched): the same float64 tiny Llama, once on sdpa and once switched to prefopt_sdpa."""
    stock = tiny_model(tiny_llama_config(VOCAB, hidden_size=32, layers=2, heads=4, num_key_value_heads=kv_heads,
                                         initializer_range=0.2, **overrides), seed=3, dtype=torch.float64)
    patched = copy.deepcopy(stock)
    assert use_linear_attention(patched)
    assert patched.config._attn_implementation == ATTENTION_NAME and stock.config._attn_implementation == "sdpa"
    return stock, patched


def _packed(lengths):
    ids = torch.randint(4, VOCAB, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return ids, pos


def _padded():
    """Right padding, left padding, a hole inside a row, a row without padding, an empty row."""
    ids = torch.randint(4, VOCAB, (5, 13))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    mask[1, :4] = 0
    mask[2, 5:8] = 0
    mask[4] = 0
    return ids, mask


@contextlib.contextmanager
def _segment_calls():
    """Counts the attention calls prefopt_sdpa runs itself (per segment), as opposed to handing them to sdpa."""
    calls, inner = [0], attention._segment_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    attention._segment_attention = counting
    try:
        yield calls
    finally:
        attention._segment_attention = inner


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_row_equals_sdpa_values_and_gradients(kv_heads):
    stock, patched = _pair(kv_heads)
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, pos = _packed([7, 1, 12, 5])
    weights = torch.randn(1, ids.shape[1], VOCAB, dtype=torch.float64)
    outs = []
    with _segment_calls() as calls:
        for model in (stock, patched):
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            (logits * weights).sum().backward()
            outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert calls[0] == 4  # 2 layers, forward and the checkpointed recomputation
    assert (outs[0][0] - outs[1][0]).abs().max() < TOL
    for name, grad in outs[0][1].items():
        assert (grad - outs[1][1][name]).abs().max() < TOL * max(1.0, float(grad.abs().max())), name
    # the packing matters (so the comparison above can fail): the same tokens as one sequence differ
    assert (stock(input_ids=ids, use_cache=False).logits - outs[0][0]).abs().max() > 1e-4


def test_padded_batch_equals_sdpa_on_real_tokens_and_gradients():
    stock, patched = _pair()
    ids, mask = _padded()
    real = mask.bool().unsqueeze(-1)
    weights = torch.randn(*ids.shape, VOCAB, dtype=torch.float64) * real
    outs = []
    with _segment_calls() as calls:
        for model in (stock, patched):
            logits = model(input_ids=ids, attention_mask=mask).logits
            (logits * weights).sum().backward()
            outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert calls[0] == 2
    # padding positions are 0 in prefopt_sdpa (nothing reads them); every real token's output matches
    assert ((outs[0][0] - outs[1][0]).abs() * real).max() < TOL
    for name, grad in outs[0][1].items():
        assert (grad - outs[1][1][name]).abs().max() < TOL * max(1.0, float(grad.abs().max())), name


def test_plain_batch_and_generation_unchanged():
    stock, patched = _pair(kv_heads=2)
    ids = torch.randint(4, VOCAB, (2, 9))
    assert (stock(input_ids=ids).logits - patched(input_ids=ids).logits).abs().max() < TOL
    # generation: the prefill runs per segment, the decoding steps (query shorter than the keys) on transformers' sdpa
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as generate() expects
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(stock.generate(ids, attention_mask=mask, **kwargs),
                       patched.generate(ids, attention_mask=mask, **kwargs))


def test_no_square_tensor_forward_or_backward():
    length = 96  # every other dimension here is smaller (H 32, V 61, 4 heads)
    stock, patched = _pair()
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, pos = _packed([40, 56])
    for model, expect_square in ((patched, False), (stock, True)):
        probe = SquareTensors(length)
        with probe:
            hidden = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
            hidden.square().sum().backward()
        assert bool(probe.found) == expect_square, probe.found[:3]


def test_sequence_logps_padding_free_needs_no_setup():
    """The HF integration on a packed row (position_ids, attention_mask=None) switches the model itself, runs no
    [T, T] op, and equals the padded batch on the unpatched model."""
    stock, _ = _pair()
    model = copy.deepcopy(stock)
    lengths = [48, 50]
    ids, pos = _packed(lengths)
    completion = torch.ones_like(ids)
    completion[0, :5] = 0
    completion[0, lengths[0]:lengths[0] + 7] = 0
    probe = SquareTensors(sum(lengths))
    with probe:
        packed, _ = hf.sequence_logps(model, ids, None, completion, position_ids=pos)
    assert model.config._attn_implementation == ATTENTION_NAME and not probe.found
    rows = torch.zeros(2, max(lengths), dtype=torch.long)
    mask, comp = torch.zeros_like(rows), torch.zeros_like(rows)
    for i, (start, n) in enumerate(((0, lengths[0]), (lengths[0], lengths[1]))):
        rows[i, :n], mask[i, :n], comp[i, :n] = ids[0, start:start + n], 1, completion[0, start:start + n]
    with torch.no_grad():
        padded, _ = hf.sequence_logps(copy.deepcopy(stock).eval(), rows, mask, comp)
        # the reference: the model on sdpa, its own logits
        logits = stock(input_ids=rows, attention_mask=mask).logits.log_softmax(-1)
    eager = (logits[:, :-1].gather(-1, rows[:, 1:, None]).squeeze(-1) * comp[:, 1:]).sum(-1)
    assert (packed - eager).abs().max() < 1e-9 and (padded - eager).abs().max() < 1e-9


def test_masks_that_are_not_block_causal_keep_transformers_sdpa():
    from transformers.masking_utils import (and_masks, causal_mask_function, or_masks, packed_sequence_mask_function,
                                            sliding_window_causal_mask_function)
    seq = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    packed = and_masks(causal_mask_function, packed_sequence_mask_function(seq))
    assert segments_of(packed, 1, 7).tolist() == [[0, 0, 0, 1, 1, 1, 1]]
    padding = torch.tensor([[True, True, False, True, True, True, False]])
    assert segments_of(packed, 1, 7, padding).tolist() == [[0, 0, -1, 1, 1, 1, -1]]
    assert segments_of(sliding_window_causal_mask_function(8), 1, 7).tolist() == [[0] * 7]  # window >= length
    assert segments_of(sliding_window_causal_mask_function(3), 1, 7) is None      # a window inside a segment
    image = lambda b, h, q, kv: (q >= 2) & (q <= 4) & (kv >= 2) & (kv <= 4)     # noqa: E731  bidirectional block
    assert segments_of(or_masks(causal_mask_function, image), 1, 7) is None
    gap = lambda b, h, q, kv: kv != 1                                           # noqa: E731  a hole in the past
    assert segments_of(and_masks(causal_mask_function, gap), 1, 7) is None


def test_sliding_window_model_equals_sdpa():
    from transformers import MistralConfig
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=6, max_position_embeddings=64,
                        initializer_range=0.2, pad_token_id=0)
    stock = tiny_model(cfg, seed=2, dtype=torch.float64)
    patched = copy.deepcopy(stock)
    assert use_linear_attention(patched)
    for lengths, own in (([5, 4, 6], True), ([9, 11], False)):  # segments inside the window, and longer
        ids, pos = _packed(lengths)
        with _segment_calls() as calls:
            patched(input_ids=ids, position_ids=pos, use_cache=False)
        assert calls[0] == (2 if own else 0)
        diff = stock(input_ids=ids, position_ids=pos, use_cache=False).logits - \
            patched(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert diff.abs().max() < TOL


def test_eager_models_are_left_alone():
    model = tiny_model(tiny_gemma2_config(VOCAB), seed=0)  # eager: Gemma 2's attention softcapping
    assert not use_linear_attention(model) and model.config._attn_implementation == "eager"


def test_trainer_padding_free_step_runs_no_square_op(tmp_path):
    """The trainer's packed micro-batch (the long-sequence recipe) goes through prefopt_sdpa: no op of its forward or
    backward makes a [N, N] tensor, N the packed row's length (above every other dimension here)."""
    from prefopt.trainer import TrainConfig, Trainer
    trainer = Trainer(TrainConfig(output_dir=str(tmp_path / "run"), padding_free=True, per_device_train_batch_size=8,
                                  gradient_checkpointing=True, model_config={"hidden_size": 32}, max_steps=1))
    trainer.ref_table = None  # what train() sets before its loop (no precomputed reference)
    batch = trainer._batch(list(range(8)))
    length = batch["input_ids"].shape[1]
    assert length > max(trainer.tokenizer.vocab_size, 64) and batch["cu_seqlens"].numel() == 17
    probe = SquareTensors(length)
    with _segment_calls() as calls, probe:
        loss, _ = trainer._micro_loss(list(range(8)))
        loss.backward()
    assert calls[0] >= 6 and not probe.found, probe.found[:3]  # policy, recomputation and reference, 2 layers each
    assert trainer.module.config._attn_implementation == ATTENTION_NAME
