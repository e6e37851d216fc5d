"""`python -m bench --long-train` (bench/long_train.py) at a small length: the children run, agree with the float64
truth, and an eager head that cannot fit under the cap is reported as out of memory."""
import json

import pytest

pytest.importorskip("trl")

from prefopt.bench.__main__ import main  # noqa: E402
from prefopt.bench.long_train import _run_child  # noqa: E402


@pytest.mark.slow  # three child processes, each importing torch + transformers + TRL and building a V=128256 model
def test_long_train_small_length_and_out_of_memory(tmp_path):
    rc = main(["--long-train", "--lengths", "256", "--impls", "prefopt", "trl-eager", "--threads", "1", "--out",
               str(tmp_path), "--no-plots"])
    records = json.loads((tmp_path / "long_train.json").read_text())["records"]
    by = {r["impl"]: r for r in records}
    assert rc == 0 and set(by) == {"truth", "prefopt", "trl-eager"}
    assert all(r["status"] == "ok" for r in records), records
    # float32 steps against the float64 forward: the loss is ~0.7 and the margin ~0.03 here; 1e-4 relative is 30x
    # the float32 rounding a 256-token sum carries (measured ~3e-6 / ~3e-5), and far below any real disagreement
    assert by["prefopt"]["loss_rel_err"] < 1e-4 and by["prefopt"]["margins_rel_err"] < 1e-4
    assert by["trl-eager"]["loss_rel_err"] < 1e-3
    assert by["prefopt"]["peak_mib"] > by["prefopt"]["start_mib"] > 0 and by["prefopt"]["step_s"] > 0
    table = (tmp_path / "long_train.md").read_text()
    assert "| 256 | prefopt trainer" in table and "float64 truth" in table
    # eager logits of a 2048-token pair: [2, 2047, 128256] float32 = 2 GiB, plus their log_softmax, under 4 GiB
    oom = _run_child(dict(T=2048, threads=1, cap_gb=4.0, impl="trl-eager"), str(tmp_path), 600)
    assert oom["status"] == "oom", oom


def test_lengths_past_16k_run_only_when_the_predicted_step_fits():
    from prefopt.bench.long_train import STEP_LIMIT_S, _decide, markdown
    ok8 = dict(T=8192, status="ok", step_s=100.0)
    assert _decide("prefopt", 16384, ok8, None) == (True, "")                       # the lengths always run
    assert _decide("prefopt", 32768, dict(T=16384, status="ok", step_s=250.0), ok8)[0]          # 2.5x -> ~10 min
    run, why = _decide("prefopt", 32768, dict(T=16384, status="ok", step_s=400.0), ok8)         # 4x -> ~27 min
    assert not run and f"over {STEP_LIMIT_S // 60}" in why
    run, why = _decide("trl", 8192, dict(T=4096, status="oom"), None)
    assert not run and "did not train at 4096 tokens (oom)" in why
    table = markdown([dict(T=8192, impl="trl", status="skip", error=why)], 12.0)
    assert "| 8192 | TRL DPOTrainer (its chunked log-prob head) | skipped: did not train at 4096" in table
