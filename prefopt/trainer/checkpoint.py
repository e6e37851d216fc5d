"""Verified, atomic checkpoints: everything is written into a temporary sibling directory, a manifest with the
sha256 of every file is written last, then the directory is `os.replace`d into place.

    RUN_DIR/checkpoint-<step>/
        model.safetensors     model parameters and buffers (safetensors; tied weights handled)
        optimizer.pt          AdamW state
        (--fsdp: sharded/     model + AdamW state as torch.distributed.checkpoint shards, instead of both)
        scheduler.pt          LR scheduler state
        rng.pt                RNG states (torch CPU/CUDA, python, numpy) of every rank
        trainer_state.json    global_step, epoch, samples_seen, total_steps, world_size
        config.json           the TrainConfig of the run (checked on --resume)
        manifest.json         size + sha256 of every other file under the directory (subdirectories too),
                              written last: a checkpoint without it, or whose bytes differ from it, is damaged

`--resume` verifies a checkpoint before reading any of it and falls back to the newest one that verifies,
naming the damaged file. The manifest covers whatever files the directory holds, so a checkpoint layout that
adds files (e.g. sharded state) is covered without changes here, as long as its files are in the temporary
directory when `finalize_checkpoint` runs.

A crash while saving leaves at most a `.tmp-checkpoint-*` directory, never a half-written checkpoint-N. A
re-save of an existing step swaps the two copies with two renames; a crash between them leaves
`checkpoint-N.old` and a verified `.tmp-checkpoint-N`, which `plan_resume` recognises and `apply_resume_plan`
puts back in place. Single files that are reused across runs (the cached reference log-probs) carry a
`<file>.sha256` sidecar in `sha256sum` format (`write_checksum` / `verify_file`).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil

import torch

from prefopt.trainer.config import PrefoptInputError

_CKPT = re.compile(r"^checkpoint-(\d+)$")
_TMP = re.compile(r"^\.tmp-checkpoint-(\d+)$")
_OLD = re.compile(r"^checkpoint-(\d+)\.old$")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "prefopt-checkpoint-manifest/1"


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


class CheckpointError(PrefoptInputError):
    """A checkpoint (or cached file) whose bytes cannot be trusted; the message names the damaged file."""


# ---------------------------------------------------------------------------------------------------------
# checksums
def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: str):
    """Flush a file or directory to disk, so a power loss cannot reorder it after the rename that publishes it."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - e.g. directories that cannot be opened on this platform
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without fsync on directories
        pass
    finally:
        os.close(fd)


def _files_under(root: str) -> list:
    """Every file under root, as sorted '/'-separated relative paths."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def write_manifest(ckpt_dir: str):
    """Write ckpt_dir/manifest.json: size and sha256 of every file under ckpt_dir. Call it after the last file."""
    files = {}
    for rel in _files_under(ckpt_dir):
        if rel == MANIFEST:
            continue
        path = os.path.join(ckpt_dir, rel)
        _fsync(path)
        files[rel] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    path = os.path.join(ckpt_dir, MANIFEST)
    with open(path, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync(ckpt_dir)


def verify_checkpoint(path: str):
    """Raise CheckpointError naming the first damaged file unless every byte of the checkpoint matches its manifest."""
    name = os.path.basename(os.path.normpath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a checkpoint directory")
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("unknown format")
    except FileNotFoundError:
        raise CheckpointError(f"{name}: no {MANIFEST} (the save did not finish, or an older prefopt wrote it); "
                              "its files are unverified") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{name}/{MANIFEST} is damaged ({type(err).__name__}: {str(err)[:120]})") from None
    if "trainer_state.json" not in files:
        raise CheckpointError(f"{name}: the manifest lists no trainer_state.json (not a prefopt checkpoint)")
    on_disk = set(_files_under(path)) - {MANIFEST}
    for rel in sorted(files):
        entry, full = files[rel], os.path.join(path, *rel.split("/"))
        if rel not in on_disk:
            raise CheckpointError(f"{name}/{rel} is missing")
        size = os.path.getsize(full)
        if size != entry.get("size"):
            what = "truncated" if size < entry.get("size", 0) else "longer than written"
            raise CheckpointError(f"{name}/{rel} is {what} ({size} bytes, the manifest says {entry.get('size')})")
        if file_sha256(full) != entry.get("sha256"):
            raise CheckpointError(f"{name}/{rel} is corrupted (its sha256 differs from the manifest)")
    extra = sorted(on_disk - set(files))
    if extra:
        raise CheckpointError(f"{name}/{extra[0]} is not in the manifest (unverified bytes)")


def write_checksum(path: str):
    """Write `<path>.sha256` (sha256sum format) for a file that has just been put in place."""
    side = path + ".sha256"
    with open(side + ".tmp", "w") as f:
        f.write(f"{file_sha256(path)}  {os.path.basename(path)}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(side + ".tmp", side)


def verify_file(path: str):
    """None if `path` matches its `.sha256` sidecar, else the reason (the file exists but cannot be trusted).

    Call only for a file that exists."""
    name = os.path.basename(path)
    try:
        with open(path + ".sha256") as f:
            expected = f.read().split()[0]
    except (OSError, IndexError):
        return f"{name} has no readable checksum file {name}.sha256"
    if file_sha256(path) != expected:
        return f"{name} is damaged (its sha256 differs from {name}.sha256)"
    return None


# ---------------------------------------------------------------------------------------------------------
# listing, saving
def list_checkpoints(run_dir: str) -> list:
    """(step, path) of the checkpoint-N directories in run_dir (verified or not), oldest first."""
    if not os.path.isdir(run_dir):
        return []
    out = []
    for name in os.listdir(run_dir):
        m = _CKPT.match(name)
        path = os.path.join(run_dir, name)
        if m and os.path.isdir(path):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(run_dir: str):
    """Path of the newest checkpoint-N in run_dir that verifies against its manifest, or None."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError:
            continue
    return None


def _replace_dir(tmp: str, final: str):
    if os.path.exists(final):  # re-saving the same step: swap, then drop the old copy
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)  # a crash before this line leaves final.old + a verified tmp (see plan_resume)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(os.path.dirname(os.path.abspath(final)))


def finalize_checkpoint(tmp: str, final: str):
    """Write tmp's manifest (last), then move tmp into place as final."""
    write_manifest(tmp)
    _replace_dir(tmp, final)


def save_checkpoint(run_dir, step, module, optimizer, scheduler, state: dict, config: dict, rng_states: list,
                    save_total_limit=None, sharded=None) -> str:
    """Write checkpoint-<step> atomically, with its manifest (caller: rank 0 only). Returns its path.

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
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=2)
        finalize_checkpoint(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if save_total_limit:
        for _, path in list_checkpoints(run_dir)[:-int(save_total_limit)]:
            shutil.rmtree(path, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------------
# choosing what to resume from
def plan_resume(run_dir: str, explicit: str = None) -> dict:
    """Find the checkpoint to resume from, verifying it, without changing anything on disk.

    explicit: a checkpoint directory the user named (must verify, no fallback). Otherwise the newest checkpoint
    of run_dir that verifies; the candidates of a step are checkpoint-N, then a complete .tmp-checkpoint-N,
    then checkpoint-N.old (what an interrupted save or re-save leaves). Returns a dict:
      path     the verified directory to load (None: run_dir holds no checkpoint at all -> start at step 0)
      final    where it belongs (checkpoint-N)
      notes    one line per thing the user should know (damaged checkpoints, recovered copies)
      damaged  checkpoint-N directories newer than the chosen one that failed verification
      stale    leftover .tmp / .old directories to delete
    Raises CheckpointError when checkpoints exist but none verifies (or the explicit one does not).
    """
    if explicit is not None:
        verify_checkpoint(explicit)
        return {"path": explicit, "final": explicit, "notes": [], "damaged": [], "stale": []}
    by_step = {}
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    for name in names:
        for rank, pattern in ((0, _CKPT), (1, _TMP), (2, _OLD)):
            m = pattern.match(name)
            if m and os.path.isdir(os.path.join(run_dir, name)):
                by_step.setdefault(int(m.group(1)), []).append((rank, os.path.join(run_dir, name)))
    plan = {"path": None, "final": None, "notes": [], "damaged": [], "stale": []}
    failures = []
    for step in sorted(by_step, reverse=True):
        final = os.path.join(run_dir, f"checkpoint-{step}")
        cands = sorted(by_step[step])
        chosen = None
        for rank, path in cands:
            try:
                verify_checkpoint(path)
            except CheckpointError as err:
                if rank == 0:
                    failures.append(str(err))
                    plan["damaged"].append(path)
                continue
            chosen = path
            break
        if chosen is None:
            plan["stale"] += [p for r, p in cands if r > 0]
            continue
        plan["path"], plan["final"] = chosen, final
        plan["stale"] += [p for _, p in cands if p != chosen and p != final]
        if chosen != final:
            plan["notes"].append(f"checkpoint-{step} was being saved when the run stopped: using the verified copy "
                                 f"{os.path.basename(chosen)}")
        break
    else:
        if failures:
            raise CheckpointError("--resume: no checkpoint in " + repr(run_dir) + " verifies: " + "; ".join(failures)
                                  + " (start over with --overwrite)")
    if plan["path"] is not None:
        for msg, path in zip(failures, plan["damaged"]):
            plan["notes"].append(f"{msg}: resuming from {os.path.basename(plan['final'])} instead (the damaged copy "
                                 f"is kept as {os.path.basename(path)}.damaged)")
    return plan


def apply_resume_plan(plan: dict) -> str:
    """Put the plan's checkpoint in place (rank 0): damaged newer checkpoints are renamed `*.damaged`, a recovered
    .tmp / .old copy becomes checkpoint-N, leftovers are deleted. Returns the path to load."""
    for path in plan["damaged"]:
        aside = path + ".damaged"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
    if plan["path"] is not None and plan["path"] != plan["final"]:
        shutil.rmtree(plan["final"], ignore_errors=True)  # only a damaged copy can be there; it was moved aside
        os.replace(plan["path"], plan["final"])
    for path in plan["stale"]:
        shutil.rmtree(path, ignore_errors=True)
    return plan["final"]


RUN_FILES = ("metrics.jsonl", "metrics.jsonl.tmp", "config.json", "ref_logps.pt", "ref_logps.pt.sha256",
             "ref_logps.pt.tmp", "metrics.png", "model", ".tmp-model")


def holds_run(run_dir: str) -> bool:
    """Whether run_dir already holds (part of) a prefopt run."""
    if not os.path.isdir(run_dir):
        return False
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        return True
    return any(p.match(n) for n in os.listdir(run_dir) for p in (_CKPT, _TMP, _OLD))


def clear_run(run_dir: str):
    """Delete what a prefopt run wrote into run_dir (--overwrite); other files are left alone."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name in RUN_FILES or any(p.match(name) for p in (_CKPT, _TMP, _OLD)) or (
                name.startswith("checkpoint-") and name.endswith(".damaged")) or name.startswith(".tmp-sharded-"):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def trim_metrics(path: str, step: int) -> list:
    """Keep the metrics.jsonl lines of steps <= step (rank 0, on resume). A torn last line (a write cut short by
    the crash) and malformed lines are dropped. Returns notes for the user."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    keep, notes = [], []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            what = "a torn last line (a write cut short)" if i == last else "a malformed line"
            notes.append(f"{os.path.basename(path)}:{i + 1}: dropped {what}")
            continue
        if rec.get("step", 0) <= step:
            keep.append(raw.decode("utf-8") + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
    return notes


# ---------------------------------------------------------------------------------------------------------
# loading (from a verified directory)
def read_checkpoint_meta(path: str):
    """(trainer_state, config) of a checkpoint directory, with clear errors."""
    name = os.path.basename(os.path.normpath(path))
    out = []
    for fname, required in (("trainer_state.json", True), ("config.json", False)):
        file = os.path.join(path, fname)
        if not os.path.isfile(file):
            if required:
                raise PrefoptInputError(f"{path!r} is not a prefopt checkpoint (no trainer_state.json)")
            out.append({})
            continue
        try:
            with open(file) as f:
                out.append(json.load(f))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{name}/{fname} cannot be read ({type(err).__name__}: {str(err)[:120]})") from None
    return out[0], out[1]


def _torch_load(path, name):
    try:
        return torch.load(os.path.join(path, name), map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{os.path.basename(os.path.normpath(path))}/{name} cannot be read "
                              f"({type(err).__name__}: {str(err)[:200]})") from None


def load_checkpoint(path, module, optimizer, scheduler, rank: int):
    """Restore model/optimizer/scheduler/RNG in place from a verified checkpoint; returns trainer_state."""
    from safetensors.torch import load_model

    state, _ = read_checkpoint_meta(path)
    try:
        load_model(module, os.path.join(path, "model.safetensors"), strict=True)
    except Exception as err:
        raise PrefoptInputError(f"checkpoint {path!r} does not fit this model ({type(err).__name__}: "
                                f"{str(err)[:300]})") from None
    opt_state, sched_state = _torch_load(path, "optimizer.pt"), _torch_load(path, "scheduler.pt")
    try:
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(sched_state)
    except (ValueError, KeyError, RuntimeError) as err:
        raise PrefoptInputError(f"checkpoint {path!r}: optimizer/scheduler state does not fit this run "
                                f"({type(err).__name__}: {str(err)[:200]})") from None
    rngs = _torch_load(path, "rng.pt")
    if rank < len(rngs):
        set_rng_state(rngs[rank])
    return state
