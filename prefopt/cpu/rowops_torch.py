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


def fold_stats(z):
    """Per-row (m, s, t, s2) of z [n, V]: m = max z and, relative to it, s = sum e, t = sum e * (z - m),
    s2 = sum e^2 with e = exp(z - m); the same state as csrc/prefopt_math.h and kernels/_fold.py.

    Non-finite entries follow the float64 truth (eager log_softmax): -inf entries count 0 (never 0 * -inf), a
    row that is all -inf has s = 0 (its lse -inf, its log-probs NaN), and a row holding +inf or NaN gets s = NaN
    (torch.logsumexp would return lse = +inf there and log-probs of -inf, where the truth is NaN)."""
    m = z.amax(dim=1)  # NaN propagates
    shift = torch.where(m == float("-inf"), torch.zeros((), dtype=z.dtype, device=z.device), m)
    d = z - shift[:, None]
    e = d.exp()
    s = e.sum(1)
    t = torch.where(e == 0, torch.zeros((), dtype=z.dtype, device=z.device), e * d).sum(1)
    s2 = (e * e).sum(1)
    return m, s, t, s2


def mixture_entropy(part_lse, part_entropy, lse):
    """Entropy of a softmax over the union of disjoint parts of the vocabulary (vocabulary blocks, or the shards
    of a vocabulary-parallel group) from each part's lse and entropy: with w_k = exp(lse_k - lse) (summing to 1),
    H = sum_k w_k (H_k - log w_k). Every term is >= 0, so nothing cancels (lse - E_p[z] would lose the digits of a
    large |lse|). A part of weight 0 (all its logits -inf) adds exactly 0; a NaN stays NaN.
    part_lse, part_entropy: [k, n]; lse: [n]."""
    log_w = part_lse - lse
    w = log_w.exp()
    return torch.where(w == 0, torch.zeros((), dtype=w.dtype, device=w.device), w * (part_entropy - log_w)).sum(0)


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
        m, s, t, s2 = fold_stats(z)
        log_s = s.log()
        lse[start:stop] = m + log_s
        target = z.gather(1, safe_labels[start:stop, None]).squeeze(1)
        # (z_label - max) - log s: <= 0 exactly (z_label <= max, s >= 1), where z_label - lse rounds above 0
        # at large |z| (temperature 1e-3). An all -inf row gives -inf - (-inf) = NaN, as log_softmax does.
        logp[start:stop] = torch.where(valid[start:stop], (target - m) - log_s, torch.zeros_like(target))
        if want_sqsum:
            log_sum_p2[start:stop] = s2.log() - 2.0 * log_s
        if want_entropy:
            entropy[start:stop] = log_s - t / s
    return RowStats(logp, lse, entropy, log_sum_p2)


def row_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, ignore_index, logit_scale, softcap,
                 temperature, out=None):
    """A row whose upstream gradients are both 0 (every ignored row) gets an exact 0 gradient whatever its logits
    hold (as the C++ and Triton row ops): nothing it holds reaches an output, and p * 0 would be NaN for a
    non-finite row."""
    n_rows, vocab = logits.shape
    acc = acc_dtype(logits.dtype)
    if out is None:
        out = torch.empty_like(logits)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    zero = torch.zeros((), dtype=acc, device=logits.device)
    g_logp = torch.where(valid, grad_logp.to(acc), zero)
    live = g_logp != 0
    if grad_entropy is not None:
        live = live | (grad_entropy != 0)
    for start, stop in _slices(n_rows, vocab):
        tile = logits[start:stop]
        in_place = out.data_ptr() == logits.data_ptr() and tile.dtype == acc
        owned = tile if in_place else tile.to(acc, copy=True)
        z, slope = transform_with_slope(owned, logit_scale, softcap, temperature)
        g_rows = g_logp[start:stop, None]
        prob = (z - lse[start:stop, None]).exp()
        if grad_entropy is not None:
            # dH/dz = -p (z - E_p[z]) with E_p[z] = lse - H
            z_mean = (lse[start:stop] - entropy[start:stop])[:, None]
            g_ent = grad_entropy[start:stop, None].to(acc)
            z.sub_(z_mean).mul_(g_ent).add_(g_rows)
        else:
            z.copy_(g_rows.expand_as(z))
        # p = 0 (a -inf entry, finite lse) contributes 0: never 0 * -inf. NaN p (non-finite row) stays NaN.
        grad = torch.where(prob == 0, zero, z.mul_(prob)).neg_()
        grad.scatter_add_(1, safe_labels[start:stop, None], g_rows)
        if not isinstance(slope, float) or slope != 1.0:
            grad.mul_(slope)
        grad.masked_fill_(~live[start:stop, None], 0)
        out[start:stop] = grad
    return out


def kept_blocks(grad, threshold, block_rows, block_cols, zero_skipped=False):
    """The gradient filter's test on a tile (docs/design.md, "Gradient filtering"): bool [row blocks, column
    blocks] of `grad` [n, V], blocks of block_rows x block_cols aligned at row 0 and column 0, True where a block
    holds an entry that is not negligible, !(|grad| <= threshold of its row) (NaN included); the ragged last blocks
    hold only the tile's entries. `zero_skipped`: also set every other block to 0, in place. One row block at a time,
    so the temporaries stay one row block's size (the whole tile's abs and bool copies cost as much as the tile's two
    gradient GEMMs on a CPU). The C++ twin is csrc/cpu/filter.cpp (tests/test_filter_cost.py checks them against each
    other)."""
    n_rows, n_cols = grad.shape
    full = n_cols // block_cols
    kept = torch.empty(-(-n_rows // block_rows), -(-n_cols // block_cols), dtype=torch.bool, device=grad.device)
    for i, r0 in enumerate(range(0, n_rows, block_rows)):
        r1 = min(n_rows, r0 + block_rows)
        # 1 where negligible, 0 where not (NaN compares false): a block is kept when its smallest entry is 0
        small = grad[r0:r1].abs().le_(threshold[r0:r1, None])
        if full:
            kept[i, :full] = small[:, :full * block_cols].view(r1 - r0, full, block_cols).amin(dim=(0, 2)) == 0
        if full < kept.shape[1]:
            kept[i, full] = small[:, full * block_cols:].amin() == 0
    if zero_skipped:
        zero_blocks(grad, ~kept, block_rows, block_cols)
    return kept


def zero_blocks(grad, mask, block_rows, block_cols):
    """Set the blocks of `grad` where mask [row blocks, column blocks] is True to 0, in place (the blocks of
    `kept_blocks`; the C++ twin is csrc/cpu/filter.cpp)."""
    n_rows, n_cols = grad.shape
    full = n_cols // block_cols
    on_host, on_device = mask.cpu(), mask.to(grad.device)  # decisions on the host, masks beside the tile
    for i, r0 in enumerate(range(0, n_rows, block_rows)):
        if not bool(on_host[i].any()):
            continue
        rows = grad[r0:r0 + block_rows]
        if full:
            rows[:, :full * block_cols].view(rows.shape[0], full, block_cols).masked_fill_(
                on_device[i, :full, None], 0)
        if full < mask.shape[1] and bool(on_host[i, full]):
            rows[:, full * block_cols:] = 0
