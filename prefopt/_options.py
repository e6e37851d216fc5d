"""The settled options that travel from the public edge to the backends, one frozen object per call.

`prefopt/_validation.py` checks what the user passed and resolves every default (softcap=0 -> None, the logits
cache budget from the argument / $PREFOPT_LOGITS_CACHE_MB / the device default, whether a backward will come,
filter_eps "auto" by the input dtype, vocab_sort by filter_eps)
into these objects. `prefopt/functions.py` passes one of them through `Function.apply`, and the backends read
settled values only: they `assert` invariants and never raise user errors or read the environment.

Adding an option: a field here (and in the argument tuple of the backend call that reads it), its check in
`prefopt/_validation.py`, and the backends that use it.
"""
from __future__ import annotations

from dataclasses import dataclass

CACHE_ENV = "PREFOPT_LOGITS_CACHE_MB"
# Default logits-cache budget on CPU: 8 tiles of prefopt/cpu/chunked.py. RAM is rarely what limits a CPU run, the
# recompute GEMM is (about a fifth of a DPO step at H=1024, V=32k). Elsewhere (the cpp backend's CUDA path) memory is
# the point: nothing is kept unless asked.
DEFAULT_CPU_CACHE_MB = 256


@dataclass(frozen=True)
class HeadParams:
    """Options of one log-prob op (row ops on logits, or the fused linear head)."""

    ignore_index: int
    logit_scale: float
    softcap: float | None        # > 0, or None for no cap (the edge maps softcap=0 to None)
    temperature: float
    want_entropy: bool
    want_sqsum: bool             # log sum_v p_v^2 (WPO)
    chunk_size: int | None = None  # token rows per tile of the CPU chunked head; None = sized by the head
    cache_bytes: int = 0         # logits tiles the CPU head may keep for the backward; 0 when no backward comes
    filter_eps: float | None = None  # > 0: the head's backward skips negligible blocks (docs/design.md); None = exact
    vocab_sort: bool = False     # the head visits the vocabulary in prefopt/filtering.py `vocab_order` (docs/design.md
                                 # "Vocabulary sorting"); True only with filter_eps and a backward coming

    def __post_init__(self):
        assert self.softcap is None or self.softcap > 0, self.softcap
        assert self.temperature > 0 and self.logit_scale != 0
        assert self.chunk_size is None or self.chunk_size >= 1
        assert self.cache_bytes >= 0
        assert self.filter_eps is None or self.filter_eps > 0, self.filter_eps
        assert not self.vocab_sort or self.filter_eps is not None, (self.vocab_sort, self.filter_eps)

    # The backends share positional signatures (docs/design.md); these tuples are their option arguments.
    def row_forward_args(self):
        return (self.ignore_index, self.logit_scale, self.softcap, self.temperature, self.want_entropy,
                self.want_sqsum)

    def row_backward_args(self):
        return (self.ignore_index, self.logit_scale, self.softcap, self.temperature)

    def linear_forward_args(self):
        return (self.logit_scale, self.softcap, self.temperature, self.want_entropy, self.want_sqsum,
                self.chunk_size)

    def linear_backward_args(self):
        return (self.logit_scale, self.softcap, self.temperature, self.chunk_size, self.filter_eps)


@dataclass(frozen=True)
class LossOptions:
    """Settled options of a paired preference loss; checked without any tensor, so the fused loss can check
    them before its first head call."""

    names: tuple                 # loss names, validated against prefopt/losses/table.py
    ref_free: bool
    beta: float
    label_smoothing: float
    loss_weights: tuple          # one float per name
    divergence: str              # alpha_divergence with coefficient 1 is already mapped to reverse_kl
    f_alpha_divergence_coef: float
    discopop_tau: float
    simpo_gamma: float
    rpo_alpha: float | None
    cpo_alpha: float | None      # reference-free losses: default resolved (0 for simpo, 1 for the cpo ones)
    bco_running_mean: object     # None, "batch", a float, or a 0-dim tensor (detached when used)
    nll_terms: tuple             # (name, coefficient) pairs that add the chosen NLL to the loss


@dataclass(frozen=True)
class PairLossParams:
    """What `prefopt/losses/function.py: PreferencePairFunction` takes besides its four log-prob vectors, settled by
    `prefopt/losses/api.py` (from `LossOptions` or KTO's options) in the compute dtype."""

    spec: object                 # prefopt.losses.table.PairSpec: the loss names and which inputs exist
    params: object               # the parameter vector of `prefopt.losses.table.make_params` (compute dtype)
    extras: dict                 # non-differentiable per-pair tensors {"ilc", "ilr", "w", "s"} (None where unused)
    compute_dtype: object        # torch.float32 or torch.float64
