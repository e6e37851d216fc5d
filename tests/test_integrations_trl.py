"""prefopt.integrations.trl: a TRL DPOTrainer run gives the same losses / grad norms / metrics with prefopt."""
import contextlib
import math
import warnings

import pytest
import torch

pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

from prefopt.integrations.trl import PrefoptDPOTrainer, install_prefopt_forward, patch_dpo_trainer  # noqa: E402
from tests._tiny import (all_words, build_tokenizer, preference_dataset, tiny_gemma2_config,  # noqa: E402
                         tiny_llama_config, tiny_model)

VOCAB = 48
COMPARED = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
            "logps/rejected", "entropy", "logits/chosen", "logits/rejected")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([" ".join(all_words())], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def dataset():
    return preference_dataset(8, seed=3)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The tiny models saved once, so TRL can build its reference copy from the path (as from a hub id)."""
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for kind in ("llama", "gemma2"):
        dirs[kind] = str(root / kind)
        _model(kind).save_pretrained(dirs[kind])
    return dirs


def _model(kind="llama"):
    if kind == "gemma2":
        return tiny_model(tiny_gemma2_config(VOCAB, final_logit_softcapping=3.0, initializer_range=0.2), seed=5)
    return tiny_model(tiny_llama_config(VOCAB, initializer_range=0.1), seed=5)


def _run(trainer_cls, tokenizer, dataset, tmp_path, *, model_kind="llama", peft_config=None, patch=False,
         ref_model=False, model_dirs=None, **config):
    torch.set_num_threads(1)
    prefopt_run = patch or issubclass(trainer_cls, PrefoptDPOTrainer)
    args = trl.DPOConfig(output_dir=str(tmp_path / trainer_cls.__name__), per_device_train_batch_size=2,
                         max_steps=3, logging_steps=1, learning_rate=config.pop("learning_rate", 5e-3),
                         report_to=[], use_cpu=True, seed=0, save_strategy="no", max_length=32,
                         disable_tqdm=True, dataloader_num_workers=0, bf16=config.pop("bf16", False), **config)
    model = _model(model_kind)
    if model_dirs is not None:  # by path: TRL loads the policy and builds its own reference model
        model = model_dirs[model_kind]
        args.model_init_kwargs = {"dtype": torch.float32,
                                  "attn_implementation": "eager" if model_kind == "gemma2" else "sdpa"}
    kwargs = {}
    if ref_model:
        kwargs["ref_model"] = _model(model_kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=peft_config, **kwargs)
        if patch:
            patch_dpo_trainer(trainer)
        return trainer, _train_logged(trainer, prefopt_run)


def _train_logged(trainer, prefopt_run, steps=3):
    """Train; the per-step logs. Where prefopt runs, its head ran, TRL's never did, and no batch fell back to TRL's
    loss."""
    with _spy(prefopt_run) as calls:
        trainer.train()
    if prefopt_run:
        assert calls["prefopt"] > 0 and calls["trl"] == 0, calls
        assert not getattr(trainer, "_prefopt_warned", False)
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logs) == steps
    return logs


@contextlib.contextmanager
def _spy(forbid_trl):
    """Count calls of prefopt's fused head and of TRL's chunked head (TRL's is an error when forbid_trl)."""
    import prefopt
    import trl.trainer.utils as trl_utils

    calls = {"prefopt": 0, "trl": 0}
    linear_logprobs, trl_fn = prefopt.linear_logprobs, trl_utils._ChunkedLogProbFunction

    def counting(*args, **kwargs):
        calls["prefopt"] += 1
        return linear_logprobs(*args, **kwargs)

    class TrlSpy:
        @staticmethod
        def apply(*args):
            calls["trl"] += 1
            if forbid_trl:
                raise AssertionError("TRL's fused head ran in a prefopt run")
            return trl_fn.apply(*args)

    prefopt.linear_logprobs, trl_utils._ChunkedLogProbFunction = counting, TrlSpy
    try:
        yield calls
    finally:
        prefopt.linear_logprobs, trl_utils._ChunkedLogProbFunction = linear_logprobs, trl_fn


def _assert_same(ref_logs, logs, keys=COMPARED, rtol=1e-4, atol=1e-5):
    for step, (a, b) in enumerate(zip(ref_logs, logs)):
        for key in keys:
            if key not in a:
                continue
            assert key in b, f"step {step}: metric {key} missing from the prefopt logs"
            assert math.isclose(a[key], b[key], rel_tol=rtol, abs_tol=atol), \
                f"step {step}: {key} TRL {a[key]!r} vs prefopt {b[key]!r}"
        # An accuracy is the sign of each pair's margin. While the policy still equals its reference (step 0)
        # every margin is rounding noise (~1e-7) whose sign differs between implementations, so accuracies
        # are compared only once the mean margin stands clear of that noise.
        if abs(a.get("rewards/margins", 1.0)) > 1e-4:
            assert a.get("rewards/accuracies") == b.get("rewards/accuracies")
        assert a.get("num_tokens") == b.get("num_tokens")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_trainer_matches_trl(tokenizer, dataset, tmp_path, model_dirs, loss_type):
    ref_trainer, ref = _run(trl.DPOTrainer, tokenizer, dataset, tmp_path, model_dirs=model_dirs,
                            loss_type=loss_type)
    trainer, got = _run(PrefoptDPOTrainer, tokenizer, dataset, tmp_path, model_dirs=model_dirs, loss_type=loss_type)
    assert ref[0]["loss"] != ref[2]["loss"]  # the model moved: later steps test the gradients too
    _assert_same(ref, got)
    assert set(ref[0]) <= set(got[0]), f"missing metric names: {set(ref[0]) - set(got[0])}"
    assert getattr(trainer.model, "_prefopt_forward_installed", False)
    if loss_type == "sigmoid":  # evaluation (prediction_step -> compute_loss) goes the same way
        eval_ds = preference_dataset(4, seed=9)
        a = ref_trainer.evaluate(eval_ds)
        b = trainer.evaluate(eval_ds)
        for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen", "eval_entropy"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-5), (key, a[key], b[key])


def test_precompute_ref_log_probs(tokenizer, dataset, tmp_path):
    _, ref = _run(trl.DPOTrainer, tokenizer, dataset, tmp_path, precompute_ref_log_probs=True)
    trainer, got = _run(PrefoptDPOTrainer, tokenizer, dataset, tmp_path, precompute_ref_log_probs=True)
    _assert_same(ref, got)
    # the precomputed columns came from prefopt's path and equal the untrained model's logps
    ds = trainer.train_dataset
    assert "ref_chosen_logps" in ds.column_names
    fresh = _model()
    from prefopt.integrations.transformers import sequence_logps
    batch = trainer.data_collator([ds[i] for i in range(2)])
    with torch.no_grad():
        logps, _ = sequence_logps(fresh, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    torch.testing.assert_close(torch.tensor(ds["ref_chosen_logps"][:2]), logps[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(ds["ref_rejected_logps"][:2]), logps[2:], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    dict(loss_type="robust", label_smoothing=0.1, f_divergence_type="js_divergence"),
    dict(loss_type="sigmoid", use_weighting=True, ld_alpha=0.5),
    dict(loss_type=["apo_zero", "bco_pair", "sigmoid_norm"], loss_weights=[1.0, 0.3, 0.2]),
], ids=["sigmoid+sft", "robust-js", "wpo-ld", "apo+bco+norm"])
def test_dpo_trainer_options_match_trl(tokenizer, dataset, tmp_path, config):
    # explicit ref_model (no path needed)
    _, ref = _run(trl.DPOTrainer, tokenizer, dataset, tmp_path, ref_model=True, **dict(config))
    _, got = _run(PrefoptDPOTrainer, tokenizer, dataset, tmp_path, ref_model=True, **dict(config))
    _assert_same(ref, got)


@pytest.mark.parametrize("config", [
    dict(loss_type="sigmoid", label_smoothing=0.1),
    dict(loss_type=["sigmoid", "robust"], loss_weights=[1.0, 0.5], label_smoothing=0.1),
    dict(loss_type=["robust", "sigmoid", "sft"], loss_weights=[0.7, 1.0, 0.3], label_smoothing=0.2),
    pytest.param(dict(loss_type=["exo_pair", "aot", "sigmoid"], label_smoothing=0.1), marks=pytest.mark.slow),
], ids=["sigmoid", "sigmoid+robust", "robust+sigmoid+sft", "exo+aot+sigmoid"])
def test_label_smoothing_matches_trl(tokenizer, dataset, tmp_path, config):
    """TRL 1.16 ignores label_smoothing in sigmoid (and reads it in robust): the drop-in must too. cDPO
    smoothing on sigmoid moves the first-step gradient norm by 9-20%, far outside these tolerances."""
    _, ref = _run(trl.DPOTrainer, tokenizer, dataset, tmp_path, ref_model=True, **dict(config))
    _, got = _run(PrefoptDPOTrainer, tokenizer, dataset, tmp_path, ref_model=True, **dict(config))
    assert ref[0]["loss"] != ref[2]["loss"]
    _assert_same(ref, got, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_peft_reference_is_adapter_disabled(tokenizer, dataset, tmp_path):
    peft = pytest.importorskip("peft")

    def lora():
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

    _, ref = _run(trl.DPOTrainer, tokenizer, dataset, tmp_path, peft_config=lora(), learning_rate=5e-2)
    trainer, got = _run(PrefoptDPOTrainer, tokenizer, dataset, tmp_path, peft_config=lora(), learning_rate=5e-2)
    assert trainer.ref_model is None
    assert ref[2]["rewards/margins"] != 0.0  # the adapter moved away from the (adapter-disabled) reference
    _assert_same(ref, got)


@pytest.mark.slow
def test_patch_existing_trainer_and_gemma2_softcap(tokenizer, dataset, tmp_path):
    _, ref = _run(trl.DPOTrainer, tokenizer, dataset, tmp_path, model_kind="gemma2", ref_model=True)
    trainer, got = _run(trl.DPOTrainer, tokenizer, dataset, tmp_path, model_kind="gemma2", ref_model=True,
                        patch=True)
    assert type(trainer).__name__ == "PrefoptDPOTrainer" and isinstance(trainer, trl.DPOTrainer)
    _assert_same(ref, got)


def test_patched_forward_keeps_the_original(tokenizer):
    model = _model()
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(input_ids=ids).logits
    install_prefopt_forward(model)
    install_prefopt_forward(model)  # idempotent
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    out = model(input_ids=ids, prefopt={"completion_mask": torch.tensor([[0, 1, 1, 1]]), "entropy": True,
                                        "logit_stats": True})
    ref = torch.log_softmax(before[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out.log_probs[0, :-1], ref, rtol=1e-5, atol=1e-5)
    assert out.log_probs[0, -1] == 0 and not out.label_mask[0, -1]
    torch.testing.assert_close(out.mean_logits[0, :-1], before[0, :-1].mean(-1), rtol=1e-5, atol=1e-5)
    assert out.is_top1[0, :-1].tolist() == (before[0, :-1].argmax(-1) == ids[0, 1:]).tolist()


def test_patch_rejects_non_dpo_trainer():
    with pytest.raises(TypeError):
        patch_dpo_trainer(object())


@pytest.mark.slow
def test_bf16_autocast_close(tokenizer, dataset, tmp_path, model_dirs):
    """TRL's default mixed precision (bf16 autocast, on CPU too): prefopt's head runs in the autocast dtype."""
    _, ref = _run(trl.DPOTrainer, tokenizer, dataset, tmp_path, model_dirs=model_dirs, bf16=True)
    _, got = _run(PrefoptDPOTrainer, tokenizer, dataset, tmp_path, model_dirs=model_dirs, bf16=True)
    _assert_same(ref, got, keys=("loss", "logps/chosen", "logps/rejected", "entropy"), rtol=2e-2, atol=2e-2)
