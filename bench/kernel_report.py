"""Ahead-of-time compile every Triton kernel of prefopt (no GPU needed) and report its resources and cost.

What is compiled is what launches. For ``prefopt.kernels.logprobs``, ``prefopt.kernels.linear_logprobs`` and
``prefopt.kernels.sequence_sums`` the real launchers run on meta tensors at GPU shapes with ``JITFunction.run`` replaced
by a recorder, and each recorded call is bound by Triton's own binder for the target (bench/aot_launches.py):
the signature, constexprs, integers specialised to 1 and 16-divisibility attributes are the ones a launch on
that GPU would compile, and identical specialisations are compiled once. ``prefopt.kernels.preference_loss`` generates
a kernel per loss configuration; its ``aot_configs()`` lists a loss-type-complete set of them (a module may also
define ``aot_label(fn, sig, cx)`` -> text for the config column and ``aot_quick()`` -> the indices ``--quick``
compiles). Each kernel is compiled with ``triton.compile`` for sm_80 and sm_90 (GPUTarget), then the PTX goes
through the same ``ptxas`` that triton uses for that arch (``ptxas`` < sm_90 <= ``ptxas-blackwell``) with
``-v`` to read registers and spill stores/loads; shared memory comes from the compiled metadata. Rows of the
fused head also carry the cost model's FLOPs, bytes and roofline time (prefopt/cost_model.py).

    python bench/kernel_report.py                  # markdown table on stdout
    python bench/kernel_report.py --json out.json  # also dump the rows
    python bench/kernel_report.py --arch 90 --jobs 4
    python bench/kernel_report.py --quick          # heaviest launch per kernel and dtype only
    python bench/kernel_report.py --modules prefopt.kernels.preference_loss --loss-variant fp64   # or: stress

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
MODULES = tuple(f"prefopt.kernels.{name}" for name in ("logprobs", "linear_logprobs", "sequence_sums", "preference_loss"))
LAUNCHED = MODULES[:3]  # compiled from recorded launches; the loss kernels from their generated configs...
LAUNCHED_TOO = ("prefopt.kernels.preference_loss",)  # ...and from recorded launches too (what P itself binds)
ARCH_NAMES = {80: "sm_80", 90: "sm_90a"}


def _interpreted():
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "no", "off")


def _module(module):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return importlib.import_module(module)


_CONFIGS = {}
LOSS_MODULE = "prefopt.kernels.preference_loss"
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
    """The loss kernels' specialisation (their configs are listed, not recorded): every pointer 16-byte aligned
    (torch allocations are); P, the pair count, is left unspecialised."""
    return {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, ty in sig.items() if ty.startswith("*")}


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


_TENSOR_CORE = re.compile(r"^\s*(?:@%p\d+\s+)?(wgmma\.mma_async|mma\.sync|mma\.sp)", re.M)


def _tensor_core_instructions(ptx):
    """Tensor-core MMA instructions in the PTX (static count: `wgmma.mma_async` on sm_90, `mma.sync` on sm_80);
    0 means the dots run on FMA units (exact fp32, fp64)."""
    return len(_TENSOR_CORE.findall(ptx))


def _launches():
    return _module(f"{__package__ or 'bench'}.aot_launches")


_RECORDED = {}


def _recorded(module, case_index, arch):
    """The kernel calls of one launch case on `arch` (its launchers pick that arch's tiles; recorded once per
    process, deterministic across processes)."""
    key = (module, case_index, arch)
    if key not in _RECORDED:
        launches = _launches()
        _RECORDED[key] = launches.record(launches.cases(module)[case_index], arch)
    return _RECORDED[key]


def _target(arch):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)


def _bound(module, case_index, call_index, arch):
    fn, args, kwargs = _recorded(module, case_index, arch)[call_index]
    return fn, _launches().bind(fn, args, kwargs, _target(arch))


def _compile(src, arch, options, row):
    import triton
    ck = triton.compile(src, target=_target(arch), options=options)
    assert ck.asm.get("cubin"), "no cubin produced"
    row["shared"] = int(ck.metadata.shared)
    row["regs"], row["spill_stores"], row["spill_loads"], row["ptxas"] = _ptxas_stats(ck.asm["ptx"], arch)
    row["tensor_core_instrs"] = _tensor_core_instructions(ck.asm["ptx"])


def _cost_columns(case, fn, constexprs, arch, row):
    """The cost model's figures for a fused-head kernel (forward or backward) of a head case."""
    if case.head is None or fn.__name__ not in ("_linear_fwd_kernel", "_linear_bwd_kernel"):
        return
    from prefopt.cost_model import H100_SXM, head_costs
    head = _module("prefopt.kernels.linear_logprobs")
    # this kernel's blocks are the launch's own (a table tile or an autotune candidate); the other kernel's
    # (head_costs prices both passes) are the table's
    named = {fn.arg_names[path[0]]: value for path, value in constexprs.items()}
    backward = fn.__name__ == "_linear_bwd_kernel"
    with _launches()._matmul_precision(case.head["fp32_precision"]):  # the table depends on the fp32 math mode
        other = head._config(case.head["dtype"], not backward, arch)
    blocks = {backward: (named["BLOCK_N"], named["BLOCK_V"]), not backward: (other.block_n, other.block_v)}
    costs = {c.kernel: c for c in head_costs(forward_blocks=blocks[False], backward_blocks=blocks[True],
                                             **case.head)}
    cost = costs[fn.__name__]
    times = cost.seconds(H100_SXM)
    row.update(gflop=round(cost.flops / 1e9, 1), operand_gb=round(cost.operand_bytes / 1e9, 1),
               atomic_gb=round(cost.atomic_bytes / 1e9, 1), predicted_ms=round(times["predicted"] * 1e3, 2),
               math_ms=round(times["math"] * 1e3, 2), bound=times["bound"])


def _head_tile(fn, constexprs, options):
    """The Tile of a fused-head launch (a table tile or an autotune candidate); None for other kernels."""
    named = {fn.arg_names[path[0]]: value for path, value in constexprs.items()}
    if not {"BLOCK_N", "BLOCK_V", "BLOCK_K"} <= set(named):
        return None
    from prefopt.kernels._head_tiles import Tile
    return Tile(named["BLOCK_N"], named["BLOCK_V"], named["BLOCK_K"], options.num_warps, options.num_stages)


def _tile_text(fn, constexprs, options):
    tile = _head_tile(fn, constexprs, options)
    return "" if tile is None else f"tile={tile.block_n}x{tile.block_v}x{tile.block_k} s{tile.num_stages}"


def _smem_bound(case, fn, constexprs, options, row):
    """kernels/_head_tiles.py's shared-memory bound of a fused-head launch (what autotune pruning trusts), so the
    AOT test can check it against the compiled figure."""
    tile = _head_tile(fn, constexprs, options)
    if tile is not None and case.head is not None:
        from prefopt.kernels._head_tiles import smem_bytes
        row["smem_bound"] = smem_bytes(tile, case.head["dtype"].itemsize, fn.__name__ == "_linear_bwd_kernel")


def compile_one(job):
    """job = (module, index, arch) for a listed loss config, or (module, (case, call), arch) for a recorded
    launch -> row dict (error set instead of raising)."""
    module, index, arch = job
    row = dict(module=module.split(".")[-1], kernel=None, arch=f"sm_{arch}", config=None, num_warps=None,
               regs=None, shared=None, spill_stores=None, spill_loads=None, tensor_core_instrs=None, ptxas=None,
               seconds=None, error=None)
    t0 = time.time()
    try:
        if isinstance(index, tuple):  # a recorded launch
            case_index, call_index = index
            case = _launches().cases(module)[case_index]
            fn, (signature, constexprs, attrs, options) = _bound(module, case_index, call_index, arch)
            spec = _launches().specialisation_text(fn, signature, constexprs, attrs)
            row.update(kernel=fn.__name__, config=" ".join(p for p in (case.label, _tile_text(fn, constexprs, options),
                                                                        spec) if p),
                       num_warps=options.num_warps)
            _cost_columns(case, fn, constexprs, arch, row)
            _smem_bound(case, fn, constexprs, options, row)
            import triton
            _compile(triton.compiler.ASTSource(fn, signature, constexprs, attrs), arch, options.__dict__, row)
        else:
            import triton
            fn, sig, cx, warps = _configs(module)[index]
            label = getattr(_module(module), "aot_label", None)
            row.update(kernel=fn.__name__, config=_config_str(sig, cx, label(fn, sig, cx) if label else None),
                       num_warps=warps)
            full = dict(sig)
            full.update({k: "constexpr" for k in cx})
            src = triton.compiler.ASTSource(fn=fn, signature=full, constexprs=dict(cx), attrs=_attrs(fn, sig))
            _compile(src, arch, {"num_warps": warps}, row)
    except Exception as e:  # reported, the test fails on it
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    row["seconds"] = round(time.time() - t0, 2)
    return row


def launch_jobs(module, arch, quick=False):
    """One job per distinct specialisation the module's launch cases bind for `arch` (first case wins)."""
    seen, jobs = set(), []
    for case_index, case in enumerate(_launches().cases(module)):
        if quick and not case.quick:
            continue
        for call_index in range(len(_recorded(module, case_index, arch))):
            fn, (signature, constexprs, attrs, options) = _bound(module, case_index, call_index, arch)
            # cache_key (a hash of the source), not only the name: every generated loss kernel is `_pair_kernel`
            key = (fn.cache_key, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
                   options.num_warps, options.num_stages)
            if key not in seen:
                seen.add(key)
                jobs.append((module, (case_index, call_index), arch))
    return jobs


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


def jobs_for(archs=(80, 90), quick=False, modules=MODULES):
    work = []
    for module in modules:
        for arch in archs:
            if module in LAUNCHED:
                work += launch_jobs(module, arch, quick)
            else:
                work += [(module, i, arch) for i in (_quick_indices(module) if quick else range(len(_configs(module))))]
                if module in LAUNCHED_TOO and not _variant_args(module):  # the default variant only
                    work += launch_jobs(module, arch, quick)
    return work


def describe_one(job):
    """The row of a job without compiling it: what the launch binds (for tests and --dry-run)."""
    module, index, arch = job
    row = dict(module=module.split(".")[-1], arch=f"sm_{arch}")
    if isinstance(index, tuple):  # a recorded launch
        case_index, call_index = index
        case = _launches().cases(module)[case_index]
        fn, (signature, constexprs, attrs, options) = _bound(module, case_index, call_index, arch)
        row.update(kernel=fn.__name__, config=case.label, quick=case.quick, num_warps=options.num_warps,
                   num_stages=options.num_stages, tile=_tile_text(fn, constexprs, options),
                   constexprs={fn.arg_names[path[0]]: value for path, value in constexprs.items()},
                   divisible=sorted(fn.arg_names[path[0]] for path, value in attrs.items() if value),
                   signature={name: ty for name, ty in signature.items() if ty != "constexpr"},
                   spec=_launches().specialisation_text(fn, signature, constexprs, attrs))
    else:
        fn, sig, cx, warps = _configs(module)[index]
        row.update(kernel=fn.__name__, config=_config_str(sig, cx), num_warps=warps, constexprs=dict(cx))
    return row


def collect(archs=(80, 90), jobs=None, quick=False, modules=MODULES, dry_run=False):
    work = jobs_for(archs, quick, modules)
    if dry_run:
        return [describe_one(w) for w in work]
    jobs = jobs or max(1, min(len(work), os.cpu_count() or 1))
    if jobs == 1:
        return [compile_one(w) for w in work]
    with ProcessPoolExecutor(jobs) as ex:
        return list(ex.map(compile_one, work, chunksize=4))


def markdown(rows):
    lines = ["| kernel | arch | launch | warps | regs | smem (B) | spill st/ld (B) | tensor-core instrs | GFLOP "
             "| operand / atomic GB | H100 roofline ms (bound) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cost = (f"{r['gflop']:,} | {r['operand_gb']:,} / {r['atomic_gb']:,} | {r['predicted_ms']:,} ({r['bound']})"
                if r.get("gflop") is not None else " | | ")
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['arch']} | {r['config']} | {r['num_warps']} | ERROR | | "
                         f"{r['error'][:80]} | | | | |")
        else:
            lines.append(f"| {r['kernel']} | {r['arch']} | {r['config']} | {r['num_warps']} | {r['regs']} | "
                         f"{r['shared']} | {r['spill_stores']}/{r['spill_loads']} | {r['tensor_core_instrs']} | "
                         f"{cost} |")
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
    p.add_argument("--dry-run", action="store_true",
                   help="list what each launch binds (constexprs, constants, divisibility) without compiling")
    args = p.parse_args(argv)
    if _interpreted():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, os.path.abspath(__file__)] + (argv or sys.argv[1:]), env=env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ[_VARIANT_ENV] = args.loss_variant
    t0 = time.time()
    rows = collect(tuple(args.arch), args.jobs, args.quick, tuple(args.modules), args.dry_run)
    if args.dry_run:
        for r in rows:
            print(r["kernel"], r["arch"], r["config"], r.get("spec", ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1, default=str)
        return 0
    print(markdown(rows))
    bad = [r for r in rows if r["error"] or r["spill_stores"] or r["spill_loads"]]
    print(f"\n{len(rows)} compiles in {time.time() - t0:.1f}s; {len(bad)} with errors or spills")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
