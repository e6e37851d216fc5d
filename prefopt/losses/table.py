"""THE loss table: every per-pair preference-loss formula and its derivative(s), written once.

Every formula is a plain Python function written against a tiny op namespace ``ops`` and a parameter
namespace ``p``; it never touches torch or triton directly. Two op namespaces implement it:

* ``TorchOps`` (below)             -> evaluates on tensors (the torch backend, CPU or CUDA);
* ``kernels/preference_loss.py``   -> a *symbolic* namespace that turns the same functions into Triton
                                      source, calling hand-written ``@triton.jit`` helpers for each op.

The C++ engineer mirrors this file in csrc (one entry = one forward + its derivative(s)).

Op namespace (all elementwise; ``x`` tensors or the scalar parameters ``p.*``):
    logsigmoid(x), sigmoid(x), exp(x), log(x), log1p(x), expm1(x), log1mexp(x) = log(1 - exp(x)) for x <= 0,
    relu(x), minimum(x, y), where(cond, x, y), gt(x, y), le(x, y), let(name, x) (binds a named intermediate:
    identity for torch, an assignment in generated Triton code).
Only +, -, *, / and the literals 0.0, 0.5, 1.0, 2.0 (exact in fp32) may appear in formulas; every other
constant is a parameter (Triton turns Python float literals into fp32 constants, which would cost fp64 precision).

Parameters (``PARAM_NAMES``; a small tensor in the compute dtype, loaded by the kernel):
    beta, ls (label_smoothing / epsilon), tau (discopop_tau), gamma (simpo_gamma), fa1 (f_alpha_divergence_coef - 1),
    clamp (alpha-divergence exponent clamp), bco_delta (BCO reward shift), kl (KTO batch KL), ln2 (log 2).
    The loss weights of a list of losses follow them (``lw0, lw1, ...``).

Per-pair arguments (the ``kind`` of an entry says how they are built from the inputs):
    c = chosen log-ratio  (policy_chosen - ref_chosen;   reference-free: policy chosen logp)
    r = rejected log-ratio (policy_rejected - ref_rejected; reference-free: policy rejected logp)
    S = the f-divergence score transform (``DIVERGENCES``; identity for reverse_kl and reference-free losses)
    kind "delta"        h = S(c) - S(r)                                  forward(ops, p, h), grads (d/dh,)
    kind "delta_norm"   h = S(c)/len_c - S(r)/len_r                      forward(ops, p, h), grads (d/dh,)
    kind "cr"           (c, r)                                           forward(ops, p, c, r), grads (d/dc, d/dr)
    kind "cr_norm"      (c/len_c, r/len_r)                               forward(ops, p, c, r), grads (d/dc, d/dr)
    kind "aot"          h = sort(pc - pr)[k] - sort(rc - rr)[k]  (sorted over the batch, in torch)  grads (d/dh,)
    kind "aot_unpaired" h = sort(c)[k] - sort(r)[k]                                              grads (d/dh,)
    kind "signed"       (x, s): x = policy - ref of one *unpaired* example, s = +1 desirable / -1 undesirable
                                                                         forward(ops, p, x, s), grads (d/dx,)
    kind "none"         no per-pair term (sft: the batch NLL, added around the kernel)

Per-pair total (``pair_terms``, shared by the torch backend and the kernel generator):
    loss_i = w_i * sum_k lw_k * f_k(args_k,i)   (w_i: WPO policy weight, 1 when absent)
and its derivatives w.r.t. c_i, r_i and the two aot slots, by the chain rule through the kind's arguments.
Batch-coupled pieces (aot sorting, the bco running mean, the KTO batch KL, the NLL token mean, the mean over
pairs) are done in torch around this (``prefopt/losses/function.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

PARAM_NAMES = ("beta", "ls", "tau", "gamma", "fa1", "clamp", "bco_delta", "kl", "ln2")
KINDS = ("delta", "delta_norm", "cr", "cr_norm", "aot", "aot_unpaired", "signed", "none")
LOG1MEXP_SWITCH = -0.693359375  # ~ -log 2 (exact in fp32): below it log1p(-exp(x)), above it log(-expm1(x))


@dataclass(frozen=True)
class Divergence:
    name: str
    score: Callable          # S(ops, p, x)
    dscore: Callable         # dS/dx (ops, p, x)


@dataclass(frozen=True)
class LossEntry:
    name: str
    family: str              # "dpo" (needs reference logps), "ref_free" (SimPO/CPO/ORPO), "kto" (unpaired)
    kind: str                # see KINDS
    forward: Callable | None
    grads: tuple             # derivative functions, one per argument of `forward`
    uses: tuple = ()         # parameters the formula reads (documentation + validation)

    @property
    def supports_f_divergence(self) -> bool:
        # the f-DPO reparameterisation only cancels log Z(x) in the chosen-rejected score difference
        return self.family == "dpo" and self.kind in ("delta", "delta_norm", "none")


# ----------------------------------------------------------------------------------------------------------
# building blocks (each written once; entries below reuse them)
# ----------------------------------------------------------------------------------------------------------
def _sig_ls(ops, p, x):
    """cDPO / conservative sigmoid on a logit x: -(1-ls) logsigmoid(x) - ls logsigmoid(-x)."""
    return -(1.0 - p.ls) * ops.logsigmoid(x) - p.ls * ops.logsigmoid(0.0 - x)


def _dsig_ls(ops, p, x):
    """d/dx of _sig_ls: -(1-ls) sigmoid(-x) + ls sigmoid(x)."""
    return -(1.0 - p.ls) * ops.sigmoid(0.0 - x) + p.ls * ops.sigmoid(x)


# sigmoid (DPO / cDPO), aot, aot_unpaired, cpo:  f(h) = _sig_ls(beta*h)
def _f_sigmoid(ops, p, h):
    return _sig_ls(ops, p, p.beta * h)


def _d_sigmoid(ops, p, h):
    return p.beta * _dsig_ls(ops, p, p.beta * h)


# sigmoid_norm (TRL: no label smoothing): f(h) = -logsigmoid(beta*h)
def _f_sigmoid_plain(ops, p, h):
    return 0.0 - ops.logsigmoid(p.beta * h)


def _d_sigmoid_plain(ops, p, h):
    return -p.beta * ops.sigmoid(0.0 - p.beta * h)


# hinge (SLiC): relu(1 - beta*h)
def _f_hinge(ops, p, h):
    return ops.relu(1.0 - p.beta * h)


def _d_hinge(ops, p, h):
    return ops.where(ops.gt(1.0 - p.beta * h, 0.0), 0.0 - p.beta, 0.0)


# ipo: (h - 1/(2 beta))^2
def _f_ipo(ops, p, h):
    t = h - 0.5 / p.beta
    return t * t


def _d_ipo(ops, p, h):
    return 2.0 * (h - 0.5 / p.beta)


# exo_pair (EXO, K=2): KL(softmax(beta*[s_w, s_l]) || [1-eps, eps]),  x = beta*h
def _f_exo(ops, p, h):
    x = p.beta * h
    return (ops.sigmoid(x) * (ops.logsigmoid(x) - ops.log1p(0.0 - p.ls))
            + ops.sigmoid(0.0 - x) * (ops.logsigmoid(0.0 - x) - ops.log(p.ls)))


def _d_exo(ops, p, h):
    x = p.beta * h
    return p.beta * ops.sigmoid(x) * ops.sigmoid(0.0 - x) * (x - ops.log1p(0.0 - p.ls) + ops.log(p.ls))


# nca_pair: -logsigmoid(b c) - 0.5 logsigmoid(-b c) - 0.5 logsigmoid(-b r)
def _f_nca(ops, p, c, r):
    x = p.beta * c
    y = p.beta * r
    return 0.0 - ops.logsigmoid(x) - 0.5 * ops.logsigmoid(0.0 - x) - 0.5 * ops.logsigmoid(0.0 - y)


def _dc_nca(ops, p, c, r):
    x = p.beta * c
    return p.beta * (0.5 * ops.sigmoid(x) - ops.sigmoid(0.0 - x))


def _dr_nca(ops, p, c, r):
    return 0.5 * p.beta * ops.sigmoid(p.beta * r)


# robust (rDPO): (-(1-ls) logsigmoid(x) + ls logsigmoid(-x)) / (1 - 2 ls),  x = beta*h
def _f_robust(ops, p, h):
    x = p.beta * h
    return (-(1.0 - p.ls) * ops.logsigmoid(x) + p.ls * ops.logsigmoid(0.0 - x)) / (1.0 - 2.0 * p.ls)


def _d_robust(ops, p, h):
    x = p.beta * h
    return -p.beta * ((1.0 - p.ls) * ops.sigmoid(0.0 - x) + p.ls * ops.sigmoid(x)) / (1.0 - 2.0 * p.ls)


# bco_pair: -logsigmoid(b c - delta) - logsigmoid(-(b r - delta))   (delta: running reward mean)
def _f_bco(ops, p, c, r):
    return 0.0 - ops.logsigmoid(p.beta * c - p.bco_delta) - ops.logsigmoid(p.bco_delta - p.beta * r)


def _dc_bco(ops, p, c, r):
    return -p.beta * ops.sigmoid(p.bco_delta - p.beta * c)


def _dr_bco(ops, p, c, r):
    return p.beta * ops.sigmoid(p.beta * r - p.bco_delta)


# sppo_hard: (c - 1/(2b))^2 + (r + 1/(2b))^2
def _f_sppo(ops, p, c, r):
    a = c - 0.5 / p.beta
    b = r + 0.5 / p.beta
    return a * a + b * b


def _dc_sppo(ops, p, c, r):
    return 2.0 * (c - 0.5 / p.beta)


def _dr_sppo(ops, p, c, r):
    return 2.0 * (r + 0.5 / p.beta)


# apo_zero: 1 - sigmoid(b c) + sigmoid(b r)
def _f_apo_zero(ops, p, c, r):
    return 1.0 - ops.sigmoid(p.beta * c) + ops.sigmoid(p.beta * r)


def _dc_apo_zero(ops, p, c, r):
    x = p.beta * c
    return -p.beta * ops.sigmoid(x) * ops.sigmoid(0.0 - x)


def _dr_apo_zero(ops, p, c, r):
    y = p.beta * r
    return p.beta * ops.sigmoid(y) * ops.sigmoid(0.0 - y)


# apo_down: sigmoid(b c) + 1 - sigmoid(b (c - r))
def _f_apo_down(ops, p, c, r):
    return ops.sigmoid(p.beta * c) + 1.0 - ops.sigmoid(p.beta * (c - r))


def _dc_apo_down(ops, p, c, r):
    x = p.beta * c
    z = p.beta * (c - r)
    return p.beta * (ops.sigmoid(x) * ops.sigmoid(0.0 - x) - ops.sigmoid(z) * ops.sigmoid(0.0 - z))


def _dr_apo_down(ops, p, c, r):
    z = p.beta * (c - r)
    return p.beta * ops.sigmoid(z) * ops.sigmoid(0.0 - z)


# discopop (DiscoPOP / LRML), x = beta*h, m = sigmoid(x/tau):
#   f = -logsigmoid(x) (1 - m) + exp(-x) m,   exp(-x) m written exp(-x + logsigmoid(x/tau)) (no inf*0)
def _f_discopop(ops, p, h):
    x = p.beta * h
    return (0.0 - ops.logsigmoid(x)) * ops.sigmoid(0.0 - x / p.tau) + ops.exp(ops.logsigmoid(x / p.tau) - x)


def _d_discopop(ops, p, h):
    x = p.beta * h
    u = x / p.tau
    # df/dx = -sigmoid(-x)(1-m) + (exp(-x) + logsigmoid(x)) m(1-m)/tau - exp(-x) m
    dmm = ops.sigmoid(u) * ops.sigmoid(0.0 - u)
    em = ops.exp(ops.logsigmoid(u) - x)
    emm = ops.exp(ops.logsigmoid(u) + ops.logsigmoid(0.0 - u) - x)
    return p.beta * (0.0 - ops.sigmoid(0.0 - x) * ops.sigmoid(0.0 - u)
                     + (emm + ops.logsigmoid(x) * dmm) / p.tau - em)


# simpo (and CPO-SimPO): _sig_ls(beta*h - gamma) on length-averaged logps
def _f_simpo(ops, p, h):
    return _sig_ls(ops, p, p.beta * h - p.gamma)


def _d_simpo(ops, p, h):
    return p.beta * _dsig_ls(ops, p, p.beta * h - p.gamma)


# orpo: -beta * logsigmoid(log_odds), log_odds = (c - r) - (log1mexp(c) - log1mexp(r)) on length-averaged logps
def _orpo_log_odds(ops, p, c, r):
    return (c - r) - (ops.log1mexp(c) - ops.log1mexp(r))


def _f_orpo(ops, p, c, r):
    return (0.0 - p.beta) * ops.logsigmoid(_orpo_log_odds(ops, p, c, r))


def _dc_orpo(ops, p, c, r):
    # d log_odds / dc = 1/(1 - e^c) = -1/expm1(c)
    return p.beta * ops.sigmoid(0.0 - _orpo_log_odds(ops, p, c, r)) / ops.expm1(c)


def _dr_orpo(ops, p, c, r):
    return (0.0 - p.beta) * ops.sigmoid(0.0 - _orpo_log_odds(ops, p, c, r)) / ops.expm1(r)


# kto (unpaired): 1 - sigmoid(beta * s * (x - kl)),  s = +1 desirable / -1 undesirable
# (apo_zero_unpaired is the same entry with kl = 0)
def _f_kto(ops, p, x, s):
    return 1.0 - ops.sigmoid(p.beta * s * (x - p.kl))


def _d_kto(ops, p, x, s):
    z = p.beta * s * (x - p.kl)
    return (0.0 - p.beta) * s * ops.sigmoid(z) * ops.sigmoid(0.0 - z)


# ----------------------------------------------------------------------------------------------------------
# THE table
# ----------------------------------------------------------------------------------------------------------
ENTRIES = (
    # reference-based (DPO family; TRL DPOTrainer loss_type names)
    LossEntry("sigmoid", "dpo", "delta", _f_sigmoid, (_d_sigmoid,), ("beta", "ls")),
    LossEntry("hinge", "dpo", "delta", _f_hinge, (_d_hinge,), ("beta",)),
    LossEntry("ipo", "dpo", "delta_norm", _f_ipo, (_d_ipo,), ("beta",)),
    LossEntry("exo_pair", "dpo", "delta", _f_exo, (_d_exo,), ("beta", "ls")),
    LossEntry("nca_pair", "dpo", "cr", _f_nca, (_dc_nca, _dr_nca), ("beta",)),
    LossEntry("robust", "dpo", "delta", _f_robust, (_d_robust,), ("beta", "ls")),
    LossEntry("bco_pair", "dpo", "cr", _f_bco, (_dc_bco, _dr_bco), ("beta", "bco_delta")),
    LossEntry("sppo_hard", "dpo", "cr", _f_sppo, (_dc_sppo, _dr_sppo), ("beta",)),
    LossEntry("aot", "dpo", "aot", _f_sigmoid, (_d_sigmoid,), ("beta", "ls")),
    LossEntry("aot_unpaired", "dpo", "aot_unpaired", _f_sigmoid, (_d_sigmoid,), ("beta", "ls")),
    LossEntry("apo_zero", "dpo", "cr", _f_apo_zero, (_dc_apo_zero, _dr_apo_zero), ("beta",)),
    LossEntry("apo_down", "dpo", "cr", _f_apo_down, (_dc_apo_down, _dr_apo_down), ("beta",)),
    LossEntry("discopop", "dpo", "delta", _f_discopop, (_d_discopop,), ("beta", "tau")),
    LossEntry("sft", "dpo", "none", None, (), ()),
    LossEntry("sigmoid_norm", "dpo", "delta_norm", _f_sigmoid_plain, (_d_sigmoid_plain,), ("beta",)),
    # reference-free (TRL CPOTrainer loss_type sigmoid/hinge/ipo/simpo, ORPOTrainer)
    LossEntry("cpo", "ref_free", "delta", _f_sigmoid, (_d_sigmoid,), ("beta", "ls")),
    LossEntry("cpo_hinge", "ref_free", "delta", _f_hinge, (_d_hinge,), ("beta",)),
    LossEntry("cpo_ipo", "ref_free", "delta_norm", _f_ipo, (_d_ipo,), ("beta",)),
    LossEntry("simpo", "ref_free", "delta_norm", _f_simpo, (_d_simpo,), ("beta", "ls", "gamma")),
    LossEntry("orpo", "ref_free", "cr_norm", _f_orpo, (_dc_orpo, _dr_orpo), ("beta",)),
    # unpaired (prefopt.kto_loss; TRL KTOTrainer loss_type kto / apo_zero_unpaired)
    LossEntry("kto", "kto", "signed", _f_kto, (_d_kto,), ("beta", "kl")),
)
TABLE = {e.name: e for e in ENTRIES}
INDEX = {e.name: i for i, e in enumerate(ENTRIES)}  # stable ids (the C++ table uses the same order)

DPO_LOSSES = tuple(e.name for e in ENTRIES if e.family == "dpo")
REF_FREE_LOSSES = tuple(e.name for e in ENTRIES if e.family == "ref_free")


def _s_reverse_kl(ops, p, x):
    return x


def _ds_reverse_kl(ops, p, x):
    return 1.0 + 0.0 * x


def _s_forward_kl(ops, p, x):          # f'(t) = 1 - 1/t
    return 1.0 - ops.exp(0.0 - x)


def _ds_forward_kl(ops, p, x):
    return ops.exp(0.0 - x)


def _s_js(ops, p, x):                  # f'(t) = log(2t/(t+1)) = log 2 + logsigmoid(log t)
    return p.ln2 + ops.logsigmoid(x)


def _ds_js(ops, p, x):
    return ops.sigmoid(0.0 - x)


def _s_alpha(ops, p, x):               # f'(t) = (t^(a-1) - 1)/(a-1), exponent clamped as TRL does
    return (ops.exp(ops.minimum(p.fa1 * x, p.clamp)) - 1.0) / p.fa1


def _ds_alpha(ops, p, x):
    t = p.fa1 * x
    return ops.where(ops.le(t, p.clamp), ops.exp(ops.minimum(t, p.clamp)), 0.0)


DIVERGENCES = {
    "reverse_kl": Divergence("reverse_kl", _s_reverse_kl, _ds_reverse_kl),
    "forward_kl": Divergence("forward_kl", _s_forward_kl, _ds_forward_kl),
    "js_divergence": Divergence("js_divergence", _s_js, _ds_js),
    "alpha_divergence": Divergence("alpha_divergence", _s_alpha, _ds_alpha),
}


# ----------------------------------------------------------------------------------------------------------
# composition of a configuration (shared by the torch backend and the Triton code generator)
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairSpec:
    """A compiled configuration: which losses (in order; weight k is parameter lw<k>), which divergence,
    and which optional inputs exist. Hashable: the kernel cache key."""
    losses: tuple
    divergence: str = "reverse_kl"
    has_ref: bool = True        # c = pc - rc (else c = pc)
    has_len: bool = False       # inv_len_c / inv_len_r given
    has_w: bool = False         # per-pair (WPO) weights given

    @property
    def slots(self):
        kinds = {TABLE[n].kind for n in self.losses}
        return {"c": bool(kinds & {"delta", "delta_norm", "cr", "cr_norm", "signed"}),
                "r": bool(kinds & {"delta", "delta_norm", "cr", "cr_norm"}),
                "a": "aot" in kinds, "u": "aot_unpaired" in kinds}


class _Params:
    def __init__(self, values: dict):
        self.__dict__.update(values)


def pair_terms(ops, spec: PairSpec, x: dict, p, need_grad: bool, entry_forward=None, entry_grad=None):
    """Per-pair loss and derivatives of one configuration.

    x: per-pair values {"pc", "pr", "rc", "rr", "ilc", "ilr", "ha", "hu", "w"} (absent ones may be missing).
    p: parameters (attributes PARAM_NAMES and lw0, lw1, ...).
    entry_forward(entry, *args) / entry_grad(entry, i, *args): evaluate one table entry's formula; default: the
    entry's own functions on `ops` (the C++ backend passes its compiled mirror of the entries instead).
    Returns (loss, {"c": dL/dc, "r": dL/dr, "a": dL/dh_aot, "u": dL/dh_aot_unpaired}) (grads None if unused).
    """
    if entry_forward is None:
        def entry_forward(entry, *args):
            return entry.forward(ops, p, *args)
    if entry_grad is None:
        def entry_grad(entry, i, *args):
            return entry.grads[i](ops, p, *args)
    div = DIVERGENCES[spec.divergence]
    c = ops.let("c", x["pc"] - x["rc"]) if spec.has_ref else x["pc"]
    r = None
    if "pr" in x:
        r = ops.let("r", x["pr"] - x["rr"]) if spec.has_ref else x["pr"]
    loss = None
    g = {"c": None, "r": None, "a": None, "u": None}

    def acc(key, val):
        g[key] = val if g[key] is None else g[key] + val

    sc = dsc = sr = dsr = None
    kinds = [TABLE[n].kind for n in spec.losses]
    if any(k in ("delta", "delta_norm") for k in kinds):
        sc = ops.let("sc", div.score(ops, p, c))
        sr = ops.let("sr", div.score(ops, p, r))
        if need_grad:
            dsc = ops.let("dsc", div.dscore(ops, p, c))
            dsr = ops.let("dsr", div.dscore(ops, p, r))
    for k, name in enumerate(spec.losses):
        e = TABLE[name]
        lw = getattr(p, f"lw{k}")
        if e.kind == "none":
            continue
        if e.kind in ("delta", "delta_norm", "aot", "aot_unpaired"):
            if e.kind == "delta":
                h = ops.let(f"h{k}", sc - sr)
            elif e.kind == "delta_norm":
                h = ops.let(f"h{k}", sc * x["ilc"] - sr * x["ilr"])
            else:
                h = x["ha"] if e.kind == "aot" else x["hu"]
            f = ops.let(f"f{k}", lw * entry_forward(e, h))
            if need_grad:
                d = ops.let(f"d{k}", lw * entry_grad(e, 0, h))
                if e.kind == "delta":
                    acc("c", d * dsc)
                    acc("r", (0.0 - d) * dsr)
                elif e.kind == "delta_norm":
                    acc("c", d * dsc * x["ilc"])
                    acc("r", (0.0 - d) * dsr * x["ilr"])
                else:
                    acc("a" if e.kind == "aot" else "u", d)
        elif e.kind in ("cr", "cr_norm"):
            a, b = (c, r) if e.kind == "cr" else (ops.let("cn", c * x["ilc"]), ops.let("rn", r * x["ilr"]))
            f = ops.let(f"f{k}", lw * entry_forward(e, a, b))
            if need_grad:
                dc = lw * entry_grad(e, 0, a, b)
                dr = lw * entry_grad(e, 1, a, b)
                acc("c", dc if e.kind == "cr" else dc * x["ilc"])
                acc("r", dr if e.kind == "cr" else dr * x["ilr"])
        elif e.kind == "signed":
            f = ops.let(f"f{k}", lw * entry_forward(e, c, x["s"]))
            if need_grad:
                acc("c", lw * entry_grad(e, 0, c, x["s"]))
        else:  # pragma: no cover
            raise AssertionError(e.kind)
        loss = f if loss is None else loss + f
    if loss is None:
        loss = 0.0 * c
    if spec.has_w:
        loss = loss * x["w"]
        for key in g:
            if g[key] is not None:
                g[key] = g[key] * x["w"]
    return loss, g


# ----------------------------------------------------------------------------------------------------------
# the torch op namespace (the Triton one lives in kernels/preference_loss.py)
# ----------------------------------------------------------------------------------------------------------
class TorchOps:
    logsigmoid = staticmethod(F.logsigmoid)
    sigmoid = staticmethod(torch.sigmoid)
    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    log1p = staticmethod(torch.log1p)
    expm1 = staticmethod(torch.expm1)
    relu = staticmethod(torch.relu)
    minimum = staticmethod(torch.minimum)

    @staticmethod
    def log1mexp(x):
        return torch.where(x < LOG1MEXP_SWITCH, torch.log1p(-torch.exp(torch.clamp(x, max=0.0))),
                           torch.log(-torch.expm1(x)))

    @staticmethod
    def where(cond, a, b):
        like = a if torch.is_tensor(a) else b
        a = a if torch.is_tensor(a) else torch.as_tensor(a, dtype=like.dtype, device=like.device)
        b = b if torch.is_tensor(b) else torch.as_tensor(b, dtype=like.dtype, device=like.device)
        return torch.where(cond, a, b)

    @staticmethod
    def gt(a, b):
        return a > b

    @staticmethod
    def le(a, b):
        return a <= b

    @staticmethod
    def let(name, v):
        return v


def make_params(dtype, device, *, beta, ls=0.0, tau=0.05, gamma=0.0, fa1=0.0, clamp=80.0, bco_delta=0.0,
                kl=0.0, loss_weights=(1.0,)):
    """The parameter vector (compute dtype): PARAM_NAMES then the loss weights. bco_delta / kl may be 0-dim
    tensors (batch statistics computed on device); they are detached."""
    vals = [beta, ls, tau, gamma, fa1, clamp, None, None, 0.6931471805599453]
    out = torch.empty(len(PARAM_NAMES) + len(loss_weights), dtype=dtype, device=device)
    for i, v in enumerate(vals):
        if v is not None:
            out[i] = float(v)
    for i, v in ((6, bco_delta), (7, kl)):
        out[i] = v.detach().to(dtype) if torch.is_tensor(v) else float(v)
    for k, v in enumerate(loss_weights):
        out[len(PARAM_NAMES) + k] = float(v)
    return out


def params_view(params: torch.Tensor, n_losses: int) -> _Params:
    """Parameter namespace over a parameter vector (0-dim tensor views, for TorchOps)."""
    d = {n: params[i] for i, n in enumerate(PARAM_NAMES)}
    d.update({f"lw{k}": params[len(PARAM_NAMES) + k] for k in range(n_losses)})
    return _Params(d)
