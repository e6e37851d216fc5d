"""PNG plots: time and peak extra memory vs vocabulary size and vs tokens, one line per implementation."""
from __future__ import annotations

import os
from collections import defaultdict

SWEEPS = {"vocab": "vocabulary size V", "tokens": "tokens N"}


def _groups(records, var):
    """{(op, fixed params...): [record, ...]} for groups with >= 2 values of `var`."""
    groups = defaultdict(list)
    for rec in records:
        c = rec["case"]
        fixed = tuple((k, c[k]) for k in ("op", "tokens", "hidden", "vocab", "dtype", "kind", "pairs", "seq")
                      if k != var and not (var == "tokens" and k == "seq"))
        groups[fixed].append(rec)
    return {k: sorted(v, key=lambda r: r["case"][var]) for k, v in groups.items()
            if len({r["case"][var] for r in v}) >= 2}


def _label(fixed):
    d = dict(fixed)
    parts = [d["op"]]
    if d["op"] == "dpo":
        parts.append(f"P{d['pairs']}" + (f"xT{d['seq']}" if "seq" in d else ""))
    elif "tokens" in d:
        parts.append(f"N{d['tokens']}")
    if d.get("hidden"):
        parts.append(f"H{d['hidden']}")
    if "vocab" in d:
        parts.append(f"V{d['vocab']}")
    parts += [d["dtype"], d["kind"]]
    return "-".join(parts)


def write_plots(records, out_dir) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for var, xlabel in SWEEPS.items():
        for fixed, recs in _groups(records, var).items():
            names = []
            for rec in recs:
                names += [n for n in rec["impls"] if n not in names]
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
            for name in names:
                xs, ts, ms_x, ms = [], [], [], []
                for rec in recs:
                    r = rec["impls"].get(name)
                    if not r or r.get("median_s") is None:
                        continue
                    xs.append(rec["case"][var])
                    ts.append(r["median_s"] * 1e3)
                    if r.get("peak_extra_bytes") is not None:
                        ms_x.append(rec["case"][var])
                        ms.append(r["peak_extra_bytes"] / 2**20)
                style = "--" if name == "gemm-limit" else "-"
                if xs:
                    ax_t.plot(xs, ts, style, marker="o", label=name)
                if ms:
                    ax_m.plot(ms_x, ms, style, marker="o", label=name)
            grads = [rec.get("grad_bytes") for rec in recs]
            if all(g is not None for g in grads):
                ax_m.plot([rec["case"][var] for rec in recs], [g / 2**20 for g in grads], ":", color="gray",
                          label="gradient bytes (unavoidable)")
            title = _label(fixed)
            for ax, ylabel in ((ax_t, "median step time (ms)"), (ax_m, "peak extra memory over inputs (MiB)")):
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.set_xscale("log", base=2)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
            ax_t.set_yscale("log")
            fig.suptitle(f"{title} (forward + backward)")
            fig.tight_layout()
            path = os.path.join(out_dir, f"{title}_vs_{var}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
    return paths
