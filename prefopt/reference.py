"""Eager, materialising torch references of the core ops.

Obviously right and memory-hungry: they build the full [tokens, vocab] logits. The tests compare every
backend with these, and the docs point here for the exact semantics. Autograd gives their gradients.
"""
from __future__ import annotations

import torch


def transform_logits(raw: torch.Tensor, *, logit_scale: float = 1.0, softcap: float | None = None,
                     temperature: float = 1.0) -> torch.Tensor:
    """raw head output -> z, in the order HF models apply them (scale, tanh soft-cap, temperature)."""
    z = raw * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def logprobs_from_logits_ref(logits, labels, *, ignore_index=-100, temperature=1.0, softcap=None,
                             logit_scale=1.0, return_entropy=False, return_log_sum_p2=False):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = transform_logits(logits.to(acc), logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    logsm = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    out = [logp]
    if return_entropy:
        # an entry of probability 0 (a -inf logit) adds 0 * log 0 = 0 to the entropy, and 0 to its gradient
        prob = logsm.exp()
        entropy = -(prob * torch.where(prob == 0, torch.zeros_like(logsm), logsm)).sum(-1)
        out.append(torch.where(valid, entropy, torch.zeros_like(entropy)))
    if return_log_sum_p2:
        log_sum_p2 = torch.logsumexp(2 * logsm, dim=-1)
        out.append(torch.where(valid, log_sum_p2, torch.zeros_like(log_sum_p2)))
    return out[0] if len(out) == 1 else tuple(out)


def linear_logprobs_ref(hidden, weight, labels, bias=None, *, ignore_index=-100, temperature=1.0,
                        softcap=None, logit_scale=1.0, return_entropy=False, return_log_sum_p2=False):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logprobs_from_logits_ref(logits, labels, ignore_index=ignore_index, temperature=temperature,
                                    softcap=softcap, logit_scale=logit_scale, return_entropy=return_entropy,
                                    return_log_sum_p2=return_log_sum_p2)


def sequence_logps_ref(token_logps, mask=None, *, cu_seqlens=None, average=False):
    acc = torch.float64 if token_logps.dtype == torch.float64 else torch.float32
    if cu_seqlens is None:
        weights = torch.ones_like(token_logps, dtype=acc) if mask is None else mask.to(acc)
        total = (token_logps.to(acc) * weights).sum(-1)
        counts = (weights != 0).sum(-1).to(acc)
    else:
        values = token_logps.reshape(-1).to(acc)
        weights = torch.ones_like(values) if mask is None else mask.reshape(-1).to(acc)
        bounds = cu_seqlens.tolist()
        total = torch.stack([(values[a:b] * weights[a:b]).sum() for a, b in zip(bounds[:-1], bounds[1:])])
        counts = torch.stack([(weights[a:b] != 0).sum().to(acc) for a, b in zip(bounds[:-1], bounds[1:])])
    if average:
        return torch.where(counts > 0, total / counts.clamp_min(1), torch.zeros_like(total))
    return total
