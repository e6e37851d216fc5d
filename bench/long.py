"""`python -m bench --long`: one preference pair of long sequences, each implementation in its own capped process.

Every (case, implementation) runs as a fresh `python -m bench.long --child` process whose address space is capped
with resource.setrlimit(RLIMIT_AS) before torch is imported, so "out of memory under the cap" is a measured
outcome (the child's MemoryError / allocator failure), not an estimate. Each child runs one DPO step (policy head
with gradient, live reference head without) and saves the loss, the two per-sequence log-ratios and the
gradients; a float64 run of prefopt's fused path (torch backend, same inputs in float64, uncapped) is the truth
that the errors are measured against. Peak memory is the child's peak RSS above the inputs (bench.measure);
times are one step on a shared machine, so compare them only within one run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

BETA = 0.1
IGNORE_INDEX = -100
PROMPT = 64           # prompt tokens per sequence (ignored labels)
DEFAULT_CAP_GB = 8.0  # the address-space cap of each child


def long_cases(quick=False):
    """(tokens per sequence, H, V). H and V keep the T sweep to minutes on 2 cores; the last point is V=128k."""
    if quick:
        return [(1024, 16, 64)]
    return [(4096, 128, 8192), (16384, 128, 8192), (65536, 128, 8192), (4096, 128, 128000)]


def implementations():
    """[(name, ok, why)]: eager float32 PyTorch, prefopt (auto backend), TRL's chunked head, Liger."""
    from .cases import liger_status, trl_status
    trl_ok, trl_why = trl_status()
    liger_ok, liger_why = liger_status()
    return [("eager", True, ""), ("prefopt", True, ""), ("trl", trl_ok, trl_why),
            ("liger", False, liger_why if not liger_ok else "no long-sequence adapter in bench/long.py")]


def make_inputs(T, H, V, dtype):
    """One pair (chosen, rejected) of T tokens; policy head = reference head + a small change, so the log-ratios
    are a few nats while the sums are ~10 nats per token."""
    import torch
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, T, H, generator=gen)
    ref_weight = torch.randn(V, H, generator=gen) * (2.0 / H ** 0.5)
    weight = ref_weight + torch.randn(V, H, generator=gen) * (0.01 / H ** 0.5)
    labels = torch.randint(0, V, (2, T), generator=gen)
    labels[:, :PROMPT] = IGNORE_INDEX
    return dict(hidden=hidden.to(dtype).requires_grad_(True), weight=weight.to(dtype).requires_grad_(True),
                ref_hidden=hidden.to(dtype), ref_weight=ref_weight.to(dtype), labels=labels)


def _step(impl, inp):
    """One DPO step -> (loss, log_ratios[2]) with .grad set on hidden and weight."""
    import torch
    labels, mask = inp["labels"], inp["labels"] != IGNORE_INDEX

    def dpo(ratios):
        return -torch.nn.functional.logsigmoid(BETA * (ratios[0] - ratios[1]))

    if impl == "prefopt":
        import prefopt
        loss, metrics = prefopt.fused_linear_dpo_loss(inp["hidden"], inp["weight"], labels,
                                                      ref_hidden=inp["ref_hidden"], ref_weight=inp["ref_weight"],
                                                      loss_type="sigmoid", beta=BETA)
        loss.backward()
        ratios = torch.stack([metrics["rewards/chosen"], metrics["rewards/rejected"]]).detach() / BETA
        return loss.detach(), ratios
    if impl == "eager":
        def seq(h, w):
            logp = torch.log_softmax(h @ w.T, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            return (logp * mask).sum(-1)
    elif impl == "trl":
        from trl.kernels import ChunkedLogProbFunction

        from .cases import TRL_CHUNK

        def seq(h, w):
            out = ChunkedLogProbFunction.apply(h.reshape(-1, h.shape[-1]), w, None, labels.clamp(min=0).reshape(-1),
                                               1.0, TRL_CHUNK, None, 1.0, ())
            return (out[0].view(labels.shape) * mask).sum(-1)
    else:
        raise ValueError(impl)
    pol = seq(inp["hidden"], inp["weight"])
    with torch.no_grad():
        ref = seq(inp["ref_hidden"], inp["ref_weight"])
    ratios = pol - ref
    loss = dpo(ratios)
    loss.backward()
    return loss.detach(), ratios.detach()


def child(spec, out_path):
    """Runs in its own process: cap, import torch, build inputs, one measured step, save the results."""
    result = dict(spec)
    try:
        from .measure import PeakMemory, capped_child
        capped_child(spec)
        import torch
        dtype = torch.float64 if spec["truth"] else torch.float32
        inp = make_inputs(spec["T"], spec["H"], spec["V"], dtype)
        if spec["truth"]:
            import prefopt
            ctx = prefopt.use_backend("torch")
        else:
            import contextlib
            ctx = contextlib.nullcontext()
        start = time.perf_counter()
        with PeakMemory("cpu") as mem, ctx:
            loss, ratios = _step(spec["impl"], inp)
        result.update(status="ok", time_s=time.perf_counter() - start, peak_mib=mem.extra / 2 ** 20)
        torch.save(dict(loss=loss.double(), ratios=ratios.double(), grad_hidden=inp["hidden"].grad.double(),
                        grad_weight=inp["weight"].grad.double()), out_path + ".pt")
    except MemoryError as err:
        result.update(status="oom", error=f"MemoryError: {err}"[:200])
    except RuntimeError as err:  # torch's allocator: "DefaultCPUAllocator: can't allocate memory"
        msg = str(err)
        oom = "allocate memory" in msg or "out of memory" in msg.lower()
        result.update(status="oom" if oom else "error", error=msg.splitlines()[0][:200])
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


def _run_child(spec, work, timeout):
    name = f"{spec['impl']}_{spec['T']}_{spec['H']}_{spec['V']}{'_truth' if spec['truth'] else ''}"
    out_path = os.path.join(work, name + ".json")
    # `bench.long` from a source checkout's root, `prefopt.bench.long` from an installed package
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) if __package__ == "bench" else None
    try:
        proc = subprocess.run([sys.executable, "-m", f"{__package__}.long", "--child", json.dumps(spec), out_path],
                              cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec, status="timeout", error=f"over {timeout} s"), None
    if not os.path.exists(out_path):  # killed without a word: under RLIMIT_AS that is an allocation failure
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        oom = "memory" in tail[0].lower() or proc.returncode in (-9, -6, 134, 137)
        return dict(spec, status="oom" if oom else "error", error=tail[0][:200]), None
    with open(out_path) as f:
        res = json.load(f)
    return res, (out_path + ".pt") if res["status"] == "ok" else None


def _errors(got_path, truth_path):
    import torch
    got, truth = torch.load(got_path), torch.load(truth_path)

    def rel(name):
        return float((got[name] - truth[name]).abs().max() / truth[name].abs().max().clamp_min(1e-30))
    return dict(ratio_err=float((got["ratios"] - truth["ratios"]).abs().max()),
                loss_err=float((got["loss"] - truth["loss"]).abs()),
                grad_hidden_rel=rel("grad_hidden"), grad_weight_rel=rel("grad_weight"))


def run_long(*, quick=False, cap_gb=DEFAULT_CAP_GB, timeout=900, threads=None, work=None, log=print):
    """Every case x implementation in a capped child, plus an uncapped float64 truth per case -> records."""
    import tempfile
    work = work or tempfile.mkdtemp(prefix="prefopt-long-")
    records = []
    for T, H, V in long_cases(quick):
        base = dict(T=T, H=H, V=V, threads=threads)
        truth, truth_pt = _run_child(dict(base, impl="prefopt", truth=True, cap_gb=0), work, timeout)
        log(f"T={T} H={H} V={V} float64 truth: {truth['status']}")
        for impl, ok, why in implementations():
            rec = dict(base, impl=impl, cap_gb=cap_gb)
            if not ok:
                records.append(dict(rec, status="skip", error=why))
                continue
            res, pt = _run_child(dict(rec, truth=False), work, timeout)
            if pt and truth_pt:
                res.update(_errors(pt, truth_pt))
                os.remove(pt)
            records.append(res)
            log(f"  {impl}: {res['status']}" + (f" {res['peak_mib']:.0f} MiB {res['time_s']:.1f} s"
                                                 if res["status"] == "ok" else f" ({res.get('error', '')})"))
        if truth_pt:
            os.remove(truth_pt)
    return records


def markdown(records, cap_gb):
    head = ("| tokens/seq | H | V | impl | result | peak MiB above inputs | step s | log-ratio err (nats) | "
            "loss err | grad hidden rel err | grad weight rel err |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in records:
        if r["status"] == "ok":
            cells = ["trains", f"{r['peak_mib']:.0f}", f"{r['time_s']:.1f}"]
            cells += [f"{r[k]:.2e}" if k in r else "n/a" for k in ("ratio_err", "loss_err", "grad_hidden_rel",
                                                                   "grad_weight_rel")]
        else:
            what = {"oom": f"out of memory under the {cap_gb:g} GiB cap", "skip": f"skipped: {r.get('error', '')}"}
            cells = [what.get(r["status"], f"{r['status']}: {r.get('error', '')}")] + [""] * 6
        rows.append(f"| {r['T']} | {r['H']} | {r['V']} | {r['impl']} | " + " | ".join(cells) + " |")
    return head + "\n" + "\n".join(rows)


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_mem, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    sweep_v = records[0]["V"]  # the tokens sweep; the V=128k point is in the table
    for impl, marker in (("eager", "o"), ("prefopt", "s"), ("trl", "^")):
        rows = sorted((r for r in records if r["impl"] == impl and r["V"] == sweep_v), key=lambda r: r["T"])
        ok = [r for r in rows if r["status"] == "ok"]
        line, = ax_mem.plot([r["T"] for r in ok], [r["peak_mib"] for r in ok], marker=marker, label=impl)
        for r in rows:
            if r["status"] == "oom":
                ax_mem.scatter([r["T"]], [1], marker="x", s=80, color=line.get_color())
                ax_mem.annotate(f"{impl}: OOM", (r["T"], 1), textcoords="offset points", xytext=(-20, 8 + 10 * (
                    marker == "^")), fontsize=8, color=line.get_color())
        ax_err.plot([r["T"] for r in ok if "ratio_err" in r], [max(r["ratio_err"], 1e-9) for r in ok
                                                               if "ratio_err" in r], marker=marker, label=impl)
    for ax in (ax_mem, ax_err):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per sequence (one pair)")
        ax.legend()
    ax_mem.set_ylabel("peak MiB above inputs (x: out of memory under the cap)")
    ax_err.set_ylabel("max |log-ratio - float64 truth| (nats)")
    fig.suptitle(f"One DPO pair of long sequences, V={sweep_v}, float32, each run in its own capped process")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main_long(args, log):
    from .report import environment
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    records = run_long(quick=args.quick, cap_gb=args.cap_gb, timeout=args.timeout, threads=args.threads, log=log)
    env = environment("cpu", argv=["--long"] + (["--quick"] if args.quick else []))
    env.update(cap_gb=args.cap_gb, elapsed_s=round(time.perf_counter() - start, 1))
    table = markdown(records, args.cap_gb)
    with open(os.path.join(out_dir, "long.json"), "w") as f:
        json.dump(dict(environment=env, records=records), f, indent=1)
    with open(os.path.join(out_dir, "long.md"), "w") as f:
        f.write(table + "\n")
    if not args.no_plots:
        plot(records, os.path.join(out_dir, "long_sequences.png"))
    print(table)
    log(f"wrote {out_dir}/long.json, long.md in {env['elapsed_s']} s")
    return 1 if any(r["status"] in ("error", "timeout") for r in records) else 0


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    sys.exit(child(json.loads(sys.argv[2]), sys.argv[3]))
