"""Masked per-segment sums via the compiled C++ extension ``prefopt._C`` (backend "cpp").

Same signatures as :mod:`prefopt.cpu.segment_torch` (docs/design.md "Segment sums").
"""
from __future__ import annotations

from prefopt import _C


def segment_forward(values, weights, cu_seqlens, average):
    sums, counts = _C.segment_forward(values, weights, cu_seqlens, bool(average))
    return sums, counts


def segment_backward(grad_out, weights, cu_seqlens, counts, average, n_tokens):
    return _C.segment_backward(grad_out, weights, cu_seqlens, counts, bool(average), int(n_tokens))
