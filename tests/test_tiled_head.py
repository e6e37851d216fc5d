"""The tiled GPU head: prefopt/cpu/chunked.py's ChunkedHead driven by the Triton row ops (kernels/logprobs.py), as
the triton backend runs it under PREFOPT_HEAD=tiles, on CPU tensors through the interpreter; and the head choice
(prefopt/_backend.py: PREFOPT_HEAD / use_head / head_choice, the rule in prefopt/cost_model.py `choose_head`).

What the head asks of the row ops is exercised with several vocabulary blocks per row: labels clamped into each
block with an ignore_index no label has, `out=` aliasing the owned fp32 tile, the online merge across blocks, the
logits-tile cache and gradient filtering's `filter_eps`. Values and gradients are checked against the torch
reference (fp64 at 1e-10, fp32 at 1e-5) and against the same head on the torch row ops; bf16 against an fp32 truth
with the error budget of an eager bf16 run."""
import pytest
import torch

import prefopt
import prefopt.cpu.chunked as chunked
from prefopt import _backend
from prefopt.filtering import skip_counter
from prefopt.reference import linear_logprobs_ref, logprobs_from_logits_ref
from tests._backends import ON_CUDA, available

pytestmark = pytest.mark.skipif(not available("triton"), reason="triton backend not available (interpreter)")

N, H, V = 14, 16, 99  # 14 tokens x 99 entries: ragged against the tiles below


@pytest.fixture
def blocks(monkeypatch):
    """Tiles of 5 rows x 8 columns: 3 row blocks x 13 vocabulary blocks, the last ones ragged."""
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 40)
    monkeypatch.setattr(chunked, "TARGET_ROWS", 5)
    assert chunked.tile_shape(N, V, None) == (5, 8)


def _labels(seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[:4] = torch.tensor([0, V - 1, 8, 7])  # first and last entry, both sides of a block edge
    labels[5] = -100
    return labels


def _run(head, hidden, weight, bias, labels, backend="triton", upstream_seed=1, **kwargs):
    """(logp, entropy, grad_hidden, grad_weight, grad_bias | None) of sum(g * logp) + sum(e * entropy)."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    gen = torch.Generator().manual_seed(upstream_seed)
    g, e = torch.randn(2, N, generator=gen, dtype=torch.float64)
    with prefopt.use_backend(backend), prefopt.use_head(head):
        logp, entropy = prefopt.linear_logprobs(leaves[0], leaves[1], labels, leaves[2] if bias is not None else None,
                                                return_entropy=True, **kwargs)
        loss = (logp.double() * g).sum() + (entropy.double() * e).sum()
        grads = torch.autograd.grad(loss, leaves)
    return (logp.detach(), entropy.detach()) + tuple(grads) + ((None,) if bias is None else ())


def _reference(hidden, weight, bias, labels, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    gen = torch.Generator().manual_seed(1)
    g, e = torch.randn(2, N, generator=gen, dtype=torch.float64)
    logp, entropy = linear_logprobs_ref(leaves[0], leaves[1], labels, leaves[2] if bias is not None else None,
                                        return_entropy=True, **options)
    grads = torch.autograd.grad((logp.double() * g).sum() + (entropy.double() * e).sum(), leaves)
    return (logp.detach(), entropy.detach()) + tuple(grads) + ((None,) if bias is None else ())


def _inputs(dtype, with_bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = 2 * torch.randn(N, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    bias = torch.randn(V, generator=gen, dtype=torch.float64) if with_bias else None
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


OPTIONS = [dict(), dict(temperature=0.8, softcap=4.0), dict(logit_scale=0.25, bias=True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "softcap-temperature", "scale-bias"])
def test_tiles_on_triton_row_ops_match_the_reference(blocks, dtype, options):
    """fp64: 1e-10 against the reference. fp32: against the fp64 truth, no further off than the same head on the
    torch row ops (the CPU path) plus 1e-6 of the truth's scale, and within 1e-3 of that scale in any case. (The head
    merges its 13 vocabulary blocks in float64 with the mixture-entropy rule; before that, subtracting E_p[z] from lse
    left its fp32 entropy ~10 ulps of |lse| off: 4.3e-5 at |lse| ~ 35.)"""
    options = dict(options)
    hidden, weight, bias = _inputs(dtype, options.pop("bias", False))
    labels = _labels()
    got = _run("tiles", hidden, weight, bias, labels, **options)
    if dtype == torch.float64:
        want = _reference(hidden, weight, bias, labels, **options)
    else:
        want = _reference(hidden.double(), weight.double(), None if bias is None else bias.double(), labels, **options)
        cpu = _run("tiles", hidden, weight, bias, labels, backend="torch", **options)
    for i, (name, g, w) in enumerate(zip(("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"), got, want)):
        if w is None:
            assert g is None
            continue
        assert g.dtype == (dtype if name.startswith("grad") or dtype == torch.float64 else torch.float32), name
        if dtype == torch.float64:
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, msg=name)
            continue
        scale = w.abs().max().item()
        err = (g.double() - w).abs().max().item()
        cpu_err = (cpu[i].double() - w).abs().max().item()
        assert err <= 2 * cpu_err + 1e-6 * scale and err <= 1e-3 * scale, (name, err, cpu_err, scale)
    assert torch.all(got[0][labels == -100] == 0)


def test_tiles_on_triton_row_ops_equal_the_cpu_row_ops_and_the_fused_kernel(blocks):
    """The same head on the torch row ops (the CPU path) and the fused Triton kernel agree in float64."""
    hidden, weight, bias = _inputs(torch.float64, True)
    labels = _labels()
    tiles = _run("tiles", hidden, weight, bias, labels, softcap=3.0)
    cpu = _run("tiles", hidden, weight, bias, labels, backend="torch", softcap=3.0)
    fused = _run("fused", hidden, weight, bias, labels, softcap=3.0)
    for a, b, c in zip(tiles, cpu, fused):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-10)


def test_masked_vocabulary_entries(blocks):
    """A -inf bias (padded vocabulary) on a whole vocabulary block and on single entries: probability 0, finite
    values and gradients; an all -inf block is the identity of the merge."""
    hidden, weight, bias = _inputs(torch.float64, True)
    bias[16:24] = float("-inf")  # one whole block of 8
    bias[50] = float("-inf")
    labels = _labels()
    labels[6] = 50  # a masked label: log-prob -inf, finite gradient
    got = _run("tiles", hidden, weight, bias, labels)
    want = _reference(hidden, weight, bias, labels)
    assert got[0][6] == float("-inf")
    finite = torch.isfinite(want[0])
    torch.testing.assert_close(got[0][finite], want[0][finite], atol=1e-10, rtol=1e-10)
    for g, w in zip(got[1:4], want[1:4]):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_logits_cache_is_bitwise_neutral(blocks):
    """The tile cache (exact copies of forward tiles, used instead of recomputing) changes nothing, bit for bit."""
    hidden, weight, bias = _inputs(torch.float32, True)
    labels = _labels()
    plain = _run("tiles", hidden, weight, bias, labels, logits_cache_mb=0)
    cached = _run("tiles", hidden, weight, bias, labels, logits_cache_mb=1)  # holds all 39 tiles of 5 x 8 fp32
    for a, b in zip(plain, cached):
        assert torch.equal(a, b)


@pytest.mark.parametrize("eps", [1e-3, 1e-1])
def test_filtering_on_triton_row_ops_equals_the_cpu_row_ops(blocks, eps):
    """filter_eps reaches ChunkedHead's filter unchanged: the same blocks are skipped as with the torch row ops, the
    gradients agree, and they stay near the exact ones."""
    hidden, weight, bias = _inputs(torch.float64, False)
    hidden[:, 0], weight[:, 0] = 3.0, -torch.log1p(torch.arange(V, dtype=torch.float64))  # a peaked, LM-like tail
    labels = _labels()
    counts = {}
    runs = {}
    for backend in ("triton", "torch"):
        skip_counter.reset()
        runs[backend] = _run("tiles", hidden, weight, bias, labels, backend=backend, filter_eps=eps)
        counts[backend] = (skip_counter.skipped, skip_counter.total)
    # blocks are skipped (3 of 39 at 1e-3, 18 at 1e-1) and some kept: the equal counts are not 0 == 0
    assert counts["triton"] == counts["torch"] and 0 < counts["triton"][0] < counts["triton"][1], counts
    for a, b in zip(runs["triton"], runs["torch"]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    exact = _run("tiles", hidden, weight, bias, labels)
    for a, b in zip(runs["triton"][2:4], exact[2:4]):
        torch.testing.assert_close(a, b, atol=eps * 50, rtol=0)  # crude; tests/test_filtering.py has the exact bound


def test_bf16_within_the_budget_of_an_eager_bf16_head(blocks):
    """bf16 inputs: the tiled head rounds each logits tile and each gradient product to bf16 (its GEMMs are bf16
    GEMMs) and accumulates in fp32. Its error against an fp32 truth on the same rounded inputs may be at most 2x the
    error of eager bf16 (bf16 logits, fp32 log-softmax, autograd) + 1e-3 of the truth's scale. (Measured: the same
    error as eager to 3 digits, e.g. logp 0.049 at |logp| <= 36, grad_weight 0.115 against 0.114.)"""
    hidden, weight, bias = _inputs(torch.bfloat16, False)
    labels = _labels()
    got = _run("tiles", hidden, weight, bias, labels)
    truth = _reference(hidden.double(), weight.double(), None, labels)

    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    gen = torch.Generator().manual_seed(1)
    g, e = torch.randn(2, N, generator=gen, dtype=torch.float64)
    logits = leaves[0] @ leaves[1].T  # bf16 logits, as an eager bf16 model produces them
    logp, entropy = logprobs_from_logits_ref(logits, labels, return_entropy=True)
    eager_grads = torch.autograd.grad((logp.double() * g).sum() + (entropy.double() * e).sum(), leaves)
    eager = (logp.detach(), entropy.detach()) + eager_grads
    for name, ours, theirs, want in zip(("logp", "entropy", "grad_hidden", "grad_weight"), got, eager, truth):
        assert ours.dtype == (torch.float32 if name in ("logp", "entropy") else torch.bfloat16)
        ours_err = (ours.double() - want).abs().max().item()
        eager_err = (theirs.double() - want).abs().max().item()
        assert ours_err <= 2 * eager_err + 1e-3 * want.abs().max().item(), (name, ours_err, eager_err)


# ------------------------------------------------------------------------------------------------ the choice
def _spy_heads(monkeypatch):
    import prefopt.kernels.linear_logprobs as fused
    calls = []
    real_tiles, real_fused = chunked.ChunkedHead.linear_forward, fused.linear_forward

    def tiles(self, *args, **kwargs):
        calls.append(("tiles", self.rowops.__name__))
        return real_tiles(self, *args, **kwargs)

    def fused_forward(*args, **kwargs):
        calls.append(("fused", "prefopt.kernels.linear_logprobs"))
        return real_fused(*args, **kwargs)

    monkeypatch.setattr(chunked.ChunkedHead, "linear_forward", tiles)
    monkeypatch.setattr(fused, "linear_forward", fused_forward)
    return calls


@pytest.mark.parametrize("how", ["use_head", "env"])
def test_the_function_runs_the_head_asked_for(monkeypatch, how):
    calls = _spy_heads(monkeypatch)
    hidden, weight, _ = _inputs(torch.float32, False)
    labels = _labels()
    auto_head = _backend.head_prediction(N - 1, H, V, torch.float32).head if ON_CUDA else "fused"
    for head in ("tiles", "fused", "auto"):
        if how == "env":
            monkeypatch.setenv("PREFOPT_HEAD", head)
            ctx = prefopt.use_backend("triton")
        else:
            monkeypatch.delenv("PREFOPT_HEAD", raising=False)
            ctx = prefopt.use_head(head)
        with ctx, prefopt.use_backend("triton"):
            assert prefopt.head_choice(N - 1, H, V, torch.float32, device=hidden.device.type) == (
                auto_head if head == "auto" else head)
            prefopt.linear_logprobs(hidden, weight, labels)
    # tiles run on the Triton row ops; auto keeps the fused kernel on CPU tensors (the interpreter) and follows the
    # cost model on CUDA tensors (test_auto_on_cuda_follows_the_cost_model)
    kernel = {"tiles": ("tiles", "prefopt.kernels.logprobs"), "fused": ("fused", "prefopt.kernels.linear_logprobs")}
    assert calls == [kernel["tiles"], kernel["fused"], kernel[auto_head]]


def test_fused_loss_runs_both_heads_through_tiles(monkeypatch):
    """The fused DPO loss (policy + live reference head) under PREFOPT_HEAD=tiles gives the fused kernel's loss
    and gradients."""
    calls = _spy_heads(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 6, H, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (4, 6), generator=gen)
    labels[:, :2] = -100
    ref = dict(ref_hidden=hidden.detach() + 0.1, ref_weight=weight.detach())
    results = {}
    for head in ("fused", "tiles"):
        with prefopt.use_backend("triton"), prefopt.use_head(head):
            loss, _ = prefopt.fused_linear_dpo_loss(hidden, weight, labels, **ref)
            results[head] = (loss.detach(),) + torch.autograd.grad(loss, (hidden, weight))
    assert [c[0] for c in calls] == ["fused", "fused", "tiles", "tiles"]
    for a, b in zip(results["fused"], results["tiles"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_head_errors_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="valid heads: auto, fused, tiles"):
        with prefopt.use_head("chunked"):
            pass
    monkeypatch.setenv("PREFOPT_HEAD", "cublas")
    with pytest.raises(ValueError, match="PREFOPT_HEAD: unknown prefopt head 'cublas'; valid heads: auto, fused, tiles"):
        prefopt.linear_logprobs(torch.randn(2, 4), torch.randn(9, 4), torch.tensor([1, 2]))
    monkeypatch.setenv("PREFOPT_HEAD", "fused")
    with prefopt.use_backend("torch"), pytest.raises(RuntimeError, match="'fused' is the triton backend's"):
        prefopt.linear_logprobs(torch.randn(2, 4), torch.randn(9, 4), torch.tensor([1, 2]))
    monkeypatch.setenv("PREFOPT_HEAD", "TILES ")  # case and spaces, as PREFOPT_BACKEND
    with prefopt.use_backend("torch"):
        assert prefopt.head_choice(2, 4, 9, device="cpu") == "tiles"


def test_auto_on_cuda_follows_the_cost_model(monkeypatch):
    """What auto picks on CUDA tensors (pretended here: the resolver is told CUDA Triton is available) is
    prefopt/cost_model.py's `choose_head` at the call's shape: tiles at the issue shape, fused for 64 tokens."""
    monkeypatch.delenv("PREFOPT_HEAD", raising=False)
    monkeypatch.setattr(_backend, "triton_status", lambda device_type: (True, ""))
    with prefopt.use_backend("auto"):
        assert prefopt.head_choice(16384, 4096, 128256, torch.bfloat16) == "tiles"
        assert prefopt.head_choice(64, 4096, 128256, torch.bfloat16) == "fused"
        assert prefopt.head_choice(16384, 4096, 128256, torch.float64) == "fused"  # no cost model for fp64
        pick = _backend.head_prediction(16384, 4096, 128256, torch.bfloat16)
        assert pick.head == "tiles" and pick.tiles_s < pick.fused_s
        with prefopt.use_head("fused"):
            assert prefopt.head_choice(16384, 4096, 128256, torch.bfloat16) == "fused"
    info = _backend.backend_info()
    assert info["head"] == "auto" and info["auto head"].startswith("on CUDA at N=16384, H=4096, V=128256, bf16: tiles")


@pytest.fixture
def deterministic_mode():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture
def atomics(monkeypatch):
    """Counts the atomic operations (tl.atomic_add, _xchg, _cas, ...) the Triton interpreter executes."""
    from triton.runtime import interpreter
    count = {"n": 0}
    for name in ("create_atomic_rmw", "create_atomic_cas"):
        def counted(self, *args, _real=getattr(interpreter.InterpreterBuilder, name), **kwargs):
            count["n"] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(interpreter.InterpreterBuilder, name, counted)
    return count


@pytest.mark.skipif(ON_CUDA, reason="counts the interpreter's atomic operations; on a GPU "
                    "tests/test_cuda_determinism.py checks the bits")
def test_deterministic_mode_runs_the_head_without_atomics(monkeypatch, deterministic_mode, atomics):
    """torch.use_deterministic_algorithms(True): auto runs the tiled head on the Triton row ops, whose kernels
    execute no atomic operation (the source of run-to-run differences of the fused head, whose backward executes
    them: the control); asking for the fused head raises (warns with warn_only), as torch's own ops do.
    That two backwards then give equal bits can only be shown on a GPU: the interpreter runs one program after
    another, so atomics would give equal bits here too."""
    import inspect

    from prefopt.kernels import linear_logprobs as fused_kernels
    from prefopt.kernels import logprobs as row_kernels
    monkeypatch.delenv("PREFOPT_HEAD", raising=False)
    calls = _spy_heads(monkeypatch)
    hidden, weight, _ = _inputs(torch.float32, False)
    hidden.requires_grad_(True)
    labels = _labels()
    with prefopt.use_backend("triton"), prefopt.use_head("fused"):  # the control: the counter sees atomics
        torch.autograd.grad(prefopt.linear_logprobs(hidden, weight, labels).sum(), hidden)
    assert atomics["n"] > 0 and calls == [("fused", "prefopt.kernels.linear_logprobs")]
    calls.clear()
    atomics["n"] = 0
    torch.use_deterministic_algorithms(True)
    with prefopt.use_backend("triton"):
        assert prefopt.head_choice(N - 1, H, V, torch.float32, device="cpu") == "tiles"
        for _ in range(2):
            torch.autograd.grad(prefopt.linear_logprobs(hidden, weight, labels).sum(), hidden)
        assert calls == [("tiles", "prefopt.kernels.logprobs")] * 2 and atomics["n"] == 0
        # every branch of the row-op kernels, not only those this input takes (a GPU may take others)
        assert "tl.atomic_" not in inspect.getsource(row_kernels) and "tl.atomic_" in inspect.getsource(fused_kernels)
        with prefopt.use_head("fused"), pytest.raises(RuntimeError, match="no deterministic backward"):
            prefopt.linear_logprobs(hidden, weight, labels)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with prefopt.use_head("fused"), pytest.warns(UserWarning, match="no deterministic backward"):
            prefopt.linear_logprobs(hidden, weight, labels)
    assert [c[0] for c in calls] == ["tiles", "tiles", "fused"]
