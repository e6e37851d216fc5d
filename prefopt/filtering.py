"""Gradient filtering of the fused linear head's backward: the count of skipped blocks, and the vocabulary order.

The filter itself is defined once in docs/design.md ("Gradient filtering") and applied by the two heads:
`kernels/linear_logprobs.py` (per backward tile, with `negligible_tile` of `kernels/_fold.py`) and
`prefopt/cpu/chunked.py` (per block of a recomputed tile, the row ops' `kept_blocks`); `tests/test_filtering.py` checks
them against each other and against the exact gradients. `linear_logprobs(..., filter_eps=)` turns it on.

`skip_counter` adds up, over every filtered backward since its last `reset()`, the blocks a head looked at and
the blocks it skipped. The Triton head leaves its count on the device (one atomic per skipped tile into a
per-launch int64, added here without a host sync); reading `skipped` or `fraction()` synchronises.

`vocab_order` is the ordering of vocabulary sorting (docs/design.md, "Vocabulary sorting"; `vocab_sort=`): the
Functions compute it in the forward and hand it to both head calls, whose backward visits the vocabulary in it.
"""
from __future__ import annotations

import torch


class SkipCounter:
    """Blocks seen / skipped by filtered backwards of the fused head, summed over calls."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.total = 0            # blocks the filtered backwards looked at
        self._skipped = 0         # skipped blocks counted on the host (CPU head)
        self._on_device = {}      # device -> int64 tensor of skipped tiles (Triton head), not yet read

    def add(self, skipped, total: int):
        """`skipped`: an int, or a device tensor holding the count (kept there until it is read)."""
        if isinstance(skipped, torch.Tensor) and skipped.is_meta:
            return  # bench/aot_launches.py runs the launchers on meta tensors: nothing ran, nothing to count
        self.total += int(total)
        if isinstance(skipped, torch.Tensor):
            held = self._on_device.get(skipped.device)
            self._on_device[skipped.device] = skipped.sum() if held is None else held + skipped.sum()
        else:
            self._skipped += int(skipped)

    @property
    def skipped(self) -> int:
        return self._skipped + sum(int(t) for t in self._on_device.values())

    def fraction(self) -> float:
        """Skipped blocks / blocks looked at (0 when no filtered backward ran)."""
        return self.skipped / self.total if self.total else 0.0


skip_counter = SkipCounter()


def vocab_order(hidden, weight, bias, labels):
    """int64 [V]: the vocabulary entries by decreasing sort key (docs/design.md, "Vocabulary sorting"), the labels of
    `labels` first. Key: the average raw logit over the tokens, mean_i(h_i) @ W.T + b (one GEMV, no logits).
    The order only groups the columns, every entry is still visited once: any order (ties, NaN keys) is correct."""
    with torch.no_grad():
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        mean_hidden = hidden.mean(0, dtype=acc).to(weight.dtype)
        key = torch.mv(weight, mean_hidden).to(acc)
        if bias is not None:
            key += bias.to(acc)
        # a label's own entry is never negligible (|onehot - p| = 1 - p): its column goes in the first blocks
        key[labels] = float("inf")
        return torch.argsort(key, descending=True)
