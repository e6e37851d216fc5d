"""Atomic checkpoints: everything is written into a temporary sibling directory, then `os.replace`d.

    RUN_DIR/checkpoint-<step>/
        model.safetensors     model parameters and buffers (safetensors; tied weights handled)
        optimizer.pt          AdamW state
        (--fsdp: sharded/     model + AdamW state as torch.distributed.checkpoint shards, instead of both)
        scheduler.pt          LR scheduler state
        rng.pt                RNG states (torch CPU/CUDA, python, numpy) of every rank
        trainer_state.json    global_step, epoch, samples_seen, total_steps, world_size
        config.json           the TrainConfig of the run (checked on --resume)

A crash while saving leaves at most a `.tmp-checkpoint-*` directory, never a half-written checkpoint-N.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch

from prefopt.trainer.config import PrefoptInputError

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])


def list_checkpoints(run_dir: str) -> list:
    """(step, path) of the complete checkpoints in run_dir, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    out = []
    for name in os.listdir(run_dir):
        m = _CKPT.match(name)
        path = os.path.join(run_dir, name)
        if m and os.path.isfile(os.path.join(path, "trainer_state.json")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(run_dir: str):
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def _replace_dir(tmp: str, final: str):
    if os.path.exists(final):  # re-saving the same step: swap, then drop the old copy
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_checkpoint(run_dir, step, module, optimizer, scheduler, state: dict, config: dict, rng_states: list,
                    save_total_limit=None, sharded=None) -> str:
    """Write checkpoint-<step> atomically (caller: rank 0 only). Returns its path.

    `sharded`: a directory of model / optimizer shards already written by every rank (--fsdp,
    `prefopt.trainer.fsdp.save_sharded`); it is moved in as `sharded/` instead of model.safetensors / optimizer.pt.
    """
    from safetensors.torch import save_model

    final = os.path.join(run_dir, f"checkpoint-{step}")
    tmp = os.path.join(run_dir, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if sharded is None:
            save_model(module, os.path.join(tmp, "model.safetensors"))
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        else:
            os.replace(sharded, os.path.join(tmp, "sharded"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        torch.save(rng_states, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, default=str)
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:  # written last: marks completeness
            json.dump(state, f, indent=2)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if save_total_limit:
        for _, path in list_checkpoints(run_dir)[:-int(save_total_limit)]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def read_checkpoint_meta(path: str):
    """(trainer_state, config) of a checkpoint directory, with clear errors."""
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_file):
        raise PrefoptInputError(f"{path!r} is not a prefopt checkpoint (no trainer_state.json)")
    with open(state_file) as f:
        state = json.load(f)
    cfg_file = os.path.join(path, "config.json")
    config = {}
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            config = json.load(f)
    return state, config


def load_checkpoint(path, module, optimizer, scheduler, rank: int):
    """Restore model/optimizer/scheduler/RNG in place; returns trainer_state."""
    from safetensors.torch import load_model

    state, _ = read_checkpoint_meta(path)
    try:
        load_model(module, os.path.join(path, "model.safetensors"), strict=True)
    except Exception as err:
        raise PrefoptInputError(f"checkpoint {path!r} does not fit this model ({type(err).__name__}: "
                                f"{str(err)[:300]})") from None
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), map_location="cpu", weights_only=False))
    rngs = torch.load(os.path.join(path, "rng.pt"), map_location="cpu", weights_only=False)
    if rank < len(rngs):
        set_rng_state(rngs[rank])
    return state
