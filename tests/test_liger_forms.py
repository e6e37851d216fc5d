"""prefopt.integrations.liger: Liger's call forms (options, argument order, return structure) against a torch
reference that materialises the logits and follows liger_kernel/chunked_loss (0.8.x) formula by formula, and, where
liger-kernel is installed, against Liger's own modules on the same inputs (which checks the transcription too).

float64 throughout, so prefopt's fused head must agree with the eager reference to rounding (1e-9); Liger forms its
log-softmax in float32, so it is compared within that rounding."""
import pytest
import torch
import torch.nn.functional as F

import prefopt
from prefopt.integrations import liger

P, T, H, V = 3, 7, 6, 37   # odd shapes
TOL = dict(rtol=1e-9, atol=1e-9)
LS = F.logsigmoid


# ------------------------------------------------------------------------------------------- torch reference
def _head(x, w, b, target, ignore_index=-100, average=False):
    logits = x @ w.T + (0 if b is None else b)
    logp = logits.log_softmax(-1)
    mask = target != ignore_index
    tok = logp.gather(-1, torch.where(mask, target, 0).unsqueeze(-1)).squeeze(-1) * mask
    seq = tok.sum(-1) / mask.sum(-1) if average else tok.sum(-1)
    return seq, logits, logp


def _nll(logp, target, n, ignore_index=-100):
    return F.nll_loss(logp[:n].reshape(-1, logp.shape[-1]), target[:n].reshape(-1), reduction="sum",
                      ignore_index=ignore_index) / (target[:n] != ignore_index).sum()


def _dpo_pair(c, r, rc, rr, beta, loss_type, ls, tau):
    cr, rr_ = c - rc, r - rr
    d = beta * (cr - rr_)
    return {
        "sigmoid": lambda: -LS(d),
        "hinge": lambda: torch.relu(1 - d),
        "exo_pair": lambda: torch.sigmoid(d) * (LS(d) - torch.log1p(torch.tensor(-ls, dtype=d.dtype)))
        + torch.sigmoid(-d) * (LS(-d) - torch.log(torch.tensor(ls, dtype=d.dtype))),
        "nca_pair": lambda: -LS(beta * cr) - 0.5 * LS(-beta * cr) - 0.5 * LS(-beta * rr_),
        "robust": lambda: (-(1 - ls) * LS(d) + ls * LS(-d)) / (1 - 2 * ls),
        "bco_pair": lambda: -LS(beta * cr) - LS(-beta * rr_),
        "sppo_hard": lambda: (cr - 0.5 / beta) ** 2 + (rr_ + 0.5 / beta) ** 2,
        "apo_zero": lambda: 1 - torch.sigmoid(beta * cr) + torch.sigmoid(beta * rr_),
        "apo_down": lambda: torch.sigmoid(beta * cr) + 1 - torch.sigmoid(beta * (cr - rr_)),
        "discopop": lambda: -LS(d) * (1 - torch.sigmoid(d / tau)) + torch.exp(-d) * torch.sigmoid(d / tau),
    }[loss_type]().mean()


def _ref_paired(kind, x, w, b, target, *, ref=None, beta=0.1, alpha=1.0, nll=False, average=False,
                loss_type="sigmoid", ls=0.0, tau=0.05, gamma=0.5, nll_target=None):
    n = x.shape[0] // 2
    seq, logits, logp = _head(x, w, b, target, average=average)
    c, r = seq[:n], seq[n:]
    nll_loss = torch.zeros((), dtype=x.dtype)
    if nll:
        if nll_target is None:
            nll_loss = _nll(logp, target, n)
        else:
            nll_loss = _nll(_head(x[:n], w, b, nll_target[:n])[2], nll_target, n)
    extra = ()
    if kind == "dpo":
        rseq = torch.zeros_like(seq) if ref is None else _head(*ref, target, average=average)[0].detach()
        rc, rr = rseq[:n], rseq[n:]
        pref = _dpo_pair(c, r, rc, rr, beta, loss_type, ls if loss_type in ("robust", "exo_pair") else 0.0, tau)
        rewards = (beta * (c - rc), beta * (r - rr))
    else:
        rewards = (beta * c, beta * r)
        if kind == "orpo":
            log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
            pref = -beta * LS(log_odds).mean()
            extra = (LS(log_odds).mean(), log_odds.mean())
        else:
            z = beta * (c - r) - (gamma if kind == "simpo" else 0.0)
            pref = (-LS(z) * (1 - ls) - LS(-z) * ls).mean()
    loss = alpha * nll_loss + pref
    denom = n * x.shape[1] * V
    aux = (c, r, logits[:n].sum() / denom, logits[n:].sum() / denom, nll_loss, *rewards, *extra)
    return loss, aux


def _inputs(bias=True, seed=0, batch=2 * P):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1 if bias else None
    target = torch.randint(0, V, (batch, T), generator=g)
    target[:, :2] = -100                     # prompt positions
    target[1, -2:] = -100                    # padding of one row
    return x, w, b, target


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def _compare(got, want, params_got, params_want):
    (loss_g, aux_g), (loss_w, aux_w) = got, want
    torch.testing.assert_close(loss_g, loss_w, **TOL)
    assert len(aux_g) == len(aux_w)
    for i, (a, b) in enumerate(zip(aux_g, aux_w)):
        torch.testing.assert_close(a.to(b.dtype), b.detach(), **TOL, msg=f"aux[{i}]")
    grads_g = torch.autograd.grad(loss_g, [p for p in params_got if p is not None])
    grads_w = torch.autograd.grad(loss_w, [p for p in params_want if p is not None])
    for a, b in zip(grads_g, grads_w):
        torch.testing.assert_close(a, b, **TOL)


# ----------------------------------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair",
                                       "sppo_hard", "apo_zero", "apo_down", "discopop"])
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_dpo_loss_types_and_average_log_prob(loss_type, average_log_prob):
    x, w, b, target = _inputs()
    rx, rw, rb = x + 0.1 * torch.randn_like(x), w * 0.9, b * 0.5
    ls = 0.2 if loss_type in ("robust", "exo_pair", "sigmoid") else 0.0  # sigmoid: Liger ignores it
    module = liger.LigerFusedLinearDPOLoss(beta=0.3, loss_type=loss_type, label_smoothing=ls,
                                           average_log_prob=average_log_prob)
    xg, wg, bg = _leaves(x, w, b)
    xr, wr, br = _leaves(x, w, b)
    got = module(wg, xg, target, bg, rx, rw, rb)             # Liger's positional order: ref_input, ref_weight, ref_bias
    want = _ref_paired("dpo", xr, wr, br, target, ref=(rx, rw, rb), beta=0.3, average=average_log_prob,
                       loss_type=loss_type, ls=ls)
    _compare(got, want, [xg, wg, bg], [xr, wr, br])


@pytest.mark.parametrize("use_ref_model", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_dpo_nll_alpha_and_reference_options(use_ref_model, bias):
    x, w, b, target = _inputs(bias=bias, seed=1)
    rx, rw = x * 0.8, w + 0.05
    xg, wg, bg = _leaves(x, w, b)
    xr, wr, br = _leaves(x, w, b)
    got = liger.liger_fused_linear_dpo(xg, wg, target, bg, rx if use_ref_model else None,
                                       rw if use_ref_model else None, None, -100, 0.2, True, True, use_ref_model,
                                       False, 1, "sigmoid", 0.0, 0.05, 0.7)
    want = _ref_paired("dpo", xr, wr, br, target, ref=(rx, rw, None) if use_ref_model else None, beta=0.2,
                       alpha=0.7, nll=True)
    _compare(got, want, [xg, wg, bg], [xr, wr, br])


# ---------------------------------------------------------------------------------------------------- ORPO
@pytest.mark.parametrize("compute_nll_loss", [True, False])
@pytest.mark.parametrize("with_nll_target", [False, True])
def test_orpo_nll_options(compute_nll_loss, with_nll_target):
    x, w, b, target = _inputs(seed=2)
    nll_target = None
    if with_nll_target:   # e.g. prompt + completion tokens for the NLL, completion only for the odds ratio
        nll_target = torch.randint(0, V, target.shape, generator=torch.Generator().manual_seed(9))
        nll_target[0, 0] = -100
    module = liger.LigerFusedLinearORPOLoss(beta=0.25, compute_nll_loss=compute_nll_loss)
    xg, wg, bg = _leaves(x, w, b)
    xr, wr, br = _leaves(x, w, b)
    got = module(wg, xg, target, bg, nll_target)
    want = _ref_paired("orpo", xr, wr, br, target, beta=0.25, nll=compute_nll_loss, average=True,
                       nll_target=nll_target)
    _compare(got, want, [xg, wg, bg], [xr, wr, br])
    assert len(got[1]) == 9


# -------------------------------------------------------------------------------------------- SimPO / CPO
@pytest.mark.parametrize("compute_nll_loss", [True, False])
def test_simpo_options(compute_nll_loss):
    x, w, b, target = _inputs(seed=3)
    module = liger.LigerFusedLinearSimPOLoss(beta=2.0, alpha=0.4, label_smoothing=0.1, gamma=0.7,
                                             compute_nll_loss=compute_nll_loss)
    xg, wg, bg = _leaves(x, w, b)
    xr, wr, br = _leaves(x, w, b)
    got = module(wg, xg, target, bg)
    want = _ref_paired("simpo", xr, wr, br, target, beta=2.0, alpha=0.4, ls=0.1, gamma=0.7, nll=compute_nll_loss,
                       average=True)
    _compare(got, want, [xg, wg, bg], [xr, wr, br])


@pytest.mark.parametrize("average_log_prob", [False, True])
@pytest.mark.parametrize("compute_nll_loss", [True, False])
def test_cpo_options(average_log_prob, compute_nll_loss):
    x, w, b, target = _inputs(seed=4)
    module = liger.LigerFusedLinearCPOLoss(beta=0.1, alpha=1.5, label_smoothing=0.05,
                                           compute_nll_loss=compute_nll_loss, average_log_prob=average_log_prob)
    xg, wg, bg = _leaves(x, w, b)
    xr, wr, br = _leaves(x, w, b)
    got = module(wg, xg, target, bg)
    want = _ref_paired("cpo", xr, wr, br, target, beta=0.1, alpha=1.5, ls=0.05, nll=compute_nll_loss,
                       average=average_log_prob)
    _compare(got, want, [xg, wg, bg], [xr, wr, br])


# ----------------------------------------------------------------------------------------------------- KTO
def _ref_kto(x, w, b, target, labels, *, ref=None, kl=None, beta=0.1, average=False):
    seq, logits, _ = _head(x, w, b, target, average=average)
    rseq = torch.zeros_like(seq) if ref is None else _head(*ref, target, average=average)[0].detach()
    ratio = seq - rseq
    sign = torch.where(labels, 1.0, -1.0).to(seq.dtype)
    z = beta * (ratio - (0.0 if kl is None else kl)) * sign
    loss = (1 - torch.sigmoid(z)).mean()
    rewards = beta * ratio
    row_logits = logits.sum((1, 2))
    aux = (seq[labels].sum(), seq[~labels].sum(), row_logits[labels].sum(), row_logits[~labels].sum(),
           rewards[labels].sum(), rewards[~labels].sum())
    return loss, aux


@pytest.mark.parametrize("kl", [None, 0.3, -0.2], ids=["no-kl", "kl", "negative-kl-not-clamped"])
@pytest.mark.parametrize("use_ref_model", [True, False])
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_kto_from_hidden_states(kl, use_ref_model, average_log_prob):
    x, w, b, target = _inputs(seed=5, batch=5)
    labels = torch.tensor([True, False, True, True, False])
    rx, rw, rb = x * 1.1, w - 0.02, b
    module = liger.LigerFusedLinearKTOLoss(beta=0.5, use_ref_model=use_ref_model, average_log_prob=average_log_prob)
    xg, wg, bg = _leaves(x, w, b)
    xr, wr, br = _leaves(x, w, b)
    kl_t = None if kl is None else torch.tensor(kl, dtype=torch.float64)
    ref = (rx, rw, rb) if use_ref_model else (None, None, None)
    got = module(xg, wg, target, bg, labels, *ref, kl_t)      # Liger's KTO order: _input first, then lin_weight
    want = _ref_kto(xr, wr, br, target, labels, ref=ref if use_ref_model else None, kl=kl, beta=0.5,
                    average=average_log_prob)
    _compare(got, want, [xg, wg, bg], [xr, wr, br])


def test_kto_loss_takes_a_precomputed_kl_as_is():
    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    labels = torch.tensor([True, False, True, False, False, True])
    loss, metrics = prefopt.kto_loss(pol, ref, labels, kl=-0.4, beta=0.2)
    sign = torch.where(labels, 1.0, -1.0).double()
    torch.testing.assert_close(loss, (1 - torch.sigmoid(0.2 * (pol - ref + 0.4) * sign)).mean(), **TOL)
    assert metrics["kl"].item() == pytest.approx(-0.4)
    with pytest.raises(ValueError, match="not both"):
        prefopt.kto_loss(pol, ref, labels, pol, ref, kl=0.1)
    with pytest.raises(ValueError, match="0-dim"):
        prefopt.kto_loss(pol, ref, labels, kl=torch.zeros(6, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------- errors
def test_liger_form_errors():
    x, w, b, target = _inputs()
    with pytest.raises(ValueError, match="unsupported loss_type"):
        liger.LigerFusedLinearDPOLoss(loss_type="ipo")(w, x, target, b, x, w)
    with pytest.raises(ValueError, match="use_ref_model=True needs"):
        liger.LigerFusedLinearDPOLoss()(w, x, target, b)
    with pytest.raises(ValueError, match="label_smoothing"):
        liger.LigerFusedLinearDPOLoss(loss_type="exo_pair")(w, x, target, b, x, w)
    with pytest.raises(ValueError, match="preference_labels"):
        liger.LigerFusedLinearKTOLoss()(x, w, target, b)


# ------------------------------------------------------------------------ the same options on prefopt's native API
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "robust", "apo_zero"])
def test_native_average_log_prob_and_return_aux(loss_type):
    """`FusedLinearPreferenceLoss(average_log_prob=True, return_aux=True)`, refs positional: Liger's results."""
    x, w, b, target = _inputs(seed=6)
    rx, rw, rb = x * 0.9, w + 0.03, b
    ls = 0.1 if loss_type == "robust" else 0.0
    module = prefopt.nn.FusedLinearPreferenceLoss(loss_type=loss_type, beta=0.4, label_smoothing=ls,
                                                  average_log_prob=True, return_aux=True)
    xg, wg, bg = _leaves(x, w, b)
    xr, wr, br = _leaves(x, w, b)
    got = module(wg, xg, target, bg, rx, rw, rb)
    want = _ref_paired("dpo", xr, wr, br, target, ref=(rx, rw, rb), beta=0.4, average=True, loss_type=loss_type,
                       ls=ls)
    _compare(got, want, [xg, wg, bg], [xr, wr, br])


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_native_average_log_prob_does_not_normalise_twice(loss_type):
    x, w, b, target = _inputs(seed=7)
    kw = dict(ref_hidden=x * 0.9, ref_weight=w, loss_type=loss_type, beta=0.2)
    summed, _ = prefopt.fused_linear_preference_loss(x, w, target, bias=b, **kw)
    averaged, _ = prefopt.fused_linear_preference_loss(x, w, target, bias=b, average_log_prob=True, **kw)
    torch.testing.assert_close(averaged, summed, **TOL)


def test_native_orpo_nll_target_matches_liger_form():
    x, w, b, target = _inputs(seed=8)
    nll_target = torch.randint(0, V, target.shape, generator=torch.Generator().manual_seed(3))
    nll_target[:, 0] = -100
    xg, wg, bg = _leaves(x, w, b)
    loss, metrics = prefopt.fused_linear_preference_loss(xg, wg, target, bias=bg, loss_type="orpo", beta=0.3,
                                                         nll_target=nll_target)
    xr, wr, br = _leaves(x, w, b)
    want = _ref_paired("orpo", xr, wr, br, target, beta=0.3, nll=True, average=True, nll_target=nll_target)
    torch.testing.assert_close(loss, want[0], **TOL)
    torch.testing.assert_close(metrics["nll_loss"], want[1][4].detach(), **TOL)
    for a, c in zip(torch.autograd.grad(loss, [xg, wg, bg]), torch.autograd.grad(want[0], [xr, wr, br])):
        torch.testing.assert_close(a, c, **TOL)


# ------------------------------------------------------------------- the installed Liger itself, where it is
# The torch reference above is a transcription of Liger's formulas; where liger-kernel is installed, each call form is
# also run through Liger's own module (compiled=False: eager torch, which runs on CPU) on the same inputs.
LIGER_CASES = (
    [("DPO", dict(beta=0.3, loss_type=t, average_log_prob=a,
                  label_smoothing=0.2 if t in ("robust", "exo_pair", "sigmoid") else 0.0), 0)
     for t in ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
               "discopop") for a in (False, True)]
    + [("DPO", dict(beta=0.2, compute_nll_loss=True, alpha=0.7, use_ref_model=r), 1) for r in (True, False)]
    + [("ORPO", dict(beta=0.25, compute_nll_loss=c), 2) for c in (True, False)]
    + [("SimPO", dict(beta=2.0, alpha=0.4, label_smoothing=0.1, gamma=0.7, compute_nll_loss=c), 3) for c in (True, False)]
    + [("CPO", dict(beta=0.1, alpha=1.5, label_smoothing=0.05, compute_nll_loss=c, average_log_prob=a), 4)
       for c in (True, False) for a in (False, True)]
    + [("KTO", dict(beta=0.5, use_ref_model=r, average_log_prob=a, kl=k), 5)
       for r in (True, False) for a in (False, True) for k in (None, 0.3, -0.2)]
)


@pytest.mark.parametrize("family, options, seed", LIGER_CASES,
                         ids=[f"{f}-" + "-".join(f"{k}={v}" for k, v in o.items()) for f, o, _ in LIGER_CASES])
def test_liger_forms_equal_liger_itself(family, options, seed):
    chunked_loss = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")
    options = dict(options)
    kl = options.pop("kl", None)
    batch = 5 if family == "KTO" else 2 * P
    x, w, b, target = _inputs(seed=seed, batch=batch)
    ref = (x * 0.9, w + 0.03, b * 0.5) if options.get("use_ref_model", family == "DPO") else (None, None, None)
    theirs_module = getattr(chunked_loss, f"LigerFusedLinear{family}Loss")(compiled=False, **options)
    ours_module = getattr(liger, f"LigerFusedLinear{family}Loss")(**options)
    xt, wt, bt = _leaves(x, w, b)
    xo, wo, bo = _leaves(x, w, b)
    if family == "KTO":
        labels = torch.tensor([True, False, True, True, False])
        kl_t = None if kl is None else torch.tensor(kl, dtype=torch.float64)
        theirs = theirs_module(xt, wt, target, bt, labels, *ref, kl_t)
        ours = ours_module(xo, wo, target, bo, labels, *ref, kl_t)
    elif family == "DPO":
        theirs = theirs_module(wt, xt, target, bt, *ref)
        ours = ours_module(wo, xo, target, bo, *ref)
    else:
        theirs = theirs_module(wt, xt, target, bt)
        ours = ours_module(wo, xo, target, bo)
    # Liger 0.8.5 runs each chunk's log-softmax in float32 (logits_chunk.float()), the rest in the inputs' float64:
    # each token log-prob it forms carries a few fp32 roundings of |z| + |lse|, a sequence sums T of them. Every
    # output (loss, aux, gradient) depends on the sequences with a slope below 8 here (beta <= 2 times slopes <= 1,
    # sppo_hard's quadratic at these margins; its sums of logits round relative to their own size), so it must agree
    # within 8 T eps32 max(|z| + |lse|) max(1, |value|).
    scale = 0.0
    for hidden, weight, bias in ((x, w, b), ref):
        if hidden is not None:
            logits = hidden @ weight.T + (0 if bias is None else bias)
            scale = max(scale, float(logits.abs().max() + logits.logsumexp(-1).abs().max()))
    allowed = 8 * T * torch.finfo(torch.float32).eps * scale
    (loss_t, aux_t), (loss_o, aux_o) = theirs, ours
    assert len(aux_o) == len(aux_t)
    pairs = [(loss_o, loss_t)] + list(zip(aux_o, aux_t)) + list(zip(
        torch.autograd.grad(loss_o, [t for t in (xo, wo, bo) if t is not None]),
        torch.autograd.grad(loss_t, [t for t in (xt, wt, bt) if t is not None])))
    for i, (a, c) in enumerate(pairs):
        a, c = torch.as_tensor(a).detach().double(), torch.as_tensor(c).detach().double()
        assert a.shape == c.shape, i
        excess = float(((a - c).abs() / (allowed * c.abs().clamp(min=1))).max()) if a.numel() else 0.0
        assert excess <= 1.0, f"output {i}: off by {excess:.3g} x the allowance"
