"""Markdown tables and the JSON document of a benchmark run."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

OP_TITLES = {
    "dpo": "(c) DPO step: policy + live reference head, DPO sigmoid, forward + backward",
    "linear": "(b) linear_logprobs: hidden @ W.T -> log-softmax -> gather, forward + backward",
    "logits": "(a) logprobs_from_logits: log-softmax -> gather on given logits, forward + backward",
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module):
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return None


def environment(device="cpu", argv=None) -> dict:
    import torch
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "trl": _version("trl"),
        "liger_kernel": _version("liger-kernel"),
        "argv": argv,
    }
    try:
        import prefopt
        info["prefopt"] = getattr(prefopt, "__version__", None)
        info["prefopt_backends"] = {k: list(v) if isinstance(v, tuple) else v
                                    for k, v in prefopt.backend_info().items()}
    except Exception as err:  # pragma: no cover
        info["prefopt"] = f"import failed: {err}"
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        info["git_rev"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                         text=True, timeout=10).stdout.strip() or None
    except Exception:
        info["git_rev"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _mib(x):
    return "" if x is None else f"{x / 2**20:,.1f}"


def _sci(x):
    if x is None:
        return ""
    return "0" if x == 0 else f"{x:.1e}"


def _shape(case):
    if case["op"] == "dpo":
        s = f"{case['pairs']} pairs x {case['seq']} tok, H={case['hidden']}"
    elif case["op"] == "linear":
        s = f"N={case['tokens']}, H={case['hidden']}"
    else:
        s = f"N={case['tokens']}"
    dt = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(case["dtype"], case["dtype"])
    return f"{s}, V={case['vocab']}, {dt}"


def summarize(record) -> list[dict]:
    """Rows (one per implementation) with ratios to eager and to the GEMM limit."""
    impls = record["impls"]
    eager = impls.get("eager", {}).get("median_s")
    gemm = impls.get("gemm-limit", {}).get("median_s")
    grads = record.get("grad_bytes") or 0
    rows = []
    for name, r in impls.items():
        t = r.get("median_s")
        agree = r.get("agreement") or {}
        mem = r.get("peak_extra_bytes")
        rows.append({
            "impl": name,
            "time_s": t,
            "vs_eager": (t / eager) if (t and eager) else None,
            "gemm_frac": (gemm / t) if (t and gemm) else None,
            "peak_extra_bytes": mem,
            "extra_over_grads_bytes": None if mem is None else max(0, mem - grads),
            "loss_diff": agree.get("loss"),
            "out_diff": agree.get("out"),
            "grad_diff": agree.get("grad"),
            "loss": agree.get("loss_value"),
        })
    return rows


HEADER = ("| case | input (entropy) | impl | time ms | time / eager | GEMM limit / time | peak extra MiB "
          "| extra - grads MiB | max abs diff loss / out / grad |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---|")


def markdown(records, env=None) -> str:
    lines = []
    if env:
        lines.append(f"Device: {env.get('device')} ({env.get('gpu') or env.get('cpu_model')}, "
                     f"{env.get('cpu_count')} logical CPUs, torch {env.get('torch')}, "
                     f"{env.get('torch_threads')} threads), {env.get('date')}")
        lines.append("")
    for op in ("dpo", "linear", "logits"):
        recs = [r for r in records if r["case"]["op"] == op]
        if not recs:
            continue
        lines.append(f"### {OP_TITLES[op]}")
        lines.append("")
        lines.append(HEADER)
        notes = {}
        for rec in recs:
            case = rec["case"]
            shape = _shape(case) + (" **(reference)**" if case.get("tag") == "reference" else "")
            ent = rec.get("entropy")
            kind = f"{case['kind']} ({ent:.2f} nats)" if ent is not None else case["kind"]
            for row in summarize(rec):
                diffs = " / ".join(_sci(row[k]) for k in ("loss_diff", "out_diff", "grad_diff"))
                diffs = "" if row["impl"] == "gemm-limit" else diffs
                t = "" if row["time_s"] is None else f"{row['time_s'] * 1e3:,.1f}"
                ratio = "" if row["vs_eager"] is None else f"{row['vs_eager']:.2f}x"
                frac = "" if row["gemm_frac"] is None else f"{row['gemm_frac'] * 100:.0f}%"
                lines.append(f"| {shape} | {kind} | {row['impl']} | {t} | {ratio} | {frac} | "
                             f"{_mib(row['peak_extra_bytes'])} | {_mib(row['extra_over_grads_bytes'])} | {diffs} |")
            for key in ("skipped", "failed"):
                for name, why in (rec.get(key) or {}).items():
                    notes.setdefault((key, name, why), []).append(rec["name"])
        lines.append("")
        for (key, name, why), where in notes.items():
            scope = "all cases" if len(where) == len(recs) else ", ".join(where)
            lines.append(f"- {name} {key} ({scope}): {why}")
        if notes:
            lines.append("")
    lines.append("time / eager: median step time relative to eager (< 1 is faster). GEMM limit / time: the time "
                 "of only the GEMMs of the same FLOPs (forward logits; backward grad_hidden and grad_weight; "
                 "reference forward) over the implementation's time (100% = as fast as the GEMMs alone). "
                 "peak extra: peak memory of the step over its inputs, each implementation in its own process "
                 "(includes the gradients it returns); extra - grads: the same less the gradient bytes every "
                 "implementation must return. max abs diff: vs eager (loss / per-token or per-sequence "
                 "log-probs / gradient slice).")
    return "\n".join(lines)


def write_json(path, records, env):
    doc = {"environment": env, "records": records}
    for rec in records:
        rec["summary"] = summarize(rec)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path
