"""prefopt: fused kernels for preference optimization (DPO family) of language models."""
from prefopt._backend import BACKENDS, backend_info, use_backend
from prefopt.api import linear_logprobs, logprobs_from_logits, sequence_logps

__version__ = "0.1.0"

__all__ = ["BACKENDS", "backend_info", "use_backend", "linear_logprobs", "logprobs_from_logits", "sequence_logps"]

try:  # the loss family lives in its own subpackage
    from prefopt.losses import kto_loss, preference_loss  # noqa: F401
    __all__ += ["preference_loss", "kto_loss"]
except ImportError:  # pragma: no cover - only while the losses subpackage is being built
    pass
