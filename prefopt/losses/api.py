"""Public preference losses: validation, batch-coupled pieces, then the fused per-pair Function.

``preference_loss``: the paired family. Reference-based (DPO and variants; TRL ``DPOTrainer`` loss_type names) and
reference-free (SimPO, CPO, ORPO; pass no reference logps) share one entry point; the loss names say which.
``kto_loss``: unpaired KTO (TRL ``KTOTrainer``).
See README.md (section "Losses") for the table of losses, papers and arguments.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from prefopt.losses.function import PreferencePairFunction
from prefopt.losses.table import (DIVERGENCES, DPO_LOSSES, REF_FREE_LOSSES, TABLE, PairSpec, TorchOps,
                                  _orpo_log_odds, make_params)

__all__ = ["preference_loss", "kto_loss", "LOSS_TYPES", "F_DIVERGENCE_TYPES"]

LOSS_TYPES = DPO_LOSSES + REF_FREE_LOSSES
F_DIVERGENCE_TYPES = tuple(DIVERGENCES)
_NEED_LENGTHS = {"ipo", "sigmoid_norm", "simpo", "cpo_ipo", "orpo"}
_LS_RANGES = {  # label_smoothing ranges (lo, hi, lo_inclusive, hi_inclusive) of the losses that read it
    "sigmoid": (0.0, 1.0, True, True), "aot": (0.0, 1.0, True, True), "aot_unpaired": (0.0, 1.0, True, True),
    "robust": (0.0, 0.5, True, False), "exo_pair": (0.0, 1.0, False, False),
    "cpo": (0.0, 1.0, True, True), "simpo": (0.0, 1.0, True, True),
}


# ------------------------------------------------------------------------------------------------------------
# validation helpers
# ------------------------------------------------------------------------------------------------------------
def _check_tensor(name, t, *, P=None, device=None, allow_int=False, allow_scalar=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex() or not (t.is_floating_point() or (allow_int and not t.dtype == torch.bool)):
        kind = "a floating-point" if not allow_int else "a floating-point or integer"
        raise TypeError(f"{name} must be {kind} tensor, got dtype {t.dtype}")
    if allow_scalar and t.dim() == 0:
        pass
    elif t.dim() != 1:
        raise ValueError(f"{name} must have shape [P] (one value per pair), got shape {tuple(t.shape)}")
    elif P is not None and t.shape[0] != P:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but chosen_logps has shape ({P},): shapes must match")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but chosen_logps is on {device}: all inputs must be on one device")
    return t


def _check_real(name, v, *, positive=False, allow_none=False):
    if v is None and allow_none:
        return v
    if isinstance(v, torch.Tensor) and v.dim() == 0:
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def _normalize_loss_types(loss_type):
    names = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"loss_type must be a loss name or a non-empty list of names; valid names: "
                        f"{', '.join(LOSS_TYPES)}")
    for n in names:
        if n not in TABLE or TABLE[n].family == "kto":
            raise ValueError(f"unknown loss_type {n!r}; valid loss types: {', '.join(LOSS_TYPES)} "
                             f"(unpaired KTO: prefopt.kto_loss)")
    if len(set(names)) != len(names):
        raise ValueError(f"loss_type lists {list(names)} with a repeated name; give each loss once")
    return tuple(names)


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
    names = _normalize_loss_types(loss_type)
    family = {TABLE[n].family for n in names}
    if len(family) > 1:
        raise ValueError(f"loss_type {list(names)} mixes reference-based and reference-free losses "
                         f"({', '.join(REF_FREE_LOSSES)}); use one family per call")
    ref_free = family == {"ref_free"}
    if ref_free and len(names) > 1:
        raise ValueError(f"reference-free losses ({', '.join(REF_FREE_LOSSES)}) take a single loss_type, got "
                         f"{list(names)}")

    # tensors
    _check_tensor("chosen_logps", chosen_logps)
    P, device = chosen_logps.shape[0], chosen_logps.device
    if P == 0:
        raise ValueError("chosen_logps is empty: need at least one pair")
    _check_tensor("rejected_logps", rejected_logps, P=P, device=device)
    if ref_free:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError(f"loss_type {names[0]!r} is reference-free: pass ref_chosen_logps=None and "
                             "ref_rejected_logps=None")
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type {list(names)} needs ref_chosen_logps and ref_rejected_logps "
                             f"(reference-free losses: {', '.join(REF_FREE_LOSSES)})")
        _check_tensor("ref_chosen_logps", ref_chosen_logps, P=P, device=device)
        _check_tensor("ref_rejected_logps", ref_rejected_logps, P=P, device=device)
    for nm, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths),
                  ("nll_lengths", nll_lengths)):
        if t is not None:
            _check_tensor(nm, t, P=P, device=device, allow_int=True)
    if policy_weights is not None:
        _check_tensor("policy_weights", policy_weights, P=P, device=device)
    if chosen_nll is not None:
        _check_tensor("chosen_nll", chosen_nll, P=P, device=device, allow_scalar=True)

    # scalars
    beta = _check_real("beta", beta, positive=True)
    ls = _check_real("label_smoothing", label_smoothing)
    tau = _check_real("discopop_tau", discopop_tau, positive=True)
    simpo_gamma = _check_real("simpo_gamma", simpo_gamma)
    rpo_alpha = _check_real("rpo_alpha", rpo_alpha, allow_none=True)
    cpo_alpha = _check_real("cpo_alpha", cpo_alpha, allow_none=True)
    fa = _check_real("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {ls}")
    for n in names:
        if n in _LS_RANGES:
            lo, hi, lo_in, hi_in = _LS_RANGES[n]
            ok = (ls >= lo if lo_in else ls > lo) and (ls <= hi if hi_in else ls < hi)
            if not ok:
                rng = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
                extra = " (the EXO paper recommends 1e-3)" if n == "exo_pair" else ""
                raise ValueError(f"label_smoothing must be in {rng} for the {n!r} loss, got {ls}{extra}")
    if loss_weights is None:
        loss_weights = [1.0] * len(names)
    if isinstance(loss_weights, (str, bytes)) or not hasattr(loss_weights, "__len__"):
        raise TypeError("loss_weights must be a list of numbers, one per loss_type")
    if len(loss_weights) != len(names):
        raise ValueError(f"loss_weights has {len(loss_weights)} entries but loss_type has {len(names)}: "
                         "give one weight per loss type")
    loss_weights = [_check_real("loss_weights", w) for w in loss_weights]

    if not isinstance(f_divergence_type, str) or f_divergence_type not in DIVERGENCES:
        raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; valid f-divergences: "
                         f"{', '.join(F_DIVERGENCE_TYPES)}")
    divergence = f_divergence_type
    if divergence != "reverse_kl":
        bad = [n for n in names if not TABLE[n].supports_f_divergence]
        if bad:
            ok = [n for n in DPO_LOSSES if TABLE[n].supports_f_divergence]
            raise ValueError(f"f_divergence_type={divergence!r} is only supported for the loss types "
                             f"{', '.join(ok)}; not for {', '.join(bad)}. Use f_divergence_type='reverse_kl'")
    if divergence == "alpha_divergence" and abs(fa - 1.0) < 1e-6:
        divergence = "reverse_kl"  # the alpha -> 1 limit, as TRL

    if policy_weights is not None and any(n in ("aot", "aot_unpaired") for n in names):
        raise ValueError("policy_weights (WPO weighting) is not supported with 'aot' / 'aot_unpaired': those "
                         "losses sort the pairs, which would misalign the per-pair weights")
    needs_len = [n for n in names if n in _NEED_LENGTHS]
    if needs_len and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type {', '.join(needs_len)} needs chosen_lengths and rejected_lengths "
                         "(completion token counts, shape [P])")

    # NLL coefficient
    if ref_free and cpo_alpha is None:
        cpo_alpha = 0.0 if names[0] == "simpo" else 1.0
    nll_coef_terms = []
    if "sft" in names:
        nll_coef_terms.append(("sft", loss_weights[names.index("sft")]))
    if rpo_alpha is not None and not ref_free:
        nll_coef_terms.append(("rpo_alpha", rpo_alpha))
    if ref_free and names[0] == "orpo":
        nll_coef_terms.append(("orpo", 1.0))
    elif ref_free and cpo_alpha != 0.0:
        nll_coef_terms.append(("cpo_alpha", cpo_alpha))
    if nll_coef_terms and chosen_nll is None:
        who = ", ".join(n for n, _ in nll_coef_terms)
        raise ValueError(f"{who} needs chosen_nll (the chosen completions' NLL: a 0-dim batch value or per-pair "
                         "sums [P])")
    if nll_coef_terms and chosen_nll.dim() == 1 and nll_lengths is None and chosen_lengths is None:
        raise ValueError("chosen_nll of shape [P] (per-pair NLL sums) needs nll_lengths or chosen_lengths to form "
                         "the token mean; or pass the reduced batch NLL as a 0-dim tensor")

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
                bco_delta = bco_running_mean.detach() if torch.is_tensor(bco_running_mean) else \
                    _check_real("bco_running_mean", bco_running_mean)
        else:
            bco_delta = 0.0
    clamp = 11.0 if torch.float16 in (chosen_logps.dtype, rejected_logps.dtype) else 80.0
    spec = PairSpec(losses=names, divergence=divergence, has_ref=not ref_free, has_len=has_len,
                    has_w=policy_weights is not None)
    params = make_params(ct, device, beta=beta, ls=ls, tau=tau, gamma=simpo_gamma, fa1=fa - 1.0, clamp=clamp,
                         bco_delta=bco_delta, loss_weights=loss_weights)

    pair_names = [n for n in names if TABLE[n].kind != "none"]
    if pair_names:
        loss, _ = PreferencePairFunction.apply(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                               spec, params, extras, ct)
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
             beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, loss_type="kto"):
    """Unpaired KTO loss (TRL KTOTrainer), mean over the B examples, and detached metrics.

    policy_logps, ref_logps: [B] completion log-prob sums; labels_desirable: bool [B];
    kl_policy_logps, kl_ref_logps: [B'] log-probs of the mismatched (prompt, completion) pairs; the batch KL estimate
    mean(kl_policy - kl_ref) is detached and clamped at 0. Required for loss_type="kto"; loss_type=
    "apo_zero_unpaired" uses no KL term (they are ignored).
    Per example: desirable  w_d * (1 - sigmoid(beta * (x - KL))),  undesirable  w_u * (1 - sigmoid(beta * (KL - x))),
    x = policy - ref.
    """
    if loss_type not in ("kto", "apo_zero_unpaired"):
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; valid: kto, apo_zero_unpaired")
    _check_tensor("policy_logps", policy_logps)
    B, device = policy_logps.shape[0], policy_logps.device
    if B == 0:
        raise ValueError("policy_logps is empty: need at least one example")
    _check_tensor("ref_logps", ref_logps, P=B, device=device)
    if not isinstance(labels_desirable, torch.Tensor):
        raise TypeError(f"labels_desirable must be a torch.Tensor, got {type(labels_desirable).__name__}")
    if labels_desirable.dtype != torch.bool:
        raise TypeError(f"labels_desirable must be a bool tensor, got dtype {labels_desirable.dtype}")
    if labels_desirable.shape != (B,):
        raise ValueError(f"labels_desirable has shape {tuple(labels_desirable.shape)} but policy_logps has shape "
                         f"({B},): shapes must match")
    if labels_desirable.device != device:
        raise ValueError(f"labels_desirable is on {labels_desirable.device} but policy_logps is on {device}: "
                         "all inputs must be on one device")
    beta = _check_real("beta", beta, positive=True)
    wd = _check_real("desirable_weight", desirable_weight)
    wu = _check_real("undesirable_weight", undesirable_weight)
    if wd < 0 or wu < 0:
        raise ValueError(f"desirable_weight and undesirable_weight must be >= 0, got {wd}, {wu}")
    ct = _compute_dtype(policy_logps, ref_logps)
    if loss_type == "kto":
        if kl_policy_logps is None or kl_ref_logps is None:
            raise ValueError("loss_type='kto' needs kl_policy_logps and kl_ref_logps (log-probs of mismatched "
                             "prompt/completion pairs for the batch KL estimate)")
        _check_tensor("kl_policy_logps", kl_policy_logps, device=device)
        _check_tensor("kl_ref_logps", kl_ref_logps, P=kl_policy_logps.shape[0], device=device)
        if kl_policy_logps.shape[0] == 0:
            raise ValueError("kl_policy_logps is empty")
        kl = (kl_policy_logps.detach().to(ct) - kl_ref_logps.detach().to(ct)).mean().clamp(min=0)
    else:
        kl = torch.zeros((), dtype=ct, device=device)
    lab = labels_desirable
    one = torch.ones((), dtype=ct, device=device)
    sign = torch.where(lab, one, -one)
    w = torch.where(lab, one * wd, one * wu)  # not where(lab, wd, wu): python scalars would round to float32
    spec = PairSpec(losses=("kto",), divergence="reverse_kl", has_ref=True, has_len=False, has_w=True)
    params = make_params(ct, device, beta=beta, kl=kl, loss_weights=(1.0,))
    loss, _ = PreferencePairFunction.apply(policy_logps, None, ref_logps, None, spec, params,
                                           {"s": sign, "w": w}, ct)
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
