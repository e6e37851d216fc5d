"""TRL's DPOTrainer with context parallelism: `ContextParallelDPOTrainer`, prefopt's drop-in with every sequence split
over the ranks of a group.

    from prefopt.integrations.trl_context_parallel import ContextParallelDPOTrainer
    group = torch.distributed.new_group([0, 1])        # after accelerate / torchrun set the process group up
    trainer = ContextParallelDPOTrainer(model=..., args=DPOConfig(...), train_dataset=..., processing_class=...,
                                        context_parallel_group=group)

TRL has no context parallelism for DPO, and its data loader gives every process its own rows. This trainer keeps
that pipeline as it is and changes who computes what: in each training step the ranks of a group exchange their
batches (token ids only), then run them one after another, each batch split over the whole group (every rank holds
1/N of each sequence's tokens: `prefopt.integrations.context_parallel.shard_inputs`, attention `prefopt_cp`). A rank
then holds 1/N of one batch's activations at a time instead of its whole batch.

Gradients. Rank r's backward of batch k gives the partial gradient of its tokens; after the N batches it holds
sum_k partial_r(loss_k), and the DDP average over all processes is (1/W) sum over every process's batch of
grad(loss_batch): exactly what TRL computes without the split, so no rescaling. DDP reduces on the last batch only
(`no_sync` before). The same loss, metrics (TRL's names, gathered as TRL gathers them) and reference log-probs as
`PrefoptDPOTrainer` on the same rows, up to float summation order (tests/test_context_parallel.py).

The models must run `sdpa` attention (switched to `prefopt_cp`); padded batches of at least N columns. Evaluation
and the reference precompute go through the same exchange (`prediction_step`, `compute_ref_log_probs`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from trl import DPOTrainer

import prefopt
from prefopt.integrations.context_parallel import SPLIT_KEYWORD, shard_inputs, use_context_parallel
from prefopt.integrations.trl import PrefoptDPOMixin
from prefopt.parallel.collectives import all_reduce_sum, sum_over_group
from prefopt.parallel.layout import check_group
from prefopt.weights import ld_dpo_token_weights, wpo_pair_weights

__all__ = ["ContextParallelDPOMixin", "ContextParallelDPOTrainer"]


class ContextParallelDPOMixin(PrefoptDPOMixin):
    """`PrefoptDPOMixin` with the sequences split over `context_parallel_group` (see the module docstring)."""

    def __init__(self, *args, context_parallel_group, **kwargs):
        self.prefopt_cp_group = check_group("context_parallel_group", context_parallel_group)
        super().__init__(*args, **kwargs)
        for model in (self.model, getattr(self, "ref_model", None)):
            if model is not None:
                use_context_parallel(model)

    # ---- every rank of the group brings its batch; the group runs each of them, split -------------------------
    def _prefopt_group_batches(self, inputs):
        """The group's batches in group-rank order (tensors moved back to this rank's device)."""
        mine = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in inputs.items()}
        every = [None] * dist.get_world_size(self.prefopt_cp_group)
        dist.all_gather_object(every, mine, group=self.prefopt_cp_group)
        device = self.accelerator.device
        return [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()} for batch in every]

    def training_step(self, model, inputs, *args, **kwargs):
        batches = self._prefopt_group_batches(inputs)
        losses = []
        for k, batch in enumerate(batches):
            # DDP reduces once, after the last batch's backward
            sync = contextlib.nullcontext() if k == len(batches) - 1 else self.accelerator.no_sync(model)
            with sync:
                losses.append(super().training_step(model, batch, *args, **kwargs))
        return sum(losses) / len(losses)

    def prediction_step(self, model, inputs, *args, **kwargs):
        batches = self._prefopt_group_batches(inputs)
        outputs = [super(ContextParallelDPOMixin, self).prediction_step(model, batch, *args, **kwargs)
                   for batch in batches]
        return outputs[dist.get_rank(self.prefopt_cp_group)]

    def compute_ref_log_probs(self, model, inputs):
        batches = self._prefopt_group_batches(inputs)
        outputs = [super(ContextParallelDPOMixin, self).compute_ref_log_probs(model, batch) for batch in batches]
        return outputs[dist.get_rank(self.prefopt_cp_group)]

    # ---- the split forward and the sums over the group -------------------------------------------------------
    def _prefopt_forward(self, model, inputs, **request):
        _check_same_batch(inputs["input_ids"], self.prefopt_cp_group)
        local = shard_inputs(self.prefopt_cp_group, inputs["input_ids"], inputs.get("attention_mask"),
                             inputs["completion_mask"])
        request["labels"] = local["labels"]
        with self.accelerator.autocast():
            return model(input_ids=local["input_ids"], attention_mask=local.get("attention_mask"),
                         position_ids=local["position_ids"], use_cache=False, prefopt=request,
                         **{SPLIT_KEYWORD: local[SPLIT_KEYWORD]})

    def _prefopt_sequence_logps(self, per_token, label_mask):
        group = self.prefopt_cp_group
        per_token = per_token.double()
        if self.ld_alpha is None:
            return prefopt.sequence_logps(per_token, label_mask, group=group)
        weights = ld_dpo_token_weights(label_mask, label_mask.shape[0] // 2, self.ld_alpha, None, group)
        return prefopt.sequence_logps(per_token, weights.double(), group=group)

    def _prefopt_chosen_nll(self, per_token, label_mask, n_pairs):
        chosen_mask = label_mask[:n_pairs]
        total = sum_over_group((per_token[:n_pairs] * chosen_mask).sum().reshape(1), self.prefopt_cp_group)
        count = all_reduce_sum(chosen_mask.sum().reshape(1).to(total.dtype), self.prefopt_cp_group)
        return (-total / count.clamp(min=1))[0]

    def _prefopt_wpo_weights(self, per_token, log_sum_p2, label_mask, n_pairs):
        return wpo_pair_weights(per_token, log_sum_p2, label_mask, n_pairs, sequence_group=self.prefopt_cp_group)

    def _prefopt_token_count(self, inputs):
        # every rank of the group holds the whole batch: one of them counts it
        count = inputs["attention_mask"].sum()
        return count if dist.get_rank(self.prefopt_cp_group) == 0 else torch.zeros_like(count)

    def _compute_loss(self, model, inputs, return_outputs):
        if return_outputs:
            raise NotImplementedError("ContextParallelDPOTrainer: return_outputs=True would run the whole batch's "
                                      "logits on one rank")
        return super()._compute_loss(model, inputs, return_outputs)


def _check_same_batch(input_ids, group):
    """Every rank of the group must split the same batch (else each would attend to foreign tokens)."""
    flat = input_ids.reshape(-1).to(torch.int64).cpu()
    weights = torch.arange(flat.numel()) % 1021 + 1
    mine = torch.tensor([*input_ids.shape, int(flat.sum()), int((flat * weights).sum())], dtype=torch.int64)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    if any(not torch.equal(t, table[0]) for t in table):
        raise ValueError("the ranks of a context-parallel group must pass the same batch (ContextParallelDPOTrainer's "
                         "training_step, prediction_step and compute_ref_log_probs exchange them; a direct "
                         "compute_loss call must do the same)")


class ContextParallelDPOTrainer(ContextParallelDPOMixin, DPOTrainer):
    """`PrefoptDPOTrainer` with every sequence split over `context_parallel_group` (module docstring)."""
