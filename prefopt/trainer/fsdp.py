"""FSDP2 for the trainer (`--fsdp`): sharding, bf16 mixed precision, sharded checkpoints.

Wrapping: `fully_shard` on each decoder layer, then on `InForward`, a root module holding the model whose
forward runs a function it is given. The trainer passes the whole policy (or reference) computation into it
(backbone, fused head from the hidden states, loss), so everything that touches a parameter runs inside the
root's forward: the root's hooks gather the parameters outside the decoder layers (embeddings, final norm,
LM head), each layer's hooks its own, and the backward reduce-scatters the gradients onto the shards (averaged
over ranks, as DDP's all-reduce is). The optimizer holds the sharded (`DTensor`) parameters.

Mixed precision (`bf16`): parameters gathered in bfloat16 for compute, gradients reduced in float32, the
sharded master weights and optimizer state stay float32.

Checkpoints: model and optimizer state go through `torch.distributed.checkpoint` (every rank writes its own
shards; no rank ever holds the full state) into `checkpoint-N/sharded/`; the rest of the directory
(scheduler, RNG states, config, trainer_state.json last) and its atomic rename are `checkpoint.save_checkpoint`'s.
A sharded checkpoint is resumed on the same number of processes. The final export (`RUN_DIR/model`) gathers a
full state dict on rank 0 (CPU) and saves it as the unsharded run does.
"""
from __future__ import annotations

import os
import shutil

import torch

SHARDED_DIR = "sharded"   # inside checkpoint-N: the torch.distributed.checkpoint files


class InForward(torch.nn.Module):
    """The FSDP root: `root(fn, *args)` runs `fn(*args)` inside this module's forward (see the module docstring)."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def decoder_layers(module):
    """The repeated blocks to shard one by one: modules named in a transformers model's `_no_split_modules`,
    else the children of the first `layers` / `h` / `blocks` ModuleList; [] (root only) if neither exists."""
    names = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    layers = [m for m in module.modules() if names and type(m).__name__ in names]
    if layers:
        return layers
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return list(m)
    return []


def shard(module, *, device, bf16=False):
    """`fully_shard` the decoder layers of `module` and an `InForward` root around it (in place); returns the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in decoder_layers(module):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    root = InForward(module)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    return root


def run_no_grad(root, fn, *args):
    """A no-grad pass through `root`; its parameters are resharded after (FSDP2 keeps the root's gathered
    parameters after a forward, for the backward that a no-grad pass never runs)."""
    with torch.no_grad():
        out = root(fn, *args)
    root.reshard()
    return out


def _state(root, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(root, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_sharded(run_dir, step, root, optimizer, rank, barrier):
    """Every rank writes its model / optimizer shards into `run_dir/.tmp-sharded-<step>` (collective).

    Returns that directory; `checkpoint.save_checkpoint(..., sharded=it)` (rank 0) moves it into the checkpoint.
    """
    import torch.distributed.checkpoint as dcp

    path = os.path.join(run_dir, f".tmp-sharded-{step}")
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    barrier()
    dcp.save(_state(root, optimizer), checkpoint_id=path)
    barrier()
    return path


def load_checkpoint(path, root, optimizer, scheduler, rank):
    """Restore a sharded checkpoint in place (collective): model / optimizer shards, scheduler, this rank's RNG."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from prefopt.trainer import checkpoint as ckpt
    from prefopt.trainer.config import PrefoptInputError

    state, _ = ckpt.read_checkpoint_meta(path)
    shards = os.path.join(path, SHARDED_DIR)
    if not os.path.isdir(shards):
        raise PrefoptInputError(f"checkpoint {path!r} has no {SHARDED_DIR}/ directory: it was not written by an "
                                "--fsdp run")
    target = _state(root, optimizer)
    dcp.load(target, checkpoint_id=shards)
    set_state_dict(root, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), map_location="cpu", weights_only=False))
    rngs = torch.load(os.path.join(path, "rng.pt"), map_location="cpu", weights_only=False)
    if rank < len(rngs):
        ckpt.set_rng_state(rngs[rank])
    return state


def full_state_dict(root):
    """The model's full state dict on rank 0 (CPU tensors, keys as in the unwrapped model); {} elsewhere.
    Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    prefix = "body."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
