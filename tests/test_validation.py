"""Every bad input of the public API is a clear ValueError/TypeError raised before any head, row, segment or loss
kernel runs (a spy on every backend entry point counts the calls), and every option reaches the backends settled."""
import math

import pytest
import torch

import prefopt
from prefopt import _backend
from tests._spy import KernelSpy

P, T, H, V = 2, 5, 8, 11
BACKENDS = ["torch", "cpp", "triton"]


@pytest.fixture
def spy(monkeypatch):
    return KernelSpy(monkeypatch)


def _pair_batch(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * P, T, H, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (2 * P, T), generator=gen)
    labels[:, :2] = -100
    ref = dict(ref_hidden=hidden.detach() + 0.1, ref_weight=weight.detach())
    return hidden, weight, labels, ref


def test_spy_sees_every_kind_of_kernel(spy):
    """The control: a valid fused call reaches a head, the segment sums and a pair loss, so a zero count below
    means the error came first."""
    hidden, weight, labels, ref = _pair_batch()
    prefopt.fused_linear_dpo_loss(hidden, weight, labels, **ref)[0].backward()
    assert spy.named("linear_forward") and spy.named("segment_forward") and spy.named("pair_forward")


# --------------------------------------------------------------------------------------- fused loss: options
def _ref_weight_f64(kw):
    kw["ref_weight"] = kw["ref_weight"].double()


def _short_ref_vocab(kw):
    kw["ref_weight"] = kw["ref_weight"][: V - 3]  # labels reach V - 1


def _meta_hidden(kw):
    kw["hidden"] = kw["hidden"].detach().to("meta")
    kw["weight"] = kw["weight"].detach().to("meta")
    kw["labels"] = kw["labels"].to("meta")
    kw["ref_hidden"] = kw["ref_hidden"].to("meta")
    kw["ref_weight"] = kw["ref_weight"].to("meta")


def _precomputed_wrong_shape(kw):
    del kw["ref_hidden"], kw["ref_weight"]
    kw.update(ref_chosen_logps=torch.zeros(P + 1), ref_rejected_logps=torch.zeros(P + 1))


def _precomputed_int(kw):
    del kw["ref_hidden"], kw["ref_weight"]
    kw.update(ref_chosen_logps=torch.zeros(P, dtype=torch.long), ref_rejected_logps=torch.zeros(P))


def _labels_out_of_range(kw):
    kw["labels"] = kw["labels"].clone()
    kw["labels"][0, -1] = V


def _ref_bias_wrong_shape(kw):
    kw["ref_bias"] = torch.zeros(V + 1)


FUSED_ERRORS = [  # (id, options or a builder of the keyword dict, error, message)
    ("beta-zero", dict(beta=0.0), ValueError, "beta must be > 0"),
    ("beta-negative", dict(beta=-0.1), ValueError, "beta must be > 0"),
    ("beta-nan", dict(beta=float("nan")), ValueError, "beta must be finite"),
    ("beta-bool", dict(beta=True), TypeError, "beta must be a real number"),
    ("loss-type-unknown", dict(loss_type="dpo"), ValueError, "unknown loss_type 'dpo'"),
    ("loss-weights-length", dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), ValueError,
     "loss_weights has 1 entries"),
    ("loss-weights-nan", dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0, math.nan]), ValueError,
     "loss_weights must be finite"),
    ("unknown-keyword", dict(betta=0.2), TypeError, r"unknown keyword argument\(s\) betta"),
    ("lengths-keyword", dict(chosen_lengths=torch.ones(P)), TypeError, r"unknown keyword argument\(s\) chosen_lengths"),
    ("label-smoothing", dict(loss_type="robust", label_smoothing=0.5), ValueError, "for the 'robust' loss"),
    ("f-divergence", dict(f_divergence_type="kl"), ValueError, "unknown f_divergence_type"),
    ("discopop-tau", dict(loss_type="discopop", discopop_tau=0.0), ValueError, "discopop_tau must be > 0"),
    ("rpo-alpha-inf", dict(rpo_alpha=math.inf), ValueError, "rpo_alpha must be finite"),
    ("ld-alpha-range", dict(ld_alpha=1.5), ValueError, r"ld_alpha must be in \[0, 1\]"),
    ("ld-alpha-nan", dict(ld_alpha=math.nan), ValueError, "ld_alpha must be finite"),
    ("ld-alpha-str", dict(ld_alpha="0.5"), TypeError, "ld_alpha must be a real number"),
    ("use-weighting-str", dict(use_weighting="yes"), TypeError, "use_weighting must be True or False"),
    ("weighting-with-aot", dict(loss_type="aot", use_weighting=True), ValueError, "not supported with 'aot'"),
    ("ref-free-with-ref", dict(loss_type="simpo"), ValueError, "take no reference"),
    ("ref-weight-f64", _ref_weight_f64, TypeError, r"ref_hidden \(torch.float32\) and ref_weight \(torch.float64\)"),
    ("ref-vocab-short", _short_ref_vocab, ValueError, rf"labels must be in \[0, {V - 3}\)"),
    ("ref-bias-shape", _ref_bias_wrong_shape, ValueError, rf"ref_bias must have shape \({V},\)"),
    ("precomputed-shape", _precomputed_wrong_shape, ValueError, rf"ref_chosen_logps has shape \({P + 1},\)"),
    ("precomputed-int", _precomputed_int, TypeError, "ref_chosen_logps must be a floating-point tensor"),
    ("labels-out-of-range", _labels_out_of_range, ValueError, rf"labels must be in \[0, {V}\)"),
    ("meta", _meta_hidden, ValueError, "meta tensor"),
    ("temperature-bool", dict(temperature=True), ValueError, "temperature must be a finite number > 0"),
    ("softcap-nan", dict(softcap=math.nan), ValueError, "softcap must be None or a finite number > 0"),
    ("logit-scale-inf", dict(logit_scale=math.inf), ValueError, "logit_scale must be a finite non-zero number"),
    ("ignore-index-float", dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    ("chunk-size-bool", dict(chunk_size=True), ValueError, "chunk_size must be None or a positive int"),
    ("cache-budget", dict(logits_cache_mb=-1), ValueError, "finite number of MiB >= 0"),
    ("filter-eps-negative", dict(filter_eps=-1e-3), ValueError, "filter_eps must be None, 'auto' or a finite number"),
    ("filter-eps-inf", dict(filter_eps=math.inf), ValueError, "filter_eps must be None, 'auto' or a finite number"),
    ("filter-eps-word", dict(filter_eps="fast"), ValueError, "filter_eps must be None, 'auto' .* got 'fast'"),
    ("filter-eps-bool", dict(filter_eps=True), TypeError, "filter_eps must be None, 'auto' or a finite number"),
    ("cu-seqlens-end", dict(cu_seqlens=torch.tensor([0, 5, 10, 15, 19])), ValueError,
     "end at the number of tokens 20"),
]


@pytest.mark.parametrize("case, change, error, message", FUSED_ERRORS, ids=[c[0] for c in FUSED_ERRORS])
def test_fused_loss_checks_everything_before_the_first_head_pass(spy, case, change, error, message):
    hidden, weight, labels, ref = _pair_batch()
    kw = dict(hidden=hidden, weight=weight, labels=labels, **ref)
    if "cu_seqlens" in getattr(change, "keys", lambda: ())():
        kw.update(hidden=hidden.reshape(-1, H), labels=labels.reshape(-1), ref_hidden=ref["ref_hidden"].reshape(-1, H))
    if callable(change):
        change(kw)
        options = {}
    else:
        options = change
    with pytest.raises(error, match=message):
        prefopt.fused_linear_dpo_loss(kw.pop("hidden"), kw.pop("weight"), kw.pop("labels"), **kw, **options)
    assert spy.calls == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_loss_option_error_costs_no_kernel_on_any_backend(spy, backend):
    hidden, weight, labels, ref = _pair_batch()
    with prefopt.use_backend(backend), pytest.raises(ValueError, match="beta must be > 0"):
        prefopt.fused_linear_dpo_loss(hidden, weight, labels, beta=-1.0, **ref)
    assert spy.calls == []


# ------------------------------------------------------------------------------------------------ core ops
CORE_ERRORS = [
    ("logprobs-meta", lambda: prefopt.logprobs_from_logits(torch.randn(2, V, device="meta"),
                                                           torch.zeros(2, dtype=torch.long, device="meta")),
     ValueError, "logits must hold data, got a meta tensor"),
    ("linear-meta-labels", lambda: prefopt.linear_logprobs(torch.randn(2, H, device="meta"),
                                                           torch.randn(V, H, device="meta"),
                                                           torch.zeros(2, dtype=torch.long, device="meta")),
     ValueError, "hidden must hold data"),
    ("temperature-bool", lambda: prefopt.logprobs_from_logits(torch.randn(2, V), torch.tensor([1, 2]),
                                                              temperature=True), ValueError, "temperature"),
    ("softcap-inf", lambda: prefopt.logprobs_from_logits(torch.randn(2, V), torch.tensor([1, 2]),
                                                         softcap=math.inf), ValueError, "softcap"),
    ("ignore-index-bool", lambda: prefopt.logprobs_from_logits(torch.randn(2, V), torch.tensor([1, 2]),
                                                               ignore_index=False), TypeError, "ignore_index"),
    ("return-entropy-str", lambda: prefopt.linear_logprobs(torch.randn(2, H), torch.randn(V, H), torch.tensor([1, 2]),
                                                           return_entropy="yes"), TypeError, "return_entropy"),
    ("average-str", lambda: prefopt.sequence_logps(torch.randn(2, 3), average="mean"), TypeError, "average"),
    ("filter-eps-nan", lambda: prefopt.linear_logprobs(torch.randn(2, H), torch.randn(V, H), torch.tensor([1, 2]),
                                                       filter_eps=math.nan), ValueError, "filter_eps"),
    ("uint8-wraps", lambda: prefopt.logprobs_from_logits(torch.randn(2, 100), torch.tensor([156, 3],
                                                                                         dtype=torch.uint8)),
     ValueError, r"labels must be in \[0, 100\) .* e\.g\. \[156\]"),
    ("int8-linear-out-of-range", lambda: prefopt.linear_logprobs(torch.randn(2, H), torch.randn(100, H),
                                                                 torch.tensor([120, 3], dtype=torch.int8)),
     ValueError, r"labels must be in \[0, 100\)"),
    ("preference-beta-bool", lambda: prefopt.preference_loss(*torch.zeros(4, P), beta=True), TypeError, "beta"),
    ("kto-beta-nan", lambda: prefopt.kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]),
                                              torch.zeros(2), torch.zeros(2), beta=math.nan), ValueError, "beta"),
]


@pytest.mark.parametrize("case, call, error, message", CORE_ERRORS, ids=[c[0] for c in CORE_ERRORS])
def test_core_op_errors_come_before_any_kernel(spy, case, call, error, message):
    with pytest.raises(error, match=message):
        call()
    assert spy.calls == []


INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_every_integer_label_dtype_is_read_as_int64(dtype):
    """V = 300 exceeds int8/uint8: valid labels must not be rejected because V wraps in their dtype."""
    vocab = 300
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 3, H, generator=gen), torch.randn(vocab, H, generator=gen)
    labels = torch.tensor([[0, 7, 100], [127, 5, 1]])
    if dtype != torch.uint8:
        labels[0, 0] = -100  # ignored in every signed dtype
    logits = hidden @ weight.T
    want = prefopt.logprobs_from_logits(logits, labels)
    torch.testing.assert_close(prefopt.logprobs_from_logits(logits, labels.to(dtype)), want, rtol=0, atol=0)
    got = prefopt.linear_logprobs(hidden, weight, labels.to(dtype))
    torch.testing.assert_close(got, prefopt.linear_logprobs(hidden, weight, labels), rtol=0, atol=0)
    fused_labels = labels.repeat(2, 1)  # two pairs of three tokens
    hidden4 = hidden.repeat(2, 1, 1)
    ref = dict(ref_hidden=hidden4 + 0.1, ref_weight=weight)
    loss, _ = prefopt.fused_linear_dpo_loss(hidden4, weight, fused_labels.to(dtype), **ref)
    want_loss, _ = prefopt.fused_linear_dpo_loss(hidden4, weight, fused_labels, **ref)
    assert torch.equal(loss, want_loss)


# ---------------------------------------------------------------------------------------- settled options
def test_backends_receive_settled_options(spy):
    """softcap=0 reaches the backends as None, numbers as floats, and no cache is asked for without a backward."""
    logits, labels = torch.randn(3, V), torch.tensor([1, 2, 3])
    prefopt.logprobs_from_logits(logits, labels, softcap=0, temperature=2, logit_scale=1)
    (_, args, _), = spy.named("row_forward")
    assert args[2:] == (-100, 1.0, None, 2.0, False, False) and isinstance(args[3], float)

    hidden, weight = torch.randn(3, H, requires_grad=True), torch.randn(V, H)
    with prefopt.use_backend("torch"):
        with torch.no_grad():
            prefopt.linear_logprobs(hidden, weight, labels, logits_cache_mb=64, softcap=0.0)
        prefopt.linear_logprobs(hidden, weight, labels, logits_cache_mb=64)
    no_grad_call, grad_call = spy.named("linear_forward")
    assert no_grad_call[1][6] is None and "tile_cache" not in no_grad_call[2]
    assert grad_call[2]["tile_cache"].budget_bytes == 64 << 20


def test_launcher_asserts_instead_of_checking_user_input():
    from prefopt.kernels._fold import transform_args
    assert transform_args(1, None, 2) == (1.0, 1.0, 2.0, False)
    with pytest.raises(AssertionError):
        transform_args(1.0, 0.0, 1.0)  # the edge maps softcap=0 to None before any launcher


# ------------------------------------------------------------------------------------------ no silent fallback
def test_loss_backend_unavailable_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(_backend, "cpp_status", lambda device_type="cpu": (False, "prefopt._C is not built"))
    chosen = torch.zeros(P, requires_grad=True)
    with prefopt.use_backend("cpp"), pytest.raises(RuntimeError, match="'cpp' is not available"):
        prefopt.preference_loss(chosen, torch.zeros(P), torch.zeros(P), torch.zeros(P))
    monkeypatch.delenv("TRITON_INTERPRET")
    with prefopt.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        prefopt.preference_loss(chosen, torch.zeros(P), torch.zeros(P), torch.zeros(P))


def test_trainer_config_uses_the_one_loss_name_check():
    """The trainer's config check calls prefopt/_validation.py (it used to fall back to its own list on ImportError)."""
    from prefopt.trainer.config import PrefoptInputError, check_loss_names
    check_loss_names(["sigmoid", "kto"])
    with pytest.raises(PrefoptInputError, match=r"loss_type: loss_type lists \['ipo', 'ipo'\] with a repeated name"):
        check_loss_names(["ipo", "ipo"])
