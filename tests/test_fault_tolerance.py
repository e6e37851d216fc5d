"""Fault injection on the trainer: damaged checkpoints and caches, torn metrics, a kill between the renames of a
re-save, a kill before the first checkpoint, non-finite settings and losses, bad data and output paths.

Every case ends in one of two ways: exit code 2 with a one-line `prefopt: error: ...` that names the file or
setting, or a resume from the newest intact checkpoint (said in one line) whose metrics equal those of the
uninterrupted run exactly. All cases start from copies of ONE tiny finished run (6 steps, a checkpoint every 2).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from prefopt import cli
from prefopt.trainer import TrainConfig
from prefopt.trainer import checkpoint as ckpt
from prefopt.trainer import data as D
from prefopt.trainer.config import resume_mismatch, as_jsonable
from prefopt.trainer.loop import STOP_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--max_steps", "6", "--save_steps", "2", "--save_total_limit", "0", "--logging_steps", "1",
        "--disable_tqdm", "--per_device_train_batch_size", "4", "--model_config", '{"hidden_size": 32}',
        "--warmup_ratio", "0", "--precompute_ref_log_probs"]
CKPT_FILES = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "config.json",
              "manifest.json"]


def _train(capsys, run, *extra, args=ARGS):
    rc = cli.main(["train", *args, "--output_dir", str(run), *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _notes(err):
    return [line for line in err.splitlines() if line.startswith("prefopt: ")]


def _assert_error(rc, err, *needles):
    """Exit code 2, exactly one line on stderr, no traceback, naming what is wrong."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prefopt: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The uninterrupted run: checkpoint-2, -4, -6, metrics of steps 1..6, ref_logps.pt."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert cli.main(["train", *ARGS, "--output_dir", str(run)]) == 0
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4, 5, 6]
    for step in (2, 4, 6):
        ckpt.verify_checkpoint(str(run / f"checkpoint-{step}"))
    return run


@pytest.fixture
def run(base, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base, dst)
    return dst


def truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def flip64(path):
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - 32)
    for i in range(start, min(len(data), start + 64)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def delete(path):
    path.unlink()


# ---- damaged checkpoint files: fall back, say so, reproduce the uninterrupted run ----------------------------
@pytest.mark.parametrize("damage", [truncate, flip64, delete], ids=["truncated", "flipped64", "deleted"])
@pytest.mark.parametrize("name", CKPT_FILES)
def test_every_damaged_checkpoint_file_is_detected(run, name, damage):
    """Every file x every damage: plan_resume names the file and picks checkpoint-4 (nothing is read unverified)."""
    damage(run / "checkpoint-6" / name)
    plan = ckpt.plan_resume(str(run))
    assert plan["path"] == plan["final"] == str(run / "checkpoint-4")
    assert plan["damaged"] == [str(run / "checkpoint-6")]
    assert len(plan["notes"]) == 1 and "checkpoint-6" in plan["notes"][0] and name in plan["notes"][0]


# the full resume for each file truncated, and for the flipped weights / deleted optimizer of the issue
@pytest.mark.parametrize("name,damage", [(n, truncate) for n in CKPT_FILES]
                         + [("model.safetensors", flip64), ("optimizer.pt", delete)],
                         ids=[f"{n}-truncated" for n in CKPT_FILES] + ["model.safetensors-flipped64",
                                                                       "optimizer.pt-deleted"])
def test_damaged_checkpoint_file_falls_back_to_newest_intact(run, base, capsys, name, damage):
    damage(run / "checkpoint-6" / name)
    rc, out, err = _train(capsys, run, "--resume")
    assert rc == 0, err
    notes = _notes(err)
    assert len(notes) == 1, err
    assert "checkpoint-6" in notes[0] and name in notes[0] and "resuming from checkpoint-4" in notes[0]
    assert "resuming at step 4" in out
    assert _metrics(run) == _metrics(base)  # steps 5, 6 redone from checkpoint-4: the same numbers, bit for bit
    ckpt.verify_checkpoint(str(run / "checkpoint-6"))  # re-saved, verified
    assert (run / "checkpoint-6.damaged").is_dir()  # kept for inspection, never loaded


def test_two_damaged_checkpoints_fall_back_two_steps(run, base, capsys):
    flip64(run / "checkpoint-6" / "model.safetensors")
    truncate(run / "checkpoint-4" / "optimizer.pt")
    rc, out, err = _train(capsys, run, "--resume")
    assert rc == 0, err
    notes = _notes(err)
    assert len(notes) == 2 and "checkpoint-6/model.safetensors" in notes[0] and \
        "checkpoint-4/optimizer.pt" in notes[1], err
    assert "resuming at step 2" in out
    assert _metrics(run) == _metrics(base)


def test_no_intact_checkpoint_is_a_clear_error(run, capsys):
    for step in (2, 4, 6):
        truncate(run / f"checkpoint-{step}" / "rng.pt")
    before = sorted(os.listdir(run))
    rc, out, err = _train(capsys, run, "--resume")
    _assert_error(rc, err, "no checkpoint", "verifies", "checkpoint-6/rng.pt", "checkpoint-2/rng.pt", "--overwrite")
    assert sorted(os.listdir(run)) == before


def test_explicit_damaged_checkpoint_is_refused(run, capsys):
    flip64(run / "checkpoint-4" / "model.safetensors")
    rc, out, err = _train(capsys, run, "--resume", str(run / "checkpoint-4"))
    _assert_error(rc, err, "checkpoint-4/model.safetensors is corrupted")


def test_unlisted_and_nested_files_are_covered(run):
    """The manifest covers every file, in subdirectories too (e.g. sharded state), and flags files it lacks."""
    src, tmp = run / "checkpoint-2", run / ".tmp-checkpoint-8"
    shutil.copytree(src, tmp)
    (tmp / "manifest.json").unlink()
    (tmp / "shards").mkdir()
    (tmp / "shards" / "rank0.distcp").write_bytes(b"\x01" * 4096)
    ckpt.write_manifest(str(tmp))
    ckpt.verify_checkpoint(str(tmp))
    flip64(tmp / "shards" / "rank0.distcp")
    with pytest.raises(ckpt.CheckpointError, match=r"\.tmp-checkpoint-8/shards/rank0\.distcp is corrupted"):
        ckpt.verify_checkpoint(str(tmp))
    (src / "stray.bin").write_bytes(b"x")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint-2/stray\.bin is not in the manifest"):
        ckpt.verify_checkpoint(str(src))


# ---- the cached reference log-probs ------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "flip64", "no_checksum"])
def test_damaged_ref_cache_is_recomputed(run, base, capsys, damage):
    cache = run / "ref_logps.pt"
    if damage == "no_checksum":
        delete(run / "ref_logps.pt.sha256")
    else:
        {"truncate": truncate, "flip64": flip64}[damage](cache)
    shutil.rmtree(run / "checkpoint-6")  # resume from checkpoint-4: steps 5, 6 read the recomputed cache
    rc, out, err = _train(capsys, run, "--resume")
    assert rc == 0, err
    notes = _notes(err)
    assert len(notes) == 1 and "ref_logps.pt" in notes[0] and "recomputing" in notes[0], err
    assert ckpt.verify_file(str(cache)) is None
    assert _metrics(run) == _metrics(base)


# ---- metrics.jsonl ---------------------------------------------------------------------------------------------
def test_torn_metrics_line_is_dropped_on_resume(run, base, capsys):
    # killed while writing step 5's line, after checkpoint-4: no checkpoint-6, line 5 half written
    shutil.rmtree(run / "checkpoint-6")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:4]) + lines[4][:len(lines[4]) // 2])
    rc, out, err = _train(capsys, run, "--resume")
    assert rc == 0, err
    assert _notes(err) == ["prefopt: metrics.jsonl:5: dropped a torn last line (a write cut short)"]
    assert _metrics(run) == _metrics(base)
    # and a second resume (nothing left to train) is clean: no note, the same metrics
    rc, out, err = _train(capsys, run, "--resume")
    assert rc == 0 and _notes(err) == [] and _metrics(run) == _metrics(base)


def test_plot_reader_tolerates_torn_last_line(run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    assert [r["step"] for r in cli.read_metrics(str(run))] == [1, 2, 3, 4, 5, 6]


# ---- a re-save of the same step -----------------------------------------------------------------------------------
def _killed_between_renames(run, tmp_complete=True):
    """The directory state of a --resume of the finished run killed between the two renames of checkpoint-6's
    re-save: checkpoint-6.old (the previous copy) and .tmp-checkpoint-6 (the new one, manifest written last)."""
    os.replace(run / "checkpoint-6", run / "checkpoint-6.old")
    shutil.copytree(run / "checkpoint-6.old", run / ".tmp-checkpoint-6")
    if not tmp_complete:  # killed before the new copy's manifest was written
        (run / ".tmp-checkpoint-6" / "manifest.json").unlink()


@pytest.mark.parametrize("tmp_complete", [True, False], ids=["new-copy-complete", "new-copy-partial"])
def test_kill_between_renames_resumes_at_the_same_step(run, base, capsys, tmp_complete):
    _killed_between_renames(run, tmp_complete)
    rc, out, err = _train(capsys, run, "--resume")
    assert rc == 0, err
    used = ".tmp-checkpoint-6" if tmp_complete else "checkpoint-6.old"
    assert _notes(err) == [f"prefopt: checkpoint-6 was being saved when the run stopped: using the verified copy "
                           f"{used}"]
    assert "resuming at step 6" in out  # not silently back to step 4
    names = sorted(os.listdir(run))
    assert "checkpoint-6" in names and "checkpoint-6.old" not in names and ".tmp-checkpoint-6" not in names
    ckpt.verify_checkpoint(str(run / "checkpoint-6"))
    assert _metrics(run) == _metrics(base)


def test_resave_always_leaves_a_verified_copy(run, monkeypatch):
    """Whichever rename of a re-save fails (a crash), a verified copy of the step remains for plan_resume."""
    real = os.replace
    for fail_at in (1, 2):
        shutil.rmtree(run / ".tmp-checkpoint-6", ignore_errors=True)
        shutil.copytree(run / "checkpoint-6", run / ".tmp-checkpoint-6")
        calls = []

        def replace(src, dst):
            calls.append(src)
            if len(calls) == fail_at:
                raise OSError("killed")
            return real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(OSError, match="killed"):
            ckpt._replace_dir(str(run / ".tmp-checkpoint-6"), str(run / "checkpoint-6"))
        monkeypatch.setattr(os, "replace", real)
        plan = ckpt.plan_resume(str(run))
        assert plan["final"] == str(run / "checkpoint-6")
        ckpt.verify_checkpoint(plan["path"])
        ckpt.apply_resume_plan(plan)
        ckpt.verify_checkpoint(str(run / "checkpoint-6"))


# ---- killed before the first checkpoint -----------------------------------------------------------------------------
@pytest.fixture
def no_checkpoint_run(tmp_path, capsys, monkeypatch):
    run = tmp_path / "early"
    monkeypatch.setenv(STOP_ENV, "1")
    assert _train(capsys, run)[0] == 0
    monkeypatch.delenv(STOP_ENV)
    assert not ckpt.list_checkpoints(str(run)) and (run / "metrics.jsonl").is_file()
    return run


@pytest.mark.parametrize("how", ["--resume", "--overwrite"])
def test_run_killed_before_first_checkpoint_restarts(no_checkpoint_run, base, capsys, how):
    run = no_checkpoint_run
    rc, out, err = _train(capsys, run)
    _assert_error(rc, err, "already holds a run", "--resume", "--overwrite")
    rc, out, err = _train(capsys, run, how)
    assert rc == 0, err
    if how == "--resume":
        assert _notes(err) == [f"prefopt: --resume: {run} holds no checkpoint yet: starting from step 0"]
    assert _metrics(run) == _metrics(base)


def test_overwrite_starts_a_finished_run_over(run, base, capsys):
    (run / "notes.txt").write_text("mine")
    flip64(run / "checkpoint-6" / "model.safetensors")
    rc, out, err = _train(capsys, run, "--overwrite")
    assert rc == 0, err
    assert _metrics(run) == _metrics(base)
    assert (run / "notes.txt").read_text() == "mine"  # only what prefopt wrote is removed
    assert not (run / "checkpoint-6.damaged").exists()
    ckpt.verify_checkpoint(str(run / "checkpoint-6"))
    rc, out, err = _train(capsys, run, "--overwrite", "--resume")
    _assert_error(rc, err, "--resume and --overwrite")


# ---- numbers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting,value", [
    ("beta", "nan"), ("beta", "inf"), ("beta", "0"), ("temperature", "0"), ("temperature", "nan"),
    ("label_smoothing", "nan"), ("label_smoothing", "2"), ("learning_rate", "nan"), ("learning_rate", "inf"),
    ("learning_rate", "-1"), ("num_train_epochs", "nan"), ("max_grad_norm", "nan"), ("max_grad_norm", "-1"),
    ("adam_beta1", "1"), ("adam_epsilon", "inf"), ("weight_decay", "nan"), ("warmup_ratio", "nan"),
    ("ld_alpha", "nan"), ("rpo_alpha", "inf"), ("loss_weights", "nan"), ("seed", "-1"),
])
def test_bad_numeric_setting_fails_before_anything_is_written(tmp_path, capsys, setting, value):
    run = tmp_path / "run"
    rc, out, err = _train(capsys, run, f"--{setting}", value)
    _assert_error(rc, err, setting)
    assert not run.exists()


def test_null_setting_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("adam_beta1: null\n")
    rc, out, err = _train(capsys, tmp_path / "run", "--config", str(cfg))
    _assert_error(rc, err, "adam_beta1 must be set")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, err = _train(capsys, run, "--learning_rate", "1e30", "--save_steps", "1")
    _assert_error(rc, err, "step 2: non-finite loss nan", f"last good checkpoint is {run / 'checkpoint-1'}")
    assert [r["step"] for r in _metrics(run)] == [1]
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [1]
    ckpt.verify_checkpoint(str(run / "checkpoint-1"))
    assert not (run / "model").exists()


def test_settings_added_later_do_not_block_resume():
    cfg = TrainConfig()
    saved = {k: v for k, v in as_jsonable(cfg).items() if k not in ("skip_bad_rows", "overwrite")}
    assert resume_mismatch(saved, cfg) == []
    assert resume_mismatch(saved, TrainConfig(skip_bad_rows=True)) == \
        ["skip_bad_rows: checkpoint False != now True"]


# ---- data and paths -------------------------------------------------------------------------------------------------
GOOD = {"prompt": "sort:21=", "chosen": "12.", "rejected": "21."}


def _jsonl(path, rows, prefix=b""):
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


@pytest.mark.parametrize("field", ["chosen", "rejected", "prompt"])
def test_empty_text_is_rejected_with_file_line(tmp_path, capsys, field):
    data = _jsonl(tmp_path / "d.jsonl", [GOOD] * 2 + [dict(GOOD, **{field: ""})] + [GOOD] * 5)
    rc, out, err = _train(capsys, tmp_path / "run", "--dataset", str(data))
    _assert_error(rc, err, f"d.jsonl:3: field '{field}' is empty", "--skip_bad_rows")
    assert not (tmp_path / "run").exists()


def test_empty_conversational_text_is_rejected(tmp_path):
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": ""}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    with pytest.raises(D.PrefoptInputError, match=r"c\.jsonl:1: field 'chosen' is empty"):
        D.load_jsonl(str(_jsonl(tmp_path / "c.jsonl", [row])))


def test_skip_bad_rows_skips_and_counts(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    _jsonl(path, [GOOD] * 2 + [dict(GOOD, chosen="")] + [GOOD] * 6)
    with open(path, "ab") as f:
        f.write(b'{"prompt": "x", \n' + b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n')
    rows, kind, skipped = D.read_jsonl(str(path), skip_bad_rows=True)
    assert len(rows) == 8 and [s.split(": ")[0] for s in skipped] == [f"{path}:3", f"{path}:10", f"{path}:11"]
    rc, out, err = _train(capsys, tmp_path / "run", "--dataset", str(path), "--skip_bad_rows", "--max_steps", "1",
                          "--save_steps", "0")
    assert rc == 0, err
    assert f"8 paired rows from {path} (3 bad rows skipped, first: {path}:3: field 'chosen' is empty)" in out


def test_non_utf8_line_names_file_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(D.PrefoptInputError, match=r"d\.jsonl:2: not UTF-8 text"):
        D.load_jsonl(str(path))


def test_utf8_bom_is_accepted(tmp_path):
    plain = D.load_jsonl(str(_jsonl(tmp_path / "a.jsonl", [GOOD, GOOD])))
    bom = D.load_jsonl(str(_jsonl(tmp_path / "b.jsonl", [GOOD, GOOD], prefix=b"\xef\xbb\xbf")))
    assert bom == plain and bom[0][0] == GOOD


def test_dataset_directory_is_named(tmp_path, capsys):
    rc, out, err = _train(capsys, tmp_path / "run", "--dataset", str(tmp_path))
    _assert_error(rc, err, "is a directory")


def test_unusable_output_dirs_are_clear_errors(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, out, err = _train(capsys, afile)
    _assert_error(rc, err, "exists and is not a directory")
    rc, out, err = _train(capsys, afile / "run")
    _assert_error(rc, err, "cannot be created", "is not a directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    if os.access(ro, os.W_OK):  # root ignores the mode bits: report what a read-only mount reports
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(ro) else real(p, mode, **kw))
    rc, out, err = _train(capsys, ro / "run")
    _assert_error(rc, err, "is not writable")
    os.chmod(ro, 0o755)
    assert os.listdir(ro) == []


# ---- the real command: exit code 2, one line, no traceback ---------------------------------------------------------
@pytest.mark.parametrize("case", ["all-checkpoints-damaged", "nan-setting"])
def test_command_line_exit_code_and_single_line(run, case):
    if case == "all-checkpoints-damaged":
        for step in (2, 4, 6):
            flip64(run / f"checkpoint-{step}" / "model.safetensors")
        extra = ["--resume"]
    else:
        shutil.rmtree(run)
        extra = ["--beta", "nan"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "prefopt", "train", *ARGS, "--output_dir", str(run), *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    _assert_error(proc.returncode, proc.stderr,
                  "checkpoint-6/model.safetensors is corrupted" if extra == ["--resume"] else "beta")
