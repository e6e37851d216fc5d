"""fused_linear_preference_loss against an eager path that materialises the logits (TRL's formulas)."""
import pytest
import torch

import prefopt
from prefopt.losses.reference import reference_cpo_loss, reference_dpo_loss
from prefopt.reference import linear_logprobs_ref
from tests._backends import BACKENDS, CPU_BACKENDS
from tests._probes import LargestTensor

P, T, H, V = 2, 6, 8, 37


def _batch(dtype, with_bias):
    hidden = torch.randn(2 * P, T, H, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, dtype=dtype, requires_grad=True)
    bias = torch.randn(V, dtype=dtype, requires_grad=True) if with_bias else None
    labels = torch.randint(0, V, (2 * P, T))
    labels[:, :2] = -100            # prompt positions
    labels[0, -1] = -100            # padding
    labels[P + 1, -3:] = -100       # a shorter rejected completion (LD-DPO tail)
    ref_hidden = torch.randn(2 * P, T, H, dtype=dtype)
    ref_weight = torch.randn(V, H, dtype=dtype)
    return hidden, weight, bias, labels, ref_hidden, ref_weight


def _eager(hidden, weight, bias, labels, ref_hidden, ref_weight, *, loss_type, beta, ld_alpha=None,
           use_weighting=False, precomputed=None, **options):
    """Materialise logits; TRL 1.16 DPOTrainer._compute_loss arithmetic for LD-DPO and WPO."""
    mask = (labels != -100).to(hidden.dtype)
    token_logps, log_sum_p2 = linear_logprobs_ref(hidden, weight, labels, bias, return_log_sum_p2=True)
    lengths = mask.sum(1)

    def sums(tokens):
        if ld_alpha is None:
            return (tokens * mask).sum(1)
        position = mask.cumsum(1)
        shared = torch.minimum(lengths[:P], lengths[P:]).repeat(2).unsqueeze(1)
        shared_mask = (position > 0) & (position <= shared) & (mask > 0)
        tail_mask = (position > shared) & (mask > 0)
        return (tokens * shared_mask).sum(1) + ld_alpha * (tokens * tail_mask).sum(1)

    logps = sums(token_logps)
    if precomputed is not None:
        ref_c, ref_r = precomputed
    elif ref_hidden is not None:
        with torch.no_grad():
            ref_logps = sums(linear_logprobs_ref(ref_hidden, ref_weight, labels))
        ref_c, ref_r = ref_logps[:P], ref_logps[P:]
    weights = None
    if use_weighting:
        with torch.no_grad():
            seq_w = (((token_logps - log_sum_p2) * mask).sum(1) / lengths.clamp_min(1)).exp()
            weights = seq_w[:P] * seq_w[P:]
    chosen_nll = -(token_logps * mask).sum(1)[:P]
    if loss_type in ("simpo", "cpo", "orpo", "cpo_hinge", "cpo_ipo"):
        return reference_cpo_loss(logps[:P], logps[P:], loss_type=loss_type, beta=beta, chosen_lengths=lengths[:P],
                                  rejected_lengths=lengths[P:], chosen_nll=chosen_nll, nll_lengths=lengths[:P],
                                  **options)
    return reference_dpo_loss(logps[:P], logps[P:], ref_c, ref_r, loss_type=loss_type, beta=beta,
                              chosen_lengths=lengths[:P], rejected_lengths=lengths[P:], chosen_nll=chosen_nll,
                              nll_lengths=lengths[:P], policy_weights=weights, **options)


def _loss_and_grads(fn, inputs):
    loss, metrics = fn()
    grads = torch.autograd.grad(loss, inputs)
    return loss, grads, metrics


CASES = [
    dict(loss_type="sigmoid", beta=0.1),
    dict(loss_type="ipo", beta=0.5),
    dict(loss_type=["sigmoid", "sft"], beta=0.2, loss_weights=[1.0, 0.5]),
    dict(loss_type="sigmoid", beta=0.1, rpo_alpha=0.7),
    dict(loss_type="sigmoid", beta=0.1, ld_alpha=0.5),
    dict(loss_type="hinge", beta=0.1, use_weighting=True),
    dict(loss_type="apo_zero", beta=0.3),
    # a non-default f-divergence (TRL allows none with apo_zero): nonlinear scores of the log-ratios
    dict(loss_type="sigmoid", beta=0.2, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
    dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5),
    dict(loss_type="orpo", beta=0.1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("with_bias", [False, True])
def test_padded_live_reference_float64(backend, case, with_bias):
    case = dict(case)
    hidden, weight, bias, labels, ref_hidden, ref_weight = _batch(torch.float64, with_bias)
    ref_free = case["loss_type"] in ("simpo", "orpo")
    live = {} if ref_free else dict(ref_hidden=ref_hidden, ref_weight=ref_weight)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    with prefopt.use_backend(backend):
        got = _loss_and_grads(lambda: prefopt.fused_linear_preference_loss(hidden, weight, labels, bias=bias, **live,
                                                                           **case), inputs)
    want = _eager(hidden, weight, bias, labels, None if ref_free else ref_hidden, ref_weight, **case)
    want_grads = torch.autograd.grad(want, inputs)
    torch.testing.assert_close(got[0], want, atol=1e-10, rtol=1e-10)
    for g, w in zip(got[1], want_grads):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-9)
    assert "rewards/margins" in got[2] and "logps/chosen" in got[2]


def _pack(hidden, labels):
    """Padded [2P, T] -> packed [N] with cu_seqlens, dropping each row's trailing padding."""
    lengths = [int((row != -100).nonzero().max()) + 1 for row in labels]
    packed_h = torch.cat([h[:n] for h, n in zip(hidden, lengths)])
    packed_l = torch.cat([lab[:n] for lab, n in zip(labels, lengths)])
    cu = torch.tensor([0] + lengths).cumsum(0)
    return packed_h, packed_l, cu


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", [dict(loss_type="sigmoid", beta=0.1), dict(loss_type="sigmoid", beta=0.1, ld_alpha=0.3),
                                  dict(loss_type="ipo", beta=0.5, use_weighting=True)], ids=str)
def test_packed_equals_padded_and_precomputed_equals_live(dtype, tol, case):
    hidden, weight, _, labels, ref_hidden, ref_weight = _batch(dtype, False)
    with prefopt.use_backend("torch"):
        padded, padded_grads, _ = _loss_and_grads(lambda: prefopt.fused_linear_dpo_loss(
            hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, **case), [hidden, weight])
        packed_h, packed_l, cu = _pack(hidden, labels)
        packed_ref, _, _ = _pack(ref_hidden, labels)
        packed, packed_grads, _ = _loss_and_grads(lambda: prefopt.fused_linear_dpo_loss(
            packed_h, weight, packed_l, cu_seqlens=cu, ref_hidden=packed_ref, ref_weight=ref_weight, **case),
            [hidden, weight])
        ref_tokens = linear_logprobs_ref(ref_hidden, ref_weight, labels)
        eager = _eager(hidden, weight, None, labels, ref_hidden, ref_weight, **case)
        mask = labels != -100
        if "ld_alpha" not in case:
            ref_seq = (ref_tokens * mask).sum(1)
            pre, pre_grads, _ = _loss_and_grads(lambda: prefopt.fused_linear_dpo_loss(
                hidden, weight, labels, ref_chosen_logps=ref_seq[:P], ref_rejected_logps=ref_seq[P:], **case),
                [hidden, weight])
            torch.testing.assert_close(pre, padded, atol=tol, rtol=tol)
    torch.testing.assert_close(padded, eager.to(dtype), atol=tol, rtol=tol)
    torch.testing.assert_close(packed, padded, atol=tol, rtol=tol)
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_module_form_matches_function():
    hidden, weight, _, labels, ref_hidden, ref_weight = _batch(torch.float64, False)
    loss_fn = prefopt.nn.FusedLinearPreferenceLoss(loss_type="sigmoid", beta=0.2)
    loss, _ = loss_fn(weight, hidden, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
    want, _ = prefopt.fused_linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                            beta=0.2)
    assert torch.equal(loss, want)


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden=torch.randn(3, 4, 8)), "even number of sequences"),
    (dict(hidden=torch.randn(4, 8)), "pass cu_seqlens"),
    (dict(ref=False), "needs a reference"),
    (dict(both=True), "not both"),
    (dict(ref_hidden_only=True), "both ref_hidden and ref_weight"),
    (dict(cu=torch.tensor([0, 3, 2, 5, 8])), "non-decreasing"),
    (dict(cu=torch.tensor([0, 3, 5, 7])), "even number of sequences"),
    (dict(cu=torch.tensor([0, 2, 4, 6, 7])), "end at the number of tokens 8"),
])
def test_bad_input(kwargs, message):
    weight = torch.randn(V, 8)
    hidden = kwargs.get("hidden", torch.randn(4, 5, 8))
    ref = dict(ref_hidden=torch.randn(4, 5, 8), ref_weight=weight)
    if "cu" in kwargs:
        hidden = torch.randn(8, 8)
        ref = dict(ref_hidden=torch.randn(8, 8), ref_weight=weight)
    labels = torch.randint(0, V, hidden.shape[:-1])
    if kwargs.get("ref") is False:
        ref = {}
    if kwargs.get("both"):
        ref.update(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    if kwargs.get("ref_hidden_only"):
        ref.pop("ref_weight")
    with pytest.raises(ValueError, match=message):
        prefopt.fused_linear_dpo_loss(hidden, weight, labels, cu_seqlens=kwargs.get("cu"), **ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_logits_sized_buffer_forward_or_backward(backend):
    """At N x V far above one tile, no op of the fused DPO step creates an [N, V]-sized tensor."""
    from prefopt.cpu.chunked import TILE_ELEMENTS
    pairs, length, features, vocab = 4, 128, 8, 65536          # N x V = 1024 x 65536 = 67.1M, tile = 8.4M elements
    hidden = torch.randn(2 * pairs, length, features, requires_grad=True)
    weight = (torch.randn(vocab, features) / 3).requires_grad_()
    labels = torch.randint(0, vocab, (2 * pairs, length))
    ref_hidden = hidden.detach() + 0.01 * torch.randn_like(hidden)
    probe = LargestTensor()
    with prefopt.use_backend(backend), probe:
        loss, _ = prefopt.fused_linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=weight.detach())
        loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    n_tokens = 2 * pairs * length
    assert probe.largest <= TILE_ELEMENTS < n_tokens * vocab // 4, probe.largest


def _long_pair(length, dtype=torch.float32, h=8, v=16):
    """One pair of `length`-token sequences; policy = reference head + a small change, token log-probs around
    -5..-10, so the per-sequence sums are ~1e5 and the log-ratios a few nats."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, length, h, generator=gen)
    ref_weight = 2.0 * torch.randn(v, h, generator=gen)
    weight = ref_weight + 0.02 * torch.randn(v, h, generator=gen)
    labels = torch.randint(0, v, (2, length), generator=gen)
    labels[:, :16] = -100
    return (hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True), labels,
            hidden.to(dtype), ref_weight.to(dtype))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_float32_as_close_to_float64_truth_as_eager(backend):
    # At 32768 tokens per sequence a float32 sum of the token log-probs is off by ~0.01-1 nat, the size of the
    # log-ratio itself. The fused path forms the sums in float64, so its loss, margin and gradients must be at
    # least as close to a float64 truth as eager float32 PyTorch (whose torch.sum is pairwise).
    length = 4096 if backend == "triton" else 32768  # the Triton head runs under the interpreter here
    hidden, weight, labels, ref_hidden, ref_weight = _long_pair(length)
    case = dict(loss_type="sigmoid", beta=0.1)

    def run(h, w, fused):
        if fused:
            with prefopt.use_backend(backend):
                loss, metrics = prefopt.fused_linear_dpo_loss(h, w, labels, ref_hidden=ref_hidden.to(h.dtype),
                                                              ref_weight=ref_weight.to(h.dtype), **case)
        else:
            # eager PyTorch in the inputs' dtype: materialised logits, masked torch.sum per sequence
            mask = (labels != -100).to(h.dtype)
            logps = (linear_logprobs_ref(h, w, labels) * mask).sum(1)
            with torch.no_grad():
                ref = (linear_logprobs_ref(ref_hidden.to(h.dtype), ref_weight.to(h.dtype), labels) * mask).sum(1)
            loss = reference_dpo_loss(logps[:1], logps[1:], ref[:1], ref[1:], **case)
            metrics = {"rewards/margins": case["beta"] * ((logps[0] - ref[0]) - (logps[1] - ref[1]))}
        grads = torch.autograd.grad(loss, (h, w))
        return [loss.double(), metrics["rewards/margins"].double()] + [g.double() for g in grads]

    truth_h, truth_w = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    truth = run(truth_h, truth_w, fused=False)
    fused, eager = run(hidden, weight, fused=True), run(hidden, weight, fused=False)
    # What float64 sums cannot remove: each token's float32 log-prob (z_label - lse, from a float32 GEMM) carries
    # a rounding error of about eps32 * (|z_label| + |lse|) of its own, with a machine-dependent sign (GEMM kernels
    # differ between CPUs). Over the 4 sequences' tokens these add like a random walk: `token_noise` is its size in
    # the margin (1 sigma; the loss moves by at most as much). The fused loss and margin must sit within 10 sigma of
    # it; at 32768 tokens eager float32, which also rounds each running sum, is off by more.
    mask = labels != -100
    with torch.no_grad():
        per_token = []
        for h, w in ((hidden, weight), (ref_hidden, ref_weight)):
            logits = h.double() @ w.double().T
            z = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            per_token.append(((z.abs() + logits.logsumexp(-1).abs()) * torch.finfo(torch.float32).eps)[mask])
        token_noise = case["beta"] * float(torch.cat(per_token).square().sum().sqrt())
    names = ["loss", "rewards/margins", "grad hidden", "grad weight"]
    for name, f, e, t in zip(names, fused, eager, truth):
        err_fused, err_eager = float((f - t).abs().max()), float((e - t).abs().max())
        assert err_fused <= err_eager, (name, err_fused, err_eager)
        print(f"{backend} T={length} {name}: |fused - f64| {err_fused:.3g}, |eager f32 - f64| {err_eager:.3g}, "
              f"token noise {token_noise:.3g}")
        if name in ("loss", "rewards/margins"):  # gradients also carry float32 GEMM accumulation over 2T tokens
            assert err_fused <= 10 * token_noise, (name, err_fused, token_noise)
        if name == "rewards/margins" and length >= 32768:  # the bound tells a float32 sum apart at this length
            assert err_eager > 10 * token_noise, (name, err_eager, token_noise)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_log_ratios_within_1e3_of_float64(backend):
    # 131072 tokens per sequence: the float32 spacing of a sum of ~-1e6 is 0.125, so the log-ratios the metrics
    # report are only right if formed in float64.
    length = 8192 if backend == "triton" else 131072
    hidden, weight, labels, ref_hidden, ref_weight = _long_pair(length)
    beta = 0.1
    with torch.no_grad(), prefopt.use_backend(backend):
        _, metrics = prefopt.fused_linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden,
                                                   ref_weight=ref_weight, loss_type="sigmoid", beta=beta)
    mask = labels != -100
    ratio = ((linear_logprobs_ref(hidden.double(), weight.double(), labels)
              - linear_logprobs_ref(ref_hidden.double(), ref_weight.double(), labels)) * mask).sum(1)
    assert abs(float(metrics["rewards/chosen"].detach()) / beta - float(ratio[0])) <= 1e-3
    assert abs(float(metrics["rewards/rejected"].detach()) / beta - float(ratio[1])) <= 1e-3
