"""Benchmark cases (the grid) and the implementations compared in each.

Ops:
  logits  (a) `prefopt.logprobs_from_logits` vs eager `log_softmax(logits.float()).gather`        fwd + bwd
  linear  (b) `prefopt.linear_logprobs` vs eager `log_softmax(hidden @ W.T).gather`               fwd + bwd
  dpo     (c) a DPO step: policy head (grad) + live reference head (no grad), per-sequence sums, DPO sigmoid
              (beta 0.1, mean over pairs), forward + backward

Every implementation's `build(inputs)` returns a `step()` that runs forward + backward and returns
`(loss, out)`; `out` is a small tensor compared across implementations (per-token log-probs for logits /
linear, per-sequence policy log-prob sums for dpo when the implementation exposes them, else None).
`gemm-limit` times only the GEMMs of the same FLOPs (forward logits GEMM; backward grad_hidden and
grad_weight GEMMs; the reference forward GEMM in dpo) on preallocated buffers: the floor for a head that
must compute the logits.
"""
from __future__ import annotations

import dataclasses
import importlib
import itertools
import os

import torch

BETA = 0.1
IGNORE_INDEX = -100
TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE (vocabulary columns per tile)


@dataclasses.dataclass(frozen=True)
class Case:
    op: str                 # logits | linear | dpo
    tokens: int             # total tokens N (dpo: 2 * pairs * seq)
    hidden: int             # H (0 for logits)
    vocab: int              # V
    dtype: str              # float32 | bfloat16
    kind: str               # uniform | lm
    pairs: int = 0          # dpo only
    seq: int = 0            # dpo only: tokens per sequence
    tag: str = ""           # "reference" for the benchmark reference case

    @property
    def name(self) -> str:
        shape = f"P{self.pairs}xT{self.seq}" if self.op == "dpo" else f"N{self.tokens}"
        hid = f"-H{self.hidden}" if self.op != "logits" else ""
        return f"{self.op}-{shape}{hid}-V{self.vocab}-{self.dtype}-{self.kind}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "Case":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def dpo_case(pairs, seq, hidden, vocab, dtype, kind, tag=""):
    return Case("dpo", 2 * pairs * seq, hidden, vocab, dtype, kind, pairs, seq, tag)


def reference_cases():
    """The benchmark reference case: 2 pairs x 512 tokens, H=1024, V=32000, fp32, live reference, DPO sigmoid,
    forward + backward, on both input kinds."""
    return [dpo_case(2, 512, 1024, 32000, "float32", kind, tag="reference") for kind in ("uniform", "lm")]


def default_grid(quick: bool = False):
    """The curated grid: reference case + sweeps over V and over tokens for each op."""
    cases = list(reference_cases())
    if quick:
        for vocab in (32000, 128000):          # time / memory vs V (N * V above one prefopt tile at both V)
            cases.append(Case("linear", 512, 256, vocab, "float32", "lm"))
            cases.append(Case("logits", 512, 0, vocab, "float32", "lm"))
        cases.append(Case("linear", 128, 256, 32000, "float32", "lm"))   # vs tokens (with N=512 above)
        cases.append(Case("logits", 128, 0, 32000, "float32", "lm"))
        return cases
    vocabs = (32000, 128000, 256000)
    for kind in ("lm", "uniform"):
        for vocab in vocabs:
            cases.append(Case("logits", 1024, 0, vocab, "float32", kind))
            cases.append(Case("linear", 1024, 1024, vocab, "float32", kind))
    for vocab in vocabs:
        cases.append(Case("logits", 1024, 0, vocab, "bfloat16", "lm"))
        cases.append(Case("linear", 1024, 1024, vocab, "bfloat16", "lm"))
    for tokens in (256, 4096):
        cases.append(Case("logits", tokens, 0, 32000, "float32", "lm"))
        cases.append(Case("linear", tokens, 1024, 32000, "float32", "lm"))
    for vocab in (128000, 256000):
        cases.append(dpo_case(2, 512, 1024, vocab, "float32", "lm"))
    cases.append(dpo_case(4, 512, 1024, 32000, "float32", "lm"))
    return cases


def product_grid(ops, tokens, hiddens, vocabs, dtypes, kinds, pairs=2):
    """Cartesian grid from CLI lists. For dpo, `tokens` are tokens per sequence (with `pairs` pairs)."""
    cases = []
    for op, n, h, v, dt, kind in itertools.product(ops, tokens, hiddens, vocabs, dtypes, kinds):
        if op == "dpo":
            cases.append(dpo_case(pairs, n, h, v, dt, kind))
        else:
            cases.append(Case(op, n, 0 if op == "logits" else h, v, dt, kind))
    return list(dict.fromkeys(cases))


# --------------------------------------------------------------------------------------------------------------
# Implementations


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    ops: tuple
    backend: str | None = None     # prefopt backend, run under prefopt.use_backend
    logits_cache_mb: float | None = None  # prefopt head: None = the package default
    timing_only: bool = False      # gemm-limit: no memory / agreement figures


def _prefopt_backends(device_type):
    from prefopt import _backend
    out = []
    for name in ("torch", "cpp", "triton"):
        if name == "torch":
            ok, why = True, ""
        elif name == "cpp":
            ok, why = _backend.cpp_status(device_type)
        else:
            if device_type == "cpu":
                ok, why = False, "Triton on CPU tensors runs only in the interpreter (tests only, not a benchmark)"
            else:
                ok, why = _backend.triton_status(device_type)
        out.append((name, ok, why))
    return out


def implementations(op, device_type="cpu", quick=False):
    """[(Impl, available, reason-if-not)] for one op, in report order (eager first)."""
    impls = [(Impl("eager", ("logits", "linear", "dpo")), True, "")]
    for backend, ok, why in _prefopt_backends(device_type):
        impls.append((Impl(f"prefopt[{backend}]", ("logits", "linear", "dpo"), backend=backend), ok, why))
        if backend == "cpp" and device_type == "cpu" and op in ("linear", "dpo"):
            # the CPU default keeps up to 256 MiB of logits tiles; this row shows the pure-recompute head
            impls.append((Impl("prefopt[cpp] no-cache", ("linear", "dpo"), backend=backend, logits_cache_mb=0),
                          ok, why))
    if op == "dpo":
        try:
            import prefopt
            ok = hasattr(prefopt, "fused_linear_dpo_loss") or importlib.util.find_spec("prefopt.fused") is not None
            why = "" if ok else "prefopt.fused_linear_dpo_loss is not available in this checkout"
        except Exception as err:  # pragma: no cover
            ok, why = False, f"prefopt import failed: {err}"
        impls = [(i, a and ok, r or why) if i.backend else (i, a, r) for i, a, r in impls]
    if op in ("linear", "dpo"):
        ok, why = trl_status()
        impls.append((Impl("trl", ("linear", "dpo")), ok, why))
    if op == "logits":
        ok, why = trl_status(module="trl.trainer.utils")
        if ok and quick:
            ok, why = False, ("not in --quick: trl.trainer.utils.selective_log_softmax loops over rows in Python "
                              "(one logsumexp per row); here ~6 s forward + ~6 s backward at N=512, V=32k; it runs "
                              "in the full grid")
        impls.append((Impl("trl", ("logits",)), ok, why))
    if op == "dpo":
        ok, why = liger_status()
        impls.append((Impl("liger", ("dpo",)), ok, why))
    if op in ("linear", "dpo"):
        impls.append((Impl("gemm-limit", ("linear", "dpo"), timing_only=True), True, ""))
    return impls


def _find(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def trl_status(module="trl.kernels"):
    if not _find("trl"):
        return False, "trl is not installed (pip install trl)"
    try:
        mod = importlib.import_module(module)
    except Exception as err:
        return False, f"{module} import failed: {type(err).__name__}: {err}".splitlines()[0]
    if module == "trl.kernels" and not hasattr(mod, "ChunkedLogProbFunction"):
        return False, "this trl has no trl.kernels.ChunkedLogProbFunction (chunked log-prob head; trl >= 1.x)"
    if module == "trl.trainer.utils" and not hasattr(mod, "selective_log_softmax"):
        return False, "this trl has no selective_log_softmax"
    return True, ""


def liger_status():
    if not _find("liger_kernel"):
        return False, "liger-kernel is not installed (pip install liger-kernel)"
    try:
        mod = importlib.import_module("liger_kernel.chunked_loss")
        getattr(mod, "LigerFusedLinearDPOLoss")
    except Exception as err:
        return False, f"LigerFusedLinearDPOLoss import failed: {type(err).__name__}: {err}".splitlines()[0]
    return True, ""


# --------------------------------------------------------------------------------------------------------------
# Step builders. Each returns step() -> (loss, out).


def _eager_token_logps(logits, labels):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def _dpo_loss(pol, ref, pairs):
    diff = BETA * ((pol[:pairs] - ref[:pairs]) - (pol[pairs:] - ref[pairs:]))
    return -torch.nn.functional.logsigmoid(diff).mean()


def build_step(impl: Impl, case: Case, inp: dict):
    op = case.op
    if impl.name == "gemm-limit":
        return _gemm_limit(case, inp)
    if impl.name == "eager":
        return _eager(case, inp)
    if impl.backend is not None:
        return _prefopt(case, inp, impl.backend, impl.logits_cache_mb)
    if impl.name == "trl":
        return _trl(case, inp)
    if impl.name == "liger":
        return _liger(case, inp)
    raise ValueError(f"no implementation {impl.name!r} for op {op!r}")


def _eager(case, inp):
    labels = inp["labels"]
    if case.op == "logits":
        def step():
            logp = _eager_token_logps(inp["logits"], labels)
            loss = (logp * inp["gvec"]).sum() / labels.numel()
            loss.backward()
            return loss, logp.detach()
    elif case.op == "linear":
        def step():
            logp = _eager_token_logps(inp["hidden"] @ inp["weight"].T, labels)
            loss = (logp * inp["gvec"]).sum() / labels.numel()
            loss.backward()
            return loss, logp.detach()
    else:
        mask = labels != IGNORE_INDEX

        def seq_logps(h, w):
            return (_eager_token_logps(h @ w.T, labels) * mask).sum(-1)

        def step():
            pol = seq_logps(inp["hidden"], inp["weight"])
            with torch.no_grad():
                ref = seq_logps(inp["ref_hidden"], inp["ref_weight"])
            loss = _dpo_loss(pol, ref, case.pairs)
            loss.backward()
            return loss, pol.detach()
    return step


def _prefopt(case, inp, backend, logits_cache_mb=None):
    import prefopt
    labels = inp["labels"]
    if case.op == "logits":
        def run():
            logp = prefopt.logprobs_from_logits(inp["logits"], labels)
            loss = (logp * inp["gvec"]).sum() / labels.numel()
            loss.backward()
            return loss, logp.detach()
    elif case.op == "linear":
        def run():
            logp = prefopt.linear_logprobs(inp["hidden"], inp["weight"], labels, logits_cache_mb=logits_cache_mb)
            loss = (logp * inp["gvec"]).sum() / labels.numel()
            loss.backward()
            return loss, logp.detach()
    else:
        fused = getattr(prefopt, "fused_linear_dpo_loss", None)
        if fused is None:
            fused = importlib.import_module("prefopt.fused").fused_linear_dpo_loss

        def run():
            loss, _metrics = fused(inp["hidden"], inp["weight"], labels, ref_hidden=inp["ref_hidden"],
                                   ref_weight=inp["ref_weight"], loss_type="sigmoid", beta=BETA,
                                   logits_cache_mb=logits_cache_mb)
            loss.backward()
            return loss, None

    def step():
        with prefopt.use_backend(backend):
            return run()
    return step


def _trl(case, inp):
    labels = inp["labels"]
    if case.op == "logits":
        from trl.trainer.utils import selective_log_softmax

        def step():
            logp = selective_log_softmax(inp["logits"], labels)
            loss = (logp.float() * inp["gvec"]).sum() / labels.numel()
            loss.backward()
            return loss, logp.detach().float()
        return step
    from trl.kernels import ChunkedLogProbFunction

    def token_logps(h, w, lab):
        flat = h.reshape(-1, h.shape[-1])
        out = ChunkedLogProbFunction.apply(flat, w, None, lab.clamp(min=0).reshape(-1), 1.0, TRL_CHUNK, None, 1.0,
                                           ())
        return out[0].view(lab.shape)

    if case.op == "linear":
        def step():
            logp = token_logps(inp["hidden"], inp["weight"], labels)
            loss = (logp * inp["gvec"]).sum() / labels.numel()
            loss.backward()
            return loss, logp.detach()
        return step
    mask = labels != IGNORE_INDEX

    def step():
        pol = (token_logps(inp["hidden"], inp["weight"], labels) * mask).sum(-1)
        with torch.no_grad():
            ref = (token_logps(inp["ref_hidden"], inp["ref_weight"], labels) * mask).sum(-1)
        loss = _dpo_loss(pol, ref, case.pairs)
        loss.backward()
        return loss, pol.detach()
    return step


def _liger(case, inp):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    compiled = os.environ.get("PREFOPT_BENCH_LIGER_COMPILED", "1") not in ("0", "false", "False")
    loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=BETA, compute_nll_loss=False,
                                      use_ref_model=True, average_log_prob=False, loss_type="sigmoid",
                                      compiled=compiled)

    def step():
        out = loss_fn(inp["weight"], inp["hidden"], inp["labels"], None, inp["ref_hidden"], inp["ref_weight"], None)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        pol = None
        if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], tuple) and len(out[1]) >= 2:
            pol = torch.cat([out[1][0].detach().float(), out[1][1].detach().float()])
        return loss, pol
    return step


def _gemm_limit(case, inp):
    """The GEMMs any logits-computing head must do, alone, on preallocated buffers."""
    hidden = inp["hidden"].detach().reshape(-1, inp["hidden"].shape[-1])
    weight = inp["weight"].detach()
    n, vocab = hidden.shape[0], weight.shape[0]
    tile = torch.empty(n, vocab, dtype=hidden.dtype, device=hidden.device)
    grad_h = torch.empty_like(hidden)
    grad_w = torch.empty_like(weight)
    ref = None
    if case.op == "dpo":
        ref = (inp["ref_hidden"].detach().reshape(-1, hidden.shape[-1]), inp["ref_weight"].detach())

    def step():
        torch.mm(hidden, weight.T, out=tile)          # forward logits
        torch.mm(tile, weight, out=grad_h)            # backward: grad_hidden = G @ W
        torch.mm(tile.T, hidden, out=grad_w)          # backward: grad_weight = G.T @ h
        if ref is not None:
            torch.mm(ref[0], ref[1].T, out=tile)      # reference forward logits
        return None, None
    return step
