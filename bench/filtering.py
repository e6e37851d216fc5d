"""`python -m bench --filtering`: the fused head's backward, exact against gradient-filtered (filter_eps), and
gradient-filtered with vocabulary sorting (vocab_sort=True).

One `linear_logprobs` head on LM-like inputs (V = 128k by default; mean per-token entropy calibrated to ~2 nats).
Each repeat runs a forward and times the backward, exact, filtered and filtered + sorted (unless --no-sort),
alternately in one process, and prints the median times, their ratios to the exact one, the fraction of blocks
skipped (prefopt.filtering.skip_counter) and the largest gradient error against the bound of docs/design.md
("Gradient filtering"); the sorted backward's forward also computes the order (one GEMV) and gathers its blocks.

Inputs (LM-like): the bias holds a unigram log-prior, -ZIPF * log(1 + v / HEAD) for token v (a flat head of about HEAD
frequent tokens, then a power-law tail: the vocabulary is ordered by frequency, as a merge-ordered BPE vocabulary
roughly is; Cut Cross-Entropy sorts its vocabulary for the same reason); weight ~ N(0, 1/H); each token's label is
drawn from the unigram law and its hidden state is noise plus a push towards its label's weight row, with an
amplitude bisected until the mean entropy is --entropy nats. `--order shuffled` permutes the vocabulary (same
distributions, the rare tokens no longer fill whole blocks) to show what the ordering buys, and what vocab_sort
(docs/design.md, "Vocabulary sorting") wins back.
Times are from a shared machine: compare them only within one run.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

ZIPF = 4.0          # tail exponent of the unigram prior
HEAD = 16.0         # about this many frequent tokens before the tail
NOISE = 0.5         # std of the random part of a logit (hidden noise against unit-norm weight rows)
CALIBRATION_ROWS = 64


def make_inputs(n, hidden_size, vocab, dtype, entropy, order="sorted", seed=0):
    """-> (hidden [n, H], weight [V, H], bias [V], labels [n], measured mean entropy): see the module docstring."""
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
    if order == "shuffled":
        perm = torch.randperm(vocab, generator=gen)
        weight, prior, labels = weight[perm], prior[perm], torch.argsort(perm)[labels]
    return hidden.to(dtype), weight.to(dtype), prior.to(dtype), labels, measured


def _backward(hidden, weight, bias, labels, filter_eps, cache_mb, vocab_sort=False):
    """One forward, then a timed backward of mean(-logp) -> (seconds, grad_hidden, grad_weight); the bias is fixed."""
    import prefopt
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp = prefopt.linear_logprobs(h, w, labels, bias, filter_eps=filter_eps, logits_cache_mb=cache_mb,
                                   vocab_sort=vocab_sort)
    loss = -logp.mean()
    start = time.perf_counter()
    loss.backward()
    return time.perf_counter() - start, h.grad, w.grad


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


def run(args, log=print):
    import torch

    from prefopt._backend import resolve
    from prefopt.filtering import skip_counter

    from .inputs import dtype_of
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = dtype_of(args.dtype)
    eps = 2.0 ** -12 if args.eps == "auto" else float(args.eps)  # "auto" is exact on fp32: ask for CCE's value
    hidden, weight, bias, labels, entropy = make_inputs(args.tokens, args.hidden, args.vocab, dtype, args.entropy,
                                                  args.order)
    log(f"N={args.tokens} H={args.hidden} V={args.vocab} {args.dtype} order={args.order} backend="
        f"{resolve(hidden.device)} threads={torch.get_num_threads()} logits_cache_mb={args.cache_mb} eps={eps:.6g} "
        f"mean entropy {entropy:.2f} nats")
    kinds = [("exact", None, False), ("filtered", eps, False)] + ([] if args.no_sort else [("sorted", eps, True)])
    times = {kind: [] for kind, _, _ in kinds}
    grads, skipped = {}, {}
    for repeat in range(args.repeats):
        for kind, filter_eps, vocab_sort in kinds:
            skip_counter.reset()
            seconds, gh, gw = _backward(hidden, weight, bias, labels, filter_eps, args.cache_mb, vocab_sort)
            times[kind].append(seconds)
            grads[kind] = (gh, gw)
            if filter_eps is not None:
                skipped[kind] = (skip_counter.skipped, skip_counter.total)
            log(f"  repeat {repeat + 1}: {kind} backward {seconds:.2f} s")
    exact_s = statistics.median(times["exact"])
    res = dict(exact_s=exact_s, entropy=entropy, eps=eps, kinds={})
    for kind in times:
        if kind == "exact":
            continue
        seconds = statistics.median(times[kind])
        res["kinds"][kind] = dict(
            seconds=seconds, ratio=exact_s / seconds, skipped_blocks=skipped[kind][0], total_blocks=skipped[kind][1],
            skipped_fraction=skipped[kind][0] / skipped[kind][1],
            errors=error_against_bound(grads["exact"], grads[kind], hidden, weight, args.tokens, eps))
    return res


TITLES = {"filtered": "filtered", "sorted": "filtered + vocab_sort"}


def report(res):
    lines = [f"exact backward {res['exact_s']:.2f} s (median)"]
    for kind, r in res["kinds"].items():
        title = TITLES[kind]
        lines += [f"{title} backward {r['seconds']:.2f} s (median), speed-up {r['ratio']:.2f}x, skipped blocks "
                  f"{r['skipped_blocks']} / {r['total_blocks']} = {r['skipped_fraction']:.3f}"]
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
    p.add_argument("--hidden", type=int, default=1024, help="hidden size H (default 1024)")
    p.add_argument("--vocab", type=int, default=128000, help="vocabulary size V (default 128000)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16 (slow GEMMs on CPUs without "
                   "bf16 instructions)")
    p.add_argument("--eps", default="auto", help="filter_eps of the filtered run (default auto = 2**-12 here)")
    p.add_argument("--entropy", type=float, default=2.0, help="target mean entropy of the inputs, nats (default 2)")
    p.add_argument("--order", choices=("sorted", "shuffled"), default="sorted",
                   help="vocabulary ordered by frequency (default) or shuffled")
    p.add_argument("--cache-mb", type=float, default=None, help="logits_cache_mb of both runs (default: prefopt's)")
    p.add_argument("--no-sort", action="store_true", help="leave out the filtered + vocab_sort backward")
    p.add_argument("--repeats", type=int, default=3, help="timed backwards of each kind (median; default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def main_filtering(args, log=print):
    res = run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    log(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main_filtering(parser().parse_args()))
