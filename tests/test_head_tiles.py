"""Tile choice of the fused head: the per-architecture tables, the autotune candidates and their pruning
(kernels/_head_tiles.py), and the opt-in tuner (kernels/_autotune.py) run end to end under the interpreter.

Whether a tile compiles without spills is tests/test_aot_compile.py's job (it compiles the tables and every
candidate); here: which tile a launch gets, and that tuning changes nothing but the tile."""
import pytest
import torch

import prefopt
from prefopt.filtering import skip_counter
from tests._backends import ON_CUDA, available

from prefopt.kernels import _autotune, _head_tiles
from prefopt.kernels._head_tiles import Tile

needs_triton = pytest.mark.skipif(not available("triton"), reason="triton backend not available")


def test_tables_by_architecture():
    bf16, fp32 = torch.bfloat16, torch.float32
    # both run 64 x 256 forward tiles in 16-bit, sm_80 with narrower K slices (the 64-wide ones spilled there)
    assert _head_tiles.table_tile(bf16, False, 90) == Tile(64, 256, 64, 8)
    assert _head_tiles.table_tile(bf16, False, 80) == Tile(64, 256, 32, 8)
    assert _head_tiles.table_tile(bf16, True, 90) == _head_tiles.table_tile(bf16, True, 80) == Tile(64, 128, 32, 8)
    # fp32 follows torch's matmul precision: tf32 gets the wider forward on sm_90, exact fp32 does not
    with _precision("high"):
        assert _head_tiles.math_mode(fp32) == "tf32"
        assert _head_tiles.table_tile(fp32, False, 90) == Tile(64, 256, 32, 8)
    with _precision("highest"):
        assert _head_tiles.math_mode(fp32) == "ieee"
        assert _head_tiles.table_tile(fp32, False, 90) == Tile(64, 128, 32, 8)
        assert _head_tiles.table_tile(torch.float64, True, 90) == _head_tiles.table_tile(fp32, True, 90)
    # the table follows the shared memory per block: Hopper and datacenter Blackwell vs the rest
    assert [_head_tiles.table_arch(a) for a in (80, 86, 89, 90, 100, 120)] == [80, 80, 80, 90, 90, 80]
    # every table tile fits the smallest shared memory of its arch family
    for (arch, kind, mode), tile in _head_tiles.TABLES.items():
        elem = 2 if mode == "16bit" else 4
        limit = _head_tiles.SMEM_PER_BLOCK[90] if arch == 90 else _head_tiles.SMEM_PER_BLOCK[86]
        assert _head_tiles.smem_bytes(tile, elem, kind == "backward") <= limit, (arch, kind, mode, tile)
        assert _head_tiles.CANDIDATES[(arch, kind, mode)][0] == tile


def test_arch_of_tensors_off_cuda_and_assume_arch():
    cpu = torch.device("cpu")
    assert _head_tiles.device_arch(cpu) == _head_tiles.ASSUMED_ARCH == 90
    with _head_tiles.assume_arch(80):
        assert _head_tiles.device_arch(cpu) == 80
        from prefopt.kernels import linear_logprobs
        assert linear_logprobs._config(torch.bfloat16, False, _head_tiles.device_arch(cpu)) == Tile(64, 256, 32, 8)
    assert _head_tiles.device_arch(cpu) == 90


def test_candidates_are_pruned_by_shared_memory_and_problem_size(monkeypatch):
    bf16 = torch.bfloat16
    full = _head_tiles.candidates(bf16, False, 90, 16384, 128256)
    assert full == list(_head_tiles.CANDIDATES[(90, "forward", "16bit")])
    full_backward = _head_tiles.candidates(bf16, True, 90, 16384, 128256)
    # a 99 KiB part (sm_89) takes the sm_80 table; every candidate listed today fits its 101,376 B (the largest bound
    # is 98,304 B), so the shared-memory rule is exercised on a smaller limit: what exceeds it goes, the table stays
    small = _head_tiles.candidates(bf16, False, 89, 16384, 128256)
    assert small == list(_head_tiles.CANDIDATES[(80, "forward", "16bit")])
    # 20 tokens: tiles of 64 rows would run mostly masked lanes, so only 32-row ones are timed (plus the table's)
    short = _head_tiles.candidates(bf16, False, 90, 20, 128256)
    assert short[0] == _head_tiles.table_tile(bf16, False, 90)
    assert all(t.block_n <= 32 for t in short[1:]) and len(short) >= 2
    # a 100-entry vocabulary: no 256-wide tile beyond the table's
    narrow = _head_tiles.candidates(bf16, False, 90, 16384, 100)
    assert all(t.block_v <= 128 for t in narrow[1:]) and len(narrow) >= 2
    assert len(set(full)) == len(full)
    monkeypatch.setitem(_head_tiles.SMEM_PER_BLOCK, 90, 70000)
    squeezed = _head_tiles.candidates(bf16, True, 90, 16384, 128256)
    assert squeezed[0] == _head_tiles.table_tile(bf16, True, 90)  # 86,016 B: kept, it is what runs untuned
    assert all(_head_tiles.smem_bytes(t, 2, True) <= 70000 for t in squeezed[1:]) and len(squeezed) >= 2
    assert Tile(64, 128, 32, 8, 4) in full_backward and Tile(64, 128, 32, 8, 4) not in squeezed


def test_tile_setting_is_validated():
    with pytest.raises(ValueError, match="valid tile choices: table, autotune"):
        with prefopt.use_tiles("fastest"):
            pass
    assert prefopt._backend.requested_tiles() == "table"
    with prefopt.use_tiles("autotune"):
        assert prefopt._backend.requested_tiles() == "autotune"


def test_tile_environment_variable(monkeypatch):
    monkeypatch.setenv("PREFOPT_TILES", "autotune")
    assert prefopt._backend.requested_tiles() == "autotune"
    assert prefopt.backend_info()["fused head tiles"] == "autotune"
    with prefopt.use_tiles("table"):  # the context manager wins
        assert prefopt._backend.requested_tiles() == "table"
    monkeypatch.setenv("PREFOPT_TILES", "fast")
    with pytest.raises(ValueError, match="PREFOPT_TILES"):
        prefopt._backend.requested_tiles()
    assert prefopt.backend_info()["fused head tiles"].startswith("invalid: PREFOPT_TILES")


def _inputs(dtype, n=70, hidden_size=32, vocab=300, seed=0, peaked=False):
    """With `peaked`, LM-like (as tests/test_filtering.py `_peaked`): token v's logit lowered by 3 log(1 + v) and the
    labels among the first 64 tokens, so at FILTER_EPS the backward tiles of the rare tail are negligible for every
    row (8 of the 10 fp32 tiles, 2 of the 3 bf16 ones) and the tiles holding labels are not."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) / 3
    bias = (torch.randn(vocab, generator=gen) / 4).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::7] = -100
    upstream = torch.randn(2, n, generator=gen, dtype=torch.float64)
    if peaked:
        hidden[:, 0], weight[:, 0] = 1.0, -3 * torch.log1p(torch.arange(vocab, dtype=torch.float32))
        labels = torch.where(labels == -100, labels, labels % 64)
    return hidden.to(dtype), weight.to(dtype), bias, labels, upstream


FILTER_EPS = 1e-3


def _filter_bounds(hidden, weight, labels, upstream, eps):
    """docs/design.md's bound on |filtered - exact| per entry of (grad_hidden, grad_weight, grad_bias) at
    logit_scale / temperature = 1: eps G_i sum_v |W[v, k]|, eps sum_i G_i |h[i, k]|, eps sum_i G_i, with
    G_i = |g_logp_i| + |g_entropy_i| over the labelled rows."""
    g = (upstream.abs().sum(0) * (labels != -100))[:, None]
    h, w = hidden.double().abs(), weight.double().abs()
    return eps * g * w.sum(0)[None, :], eps * (g * h).sum(0)[None, :].expand(w.shape), eps * g.sum().expand(w.shape[0])


def _run(hidden, weight, bias, labels, upstream, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    with prefopt.use_backend("triton"):
        logp, ent = prefopt.linear_logprobs(leaves[0], leaves[1], labels, leaves[2], return_entropy=True, softcap=5.0,
                                            **options)
        loss = (logp.double() * upstream[0]).sum() + (ent.double() * upstream[1]).sum()
        grads = torch.autograd.grad(loss, leaves)
    return (logp.detach(), ent.detach()) + tuple(grads)


@needs_triton
@pytest.mark.skipif(ON_CUDA, reason="the tuner's interpreter path (one wall-clock launch per candidate, bitwise "
                    "replay); on a GPU the check script's heads-autotune step runs the tuner")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autotune_times_every_candidate_once_per_bucket_and_changes_nothing_else(dtype, monkeypatch):
    """Under the interpreter (the tuner's timing path is wall-clock there): the first call of a shape bucket times
    each pruned candidate of the forward and of the backward, and a second call in the same bucket times nothing.
    The backward's trial launches leave no trace: the tuned call equals, bit for bit and in its skipped-tile count
    (tiles are skipped: the count is not 0 == 0), the picked tiles launched without tuning. Every output matches the
    table tile's launch to rounding (fp32: tiles sum in another order; bf16 rounds its dlogits tile), gradients
    also to twice the filter's bound when another backward tile skips other blocks."""
    timed = []
    real_time = _autotune._time
    monkeypatch.setattr(_autotune, "_time", lambda launch, tile, device: timed.append(tile) or real_time(launch, tile,
                                                                                                           device))
    hidden, weight, bias, labels, upstream = _inputs(dtype, peaked=True)
    options = dict(filter_eps=FILTER_EPS)
    skip_counter.reset()
    table = _run(hidden, weight, bias, labels, upstream, **options)
    table_skips = (skip_counter.skipped, skip_counter.total)
    assert 0 < table_skips[0] < table_skips[1], table_skips
    _autotune.clear()
    skip_counter.reset()
    try:
        with prefopt.use_tiles("autotune"):
            tuned = _run(hidden, weight, bias, labels, upstream, **options)
            tuned_skips = (skip_counter.skipped, skip_counter.total)
            n = int((labels != -100).sum())  # the head runs the labelled rows only
            bucket = _autotune._bucket(n)
            assert bucket == 64
            expected = (_head_tiles.candidates(dtype, False, 90, bucket, 300)
                        + _head_tiles.candidates(dtype, True, 90, bucket, 300))
            assert timed == expected and len(expected) >= 4
            choices = _autotune.choices()
            assert {key[1] for key in choices} == {"forward", "backward"} and len(choices) == 2
            for tile, timings in choices.values():
                assert tile in [t for t, _ in timings]
            timed.clear()
            _run(hidden[:60], weight, bias, labels[:60], upstream[:, :60], **options)  # same bucket of rows
            assert timed == []
    finally:
        _autotune.clear()
    picked = {key[1]: tile for key, (tile, _) in choices.items()}
    table_backward = _head_tiles.table_tile(dtype, True, 90)
    # the picked tiles, launched as if the table held them: no trial launch, nothing to leave behind
    monkeypatch.setattr(_head_tiles, "table_tile", lambda dtype, backward, arch: picked["backward" if backward
                                                                                       else "forward"])
    skip_counter.reset()
    replay = _run(hidden, weight, bias, labels, upstream, **options)
    assert tuned_skips == (skip_counter.skipped, skip_counter.total) and tuned_skips[0] > 0
    assert tuned_skips[1] == -(-n // picked["backward"].block_n) * -(-300 // picked["backward"].block_v)
    for got, want in zip(tuned, replay):
        assert torch.equal(got, want)
    if picked["backward"] == table_backward:
        assert tuned_skips == table_skips
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    filtered = _filter_bounds(hidden, weight, labels, upstream, FILTER_EPS)
    for i, (got, want) in enumerate(zip(tuned, table)):
        if i < 2:  # log-probs and entropies: no filtering in the forward
            torch.testing.assert_close(got.double(), want.double(), **tol)
            continue
        bound = tol["atol"] + tol["rtol"] * want.double().abs() + 2 * filtered[i - 2]
        assert bool(((got.double() - want.double()).abs() <= bound).all()), i


@needs_triton
def test_autotune_skips_a_tile_that_does_not_launch_and_raises_on_anything_else(monkeypatch):
    from triton.runtime.errors import OutOfResources
    hidden, weight, bias, labels, upstream = _inputs(torch.float32, n=30)
    table = _head_tiles.table_tile(torch.float32, False, 90)

    def out_of_shared_memory(launch, tile, device):
        if tile == table:
            raise OutOfResources(300000, 232448, "shared memory")
        return float(tile.block_n)  # the smallest BLOCK_N wins

    monkeypatch.setattr(_autotune, "_time", out_of_shared_memory)
    _autotune.clear()
    try:
        with prefopt.use_tiles("autotune"), _precision("highest"):
            _run(hidden, weight, bias, labels, upstream)
            forward = [tile for key, (tile, _) in _autotune.choices().items() if key[1] == "forward"]
            assert forward and forward[0] != table and forward[0].block_n == 32
            _autotune.clear()
            monkeypatch.setattr(_autotune, "_time", lambda launch, tile, device: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                _run(hidden, weight, bias, labels, upstream)
    finally:
        _autotune.clear()


class _precision:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        self.old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.value)

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.old)
