"""Input checks for the public ops: every bad input is a clear ValueError/TypeError before a kernel runs."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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


def check_same_device(**tensors):
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors are on different devices: " + ", ".join(f"{k} on {d}" for k, d in devices.items()))


def check_transform(temperature, softcap, logit_scale=1.0):
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if not isinstance(logit_scale, (int, float)) or not math.isfinite(logit_scale) or logit_scale == 0:
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale!r}")


def check_labels(labels, vocab, ignore_index):
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad].flatten()[:5].tolist()
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {int(bad.sum())} out of range, e.g. {first}")


def check_logprobs_inputs(logits, labels, ignore_index, temperature, softcap, logit_scale=1.0):
    check_tensor("logits", logits, floating=True, ndim_min=1)
    check_tensor("labels", labels, integer=True)
    check_same_device(logits=logits, labels=labels)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits shape without the vocab "
                         f"dimension {tuple(logits.shape[:-1])}")
    check_transform(temperature, softcap, logit_scale)
    check_labels(labels, logits.shape[-1], ignore_index)


def check_linear_inputs(hidden, weight, labels, bias, ignore_index, temperature, softcap, logit_scale, chunk_size,
                        logits_cache_mb=None):
    check_tensor("hidden", hidden, floating=True, ndim_min=1)
    check_tensor("weight", weight, floating=True)
    check_tensor("labels", labels, integer=True)
    if bias is not None:
        check_tensor("bias", bias, floating=True)
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden has {hidden.shape[-1]} features, weight expects "
                         f"{weight.shape[1]} (weight shape {tuple(weight.shape)})")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias ({bias.dtype}) must have the dtype of hidden ({hidden.dtype})")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden shape without the feature "
                         f"dimension {tuple(hidden.shape[:-1])}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    check_cache_budget(logits_cache_mb)
    check_transform(temperature, softcap, logit_scale)
    check_labels(labels, weight.shape[0], ignore_index)


def check_cache_budget(logits_cache_mb):
    """None (use $PREFOPT_LOGITS_CACHE_MB) or MiB >= 0; the environment value is checked here too."""
    if logits_cache_mb is not None and (isinstance(logits_cache_mb, bool)
                                        or not isinstance(logits_cache_mb, (int, float))):
        raise TypeError(f"logits_cache_mb must be None or a number of MiB, got {logits_cache_mb!r}")
    from prefopt.cpu.chunked import cache_budget_bytes
    cache_budget_bytes(logits_cache_mb)


def check_cu_seqlens(cu_seqlens, n_tokens, device):
    check_tensor("cu_seqlens", cu_seqlens, integer=True)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the tokens are on {device}")
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
    if int(cu_seqlens[-1]) != n_tokens:
        raise ValueError(f"cu_seqlens must end at the number of tokens {n_tokens}, got {int(cu_seqlens[-1])}")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


def check_sequence_inputs(token_logps, mask, cu_seqlens):
    check_tensor("token_logps", token_logps, floating=True, ndim_min=1)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
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
