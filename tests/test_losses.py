"""Preference losses: prefopt (torch and Triton-interpreter backends) vs the independent TRL-formula references."""
import math

import pytest
import torch

import prefopt
from prefopt._backend import triton_status
from prefopt.losses import kto_loss, preference_loss
from prefopt.losses.reference import reference_cpo_loss, reference_dpo_loss, reference_kto_loss
from prefopt.losses.table import DPO_LOSSES, ENTRIES, REF_FREE_LOSSES
from tests._backends import BACKENDS

P = 8
_TRITON_OK, _TRITON_WHY = triton_status("cpu")
RTOL, ATOL = 1e-9, 1e-12


def _inputs(dtype=torch.float64, scale=3.0, P=P, negative=False):
    g = torch.Generator().manual_seed(1234)
    if negative:  # strictly negative log-probs (ORPO needs log p < 0)
        vals = [-(torch.rand(P, generator=g, dtype=torch.float64) * 40 + 0.5) for _ in range(4)]
    else:
        vals = [torch.randn(P, generator=g, dtype=torch.float64) * scale - 20 for _ in range(4)]
    ins = [v.to(dtype).requires_grad_() for v in vals]
    cl = torch.randint(1, 30, (P,), generator=g)
    rl = torch.randint(1, 30, (P,), generator=g)
    nll = (torch.rand(P, generator=g, dtype=torch.float64) * 30).to(dtype).requires_grad_()
    w = torch.rand(P, generator=g, dtype=torch.float64).to(dtype)
    return ins, cl, rl, nll, w


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# reference-based family: (name, kwargs); "LEN" / "NLL" / "NLL0" / "W" are filled with the test tensors
# ---------------------------------------------------------------------------------------------------------------
DPO_CASES = [(lt, {}) for lt in DPO_LOSSES if lt not in ("sft", "exo_pair")] + [
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("exo_pair", {"label_smoothing": 0.3}),
    ("sft", {"chosen_nll": "NLL"}),
    ("sft", {"chosen_nll": "NLL0"}),
    ("sigmoid", {"label_smoothing": 0.2}),
    ("robust", {"label_smoothing": 0.3}),
    ("aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {"label_smoothing": 0.1}),
    ("bco_pair", {}),
    ("bco_pair", {"bco_running_mean": "batch"}),
    ("bco_pair", {"bco_running_mean": 0.0}),
    ("bco_pair", {"bco_running_mean": 0.37}),
    ("discopop", {"discopop_tau": 0.5, "beta": 0.3}),
    ("sigmoid", {"rpo_alpha": 0.7, "chosen_nll": "NLL"}),
    ("sigmoid", {"rpo_alpha": 0.7, "chosen_nll": "NLL0"}),
    ("sigmoid", {"rpo_alpha": 1.0, "chosen_nll": "NLL", "nll_lengths": "LEN2"}),
    ("sigmoid", {"policy_weights": "W"}),
    ("ipo", {"policy_weights": "W"}),
    ("nca_pair", {"policy_weights": "W"}),
    ("sft", {"policy_weights": "W", "chosen_nll": "NLL"}),
    (["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0], "chosen_nll": "NLL"}),  # MPO
    (["sigmoid", "ipo", "apo_zero", "aot", "aot_unpaired"], {"loss_weights": [0.5, 0.1, 2.0, 1.5, 0.3]}),
    (["hinge", "sppo_hard", "robust"], {"loss_weights": [1.0, 0.01, 0.5], "label_smoothing": 0.1,
                                        "policy_weights": "W"}),
] + [(lt, {"f_divergence_type": fd, **extra})
     for fd, extra in [("forward_kl", {}), ("js_divergence", {}), ("alpha_divergence", {}),
                       ("alpha_divergence", {"f_alpha_divergence_coef": 1.0}),
                       ("alpha_divergence", {"f_alpha_divergence_coef": 2.5})]
     for lt in ["sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"]] + [
    (["sigmoid", "sft", "ipo"], {"f_divergence_type": "js_divergence", "chosen_nll": "NLL",
                                 "loss_weights": [1.0, 0.5, 0.1]}),
]


def _fill(kw, cl, rl, nll, w):
    out = {}
    for k, v in kw.items():
        if v == "NLL":
            v = nll
        elif v == "NLL0":
            v = nll.mean() * 0.1
        elif v == "W":
            v = w
        elif v == "LEN2":
            v = cl + rl
        out[k] = v
    return out


def _case_id(case):
    lt, kw = case
    name = "+".join(lt) if isinstance(lt, list) else lt
    return name + ("-" + "-".join(f"{k}={v}" for k, v in kw.items()) if kw else "")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DPO_CASES, ids=[_case_id(c) for c in DPO_CASES])
def test_dpo_family_matches_reference(backend, case):
    lt, kw = case
    # f-divergence scores grow like exp(log-ratio): keep the log-ratios moderate so TRL's naive forms stay finite
    ins, cl, rl, nll, w = _inputs(scale=1.0 if "f_divergence_type" in kw else 3.0)
    kw = _fill(kw, cl, rl, nll, w)
    if "exo_pair" in ([lt] if isinstance(lt, str) else lt) and "label_smoothing" not in kw:
        kw["label_smoothing"] = 1e-3
    with prefopt.use_backend(backend):
        loss, metrics = preference_loss(*ins, loss_type=lt, chosen_lengths=cl, rejected_lengths=rl, **kw)
    ref = reference_dpo_loss(*ins, loss_type=lt, chosen_lengths=cl, rejected_lengths=rl, **kw)
    _close(loss, ref)
    wrt = ins + ([nll] if kw.get("chosen_nll") is nll else [])
    g = torch.autograd.grad(loss, wrt, allow_unused=True)
    gr = torch.autograd.grad(ref, wrt, allow_unused=True)
    for a, b in zip(g, gr):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            _close(a, b)
    assert not any(v.requires_grad for v in metrics.values())


REF_FREE_CASES = [
    ("simpo", {}), ("simpo", {"simpo_gamma": 1.3, "beta": 2.0, "label_smoothing": 0.1}),
    ("simpo", {"cpo_alpha": 0.5, "chosen_nll": "NLL"}),
    ("cpo", {"chosen_nll": "NLL"}), ("cpo", {"chosen_nll": "NLL0", "label_smoothing": 0.2, "cpo_alpha": 0.3}),
    ("cpo", {"cpo_alpha": 0.0}),
    ("cpo_hinge", {"chosen_nll": "NLL"}), ("cpo_ipo", {"chosen_nll": "NLL"}),
    ("orpo", {"chosen_nll": "NLL"}), ("orpo", {"chosen_nll": "NLL0", "beta": 0.5}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", REF_FREE_CASES, ids=[_case_id(c) for c in REF_FREE_CASES])
def test_reference_free_matches_reference(backend, case):
    lt, kw = case
    ins, cl, rl, nll, w = _inputs(negative=True)
    pc, pr = ins[0], ins[1]
    kw = _fill(kw, cl, rl, nll, w)
    with prefopt.use_backend(backend):
        loss, metrics = preference_loss(pc, pr, loss_type=lt, chosen_lengths=cl, rejected_lengths=rl, **kw)
    ref = reference_cpo_loss(pc, pr, loss_type=lt, chosen_lengths=cl, rejected_lengths=rl, **kw)
    _close(loss, ref)
    wrt = [pc, pr] + ([nll] if kw.get("chosen_nll") is nll else [])
    for a, b in zip(torch.autograd.grad(loss, wrt, allow_unused=True),
                    torch.autograd.grad(ref, wrt, allow_unused=True)):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            _close(a, b)
    if lt == "orpo":
        assert {"log_odds_ratio", "log_odds_chosen", "nll_loss"} <= set(metrics)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,wd,wu", [("kto", 1.0, 1.0), ("kto", 1.33, 0.7), ("apo_zero_unpaired", 1.0, 2.0)])
def test_kto_matches_reference(backend, loss_type, wd, wu):
    ins, *_ = _inputs()
    pol, ref = ins[0], ins[1]
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    klp = torch.randn(P, dtype=torch.float64) - 20 + 3.0
    klr = torch.randn(P, dtype=torch.float64) - 20
    with prefopt.use_backend(backend):
        loss, metrics = kto_loss(pol, ref, labels, klp, klr, beta=0.2, desirable_weight=wd, undesirable_weight=wu,
                                 loss_type=loss_type)
    r = reference_kto_loss(pol, ref, labels, klp, klr, beta=0.2, desirable_weight=wd, undesirable_weight=wu,
                           loss_type=loss_type)
    _close(loss, r)
    for a, b in zip(torch.autograd.grad(loss, [pol, ref]), torch.autograd.grad(r, [pol, ref])):
        _close(a, b)
    if loss_type == "kto":
        _close(metrics["kl"], (klp - klr).mean().clamp(min=0))
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(metrics)


def test_kto_kl_is_clamped_at_zero():
    ins, *_ = _inputs()
    labels = torch.tensor([True, False] * 4)
    kl = torch.full((P,), -5.0, dtype=torch.float64)
    loss, m = kto_loss(ins[0], ins[1], labels, kl, torch.zeros(P, dtype=torch.float64))
    assert m["kl"].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lt,kw", [
    ("sigmoid", {"label_smoothing": 0.1}), ("ipo", {}), ("discopop", {"f_divergence_type": "js_divergence"}),
    ("aot", {}), ("bco_pair", {"bco_running_mean": 0.1}), ("apo_down", {}),  # (default shift is detached) ("exo_pair", {"label_smoothing": 0.05}),
    ("sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
])
def test_gradcheck(backend, lt, kw):
    ins, cl, rl, *_ = _inputs(P=4, scale=1.0)
    ins = [t.detach().requires_grad_() for t in ins]  # scale=1: log-ratios of order one

    def f(a, b, c, d):
        return preference_loss(a, b, c, d, loss_type=lt, beta=0.5, chosen_lengths=cl[:4], rejected_lengths=rl[:4],
                               **kw)[0]
    with prefopt.use_backend(backend):
        assert torch.autograd.gradcheck(f, tuple(ins), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lt", ["orpo", "simpo"])
def test_gradcheck_reference_free(backend, lt):
    ins, cl, rl, nll, _ = _inputs(P=4, negative=True)
    a, b = ins[0].detach().requires_grad_(), ins[1].detach().requires_grad_()
    n = nll[:4].detach().requires_grad_()

    def f(x, y, z):
        return preference_loss(x, y, loss_type=lt, chosen_lengths=cl[:4], rejected_lengths=rl[:4], chosen_nll=z,
                               cpo_alpha=0.5)[0]
    with prefopt.use_backend(backend):
        assert torch.autograd.gradcheck(f, (a, b, n), eps=1e-6, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# extreme inputs
# ---------------------------------------------------------------------------------------------------------------
def _extreme(dtype, P=P):
    g = torch.Generator().manual_seed(7)
    ref_c = torch.randn(P, generator=g, dtype=torch.float64) - 50
    ref_r = torch.randn(P, generator=g, dtype=torch.float64) - 50
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64)[:P]
    pc = ref_c + 1e4 * sign
    pr = ref_r - 1e4 * sign.roll(1)
    return [t.to(dtype).requires_grad_() for t in (pc, pr, ref_c, ref_r)]


EXTREME_DPO = [(lt, {}) for lt in DPO_LOSSES if lt not in ("exo_pair", "sft")] + [
    ("exo_pair", {"label_smoothing": 1e-3}), ("robust", {"label_smoothing": 0.4}),
    ("sigmoid", {"label_smoothing": 0.3}),
    ("sigmoid", {"f_divergence_type": "js_divergence"}), ("discopop", {"f_divergence_type": "js_divergence"}),
    ("sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}),
    ("hinge", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.5}),
    ("discopop", {"discopop_tau": 0.05, "beta": 1.0}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", EXTREME_DPO, ids=[_case_id(c) for c in EXTREME_DPO])
def test_extreme_log_ratios_finite(backend, dtype, case):
    lt, kw = case
    ins = _extreme(dtype)
    L = torch.full((P,), 3)
    with prefopt.use_backend(backend):
        loss, metrics = preference_loss(*ins, loss_type=lt, chosen_lengths=L, rejected_lengths=L, **kw)
    grads = torch.autograd.grad(loss, ins)
    assert torch.isfinite(loss), (lt, loss)
    for gr in grads:
        assert torch.isfinite(gr).all(), (lt, gr)
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lt", REF_FREE_LOSSES)
def test_extreme_reference_free_finite(backend, dtype, lt):
    # log p from 1e-7 (p -> 1, where log1p(-exp(x)) needs the expm1 form) down to -1e4
    pc = torch.tensor([-1e-7, -1e4, -3e-6, -5e3, -0.5, -1e4, -1e-5, -2.0], dtype=dtype).requires_grad_()
    pr = torch.tensor([-1e4, -1e-7, -2e3, -1e-6, -1e4, -0.3, -1e4, -1e-7], dtype=dtype).requires_grad_()
    L = torch.ones(P, dtype=torch.long)
    nll = torch.tensor(3.0, dtype=dtype, requires_grad=True)
    with prefopt.use_backend(backend):
        loss, metrics = preference_loss(pc, pr, loss_type=lt, chosen_lengths=L, rejected_lengths=L, chosen_nll=nll,
                                        beta=2.0)
    grads = torch.autograd.grad(loss, [pc, pr])
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_kto_finite(backend):
    ins = _extreme(torch.float64)
    labels = torch.tensor([True, False] * 4)
    with prefopt.use_backend(backend):
        loss, _ = kto_loss(ins[0], ins[2], labels, ins[1].detach(), ins[3].detach(), beta=1.0)
    g = torch.autograd.grad(loss, [ins[0], ins[2]])
    assert torch.isfinite(loss) and all(torch.isfinite(x).all() for x in g)


# ---------------------------------------------------------------------------------------------------------------
# metrics, dtypes, backend plumbing
# ---------------------------------------------------------------------------------------------------------------
def test_metrics_trl_names_and_values():
    ins, cl, rl, nll, _ = _inputs()
    loss, m = preference_loss(*ins, loss_type="sigmoid", beta=0.1, rpo_alpha=1.0, chosen_nll=nll, chosen_lengths=cl)
    pc, pr, rc, rr = [t.detach() for t in ins]
    exp = {"rewards/chosen": (0.1 * (pc - rc)).mean(), "rewards/rejected": (0.1 * (pr - rr)).mean(),
           "rewards/accuracies": ((pc - rc) > (pr - rr)).double().mean(),
           "rewards/margins": (0.1 * (pc - rc - pr + rr)).mean(), "logps/chosen": pc.mean(),
           "logps/rejected": pr.mean(), "nll_loss": nll.detach().sum() / cl.sum()}
    assert set(m) == set(exp)
    for k in exp:
        _close(m[k], exp[k])


def test_reference_free_metrics_use_averaged_logps():
    ins, cl, rl, *_ = _inputs(negative=True)
    _, m = preference_loss(ins[0], ins[1], loss_type="simpo", beta=2.0, chosen_lengths=cl, rejected_lengths=rl)
    _close(m["logps/chosen"], (ins[0].detach() / cl).mean())
    _close(m["rewards/rejected"], (2.0 * ins[1].detach() / rl).mean())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, dtype):
    ins64, cl, rl, *_ = _inputs()
    ins = [t.detach().to(dtype).requires_grad_() for t in ins64]
    with prefopt.use_backend(backend):
        loss, _ = preference_loss(*ins, loss_type=["sigmoid", "ipo"], chosen_lengths=cl, rejected_lengths=rl)
    g = torch.autograd.grad(loss, ins)
    assert loss.dtype == torch.float32
    assert all(x.dtype == dtype for x in g)
    ref = reference_dpo_loss(*[t.detach().to(dtype).double() for t in ins64], loss_type=["sigmoid", "ipo"],
                             chosen_lengths=cl, rejected_lengths=rl)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _TRITON_OK, reason=_TRITON_WHY)
def test_triton_backend_runs_generated_kernel():
    from prefopt.losses.function import _import_kernels
    mod = _import_kernels()
    ins, cl, rl, *_ = _inputs()
    with prefopt.use_backend("triton"):
        preference_loss(*ins, loss_type=["robust", "nca_pair"], label_smoothing=0.25, beta=0.123)
    assert any(key[0].losses == ("robust", "nca_pair") for key in mod._CACHE)
    src = mod.generate_source(next(k[0] for k in mod._CACHE if k[0].losses == ("robust", "nca_pair")), True, True)
    assert "@triton.jit" in src and "_logsigmoid" in src


def test_no_grad_inputs():
    ins, *_ = _inputs()
    ins = [t.detach() for t in ins]
    loss, _ = preference_loss(*ins)
    assert not loss.requires_grad and torch.isfinite(loss)


def test_table_is_complete():
    names = {e.name for e in ENTRIES}
    assert set(DPO_LOSSES) == {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                               "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
    assert set(REF_FREE_LOSSES) == {"simpo", "cpo", "cpo_hinge", "cpo_ipo", "orpo"}
    assert "kto" in names
    for e in ENTRIES:
        if e.kind != "none":
            n_args = 2 if e.kind in ("cr", "cr_norm") else 1
            assert len(e.grads) == n_args, e.name


# ---------------------------------------------------------------------------------------------------------------
# validation errors
# ---------------------------------------------------------------------------------------------------------------
def _base():
    ins, cl, rl, nll, w = _inputs()
    return [t.detach() for t in ins], cl, rl, nll.detach(), w


ERRORS = [
    (dict(loss_type="dpo"), ValueError, "unknown loss_type 'dpo'; valid loss types: sigmoid, hinge"),
    (dict(loss_type=["sigmoid", "nope"]), ValueError, "discopop"),
    (dict(loss_type=[]), TypeError, "non-empty list"),
    (dict(loss_type=["sigmoid", "sigmoid"]), ValueError, "repeated"),
    (dict(f_divergence_type="kl"), ValueError, "valid f-divergences: reverse_kl, forward_kl, js_divergence, "
                                               "alpha_divergence"),
    (dict(loss_type="nca_pair", f_divergence_type="js_divergence"), ValueError, "not for nca_pair"),
    (dict(loss_type="robust", label_smoothing=0.5), ValueError, "in [0.0, 0.5) for the 'robust' loss"),
    (dict(loss_type="exo_pair"), ValueError, "in (0.0, 1.0) for the 'exo_pair' loss"),
    (dict(loss_type="sigmoid", label_smoothing=1.5), ValueError, "label_smoothing must be in [0, 1]"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be in [0, 1]"),
    (dict(beta=0.0), ValueError, "beta must be > 0"),
    (dict(beta=-1.0), ValueError, "beta must be > 0"),
    (dict(beta=float("nan")), ValueError, "beta must be finite"),
    (dict(beta="0.1"), TypeError, "beta must be a real number"),
    (dict(discopop_tau=0.0, loss_type="discopop"), ValueError, "discopop_tau must be > 0"),
    (dict(loss_type="ipo", chosen_lengths=None), ValueError, "ipo needs chosen_lengths and rejected_lengths"),
    (dict(loss_type="sigmoid_norm", rejected_lengths=None), ValueError, "sigmoid_norm needs chosen_lengths"),
    (dict(loss_type="sft"), ValueError, "sft needs chosen_nll"),
    (dict(rpo_alpha=0.5), ValueError, "rpo_alpha needs chosen_nll"),
    (dict(loss_type="sft", chosen_nll="NLL", chosen_lengths=None), ValueError, "needs nll_lengths or chosen_lengths"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), ValueError, "loss_weights has 1 entries"),
    (dict(loss_type="aot", policy_weights="W"), ValueError, "not supported with 'aot'"),
    (dict(loss_type=["sigmoid", "simpo"]), ValueError, "mixes reference-based and reference-free"),
    (dict(loss_type="simpo"), ValueError, "'simpo' is reference-free: pass ref_chosen_logps=None"),
]


@pytest.mark.parametrize("kw,exc,msg", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_errors(kw, exc, msg):
    ins, cl, rl, nll, w = _base()
    kw = dict(kw)
    kw.setdefault("chosen_lengths", cl)
    kw.setdefault("rejected_lengths", rl)
    kw = {k: (nll if v == "NLL" else w if v == "W" else v) for k, v in kw.items()}
    with pytest.raises(exc) as ei:
        preference_loss(*ins, **kw)
    assert msg in str(ei.value)


def test_tensor_errors():
    ins, cl, rl, nll, w = _base()
    pc, pr, rc, rr = ins
    with pytest.raises(TypeError, match="chosen_logps must be a torch.Tensor"):
        preference_loss([1.0] * P, pr, rc, rr)
    with pytest.raises(TypeError, match="rejected_logps must be a floating-point tensor, got dtype torch.int64"):
        preference_loss(pc, pr.long(), rc, rr)
    with pytest.raises(ValueError, match=r"ref_rejected_logps has shape \(7,\) but chosen_logps has shape \(8,\)"):
        preference_loss(pc, pr, rc, rr[:7])
    with pytest.raises(ValueError, match=r"must have shape \[P\]"):
        preference_loss(pc[None], pr[None], rc[None], rr[None])
    with pytest.raises(ValueError, match="chosen_lengths has shape"):
        preference_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=cl[:3], rejected_lengths=rl)
    with pytest.raises(ValueError, match="on meta but chosen_logps is on cpu"):
        preference_loss(pc, pr, rc.to("meta"), rr)
    with pytest.raises(ValueError, match="needs ref_chosen_logps and ref_rejected_logps"):
        preference_loss(pc, pr, loss_type="sigmoid")
    with pytest.raises(ValueError, match="orpo needs chosen_lengths"):
        preference_loss(pc, pr, loss_type="orpo", chosen_nll=nll)
    with pytest.raises(ValueError, match="orpo needs chosen_nll"):
        preference_loss(pc, pr, loss_type="orpo", chosen_lengths=cl, rejected_lengths=rl)
    with pytest.raises(ValueError, match="cpo_alpha needs chosen_nll"):
        preference_loss(pc, pr, loss_type="cpo")
    with pytest.raises(ValueError, match="simpo needs chosen_lengths"):
        preference_loss(pc, pr, loss_type="simpo")
    with pytest.raises(ValueError, match="single loss_type"):
        preference_loss(pc, pr, loss_type=["simpo", "cpo"], chosen_lengths=cl, rejected_lengths=rl)
    with pytest.raises(ValueError, match="empty"):
        preference_loss(pc[:0], pr[:0], rc[:0], rr[:0])


def test_kto_errors():
    ins, *_ = _base()
    pol, ref = ins[0], ins[1]
    lab = torch.tensor([True, False] * 4)
    with pytest.raises(TypeError, match="labels_desirable must be a bool tensor"):
        kto_loss(pol, ref, lab.long(), pol, ref)
    with pytest.raises(ValueError, match="needs kl_policy_logps and kl_ref_logps"):
        kto_loss(pol, ref, lab)
    with pytest.raises(ValueError, match="labels_desirable has shape"):
        kto_loss(pol, ref, lab[:3], pol, ref)
    with pytest.raises(ValueError, match="beta must be > 0"):
        kto_loss(pol, ref, lab, pol, ref, beta=0)
    with pytest.raises(ValueError, match="valid: kto, apo_zero_unpaired"):
        kto_loss(pol, ref, lab, pol, ref, loss_type="kto_pair")
    with pytest.raises(ValueError, match="must be >= 0"):
        kto_loss(pol, ref, lab, pol, ref, undesirable_weight=-1.0)
    with pytest.raises(TypeError, match="kl_ref_logps must be a floating-point"):
        kto_loss(pol, ref, lab, pol, ref.long())


def test_public_export():
    assert prefopt.preference_loss is preference_loss
    assert prefopt.kto_loss is kto_loss
    assert math.isfinite(float(prefopt.preference_loss(*_base()[0])[0]))
