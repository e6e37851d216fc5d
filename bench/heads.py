"""`prefopt bench --heads`: the triton backend's two linear heads on a GPU, forward + backward, measured next to what
prefopt/cost_model.py predicts for each, and which one PREFOPT_HEAD=auto picks (docs/bench.md, "Which GPU head").

`fused` is kernels/linear_logprobs.py (logits tiles in registers, fp32 atomics); `tiles` is prefopt/cpu/chunked.py's
ChunkedHead on the Triton row ops (cuBLAS GEMMs into an owned fp32 tile, no atomics, more HBM traffic). Default
shape: the head call of issue 16 (N=16384 labelled tokens, H=4096, V=128256, bf16). Inputs: hidden ~ N(0, 1),
weight ~ N(0, 1/H), labels uniform, upstream gradient of the log-probs ~ N(0, 1); no bias, no entropy, exact
backward (the cost model's assumptions). Each head runs --warmup untimed steps, then --repeats steps timed with CUDA
events around the forward and around the backward (medians); the two heads' log-probs and gradients are compared.
`--dry-run` prints the plan and the predictions and runs nothing: no GPU needed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HEADS = ("fused", "tiles")


def parser(prog="python -m bench.heads"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="labelled tokens N of the head call (default 16384)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size H (default 4096)")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size V (default 128256)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only under TRITON_INTERPRET=1 (a smoke "
                   "test of this script, not a benchmark)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per head (median; default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per head first (default 2: Triton compiles, "
                   "cuBLAS picks its kernels)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the cost model's predictions only")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p


def predictions(args):
    """{head: {forward_s, backward_s, total_s, bound}} from the cost model, and the head auto picks."""
    from prefopt._backend import head_prediction

    from .inputs import dtype_of
    pick = head_prediction(args.tokens, args.hidden, args.vocab, dtype_of(args.dtype))
    out = {}
    for head, costs in (("fused", pick.fused), ("tiles", pick.tiles)):
        fwd, bwd = (c.seconds() for c in costs)
        out[head] = dict(forward_s=fwd["predicted"], backward_s=bwd["predicted"],
                         total_s=fwd["predicted"] + bwd["predicted"], bound=f"{fwd['bound']} / {bwd['bound']}")
    return out, pick.head


def cuda_missing_message(device):
    import torch
    return (f"prefopt bench --heads: --device {device} needs a CUDA device, and torch.cuda.is_available() is False "
            f"here (torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}). Run it on a machine "
            f"with a GPU, or add --dry-run to print the plan and the cost model's predictions without one.")


def _check_device(device):
    """None when `device` can run the heads here, else the message to print."""
    import torch
    if device.startswith("cuda"):
        return None if torch.cuda.is_available() else cuda_missing_message(device)
    if device == "cpu":
        from prefopt._backend import triton_status
        ok, why = triton_status("cpu")
        return None if ok else f"prefopt bench --heads: --device cpu runs only as a smoke test: {why}"
    return f"prefopt bench --heads: unknown --device {device!r} (cuda, or cpu under TRITON_INTERPRET=1)"


def _inputs(args, device):
    import torch

    from .inputs import dtype_of
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen)
    weight = torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden ** 0.5
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    upstream = torch.randn(args.tokens, generator=gen)
    dtype = dtype_of(args.dtype)
    return hidden.to(device, dtype), weight.to(device, dtype), labels.to(device), upstream.to(device)


class _Timer:
    """Seconds of one region: CUDA events on a GPU, perf_counter (after nothing to wait for) on CPU."""

    def __init__(self, device):
        import torch
        self.cuda = device.startswith("cuda")
        self.torch = torch

    def __call__(self, fn):
        if self.cuda:
            start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            out = fn()
            end.record()
            self.torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def _step(head, hidden, weight, labels, upstream, timer):
    import torch

    import prefopt
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    with prefopt.use_backend("triton"), prefopt.use_head(head):
        fwd_s, logp = timer(lambda: prefopt.linear_logprobs(h, w, labels))
        bwd_s, grads = timer(lambda: torch.autograd.grad((logp * upstream).sum(), (h, w)))
    return fwd_s, bwd_s, (logp.detach(),) + grads


def measure(args, log=print):
    """{head: {forward_s, backward_s, total_s, peak_extra_bytes}} measured, and the heads' largest differences."""
    import torch
    device = args.device
    timer = _Timer(device)
    hidden, weight, labels, upstream = _inputs(args, device)
    out, results = {}, {}
    for head in HEADS:
        for _ in range(args.warmup):
            _step(head, hidden, weight, labels, upstream, timer)
        if timer.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        fwd, bwd = [], []
        for repeat in range(args.repeats):
            fwd_s, bwd_s, results[head] = _step(head, hidden, weight, labels, upstream, timer)
            fwd.append(fwd_s)
            bwd.append(bwd_s)
            log(f"  {head}: step {repeat + 1}: forward {fwd_s * 1e3:.2f} ms, backward {bwd_s * 1e3:.2f} ms")
        peak = torch.cuda.max_memory_allocated() - base if timer.cuda else None
        out[head] = dict(forward_s=statistics.median(fwd), backward_s=statistics.median(bwd),
                         total_s=statistics.median(f + b for f, b in zip(fwd, bwd)), peak_extra_bytes=peak)
    diff = {name: float((a.float() - b.float()).abs().max())
            for name, a, b in zip(("logp", "grad_hidden", "grad_weight"), results["fused"], results["tiles"])}
    return out, diff


def _ms(seconds):
    return "" if seconds is None else f"{seconds * 1e3:,.2f}"


def table(predicted, auto, measured=None):
    lines = ["| head | auto picks | predicted fwd / bwd / total ms | predicted bound (fwd / bwd) | measured fwd / bwd / "
             "total ms | measured / predicted | peak extra MiB |", "|---|---|---|---|---|---|---|"]
    for head in HEADS:
        p = predicted[head]
        m = (measured or {}).get(head)
        got = f"{_ms(m['forward_s'])} / {_ms(m['backward_s'])} / {_ms(m['total_s'])}" if m else "not run"
        ratio = f"{m['total_s'] / p['total_s']:.2f}x" if m else ""
        peak = f"{m['peak_extra_bytes'] / 2**20:,.0f}" if m and m["peak_extra_bytes"] is not None else ""
        lines.append(f"| {head} | {'yes' if head == auto else ''} | {_ms(p['forward_s'])} / {_ms(p['backward_s'])} / "
                     f"{_ms(p['total_s'])} | {p['bound']} | {got} | {ratio} | {peak} |")
    return "\n".join(lines)


def _fused_tiles():
    """How the fused head picked its tiles in this run: the table (PREFOPT_TILES=table) or what the autotune chose
    per pass (PREFOPT_TILES=autotune: the warm-up steps tune, the timed steps run the choice)."""
    from prefopt._backend import requested_tiles
    from prefopt.kernels import _autotune
    mode = requested_tiles()
    if mode != "autotune":
        return f"{mode} (PREFOPT_TILES)"
    picked = "; ".join(f"{key[1]}: {tile}" for key, (tile, _) in _autotune.choices().items())
    return f"autotune (PREFOPT_TILES): {picked or 'nothing tuned'}"


def main_heads(args, out=print, err=None):
    err = err or (lambda msg: print(msg, file=sys.stderr, flush=True))
    predicted, auto = predictions(args)
    header = (f"N={args.tokens} H={args.hidden} V={args.vocab} {args.dtype}, forward + backward (grad_hidden, "
              f"grad_weight), predicted for an H100 SXM (prefopt/cost_model.py)")
    if args.dry_run:
        out(f"plan: time heads {', '.join(HEADS)} on --device {args.device}: {args.warmup} warm-up + {args.repeats} "
            f"timed steps each (dry run: nothing runs)\n{header}\n\n{table(predicted, auto)}\n\nauto picks {auto}")
        return 0
    problem = _check_device(args.device)
    if problem:
        err(problem)
        return 2
    import torch
    if args.device.startswith("cuda"):
        header += f"; measured on {torch.cuda.get_device_name(torch.device(args.device))}"
    measured, diff = measure(args, log=err)
    tiles = _fused_tiles()
    faster = min(HEADS, key=lambda h: measured[h]["total_s"])
    out(f"{header}\n\n{table(predicted, auto, measured)}\n\nauto picks {auto}; measured faster: {faster}; "
        f"largest |fused - tiles|: " + ", ".join(f"{k} {v:.3g}" for k, v in diff.items())
        + f"\nfused head tiles: {tiles}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), predicted=predicted, auto=auto, measured=measured, difference=diff,
                           fused_tiles=tiles), f, indent=1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main_heads(parser().parse_args()))
