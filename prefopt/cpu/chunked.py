"""The fused linear head for CPU backends: tiles of token rows x vocabulary columns.

Each tile is one GEMM (torch/BLAS does that best) into an owned fp32 tile, folded by the row ops of the chosen
backend (torch or C++) into per-token statistics of that vocabulary block; blocks are merged with the online
log-sum-exp rule. The backward recomputes each tile, turns it into the logits gradient *in place* and feeds two
GEMMs. A tile holds about TILE_ELEMENTS values whatever V is, so peak extra memory does not grow with V; tiling
the vocabulary too (not only the tokens) keeps the row count of a tile high at V = 128k-256k, so the weight
gradient is swept a few times instead of once per handful of tokens.

Recomputing every tile costs one logits GEMM more than an eager step that stores its logits. A `TileCache` with a
fixed byte budget keeps the first tiles of the forward (exact copies, so results do not change) for the backward to
use instead of recomputing them: the peak extra memory then grows by at most the budget, whatever V and N are.
"""
from __future__ import annotations

import torch

# The cache budget is settled at the public edge and arrives in bytes (`cache_for`); the names below stay importable
# from here for callers that size a cache themselves (`tile_cache`).
from prefopt._options import CACHE_ENV, DEFAULT_CPU_CACHE_MB  # noqa: F401
from prefopt._types import RowStats
from prefopt._validation import cache_budget_bytes
from prefopt.cpu.rowops_torch import transform_with_slope

TILE_ELEMENTS = 1 << 23  # 8M fp32 = 32 MiB per tile
TARGET_ROWS = 1024       # rows per tile when V is large (vocabulary blocks shrink instead)

# Labels are clamped into each vocabulary block and this ignore_index (never a real label) keeps every row live
# in the row ops; the onehot term of rows whose label lies in another block is then taken back out.
_NO_IGNORE = -(1 << 62)


class TileCache:
    """Forward tiles kept for the backward, keyed by (first row, first column), up to a byte budget.

    The backward takes each tile out as it uses it (it turns the tile into its gradient in place), so a second
    backward through the same graph recomputes instead of reading a consumed tile."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.tiles = {}

    def offer(self, key, tile) -> bool:
        size = tile.numel() * tile.element_size()
        if self.used_bytes + size > self.budget_bytes:
            return False
        self.tiles[key] = tile
        self.used_bytes += size
        return True

    def take(self, key):
        tile = self.tiles.pop(key, None)
        if tile is not None:
            self.used_bytes -= tile.numel() * tile.element_size()
        return tile


def tile_shape(n_rows: int, vocab: int, chunk_size: int | None):
    """(rows, vocabulary columns) of one tile."""
    if chunk_size is not None:
        rows = max(1, int(chunk_size))
    else:
        rows = max(1, min(n_rows, max(TILE_ELEMENTS // max(vocab, 1), TARGET_ROWS)))
    return rows, max(1, min(vocab, TILE_ELEMENTS // rows))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile(hidden_rows, weight, bias):
    """Raw logits of a tile as an owned accumulator-dtype tensor."""
    if bias is None:
        raw = hidden_rows @ weight.T
    else:
        raw = torch.addmm(bias, hidden_rows, weight.T)
    acc = _acc(raw.dtype)
    return raw if raw.dtype == acc else raw.to(acc)


def _blocks(total, step):
    for start in range(0, total, step):
        yield start, min(total, start + step)


def _local_labels(labels, v_start, v_stop):
    """Labels relative to a vocabulary block, clamped into it, and which rows really have theirs there."""
    in_block = (labels >= v_start) & (labels < v_stop)
    return (labels - v_start).clamp_(0, v_stop - v_start - 1), in_block


def _slope(raw, logit_scale, softcap, temperature):
    """dz/draw at the given raw logits (the torch row ops hold the transform and its derivative)."""
    _, slope = transform_with_slope(raw.clone(), logit_scale, softcap, temperature)
    return slope if isinstance(slope, torch.Tensor) else torch.full_like(raw, slope)


def _weighted(part_lse, part_mean_z, lse):
    """exp(part_lse - lse) * part_mean_z, with 0 for a part of weight 0 (an all -inf block: its mean is NaN)."""
    w = (part_lse - lse).exp()
    return torch.where(w == 0, torch.zeros_like(w), w * part_mean_z)


class ChunkedHead:
    """linear_forward / linear_backward (docs/design.md) on top of a row-ops module."""

    def __init__(self, rowops):
        self.rowops = rowops

    @staticmethod
    def cache_for(budget_bytes: int):
        """A TileCache of a settled byte budget for one forward/backward, or None when the budget is 0."""
        assert isinstance(budget_bytes, int) and budget_bytes >= 0, budget_bytes
        return TileCache(budget_bytes) if budget_bytes > 0 else None

    @staticmethod
    def tile_cache(cache_mb=None, device_type="cpu"):
        """`cache_for` with the budget resolved as the public functions do (argument, environment, default)."""
        return ChunkedHead.cache_for(cache_budget_bytes(cache_mb, device_type))

    def linear_forward(self, hidden, weight, bias, labels, logit_scale, softcap, temperature, want_entropy,
                       want_sqsum, chunk_size=None, tile_cache=None):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        rows_step, vocab_step = tile_shape(n_rows, vocab, chunk_size)
        acc = _acc(hidden.dtype)
        logp = torch.empty(n_rows, dtype=acc, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if want_entropy else None
        log_sum_p2 = torch.empty_like(logp) if want_sqsum else None
        for r0, r1 in _blocks(n_rows, rows_step):
            h_rows, lab_rows = hidden[r0:r1], labels[r0:r1]
            run_lse = run_mean_z = run_lse2 = label_logp = label_lse = None
            for v0, v1 in _blocks(vocab, vocab_step):
                local, in_block = _local_labels(lab_rows, v0, v1)
                raw = _tile(h_rows, weight[v0:v1], None if bias is None else bias[v0:v1])
                stats = self.rowops.row_forward(raw, local, _NO_IGNORE, logit_scale, softcap, temperature,
                                                want_entropy, want_sqsum)
                if tile_cache is not None:
                    tile_cache.offer((r0, v0), raw)
                del raw
                if v0 == 0 and v1 == vocab:  # one block: the row ops' statistics are final
                    run_lse, target_logp = stats.lse, stats.logp
                    run_mean_z = None if stats.entropy is None else stats.lse - stats.entropy
                    run_lse2 = None if stats.log_sum_p2 is None else stats.log_sum_p2 + 2 * stats.lse
                    break
                # the label's block: its log p within the block and the block's lse
                label_logp = torch.where(in_block, stats.logp, label_logp if label_logp is not None else stats.logp)
                label_lse = torch.where(in_block, stats.lse, label_lse if label_lse is not None else stats.lse)
                block_mean_z = None if stats.entropy is None else stats.lse - stats.entropy
                block_lse2 = None
                if stats.log_sum_p2 is not None:  # an all -inf block has lse2 = -inf (its log_sum_p2 is NaN)
                    block_lse2 = torch.where(stats.lse == float("-inf"), stats.lse, stats.log_sum_p2 + 2 * stats.lse)
                if run_lse is None:
                    run_lse, run_mean_z, run_lse2 = stats.lse, block_mean_z, block_lse2
                    continue
                merged = torch.logaddexp(run_lse, stats.lse)
                if want_entropy:  # E_p[z] over the union: weights of the two parts are exp(lse_part - lse)
                    run_mean_z = _weighted(run_lse, run_mean_z, merged) + _weighted(stats.lse, block_mean_z, merged)
                if want_sqsum:
                    run_lse2 = torch.logaddexp(run_lse2, block_lse2)
                run_lse = merged
            else:
                # log p = log p_block - (lse - lse_block): <= 0 exactly (lse >= lse_block), where z_label - lse
                # can round above 0. The label's block all -inf (a masked entry): -inf unless the row is.
                target_logp = label_logp - (run_lse - label_lse)
                masked = (label_lse == float("-inf")) & (run_lse > float("-inf"))
                target_logp = torch.where(masked, torch.full_like(target_logp, float("-inf")), target_logp)
            logp[r0:r1] = target_logp
            lse[r0:r1] = run_lse
            if want_entropy:
                entropy[r0:r1] = run_lse - run_mean_z
            if want_sqsum:
                log_sum_p2[r0:r1] = run_lse2 - 2 * run_lse
        return RowStats(logp, lse, entropy, log_sum_p2)

    def linear_backward(self, hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, logit_scale,
                        softcap, temperature, chunk_size=None, needs_input_grad=(True, True, True),
                        tile_cache=None):
        need_h, need_w, need_b = needs_input_grad
        need_b = need_b and bias is not None
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        acc = _acc(hidden.dtype)
        rows_step, vocab_step = tile_shape(n_rows, vocab, chunk_size)
        single_block = vocab_step >= vocab
        # grad_hidden sums over vocabulary blocks: fp32 unless one block writes it whole.
        grad_hidden = None
        if need_h:
            grad_hidden = torch.empty_like(hidden) if single_block else torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
        for r0, r1 in _blocks(n_rows, rows_step):
            rows = slice(r0, r1)
            h_rows = hidden[rows]
            for v0, v1 in _blocks(vocab, vocab_step):
                cols = slice(v0, v1)
                local, in_block = _local_labels(labels[rows], v0, v1)
                tile = None if tile_cache is None else tile_cache.take((r0, v0))
                if tile is None:
                    tile = _tile(h_rows, weight[cols], None if bias is None else bias[cols])
                foreign = None if single_block else (~in_block).nonzero().squeeze(1)
                if foreign is not None and foreign.numel():
                    raw_at_label = tile[foreign, local[foreign]]  # read before the in-place backward
                self.rowops.row_backward(tile, local, lse[rows], None if entropy is None else entropy[rows],
                                         grad_logp[rows], None if grad_entropy is None else grad_entropy[rows],
                                         _NO_IGNORE, logit_scale, softcap, temperature, out=tile)
                if foreign is not None and foreign.numel():
                    # rows whose label is in another block got a onehot term at the clamped column: remove it
                    onehot = grad_logp[rows][foreign].to(acc) * _slope(raw_at_label, logit_scale, softcap,
                                                                       temperature)
                    tile[foreign, local[foreign]] -= onehot
                grad_tile = tile if tile.dtype == hidden.dtype else tile.to(hidden.dtype)
                if need_h:
                    if single_block:
                        torch.matmul(grad_tile, weight, out=grad_hidden[rows])
                    elif grad_tile.dtype == acc:
                        grad_hidden[rows].addmm_(grad_tile, weight[cols])
                    else:
                        grad_hidden[rows] += grad_tile @ weight[cols]
                if need_w:
                    if grad_tile.dtype == acc:
                        grad_weight[cols].addmm_(grad_tile.T, h_rows)
                    else:  # bf16/fp16 GEMM, fp32 accumulation across tiles
                        grad_weight[cols] += grad_tile.T @ h_rows
                if need_b:
                    grad_bias[cols] += tile.sum(0)
                del tile, grad_tile
        if grad_hidden is not None and grad_hidden.dtype != hidden.dtype:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None and grad_bias.dtype != bias.dtype:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias
