"""Gradient filtering of the fused head's backward (docs/design.md, "Gradient filtering") on every backend.

Filtered gradients stay within the bound of the exact ones (computed here from the inputs), a constructed LM-like
input has blocks skipped, the CPU head and the Triton kernel skip the same blocks when their blocks coincide, and
filter_eps None / 0 (and "auto" on fp32) give the exact backward bit for bit (on a GPU, where the compiled
backward adds with atomics, to the rounding of a reordered sum)."""
import math

import pytest
import torch

import prefopt
import prefopt.cpu.chunked as chunked
from prefopt import _validation
from prefopt.filtering import skip_counter
from prefopt.reference import logprobs_from_logits_ref, transform_logits
from tests._backends import BACKENDS, ON_CUDA, available

N, H, V = 90, 40, 500   # ragged against every block shape (32 / 64 rows, 64 / 128 vocabulary entries)
EPS = 1e-3
OPTIONS = {"plain": dict(), "transformed": dict(softcap=4.0, temperature=0.8, logit_scale=1.5)}
# unit roundoff of the gradients' dtype, and how many roundings of one |term| sum the two paths may differ by
# (fp32: blocked GEMM sums in another order; bf16: a 16-bit product per tile plus the rounding of the result)
ROUNDING = {torch.float32: (2.0 ** -24, 64), torch.bfloat16: (2.0 ** -8, 4)}


def _peaked(dtype, with_bias=False, seed=0):
    """LM-like head inputs with the rare tokens at the end of the vocabulary (as in a merge-ordered BPE vocabulary):
    weight[:, 0] = -3 log(1 + v) with hidden[:, 0] = 1 lowers token v's logit with its rank, labels are among the 64
    most frequent tokens and each hidden state points at its label. At EPS most blocks of the tail are negligible,
    the blocks holding labels are not."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) / 2
    weight[:, 0] = -3 * torch.log1p(torch.arange(V, dtype=torch.float64))
    labels = torch.randint(0, 64, (N,), generator=gen)
    hidden = 0.3 * torch.randn(N, H, generator=gen, dtype=torch.float64)
    hidden[:, 0] = 1
    direction = weight[labels, 1:]
    hidden[:, 1:] += 3 * direction / direction.norm(dim=1, keepdim=True)
    bias = 0.5 * torch.randn(V, generator=gen, dtype=torch.float64) if with_bias else None
    upstream = torch.randn(2, N, generator=gen, dtype=torch.float64)  # dL/dlogp, dL/dentropy
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(hidden), cast(weight), cast(bias), labels, upstream


def _grads(backend, hidden, weight, bias, labels, upstream, entropy, filter_eps="exact", **options):
    """(grad_hidden, grad_weight, grad_bias | None) of sum(g * logp) (+ sum(e * entropy)) on `backend`;
    filter_eps="exact" leaves the keyword out."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    kwargs = dict(options) if filter_eps == "exact" else dict(options, filter_eps=filter_eps)
    with prefopt.use_backend(backend):
        out = prefopt.linear_logprobs(leaves[0], leaves[1], labels, leaves[2] if bias is not None else None,
                                      return_entropy=entropy, **kwargs)
        logp, ent = out if entropy else (out, None)
        loss = (logp.double() * upstream[0]).sum() + ((ent.double() * upstream[1]).sum() if entropy else 0)
        grads = torch.autograd.grad(loss, leaves)
    return tuple(grads) + ((None,) if bias is None else ())


def _bounds(hidden, weight, bias, labels, upstream, entropy, eps, formed=False, **options):
    """Per-element bounds on |filtered - exact| for (grad_hidden, grad_weight, grad_bias), each plus the rounding of
    two differently blocked sums: the filter's (every entry that may be skipped, |D_iv| <= eps * s * G_i with a 1%
    margin for the backends' own rounding of D, times its GEMM partner), and docs/design.md's closed form (the bound
    the user is promised, looser: it charges every entry eps * s * G_i). formed: two backends that form D each their
    own way, from probabilities rounded to the dtype: each entry's rounding is then of the size of G_i p_iv (the
    label's D = G_i (p - 1) is much smaller than the p it was formed from), not of |D_iv|."""
    h, w = hidden.double(), weight.double()
    raw = (h @ w.T + (0 if bias is None else bias.double())).requires_grad_()
    logp, ent = logprobs_from_logits_ref(raw, labels, return_entropy=True, **options)
    loss = (logp * upstream[0]).sum() + ((ent * upstream[1]).sum() if entropy else 0)
    grad_raw, = torch.autograd.grad(loss, raw)
    scale = abs(options.get("logit_scale", 1.0)) / options.get("temperature", 1.0)
    upstream_size = upstream[0].abs() + (upstream[1].abs() if entropy else 0)
    threshold = eps * scale * upstream_size
    may_skip = torch.where(grad_raw.abs() <= 1.01 * threshold[:, None], grad_raw.abs(), 0.0)
    filter_h, filter_w, filter_b = may_skip @ w.abs(), may_skip.T @ h.abs(), may_skip.sum(0)
    # the closed forms of docs/design.md: eps s G_i sum_v |W[v, k]|, eps s sum_i G_i |h[i, k]|, eps s sum_i G_i
    closed_h = 1.01 * threshold[:, None] * w.abs().sum(0)[None, :]
    closed_w = 1.01 * (threshold[:, None] * h.abs()).sum(0)[None, :].expand(w.shape)
    closed_b = 1.01 * threshold.sum().expand(w.shape[0])
    unit, roundings = ROUNDING[hidden.dtype]
    size = grad_raw.abs()
    if formed:
        z = transform_logits(raw.detach(), **options)
        size = size + upstream_size[:, None] * scale * torch.softmax(z, dim=-1)
    rounding = (roundings * unit * (size @ w.abs()), roundings * unit * (size.T @ h.abs()),
                roundings * unit * size.sum(0) + 1e-300)
    return ([f + r for f, r in zip((filter_h, filter_w, filter_b), rounding)],
            [c + r for c, r in zip((closed_h, closed_w, closed_b), rounding)])


def _assert_within_bound(got, want, hidden, weight, bias, labels, upstream, entropy, eps=0.0, formed=False,
                         **options):
    """Each gradient within _bounds at `eps`: at 0, the rounding of two sums of the same terms in another order."""
    bounds, _ = _bounds(hidden, weight, bias, labels, upstream, entropy, eps, formed, **options)
    for name, g, w, bound in zip(("hidden", "weight", "bias"), got, want, bounds):
        if w is None:
            assert g is None
            continue
        worst = ((g.double() - w.double()).abs() / bound).max().item()
        assert worst <= 1.0, f"grad_{name}: {worst:.3g} x the bound"


def _assert_same_backward(backend, got, exact, *inputs):
    """Bit for bit where the backward's order of summation is fixed (every CPU backend, the interpreter, the CUDA
    extension). The compiled Triton backward adds its tiles into the gradients with atomics, in the order the
    programs finish, so on a GPU two runs of the same backward differ by rounding: there, within that rounding."""
    if ON_CUDA and backend == "triton":
        _assert_within_bound(got, exact, *inputs)
    else:
        assert all(torch.equal(g, e) for g, e in zip(got, exact) if e is not None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("entropy, with_bias", [(False, False), (True, True)], ids=["logp", "entropy-bias"])
def test_filtered_gradients_within_the_bound(backend, dtype, options, entropy, with_bias):
    hidden, weight, bias, labels, upstream = _peaked(dtype, with_bias)
    exact = _grads(backend, hidden, weight, bias, labels, upstream, entropy, **options)
    skip_counter.reset()
    filtered = _grads(backend, hidden, weight, bias, labels, upstream, entropy, filter_eps=EPS, **options)
    assert 0 < skip_counter.skipped < skip_counter.total, (skip_counter.skipped, skip_counter.total)
    bounds, closed_forms = _bounds(hidden, weight, bias, labels, upstream, entropy, EPS, **options)
    for name, got, want, bound, closed in zip(("hidden", "weight", "bias"), filtered, exact, bounds, closed_forms):
        if want is None:
            assert got is None
            continue
        assert got.dtype == want.dtype
        error = (got.double() - want.double()).abs()
        worst = (error / bound).max().item()
        assert worst <= 1.0, f"grad_{name}: error {error.max().item():.3g} exceeds the bound ({worst:.3g} x)"
        worst = (error / closed).max().item()
        assert worst <= 1.0, f"grad_{name}: error exceeds docs/design.md's bound ({worst:.3g} x)"
    if dtype == torch.float32:  # the skipped blocks did change something: the bound was tested, not bypassed
        assert not all(torch.equal(f, e) for f, e in zip(filtered, exact) if e is not None)


@pytest.mark.skipif(not available("triton"), reason="triton backend not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_head_and_triton_skip_the_same_blocks(dtype, monkeypatch):
    """With the CPU head's blocks set to the Triton backward tile of the dtype (and one CPU tile, so both grids start
    at row 0 and column 0), both count the same blocks and skip as many, and their filtered gradients agree within
    the filter's bound plus rounding: each computes D with its own rounding, so a block at the threshold may be
    skipped by one and kept by the other (fp32 under the interpreter: one grad_hidden entry 1.2e-6 apart, 1500x the
    rounding alone; bf16 on an H200: 0.018 apart at 0.08)."""
    from prefopt.kernels import linear_logprobs as triton_head
    tile = triton_head._config(dtype, backward=True)
    block_rows, block_cols = tile.block_n, tile.block_v
    monkeypatch.setattr(chunked, "FILTER_ROWS", block_rows)
    monkeypatch.setattr(chunked, "FILTER_COLS", block_cols)
    assert chunked.tile_shape(N, V, None) == (N, V)
    hidden, weight, bias, labels, upstream = _peaked(dtype, with_bias=True)
    counts, grads = {}, {}
    for backend in ("cpp" if available("cpp") else "torch", "triton"):
        skip_counter.reset()
        grads[backend] = _grads(backend, hidden, weight, bias, labels, upstream, True, filter_eps=EPS)
        counts[backend] = (skip_counter.skipped, skip_counter.total)
    cpu, gpu = counts.values()
    assert cpu == gpu and cpu[1] == math.ceil(N / block_rows) * math.ceil(V / block_cols) and cpu[0] > 0, counts
    _assert_within_bound(*grads.values(), hidden, weight, bias, labels, upstream, True, EPS, formed=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_off_is_the_exact_backward_bit_for_bit(backend, dtype):
    """None and 0 are the exact backward ("auto" too on fp32), and none of them counts anything."""
    hidden, weight, bias, labels, upstream = _peaked(dtype, with_bias=True)
    exact = _grads(backend, hidden, weight, bias, labels, upstream, True)
    skip_counter.reset()
    for eps in (None, 0, 0.0) + (("auto",) if dtype == torch.float32 else ()):
        got = _grads(backend, hidden, weight, bias, labels, upstream, True, filter_eps=eps)
        _assert_same_backward(backend, got, exact, hidden, weight, bias, labels, upstream, True)
    assert skip_counter.total == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_negligible_is_the_exact_backward_bit_for_bit(backend):
    """Filtering on with a threshold no entry meets: every block is kept and goes through the same GEMMs as the
    exact backward (uniform inputs: no entry of D is 0)."""
    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen) / H ** 0.5
    labels, upstream = torch.randint(0, V, (N,), generator=gen), torch.randn(2, N, dtype=torch.float64, generator=gen)
    exact = _grads(backend, hidden, weight, None, labels, upstream, True)
    skip_counter.reset()
    got = _grads(backend, hidden, weight, None, labels, upstream, True, filter_eps=1e-30)
    assert skip_counter.total > 0 and skip_counter.skipped == 0
    _assert_same_backward(backend, got, exact, hidden, weight, None, labels, upstream, True)


def test_auto_resolves_by_dtype():
    assert _validation.settle_filter_eps("auto", torch.bfloat16) == 2.0 ** -12
    assert _validation.settle_filter_eps("auto", torch.float16) == 2.0 ** -12
    assert _validation.settle_filter_eps("auto", torch.float32) is None
    assert _validation.settle_filter_eps("auto", torch.float64) is None
    assert _validation.settle_filter_eps(0, torch.bfloat16) is None
    assert _validation.settle_filter_eps(3e-4, torch.float32) == 3e-4


def test_fused_loss_filters_the_heads_with_a_backward(monkeypatch):
    """filter_eps reaches the policy head and the nll_target head; the live reference head (no backward) gets none."""
    settled = []
    real = _validation.settle_linear

    def record(*args, **kwargs):
        params = real(*args, **kwargs)
        settled.append((kwargs.get("names", ("hidden",))[0], params.filter_eps))
        return params

    monkeypatch.setattr(_validation, "settle_linear", record)
    hidden, weight, _, labels, _ = _peaked(torch.bfloat16)
    hidden = hidden[:88].reshape(4, 22, H).requires_grad_()
    weight = weight.requires_grad_()
    labels = labels[:88].reshape(4, 22)
    skip_counter.reset()
    loss, _ = prefopt.fused_linear_dpo_loss(hidden, weight, labels, ref_hidden=hidden.detach(),
                                            ref_weight=weight.detach(), nll_target=labels, filter_eps="auto")
    loss.backward()
    assert sorted(settled) == sorted([("hidden", 2.0 ** -12), ("hidden", 2.0 ** -12), ("ref_hidden", None)])
    assert skip_counter.total > 0
