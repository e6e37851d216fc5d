"""The `prefopt` command line: train (flags / config files / errors), plot, bench, info, python -m prefopt."""
import json
import os
import subprocess
import sys

import pytest

from prefopt import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--max_steps", "3", "--logging_steps", "1", "--disable_tqdm", "--per_device_train_batch_size", "4",
        "--model_config", '{"hidden_size": 32}']


def _train(capsys, *args):
    rc = cli.main(["train", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_train_flags_writes_run(tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, err = _train(capsys, *TINY, "--output_dir", str(run), "--beta", "0.2")
    assert rc == 0, err
    assert "rewards/accuracies" in out and "step    3" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["beta"] == 0.2


def test_train_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\nmax_steps: 2\nloss_type: ipo\nbeta: 0.3\n"
                   "per_device_train_batch_size: 4\nmodel_config: {hidden_size: 32}\ndisable_tqdm: true\n")
    rc, out, err = _train(capsys, "--config", str(cfg), "--beta", "0.5")
    assert rc == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["loss_type"] == "ipo" and saved["beta"] == 0.5


def _assert_clean_failure(capsys, tmp_path, args, pattern):
    run = tmp_path / "out"
    rc, out, err = _train(capsys, *TINY, "--output_dir", str(run), *args)
    assert rc == 2
    assert err.startswith("prefopt: error: ")
    assert "Traceback" not in err
    import re
    assert re.search(pattern, err), err
    assert not run.exists()  # no partial files


def test_bad_inputs_fail_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops}\n')
    _assert_clean_failure(capsys, tmp_path, ["--dataset", str(bad)], r"bad\.jsonl:2: malformed JSON")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "rejected": "c"}\n')
    _assert_clean_failure(capsys, tmp_path, ["--dataset", str(missing)], r"missing\.jsonl:2: missing field\(s\) 'chosen'")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _assert_clean_failure(capsys, tmp_path, ["--dataset", str(empty)], "is empty")
    _assert_clean_failure(capsys, tmp_path, ["--dataset", str(tmp_path / "nope.jsonl")], "does not exist")
    _assert_clean_failure(capsys, tmp_path, ["--loss_type", "dpo"], r"unknown loss_type 'dpo'; valid loss types: sigmoid")
    small = tmp_path / "small.jsonl"
    small.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    _assert_clean_failure(capsys, tmp_path, ["--dataset", str(small)], r"has 1 rows but one optimizer step needs 4")
    _assert_clean_failure(capsys, tmp_path, ["--resume", str(tmp_path / "ckpt")], "does not exist")
    _assert_clean_failure(capsys, tmp_path, ["--tokenizer", str(tmp_path / "tok")], "tokenizer")


def test_unknown_flag_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["train", "--bogus_flag", "1"])
    assert err.value.code == 2
    assert "unrecognized arguments: --bogus_flag" in capsys.readouterr().err


def test_resume_other_config_fails_cleanly(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("PREFOPT_STOP_AFTER_STEP", "2")
    rc, out, err = _train(capsys, *TINY, "--output_dir", str(run), "--save_steps", "2")
    assert rc == 0 and (run / "checkpoint-2").is_dir()
    monkeypatch.delenv("PREFOPT_STOP_AFTER_STEP")
    before = {p: os.path.getmtime(run / p) for p in os.listdir(run)}
    rc, out, err = _train(capsys, *TINY, "--output_dir", str(run), "--save_steps", "2", "--resume",
                          "--loss_type", "hinge")
    assert rc == 2 and "different config" in err and "loss_type" in err and "Traceback" not in err
    assert {p: os.path.getmtime(run / p) for p in os.listdir(run)} == before
    rc, out, err = _train(capsys, *TINY, "--output_dir", str(run), "--save_steps", "2", "--resume")
    assert rc == 0, err
    assert "resuming at step 2" in out
    assert (run / "checkpoint-3").is_dir() and (run / "model").is_dir()


def test_plot_writes_png(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(capsys, *TINY, "--output_dir", str(run))[0] == 0
    assert cli.main(["plot", str(run)]) == 0
    png = run / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file()
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_info_and_help(capsys, monkeypatch):
    monkeypatch.setenv("PREFOPT_LOGITS_CACHE_MB", "64")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "prefopt" in out and "requested" in out
    assert "logits cache   64 MiB per head call on CPU, 64 MiB on CUDA" in out
    assert cli.main([]) == 0 and "prefopt train" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2 and "unknown command" in capsys.readouterr().err


def test_bench_dispatch(monkeypatch):
    import types
    calls = []
    main_mod = types.ModuleType("prefopt.bench.__main__")
    main_mod.main = lambda argv, prog=None: calls.append((argv, prog)) or 0
    monkeypatch.setitem(sys.modules, "prefopt.bench.__main__", main_mod)
    assert cli.main(["bench", "--quick"]) == 0 and calls == [(["--quick"], "prefopt bench")]


def test_every_train_flag_has_help():
    from prefopt.trainer.config import build_arg_parser
    bare = [a.dest for a in build_arg_parser()._actions
            if a.option_strings and a.dest != "help" and not (a.help or "").split("(default:")[0].strip()]
    assert not bare, f"flags without a description: {bare}"


def test_progress_without_a_terminal_is_plain_lines(tmp_path, capsys):
    """With stderr not a terminal (a log file, CI) no tqdm bar is drawn: only the step lines, one per log."""
    argv = [a for a in TINY if a != "--disable_tqdm"]
    rc, out, err = _train(capsys, *argv, "--output_dir", str(tmp_path / "run"))
    assert rc == 0, err
    assert "\r" not in out + err and "it/s" not in out + err and "s/it" not in out + err
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["1", "2", "3"]


def test_python_dash_m_prefopt(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "prefopt", "train", "--help"], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 0 and "--loss_type" in proc.stdout and "--resume" in proc.stdout
