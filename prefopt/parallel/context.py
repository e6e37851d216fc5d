"""Context parallelism: the tokens of every sequence of a batch split over the ranks of a group.

`SequenceSplit` says which tokens each rank of a context-parallel group holds, for one batch. Every rank builds the
same object from the global batch's layout (no collective), so every rank knows every rank's tokens:

* padded batches `[B, T]` (`split_padded`): rank r holds the same columns of every row, and its local tensors are
  `[B, T_r]`; a row's real tokens are those of its attention mask.
* padding-free batches, one packed row `[1, N]` with `cu_seqlens` (`split_packed`): rank r holds a slice of every
  sequence, its slices concatenated in sequence order (`local_cu_seqlens`); a slice may be empty.

Layouts (`balanced`):
* contiguous (default): the r-th of `world` near-equal consecutive parts of each row / sequence, so rank order is token
  order. This is the layout the sequence-parallel loss assumes (LD-DPO counts the completion tokens of earlier ranks,
  prefopt/weights.py) and the one the trainer uses.
* balanced: each row / sequence cut into 2 x world parts, rank r holding parts r and 2 world - 1 - r (a head and a
  tail chunk). Under causal attention the last contiguous slice attends to every earlier token and the first to only
  its own, so contiguous slices leave the attention work unequal (rank r does (2r + 1) / world^2 of it); head + tail
  gives every rank the same share. docs/design.md "Context parallelism" says when that pays.

The attention over a split sequence (prefopt/parallel/attention.py) reads `chunks(rank)`: the runs of a rank's local
tokens that are consecutive real tokens of one segment (one row of a padded batch, one sequence of a packed row), in
the order of the whole row. A run of another rank (or of this one) earlier in the same segment is attended to in full;
the run itself causally.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from prefopt.parallel.layout import check_group


def part_columns(length: int, world: int, balanced: bool = False) -> list:
    """Indices [0, length) held by each of `world` ranks (sorted LongTensors; earlier parts one longer when uneven)."""
    if not balanced:
        return list(torch.tensor_split(torch.arange(length), world))
    parts = torch.tensor_split(torch.arange(length), 2 * world)
    return [torch.cat([parts[r], parts[2 * world - 1 - r]]) for r in range(world)]


@dataclass(frozen=True)
class Chunk:
    """Consecutive real tokens of one segment held by one rank: local `positions` (sorted) in `row`; `order` is the
    rank of its first token among the real tokens of the row (what makes one chunk earlier than another)."""
    row: int
    segment: int
    order: int
    positions: torch.Tensor       # int64, local token indices of its rank
    start: int                    # positions[0]
    contiguous: bool              # positions == arange(start, start + len)

    def __len__(self):
        return int(self.positions.numel())

    def take(self, tensor, dim=2):
        """The chunk's tokens of a local `[B, H, T_r, D]` tensor (or of one rank's slot of a gathered one): a view when
        contiguous."""
        tensor = tensor.narrow(0, self.row, 1)
        if self.contiguous:
            return tensor.narrow(dim, self.start, len(self))
        return tensor.index_select(dim, self.positions.to(tensor.device))


class SequenceSplit:
    """Which tokens of a batch each rank of `group` holds (see the module docstring). Not a dataclass on purpose:
    DistributedDataParallel rebuilds dataclasses found in a module's inputs, and this object must pass through as is.

    `columns[w]`: the global column indices (of the padded rows, or of the packed row) rank w holds, sorted;
    `segments`: `[B, T]` int64 segment id of every global token, -1 at padding."""

    def __init__(self, group, columns, segments, packed, balanced, n_segments=None):
        self.group = group
        self.n_segments = n_segments
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.columns = [c.to(torch.int64) for c in columns]
        self.segments = segments.to(torch.int64).cpu()
        self.packed = packed
        self.balanced = balanced
        self._chunks = None

    # ---- this rank's share of the batch -------------------------------------------------------------------------
    @property
    def local_length(self):
        return int(self.columns[self.rank].numel())

    @property
    def longest_local(self):
        return max(int(c.numel()) for c in self.columns)

    def shard(self, tensor, dim=1):
        """This rank's tokens of a global tensor whose dimension `dim` is the token dimension (T, or N packed)."""
        cols = self.columns[self.rank]
        if tensor.shape[dim] != self.segments.shape[1]:
            raise ValueError(f"a tensor with {tensor.shape[dim]} tokens on dimension {dim} does not belong to this "
                             f"split of {self.segments.shape[1]} tokens per row")
        if cols.numel() and int(cols[-1] - cols[0]) + 1 == cols.numel():
            return tensor.narrow(dim, int(cols[0]), int(cols.numel()))
        return tensor.index_select(dim, cols.to(tensor.device))

    def position_ids(self, device=None):
        """Position ids of this rank's tokens `[B, T_r]` (packed: `[1, N_r]`): a packed token's index in its sequence,
        a padded token's column (what a transformers model uses when given no position_ids)."""
        cols = self.columns[self.rank]
        if self.packed:
            seg = self.segments[0]
            starts = torch.searchsorted(seg, seg, right=False)  # first index of each token's segment (sorted ids)
            pos = (torch.arange(seg.numel()) - starts)[cols]
            return pos.unsqueeze(0).to(device)
        return cols.unsqueeze(0).expand(self.segments.shape[0], -1).to(device)

    def local_cu_seqlens(self, device=None):
        """Packed: `[S + 1]` boundaries of this rank's slices of the S sequences (empty slices allowed)."""
        if not self.packed:
            raise ValueError("local_cu_seqlens: a padded split has no cu_seqlens (every row is one sequence)")
        seg = self.segments[0][self.columns[self.rank]]
        lengths = torch.bincount(seg, minlength=self.n_segments)
        return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device)

    # ---- what the attention reads -------------------------------------------------------------------------------
    def chunks(self, rank):
        """The chunks (see `Chunk`) of rank `rank`, in local token order; computed once per split."""
        if self._chunks is None:
            self._chunks = [_chunks_of(c, self.segments) for c in self.columns]
        return self._chunks[rank]

    def earlier(self, chunk):
        """(rank, chunk) of every chunk of any rank in the same row and segment that precedes `chunk`."""
        out = []
        for w in range(self.world):
            out += [(w, c) for c in self.chunks(w)
                    if c.row == chunk.row and c.segment == chunk.segment and c.order < chunk.order]
        return out

    def longest_segment(self):
        """Tokens of the longest segment (a sliding window shorter than this changes the attention)."""
        seg = self.segments[self.segments >= 0]
        return int(torch.bincount(seg).max()) if seg.numel() else 0


def _chunks_of(columns, segments):
    """Chunks of the local tokens `columns` (global column indices) over `segments` [B, T]."""
    real = segments >= 0
    order = real.to(torch.int64).cumsum(1) - 1          # rank of each real token among its row's real tokens
    out = []
    for row in range(segments.shape[0]):
        seg = segments[row, columns]
        keep = (seg >= 0).nonzero().squeeze(1)
        if keep.numel() == 0:
            continue
        seg, rank_in_row = seg[keep], order[row, columns[keep]]
        # a new chunk where the segment changes or a real token of the row (held elsewhere) lies between two tokens
        start = torch.ones(keep.numel(), dtype=torch.bool)
        start[1:] = (seg[1:] != seg[:-1]) | (rank_in_row[1:] - rank_in_row[:-1] != 1)
        bounds = start.nonzero().squeeze(1).tolist() + [keep.numel()]
        for a, b in zip(bounds[:-1], bounds[1:]):
            pos = keep[a:b]
            first = int(pos[0])
            out.append(Chunk(row, int(seg[a]), int(rank_in_row[a]), pos, first,
                             int(pos[-1]) - first + 1 == pos.numel()))
    return out


def _checked(group, balanced):
    check_group("context-parallel group", group)
    if not isinstance(balanced, bool):
        raise TypeError(f"balanced must be a bool, got {type(balanced).__name__}")


def split_padded(group, attention_mask=None, *, shape=None, balanced=False) -> SequenceSplit:
    """A padded batch `[B, T]` over `group`: rank r holds the same columns of every row. `attention_mask` [B, T]
    (1 = real token; any padding, left or right, holes) or, without padding, `shape=(B, T)`."""
    _checked(group, balanced)
    if attention_mask is None:
        if shape is None:
            raise ValueError("split_padded needs attention_mask or shape=(B, T)")
        real = torch.ones(tuple(shape), dtype=torch.bool)
    else:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a [B, T] tensor")
        real = attention_mask.detach().cpu() != 0
    B, T = real.shape
    world = dist.get_world_size(group)
    if T < world:
        raise ValueError(f"a padded batch of {T} columns cannot give each of {world} ranks a column")
    segments = torch.where(real, torch.zeros(B, T, dtype=torch.int64), torch.full((B, T), -1))
    return SequenceSplit(group, part_columns(T, world, balanced), segments, False, balanced)


def split_packed(group, cu_seqlens, *, balanced=False) -> SequenceSplit:
    """A padding-free row `[1, N]` of S sequences (`cu_seqlens` [S + 1]) over `group`: every rank holds a slice of
    every sequence (its `part_columns` of that sequence)."""
    _checked(group, balanced)
    cu = torch.as_tensor(cu_seqlens).detach().cpu().to(torch.int64)
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be a non-decreasing 1-D tensor starting at 0, got {cu.tolist()}")
    world = dist.get_world_size(group)
    lengths = (cu[1:] - cu[:-1]).tolist()
    parts = [[] for _ in range(world)]
    for s, length in enumerate(lengths):
        for w, cols in enumerate(part_columns(length, world, balanced)):
            parts[w].append(cols + int(cu[s]))
    columns = [torch.cat(p) for p in parts]
    if min(c.numel() for c in columns) == 0:
        raise ValueError(f"{int(cu[-1])} packed tokens leave a rank of {world} without a token")
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).unsqueeze(0)
    return SequenceSplit(group, columns, segments, True, balanced, n_segments=len(lengths))


def split_batch(batch, group, *, balanced=False):
    """This rank's share of a batch dict of the trainer's layout (prefopt/trainer/data.py `collate`): padded
    `input_ids` / `attention_mask` / `labels` / `completion_mask` `[B, T]`, or packed `[1, N]` with `position_ids` and
    `cu_seqlens`. Labels must already be shifted on the whole sequence (label t = token t + 1, which may be another
    rank's token). Returns a new dict: every `[B, T]` entry sliced, `position_ids` of the local tokens, the local
    `cu_seqlens` (packed), other entries as they are, and the split under "context_split"."""
    ids = batch["input_ids"]
    if batch.get("cu_seqlens") is not None:
        split = split_packed(group, batch["cu_seqlens"], balanced=balanced)
    else:
        split = split_padded(group, batch.get("attention_mask"), shape=tuple(ids.shape), balanced=balanced)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and tuple(value.shape) == tuple(ids.shape):
            out[key] = split.shard(value)
        else:
            out[key] = value
    if out.get("position_ids") is None:  # given ones were sliced above
        out["position_ids"] = split.position_ids(ids.device)
    if split.packed:
        out["cu_seqlens"] = split.local_cu_seqlens(ids.device)
    out["context_split"] = split
    return out
