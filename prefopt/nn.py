"""nn.Module forms of the fused losses, called like Liger's modules: loss_fn(lm_head.weight, hidden, labels)."""
from __future__ import annotations

import torch

from prefopt.fused import fused_linear_preference_loss


class FusedLinearPreferenceLoss(torch.nn.Module):
    """Holds the loss options (TRL DPOConfig names); forward takes the head weight, hidden states and labels.

    >>> loss_fn = FusedLinearPreferenceLoss(loss_type="sigmoid", beta=0.1)
    >>> loss, metrics = loss_fn(model.lm_head.weight, hidden, labels, ref_hidden=ref_hidden, ref_weight=ref_w)

    Liger's options pass through the constructor (`average_log_prob=True`, `return_aux=True` for Liger's
    (loss, aux) return); Liger's own class names and defaults are in `prefopt.integrations.liger`.
    """

    def __init__(self, loss_type="sigmoid", beta=0.1, *, ignore_index=-100, temperature=1.0, softcap=None,
                 logit_scale=1.0, chunk_size=None, logits_cache_mb=None, **loss_options):
        super().__init__()
        self.options = dict(loss_type=loss_type, beta=beta, ignore_index=ignore_index, temperature=temperature,
                            softcap=softcap, logit_scale=logit_scale, chunk_size=chunk_size,
                            logits_cache_mb=logits_cache_mb, **loss_options)

    # ref_hidden, ref_weight, ref_bias may be positional, in Liger's order (lin_weight, _input, target, bias,
    # ref_input, ref_weight, ref_bias)
    def forward(self, weight, hidden, labels, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None, *,
                ref_chosen_logps=None, ref_rejected_logps=None, cu_seqlens=None, nll_target=None):
        return fused_linear_preference_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden,
                                            ref_weight=ref_weight, ref_bias=ref_bias,
                                            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                                            cu_seqlens=cu_seqlens, nll_target=nll_target, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


FusedLinearDPOLoss = FusedLinearPreferenceLoss
