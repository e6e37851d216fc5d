"""`python -m bench.context_parallel`: context parallelism on this machine (gloo, CPU), two measurements.

--train (default): one long-sequence training step, `prefopt train --long_context N --context_parallel R`, for N in
  --lengths and R in --ranks (R = 2b: --context_parallel_balanced), each in its own `torchrun --nproc_per_node=R`
  (R = 1 runs the same worker without a split). Every rank builds the preset's Trainer (random-init Llama hidden
  128 x 2 layers, V = 128256, one generated pair packed into a 2N-token row, gradient checkpointing, live frozen-copy reference), notes its RSS, resets its
  peak (/proc/self/clear_refs = 5) and trains one step. Reported per rank: RSS before the step, the peak RSS of the
  forward + backward (VmHWM when the optimizer step begins) and of the whole step (the trainer's own VmHWM reading
  right after the optimizer step, which adds AdamW's first-step state and its temporaries), the step's wall seconds
  and the rank's CPU seconds up to its optimizer update (one thread per rank: its own work, without the time it waited
  for a busy shared machine or for the other rank); plus the loss (equal across R up to float32 summation order).
  The shortest length (1024 by default) measures what does not depend on the length (model, gradients, AdamW
  state, DDP's gradient buckets, the head's logits-tile cache); a longer length's peak above it is the memory that
  grows with tokens (activations, attention, gathered keys and values).
--attention: the attention alone (prefopt/parallel/attention.py) on one packed pair of N-token sequences, 4 heads of
  32, float32, forward + backward, contiguous vs balanced layout, interleaved, median of --repeats; per rank, wall
  time (which includes waiting for the slower rank in the collectives) and CPU time (one thread: the rank's own work).

The configurations run one after another in one invocation (timings are ratios within a run: the machine is shared).
`--out FILE.json` keeps the records; the markdown table goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from prefopt.bench.measure import reset_peak_rss, status_mib  # also when run as a script (the torchrun worker)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




# ---------------------------------------------------------------------------------------------------------------
# workers (run under torchrun, or alone for one rank)
# ---------------------------------------------------------------------------------------------------------------
def _gather(record):
    import torch.distributed as dist
    if not dist.is_initialized():
        return [record]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, record)
    return out


def _spec(ranks):
    """'2' -> (2, contiguous); '2b' -> (2, balanced)."""
    ranks = str(ranks)
    return int(ranks.rstrip("b")), ranks.endswith("b")


def train_worker(n_tokens, spec, work, out_path):
    ranks, balanced = _spec(spec)
    from prefopt.bench.measure import _fixed_mmap_threshold
    _fixed_mmap_threshold()  # glibc hands freed blocks >= 1 MiB back, so peak RSS tracks live memory (bench/measure.py)
    from prefopt.trainer import TrainConfig, Trainer

    cfg = TrainConfig.from_dict({"long_context": n_tokens, "max_steps": 1, "context_parallel": ranks,
                                 "context_parallel_balanced": balanced,
                                 "output_dir": os.path.join(work, "run"), "overwrite": True, "disable_tqdm": True,
                                 "save_total_limit": 1})
    trainer = Trainer(cfg)
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_initialized() else 0
    dist.barrier() if dist.is_initialized() else None
    cpu = {}
    step = trainer.optimizer.step

    def timed_step(*a, **kw):  # the step's CPU seconds end at its optimizer update, as the trainer's step time does
        cpu.setdefault("fwd_bwd_peak", status_mib("VmHWM"))  # forward + backward, before AdamW's first-step state
        out = step(*a, **kw)
        cpu.setdefault("end", time.process_time())
        return out

    trainer.optimizer.step = timed_step
    start = status_mib("VmRSS")
    reset_peak_rss()
    cpu["start"] = time.process_time()
    # train() tears the process group down at its end: exchange the records through files instead
    record = trainer.train()["history"][0]
    mine = dict(rank=rank, start_mib=start, peak_mib=record["peak_rss_mib"], fwd_bwd_peak_mib=cpu["fwd_bwd_peak"],
                step_s=record["step_seconds"],
                cpu_s=cpu["end"] - cpu["start"], loss=record["loss"], margins=record["rewards/margins"],
                grad_norm=record["grad_norm"])
    with open(f"{out_path}.rank{rank}", "w") as f:
        json.dump(mine, f)


def attention_worker(n_tokens, repeats, out_path):
    import torch
    import torch.distributed as dist

    from prefopt.parallel import destroy_process_group
    from prefopt.parallel.attention import context_attention
    from prefopt.parallel.context import split_packed

    dist.init_process_group("gloo")
    group = dist.new_group(list(range(dist.get_world_size())))
    gen = torch.Generator().manual_seed(0)
    heads, dim = 4, 32
    N = 2 * n_tokens
    q, k, v, w = (torch.randn(1, heads, N, dim, generator=gen) for _ in range(4))
    cu = torch.tensor([0, n_tokens, N])
    splits = {"contiguous": split_packed(group, cu), "balanced": split_packed(group, cu, balanced=True)}
    times = {name: [] for name in splits}
    busy = {name: [] for name in splits}
    for _ in range(repeats):
        for name, split in splits.items():
            local = [split.shard(t, dim=2).clone().requires_grad_(True) for t in (q, k, v)]
            weight = split.shard(w, dim=2)
            dist.barrier(group)
            t0, c0 = time.perf_counter(), time.process_time()
            (context_attention(*local, split) * weight).sum().backward()
            times[name].append(time.perf_counter() - t0)
            busy[name].append(time.process_time() - c0)
    # wall time includes waiting for the slower rank inside the collectives; CPU time (one thread) is the rank's own
    # work, which is what the layout balances
    mine = {name: statistics.median(ts) for name, ts in times.items()}
    mine.update({f"{name}_cpu": statistics.median(ts) for name, ts in busy.items()})
    every = _gather(dict(rank=dist.get_rank(), **mine))
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(every, f)
    destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------
def _launch(ranks, args, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           os.path.abspath(__file__), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def run_train(lengths, ranks_list, timeout):
    records = []
    for n_tokens in lengths:
        for spec in ranks_list:
            ranks, _ = _spec(spec)
            with tempfile.TemporaryDirectory() as work:
                out = os.path.join(work, "record.json")
                t0 = time.time()
                proc = _launch(ranks, ["--worker", "train", str(n_tokens), str(spec), work, out], timeout)
                rows = []
                for r in range(ranks):
                    path = f"{out}.rank{r}"
                    if os.path.exists(path):
                        with open(path) as f:
                            rows.append(json.load(f))
                rec = dict(tokens=n_tokens, ranks=str(spec), wall_s=time.time() - t0, per_rank=rows,
                           ok=proc.returncode == 0 and len(rows) == ranks)
                if not rec["ok"]:
                    rec["error"] = (proc.stdout[-1500:] + proc.stderr[-3000:])
                records.append(rec)
                print(json.dumps(rec), flush=True)
    return records


def run_attention(lengths, repeats, timeout):
    records = []
    for n_tokens in lengths:
        with tempfile.TemporaryDirectory() as work:
            out = os.path.join(work, "attention.json")
            proc = _launch(2, ["--worker", "attention", str(n_tokens), str(repeats), out], timeout)
            if proc.returncode != 0 or not os.path.exists(out):
                records.append(dict(tokens=n_tokens, ok=False, error=proc.stderr[-3000:]))
            else:
                with open(out) as f:
                    records.append(dict(tokens=n_tokens, ok=True, per_rank=json.load(f)))
        print(json.dumps(records[-1]), flush=True)
    return records


def train_markdown(records):
    lines = ["| tokens per sequence | ranks | rank | RSS before step (MiB) | peak in forward + backward (MiB) | "
             "peak in step (MiB) | step wall (s) | step CPU (s) | loss |", "|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        if not rec["ok"]:
            lines.append(f"| {rec['tokens']} | {rec['ranks']} | - | failed | | | | | |")
            continue
        for row in sorted(rec["per_rank"], key=lambda r: r["rank"]):
            lines.append(f"| {rec['tokens']} | {rec['ranks']} | {row['rank']} | {row['start_mib']:.0f} | "
                         f"{row['fwd_bwd_peak_mib']:.0f} | {row['peak_mib']:.0f} | {row['step_s']:.1f} | "
                         f"{row['cpu_s']:.1f} | {row['loss']:.6f} |")
    return "\n".join(lines)


def attention_markdown(records):
    lines = ["| tokens per sequence | rank | contiguous: wall / CPU (s) | balanced: wall / CPU (s) |",
             "|---|---|---|---|"]
    for rec in records:
        if not rec["ok"]:
            lines.append(f"| {rec['tokens']} | - | failed | |")
            continue
        for row in rec["per_rank"]:
            lines.append(f"| {rec['tokens']} | {row['rank']} | {row['contiguous']:.2f} / {row['contiguous_cpu']:.2f} | "
                         f"{row['balanced']:.2f} / {row['balanced_cpu']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.context_parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--attention", action="store_true", help="the attention microbenchmark instead of --train")
    p.add_argument("--lengths", nargs="+", type=int, default=None,
                   help="tokens per sequence (default: 1024 16384 32768 for --train, 8192 16384 for --attention)")
    p.add_argument("--ranks", nargs="+", default=["1", "2"], help="--train: context-parallel sizes; a 'b' suffix "
                   "(2b) uses the balanced layout (--context_parallel_balanced)")
    p.add_argument("--repeats", type=int, default=3, help="--attention: measured repeats (median)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per launch")
    p.add_argument("--cap-gb", type=float, default=12.0, help="address-space cap (RLIMIT_AS) of each rank")
    p.add_argument("--out", default=None, help="JSON file for the records")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker:  # the workers read the parent's cap
        os.environ["PREFOPT_BENCH_CAP_GB"] = str(args.cap_gb)
    if args.worker:
        import resource
        cap = int(float(os.environ.get("PREFOPT_BENCH_CAP_GB", "12")) * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # before torch: an over-size run fails, never swaps
        kind, *rest = args.worker
        if kind == "train":
            import torch
            torch.set_num_threads(1)
            train_worker(int(rest[0]), rest[1], rest[2], rest[3])
        else:
            attention_worker(int(rest[0]), int(rest[1]), rest[2])
        return 0
    if args.attention:
        records = run_attention(args.lengths or [8192, 16384], args.repeats, args.timeout)
        table = attention_markdown(records)
    else:
        records = run_train(args.lengths or [1024, 16384, 32768], args.ranks, args.timeout)
        table = train_markdown(records)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
