"""The public core ops against the materialising references, on every backend available here."""
import pytest
import torch

import prefopt
from prefopt import _backend
from prefopt.reference import linear_logprobs_ref, logprobs_from_logits_ref, sequence_logps_ref
from tests._backends import BACKENDS, CPU_BACKENDS
from tests._spy import KernelSpy



# bf16/fp16: the math is fp32 inside, and the references below run fp32 math on the same rounded inputs, so what
# separates them is the roundings to the 16-bit dtype. UNIT is its unit roundoff u (half the spacing of its numbers
# at 1). Rounding to nearest (torch, C++) moves a value by at most u of it; the Triton interpreter casts fp32 to
# bf16 by truncation, a whole spacing (2u), so each rounding below is allowed 2u. fp16 has subnormals below 2^-14,
# spaced 2^-24 apart (FLOOR: the most a rounding there moves a value); bf16 has fp32's range.
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
FLOOR = {torch.bfloat16: 0.0, torch.float16: 2.0 ** -24}
EPS32 = torch.finfo(torch.float32).eps


def _assert_within(got, want, bound, what):
    error = (got.double() - want.double()).abs()
    excess = torch.where(error == 0, 0.0, error / bound).max().item()  # 0 / 0: an exact 0 (an ignored row)
    assert excess <= 1.0, f"{what}: off by {excess:.3g} x its bound"


def _grads(fn, *tensors):
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1234)  # the same output weights for prefopt and the reference
    weights = [torch.randn(o.shape, dtype=torch.float64, generator=gen) for o in outs]
    total = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(total, tensors, allow_unused=True)
    return outs, grads


def _labels(shape, vocab, ignore_fraction=0.25):
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignore_fraction] = -100
    return labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [77, 1000])
@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7), dict(softcap=5.0), dict(softcap=3.0, temperature=1.3),
                                     dict(logit_scale=0.5)])
def test_logprobs_from_logits_float64(backend, vocab, options):
    logits = (3 * torch.randn(2, 5, vocab, dtype=torch.float64)).requires_grad_()
    labels = _labels((2, 5), vocab)
    kwargs = dict(return_entropy=True, **options)
    with prefopt.use_backend(backend):
        got, got_grad = _grads(lambda: prefopt.logprobs_from_logits(logits, labels, **kwargs), logits)
    want, want_grad = _grads(lambda: logprobs_from_logits_ref(logits, labels, **kwargs), logits)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got_grad[0], want_grad[0], atol=1e-10, rtol=1e-10)
    assert torch.all(got[0][labels == -100] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logprobs_from_logits_low_precision(backend, dtype):
    vocab = 1000
    logits = (4 * torch.randn(6, vocab)).to(dtype).requires_grad_()
    labels = _labels((6,), vocab)
    with prefopt.use_backend(backend):
        got, (grad,) = _grads(lambda: prefopt.logprobs_from_logits(logits, labels, temperature=0.9), logits)
    ref_logits = logits.detach().float().requires_grad_()
    want, (want_grad,) = _grads(lambda: logprobs_from_logits_ref(ref_logits, labels, temperature=0.9), ref_logits)
    assert got[0].dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    # The gradient is fp32 math rounded once to `dtype` (2u of it, FLOOR below fp16's normal range); the two fp32
    # computations of p = exp(z - lse) differ by a few fp32 spacings of |lse| (16 eps32 |lse|, times the largest
    # gradient entry |upstream| / temperature, which bounds every p |upstream| / temperature).
    lse = torch.logsumexp(ref_logits.detach() / 0.9, -1).abs().max().item()
    bound = 2 * UNIT[dtype] * want_grad.abs() + FLOOR[dtype] + 16 * EPS32 * lse * want_grad.abs().max()
    _assert_within(grad, want_grad, bound, "logits gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_from_logits_huge_vocab_and_magnitude(backend):
    vocab = 262144
    logits = torch.randn(2, vocab) * 1e4
    logits.requires_grad_()
    labels = torch.tensor([5, vocab - 1])
    with prefopt.use_backend(backend):
        logp, entropy = prefopt.logprobs_from_logits(logits, labels, return_entropy=True)
        (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(logits.grad).all()
    # float64 truth on the same fp32 logits, and the same upstream gradients (1 for logp, 1 for the entropy)
    x = logits.detach().double().requires_grad_()
    want, want_entropy = logprobs_from_logits_ref(x, labels, return_entropy=True)
    (want.sum() + want_entropy.sum()).backward()
    # The fp32 kernels form z - lse with an error of a few fp32 spacings of |lse| (~4.6e4 here: spacing u = 2^-8),
    # so log p moves by a few u, p by p * (a few u), and the entropy gradient -p (log p + H) by
    # p (|log p| + H + 1) (a few u): 8 u each. Below that, fp32 flushes to 0 what float64 still holds: any entry
    # of p or -p log p under 2^-126 (there are up to V of them in the entropy's sum), and the stored gradient
    # carries its own rounding (eps32 of its size).
    u = _float32_spacing(float(torch.logsumexp(x.detach(), -1).abs().max()))
    tiny, eps32 = 2.0 ** -126, torch.finfo(torch.float32).eps
    log_p = torch.log_softmax(x.detach(), -1)
    p, h = log_p.exp(), want_entropy.detach()[:, None]
    torch.testing.assert_close(logp.double(), want.detach(), atol=8 * u, rtol=0)
    entropy_bound = 8 * u * (h[:, 0] + 1) + vocab * tiny * 88  # -p log p < 88 p for p < 2^-126
    assert bool(((entropy.double() - want_entropy.detach()).abs() <= entropy_bound).all()), (entropy, want_entropy)
    grad_bound = 8 * u * p * (2 + log_p.abs() + h) + eps32 * x.grad.abs() + tiny
    excess = ((logits.grad.double() - x.grad).abs() / grad_bound).max().item()
    assert excess <= 1.0, f"logits gradient off by {excess:.3g} x its bound"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(), dict(temperature=0.8, softcap=4.0), dict(logit_scale=0.25), dict(bias=True)])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_linear_logprobs_float64(backend, options, chunk_size):
    options = dict(options)
    hidden = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(99, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(99, dtype=torch.float64, requires_grad=True) if options.pop("bias", False) else None
    labels = _labels((2, 7), 99)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    kwargs = dict(return_entropy=True, **options)
    with prefopt.use_backend(backend):
        got, got_grads = _grads(lambda: prefopt.linear_logprobs(hidden, weight, labels, bias, chunk_size=chunk_size,
                                                                **kwargs), *inputs)
    want, want_grads = _grads(lambda: linear_logprobs_ref(hidden, weight, labels, bias, **kwargs), *inputs)
    for g, w in zip(got + got_grads, want + want_grads):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)




@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("options", [dict(), dict(temperature=0.8, softcap=4.0), dict(logit_scale=0.25, bias=True)])
@pytest.mark.parametrize("tile_elements", [40, 64])
def test_cpu_head_vocab_blocks_float64(backend, options, tile_elements, monkeypatch):
    """Tiles smaller than a row: the vocabulary is split in ragged blocks merged by the online LSE rule."""
    import prefopt.cpu.chunked as chunked
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", tile_elements)
    monkeypatch.setattr(chunked, "TARGET_ROWS", 3)
    assert chunked.tile_shape(14, 99, None)[1] < 99
    options = dict(options)
    hidden = (2 * torch.randn(2, 7, 16, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(99, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(99, dtype=torch.float64, requires_grad=True) if options.pop("bias", False) else None
    labels = _labels((2, 7), 99)
    labels[0, :3] = torch.tensor([0, 98, 50])  # first, last and a middle block
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    kwargs = dict(return_entropy=True, **options)
    with prefopt.use_backend(backend):
        got, got_grads = _grads(lambda: prefopt.linear_logprobs(hidden, weight, labels, bias, **kwargs), *inputs)
        got_sq = prefopt.linear_logprobs(hidden, weight, labels, bias, return_log_sum_p2=True, **options)[1]
    want, want_grads = _grads(lambda: linear_logprobs_ref(hidden, weight, labels, bias, **kwargs), *inputs)
    want_sq = linear_logprobs_ref(hidden, weight, labels, bias, return_log_sum_p2=True, **options)[1]
    for g, w in zip(got + got_grads + (got_sq,), want + want_grads + (want_sq,)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_logprobs_low_precision(backend, dtype):
    hidden = torch.randn(12, 32).to(dtype).requires_grad_()
    weight = (torch.randn(300, 32) / 4).to(dtype).requires_grad_()
    labels = _labels((12,), 300)
    with prefopt.use_backend(backend):
        got, got_grads = _grads(lambda: prefopt.linear_logprobs(hidden, weight, labels), hidden, weight)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    want, want_grads = _grads(lambda: linear_logprobs_ref(h32, w32, labels), h32, w32)
    # The torch and cpp heads round their logits to `dtype` (their GEMMs are `dtype` GEMMs, as in eager; the Triton
    # head keeps them fp32): each logit is within dz of the reference's, 2u of |z| plus the fp32 accumulation of
    # H products (H eps32 sum |h w|). log p = z_label - lse moves by at most 2 dz.
    u, h, w = UNIT[dtype], hidden.detach().double(), weight.detach().double()
    z = h @ w.T
    dz = 2 * u * z.abs().max().item() + h.shape[1] * EPS32 * (h.abs() @ w.abs().T).max().item()
    torch.testing.assert_close(got[0].double(), want[0].double(), atol=2 * dz, rtol=0)
    # Gradients: dlogits D = g (onehot - p) moves by |g| p 2 dz through the logits (p by p (dz + max dz)), is
    # rounded to `dtype` before the two product GEMMs (2u |D|), and each product is rounded to `dtype` (2u of it).
    gen = torch.Generator().manual_seed(1234)  # the upstream weights _grads draws
    g = torch.randn(labels.shape, dtype=torch.float64, generator=gen).abs() * (labels != -100)
    p = torch.softmax(z, -1)
    size = g[:, None] * (p + torch.nn.functional.one_hot(labels.clamp(min=0), z.shape[1]))  # >= |D|
    moved = g[:, None] * p * 2 * dz + 2 * u * size
    bounds = (moved @ w.abs() + 2 * u * want_grads[0].abs() + FLOOR[dtype],
              moved.T @ h.abs() + 2 * u * want_grads[1].abs() + FLOOR[dtype])
    for name, got_grad, want_grad, bound in zip(("grad_hidden", "grad_weight"), got_grads, want_grads, bounds):
        assert got_grad.dtype == dtype
        _assert_within(got_grad, want_grad, bound, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_gradcheck(backend):
    hidden = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 12, 0, 7])
    with prefopt.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda h, w, b: prefopt.linear_logprobs(h, w, labels, b, softcap=2.0, temperature=0.7, return_entropy=True),
            (hidden, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_all_ignored(backend):
    hidden = torch.randn(3, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    labels = torch.full((3,), -100)
    with prefopt.use_backend(backend):
        logp = prefopt.linear_logprobs(hidden, weight, labels)
        logp.sum().backward()
    assert torch.all(logp == 0) and torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_padded_and_packed(backend, average):
    token_logps = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 6) < 0.6
    mask[1] = False  # a fully masked sequence: 0, zero gradient
    with prefopt.use_backend(backend):
        got, (grad,) = _grads(lambda: prefopt.sequence_logps(token_logps, mask, average=average), token_logps)
    want, (want_grad,) = _grads(lambda: sequence_logps_ref(token_logps, mask, average=average), token_logps)
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, want_grad, atol=1e-12, rtol=1e-12)
    assert got[0][1] == 0 and torch.all(grad[1] == 0)

    packed = torch.randn(11, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 4, 4, 9, 11])  # includes an empty sequence
    weights = torch.rand(11, dtype=torch.float64)
    with prefopt.use_backend(backend):
        got, (grad,) = _grads(lambda: prefopt.sequence_logps(packed, weights, cu_seqlens=cu, average=average), packed)
    want, (want_grad,) = _grads(lambda: sequence_logps_ref(packed, weights, cu_seqlens=cu, average=average), packed)
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, want_grad, atol=1e-12, rtol=1e-12)
    assert torch.isfinite(got[0]).all() and got[0][1] == 0


@pytest.fixture
def spy(monkeypatch):
    return KernelSpy(monkeypatch)


BAD_INPUT = [  # (call, the exact error type, message)
    (lambda: prefopt.logprobs_from_logits(torch.randn(2, 5), torch.tensor([1, 5])), ValueError,
     r"labels must be in \[0, 5\)"),
    (lambda: prefopt.logprobs_from_logits(torch.randn(2, 5), torch.tensor([1, -3])), ValueError, r"labels must be in"),
    (lambda: prefopt.logprobs_from_logits(torch.randn(2, 5), torch.tensor([1.0, 2.0])), TypeError, "integer tensor"),
    (lambda: prefopt.logprobs_from_logits(torch.randn(2, 5), torch.tensor([1, 2, 3])), ValueError, "labels shape"),
    (lambda: prefopt.logprobs_from_logits(torch.randn(0, 5), torch.zeros(0, dtype=torch.long)), ValueError, "empty"),
    (lambda: prefopt.logprobs_from_logits(torch.randn(2, 5), torch.tensor([1, 2]), temperature=0), ValueError,
     "temperature"),
    (lambda: prefopt.linear_logprobs(torch.randn(2, 4), torch.randn(9, 5), torch.tensor([1, 2])), ValueError,
     "hidden size mismatch"),
    (lambda: prefopt.linear_logprobs(torch.randn(2, 4), torch.randn(9, 4).double(), torch.tensor([1, 2])), TypeError,
     "same dtype"),
    (lambda: prefopt.linear_logprobs(torch.randn(2, 4), torch.randn(9, 4), torch.tensor([1, 9])), ValueError,
     r"\[0, 9\)"),
    (lambda: prefopt.linear_logprobs(torch.randn(2, 4), torch.randn(9, 4), torch.tensor([1, 2]), torch.randn(8)),
     ValueError, "bias must have shape"),
    (lambda: prefopt.linear_logprobs(torch.randn(2, 4), torch.randn(9, 4), torch.tensor([1, 2]), chunk_size=0),
     ValueError, "chunk_size"),
    (lambda: prefopt.linear_logprobs(torch.randn(2, 4), torch.randn(9, 4), torch.tensor([1, 2]), softcap=-1.0),
     ValueError, "softcap"),
    (lambda: prefopt.sequence_logps(torch.randn(6), cu_seqlens=torch.tensor([0, 4, 3, 6])), ValueError,
     "non-decreasing"),
    (lambda: prefopt.sequence_logps(torch.randn(6), cu_seqlens=torch.tensor([0, 4, 5])), ValueError,
     "end at the number of tokens 6"),
    (lambda: prefopt.sequence_logps(torch.randn(6)), ValueError, "pass cu_seqlens"),
    (lambda: prefopt.sequence_logps(torch.randn(2, 3), torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask shape"),
]


@pytest.mark.parametrize("call, error, message", BAD_INPUT, ids=[c[2].replace("\\", "") for c in BAD_INPUT])
def test_bad_input_raises_before_any_kernel(spy, call, error, message):
    with pytest.raises(error, match=message) as raised:
        call()
    assert type(raised.value) is error  # not merely a subclass
    assert spy.calls == []


def test_spy_sees_the_kernel_of_each_op(spy):
    """The control: valid calls of the three ops reach a row op, a head and a segment sum, so a zero count above
    means the error came first."""
    prefopt.logprobs_from_logits(torch.randn(2, 5), torch.tensor([1, 2]))
    prefopt.linear_logprobs(torch.randn(2, 4), torch.randn(9, 4), torch.tensor([1, 2]))
    prefopt.sequence_logps(torch.randn(6), cu_seqlens=torch.tensor([0, 4, 6]))
    assert spy.named("row_forward") and spy.named("linear_forward") and spy.named("segment_forward")


def test_backend_selection_errors_and_context(monkeypatch):
    with pytest.raises(ValueError, match="valid backends: auto, triton, cpp, torch"):
        with prefopt.use_backend("cuda-magic"):
            pass
    monkeypatch.setenv("PREFOPT_BACKEND", "nope")
    with pytest.raises(ValueError, match="PREFOPT_BACKEND"):
        prefopt.logprobs_from_logits(torch.randn(2, 5), torch.tensor([1, 2]))
    monkeypatch.setenv("PREFOPT_BACKEND", "torch")
    assert _backend.resolve(torch.device("cpu")) == "torch"
    with prefopt.use_backend("auto"):
        assert _backend.resolve(torch.device("cpu")) in ("cpp", "torch")
    monkeypatch.delenv("TRITON_INTERPRET")
    with prefopt.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        prefopt.logprobs_from_logits(torch.randn(2, 5), torch.tensor([1, 2]))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
def test_linear_logprobs_under_autocast_runs_in_the_autocast_dtype(backend):
    """Like nn.Linear under autocast: fp32 inputs run as bf16, forward and backward on the same tiles."""
    hidden = torch.randn(9, 32, requires_grad=True)
    weight = (torch.randn(300, 32) / 4).requires_grad_()
    labels = _labels((9,), 300)
    with prefopt.use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = prefopt.linear_logprobs(hidden, weight, labels)
        got_grads = torch.autograd.grad(got.sum(), (hidden, weight))
        h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
        want = prefopt.linear_logprobs(h16, w16, labels)
        want_grads = torch.autograd.grad(want.sum(), (h16, w16))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for g, w, like in zip(got_grads, want_grads, (hidden, weight)):
        assert g.dtype == like.dtype == torch.float32
        torch.testing.assert_close(g, w.float(), atol=0, rtol=0)


def _float32_spacing(x):
    x = torch.tensor(abs(x), dtype=torch.float32)
    return float(torch.nextafter(x, torch.tensor(float("inf"))) - x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logps_long_sum_is_exact(backend):
    # float32 log-probs around -10: a float32 accumulator is 0.04 (pairwise) to 8 nats (sequential) off at
    # 131072 tokens, where the float32 spacing of the sum (~1.3e6) is 0.125. The sum must be the float64 sum
    # rounded once (within one spacing), padded and packed, summed and averaged, masked or not.
    n = 131072
    gen = torch.Generator().manual_seed(7)
    values = (-10.0 + 3.0 * torch.rand(2, n, generator=gen, dtype=torch.float64)).float()
    mask = torch.rand(2, n, generator=gen) < 0.9
    cu = torch.tensor([0, n, 2 * n])
    with prefopt.use_backend(backend):
        sums = prefopt.sequence_logps(values, mask)
        packed = prefopt.sequence_logps(values.reshape(-1), cu_seqlens=cu)
        means = prefopt.sequence_logps(values, mask, average=True)
    exact = (values.double() * mask).sum(-1)
    exact_packed = values.double().sum(-1)
    exact_mean = exact / mask.sum(-1)
    # Cancellation (a sum of per-token differences): two large terms of opposite sign around many small ones.
    # Even a blocked float32 accumulator (the Triton kernel's lanes) loses the small terms next to the large one.
    mixed = (-1e-3 * torch.rand(1, n, generator=gen, dtype=torch.float64)).float()
    mixed[0, 0], mixed[0, -1] = 1e4, -1e4
    with prefopt.use_backend(backend):
        mixed_sum = prefopt.sequence_logps(mixed, torch.ones_like(mixed))
    assert sums.dtype == packed.dtype == mixed_sum.dtype == torch.float32
    for got, want in ((sums, exact), (packed, exact_packed), (means, exact_mean), (mixed_sum, mixed.double().sum(-1))):
        for g, w in zip(got.tolist(), want.tolist()):
            assert abs(g - w) <= _float32_spacing(w), (g, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_weights", [False, True])
def test_sequence_logps_masked_nonfinite_are_excluded(backend, as_weights):
    # A masked position is left out of the sum, not multiplied by 0: -inf * 0 and NaN * 0 are NaN.
    token_logps = torch.randn(2, 7, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, :2] = False
    token_logps[0, 5], token_logps[0, 6], token_logps[1, 0], token_logps[1, 1] = (float("-inf"), float("nan"),
                                                                                  float("nan"), float("-inf"))
    token_logps.requires_grad_(True)
    weights = mask.double() if as_weights else mask
    clean = torch.where(mask, token_logps.detach(), 0.0)
    for average in (False, True):
        for dtype in (torch.float64, torch.float32):
            values = token_logps.to(dtype)
            with prefopt.use_backend(backend):
                got = prefopt.sequence_logps(values, weights, average=average)
                packed = prefopt.sequence_logps(values.reshape(-1), weights.reshape(-1),
                                                cu_seqlens=torch.tensor([0, 7, 14]), average=average)
            (grad,) = torch.autograd.grad(got.sum(), token_logps)
            want = sequence_logps_ref(clean.to(dtype), mask, average=average)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(packed, want)
            assert torch.all(torch.isfinite(grad)) and torch.all(grad[~mask] == 0)
