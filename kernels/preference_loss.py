"""Triton kernel of the per-pair preference losses (backend "triton"), generated from prefopt/losses/table.py.

One program handles a block of BLOCK pairs. The kernel of a configuration (``PairSpec``: the loss types and their
order, the f-divergence, which optional inputs exist, the compute dtype, forward-only or forward+grad) is Triton
source *generated* from the table: the table's formulas are evaluated with a symbolic op namespace (``_SymOps``)
whose ops print calls to the hand-written ``@triton.jit`` helpers below, so no formula is written twice. The loss
types are therefore compile-time constants of the kernel (one specialised kernel per configuration, cached).

With grads requested the kernel computes, in the same pass, the per-pair derivatives dL/dc, dL/dr (and of the two
aot slots); the autograd backward is then only ``grad_out * saved`` (``backward_scale`` below).

Scalar parameters (beta, label smoothing, loss weights, ...) are read from a small tensor in the compute dtype,
never passed as Python floats (Triton would round them to fp32), so fp64 results match the torch path to ~1e-15.

Shared signature (same as ``prefopt.losses.function.torch_pair_forward``):
    pair_forward(spec, x: dict[str, Tensor [P]], params: Tensor, need_grad: bool, compute_dtype)
        -> (loss [P], {"c","r","a","u"}: dL/d-slot [P] or None)   all in compute_dtype
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile

import numpy as np
import torch
import triton
import triton.language as tl

# Pairs per program. With 4 warps, 256 keeps two pairs per thread: long loss lists (all 15 DPO losses in one
# kernel) and fp64 stay free of register spills (1024 spilled; see bench/kernel_report.py).
MAX_BLOCK = 256

from prefopt._source_tree import require_prefopt_name  # noqa: E402
from prefopt.losses.table import LOG1MEXP_SWITCH, PARAM_NAMES, PairSpec, _Params, pair_terms

require_prefopt_name(__name__)


# ------------------------------------------------------------------------------------------------------------
# op namespace, Triton side (the torch side is prefopt.losses.table.TorchOps)
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _log1p(x):
    # Goldberg: log(u) * x / (u - 1) with u = 1 + x is accurate to a few ulp; exact x when u rounds to 1
    u = 1.0 + x
    d = u - 1.0
    safe_d = tl.where(d == 0.0, 1.0, d)
    return tl.where(d == 0.0, x, tl.log(u) * (x / safe_d))


@triton.jit
def _expm1(x):
    # Kahan: (u - 1) * x / log(u) with u = exp(x); exact x when u rounds to 1, exp(x) for large x
    xs = tl.minimum(x, 40.0)
    u = tl.exp(xs)
    um1 = u - 1.0
    lu = tl.log(tl.where(u == 0.0, 1.0, u))  # u == 0 (x < -745) takes the um1 == -1 branch
    safe_lu = tl.where(lu == 0.0, 1.0, lu)
    small = tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * (xs / safe_lu)))
    return tl.where(x > 40.0, tl.exp(x), small)


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _log1mexp(x):
    xs = tl.minimum(x, 0.0)
    return tl.where(x < LOG1MEXP_SWITCH_C, _log1p(-tl.exp(xs)), tl.log(-_expm1(x)))


@triton.jit
def _relu(x):
    return tl.maximum(x, 0.0)


LOG1MEXP_SWITCH_C = tl.constexpr(LOG1MEXP_SWITCH)

_HELPERS = {"_log1p": _log1p, "_expm1": _expm1, "_logsigmoid": _logsigmoid, "_sigmoid": _sigmoid,
            "_log1mexp": _log1mexp, "_relu": _relu, "LOG1MEXP_SWITCH_C": LOG1MEXP_SWITCH_C}


# ------------------------------------------------------------------------------------------------------------
# symbolic evaluation of the table -> Triton source
# ------------------------------------------------------------------------------------------------------------
def _lit(v) -> str:
    if isinstance(v, Sym):
        return v.src
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"unsupported operand in a loss formula: {v!r}")
    v = float(v)
    if float(np.float32(v)) != v:
        raise ValueError(f"literal {v!r} in a loss formula is not exact in fp32; make it a parameter")
    return repr(v)


class Sym:
    __slots__ = ("src",)

    def __init__(self, src: str):
        self.src = src

    def _b(self, other, op, rev=False):
        a, b = _lit(self), _lit(other)
        return Sym(f"({b} {op} {a})" if rev else f"({a} {op} {b})")

    __add__ = lambda s, o: s._b(o, "+")
    __radd__ = lambda s, o: s._b(o, "+", True)
    __sub__ = lambda s, o: s._b(o, "-")
    __rsub__ = lambda s, o: s._b(o, "-", True)
    __mul__ = lambda s, o: s._b(o, "*")
    __rmul__ = lambda s, o: s._b(o, "*", True)
    __truediv__ = lambda s, o: s._b(o, "/")
    __rtruediv__ = lambda s, o: s._b(o, "/", True)

    def __neg__(self):
        return Sym(f"(-{self.src})")


class _SymOps:
    def __init__(self):
        self.lines: list[str] = []
        self.names: set[str] = set()

    @staticmethod
    def _call(fn, *args):
        return Sym(f"{fn}({', '.join(_lit(a) for a in args)})")

    def logsigmoid(self, x): return self._call("_logsigmoid", x)
    def sigmoid(self, x): return self._call("_sigmoid", x)
    def exp(self, x): return self._call("tl.exp", x)
    def log(self, x): return self._call("tl.log", x)
    def log1p(self, x): return self._call("_log1p", x)
    def expm1(self, x): return self._call("_expm1", x)
    def log1mexp(self, x): return self._call("_log1mexp", x)
    def relu(self, x): return self._call("_relu", x)
    def minimum(self, x, y): return self._call("tl.minimum", x, y)
    def where(self, c, x, y): return self._call("tl.where", c, x, y)
    def gt(self, x, y): return Sym(f"({_lit(x)} > {_lit(y)})")
    def le(self, x, y): return Sym(f"({_lit(x)} <= {_lit(y)})")

    def let(self, name, v):
        base, i = name, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        self.lines.append(f"{name} = {_lit(v)}")
        return Sym(name)


_INPUTS = ("pc", "pr", "rc", "rr", "ilc", "ilr", "ha", "hu", "s", "w")
_GRADS = ("c", "r", "a", "u")


def _needed_inputs(spec: PairSpec):
    from prefopt.losses.table import TABLE
    kinds = {TABLE[n].kind for n in spec.losses}
    need = ["pc"]
    if kinds & {"delta", "delta_norm", "cr", "cr_norm"}:
        need.append("pr")
    if spec.has_ref:
        need += ["rc"] + (["rr"] if "pr" in need else [])
    if spec.has_len:
        need += ["ilc", "ilr"]
    if "aot" in kinds:
        need.append("ha")
    if "aot_unpaired" in kinds:
        need.append("hu")
    if "signed" in kinds:
        need.append("s")
    if spec.has_w:
        need.append("w")
    return need


def generate_source(spec: PairSpec, need_grad: bool, fp64: bool) -> str:
    """Triton source of the kernel for one configuration (public for inspection and the C++ cross-check)."""
    ct = "tl.float64" if fp64 else "tl.float32"
    ops = _SymOps()
    need = _needed_inputs(spec)
    x = {n: Sym(n) for n in need}
    ops.names.update(need)
    pnames = list(PARAM_NAMES) + [f"lw{k}" for k in range(len(spec.losses))]
    p = _Params({n: Sym(n) for n in pnames})
    ops.names.update(pnames)
    loss, g = pair_terms(ops, spec, x, p, need_grad)
    args = ", ".join(f"{n}_ptr" for n in _INPUTS) + ", prm_ptr, loss_ptr, " + \
        ", ".join(f"g{n}_ptr" for n in _GRADS) + ", P, BLOCK: tl.constexpr"
    body = ["pid = tl.program_id(0)", "offs = pid * BLOCK + tl.arange(0, BLOCK)", "mask = offs < P"]
    body += [f"{n} = tl.load(prm_ptr + {i}).to({ct})" for i, n in enumerate(pnames)]
    for n in need:
        other = "1.0" if n in ("ilc", "ilr", "w", "s") else "-1.0"
        body.append(f"{n} = tl.load({n}_ptr + offs, mask=mask, other={other}).to({ct})")
    body += ops.lines
    body.append(f"tl.store(loss_ptr + offs, ({_lit(loss)}).to({ct}), mask=mask)")
    if need_grad:
        for k in _GRADS:
            if g[k] is not None:
                body.append(f"tl.store(g{k}_ptr + offs, ({_lit(g[k])}).to({ct}), mask=mask)")
    name = "_pair_kernel"
    src = ("import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
           f"def {name}({args}):\n" + "".join(f"    {line}\n" for line in body))
    return src


_CACHE: dict = {}


def _cache_dir() -> str:
    d = os.environ.get("PREFOPT_CACHE_DIR") or os.path.join(tempfile.gettempdir(), f"prefopt-{os.getuid()}")
    d = os.path.join(d, "loss_kernels")
    os.makedirs(d, exist_ok=True)
    return d


def get_kernel(spec: PairSpec, need_grad: bool, fp64: bool):
    key = (spec, need_grad, fp64)
    kern = _CACHE.get(key)
    if kern is not None:
        return kern
    src = generate_source(spec, need_grad, fp64)
    digest = hashlib.sha1(src.encode()).hexdigest()[:16]
    modname = f"prefopt_loss_kernel_{digest}"
    path = os.path.join(_cache_dir(), modname + ".py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            fh.write(src)
        os.replace(tmp, path)
    mspec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(mspec)
    mod.__dict__.update(_HELPERS)
    sys.modules[modname] = mod
    mspec.loader.exec_module(mod)
    kern = _CACHE[key] = mod._pair_kernel
    return kern


def pair_forward(spec: PairSpec, x: dict, params: torch.Tensor, need_grad: bool, compute_dtype: torch.dtype):
    pc = x["pc"]
    P = pc.shape[0]
    fp64 = compute_dtype == torch.float64
    kern = get_kernel(spec, need_grad, fp64)
    dummy = pc
    ins = [x.get(n, dummy).contiguous() if x.get(n) is not None else dummy for n in _INPUTS]
    loss = torch.empty(P, dtype=compute_dtype, device=pc.device)
    slots = spec.slots
    grads = {k: (torch.empty(P, dtype=compute_dtype, device=pc.device) if (need_grad and slots[k]) else None)
             for k in _GRADS}
    gptrs = [grads[k] if grads[k] is not None else loss for k in _GRADS]
    BLOCK = max(16, min(MAX_BLOCK, triton.next_power_of_2(P)))
    grid = (triton.cdiv(P, BLOCK),)
    kern[grid](*ins, params.to(compute_dtype).contiguous(), loss, *gptrs, P, BLOCK=BLOCK)
    return loss, grads


@triton.jit
def _scale_kernel(g_ptr, go_ptr, out_ptr, scale, P, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    go = tl.load(go_ptr)
    tl.store(out_ptr + offs, (g * go * scale).to(out_ptr.dtype.element_ty), mask=mask)


def backward_scale(saved: torch.Tensor, grad_out: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """grad_input = saved per-pair derivative * grad_out (0-dim), cast to the input dtype."""
    P = saved.shape[0]
    out = torch.empty(P, dtype=out_dtype, device=saved.device)
    BLOCK = max(16, min(MAX_BLOCK, triton.next_power_of_2(P)))
    _scale_kernel[(triton.cdiv(P, BLOCK),)](saved, grad_out.to(saved.dtype).reshape(1).contiguous(), out, 1.0, P,
                                           BLOCK=BLOCK)
    return out


# ------------------------------------------------------------------------------------------------------------
# ahead-of-time compile configurations (bench/kernel_report.py, tests/test_aot_compile.py)
# ------------------------------------------------------------------------------------------------------------
_AOT_BLOCKS = (16, 32, 64, 128, 256)  # every BLOCK pair_forward / backward_scale can pick (from P)
AOT_VARIANTS = ("default", "fp64", "stress")


def _aot_specs():
    """(tag, PairSpec) of the loss configurations compiled ahead of time: every loss type of the table at least
    once, every f-divergence, with and without lengths / WPO weights, the reference-free family, KTO.
    "quick": the fast smoke subset (together: every loss type but cpo / cpo_hinge / cpo_ipo, which are the sigmoid /
    hinge / ipo formulas without a reference; every f-divergence, lengths, weights, ref-free, KTO).
    "stress": long loss lists the API accepts whose kernel spills at BLOCK 1024 / 4 warps (hence MAX_BLOCK)
    (8 values per thread; see ``aot_configs(variant="stress")``)."""
    from prefopt.losses.table import DIVERGENCES, DPO_LOSSES, REF_FREE_LOSSES, TABLE
    norm = ("delta_norm", "cr_norm")
    out = []
    for n in DPO_LOSSES:  # each reference-based pair loss alone (the *_norm ones need lengths)
        if TABLE[n].kind != "none":
            out.append(("full", PairSpec((n,), has_len=TABLE[n].kind in norm)))
    out.append(("full", PairSpec(("sigmoid", "sft"))))  # sft launches no kernel alone; kind "none" in a list
    out.append(("full", PairSpec(("sigmoid",), has_w=True)))  # WPO weights
    fdiv = tuple(n for n in DPO_LOSSES if TABLE[n].supports_f_divergence)
    for d in DIVERGENCES:
        if d != "reverse_kl":
            out.append(("quick" if d != "alpha_divergence" else "full", PairSpec(("sigmoid",), divergence=d)))
            # every loss that accepts an f-divergence at once, with lengths (+ WPO weights for alpha)
            out.append(("quick" if d == "alpha_divergence" else "full",
                        PairSpec(fdiv, divergence=d, has_len=True, has_w=d == "alpha_divergence")))
    # the other reference-based losses in small lists (reverse_kl)
    out.append(("quick", PairSpec(("sigmoid", "bco_pair", "sft"), has_w=True)))  # MPO-style, weighted
    out.append(("quick", PairSpec(("nca_pair", "sppo_hard", "apo_zero", "apo_down"))))
    out.append(("quick", PairSpec(("ipo", "aot", "aot_unpaired"), has_len=True)))
    for n in REF_FREE_LOSSES:  # reference-free: one loss per call (cpo*: the sigmoid / hinge / ipo formulas)
        out.append(("quick" if n in ("simpo", "orpo") else "full",
                    PairSpec((n,), has_ref=False, has_len=TABLE[n].kind in norm)))
    out.append(("quick", PairSpec(("kto",), has_ref=True, has_len=False, has_w=True)))  # kto_loss
    rest = tuple(n for n in DPO_LOSSES if n not in fdiv)
    out.append(("stress", PairSpec(rest)))
    out.append(("stress", PairSpec(DPO_LOSSES, has_len=True)))
    return out


def _aot_specs_by_tag():
    """Named loss configurations for bench/aot_launches.py's recorded launches: "heaviest" (every loss that takes an
    f-divergence, alpha divergence, lengths and WPO weights: the most live values) and "kto" (kto_loss)."""
    specs = _aot_specs()
    heaviest = next(s for tag, s in specs if tag == "quick" and s.divergence == "alpha_divergence")
    kto = next(s for tag, s in specs if s.losses == ("kto",))
    return (("heaviest", heaviest), ("kto", kto))


def _aot_pair_sig(dt):
    sig = {f"{n}_ptr": f"*{dt}" for n in _INPUTS}
    sig["prm_ptr"] = f"*{dt}"
    sig["loss_ptr"] = f"*{dt}"
    sig.update({f"g{k}_ptr": f"*{dt}" for k in _GRADS})
    sig["P"] = "i32"
    return sig


def aot_configs(variant="default"):
    """(kernel, signature, constexprs, num_warps) as the launchers above pick them on a GPU, for the loss
    configurations of ``_aot_specs`` (the generated ``_pair_kernel`` of each, forward-only and forward+grad) and
    the backward ``_scale_kernel``.

    The pair kernel runs in the compute dtype: fp32 for fp32 / bf16 / fp16 inputs (they are cast before the
    launch), so bf16 inputs use the fp32 kernels; only the backward's ``out`` has the input dtype. Scalars as on
    a GPU launch (i32 P, fp32 scale); num_warps is triton's default (4). BLOCK MAX_BLOCK is the heaviest
    (8 values per thread); every smaller BLOCK is listed for the heaviest configuration.

    variant "default": the "quick" + "full" configurations in fp32 (the asserted sweep);
    "fp64": the same in fp64 (compute dtype of fp64 inputs; report only: checked for spills at MAX_BLOCK);
    "stress": the "stress" loss lists, fp32, forward+grad at MAX_BLOCK."""
    if variant not in AOT_VARIANTS:
        raise ValueError(f"variant must be one of {AOT_VARIANTS}, got {variant!r}")
    fp64 = variant == "fp64"
    ct = "fp64" if fp64 else "fp32"
    specs = _aot_specs()
    out = []
    if variant == "stress":
        for tag, spec in specs:
            if tag == "stress":
                out.append((get_kernel(spec, True, False), _aot_pair_sig(ct), dict(BLOCK=MAX_BLOCK), 4))
        return out
    heaviest = dict(_aot_specs_by_tag())["heaviest"]
    for tag, spec in specs:
        if tag == "stress":
            continue
        for need_grad in (False, True):
            kern = get_kernel(spec, need_grad, fp64)
            for block in (_AOT_BLOCKS if (need_grad and spec == heaviest) else (MAX_BLOCK,)):
                out.append((kern, _aot_pair_sig(ct), dict(BLOCK=block), 4))
    for odt in (("fp64",) if fp64 else ("fp32", "bf16", "fp16")):
        for block in (16, MAX_BLOCK):
            sig = {"g_ptr": f"*{ct}", "go_ptr": f"*{ct}", "out_ptr": f"*{odt}", "scale": "fp32", "P": "i32"}
            out.append((_scale_kernel, sig, dict(BLOCK=block), 4))
    return out


def aot_quick(variant="default"):
    """Indices into ``aot_configs(variant)`` of the fast smoke subset: the "quick" configurations forward+grad at
    MAX_BLOCK and the backward kernel at MAX_BLOCK for fp32 and bf16 outputs (fp64 for that variant)."""
    quick = {(s, True) for tag, s in _aot_specs() if tag in ("quick", "stress")}
    idx = []
    for i, (fn, sig, cx, _) in enumerate(aot_configs(variant)):
        if cx["BLOCK"] != MAX_BLOCK:
            continue
        if fn is _scale_kernel:
            if sig["out_ptr"] in ("*fp32", "*bf16", "*fp64"):
                idx.append(i)
        elif aot_describe(fn) in quick:
            idx.append(i)
    return idx


def aot_describe(fn):
    """(PairSpec, need_grad) of a generated pair kernel (None for other kernels)."""
    for (spec, need_grad, _fp64), k in _CACHE.items():
        if k is fn:
            return spec, need_grad
    return None


def aot_label(fn, sig, cx):
    """Short description of a configuration for the kernel report."""
    if fn is _scale_kernel:
        return f"out={sig['out_ptr'][1:]}"
    spec, need_grad = aot_describe(fn)
    from prefopt.losses.table import DPO_LOSSES
    names = f"all-ref-based({len(spec.losses)})" if spec.losses == DPO_LOSSES else "+".join(spec.losses)
    return (f"losses={names} div={spec.divergence} ref={int(spec.has_ref)} len={int(spec.has_len)} "
            f"w={int(spec.has_w)} grad={int(need_grad)}")
