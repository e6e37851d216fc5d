"""Timing, peak memory and agreement of one case x implementation, each in its own process.

The parent (`run_grid`) runs every case x implementation in its own process, forked from a fork server
that imported torch / prefopt / the peers once (so a child costs no import time). The child builds the
case's inputs (deterministic seed, identical in every child), then:
  1. warm-up: one full step whose loss / outputs / gradient slices are saved for the agreement check
     (`--warmup full`, default), or (`--warmup small`, used by --quick) two steps on small variants of the
     case (so torch.compile'd peers have compiled their dynamic-shape graph) and the check uses the first
     measured step;
  2. measured steps (`repeats`): wall time of each (median reported). The first one also measures peak
     memory: on CPU the peak-RSS high-water mark is reset (/proc/self/clear_refs = 5) after the inputs are
     built and freed heap is handed back (malloc_trim), so "extra" = peak RSS during the step - RSS holding
     the inputs; where clear_refs is not writable, a 1 ms RSS sampler is used (may miss short peaks).
     On CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before the step. On CPU the child fixes
     glibc's mmap threshold at 1 MiB first (`--malloc fixed`, default; see _fixed_mmap_threshold) so the
     peak reflects live allocations rather than heap retention.
Gradients are set to None before every step, so "extra" includes the gradients the step produces.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback

# -------------------------------------------------------------------------------------------------- memory probes


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil
        return psutil.Process().memory_info().rss


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB; NaN where it is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> None:
    """Reset the process's peak-RSS high-water mark (VmHWM; Linux >= 4.0); OSError where it is not writable."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def capped_child(spec) -> None:
    """Start of a benchmark child process: the address-space cap `spec["cap_gb"]` (RLIMIT_AS, before torch is
    imported, so the cap covers everything), a fixed mmap threshold, and `spec["threads"]` torch threads."""
    import resource
    if spec.get("cap_gb"):
        cap = int(spec["cap_gb"] * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch
    _fixed_mmap_threshold()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])


def _hwm() -> int | None:
    mib = status_mib("VmHWM")
    return None if mib != mib else int(mib * 1024 * 1024)


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _fixed_mmap_threshold(threshold=1 << 20):
    """glibc: serve every allocation >= 1 MiB by mmap and give it back on free (mallopt M_MMAP_THRESHOLD,
    which also stops glibc's dynamic threshold). Without this, glibc raises the threshold after big frees
    and keeps freed tiles in the heap, so peak RSS depends on allocation history, not on what is live
    (measured here: prefopt linear N=512 V=128k peak +282 MiB with the default vs +158 MiB fixed, eager
    unchanged). `--malloc default` measures with glibc's defaults."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        return True
    except (OSError, AttributeError):
        return False


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _rss()
        self._stop = threading.Event()

    def run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def stop(self):
        self._stop.set()
        self.join()
        self.peak = max(self.peak, _rss())
        return self.peak


class PeakMemory:
    """Context manager: .extra = peak bytes during the block over the bytes in use at its start."""

    def __init__(self, device_type="cpu"):
        self.device_type = device_type
        self.method = None
        self.extra = None
        self.baseline = None

    def __enter__(self):
        import torch
        _trim()
        if self.device_type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self.baseline = _rss()
        self._sampler = None
        try:
            reset_peak_rss()
            self.method = "VmHWM after clear_refs=5"
        except OSError:
            self._sampler = _Sampler()
            self._sampler.start()
            self.method = "psutil RSS sampler (1 ms)"
        self.baseline = _rss()
        return self

    def __exit__(self, *exc):
        import torch
        if self.device_type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self._sampler is not None:
            peak = self._sampler.stop()
        else:
            peak = _hwm()
            if peak is None:
                import resource
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.extra = max(0, peak - self.baseline)
        return False


# -------------------------------------------------------------------------------------------------------- child


def _clear_grads(inp):
    for t in inp.values():
        if getattr(t, "requires_grad", False):
            t.grad = None


def _save_check(spec, impl, inp, loss, out):
    import torch
    if impl.timing_only or not spec.get("check_path"):
        return
    saved = {"loss": loss.detach().double().cpu(), "out": None if out is None else out.double().cpu()}
    for key in ("hidden", "logits", "weight"):
        t = inp.get(key)
        if t is not None and t.grad is not None:
            g = t.grad.detach()
            g = g.reshape(-1, g.shape[-1])
            rows = min(4096, max(1, (1 << 21) // max(1, g.shape[-1])))   # a bounded slice keeps the file small
            saved[f"grad_{key}"] = g[:rows].double().cpu()
    torch.save(saved, spec["check_path"])


def _small_variants(case):
    """Two small versions of a case (different token counts): warm-up for --quick, so torch.compile'd peers
    (Liger) have their dynamic-shape graph compiled before the measured step."""
    import dataclasses
    if case.op == "dpo":
        return [dataclasses.replace(case, seq=s, tokens=2 * case.pairs * s) for s in (16, 32)]
    return [dataclasses.replace(case, tokens=n) for n in (32, 64)]


def child_main(spec: dict, out_path: str) -> int:
    import torch

    from . import inputs as inputs_mod
    from .cases import Case, Impl, build_step

    result = {"ok": False}
    gc.freeze()  # the imported modules' objects: keeps gc.collect() (before each measured step) cheap
    if spec.get("malloc", "fixed") == "fixed":
        _fixed_mmap_threshold()
    try:
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        case = Case.from_dict(spec["case"])
        impl = Impl(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in spec["impl"].items()})
        device = spec.get("device", "cpu")
        dev_type = torch.device(device).type
        sync = torch.cuda.synchronize if dev_type == "cuda" else (lambda: None)
        full_warmup = spec.get("warmup", "full") == "full"

        # 1. warm-up: the full case (its outputs kept for the agreement check), or two small variants
        t0 = time.perf_counter()
        inp = inputs_mod.build(case, device=device, seed=spec.get("seed", 0))
        if not full_warmup:
            for small in _small_variants(case):
                small_inp = inputs_mod.shrink(inp, case, small)
                build_step(impl, small, small_inp)()
                del small_inp
                _clear_grads(inp)
        result["input_bytes"] = inputs_mod.input_bytes(inp)
        result["grad_bytes"] = inputs_mod.grad_bytes(inp)
        step = build_step(impl, case, inp)
        if full_warmup:
            loss, out = step()
            sync()
            _save_check(spec, impl, inp, loss, out)
            del loss, out
        result["warmup_s"] = time.perf_counter() - t0
        _clear_grads(inp)

        # 2. measured steps; memory on the first
        times = []
        for rep in range(max(1, int(spec.get("repeats", 3)))):
            _clear_grads(inp)
            if rep == 0 and not impl.timing_only:
                with PeakMemory(dev_type) as mem:
                    t0 = time.perf_counter()
                    loss, out = step()
                    sync()
                    times.append(time.perf_counter() - t0)
                result["peak_extra_bytes"] = mem.extra
                result["memory_method"] = mem.method
                if not full_warmup:
                    _save_check(spec, impl, inp, loss, out)
            else:
                _trim()
                t0 = time.perf_counter()
                loss, out = step()
                sync()
                times.append(time.perf_counter() - t0)
            del loss, out
        _clear_grads(inp)
        result["times_s"] = times
        result["median_s"] = statistics.median(times)
        if spec.get("entropy"):
            result["entropy"] = inputs_mod.measured_entropy(inp)
        result["threads"] = torch.get_num_threads()
        result["ok"] = True
    except Exception as err:  # reported, not raised: the grid goes on
        result["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        result["traceback"] = traceback.format_exc()[-4000:]
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0 if result["ok"] else 1


def _child_entry(spec, out_path):  # forked by the fork server
    code = child_main(spec, out_path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -------------------------------------------------------------------------------------------------------- parent


def _estimate_peak_bytes(case, impl_name):
    """Rough upper bound of a step's memory (inputs + grads + the [N, V] buffers eager / gemm-limit make)."""
    elt = 2 if case.dtype in ("bfloat16", "bf16", "float16", "fp16") else 4
    n, v, h = case.tokens, case.vocab, max(case.hidden, 1)
    base = (n * v * elt * 2) if case.op == "logits" else (n * h + v * h) * elt * (4 if case.op == "dpo" else 2)
    if impl_name == "eager":
        return base + 4 * n * v * 4
    if impl_name == "gemm-limit":
        return base + n * v * elt + (n * h + v * h) * elt
    return base + (v * h * 4 if case.op != "logits" else n * v * 4) + (1 << 30)


def _available_bytes():
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def run_one(case, impl, *, device="cpu", repeats=3, timeout=600, threads=None, check_path=None, entropy=False,
            warmup="full", malloc="fixed"):
    """Run one case x implementation in its own (forked) process; returns the child's result dict."""
    need = _estimate_peak_bytes(case, impl.name)
    avail = _available_bytes()
    if device == "cpu" and need > 0.85 * avail:
        return {"ok": False, "skipped": True,
                "error": f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"}
    spec = {"case": case.to_dict(), "impl": {"name": impl.name, "ops": list(impl.ops), "backend": impl.backend,
                                              "logits_cache_mb": impl.logits_cache_mb,
                                              "timing_only": impl.timing_only},
            "device": device, "repeats": repeats, "threads": threads, "check_path": check_path, "entropy": entropy,
            "warmup": warmup, "malloc": malloc}
    fd, out_path = tempfile.mkstemp(prefix="prefopt-bench-", suffix=".json")
    os.close(fd)
    try:
        proc = _context().Process(target=_child_entry, args=(spec, out_path), daemon=True)
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            return {"ok": False, "error": f"timed out after {timeout} s"}
        try:
            with open(out_path) as f:
                result = json.load(f)
        except (OSError, ValueError):
            code = proc.exitcode
            why = "killed (out of memory?)" if code in (-9, 137) else f"exit code {code}"
            result = {"ok": False, "error": f"child {why} before writing a result"}
    finally:
        try:
            os.unlink(out_path)
        except OSError:
            pass
    return result


# the bench package is `bench` in a checkout (python -m bench) and `prefopt.bench` when installed
PRELOAD = ["torch", f"{__package__}.cases", f"{__package__}.inputs", f"{__package__}.measure", "prefopt",
           "prefopt.fused", "prefopt._C", "trl.kernels", "trl.trainer.utils", "liger_kernel.chunked_loss"]
_CTX = None


def _context():
    """A multiprocessing fork server that has torch, prefopt and the peers imported (once): every
    case x implementation then runs in its own process forked from it, without paying the imports again.
    Only imports happen in the server (no torch ops), so forking is safe for the thread pools."""
    global _CTX
    if _CTX is None:
        import multiprocessing as mp
        if __package__ == "bench":  # a checkout run from elsewhere: the fork server must find `bench` too
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            if root not in sys.path:
                sys.path.insert(0, root)
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        try:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload([m for m in PRELOAD if _importable(m)])
        except ValueError:  # no fork server on this platform
            ctx = mp.get_context("spawn")
        _CTX = ctx
    return _CTX


def _importable(module):
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _max_abs_diff(a, b, what, mismatches):
    """Max |a - b|, None where an implementation returns no such output; a shape difference is recorded in
    `mismatches` (a failure of the implementation, never a silently skipped comparison)."""
    if a is None or b is None:
        return None
    if a.shape != b.shape:
        mismatches.append(f"{what} has shape {tuple(a.shape)}, eager's {tuple(b.shape)}")
        return None
    return (a - b).abs().max().item() if a.numel() else 0.0


def _max_abs(t):
    return t.abs().max().item() if t is not None and t.numel() else 0.0


GRAD_KEYS = ("grad_hidden", "grad_logits", "grad_weight")


def agreement(check_paths: dict, baseline: str = "eager"):
    """Max |diff| of loss, outputs and gradients of every implementation vs `baseline` (eager, the materialising
    reference; no other implementation stands in for it), with the baseline's largest |value| of each ("scale"),
    and what could not be compared ("mismatch": a shape, or a gradient one side has and the other has not).
    Returns ({} , None) when the baseline did not run."""
    import torch
    loaded = {name: torch.load(path) for name, path in check_paths.items() if path and os.path.exists(path)}
    if baseline not in loaded:
        return {}, None
    ref = loaded[baseline]
    ref_grads = [ref[k] for k in GRAD_KEYS if k in ref]
    scale = {"loss": _max_abs(ref["loss"]), "out": _max_abs(ref.get("out")),
             "grad": max((_max_abs(g) for g in ref_grads), default=0.0)}
    out = {}
    for name, data in loaded.items():
        mismatches = []
        diffs = {"loss": _max_abs_diff(data["loss"], ref["loss"], "loss", mismatches),
                 "loss_value": data["loss"].item(), "scale": scale}
        diffs["out"] = _max_abs_diff(data.get("out"), ref.get("out"), "out", mismatches)
        grads = []
        for k in GRAD_KEYS:
            if (k in data) != (k in ref):
                mismatches.append(f"{k} is {'missing' if k in ref else 'there'}, eager's {'is' if k in ref else 'not'}")
            elif k in data:
                grads.append(_max_abs_diff(data[k], ref[k], k, mismatches))
        grads = [g for g in grads if g is not None]
        diffs["grad"] = max(grads) if grads else None
        diffs["mismatch"] = mismatches
        out[name] = diffs
    return out, baseline


def run_case(case, *, device="cpu", repeats=3, timeout=600, threads=None, impl_filter=None, warmup="full",
             log=print, gemm_cache=None, malloc="fixed", quick=False):
    """All implementations of one case. Returns a record for the JSON output."""
    from .cases import implementations
    record = {"case": case.to_dict(), "name": case.name, "impls": {}, "skipped": {}}
    tmpdir = tempfile.mkdtemp(prefix="prefopt-bench-check-")
    check_paths = {}
    entropy_done = False
    for impl, ok, why in implementations(case.op, torch_device_type(device), quick=quick):
        if impl_filter and not any(f in impl.name for f in impl_filter) and impl.name not in ("eager", "gemm-limit"):
            continue
        if not ok:
            record["skipped"][impl.name] = why
            continue
        shape_key = (case.op, case.tokens, case.hidden, case.vocab, case.dtype, case.pairs, case.seq)
        if impl.timing_only and gemm_cache is not None and shape_key in gemm_cache:
            # GEMM time does not depend on the values: one measurement per shape in a run
            record["impls"][impl.name] = dict(gemm_cache[shape_key])
            if log:
                log(f"  {impl.name:16s} {gemm_cache[shape_key]['median_s'] * 1e3:10.1f} ms   (same shape as "
                    f"{gemm_cache[shape_key]['measured_in']})")
            continue
        path = None if impl.timing_only else os.path.join(tmpdir, impl.name.replace("[", "_").replace("]", "") + ".pt")
        t0 = time.perf_counter()
        res = run_one(case, impl, device=device, repeats=repeats, timeout=timeout, threads=threads,
                      check_path=path, entropy=not entropy_done and not impl.timing_only, warmup=warmup,
                      malloc=malloc)
        if res.get("ok"):
            if "entropy" in res:
                record["entropy"] = res["entropy"]
                entropy_done = True
            record.setdefault("input_bytes", res.get("input_bytes"))
            record.setdefault("grad_bytes", res.get("grad_bytes"))
            record["impls"][impl.name] = {k: res.get(k) for k in ("median_s", "times_s", "warmup_s",
                                                                  "peak_extra_bytes", "memory_method", "threads")}
            record["impls"][impl.name]["timing_only"] = impl.timing_only
            if impl.timing_only and gemm_cache is not None:
                gemm_cache[shape_key] = dict(record["impls"][impl.name], measured_in=case.name)
            if path:
                check_paths[impl.name] = path
            if log:
                mem = res.get("peak_extra_bytes")
                log(f"  {impl.name:16s} {res['median_s'] * 1e3:10.1f} ms"
                    + (f"  peak +{mem / 2**20:8.1f} MiB" if mem is not None else "")
                    + f"   ({time.perf_counter() - t0:.1f} s)")
        else:
            key = "skipped" if res.get("skipped") else "failed"
            record.setdefault(key, {})[impl.name] = res.get("error", "unknown error")
            if log:
                log(f"  {impl.name:16s} {key}: {res.get('error')}")
    diffs, baseline = agreement(check_paths)
    record["agreement_baseline"] = baseline
    if baseline is None and check_paths:
        why = (record.get("failed") or {}).get("eager") or (record.get("skipped") or {}).get("eager") or "not run"
        record["agreement_skipped"] = f"eager did not run ({why}): nothing was compared"
    for name, d in diffs.items():
        record["impls"][name]["agreement"] = d
        if d["mismatch"]:
            record.setdefault("failed", {})[name] = "disagrees with eager: " + "; ".join(d["mismatch"])
    for path in check_paths.values():
        try:
            os.unlink(path)
        except OSError:
            pass
    try:
        os.rmdir(tmpdir)
    except OSError:
        pass
    return record


def torch_device_type(device):
    return str(device).split(":")[0]


def run_grid(cases, **kw):
    log = kw.get("log", print)
    kw.setdefault("gemm_cache", {})
    records = []
    for i, case in enumerate(cases):
        if log:
            log(f"[{i + 1}/{len(cases)}] {case.name}{' (reference case)' if case.tag == 'reference' else ''}")
        records.append(run_case(case, **kw))
    return records


def _parse_child(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), required=True)
    args = parser.parse_args(argv)
    return json.loads(args.child[0]), args.child[1]


if __name__ == "__main__":
    spec_, out_ = _parse_child(sys.argv[1:])
    sys.exit(child_main(spec_, out_))
