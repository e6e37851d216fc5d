"""The CPU head's logits-tile cache: identical results at any budget, fewer GEMMs, bounded memory, clear errors."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import prefopt
from prefopt.cpu import chunked
from prefopt.fused import fused_linear_preference_loss
from tests._backends import CPU_BACKENDS

N, H, V = 24, 8, 37
ROWS = 8  # chunk_size: 3 row blocks


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 rows x 8 columns, so V=37 spans 5 vocabulary blocks (one of them ragged)."""
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 64)
    monkeypatch.delenv(chunked.CACHE_ENV, raising=False)
    return (N // ROWS) * -(-V // (64 // ROWS))  # number of tiles: 3 x 5


class _CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _inputs(dtype, with_bias=True):
    hidden = torch.randn(N, H, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, dtype=dtype, requires_grad=True)
    bias = torch.randn(V, dtype=dtype, requires_grad=True) if with_bias else None
    labels = torch.randint(0, V, (N,))
    labels[3] = -100
    return hidden, weight, bias, labels


def _run(backend, cache_mb, hidden, weight, bias, labels, **kw):
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    with prefopt.use_backend(backend):
        logp, entropy = prefopt.linear_logprobs(hidden, weight, labels, bias, chunk_size=ROWS, logits_cache_mb=cache_mb,
                                                return_entropy=True, **kw)
        ((logp * torch.linspace(-1, 2, N)).sum() + 0.3 * entropy.sum()).backward()
    return [logp.detach(), entropy.detach()] + [t.grad.clone() for t in (hidden, weight, bias) if t is not None]


MIB_PER_TILE_FP64 = 8 * 8 * 8 / (1 << 20)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", [{}, {"softcap": 3.0, "temperature": 0.7, "logit_scale": 1.3}])
def test_any_budget_gives_bitwise_identical_values_and_grads(small_tiles, backend, dtype, transform):
    inputs = _inputs(dtype)
    baseline = _run(backend, 0, *inputs, **transform)
    for cache_mb in (MIB_PER_TILE_FP64 * 4, 1024):  # part of the tiles kept, then all of them
        got = _run(backend, cache_mb, *inputs, **transform)
        for a, b in zip(baseline, got):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kept_tiles_skip_their_recompute_gemm(small_tiles, backend):
    n_tiles = small_tiles
    hidden, weight, bias, labels = _inputs(torch.float64)
    labels[3] = 0  # every row live: 3 full row blocks

    def backward_gemms(cache_mb):
        with prefopt.use_backend(backend):
            logp = prefopt.linear_logprobs(hidden, weight, labels, bias, chunk_size=ROWS, logits_cache_mb=cache_mb)
        with _CountGemms() as counter:
            logp.sum().backward()
        return counter.count

    # Per tile: recompute + grad_hidden + grad_weight GEMMs, minus the recompute of each kept tile.
    assert backward_gemms(0) == 3 * n_tiles
    assert backward_gemms(1024) == 2 * n_tiles
    assert backward_gemms(MIB_PER_TILE_FP64 * 4) == 3 * n_tiles - 4
    assert backward_gemms(None) == 2 * n_tiles  # the CPU default (256 MiB) holds these small tiles


def test_nothing_is_kept_without_grad_and_the_budget_bounds_what_is(small_tiles, monkeypatch):
    made = []

    class Recording(chunked.TileCache):
        def __init__(self, budget):
            super().__init__(budget)
            self.peak = 0
            made.append(self)

        def offer(self, key, tile):
            kept = super().offer(key, tile)
            self.peak = max(self.peak, self.used_bytes)
            return kept

    monkeypatch.setattr(chunked, "TileCache", Recording)
    hidden, weight, bias, labels = _inputs(torch.float64)
    with prefopt.use_backend("torch"):
        with torch.no_grad():
            prefopt.linear_logprobs(hidden, weight, labels, bias, chunk_size=ROWS, logits_cache_mb=1024)
        assert made == []
        budget_mb = MIB_PER_TILE_FP64 * 2.5
        logp = prefopt.linear_logprobs(hidden, weight, labels, bias, chunk_size=ROWS, logits_cache_mb=budget_mb)
    (cache,) = made
    assert cache.peak == 2 * 8 * 8 * 8  # two whole fp64 tiles fit in 2.5 tiles' budget
    logp.sum().backward()
    assert cache.tiles == {} and cache.used_bytes == 0  # the backward consumed what it used


def test_second_backward_recomputes_consumed_tiles(small_tiles):
    hidden, weight, bias, labels = _inputs(torch.float64)
    with prefopt.use_backend("torch"):
        logp = prefopt.linear_logprobs(hidden, weight, labels, bias, chunk_size=ROWS, logits_cache_mb=1024)
    logp.sum().backward(retain_graph=True)
    first = weight.grad.clone()
    weight.grad = None
    logp.sum().backward()
    assert torch.equal(first, weight.grad)


def test_fused_loss_passes_the_budget_to_the_policy_head(small_tiles):
    hidden, weight, _, labels = _inputs(torch.float64, with_bias=False)
    ref_hidden = torch.randn(N, H, dtype=torch.float64)
    ref_weight = torch.randn(V, H, dtype=torch.float64)
    hidden3, ref3, labels3 = hidden.view(4, 6, H), ref_hidden.view(4, 6, H), labels.view(4, 6)
    counts = []
    for cache_mb in (0, 1024):
        hidden.grad = weight.grad = None
        with prefopt.use_backend("torch"):
            loss, _ = fused_linear_preference_loss(hidden3, weight, labels3, ref_hidden=ref3, ref_weight=ref_weight,
                                                   chunk_size=ROWS, logits_cache_mb=cache_mb)
        with _CountGemms() as counter:
            loss.backward()
        counts.append((counter.count, loss.detach(), weight.grad.clone()))
    (gemms_off, loss_off, grad_off), (gemms_on, loss_on, grad_on) = counts
    assert gemms_on < gemms_off
    assert torch.equal(loss_off, loss_on) and torch.equal(grad_off, grad_on)


def test_budget_defaults_and_environment(monkeypatch):
    monkeypatch.delenv(chunked.CACHE_ENV, raising=False)
    assert chunked.cache_budget_bytes(None, "cpu") == chunked.DEFAULT_CPU_CACHE_MB << 20
    assert chunked.cache_budget_bytes(None, "cuda") == 0  # GPU memory is kept for the model unless asked
    assert chunked.cache_budget_bytes(1.5, "cuda") == 3 << 19
    monkeypatch.setenv(chunked.CACHE_ENV, "0")
    assert chunked.cache_budget_bytes(None, "cpu") == 0
    assert chunked.ChunkedHead.tile_cache(None, "cpu") is None
    monkeypatch.setenv(chunked.CACHE_ENV, "64")
    assert chunked.cache_budget_bytes(None, "cuda") == 64 << 20
    assert chunked.cache_budget_bytes(0, "cpu") == 0  # the argument wins over the environment


@pytest.mark.parametrize("env, arg, error, match", [
    ("lots", None, ValueError, "PREFOPT_LOGITS_CACHE_MB must be a number"),
    ("-1", None, ValueError, "finite number of MiB >= 0"),
    (None, -3, ValueError, "finite number of MiB >= 0"),
    (None, float("nan"), ValueError, "finite number of MiB >= 0"),
    (None, float("inf"), ValueError, "finite number of MiB >= 0"),
    (None, True, TypeError, "logits_cache_mb must be None or a number"),
    (None, "256", TypeError, "logits_cache_mb must be None or a number"),
])
def test_bad_budget_is_a_clear_error_before_any_work(monkeypatch, env, arg, error, match):
    if env is None:
        monkeypatch.delenv(chunked.CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(chunked.CACHE_ENV, env)
    hidden, weight, bias, labels = _inputs(torch.float32)
    with _CountGemms() as counter, pytest.raises(error, match=match):
        prefopt.linear_logprobs(hidden, weight, labels, bias, logits_cache_mb=arg)
    assert counter.count == 0
