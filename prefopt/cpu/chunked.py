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
recomputed and turned into its gradient to know which blocks are negligible; the test (the row ops' `kept_blocks`,
C++ for cpp) zeroes the skipped blocks as it finds them, so they contribute nothing, as in the Triton head, whatever
the GEMMs then cover. `_filtered_groups` picks those GEMMs by estimated cost: the whole tile, the columns holding a
kept block (views or gathered), or each row block's own kept blocks; the whole tile is always a candidate, so a
filtered backward costs at most its test more than the exact one (tests/test_filter_cost.py, docs/bench.md).

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
from prefopt.cost_model import ROW_BLOCK_GEMM, filter_copy_macs
from prefopt._validation import cache_budget_bytes
from prefopt.cpu import rowops_torch
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


class _Scratch:
    """Buffers a head call reuses from tile to tile (the sorted head's gathered weight rows, its weight-gradient
    products): a fresh 16 MiB tensor per tile cost ~8 ms of page faults here, a fifth of the GEMM it fed. Each buffer
    is as big as the largest use, which the call's transient tensor was anyway, so the peak does not grow."""

    def __init__(self):
        self.buffers = {}

    def get(self, key, rows, like_rows):
        """A [rows, *like_rows.shape[1:]] tensor of like_rows' dtype and device (contents undefined)."""
        shape = (rows,) + tuple(like_rows.shape[1:])
        held = self.buffers.get(key)
        if held is None or held.shape[0] < rows or held.dtype != like_rows.dtype or held.shape[1:] != shape[1:]:
            held = self.buffers[key] = like_rows.new_empty(shape)
        return held[:rows]


def _block_rows(weight, bias, order, v0, v1, scratch=None):
    """(weight rows, bias rows | None) of block [v0, v1) of the head's visiting order: views, or one block's gathered
    copy when sorted (into `scratch` when given)."""
    if order is None:
        return weight[v0:v1], None if bias is None else bias[v0:v1]
    entries = order[v0:v1]
    rows = (weight.index_select(0, entries) if scratch is None else
            torch.index_select(weight, 0, entries, out=scratch.get("weight rows", v1 - v0, weight)))
    return rows, None if bias is None else bias.index_select(0, entries)


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


def _filtered_groups(kept, n_rows, n_cols, hidden_size, products, sorted_, device_type="cpu"):
    """How a filtered tile's gradient GEMMs run (docs/design.md, "Gradient filtering"), chosen by an estimate of
    their cost in multiply-adds (prefopt/cost_model.py `filter_copy_macs` prices a copied element):
      whole tile   the exact backward's GEMMs, every skipped block zeroed first;
      columns      the columns of the blocks kept in any row block: one range is views of the tile and the weight,
                   scattered ones are gathered (tile columns, weight rows, the weight gradient's index_add);
      row blocks   each FILTER_ROWS row block over its own kept blocks, gathered: only kept blocks are multiplied,
                   which pays when each row block keeps few blocks but together they touch most columns.
    The whole tile is always a candidate, so a filtered backward costs at most its filter test (which zeroes the
    skipped blocks) more than the exact one. -> [(tile rows, column blocks | None for all)] per GEMM pair."""
    row_blocks, col_blocks = kept.shape
    kept = kept.cpu()
    width = torch.full((col_blocks,), FILTER_COLS, dtype=torch.float64, device="cpu")
    width[-1] = n_cols - (col_blocks - 1) * FILTER_COLS
    row_sizes = [min(FILTER_ROWS, n_rows - i * FILTER_ROWS) for i in range(row_blocks)]
    copy = filter_copy_macs(device_type, torch.get_num_threads())  # the tile's device, not the mask's
    gemm = products * hidden_size  # multiply-adds of one row x column of the gradient products
    index_rows = copy * 3 * hidden_size  # a gathered weight row, and its gradient row index_add-ed back

    def cost(rows, blocks, cols, short=1.0):
        """GEMMs of `rows` rows over the `cols` columns of `blocks` (x `short` for a row block's short GEMMs), with
        their copies"""
        one_range = blocks.numel() == 0 or int(blocks[-1] - blocks[0]) + 1 == blocks.numel()
        copies = (0 if one_range else copy * rows) + (index_rows if sorted_ or not one_range else 0)
        return cols * (short * gemm * rows + copies)

    whole = n_cols * (gemm * n_rows + (copy * 2 * hidden_size if sorted_ else 0))
    any_kept = kept.any(0)
    blocks = any_kept.nonzero().squeeze(1)
    columns = cost(n_rows, blocks, float(width[any_kept].sum()))
    per_block = [kept[i].nonzero().squeeze(1) for i in range(row_blocks)]
    by_row_block = sum(cost(row_sizes[i], b, float(width[kept[i]].sum()), ROW_BLOCK_GEMM)
                       for i, b in enumerate(per_block) if b.numel())
    best = min(whole, columns, by_row_block)
    if best == whole:
        return [(slice(None), None)]
    if best == columns:
        return [(slice(None), blocks)] if blocks.numel() else []
    return [(slice(i * FILTER_ROWS, i * FILTER_ROWS + row_sizes[i]), b) for i, b in enumerate(per_block) if b.numel()]


def _block_columns(blocks, n_cols):
    """int64 columns of a tile that lie in the given column blocks (the ragged last block holds fewer)."""
    columns = (blocks[:, None] * FILTER_COLS + torch.arange(FILTER_COLS, device=blocks.device)).flatten()
    return columns[columns < n_cols]


def _gather_column_blocks(tile, blocks):
    """tile[:, columns of `blocks`] as a new tensor: whole FILTER_COLS-wide runs copied at once (a per-column
    index_select along a row-major tile copied 10-20x slower here, which ate the GEMM work it saved)."""
    n_rows, n_cols = tile.shape
    full = n_cols // FILTER_COLS
    ragged = int(blocks[-1]) >= full  # the last, narrower block is among them
    whole = blocks[:-1] if ragged else blocks
    part = tile[:, :full * FILTER_COLS].view(n_rows, full, FILTER_COLS).index_select(1, whole).view(n_rows, -1)
    return torch.cat([part, tile[:, full * FILTER_COLS:]], 1) if ragged else part


class ChunkedHead:
    """linear_forward / linear_backward (docs/design.md) on top of a row-ops module."""

    def __init__(self, rowops):
        self.rowops = rowops
        # the filter's test: the row-op module's own (C++ for cpp), else the torch twin (the Triton row ops on CUDA
        # tensors, where torch's elementwise kernels are as good)
        self.kept_blocks = getattr(rowops, "kept_blocks", rowops_torch.kept_blocks)

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
        scratch = _Scratch()
        for r0, r1 in _blocks(n_rows, rows_step):
            h_rows, lab_rows = hidden[r0:r1], labels[r0:r1]
            # The running state is float64: it is merged once per vocabulary block, and float32 merges of lse ~ 35
            # drifted by about 10 ulps over a dozen blocks (the block statistics themselves stay in acc).
            run_lse = run_entropy = run_lse2 = label_logp = label_lse = None
            for v0, v1 in _blocks(vocab, vocab_step):
                local, in_block = _local_labels(lab_rows, v0, v1)
                w_block, b_block = _block_rows(weight, bias, vocab_order, v0, v1, scratch)
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
        scratch = _Scratch()
        for r0, r1 in _blocks(n_rows, rows_step):
            rows = slice(r0, r1)
            h_rows = hidden[rows]
            for v0, v1 in _blocks(vocab, vocab_step):
                local, in_block = _local_labels(labels[rows], v0, v1)
                entries = slice(v0, v1) if vocab_order is None else vocab_order[v0:v1]
                tile = None if tile_cache is None else tile_cache.take((r0, v0))
                w_block = None  # the block's weight rows, when they had to be gathered for the recompute
                if tile is None:
                    w_block, b_block = _block_rows(weight, bias, vocab_order, v0, v1, scratch)
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
                groups = [(slice(None), None)]  # (rows of the tile, its column blocks | None for all) per GEMM pair
                if threshold is not None:
                    # skipped blocks are zeroed as they are found (whichever GEMMs run, they add nothing); the
                    # layout is decided on the host: one copy of a small mask (a no-op for CPU tiles)
                    kept = self.kept_blocks(tile, threshold[rows], FILTER_ROWS, FILTER_COLS, zero_skipped=True).cpu()
                    skipped = kept.numel() - int(kept.sum())
                    skipped_blocks += skipped
                    total_blocks += kept.numel()
                    if skipped:
                        groups = _filtered_groups(kept, r1 - r0, v1 - v0, hidden.shape[1], int(need_h) + int(need_w),
                                                  vocab_order is not None, tile.device.type)
                for tile_rows, blocks in groups:
                    # part: the group's gradient columns; where: their vocabulary entries (weight rows), a slice or
                    # int64 indices; w_part: those weight rows
                    all_rows = tile_rows == slice(None)  # no view ops then: the exact path issues what it did
                    sub = tile if all_rows else tile[tile_rows]
                    if blocks is None:  # every column
                        part, where = sub, entries
                        w_part = w_block if w_block is not None else (
                            weight[where] if isinstance(where, slice) else
                            torch.index_select(weight, 0, where, out=scratch.get("kept rows", v1 - v0, weight)))
                    else:
                        if int(blocks[-1] - blocks[0]) + 1 == blocks.numel():  # one range: views, no copy
                            c0, c1 = int(blocks[0]) * FILTER_COLS, min(v1 - v0, (int(blocks[-1]) + 1) * FILTER_COLS)
                            part, columns = sub[:, c0:c1], slice(c0, c1)
                        else:
                            blocks = blocks.to(tile.device)
                            part = _gather_column_blocks(sub, blocks)
                            columns = _block_columns(blocks, v1 - v0)
                        if vocab_order is None:
                            where = (slice(v0 + columns.start, v0 + columns.stop) if isinstance(columns, slice)
                                     else columns + v0)
                        else:
                            where = entries[columns]
                        if w_block is not None and isinstance(columns, slice):
                            w_part = w_block[columns]
                        elif isinstance(where, slice):
                            w_part = weight[where]
                        else:  # only the rows of the group's columns, from the block's own copy when there is one
                            source, at = (weight, where) if w_block is None else (w_block, columns)
                            w_part = torch.index_select(source, 0, at, out=scratch.get("kept rows", len(where), weight))
                    h_part = h_rows if all_rows else h_rows[tile_rows]
                    grad_part = part if part.dtype == hidden.dtype else part.to(hidden.dtype)
                    if need_h:
                        out_rows = grad_hidden[rows] if all_rows else grad_hidden[rows][tile_rows]
                        if write_whole:
                            torch.matmul(grad_part, w_part, out=out_rows)
                        elif grad_part.dtype == acc:
                            out_rows.addmm_(grad_part, w_part)
                        else:
                            out_rows += grad_part @ w_part
                    if need_w:
                        if isinstance(where, torch.Tensor):
                            if grad_part.dtype == acc:
                                product = torch.mm(grad_part.T, h_part,
                                                   out=scratch.get("weight grad", len(where), h_rows))
                            else:
                                product = (grad_part.T @ h_part).to(acc)
                            grad_weight.index_add_(0, where, product)
                        elif grad_part.dtype == acc:
                            grad_weight[where].addmm_(grad_part.T, h_part)
                        else:  # bf16/fp16 GEMM, fp32 accumulation across tiles
                            grad_weight[where] += grad_part.T @ h_part
                    if need_b:
                        if isinstance(where, torch.Tensor):
                            grad_bias.index_add_(0, where, part.sum(0))
                        else:
                            grad_bias[where] += part.sum(0)
                    del part, grad_part, w_part, sub
                del w_block
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
