"""Triton row ops (backend "triton" of logprobs_from_logits): see docs/design.md, "Row ops".

One program per row (token); it walks the vocabulary in BLOCK_V tiles with the online
log-sum-exp fold of ``_fold.py``. The backward recomputes p tile by tile and writes the gradient
of the raw logits directly into the output (no [n, V] temporary). Math in fp32 (fp64 for fp64
inputs, which only the interpreter tests use).
"""
import torch
import triton
import triton.language as tl

from prefopt._source_tree import require_prefopt_name
from prefopt._types import RowStats

from ._fold import dlogits, finish, fold, label_logp, to_acc, transform, transform_args, transform_params

require_prefopt_name(__name__)


@triton.jit
def _row_fwd_kernel(logits_ptr, stride_row, labels_ptr, logp_ptr, lse_ptr, ent_ptr, sq_ptr,
                    V, ignore_index, logit_scale: tl.float64, softcap: tl.float64, temperature: tl.float64,
                    HAS_SOFTCAP: tl.constexpr, USE_FP64: tl.constexpr, BLOCK_V: tl.constexpr):
    # entropy and log_sum_p2 are always folded: two FMAs per element in a memory-bound loop cost
    # nothing and halve the number of compiled variants.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    zero = to_acc(tl.zeros((), tl.float32), USE_FP64)
    scale, cap, inv_temp = transform_params(logit_scale, softcap, temperature, USE_FP64)
    m = zero + float("-inf")
    s = zero
    sz = zero
    s2 = zero
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        raw = to_acc(tl.load(base + offs, mask=mask, other=0.0), USE_FP64)
        z, _dz = transform(raw, scale, cap, inv_temp, HAS_SOFTCAP)
        m, s, sz, s2 = fold(m, s, sz, s2, z, mask, 0, True, True)
    lse, ent, sq = finish(m, s, sz, s2)

    label = tl.load(labels_ptr + row)
    valid = (label != ignore_index) & (label >= 0) & (label < V)
    raw_l = to_acc(tl.load(base + tl.where(valid, label, 0)), USE_FP64)
    z_l, _dz_l = transform(raw_l, scale, cap, inv_temp, HAS_SOFTCAP)
    tl.store(logp_ptr + row, tl.where(valid, label_logp(z_l, m, s), 0.0))
    tl.store(lse_ptr + row, lse)
    tl.store(ent_ptr + row, ent)
    tl.store(sq_ptr + row, sq)


@triton.jit
def _row_bwd_kernel(logits_ptr, stride_row, out_ptr, stride_out, labels_ptr, lse_ptr, ent_ptr,
                    g_logp_ptr, g_ent_ptr, V, ignore_index, logit_scale: tl.float64, softcap: tl.float64,
                    temperature: tl.float64,
                    HAS_SOFTCAP: tl.constexpr, HAS_ENT: tl.constexpr, USE_FP64: tl.constexpr,
                    BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    obase = out_ptr + row * stride_out
    cols = tl.arange(0, BLOCK_V)
    zero = to_acc(tl.zeros((), tl.float32), USE_FP64)
    scale, cap, inv_temp = transform_params(logit_scale, softcap, temperature, USE_FP64)

    label = tl.load(labels_ptr + row)
    valid = (label != ignore_index) & (label >= 0) & (label < V)
    lse = to_acc(tl.load(lse_ptr + row), USE_FP64)
    g_logp = tl.where(valid, to_acc(tl.load(g_logp_ptr + row), USE_FP64), 0.0)
    if HAS_ENT:
        mean_z = lse - to_acc(tl.load(ent_ptr + row), USE_FP64)
        g_ent = to_acc(tl.load(g_ent_ptr + row), USE_FP64)
    else:
        mean_z = zero
        g_ent = zero
    # no upstream gradient (every ignored row): exactly 0 whatever the row holds (p * 0 is NaN on a +inf row)
    live = (g_logp != 0.0) | (g_ent != 0.0)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        raw = to_acc(tl.load(base + offs, mask=mask, other=0.0), USE_FP64)
        z, dz = transform(raw, scale, cap, inv_temp, HAS_SOFTCAP)
        z = tl.where(mask, z, lse)  # padding lanes: keep exp finite (they are not stored)
        g = tl.where(live, dlogits(z, offs == label, lse, mean_z, g_logp, g_ent, HAS_ENT) * dz, 0.0)
        tl.store(obase + offs, g.to(out_ptr.dtype.element_ty), mask=mask)


def _config(V):
    """(BLOCK_V, num_warps) of the row kernels.

    The row kernels are memory bound: a program streams its row once (forward) or reads+writes it
    (backward). Large vocabularies use 4096-wide tiles over 16 warps (8 elements = one 16-byte
    vector of 16-bit logits per thread per iteration, ~30-80 registers so many rows are in flight
    per SM); small vocabularies use 1024-wide tiles with 4 warps so a row of a few thousand entries
    is not mostly masked lanes. (4096 x 8 warps made ptxas-blackwell spill 4 bytes in the fp16
    backward for sm_90.) Only these two configurations exist (bench/aot_launches.py compiles both)."""
    if V <= 8192:
        return 1024, 4
    return 4096, 16


def _rows(logits):
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits


def row_forward(logits, labels, ignore_index, logit_scale, softcap, temperature, want_entropy, want_sqsum):
    logits = _rows(logits)
    n, V = logits.shape
    stat_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    dev = logits.device
    logp = torch.empty(n, dtype=stat_dtype, device=dev)
    lse = torch.empty(n, dtype=stat_dtype, device=dev)
    ent = torch.empty(n, dtype=stat_dtype, device=dev)
    sq = torch.empty(n, dtype=stat_dtype, device=dev)
    scale, cap, temp, has_cap = transform_args(logit_scale, softcap, temperature)
    block, warps = _config(V)
    if n > 0:
        _row_fwd_kernel[(n,)](
            logits, logits.stride(0), labels.contiguous(), logp, lse, ent, sq,
            V, int(ignore_index), scale, cap, temp,
            HAS_SOFTCAP=has_cap, USE_FP64=logits.dtype == torch.float64, BLOCK_V=block, num_warps=warps)
    return RowStats(logp, lse, ent if want_entropy else None, sq if want_sqsum else None)


def row_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, ignore_index, logit_scale, softcap,
                 temperature, out=None):
    logits = _rows(logits)
    n, V = logits.shape
    if out is None:
        out = torch.empty_like(logits)
    if n == 0:
        return out
    has_ent = grad_entropy is not None
    assert not has_ent or entropy is not None, "the Function saves entropy whenever an entropy gradient can come"
    scale, cap, temp, has_cap = transform_args(logit_scale, softcap, temperature)
    block, warps = _config(V)
    # out may alias logits: each element is read and then written by the same program and tile.
    _row_bwd_kernel[(n,)](
        logits, logits.stride(0), out, out.stride(0), labels.contiguous(), lse.contiguous(),
        entropy.contiguous() if has_ent else lse, grad_logp.contiguous(),
        grad_entropy.contiguous() if has_ent else grad_logp,
        V, int(ignore_index), scale, cap, temp,
        HAS_SOFTCAP=has_cap, HAS_ENT=has_ent, USE_FP64=logits.dtype == torch.float64,
        BLOCK_V=block, num_warps=warps)
    return out
