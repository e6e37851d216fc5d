"""prefopt._C (csrc/cpu) row ops and segment sums vs an independent, materializing torch reference.

Tolerances: float64 inputs accumulate in double -> 1e-10; fp32 / bf16 / fp16 inputs accumulate in fp32
(the reference sees the same rounded inputs, in float64) -> forward atol 1e-4 (|z| ~ 10) and gradients
atol 1e-6 relative to the largest entry for fp32; bf16/fp16 *gradients* are rounded to the input dtype
-> rtol 1e-2.
"""
import importlib
import math

import pytest
import torch

from prefopt import _backend
from prefopt.cpu import rowops_cpp, rowops_torch, segment_cpp
from prefopt.losses import table
from tests._backends import CPP_EXPECTED, CPP_EXPECTED_WHY

_BUILT, _NOT_BUILT_WHY = _backend.cpp_status("cpu")
if not _BUILT and not CPP_EXPECTED:
    pytest.skip(f"{_NOT_BUILT_WHY}; none is expected here: {CPP_EXPECTED_WHY}", allow_module_level=True)


class _Extension:
    """prefopt._C, imported at first use: where the build is expected but missing, each test fails with the
    ImportError (and test_extension_is_built_where_expected says why it was expected) instead of skipping."""

    def __getattr__(self, name):
        return getattr(importlib.import_module("prefopt._C"), name)


_C = _Extension()


def test_extension_is_built_where_expected():
    assert _BUILT, (f"{_NOT_BUILT_WHY}, but the build is expected here ({CPP_EXPECTED_WHY}). Reinstall with "
                    "`pip install --no-build-isolation -e .` and read setup.py's 'prefopt: ...' line for the cause, "
                    "or set PREFOPT_EXPECT_EXT=0 to test without the C++ backend on purpose.")

IGNORE = -100
TRANSFORMS = [  # (logit_scale, softcap, temperature)
    (1.0, None, 1.0),
    (1.7, 30.0, 0.6),
    (0.5, 0.0, 2.0),  # softcap 0 == no cap
    (1.0, 5.0, 1.0),  # strong cap
]
FWD_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4}


# ------------------------------------------------------------------------------------------------
# Independent reference (float64, materializes softmax, autograd for the gradient)
# ------------------------------------------------------------------------------------------------
def ref_z(raw, logit_scale, softcap, temperature):
    z = raw.double() * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def ref_stats(raw, labels, logit_scale, softcap, temperature, ignore_index=IGNORE, differentiable=False):
    z = ref_z(raw, logit_scale, softcap, temperature)
    lse = torch.logsumexp(z, dim=-1)
    logprobs = z - lse[:, None]
    p = logprobs.exp()
    if differentiable:  # H = lse - E_p[z]: finite gradient where p underflows to 0 (|z| ~ 1e4)
        entropy = lse - (p * z).sum(-1)
    else:
        entropy = torch.special.entr(p).sum(-1)  # 0 * log 0 = 0 for -inf logits
    log_sum_p2 = torch.log((p * p).sum(-1))
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = torch.where(valid, logprobs.gather(1, safe[:, None])[:, 0], torch.zeros_like(lse))
    return logp, lse, entropy, log_sum_p2


def ref_grad(raw, labels, g_logp, g_ent, logit_scale, softcap, temperature, ignore_index=IGNORE):
    x = raw.detach().double().requires_grad_(True)
    logp, _, entropy, _ = ref_stats(x, labels, logit_scale, softcap, temperature, ignore_index, True)
    loss = (logp * g_logp.double()).sum()
    if g_ent is not None:
        loss = loss + (entropy * g_ent.double()).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def make_rows(n, V, dtype, scale=3.0, seed=0, n_ignored=2):
    gen = torch.Generator().manual_seed(seed)
    raw = (torch.randn(n, V, generator=gen, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[: min(n_ignored, n)] = IGNORE
    return raw, labels, gen


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    actual = actual.double()
    expected = expected.double()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert bool((err <= bound).all()), f"{what}: max err {err.max().item():.3e} (atol {atol}, rtol {rtol})"


# ------------------------------------------------------------------------------------------------
# row_forward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_row_forward_matches_reference(dtype, transform):
    logit_scale, softcap, temperature = transform
    raw, labels, _ = make_rows(13, 3001, dtype)  # V not a power of 2, > one 2048-block
    stats = rowops_cpp.row_forward(raw, labels, IGNORE, logit_scale, softcap, temperature, True, True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for t in stats:
        assert t.dtype == acc and t.shape == (13,)
    ref = ref_stats(raw, labels, logit_scale, softcap, temperature)
    tol = FWD_TOL[dtype]
    for name, a, e in zip(("logp", "lse", "entropy", "log_sum_p2"), stats, ref):
        assert_close(a, e, tol, 1e-6 if dtype != torch.float64 else 0.0, name)
    assert (stats.logp[:2] == 0).all()  # ignored rows


def test_row_forward_optional_outputs_are_none():
    raw, labels, _ = make_rows(4, 100, torch.float32)
    stats = rowops_cpp.row_forward(raw, labels, IGNORE, 1.0, None, 1.0, False, False)
    assert stats.entropy is None and stats.log_sum_p2 is None
    stats_all = rowops_cpp.row_forward(raw, labels, IGNORE, 1.0, None, 1.0, True, True)
    assert torch.equal(stats.logp, stats_all.logp) and torch.equal(stats.lse, stats_all.lse)


def test_row_forward_huge_vocab():
    raw, labels, _ = make_rows(2, 262144, torch.float32, n_ignored=0)
    stats = rowops_cpp.row_forward(raw, labels, IGNORE, 1.0, None, 1.0, True, True)
    ref = ref_stats(raw, labels, 1.0, None, 1.0)
    for name, a, e in zip(("logp", "lse", "entropy", "log_sum_p2"), stats, ref):
        assert_close(a, e, 2e-4, 1e-6, name)


@pytest.mark.parametrize("transform", [(1.0, None, 1.0), (1.0, None, 0.7)])
def test_row_forward_large_magnitude_logits(transform):
    logit_scale, softcap, temperature = transform
    raw, labels, _ = make_rows(6, 5000, torch.float32, scale=1e4)
    stats = rowops_cpp.row_forward(raw, labels, IGNORE, logit_scale, softcap, temperature, True, True)
    ref = ref_stats(raw, labels, logit_scale, softcap, temperature)
    for name, a, e in zip(("logp", "lse", "entropy", "log_sum_p2"), stats, ref):
        # |z| ~ 4e4: an fp32 ulp is ~4e-3, entropy / log_sum_p2 themselves are O(1) and stay accurate
        assert_close(a, e, 2e-2, 1e-6, name)


def test_row_forward_neg_inf_logits():
    raw, labels, _ = make_rows(5, 4100, torch.float32, n_ignored=1)
    raw[:, ::3] = float("-inf")  # masked vocab entries
    raw[:, 2100:] = float("-inf")  # a whole 2048-block of -inf
    labels[1:] = 1  # finite entries
    stats = rowops_cpp.row_forward(raw, labels, IGNORE, 1.0, None, 1.0, True, True)
    ref = ref_stats(raw, labels, 1.0, None, 1.0)
    for name, a, e in zip(("logp", "lse", "entropy", "log_sum_p2"), stats, ref):
        assert_close(a, e, 1e-4, 1e-6, name)
    grad = rowops_cpp.row_backward(raw, labels, stats.lse, stats.entropy, torch.ones(5), torch.ones(5),
                                   IGNORE, 1.0, None, 1.0)
    assert torch.isfinite(grad).all()
    assert (grad[raw == float("-inf")] == 0).all()


def test_row_forward_strided_rows():
    big, labels, _ = make_rows(7, 1200, torch.float32)
    raw = big[:, 100:1100]  # row stride 1200, unit inner stride: used without a copy
    labels = labels.clamp(max=999)
    labels[:2] = IGNORE
    stats = rowops_cpp.row_forward(raw, labels, IGNORE, 1.0, None, 1.0, True, False)
    ref = ref_stats(raw, labels, 1.0, None, 1.0)
    assert_close(stats.logp, ref[0], 1e-4, 1e-6, "logp")
    assert_close(stats.lse, ref[1], 1e-4, 1e-6, "lse")
    stats_t = rowops_cpp.row_forward(raw.t().contiguous().t(), labels, IGNORE, 1.0, None, 1.0, False, False)
    assert_close(stats_t.logp, ref[0], 1e-4, 1e-6, "logp (column-major)")


def test_row_forward_bad_label_raises():
    raw, labels, _ = make_rows(3, 50, torch.float32)
    labels[2] = 50
    with pytest.raises(RuntimeError, match="out of range"):
        rowops_cpp.row_forward(raw, labels, IGNORE, 1.0, None, 1.0, False, False)


# ------------------------------------------------------------------------------------------------
# row_backward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_row_backward_matches_autograd(dtype, transform, with_entropy):
    logit_scale, softcap, temperature = transform
    raw, labels, gen = make_rows(11, 2500, dtype)
    stats = rowops_cpp.row_forward(raw, labels, IGNORE, logit_scale, softcap, temperature, with_entropy, False)
    g_logp = torch.randn(11, generator=gen, dtype=stats.lse.dtype)
    g_ent = torch.randn(11, generator=gen, dtype=stats.lse.dtype) if with_entropy else None
    grad = rowops_cpp.row_backward(raw, labels, stats.lse, stats.entropy, g_logp, g_ent, IGNORE, logit_scale,
                                   softcap, temperature)
    assert grad.dtype == dtype and grad.shape == raw.shape
    ref = ref_grad(raw, labels, g_logp, g_ent, logit_scale, softcap, temperature)
    scale = ref.abs().max().item()
    if dtype == torch.float64:
        assert_close(grad, ref, 1e-12 * max(scale, 1.0), 0.0, "grad")
    elif dtype == torch.float32:
        assert_close(grad, ref, 1e-6 * scale, 1e-4, "grad")
    else:
        assert_close(grad, ref, 1e-4 * scale, 1e-2, "grad")
    if not with_entropy:
        assert (grad[:2] == 0).all()  # ignored rows, no entropy term


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transform", [(1.0, None, 1.0), (1.7, 30.0, 0.6)])
def test_row_backward_in_place(dtype, transform):
    logit_scale, softcap, temperature = transform
    raw, labels, gen = make_rows(9, 3000, dtype)
    stats = rowops_cpp.row_forward(raw, labels, IGNORE, logit_scale, softcap, temperature, True, False)
    g_logp, g_ent = torch.randn(9, generator=gen), torch.randn(9, generator=gen)
    expected = rowops_cpp.row_backward(raw, labels, stats.lse, stats.entropy, g_logp, g_ent, IGNORE,
                                       logit_scale, softcap, temperature)
    tile = raw.clone()
    ptr = tile.data_ptr()
    got = rowops_cpp.row_backward(tile, labels, stats.lse, stats.entropy, g_logp, g_ent, IGNORE, logit_scale,
                                  softcap, temperature, out=tile)
    assert got.data_ptr() == ptr and tile.data_ptr() == ptr
    torch.testing.assert_close(tile, expected, rtol=0, atol=0)


def test_row_backward_float32_out_for_bf16_logits():
    raw, labels, gen = make_rows(5, 700, torch.bfloat16)
    stats = rowops_cpp.row_forward(raw, labels, IGNORE, 1.0, None, 1.0, False, False)
    g = torch.randn(5, generator=gen)
    out = torch.empty(5, 700, dtype=torch.float32)
    got = rowops_cpp.row_backward(raw, labels, stats.lse, None, g, None, IGNORE, 1.0, None, 1.0, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = ref_grad(raw, labels, g, None, 1.0, None, 1.0)
    assert_close(out, ref, 1e-6 * ref.abs().max().item(), 1e-4, "grad")


def test_row_backward_huge_vocab():
    raw, labels, gen = make_rows(2, 262144, torch.float32, n_ignored=0)
    stats = rowops_cpp.row_forward(raw, labels, IGNORE, 1.0, None, 1.0, True, False)
    g_logp, g_ent = torch.randn(2, generator=gen), torch.randn(2, generator=gen)
    grad = rowops_cpp.row_backward(raw, labels, stats.lse, stats.entropy, g_logp, g_ent, IGNORE, 1.0, None, 1.0)
    ref = ref_grad(raw, labels, g_logp, g_ent, 1.0, None, 1.0)
    assert_close(grad, ref, 1e-6 * ref.abs().max().item(), 1e-4, "grad")


def test_row_backward_large_magnitude_logits():
    raw, labels, gen = make_rows(4, 3000, torch.float32, scale=1e4)
    stats = rowops_cpp.row_forward(raw, labels, IGNORE, 1.0, None, 1.0, True, False)
    g_logp, g_ent = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    grad = rowops_cpp.row_backward(raw, labels, stats.lse, stats.entropy, g_logp, g_ent, IGNORE, 1.0, None, 1.0)
    ref = ref_grad(raw, labels, g_logp, g_ent, 1.0, None, 1.0)
    assert torch.isfinite(grad).all()
    assert_close(grad, ref, 1e-3 * ref.abs().max().item(), 0.0, "grad")


class _CppRowOps(torch.autograd.Function):
    """Autograd wrapper around the cpp row ops, for torch.autograd.gradcheck (float64)."""

    @staticmethod
    def forward(ctx, logits, labels, params):
        stats = rowops_cpp.row_forward(logits, labels, IGNORE, *params, True, False)
        ctx.save_for_backward(logits, labels, stats.lse, stats.entropy)
        ctx.params = params
        return stats.logp, stats.entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, labels, lse, entropy = ctx.saved_tensors
        grad = rowops_cpp.row_backward(logits, labels, lse, entropy, g_logp.contiguous(), g_ent.contiguous(),
                                       IGNORE, *ctx.params)
        return grad, None, None


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_row_ops_gradcheck(transform):
    raw, labels, _ = make_rows(4, 9, torch.float64, scale=1.0, n_ignored=1)
    raw.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: _CppRowOps.apply(x, labels, transform), (raw,), eps=1e-6,
                                    atol=1e-7, rtol=1e-5)


def test_isa_clones_agree(monkeypatch):
    if _C.row_isa() == "default":
        pytest.skip("no AVX2/AVX-512 clone on this CPU")
    raw, labels, gen = make_rows(6, 4097, torch.float32)
    g_logp, g_ent = torch.randn(6, generator=gen), torch.randn(6, generator=gen)

    def run():
        s = rowops_cpp.row_forward(raw, labels, IGNORE, 1.3, 20.0, 0.9, True, True)
        g = rowops_cpp.row_backward(raw, labels, s.lse, s.entropy, g_logp, g_ent, IGNORE, 1.3, 20.0, 0.9)
        return list(s) + [g]

    best = run()
    for isa in ("default", "avx2"):
        monkeypatch.setenv("PREFOPT_CPU_ISA", isa)
        assert _C.row_isa() in (isa, "default")
        for a, b in zip(run(), best):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_matches_torch_backend():
    raw, labels, gen = make_rows(8, 1500, torch.float32)
    args = (IGNORE, 1.7, 30.0, 0.6)
    a = rowops_cpp.row_forward(raw, labels, *args, True, True)
    b = rowops_torch.row_forward(raw, labels, *args, True, True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)
    g_logp, g_ent = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    ga = rowops_cpp.row_backward(raw, labels, a.lse, a.entropy, g_logp, g_ent, *args)
    gb = rowops_torch.row_backward(raw, labels, b.lse, b.entropy, g_logp, g_ent, *args)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# segment sums
# ------------------------------------------------------------------------------------------------
def ref_segments(values, weights, cu, average):
    out, counts = [], []
    for s in range(cu.numel() - 1):
        v = values[cu[s]:cu[s + 1]].double()
        w = torch.ones_like(v) if weights is None else weights[cu[s]:cu[s + 1]].double()
        c = float((w != 0).sum())
        tot = float((v * w).sum())
        out.append((tot / c if c > 0 else 0.0) if average else tot)
        counts.append(c)
    return torch.tensor(out, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


def _segment_case(dtype, with_weights):
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 0, 7, 3, 1, 9]  # includes an empty segment
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int64)
    N = int(cu[-1])
    values = torch.randn(N, generator=gen, dtype=dtype)
    weights = None
    if with_weights:
        weights = (torch.rand(N, generator=gen) < 0.7).to(dtype)
        weights[cu[2]:cu[3]] = 0  # a fully masked segment
        weights[cu[5] + 4:cu[6]] *= 0.25  # LD-DPO style down-weighted tail
    return values, weights, cu


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("average", [False, True])
def test_segment_forward_backward(dtype, with_weights, average):
    values, weights, cu = _segment_case(dtype, with_weights)
    out, counts = segment_cpp.segment_forward(values, weights, cu, average)
    ref_out, ref_counts = ref_segments(values, weights, cu, average)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype and counts.dtype == dtype
    assert_close(out, ref_out, tol, 0.0, "segment out")
    assert torch.equal(counts.double(), ref_counts)
    if with_weights:
        assert counts[2] == 0 and out[2] == 0

    # backward vs autograd of the reference
    g = torch.randn(out.numel(), dtype=dtype, generator=torch.Generator().manual_seed(2))
    grad = segment_cpp.segment_backward(g, weights, cu, counts, average, values.numel())
    v = values.detach().double().requires_grad_(True)
    w = None if weights is None else weights.double()
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])
    sums = torch.zeros(cu.numel() - 1, dtype=torch.float64).index_add(0, seg, v if w is None else v * w)
    if average:
        c = ref_counts
        sums = torch.where(c > 0, sums / c.clamp_min(1), torch.zeros_like(sums))
    (ref_g,) = torch.autograd.grad((sums * g.double()).sum(), v)
    assert grad.dtype == dtype
    assert_close(grad, ref_g, tol, 0.0, "segment grad")


def test_segment_padded_layout_and_uncovered_tokens():
    B, T = 3, 4
    values = torch.arange(B * T, dtype=torch.float32)
    cu = torch.arange(B + 1, dtype=torch.int64) * T
    out, counts = segment_cpp.segment_forward(values, None, cu, False)
    assert torch.equal(out, values.view(B, T).sum(1)) and torch.equal(counts, torch.full((B,), float(T)))
    # tokens outside every segment get a zero gradient
    cu2 = torch.tensor([2, 5, 9], dtype=torch.int64)
    out2, counts2 = segment_cpp.segment_forward(values, None, cu2, True)
    grad = segment_cpp.segment_backward(torch.ones(2), None, cu2, counts2, True, values.numel())
    assert grad[:2].eq(0).all() and grad[9:].eq(0).all()
    assert torch.allclose(grad[2:5], torch.full((3,), 1 / 3)) and torch.allclose(grad[5:9], torch.full((4,), 0.25))


def test_segment_bad_cu_seqlens_raises():
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        segment_cpp.segment_forward(torch.ones(4), None, torch.tensor([0, 3, 2], dtype=torch.int64), False)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        segment_cpp.segment_forward(torch.ones(4), None, torch.tensor([0, 5], dtype=torch.int64), False)


def test_math_constants_sane():
    # exp(-88) underflow region and -inf handled by the kernel's polynomial exp: a row whose other
    # logits are 100 below the max gives exactly logp = 0 for the max entry.
    raw = torch.tensor([[0.0, -100.0, -200.0, float("-inf")]])
    stats = rowops_cpp.row_forward(raw, torch.tensor([0]), IGNORE, 1.0, None, 1.0, True, True)
    assert abs(stats.logp.item()) < 1e-30 + 4e-44 or stats.logp.item() == 0.0
    assert stats.entropy.item() == pytest.approx(0.0, abs=1e-30)
    assert math.isfinite(stats.log_sum_p2.item())


# ------------------------------------------------------------------------------------------------
# per-pair loss table (csrc/pair_loss_math.h) vs prefopt/losses/table.py evaluated with TorchOps
# ------------------------------------------------------------------------------------------------
def test_pair_loss_names_follow_table():
    assert list(_C.pair_loss_names()) == [e.name for e in table.ENTRIES]
    assert all(table.INDEX[name] == i for i, name in enumerate(_C.pair_loss_names()))


def _pair_args(kind, name, n, dtype, gen):
    if kind in ("delta", "delta_norm", "aot", "aot_unpaired"):
        h = torch.randn(n, generator=gen, dtype=torch.float64) * 3
        h[0] = 0.0
        return (h.to(dtype),)
    if kind in ("cr", "cr_norm"):
        if name == "orpo":  # length-averaged log-probs: negative, some close to 0 (the log(-expm1) branch)
            c = -torch.rand(n, generator=gen, dtype=torch.float64) * 3 - 1e-3
            r = -torch.rand(n, generator=gen, dtype=torch.float64) * 3 - 1e-3
        else:
            c = torch.randn(n, generator=gen, dtype=torch.float64) * 3
            r = torch.randn(n, generator=gen, dtype=torch.float64) * 3
        return c.to(dtype), r.to(dtype)
    if kind == "signed":
        x = torch.randn(n, generator=gen, dtype=torch.float64) * 3
        s = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
        return x.to(dtype), s.to(dtype)
    raise AssertionError(kind)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pair_loss_table_matches_torch(dtype):
    gen = torch.Generator().manual_seed(3)
    params = table.make_params(dtype, "cpu", beta=0.3, ls=0.1, tau=0.05, gamma=0.5, fa1=-0.5, clamp=80.0,
                               bco_delta=0.2, kl=0.15, loss_weights=(1.0,))
    pv = table.params_view(params, 1)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    checked = 0
    for loss_id, e in enumerate(table.ENTRIES):
        if e.forward is None:
            with pytest.raises(RuntimeError):
                _C.pair_loss_forward(loss_id, torch.zeros(2, dtype=dtype), None, params)
            continue
        args = _pair_args(e.kind, e.name, 257, dtype, gen)
        b = args[1] if len(args) == 2 else None
        got = _C.pair_loss_forward(loss_id, args[0], b, params)
        want = e.forward(table.TorchOps, pv, *args)
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{e.name} forward: {m}")
        g_out = torch.randn(257, generator=gen, dtype=torch.float64).to(dtype)
        da, db = _C.pair_loss_backward(loss_id, args[0], b, params, g_out)
        for k, dfun in enumerate(e.grads):
            want_g = torch.as_tensor(dfun(table.TorchOps, pv, *args), dtype=dtype).expand(257) * g_out
            torch.testing.assert_close((da, db)[k], want_g, **tol, msg=lambda m: f"{e.name} d/darg{k}: {m}")
        if len(e.grads) == 1:
            assert db.numel() == 0
        checked += 1
    assert checked == sum(e.forward is not None for e in table.ENTRIES) >= 20


def test_pair_loss_grads_match_autograd_of_table():
    """The table's own derivatives and the C++ ones agree with autograd of the table's forward (float64)."""
    gen = torch.Generator().manual_seed(4)
    params = table.make_params(torch.float64, "cpu", beta=0.7, ls=0.2, tau=0.3, gamma=0.1, bco_delta=-0.3, kl=0.05)
    pv = table.params_view(params, 1)
    for loss_id, e in enumerate(table.ENTRIES):
        if e.forward is None:
            continue
        args = [a.clone().requires_grad_(True) for a in _pair_args(e.kind, e.name, 64, torch.float64, gen)]
        if e.kind == "signed":
            args[1].requires_grad_(False)
        if e.name in ("hinge", "cpo_hinge"):
            args[0].data += 1e-3  # keep off the kink at h = 1/beta
        want = torch.autograd.grad(e.forward(table.TorchOps, pv, *args).sum(), [a for a in args if a.requires_grad])
        b = args[1].detach() if len(args) == 2 else None
        da, db = _C.pair_loss_backward(loss_id, args[0].detach(), b, params, None)
        for k, w in enumerate(want):
            torch.testing.assert_close((da, db)[k], w, rtol=1e-9, atol=1e-12, msg=lambda m: f"{e.name}: {m}")
