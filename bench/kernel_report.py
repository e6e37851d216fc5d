"""Ahead-of-time compile every Triton kernel of prefopt (no GPU needed) and report its resources.

For each module in ``kernels/`` (logprobs, linear_logprobs, sequence_sums, preference_loss) ``aot_configs()``
lists every (kernel, signature, constexprs, num_warps) its launcher can pick (preference_loss: the kernels its
generator emits for a loss-type-complete set of loss configurations, plus the backward; a module may also define
``aot_label(fn, sig, cx)`` -> text for the config column and ``aot_quick()`` -> the indices ``--quick`` compiles). Each one is compiled with
``triton.compile`` for sm_80 and sm_90 (GPUTarget), then the PTX goes through the same ``ptxas`` that
triton uses for that arch (``ptxas`` < sm_90 <= ``ptxas-blackwell``) with ``-v`` to read registers,
spill stores/loads; shared memory comes from the compiled metadata. Arguments are specialised as in a
typical launch (16-byte aligned pointers, H / row strides multiples of 16: see ``_attrs``).

    python bench/kernel_report.py                  # markdown table on stdout
    python bench/kernel_report.py --json out.json  # also dump the rows
    python bench/kernel_report.py --arch 90 --jobs 4
    python bench/kernel_report.py --quick          # heaviest configuration per kernel and dtype only
    python bench/kernel_report.py --modules kernels.preference_loss --loss-variant fp64   # or: stress

``triton.compile`` does not work in a process where TRITON_INTERPRET=1 (then @triton.jit builds
InterpretedFunction objects without a compile path), so the script re-runs itself without it.
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("kernels.logprobs", "kernels.linear_logprobs", "kernels.sequence_sums", "kernels.preference_loss")
ARCH_NAMES = {80: "sm_80", 90: "sm_90a"}


def _interpreted():
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "no", "off")


def _module(module):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return importlib.import_module(module)


_CONFIGS = {}
LOSS_MODULE = "kernels.preference_loss"
_VARIANT_ENV = "PREFOPT_AOT_LOSS_VARIANT"  # set by --loss-variant (inherited by the worker processes)


def _variant_args(module):
    v = os.environ.get(_VARIANT_ENV, "default")
    return (v,) if module == LOSS_MODULE and v != "default" else ()


def _configs(module):
    if module not in _CONFIGS:  # once per process (preference_loss generates its kernels here)
        _CONFIGS[module] = _module(module).aot_configs(*_variant_args(module))
    return _CONFIGS[module]


def _dtype_of(sig):
    for name, ty in sig.items():
        if ty.startswith("*") and name not in ("labels_ptr", "cu_ptr"):
            return ty[1:]
    return "-"


def _config_str(sig, cx, label=None):
    parts = [f"dtype={_dtype_of(sig)}"]
    for k, v in cx.items():
        if k == "USE_FP64":
            continue
        parts.append(f"{k}={int(v) if isinstance(v, bool) else v}")
    if label:
        parts.append(label)
    return " ".join(parts)


def _attrs(fn, sig):
    """The specialisation of a typical launch: every pointer 16-byte aligned (torch allocations are)
    and the hidden size / row strides multiples of 16 (tt.divisibility, as triton's launcher infers).
    An odd H or row stride gets scalar loads instead (not covered by this report)."""
    return {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, ty in sig.items()
            if ty.startswith("*") or k == "H" or k.startswith("stride")}


def _ptxas_stats(ptx, arch):
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={ARCH_NAMES[arch]}", src, "-o",
               os.path.join(d, "k.cubin")]
        r = subprocess.run(cmd, capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"{os.path.basename(ptxas)} failed: {log[-500:]}")
    regs = re.search(r"Used (\d+) registers", log)
    st = re.search(r"(\d+) bytes spill stores", log)
    ld = re.search(r"(\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else -1, int(st.group(1)) if st else -1, int(ld.group(1)) if ld else -1,
            os.path.basename(ptxas))


def compile_one(job):
    """job = (module, index, arch) -> row dict (error set instead of raising)."""
    module, index, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    fn, sig, cx, warps = _configs(module)[index]
    label = getattr(_module(module), "aot_label", None)
    row = dict(module=module.split(".")[-1], kernel=fn.__name__, arch=f"sm_{arch}",
               config=_config_str(sig, cx, label(fn, sig, cx) if label else None),
               num_warps=warps, regs=None, shared=None, spill_stores=None, spill_loads=None, ptxas=None,
               seconds=None, error=None)
    t0 = time.time()
    try:
        full = dict(sig)
        full.update({k: "constexpr" for k in cx})
        src = triton.compiler.ASTSource(fn=fn, signature=full, constexprs=dict(cx), attrs=_attrs(fn, sig))
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        assert ck.asm.get("cubin"), "no cubin produced"
        row["shared"] = int(ck.metadata.shared)
        row["regs"], row["spill_stores"], row["spill_loads"], row["ptxas"] = _ptxas_stats(ck.asm["ptx"], arch)
    except Exception as e:  # reported, the test fails on it
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    row["seconds"] = round(time.time() - t0, 2)
    return row


def _quick_indices(module):
    """Per kernel and input dtype, the configuration with the most features switched on (the
    heaviest one) -- a fast smoke subset of the full sweep. A module's own ``aot_quick()`` overrides this."""
    own = getattr(_module(module), "aot_quick", None)
    if own is not None:
        _configs(module)
        return sorted(own(*_variant_args(module)))
    best = {}
    for i, (fn, sig, cx, warps) in enumerate(_configs(module)):
        key = (fn.__name__, _dtype_of(sig), cx.get("DOT_PREC"))
        score = sum(1 for v in cx.values() if v is True)
        if key not in best or score > best[key][0]:
            best[key] = (score, i)
    return sorted(i for _, i in best.values())


def collect(archs=(80, 90), jobs=None, quick=False, modules=MODULES):
    work = [(m, i, a) for m in modules
            for i in (_quick_indices(m) if quick else range(len(_configs(m)))) for a in archs]
    jobs = jobs or max(1, min(len(work), os.cpu_count() or 1))
    if jobs == 1:
        return [compile_one(w) for w in work]
    with ProcessPoolExecutor(jobs) as ex:
        return list(ex.map(compile_one, work, chunksize=4))


def markdown(rows):
    lines = ["| kernel | arch | config | warps | regs | smem (B) | spill st/ld (B) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['arch']} | {r['config']} | {r['num_warps']} | ERROR | | "
                         f"{r['error'][:80]} |")
        else:
            lines.append(f"| {r['kernel']} | {r['arch']} | {r['config']} | {r['num_warps']} | {r['regs']} | "
                         f"{r['shared']} | {r['spill_stores']}/{r['spill_loads']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCH_NAMES))
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--quick", action="store_true", help="only the heaviest configuration per kernel and dtype")
    p.add_argument("--modules", nargs="+", default=list(MODULES), choices=MODULES)
    p.add_argument("--loss-variant", default="default", choices=("default", "fp64", "stress"),
                   help=f"configurations of {LOSS_MODULE}: default (fp32, asserted by the tests), fp64 (the "
                        "fp64-input kernels) or stress (long loss lists); see its aot_configs")
    args = p.parse_args(argv)
    if _interpreted():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, os.path.abspath(__file__)] + (argv or sys.argv[1:]), env=env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ[_VARIANT_ENV] = args.loss_variant
    t0 = time.time()
    rows = collect(tuple(args.arch), args.jobs, args.quick, tuple(args.modules))
    print(markdown(rows))
    bad = [r for r in rows if r["error"] or r["spill_stores"] or r["spill_loads"]]
    print(f"\n{len(rows)} compiles in {time.time() - t0:.1f}s; {len(bad)} with errors or spills")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
