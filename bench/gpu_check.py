"""`python -m bench.gpu_check --out DIR`: prefopt's first minutes on a GPU, one command (scripts/gpu_check.sh installs,
builds the CUDA extension and then runs this).

Steps, each a subprocess with its own time limit inside one budget (--budget-s, default 420 s), logs in DIR/logs/:
  tests      the kernel tests on CUDA tensors, compiled kernels, no interpreter (PREFOPT_TEST_DEVICE=cuda): values and
             gradients against the torch references in fp32/bf16/fp64, both GPU heads, filtering, sorting, tile choice
             and the deterministic backward's bitwise check (tests/test_cuda_determinism.py); one pytest per file, all
             at once (Triton compiles on every core), each writing a JUnit XML.
  reference  `python -m bench --reference-only --device cuda`: the reference DPO step against eager, TRL and Liger
             where installed, time and peak memory (torch.cuda.max_memory_allocated) per implementation.
  heads      `python -m bench --heads` twice: the fused head's table tiles and PREFOPT_TILES=autotune, each next to the
             tiled head and to prefopt/cost_model.py's predictions.
Then DIR/gpu_check.json (schema SCHEMA: environment with the GPU name and versions, every step with its status,
seconds and figures) and DIR/gpu_check.md (the same as tables). A failing step is recorded and the next one runs.
`--dry-run` writes both files with every step planned and nothing run (no GPU needed); `--cpu-smoke` runs a tiny CPU
version of each step (the interpreter, a few seconds each) to check the plumbing without a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

SCHEMA = "prefopt-gpu-check/1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_TESTS = ("tests/test_triton_kernels.py", "tests/test_tiled_head.py", "tests/test_filtering.py",
                "tests/test_vocab_sorting.py", "tests/test_head_tiles.py", "tests/test_cuda_determinism.py")
# Time limits (s) of the steps on a GPU, inside --budget-s: the kernel tests compile a few hundred Triton
# specialisations (in parallel, one pytest per file), the benches one shape each.
LIMITS = {"tests": 240, "reference": 90, "heads-table": 60, "heads-autotune": 90}
STATUSES = ("ok", "failed", "timeout", "skipped", "planned")


def _step(name, argv, limit_s, env=None, kind=None, group=None, artifact=None):
    return dict(name=name, kind=kind or name, group=group, argv=[str(a) for a in argv], env=env or {},
                limit_s=limit_s, artifact=artifact)


def plan(args):
    """The steps of a run: dicts with name, argv, env, limit_s, the group run concurrently, the file each writes."""
    py = sys.executable
    out = args.out
    steps = []
    smoke = args.cpu_smoke
    tests = ("tests/test_cuda_determinism.py",) if smoke else KERNEL_TESTS
    for path in tests:
        name = "tests:" + os.path.splitext(os.path.basename(path))[0]
        xml = os.path.join(out, "junit", os.path.basename(path).replace(".py", ".xml"))
        env = {} if smoke else {"PREFOPT_TEST_DEVICE": "cuda", "TRITON_INTERPRET": "0"}
        steps.append(_step(name, [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, f"--junitxml={xml}"],
                           LIMITS["tests"], env, kind="tests", group="tests", artifact=xml))
    if smoke:
        heads_shape = ["--device", "cpu", "--tokens", "8", "--hidden", "16", "--vocab", "64", "--repeats", "1",
                       "--warmup", "0"]
        smoke_env = {"TRITON_INTERPRET": "1"}
    else:
        heads_shape, smoke_env = [], {}
        steps.append(_step("reference", [py, "-m", "bench", "--reference-only", "--device", "cuda", "--repeats", "3",
                                         "--out", os.path.join(out, "reference"), "--no-plots"],
                           LIMITS["reference"], artifact=os.path.join(out, "reference", "results.json")))
    for tiles in ("table", "autotune"):
        path = os.path.join(out, f"heads_{tiles}.json")
        steps.append(_step(f"heads-{tiles}", [py, "-m", "bench", "--heads", *heads_shape, "--json", path],
                           LIMITS[f"heads-{tiles}"], dict(smoke_env, PREFOPT_TILES=tiles), kind="heads",
                           artifact=path))
    return steps


def _run_group(steps, deadline, out, log):
    """Run steps concurrently, each within min(its limit, the budget left); fill in status, seconds, returncode."""
    procs = []
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    for step in steps:
        left = deadline - time.monotonic()
        if left < 5:
            step.update(status="skipped", seconds=0.0, note="no time left in --budget-s")
            continue
        step["limit_s"] = min(step["limit_s"], left)
        if step.get("artifact"):
            os.makedirs(os.path.dirname(step["artifact"]), exist_ok=True)
        log_path = os.path.join(out, "logs", step["name"].replace(":", "_") + ".log")
        step["log"] = log_path
        handle = open(log_path, "w")
        env = dict(os.environ, **step["env"])
        if step["env"].get("TRITON_INTERPRET") == "0":
            env.pop("TRITON_INTERPRET")  # the compiled kernels: the variable must be absent, not "0"
        log(f"[gpu_check] {step['name']}: {' '.join(step['argv'][1:])} (limit {step['limit_s']:.0f} s)")
        procs.append((step, subprocess.Popen(step["argv"], cwd=ROOT, env=env, stdout=handle,
                                             stderr=subprocess.STDOUT, start_new_session=True),
                      time.monotonic(), handle))
    for step, proc, start, handle in procs:
        try:
            proc.wait(timeout=max(0.1, start + step["limit_s"] - time.monotonic()))
            step.update(status="ok" if proc.returncode == 0 else "failed", returncode=proc.returncode)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the step's own process group (start_new_session): pytest and its children
            proc.wait()
            step.update(status="timeout", returncode=None)
        handle.close()
        step["seconds"] = round(time.monotonic() - start, 1)
        log(f"[gpu_check] {step['name']}: {step['status']} in {step['seconds']} s")


def junit_summary(path):
    """{tests, failures, errors, skipped, failed: [{test, message}]} of a JUnit XML file, None if absent."""
    if not path or not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = dict(tests=0, failures=0, errors=0, skipped=0, failed=[])
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            out[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                message = (bad.get("message") or bad.text or "").strip().splitlines()
                out["failed"].append(dict(test=f"{case.get('classname')}::{case.get('name')}",
                                          message=message[0][:300] if message else ""))
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def reference_summary(path):
    """[{case, impl, time_s, vs_eager, peak_extra_bytes, grad_diff}] of a bench results.json, None if absent."""
    if not path or not os.path.exists(path):
        return None
    from .report import summarize
    with open(path) as f:
        doc = json.load(f)
    rows = []
    for rec in doc.get("records", []):
        for row in rec.get("summary") or summarize(rec):
            rows.append(dict(case=rec.get("name"), impl=row["impl"], time_s=row["time_s"], vs_eager=row["vs_eager"],
                             peak_extra_bytes=row["peak_extra_bytes"], grad_diff=row["grad_diff"]))
        for key in ("skipped", "failed"):
            for impl, why in (rec.get(key) or {}).items():
                rows.append(dict(case=rec.get("name"), impl=impl, time_s=None, vs_eager=None, peak_extra_bytes=None,
                                 grad_diff=None, note=f"{key}: {why}"))
    return rows


def heads_summary(path):
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        doc = json.load(f)
    return {k: doc.get(k) for k in ("predicted", "auto", "measured", "difference", "fused_tiles", "args")}


def _version(dist):
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


def environment():
    """The machine, the GPU and every version the figures depend on."""
    import torch
    env = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), host=platform.node(),
               python=platform.python_version(), cpu_count=os.cpu_count(), torch=torch.__version__,
               torch_cuda=torch.version.cuda, triton=_version("triton") or _version("pytorch-triton"),
               transformers=_version("transformers"), trl=_version("trl"), liger_kernel=_version("liger-kernel"),
               cuda_available=torch.cuda.is_available(), gpus=[])
    try:
        env["git_rev"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
    except Exception:
        env["git_rev"] = None
    for module in ("prefopt._C", "prefopt._C_cuda"):
        try:
            __import__(module)
            env[module] = "built"
        except Exception as err:
            env[module] = f"missing: {type(err).__name__}: {err}".splitlines()[0]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append(dict(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(
                p.total_memory / 2**30, 1), sms=p.multi_processor_count))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            env["driver"] = None
    env["gpu"] = env["gpus"][0]["name"] if env["gpus"] else None
    return env


def collect(steps):
    """Each step's figures from the file it wrote."""
    for step in steps:
        if step.get("status") in ("skipped", "planned"):
            continue
        if step["kind"] == "tests":
            step["result"] = junit_summary(step.get("artifact"))
        elif step["kind"] == "reference":
            step["result"] = reference_summary(step.get("artifact"))
        elif step["kind"] == "heads":
            step["result"] = heads_summary(step.get("artifact"))


def overall(steps, dry_run):
    if dry_run:
        return "dry-run"
    return "ok" if all(s.get("status") == "ok" for s in steps) else "failed"


def _ms(seconds):
    return "" if seconds is None else f"{seconds * 1e3:,.2f}"


def _mib(n):
    return "" if n is None else f"{n / 2**20:,.0f}"


def markdown(doc):
    env = doc["environment"]
    lines = [f"# prefopt GPU check: {env.get('gpu') or 'no GPU'} ({doc['status']})", "",
             f"{env['date']}, git {env.get('git_rev')}, torch {env['torch']} (CUDA {env.get('torch_cuda')}), "
             f"triton {env.get('triton')}, driver {env.get('driver')}, Python {env['python']}, "
             f"prefopt._C_cuda {env.get('prefopt._C_cuda')}; trl {env.get('trl')}, liger-kernel "
             f"{env.get('liger_kernel')}; {doc['elapsed_s']} s of a {doc['budget_s']} s budget", ""]
    if doc.get("install"):
        lines += ["Install: " + ", ".join(f"{k} {v}" for k, v in doc["install"].items()), ""]
    lines += ["| step | status | seconds | command |", "|---|---|---|---|"]
    for s in doc["steps"]:
        lines.append(f"| {s['name']} | {s.get('status')} | {s.get('seconds', '')} | `{' '.join(s['argv'][1:])}` |")
    tests = [s for s in doc["steps"] if s["kind"] == "tests" and s.get("result")]
    if tests:
        lines += ["", "## Kernel tests on CUDA tensors", "", "| file | passed | failed | errors | skipped |",
                  "|---|---|---|---|---|"]
        failed = []
        for s in tests:
            r = s["result"]
            lines.append(f"| {s['name'][6:]} | {r['passed']} | {r['failures']} | {r['errors']} | {r['skipped']} |")
            failed += r["failed"]
        for f in failed:
            lines.append(f"- FAILED {f['test']}: {f['message']}")
    for s in doc["steps"]:
        r = s.get("result")
        if s["kind"] == "reference" and r:
            lines += ["", "## Reference case (`python -m bench --reference-only --device cuda`)", "",
                      "| case | impl | time ms | time / eager | peak extra MiB | max abs grad diff vs eager |",
                      "|---|---|---|---|---|---|"]
            for row in r:
                ratio = "" if row["vs_eager"] is None else f"{row['vs_eager']:.2f}x"
                diff = "" if row["grad_diff"] is None else f"{row['grad_diff']:.2g}"
                lines.append(f"| {row['case']} | {row['impl']} | {_ms(row['time_s'])} | {ratio} | "
                             f"{_mib(row['peak_extra_bytes'])} | {diff or row.get('note', '')} |")
        if s["kind"] == "heads" and r and r.get("predicted"):
            from .heads import table
            lines += ["", f"## Heads ({s['name']}; fused head tiles: {r.get('fused_tiles')})", "",
                      table(r["predicted"], r["auto"], r.get("measured")), "",
                      "largest |fused - tiles|: " + ", ".join(f"{k} {v:.3g}" for k, v in (r.get("difference")
                                                                                           or {}).items())]
    return "\n".join(lines) + "\n"


def run(args, log=None):
    """Plan, run (unless --dry-run) and write DIR/gpu_check.json and .md -> the document."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    steps = plan(args)
    if args.only:
        steps = [s for s in steps if s["kind"] in args.only]
    if args.dry_run:
        for step in steps:
            step["status"] = "planned"
    else:
        deadline = start + args.budget_s
        groups = []
        for step in steps:  # consecutive steps of one group run together
            if groups and step["group"] and groups[-1][0]["group"] == step["group"]:
                groups[-1].append(step)
            else:
                groups.append([step])
        for group in groups:
            _run_group(group, deadline, args.out, log)
        collect(steps)
    install = None
    if args.install_json and os.path.exists(args.install_json):
        with open(args.install_json) as f:
            install = json.load(f)
    doc = dict(schema=SCHEMA, status=overall(steps, args.dry_run), mode="dry-run" if args.dry_run else (
        "cpu-smoke" if args.cpu_smoke else "gpu"), budget_s=args.budget_s,
        elapsed_s=round(time.monotonic() - start, 1), environment=environment(), install=install, steps=steps)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(markdown(doc))
    log(f"[gpu_check] {doc['status']}: wrote {os.path.join(args.out, 'gpu_check.json')} and gpu_check.md")
    return doc


def parser(prog="python -m bench.gpu_check"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the steps' files")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for all the steps (default 420: with the "
                   "install and the build, the whole check stays under 8 minutes)")
    p.add_argument("--only", nargs="+", choices=("tests", "reference", "heads"), default=None,
                   help="run only these kinds of step")
    p.add_argument("--dry-run", action="store_true", help="plan only: write the files with every step planned")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU versions of the steps (no GPU): checks the "
                   "plumbing, measures nothing")
    p.add_argument("--install-json", default=None, help="the install/build record scripts/gpu_check.sh wrote")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.dry_run and args.cpu_smoke:
        parser().error("--dry-run and --cpu-smoke exclude each other")
    if args.budget_s <= 0:
        parser().error("--budget-s must be positive")
    if not (args.dry_run or args.cpu_smoke):
        import torch
        if not torch.cuda.is_available():
            print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}); "
                  "--dry-run writes the plan, --cpu-smoke checks the plumbing on CPU", file=sys.stderr)
            return 2
    doc = run(args)
    return 0 if doc["status"] in ("ok", "dry-run") else 1


if __name__ == "__main__":
    sys.exit(main())
