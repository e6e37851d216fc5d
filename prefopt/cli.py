"""`prefopt` command line: train | plot | bench | info.

    prefopt train                                # embedded demo: tiny random Llama, shipped data, < 1 min CPU
    prefopt train --config run.yaml --beta 0.2   # YAML/JSON settings, flags override them
    prefopt train --output_dir runs/x --resume   # continue runs/x from its newest checkpoint
    torchrun --nproc_per_node=2 -m prefopt train --output_dir runs/ddp
    prefopt plot runs/x                          # runs/x/metrics.png: loss, margins, accuracies vs step
    prefopt bench [--quick | --help]             # the benchmark suite (docs/bench.md)
    prefopt info                                 # which kernel backends are available here
"""
from __future__ import annotations

import json
import os
import sys

USAGE = __doc__


class CLIError(Exception):
    pass


def _err(msg, code=2):
    print(f"prefopt: error: {msg}", file=sys.stderr)
    return code


def cmd_train(argv):
    from prefopt.trainer.config import PrefoptInputError, TrainConfig
    try:
        cfg = TrainConfig.from_args(argv)
        from prefopt.trainer.loop import Trainer
        summary = Trainer(cfg).train()
    except PrefoptInputError as err:
        return _err(err)
    except OSError as err:  # the environment, not prefopt: a full disk, a read-only or vanished directory
        where = f" ({err.filename})" if err.filename else ""
        return _err(f"{err.strerror or err}{where}; finished checkpoints are intact, --resume continues from the "
                    "newest one")
    except KeyboardInterrupt:
        return _err("interrupted; resume with --resume --output_dir RUN_DIR (newest complete checkpoint)", 130)
    return 0 if summary is not None else 1


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise CLIError(f"{run_dir!r} has no metrics.jsonl (not a prefopt run directory?)")
    rows = []
    with open(path) as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if lineno == len(lines) and not line.endswith("\n"):
                    break  # a torn last line: the run is writing it now, or was killed mid-write
                raise CLIError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
    if not rows:
        raise CLIError(f"{path} is empty")
    return rows


def plot_run(run_dir, out=None):
    """Write a PNG of loss, rewards/margins and rewards/accuracies vs step; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = out or os.path.join(run_dir, "metrics.png")
    keys = ["loss", "rewards/margins", "rewards/accuracies"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for ax, key in zip(axes, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 60 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def cmd_plot(argv):
    import argparse
    parser = argparse.ArgumentParser(prog="prefopt plot", description="Plot a run's metrics.jsonl to a PNG.")
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except CLIError as err:
        return _err(err)
    print(path)
    return 0


def cmd_bench(argv):
    # bench/ ships inside the package as prefopt.bench (pyproject package-dir), so this works from any directory
    from prefopt.bench.__main__ import main as bench_main
    return int(bench_main(argv, prog="prefopt bench") or 0)


def cmd_info(argv):
    import prefopt
    info = prefopt.backend_info()
    print(f"prefopt {prefopt.__version__}")
    for key, value in info.items():
        if isinstance(value, tuple) and len(value) == 2:
            ok, why = value
            print(f"  {key:<14} {'available' if ok else 'unavailable: ' + why}")
        else:
            print(f"  {key:<14} {value}")
    import torch
    print(f"  cuda           {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'unavailable'}")
    from prefopt.versions import ROLES, TESTED, version_report
    print("dependencies (installed; tested range, prefopt/versions.py):")
    for dist, version, inside in version_report():
        status = "not installed" if version is None else ("tested" if inside else "OUTSIDE the tested range")
        print(f"  {dist:<14} {version or '-':<14} {status} ({TESTED[dist]}; {ROLES[dist]})")
    return 0


COMMANDS = {"train": cmd_train, "plot": cmd_plot, "bench": cmd_bench, "info": cmd_info}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.strip())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        return _err(f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)}")
    return COMMANDS[cmd](rest)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
