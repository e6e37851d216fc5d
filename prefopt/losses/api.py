"""Public preference losses: validation, batch-coupled pieces, then the fused per-pair Function.

``preference_loss``: the paired family. Reference-based (DPO and variants; TRL ``DPOTrainer`` loss_type names) and
reference-free (SimPO, CPO, ORPO; pass no reference logps) share one entry point; the loss names say which.
``kto_loss``: unpaired KTO (TRL ``KTOTrainer``).
See README.md (section "Losses") for the table of losses, papers and arguments.
"""
from __future__ import annotations

import torch

from prefopt import _validation as check
from prefopt._options import LossOptions, PairLossParams
from prefopt.losses.function import PreferencePairFunction
from prefopt.losses.table import DIVERGENCES, DPO_LOSSES, REF_FREE_LOSSES, TABLE, PairSpec, TorchOps, _orpo_log_odds, \
    make_params

__all__ = ["preference_loss", "kto_loss", "LOSS_TYPES", "F_DIVERGENCE_TYPES"]

LOSS_TYPES = DPO_LOSSES + REF_FREE_LOSSES
F_DIVERGENCE_TYPES = tuple(DIVERGENCES)


def _compute_dtype(*ts):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _inv_len(lengths, ct):
    return 1.0 / lengths.detach().to(ct).clamp(min=1.0)


def _mean(t):
    return t.detach().float().mean() if t.dtype != torch.float64 else t.detach().mean()


# ------------------------------------------------------------------------------------------------------------
# paired losses
# ------------------------------------------------------------------------------------------------------------
def preference_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                    loss_type="sigmoid", beta=0.1, label_smoothing=0.0, loss_weights=None,
                    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05,
                    chosen_lengths=None, rejected_lengths=None,
                    chosen_nll=None, nll_lengths=None, rpo_alpha=None,
                    policy_weights=None, bco_running_mean=None,
                    simpo_gamma=0.5, cpo_alpha=None):
    """Paired preference loss (mean over pairs) and TRL-named detached metrics.

    Args (all per-pair tensors have shape [P], one entry per preference pair):
      chosen_logps, rejected_logps: policy log-prob sums of the completions (float; grads flow).
      ref_chosen_logps, ref_rejected_logps: reference log-prob sums (required by the reference-based losses,
        must be None for the reference-free ones: simpo, cpo, cpo_hinge, cpo_ipo, orpo). Grads flow if they
        require grad.
      loss_type: a name or a list of names (reference-based ones only, combined as sum_k loss_weights[k] * loss_k).
      beta: > 0. For ipo the regularisation tau; for orpo the odds-ratio weight lambda; for simpo the SimPO beta.
      label_smoothing: cDPO for sigmoid (in [0, 1]); flip rate for robust (in [0, 0.5)); epsilon for exo_pair (in
        (0, 1)); also aot/aot_unpaired/cpo/simpo (conservative sigmoid). Other losses ignore it (must be in [0, 1]).
      f_divergence_type, f_alpha_divergence_coef: f-DPO score transform (reverse_kl, forward_kl, js_divergence,
        alpha_divergence), only for sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft.
      discopop_tau: > 0, DiscoPOP temperature.
      chosen_lengths, rejected_lengths: completion token counts [P] (int or float, clamped at 1). Required by ipo,
        sigmoid_norm (TRL normalises the scores by length), simpo, cpo_ipo, orpo (length-averaged logps).
      chosen_nll: the chosen NLL for sft, RPO (rpo_alpha), CPO (cpo_alpha) and ORPO. Either a 0-dim tensor (the
        batch NLL already reduced, e.g. TRL's token mean) used as is, or a [P] tensor of per-pair NLL *sums*,
        reduced to the token mean sum(chosen_nll) / sum(nll_lengths) (nll_lengths defaults to chosen_lengths).
      rpo_alpha: RPO: adds rpo_alpha * NLL.
      policy_weights: WPO per-pair weights [P] (detached; computed upstream, e.g. prod of exp(mean aligned logp)),
        multiplying each per-pair loss (TRL use_weighting). Not with aot/aot_unpaired.
      bco_running_mean: the BCO reward shift delta for bco_pair (float or 0-dim tensor; detached), or "batch" for
        the detached batch mean of the chosen and rejected rewards beta*log-ratio. Default (None): no shift, as
        TRL 1.16's bco_pair.
      simpo_gamma: SimPO target margin gamma (TRL CPOConfig.simpo_gamma), loss uses beta*h - gamma.
      cpo_alpha: NLL weight of the cpo* losses and of simpo (CPO-SimPO). Default 1.0 for cpo/cpo_hinge/cpo_ipo
        (TRL CPOConfig) and 0.0 for simpo (pure SimPO).
    Returns (loss: 0-dim tensor, metrics: dict of detached 0-dim tensors).
    """
    opts = check.loss_options(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                              loss_weights=loss_weights, f_divergence_type=f_divergence_type,
                              f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau,
                              rpo_alpha=rpo_alpha, bco_running_mean=bco_running_mean, simpo_gamma=simpo_gamma,
                              cpo_alpha=cpo_alpha, has_policy_weights=policy_weights is not None)
    check.check_loss_tensors(opts, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                             chosen_lengths, rejected_lengths, nll_lengths, policy_weights, chosen_nll)
    return settled_preference_loss(opts, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                   chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                                   chosen_nll=chosen_nll, nll_lengths=nll_lengths, policy_weights=policy_weights)


def settled_preference_loss(opts: LossOptions, chosen_logps, rejected_logps, ref_chosen_logps=None,
                            ref_rejected_logps=None, *, chosen_lengths=None, rejected_lengths=None, chosen_nll=None,
                            nll_lengths=None, policy_weights=None):
    """`preference_loss` on inputs already checked by prefopt/_validation.py (the fused loss checks them before
    its head passes)."""
    names, ref_free, beta = opts.names, opts.ref_free, opts.beta
    nll_coef_terms = opts.nll_terms
    bco_running_mean = opts.bco_running_mean
    device = chosen_logps.device

    # ---- compute --------------------------------------------------------------------------------------------
    ct = _compute_dtype(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_nll)
    has_len = chosen_lengths is not None and rejected_lengths is not None and any(
        TABLE[n].kind in ("delta_norm", "cr_norm") for n in names)
    extras = {"ilc": _inv_len(chosen_lengths, ct) if has_len else None,
              "ilr": _inv_len(rejected_lengths, ct) if has_len else None,
              "w": policy_weights.detach().to(ct) if policy_weights is not None else None}
    with torch.no_grad():
        c_lr = chosen_logps.detach().to(ct) - (ref_chosen_logps.detach().to(ct) if not ref_free else 0.0)
        r_lr = rejected_logps.detach().to(ct) - (ref_rejected_logps.detach().to(ct) if not ref_free else 0.0)
        if ref_free and TABLE[names[0]].kind in ("delta_norm", "cr_norm"):
            c_lr, r_lr = c_lr * extras["ilc"], r_lr * extras["ilr"]  # TRL's averaged logps (metrics)
        if "bco_pair" in names:
            if bco_running_mean is None:  # TRL 1.16: no shift
                bco_delta = 0.0
            elif isinstance(bco_running_mean, str) and bco_running_mean == "batch":
                bco_delta = torch.cat([beta * c_lr, beta * r_lr]).mean()
            else:
                bco_delta = bco_running_mean.detach() if torch.is_tensor(bco_running_mean) else bco_running_mean
        else:
            bco_delta = 0.0
    clamp = 11.0 if torch.float16 in (chosen_logps.dtype, rejected_logps.dtype) else 80.0
    spec = PairSpec(losses=names, divergence=opts.divergence, has_ref=not ref_free, has_len=has_len,
                    has_w=policy_weights is not None)
    params = make_params(ct, device, beta=beta, ls=opts.label_smoothing, tau=opts.discopop_tau,
                         gamma=opts.simpo_gamma, fa1=opts.f_alpha_divergence_coef - 1.0, clamp=clamp,
                         bco_delta=bco_delta, loss_weights=list(opts.loss_weights))

    pair_names = [n for n in names if TABLE[n].kind != "none"]
    if pair_names:
        loss, _ = PreferencePairFunction.apply(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                               PairLossParams(spec, params, extras, ct))
    else:
        loss = chosen_logps.new_zeros((), dtype=ct)

    metrics = {}
    if nll_coef_terms:
        if chosen_nll.dim() == 0:
            nll = chosen_nll.to(ct)
        else:
            counts = (nll_lengths if nll_lengths is not None else chosen_lengths).detach().to(ct)
            nll = chosen_nll.to(ct).sum() / counts.clamp(min=1.0).sum().clamp(min=1.0)
        coef = 0.0
        for who, a in nll_coef_terms:
            if who == "sft" and policy_weights is not None:
                coef = coef + a * policy_weights.detach().to(ct).mean()  # TRL: the expanded sft loss is weighted
            else:
                coef = coef + a
        loss = loss + coef * nll
        metrics["nll_loss"] = nll.detach()

    rc, rr = beta * c_lr, beta * r_lr
    lc = chosen_logps.detach().to(ct) * (extras["ilc"] if (ref_free and has_len) else 1.0)
    lr = rejected_logps.detach().to(ct) * (extras["ilr"] if (ref_free and has_len) else 1.0)
    metrics.update({
        "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
        "rewards/accuracies": (rc > rr).to(ct).mean(), "rewards/margins": (rc - rr).mean(),
        "logps/chosen": lc.mean(), "logps/rejected": lr.mean(),
    })
    if ref_free and names[0] == "orpo":
        lo = _orpo_log_odds(TorchOps, None, lc, lr)
        metrics["log_odds_ratio"] = torch.nn.functional.logsigmoid(lo).mean()
        metrics["log_odds_chosen"] = lo.mean()
    return loss, {k: v.detach() for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------------------
# unpaired KTO
# ------------------------------------------------------------------------------------------------------------
def kto_loss(policy_logps, ref_logps, labels_desirable, kl_policy_logps=None, kl_ref_logps=None, *,
             beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto", kl=None):
    """Unpaired KTO loss (TRL KTOTrainer), mean over the B examples, and detached metrics.

    policy_logps, ref_logps: [B] completion log-prob sums; labels_desirable: bool [B];
    kl_policy_logps, kl_ref_logps: [B'] log-probs of the mismatched (prompt, completion) pairs; the batch KL estimate
    mean(kl_policy - kl_ref) is detached and clamped at 0. Required for loss_type="kto" unless `kl` is given;
    loss_type="apo_zero_unpaired" uses no KL term (they are ignored).
    kl: the KL estimate precomputed (a float or 0-dim tensor, Liger's KTO `kl`), used as is: detached, not
    clamped. Instead of kl_policy_logps / kl_ref_logps, for loss_type="kto" only.
    Per example: desirable  w_d * (1 - sigmoid(beta * (x - KL))),  undesirable  w_u * (1 - sigmoid(beta * (KL - x))),
    x = policy - ref.
    """
    beta, wd, wu = check.kto_options(policy_logps, ref_logps, labels_desirable, kl_policy_logps, kl_ref_logps, beta,
                                     desirable_weight, undesirable_weight, loss_type, kl)
    device = policy_logps.device
    ct = _compute_dtype(policy_logps, ref_logps)
    if kl is not None:
        kl = torch.as_tensor(kl.detach() if isinstance(kl, torch.Tensor) else float(kl)).to(device=device, dtype=ct)
    elif loss_type == "kto":
        kl = (kl_policy_logps.detach().to(ct) - kl_ref_logps.detach().to(ct)).mean().clamp(min=0)
    else:
        kl = torch.zeros((), dtype=ct, device=device)
    lab = labels_desirable
    one = torch.ones((), dtype=ct, device=device)
    sign = torch.where(lab, one, -one)
    w = torch.where(lab, one * wd, one * wu)  # not where(lab, wd, wu): python scalars would round to float32
    spec = PairSpec(losses=("kto",), divergence="reverse_kl", has_ref=True, has_len=False, has_w=True)
    params = make_params(ct, device, beta=beta, kl=kl, loss_weights=(1.0,))
    loss, _ = PreferencePairFunction.apply(policy_logps, None, ref_logps, None,
                                           PairLossParams(spec, params, {"s": sign, "w": w}, ct))
    x = (policy_logps.detach().to(ct) - ref_logps.detach().to(ct))
    rewards = beta * x
    lp = policy_logps.detach().to(ct)
    metrics = {"kl": kl.detach()}
    if lab.any():
        metrics["rewards/chosen"] = rewards[lab].mean()
        metrics["logps/chosen"] = lp[lab].mean()
    if (~lab).any():
        metrics["rewards/rejected"] = rewards[~lab].mean()
        metrics["logps/rejected"] = lp[~lab].mean()
    if lab.any() and (~lab).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics
