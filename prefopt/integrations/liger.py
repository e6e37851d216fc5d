"""Liger-Kernel's chunked preference losses, called exactly like Liger's, on prefopt's fused head.

    from prefopt.integrations.liger import LigerFusedLinearDPOLoss     # was: from liger_kernel.chunked_loss import ...

Same constructor arguments, the same forward argument order (`lin_weight, _input, target, bias, ref_input,
ref_weight, ref_bias` for the paired losses; `_input, lin_weight, target, bias, preference_labels, ...` for KTO),
and the same return structure: `(loss, aux)` with aux the per-pair / per-batch outputs Liger returns:

    DPO   (chosen_logps [P], rejected_logps [P], chosen_logits_mean, rejected_logits_mean, nll_loss,
           chosen_rewards [P], rejected_rewards [P])
    ORPO  (... first five ..., chosen_rewards [P], rejected_rewards [P], log_odds_ratio, log_odds_chosen)
    SimPO, CPO  (... first five ..., chosen_rewards [P], rejected_rewards [P])
    KTO   (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum, chosen_rewards_sum,
           rejected_rewards_sum)

The functional forms `liger_fused_linear_dpo(...)` etc. take the positional order of Liger's
`LigerFusedLinear*Function.apply`. Every per-pair formula comes from prefopt's loss table (`preference_loss`,
`kto_loss`); this module only maps Liger's options onto it, reproducing Liger's semantics:
* `average_log_prob`: per-sequence mean instead of sum (Liger's defaults: DPO / CPO / KTO sum, ORPO / SimPO mean).
* `compute_nll_loss` + `alpha`: adds `alpha` x the chosen NLL (token mean over the chosen rows of `nll_target`,
  ORPO, or of `target`); without it the NLL term is absent (ORPO included).
* `label_smoothing` acts on robust / exo_pair (DPO) and on SimPO / CPO; Liger's DPO `sigmoid` ignores it.
* `use_ref_model=False`: reference log-probs are 0. KTO's `kl` is used as given (not clamped); without it, no KL.
* `compiled` and `chunk_size` are accepted and have no effect: prefopt tiles its own head and never builds logits.
* The logits means are over every position of the rows (padding included) and the whole vocabulary, as Liger's;
  prefopt gets them from `hidden @ weight.sum(0)` (the sum of a row's logits), not from the logits.
"""
from __future__ import annotations

import torch

import prefopt
from prefopt._aux_outputs import logits_sum, paired_aux
from prefopt._validation import check_liger_inputs

__all__ = ["LigerFusedLinearDPOLoss", "LigerFusedLinearORPOLoss", "LigerFusedLinearSimPOLoss",
           "LigerFusedLinearCPOLoss", "LigerFusedLinearKTOLoss", "liger_fused_linear_dpo", "liger_fused_linear_orpo",
           "liger_fused_linear_simpo", "liger_fused_linear_cpo", "liger_fused_linear_kto"]

# Liger DPO's label_smoothing reaches only these losses (its sigmoid has no cDPO term)
_DPO_SMOOTHED = ("robust", "exo_pair")


def _sequence_logps(hidden, weight, target, bias, ignore_index, average_log_prob):
    """Per-row log-prob sums (or means) through the fused head, and the per-token values for the NLL."""
    token_logps = prefopt.linear_logprobs(hidden, weight, target, bias, ignore_index=ignore_index)
    mask = target != ignore_index
    return prefopt.sequence_logps(token_logps, mask, average=average_log_prob), token_logps, mask


def _reference_logps(ref_input, ref_weight, ref_bias, target, ignore_index, average_log_prob, like):
    if ref_input is None:
        return torch.zeros_like(like)
    with torch.no_grad():
        logps, _, _ = _sequence_logps(ref_input.detach(), ref_weight.detach(), target,
                                      None if ref_bias is None else ref_bias.detach(), ignore_index, average_log_prob)
    return logps


def _chosen_nll(hidden, weight, bias, target, nll_target, token_logps, mask, ignore_index, n_pairs):
    """Liger's NLL: summed over the chosen rows, divided by their count of non-ignored targets."""
    if nll_target is None:
        return -(token_logps[:n_pairs] * mask[:n_pairs]).sum() / mask[:n_pairs].sum()
    nll_target = nll_target[:n_pairs]
    nll_logps = prefopt.linear_logprobs(hidden[:n_pairs], weight, nll_target, bias, ignore_index=ignore_index)
    return -nll_logps.sum() / (nll_target != ignore_index).sum()


def _paired(name, _input, weight, target, bias, *, ignore_index, beta, alpha, compute_nll_loss, average_log_prob,
            loss_type, nll_target=None, use_ref_model=False, ref_input=None, ref_weight=None, ref_bias=None,
            **loss_options):
    check_liger_inputs(name, _input, weight, target, use_ref_model=use_ref_model, ref_input=ref_input,
                       ref_weight=ref_weight, loss_type=loss_options.pop("liger_dpo_type", None))
    n_pairs = _input.shape[0] // 2
    logps, token_logps, mask = _sequence_logps(_input, weight, target, bias, ignore_index, average_log_prob)
    nll = _chosen_nll(_input, weight, bias, target, nll_target, token_logps, mask, ignore_index, n_pairs) \
        if compute_nll_loss else torch.zeros((), dtype=logps.dtype, device=logps.device)
    ref = _reference_logps(ref_input if use_ref_model else None, ref_weight, ref_bias, target, ignore_index,
                           average_log_prob, logps.detach())
    chosen, rejected = logps[:n_pairs], logps[n_pairs:]
    ref_free = loss_type in ("orpo", "simpo", "cpo")
    if ref_free:
        ones = torch.ones_like(chosen.detach())
        # the sequences are already reduced (sum or mean, as asked): lengths of 1 keep the table from averaging
        # again, and the NLL is passed reduced (0-dim), with its coefficient
        pref, metrics = prefopt.preference_loss(chosen, rejected, loss_type=loss_type, beta=beta,
                                                chosen_lengths=ones, rejected_lengths=ones, chosen_nll=nll,
                                                **loss_options)
        chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
        loss = pref
    else:
        pref, metrics = prefopt.preference_loss(chosen, rejected, ref[:n_pairs], ref[n_pairs:], loss_type=loss_type,
                                                beta=beta, **loss_options)
        chosen_rewards = beta * (chosen.detach() - ref[:n_pairs])
        rejected_rewards = beta * (rejected.detach() - ref[n_pairs:])
        loss = pref + alpha * nll if compute_nll_loss else pref
    aux = paired_aux(chosen, rejected, _input[:n_pairs], _input[n_pairs:], weight, bias, nll, chosen_rewards,
                     rejected_rewards)
    return loss, aux, metrics


# ---------------------------------------------------------------------------------------------------------------
# functional forms: the positional order of Liger's LigerFusedLinear*Function.apply
# ---------------------------------------------------------------------------------------------------------------
def liger_fused_linear_dpo(_input, weight, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None,
                           ignore_index=-100, beta=0.1, compute_nll_loss=False, compiled=True, use_ref_model=True,
                           average_log_prob=False, chunk_size=1, loss_type="sigmoid", label_smoothing=0.0,
                           discopop_tau=0.05, alpha=1.0):
    loss, aux, _ = _paired("liger_fused_linear_dpo", _input, weight, target, bias, ignore_index=ignore_index,
                           beta=beta, alpha=alpha, compute_nll_loss=compute_nll_loss,
                           average_log_prob=average_log_prob, loss_type=loss_type, liger_dpo_type=loss_type,
                           use_ref_model=use_ref_model, ref_input=ref_input, ref_weight=ref_weight,
                           ref_bias=ref_bias, discopop_tau=discopop_tau,
                           label_smoothing=label_smoothing if loss_type in _DPO_SMOOTHED else 0.0)
    return loss, aux


def liger_fused_linear_orpo(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, compute_nll_loss=True,
                            nll_target=None, compiled=True, chunk_size=1):
    loss, aux, metrics = _paired("liger_fused_linear_orpo", _input, weight, target, bias, ignore_index=ignore_index,
                                 beta=beta, alpha=1.0, compute_nll_loss=compute_nll_loss, average_log_prob=True,
                                 loss_type="orpo", nll_target=nll_target)
    return loss, aux + (metrics["log_odds_ratio"], metrics["log_odds_chosen"])


def liger_fused_linear_simpo(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, alpha=1.0,
                             label_smoothing=0.0, compute_nll_loss=False, compiled=True, gamma=0.5, chunk_size=1):
    loss, aux, _ = _paired("liger_fused_linear_simpo", _input, weight, target, bias, ignore_index=ignore_index,
                           beta=beta, alpha=alpha, compute_nll_loss=compute_nll_loss, average_log_prob=True,
                           loss_type="simpo", simpo_gamma=gamma, label_smoothing=label_smoothing,
                           cpo_alpha=alpha if compute_nll_loss else 0.0)
    return loss, aux


def liger_fused_linear_cpo(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, alpha=1.0,
                           label_smoothing=0.0, compute_nll_loss=True, compiled=True, average_log_prob=False,
                           chunk_size=1):
    loss, aux, _ = _paired("liger_fused_linear_cpo", _input, weight, target, bias, ignore_index=ignore_index,
                           beta=beta, alpha=alpha, compute_nll_loss=compute_nll_loss,
                           average_log_prob=average_log_prob, loss_type="cpo", label_smoothing=label_smoothing,
                           cpo_alpha=alpha if compute_nll_loss else 0.0)
    return loss, aux


def _liger_kl(kl):
    """Liger's KTO subtracts `kl` from every example's log-ratio by broadcasting, so one KL of shape (1,) (what
    Liger's own tests pass) is the batch's KL, as a 0-dim one is. A per-example KL is refused: Liger applies it
    chunk by chunk, where a (B,) tensor does not line up with the examples."""
    if isinstance(kl, torch.Tensor) and kl.dim() > 0:
        if tuple(kl.shape) != (1,):
            raise ValueError(f"liger_fused_linear_kto: kl must be one KL for the batch (a float, a 0-dim tensor or "
                             f"shape (1,)), got shape {tuple(kl.shape)}")
        return kl.reshape(())
    return kl


def liger_fused_linear_kto(_input, weight, target, preference_labels, bias=None, ref_input=None, ref_weight=None,
                           ref_bias=None, kl=None, ignore_index=-100, beta=0.1, compiled=True, use_ref_model=True,
                           average_log_prob=False, chunk_size=1):
    check_liger_inputs("liger_fused_linear_kto", _input, weight, target, use_ref_model=use_ref_model,
                       ref_input=ref_input, ref_weight=ref_weight, unpaired=True,
                       preference_labels=preference_labels)
    logps, _, _ = _sequence_logps(_input, weight, target, bias, ignore_index, average_log_prob)
    ref = _reference_logps(ref_input if use_ref_model else None, ref_weight, ref_bias, target, ignore_index,
                           average_log_prob, logps.detach())
    loss, _ = prefopt.kto_loss(logps, ref, preference_labels, beta=beta, kl=_liger_kl(kl),
                               loss_type="kto" if kl is not None else "apo_zero_unpaired")
    lab = preference_labels
    rewards = beta * (logps.detach() - ref)
    aux = (logps.detach()[lab].sum(), logps.detach()[~lab].sum(), logits_sum(_input[lab], weight, bias),
           logits_sum(_input[~lab], weight, bias), rewards[lab].sum(), rewards[~lab].sum())
    return loss, aux


# ---------------------------------------------------------------------------------------------------------------
# modules: Liger's constructor arguments and forward signatures
# ---------------------------------------------------------------------------------------------------------------
class LigerFusedLinearDPOLoss(torch.nn.Module):
    def __init__(self, ignore_index=-100, beta=0.1, alpha=1.0, compute_nll_loss=False, compiled=True,
                 use_ref_model=True, average_log_prob=False, chunk_size=1, loss_type="sigmoid", label_smoothing=0.0,
                 discopop_tau=0.05):
        super().__init__()
        self.ignore_index, self.beta, self.alpha = ignore_index, beta, alpha
        self.compute_nll_loss, self.compiled, self.use_ref_model = compute_nll_loss, compiled, use_ref_model
        self.average_log_prob, self.chunk_size, self.loss_type = average_log_prob, chunk_size, loss_type
        self.label_smoothing, self.discopop_tau = label_smoothing, discopop_tau

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        return liger_fused_linear_dpo(_input, lin_weight, target, bias, ref_input, ref_weight, ref_bias,
                                      self.ignore_index, self.beta, self.compute_nll_loss, self.compiled,
                                      self.use_ref_model, self.average_log_prob, self.chunk_size, self.loss_type,
                                      self.label_smoothing, self.discopop_tau, self.alpha)


class LigerFusedLinearORPOLoss(torch.nn.Module):
    def __init__(self, ignore_index=-100, beta=0.1, compute_nll_loss=True, compiled=True, chunk_size=1):
        super().__init__()
        self.ignore_index, self.beta, self.compute_nll_loss = ignore_index, beta, compute_nll_loss
        self.compiled, self.chunk_size = compiled, chunk_size

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        return liger_fused_linear_orpo(_input, lin_weight, target, bias, self.ignore_index, self.beta,
                                       self.compute_nll_loss, nll_target, self.compiled, self.chunk_size)


class LigerFusedLinearSimPOLoss(torch.nn.Module):
    def __init__(self, ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=True,
                 compiled=True, gamma=0.5, chunk_size=1):
        super().__init__()
        self.ignore_index, self.beta, self.alpha, self.label_smoothing = ignore_index, beta, alpha, label_smoothing
        self.compute_nll_loss, self.compiled, self.gamma, self.chunk_size = compute_nll_loss, compiled, gamma, \
            chunk_size

    def forward(self, lin_weight, _input, target, bias=None):
        return liger_fused_linear_simpo(_input, lin_weight, target, bias, self.ignore_index, self.beta, self.alpha,
                                        self.label_smoothing, self.compute_nll_loss, self.compiled, self.gamma,
                                        self.chunk_size)


class LigerFusedLinearCPOLoss(torch.nn.Module):
    def __init__(self, ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=True,
                 compiled=True, average_log_prob=False, chunk_size=1):
        super().__init__()
        self.ignore_index, self.beta, self.alpha, self.label_smoothing = ignore_index, beta, alpha, label_smoothing
        self.compute_nll_loss, self.compiled = compute_nll_loss, compiled
        self.average_log_prob, self.chunk_size = average_log_prob, chunk_size

    def forward(self, lin_weight, _input, target, bias=None):
        return liger_fused_linear_cpo(_input, lin_weight, target, bias, self.ignore_index, self.beta, self.alpha,
                                      self.label_smoothing, self.compute_nll_loss, self.compiled,
                                      self.average_log_prob, self.chunk_size)


class LigerFusedLinearKTOLoss(torch.nn.Module):
    def __init__(self, ignore_index=-100, beta=0.1, compiled=True, use_ref_model=False, average_log_prob=False,
                 chunk_size=1):
        super().__init__()
        self.ignore_index, self.beta, self.compiled = ignore_index, beta, compiled
        self.use_ref_model, self.average_log_prob, self.chunk_size = use_ref_model, average_log_prob, chunk_size

    def forward(self, _input, lin_weight, target, bias=None, preference_labels=None, ref_input=None, ref_weight=None,
                ref_bias=None, kl=None):
        return liger_fused_linear_kto(_input, lin_weight, target, preference_labels, bias, ref_input, ref_weight,
                                      ref_bias, kl, self.ignore_index, self.beta, self.compiled, self.use_ref_model,
                                      self.average_log_prob, self.chunk_size)
