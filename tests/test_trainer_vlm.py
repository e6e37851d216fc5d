"""`prefopt train` on preference rows with images (prefopt/trainer/images.py): a tiny LLaVA from configs, its processor
saved to a local directory, generated PNG files; the trainer's steps equal TRL 1.16's own DPOTrainer on the same rows,
its batches equal TRL's vision collator's, and the images reach the loss."""
import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from prefopt import cli  # noqa: E402
from prefopt.trainer import PrefoptInputError, TrainConfig, Trainer  # noqa: E402
from prefopt.trainer.data import collate, epoch_order, read_jsonl  # noqa: E402
from prefopt.trainer.images import ImageRows  # noqa: E402
from tests._tiny import preference_texts  # noqa: E402
from tests.test_moe_vlm import _llava, _llava_parts  # noqa: E402

N_ROWS, BATCH, STEPS = 8, 2, 3
METRICS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
           "logps/rejected")
CHAT = ("{% for m in messages %}<|{{ m.role }}|> {% for c in m.content %}{% if c.type == 'image' %}<image> "
        "{% else %}{{ c.text }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|> "
        "{% endif %}")


@pytest.fixture(scope="module")
def vlm_data(tmp_path_factory):
    """A directory with a tiny LLaVA (random weights) and its processor, PNG images, and image JSONL files
    (standard and conversational rows) that name them relative to the file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vlm")
    processor, config = _llava_parts()
    processor.chat_template = CHAT
    model_dir = root / "llava"
    processor.save_pretrained(model_dir)
    _llava(config).save_pretrained(model_dir)
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = preference_texts(N_ROWS, seed=3)
    with open(root / "pairs.jsonl", "w") as f, open(root / "chat.jsonl", "w") as g:
        for i, (prompt, chosen, rejected) in enumerate(rows):
            Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
            f.write(json.dumps({"images": [f"images/{i}.png"], "prompt": "<image> " + prompt, "chosen": chosen,
                                "rejected": rejected}) + "\n")
            g.write(json.dumps({"image": f"images/{i}.png", "prompt": [{"role": "user", "content": prompt}],
                                "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": rejected}]}) + "\n")
    return root


def _trl_rows(path, order):
    """The JSONL rows in `order`, as TRL's vision dataset holds them (PIL images in an `images` column)."""
    from datasets import Dataset
    from PIL import Image

    rows, _, _ = read_jsonl(str(path))
    rows = [rows[i] for i in order]
    return Dataset.from_dict({"images": [[Image.open(p) for p in r["images"]] for r in rows],
                              **{k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}})


def _trl_run(model_dir, dataset, out, dtype):
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForImageTextToText, AutoProcessor

    class InOrder(trl.DPOTrainer):  # the rows in dataset order: prefopt's order, written into the dataset
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    def make():
        return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)

    args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=STEPS, logging_steps=1,
                         learning_rate=5e-3, report_to=[], use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True,
                         dataloader_num_workers=0, bf16=False, max_length=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = InOrder(model=make(), ref_model=make(), args=args, train_dataset=dataset,
                          processing_class=AutoProcessor.from_pretrained(model_dir))
        trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def test_prefopt_train_on_images_matches_trl(vlm_data, tmp_path, capsys):
    """`prefopt train --model <LLaVA dir> --dataset <image JSONL>` (processor from the model directory): 3 steps'
    loss, gradient norm, rewards and log-probs equal TRL's DPOTrainer (float32) on the same rows in the same order."""
    torch.set_num_threads(1)
    run = tmp_path / "run"
    rc = cli.main(["train", "--model", str(vlm_data / "llava"), "--dataset", str(vlm_data / "pairs.jsonl"),
                   "--output_dir", str(run), "--max_steps", str(STEPS), "--per_device_train_batch_size", str(BATCH),
                   "--learning_rate", "5e-3", "--warmup_ratio", "0", "--logging_steps", "1", "--seed", "0",
                   "--disable_tqdm"])
    assert rc == 0, capsys.readouterr().err
    got = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert (run / "model" / "processor_config.json").is_file()  # the final model directory holds the processor

    order = [i for s in range(STEPS) for i in epoch_order(N_ROWS, 0, 0)[s * BATCH:(s + 1) * BATCH]]
    dataset = _trl_rows(vlm_data / "pairs.jsonl", order)
    want = _trl_run(vlm_data / "llava", dataset, tmp_path / "trl32", torch.float32)
    truth = _trl_run(vlm_data / "llava", dataset, tmp_path / "trl64", torch.float64)
    assert len(got) == len(want) == STEPS and want[0]["loss"] != want[2]["loss"]
    eps32 = torch.finfo(torch.float32).eps
    for step, (a, b, t) in enumerate(zip(want, got, truth)):
        for key in METRICS:
            # Both runs share the backbone and differ in the head and loss kernels, i.e. in float32 rounding, amplified
            # by later steps through AdamW. Budget: twice TRL's own float32 distance from its float64 run at this
            # step, plus a few float32 roundings of the logged value (step 1: TRL's float32 run may round like its
            # float64 one while prefopt's head sums in another order).
            allowed = 2 * abs(a[key] - t[key]) + 16 * eps32 * max(abs(t[key]), 1.0)
            assert abs(a[key] - b[key]) <= allowed, f"step {step + 1}: {key}: TRL {a[key]!r}, prefopt {b[key]!r}"
        # accuracies are signs of per-pair margins: compared where the mean margin stands far above the noise
        if abs(t["rewards/margins"]) > 1e3 * abs(a["rewards/margins"] - t["rewards/margins"]) + 1e-3:
            assert a["rewards/accuracies"] == b["rewards/accuracies"]


def test_the_images_reach_the_loss(vlm_data, tmp_path):
    """The first micro-batch's log-probs with its pixel_values differ from those of the same tokens without them
    (the image tokens' embeddings instead of the image features) by far more than float32 rounding."""
    cfg = TrainConfig(model=str(vlm_data / "llava"), dataset=str(vlm_data / "pairs.jsonl"),
                      output_dir=str(tmp_path / "run"), per_device_train_batch_size=BATCH, seed=0)
    trainer = Trainer(cfg)
    batch = trainer._batch(trainer._indices(0)[0])
    assert set(batch) - {"input_ids", "attention_mask", "completion_mask", "labels"} == {"pixel_values"}
    with torch.no_grad():
        with_images, _, _ = trainer._sequence_logps(trainer.adapter, batch)
        text_only, _, _ = trainer._sequence_logps(trainer.adapter, {k: v for k, v in batch.items()
                                                                    if k != "pixel_values"})
    eps32 = torch.finfo(torch.float32).eps
    assert (with_images - text_only).abs().max() > 1e3 * eps32 * with_images.abs().max()


def test_precomputed_reference_equals_the_live_one(vlm_data, tmp_path):
    """precompute_ref_log_probs on image rows: the cached reference log-probs (their batches carry the images too)
    give the steps of the live reference."""
    histories = []
    for precompute in (False, True):
        cfg = TrainConfig(model=str(vlm_data / "llava"), dataset=str(vlm_data / "pairs.jsonl"), max_steps=2,
                          output_dir=str(tmp_path / str(precompute)), per_device_train_batch_size=BATCH, seed=0,
                          learning_rate=5e-3, logging_steps=1, disable_tqdm=True, precompute_ref_log_probs=precompute)
        histories.append(Trainer(cfg).train()["history"])
    eps32 = torch.finfo(torch.float32).eps
    for live, cached in zip(*histories):
        for key in METRICS:  # the same model and kernels; the reference batches are 4x larger (float32 GEMM blocking)
            assert abs(live[key] - cached[key]) <= 64 * eps32 * max(abs(live[key]), 1.0), key
    assert histories[0][1]["rewards/margins"] != 0.0 and (tmp_path / "True" / "ref_logps.pt").is_file()


@pytest.mark.parametrize("name", ["pairs.jsonl", "chat.jsonl"])
def test_batches_equal_trls_vision_collator(vlm_data, name):
    """Standard and conversational (chat template) rows: tokens, masks and pixel_values of a micro-batch equal what
    TRL's DataCollatorForVisionPreference makes of the same rows."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    images = ImageRows(str(vlm_data / "llava"))
    rows, kind, _ = read_jsonl(str(vlm_data / name))
    examples = images.tokenize(rows, kind, None, name).examples[:3]
    batch = collate(examples, kind, images.tokenizer.pad_id)
    batch.update(images.inputs(examples, batch["input_ids"].shape))
    want = DataCollatorForVisionPreference(images.processor)([dict(r) for r in _trl_rows(vlm_data / name, [0, 1, 2])])
    assert set(want) == {"input_ids", "attention_mask", "completion_mask", "pixel_values"}
    for key in ("attention_mask", "completion_mask", "pixel_values"):
        assert torch.equal(batch[key], want[key]), key
    mask = want["attention_mask"].bool()
    assert torch.equal(batch["input_ids"][mask], want["input_ids"][mask])
    if name == "chat.jsonl":  # the template put the image tokens into the user turn
        assert (batch["input_ids"] == images.processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 6 * 4


def test_image_rows_bad_input(vlm_data, tmp_path):
    """Clear errors before a model is built: missing image files (file:line), no processor, settings image rows
    cannot run with, a prompt longer than max_length, --processor on text rows."""
    model, pairs = str(vlm_data / "llava"), str(vlm_data / "pairs.jsonl")

    def fails(pattern, **settings):
        cfg = TrainConfig(**{"model": model, "dataset": pairs, "output_dir": str(tmp_path / "run"), **settings})
        with pytest.raises(PrefoptInputError, match=pattern):
            Trainer(cfg)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"images": ["nope.png"], "prompt": "<image> a", "chosen": "b", "rejected": "c"}) + "\n")
    fails(r"bad.jsonl:1: image file 'nope.png' does not exist", dataset=str(bad))
    fails("need a processor", model="tiny-llama")
    fails("padding_free", padding_free=True)
    kto = tmp_path / "kto.jsonl"
    image = str(vlm_data / "images" / "0.png")  # an absolute path stays as it is
    kto.write_text("".join(json.dumps({"image": image, "prompt": "a", "completion": "b", "label": label}) + "\n"
                           for label in (True, False)))
    fails("must be paired", dataset=str(kto), loss_type="kto")
    fails("drop --tokenizer", tokenizer=model)
    fails(r"row \d+: the prompt has \d+ tokens with its image tokens and max_length is 4", max_length=4)
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    fails("--processor is for rows with images", dataset=str(text), processor=model)
