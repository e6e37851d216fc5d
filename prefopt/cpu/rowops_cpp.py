"""Row ops via the compiled extension (backend "cpp"): ``prefopt._C`` from csrc/cpu/, ``prefopt._C_cuda`` for CUDA.

Same signatures and semantics as :mod:`prefopt.cpu.rowops_torch` (docs/design.md). One pass over each
row forward (online log-sum-exp) and one in backward; OpenMP over rows. Outputs are float32 (float64
for float64 logits, so float64 tests stay tight, like the torch backend).
"""
from __future__ import annotations

from prefopt.cpu import rowops_torch
from prefopt.cpu.extension import extension_for
from prefopt._types import RowStats


def _cap(softcap) -> float:
    return 0.0 if softcap is None else float(softcap)


def row_forward(logits, labels, ignore_index, logit_scale, softcap, temperature, want_entropy, want_sqsum):
    logp, lse, entropy, log_sum_p2 = extension_for(logits).row_forward(logits, labels, int(ignore_index), float(logit_scale),
                                                    _cap(softcap), float(temperature), bool(want_entropy),
                                                    bool(want_sqsum))
    return RowStats(logp, lse, entropy if want_entropy else None, log_sum_p2 if want_sqsum else None)


def row_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, ignore_index, logit_scale, softcap,
                 temperature, out=None):
    """Gradient wrt the raw logits. ``out`` may be ``logits`` itself (an owned fp32/fp64 tile): the
    gradient then overwrites it in place, so no second [n, V] buffer exists."""
    if grad_entropy is None:
        entropy = None  # only needed for the entropy term
    return extension_for(logits).row_backward(logits, labels, lse, entropy, grad_logp, grad_entropy, int(ignore_index),
                           float(logit_scale), _cap(softcap), float(temperature), out)


def kept_blocks(grad, threshold, block_rows, block_cols, zero_skipped=False):
    """rowops_torch.kept_blocks in C++ (csrc/cpu/filter.cpp) for CPU tiles; the torch twin elsewhere (the CUDA
    extension has no filter: the Triton head filters inside its kernel)."""
    if grad.device.type != "cpu":
        return rowops_torch.kept_blocks(grad, threshold, block_rows, block_cols, zero_skipped)
    return extension_for(grad).kept_blocks(grad, threshold, int(block_rows), int(block_cols), bool(zero_skipped))


def zero_blocks(grad, mask, block_rows, block_cols):
    """rowops_torch.zero_blocks in C++ for CPU tiles (in place)."""
    if grad.device.type != "cpu":
        return rowops_torch.zero_blocks(grad, mask, block_rows, block_cols)
    extension_for(grad).zero_blocks(grad, mask, int(block_rows), int(block_cols))
