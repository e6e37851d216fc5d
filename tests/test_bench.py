"""Smoke test of the benchmark suite (bench/): a tiny grid end to end through the CLI entry point.

Every case x implementation runs in its own process; JSON, markdown and PNG plots are written; every
implementation that ran is compared with eager (loss, per-token / per-sequence log-probs, gradient slice) and agrees
with it to fp32 rounding; an output of another shape than eager's is a failure of the run.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("psutil")

from prefopt.bench.__main__ import main  # noqa: E402

EPS32 = 2.0 ** -24  # unit roundoff of float32, the dtype of every case here


def _tolerance(case, scale):
    """The most two float32 evaluations of one value may differ by: the rounding of the longest sum on its path
    (the log-sum-exp over V entries, the gradient GEMMs' sums over V or N terms, a logit's over H) is at most
    K eps32 of the magnitudes summed, whatever the order, with K = max(V, N, H); those magnitudes are taken as eager's
    largest |value| (unit-scale inputs: their sums stay within a few times of it). Measured on this grid: at most
    14 eps32 x that scale (a gradient at V = 256), against K = 256."""
    return max(case["vocab"], case["tokens"], case["hidden"]) * EPS32 * scale


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--ops", "logits", "linear", "dpo", "--tokens", "16", "--hidden", "16", "--vocab", "128", "256",
               "--kinds", "lm", "--repeats", "1", "--timeout", "120", "--out", str(out)])
    with open(out / "results.json") as f:
        doc = json.load(f)
    return rc, out, doc


def test_outputs_written(run):
    rc, out, doc = run
    assert (out / "results.md").read_text().count("| eager |") == 6
    pngs = [p for p in os.listdir(out) if p.endswith(".png")]
    assert any("_vs_vocab" in p for p in pngs), pngs
    env = doc["environment"]
    assert env["cpu_model"] and env["torch"]
    assert len(doc["records"]) == 6


def test_every_implementation_ran_and_agrees(run):
    rc, _, doc = run
    failures = {r["name"]: r.get("failed") for r in doc["records"] if r.get("failed")}
    assert rc == 0 and not failures, failures
    for rec in doc["records"]:
        impls = rec["impls"]
        assert "eager" in impls and any(n.startswith("prefopt[") for n in impls), rec["name"]
        assert rec["agreement_baseline"] == "eager", rec["name"]
        if rec["case"]["op"] != "logits":
            assert impls["gemm-limit"]["median_s"] > 0
        assert rec["entropy"] > 0
        for name, r in impls.items():
            assert r["median_s"] > 0, (rec["name"], name)
            if r["timing_only"]:
                continue
            assert r["peak_extra_bytes"] is not None and r["peak_extra_bytes"] >= 0
            agree = r["agreement"]
            assert agree["mismatch"] == [], (rec["name"], name, agree["mismatch"])
            # compared, not skipped: the loss and a gradient always; the per-token log-probs of the logits and
            # linear ops (the fused DPO loss of prefopt returns no per-sequence values to compare)
            compared = ("loss", "grad") + (("out",) if rec["case"]["op"] != "dpo" else ())
            assert all(agree[key] is not None for key in compared), (rec["name"], name, agree)
            for key in ("loss", "out", "grad"):
                if agree[key] is not None:
                    tol = _tolerance(rec["case"], agree["scale"][key])
                    assert agree[key] <= tol, (rec["name"], name, key, agree[key], tol)
        # skipped peers carry a reason
        for name, why in (rec.get("skipped") or {}).items():
            assert why, (rec["name"], name)


def test_an_output_of_another_shape_is_a_failure(tmp_path, monkeypatch):
    """bench/measure.py `run_case`: an implementation whose per-token log-probs or gradient slice has another shape
    than eager's (or lacks a gradient eager has) fails the case; no baseline but eager stands in for it."""
    import torch

    from bench import measure
    from prefopt.bench.cases import Case, Impl
    saved = {"eager": dict(out=torch.zeros(16), grad_hidden=torch.zeros(16, 8)),
             "short-out": dict(out=torch.zeros(15), grad_hidden=torch.zeros(16, 8)),
             "no-grad": dict(out=torch.zeros(16)),
             "fine": dict(out=torch.full((16,), 1e-9), grad_hidden=torch.zeros(16, 8))}

    def run_one(case, impl, *, check_path=None, **kwargs):
        torch.save(dict(loss=torch.tensor(0.5, dtype=torch.float64), **saved[impl.name]), check_path)
        return {"ok": True, "median_s": 1e-3}

    names = list(saved)
    monkeypatch.setattr(measure, "run_one", run_one)
    monkeypatch.setattr("bench.cases.implementations", lambda op, device_type, quick=False: [
        (Impl(name, ("linear",)), True, "") for name in names])
    case = Case("linear", 16, 8, 128, "float32", "lm")
    record = measure.run_case(case, log=None)
    assert record["agreement_baseline"] == "eager"
    assert record["failed"] == {"short-out": "disagrees with eager: out has shape (15,), eager's (16,)",
                                "no-grad": "disagrees with eager: grad_hidden is missing, eager's is"}
    assert record["impls"]["fine"]["agreement"]["out"] == pytest.approx(1e-9)
    # without eager, nothing is compared (and the record says so): no other implementation is the reference
    names = ["short-out", "fine"]
    record = measure.run_case(case, log=None)
    assert record["agreement_baseline"] is None and "eager did not run" in record["agreement_skipped"]
    assert all("agreement" not in r for r in record["impls"].values())


def test_reference_case_is_in_the_grid():
    from prefopt.bench.cases import default_grid
    for quick in (False, True):
        ref = [c for c in default_grid(quick=quick) if c.tag == "reference"]
        assert {c.kind for c in ref} == {"uniform", "lm"}
        for c in ref:
            assert (c.op, c.pairs, c.seq, c.hidden, c.vocab, c.dtype) == ("dpo", 2, 512, 1024, 32000, "float32")


def test_lm_inputs_are_calibrated():
    from prefopt.bench.cases import Case
    from prefopt.bench.inputs import build, measured_entropy
    ent = measured_entropy(build(Case("linear", 256, 64, 4096, "float32", "lm")))
    assert 1.0 <= ent <= 3.0
    ent_uniform = measured_entropy(build(Case("linear", 64, 64, 4096, "float32", "uniform")))
    assert ent_uniform > 7.0


@pytest.mark.slow
def test_long_sequence_set_quick(tmp_path):
    # `--long --quick`: every implementation in its own capped child; prefopt's log-ratio error against the
    # float64 truth is no larger than eager's, and a cap too small for anything is reported as out of memory.
    rc = main(["--long", "--quick", "--out", str(tmp_path), "--no-plots"])
    with open(tmp_path / "long.json") as f:
        records = json.load(f)["records"]
    by = {(r["impl"], r["T"]): r for r in records}
    assert rc == 0 and "| prefopt |" in (tmp_path / "long.md").read_text()
    for T in (1024,):
        assert by[("prefopt", T)]["status"] == "ok" and by[("eager", T)]["status"] == "ok"
        assert by[("prefopt", T)]["ratio_err"] <= max(by[("eager", T)]["ratio_err"], 1e-5)
    assert by[("liger", 1024)]["status"] == "skip"
    # Under a 1.5 GiB address-space cap, eager's [2T, V] float32 logits (512 MiB each) fail; prefopt trains.
    from prefopt.bench.long import _run_child
    spec = dict(T=8192, H=16, V=8192, threads=1, truth=False, cap_gb=1.5)
    eager, _ = _run_child(dict(spec, impl="eager"), str(tmp_path), 300)
    fused, pt = _run_child(dict(spec, impl="prefopt"), str(tmp_path), 300)
    assert eager["status"] == "oom" and "allocate" in eager["error"], eager
    assert fused["status"] == "ok" and os.path.exists(pt), fused


def _prefopt_command():
    """The installed console script when it sits beside this interpreter (a venv), else `python -m prefopt`:
    neither has the source checkout on sys.path when run from another directory."""
    script = os.path.join(os.path.dirname(sys.executable), "prefopt")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "prefopt"]


@pytest.mark.slow
def test_prefopt_bench_runs_outside_the_checkout(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(_prefopt_command() + ["bench", "--ops", "logits", "--tokens", "16", "--vocab", "128",
                                                "--kinds", "lm", "--impls", "prefopt[torch]", "--repeats", "1",
                                                "--no-plots", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    (rec,) = doc["records"]
    assert {"eager", "prefopt[torch]"} <= set(rec["impls"]) and not rec.get("failed")
    agree = rec["impls"]["prefopt[torch]"]["agreement"]
    assert agree["loss"] <= _tolerance(rec["case"], agree["scale"]["loss"])


def test_bench_help_names_its_command_and_describes_once():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=root, capture_output=True, text=True,
                          check=True).stdout
    assert text.startswith("usage: python -m bench")
    assert text.count("Run the benchmark grid") == 1
    from prefopt.bench.__main__ import _parser
    assert _parser("prefopt bench").format_help().startswith("usage: prefopt bench")


# ------------------------------------------------------------------------------ `prefopt bench --heads` (bench/heads.py)
def test_heads_bench_without_cuda_says_so_and_points_at_dry_run(monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--heads"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda needs a CUDA device, and torch.cuda.is_available() is False here" in err
    assert "--dry-run" in err


def test_grid_bench_on_cuda_without_cuda_points_at_the_heads_bench(monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--device", "cuda", "--ops", "linear", "--tokens", "16", "--hidden", "16", "--vocab", "128"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device here" in err
    assert "prefopt bench --heads" in err and "--heads --dry-run" in err


def test_heads_bench_dry_run_prints_the_predictions_without_a_gpu(capsys):
    from prefopt._backend import head_prediction
    import torch
    assert main(["--heads", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "N=16384 H=4096 V=128256 bfloat16" in out and "dry run: nothing runs" in out
    pick = head_prediction(16384, 4096, 128256, torch.bfloat16)
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| fused") or
            line.startswith("| tiles")}
    assert f"{pick.fused_s * 1e3:,.2f}" in rows["fused"] and f"{pick.tiles_s * 1e3:,.2f}" in rows["tiles"]
    assert "| yes |" in rows[pick.head] and "not run" in rows["tiles"]
    assert out.rstrip().endswith(f"auto picks {pick.head}")


def test_heads_bench_measures_on_cpu_under_the_interpreter(capsys, tmp_path):
    """The measuring path itself (both heads, timing, agreement, JSON), as a smoke test on a tiny CPU shape."""
    path = tmp_path / "heads.json"
    assert main(["--heads", "--device", "cpu", "--tokens", "24", "--hidden", "16", "--vocab", "300", "--dtype",
                 "float32", "--repeats", "1", "--warmup", "0", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    doc = json.loads(path.read_text())
    assert set(doc["measured"]) == {"fused", "tiles"} and all(m["total_s"] > 0 for m in doc["measured"].values())
    assert doc["difference"]["logp"] < 1e-5 and doc["difference"]["grad_weight"] < 1e-5
    assert "measured faster:" in out
    assert doc["fused_tiles"] == "table (PREFOPT_TILES)" and "fused head tiles: table" in out


def test_heads_bench_reports_what_the_autotune_picked(capsys, monkeypatch):
    from prefopt.kernels import _autotune
    monkeypatch.setenv("PREFOPT_TILES", "autotune")
    _autotune.clear()
    try:
        assert main(["--heads", "--device", "cpu", "--tokens", "24", "--hidden", "16", "--vocab", "300", "--dtype",
                     "float32", "--repeats", "1", "--warmup", "1"]) == 0
    finally:
        _autotune.clear()
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("fused head tiles:")]
    assert line and line[0].startswith("fused head tiles: autotune (PREFOPT_TILES): ")
    assert "forward: " in line[0] and "backward: " in line[0]
