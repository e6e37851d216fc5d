"""Benchmark inputs: "uniform" random and "lm"-like (calibrated to a trained LM's 1-3 nats per token).

Both kinds are built deterministically from a seed, so every implementation of a case (each in its own
subprocess) sees bit-identical tensors.

uniform  hidden ~ N(0, 1), weight ~ N(0, 1/H): logits ~ N(0, 1), near-uniform softmax (entropy ~ ln V - 0.5),
         labels uniform over the vocabulary.
lm       hidden_i = a_i * weight[label_i] + sigma * g_i with g_i ~ N(0, I), a_i = a * u_i, u_i ~ U(0.5, 1.5):
         the label logit stands out by ~a_i over a N(0, sigma^2 + a_i^2/H) background, as in a trained LM whose
         hidden state points at the next token, with a spread of confident and unsure tokens. `a` is
         calibrated (bisection on synthetic logits of the same distribution) so the mean per-token entropy is
         LM_TARGET_ENTROPY nats; the entropy of the actual inputs is measured and reported per case.
For the logits-only op the same distributions are drawn directly as [N, V] logits.
"""
from __future__ import annotations

import functools
import math

import torch

LM_SIGMA = 2.0              # background logit std of the lm kind (heavy-ish tail over the vocabulary)
LM_TARGET_ENTROPY = 2.0     # nats, middle of the 1-3 nats of trained LMs
REF_NOISE = 0.05            # live reference = policy + this much noise (hidden), so the DPO margins are small
IGNORE_INDEX = -100

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def dtype_of(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPES))}") from None


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@functools.lru_cache(maxsize=None)
def calibrate_lm(vocab: int, hidden: int = 0, target: float = LM_TARGET_ENTROPY) -> float:
    """Amplitude `a` of the lm kind giving mean per-token entropy `target` nats.

    Closed form per token (large V, law of large numbers over the background): the V-1 background logits
    ~ N(0, s^2) have sum exp = S ~ V e^{s^2/2} and sum z e^z ~ s^2 S; the label logit is t = a u + sigma n.
    With Z = e^t + S and p = e^t / Z: H = -p log p - (1 - p)(s^2 - log Z). Averaged over quantiles of u and
    n, then bisection on a (deterministic, no V-sized sampling).
    """
    q = (torch.arange(64, dtype=torch.float64) + 0.5) / 64
    u = 0.5 + q                                                   # U(0.5, 1.5) quantiles
    n = torch.erfinv(2 * q - 1) * math.sqrt(2)                    # N(0, 1) quantiles
    u, n = u[:, None], n[None, :]

    def mean_entropy(a):
        amp = a * u
        s2 = LM_SIGMA ** 2 + amp ** 2 / max(hidden, 1) if hidden else torch.full_like(amp, LM_SIGMA ** 2)
        log_s = math.log(vocab - 1) + s2 / 2
        t = amp + LM_SIGMA * n
        log_z = torch.logaddexp(t, log_s)
        log_p = t - log_z
        p = log_p.exp()
        return (-(p * log_p) - (1 - p) * (s2 - log_z)).mean().item()

    lo, hi = 0.0, 4.0 * math.log(vocab) + 4 * LM_SIGMA ** 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if mean_entropy(mid) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def measured_entropy(inputs: dict, max_tokens: int = 256) -> float:
    """Mean per-token entropy (nats) of the (policy) logits of built inputs, over the first tokens."""
    if "logits" in inputs:
        logits = inputs["logits"].detach().reshape(-1, inputs["logits"].shape[-1])[:max_tokens]
        return _entropy(logits).mean().item()
    hidden = inputs["hidden"].detach()
    hidden = hidden.reshape(-1, hidden.shape[-1])[:max_tokens]
    with torch.no_grad():
        return _entropy(hidden.float() @ inputs["weight"].detach().float().T).mean().item()


def build(case, device="cpu", seed: int = 0) -> dict:
    """Tensors of one case. Leaves that get gradients have requires_grad set.

    logits: {logits [N, V], labels [N], gvec [N]}            (loss = sum(logp * gvec) / N)
    linear: {hidden [N, H], weight [V, H], labels [N], gvec [N]}
    dpo:    {hidden [2P, T, H], weight, ref_hidden, ref_weight, labels [2P, T]}
    """
    dtype = dtype_of(case.dtype)
    gen = torch.Generator().manual_seed(seed)
    n, vocab, hid = case.tokens, case.vocab, case.hidden
    lm = case.kind == "lm"
    if case.kind not in ("lm", "uniform"):
        raise ValueError(f"unknown input kind {case.kind!r} (uniform | lm)")
    a = calibrate_lm(vocab, hid if case.op != "logits" else 0) if lm else 0.0
    labels = torch.randint(0, vocab, (n,), generator=gen)
    out = {}
    if case.op == "logits":
        if lm:
            u = torch.rand(n, generator=gen) + 0.5
            logits = torch.randn(n, vocab, generator=gen).mul_(LM_SIGMA)
            logits[torch.arange(n), labels] += a * u
        else:
            logits = torch.randn(n, vocab, generator=gen)
        out["logits"] = logits.to(device=device, dtype=dtype).requires_grad_(True)
        del logits
    else:
        weight = torch.randn(vocab, hid, generator=gen).mul_(1.0 / math.sqrt(hid))
        if lm:
            u = torch.rand(n, 1, generator=gen) + 0.5
            hidden = torch.randn(n, hid, generator=gen).mul_(LM_SIGMA).add_(weight[labels] * (a * u))
        else:
            hidden = torch.randn(n, hid, generator=gen)
        if case.op == "dpo":
            ref_hidden = hidden + REF_NOISE * torch.randn(n, hid, generator=gen)
            ref_weight = weight + (REF_NOISE / math.sqrt(hid)) * torch.randn(vocab, hid, generator=gen)
            shape = (2 * case.pairs, case.seq)
            out["ref_hidden"] = ref_hidden.reshape(*shape, hid).to(device=device, dtype=dtype)
            out["ref_weight"] = ref_weight.to(device=device, dtype=dtype)
            del ref_hidden, ref_weight
            hidden = hidden.reshape(*shape, hid)
            labels = labels.reshape(shape)
        out["hidden"] = hidden.to(device=device, dtype=dtype).requires_grad_(True)
        out["weight"] = weight.to(device=device, dtype=dtype).requires_grad_(True)
        del hidden, weight
    out["labels"] = labels.to(device)
    if case.op != "dpo":
        out["gvec"] = torch.randn(n, generator=gen).to(device)
    return out


def shrink(inp: dict, case, small) -> dict:
    """Inputs of `small` (a case with fewer tokens) as slices of already built `inp`: the weights are shared
    (not copied), the token tensors are copied leaves. Used for cheap warm-up steps."""
    out = {}
    for key, t in inp.items():
        if key in ("weight", "ref_weight"):
            out[key] = t
        elif case.op == "dpo":
            out[key] = t.detach()[:, :small.seq].clone()
        else:
            out[key] = t.detach()[:small.tokens].clone()
        if key in ("hidden", "logits"):
            out[key].requires_grad_(True)
    return out


def input_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def grad_bytes(inputs: dict) -> int:
    """Bytes of the gradients a training step must produce (hidden/weight/logits), any implementation."""
    return sum(t.numel() * t.element_size() for t in inputs.values()
               if isinstance(t, torch.Tensor) and t.requires_grad)
