"""TRL drop-in: `trl.DPOTrainer` on prefopt's fused path, switched on with one line.

    from prefopt.integrations.trl import PrefoptDPOTrainer as DPOTrainer     # same constructor, same DPOConfig

or, for a trainer that already exists (note: reference log-probs precomputed in its constructor stay TRL's):

    trainer = patch_dpo_trainer(trainer)

What changes: the policy and reference forwards run the backbone only; the last hidden states go through
`prefopt.linear_logprobs` (fused LM head with the model's softcap / logit scale, no `[tokens, vocab]` logits),
the per-sequence sums (and LD-DPO weights) through `prefopt.sequence_logps`, and the loss through
`prefopt.preference_loss` (the loss table). Honoured from `DPOConfig`: `loss_type` (str or list) with
`loss_weights`, `beta`, `label_smoothing`, `f_divergence_type` / `f_alpha_divergence_coef`, `discopop_tau`,
`use_weighting` (WPO), `ld_alpha` (LD-DPO), `precompute_ref_log_probs` (/ `precompute_ref_batch_size`),
`rpo_alpha` (older TRL; TRL 1.x spells it `loss_type=[..., "sft"]`), an explicit `ref_model`, PEFT models
(reference = adapter disabled, or the "ref" adapter when re-training a loaded one), mixture-of-experts models
(`router_aux_loss_coef`: the router load-balancing loss added as TRL adds it, `prefopt.integrations.moe`) and
vision-language batches (every input TRL's collator adds, `pixel_values`, `image_grid_thw`, ..., goes to the
backbone; the fused head runs on the language model's hidden states). Metrics keep TRL's names.

Beyond TRL: LoRA on the LM head (`target_modules=[..., "lm_head"]`), which TRL's constructor refuses, runs on the
fused head with augmented operands (`prefopt.integrations.adapters`, exact: gradients reach the adapter).
`PrefoptDPOTrainer` lets such a model through TRL's constructor; `patch_dpo_trainer` cannot (the TRL trainer it
patches was never built).

The override point is `DPOTrainer._compute_loss` (everything `compute_loss`, `training_step`, `evaluate` and
`prediction_step` go through) and `compute_ref_log_probs` (the precompute pass). The policy and the reference
run *through* `model(...)` (a keyword the patched `forward` of the unwrapped transformers model intercepts,
`prefopt.integrations.transformers.install_prefopt_forward`), so DDP / FSDP / DeepSpeed / PEFT wrappers see a
normal forward: under FSDP (accelerate's `fully_shard` per decoder layer + root) and ZeRO-3 their hooks gather
the embeddings, each layer and the LM head (called as a module, with its own hooks), and the head's gradient
is computed inside the forward and lands on the sharded parameters.

Prompt-learning PEFT (prefix / prompt tuning: virtual tokens around the backbone) falls back to TRL's own
`_compute_loss` with a one-time warning; everything else runs on prefopt's path.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import warnings

import torch
from trl import DPOTrainer

import prefopt
from prefopt.integrations import adapters
from prefopt.integrations.transformers import install_prefopt_forward, is_peft_model, unwrap_model
from prefopt.versions import TESTED, check_tested, installed_version
from prefopt.weights import ld_dpo_token_weights, wpo_pair_weights

__all__ = ["PrefoptDPOTrainer", "PrefoptDPOMixin", "patch_dpo_trainer", "install_prefopt_forward",
           "check_trl_internals", "TRLVersionError"]

# batch keys that are not model inputs (TRL's `_non_model_keys`); every other key goes to the model's forward
_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})

# What the drop-in relies on inside TRL, checked before training starts (`check_trl_internals`): the private
# methods it overrides (with the parameters it is called with), the helpers it imports, and the trainer
# attributes it reads. The TRL versions it is tested with are prefopt.versions.TESTED["trl"].
_OVERRIDDEN = {"_compute_loss": ("model", "inputs", "return_outputs"), "compute_ref_log_probs": ("model", "inputs")}
_HELPERS = (("trl.trainer.utils", "use_adapter"), ("trl.models.utils", "disable_gradient_checkpointing"))
_TRAINER_ATTRS = ("args", "accelerator", "model", "ref_model", "beta", "loss_types", "loss_weights",
                  "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef", "use_weighting", "ld_alpha",
                  "precompute_ref_logps", "_metrics", "_total_train_tokens", "aux_loss_enabled",
                  "router_aux_loss_coef")


class TRLVersionError(RuntimeError):
    """The installed TRL lacks something the drop-in overrides or reads (outside the tested range)."""


def _missing_internals(trainer=None):
    missing = []
    for name, params in _OVERRIDDEN.items():
        method = getattr(DPOTrainer, name, None)
        if not callable(method):
            missing.append(f"DPOTrainer.{name}")
            continue
        have = list(inspect.signature(method).parameters)[1:]
        if have[:len(params)] != list(params):
            missing.append(f"DPOTrainer.{name}({', '.join(params)}) (this TRL has ({', '.join(have)}))")
    for module, name in _HELPERS:
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{name}")
    if trainer is not None:
        missing += [f"DPOTrainer.{attr}" for attr in _TRAINER_ATTRS if not hasattr(trainer, attr)]
    return missing


def check_trl_internals(trainer=None):
    """Before training: one warning line if TRL is outside the tested range; a `TRLVersionError` naming what is
    missing if the methods the drop-in overrides (or the attributes it reads, given a `trainer`) are gone."""
    check_tested("trl", "prefopt's TRL drop-in")
    missing = _missing_internals(trainer)
    if missing:
        raise TRLVersionError(f"prefopt's TRL drop-in needs {'; '.join(missing)}, which trl "
                              f"{installed_version('trl')} does not have (tested with trl {TESTED['trl']})")


# ----------------------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------------------
class PrefoptDPOMixin:
    """Overrides of `trl.DPOTrainer` (see the module docstring). Mix in before `DPOTrainer`."""

    def __init__(self, *args, **kwargs):
        check_trl_internals()  # before TRL's constructor (which may already run the reference precompute)
        super().__init__(*args, **kwargs)
        check_trl_internals(self)

    #: log TRL's `logits/chosen`, `logits/rejected` and `mean_token_accuracy` (exact; costs one extra no-grad
    #: forward GEMM over the completion tokens). False skips that pass and logs NaN for them.
    prefopt_logits_metrics = True

    # ---- helpers -------------------------------------------------------------------------------------------
    def _prefopt_supported(self, inputs):
        try:
            unwrap_model(self.model)
        except NotImplementedError:  # prompt-learning PEFT
            return False
        return True

    def _prefopt_fallback_warning(self, inputs):
        if not getattr(self, "_prefopt_warned", False):
            self._prefopt_warned = True
            warnings.warn("prefopt: prompt-learning PEFT adapters (prefix / prompt tuning) are not supported by the "
                          "fused path; using TRL's own loss", stacklevel=3)

    def _prefopt_peft_reference(self):
        """Context that turns the PEFT policy into the reference (adapter disabled, or the 'ref' adapter)."""
        if getattr(self, "ref_model", None) is not None or not is_peft_model(self.accelerator.unwrap_model(self.model)):
            return contextlib.nullcontext()
        from trl.trainer.utils import use_adapter

        peft_model = self.accelerator.unwrap_model(self.model)
        return use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None)

    def _prefopt_sequence_logps(self, per_token, label_mask):
        """Per-sequence sums of the completion log-probs; LD-DPO weights the tail past the shared length."""
        if self.ld_alpha is None:
            return prefopt.sequence_logps(per_token, label_mask)
        weights = ld_dpo_token_weights(label_mask, label_mask.shape[0] // 2, self.ld_alpha)
        return prefopt.sequence_logps(per_token, weights)

    def _prefopt_forward(self, model, inputs, **request):
        request["completion_mask"] = inputs["completion_mask"]
        # accelerate wraps `model.forward` in autocast at prepare time; the patched forward may sit outside that
        # wrapper (installed later), so the trainer's mixed-precision context is applied here as well
        with self.accelerator.autocast():
            return model(**_model_inputs(inputs), use_cache=False, prefopt=request)

    # ---- reference -----------------------------------------------------------------------------------------
    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch (the precompute pass), on prefopt's fused head."""
        if not self._prefopt_supported(inputs):
            return super().compute_ref_log_probs(model, inputs)
        from trl.models.utils import disable_gradient_checkpointing

        install_prefopt_forward(model)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self._prefopt_peft_reference(), self.accelerator.autocast():
            out = self._prefopt_forward(model, inputs)
            ref_logps = self._prefopt_sequence_logps(out.log_probs, out.label_mask)
        return ref_logps.chunk(2, dim=0)

    def _prefopt_reference(self, inputs):
        from trl.models.utils import disable_gradient_checkpointing

        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        ref_model = self.ref_model if self.ref_model is not None else self.model
        install_prefopt_forward(ref_model)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self._prefopt_peft_reference():
            out = self._prefopt_forward(ref_model, inputs)
            ref_logps = self._prefopt_sequence_logps(out.log_probs, out.label_mask)
        return ref_logps.chunk(2, dim=0)

    # ---- loss ----------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        if not self._prefopt_supported(inputs):
            self._prefopt_fallback_warning(inputs)
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        install_prefopt_forward(model)
        completion_mask = inputs["completion_mask"]
        logit_stats = bool(self.prefopt_logits_metrics)
        aux_loss_enabled = bool(self.aux_loss_enabled)
        out = self._prefopt_forward(model, inputs, entropy=True, log_sum_p2=bool(self.use_weighting),
                                    logit_stats=logit_stats, router_aux_loss=aux_loss_enabled)
        per_token, label_mask = out.log_probs, out.label_mask
        logps = self._prefopt_sequence_logps(per_token, label_mask)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        ref_chosen_logps, ref_rejected_logps = self._prefopt_reference(inputs)
        ref_chosen_logps = ref_chosen_logps.to(chosen_logps.device, chosen_logps.dtype)
        ref_rejected_logps = ref_rejected_logps.to(chosen_logps.device, chosen_logps.dtype)
        n_pairs = chosen_logps.shape[0]

        # TRL normalises ipo / sigmoid_norm scores by the (unshifted) completion-mask counts
        chosen_lengths, rejected_lengths = completion_mask.sum(dim=1).chunk(2, dim=0)
        loss_types = list(self.loss_types)
        rpo_alpha = getattr(self.args, "rpo_alpha", None)
        chosen_nll = None
        if "sft" in loss_types or rpo_alpha is not None:
            chosen_mask = label_mask[:n_pairs]
            chosen_nll = -(per_token[:n_pairs] * chosen_mask).sum() / chosen_mask.sum().clamp(min=1)
        policy_weights = None
        if self.use_weighting:  # WPO (Eq. 2): per-pair product of exp(mean aligned token logp), no grad
            policy_weights = wpo_pair_weights(per_token, out.log_sum_sq_probs, label_mask, n_pairs)
        common = dict(beta=self.beta, f_divergence_type=self.f_divergence_type,
                      f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                      discopop_tau=getattr(self.args, "discopop_tau", 0.05), chosen_lengths=chosen_lengths,
                      rejected_lengths=rejected_lengths, policy_weights=policy_weights,
                      bco_running_mean=0.0)  # TRL >= 1.0's bco_pair has no reward shift
        loss = 0.0
        for group_types, group_weights, label_smoothing in _trl_label_smoothing_groups(
                loss_types, list(self.loss_weights), self.label_smoothing):
            # rpo_alpha's NLL term is added once, with the first group
            group_rpo, rpo_alpha = rpo_alpha, None
            group_nll = chosen_nll if ("sft" in group_types or group_rpo is not None) else None
            group_loss, _ = prefopt.preference_loss(
                chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type=group_types,
                loss_weights=group_weights, label_smoothing=label_smoothing, chosen_nll=group_nll,
                rpo_alpha=group_rpo, **common)
            loss = loss + group_loss
        if aux_loss_enabled:  # MoE load balancing, weighted and logged as TRL does
            loss = loss + self.router_aux_loss_coef * out.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(out.aux_loss).mean().item())

        self._prefopt_log_metrics(mode, inputs, out, label_mask, n_pairs, chosen_logps, rejected_logps,
                                  ref_chosen_logps, ref_rejected_logps, logit_stats)
        if return_outputs:
            warnings.warn("`return_outputs=True` recomputes the logits with an extra forward pass (as TRL does)",
                          stacklevel=2)
            with torch.no_grad():
                outputs = model(**_model_inputs(inputs), use_cache=False)
            return loss, outputs
        return loss

    def _prefopt_log_metrics(self, mode, inputs, out, label_mask, n_pairs, chosen_logps, rejected_logps,
                             ref_chosen_logps, ref_rejected_logps, logit_stats):
        """TRL's metrics, under TRL's names, gathered across processes the way TRL gathers them."""
        acc = self.accelerator
        metrics = self._metrics[mode]
        mask = label_mask
        entropy_sum = acc.gather_for_metrics((out.entropy.detach() * mask).sum()).sum()
        total_tokens = acc.gather_for_metrics(mask.sum()).sum()
        metrics["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)
        if mode == "train":
            num_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // getattr(self, "_tp_size", 1)
        metrics["num_tokens"] = [self._total_train_tokens]

        chosen_mask, rejected_mask = mask[:n_pairs], mask[n_pairs:]
        if logit_stats:
            chosen_ml, rejected_ml = out.mean_logits[:n_pairs], out.mean_logits[n_pairs:]
            tc = acc.gather_for_metrics(chosen_ml[chosen_mask].sum()).sum().item()
            nc = acc.gather_for_metrics(chosen_mask.sum()).sum().item()
            tr = acc.gather_for_metrics(rejected_ml[rejected_mask].sum()).sum().item()
            nr = acc.gather_for_metrics(rejected_mask.sum()).sum().item()
            metrics["logits/chosen"].append(tc / nc if nc > 0 else 0.0)
            metrics["logits/rejected"].append(tr / nr if nr > 0 else 0.0)
            correct = acc.gather_for_metrics((out.is_top1[:n_pairs] & chosen_mask).sum()).sum()
            metrics["mean_token_accuracy"].append((correct / nc).item() if nc > 0 else 0.0)
        else:
            for key in ("logits/chosen", "logits/rejected", "mean_token_accuracy"):
                metrics[key].append(float("nan"))

        chosen_rewards = self.beta * (chosen_logps.detach() - ref_chosen_logps.detach())
        rejected_rewards = self.beta * (rejected_logps.detach() - ref_rejected_logps.detach())
        metrics["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(acc.gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(acc.gather(rejected_logps.detach()).mean().item())


def _model_inputs(inputs):
    """The batch keys the model's forward takes (text and, for vision-language models, image inputs)."""
    return {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}


def _trl_label_smoothing_groups(loss_types, loss_weights, label_smoothing):
    """Split a TRL loss list into (types, weights, label_smoothing) groups for `prefopt.preference_loss`.

    TRL >= 1.0 reads `label_smoothing` in robust, exo_pair, aot and aot_unpaired but not in sigmoid, where
    prefopt's loss table applies cDPO smoothing (a native, opt-in option). A drop-in reproduces TRL, so sigmoid
    gets label_smoothing=0 in a group of its own whenever smoothing is on.
    """
    if not label_smoothing or "sigmoid" not in loss_types:
        return [(loss_types, loss_weights, label_smoothing)]
    plain = [(t, w) for t, w in zip(loss_types, loss_weights) if t == "sigmoid"]
    rest = [(t, w) for t, w in zip(loss_types, loss_weights) if t != "sigmoid"]
    groups = [([t for t, _ in plain], [w for _, w in plain], 0.0)]
    if rest:
        groups.append(([t for t, _ in rest], [w for _, w in rest], label_smoothing))
    return groups


class PrefoptDPOTrainer(PrefoptDPOMixin, DPOTrainer):
    """`trl.DPOTrainer` on prefopt's fused path: same constructor, same `DPOConfig`, TRL's metric names."""

    def __init__(self, *args, **kwargs):
        with _lora_head_allowed():
            super().__init__(*args, **kwargs)


class _HeadAdapterCheck(type):
    """Stands in for `BaseTunerLayer` in TRL's constructor check "a PEFT adapter on lm_head is refused": prefopt's
    own check runs instead (LoRA passes; any other adapter on the head raises prefopt's ValueError)."""

    def __instancecheck__(cls, module):
        adapters.check_head_adapter(module)
        return False


class _NoHeadAdapter(metaclass=_HeadAdapterCheck):
    pass


@contextlib.contextmanager
def _lora_head_allowed():
    """TRL 1.16's constructor refuses a PEFT layer on `lm_head` (its fused head reads `lm_head.weight`); prefopt's
    head applies LoRA there, so during construction that one check (`isinstance(..., BaseTunerLayer)` in
    trl/trainer/dpo_trainer.py, its only use there) sees prefopt's check instead."""
    import trl.trainer.dpo_trainer as dpo_module

    original = getattr(dpo_module, "BaseTunerLayer", None)
    if original is None:  # peft not installed: TRL has no such check
        yield
        return
    dpo_module.BaseTunerLayer = _NoHeadAdapter
    try:
        yield
    finally:
        dpo_module.BaseTunerLayer = original


_PATCHED_CLASSES = {}


def patch_dpo_trainer(trainer, *, logits_metrics=True):
    """Switch an existing `trl.DPOTrainer` (or subclass) instance to prefopt's fused path; returns it.

    Its class is swapped for a subclass with `PrefoptDPOMixin` first in the MRO, so the instance, its state and
    callbacks are kept. Reference log-probs already precomputed by its constructor (`precompute_ref_log_probs`)
    are kept as TRL computed them (TRL's own chunked head; equal to prefopt's up to fp rounding).
    """
    if not isinstance(trainer, DPOTrainer):
        raise TypeError(f"patch_dpo_trainer expects a trl.DPOTrainer, got {type(trainer).__name__}")
    check_trl_internals(trainer)
    cls = type(trainer)
    if not issubclass(cls, PrefoptDPOMixin):
        if cls not in _PATCHED_CLASSES:
            _PATCHED_CLASSES[cls] = type(f"Prefopt{cls.__name__}", (PrefoptDPOMixin, cls), {})
        trainer.__class__ = _PATCHED_CLASSES[cls]
    trainer.prefopt_logits_metrics = bool(logits_metrics)
    return trainer
