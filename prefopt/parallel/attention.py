"""Causal attention over sequences split across a context-parallel group: each rank keeps its queries and
all-gathers the group's keys and values.

Blocks. A rank's queries come in chunks (prefopt/parallel/context.py `Chunk`: consecutive real tokens of one segment).
A chunk attends to two kinds of key blocks, neither of which needs a mask:
* itself, causally: a square block, where causal top-left and bottom-right alignment agree, so SDPA's `is_causal` is
  right;
* every earlier chunk of its segment (another rank's, or this rank's own head chunk under the balanced layout), in
  full.
Each block runs the flash-attention kernel behind `torch.nn.functional.scaled_dot_product_attention`
(`aten._scaled_dot_product_flash_attention_for_cpu`), which also returns the block's log-sum-exp; the blocks' outputs
merge with weights exp(lse_block - lse), lse = logsumexp over the blocks. The kernels and the merge run in float32
(float64 for float64 inputs): bfloat16 / float16 inputs are widened per call, and the output and the gradients are
rounded to the input dtype once, at the end (rounding each block's bfloat16 output before the merge cost up to 4x the
error of one-process bfloat16 SDPA at 3 ranks, measured by tests/test_context_parallel.py).

Backward: the same kernel's backward on each block, given the *merged* output and log-sum-exp. Its probabilities are
then exp(s - lse) over the whole key set and its correction term rowsum(dO * O) the merged one, so each block's
gradients are exactly its share of the whole attention's (the decomposition ring attention uses). The key and value
gradients of the gathered blocks are summed over the group, and each rank keeps those of its own tokens (an all-reduce
under gloo, which has no reduce-scatter).

Memory. Saved for the backward: the local query, key, value, output and log-sum-exp, all linear in local tokens. The
gathered keys and values (the group's tokens x KV heads x head dim) live only inside one layer's forward, and again
inside its backward (gathered a second time rather than kept). No [T, T] tensor exists: the largest score tile is
the kernel's own.

Why not `torch.distributed.tensor.experimental.context_parallel`: on CPU (torch 2.13) it stops at "Operator
aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding strategy registered", and it
runs one causal sequence per row (no packed sequences, no padding). Why the private kernels: SDPA's public function
returns no log-sum-exp, and a block's log-sum-exp is what the merge and the exact backward need. Other devices than
CPU raise NotImplementedError (no GPU here to test the CUDA kernels' variant).

The one-process truth is SDPA on the whole sequence; tests/test_context_parallel.py compares against it (float64).
"""
from __future__ import annotations

import math

import torch

from prefopt.parallel.collectives import all_reduce_sum, gather_rows


def _kernels(device):
    if device.type == "cpu":
        return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    raise NotImplementedError(f"context-parallel attention runs on CPU tensors only for now (got {device}); the "
                              "CUDA flash / efficient-attention kernels need the same block merge and have not been "
                              "run here")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather(tensor, split):
    """Local `[B, H, T_r, D]` -> `[world, B, H, T_max, D]` (every rank's tokens, padded to the longest share)."""
    pad = split.longest_local - tensor.shape[2]
    if pad:
        tensor = torch.nn.functional.pad(tensor, (0, 0, 0, pad))
    return gather_rows(tensor, split.group)


def _blocks(split, chunk, key, value, keys, values):
    """(key block, value block, causal, owner) of every block `chunk` attends to: itself, then every earlier chunk
    of its segment. owner: (rank, chunk) of the block's tokens."""
    blocks = [(chunk.take(key), chunk.take(value), True, (split.rank, chunk))]
    for rank, other in split.earlier(chunk):
        if rank == split.rank:
            blocks.append((other.take(key), other.take(value), False, (rank, other)))
        else:
            blocks.append((other.take(keys[rank]), other.take(values[rank]), False, (rank, other)))
    return blocks


def _put(buffer, chunk, value, dim=2):
    """buffer[chunk.row, ..., chunk.positions] = value."""
    row = buffer.narrow(0, chunk.row, 1)
    if chunk.contiguous:
        row.narrow(dim, chunk.start, len(chunk)).copy_(value)
    else:
        row.index_copy_(dim, chunk.positions.to(buffer.device), value.to(buffer.dtype))


def _add(buffer, chunk, value):
    """buffer[chunk.row, :, chunk.positions] += value."""
    row = buffer.narrow(0, chunk.row, 1)
    if chunk.contiguous:
        row.narrow(2, chunk.start, len(chunk)).add_(value)
    else:
        row.index_add_(2, chunk.positions.to(buffer.device), value.to(buffer.dtype))


class ContextAttentionFunction(torch.autograd.Function):
    """query `[B, Hq, T_r, D]`, key / value `[B, Hkv, T_r, D]` (this rank's tokens of `split`), scale
    -> `[B, Hq, T_r, Dv]`, 0 at padding. See the module docstring."""

    @staticmethod
    def forward(ctx, query, key, value, split, scale):
        forward_kernel, _ = _kernels(query.device)
        acc = _acc(query.dtype)
        keys, values = _gather(key, split).to(acc), _gather(value, split).to(acc)
        local_k, local_v = key.to(acc), value.to(acc)
        out = torch.zeros(query.shape[:-1] + value.shape[-1:], dtype=acc, device=query.device)
        lse = torch.zeros(query.shape[:-1], dtype=acc, device=query.device)
        for chunk in split.chunks(split.rank):
            q = chunk.take(query).to(acc)
            parts = [forward_kernel(q, k, v, 0.0, causal, scale=scale)
                     for k, v, causal, _ in _blocks(split, chunk, local_k, local_v, keys, values)]
            if len(parts) == 1:
                merged_out, merged_lse = parts[0]
            else:
                block_lse = torch.stack([p[1] for p in parts])
                merged_lse = torch.logsumexp(block_lse, dim=0)
                weights = (block_lse - merged_lse).exp().unsqueeze(-1)
                merged_out = sum(w * p[0] for w, p in zip(weights, parts))
            _put(out, chunk, merged_out)
            _put(lse, chunk, merged_lse)
        ctx.split, ctx.scale = split, scale
        ctx.save_for_backward(query, key, value, out, lse)   # out in the accumulation dtype
        return out.to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        split, scale = ctx.split, ctx.scale
        _, backward_kernel = _kernels(query.device)
        acc = _acc(query.dtype)
        keys, values = _gather(key, split).to(acc), _gather(value, split).to(acc)
        local_k, local_v = key.to(acc), value.to(acc)
        grad_q = torch.zeros(query.shape, dtype=acc, device=query.device)
        grad_k = torch.zeros(key.shape, dtype=acc, device=key.device)
        grad_v = torch.zeros(value.shape, dtype=acc, device=value.device)
        grad_keys = torch.zeros(keys.shape, dtype=acc, device=keys.device)
        grad_values = torch.zeros(values.shape, dtype=acc, device=values.device)
        for chunk in split.chunks(split.rank):
            g = chunk.take(grad_out).to(acc).contiguous()
            q, o, m = chunk.take(query).to(acc), chunk.take(out), chunk.take(lse)
            for k, v, causal, (rank, owner) in _blocks(split, chunk, local_k, local_v, keys, values):
                gq, gk, gv = backward_kernel(g, q, k, v, o, m, 0.0, causal, scale=scale)
                _add(grad_q, chunk, gq)
                if rank == split.rank:
                    _add(grad_k, owner, gk)
                    _add(grad_v, owner, gv)
                else:
                    _add(grad_keys[rank], owner, gk)
                    _add(grad_values[rank], owner, gv)
        # every rank's gradients for the keys / values of rank w, summed: rank w keeps its own
        all_reduce_sum(grad_keys, split.group)
        all_reduce_sum(grad_values, split.group)
        n = key.shape[2]
        grad_k += grad_keys[split.rank].narrow(2, 0, n)
        grad_v += grad_values[split.rank].narrow(2, 0, n)
        return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype), None, None


def context_attention(query, key, value, split, scale=None):
    """Causal attention of this rank's queries over the whole segments of `split` (prefopt/parallel/context.py).

    query `[B, Hq, T_r, D]`, key / value `[B, Hkv, T_r, D]` (Hq a multiple of Hkv) hold this rank's tokens of the
    split (`split.shard` order); `scale` defaults to 1 / sqrt(D). Returns `[B, Hq, T_r, Dv]`, 0 at padding tokens.
    Every rank of the split's group must call it (collectives in the forward and the backward)."""
    rows = split.segments.shape[0]
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4 or t.shape[0] != rows or t.shape[2] != split.local_length:
            raise ValueError(f"{name} must be [{rows}, heads, {split.local_length}, head_dim] (this rank's tokens of "
                             f"the split), got {tuple(t.shape)}")
    if key.shape[1] != value.shape[1] or query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of the key / value heads "
                         f"({key.shape[1]}, {value.shape[1]})")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return ContextAttentionFunction.apply(query, key, value, split, scale)
