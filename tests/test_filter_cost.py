"""How the CPU head runs a filtered backward tile (prefopt/cpu/chunked.py `_filtered_groups`, docs/design.md "Gradient
filtering"): the filter test in C++ against its torch twin, the choice between the whole tile, the kept columns and
each row block's kept blocks by estimated cost, the same gradients whichever runs, never more GEMM work than the exact
backward when nothing can be saved, and the cost model's filter and sort terms (prefopt/cost_model.py). Timing is the
bench's job (`python -m bench --filtering`, docs/bench.md); here the work is counted."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import prefopt
import prefopt.cpu.chunked as chunked
from prefopt import cost_model
from prefopt.cpu import rowops_torch
from prefopt.filtering import skip_counter
from tests._backends import CPU_BACKENDS, available
from tests._probes import OpCounter

FR, FC = chunked.FILTER_ROWS, chunked.FILTER_COLS


def _tile(n, v, density, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, v, generator=gen, dtype=dtype) * (torch.rand(n, v, generator=gen) < density)
    threshold = torch.rand(n, generator=gen, dtype=dtype)
    threshold[::7] = 0  # |d| <= 0: only exact zeros are negligible
    if n > 3 and v > 5:
        grad[3, 5] = float("nan")  # never negligible
    return grad, threshold


def _kept_reference(grad, threshold, br, bc):
    """The definition, whole-tile: a block is kept when one entry fails |d| <= threshold (NaN fails)."""
    n, v = grad.shape
    big = ~(grad.abs() <= threshold[:, None])
    return torch.stack([torch.stack([big[r:r + br, c:c + bc].any() for c in range(0, v, bc)])
                        for r in range(0, n, br)])


@pytest.mark.parametrize("shape", [(90, 500), (64, 128), (1, 7), (130, 1000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.002, 0.3])
def test_kept_blocks_cpp_matches_torch_and_the_definition(shape, dtype, density):
    grad, threshold = _tile(*shape, density, dtype, seed=shape[0])
    for br, bc in ((FR, FC), (32, 64), (5, 8)):
        want = _kept_reference(grad, threshold, br, bc)
        assert torch.equal(rowops_torch.kept_blocks(grad, threshold, br, bc), want)
        if available("cpp"):
            from prefopt.cpu import rowops_cpp
            assert torch.equal(rowops_cpp.kept_blocks(grad, threshold, br, bc), want)


@pytest.mark.parametrize("shape", [(90, 500), (130, 1000), (64, 2048)], ids=str)
def test_kept_blocks_zeroes_the_skipped_blocks(shape):
    """zero_skipped=True: the same mask, and every block it does not keep set to 0 (the kept ones untouched)."""
    grad, threshold = _tile(*shape, 0.5, torch.float32, seed=3)
    threshold.clamp_(min=1e-3)
    grad[:, FC:3 * FC] *= 1e-9                     # two columns of negligible blocks
    grad[(shape[0] - 1) // FR * FR:, -FC:] = 0     # and the last row block's last block
    want = grad.clone()
    kept = rowops_torch.kept_blocks(want, threshold, FR, FC, zero_skipped=True)
    assert 0 < int(kept.sum()) < kept.numel()
    expanded = kept.repeat_interleave(FR, 0)[:shape[0]].repeat_interleave(FC, 1)[:, :shape[1]]
    assert torch.equal(want[expanded].nan_to_num(), grad[expanded].nan_to_num()) and not want[~expanded].any()
    if available("cpp"):
        from prefopt.cpu import rowops_cpp
        got = grad.clone()
        assert torch.equal(rowops_cpp.kept_blocks(got, threshold, FR, FC, zero_skipped=True), kept)
        assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("shape", [(90, 500), (130, 1000)], ids=str)
def test_zero_blocks_cpp_matches_torch(shape):
    grad, _ = _tile(*shape, 0.5, torch.float32, seed=1)
    grad = grad.nan_to_num()
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(math.ceil(shape[0] / FR), math.ceil(shape[1] / FC), generator=gen) < 0.5
    want = grad.clone()
    rowops_torch.zero_blocks(want, mask, FR, FC)
    expanded = mask.repeat_interleave(FR, 0)[:shape[0]].repeat_interleave(FC, 1)[:, :shape[1]]
    assert torch.equal(want, grad.masked_fill(expanded, 0))
    if available("cpp"):
        from prefopt.cpu import rowops_cpp
        got = grad.clone()
        rowops_cpp.zero_blocks(got, mask, FR, FC)
        assert torch.equal(got, want)


def _layout(groups):
    if groups == [(slice(None), None)]:
        return "whole"
    return "columns" if groups and all(rows == slice(None) for rows, _ in groups) else "row blocks"


def test_the_layout_follows_the_cost(monkeypatch):
    """Crafted masks of a 256 x 4096 tile (4 x 32 blocks) at H=1024, both products, a copy priced at 64 multiply-adds
    (the CPU figure for one thread)."""
    monkeypatch.setattr(chunked, "filter_copy_macs", lambda *args: 64)

    def choose(kept, hidden=1024):
        groups = chunked._filtered_groups(kept, 256, 4096, hidden, 2, False)
        return _layout(groups), groups

    kept = torch.ones(4, 32, dtype=torch.bool)
    kept[1, 7] = False  # one skipped block: only the whole tile pays, its block zeroed
    assert choose(kept)[0] == "whole"
    kept = torch.zeros(4, 32, dtype=torch.bool)
    kept[:, :3] = True
    kept[0, 3] = True  # a frequency-ordered head: one range of columns, views, no copy
    layout, groups = choose(kept)
    assert layout == "columns" and groups[0][1].tolist() == [0, 1, 2, 3]
    kept = torch.zeros(4, 32, dtype=torch.bool)
    for i in range(4):
        kept[i, torch.arange(i, 32, 4)] = True  # each row block keeps a quarter, together every column
    layout, groups = choose(kept)
    assert layout == "row blocks" and len(groups) == 4
    assert all(g[0] == slice(64 * i, 64 * i + 64) and g[1].tolist() == list(range(i, 32, 4))
               for i, g in enumerate(groups))
    priced = []
    monkeypatch.setattr(chunked, "filter_copy_macs", lambda device_type, threads: priced.append(device_type) or 64)
    chunked._filtered_groups(kept, 256, 4096, 1024, 2, False, "cuda")
    assert priced == ["cuda"]  # a CUDA tile's copies are priced as the GPU's, whatever device holds the mask
    gen = torch.Generator().manual_seed(0)
    kept = torch.rand(4, 32, generator=gen) < 0.7  # dense and scattered, small H: copies cost more than they save
    assert choose(kept, hidden=16)[0] == "whole"
    assert choose(torch.zeros(4, 32, dtype=torch.bool))[1] == []  # all skipped: nothing runs


class _GemmMacs(TorchDispatchMode):
    """Multiply-adds of the mm/addmm calls made under it."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "matmul"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2]) if name == "addmm" else args[:2]
            self.macs += a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def _inputs(law, likely):
    """256 tokens x 4096 entries (one tile of 4 x 32 blocks), H=64: each token's softmax over a cluster of `likely`
    adjacent entries (bench/filtering.py `cluster_inputs`, frequency-ordered), clusters drawn by `law`."""
    from prefopt.bench.filtering import cluster_inputs
    hidden, weight, _, labels, _ = cluster_inputs(256, 64, 4096, torch.float32, likely, law, "frequency")
    return hidden, weight, labels


def _spy_layouts(monkeypatch):
    seen = []
    real = chunked._filtered_groups

    def spy(*args):
        groups = real(*args)
        seen.append(_layout(groups))
        return groups

    monkeypatch.setattr(chunked, "_filtered_groups", spy)
    return seen


# (inputs, the layout the shipped prices pick for them): 107 of 128 blocks skipped, each row block its own few;
# 113 skipped, the kept ones in the first columns
CASES = [(("zipf", 8), "row blocks"), (("zipf", 2), "columns")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("inputs, chosen", CASES, ids=[c[1] for c in CASES])
@pytest.mark.parametrize("forced", ["cheap copies", "as shipped"])
def test_every_layout_gives_the_same_gradients(backend, inputs, chosen, forced, monkeypatch):
    """The same blocks are skipped and the same gradients come out (to fp32 summation order) whichever layout runs:
    the whole tile (copies priced out of reach) against copies priced at 0 or as shipped (1 thread)."""
    hidden, weight, labels = _inputs(*inputs)
    seen = _spy_layouts(monkeypatch)
    runs = {}
    for name, price in (("whole", 10 ** 12), (forced, 0 if forced == "cheap copies" else None)):
        monkeypatch.setattr(chunked, "filter_copy_macs",
                            (lambda *a, p=price: p) if price is not None else (lambda *a: cost_model.CPU_COPY_MACS))
        seen.clear()
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        skip_counter.reset()
        with prefopt.use_backend(backend):
            prefopt.linear_logprobs(h, w, labels, filter_eps=2 ** -12, logits_cache_mb=0).mean().backward()
        runs[name] = (skip_counter.skipped, skip_counter.total, h.grad, w.grad, list(seen))
    whole, other = runs["whole"], runs[forced]
    assert whole[4] == ["whole"] and other[4] == (["row blocks"] if forced == "cheap copies" else [chosen])
    assert whole[:2] == other[:2] and 0 < whole[0] < whole[1]
    for a, b in zip(whole[2:4], other[2:4]):
        # fp32: the same kept terms summed in another blocking; 64 roundings of the largest entry as headroom
        torch.testing.assert_close(a, b, rtol=0, atol=64 * 2 ** -24 * float(a.abs().max()))


# sparse: the recompute GEMM (a third of the exact backward's work) stays, the products cover under 40% of the tile
@pytest.mark.parametrize("inputs, most", [(("uniform", 8), 1.0), (("zipf", 2), 1 / 3 + 2 / 3 * 0.4)],
                         ids=["dense", "sparse"])
def test_gemm_work_never_exceeds_the_exact_backward(inputs, most, monkeypatch):
    """Counted multiply-adds of the backward's GEMMs: a filtered backward with nothing to gain (18 of 128 blocks
    skipped, every column of blocks kept) runs the exact backward's GEMMs, one with 113 skipped far fewer."""
    hidden, weight, labels = _inputs(*inputs)
    seen = _spy_layouts(monkeypatch)
    macs = {}
    for eps in (None, 2 ** -12):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        skip_counter.reset()
        logp = prefopt.linear_logprobs(h, w, labels, filter_eps=eps, logits_cache_mb=0)
        with _GemmMacs() as count:
            logp.mean().backward()
        macs[eps] = count.macs
    assert skip_counter.skipped > 0 and seen == (["whole"] if most == 1.0 else ["columns"])
    assert macs[2 ** -12] <= most * macs[None], macs


def test_filter_ops_per_tile_match_the_head(monkeypatch):
    """prefopt/cost_model.py FILTER_OPS_PER_TILE: the aten ops filtering adds to a backward tile of the tiled head
    (row ops and the filter test counted as one launch each), with blocks skipped."""
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 64 * 128)
    monkeypatch.setattr(chunked, "TARGET_ROWS", 64)

    mode = OpCounter()
    head = chunked.ChunkedHead(mode.one_launch(rowops_torch))
    n, h, v = 128, 64, 1024
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(v, h, generator=gen)
    weight /= weight.norm(dim=1, keepdim=True)
    labels = torch.randint(0, 64, (n,), generator=gen)  # all in the first column of blocks; the others negligible
    hidden = 8 * weight[labels]
    stats = head.linear_forward(hidden, weight, None, labels, 1.0, None, 1.0, False, False)
    tiles = (n // 64) * (v // 128)
    counts = {}
    for eps in (None, 1e-2):
        mode.n = 0
        skip_counter.reset()
        with mode:
            head.linear_backward(hidden, weight, None, labels, stats.lse, None, torch.ones(n), None, 1.0, None, 1.0,
                                 filter_eps=eps)
        counts[eps] = mode.n / tiles
    assert skip_counter.skipped > 0
    assert counts[1e-2] - counts[None] == pytest.approx(cost_model.FILTER_OPS_PER_TILE, abs=3)


def test_cost_model_prices_the_filter_test_and_the_sorted_gather():
    N, H, V = 16384, 4096, 128256
    tile = chunked.tile_shape(N, V, None)
    plain = cost_model.tiled_head_costs(N, H, V, torch.bfloat16, tile)
    tested = cost_model.tiled_head_costs(N, H, V, torch.bfloat16, tile, filtered=True)
    skipping = cost_model.tiled_head_costs(N, H, V, torch.bfloat16, tile, skipped=0.9)
    sorted_ = cost_model.tiled_head_costs(N, H, V, torch.bfloat16, tile, skipped=0.9, sorted_=True)
    # the test reads every fp32 tile once more; nothing skipped saves nothing
    assert tested[1].pass_bytes == plain[1].pass_bytes + 4 * N * V and tested[1].flops == plain[1].flops
    assert tested[1].syncs == plain[1].syncs + 2 * plain[1].tiles
    # skipping 90%: the products shrink to 10%, the recompute stays
    assert skipping[1].flops == pytest.approx(2 * N * V * H * (1 + 0.1 * 2))
    # sorting: an order GEMV in the forward, weight rows gathered in both passes, the weight gradient index_add-ed
    rows = math.ceil(N / tile[0])
    assert sorted_[0].flops == skipping[0].flops + 2 * V * H
    assert sorted_[0].pass_bytes == skipping[0].pass_bytes + 2 * 2 * rows * V * H
    # fp32: the weight gradient is no longer accumulated inside the GEMM but index_add-ed (bf16 adds it apart anyway)
    fp32 = [cost_model.tiled_head_costs(N, H, V, torch.float32, tile, skipped=0.9, sorted_=s)[1] for s in (False, True)]
    assert fp32[0].accumulate_bytes == 0 and fp32[1].accumulate_bytes == pytest.approx(0.1 * rows * V * H * 12)
    fused = cost_model.head_costs(N, H, V, torch.bfloat16, (64, 256), (64, 128), skipped=0.9)
    fused_sorted = cost_model.head_costs(N, H, V, torch.bfloat16, (64, 256), (64, 128), skipped=0.9, sorted_=True)
    assert fused_sorted[1].operand_bytes == fused[1].operand_bytes + (N // 64) * math.ceil(V / 128) * 128 * 8
    assert cost_model.filter_copy_macs("cpu", 2) == 2 * cost_model.CPU_COPY_MACS
    assert 1000 < cost_model.filter_copy_macs("cuda") < 1500  # 8 bytes at 3.35 TB/s in bf16 tensor-core MACs


def test_the_sweep_bench_writes_its_table(tmp_path, capsys):
    """`python -m bench --filtering` at a tiny shape: every point of the chosen laws in both orders, the three ways
    measured, the JSON and the markdown table written (the figures themselves are docs/bench.md's, from a real run)."""
    from prefopt.bench.__main__ import main
    assert main(["--filtering", "--tokens", "64", "--hidden", "16", "--vocab", "1024", "--repeats", "2",
                 "--laws", "lm", "zipf", "--out", str(tmp_path)]) == 0
    import json
    doc = json.loads((tmp_path / "filtering.json").read_text())
    assert doc["environment"]["repeats"] == 2 and doc["environment"]["clock"] == "wall"
    rows = doc["rows"]
    assert [(r["law"], r["order"]) for r in rows] == [(law, order) for law in ("lm", "zipf", "zipf", "zipf")
                                                     for order in ("frequency", "scattered")]
    for r in rows:
        assert len(r["times"]["exact"]["backward"]) == 2
        for kind in ("filtered", "sorted"):
            k = r["kinds"][kind]
            assert k["total_blocks"] > 0 and 0 <= k["skipped_fraction"] <= 1 and k["backward_ratio"] > 0
            assert max(e["worst_ratio"] for e in k["errors"].values()) <= 1.0  # within the filter's bound
    table = (tmp_path / "filtering.md").read_text()
    assert table.count("\n| ") == 1 + len(rows) and "filtered / exact" in capsys.readouterr().out
