"""Context parallelism (one sequence's tokens over 2 or 3 gloo processes) == one process on the same global batch.

Each test launches `torchrun --standalone` on this file (the worker half at the bottom). Every worker builds the same
global inputs, computes the one-process result on the whole batch itself (no group), then its own share through the
context-parallel path, and compares:
- attention alone (prefopt/parallel/attention.py) against SDPA on the whole sequences: outputs and the query / key /
  value gradients of its tokens, for padded rows (right padding, left padding with a hole), packed rows of uneven
  lengths (some slices empty at 3 ranks), grouped KV heads, the contiguous and the balanced layout;
- a tiny Llama through the HF integration (prefopt/integrations/context_parallel.py): per-sequence log-probs, the
  fused DPO loss and its metrics (`sequence_parallel_group`), and every parameter gradient summed over the group,
  padded and padding-free, uneven lengths.
Errors are max |a - b| / max |b| per tensor (metrics: |a - b| / max(|b|, 1)); bounds 1e-5 in float32 and 1e-10 in
float64 (the one-process run itself differs from float64 truth by ~1e-7 relative in float32: the split changes the
summation order of the attention and of the sums, nothing else).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from tests._torchrun import torchrun

BOUND = {"float32": 1e-5, "float64": 1e-10}


def _run(nproc, mode, tmp_path, timeout=300):
    torchrun([__file__, mode, str(tmp_path / "report.json")], tmp_path, nproc=nproc, timeout=timeout)
    with open(tmp_path / "report.json") as f:
        return json.load(f)


def _check(report):
    assert report["rows"], "no case ran"
    bad = [row for row in report["rows"] if not max(v for k, v in row.items() if k.endswith("_rel"))
           < BOUND[row["dtype"]]]
    print(json.dumps(report["worst"], indent=1))
    assert not bad, json.dumps(bad[:5], indent=1)


@pytest.mark.parametrize("nproc", [2, 3])
def test_split_attention_and_model_match_one_process(nproc, tmp_path):
    report = _run(nproc, "split", tmp_path)
    cases = {(row["what"], row["layout"]) for row in report["rows"]}
    assert cases >= {("attention", "padded"), ("attention", "padded_holes"), ("attention", "packed"),
                     ("model", "padded"), ("model", "packed")}
    assert {row["balanced"] for row in report["rows"]} == {False, True}
    assert {row["dtype"] for row in report["rows"]} == {"float32", "float64"}
    model_rows = [row for row in report["rows"] if row["what"] == "model"]
    assert all(row["grads"] >= 10 for row in model_rows)  # every parameter of the tiny Llama
    _check(report)


# ---------------------------------------------------------------------------------------------------------------
# worker (run by torchrun)
# ---------------------------------------------------------------------------------------------------------------
def _rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-300))


def _dense_mask(segments):
    """[B, T, T] bool: same segment, causal, real tokens (the one-process truth may materialise it: tiny T)."""
    seg = segments
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    return same & torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool).tril()


def _attention_case(split_fn, segments, dtype, group, heads=4, kv_heads=2, dim=8):
    from prefopt.parallel.attention import context_attention
    B, T = segments.shape
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, heads, T, dim, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, kv_heads, T, dim, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, kv_heads, T, dim, generator=gen, dtype=torch.float64).to(dtype)
    weights = torch.randn(B, heads, T, dim, generator=gen, dtype=torch.float64).to(dtype)
    real = segments >= 0
    leaf = [t.clone().requires_grad_(True) for t in (q, k, v)]
    mask = _dense_mask(segments)
    mask = mask | ~real[:, :, None] & torch.eye(T, dtype=torch.bool)  # padding rows see themselves (no NaN)
    full = torch.nn.functional.scaled_dot_product_attention(*leaf, attn_mask=mask[:, None], scale=0.37,
                                                            enable_gqa=True)
    full = full * real[:, None, :, None]
    (full * weights).sum().backward()
    split = split_fn()
    local = [split.shard(t, dim=2).detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = context_attention(*local, split, scale=0.37)
    (out * split.shard(weights, dim=2)).sum().backward()
    errs = {"out_rel": _rel(out, split.shard(full, dim=2))}
    for name, mine, whole in zip("qkv", local, leaf):
        errs[f"grad_{name}_rel"] = _rel(mine.grad, split.shard(whole.grad, dim=2))
    return errs


def _attention_rows(group, rows):
    from prefopt.parallel.context import split_packed, split_padded
    B, T = 3, 13
    lengths = torch.tensor([13, 9, 4])
    right = (torch.arange(T)[None] < lengths[:, None])
    holes = right.clone()
    holes[1, :3] = False                       # left padding
    holes[2, 1] = False                        # a hole inside a row (prefopt_sdpa supports it too)
    holes[2, 4:9] = True
    packed_lengths = [11, 2, 7, 5, 1]          # 2 and 1 tokens over 3 ranks leave slices empty
    cu = torch.tensor([0] + packed_lengths).cumsum(0)
    packed_segments = torch.repeat_interleave(torch.arange(len(packed_lengths)), torch.tensor(packed_lengths))[None]
    for dtype in (torch.float32, torch.float64):
        for balanced in (False, True):
            cases = {
                "padded": (lambda m=right: split_padded(group, m.long(), balanced=balanced),
                           torch.where(right, 0, -1)),
                "padded_holes": (lambda m=holes: split_padded(group, m.long(), balanced=balanced),
                                 torch.where(holes, 0, -1)),
                "packed": (lambda: split_packed(group, cu, balanced=balanced), packed_segments),
            }
            for layout, (make, segments) in cases.items():
                errs = _attention_case(make, segments, dtype, group)
                rows.append({"what": "attention", "layout": layout, "balanced": balanced,
                             "dtype": str(dtype).split(".")[-1], **errs})


def _model_rows(group, rows):
    """A tiny Llama (grouped KV heads): logps, fused loss, metrics, every parameter gradient."""
    import prefopt
    from prefopt.integrations import context_parallel as cp
    from prefopt.integrations.tiny import tiny_llama_config, tiny_model
    from prefopt.integrations.transformers import sequence_logps, shift_labels

    V, P = 61, 2
    lengths = [17, 12, 9, 14]                  # chosen, chosen, rejected, rejected: uneven, none divisible by 2 or 3
    prompt = 4
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(4, V, (n,), generator=gen) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(2 * P, T, dtype=torch.long)
    mask = torch.zeros(2 * P, T, dtype=torch.long)
    comp = torch.zeros(2 * P, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)], comp[i, prompt:len(s)] = s, 1, 1
    packed_ids = torch.cat(seqs)[None]
    packed_pos = torch.cat([torch.arange(n) for n in lengths])[None]
    packed_comp = torch.cat([(torch.arange(n) >= prompt).long() for n in lengths])[None]
    ref = torch.tensor([-31.0, -22.5, -19.0, -27.25], dtype=torch.float64)   # precomputed reference sums
    for dtype in (torch.float32, torch.float64):
        base = tiny_model(tiny_llama_config(V, hidden_size=32, layers=2, heads=4, num_key_value_heads=2), seed=3,
                          dtype=dtype, attn_implementation="sdpa")
        for layout in ("padded", "packed"):
            for balanced in (False, True):
                if layout == "packed":
                    inputs = dict(input_ids=packed_ids, attention_mask=None, completion_mask=packed_comp,
                                  position_ids=packed_pos)
                else:
                    inputs = dict(input_ids=ids, attention_mask=mask, completion_mask=comp, position_ids=None)

                def loss_of(model, logps_fn, **kw):
                    logps, lengths_ = logps_fn(model, inputs["input_ids"], inputs["attention_mask"],
                                               inputs["completion_mask"], position_ids=inputs["position_ids"], **kw)
                    loss, metrics = prefopt.preference_loss(logps[:P], logps[P:], ref[:P].to(logps.dtype),
                                                            ref[P:].to(logps.dtype), beta=0.1)
                    return logps, lengths_, loss, metrics

                import copy
                one = copy.deepcopy(base)
                logps1, len1, loss1, met1 = loss_of(one, sequence_logps)
                loss1.backward()
                split_model = copy.deepcopy(base)
                logps2, len2, loss2, met2 = loss_of(split_model, cp.sequence_logps, group=group, balanced=balanced)
                loss2.backward()
                grads = dict(split_model.named_parameters())
                worst, compared = 0.0, 0
                for name, p in one.named_parameters():
                    g = grads[name].grad.detach().clone()
                    torch.distributed.all_reduce(g, group=group)     # partial gradients: summed over the group
                    worst = max(worst, _rel(g, p.grad))
                    compared += 1
                met_rel = max(float((met2[k].double() - met1[k].double()).abs() / max(1.0, abs(float(met1[k]))))
                              for k in met1)
                rows.append({"what": "model", "layout": layout, "balanced": balanced,
                             "dtype": str(dtype).split(".")[-1], "logps_rel": _rel(logps2, logps1),
                             "loss_rel": _rel(loss2, loss1), "metrics_rel": met_rel, "grad_rel": worst,
                             "grads": compared, "lengths_equal": bool(torch.equal(len1, len2))})
                assert torch.equal(len1, len2)
    del shift_labels


def _worker(mode, out):
    import torch.distributed as dist
    from prefopt.parallel import destroy_process_group
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    group = dist.new_group(list(range(dist.get_world_size())))
    rows = []
    try:
        if mode == "split":
            _attention_rows(group, rows)
            _model_rows(group, rows)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, rows)        # each rank checked its own tokens: report the worst rank
        rows = [{k: max(r[k] for r in same) if k.endswith("_rel") else v for k, v in same[0].items()}
                for same in zip(*every)]
        worst = {}
        for row in rows:
            key = f"{row['what']}/{row['dtype']}"
            worst[key] = max(worst.get(key, 0.0), max(v for k, v in row.items() if k.endswith("_rel")))
        if dist.get_rank() == 0:
            with open(out, "w") as f:
                json.dump({"rows": rows, "worst": worst}, f)
    finally:
        destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
