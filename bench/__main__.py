"""Run the benchmark grid, print a markdown table, write JSON + PNGs.

Examples:
  prefopt bench --quick                           # reference case + small V / token sweeps (see docs/bench.md)
  prefopt bench                                   # the default grid (V up to 256k where memory allows)
  prefopt bench --reference-only                  # only the reference DPO case, both input kinds
  prefopt bench --long                            # one pair of 4k-64k-token sequences (+ V=128k), capped processes
  prefopt bench --long-train                      # one DPO training step at 4k-32k tokens, V=128256: prefopt vs TRL
  prefopt bench --filtering                       # exact vs filter_eps (+ vocab_sort) over a sweep (bench/filtering.py)
  prefopt bench --heads                           # GPU: fused vs tiled head, measured vs predicted (bench/heads.py)
  prefopt bench --heads --dry-run                 # the plan and the cost model's predictions, no GPU needed
  prefopt bench --ops linear --tokens 1024 --hidden 1024 --vocab 32000 128000 --kinds lm

`python -m bench ...` takes the same arguments from a source checkout's root.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _parser(prog=None):
    summary, _, examples = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog=prog or ("python -m bench" if __package__ == "bench" else "prefopt bench"),
                                description=summary, epilog=examples,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small grid (reference case included); its duration on 2 cores is in docs/bench.md")
    p.add_argument("--long", action="store_true", help="long-sequence set (bench/long.py): one pair, 4k/16k/64k tokens "
                   "per sequence and a V=128k point, each implementation in its own process under --cap-gb")
    p.add_argument("--long-train", action="store_true", help="one full DPO training step at 4k-32k tokens per "
                   "sequence, V=128256 (bench/long_train.py): prefopt's trainer, TRL, TRL + Liger, TRL + prefopt's "
                   "drop-in, each in its own capped process; its options: --long-train --help")
    p.add_argument("--filtering", action="store_true", help="gradient filtering (bench/filtering.py): exact vs "
                   "filtered (and filtered + vocab_sort) head over a sweep of skip fractions and vocabulary orders; "
                   "must come first, its options: --filtering --help")
    p.add_argument("--heads", action="store_true", help="the triton backend's two heads on a GPU, measured next "
                   "to the cost model (bench/heads.py); must come first, its options: --heads --help")
    p.add_argument("--cap-gb", type=float, default=8.0, help="--long: address-space cap (RLIMIT_AS) of each child")
    p.add_argument("--reference-only", action="store_true", help="only the benchmark reference DPO case")
    p.add_argument("--ops", nargs="+", choices=("logits", "linear", "dpo"),
                   help="custom grid: ops (with --tokens/--hidden/--vocab/--dtypes/--kinds)")
    p.add_argument("--tokens", nargs="+", type=int, help="custom grid: tokens (dpo: tokens per sequence)")
    p.add_argument("--hidden", nargs="+", type=int, help="custom grid: hidden sizes H")
    p.add_argument("--vocab", nargs="+", type=int, help="custom grid: vocabulary sizes V")
    p.add_argument("--dtypes", nargs="+", default=None, help="custom grid: float32 / bfloat16 (default float32)")
    p.add_argument("--kinds", nargs="+", choices=("uniform", "lm"), default=None,
                   help="input kinds (default: both); also filters the default grid")
    p.add_argument("--pairs", type=int, default=2, help="custom dpo grid: preference pairs (default 2)")
    p.add_argument("--impls", nargs="+", default=None,
                   help="only implementations whose name contains one of these (eager and gemm-limit always run)")
    p.add_argument("--repeats", type=int, default=None, help="measured steps per implementation (median; default 3, "
                   "--quick 1)")
    p.add_argument("--warmup", choices=("full", "small"), default=None,
                   help="warm-up before the measured steps: one full step (default) or two steps on small "
                   "variants of the case (default with --quick)")
    p.add_argument("--malloc", choices=("fixed", "default"), default="fixed",
                   help="CPU peak memory: fix glibc's mmap threshold at 1 MiB in each child so peak RSS tracks "
                   "live allocations (default), or keep glibc's dynamic threshold")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (memory via torch.cuda.max_memory_allocated)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per case x implementation child")
    p.add_argument("--out", default=None, help="output directory (default: bench/results/ in a source checkout, "
                   "./prefopt-bench-results/ otherwise)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="print the grid and the implementations, run nothing")
    return p


def build_grid(args):
    from . import cases as C
    if args.ops or args.tokens or args.hidden or args.vocab:
        if not args.ops:
            raise SystemExit("custom grid: give --ops (with --tokens, --hidden, --vocab)")
        grid = C.product_grid(args.ops, args.tokens or [1024], args.hidden or [1024], args.vocab or [32000],
                              args.dtypes or ["float32"], args.kinds or ["uniform", "lm"], pairs=args.pairs)
    elif args.reference_only:
        grid = C.reference_cases()
    else:
        grid = C.default_grid(quick=args.quick)
        if args.dtypes:
            grid = [c for c in grid if c.dtype in args.dtypes]
    if args.kinds:
        grid = [c for c in grid if c.kind in args.kinds]
    return grid


def default_out_dir():
    """bench/results/ beside the code in a source checkout; the working directory for an installed package,
    whose folder may be read-only (site-packages)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isfile(os.path.join(os.path.dirname(here), "pyproject.toml")):
        return os.path.join(here, "results")
    return os.path.join(os.getcwd(), "prefopt-bench-results")


def main(argv=None, prog=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--filtering"]:  # its own options (bench/filtering.py)
        from .filtering import main_filtering, parser
        prog = prog or ("python -m bench" if __package__ == "bench" else "prefopt bench")
        return main_filtering(parser(f"{prog} --filtering").parse_args(argv[1:]))
    if "--long-train" in argv:  # its own options (bench/long_train.py)
        from .long_train import main_long_train, parser
        prog = prog or ("python -m bench" if __package__ == "bench" else "prefopt bench")
        rest = [a for a in argv if a != "--long-train"]
        return main_long_train(parser(f"{prog} --long-train").parse_args(rest))
    if argv[:1] == ["--heads"]:  # its own options (bench/heads.py)
        from .heads import main_heads, parser
        prog = prog or ("python -m bench" if __package__ == "bench" else "prefopt bench")
        return main_heads(parser(f"{prog} --heads").parse_args(argv[1:]))
    args = _parser(prog).parse_args(argv)
    from . import cases as C
    from .measure import run_grid, torch_device_type
    from .plots import write_plots
    from .report import environment, markdown, write_json

    if args.long:
        from .long import main_long
        return main_long(args, lambda msg: print(msg, file=sys.stderr, flush=True))
    grid = build_grid(args)
    if args.list:
        for case in grid:
            impls = C.implementations(case.op, torch_device_type(args.device), quick=args.quick)
            names = ", ".join(i.name if ok else f"{i.name} (skip: {why})" for i, ok, why in impls)
            print(f"{case.name}{' [reference]' if case.tag else ''}: {names}")
        return 0
    if args.heads:
        raise SystemExit("--heads must come first: prefopt bench --heads [--dry-run] [--tokens N ...]")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            print(f"--device {args.device}: no CUDA device here (torch.cuda.is_available() is False). The GPU "
                  "heads (fused vs tiles, measured next to the cost model) are `prefopt bench --heads`; "
                  "`prefopt bench --heads --dry-run` prints their plan and predictions without a GPU.",
                  file=sys.stderr)
            return 2
    out_dir = args.out or default_out_dir()
    os.makedirs(out_dir, exist_ok=True)
    repeats = args.repeats or (1 if args.quick else 3)
    start = time.perf_counter()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    records = run_grid(grid, device=args.device, repeats=repeats, timeout=args.timeout, threads=args.threads,
                       impl_filter=args.impls, warmup=args.warmup or ("small" if args.quick else "full"), log=log,
                       malloc=args.malloc, quick=args.quick)
    env = environment(args.device, argv=list(sys.argv[1:] if argv is None else argv))
    env["repeats"] = repeats
    env["warmup"] = args.warmup or ("small" if args.quick else "full")
    env["malloc"] = args.malloc
    env["elapsed_s"] = round(time.perf_counter() - start, 1)
    table = markdown(records, env)
    json_path = write_json(os.path.join(out_dir, "results.json"), records, env)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    plots = [] if args.no_plots else write_plots(records, out_dir)
    print(table)
    log(f"\nwrote {json_path}, {os.path.join(out_dir, 'results.md')}"
        + (f" and {len(plots)} plots" if plots else "") + f" in {env['elapsed_s']} s")
    failed = sum(len(r.get("failed") or {}) for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
