"""prefopt: fused kernels for preference optimization (DPO family) of language models."""
from prefopt._source_tree import register_kernels_package

register_kernels_package()

from prefopt import nn  # noqa: E402
from prefopt._backend import BACKENDS, HEADS, backend_info, head_choice, use_backend, use_head, use_tiles  # noqa: E402
from prefopt.api import linear_logprobs, logprobs_from_logits, sequence_logps  # noqa: E402
from prefopt.fused import fused_linear_dpo_loss, fused_linear_preference_loss  # noqa: E402
from prefopt.losses import kto_loss, preference_loss  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BACKENDS", "HEADS", "backend_info", "head_choice", "use_backend", "use_head", "use_tiles",
           "linear_logprobs", "logprobs_from_logits", "sequence_logps", "preference_loss", "kto_loss",
           "fused_linear_preference_loss", "fused_linear_dpo_loss", "nn"]
