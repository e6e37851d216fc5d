"""Triton segment sums (backend "triton" of the masked per-sequence sums): see docs/design.md.

One program per segment [cu_seqlens[s], cu_seqlens[s+1]); it walks its tokens in BLOCK tiles.
Forward: out = sum(v * w) (/ count when averaging; 0 for an empty / fully masked segment),
count = #tokens with w != 0. Backward: grad_v = grad_out[s] * w (/ count), 0 where count == 0.
The forward accumulates in float64 for every input dtype and rounds once on the store: a float32 sum of 131072
log-probs around -10 is then within one float32 spacing of the exact sum (a float32 accumulator is off by
0.04 nats there). The sums run over tokens, not the vocabulary, so the float64 adds cost nothing next to the
head. A token with weight 0 is left out (tl.where), not multiplied by 0, so -inf / NaN at masked positions never
reach the sum. Torch twin: prefopt/cpu/segment_torch.py.
"""
import torch
import triton
import triton.language as tl

from ._fold import to_acc

from prefopt._source_tree import require_prefopt_name

require_prefopt_name(__name__)


@triton.jit
def _segment_fwd_kernel(v_ptr, w_ptr, cu_ptr, out_ptr, cnt_ptr,
                        HAS_W: tl.constexpr, AVERAGE: tl.constexpr, BLOCK: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(cu_ptr + seg)
    end = tl.load(cu_ptr + seg + 1)
    offs0 = tl.arange(0, BLOCK)
    zero = tl.zeros((BLOCK,), tl.float64)
    acc = zero
    cnt = zero
    for i in range(0, tl.cdiv(end - start, BLOCK)):
        offs = start + i * BLOCK + offs0
        mask = offs < end
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        if HAS_W:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float64)
            acc += tl.where(w != 0, v * w, 0.0)
            cnt += tl.where(w != 0, 1.0, 0.0)
        else:
            acc += v
            cnt += tl.where(mask, 1.0, 0.0)
    total = tl.sum(acc, axis=0)
    count = tl.sum(cnt, axis=0)
    if AVERAGE:
        total = tl.where(count > 0, total / tl.maximum(count, 1.0), 0.0)
    tl.store(out_ptr + seg, total.to(out_ptr.dtype.element_ty))
    tl.store(cnt_ptr + seg, count.to(cnt_ptr.dtype.element_ty))


@triton.jit
def _segment_bwd_kernel(g_ptr, w_ptr, cu_ptr, cnt_ptr, gv_ptr,
                        HAS_W: tl.constexpr, AVERAGE: tl.constexpr, USE_FP64: tl.constexpr,
                        BLOCK: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(cu_ptr + seg)
    end = tl.load(cu_ptr + seg + 1)
    offs0 = tl.arange(0, BLOCK)
    g = to_acc(tl.load(g_ptr + seg), USE_FP64)
    if AVERAGE:
        count = to_acc(tl.load(cnt_ptr + seg), USE_FP64)
        g = tl.where(count > 0, g / tl.maximum(count, 1.0), 0.0)
    for i in range(0, tl.cdiv(end - start, BLOCK)):
        offs = start + i * BLOCK + offs0
        mask = offs < end
        if HAS_W:
            gv = g * to_acc(tl.load(w_ptr + offs, mask=mask, other=0.0), USE_FP64)
        else:
            gv = tl.zeros((BLOCK,), g.dtype) + g
        tl.store(gv_ptr + offs, gv.to(gv_ptr.dtype.element_ty), mask=mask)


def _config(n_tokens, n_segments):
    """(BLOCK, num_warps): tiles sized from the mean segment length (no device sync to read the max).

    Segments are a few hundred to tens of thousands of tokens; 1024-token tiles with 4 warps
    (8 values/thread) for long ones, 256 with 2 warps for short ones."""
    mean_len = n_tokens // max(n_segments, 1)
    if mean_len >= 512:
        return 1024, 4
    return 256, 2


def segment_forward(values, weights, cu_seqlens, average):
    values = values.contiguous()
    S = cu_seqlens.numel() - 1
    dt = torch.float64 if values.dtype == torch.float64 else torch.float32
    out = torch.empty(S, dtype=dt, device=values.device)
    counts = torch.empty(S, dtype=dt, device=values.device)
    if S == 0:
        return out, counts
    block, warps = _config(values.numel(), S)
    _segment_fwd_kernel[(S,)](
        values, values if weights is None else weights.contiguous(), cu_seqlens.contiguous(), out, counts,
        HAS_W=weights is not None, AVERAGE=bool(average), BLOCK=block, num_warps=warps)
    return out, counts


def segment_backward(grad_out, weights, cu_seqlens, counts, average, N):
    S = cu_seqlens.numel() - 1
    dt = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    # zeros: tokens outside every segment (cu_seqlens[-1] < N) get no gradient
    grad = torch.zeros(N, dtype=dt, device=grad_out.device)
    if S == 0 or N == 0:
        return grad
    block, warps = _config(N, S)
    _segment_bwd_kernel[(S,)](
        grad_out.contiguous(), grad if weights is None else weights.contiguous(), cu_seqlens.contiguous(),
        counts.contiguous(), grad,
        HAS_W=weights is not None, AVERAGE=bool(average), USE_FP64=dt == torch.float64,
        BLOCK=block, num_warps=warps)
    return grad
