"""Sequence- and vocabulary-parallel heads and losses over gloo process groups == one process on the whole input.

Each test launches `torchrun --standalone` on this file (the worker half at the bottom). Every worker builds the
same global inputs, computes the one-process result on the whole input itself (no group), then its own slice:
- sp: every sequence's tokens split over the group (padded [2P, T_r, H] or packed with per-rank cu_seqlens; T and
  the packed lengths are not divisible by the world size, and some packed slices are empty);
- vp: the vocabulary rows of weight / bias / ref_weight split over the group (V not divisible by the world size);
- sp x vp: 4 ranks as a 2 x 2 grid.
It compares losses, metrics, log-probs, entropies and the gradients of hidden (its slice), weight and bias (its
rows; summed over the sequence group). Errors are max |a - b| / max |b| per tensor, and per metric
|a - b| / max(|b|, 1); the bound is 1e-5 in float32 and 1e-10 in float64, on every backend.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from prefopt.parallel import destroy_process_group, merge_vocab_shards
from tests._backends import available
from tests._torchrun import torchrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND = {"float32": 1e-5, "float64": 1e-10}


def _torchrun(nproc, mode, tmp_path, timeout=420):
    backends = [b for b in ("torch", "cpp", "triton") if available(b)]
    torchrun([__file__, mode, str(tmp_path / "report.json"), ",".join(backends)], tmp_path, nproc=nproc,
             timeout=timeout)
    with open(tmp_path / "report.json") as f:
        return json.load(f)


def _check(report):
    assert report["rows"], "no case ran"
    failures = []
    for row in report["rows"]:
        bound = BOUND[row["dtype"]]
        worst = max(v for k, v in row.items() if k.endswith("_rel"))
        if not worst < bound:
            failures.append(row)
    print(json.dumps(report["worst"], indent=1))
    assert not failures, json.dumps(failures[:5], indent=1)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_sequence_and_vocab_parallel_match_one_process(nproc, tmp_path):
    report = _torchrun(nproc, "split", tmp_path)
    # every loss, layout, backend and dtype ran, and gradients were compared
    assert {row["case"] for row in report["rows"]} >= {"sigmoid", "ipo", "simpo", "sigmoid+options", "aux",
                                                       "head", "sums"}
    assert {row["layout"] for row in report["rows"]} == {"sp", "sp_packed", "vp"}
    assert {row["backend"] for row in report["rows"]} == {b for b in ("torch", "cpp", "triton") if available(b)}
    assert all(any(k.startswith("grad_") for k in row) for row in report["rows"])
    _check(report)


@pytest.mark.slow
def test_sequence_by_vocab_grid_of_four_matches_one_process(tmp_path):
    report = _torchrun(4, "grid", tmp_path)
    assert {row["layout"] for row in report["rows"]} == {"sp_x_vp"}
    _check(report)


@pytest.mark.slow
def test_parallel_errors_are_raised_on_every_rank(tmp_path):
    report = _torchrun(2, "errors", tmp_path)
    assert len(report["errors"]) == 2, report  # what each rank saw, not rank 0's alone
    for rank, seen in enumerate(report["errors"]):
        assert seen == report["expected"], (rank, seen)


def test_merge_of_vocab_shards_is_the_whole_vocabulary_log_softmax():
    """The merge alone, without processes: shards of one row (some all -inf) == float64 log_softmax of the row."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 23, generator=gen, dtype=torch.float64) * 4
    logits[:, 5:9] = float("-inf")            # shard 1 (rows 5..8) is all -inf
    logits[2, 0] = float("-inf")              # a label at a -inf logit: logp -inf
    logits[4, :] = float("-inf")              # a row that is -inf everywhere: NaN
    logits[5, 12] = float("nan")              # a NaN in another shard than the label's: NaN
    labels = torch.tensor([3, 10, 0, 22, 7, 1])
    bounds = [(0, 5), (5, 9), (9, 16), (16, 23)]
    lse, logp, entropy, sq = [], [], [], []
    for start, stop in bounds:
        z = logits[:, start:stop]
        shard_lse = torch.logsumexp(z, 1)
        p = (z - shard_lse[:, None]).exp()
        local = (labels - start).clamp(0, stop - start - 1)
        lse.append(shard_lse)
        logp.append(z.gather(1, local[:, None]).squeeze(1) - shard_lse)
        entropy.append(-(torch.where(p == 0, 0.0, p * (z - shard_lse[:, None]))).sum(1))
        sq.append((p * p).sum(1).log())
    owner = torch.bucketize(labels, torch.tensor([stop for _, stop in bounds]), right=True)
    merged = merge_vocab_shards(torch.stack(lse), torch.stack(logp), torch.stack(entropy), torch.stack(sq), owner)
    truth = torch.log_softmax(logits, 1)
    p = truth.exp()
    want_logp = truth.gather(1, labels[:, None]).squeeze(1)
    want_entropy = -(torch.where(p == 0, 0.0, p * truth)).sum(1)
    want_sq = (p * p).sum(1).log()
    finite = torch.tensor([True, True, False, True, False, False])
    for got, want in ((merged.logp, want_logp), (merged.entropy, want_entropy), (merged.log_sum_p2, want_sq)):
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-12, atol=1e-12)
    assert merged.logp[2] == float("-inf") and torch.isfinite(merged.entropy[2])
    assert merged.lse[4] == float("-inf") and merged.logp[4].isnan() and merged.entropy[4].isnan()
    assert merged.lse[5].isnan() and merged.logp[5].isnan() and merged.entropy[5].isnan()
    assert bool((merged.logp[finite] <= 0).all())


# ---------------------------------------------------------------------------------------------------------------
# worker (run by torchrun)
# ---------------------------------------------------------------------------------------------------------------
P, T, H, V = 2, 11, 8, 29
PACKED_LENGTHS = [9, 2, 7, 4]      # chosen, chosen, rejected, rejected; 2 tokens over 3 ranks leaves a slice empty
IGNORE = -100


def _rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-300))


def _metric_rel(got, want):
    return max(float((got[k].double() - want[k].double()).abs() / max(1.0, float(want[k].double().abs())))
               for k in want)


def _inputs(dtype, packed):
    gen = torch.Generator().manual_seed(11)
    shape = (sum(PACKED_LENGTHS),) if packed else (2 * P, T)
    hidden = torch.randn(*shape, H, generator=gen, dtype=torch.float64).to(dtype)
    ref_hidden = (hidden.double() + 0.3 * torch.randn(*shape, H, generator=gen, dtype=torch.float64)).to(dtype)
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.7).to(dtype)
    bias = (torch.randn(V, generator=gen, dtype=torch.float64) * 0.2).to(dtype)
    ref_weight = (weight.double() + 0.1 * torch.randn(V, H, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, shape, generator=gen)
    if packed:
        cu = torch.tensor([0] + PACKED_LENGTHS).cumsum(0)
        for s in range(len(PACKED_LENGTHS)):
            labels[cu[s]] = IGNORE                 # a prompt token at the start of each sequence
    else:
        labels[:, :3] = IGNORE                     # prompt
        labels[1, -2:] = IGNORE                    # padding of different lengths
        labels[3, -4:] = IGNORE
        cu = None
    ref_logps = torch.randn(2 * P, generator=gen, dtype=torch.float64).to(dtype) - 8
    return dict(hidden=hidden, ref_hidden=ref_hidden, weight=weight, bias=bias, ref_weight=ref_weight, labels=labels,
                cu=cu, ref_logps=ref_logps)


class Layout:
    """This rank's place: its slice of every sequence (sp) and of the vocabulary (vp); a group of 1 is no split."""

    def __init__(self, sp_group, sp_rank, sp_world, vp_group, vp_rank, vp_world, name):
        self.sp_group, self.sp_rank, self.sp_world = sp_group, sp_rank, sp_world
        self.vp_group, self.vp_rank, self.vp_world = vp_group, vp_rank, vp_world
        self.name = name

    def vocab_rows(self):
        return torch.tensor_split(torch.arange(V), self.vp_world)[self.vp_rank]

    def token_slice(self, length):
        return torch.tensor_split(torch.arange(length), self.sp_world)[self.sp_rank]

    def tokens(self, x, cu):
        """x [2P, T, ...] -> [2P, T_r, ...]; packed x [N, ...] -> (this rank's slices concatenated, local cu)."""
        if cu is None:
            return x[:, self.token_slice(x.shape[1])], None
        parts, local_cu = [], [0]
        for s in range(cu.numel() - 1):
            idx = cu[s] + self.token_slice(int(cu[s + 1] - cu[s]))
            parts.append(x[idx])
            local_cu.append(local_cu[-1] + idx.numel())
        return torch.cat(parts), torch.tensor(local_cu)

    def split_kwargs(self):
        return dict(sequence_parallel_group=self.sp_group, vocab_parallel_group=self.vp_group)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _run_loss(layout, data, case, backend):
    """(loss, metrics or aux, grads {hidden, weight, bias}) of one case, on this rank's slice or (layout None) whole."""
    import prefopt
    hidden, labels, cu = data["hidden"], data["labels"], data["cu"]
    weight, bias, ref_weight, ref_hidden = data["weight"], data["bias"], data["ref_weight"], data["ref_hidden"]
    kwargs = {}
    if layout is not None:
        hidden, cu_local = layout.tokens(hidden, cu)
        labels, _ = layout.tokens(labels, cu)
        ref_hidden, _ = layout.tokens(ref_hidden, cu)
        cu = cu_local
        rows = layout.vocab_rows()
        weight, bias, ref_weight = weight[rows], bias[rows], ref_weight[rows]
        kwargs = {k: v for k, v in layout.split_kwargs().items() if v is not None}
    hidden, weight, bias = _leaf(hidden), _leaf(weight), _leaf(bias)
    ref = data["ref_logps"]
    if case == "sigmoid":
        kwargs.update(loss_type="sigmoid", beta=0.2, label_smoothing=0.1, ref_hidden=ref_hidden, ref_weight=ref_weight)
    elif case == "ipo":
        kwargs.update(loss_type="ipo", beta=0.3, ref_chosen_logps=ref[:P], ref_rejected_logps=ref[P:])
    elif case == "simpo":
        kwargs.update(loss_type="simpo", beta=2.0, simpo_gamma=0.4, softcap=3.0, temperature=0.8)
    elif case == "sigmoid+options":
        kwargs.update(loss_type="sigmoid", ref_chosen_logps=ref[:P], ref_rejected_logps=ref[P:], use_weighting=True,
                      ld_alpha=0.5, rpo_alpha=0.3)
    elif case == "aux":
        kwargs.update(loss_type="sigmoid", ref_chosen_logps=ref[:P], ref_rejected_logps=ref[P:],
                      average_log_prob=True, return_aux=True)
    loss, extra = prefopt.fused_linear_preference_loss(hidden, weight, labels, bias=bias, cu_seqlens=cu, **kwargs)
    loss.backward()
    return loss, extra, dict(hidden=hidden.grad, weight=weight.grad, bias=bias.grad)


def _run_head(layout, data, case, backend):
    """linear_logprobs with entropy and log sum p^2 (vp), or sequence_logps (sp): outputs and gradients."""
    import prefopt
    hidden, labels, cu, weight, bias = data["hidden"], data["labels"], data["cu"], data["weight"], data["bias"]
    if case == "head":
        # A masked vocabulary row (no label is it): the first row of the last shard, where the labels the last rank
        # does not hold point (prefopt/parallel/layout.py), so the onehot correction meets a -inf logit.
        bias = bias.clone()
        bias[data["masked_row"]] = float("-inf")
        labels = torch.where(labels == data["masked_row"], labels + 1, labels)
        if layout is not None:
            rows = layout.vocab_rows()
            weight, bias = weight[rows], bias[rows]
        hidden, weight, bias = _leaf(hidden), _leaf(weight), _leaf(bias)
        kwargs = {} if layout is None or layout.vp_group is None else dict(vocab_parallel_group=layout.vp_group)
        logp, entropy, sq = prefopt.linear_logprobs(hidden, weight, labels, bias, softcap=4.0, temperature=0.7,
                                                    return_entropy=True, return_log_sum_p2=True, **kwargs)
        (logp.sum() + 0.3 * entropy.sum()).backward()
        return (logp, entropy, sq), dict(hidden=hidden.grad, weight=weight.grad, bias=bias.grad)
    # "sums": sequence_logps with float weights, sums and means
    tokens = _leaf(torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(
        -1, labels.clamp(min=0)[..., None])[..., 0].to(hidden.dtype))
    mask = (labels != IGNORE).to(hidden.dtype) * 0.75
    group = None
    flat_tokens, flat_mask, local_cu = tokens, mask, cu
    if layout is not None:
        flat_tokens, local_cu = layout.tokens(tokens, cu)
        flat_mask, _ = layout.tokens(mask, cu)
        group = layout.sp_group
    outs = [prefopt.sequence_logps(flat_tokens, flat_mask, cu_seqlens=local_cu, average=average, group=group)
            for average in (False, True)]
    (outs[0].sum() + 2 * outs[1].sum()).backward()
    grad = tokens.grad if layout is None else layout.tokens(tokens.grad, cu)[0]
    return tuple(outs), dict(tokens=grad)


def _compare(layout, data, want, got, dtype, case, backend):
    """-> one report row of relative errors of `got` (this rank) against `want` (whole input)."""
    import torch.distributed as dist
    row = dict(case=case, backend=backend, dtype=str(dtype).split(".")[-1], layout=layout.name)
    if case in ("head", "sums"):
        (want_out, want_grads), (got_out, got_grads) = want, got
        for name, w, g in zip(("logp", "entropy", "log_sum_p2") if case == "head" else ("sums", "means"),
                              want_out, got_out):
            row[f"{name}_rel"] = _rel(g, w)
        if case == "sums":
            row["grad_tokens_rel"] = _rel(got_grads["tokens"], layout.tokens(want_grads["tokens"], data["cu"])[0])
            return row
    else:
        (want_loss, want_extra, want_grads), (got_loss, got_extra, got_grads) = want, got
        row["loss_rel"] = _rel(got_loss, want_loss)
        if case == "aux":
            row["aux_rel"] = max(_rel(g, w) for g, w in zip(got_extra, want_extra))
        else:
            row["metrics_rel"] = _metric_rel(got_extra, want_extra)
    want_hidden = layout.tokens(want_grads["hidden"], data["cu"])[0] if layout.sp_group is not None \
        else want_grads["hidden"]
    row["grad_hidden_rel"] = _rel(got_grads["hidden"], want_hidden)
    rows = layout.vocab_rows()
    for name in ("weight", "bias"):
        got_grad = got_grads[name].clone()
        if layout.sp_group is not None:
            dist.all_reduce(got_grad, group=layout.sp_group)  # each sequence slice's part of the parameter gradient
        row[f"grad_{name}_rel"] = _rel(got_grad, want_grads[name][rows])
    return row


def _cases(layout, backends, report):
    import prefopt
    sp, vp = layout.sp_group is not None, layout.vp_group is not None
    for backend in backends:
        for dtype in (torch.float32, torch.float64):
            for packed in ((False, True) if layout.name.startswith("sp") else (False,)):
                if packed != (layout.name == "sp_packed"):
                    continue
                data = _inputs(dtype, packed)
                data["masked_row"] = int(torch.tensor_split(torch.arange(V), layout.vp_world)[-1][0])
                cases = ["sigmoid", "ipo", "simpo", "sigmoid+options", "aux"]
                cases += (["head"] if vp and not sp else []) + (["sums"] if sp and not vp else [])
                for case in cases:
                    run = _run_head if case in ("head", "sums") else _run_loss
                    with prefopt.use_backend(backend):
                        want = run(None, data, case, backend)
                        got = run(layout, data, case, backend)
                    report.append(_compare(layout, data, want, got, dtype, case, backend))


def _worker(mode, out_path, backends):
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    backends = backends.split(",")
    rows = []
    if mode == "split":
        whole = dist.group.WORLD
        layouts = [Layout(whole, rank, world, None, 0, 1, "sp"), Layout(whole, rank, world, None, 0, 1, "sp_packed"),
                   Layout(None, 0, 1, whole, rank, world, "vp")]
    else:  # grid: rank = 2 * vp_rank + sp_rank; every rank creates every group, in the same order
        sp_groups = [dist.new_group([2 * v, 2 * v + 1]) for v in range(2)]
        vp_groups = [dist.new_group([s, 2 + s]) for s in range(2)]
        sp_rank, vp_rank = rank % 2, rank // 2
        layouts = [Layout(sp_groups[vp_rank], sp_rank, 2, vp_groups[sp_rank], vp_rank, 2, "sp_x_vp")]
    for layout in layouts:
        _cases(layout, backends, rows)
    # the worst error of each row over all ranks
    keys = [(row, k) for row in rows for k in row if k.endswith("_rel")]  # the same list on every rank
    errors = torch.tensor([row[k] for row, k in keys], dtype=torch.float64).nan_to_num_(nan=float("inf"))
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    for (row, k), v in zip(keys, errors.tolist()):
        row[k] = v
    worst = {}
    for row in rows:
        for k, v in row.items():
            if k.endswith("_rel"):
                key = f"{row['dtype']} {k}"
                worst[key] = max(worst.get(key, 0.0), v)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(rows=rows, worst=worst), f)


def _worker_errors(out_path, _backends):
    """Layout errors raise the same error on every rank (none hangs in a collective)."""
    import torch.distributed as dist

    import prefopt
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(5)
    hidden, labels = torch.randn(5, H, generator=gen), torch.randint(0, 10, (5,), generator=gen)
    past_the_end = labels.clone()
    past_the_end[2] = 10
    tries = {
        "vocab_start on one rank only": lambda: prefopt.linear_logprobs(
            hidden, torch.randn(5, H), labels, vocab_parallel_group=dist.group.WORLD,
            vocab_start=0 if rank == 0 else None),
        "overlapping vocab_start": lambda: prefopt.linear_logprobs(
            hidden, torch.randn(5, H), labels, vocab_parallel_group=dist.group.WORLD, vocab_start=0),
        "label past the whole vocabulary": lambda: prefopt.linear_logprobs(
            hidden, torch.randn(5, H), past_the_end, vocab_parallel_group=dist.group.WORLD),
        "empty shard": lambda: prefopt.linear_logprobs(
            hidden, torch.randn(0 if rank else 10, H), labels, vocab_parallel_group=dist.group.WORLD),
        "labels that differ between ranks": lambda: prefopt.linear_logprobs(
            hidden, torch.randn(5, H), (labels + rank) % 10, vocab_parallel_group=dist.group.WORLD),
        "group not a ProcessGroup": lambda: prefopt.sequence_logps(torch.randn(2, 3), group="world"),
        "vocab_start without group": lambda: prefopt.linear_logprobs(hidden, torch.randn(10, H), labels,
                                                                     vocab_start=0),
    }
    expected = {"vocab_start on one rank only": "on every rank", "overlapping vocab_start": "without gaps",
                "label past the whole vocabulary": "[0, 10)", "empty shard": "at least one vocabulary row",
                "labels that differ between ranks": "the same labels",
                "group not a ProcessGroup": "ProcessGroup", "vocab_start without group": "needs vocab_parallel_group"}
    seen = {}
    for name, call in tries.items():
        try:
            call()
            seen[name] = "no error"
        except (ValueError, TypeError) as err:
            seen[name] = expected[name] if expected[name] in str(err) else str(err)
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, seen)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(errors=every_rank, expected=expected), f)


if __name__ == "__main__":
    import torch.distributed as dist

    sys.path.insert(0, REPO)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        if sys.argv[1] == "errors":
            _worker_errors(*sys.argv[2:])
        else:
            _worker(*sys.argv[1:])
        dist.barrier()
    finally:
        destroy_process_group()
