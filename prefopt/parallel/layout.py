"""Which vocabulary rows each rank of a vocabulary-parallel group holds, settled once per call."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def check_group(name, group):
    """A process group argument: a torch.distributed ProcessGroup of an initialised default group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{name} needs torch.distributed initialised (dist.init_process_group) on every rank")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD or dist.new_group), "
                        f"got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"this rank ({dist.get_rank()}) is not a member of {name}")
    return group


@dataclass(frozen=True)
class VocabShard:
    """This rank's contiguous rows [start, stop) of a vocabulary of `vocab` rows split over `group`.

    `starts`/`stops` hold every rank's range in group-rank order (the same on every rank), so any rank can tell
    which rank owns a label."""

    group: object
    rank: int
    start: int
    stop: int
    vocab: int
    starts: tuple
    stops: tuple

    def local_labels(self, labels):
        """-> (labels as rows of this shard, foreign mask). A label held by another rank becomes row 0: the head
        needs some row of its slice, and the onehot term that row then receives is taken back out in the
        backward (vocab.py)."""
        foreign = (labels < self.start) | (labels >= self.stop)
        local = torch.where(foreign, torch.zeros_like(labels), labels - self.start)
        return local, foreign

    def owners(self, labels):
        """The group rank holding each label."""
        starts = torch.tensor(self.starts, dtype=torch.int64, device=labels.device)
        order = torch.argsort(starts)
        stops = torch.tensor(self.stops, dtype=torch.int64, device=labels.device)[order]
        return order[torch.bucketize(labels, stops, right=True).clamp_(max=len(self.starts) - 1)]


def _labels_fingerprint(labels):
    """(count, sum, position-weighted sum) of the labels in int64: equal on every rank when the ranks hold the same
    labels (weights below 1021 keep the sums far from overflow at any N and V a head sees)."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        return [-1, 0, 0]
    flat = labels.reshape(-1).long()
    weights = torch.arange(flat.numel(), device=flat.device) % 1021 + 1
    return [flat.numel(), int(flat.sum()), int((flat * weights).sum())]


def settle_vocab_shard(group, weight, vocab_start=None, labels=None, *, name="vocab_parallel_group"
                       ) -> VocabShard | None:
    """One all-gather of every rank's (vocab_start, rows) over `group`; every rank then checks the same table,
    so a bad layout raises the same error everywhere instead of hanging a collective later.

    Default layout: ranks hold consecutive ranges in group-rank order (rank r starts after the rows of ranks
    < r), which is any contiguous split, even or not. With `vocab_start` every rank says where its rows start;
    the ranges must then tile [0, V) exactly."""
    check_group(name, group)
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)
                                   or vocab_start < 0):
        raise ValueError(f"vocab_start must be None or an int >= 0, got {vocab_start!r}")
    rows = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() >= 1 else -1
    # the labels' fingerprint rides along: a vocabulary split needs the same tokens on every rank, and different
    # labels would otherwise give each rank a silently wrong merge
    mine = torch.tensor([-1 if vocab_start is None else vocab_start, rows, *_labels_fingerprint(labels)],
                        dtype=torch.int64, device=_comm_device(weight, group))
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    table = torch.stack(table).cpu().tolist()
    if rows < 0:
        return None  # no 2-D weight here: the head's own checks (prefopt/_validation.py) say what is wrong
    given = [row[0] for row in table]
    sizes = [row[1] for row in table]
    if labels is not None and any(row[2:] != table[0][2:] for row in table):
        raise ValueError(f"every rank of {name} must hold the same labels (and tokens); (count, sum, weighted sum) "
                         f"per rank: {[tuple(row[2:]) for row in table]}")
    if min(sizes) < 1:
        raise ValueError(f"every rank of {name} must hold at least one vocabulary row of a 2-D weight; "
                         f"rows per rank: {sizes}")
    if all(start == -1 for start in given):
        starts = [sum(sizes[:r]) for r in range(len(sizes))]
    elif any(start == -1 for start in given):
        raise ValueError(f"vocab_start must be given on every rank of {name} or on none; got {given} "
                         "(-1 = not given)")
    else:
        starts = given
        covered = 0
        for start, size in sorted(zip(starts, sizes)):
            if start != covered:
                raise ValueError(f"the vocabulary rows of {name} must tile [0, V) without gaps or overlaps; "
                                 f"(vocab_start, rows) per rank: {list(zip(starts, sizes))}")
            covered += size
    rank = dist.get_rank(group)
    stops = [start + size for start, size in zip(starts, sizes)]
    return VocabShard(group, rank, starts[rank], stops[rank], sum(sizes), tuple(starts), tuple(stops))


def _comm_device(tensor, group):
    """Collectives of the nccl backend take CUDA tensors; gloo takes CPU ones."""
    backend = dist.get_backend(group)
    if "nccl" in str(backend) and isinstance(tensor, torch.Tensor) and tensor.is_cuda:
        return tensor.device
    if "nccl" in str(backend):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
