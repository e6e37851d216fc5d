"""Triton fused linear head (backend "triton" of linear_logprobs): see docs/design.md, "Fused linear head".

logits = hidden @ weight.T (+ bias) never exist in global memory:

* ``_linear_fwd_kernel``: grid (token blocks, vocab splits). A program owns BLOCK_N tokens and one
  contiguous range of the vocabulary; per BLOCK_V tile it computes the logits with tl.dot over
  BLOCK_K slices of H (fp32 accumulator), adds the bias, applies the logit transform and folds the
  tile into an online log-sum-exp state per row; it also picks z[label] out of the tile. The state
  of each (row, split) goes to a small [5, splits, n] buffer. Splitting the vocabulary keeps the
  GPU full when n is small (n / BLOCK_N programs alone would leave most SMs idle).
* ``_linear_combine_kernel``: merges the split states per row (same ``merge`` as the fold)
  -> logp, lse, entropy, log_sum_p2.
* ``_linear_bwd_kernel``: one program per (token block, vocab block) tile. It recomputes the logits
  tile once, turns it into dlogits in registers (``_fold.dlogits`` times dz/draw), then walks H in
  BLOCK_K slices: grad_hidden[rows, k] += d @ W[cols, k] and grad_weight[cols, k] += d.T @ h[rows, k]
  with fp32 atomic adds (grad_bias[cols] += column sums of d).
  Why atomics and not two kernels: a program's share of grad_hidden is [BLOCK_N, H] and of
  grad_weight [BLOCK_V, H]; for real H (4096+) neither fits in registers, so an atomic-free kernel
  per output would have to recompute the logits tile once per H slice (H / BLOCK_K times the GEMM
  work), or store dlogits ([n, V], which the design forbids). Atomics recompute each tile once;
  the fp32 adds land in L2. Cost: the summation order (last bits) is not deterministic.
  The grid is swizzled in groups of GROUP_N token blocks so tiles sharing W/hidden slices run
  together (L2 reuse).
  Gradient filtering (FILTER, a constexpr: the exact kernel is unchanged without it; docs/design.md,
  "Gradient filtering"): once a program holds its dlogits tile it returns before any atomic when every
  entry is negligible, |d| <= filter_scale * (|g_logp| + |g_ent|) of its row, so the tile's two H-long
  products (nearly all of the backward's work after the recompute) are skipped; it adds 1 to an int64
  counter on the way out (prefopt.filtering.skip_counter). The CPU twin is prefopt/cpu/chunked.py.
  Vocabulary sorting (SORTED, a constexpr: the unsorted kernel is unchanged without it; docs/design.md,
  "Vocabulary sorting"): the tile's vocabulary entries are read from the order vector (int64 [V], from
  prefopt/filtering.py `vocab_order`), so vocab block j is entries order[j * BLOCK_V:(j + 1) * BLOCK_V]: weight
  rows, bias and labels are addressed through them and grad_weight / grad_bias rows are added at them. Entries
  that are negligible for most tokens then share tiles, which FILTER skips whole. The forward needs no order
  (its statistics do not depend on it), so `linear_forward` ignores it. The CPU twin is prefopt/cpu/chunked.py.
Tiles (BLOCK_N, BLOCK_V, BLOCK_K, warps, stages): the per-architecture table of kernels/_head_tiles.py, or with
PREFOPT_TILES=autotune the fastest of its pruned candidates (kernels/_autotune.py); both launchers hand the tuner a
`launch(tile)` closure, and the backward a `reset` for the outputs its trial launches add into.
"""
import torch
import triton
import triton.language as tl

from prefopt._source_tree import require_prefopt_name
from prefopt._types import RowStats

from prefopt.filtering import skip_counter

from . import _autotune, _head_tiles
from ._fold import (dlogits, finish, fold, label_logp, merge, negligible_tile, to_acc, transform, transform_args,
                    transform_params)

require_prefopt_name(__name__)


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (interpreter + bf16 only): the interpreter keeps bf16 as raw uint16 and its
    tl.dot multiplies the integers, so operands go to fp32 first (exact products, fp32 accumulation:
    the tensor-core semantics). Never set on a GPU."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        # out_dtype named: triton < 3.9 defaults it to fp32 whatever acc holds, which fp64 tiles do not compile with
        return tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=acc.dtype)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, USE_FP64: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_V] tile of hidden @ weight.T (+ bias) in the accumulator dtype."""
    ks = tl.arange(0, BLOCK_K)
    h_base = h_ptr + rows[:, None] * stride_h
    w_base = w_ptr + cols[:, None] * stride_w
    acc = to_acc(tl.zeros((BLOCK_N, BLOCK_V), tl.float32), USE_FP64)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        kmask = k < H
        a = tl.load(h_base + k[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_base + k[None, :], mask=col_mask[:, None] & kmask[None, :], other=0.0)
        acc = _dot(a, tl.trans(b), acc, DOT_PREC, UPCAST)
    if HAS_BIAS:
        acc += to_acc(tl.load(b_ptr + cols, mask=col_mask, other=0.0), USE_FP64)[None, :]
    return acc


@triton.jit
def _linear_fwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, part_ptr, N, V, H, stride_h, stride_w, v_per_split,
                       logit_scale: tl.float64, softcap: tl.float64, temperature: tl.float64,
                       HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, USE_FP64: tl.constexpr,
                       DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    scale, cap, inv_temp = transform_params(logit_scale, softcap, temperature, USE_FP64)
    zero = to_acc(tl.zeros((BLOCK_N,), tl.float32), USE_FP64)
    m = zero + float("-inf")
    s = zero
    sz = zero
    s2 = zero
    z_label = zero
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_hi
        acc = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                           HAS_BIAS, USE_FP64, DOT_PREC, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        z, _dz = transform(acc, scale, cap, inv_temp, HAS_SOFTCAP)
        m, s, sz, s2 = fold(m, s, sz, s2, z, col_mask[None, :], 1, True, True)
        hit = (cols[None, :] == labels[:, None]) & col_mask[None, :]
        z_label += tl.sum(tl.where(hit, z, 0.0), axis=1)
    base = part_ptr + pid_s * N + rows
    stride_k = n_splits * N
    tl.store(base, m, mask=row_mask)
    tl.store(base + stride_k, s, mask=row_mask)
    tl.store(base + 2 * stride_k, sz, mask=row_mask)
    tl.store(base + 3 * stride_k, s2, mask=row_mask)
    tl.store(base + 4 * stride_k, z_label, mask=row_mask)


@triton.jit
def _linear_combine_kernel(part_ptr, logp_ptr, lse_ptr, ent_ptr, sq_ptr, N, n_splits, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    stride_k = n_splits * N
    zero = tl.zeros((BLOCK,), part_ptr.dtype.element_ty)
    m = zero + float("-inf")
    s = zero
    sz = zero
    s2 = zero
    z_label = zero
    for i in range(0, n_splits):
        base = part_ptr + i * N + rows
        mb = tl.load(base, mask=mask, other=0.0)
        sb = tl.load(base + stride_k, mask=mask, other=1.0)
        szb = tl.load(base + 2 * stride_k, mask=mask, other=0.0)
        s2b = tl.load(base + 3 * stride_k, mask=mask, other=1.0)
        z_label += tl.load(base + 4 * stride_k, mask=mask, other=0.0)
        m, s, sz, s2 = merge(m, s, sz, s2, mb, sb, szb, s2b)
    lse, ent, sq = finish(m, s, sz, s2)
    tl.store(logp_ptr + rows, label_logp(z_label, m, s), mask=mask)
    tl.store(lse_ptr + rows, lse, mask=mask)
    tl.store(ent_ptr + rows, ent, mask=mask)
    tl.store(sq_ptr + rows, sq, mask=mask)


@triton.jit
def _linear_bwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
                       gh_ptr, gw_ptr, gb_ptr, skipped_ptr, order_ptr, N, V, H, stride_h, stride_w,
                       logit_scale: tl.float64, softcap: tl.float64, temperature: tl.float64, filter_scale,
                       need_gh, need_gw,
                       HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, USE_FP64: tl.constexpr,
                       DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr, FILTER: tl.constexpr,
                       SORTED: tl.constexpr):
    # swizzled tile order: GROUP_N token blocks x all vocab blocks, token index fastest
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    v_blocks = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * v_blocks
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_mask = rows < N
    col_mask = cols < V
    if SORTED:  # the tile's vocabulary entries: positions of the order -> entries (padding lanes stay masked)
        cols = tl.load(order_ptr + cols, mask=col_mask, other=0)
    acc = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                       HAS_BIAS, USE_FP64, DOT_PREC, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
    scale, cap, inv_temp = transform_params(logit_scale, softcap, temperature, USE_FP64)
    z, dz = transform(acc, scale, cap, inv_temp, HAS_SOFTCAP)

    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    lse = to_acc(tl.load(lse_ptr + rows, mask=row_mask, other=0.0), USE_FP64)
    z = tl.where(col_mask[None, :], z, lse[:, None])  # padding lanes: finite p (zeroed below)
    mean_z = lse - to_acc(tl.load(ent_ptr + rows, mask=row_mask, other=0.0), USE_FP64)
    g_logp = to_acc(tl.load(g_logp_ptr + rows, mask=row_mask, other=0.0), USE_FP64)
    g_ent = to_acc(tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0), USE_FP64)
    d = dlogits(z, cols[None, :] == labels[:, None], lse[:, None], mean_z[:, None], g_logp[:, None],
                g_ent[:, None], True) * dz
    # rows without upstream gradient add exactly 0 (p * 0 is NaN on a row holding +inf)
    live = row_mask & ((g_logp != 0.0) | (g_ent != 0.0))
    d = tl.where(live[:, None] & col_mask[None, :], d, 0.0)
    if FILTER:
        if negligible_tile(d, filter_scale * (tl.abs(g_logp) + tl.abs(g_ent))):
            tl.atomic_add(skipped_ptr, 1, sem="relaxed")
            return
    if HAS_BIAS:
        tl.atomic_add(gb_ptr + cols, tl.sum(d, axis=0), mask=col_mask, sem="relaxed")
    d_in = d.to(h_ptr.dtype.element_ty)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        kmask = k < H
        if need_gh:  # uniform runtime branches: same speed as a constexpr, half the variants
            w = tl.load(w_ptr + cols[:, None] * stride_w + k[None, :], mask=col_mask[:, None] & kmask[None, :],
                        other=0.0)
            gh = _dot(d_in, w, tl.zeros((BLOCK_N, BLOCK_K), gh_ptr.dtype.element_ty), DOT_PREC, UPCAST)
            tl.atomic_add(gh_ptr + rows[:, None] * H + k[None, :], gh, mask=row_mask[:, None] & kmask[None, :],
                          sem="relaxed")
        if need_gw:
            h = tl.load(h_ptr + rows[:, None] * stride_h + k[None, :], mask=row_mask[:, None] & kmask[None, :],
                        other=0.0)
            gw = _dot(tl.trans(d_in), h, tl.zeros((BLOCK_V, BLOCK_K), gw_ptr.dtype.element_ty), DOT_PREC, UPCAST)
            tl.atomic_add(gw_ptr + cols[:, None] * H + k[None, :], gw, mask=col_mask[:, None] & kmask[None, :],
                          sem="relaxed")


# ----------------------------------------------------------------------------------------------- launchers

_NUM_SMS = {}
_COMBINE_BLOCK = 256


def _num_sms(device):
    if device.type != "cuda":
        return 132  # interpreter: pretend H100 so the split logic is exercised
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def _config(dtype, backward, arch=_head_tiles.ASSUMED_ARCH):
    """The Tile (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages) of the forward / backward kernel on `arch`
    without autotuning: kernels/_head_tiles.py's table, where each entry's reasons are."""
    return _head_tiles.table_tile(dtype, backward, arch)


def _n_splits(n, V, block_n, block_v, device):
    """Vocabulary splits of the forward: aim for >= 2 programs per SM, never an empty split."""
    n_blocks = triton.cdiv(n, block_n)
    v_blocks = triton.cdiv(V, block_v)
    want = max(1, min(v_blocks, triton.cdiv(2 * _num_sms(device), n_blocks)))
    v_per_split = triton.cdiv(v_blocks, want) * block_v
    return triton.cdiv(V, v_per_split), v_per_split


def _dot_prec(dtype):
    """tl.dot's input_precision: "tf32" where the tile table's math mode is tf32 (fp32 inputs under torch's
    non-"highest" matmul precision: kernels/_head_tiles.py holds that rule), "ieee" otherwise (16-bit inputs
    ignore it)."""
    return "tf32" if _head_tiles.math_mode(dtype) == "tf32" else "ieee"


def _upcast(hidden):
    """Only the interpreter (CPU tensors) needs bf16 dot operands upcast (see ``_dot``)."""
    return hidden.device.type == "cpu" and hidden.dtype == torch.bfloat16


def _rowmajor(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def linear_forward(hidden, weight, bias, labels, logit_scale, softcap, temperature, want_entropy, want_sqsum,
                   chunk_size=None, vocab_order=None):
    # chunk_size is a knob of the CPU chunked head; the Triton path never materialises logits. vocab_order only
    # matters to the backward (the CPU head's forward visits it so its cached tiles line up).
    hidden, weight = _rowmajor(hidden), _rowmajor(weight)
    n, H = hidden.shape
    V = weight.shape[0]
    fp64 = hidden.dtype == torch.float64
    sdt = torch.float64 if fp64 else torch.float32
    dev = hidden.device
    logp, lse, ent, sq = (torch.empty(n, dtype=sdt, device=dev) for _ in range(4))
    if n > 0:
        scale, cap, temp, has_cap = transform_args(logit_scale, softcap, temperature)
        labels = labels.contiguous()
        bias_arg = hidden if bias is None else bias.contiguous()
        flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=has_cap, USE_FP64=fp64, DOT_PREC=_dot_prec(hidden.dtype),
                     UPCAST=_upcast(hidden))

        def launch(tile):
            splits, v_per_split = _n_splits(n, V, tile.block_n, tile.block_v, dev)
            part = torch.empty((5, splits, n), dtype=sdt, device=dev)
            _linear_fwd_kernel[(triton.cdiv(n, tile.block_n), splits)](
                hidden, weight, bias_arg, labels, part, n, V, H, hidden.stride(0), weight.stride(0), v_per_split,
                scale, cap, temp, **flags, **tile.launch_kwargs())
            _linear_combine_kernel[(triton.cdiv(n, _COMBINE_BLOCK),)](
                part, logp, lse, ent, sq, n, splits, BLOCK=_COMBINE_BLOCK, num_warps=4)

        launch(_autotune.choose(tuple(flags.values()), hidden.dtype, False, n, V, H, dev,
                                _head_tiles.device_arch(dev), launch))
    return RowStats(logp, lse, ent if want_entropy else None, sq if want_sqsum else None)


def linear_backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, logit_scale, softcap,
                    temperature, chunk_size=None, filter_eps=None, needs_input_grad=(True, True, True),
                    vocab_order=None):
    hidden, weight = _rowmajor(hidden), _rowmajor(weight)
    n, H = hidden.shape
    V = weight.shape[0]
    need_h, need_w, need_b = (bool(x) for x in tuple(needs_input_grad) + (False,) * (3 - len(needs_input_grad)))
    need_b = need_b and bias is not None
    if not (need_h or need_w or need_b):
        return None, None, None
    fp64 = hidden.dtype == torch.float64
    adt = torch.float64 if fp64 else torch.float32
    dev = hidden.device
    gh = torch.zeros((n, H), dtype=adt, device=dev) if need_h else None
    gw = torch.zeros((V, H), dtype=adt, device=dev) if need_w else None
    # a bias always gets its (cheap: one column sum per tile) gradient; returned only when wanted
    gb = torch.zeros(V, dtype=adt, device=dev) if bias is not None else None
    if n > 0:
        if grad_entropy is None:  # the entropy term is then multiplied by 0 (cheaper than a variant)
            grad_entropy = torch.zeros_like(grad_logp)
            entropy = lse
        else:
            assert entropy is not None, "the Function saves entropy whenever an entropy gradient can come"
        scale, cap, temp, has_cap = transform_args(logit_scale, softcap, temperature)
        dummy = gh if gh is not None else gw if gw is not None else gb
        labels = labels.contiguous()
        # filtering: a negligible entry has |dL/draw| <= filter_eps * |logit_scale| / temperature * (|g_logp| + |g_ent|)
        filtering = filter_eps is not None
        skipped = torch.zeros(1, dtype=torch.int64, device=dev) if filtering else labels  # an unread int64 dummy
        filter_scale = filter_eps * abs(scale) / temp if filtering else 0.0
        sorted_ = vocab_order is not None
        assert not sorted_ or (vocab_order.dtype == torch.int64 and vocab_order.shape == (V,)), vocab_order
        args = (hidden, weight, hidden if bias is None else bias.contiguous(), labels, lse.contiguous(),
                entropy.contiguous(), grad_logp.contiguous(), grad_entropy.contiguous(),
                dummy if gh is None else gh, dummy if gw is None else gw, dummy if gb is None else gb, skipped,
                vocab_order.contiguous() if sorted_ else labels, n, V, H, hidden.stride(0), weight.stride(0), scale,
                cap, temp, filter_scale, int(need_h), int(need_w))
        flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=has_cap, USE_FP64=fp64, DOT_PREC=_dot_prec(hidden.dtype),
                     UPCAST=_upcast(hidden), GROUP_N=8, FILTER=filtering, SORTED=sorted_)

        def grid(tile):
            return (triton.cdiv(n, tile.block_n) * triton.cdiv(V, tile.block_v),)

        def launch(tile):
            _linear_bwd_kernel[grid(tile)](*args, **flags, **tile.launch_kwargs())

        def reset():  # the tuner's trial launches added into the outputs
            for buffer in (gh, gw, gb, skipped if filtering else None):
                if buffer is not None:
                    buffer.zero_()

        tile = _autotune.choose(tuple(flags.values()) + (need_h, need_w), hidden.dtype, True, n, V, H, dev,
                                _head_tiles.device_arch(dev), launch, reset)
        launch(tile)
        if filtering:
            skip_counter.add(skipped, grid(tile)[0])  # stays on the device until read

    def cast(g, like):
        return None if g is None else (g if g.dtype == like.dtype else g.to(like.dtype))

    return cast(gh, hidden), cast(gw, weight), cast(gb, bias) if need_b else None
