"""Sequence- and vocabulary-parallel log-probs over torch.distributed process groups.

The kernels never see a process group: each rank runs the ordinary head on its slice (its tokens, or its rows of
the vocabulary), and these modules merge the slices' statistics with torch.distributed collectives between the
kernel launches, in the forward and in the backward.

- layout.py       which vocabulary rows each rank holds (`VocabShard`), settled once per call by one all-gather
- collectives.py  the autograd-aware collectives (sum over a group, gather of per-rank rows), and a teardown
                  that does not abort under gloo
- vocab.py        the merge of per-shard (lse, target log-prob, entropy, log sum p^2) and the vocabulary-parallel
                  autograd Function of the fused linear head
- sequence.py     per-sequence sums whose tokens are spread over a group
- context.py      context parallelism: which tokens of a batch each rank of a group holds (`SequenceSplit`)
- attention.py    causal attention of a rank's queries over the group's keys and values (`context_attention`)
"""
from prefopt.parallel.attention import context_attention
from prefopt.parallel.collectives import destroy_process_group
from prefopt.parallel.context import SequenceSplit, split_batch, split_packed, split_padded
from prefopt.parallel.layout import VocabShard, check_group, settle_vocab_shard
from prefopt.parallel.sequence import sequence_parallel_sums
from prefopt.parallel.vocab import VocabParallelLinearLogprobsFunction, merge_vocab_shards

__all__ = ["destroy_process_group", "VocabShard", "check_group", "settle_vocab_shard", "sequence_parallel_sums",
           "VocabParallelLinearLogprobsFunction", "merge_vocab_shards", "context_attention", "SequenceSplit",
           "split_batch", "split_packed", "split_padded"]
