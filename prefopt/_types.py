"""Small result containers shared by every backend."""
from collections import namedtuple

# Per-row statistics of log_softmax(z) that the forward of every backend returns (all float32 [n]).
# logp: log-prob of the label (0 on ignored rows); lse: log-sum-exp of z; entropy: H(p) or None;
# log_sum_p2: log(sum_v p_v^2) for WPO weights, or None.
RowStats = namedtuple("RowStats", "logp lse entropy log_sum_p2")
