"""torch.autograd.Functions of the core ops. Each one picks a backend and calls its forward/backward.

Backends implement the signatures in docs/design.md; inputs arrive validated and flattened by api.py, and every
option arrives settled in one frozen `prefopt._options.HeadParams`.
"""
from __future__ import annotations

import importlib

import torch

from prefopt._backend import resolve, resolve_head
from prefopt._options import HeadParams
from prefopt.filtering import vocab_order

_ROWOPS = {"torch": "prefopt.cpu.rowops_torch", "cpp": "prefopt.cpu.rowops_cpp", "triton": "prefopt.kernels.logprobs"}
_SEGMENT = {"torch": "prefopt.cpu.segment_torch", "cpp": "prefopt.cpu.segment_cpp",
            "triton": "prefopt.kernels.sequence_sums"}
_heads = {}


def rowops_impl(device):
    return importlib.import_module(_ROWOPS[resolve(device)])


def segment_impl(device):
    return importlib.import_module(_SEGMENT[resolve(device)])


def head_impl(hidden, weight):
    """The linear head for hidden [n, H] x weight [V, H]: the backend's, and on the triton backend the fused
    kernel or the tiled head on the Triton row ops (prefopt/_backend.py `resolve_head`)."""
    backend = resolve(hidden.device)
    head = resolve_head(hidden.device, hidden.shape[0], hidden.shape[1], weight.shape[0], hidden.dtype)
    if head == "fused":
        return importlib.import_module("prefopt.kernels.linear_logprobs")
    if backend not in _heads:  # the tiled head of every backend: ChunkedHead on that backend's row ops
        from prefopt.cpu.chunked import ChunkedHead
        _heads[backend] = ChunkedHead(importlib.import_module(_ROWOPS[backend]))
    return _heads[backend]


def none_if_empty(t):
    return None if t is None or t.numel() == 0 else t


def head_call_kwargs(impl, params: HeadParams):
    """The tile cache a head call may use (both its forward and its backward get it), as keyword arguments.
    params.cache_bytes is 0 unless a backward will come; only heads that hold logits tiles can keep some."""
    make_cache = getattr(impl, "cache_for", None)
    tile_cache = make_cache(params.cache_bytes) if make_cache is not None and params.cache_bytes else None
    return {} if tile_cache is None else {"tile_cache": tile_cache}


def vocab_order_kwargs(params: HeadParams, hidden, weight, bias, labels):
    """The vocabulary order of a head call with vocab_sort (prefopt/filtering.py `vocab_order`), as keyword arguments
    of both its forward and its backward: the CPU head's forward tiles then line up with its backward's."""
    return {"vocab_order": vocab_order(hidden, weight, bias, labels)} if params.vocab_sort else {}


def finish_forward(ctx, stats):
    """The (logp, entropy | empty, log_sum_p2 | empty) outputs of a log-prob Function; log_sum_p2 has no gradient."""
    ctx.set_materialize_grads(False)
    outputs = row_outputs(stats, stats.lse)
    ctx.mark_non_differentiable(outputs[2])
    return outputs


def upstream_grads(grad_logp, grad_entropy, lse):
    """Contiguous upstream gradients as the backends take them: grad_logp always, grad_entropy or None."""
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.contiguous()
    grad_entropy = none_if_empty(grad_entropy)
    return grad_logp, None if grad_entropy is None else grad_entropy.contiguous()


def row_outputs(stats, like):
    empty = like.new_empty(0)
    return (stats.logp, empty if stats.entropy is None else stats.entropy,
            empty if stats.log_sum_p2 is None else stats.log_sum_p2)


class LogprobsFromLogitsFunction(torch.autograd.Function):
    """logits [n, V], labels [n] int64, params: HeadParams
    -> (logp [n], entropy [n] | empty, log_sum_p2 [n] | empty)."""

    @staticmethod
    def forward(ctx, logits, labels, params: HeadParams):
        impl = rowops_impl(logits.device)
        stats = impl.row_forward(logits, labels, *params.row_forward_args())
        ctx.impl = impl
        ctx.params = params
        ctx.save_for_backward(logits, labels, stats.lse, stats.entropy)
        return finish_forward(ctx, stats)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_sqsum):
        logits, labels, lse, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_logp is None and grad_entropy is None):
            return None, None, None
        grad_logp, grad_entropy = upstream_grads(grad_logp, grad_entropy, lse)
        grad_logits = ctx.impl.row_backward(logits, labels, lse, entropy, grad_logp, grad_entropy,
                                            *ctx.params.row_backward_args())
        return grad_logits, None, None


class LinearLogprobsFunction(torch.autograd.Function):
    """hidden [n, H], weight [V, H], bias [V] | None, labels [n] (all valid), params: HeadParams
    -> like LogprobsFromLogits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, params: HeadParams):
        impl = head_impl(hidden, weight)
        kwargs = head_call_kwargs(impl, params) | vocab_order_kwargs(params, hidden, weight, bias, labels)
        stats = impl.linear_forward(hidden, weight, bias, labels, *params.linear_forward_args(), **kwargs)
        ctx.impl = impl
        ctx.backward_kwargs = kwargs
        ctx.params = params
        ctx.save_for_backward(hidden, weight, bias, labels, stats.lse, stats.entropy)
        return finish_forward(ctx, stats)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_sqsum):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if not any(needs) or (grad_logp is None and grad_entropy is None):
            ctx.backward_kwargs = {}  # drop any kept tiles with the graph's other buffers
            return None, None, None, None, None
        grad_logp, grad_entropy = upstream_grads(grad_logp, grad_entropy, lse)
        grads = ctx.impl.linear_backward(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy,
                                         *ctx.params.linear_backward_args(), needs, **ctx.backward_kwargs)
        return (*grads, None, None)


class SegmentSumFunction(torch.autograd.Function):
    """values [N], weights [N] | None, cu_seqlens [S+1] -> per-segment (weighted) sum or mean [S]."""

    @staticmethod
    def forward(ctx, values, weights, cu_seqlens, average):
        impl = segment_impl(values.device)
        sums, counts = impl.segment_forward(values, weights, cu_seqlens, average)
        ctx.impl = impl
        ctx.average = average
        ctx.n_tokens = values.numel()
        ctx.save_for_backward(weights, cu_seqlens, counts)
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        weights, cu_seqlens, counts = ctx.saved_tensors
        grad_values = ctx.impl.segment_backward(grad_sums.contiguous(), weights, cu_seqlens, counts, ctx.average,
                                                ctx.n_tokens)
        return grad_values, None, None, None
