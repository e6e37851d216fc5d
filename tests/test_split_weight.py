"""linear_logprobs(..., extra_weight=E): the head on the weight [W | E] in vocabulary slabs (prefopt/split_weight.py)
equals the head on the concatenated weight, values and gradients, on every backend, in float64 and float32; no op
creates a [V, H + R] or [N, V] tensor."""
import pytest
import torch

import prefopt
import prefopt.split_weight as split_weight
from tests._backends import BACKENDS
from tests._probes import LargestTensor

N, H, R, V = 19, 7, 3, 300   # V = 2 full slabs of 128 rows + one of 44 when SLAB_BYTES is one row block


@pytest.fixture
def small_slabs(monkeypatch):
    """Slabs of SLAB_ALIGN (128) rows, so V = 300 is cut into 128 + 128 + 44."""
    monkeypatch.setattr(split_weight, "SLAB_BYTES", 1)
    assert split_weight.slab_rows(V, H + R, 8) == 128


def _inputs(dtype, with_bias, softcap_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H + R, generator=g) * softcap_scale).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    extra = torch.randn(V, R, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=g).to(dtype).requires_grad_() if with_bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:3] = torch.tensor([0, 128, 299])   # first rows of slabs (row 0 is where foreign labels point)
    labels[5] = -100
    return hidden, weight, extra, bias, labels


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


# (dtype, tolerance): float64 is exact up to summation order; float32 sums the slabs' merge in float64 and the
# concatenated head's blocks in its own order, both within a few float32 ulps of the O(10) log-probs
CASES = [(torch.float64, 1e-11), (torch.float32, 2e-5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", CASES, ids=["f64", "f32"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
def test_split_equals_concatenated(small_slabs, backend, dtype, tol, with_bias, softcap):
    hidden, weight, extra, bias, labels = _inputs(dtype, with_bias)
    opts = dict(softcap=softcap, logit_scale=0.7, temperature=1.3, return_entropy=True, return_log_sum_p2=True)
    h1, w1, e1, b1 = _leaves(hidden, weight, extra, bias)
    h2, w2, e2, b2 = _leaves(hidden, weight, extra, bias)
    with prefopt.use_backend(backend):
        got = prefopt.linear_logprobs(h1, w1, labels, b1, extra_weight=e1, **opts)
        want = prefopt.linear_logprobs(h2, torch.cat([w2, e2], 1), labels, b2, **opts)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        # uneven upstream weights on log-probs and entropy
        weights = torch.linspace(0.3, 1.7, N, dtype=got[0].dtype)
        leaves1 = [t for t in (h1, w1, e1, b1) if t is not None]
        leaves2 = [t for t in (h2, w2, e2, b2) if t is not None]
        g1 = torch.autograd.grad((got[0] * weights).sum() + got[1].sum() * 0.2, leaves1)
        g2 = torch.autograd.grad((want[0] * weights).sum() + want[1].sum() * 0.2, leaves2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("frozen", ["weight", "extra", "hidden_only"])
def test_frozen_blocks_get_no_gradient(small_slabs, frozen):
    hidden, weight, extra, bias, labels = _inputs(torch.float64, False)
    h, w, e = _leaves(hidden, weight, extra)
    if frozen in ("weight", "hidden_only"):
        w.requires_grad_(False)
    if frozen in ("extra", "hidden_only"):
        e.requires_grad_(False)
    out = prefopt.linear_logprobs(h, w, labels, extra_weight=e)
    out.sum().backward()
    assert h.grad is not None
    assert (w.grad is None) == (frozen in ("weight", "hidden_only"))
    assert (e.grad is None) == (frozen in ("extra", "hidden_only"))
    ref = prefopt.linear_logprobs(hidden.detach().requires_grad_(), torch.cat([weight, extra], 1).detach(), labels)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)


def test_fused_loss_takes_extra_weight(small_slabs):
    """fused_linear_preference_loss(..., extra_weight=E) == the same loss on the concatenated weight."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 6, H + R, dtype=torch.float64, generator=g)
    weight = torch.randn(V, H, dtype=torch.float64, generator=g)
    extra = torch.randn(V, R, dtype=torch.float64, generator=g)
    labels = torch.randint(0, V, (4, 6), generator=g)
    labels[:, :2] = -100
    ref = dict(ref_chosen_logps=torch.tensor([-30.0, -31.0], dtype=torch.float64),
               ref_rejected_logps=torch.tensor([-29.0, -33.0], dtype=torch.float64))
    opts = dict(loss_type=["sigmoid", "sft"], use_weighting=True, ld_alpha=0.5, nll_target=labels, **ref)
    h1, w1, e1 = _leaves(hidden, weight, extra)
    h2, w2, e2 = _leaves(hidden, weight, extra)
    loss1, m1 = prefopt.fused_linear_preference_loss(h1, w1, labels, extra_weight=e1, **opts)
    loss2, m2 = prefopt.fused_linear_preference_loss(h2, torch.cat([w2, e2], 1), labels, **opts)
    torch.testing.assert_close(loss1, loss2, rtol=1e-11, atol=1e-11)
    for key in m2:
        torch.testing.assert_close(m1[key], m2[key], rtol=1e-11, atol=1e-11)
    for a, b in zip(torch.autograd.grad(loss1, [h1, w1, e1]), torch.autograd.grad(loss2, [h2, w2, e2])):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_bad_extra_weight():
    hidden, weight, extra, _, labels = _inputs(torch.float64, False)
    with pytest.raises(ValueError, match="extra_weight must be"):
        prefopt.linear_logprobs(hidden, weight, labels, extra_weight=extra[:-1])
    with pytest.raises(TypeError, match="extra_weight"):
        prefopt.linear_logprobs(hidden, weight, labels, extra_weight=extra.float())
    with pytest.raises(ValueError, match="hidden size mismatch"):
        prefopt.linear_logprobs(hidden[:, :H], weight, labels, extra_weight=extra)


def test_no_full_block_nor_logits(small_slabs):
    """With W frozen (LoRA), no op creates the [V, H + R] concatenation, its gradient, or [N, V] logits: the largest
    tensors are W's own size class at most (E's gradient [V, R], the hidden gradient [N, H + R], one slab block)."""
    g = torch.Generator().manual_seed(2)
    n, h, r, v = 64, 16, 4, 1000
    hidden = torch.randn(n, h + r, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g)
    extra = torch.randn(v, r, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    with LargestTensor() as probe:
        out = prefopt.linear_logprobs(hidden, weight, labels, extra_weight=extra, return_entropy=True,
                                      logits_cache_mb=0)
        (out[0].sum() + out[1].sum()).backward()
    slab = split_weight.slab_rows(v, h + r, 8)
    assert probe.largest <= max(slab * (h + r), n * slab, v * r, n * (h + r)) < min(v * (h + r), n * v)
