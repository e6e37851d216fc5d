"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90 (no GPU needed); no register spills.

The work is done by bench/kernel_report.py in a subprocess *without* TRITON_INTERPRET: with the
interpreter on (tests/conftest.py sets it), @triton.jit returns InterpretedFunction objects and
triton.compile fails on them ("'InterpretedFunction' object has no attribute 'cache_key'").
For the row ops, the fused head and the segment sums the report compiles what the launchers really launch
(recorded on meta tensors and bound by Triton's own binder, bench/aot_launches.py), so a specialisation a
hand-written signature would miss (integers equal to 1 become constants) is the one checked for spills.
Compiles land in triton's cache, so reruns mostly pay only for ptxas.
"""
import json
import os
import subprocess
import sys

import pytest

from prefopt.bench.aot_launches import _matmul_precision
from prefopt.kernels import linear_logprobs, logprobs, preference_loss, sequence_sums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODULES = (logprobs, linear_logprobs, sequence_sums)


def _has_ptxas():
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


needs_ptxas = pytest.mark.skipif(not _has_ptxas(), reason="triton's bundled ptxas is not available")


def _report(tmp_path, *args, timeout=1500):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_report.py"), "--json", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc


def _check(rows):
    assert rows
    errors = [f"{r['kernel']} {r['arch']} {r['config']}: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors)
    spills = [f"{r['kernel']} {r['arch']} {r['config']} warps={r['num_warps']}: regs={r['regs']} "
              f"spill stores={r['spill_stores']} loads={r['spill_loads']}"
              for r in rows if r["spill_stores"] != 0 or r["spill_loads"] != 0]
    assert not spills, "register spills:\n" + "\n".join(spills)
    for r in rows:
        assert 0 < r["regs"] <= 255
        assert r["shared"] <= (232448 if r["arch"] == "sm_90" else 166912), r  # opt-in smem per block
        if r.get("smem_bound") is not None:  # a fused-head tile: the bound autotune pruning trusts holds
            assert r["shared"] <= r["smem_bound"], r
            # the sm_80 tiles also run on the 99 KiB parts (sm_86/89/120; kernels/_head_tiles.py)
            assert r["arch"] == "sm_90" or r["shared"] <= 101376, r
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """What every launch case binds, for both archs (no compile)."""
    rows, _ = _report(tmp_path_factory.mktemp("dry"), "--dry-run", "--modules", *LAUNCHED, timeout=600)
    return rows


LAUNCHED = ("prefopt.kernels.logprobs", "prefopt.kernels.linear_logprobs", "prefopt.kernels.sequence_sums")


def test_launches_cover_every_kernel_and_launcher_choice(launches):
    for mod, name in zip(MODULES, LAUNCHED):
        kernels = {k for k in dir(mod) if k.startswith("_") and k.endswith("_kernel")}
        for arch in ("sm_80", "sm_90"):
            bound = {r["kernel"] for r in launches if r["module"] == name.split(".")[-1] and r["arch"] == arch}
            assert bound == kernels, (name, arch, kernels ^ bound)
    by_kernel = {}
    for r in launches:
        by_kernel.setdefault(r["kernel"], []).append(r)
    # every tile configuration the launchers can pick is compiled (the launcher's own choice function)
    row_cfgs = {(r["constexprs"]["BLOCK_V"], r["num_warps"]) for r in by_kernel["_row_fwd_kernel"]}
    for V in (1, 77, 1000, 8192, 8193, 32000, 128256, 262144):
        assert logprobs._config(V) in row_cfgs
    import torch
    from prefopt.kernels import _head_tiles
    from prefopt.kernels._head_tiles import Tile
    # the fused head: on each arch, every table tile and every autotune candidate (pruned at the issue shape) of
    # every dtype and fp32 math mode is among the launches compiled for that arch
    for kernel, backward in (("_linear_fwd_kernel", False), ("_linear_bwd_kernel", True)):
        for arch in (80, 90):
            tiles = {Tile(r["constexprs"]["BLOCK_N"], r["constexprs"]["BLOCK_V"], r["constexprs"]["BLOCK_K"],
                          r["num_warps"], r["num_stages"])
                     for r in by_kernel[kernel] if r["arch"] == f"sm_{arch}"}
            for dt, precision in ((torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest"),
                                  (torch.float16, "highest")):
                with _matmul_precision(precision):
                    assert linear_logprobs._config(dt, backward, arch) in tiles, (kernel, arch, dt, precision)
                    wanted = set(_head_tiles.candidates(dt, backward, arch, 16384, 128256))
                assert wanted <= tiles, (kernel, arch, dt, precision, wanted - tiles)
    seg = {(r["constexprs"]["BLOCK"], r["num_warps"]) for r in by_kernel["_segment_fwd_kernel"]}
    for n, s in ((10, 1), (100, 10), (4096, 8), (10 ** 6, 3)):
        assert sequence_sums._config(n, s) in seg


def test_launches_bind_the_real_specialisation(launches):
    """The binder's view, not a description: a full backward binds need_gh / need_gw as the constant 1 (the
    pipelined variant a GPU runs), a one-gradient backward leaves the other flag a runtime 0, and a ragged
    launch loses the 16-divisibility of its sizes while an aligned one keeps it."""
    bwd = [r for r in launches if r["kernel"] == "_linear_bwd_kernel"]
    full = [r for r in bwd if "grads=h,w" in r["config"]]
    assert full and all(r["constexprs"].get("need_gh") == 1 and r["constexprs"].get("need_gw") == 1 for r in full)
    only_h = [r for r in bwd if r["config"].endswith("grads=h")]
    assert only_h and all("need_gw" not in r["constexprs"] and r["constexprs"]["need_gh"] == 1 for r in only_h)
    ragged = [r for r in launches if r["kernel"] == "_linear_fwd_kernel" and "V=50257" in r["config"]]
    aligned = [r for r in launches if r["kernel"] == "_linear_fwd_kernel" and r["config"].startswith("N=16384 ")]
    assert ragged and all("V" not in r["divisible"] and "N" not in r["divisible"] for r in ragged)
    assert aligned and all({"N", "V", "H", "stride_h"} <= set(r["divisible"]) for r in aligned)
    single = [r for r in launches if r["kernel"] == "_linear_fwd_kernel" and r["config"].startswith("N=1 ")]
    assert single and all(r["constexprs"].get("N") == 1 for r in single)


def test_transform_scalars_bind_as_float64(launches):
    """logit_scale, softcap and temperature reach the head and row kernels as fp64 (their tl.float64 annotations):
    compiled Triton binds a plain Python float as fp32, so a float64 launch scaled by temperature 0.8 rounded to
    fp32, 1.5e-8 off (the first GPU run's fp64 softcap-temperature test, 2026-12-04). The interpreter keeps the
    double, so only the binder shows it."""
    transforms = ("_row_fwd_kernel", "_row_bwd_kernel", "_linear_fwd_kernel", "_linear_bwd_kernel")
    rows = [r for r in launches if r["kernel"] in transforms]
    assert {r["kernel"] for r in rows} == set(transforms)
    for r in rows:
        assert {name: r["signature"][name] for name in ("logit_scale", "softcap", "temperature")} == dict.fromkeys(
            ("logit_scale", "softcap", "temperature"), "fp64"), (r["kernel"], r["config"])


def test_loss_kernels_are_also_compiled_as_launched(tmp_path):
    """The loss kernels' configurations leave P unspecialised; the recorded launches add what P binds: one pair makes
    P a constant, 4096 pairs make it 16-divisible, 1001 neither, for the generated pair kernel (forward-only and
    forward+grad, two loss configurations) and the backward scale kernel."""
    rows, _ = _report(tmp_path, "--dry-run", "--modules", "prefopt.kernels.preference_loss", timeout=600)
    launched = [r for r in rows if "spec" in r]
    listed = [r for r in rows if "spec" not in r]
    assert len(listed) == 2 * len(preference_loss.aot_configs())
    for arch in ("sm_80", "sm_90"):
        mine = [r for r in launched if r["arch"] == arch]
        assert {r["kernel"] for r in mine} == {"_pair_kernel", "_scale_kernel"}
        one = [r for r in mine if " P=1 " in r["config"]]
        assert one and all(r["constexprs"].get("P") == 1 for r in one)
        aligned = [r for r in mine if " P=4096 " in r["config"]]
        assert aligned and all("P" in r["divisible"] and "P" not in r["constexprs"] for r in aligned)
        ragged = [r for r in mine if " P=1001 " in r["config"]]
        assert ragged and all("P" not in r["divisible"] and "P" not in r["constexprs"] for r in ragged)
        # both loss configurations, forward-only and forward+grad: four distinct pair kernels per P
        assert len({r["config"] for r in aligned if r["kernel"] == "_pair_kernel"}) == 4


@needs_ptxas
def test_spill_check_catches_a_forced_spilling_tile(tmp_path):
    """The check can fail: a row backward forced to 16384-wide tiles over 4 warps (128 values per thread in
    several live arrays) spills kilobytes on sm_90, and the same launch path reports it."""
    script = tmp_path / "force.py"
    script.write_text(
        "import json, sys\n"
        "from prefopt.bench import kernel_report as kr\n"
        "from prefopt.kernels import logprobs as rows\n"
        "rows._config = lambda V: (16384, 4)\n"
        "jobs = [j for j in kr.launch_jobs('prefopt.kernels.logprobs', 90, quick=True)\n"
        "        if kr._bound(j[0], *j[1], 90)[0].__name__ == '_row_bwd_kernel'][:1]\n"
        "json.dump([kr.compile_one(j) for j in jobs], open(sys.argv[1], 'w'))\n")
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["kernel"] == "_row_bwd_kernel" and not rows[0]["error"], rows
    with pytest.raises(AssertionError, match="register spills"):
        _check(rows)


def test_aot_configs_cover_every_loss_type():
    """The loss-kernel configurations: every loss type of the table, every f-divergence, with/without lengths,
    WPO weights, reference-free, KTO, forward-only and forward+grad, the backward kernel, every BLOCK the launchers
    can pick; each is the very kernel the launcher gets from the generator; the quick subset covers the loss types."""
    import torch
    from prefopt.losses.table import DIVERGENCES, REF_FREE_LOSSES, TABLE
    cfgs = preference_loss.aot_configs()
    quick = [cfgs[i] for i in preference_loss.aot_quick()]
    assert {fn.__name__ for fn, *_ in cfgs} == {"_pair_kernel", "_scale_kernel"}
    for fn, sig, cx, warps in cfgs:
        assert set(sig) | set(cx) == set(fn.arg_names), (fn.__name__, set(fn.arg_names) ^ (set(sig) | set(cx)))
        assert warps == 4 and cx["BLOCK"] in preference_loss._AOT_BLOCKS
        if fn.__name__ == "_pair_kernel":
            assert all(t == "*fp32" for k, t in sig.items() if k.endswith("_ptr"))

    def described(cs):
        return [preference_loss.aot_describe(fn) for fn, *_ in cs if fn.__name__ == "_pair_kernel"]

    specs = described(cfgs)
    assert all(preference_loss.get_kernel(s, g, False) is fn for (s, g), (fn, *_) in
               zip(specs, [c for c in cfgs if c[0].__name__ == "_pair_kernel"]))
    assert {n for s, _ in specs for n in s.losses} == set(TABLE)
    # quick: every loss formula (cpo / cpo_hinge / cpo_ipo = sigmoid / hinge / ipo without a reference: full only)
    assert {n for s, g in described(quick) if g for n in s.losses} == set(TABLE) - {"cpo", "cpo_hinge", "cpo_ipo"}
    assert {(n,) for n in TABLE if TABLE[n].kind != "none"} <= {s.losses for s, _ in specs}
    for group in (specs, described(quick)):
        assert {s.divergence for s, _ in group} == set(DIVERGENCES)
        assert {s.has_len for s, _ in group} == {False, True} and {s.has_w for s, _ in group} == {False, True}
        assert {s.has_ref for s, _ in group} == {False, True}
    assert {g for _, g in specs} == {False, True}
    assert {s.losses[0] for s, _ in specs if not s.has_ref} == set(REF_FREE_LOSSES)
    assert {c[2]["BLOCK"] for c in cfgs if c[0].__name__ == "_pair_kernel"} == set(preference_loss._AOT_BLOCKS)
    import triton
    for P in (1, 7, 100, 513, 10 ** 6):  # the launchers' BLOCK choice
        assert max(16, min(preference_loss.MAX_BLOCK, triton.next_power_of_2(P))) in preference_loss._AOT_BLOCKS
    scale = {(c[1]["out_ptr"], c[2]["BLOCK"]) for c in cfgs if c[0].__name__ == "_scale_kernel"}
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt]
        assert (f"*{name}", preference_loss.MAX_BLOCK) in scale and (f"*{name}", 16) in scale
    assert {c[1]["out_ptr"] for c in quick if c[0].__name__ == "_scale_kernel"} == {"*fp32", "*bf16"}


@needs_ptxas
def test_aot_compile_quick_no_spills(tmp_path):
    """Heaviest configuration of each kernel and dtype, sm_80 + sm_90."""
    rows, _ = _report(tmp_path, "--quick")
    _check(rows)


@pytest.mark.slow
@needs_ptxas
def test_aot_compile_all_configs_no_spills(tmp_path):
    """Every configuration of every kernel, sm_80 + sm_90 (a few minutes cold; the triton cache helps)."""
    rows, _ = _report(tmp_path)
    (tmp_path / "dry").mkdir()
    listed, _ = _report(tmp_path / "dry", "--dry-run")
    assert len(rows) == len(listed) > len(preference_loss.aot_configs()) * 2
    _check(rows)


@pytest.mark.slow
@needs_ptxas
@pytest.mark.parametrize("variant", ["stress", "fp64"])
def test_aot_compile_loss_long_lists_and_fp64_no_spills(tmp_path, variant):
    """All 15 reference-based losses in one kernel, and fp64 math: no spills at the launcher's MAX_BLOCK."""
    rows, _ = _report(tmp_path, "--modules", "prefopt.kernels.preference_loss", "--loss-variant", variant)
    assert len(rows) == len(preference_loss.aot_configs(variant)) * 2
    _check(rows)
