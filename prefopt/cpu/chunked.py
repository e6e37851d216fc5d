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

Gradient filtering (`filter_eps`, docs/design.md "Gradient filtering"; the Triton twin is the FILTER branch of
kernels/linear_logprobs.py, tests/test_filtering.py checks the two against each other): the tile still has to be
recomputed and turned into its gradient to know which blocks are negligible, but the two GEMMs then run only over
the vocabulary columns that hold a kept block (gathered when they are not one range); a skipped block among those
columns is zeroed first, so it contributes nothing, as in the Triton head.

Vocabulary sorting (`vocab_order`, docs/design.md "Vocabulary sorting"; the Triton twin is the SORTED branch of the
backward kernel, tests/test_vocab_sorting.py): vocabulary block j holds the entries order[v0:v1], its weight rows
(and bias) gathered per block (one block's copy, never the whole weight) and its weight and bias gradient rows
added back at those entries. The forward visits the same blocks, so its cached tiles are the backward's.
"""
from __future__ import annotations

import torch

# The cache budget is settled at the public edge and arrives in bytes (`cache_for`); the names below stay importable
# from here for callers that size a cache themselves (`tile_cache`).
from prefopt._options import CACHE_ENV, DEFAULT_CPU_CACHE_MB  # noqa: F401
from prefopt._types import RowStats
from prefopt._validation import cache_budget_bytes
from prefopt.cpu.rowops_torch import mixture_entropy, transform_with_slope
from prefopt.filtering import skip_counter

TILE_ELEMENTS = 1 << 23  # 8M fp32 = 32 MiB per tile
TARGET_ROWS = 1024       # rows per tile when V is large (vocabulary blocks shrink instead)
# Filter blocks (rows x vocabulary entries): the Triton backward tile of 16-bit inputs, the dtypes filter_eps="auto"
# filters. The GEMM work saved is per column range of a whole tile (a column of blocks all skipped), so narrow
# columns matter more than short rows.
FILTER_ROWS, FILTER_COLS = 64, 128

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


def _block_rows(weight, bias, order, v0, v1):
    """(weight rows, bias rows | None) of block [v0, v1) of the head's visiting order: views, or one block's gathered
    copy when sorted."""
    if order is None:
        return weight[v0:v1], None if bias is None else bias[v0:v1]
    entries = order[v0:v1]
    return weight.index_select(0, entries), None if bias is None else bias.index_select(0, entries)


def _positions(labels, order):
    """Labels as positions in the visiting order (the identity without one)."""
    if order is None:
        return labels
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return position[labels]


def _local_labels(labels, v_start, v_stop):
    """Labels relative to a vocabulary block, clamped into it, and which rows really have theirs there."""
    in_block = (labels >= v_start) & (labels < v_stop)
    return (labels - v_start).clamp_(0, v_stop - v_start - 1), in_block


def _slope(raw, logit_scale, softcap, temperature):
    """dz/draw at the given raw logits (the torch row ops hold the transform and its derivative)."""
    _, slope = transform_with_slope(raw.clone(), logit_scale, softcap, temperature)
    return slope if isinstance(slope, torch.Tensor) else torch.full_like(raw, slope)


def _kept_blocks(grad_raw, threshold):
    """[row blocks, column blocks] bool of a gradient tile: True where a FILTER_ROWS x FILTER_COLS block holds an
    entry that is not negligible, |dL/draw| <= threshold of its row failing (NaN never is negligible); blocks are
    aligned to the tile's first row and column, the ragged last ones only hold the tile's entries."""
    n_rows, n_cols = grad_raw.shape
    small = grad_raw.abs() <= threshold[:, None]
    row_blocks, col_blocks = -(-n_rows // FILTER_ROWS), -(-n_cols // FILTER_COLS)
    if n_rows % FILTER_ROWS or n_cols % FILTER_COLS:  # entries past the tile are negligible
        padded = small.new_ones(row_blocks * FILTER_ROWS, col_blocks * FILTER_COLS)
        padded[:n_rows, :n_cols] = small
        small = padded
    return ~small.view(row_blocks, FILTER_ROWS, col_blocks, FILTER_COLS).all(3).all(1)


def _filter_tile(grad_raw, threshold):
    """Apply the filter to a gradient tile -> (columns, skipped blocks, blocks). `columns` is None when every block is
    kept (the exact backward's GEMMs), else the int64 columns of the tile that lie in a column of blocks holding a kept
    block: the GEMMs run over those, and the skipped blocks among them are zeroed here, in place."""
    kept = _kept_blocks(grad_raw, threshold)
    n_blocks, n_kept = kept.numel(), int(kept.sum())
    if n_kept == n_blocks:
        return None, 0, n_blocks
    n_rows, n_cols = grad_raw.shape
    kept_cols = kept.any(0)
    if bool((kept_cols & ~kept.all(0)).any()):
        row_blocks, col_blocks = kept.shape
        keep = kept[:, None, :, None].expand(row_blocks, FILTER_ROWS, col_blocks, FILTER_COLS)
        grad_raw.masked_fill_(~keep.reshape(row_blocks * FILTER_ROWS, col_blocks * FILTER_COLS)[:n_rows, :n_cols], 0)
    offsets = torch.arange(FILTER_COLS, device=grad_raw.device)
    columns = (kept_cols.nonzero() * FILTER_COLS + offsets).flatten()
    return columns[columns < n_cols], n_blocks - n_kept, n_blocks


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
                       want_sqsum, chunk_size=None, tile_cache=None, vocab_order=None):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        labels = _positions(labels, vocab_order)
        rows_step, vocab_step = tile_shape(n_rows, vocab, chunk_size)
        acc = _acc(hidden.dtype)
        logp = torch.empty(n_rows, dtype=acc, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if want_entropy else None
        log_sum_p2 = torch.empty_like(logp) if want_sqsum else None
        for r0, r1 in _blocks(n_rows, rows_step):
            h_rows, lab_rows = hidden[r0:r1], labels[r0:r1]
            # The running state is float64: it is merged once per vocabulary block, and float32 merges of lse ~ 35
            # drifted by about 10 ulps over a dozen blocks (the block statistics themselves stay in acc).
            run_lse = run_entropy = run_lse2 = label_logp = label_lse = None
            for v0, v1 in _blocks(vocab, vocab_step):
                local, in_block = _local_labels(lab_rows, v0, v1)
                w_block, b_block = _block_rows(weight, bias, vocab_order, v0, v1)
                raw = _tile(h_rows, w_block, b_block)
                del w_block, b_block
                stats = self.rowops.row_forward(raw, local, _NO_IGNORE, logit_scale, softcap, temperature,
                                                want_entropy, want_sqsum)
                if tile_cache is not None:
                    tile_cache.offer((r0, v0), raw)
                del raw
                if v0 == 0 and v1 == vocab:  # one block: the row ops' statistics are final
                    run_lse, target_logp, run_entropy = stats.lse, stats.logp, stats.entropy
                    run_lse2 = None if stats.log_sum_p2 is None else stats.log_sum_p2 + 2 * stats.lse
                    break
                stats = RowStats(*(None if t is None else t.double() for t in stats))
                # the label's block: its log p within the block and the block's lse
                label_logp = torch.where(in_block, stats.logp, label_logp if label_logp is not None else stats.logp)
                label_lse = torch.where(in_block, stats.lse, label_lse if label_lse is not None else stats.lse)
                block_lse2 = None
                if stats.log_sum_p2 is not None:  # an all -inf block has lse2 = -inf (its log_sum_p2 is NaN)
                    block_lse2 = torch.where(stats.lse == float("-inf"), stats.lse, stats.log_sum_p2 + 2 * stats.lse)
                if run_lse is None:
                    run_lse, run_entropy, run_lse2 = stats.lse, stats.entropy, block_lse2
                    continue
                merged = torch.logaddexp(run_lse, stats.lse)
                if want_entropy:
                    run_entropy = mixture_entropy(torch.stack([run_lse, stats.lse]),
                                                  torch.stack([run_entropy, stats.entropy]), merged)
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
                entropy[r0:r1] = run_entropy
            if want_sqsum:
                log_sum_p2[r0:r1] = run_lse2 - 2 * run_lse
        return RowStats(logp, lse, entropy, log_sum_p2)

    def linear_backward(self, hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, logit_scale,
                        softcap, temperature, chunk_size=None, filter_eps=None, needs_input_grad=(True, True, True),
                        tile_cache=None, vocab_order=None):
        need_h, need_w, need_b = needs_input_grad
        need_b = need_b and bias is not None
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        acc = _acc(hidden.dtype)
        rows_step, vocab_step = tile_shape(n_rows, vocab, chunk_size)
        labels = _positions(labels, vocab_order)
        # one vocabulary block writes grad_hidden whole, unless filtering may leave some of its columns out
        write_whole = vocab_step >= vocab and filter_eps is None
        single_block = vocab_step >= vocab
        # grad_hidden sums over vocabulary blocks: fp32 unless one block writes it whole.
        grad_hidden = None
        if need_h:
            grad_hidden = (torch.empty_like(hidden) if write_whole else
                           torch.zeros(hidden.shape, dtype=acc, device=hidden.device))
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
        threshold = None
        if filter_eps is not None:  # docs/design.md "Gradient filtering": |dL/draw| <= eps * s * G_i is negligible
            scale = filter_eps * abs(logit_scale) / temperature
            upstream = grad_logp.to(acc).abs()
            if grad_entropy is not None:
                upstream += grad_entropy.to(acc).abs()
            threshold = upstream.mul_(scale)
            skipped_blocks = total_blocks = 0
        for r0, r1 in _blocks(n_rows, rows_step):
            rows = slice(r0, r1)
            h_rows = hidden[rows]
            for v0, v1 in _blocks(vocab, vocab_step):
                local, in_block = _local_labels(labels[rows], v0, v1)
                entries = slice(v0, v1) if vocab_order is None else vocab_order[v0:v1]
                tile = None if tile_cache is None else tile_cache.take((r0, v0))
                w_block = None  # the block's weight rows, when they had to be gathered for the recompute
                if tile is None:
                    w_block, b_block = _block_rows(weight, bias, vocab_order, v0, v1)
                    tile = _tile(h_rows, w_block, b_block)
                    del b_block
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
                kept = None
                if threshold is not None:
                    kept, skipped, blocks = _filter_tile(tile, threshold[rows])
                    skipped_blocks += skipped
                    total_blocks += blocks
                # where: the vocabulary entries (weight rows) of the GEMMs' columns, a slice or int64 indices
                if kept is None:  # the whole tile
                    part, where = tile, entries
                elif kept.numel() == 0:
                    del tile, w_block
                    continue
                elif int(kept[-1] - kept[0]) + 1 == kept.numel():  # one column range: views, no copy
                    c0, c1 = int(kept[0]), int(kept[-1]) + 1
                    part = tile[:, c0:c1]
                    where = slice(v0 + c0, v0 + c1) if vocab_order is None else entries[c0:c1]
                else:  # scattered kept columns: gather them (a copy of 1/rows of the GEMMs' work) for one GEMM pair
                    part = tile.index_select(1, kept)
                    where = kept + v0 if vocab_order is None else entries[kept]
                if kept is None and w_block is not None:
                    w_part = w_block
                else:  # sorted: only the kept entries' rows are gathered
                    w_part = weight[where] if isinstance(where, slice) else weight.index_select(0, where)
                grad_part = part if part.dtype == hidden.dtype else part.to(hidden.dtype)
                if need_h:
                    if write_whole:
                        torch.matmul(grad_part, w_part, out=grad_hidden[rows])
                    elif grad_part.dtype == acc:
                        grad_hidden[rows].addmm_(grad_part, w_part)
                    else:
                        grad_hidden[rows] += grad_part @ w_part
                if need_w:
                    if isinstance(where, torch.Tensor):
                        grad_weight.index_add_(0, where, (grad_part.T @ h_rows).to(acc))
                    elif grad_part.dtype == acc:
                        grad_weight[where].addmm_(grad_part.T, h_rows)
                    else:  # bf16/fp16 GEMM, fp32 accumulation across tiles
                        grad_weight[where] += grad_part.T @ h_rows
                if need_b:
                    if isinstance(where, torch.Tensor):
                        grad_bias.index_add_(0, where, part.sum(0))
                    else:
                        grad_bias[where] += part.sum(0)
                del part, grad_part, w_part, w_block
                del tile
        if threshold is not None:
            skip_counter.add(skipped_blocks, total_blocks)
        if grad_hidden is not None and grad_hidden.dtype != hidden.dtype:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None and grad_bias.dtype != bias.dtype:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias
