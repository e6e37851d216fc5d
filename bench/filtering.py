"""`python -m bench --filtering`: the fused head with gradient filtering (filter_eps) against the exact head, over a
sweep of inputs from nothing skipped to nearly everything skipped, with the vocabulary frequency-ordered and scattered.

Each sweep point is one `linear_logprobs` head call (N=512, H=256, V=131072 fp32 by default, mean(-logp) as the loss)
run three ways: exact, filtered (filter_eps=2**-12) and filtered + vocab_sort=True. Every repeat runs the three in
turn (the order rotates from repeat to repeat) in one process, timing the forward and the backward apart; the table
gives the medians, the time ratios filtered / exact and sorted / exact (< 1 is faster), the fraction of blocks each
skipped (prefopt.filtering.skip_counter) and the largest gradient error as a fraction of the bound of docs/design.md
("Gradient filtering"). The sorted head's forward computes the order (one GEMV and an argsort) and visits its
blocks through it, so its forward is timed too.

Inputs (`cluster_inputs`): the vocabulary is cut into clusters of `likely` tokens, each with a direction in the
hidden space; a weight row is its cluster's direction times AMPLITUDE plus N(0, 1) noise, and each token's hidden
state is the direction of one cluster, so its softmax spreads over that cluster's tokens (about log(likely) nats)
and every other entry is ~1e-9 or less; the label is one of the cluster's tokens. Clusters are drawn by a Zipf law
(`zipf`: a few clusters are shared by many tokens, as frequent words are) or uniformly (`uniform`: rows share
almost nothing). Frequency-ordered: a cluster's tokens are adjacent in the vocabulary and frequent clusters come
first (as in a merge-ordered BPE vocabulary); scattered: the vocabulary is permuted. The sweep's `lm` points are the
LM-like inputs of `lm_inputs` (a Zipf unigram prior in the bias, hidden states pointing at their label, mean entropy
2 nats). `--single` runs one LM-like point with more options.
Times are from a shared machine: compare them only within one run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

ZIPF = 4.0          # tail exponent of the LM-like unigram prior
HEAD = 16.0         # about this many frequent tokens before the tail
NOISE = 0.5         # std of the random part of an LM-like logit (hidden noise against unit-norm weight rows)
CALIBRATION_ROWS = 64
AMPLITUDE = 30.0    # cluster inputs: a cluster's logits stand ~30 above the others (their largest, ~8 at V=131072)
CLUSTER_ZIPF_HEAD = 4.0  # cluster inputs, zipf law: P(cluster c) ~ (1 + c / 4) ** -2

# (law, likely tokens per row): with both vocabulary orders, from ~0% to ~99.9% of the blocks skipped at the default
# shape (docs/bench.md has the measured fractions)
SWEEP = [("lm", 0), ("zipf", 2), ("zipf", 8), ("zipf", 64), ("uniform", 8), ("uniform", 64), ("uniform", 512),
         ("uniform", 4096)]
ORDERS = ("frequency", "scattered")
KINDS = (("exact", None, False), ("filtered", "eps", False), ("sorted", "eps", True))
TITLES = {"filtered": "filtered", "sorted": "filtered + vocab_sort"}


def lm_inputs(n, hidden_size, vocab, dtype, entropy, order="frequency", seed=0):
    """-> (hidden [n, H], weight [V, H], bias [V], labels [n], measured mean entropy): LM-like inputs. The bias holds a
    unigram log-prior, -ZIPF * log(1 + v / HEAD) for token v (a flat head of about HEAD frequent tokens, then a
    power-law tail: the vocabulary is ordered by frequency); weight ~ N(0, 1/H); each label is drawn from the unigram
    law and its hidden state is noise plus a push towards its label's weight row, with an amplitude bisected until the
    mean entropy is `entropy` nats (at most ~2.9 here: the prior's own). `order="scattered"` permutes the vocabulary."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    prior = -ZIPF * torch.log1p(torch.arange(vocab, dtype=torch.float32) / HEAD)
    weight = torch.randn(vocab, hidden_size, generator=gen) / math.sqrt(hidden_size)
    labels = torch.multinomial(torch.softmax(prior, 0), n, replacement=True, generator=gen)
    noise = NOISE * torch.randn(n, hidden_size, generator=gen)
    direction = weight[labels] / weight[labels].norm(dim=1, keepdim=True)

    def build(amplitude, rows=slice(None)):
        return noise[rows] + amplitude * direction[rows]

    def mean_entropy(amplitude):
        logp = torch.log_softmax(build(amplitude, slice(0, CALIBRATION_ROWS)) @ weight.T + prior, dim=-1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    lo, hi = 0.0, 40.0
    for _ in range(30):  # entropy falls as the hidden state points harder at its label
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_entropy(mid) > entropy else (lo, mid)
    hidden = build(0.5 * (lo + hi))
    measured = mean_entropy(0.5 * (lo + hi))
    if order == "scattered":
        perm = torch.randperm(vocab, generator=gen)
        weight, prior, labels = weight[perm], prior[perm], torch.argsort(perm)[labels]
    return hidden.to(dtype), weight.to(dtype), prior.to(dtype), labels, measured


def cluster_inputs(n, hidden_size, vocab, dtype, likely, law, order="frequency", seed=0):
    """-> (hidden, weight, None, labels, mean entropy of the first rows): see the module docstring."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    n_clusters = -(-vocab // likely)
    directions = torch.randn(n_clusters, hidden_size, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    cluster_of = torch.arange(vocab) // likely
    weight = AMPLITUDE * directions[cluster_of] + torch.randn(vocab, hidden_size, generator=gen)
    if law == "zipf":
        prior = (1 + torch.arange(n_clusters, dtype=torch.float64) / CLUSTER_ZIPF_HEAD) ** -2.0
    else:
        prior = torch.ones(n_clusters, dtype=torch.float64)
    rows = torch.multinomial(prior, n, replacement=True, generator=gen)
    hidden = directions[rows]
    size = torch.bincount(cluster_of, minlength=n_clusters)[rows]  # the last cluster may be smaller
    labels = rows * likely + (torch.rand(n, generator=gen) * size).long()
    if order == "scattered":
        perm = torch.randperm(vocab, generator=gen)
        weight, labels = weight[perm], torch.argsort(perm)[labels]
    logp = torch.log_softmax(hidden[:CALIBRATION_ROWS] @ weight.T, dim=-1)
    entropy = float(-(logp.exp() * logp).nan_to_num().sum(-1).mean())
    return hidden.to(dtype), weight.to(dtype), None, labels, entropy


def point_inputs(args, law, likely, order, dtype):
    if law == "lm":
        return lm_inputs(args.tokens, args.hidden, args.vocab, dtype, args.entropy, order)
    return cluster_inputs(args.tokens, args.hidden, args.vocab, dtype, likely, law, order)


_clock = time.perf_counter  # `--clock cpu`: time.process_time (set by main_filtering)


def _step(hidden, weight, bias, labels, filter_eps, cache_mb, vocab_sort):
    """One forward and backward of mean(-logp) -> (forward s, backward s, grad_hidden, grad_weight); bias fixed."""
    import prefopt
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    start = _clock()
    logp = prefopt.linear_logprobs(h, w, labels, bias, filter_eps=filter_eps, logits_cache_mb=cache_mb,
                                   vocab_sort=vocab_sort)
    loss = -logp.mean()
    middle = _clock()
    loss.backward()
    return middle - start, _clock() - middle, h.grad, w.grad


def error_against_bound(exact, filtered, hidden, weight, n, eps):
    """Largest |filtered - exact| of each gradient, and its largest ratio to the bound of docs/design.md
    (upstream G_i = 1/n for mean(-logp), s = 1): eps * G_i * sum_v |W[v, k]| and eps * sum_i G_i |h[i, k]|."""
    out = {}
    bounds = {"hidden": eps / n * weight.float().abs().sum(0)[None, :],
              "weight": eps / n * hidden.float().abs().sum(0)[None, :]}
    for name, want, got in zip(("hidden", "weight"), exact, filtered):
        error = (got.float() - want.float()).abs()
        out[name] = dict(max_error=float(error.max()), max_bound=float(bounds[name].max()),
                         worst_ratio=float((error / bounds[name]).max()),
                         rel_error=float((got.float() - want.float()).norm() / want.float().norm()))
    return out


def measure_point(hidden, weight, bias, labels, eps, args, kinds=KINDS, log=print):
    """The three ways of one point, interleaved over args.repeats -> dict of medians, ratios, skips and errors."""
    from prefopt.filtering import skip_counter
    times = {kind: {"forward": [], "backward": []} for kind, _, _ in kinds}
    grads, skipped = {}, {}
    for repeat in range(args.repeats):
        shift = repeat % len(kinds)  # rotate the order so no way always runs first (or after the same one)
        for kind, filter_eps, vocab_sort in kinds[shift:] + kinds[:shift]:
            skip_counter.reset()
            fwd, bwd, gh, gw = _step(hidden, weight, bias, labels, eps if filter_eps else None, args.cache_mb,
                                     vocab_sort)
            times[kind]["forward"].append(fwd)
            times[kind]["backward"].append(bwd)
            grads[kind] = (gh, gw)
            if filter_eps:
                skipped[kind] = (skip_counter.skipped, skip_counter.total)
            log(f"    repeat {repeat + 1}: {kind} forward {fwd:.3f} s, backward {bwd:.3f} s")
    med = {kind: {part: statistics.median(ts) for part, ts in t.items()} for kind, t in times.items()}
    exact = med["exact"]
    res = dict(exact_forward_s=exact["forward"], exact_backward_s=exact["backward"], kinds={})

    def paired(kind, parts):
        """median over the repeats of (this way's time / the exact time of the same repeat): runs of one repeat
        are seconds apart, so the machine's load drifts less between them than between medians"""
        mine = [sum(x) for x in zip(*(times[kind][p] for p in parts))]
        base = [sum(x) for x in zip(*(times["exact"][p] for p in parts))]
        return statistics.median(m / b for m, b in zip(mine, base))

    for kind, _, _ in kinds:
        if kind == "exact":
            continue
        m = med[kind]
        res["kinds"][kind] = dict(
            forward_s=m["forward"], backward_s=m["backward"],
            backward_ratio=paired(kind, ("backward",)), forward_ratio=paired(kind, ("forward",)),
            step_ratio=paired(kind, ("forward", "backward")),
            skipped_blocks=skipped[kind][0], total_blocks=skipped[kind][1],
            skipped_fraction=skipped[kind][0] / max(1, skipped[kind][1]),
            errors=error_against_bound(grads["exact"], grads[kind], hidden, weight, hidden.shape[0], eps))
    res["times"] = times
    return res


def _settle(args):
    import torch

    from .inputs import dtype_of
    if args.threads:
        torch.set_num_threads(args.threads)
    eps = 2.0 ** -12 if args.eps == "auto" else float(args.eps)  # "auto" is exact on fp32: ask for CCE's value
    return dtype_of(args.dtype), eps


def run_sweep(args, log=print):
    import torch

    from prefopt._backend import resolve
    dtype, eps = _settle(args)
    points = [p for p in SWEEP if not args.laws or p[0] in args.laws]
    from .report import environment
    env = dict(environment("cpu"), tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype,
               eps=eps, cache_mb=args.cache_mb, repeats=args.repeats, threads=torch.get_num_threads(),
               clock=args.clock, backend=resolve(torch.device("cpu")))
    log(f"filtering sweep: N={args.tokens} H={args.hidden} V={args.vocab} {args.dtype} eps={eps:.6g} "
        f"logits_cache_mb={args.cache_mb} backend={env['backend']} threads={env['threads']} repeats={args.repeats} "
        f"clock={args.clock}")
    rows = []
    for law, likely in points:
        for order in args.orders:
            hidden, weight, bias, labels, entropy = point_inputs(args, law, likely, order, dtype)
            name = "lm (2 nats)" if law == "lm" else f"{law} {likely}"
            log(f"  {name}, {order}: mean entropy {entropy:.2f} nats")
            res = measure_point(hidden, weight, bias, labels, eps, args, log=log)
            res.update(law=law, likely=likely, order=order, entropy=entropy, name=name)
            rows.append(res)
            del hidden, weight, bias, labels
    return dict(environment=env, rows=rows)


def _pct(fraction):
    return f"{100 * fraction:.1f}%" if fraction < 0.999 or fraction == 1 else f"{100 * fraction:.2f}%"


def sweep_markdown(res):
    env = res["environment"]
    lines = [f"N={env['tokens']} H={env['hidden']} V={env['vocab']} {env['dtype']}, filter_eps={env['eps']:.6g}, "
             f"logits_cache_mb={env['cache_mb']}, backend {env['backend']}, {env['threads']} thread(s), "
             f"{'process CPU' if env['clock'] == 'cpu' else 'wall-clock'} time, {env['repeats']} interleaved repeats "
             f"(ratios: the median over repeats of each repeat's ratio), git {env.get('git_rev')}, {env.get('date')}",
             "",
             "| input | vocabulary | entropy (nats) | exact backward s | filtered: skipped | filtered / exact | "
             "sorted: skipped | sorted / exact | sorted / exact, forward + backward | noise: forward filtered / "
             "exact | worst error / bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        f, s = r["kinds"]["filtered"], r["kinds"]["sorted"]
        worst = max(e["worst_ratio"] for k in (f, s) for e in k["errors"].values())
        lines.append(f"| {r['name']} | {r['order']} | {r['entropy']:.2f} | {r['exact_backward_s']:.3f} | "
                     f"{_pct(f['skipped_fraction'])} | {f['backward_ratio']:.3f} | {_pct(s['skipped_fraction'])} | "
                     f"{s['backward_ratio']:.3f} | {s['step_ratio']:.3f} | {f['forward_ratio']:.3f} | {worst:.2g} |")
    ratios = {k: [r["kinds"][k]["backward_ratio"] for r in res["rows"]] for k in ("filtered", "sorted")}
    if res["rows"]:
        lines += ["", "backward time ratios (< 1 is faster): filtered / exact " +
                  f"{min(ratios['filtered']):.2f}-{max(ratios['filtered']):.2f}, sorted / exact "
                  f"{min(ratios['sorted']):.2f}-{max(ratios['sorted']):.2f}"]
    return "\n".join(lines)


def run_single(args, log=print):
    """One LM-like point (the `lm` inputs at --entropy, --order), exact / filtered [/ sorted]."""
    import torch

    from prefopt._backend import resolve
    dtype, eps = _settle(args)
    order = args.orders[0]
    hidden, weight, bias, labels, entropy = lm_inputs(args.tokens, args.hidden, args.vocab, dtype, args.entropy,
                                                      order)
    log(f"N={args.tokens} H={args.hidden} V={args.vocab} {args.dtype} order={order} backend="
        f"{resolve(hidden.device)} threads={torch.get_num_threads()} logits_cache_mb={args.cache_mb} eps={eps:.6g} "
        f"mean entropy {entropy:.2f} nats")
    kinds = KINDS[:2] if args.no_sort else KINDS
    res = measure_point(hidden, weight, bias, labels, eps, args, kinds=kinds, log=log)
    res.update(entropy=entropy, eps=eps)
    return res


def single_report(res):
    lines = [f"exact backward {res['exact_backward_s']:.3f} s (median)"]
    for kind, r in res["kinds"].items():
        lines += [f"{TITLES[kind]} backward {r['backward_s']:.3f} s (median), {r['backward_ratio']:.2f} of exact "
                  f"(forward + backward {r['step_ratio']:.2f}), skipped blocks {r['skipped_blocks']} / "
                  f"{r['total_blocks']} = {r['skipped_fraction']:.4f}"]
        for name, e in r["errors"].items():
            lines.append(f"  grad_{name:<6} max |{kind} - exact| {e['max_error']:.3g}, bound up to "
                         f"{e['max_bound']:.3g}, worst error / bound {e['worst_ratio']:.3g}, "
                         f"relative (Frobenius) error {e['rel_error']:.3g}")
    return "\n".join(lines)


def parser(prog="python -m bench.filtering"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def add_arguments(p):
    p.add_argument("--tokens", type=int, default=512, help="token rows of the head (default 512)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size H (default 256)")
    p.add_argument("--vocab", type=int, default=131072, help="vocabulary size V (default 131072)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16 (slow GEMMs on CPUs without "
                   "bf16 instructions)")
    p.add_argument("--eps", default="auto", help="filter_eps of the filtered runs (default auto = 2**-12 here)")
    p.add_argument("--laws", nargs="+", choices=sorted({law for law, _ in SWEEP}), default=None,
                   help="sweep: only these input families (default: all)")
    p.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS),
                   help="vocabulary orders (default both; --single takes the first)")
    p.add_argument("--cache-mb", type=float, default=0.0, help="logits_cache_mb of every run (default 0: every "
                   "backward tile recomputed, the head at large shapes; prefopt's own default is 256)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats of each way (median; default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall-clock time (default), or the "
                   "process's CPU time: with --threads 1 on a shared machine it counts the work done, not the "
                   "waits for a core")
    p.add_argument("--out", default=None, help="sweep: folder for filtering.json and filtering.md (default: "
                   "bench/results/ in a source checkout)")
    p.add_argument("--single", action="store_true", help="one LM-like point instead of the sweep (--entropy, "
                   "--orders, --no-sort)")
    p.add_argument("--entropy", type=float, default=2.0, help="--single and the lm points: mean entropy, nats "
                   "(default 2)")
    p.add_argument("--no-sort", action="store_true", help="--single: leave out the filtered + vocab_sort way")


def main_filtering(args, log=print):
    def progress(msg):
        print(msg, file=sys.stderr, flush=True)

    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter

    if args.single:
        log(single_report(run_single(args, log=progress)))
        return 0
    res = run_sweep(args, log=progress)
    table = sweep_markdown(res)
    from .__main__ import default_out_dir
    out = args.out or default_out_dir()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "filtering.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, "filtering.md"), "w") as f:
        f.write(table + "\n")
    log(table)
    progress(f"wrote {os.path.join(out, 'filtering.json')} and filtering.md")
    return 0


if __name__ == "__main__":
    sys.exit(main_filtering(parser().parse_args()))
