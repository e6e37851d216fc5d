"""Vocabulary sorting of the fused head's backward (docs/design.md, "Vocabulary sorting") on every backend.

The head called with an order gives the gradients of the head called without one, up to float summation order
(fp32: every entry within 1e-5 of the gradient's largest entry; 6.4e-7 is the most seen), with the filter off, and on with a threshold no entry meets; filtered + sorted gradients
stay within the filtering bound of the exact ones; on an LM-like input whose vocabulary is shuffled, sorting makes the
filter skip many more blocks; bad `vocab_sort` values raise before any kernel."""
import pytest
import torch

import prefopt
from prefopt import _validation
from prefopt.filtering import skip_counter, vocab_order
from prefopt.functions import head_impl
from tests._backends import BACKENDS
from tests.test_filtering import EPS, _bounds, _grads, _peaked
from tests.test_validation import spy  # noqa: F401  (the fixture)

FP32_TOL = 1e-5  # |sorted - unsorted| <= FP32_TOL * max |unsorted| for each fp32 gradient


def _head_grads(backend, hidden, weight, bias, labels, upstream, order, filter_eps):
    """(grad_hidden, grad_weight, grad_bias | None) from the backend's head called directly (the public functions
    only sort a filtered backward), the order given to both calls as the Function does."""
    kwargs = {} if order is None else {"vocab_order": order}
    with prefopt.use_backend(backend):
        head = head_impl(hidden, weight)
        stats = head.linear_forward(hidden, weight, bias, labels, 1.5, 4.0, 0.8, True, False, None, **kwargs)
        g_logp, g_ent = (u.float() for u in upstream)
        return head.linear_backward(hidden, weight, bias, labels, stats.lse, stats.entropy, g_logp, g_ent, 1.5, 4.0,
                                    0.8, None, filter_eps, (True, True, bias is not None), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filter_eps", [None, 1e-30], ids=["exact", "filter-keeps-all"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_sorted_equals_unsorted_up_to_summation_order(backend, filter_eps, with_bias):
    hidden, weight, bias, labels, upstream = _peaked(torch.float32, with_bias)
    order = vocab_order(hidden, weight, bias, labels)
    assert not torch.equal(order, torch.arange(order.numel()))  # really permuted
    unsorted = _head_grads(backend, hidden, weight, bias, labels, upstream, None, filter_eps)
    skip_counter.reset()
    sorted_ = _head_grads(backend, hidden, weight, bias, labels, upstream, order, filter_eps)
    assert skip_counter.skipped == 0
    for name, got, want in zip(("hidden", "weight", "bias"), sorted_, unsorted):
        if want is None:
            assert got is None
            continue
        assert got.dtype == want.dtype and got.shape == want.shape
        # seen: at most 6.4e-7 of the largest entry on every backend (the sorted CPU forward's lse is rounded in
        # another order too); allowed: FP32_TOL of it, about 170 roundings of fp32
        error = (got - want).abs().max().item() / want.abs().max().item()
        assert 0 < error <= FP32_TOL or torch.equal(got, want), f"grad_{name}: {error:.3g} of its largest entry"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_filtered_sorted_gradients_within_the_bound(backend, dtype):
    hidden, weight, bias, labels, upstream = _peaked(dtype, with_bias=True)
    exact = _grads(backend, hidden, weight, bias, labels, upstream, True)
    skip_counter.reset()
    got = _grads(backend, hidden, weight, bias, labels, upstream, True, filter_eps=EPS, vocab_sort=True)
    assert 0 < skip_counter.skipped < skip_counter.total
    bounds, _ = _bounds(hidden, weight, bias, labels, upstream, True, EPS)  # the filter's own bound
    for name, g, want, bound in zip(("hidden", "weight", "bias"), got, exact, bounds):
        assert g.dtype == want.dtype
        worst = ((g.double() - want.double()).abs() / bound).max().item()
        assert worst <= 1.0, f"grad_{name}: {worst:.3g} x the bound"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
def test_sorted_results_do_not_depend_on_the_cache_budget(backend):
    """The CPU head's sorted forward keeps its tiles in the backward's order: with or without the cache (and with a
    budget that holds only some tiles), the same bits."""
    hidden, weight, bias, labels, upstream = _peaked(torch.float32, with_bias=True)
    runs = [_grads(backend, hidden, weight, bias, labels, upstream, True, filter_eps=EPS, vocab_sort=True,
                   logits_cache_mb=mb, chunk_size=32) for mb in (0, 0.07, 64)]
    for got in runs[1:]:
        assert all(torch.equal(g, e) for g, e in zip(got, runs[0]))


def _shuffled_lm(n=128, hidden_size=32, vocab=2048, seed=0):
    """LM-like head inputs (a frequency prior in weight[:, 0], labels among the 64 most frequent tokens, hidden
    states pointing at their label) with the vocabulary then shuffled: the frequent tokens and the labels are
    scattered over every block of columns, so without sorting almost no column of blocks is all negligible."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden_size, generator=gen) / 2
    weight[:, 0] = -3 * torch.log1p(torch.arange(vocab, dtype=torch.float32))
    labels = torch.randint(0, 64, (n,), generator=gen)
    hidden = 0.3 * torch.randn(n, hidden_size, generator=gen)
    hidden[:, 0] = 1
    direction = weight[labels, 1:]
    hidden[:, 1:] += 3 * direction / direction.norm(dim=1, keepdim=True)
    perm = torch.randperm(vocab, generator=gen)
    return hidden, weight[perm], torch.argsort(perm)[labels]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sorting_skips_more_blocks_on_a_shuffled_vocabulary(backend):
    hidden, weight, labels = _shuffled_lm()
    fractions = {}
    for sort in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        skip_counter.reset()
        with prefopt.use_backend(backend):
            prefopt.linear_logprobs(h, w, labels, filter_eps=EPS, vocab_sort=sort).sum().backward()
        fractions[sort] = skip_counter.fraction()
    # a large gap, not float noise: the 64 label entries scattered over 2048 columns keep nearly every column of
    # blocks without sorting; sorted, they and the likely entries fill the first blocks
    assert fractions[True] >= fractions[False] + 0.3 and fractions[True] > 0.6, fractions


def test_settle_vocab_sort():
    settle = _validation.settle_vocab_sort
    assert settle(False, 1e-3, 1e-3) is False
    assert settle(True, 1e-3, 1e-3) is True
    assert settle("auto", 1e-3, 1e-3) is True
    assert settle("auto", None, None) is False
    assert settle(True, "auto", None) is False  # "auto" on fp32: no filtering, nothing to sort for


def test_vocab_sort_reaches_the_head_settled(monkeypatch):
    """True / "auto" with filtering on and a backward coming -> the head gets an order; no backward -> none."""
    seen = []
    from prefopt import functions
    real = functions.vocab_order_kwargs
    monkeypatch.setattr(functions, "vocab_order_kwargs", lambda params, *a: seen.append(params.vocab_sort) or
                        real(params, *a))
    hidden, weight, labels = _shuffled_lm(n=8, vocab=300)
    h = hidden.requires_grad_()
    prefopt.linear_logprobs(h, weight, labels, filter_eps=EPS, vocab_sort="auto")
    prefopt.linear_logprobs(h, weight, labels, filter_eps=EPS)
    prefopt.linear_logprobs(h.bfloat16(), weight.bfloat16(), labels, filter_eps="auto", vocab_sort=True)
    with torch.no_grad():
        prefopt.linear_logprobs(h, weight, labels, filter_eps=EPS, vocab_sort=True)
    assert seen == [True, False, True, False]


SORT_ERRORS = [
    ("word", dict(filter_eps=EPS, vocab_sort="yes"), ValueError, "vocab_sort must be False, True or 'auto'"),
    ("int", dict(filter_eps=EPS, vocab_sort=1), TypeError, "vocab_sort must be False, True or 'auto', got 1"),
    ("none", dict(filter_eps=EPS, vocab_sort=None), TypeError, "vocab_sort must be False, True or 'auto'"),
    ("no-filter", dict(vocab_sort=True), ValueError, "vocab_sort=True .* needs filter_eps"),
    ("filter-zero", dict(filter_eps=0, vocab_sort=True), ValueError, "needs filter_eps .* got filter_eps=0"),
]


@pytest.mark.parametrize("case, options, error, message", SORT_ERRORS, ids=[c[0] for c in SORT_ERRORS])
@pytest.mark.parametrize("entry", ["linear_logprobs", "fused_loss"])
def test_bad_vocab_sort_raises_before_any_kernel(spy, entry, case, options, error, message):  # noqa: F811
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 11, (4, 5), generator=gen)
    with pytest.raises(error, match=message):
        if entry == "linear_logprobs":
            prefopt.linear_logprobs(hidden, weight, labels, **options)
        else:
            prefopt.fused_linear_dpo_loss(hidden, weight, labels, ref_hidden=hidden.detach(),
                                          ref_weight=weight.detach(), **options)
    assert spy.calls == []
