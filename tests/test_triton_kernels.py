"""Triton kernels (kernels/*.py) under TRITON_INTERPRET=1 (or compiled, on CUDA tensors, with
PREFOPT_TEST_DEVICE=cuda: scripts/gpu_check.sh) against plain-torch materializing references.

The references below are written independently of the kernels: they build the full [n, V] logits,
apply the transform with torch.tanh, log_softmax + gather, and get every gradient from
torch.autograd. float64 inputs are compared at 1e-10 (the kernels accumulate in fp64 then);
bf16/fp16/fp32 inputs against the fp64 reference on the same (rounded) inputs, tolerances stated.
"""
import math
import os

import pytest
import torch

ON_CUDA = os.environ.get("PREFOPT_TEST_DEVICE", "cpu") == "cuda"  # tests/conftest.py
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytestmark = pytest.mark.skipif(not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton kernels on CPU through the interpreter, or on CUDA tensors")

from prefopt.kernels import linear_logprobs, logprobs, sequence_sums  # noqa: E402  (after TRITON_INTERPRET)

F64 = dict(atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------------------------- references

def ref_transform(raw, logit_scale, softcap, temperature):
    x = raw * logit_scale
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def ref_stats(z, labels, ignore_index):
    """z [n, V] (differentiable) -> logp (0 on ignored rows), lse, entropy, log_sum_p2."""
    logsm = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = torch.where(valid, logsm.gather(1, safe[:, None])[:, 0], torch.zeros((), dtype=z.dtype))
    lse = torch.logsumexp(z, dim=-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    log_sum_p2 = torch.logsumexp(2 * logsm, dim=-1)
    return logp, lse, entropy, log_sum_p2


def ref_rows(logits, labels, ignore_index, scale, softcap, temp, g_logp, g_ent):
    x = logits.detach().to(torch.float64).requires_grad_()
    logp, lse, ent, sq = ref_stats(ref_transform(x, scale, softcap, temp), labels, ignore_index)
    loss = (logp * g_logp.double()).sum() + ((ent * g_ent.double()).sum() if g_ent is not None else 0)
    loss.backward()
    return logp.detach(), lse.detach(), ent.detach(), sq.detach(), x.grad


def ref_linear(hidden, weight, bias, labels, scale, softcap, temp, g_logp, g_ent):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_() if bias is not None else None
    logits = h @ w.T + (b if b is not None else 0)
    logp, lse, ent, sq = ref_stats(ref_transform(logits, scale, softcap, temp), labels, -100)
    ((logp * g_logp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    return logp.detach(), lse.detach(), ent.detach(), sq.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def ref_segments(values, weights, cu, average, grad_out):
    v = values.detach().double().requires_grad_()
    w = weights.double() if weights is not None else torch.ones_like(v)
    outs, counts = [], []
    for s in range(cu.numel() - 1):
        a, e = int(cu[s]), int(cu[s + 1])
        total = (v[a:e] * w[a:e]).sum()
        cnt = (w[a:e] != 0).sum().double()
        if average:
            total = total / cnt if cnt > 0 else total * 0
        outs.append(total)
        counts.append(cnt)
    out = torch.stack(outs)
    (out * grad_out.double()).sum().backward()
    return out.detach(), torch.stack(counts), v.grad


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------- row ops

TRANSFORMS = [  # (logit_scale, softcap, temperature): values exact in fp32 (the GPU passes fp32 scalars)
    (1.0, None, 1.0),
    (1.25, 30.0, 0.75),
    (0.5, None, 2.0),
    (1.0, 3.0, 1.0),
]


def _labels(n, V, ignore_index=-100, n_ignored=2, gen=None):
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[1: 1 + n_ignored] = ignore_index
    return labels


@pytest.mark.parametrize("V", [77, 1000])
@pytest.mark.parametrize("scale,softcap,temp", TRANSFORMS)
@pytest.mark.parametrize("want_entropy", [False, True])
def test_row_fp64(V, scale, softcap, temp, want_entropy):
    n = 6
    logits = torch.randn(n, V, dtype=torch.float64) * 4
    labels = _labels(n, V)
    g_logp = torch.randn(n, dtype=torch.float64)
    g_ent = torch.randn(n, dtype=torch.float64) if want_entropy else None
    st = logprobs.row_forward(logits, labels, -100, scale, softcap, temp, want_entropy, True)
    r_logp, r_lse, r_ent, r_sq, r_grad = ref_rows(logits, labels, -100, scale, softcap, temp, g_logp, g_ent)
    torch.testing.assert_close(st.logp, r_logp, **F64)
    assert (st.logp[1:3] == 0).all()
    torch.testing.assert_close(st.lse, r_lse, **F64)
    torch.testing.assert_close(st.log_sum_p2, r_sq, **F64)
    if want_entropy:
        torch.testing.assert_close(st.entropy, r_ent, **F64)
    else:
        assert st.entropy is None
    grad = logprobs.row_backward(logits, labels, st.lse, st.entropy, g_logp, g_ent, -100, scale, softcap, temp)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(grad, r_grad, **F64)


def test_row_ignore_index_in_vocab_and_all_ignored():
    n, V = 5, 300
    logits = torch.randn(n, V, dtype=torch.float64)
    labels = torch.tensor([7, 3, 7, 9, 7])  # ignore_index=7 is a real token id here
    g_logp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    st = logprobs.row_forward(logits, labels, 7, 1.0, None, 1.0, True, False)
    r = ref_rows(logits, labels, 7, 1.0, None, 1.0, g_logp, g_ent)
    torch.testing.assert_close(st.logp, r[0], **F64)
    assert (st.logp[labels == 7] == 0).all() and st.log_sum_p2 is None
    grad = logprobs.row_backward(logits, labels, st.lse, st.entropy, g_logp, g_ent, 7, 1.0, None, 1.0)
    torch.testing.assert_close(grad, r[4], **F64)
    # every row ignored, no entropy: logp 0 everywhere, zero gradient, lse still right
    labels = torch.full((n,), -100)
    st = logprobs.row_forward(logits, labels, -100, 1.0, None, 1.0, False, False)
    assert (st.logp == 0).all()
    torch.testing.assert_close(st.lse, torch.logsumexp(logits, -1), **F64)
    grad = logprobs.row_backward(logits, labels, st.lse, None, g_logp, None, -100, 1.0, None, 1.0)
    assert (grad == 0).all()


@pytest.mark.parametrize("dtype,tol_stat,tol_grad", [(torch.float32, 2e-5, 1e-6), (torch.bfloat16, 2e-5, 4e-3),
                                                     (torch.float16, 2e-5, 5e-4)])
@pytest.mark.parametrize("scale,softcap,temp", [TRANSFORMS[0], TRANSFORMS[1]])
def test_row_low_precision(dtype, tol_stat, tol_grad, scale, softcap, temp):
    """Math is fp32 whatever the input: stats within tol_stat (abs) of the fp64 reference on the same
    rounded inputs; the gradient is stored in the input dtype, so it is within its rounding (tol_grad)."""
    n, V = 5, 1000
    logits = (torch.randn(n, V) * 4).to(dtype)
    labels = _labels(n, V)
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    st = logprobs.row_forward(logits, labels, -100, scale, softcap, temp, True, True)
    assert st.logp.dtype == torch.float32
    r = ref_rows(logits, labels, -100, scale, softcap, temp, g_logp, g_ent)
    for got, ref in zip(st, r[:4]):
        torch.testing.assert_close(got.double(), ref, atol=tol_stat, rtol=tol_stat)
    grad = logprobs.row_backward(logits, labels, st.lse, st.entropy, g_logp, g_ent, -100, scale, softcap, temp)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), r[4], atol=tol_grad, rtol=1e-2)


def test_row_out_aliases_logits():
    """An owned fp32 tile may receive its own gradient in place (the CPU chunked head relies on it)."""
    n, V = 4, 1000
    logits = torch.randn(n, V) * 3
    labels = _labels(n, V, n_ignored=1)
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    st = logprobs.row_forward(logits, labels, -100, 1.0, 20.0, 0.75, True, False)
    expect = logprobs.row_backward(logits, labels, st.lse, st.entropy, g_logp, g_ent, -100, 1.0, 20.0, 0.75)
    tile = logits.clone()
    got = logprobs.row_backward(tile, labels, st.lse, st.entropy, g_logp, g_ent, -100, 1.0, 20.0, 0.75, out=tile)
    assert got.data_ptr() == tile.data_ptr()
    torch.testing.assert_close(got, expect, atol=0, rtol=0)
    # out of another dtype (fp32 gradient of bf16 logits)
    lb = logits.bfloat16()
    st = logprobs.row_forward(lb, labels, -100, 1.0, None, 1.0, False, False)
    out = torch.empty(n, V)
    logprobs.row_backward(lb, labels, st.lse, None, g_logp, None, -100, 1.0, None, 1.0, out=out)
    r = ref_rows(lb, labels, -100, 1.0, None, 1.0, g_logp, None)
    torch.testing.assert_close(out.double(), r[4], atol=1e-6, rtol=1e-5)


def test_row_huge_vocab():
    """V = 262144 (64 tiles of 4096 per row) at n = 2, fp32 inputs; fp32 sums of 2^18 terms."""
    n, V = 2, 262144
    logits = torch.randn(n, V) * 2
    labels = torch.tensor([5, V - 1])
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    st = logprobs.row_forward(logits, labels, -100, 1.0, 30.0, 0.75, True, True)
    r = ref_rows(logits, labels, -100, 1.0, 30.0, 0.75, g_logp, g_ent)
    for got, ref in zip(st, r[:4]):
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-5)
    grad = logprobs.row_backward(logits, labels, st.lse, st.entropy, g_logp, g_ent, -100, 1.0, 30.0, 0.75)
    torch.testing.assert_close(grad.double(), r[4], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 50.0])
def test_row_large_magnitude(dtype, softcap):
    """Logits of magnitude 1e4: no NaN/inf, stats as exact as fp32 allows at that magnitude."""
    n, V = 4, 1000
    logits = (torch.randn(n, V) * 1e4).to(dtype)
    logits[0, 3] = 1e4
    logits[1] = -1e4
    labels = torch.tensor([3, 10, -100, 999])
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    st = logprobs.row_forward(logits, labels, -100, 1.0, softcap, 1.0, True, True)
    for t in st:
        assert torch.isfinite(t).all()
    r = ref_rows(logits, labels, -100, 1.0, softcap, 1.0, g_logp, g_ent)
    torch.testing.assert_close(st.lse.double(), r[1], atol=5e-3, rtol=1e-6)
    torch.testing.assert_close(st.logp.double(), r[0], atol=5e-3, rtol=1e-6)
    torch.testing.assert_close(st.entropy.double(), r[2], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(st.log_sum_p2.double(), r[3], atol=1e-3, rtol=1e-3)
    grad = logprobs.row_backward(logits, labels, st.lse, st.entropy, g_logp, g_ent, -100, 1.0, softcap, 1.0)
    assert torch.isfinite(grad.float()).all()
    torch.testing.assert_close(grad.double(), r[4], atol=2e-2, rtol=1e-2)


def test_row_empty():
    st = logprobs.row_forward(torch.randn(0, 10), torch.zeros(0, dtype=torch.long), -100, 1.0, None, 1.0, True, True)
    assert st.logp.shape == (0,) and st.entropy.shape == (0,)


# ----------------------------------------------------------------------------------------------- linear head

LINEAR_CASES = [  # (n, H, V, bias, logit_scale, softcap, temperature)
    (37, 80, 1000, False, 1.0, None, 1.0),     # ragged token block, 3 K slices (last ragged), 8 V splits
    (37, 80, 77, True, 1.25, 30.0, 0.75),     # V not a multiple of the tile, bias, softcap, temperature
    (130, 48, 77, True, 0.5, None, 2.0),      # 3 token blocks (GROUP_N swizzle), scale + temperature
]


@pytest.mark.parametrize("n,H,V,has_bias,scale,softcap,temp", LINEAR_CASES)
def test_linear_fp64(n, H, V, has_bias, scale, softcap, temp):
    hidden = torch.randn(n, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) / H ** 0.5 * 3
    bias = torch.randn(V, dtype=torch.float64) if has_bias else None
    labels = torch.randint(0, V, (n,))
    g_logp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    st = linear_logprobs.linear_forward(hidden, weight, bias, labels, scale, softcap, temp, True, True, None)
    r = ref_linear(hidden, weight, bias, labels, scale, softcap, temp, g_logp, g_ent)
    for got, ref in zip(st, r[:4]):
        torch.testing.assert_close(got, ref, **F64)
    gh, gw, gb = linear_logprobs.linear_backward(hidden, weight, bias, labels, st.lse, st.entropy, g_logp, g_ent,
                                                 scale, softcap, temp, None, None, (True, True, True))
    torch.testing.assert_close(gh, r[4], **F64)
    torch.testing.assert_close(gw, r[5], **F64)
    if has_bias:
        torch.testing.assert_close(gb, r[6], **F64)
    else:
        assert gb is None


@pytest.mark.parametrize("sms", [1, 2])
def test_linear_fp64_vocab_splits(monkeypatch, sms):
    """Fewer splits than vocab tiles (2 x 4 or 4 x 2 of the 8 tiles): the in-split fold and the merge."""
    monkeypatch.setattr(linear_logprobs, "_num_sms", lambda device: sms)
    n, H, V = 37, 40, 1000
    assert linear_logprobs._n_splits(n, V, 64, 128, None)[0] == (2 if sms == 1 else 4)
    hidden = torch.randn(n, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) / 3
    labels = torch.randint(0, V, (n,))
    labels[:4] = torch.tensor([0, 127, 128, V - 1])  # tile and split edges
    st = linear_logprobs.linear_forward(hidden, weight, None, labels, 1.0, 10.0, 1.0, True, True, None)
    z = torch.zeros(n, dtype=torch.float64)
    r = ref_linear(hidden, weight, None, labels, 1.0, 10.0, 1.0, z, z)
    for got, ref in zip(st, r[:4]):
        torch.testing.assert_close(got, ref, **F64)


def test_linear_fp64_partial_grads_no_entropy():
    n, H, V = 20, 40, 200
    hidden = torch.randn(n, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) / 4
    bias = torch.randn(V, dtype=torch.float64)
    labels = torch.randint(0, V, (n,))
    g_logp = torch.randn(n, dtype=torch.float64)
    st = linear_logprobs.linear_forward(hidden, weight, bias, labels, 1.0, None, 1.0, False, False, 64)
    assert st.entropy is None and st.log_sum_p2 is None
    r = ref_linear(hidden, weight, bias, labels, 1.0, None, 1.0, g_logp, torch.zeros(n, dtype=torch.float64))
    for needs in [(True, False, False), (False, True, False), (False, False, True), (True, True, False)]:
        got = linear_logprobs.linear_backward(hidden, weight, bias, labels, st.lse, None, g_logp, None, 1.0, None,
                                              1.0, 64, None, needs)
        for want, g, ref in zip(needs, got, r[4:]):
            if want:
                torch.testing.assert_close(g, ref, **F64)
            else:
                assert g is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_low_precision(dtype):
    """fp32 accumulation of exact input products: stats within 1e-4 of the fp64 reference on the same
    rounded inputs (fp32: 1e-5); gradients (dlogits rounded to the input dtype before the two product
    GEMMs, fp32 accumulation, result in the input dtype) within 1% relative Frobenius error."""
    n, H, V = 37, 64, 300
    hidden = torch.randn(n, H).to(dtype)
    weight = (torch.randn(V, H) / 4).to(dtype)
    bias = torch.randn(V).to(dtype)
    labels = torch.randint(0, V, (n,))
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    st = linear_logprobs.linear_forward(hidden, weight, bias, labels, 1.0, 30.0, 0.75, True, True, None)
    r = ref_linear(hidden, weight, bias, labels, 1.0, 30.0, 0.75, g_logp, g_ent)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    for got, ref in zip(st, r[:4]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)
    grads = linear_logprobs.linear_backward(hidden, weight, bias, labels, st.lse, st.entropy, g_logp, g_ent,
                                            1.0, 30.0, 0.75, None, None, (True, True, True))
    for g, ref, like in zip(grads, r[4:], (hidden, weight, bias)):
        assert g.dtype == like.dtype and g.shape == like.shape
        assert rel_err(g, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_linear_large_magnitude():
    """Logits ~1e4 from the GEMM: finite stats and gradients, each compared with the float64 reference within the
    error the fp32 GEMMs can make on these inputs."""
    n, H, V = 16, 32, 200
    hidden = torch.randn(n, H)
    weight = torch.randn(V, H) * 2e3
    labels = torch.randint(0, V, (n,))
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    st = linear_logprobs.linear_forward(hidden, weight, None, labels, 1.0, None, 1.0, True, True, None)
    for t in st:
        assert torch.isfinite(t).all()
    r = ref_linear(hidden, weight, None, labels, 1.0, None, 1.0, g_logp, g_ent)
    gh, gw, gb = linear_logprobs.linear_backward(hidden, weight, None, labels, st.lse, st.entropy, g_logp, g_ent,
                                                 1.0, None, 1.0, None, None, (True, True, False))
    assert gb is None and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    # An fp32 dot product of length H is within gamma_H = H eps32 of sum_k |h_k w_k| (any summation order), so
    # every logit is within z_err of the float64 one, and lse / log p (the largest logit, less the lse) within
    # 2 z_err. Every row's two largest logits stand `gap` apart, far more than that: the softmax is one-hot in
    # fp32 as in float64, so entropy and log_sum_p2 are e^-gap-small, dlogits is g (onehot(label) - onehot(argmax))
    # on both sides, and the gradients differ only by the fp32 rounding of the two product GEMMs (one sum of V
    # terms per grad_hidden entry, of n per grad_weight entry, each after the rounding of D itself).
    eps32 = torch.finfo(torch.float32).eps
    h64, w64 = hidden.double(), weight.double()
    z_err = H * eps32 * float((h64.abs() @ w64.abs().T).max())
    top2 = (h64 @ w64.T).topk(2, dim=1).values
    gap = float((top2[:, 0] - top2[:, 1]).min())
    assert gap > 100 * z_err, (gap, z_err)
    torch.testing.assert_close(st.lse.double(), r[1], atol=2 * z_err, rtol=0)
    torch.testing.assert_close(st.logp.double(), r[0], atol=2 * z_err, rtol=0)
    p_tail = math.exp(-(gap - 2 * z_err))  # the largest probability besides a row's maximum
    tail = V * (gap + 1) * p_tail  # the V - 1 others' sum of p |log p| (or of p^2)
    for got, want in ((st.entropy, r[2]), (st.log_sum_p2, r[3])):
        assert float((got.double() - want).abs().max()) <= tail, (got, want)
    # |dlogits|: |g| on the label and on the argmax (rounded once), and elsewhere at most
    # p_tail (|g| + |g_ent| |log p + H|), which fp32 may drop altogether
    main = torch.zeros(n, V, dtype=torch.float64)
    main[torch.arange(n), labels] += g_logp.abs().double()
    main[torch.arange(n), (h64 @ w64.T).argmax(1)] += g_logp.abs().double()
    rest = (p_tail * (g_logp.double().abs() + g_ent.double().abs() * (gap + 2)))[:, None].expand(n, V)
    for got, want, bound in ((gh, r[4], (V + 2) * eps32 * (main @ w64.abs()) + rest @ w64.abs()),
                             (gw, r[5], (n + 2) * eps32 * (main.T @ h64.abs()) + rest.T @ h64.abs())):
        excess = float(((got.double() - want).abs() / bound).max())
        assert excess <= 1.0, f"gradient off by {excess:.3g} x its bound"


# ----------------------------------------------------------------------------------------------- segment sums

SEG_LENGTHS = [0, 5, 1, 300, 17, 1200]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("average", [False, True])
def test_segments(dtype, use_weights, average):
    cu = torch.tensor([0] + SEG_LENGTHS).cumsum(0)
    N = int(cu[-1]) + 3  # three trailing tokens outside every segment: zero gradient
    values = torch.randn(N, dtype=dtype)
    weights = None
    if use_weights:
        weights = (torch.rand(N) > 0.3).to(dtype)
        weights[cu[4]:cu[5]] = 0  # a fully masked segment
        weights[cu[3]:cu[3] + 50] = 0.25  # LD-DPO style down-weighted part
    grad_out = torch.randn(cu.numel() - 1, dtype=dtype)
    out, counts = sequence_sums.segment_forward(values, weights, cu, average)
    r_out, r_counts, r_grad = ref_segments(values, weights, cu, average, grad_out)
    tol = F64 if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), r_out, **tol)
    torch.testing.assert_close(counts.double(), r_counts, atol=0, rtol=0)
    grad = sequence_sums.segment_backward(grad_out, weights, cu, counts, average, N)
    assert grad.shape == (N,) and torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), r_grad, **tol)
    assert (grad[-3:] == 0).all()
    if use_weights:
        assert out[4] == 0 and counts[4] == 0 and (grad[cu[4]:cu[5]] == 0).all()


def test_segments_padded_view():
    """Padded [B, T] viewed as packed (cu_seqlens = arange(B+1) * T), fp32 as api.py passes it."""
    B, T = 3, 40
    values = torch.randn(B * T)
    mask = torch.zeros(B, T)
    mask[0, 5:30] = 1
    mask[2, :] = 1  # row 1 fully masked
    cu = torch.arange(B + 1) * T
    out, counts = sequence_sums.segment_forward(values, mask.flatten(), cu, True)
    ref = (values.view(B, T) * mask).sum(1) / mask.sum(1).clamp_min(1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert out[1] == 0 and counts.tolist() == [25.0, 0.0, 40.0]
    grad = sequence_sums.segment_backward(torch.ones(B), mask.flatten(), cu, counts, True, B * T)
    assert not torch.isnan(grad).any() and (grad.view(B, T)[1] == 0).all()
