"""Plain-torch autograd references of the preference losses, written straight from TRL's trainers
(TRL 1.16 DPOTrainer._compute_loss, CPOTrainer.cpo_loss, ORPOTrainer.odds_ratio_loss, KTOTrainer._compute_loss),
independently of prefopt/losses/table.py. Tests compare prefopt against these; no validation here.

Deliberate extensions over TRL 1.16 (documented in README.md (section "Losses")):
* sigmoid takes cDPO label smoothing (TRL <= 0.x behaviour; identical to TRL 1.16 at label_smoothing=0);
* bco_pair takes the reward shift `bco_running_mean` (TRL 0.x's running mean; TRL 1.16 has none, i.e. 0.0);
* alpha_divergence clamps the exponent at 80 for float64 too (TRL only lists fp16/bf16/fp32);
* the NLL terms take chosen_nll (0-dim batch NLL, or per-pair sums turned into a token mean).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _nll_value(chosen_nll, nll_lengths, chosen_lengths):
    if chosen_nll.dim() == 0:
        return chosen_nll
    counts = nll_lengths if nll_lengths is not None else chosen_lengths
    return chosen_nll.sum() / counts.to(chosen_nll.dtype).clamp(min=1.0).sum().clamp(min=1.0)


def reference_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, loss_type="sigmoid",
                       beta=0.1, label_smoothing=0.0, loss_weights=None, f_divergence_type="reverse_kl",
                       f_alpha_divergence_coef=0.5, discopop_tau=0.05, chosen_lengths=None, rejected_lengths=None,
                       chosen_nll=None, nll_lengths=None, rpo_alpha=None, policy_weights=None,
                       bco_running_mean=None):
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    loss_weights = loss_weights or [1.0] * len(loss_types)
    device = chosen_logps.device
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps

    if f_divergence_type == "reverse_kl":
        chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    elif f_divergence_type == "forward_kl":
        chosen_scores = 1 - torch.exp(-chosen_logratios)
        rejected_scores = 1 - torch.exp(-rejected_logratios)
    elif f_divergence_type == "js_divergence":
        chosen_scores = math.log(2) + F.logsigmoid(chosen_logratios)
        rejected_scores = math.log(2) + F.logsigmoid(rejected_logratios)
    elif f_divergence_type == "alpha_divergence":
        if abs(f_alpha_divergence_coef - 1.0) < 1e-6:
            chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
        else:
            coef = 1.0 / (f_alpha_divergence_coef - 1.0)
            t_chosen = (f_alpha_divergence_coef - 1.0) * chosen_logratios
            t_rejected = (f_alpha_divergence_coef - 1.0) * rejected_logratios
            clamp_max = 11.0 if t_chosen.dtype == torch.float16 else 80.0
            chosen_scores = (torch.exp(torch.clamp(t_chosen, max=clamp_max)) - 1.0) * coef
            rejected_scores = (torch.exp(torch.clamp(t_rejected, max=clamp_max)) - 1.0) * coef
    else:
        raise ValueError(f_divergence_type)
    delta_score = chosen_scores - rejected_scores

    nll = None
    if chosen_nll is not None:
        nll = _nll_value(chosen_nll, nll_lengths, chosen_lengths)

    loss = 0.0
    for lt, lw in zip(loss_types, loss_weights):
        if lt == "sigmoid":
            per = (-F.logsigmoid(beta * delta_score) * (1 - label_smoothing)
                   - F.logsigmoid(-beta * delta_score) * label_smoothing)
        elif lt == "hinge":
            per = torch.relu(1 - beta * delta_score)
        elif lt == "ipo":
            ca = chosen_scores / chosen_lengths.to(chosen_scores.dtype).clamp(min=1.0)
            ra = rejected_scores / rejected_lengths.to(rejected_scores.dtype).clamp(min=1.0)
            per = (ca - ra - 1 / (2 * beta)) ** 2
        elif lt == "exo_pair":
            epsilon = torch.tensor(label_smoothing, device=device, dtype=delta_score.dtype)
            qw = torch.sigmoid(beta * delta_score)
            log_qw = F.logsigmoid(beta * delta_score)
            log_pw = torch.log1p(-epsilon)
            ql = torch.sigmoid(-beta * delta_score)
            log_ql = F.logsigmoid(-beta * delta_score)
            log_pl = torch.log(epsilon)
            per = qw * (log_qw - log_pw) + ql * (log_ql - log_pl)
        elif lt == "nca_pair":
            cr, rr = beta * chosen_logratios, beta * rejected_logratios
            per = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
        elif lt == "robust":
            clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
            flipped = -label_smoothing * F.logsigmoid(-beta * delta_score)
            per = (clean - flipped) / (1 - 2 * label_smoothing)
        elif lt == "bco_pair":
            cr, rr = beta * chosen_logratios, beta * rejected_logratios
            if bco_running_mean is None:
                delta = 0.0
            elif bco_running_mean == "batch":
                delta = torch.cat((cr, rr), 0).mean().detach()
            else:
                delta = bco_running_mean
            per = -F.logsigmoid(cr - delta) - F.logsigmoid(-(rr - delta))
        elif lt == "sppo_hard":
            per = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif lt == "aot":
            lr_sorted, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
            ref_sorted, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
            d = lr_sorted - ref_sorted
            per = -F.logsigmoid(beta * d) * (1 - label_smoothing) - F.logsigmoid(-beta * d) * label_smoothing
        elif lt == "aot_unpaired":
            cs, _ = torch.sort(chosen_logratios, dim=0)
            rs, _ = torch.sort(rejected_logratios, dim=0)
            d = cs - rs
            per = -F.logsigmoid(beta * d) * (1 - label_smoothing) - F.logsigmoid(-beta * d) * label_smoothing
        elif lt == "apo_zero":
            per = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
        elif lt == "apo_down":
            per = torch.sigmoid(beta * chosen_logratios) + (
                1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
        elif lt == "discopop":
            logits = delta_score * beta
            mod = torch.sigmoid(logits / discopop_tau)
            per = -F.logsigmoid(logits) * (1 - mod) + torch.exp(-logits) * mod
        elif lt == "sft":
            per = nll.expand(chosen_logps.shape[0])
        elif lt == "sigmoid_norm":
            ca = chosen_scores / chosen_lengths.to(chosen_scores.dtype).clamp(min=1.0)
            ra = rejected_scores / rejected_lengths.to(rejected_scores.dtype).clamp(min=1.0)
            per = -F.logsigmoid(beta * (ca - ra))
        else:
            raise ValueError(lt)
        if policy_weights is not None:
            per = per * policy_weights
        loss = loss + per.mean() * lw
    if rpo_alpha is not None:
        loss = loss + rpo_alpha * nll
    return loss


def reference_cpo_loss(chosen_logps, rejected_logps, *, loss_type, beta=0.1, label_smoothing=0.0,
                       simpo_gamma=0.5, cpo_alpha=None, chosen_lengths=None, rejected_lengths=None,
                       chosen_nll=None, nll_lengths=None):
    """TRL CPOTrainer (loss_type sigmoid/hinge/ipo/simpo -> prefopt cpo/cpo_hinge/cpo_ipo/simpo) and ORPOTrainer."""
    if loss_type in ("simpo", "cpo_ipo", "orpo"):  # TRL: average_log_prob
        chosen_logps = chosen_logps / chosen_lengths.to(chosen_logps.dtype).clamp(min=1.0)
        rejected_logps = rejected_logps / rejected_lengths.to(rejected_logps.dtype).clamp(min=1.0)
    if loss_type == "orpo":
        def log1mexp(x):
            t = -0.6931471805599453
            return torch.where(x < t, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
        log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
        losses = beta * F.logsigmoid(log_odds)
        nll = _nll_value(chosen_nll, nll_lengths, chosen_lengths)
        return nll - losses.mean()
    if cpo_alpha is None:
        cpo_alpha = 0.0 if loss_type == "simpo" else 1.0
    logits = chosen_logps - rejected_logps
    if loss_type == "simpo":
        logits = logits - simpo_gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "cpo":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "cpo_hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "cpo_ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(loss_type)
    loss = losses.mean()
    if cpo_alpha != 0:
        loss = loss + cpo_alpha * _nll_value(chosen_nll, nll_lengths, chosen_lengths)
    return loss


def reference_kto_loss(policy_logps, ref_logps, labels, kl_policy_logps=None, kl_ref_logps=None, *, beta=0.1,
                       desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto"):
    """TRL KTOTrainer._compute_loss (single process)."""
    if loss_type == "kto":
        kl = (kl_policy_logps - kl_ref_logps).mean().detach().clamp(min=0)
    else:
        kl = torch.zeros((), dtype=policy_logps.dtype)
    chosen_idx = torch.nonzero(labels, as_tuple=False).view(-1)
    rejected_idx = torch.nonzero(~labels, as_tuple=False).view(-1)
    chosen_lr = policy_logps.index_select(0, chosen_idx) - ref_logps.index_select(0, chosen_idx)
    rejected_lr = policy_logps.index_select(0, rejected_idx) - ref_logps.index_select(0, rejected_idx)
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_lr - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_lr))
    else:
        chosen_losses = 1 - torch.sigmoid(beta * chosen_lr)
        rejected_losses = torch.sigmoid(beta * rejected_lr)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses.nanmean()
