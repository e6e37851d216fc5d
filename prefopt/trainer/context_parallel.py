"""`prefopt train --context_parallel N`: every sequence of a micro-batch split over N ranks.

The world is a data x context grid: ranks [k N, (k + 1) N) form context-parallel group k (consecutive ranks, so a
group shares a node when the launcher fills nodes in rank order), and group k is data-parallel replica k. All ranks of a
group read the same rows; each holds 1/N of every sequence's tokens (prefopt/parallel/context.py, contiguous layout)
with their global position ids (contiguous parts, or with `--context_parallel_balanced` a head and a tail part each);
the attention gathers the group's keys and values (prefopt/parallel/attention.py) and the loss sums the sequences over
the group (`sequence_parallel_group`).

Gradients. Every rank of a group backpropagates the same loss through its own tokens, so its parameter gradients
are partial: the group's gradient is their *sum*. Data-parallel replicas *average*. The trainer's one reduction
(DDP's all-reduce, or FSDP's reduce-scatter, over the whole world) averages over data x context ranks, so the loss is
multiplied by N before the backward (`gradient_scale`): the world average is then the mean over replicas of the
group sums, with no second collective.
"""
from __future__ import annotations

import torch.distributed as dist

from prefopt.parallel.context import split_batch
from prefopt.trainer.config import PrefoptInputError


class ContextParallel:
    """This rank's place in the data x context grid of `--context_parallel size` over `world` ranks."""

    def __init__(self, size: int, rank: int, world: int, balanced: bool = False):
        if world % size:
            raise PrefoptInputError(f"--context_parallel {size} needs a world size divisible by it; torchrun started "
                                    f"{world} processes")
        self.size = size
        self.balanced = balanced
        self.data_world, self.data_rank = world // size, rank // size
        self.rank_in_group = rank % size
        self.group = None
        if size > 1:
            # every rank creates every group (new_group is collective over the world), then keeps its own
            groups = [dist.new_group(list(range(k * size, (k + 1) * size))) for k in range(self.data_world)]
            self.group = groups[self.data_rank]

    @property
    def on(self) -> bool:
        return self.size > 1

    @property
    def gradient_scale(self) -> float:
        """The factor on the loss that turns the world-averaging reduction into sum-over-group, mean-over-replicas."""
        return float(self.size)

    def shard(self, batch):
        """This rank's share of a collated batch (every `[B, T]` tensor sliced, position ids, local cu_seqlens, the
        split under "context_split"); the batch itself when off."""
        return split_batch(batch, self.group, balanced=self.balanced) if self.on else batch


def check_model(adapter, size):
    """A model the split can run: a transformers model on sdpa (switched to prefopt_cp here), or a protocol module
    that declares `context_parallel = True` (its attention reads batch["context_split"])."""
    if size == 1:
        return
    module = adapter.module
    if type(adapter).__name__ == "HFCausalLMAdapter":
        from prefopt.integrations.context_parallel import use_context_parallel
        try:
            use_context_parallel(module)
        except (ValueError, RuntimeError) as err:
            raise PrefoptInputError(f"--context_parallel: {err}") from None
        return
    if getattr(module, "context_parallel", False) is not True:
        raise PrefoptInputError(f"--context_parallel: {type(module).__name__} is a protocol module; its attention must "
                                "attend over the whole split sequence (prefopt.parallel.attention.context_attention "
                                "with batch['context_split']) and it must say so with `context_parallel = True`")
