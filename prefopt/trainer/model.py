"""Model adapters: what the trainer needs from a model is its final hidden states and its output head.

Adapter protocol (any object; `as_adapter` wraps HF causal LMs and protocol modules):

    adapter.module                      the nn.Module whose parameters are trained / saved
    adapter.hidden_states(batch)        -> [B, T, H] final hidden states (final norm applied), or [1, N, H]
                                           for packed batches (batch has position_ids / cu_seqlens, no mask)
    adapter.output_head()               -> (weight [V, H], bias [V] | None)
    adapter.softcap, adapter.logit_scale  logit transform applied before log-softmax (None / 1.0 = none)
    adapter.head_operands(hidden)       HeadOperands (prefopt.integrations.adapters) of the head on `hidden`: LoRA on
                                           the head adds columns; a module may define it, default from output_head()
    adapter.policy_outputs(batch)       -> (hidden, router aux loss | None): the policy pass (MoE models add the
                                           load-balancing loss when `router_aux_coef` is set)

A plain nn.Module plugs in by defining two methods (docs/trainer.md):

    class MyLM(nn.Module):
        def hidden_states(self, batch): ...   # batch["input_ids"], batch.get("attention_mask"), ...
        def output_head(self): return self.head.weight, self.head.bias

References (no gradients): a frozen copy of the initial model, the PEFT base model with the adapters disabled,
or per-sequence reference log-probs precomputed once and cached on disk in the run directory.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import inspect
import json
import os

import torch

from prefopt.trainer.config import PrefoptInputError

TINY_DEFAULTS = dict(hidden_size=64, layers=2, heads=4)


# batch keys the trainer's collate builds that are not backbone inputs (every other key, e.g. a vision-language
# model's pixel_values, goes to the backbone)
_NOT_BACKBONE_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids", "completion_mask", "labels",
                                  "cu_seqlens", "kto_labels"})


class HFCausalLMAdapter:
    """A transformers `*ForCausalLM` or vision-language `*ForConditionalGeneration` (or a PeftModel around one, LoRA
    on the LM head included) through prefopt.integrations.transformers."""

    def __init__(self, model):
        from prefopt.integrations import transformers as hf
        self._hf = hf
        self.module = model
        self.router_aux_coef = 0.0  # set by the trainer for MoE models (prefopt.integrations.moe)

    def hidden_states(self, batch):
        return self._hf.last_hidden_states(self.module, batch["input_ids"], batch.get("attention_mask"),
                                           batch.get("position_ids"), **_backbone_inputs(batch))

    def policy_outputs(self, batch):
        if not self.router_aux_coef:
            return self.hidden_states(batch), None
        return self._hf.last_hidden_states(self.module, batch["input_ids"], batch.get("attention_mask"),
                                           batch.get("position_ids"), return_router_aux_loss=True,
                                           **_backbone_inputs(batch))

    def output_head(self):
        """The base head's (weight, bias); a LoRA adapter on it is applied by `head_operands`."""
        head = self._hf.lm_head_module(self.module)
        return head.weight, getattr(head, "bias", None)

    def head_operands(self, hidden):
        return self._hf.head_operands(self.module, hidden)

    @property
    def softcap(self):
        return self._hf.logit_transform(self.module)[0]

    @property
    def logit_scale(self):
        return self._hf.logit_transform(self.module)[1]

    def is_peft(self):
        return self._hf.is_peft_model(self.module)

    def gradient_checkpointing_enable(self):
        model = self.module
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(self.module, "config"):
            self.module.config.use_cache = False


class ModuleAdapter:
    """Any nn.Module with `hidden_states(batch)` and `output_head()` (optional `softcap`, `logit_scale`)."""

    def __init__(self, module):
        missing = [m for m in ("hidden_states", "output_head") if not callable(getattr(module, m, None))]
        if missing:
            raise PrefoptInputError(f"{type(module).__name__} does not implement the prefopt model protocol: missing "
                                    f"{', '.join(missing)} (see docs/trainer.md); HF causal LMs work as they are")
        self.module = module

    def hidden_states(self, batch):
        return self.module.hidden_states(batch)

    def policy_outputs(self, batch):
        return self.hidden_states(batch), None

    def head_operands(self, hidden):
        from prefopt.integrations.adapters import HeadOperands

        custom = getattr(self.module, "head_operands", None)
        if callable(custom):
            ops = custom(hidden)
            return ops if isinstance(ops, HeadOperands) else HeadOperands(*ops)
        weight, bias = self.output_head()
        return HeadOperands(hidden if hidden.dtype == weight.dtype else hidden.to(weight.dtype), weight, bias)

    def output_head(self):
        head = self.module.output_head()
        return (head[0], head[1]) if isinstance(head, (tuple, list)) else (head, None)

    @property
    def softcap(self):
        return getattr(self.module, "softcap", None) or None

    @property
    def logit_scale(self):
        return float(getattr(self.module, "logit_scale", 1.0) or 1.0)

    def is_peft(self):
        return False

    def gradient_checkpointing_enable(self):
        fn = getattr(self.module, "gradient_checkpointing_enable", None)
        if not callable(fn):
            raise PrefoptInputError(f"gradient_checkpointing=True but {type(self.module).__name__} has no "
                                    "gradient_checkpointing_enable() method")
        fn()


def _backbone_inputs(batch):
    """The batch's backbone keywords: image inputs, and a context-parallel share's split (the attention gathers
    the group's keys and values); a share without a split (None) passes none."""
    return {k: v for k, v in batch.items() if k not in _NOT_BACKBONE_INPUTS and v is not None}


def head_operands(adapter, hidden):
    """The output head's operands on `hidden` (prefopt.integrations.adapters.HeadOperands): the head call is
    `prefopt.linear_logprobs(ops.hidden, ops.weight, labels, **ops.head_kwargs())`."""
    return adapter.head_operands(hidden)


def configure_router_aux_loss(adapter, coef):
    """Settle the MoE load-balancing loss as TRL does: `coef` (TrainConfig.router_aux_loss_coef) if set, else the
    model config's `router_aux_loss_coef`; on when the model returns router logits and the coefficient is not 0.
    Returns the coefficient in use (0.0: off)."""
    if isinstance(adapter, HFCausalLMAdapter):
        from prefopt.integrations import moe
        try:
            value = moe.router_aux_coef(adapter.module, coef)
        except ValueError as err:
            raise PrefoptInputError(str(err)) from None
        adapter.router_aux_coef = value if moe.returns_router_logits(adapter.module) else 0.0
        return adapter.router_aux_coef
    if coef:
        raise PrefoptInputError(f"router_aux_loss_coef is {coef} but {type(adapter.module).__name__} is not a "
                                "Hugging Face mixture-of-experts model (the router loss is read from its router "
                                "logits)")
    return 0.0


def as_adapter(model):
    if isinstance(model, (HFCausalLMAdapter, ModuleAdapter)):
        return model
    if callable(getattr(model, "hidden_states", None)) and callable(getattr(model, "output_head", None)):
        return ModuleAdapter(model)
    if hasattr(model, "get_output_embeddings") and hasattr(model, "config"):
        return HFCausalLMAdapter(model)
    return ModuleAdapter(model)  # raises the protocol error


# ---------------------------------------------------------------------------------------------------------
def build_model(cfg, vocab_size: int):
    """The model named by cfg.model, on CPU, deterministic for cfg.seed. Returns an adapter."""
    name = cfg.model
    if name in ("tiny-llama", "tiny_llama", "tiny-gemma2"):
        from prefopt.integrations.tiny import tiny_gemma2_config, tiny_llama_config, tiny_model
        overrides = dict(cfg.model_config)
        kwargs = {k: overrides.pop(k, v) for k, v in TINY_DEFAULTS.items()}
        max_len = max(256, int(cfg.max_length or 0))
        overrides.setdefault("max_position_embeddings", max_len)
        make = tiny_gemma2_config if name == "tiny-gemma2" else tiny_llama_config
        try:
            config = make(vocab_size, kwargs["hidden_size"], kwargs["layers"], kwargs["heads"], **overrides)
        except (TypeError, ValueError) as err:
            raise PrefoptInputError(f"model_config: {err}") from None
        return HFCausalLMAdapter(tiny_model(config, seed=cfg.seed))
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise PrefoptInputError(f"model directory {name!r} has no config.json")
        auto = _auto_class(name)
        try:
            model = auto.from_pretrained(name, local_files_only=True, dtype=torch.float32)
        except Exception as err:
            raise PrefoptInputError(f"model {name!r}: cannot load ({type(err).__name__}: {err})") from None
        _check_vocab(model, vocab_size)
        return HFCausalLMAdapter(model)
    if ":" in name:
        mod_name, _, fn_name = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as err:
            raise PrefoptInputError(f"model factory {name!r}: {err}") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            params = inspect.signature(factory).parameters
            model = factory(cfg, vocab_size) if len(params) >= 2 else factory()
        return as_adapter(model)
    raise PrefoptInputError(f"model {name!r}: expected 'tiny-llama', 'tiny-gemma2', a local HF model directory or "
                            "'package.module:factory'")


def _auto_class(name):
    """AutoModelForCausalLM, or AutoModelForImageTextToText for a vision-language model (LLaVA, Qwen2-VL, ...)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto import modeling_auto as auto
    try:
        config = type(AutoConfig.from_pretrained(name, local_files_only=True))
    except Exception:  # the load reports it
        return AutoModelForCausalLM
    vlm = config in auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING and config not in auto.MODEL_FOR_CAUSAL_LM_MAPPING
    return AutoModelForImageTextToText if vlm else AutoModelForCausalLM


def _check_vocab(model, vocab_size):
    emb = model.get_output_embeddings()
    if emb is not None and emb.weight.shape[0] < vocab_size:
        raise PrefoptInputError(f"the tokenizer has {vocab_size} tokens but the model's head only "
                                f"{emb.weight.shape[0]}")


# ---------------------------------------------------------------------------------------------------------
# references
class FrozenCopyReference:
    """A deep copy of the policy at step 0, frozen (eval mode, no grad)."""
    kind = "copy"

    def __init__(self, adapter):
        module = copy.deepcopy(adapter.module)
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        self.adapter = as_adapter(module)

    def context(self):
        return contextlib.nullcontext()


class PeftReference:
    """The PEFT base model: the policy itself with its adapters disabled."""
    kind = "peft"

    def __init__(self, adapter):
        self.adapter = adapter

    def context(self):
        return self.adapter.module.disable_adapter()


class GivenReference:
    """A reference model the caller gave (TRL's `ref_model`): frozen in place (eval mode, no grad), not copied.
    The trainer treats it as it treats the frozen copy (its own module: sharded under FSDP, freed after a
    precompute)."""
    kind = "copy"

    def __init__(self, model, device):
        adapter = as_adapter(model)
        adapter.module.to(device)
        adapter.module.eval()
        for p in adapter.module.parameters():
            p.requires_grad_(False)
        self.adapter = adapter

    def context(self):
        return contextlib.nullcontext()


def make_reference(adapter):
    if adapter.is_peft():
        return PeftReference(adapter)
    return FrozenCopyReference(adapter)


def data_fingerprint(cfg, examples, model_state_hash: str) -> str:
    """Identifies precomputed reference log-probs: data tokens + reference weights + what changes logps."""
    h = hashlib.sha256()
    h.update(json.dumps(examples, sort_keys=True).encode())
    h.update(model_state_hash.encode())
    h.update(json.dumps([cfg.temperature, cfg.ld_alpha, cfg.loss_types], default=str).encode())
    h.update(b"sums: float64")  # caches of float32-rounded sums (before this marker) are recomputed
    return h.hexdigest()


def state_hash(module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class PrecomputedReference:
    """Reference log-probs per example (chosen, rejected | completion, kl) loaded from / saved to a file."""
    kind = "precomputed"

    def __init__(self, table: torch.Tensor):
        self.table = table  # [num_examples, k] float64

    @staticmethod
    def load(path, fingerprint):
        if not os.path.isfile(path):
            return None
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("fingerprint") != fingerprint:
            return None
        return PrecomputedReference(blob["logps"])

    def save(self, path, fingerprint):
        tmp = path + ".tmp"
        torch.save({"fingerprint": fingerprint, "logps": self.table}, tmp)
        os.replace(tmp, path)

    def lookup(self, indices):
        return self.table[torch.as_tensor(indices, dtype=torch.long)]
