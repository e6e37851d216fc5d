"""Edge inputs real training code produces (issue 12), on every backend, against eager float64 log_softmax.

* masked vocabulary entries (-inf logits or -inf bias: padded vocabularies, constrained decoding): finite values
  and gradients, as eager gives; an entry of probability 0 adds 0 to the entropy (never 0 * -inf);
* rows whose float64 truth is NaN (+inf or NaN logits, or only -inf): NaN, the same on every backend; an
  ignored row gets 0 and a zero gradient whatever it holds;
* temperature far from 1 (and V = 1): a log-probability is never positive, and its gradient is as close to the
  float64 truth as eager's.
"""
import pytest
import torch

import prefopt
from prefopt.reference import linear_logprobs_ref, logprobs_from_logits_ref
from tests._backends import BACKENDS, CPU_BACKENDS

INF = float("inf")
F64 = dict(atol=1e-10, rtol=1e-10)



OPTIONS = [pytest.param(dict(), id="plain"), pytest.param(dict(temperature=0.7), id="temp"),
           pytest.param(dict(softcap=5.0), id="softcap"),
           pytest.param(dict(softcap=3.0, temperature=1.3, logit_scale=0.5), id="softcap-temp-scale")]


def _grads(fn, *tensors):
    """Outputs of fn and the gradient of a fixed random weighting of logp and entropy (log_sum_p2, when asked
    for, comes third and has no gradient). An output of -inf (a masked label) still passes its weight back."""
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(1234)
    weights = [torch.randn(o.shape, dtype=torch.float64, generator=gen) for o in outs[:2]]
    total = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    return outs, torch.autograd.grad(total, tensors, allow_unused=True)


def _close(got, want, **tol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), equal_nan=True, **tol)


# ------------------------------------------------------------------------------------- masked vocabulary entries

def _masked_logits(dtype=torch.float64):
    logits = 3 * torch.randn(5, 37, dtype=dtype)
    logits[:, 3:9] = -INF        # a masked span in every row
    logits[2, 20:] = -INF        # most of a row masked (constrained decoding)
    labels = torch.tensor([0, 12, 15, -100, 5])  # row 4's label is masked: log p = -inf, finite gradient
    return logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS)
def test_masked_logits_rowops(backend, options):
    logits, labels = _masked_logits()
    logits.requires_grad_()
    kwargs = dict(return_entropy=True, return_log_sum_p2=True, **options)
    with prefopt.use_backend(backend):
        got, (got_grad,) = _grads(lambda: prefopt.logprobs_from_logits(logits, labels, **kwargs), logits)
    want, (want_grad,) = _grads(lambda: logprobs_from_logits_ref(logits, labels, **kwargs), logits)
    assert torch.isfinite(want_grad).all() and torch.isfinite(want[1]).all()  # the truth is finite here
    _close(got + (got_grad,), want + (want_grad,), **F64)
    if not options.get("softcap"):
        assert got[0][4] == -INF


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_logits_rowops_float32(backend):
    logits, labels = _masked_logits(torch.float32)
    logits.requires_grad_()
    kwargs = dict(return_entropy=True, return_log_sum_p2=True, temperature=0.8)
    with prefopt.use_backend(backend):
        got, (got_grad,) = _grads(lambda: prefopt.logprobs_from_logits(logits, labels, **kwargs), logits)
    ref = logits.detach().double().requires_grad_()
    want, (want_grad,) = _grads(lambda: logprobs_from_logits_ref(ref, labels, **kwargs), ref)
    # fp32 math on exact inputs: |z| <= 15 here, so errors are a few ulp of 15
    _close(got + (got_grad,), want + (want_grad,), atol=2e-5, rtol=1e-5)


def _masked_head(vocab, masked, dtype=torch.float64):
    hidden = torch.randn(6, 16, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, 16, dtype=dtype) / 2).requires_grad_()
    bias = torch.randn(vocab, dtype=dtype)
    bias[masked] = -INF
    bias.requires_grad_()
    labels = torch.tensor([0, 30, 7, masked.start + 1, 2, 31])  # row 3's label is masked: log p = -inf
    return hidden, weight, bias, labels


# "span": the bias[8:24] = -inf; "padded": a padded vocabulary, whose tail fills whole vocabulary tiles
# of the Triton head (128 wide) and whole blocks of the CPU head (128 wide with the tile size set below).
HEAD_LAYOUTS = [pytest.param(40, slice(8, 24), id="span"), pytest.param(300, slice(100, None), id="padded")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab, masked", HEAD_LAYOUTS)
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[3]])
def test_masked_bias_linear_head(backend, vocab, masked, options, monkeypatch):
    import prefopt.cpu.chunked as chunked
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 3 * 128)
    monkeypatch.setattr(chunked, "TARGET_ROWS", 3)
    hidden, weight, bias, labels = _masked_head(vocab, masked)
    kwargs = dict(return_entropy=True, return_log_sum_p2=True, **options)
    inputs = (hidden, weight, bias)
    with prefopt.use_backend(backend):
        got, got_grads = _grads(lambda: prefopt.linear_logprobs(hidden, weight, labels, bias, **kwargs), *inputs)
    want, want_grads = _grads(lambda: linear_logprobs_ref(hidden, weight, labels, bias, **kwargs), *inputs)
    assert all(torch.isfinite(g).all() for g in want_grads)
    _close(got + got_grads, want + want_grads, **F64)


# ------------------------------------------------------------------------------ rows whose float64 truth is NaN

def _nonfinite_logits():
    logits = torch.randn(6, 11, dtype=torch.float64)
    logits[1, 3] = INF           # +inf: truth NaN (finite with a softcap: tanh(inf) = 1)
    logits[2, 4] = float("nan")  # NaN: truth NaN
    logits[3, :] = -INF          # only -inf: truth NaN (uniform with a softcap)
    logits[4, 6] = INF           # +inf in an ignored row: 0, zero gradient
    labels = torch.tensor([2, 1, 0, 5, -100, 10])
    return logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[1], OPTIONS[3]])
def test_nonfinite_rows_rowops(backend, options):
    logits, labels = _nonfinite_logits()
    logits.requires_grad_()
    kwargs = dict(return_entropy=True, return_log_sum_p2=True, **options)
    with prefopt.use_backend(backend):
        got, (got_grad,) = _grads(lambda: prefopt.logprobs_from_logits(logits, labels, **kwargs), logits)
    want, (want_grad,) = _grads(lambda: logprobs_from_logits_ref(logits, labels, **kwargs), logits)
    _close(got, want, **F64)  # NaN exactly where eager float64 is NaN
    assert got[0][4] == 0 and torch.all(got_grad[4] == 0)  # an ignored row is never read
    live = torch.tensor([True, True, True, True, False, True])
    _close((got_grad[live],), (want_grad[live],), **F64)
    if not options.get("softcap"):
        assert got[0][1:4].isnan().all() and got_grad[1:4].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[3]])
def test_nonfinite_rows_linear_head(backend, options):
    hidden = torch.randn(5, 8, dtype=torch.float64)
    hidden[1, 2] = INF           # logits of row 1 are +-inf: truth NaN without a softcap
    hidden[3, :] = float("nan")  # an ignored row: never read
    hidden.requires_grad_()
    weight = torch.randn(29, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(29, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([4, 9, 0, -100, 28])
    kwargs = dict(return_entropy=True, return_log_sum_p2=True, **options)
    with prefopt.use_backend(backend):
        got, got_grads = _grads(lambda: prefopt.linear_logprobs(hidden, weight, labels, bias, **kwargs),
                                hidden, weight, bias)
    # the ignored row contributes nothing: the reference sees zeros there (its gradient is then 0 too)
    ref_hidden = torch.where(labels[:, None] == -100, 0.0, hidden.detach()).requires_grad_()
    want, want_grads = _grads(lambda: linear_logprobs_ref(ref_hidden, weight, labels, bias, **kwargs),
                              ref_hidden, weight, bias)
    _close(got, want, **F64)
    # row 1's hidden holds inf: its gradient and the weight gradient are NaN or finite exactly as eager's
    _close(got_grads, want_grads, **F64)
    assert torch.all(got_grads[0][3] == 0)
    if not options.get("softcap"):
        assert got[0][1].isnan() and torch.isfinite(got[0][[0, 2, 4]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_masked_vocab_block(backend, monkeypatch):
    """A NaN weight row inside the -inf padded tail: that tail's vocabulary block (CPU head) or tile (Triton) holds
    only -inf and NaN, and must make every row NaN as eager does, not be skipped as an all -inf block."""
    import prefopt.cpu.chunked as chunked
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 3 * 128)
    monkeypatch.setattr(chunked, "TARGET_ROWS", 3)
    hidden, weight, bias, labels = _masked_head(300, slice(100, None))
    with torch.no_grad():
        weight[150] = float("nan")
    with prefopt.use_backend(backend):
        got = prefopt.linear_logprobs(hidden, weight, labels, bias, return_entropy=True)
    want = linear_logprobs_ref(hidden, weight, labels, bias, return_entropy=True)
    assert want[0].isnan().all()
    _close(got, want, **F64)


# ----------------------------------------------------------------------------------- temperature far from 1

@pytest.mark.parametrize("backend", BACKENDS)
def test_low_temperature_argmax_logp(backend):
    """T = 1e-3 makes |z| ~ 3e3; the label is the argmax, so the truth is -exp(-(gap)/T), i.e. 0 in fp32."""
    logits = torch.randn(8, 50)
    labels = logits.argmax(-1)
    logits.requires_grad_()
    with prefopt.use_backend(backend):
        got, (got_grad,) = _grads(lambda: prefopt.logprobs_from_logits(logits, labels, temperature=1e-3), logits)
    ref = logits.detach().double().requires_grad_()
    want, (want_grad,) = _grads(lambda: logprobs_from_logits_ref(ref, labels, temperature=1e-3), ref)
    eager = logits.detach().clone().requires_grad_()
    eager_out, (eager_grad,) = _grads(lambda: logprobs_from_logits_ref(eager, labels, temperature=1e-3), eager)
    assert torch.all(got[0] <= 0), "a log-probability is never positive"
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-6, rtol=0)
    # gradient error budget: eager fp32's own error plus 1e-6 of the gradient scale 1/T = 1e3. Forming z - lse
    # from differently rounded z's costs ~|z| * eps / T ~ 0.1 here, while the truth and eager's error are ~1e-9.
    budget = (eager_grad.double() - want_grad).abs().max().item() + 1e-3
    assert (got_grad.double() - want_grad).abs().max().item() <= budget


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 1e-3])
def test_single_entry_vocab(backend, temperature):
    """V = 1: p = 1 exactly, so log p = 0 and the gradient is 0 (truth and eager alike)."""
    logits = (10 * torch.randn(7, 1)).requires_grad_()
    labels = torch.zeros(7, dtype=torch.long)
    with prefopt.use_backend(backend):
        logp = prefopt.logprobs_from_logits(logits, labels, temperature=temperature)
        logp.sum().backward()
    assert torch.all(logp == 0)
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits.grad), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_temperature_linear_head(backend):
    hidden = torch.randn(6, 16)
    weight = torch.randn(40, 16)
    labels = (hidden @ weight.T).argmax(-1)
    with prefopt.use_backend(backend):
        got = prefopt.linear_logprobs(hidden, weight, labels, temperature=1e-3)
    want = linear_logprobs_ref(hidden.double(), weight.double(), labels, temperature=1e-3)
    assert torch.all(got <= 0), "a log-probability is never positive"
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
