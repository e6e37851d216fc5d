"""Masked per-segment sums via the compiled C++ extension ``prefopt._C`` (backend "cpp").

Same signatures as :mod:`prefopt.cpu.segment_torch` (docs/design.md "Segment sums").
"""
from __future__ import annotations

from prefopt.cpu.extension import extension_for


def segment_forward(values, weights, cu_seqlens, average):
    sums, counts = extension_for(values).segment_forward(values, weights, cu_seqlens, bool(average))
    return sums, counts


def segment_backward(grad_out, weights, cu_seqlens, counts, average, n_tokens):
    return extension_for(grad_out).segment_backward(grad_out, weights, cu_seqlens, counts, bool(average), int(n_tokens))
