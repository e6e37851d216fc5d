"""Row ops (log-softmax statistics + gather, and their gradient) in plain torch: the `torch` backend.

Rows are processed in slices so temporaries stay O(slice x V) even when the caller hands us a huge
[N, V] logits tensor in bf16; nothing here keeps an [N, V] buffer besides the gradient itself.
"""
from __future__ import annotations

import torch

from prefopt._types import RowStats

# Elements per slice: 4M fp32 = 16 MiB of temporaries, a few of them alive at once.
SLICE_ELEMENTS = 1 << 22


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp32/bf16/fp16 inputs; float64 stays float64 so tests can be tight."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _slices(n_rows: int, vocab: int):
    step = max(1, SLICE_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def transform_with_slope(raw, logit_scale, softcap, temperature):
    """Return z and dz/draw (a float, or a tensor when soft-capped). `raw` is an owned acc-dtype tile (modified)."""
    z = raw
    if logit_scale != 1.0:
        z = z.mul_(logit_scale)
    slope = logit_scale / temperature
    if softcap:
        z = z.div_(softcap).tanh_()
        slope = (1.0 - z * z).mul_(slope)
        z = z.mul_(softcap)
    if temperature != 1.0:
        z = z.div_(temperature)
    return z, slope


def _owned_tile(logits, start, stop, acc):
    tile = logits[start:stop]
    # .to() copies only when the dtype changes; a same-dtype slice must be cloned before in-place math.
    return tile.to(acc, copy=True)


def row_forward(logits, labels, ignore_index, logit_scale, softcap, temperature, want_entropy, want_sqsum):
    n_rows, vocab = logits.shape
    acc = acc_dtype(logits.dtype)
    logp = torch.empty(n_rows, dtype=acc, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if want_entropy else None
    log_sum_p2 = torch.empty_like(logp) if want_sqsum else None
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    for start, stop in _slices(n_rows, vocab):
        z, _ = transform_with_slope(_owned_tile(logits, start, stop, acc), logit_scale, softcap, temperature)
        row_lse = torch.logsumexp(z, dim=1)
        lse[start:stop] = row_lse
        target = z.gather(1, safe_labels[start:stop, None]).squeeze(1)
        logp[start:stop] = torch.where(valid[start:stop], target - row_lse, torch.zeros_like(target))
        if want_sqsum:
            log_sum_p2[start:stop] = torch.logsumexp(2.0 * z, dim=1) - 2.0 * row_lse
        if want_entropy:
            z_mean = (torch.softmax(z, dim=1) * z).sum(1)  # E_p[z]
            entropy[start:stop] = row_lse - z_mean
    return RowStats(logp, lse, entropy, log_sum_p2)


def row_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, ignore_index, logit_scale, softcap,
                 temperature, out=None):
    n_rows, vocab = logits.shape
    acc = acc_dtype(logits.dtype)
    if out is None:
        out = torch.empty_like(logits)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    g_logp = torch.where(valid, grad_logp.to(acc), torch.zeros((), dtype=acc, device=logits.device))
    for start, stop in _slices(n_rows, vocab):
        tile = logits[start:stop]
        in_place = out.data_ptr() == logits.data_ptr() and tile.dtype == acc
        owned = tile if in_place else tile.to(acc, copy=True)
        z, slope = transform_with_slope(owned, logit_scale, softcap, temperature)
        g_rows = g_logp[start:stop, None]
        if grad_entropy is not None:
            # dH/dz = -p (z - E_p[z]) with E_p[z] = lse - H, fused into one pass over the tile.
            z_mean = (lse[start:stop] - entropy[start:stop])[:, None]
            g_ent = grad_entropy[start:stop, None].to(acc)
            prob = (z - lse[start:stop, None]).exp()
            z.sub_(z_mean).mul_(g_ent).add_(g_rows).mul_(prob).neg_()
        else:
            z.sub_(lse[start:stop, None]).exp_().mul_(g_rows).neg_()
        grad = z
        grad.scatter_add_(1, safe_labels[start:stop, None], g_rows)
        if not isinstance(slope, float) or slope != 1.0:
            grad.mul_(slope)
        if grad.data_ptr() != out[start:stop].data_ptr():
            out[start:stop] = grad
    return out
