"""Every user-facing check of prefopt: a bad input is a clear ValueError/TypeError before any kernel runs.

The public functions (prefopt/api.py, prefopt/fused.py, prefopt/losses/api.py) call these checks first; the
`settle_*` / `*_options` functions also resolve the defaults into the frozen option objects of
prefopt/_options.py, which is all that the autograd Functions and the backends below them see.
Messages read "<name> must be <what>, got <value>".
"""
from __future__ import annotations

import math
import os
from numbers import Integral, Real

import torch

from prefopt._options import CACHE_ENV, DEFAULT_CPU_CACHE_MB, HeadParams, LossOptions

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)



# ------------------------------------------------------------------------------------------------------------
# scalars
# ------------------------------------------------------------------------------------------------------------
def check_real(name, v, *, positive=False, nonzero=False, allow_none=False, allow_tensor=False, lo=None, hi=None):
    """A finite real number (never a bool) as a float; 0-dim tensors too when `allow_tensor`; in [lo, hi] when both
    are given."""
    if v is None and allow_none:
        return None
    if allow_tensor and isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype != torch.bool and not v.is_meta:
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if nonzero and v == 0:
        raise ValueError(f"{name} must be non-zero, got {v}")
    if lo is not None and hi is not None and not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {v}")
    return v


def check_int(name, v, *, minimum=None, allow_none=False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, Integral):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def check_flag(name, v):
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return v


# ------------------------------------------------------------------------------------------------------------
# tensors of the core ops
# ------------------------------------------------------------------------------------------------------------
def check_tensor(name, t, *, floating=None, integer=False, ndim_min=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if ndim_min is not None and t.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimension(s), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    _check_not_meta(name, t)


def _check_not_meta(name, t):
    # Labels and cu_seqlens are range-checked on their values, which a meta tensor does not have.
    if t.is_meta:
        raise ValueError(f"{name} must hold data, got a meta tensor (prefopt checks label and length values "
                         "before any kernel runs; run on a real device)")


def check_same_device(**tensors):
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors are on different devices: " + ", ".join(f"{k} on {d}" for k, d in devices.items()))


def settle_transform(temperature, softcap, logit_scale=1.0):
    """-> (logit_scale, softcap or None, temperature) as floats; softcap=0 means no cap."""
    temperature = _transform_number("temperature", temperature, "a finite number > 0", lambda v: v > 0)
    if softcap is not None:
        softcap = _transform_number("softcap", softcap, "None or a finite number > 0", lambda v: v >= 0)
    logit_scale = _transform_number("logit_scale", logit_scale, "a finite non-zero number", lambda v: v != 0)
    return logit_scale, softcap or None, temperature


def _transform_number(name, v, what, ok):
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or not ok(v):
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return float(v)


def check_labels(labels, vocab, ignore_index):
    """Labels are compared in int64: a narrow dtype would wrap `vocab` or `ignore_index` in the comparison."""
    labels = labels.long()
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad].flatten()[:5].tolist()
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {int(bad.sum())} out of range, e.g. {first}")


def _settle_head(labels, vocab, ignore_index, temperature, softcap, logit_scale, return_entropy, return_log_sum_p2,
                 chunk_size=None, cache_bytes=0, filter_eps=None, vocab_sort=False):
    ignore_index = check_int("ignore_index", ignore_index)
    logit_scale, softcap, temperature = settle_transform(temperature, softcap, logit_scale)
    want_entropy = check_flag("return_entropy", return_entropy)
    want_sqsum = check_flag("return_log_sum_p2", return_log_sum_p2)
    check_labels(labels, vocab, ignore_index)
    return HeadParams(ignore_index, logit_scale, softcap, temperature, want_entropy, want_sqsum, chunk_size,
                      cache_bytes, filter_eps, vocab_sort)


def settle_logprobs(logits, labels, ignore_index, temperature, softcap, logit_scale, return_entropy,
                    return_log_sum_p2) -> HeadParams:
    check_tensor("logits", logits, floating=True, ndim_min=1)
    check_tensor("labels", labels, integer=True)
    check_same_device(logits=logits, labels=labels)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits shape without the vocab "
                         f"dimension {tuple(logits.shape[:-1])}")
    return _settle_head(labels, logits.shape[-1], ignore_index, temperature, softcap, logit_scale, return_entropy,
                        return_log_sum_p2)


def settle_linear(hidden, weight, labels, bias, ignore_index, temperature, softcap, logit_scale, chunk_size,
                  logits_cache_mb, return_entropy, return_log_sum_p2, *, names=("hidden", "weight", "bias"),
                  vocab=None, filter_eps=None, vocab_sort=False, extra_weight=None) -> HeadParams:
    """Checks one linear head's inputs and settles its options; `names` let the fused loss report ref_* names.
    `vocab`: the whole vocabulary's size when `weight` holds one shard of it (labels are global ids).
    `extra_weight` [V, R]: more weight columns (prefopt/split_weight.py); hidden then has H + R features.

    The cache budget is 0 unless a backward will come (grad mode on and an input that requires grad)."""
    h_name, w_name, b_name = names
    check_tensor(h_name, hidden, floating=True, ndim_min=1)
    check_tensor(w_name, weight, floating=True)
    check_tensor("labels", labels, integer=True)
    if bias is not None:
        check_tensor(b_name, bias, floating=True)
    check_same_device(**{h_name: hidden, w_name: weight, "labels": labels, b_name: bias})
    if weight.dim() != 2:
        raise ValueError(f"{w_name} must be [vocab, hidden], got shape {tuple(weight.shape)}")
    features = weight.shape[1]
    if extra_weight is not None:
        check_tensor("extra_weight", extra_weight, floating=True)
        check_same_device(**{h_name: hidden, "extra_weight": extra_weight})
        if extra_weight.dim() != 2 or extra_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"extra_weight must be [vocab, extra features] with the {w_name}'s {weight.shape[0]} "
                             f"rows, got shape {tuple(extra_weight.shape)}")
        if extra_weight.dtype != hidden.dtype:
            raise TypeError(f"extra_weight ({extra_weight.dtype}) must have the dtype of {h_name} ({hidden.dtype})")
        features += extra_weight.shape[1]
    if hidden.shape[-1] != features:
        raise ValueError(f"hidden size mismatch: {h_name} has {hidden.shape[-1]} features, {w_name} expects "
                         f"{features} ({w_name} shape {tuple(weight.shape)}"
                         + ("" if extra_weight is None else f" + extra_weight {tuple(extra_weight.shape)}") + ")")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{h_name} ({hidden.dtype}) and {w_name} ({weight.dtype}) must have the same dtype")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{b_name} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b_name} ({bias.dtype}) must have the dtype of {h_name} ({hidden.dtype})")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal {h_name} shape without the feature "
                         f"dimension {tuple(hidden.shape[:-1])}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    budget = cache_budget_bytes(logits_cache_mb, hidden.device.type)
    asked_filter = filter_eps
    filter_eps = settle_filter_eps(filter_eps, hidden.dtype)
    vocab_sort = settle_vocab_sort(vocab_sort, asked_filter, filter_eps)
    will_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                    for t in (hidden, weight, bias, extra_weight))
    return _settle_head(labels, weight.shape[0] if vocab is None else vocab, ignore_index, temperature, softcap,
                        logit_scale, return_entropy, return_log_sum_p2, chunk_size, budget if will_backward else 0,
                        filter_eps, vocab_sort and will_backward)


# filter_eps="auto": Cut Cross-Entropy's value for bf16/fp16 inputs, whose gradients are rounded to 8 (bf16) or 11
# (fp16) significant bits anyway; fp32/fp64 inputs get the exact backward, as there.
AUTO_FILTER_EPS = 2.0 ** -12


def settle_filter_eps(filter_eps, dtype):
    """Gradient filtering threshold of the fused head's backward (docs/design.md, "Gradient filtering"):
    None or 0 -> None (exact); "auto" -> AUTO_FILTER_EPS for bf16/fp16 inputs, None for fp32/fp64; else a float > 0."""
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"filter_eps must be None, 'auto' or a finite number >= 0, got {filter_eps!r}")
        return AUTO_FILTER_EPS if dtype in (torch.bfloat16, torch.float16) else None
    if filter_eps is None:
        return None
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, Real):
        raise TypeError(f"filter_eps must be None, 'auto' or a finite number >= 0, got {filter_eps!r}")
    if not (math.isfinite(filter_eps) and filter_eps >= 0):
        raise ValueError(f"filter_eps must be None, 'auto' or a finite number >= 0, got {filter_eps!r}")
    return float(filter_eps) or None


def settle_vocab_sort(vocab_sort, asked_filter_eps, filter_eps):
    """Vocabulary sorting of the filtered backward (docs/design.md, "Vocabulary sorting") -> bool.

    False (default): off. "auto": on exactly when filtering is on (`filter_eps` settled to a float). True: on when
    filtering is on; it needs filter_eps to be asked for (a float > 0 or "auto"; "auto" on fp32/fp64 inputs settles
    to the exact backward, which then has nothing to sort for), so True with filter_eps None or 0 is an error."""
    if isinstance(vocab_sort, str):
        if vocab_sort != "auto":
            raise ValueError(f"vocab_sort must be False, True or 'auto', got {vocab_sort!r}")
        return filter_eps is not None
    if not isinstance(vocab_sort, bool):
        raise TypeError(f"vocab_sort must be False, True or 'auto', got {vocab_sort!r}")
    if vocab_sort and asked_filter_eps != "auto" and filter_eps is None:
        raise ValueError("vocab_sort=True orders the vocabulary for gradient filtering and needs filter_eps "
                         f"(a float > 0 or 'auto'), got filter_eps={asked_filter_eps!r}")
    return vocab_sort and filter_eps is not None


def cache_budget_bytes(cache_mb=None, device_type="cpu") -> int:
    """Bytes of forward logits tiles the backward may reuse: `cache_mb`, else $PREFOPT_LOGITS_CACHE_MB, else the
    default (DEFAULT_CPU_CACHE_MB on CPU, 0 on other devices)."""
    if cache_mb is not None and (isinstance(cache_mb, bool) or not isinstance(cache_mb, Real)):
        raise TypeError(f"logits_cache_mb must be None or a number of MiB, got {cache_mb!r}")
    if cache_mb is None:
        text = os.environ.get(CACHE_ENV, "").strip()
        if not text:
            return (DEFAULT_CPU_CACHE_MB << 20) if device_type == "cpu" else 0
        try:
            cache_mb = float(text)
        except ValueError:
            raise ValueError(f"{CACHE_ENV} must be a number of MiB (0 disables the cache), got {text!r}") from None
    if not 0 <= cache_mb < float("inf"):
        raise ValueError(f"the logits cache budget must be a finite number of MiB >= 0, got {cache_mb!r}")
    return int(cache_mb * (1 << 20))


def check_cu_seqlens(cu_seqlens, n_tokens, device):
    check_tensor("cu_seqlens", cu_seqlens, integer=True)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the tokens are on {device}")
    cu_seqlens = cu_seqlens.long()  # int64 so a narrow dtype cannot wrap the token count in the comparison
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
    if int(cu_seqlens[-1]) != n_tokens:
        raise ValueError(f"cu_seqlens must end at the number of tokens {n_tokens}, got {int(cu_seqlens[-1])}")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


def check_sequence_inputs(token_logps, mask, cu_seqlens, average):
    check_tensor("token_logps", token_logps, floating=True, ndim_min=1)
    check_flag("average", average)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.is_complex():
            raise TypeError(f"mask must be a bool or real tensor, got {mask.dtype}")
        if tuple(mask.shape) != tuple(token_logps.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal token_logps shape {tuple(token_logps.shape)}")
        check_same_device(token_logps=token_logps, mask=mask)
    if cu_seqlens is None:
        if token_logps.dim() != 2:
            raise ValueError("padded input must be [batch, tokens]; for packed [N] input pass cu_seqlens "
                             f"(got shape {tuple(token_logps.shape)})")
    else:
        if token_logps.dim() == 2 and token_logps.shape[0] != 1:
            raise ValueError(f"packed input must be [N] or [1, N], got shape {tuple(token_logps.shape)}")
        if token_logps.dim() > 2:
            raise ValueError(f"packed input must be [N] or [1, N], got shape {tuple(token_logps.shape)}")
        check_cu_seqlens(cu_seqlens, token_logps.numel(), token_logps.device)


# ------------------------------------------------------------------------------------------------------------
# the fused loss from hidden states (prefopt/fused.py)
# ------------------------------------------------------------------------------------------------------------
def check_pair_layout(hidden, labels, cu_seqlens, ref_hidden):
    """-> (hidden, labels, ref_hidden, n_pairs) with a [1, N, H] packed input viewed as [N, H]."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if ref_hidden is not None and not isinstance(ref_hidden, torch.Tensor):
        raise TypeError(f"ref_hidden must be a torch.Tensor, got {type(ref_hidden).__name__}")
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(f"padded input: hidden must be [2P, T, H] (chosen rows first, then rejected), got "
                             f"shape {tuple(hidden.shape)}; for packed [N, H] input pass cu_seqlens")
        n_sequences = hidden.shape[0]
    else:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
        if hidden.dim() == 3 and hidden.shape[0] == 1:
            hidden, labels = hidden[0], labels.reshape(labels.shape[-1])
        if hidden.dim() != 2:
            raise ValueError(f"packed input: hidden must be [N, H] (or [1, N, H]), got shape {tuple(hidden.shape)}")
        n_sequences = cu_seqlens.numel() - 1
    if n_sequences < 2 or n_sequences % 2:
        raise ValueError(f"need an even number of sequences (P chosen, then P rejected), got {n_sequences}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden shape without the feature "
                         f"dimension {tuple(hidden.shape[:-1])}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device)
    if ref_hidden is not None:
        if cu_seqlens is not None and ref_hidden.dim() == 3 and ref_hidden.shape[0] == 1:
            ref_hidden = ref_hidden.reshape(hidden.shape[:-1] + ref_hidden.shape[-1:])
        if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(f"ref_hidden shape {tuple(ref_hidden.shape)} must match hidden shape "
                             f"{tuple(hidden.shape)} except the feature dimension")
    return hidden, labels, ref_hidden, n_sequences // 2


def check_reference(ref_hidden, ref_weight, ref_chosen_logps, ref_rejected_logps, ref_free, n_pairs, device):
    """-> True for a live reference head (ref_hidden + ref_weight), False for precomputed logps or none."""
    live = ref_hidden is not None or ref_weight is not None
    precomputed = ref_chosen_logps is not None or ref_rejected_logps is not None
    if live and (ref_hidden is None or ref_weight is None):
        raise ValueError("a live reference needs both ref_hidden and ref_weight")
    if precomputed and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError("precomputed reference logps need both ref_chosen_logps and ref_rejected_logps")
    if live and precomputed:
        raise ValueError("give the reference either live (ref_hidden + ref_weight) or precomputed "
                         "(ref_chosen_logps + ref_rejected_logps), not both")
    if ref_free and (live or precomputed):
        raise ValueError("reference-free losses (simpo, cpo*, orpo) take no reference")
    if not ref_free and not (live or precomputed):
        raise ValueError("this loss needs a reference: pass ref_hidden + ref_weight (live reference head) or "
                         "ref_chosen_logps + ref_rejected_logps (precomputed)")
    if precomputed:
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            check_pair_tensor(name, t, P=n_pairs, device=device, like="the pair count of hidden")
    return live


# ------------------------------------------------------------------------------------------------------------
# preference losses (prefopt/losses/api.py): options without tensors, then the per-pair tensors
# ------------------------------------------------------------------------------------------------------------
_NEED_LENGTHS = {"ipo", "sigmoid_norm", "simpo", "cpo_ipo", "orpo"}
_LS_RANGES = {  # label_smoothing ranges (lo, hi, lo_inclusive, hi_inclusive) of the losses that read it
    "sigmoid": (0.0, 1.0, True, True), "aot": (0.0, 1.0, True, True), "aot_unpaired": (0.0, 1.0, True, True),
    "robust": (0.0, 0.5, True, False), "exo_pair": (0.0, 1.0, False, False),
    "cpo": (0.0, 1.0, True, True), "simpo": (0.0, 1.0, True, True),
}


def check_pair_tensor(name, t, *, P=None, device=None, allow_int=False, allow_scalar=False,
                      like="chosen_logps"):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex() or not (t.is_floating_point() or (allow_int and not t.dtype == torch.bool)):
        kind = "a floating-point" if not allow_int else "a floating-point or integer"
        raise TypeError(f"{name} must be {kind} tensor, got dtype {t.dtype}")
    if allow_scalar and t.dim() == 0:
        pass
    elif t.dim() != 1:
        raise ValueError(f"{name} must have shape [P] (one value per pair), got shape {tuple(t.shape)}")
    elif P is not None and t.shape[0] != P:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {like} has shape ({P},): shapes must match")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but {like} is on {device}: all inputs must be on one device")
    return t


def loss_names(loss_type):
    """-> the tuple of paired loss names in `loss_type` (a name or a list), checked against the loss table."""
    from prefopt.losses.table import DPO_LOSSES, REF_FREE_LOSSES, TABLE
    valid = DPO_LOSSES + REF_FREE_LOSSES
    names = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"loss_type must be a loss name or a non-empty list of names; valid names: "
                        f"{', '.join(valid)}")
    for n in names:
        if n not in TABLE or TABLE[n].family == "kto":
            raise ValueError(f"unknown loss_type {n!r}; valid loss types: {', '.join(valid)} "
                             f"(unpaired KTO: prefopt.kto_loss)")
    if len(set(names)) != len(names):
        raise ValueError(f"loss_type lists {list(names)} with a repeated name; give each loss once")
    return tuple(names)


def loss_options(*, loss_type="sigmoid", beta=0.1, label_smoothing=0.0, loss_weights=None,
                 f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05, rpo_alpha=None,
                 bco_running_mean=None, simpo_gamma=0.5, cpo_alpha=None, has_policy_weights=False) -> LossOptions:
    """Checks and settles the options of `preference_loss` (same names and defaults) without any tensor."""
    from prefopt.losses.table import DIVERGENCES, DPO_LOSSES, REF_FREE_LOSSES, TABLE
    names = loss_names(loss_type)
    family = {TABLE[n].family for n in names}
    if len(family) > 1:
        raise ValueError(f"loss_type {list(names)} mixes reference-based and reference-free losses "
                         f"({', '.join(REF_FREE_LOSSES)}); use one family per call")
    ref_free = family == {"ref_free"}
    if ref_free and len(names) > 1:
        raise ValueError(f"reference-free losses ({', '.join(REF_FREE_LOSSES)}) take a single loss_type, got "
                         f"{list(names)}")

    beta = check_real("beta", beta, positive=True, allow_tensor=True)
    ls = check_real("label_smoothing", label_smoothing, allow_tensor=True)
    tau = check_real("discopop_tau", discopop_tau, positive=True, allow_tensor=True)
    simpo_gamma = check_real("simpo_gamma", simpo_gamma, allow_tensor=True)
    rpo_alpha = check_real("rpo_alpha", rpo_alpha, allow_none=True, allow_tensor=True)
    cpo_alpha = check_real("cpo_alpha", cpo_alpha, allow_none=True, allow_tensor=True)
    fa = check_real("f_alpha_divergence_coef", f_alpha_divergence_coef, allow_tensor=True)
    if not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {ls}")
    for n in names:
        if n in _LS_RANGES:
            lo, hi, lo_in, hi_in = _LS_RANGES[n]
            ok = (ls >= lo if lo_in else ls > lo) and (ls <= hi if hi_in else ls < hi)
            if not ok:
                rng = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
                extra = " (the EXO paper recommends 1e-3)" if n == "exo_pair" else ""
                raise ValueError(f"label_smoothing must be in {rng} for the {n!r} loss, got {ls}{extra}")
    if loss_weights is None:
        loss_weights = [1.0] * len(names)
    if isinstance(loss_weights, (str, bytes)) or not hasattr(loss_weights, "__len__"):
        raise TypeError("loss_weights must be a list of numbers, one per loss_type")
    if len(loss_weights) != len(names):
        raise ValueError(f"loss_weights has {len(loss_weights)} entries but loss_type has {len(names)}: "
                         "give one weight per loss type")
    loss_weights = tuple(check_real("loss_weights", w, allow_tensor=True) for w in loss_weights)

    if not isinstance(f_divergence_type, str) or f_divergence_type not in DIVERGENCES:
        raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; valid f-divergences: "
                         f"{', '.join(DIVERGENCES)}")
    divergence = f_divergence_type
    if divergence != "reverse_kl":
        bad = [n for n in names if not TABLE[n].supports_f_divergence]
        if bad:
            ok = [n for n in DPO_LOSSES if TABLE[n].supports_f_divergence]
            raise ValueError(f"f_divergence_type={divergence!r} is only supported for the loss types "
                             f"{', '.join(ok)}; not for {', '.join(bad)}. Use f_divergence_type='reverse_kl'")
    if divergence == "alpha_divergence" and abs(fa - 1.0) < 1e-6:
        divergence = "reverse_kl"  # the alpha -> 1 limit, as TRL

    if has_policy_weights and any(n in ("aot", "aot_unpaired") for n in names):
        raise ValueError("policy_weights (WPO weighting) is not supported with 'aot' / 'aot_unpaired': those "
                         "losses sort the pairs, which would misalign the per-pair weights")
    if "bco_pair" in names and not (bco_running_mean is None or isinstance(bco_running_mean, torch.Tensor)
                                    or (isinstance(bco_running_mean, str) and bco_running_mean == "batch")):
        bco_running_mean = check_real("bco_running_mean", bco_running_mean)

    if ref_free and cpo_alpha is None:
        cpo_alpha = 0.0 if names[0] == "simpo" else 1.0
    nll_terms = []
    if "sft" in names:
        nll_terms.append(("sft", loss_weights[names.index("sft")]))
    if rpo_alpha is not None and not ref_free:
        nll_terms.append(("rpo_alpha", rpo_alpha))
    if ref_free and names[0] == "orpo":
        nll_terms.append(("orpo", 1.0))
    elif ref_free and cpo_alpha != 0.0:
        nll_terms.append(("cpo_alpha", cpo_alpha))
    return LossOptions(names=names, ref_free=ref_free, beta=beta, label_smoothing=ls, loss_weights=loss_weights,
                       divergence=divergence, f_alpha_divergence_coef=fa, discopop_tau=tau, simpo_gamma=simpo_gamma,
                       rpo_alpha=rpo_alpha, cpo_alpha=cpo_alpha, bco_running_mean=bco_running_mean,
                       nll_terms=tuple(nll_terms))


# The keywords of preference_loss that the fused loss forwards from **loss_options (its other arguments are
# built by the fused pass itself).
FORWARDED_LOSS_OPTIONS = ("label_smoothing", "loss_weights", "f_divergence_type", "f_alpha_divergence_coef",
                          "discopop_tau", "bco_running_mean", "simpo_gamma", "cpo_alpha")


def check_forwarded_loss_options(loss_options: dict):
    unknown = sorted(set(loss_options) - set(FORWARDED_LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"unknown keyword argument(s) {', '.join(unknown)}; the fused loss takes the head options, "
                        f"ld_alpha, use_weighting, rpo_alpha and the preference_loss options "
                        f"{', '.join(FORWARDED_LOSS_OPTIONS)}")


def check_loss_presence(opts: LossOptions, *, has_ref_chosen, has_ref_rejected, has_lengths, chosen_nll_dim,
                        has_nll_lengths):
    """The checks that depend only on which inputs are given; the fused loss can run them before any tensor
    exists (it always supplies lengths and a per-pair NLL)."""
    names = opts.names
    if opts.ref_free:
        if has_ref_chosen or has_ref_rejected:
            raise ValueError(f"loss_type {names[0]!r} is reference-free: pass ref_chosen_logps=None and "
                             "ref_rejected_logps=None")
    elif not (has_ref_chosen and has_ref_rejected):
        from prefopt.losses.table import REF_FREE_LOSSES
        raise ValueError(f"loss_type {list(names)} needs ref_chosen_logps and ref_rejected_logps "
                         f"(reference-free losses: {', '.join(REF_FREE_LOSSES)})")
    needs_len = [n for n in names if n in _NEED_LENGTHS]
    if needs_len and not has_lengths:
        raise ValueError(f"loss_type {', '.join(needs_len)} needs chosen_lengths and rejected_lengths "
                         "(completion token counts, shape [P])")
    if opts.nll_terms and chosen_nll_dim is None:
        who = ", ".join(n for n, _ in opts.nll_terms)
        raise ValueError(f"{who} needs chosen_nll (the chosen completions' NLL: a 0-dim batch value or per-pair "
                         "sums [P])")
    if opts.nll_terms and chosen_nll_dim == 1 and not has_nll_lengths:
        raise ValueError("chosen_nll of shape [P] (per-pair NLL sums) needs nll_lengths or chosen_lengths to form "
                         "the token mean; or pass the reduced batch NLL as a 0-dim tensor")


def check_loss_tensors(opts: LossOptions, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       chosen_lengths, rejected_lengths, nll_lengths, policy_weights, chosen_nll):
    """-> (P, device) after checking every per-pair tensor of `preference_loss`."""
    check_pair_tensor("chosen_logps", chosen_logps)
    P, device = chosen_logps.shape[0], chosen_logps.device
    if P == 0:
        raise ValueError("chosen_logps is empty: need at least one pair")
    check_pair_tensor("rejected_logps", rejected_logps, P=P, device=device)
    given = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
             "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths, "nll_lengths": nll_lengths,
             "policy_weights": policy_weights, "chosen_nll": chosen_nll}
    for name, t in given.items():
        if t is not None and not (opts.ref_free and name.startswith("ref_")):  # the presence check names those
            check_pair_tensor(name, t, P=P, device=device, allow_int=name.endswith("lengths"),
                              allow_scalar=name == "chosen_nll")
    check_loss_presence(opts, has_ref_chosen=ref_chosen_logps is not None,
                        has_ref_rejected=ref_rejected_logps is not None,
                        has_lengths=chosen_lengths is not None and rejected_lengths is not None,
                        chosen_nll_dim=None if chosen_nll is None else chosen_nll.dim(),
                        has_nll_lengths=nll_lengths is not None or chosen_lengths is not None)
    return P, device


def kto_options(policy_logps, ref_logps, labels_desirable, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                undesirable_weight, loss_type, kl=None):
    """-> (beta, desirable_weight, undesirable_weight) as floats after checking every input of `kto_loss`."""
    if loss_type not in ("kto", "apo_zero_unpaired"):
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; valid: kto, apo_zero_unpaired")
    check_pair_tensor("policy_logps", policy_logps)
    B, device = policy_logps.shape[0], policy_logps.device
    if B == 0:
        raise ValueError("policy_logps is empty: need at least one example")
    check_pair_tensor("ref_logps", ref_logps, P=B, device=device, like="policy_logps")
    if not isinstance(labels_desirable, torch.Tensor):
        raise TypeError(f"labels_desirable must be a torch.Tensor, got {type(labels_desirable).__name__}")
    if labels_desirable.dtype != torch.bool:
        raise TypeError(f"labels_desirable must be a bool tensor, got dtype {labels_desirable.dtype}")
    if labels_desirable.shape != (B,):
        raise ValueError(f"labels_desirable has shape {tuple(labels_desirable.shape)} but policy_logps has shape "
                         f"({B},): shapes must match")
    if labels_desirable.device != device:
        raise ValueError(f"labels_desirable is on {labels_desirable.device} but policy_logps is on {device}: "
                         "all inputs must be on one device")
    beta = check_real("beta", beta, positive=True, allow_tensor=True)
    wd = check_real("desirable_weight", desirable_weight, allow_tensor=True)
    wu = check_real("undesirable_weight", undesirable_weight, allow_tensor=True)
    if wd < 0 or wu < 0:
        raise ValueError(f"desirable_weight and undesirable_weight must be >= 0, got {wd}, {wu}")
    if kl is not None:
        check_precomputed_kl(kl, loss_type, kl_policy_logps, kl_ref_logps)
    elif loss_type == "kto":
        if kl_policy_logps is None or kl_ref_logps is None:
            raise ValueError("loss_type='kto' needs kl_policy_logps and kl_ref_logps (log-probs of mismatched "
                             "prompt/completion pairs for the batch KL estimate)")
        check_pair_tensor("kl_policy_logps", kl_policy_logps, device=device, like="policy_logps")
        check_pair_tensor("kl_ref_logps", kl_ref_logps, P=kl_policy_logps.shape[0], device=device,
                          like="kl_policy_logps")
        if kl_policy_logps.shape[0] == 0:
            raise ValueError("kl_policy_logps is empty")
    return beta, wd, wu


def check_precomputed_kl(kl, loss_type, kl_policy_logps, kl_ref_logps):
    """`kto_loss(kl=...)`: one precomputed batch KL (Liger's KTO form); returns it as a detached 0-dim tensor."""
    if loss_type != "kto":
        raise ValueError(f"kl is the KTO KL term; loss_type={loss_type!r} uses none (use loss_type='kto')")
    if kl_policy_logps is not None or kl_ref_logps is not None:
        raise ValueError("give the KL either precomputed (kl) or as kl_policy_logps + kl_ref_logps, not both")
    if isinstance(kl, torch.Tensor):
        if kl.dim() != 0 or not kl.dtype.is_floating_point:
            raise ValueError(f"kl must be a float or a 0-dim float tensor (one KL for the batch), got shape "
                             f"{tuple(kl.shape)}, dtype {kl.dtype}")
        return kl.detach()
    if isinstance(kl, bool) or not isinstance(kl, (int, float)) or not math.isfinite(kl):
        raise ValueError(f"kl must be a finite float or a 0-dim tensor, got {kl!r}")
    return torch.tensor(float(kl), dtype=torch.float64)


def check_nll_target(nll_target, labels, cu_seqlens):
    """`nll_target` of the fused loss (Liger's ORPO option): integer targets in the layout of `labels`."""
    check_tensor("nll_target", nll_target, integer=True)
    if cu_seqlens is not None:
        nll_target = nll_target.reshape(-1)
    if tuple(nll_target.shape) != tuple(labels.shape):
        raise ValueError(f"nll_target shape {tuple(nll_target.shape)} must equal the labels' shape "
                         f"{tuple(labels.shape)}")
    if nll_target.device != labels.device:
        raise ValueError(f"nll_target is on {nll_target.device} but labels are on {labels.device}")
    return nll_target


# Liger's chunked-loss modules, the loss types each accepts (liger_kernel.chunked_loss, 0.8.x).
LIGER_DPO_LOSS_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                        "apo_down", "discopop")


def check_liger_inputs(name, _input, weight, target, *, use_ref_model=False, ref_input=None, ref_weight=None,
                       loss_type=None, unpaired=False, preference_labels=None):
    """The Liger call forms (prefopt.integrations.liger): [2P, T, H] / [B, T, H] input, [.., T] targets."""
    check_tensor("_input", _input, floating=True, ndim_min=3)
    check_tensor("target", target, integer=True)
    if _input.dim() != 3 or tuple(target.shape) != tuple(_input.shape[:2]):
        raise ValueError(f"{name}: _input must be [B, T, H] and target [B, T], got {tuple(_input.shape)} and "
                         f"{tuple(target.shape)}")
    if not unpaired and _input.shape[0] % 2:
        raise ValueError(f"{name}: _input holds P chosen rows then P rejected rows, so its batch must be even, got "
                         f"{_input.shape[0]}")
    if loss_type is not None and loss_type not in LIGER_DPO_LOSS_TYPES:
        raise ValueError(f"{name}: unsupported loss_type {loss_type!r}; Liger's DPO supports "
                         f"{', '.join(LIGER_DPO_LOSS_TYPES)} (prefopt.fused_linear_preference_loss has them all)")
    if use_ref_model and (ref_input is None or ref_weight is None):
        raise ValueError(f"{name}: use_ref_model=True needs ref_input and ref_weight")
    if use_ref_model and tuple(ref_input.shape[:2]) != tuple(_input.shape[:2]):
        raise ValueError(f"{name}: ref_input shape {tuple(ref_input.shape)} must match _input {tuple(_input.shape)} "
                         "except the feature dimension")
    if unpaired:
        if not isinstance(preference_labels, torch.Tensor) or preference_labels.dtype != torch.bool or \
                tuple(preference_labels.shape) != (_input.shape[0],):
            raise ValueError(f"{name}: preference_labels must be a bool tensor of shape ({_input.shape[0]},)")
