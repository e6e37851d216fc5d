"""scripts/gpu_check.sh and bench/gpu_check.py as far as a CPU allows: the arguments, the refusal without a GPU, the
plan and the JSON/markdown written by a dry run, the step runner (status, exit code, time limit), and the figures
collected from what the steps write (JUnit XML, the bench's results.json, the heads bench's JSON)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STEP_KEYS = {"name", "kind", "group", "argv", "env", "limit_s", "artifact", "status"}


def _check_document(doc, status, mode):
    assert doc["schema"] == gpu_check.SCHEMA and doc["status"] == status and doc["mode"] == mode
    env = doc["environment"]
    for key in ("date", "python", "torch", "torch_cuda", "triton", "gpu", "gpus", "git_rev", "prefopt._C",
                "prefopt._C_cuda", "trl", "liger_kernel", "cuda_available"):
        assert key in env, key
    for step in doc["steps"]:
        assert STEP_KEYS <= set(step) and step["status"] in gpu_check.STATUSES, step


def test_dry_run_writes_the_plan(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--budget-s", "300"]) == 0
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    _check_document(doc, "dry-run", "dry-run")
    names = [s["name"] for s in doc["steps"]]
    assert names == [f"tests:{os.path.basename(p)[:-3]}" for p in gpu_check.KERNEL_TESTS] + [
        "reference", "heads-table", "heads-autotune"]
    assert all(s["status"] == "planned" for s in doc["steps"]) and doc["budget_s"] == 300
    tests = [s for s in doc["steps"] if s["kind"] == "tests"]
    assert all(s["env"] == {"PREFOPT_TEST_DEVICE": "cuda", "TRITON_INTERPRET": "0"} and s["group"] == "tests"
               for s in tests)
    assert all(s["artifact"].startswith(str(tmp_path)) for s in doc["steps"])
    assert {s["env"].get("PREFOPT_TILES") for s in doc["steps"] if s["kind"] == "heads"} == {"table", "autotune"}
    assert "--device cuda" in " ".join(doc["steps"][len(tests)]["argv"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# prefopt GPU check") and "| heads-autotune | planned |" in md


def test_arguments_and_no_gpu(tmp_path, monkeypatch, capsys):
    for bad in (["--dry-run"], ["--out", str(tmp_path), "--dry-run", "--cpu-smoke"],
                ["--out", str(tmp_path), "--budget-s", "0"], ["--out", str(tmp_path), "--only", "lint"]):
        with pytest.raises(SystemExit) as err:
            gpu_check.main(bad)
        assert err.value.code == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device here" in capsys.readouterr().err and not (tmp_path / "gpu_check.json").exists()


def test_steps_run_with_status_and_time_limit(tmp_path):
    py = sys.executable
    steps = [gpu_check._step("good", [py, "-c", "print('fine')"], 30, group="g"),
             gpu_check._step("bad", [py, "-c", "raise SystemExit(3)"], 30, group="g"),
             gpu_check._step("slow", [py, "-c", "import time; time.sleep(60)"], 1.5, group="g")]
    deadline = __import__("time").monotonic() + 60
    gpu_check._run_group(steps, deadline, str(tmp_path), log=lambda msg: None)
    assert [(s["status"], s["returncode"]) for s in steps] == [("ok", 0), ("failed", 3), ("timeout", None)]
    assert steps[2]["seconds"] < 30 and "fine" in open(steps[0]["log"]).read()
    late = [gpu_check._step("late", [py, "-c", "pass"], 30)]
    gpu_check._run_group(late, __import__("time").monotonic() + 1, str(tmp_path), log=lambda msg: None)
    assert late[0]["status"] == "skipped"


def test_figures_are_collected_from_the_steps_files(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.test_x" name="test_a"/>'
                   '<testcase classname="tests.test_x" name="test_b"><failure message="assert 1 == 2">trace</failure>'
                   '</testcase><testcase classname="tests.test_x" name="test_c"><skipped/></testcase>'
                   '<testcase classname="tests.test_x" name="test_d"/></testsuite></testsuites>')
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"records": [{"name": "dpo ref", "grad_bytes": 0, "skipped": {"liger": "absent"},
                                                "impls": {"eager": {"median_s": 0.2, "peak_extra_bytes": 2 ** 30},
                                                          "prefopt[triton]": {"median_s": 0.1,
                                                                              "peak_extra_bytes": 2 ** 28,
                                                                              "agreement": {"grad": 1e-6}}}}]}))
    heads = tmp_path / "heads.json"
    timing = dict(forward_s=0.01, backward_s=0.03, total_s=0.04, peak_extra_bytes=2 ** 20)
    heads.write_text(json.dumps(dict(predicted={h: dict(timing, bound="l2 / l2") for h in ("fused", "tiles")},
                                     auto="tiles", measured={h: timing for h in ("fused", "tiles")},
                                     difference={"logp": 0.0}, fused_tiles="table (PREFOPT_TILES)")))
    steps = [dict(gpu_check._step("tests:test_x", ["py"], 1, kind="tests", artifact=str(xml)), status="failed"),
             dict(gpu_check._step("reference", ["py"], 1, artifact=str(results)), status="ok"),
             dict(gpu_check._step("heads-table", ["py"], 1, kind="heads", artifact=str(heads)), status="ok")]
    gpu_check.collect(steps)
    tests = steps[0]["result"]
    assert (tests["passed"], tests["failures"], tests["skipped"]) == (2, 1, 1)
    assert tests["failed"] == [{"test": "tests.test_x::test_b", "message": "assert 1 == 2"}]
    rows = {r["impl"]: r for r in steps[1]["result"]}
    assert rows["prefopt[triton]"]["vs_eager"] == pytest.approx(0.5) and rows["liger"]["note"] == "skipped: absent"
    assert steps[2]["result"]["auto"] == "tiles"
    doc = dict(schema=gpu_check.SCHEMA, status=gpu_check.overall(steps, False), mode="gpu", budget_s=1, elapsed_s=1,
               environment=gpu_check.environment(), install=None, steps=steps)
    md = gpu_check.markdown(doc)
    assert doc["status"] == "failed" and "FAILED tests.test_x::test_b: assert 1 == 2" in md
    assert "| dpo ref | prefopt[triton] | 100.00 | 0.50x | 256 |" in md and "auto picks" in md


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_the_script_handles_its_arguments_and_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)

    def script(*args):
        return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    bad = script("--bogus")
    assert bad.returncode == 2 and "unknown argument: --bogus" in bad.stderr and "usage:" in bad.stderr
    assert script("--budget-s", "soon").returncode == 2
    assert script("--dry-run", "--cpu-smoke").returncode == 2
    if not torch.cuda.is_available():
        refused = script("--out", str(tmp_path / "gpu"))
        assert refused.returncode == 2 and "sees no CUDA device" in refused.stderr
    dry = script("--dry-run", "--out", str(tmp_path / "dry"), "--budget-s", "200")
    assert dry.returncode == 0, dry.stderr
    doc = json.loads((tmp_path / "dry" / "gpu_check.json").read_text())
    _check_document(doc, "dry-run", "dry-run")
    assert 30 <= doc["budget_s"] <= 185  # the script's budget less its own time and the report's margin
