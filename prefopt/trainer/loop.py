"""The training loop: data order, micro-batches, loss through prefopt's fused head, AdamW, checkpoints, DDP.

Everything that can fail on bad input (config, data, tokenizer, model, --resume checkpoint) is checked in
`Trainer.__init__`, before the run directory is created, so a bad invocation leaves no files behind.

Data order: epoch e visits the rows in `randperm(N, seed, e)`; optimizer step s uses the global batch
rows [s' * G, (s' + 1) * G) of its epoch (G = per_device_train_batch_size * world_size * accumulation,
s' = s mod steps_per_epoch; an incomplete last batch is dropped). Micro-batch k of rank r takes a
contiguous slice of it, so a run's losses depend on the global batch only (not on the process count),
and the data position after step s is s itself (what --resume restores).

Multi-process (torchrun / WORLD_SIZE > 1): gloo on CPU, nccl on CUDA. The policy runs inside
DistributedDataParallel (gradients averaged across ranks on the last micro-batch of a step, no_sync before it);
metrics are averaged across ranks. With --fsdp the policy (and a frozen-copy reference) is sharded with FSDP2
instead (`prefopt.trainer.fsdp`): every pass that touches the model runs inside the FSDP root's forward. With
--context_parallel N the ranks form groups of N that read the same rows and split every sequence's tokens
(`prefopt.trainer.context_parallel`); the data order above is then over the world / N data-parallel replicas.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import shutil
import sys
import time

import torch

import prefopt
from prefopt.parallel import destroy_process_group
from prefopt.weights import ld_dpo_token_weights
from prefopt.trainer import checkpoint as ckpt
from prefopt.trainer.config import NonFiniteError, PrefoptInputError, TrainConfig, as_jsonable, resume_mismatch
from prefopt.trainer.data import (DEFAULT_DATASET, DEFAULT_TOKENIZER, IGNORE_INDEX, collate, epoch_order,
                                  load_tokenizer, read_jsonl, text_dataset)
from prefopt.trainer.images import ImageRows, has_images, processor_path
from prefopt.trainer.model import (GivenReference, PrecomputedReference, as_adapter, build_model,
                                   configure_router_aux_loss, data_fingerprint, head_operands, make_reference,
                                   state_hash)

REF_FREE = ("simpo", "cpo", "cpo_hinge", "cpo_ipo", "orpo")
REF_CACHE = "ref_logps.pt"
STOP_ENV = "PREFOPT_STOP_AFTER_STEP"   # test hook: stop (as if killed) after this optimizer step
GRADS_ENV = "PREFOPT_DUMP_GRADS_DIR"   # test hook: rank 0 saves the full gradients of each step there


# ---------------------------------------------------------------------------------------------------------
# distributed helpers
class Dist:
    def __init__(self, device):
        import torch.distributed as dist
        self.dist = dist
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.owned = False
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
            self.owned = True
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def all_reduce_(self, t, op="sum"):
        if self.on and self.world > 1:
            self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM if op == "sum" else self.dist.ReduceOp.MAX)
        return t

    def broadcast_object(self, obj):
        if not (self.on and self.world > 1):
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj):
        if not (self.on and self.world > 1):
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.on and self.world > 1:
            self.dist.barrier()

    def close(self):
        if self.owned and self.dist.is_initialized():
            destroy_process_group()


def _agree(dist, error):
    """Raise the same PrefoptInputError on every rank if any rank hit one (no rank hangs in a collective)."""
    msgs = dist.gather_objects(None if error is None else str(error))
    first = next((m for m in msgs if m), None)
    if first is not None:
        raise error if error is not None else PrefoptInputError(first)


# ---------------------------------------------------------------------------------------------------------
def _resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PrefoptInputError("device=cuda but CUDA is not available")
    return dev


class Trainer:
    """Preference training of `model` (an adapter, HF causal LM or protocol module; default: cfg.model)."""

    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None, ref_model=None):
        """`ref_model` (TRL's `ref_model`): the reference, frozen in place instead of a copy of the initial policy."""
        self.cfg = cfg
        self.device = _resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device if self.device.index is not None
                                  else int(os.environ.get("LOCAL_RANK", "0")))
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dist = Dist(self.device)
        self.rank, self.world = self.dist.rank, self.dist.world
        error = None
        try:
            # the data-parallel replicas (all ranks, or one per context-parallel group) read different rows
            from prefopt.trainer.context_parallel import ContextParallel
            self.cp = ContextParallel(cfg.context_parallel, self.rank, self.world, cfg.context_parallel_balanced)
            self.data_rank, self.data_world = self.cp.data_rank, self.cp.data_world
            self._prepare(model, tokenizer, ref_model)
        except PrefoptInputError as err:
            error = err
        _agree(self.dist, error)

    # ---- setup (no files written) ------------------------------------------------------------------------
    def _prepare(self, model, tokenizer, ref_model=None):
        cfg = self.cfg
        self.images = None  # rows with images: their processor (prefopt/trainer/images.py)
        if cfg.long_context and cfg.dataset is None:  # the preset's generated pairs (prefopt/trainer/long_context.py)
            from prefopt.trainer.long_context import generated_data
            if tokenizer is None and cfg.tokenizer is not None:
                tokenizer = load_tokenizer(cfg.tokenizer)
            global_batch = cfg.per_device_train_batch_size * self.data_world * cfg.gradient_accumulation_steps
            self.tokenizer, self.data_path, self.data = generated_data(cfg, tokenizer, global_batch)
        else:
            self.data_path = cfg.dataset or DEFAULT_DATASET
            rows, kind, skipped = read_jsonl(self.data_path, cfg.skip_bad_rows)
            processor = processor_path(cfg)
            if has_images(rows) and processor is not None:
                ImageRows.check(cfg, tokenizer)
                self.images = ImageRows(processor)
                self.tokenizer = self.images.tokenizer
                self.data = self.images.tokenize(rows, kind, cfg.max_length, self.data_path)
                self.data.skipped = skipped
            elif cfg.processor is not None:
                raise PrefoptInputError(f"--processor is for rows with images; {self.data_path} has none")
            else:
                self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
                self.data = text_dataset(rows, kind, skipped, self.data_path, self.tokenizer, cfg.max_length,
                                         cfg.max_prompt_length, cfg.truncation_mode)
        self.kto = self.data.kind == "unpaired"
        if self.kto and not cfg.is_kto:
            raise PrefoptInputError(f"{self.data_path} holds unpaired rows (prompt/completion/label): use "
                                    f"--loss_type kto (or apo_zero_unpaired)")
        if not self.kto and cfg.is_kto:
            raise PrefoptInputError(f"loss_type {cfg.loss_type!r} needs unpaired rows (prompt/completion/label) "
                                    f"but {self.data_path} holds paired rows (prompt/chosen/rejected)")
        self.ref_free = any(t in REF_FREE for t in cfg.loss_types)
        self.global_batch = cfg.per_device_train_batch_size * self.data_world * cfg.gradient_accumulation_steps
        self.steps_per_epoch = len(self.data) // self.global_batch
        if self.steps_per_epoch == 0:
            replicas = f"{self.data_world} data-parallel replicas" if self.cp.on else f"{self.world} processes"
            raise PrefoptInputError(
                f"{self.data_path} has {len(self.data)} rows but one optimizer step needs {self.global_batch} "
                f"(per_device_train_batch_size {cfg.per_device_train_batch_size} x {replicas} x "
                f"gradient_accumulation_steps {cfg.gradient_accumulation_steps})")
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else \
            max(1, int(math.ceil(cfg.num_train_epochs * self.steps_per_epoch)))
        self.warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(math.ceil(cfg.warmup_ratio * self.total_steps))

        # the model (deterministic for the seed), its reference and the optimizer
        self.adapter = as_adapter(model) if model is not None else build_model(cfg, self.tokenizer.vocab_size)
        self.module = self.adapter.module.to(self.device)
        from prefopt.trainer.context_parallel import check_model
        check_model(self.adapter, self.cp.size)  # before the reference copy: it inherits the split attention
        weight, _ = self.adapter.output_head()
        self.router_aux_coef = configure_router_aux_loss(self.adapter, cfg.router_aux_loss_coef)
        if weight.shape[0] < self.tokenizer.vocab_size:
            raise PrefoptInputError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's output "
                                    f"head only {weight.shape[0]}")
        self.reference = None
        self.ref_hash = None
        if ref_model is not None and (self.ref_free or cfg.reference_free):
            raise PrefoptInputError(f"a ref_model was given but loss {cfg.loss_type!r}"
                                    f"{' with reference_free' if cfg.reference_free else ''} uses no reference")
        if not self.ref_free and not cfg.reference_free:
            self.reference = make_reference(self.adapter) if ref_model is None else \
                GivenReference(ref_model, self.device)
            check_model(self.reference.adapter, self.cp.size)
            if cfg.precompute_ref_log_probs:
                self.ref_hash = state_hash(self.module if ref_model is None else self.reference.adapter.module)
        if cfg.gradient_checkpointing:
            self.adapter.gradient_checkpointing_enable()
        self.fsdp = self.ref_fsdp = None
        if cfg.fsdp:  # shard before the optimizer is built: it must hold the sharded parameters
            if self.world < 2:
                raise PrefoptInputError("--fsdp shards the model across processes: launch with torchrun "
                                        "--nproc_per_node=N (N >= 2)")
            from prefopt.trainer import fsdp
            self.fsdp = fsdp.shard(self.module, device=self.device, bf16=cfg.bf16)
            if self.reference is not None and self.reference.kind == "copy":
                self.ref_fsdp = fsdp.shard(self.reference.adapter.module, device=self.device, bf16=cfg.bf16)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise PrefoptInputError("the model has no trainable parameters")
        self.params = params
        # The policy's hidden states (and MoE router loss): through DistributedDataParallel when several processes
        # train, so DDP averages the gradients (bucketed, overlapped with the backward); the output head's weight is
        # a parameter of the wrapped module, so its gradient from the fused head is averaged too.
        self.ddp = None
        self.policy_outputs = self.adapter.policy_outputs
        if self.world > 1 and self.fsdp is None:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index if self.device.index is not None else 0] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(_PolicyHiddenStates(self.adapter), device_ids=ids,
                                               broadcast_buffers=False)
            self.policy_outputs = self.ddp
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        total, warm = self.total_steps, self.warmup

        def schedule(step):
            if step < warm:
                return float(step + 1) / float(warm + 1)
            return max(0.0, float(total - step) / float(max(1, total - warm)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

        # run directory and --resume (checked, not yet written)
        self.resume_from, self.resume_plan = None, None
        if cfg.resume is not None:
            self.run_dir = cfg.output_dir or os.path.dirname(os.path.abspath(cfg.resume))
            self.resume_plan = self._plan_resume()
            path = self.resume_plan["path"]
            if path is not None:
                state, saved_cfg = ckpt.read_checkpoint_meta(path)
                diffs = resume_mismatch(saved_cfg, cfg)
                if diffs:
                    raise PrefoptInputError(f"--resume: checkpoint {path!r} comes from a different config:\n  "
                                            + "\n  ".join(diffs))
                if cfg.fsdp and state.get("world_size") != self.world:
                    raise PrefoptInputError(f"--resume: the sharded checkpoint {path!r} was written by "
                                            f"{state.get('world_size')} processes; resume it with as many, "
                                            f"not {self.world}")
                if state.get("global_batch", self.global_batch) != self.global_batch:
                    raise PrefoptInputError(f"--resume: checkpoint {path!r} used a global batch of "
                                            f"{state.get('global_batch')} rows, this run {self.global_batch}")
                self.resume_from = self.resume_plan["final"]
        else:
            self.run_dir = cfg.output_dir or os.path.join(
                "runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
            if not cfg.overwrite and ckpt.holds_run(self.run_dir):
                raise PrefoptInputError(f"output_dir {self.run_dir!r} already holds a run: pass --resume to "
                                        "continue it, --overwrite to start it over, or choose another --output_dir")
        _check_writable(self.run_dir)
        self.run_dir = self.dist.broadcast_object(self.run_dir)

    def _plan_resume(self):
        """Rank 0 verifies the checkpoints (sha256 of every file) and picks one; every rank gets its plan."""
        plan, error = None, None
        if self.rank == 0:
            try:
                plan = ckpt.plan_resume(self.run_dir, None if self.cfg.resume == "latest" else self.cfg.resume)
            except PrefoptInputError as err:
                error = str(err) if self.cfg.resume == "latest" else \
                    f"--resume {self.cfg.resume}: {err} (--resume with no path falls back to the newest intact one)"
        plan, error = self.dist.broadcast_object((plan, error))
        if error is not None:
            raise PrefoptInputError(error)
        return plan

    # ---- forward pieces -----------------------------------------------------------------------------------
    def _batch(self, indices, examples=None):
        rows = [self.data.examples[i] for i in indices] if examples is None else examples
        batch = collate(rows, self.data.kind, self.tokenizer.pad_id, self.cfg.padding_free)
        if self.images is not None:  # pixel_values, image_grid_thw, ...: backbone inputs (the model adapter's)
            batch.update(self.images.inputs(rows, batch["input_ids"].shape))
        return self.cp.shard({k: v.to(self.device) for k, v in batch.items()})

    def _policy(self, fn, *args):
        """Run a policy pass: inside the FSDP root's forward under --fsdp (its hooks gather the parameters)."""
        return fn(*args) if self.fsdp is None else self.fsdp(fn, *args)

    def _autocast(self):
        if self.cfg.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sequence_logps(self, adapter, batch, policy_outputs=None):
        """Per-sequence completion log-prob sums [S] (LD-DPO weighted if ld_alpha), token counts [S] and the
        policy's MoE router loss (None without `policy_outputs`, or when off).

        Used for the reference (and KTO); the paired policy pass is one fused_linear_preference_loss call."""
        cfg = self.cfg
        with self._autocast():
            hidden, aux = policy_outputs(batch) if policy_outputs is not None else (adapter.hidden_states(batch), None)
        head = head_operands(adapter, hidden)
        labels = batch["labels"]
        token_logps = prefopt.linear_logprobs(head.hidden, head.weight, labels, ignore_index=IGNORE_INDEX,
                                              temperature=cfg.temperature, softcap=adapter.softcap,
                                              logit_scale=adapter.logit_scale, **head.head_kwargs())
        flat = token_logps.reshape(-1)
        mask = (labels.reshape(-1) != IGNORE_INDEX)
        cu = batch.get("cu_seqlens")
        if cu is None:
            cu = torch.arange(labels.shape[0] + 1, device=flat.device, dtype=torch.long) * labels.shape[1]
        group = self.cp.group  # context parallel: sums over the group's slices of every sequence
        counts = prefopt.sequence_logps(mask.float(), cu_seqlens=cu, group=group)
        weights = mask.float()
        if cfg.ld_alpha is not None and not self.kto:  # LD-DPO: the same token weights as the fused loss
            weights = ld_dpo_token_weights(weights, (cu.numel() - 1) // 2, cfg.ld_alpha, cu, group)
        # float64 sums, as the fused loss forms the policy's: a float32 sum of 1e5-1e6 nats is spaced up to 0.125 at
        # 131072 tokens, coarser than the log-ratios the loss reads from it (docs/trainer.md "Long sequences")
        seq = prefopt.sequence_logps(flat.double(), weights.double(), cu_seqlens=cu, group=group)
        return seq, counts, aux

    def _reference_logps(self, batch):
        with torch.no_grad(), self.reference.context():
            root = self.ref_fsdp if self.reference.kind == "copy" else self.fsdp
            if root is None:
                seq, _, _ = self._sequence_logps(self.reference.adapter, batch)
            else:
                from prefopt.trainer.fsdp import run_no_grad
                seq, _, _ = run_no_grad(root, self._sequence_logps, self.reference.adapter, batch)
        return seq.detach()

    def _kl_examples(self, indices):
        """KTO's mismatched pairs: prompt of row i with the completion of row (i + 1) mod N (dataset order)."""
        n, out = len(self.data), []
        limit = self.cfg.max_length
        for i in indices:
            prompt, comp = self.data.examples[i]["prompt"], self.data.examples[(i + 1) % n]["completion"]
            if limit is not None:
                comp = comp[:max(1, limit - len(prompt))]
            out.append({"prompt": prompt, "completion": comp, "label": True})
        return out

    def _ref_for(self, indices, batch):
        """Reference logps for a micro-batch: [S] (and [B] KL logps for KTO), from the cache or live."""
        if self.reference is None:
            return None, None
        if self.ref_table is not None:
            vals = self.ref_table.lookup(indices).to(self.device, torch.float64)
            if self.kto:
                return vals[:, 0], vals[:, 1]
            return torch.cat([vals[:, 0], vals[:, 1]]), None
        ref = self._reference_logps(batch)
        kl_ref = self._reference_logps(self._batch(None, self._kl_examples(indices))) if self.kto else None
        return ref, kl_ref

    def _precompute_reference(self):
        """Reference logps of every row (rank r does rows r, r + world, ...; summed across ranks), cached."""
        fingerprint = data_fingerprint(self.cfg, self.data.examples, self.ref_hash)
        path = os.path.join(self.run_dir, REF_CACHE)
        table = None
        if os.path.isfile(path):  # never read unverified bytes: a damaged cache is recomputed, and said so
            damage = ckpt.verify_file(path)
            if damage is None:
                table = PrecomputedReference.load(path, fingerprint)
            elif self.rank == 0:
                print(f"prefopt: {damage}: recomputing the reference log-probs", file=sys.stderr, flush=True)
        found = torch.tensor([0.0 if table is None else 1.0])
        self.dist.all_reduce_(found)
        if table is not None and int(found.item()) == self.world:
            return table, True
        n, bs = len(self.data), 4 * self.cfg.per_device_train_batch_size  # no grad: bigger batches
        values = torch.zeros(n, 2, dtype=torch.float64)
        mine = list(range(self.data_rank, n, self.data_world))
        for start in range(0, len(mine), bs):
            idx = mine[start:start + bs]
            batch = self._batch(idx)
            live = self._reference_logps(batch).double().cpu()
            if self.kto:
                kl = self._reference_logps(self._batch(None, self._kl_examples(idx))).double().cpu()
                values[idx, 0], values[idx, 1] = live, kl
            else:
                values[idx, 0], values[idx, 1] = live[:len(idx)], live[len(idx):]
        if self.cp.rank_in_group:  # every rank of a context-parallel group holds the same sums: count them once
            values.zero_()
        values = self.dist.all_reduce_(values.to(self.device)).cpu()
        table = PrecomputedReference(values)
        if self.rank == 0:
            table.save(path, fingerprint)
            ckpt.write_checksum(path)
        return table, False

    def _micro_loss(self, indices):
        """Loss of one micro-batch (mean over its rows) and metric (sum, count) pairs."""
        cfg = self.cfg
        batch = self._batch(indices)
        ref, kl_ref = self._ref_for(indices, batch)
        if cfg.reference_free and ref is None and not self.ref_free:
            n_seq = 2 * len(indices) if not self.kto else len(indices)
            ref = torch.zeros(n_seq, device=self.device)
        stats = {}
        if self.kto:
            seq, _, aux = self._policy(self._sequence_logps, self.adapter, batch, self.policy_outputs)
            with torch.no_grad():
                kl_pol, _, _ = self._policy(self._sequence_logps, self.adapter,
                                            self._batch(None, self._kl_examples(indices)))
            if kl_ref is None:
                kl_ref = torch.zeros_like(kl_pol)
            labels = batch["kto_labels"]
            # log-ratios of the float64 sums; the loss is rounded to float32 once, as the fused DPO loss's
            loss, metrics = prefopt.kto_loss(seq, ref.double(), labels, kl_pol, kl_ref.double(),
                                             beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                                             undesirable_weight=cfg.undesirable_weight, loss_type=cfg.loss_types[0])
            loss = loss.float()
            x = cfg.beta * (seq.detach() - ref.double())
            lp = seq.detach()
            n_d, n_u = float(labels.sum()), float((~labels).sum())
            stats["rewards/chosen"] = (float(x[labels].sum()), n_d)
            stats["rewards/rejected"] = (float(x[~labels].sum()), n_u)
            stats["logps/chosen"] = (float(lp[labels].sum()), n_d)
            stats["logps/rejected"] = (float(lp[~labels].sum()), n_u)
            stats["kl"] = (float(metrics["kl"]), 1.0)
            return self._add_router_aux(loss, aux, stats, 1.0), stats
        # paired: one fused call from the hidden states (policy head, sequence sums, loss; no logits)
        P = len(indices)
        refs = {} if ref is None else dict(ref_chosen_logps=ref[:P], ref_rejected_logps=ref[P:])  # float64 sums
        loss, metrics, aux = self._policy(self._paired_loss, batch, refs)
        for k, v in metrics.items():
            stats[k] = (float(v) * P, float(P))
        return self._add_router_aux(loss, aux, stats, float(P)), stats

    def _add_router_aux(self, loss, aux, stats, weight):
        """loss + router_aux_loss_coef * aux (MoE load balancing, as TRL adds it); logged as `aux_loss`."""
        if aux is None:
            return loss
        stats["aux_loss"] = (float(aux.detach()) * weight, weight)
        return loss + self.router_aux_coef * aux.to(loss.dtype)

    def _paired_loss(self, batch, refs):
        cfg = self.cfg
        with self._autocast():
            hidden, aux = self.policy_outputs(batch)
        head = head_operands(self.adapter, hidden)
        loss, metrics = prefopt.fused_linear_preference_loss(
            head.hidden, head.weight, batch["labels"], cu_seqlens=batch.get("cu_seqlens"), ignore_index=IGNORE_INDEX,
            sequence_parallel_group=self.cp.group,
            temperature=cfg.temperature, softcap=self.adapter.softcap, logit_scale=self.adapter.logit_scale,
            loss_type=cfg.loss_types if len(cfg.loss_types) > 1 else cfg.loss_types[0], beta=cfg.beta,
            ld_alpha=cfg.ld_alpha, use_weighting=cfg.use_weighting, rpo_alpha=cfg.rpo_alpha,
            label_smoothing=cfg.label_smoothing, loss_weights=cfg.loss_weights,
            f_divergence_type=cfg.f_divergence_type, f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
            **head.head_kwargs(), **refs)
        return loss, metrics, aux

    # ---- the loop -----------------------------------------------------------------------------------------
    def _indices(self, step):
        epoch, within = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.data), self.cfg.seed, epoch)
        rows = order[within * self.global_batch:(within + 1) * self.global_batch]
        B = self.cfg.per_device_train_batch_size
        micro = []
        for k in range(self.cfg.gradient_accumulation_steps):
            chunk = rows[k * B * self.data_world:(k + 1) * B * self.data_world]
            micro.append(chunk[self.data_rank * B:(self.data_rank + 1) * B])
        return micro

    def _log(self, record):
        if self.rank != 0:
            return
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def _save(self, step):
        rngs = self.dist.gather_objects(ckpt.rng_state())
        sharded = None
        if self.fsdp is not None:  # every rank writes its shards; rank 0 completes the checkpoint around them
            from prefopt.trainer.fsdp import save_sharded
            sharded = save_sharded(self.run_dir, step, self.fsdp, self.optimizer, self.rank, self.dist.barrier)
        error = None
        if self.rank == 0:
            state = {"global_step": step, "epoch": step / self.steps_per_epoch, "samples_seen": step * self.global_batch,
                     "total_steps": self.total_steps, "world_size": self.world, "global_batch": self.global_batch}
            try:
                self.last_checkpoint = ckpt.save_checkpoint(self.run_dir, step, self.module, self.optimizer,
                                                            self.scheduler, state, as_jsonable(self.cfg), rngs,
                                                            self.cfg.save_total_limit, sharded=sharded)
            except OSError as err:  # e.g. a full disk: the previous checkpoints are untouched
                error = err
        _agree(self.dist, error)  # every rank stops if rank 0 could not write (no rank waits in a barrier)

    def _export_final(self):
        """RUN_DIR/model: save_pretrained for HF models (safetensors) + the tokenizer, else model.safetensors."""
        full = None
        if self.fsdp is not None:  # gathered on rank 0 (collective)
            from prefopt.trainer.fsdp import full_state_dict
            full = full_state_dict(self.fsdp)
        if self.rank != 0:
            return
        final, tmp = os.path.join(self.run_dir, "model"), os.path.join(self.run_dir, ".tmp-model")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if hasattr(self.module, "save_pretrained"):
            with _quiet_hf_progress(not sys.stderr.isatty()):
                self.module.save_pretrained(tmp, state_dict=full)
        elif full is not None:
            from safetensors.torch import save_file
            save_file({k: v.contiguous().clone() for k, v in full.items()}, os.path.join(tmp, "model.safetensors"))
        else:
            from safetensors.torch import save_model
            save_model(self.module, os.path.join(tmp, "model.safetensors"))
        src = self.tokenizer.source
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(tmp, "tokenizer.json"))
        elif self.tokenizer.hf is not None:
            self.tokenizer.hf.save_pretrained(tmp)
        ckpt._replace_dir(tmp, final)

    def train(self) -> dict:
        """Run to total_steps (or the STOP_ENV hook). Returns a summary with the logged history."""
        try:
            backend = prefopt.use_backend(self.cfg.backend) if self.cfg.backend else contextlib.nullcontext()
            with backend:
                summary = self._train()
            self.dist.barrier()  # no rank tears the group down while another is still in a collective
            return summary
        finally:
            self.dist.close()

    def _train(self):
        cfg = self.cfg
        start_step = 0
        self.last_checkpoint = self.resume_from
        if self.rank == 0:
            if cfg.overwrite:
                ckpt.clear_run(self.run_dir)
            os.makedirs(self.run_dir, exist_ok=True)
            if self.resume_plan is not None:  # recovered / damaged checkpoints into place, one line each
                ckpt.apply_resume_plan(self.resume_plan)
                notes = list(self.resume_plan["notes"])
                if self.resume_from is None:
                    notes.append(f"--resume: {self.run_dir} holds no checkpoint yet: starting from step 0")
                for note in notes:
                    print(f"prefopt: {note}", file=sys.stderr, flush=True)
        self.dist.barrier()
        if self.resume_from is not None:
            if self.fsdp is not None:
                from prefopt.trainer.fsdp import load_checkpoint
                state = load_checkpoint(self.resume_from, self.fsdp, self.optimizer, self.scheduler, self.rank)
            else:
                state = ckpt.load_checkpoint(self.resume_from, self.module, self.optimizer, self.scheduler,
                                             self.rank)
            start_step = int(state["global_step"])
        else:
            seed_everything(cfg.seed)
            if self.rank == 0:
                with open(os.path.join(self.run_dir, "config.json"), "w") as f:
                    json.dump(as_jsonable(cfg), f, indent=2)
        if self.resume_plan is not None and self.rank == 0:
            # drop the metrics an interrupted run logged after its last checkpoint (and a torn last line)
            for note in ckpt.trim_metrics(os.path.join(self.run_dir, "metrics.jsonl"), start_step):
                print(f"prefopt: {note}", file=sys.stderr, flush=True)
        self.ref_table, cached = None, False
        if self.reference is not None and cfg.precompute_ref_log_probs:
            self.ref_table, cached = self._precompute_reference()
            # the live reference is no longer needed: free the frozen copy
            self.reference.adapter = None if self.reference.kind == "copy" else self.reference.adapter
        self.module.train()
        stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
        history, window = [], []
        bar = None
        if self.rank == 0:
            note = f" ({self.data.truncated} rows truncated to max_length/max_prompt_length)" if self.data.truncated else ""
            if self.data.skipped:
                note += f" ({len(self.data.skipped)} bad rows skipped, first: {self.data.skipped[0]})"
            print(f"prefopt train: {len(self.data)} {'unpaired' if self.kto else 'paired'} rows from "
                  f"{self.data_path}{note}; {self.total_steps} steps x {self.global_batch} rows; "
                  f"loss {cfg.loss_type}; world {self.world}"
                  + (f" (context parallel {self.cp.size} x data parallel {self.data_world})" if self.cp.on else "")
                  + f"; run dir {self.run_dir}"
                  + (f"; resuming at step {start_step}" if start_step else "")
                  + ("; reference logps from cache" if cached else ""), flush=True)
            # a bar redrawn with \r turns a log file into one interleaved line: plain step lines there
            if not cfg.disable_tqdm and sys.stderr.isatty():
                from tqdm.auto import tqdm
                bar = tqdm(total=self.total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        t0 = time.time()
        interrupted = False
        meter = None
        if cfg.long_context:  # progress of a long-sequence run: seconds and peak memory on every step line
            from prefopt.trainer.long_context import StepMeter
            meter = StepMeter()
        for step in range(start_step, self.total_steps):
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.zero_grad(set_to_none=True)
            sums = {}
            loss_sum = 0.0
            micro_batches = list(self._indices(step))
            for k_micro, indices in enumerate(micro_batches):
                # DDP all-reduces the gradients on the last micro-batch of the step only
                last = k_micro == len(micro_batches) - 1
                if self.fsdp is not None:  # FSDP: reduce-scatter on the last micro-batch only, as DDP
                    self.fsdp.set_requires_gradient_sync(last)
                with (self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()):
                    loss, stats = self._micro_loss(indices)
                    # context parallel: the group's partial gradients must add up under the world average
                    (loss * (self.cp.gradient_scale / cfg.gradient_accumulation_steps)).backward()
                loss_sum += float(loss.detach())
                for k, (s, c) in stats.items():
                    a, b = sums.get(k, (0.0, 0.0))
                    sums[k] = (a + s, b + c)
            if os.environ.get(GRADS_ENV):
                self._dump_grads(os.environ[GRADS_ENV], step + 1)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0
                                                       else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor (already reduced over the shards)
                grad_norm = grad_norm.full_tensor()
            record = self._reduce_metrics(step + 1, loss_sum / cfg.gradient_accumulation_steps, sums,
                                          float(grad_norm), lr)
            if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
                if bar is not None:
                    bar.close()
                self._stop_non_finite(step + 1, record)  # the same values on every rank: all stop
            self.optimizer.step()
            self.scheduler.step()
            if meter is not None:
                record.update(meter.record())
            window.append(record)
            if (step + 1) % cfg.logging_steps == 0 or step + 1 == self.total_steps:
                logged = _average(window)
                window = []
                history.append(logged)
                self._log(logged)
                if bar is not None:
                    bar.write(_fmt(logged))
                elif self.rank == 0:
                    print(_fmt(logged), flush=True)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('rewards/accuracies', 0):.2f}")
            if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < self.total_steps:
                self._save(step + 1)
            if stop_after and step + 1 == stop_after and step + 1 < self.total_steps:
                interrupted = True
                break
        if bar is not None:
            bar.close()
        if not interrupted:
            self._save(self.total_steps)
            self._export_final()
        summary = {"run_dir": self.run_dir, "steps": self.total_steps, "start_step": start_step,
                   "interrupted": interrupted, "seconds": time.time() - t0, "history": history,
                   "truncated_rows": self.data.truncated}
        if self.rank == 0:
            print(_summary_text(summary), flush=True)
        return summary

    def _dump_grads(self, folder, step):
        """The full (unsharded, rank-averaged) gradient of every trainable parameter -> folder/grads-<step>.pt."""
        grads = {}
        for name, p in self.module.named_parameters():
            if p.grad is not None:  # DTensor.full_tensor() is collective: every rank takes part
                grads[name] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().cpu()
        if self.rank == 0:
            os.makedirs(folder, exist_ok=True)
            torch.save(grads, os.path.join(folder, f"grads-{step}.pt"))

    def _stop_non_finite(self, step, record):
        last = self.last_checkpoint
        keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteError(
            f"step {step}: non-finite loss {record['loss']} / gradient norm {record['grad_norm']}; stopped before "
            f"the update, {keep} (a --resume repeats this step: lower --learning_rate or check the data, and "
            f"start over with --overwrite)")

    def _reduce_metrics(self, step, loss, sums, grad_norm, lr):
        keys = sorted(sums)
        vec = torch.tensor([loss] + [v for k in keys for v in sums[k]], dtype=torch.float64)
        if self.world > 1:
            vec = self.dist.all_reduce_(vec.to(self.device)).cpu()
            vec[0] /= self.world
        record = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), "loss": float(vec[0])}
        for i, k in enumerate(keys):
            s, c = float(vec[1 + 2 * i]), float(vec[2 + 2 * i])
            if c > 0:
                record[k] = s / c
        if self.kto and "rewards/chosen" in record and "rewards/rejected" in record:
            record["rewards/margins"] = record["rewards/chosen"] - record["rewards/rejected"]
        record["grad_norm"] = grad_norm
        record["learning_rate"] = lr
        return record


class _PolicyHiddenStates(torch.nn.Module):
    """The policy's forward to its final hidden states (and MoE router loss | None), as a module
    DistributedDataParallel can wrap."""

    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter
        self.body = adapter.module

    def forward(self, batch):
        return self.adapter.policy_outputs(batch)


def _check_writable(run_dir):
    """A clear error, before anything is written, when run_dir cannot be created or written to."""
    path = os.path.abspath(run_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise PrefoptInputError(f"output_dir {run_dir!r} exists and is not a directory")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise PrefoptInputError(f"output_dir {run_dir!r} cannot be created: {probe!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PrefoptInputError(f"output_dir {run_dir!r} is not writable ({probe!r} is read-only for this user)")


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % (2 ** 32))
    except ImportError:  # pragma: no cover
        pass


def _average(records):
    out = {"step": records[-1]["step"], "epoch": records[-1]["epoch"]}
    keys = [k for k in records[-1] if k not in ("step", "epoch")]
    for k in keys:
        vals = [r[k] for r in records if k in r]
        out[k] = max(vals) if k == "peak_rss_mib" else sum(vals) / len(vals)
    out["learning_rate"] = records[-1]["learning_rate"]
    return out


@contextlib.contextmanager
def _quiet_hf_progress(quiet):
    """Turn off transformers' progress bars ("Writing model shards") where a bar would only clutter a log."""
    from transformers.utils import logging as hf_logging
    was_on = hf_logging.is_progress_bar_enabled()
    if quiet and was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_on:
            hf_logging.enable_progress_bar()


def _fmt(rec):
    parts = [f"step {rec['step']:>4}", f"loss {rec['loss']:.4f}"]
    for k in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "grad_norm"):
        if k in rec:
            parts.append(f"{k.split('/')[-1] if k != 'grad_norm' else k} {rec[k]:+.4f}"
                         if k != "rewards/accuracies" else f"acc {rec[k]:.3f}")
    parts.append(f"lr {rec['learning_rate']:.2e}")
    if "peak_rss_mib" in rec:  # --long_context runs
        parts.append(f"{rec['step_seconds']:.1f} s/step | peak RSS {rec['peak_rss_mib']:.0f} MiB")
    return " | ".join(parts)


def _summary_text(summary):
    hist = summary["history"]
    lines = [f"run dir: {summary['run_dir']}  ({summary['seconds']:.1f} s"
             + (", stopped early by " + STOP_ENV if summary["interrupted"] else "") + ")"]
    if hist:
        first, last = hist[0], hist[-1]
        for k in ("loss", "rewards/accuracies", "rewards/margins"):
            if k in first and k in last:
                lines.append(f"  {k:<20} first log (step {first['step']}) {first[k]:+.4f}  ->  "
                             f"last log (step {last['step']}) {last[k]:+.4f}")
        if "peak_rss_mib" in last:
            lines.append(f"  {'peak RSS':<20} {max(h['peak_rss_mib'] for h in hist):.0f} MiB (the process's, "
                         "VmHWM)")
    return "\n".join(lines)


def train(cfg: TrainConfig = None, model=None, tokenizer=None, ref_model=None) -> dict:
    """Build a Trainer for `cfg` (default: the embedded demo) and train. Returns the summary."""
    return Trainer(cfg or TrainConfig(), model=model, tokenizer=tokenizer, ref_model=ref_model).train()
