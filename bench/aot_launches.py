"""The Triton launches the ahead-of-time report compiles: the real launchers, run on meta tensors.

Triton compiles one binary per *specialisation* of a launch, not per kernel: on top of the constexprs, an
integer argument equal to 1 becomes a compile-time constant, and integer or pointer arguments divisible by 16
get `tt.divisibility` attributes (wider vector loads, different pipelining and register use). A signature
written by hand misses these: it did, `need_gh` / `need_gw` are 1 in every real backward, so the backward that
was checked for spills was not the one that launches. So nothing here describes a kernel. Each case below calls
a launcher of `kernels/` the way the autograd Functions do, on `meta` tensors (real shapes and dtypes, no data,
no GPU), while `JITFunction.run` is replaced by a recorder; `bind` then passes each recorded call through
Triton's own binder for the target GPU, which yields exactly the (signature, constexprs, attrs, options) that
`JITFunction.run` would compile on that GPU.

Shapes: the head call of the cost model (16384 tokens, H=4096, V=128256 as Llama-3), a ragged one (1001 rows,
as left after dropping ignored labels; V=50257 as GPT-2: neither divisible by 16), and a single row (N=1 is
specialised to a constant). The preference-loss kernels are generated per loss configuration and keep their
own `aot_configs` in kernels/preference_loss.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

GPU_SHAPE = (16384, 4096, 128256)   # (tokens, hidden, vocab): the head call the cost model is quoted at
RAGGED_SHAPE = (1001, 4096, 50257)  # rows and vocabulary not multiples of 16
SINGLE_ROW = (1, 4096, 128256)
ROW_VOCABS_ALIGNED = (8192, 128256)  # the two row-kernel tile configurations (V <= 8192, larger)
ROW_VOCABS_RAGGED = (77, 50257)      # the same two, V (and so the row stride) not a multiple of 16
# (input dtype, fp32 matmul precision): fp32 inputs follow torch's setting, "highest" -> ieee, else tf32
HEAD_DTYPES = ((torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest"),
               (torch.float16, "highest"))
GRADS = ((True, True), (True, False), (False, True))  # which of hidden / weight need a gradient


@dataclass(frozen=True)
class Case:
    module: str          # kernels.<name>
    label: str           # what the case launches, for the report's config column
    run: Callable[[], None]
    quick: bool = False  # part of --quick (the heaviest variant per kernel and dtype)
    head: dict | None = None  # a head call's arguments for prefopt.cost_model.head_costs


def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


@contextlib.contextmanager
def _matmul_precision(precision):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _dtype_name(dtype, precision="highest"):
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]
    return name + ("/tf32" if dtype == torch.float32 and precision != "highest" else "")


def _head_case(shape, dtype, precision, bias, softcap, grads, quick, filter_eps=None, sorted_=False,
               autotune=False):
    from prefopt.kernels import _autotune
    from prefopt.kernels import linear_logprobs as head
    from prefopt._backend import use_tiles
    n, hidden_size, vocab = shape
    need_h, need_w = grads

    def run():
        if not autotune:
            return launch()
        _autotune.clear()  # a fresh tuner: every candidate's trial launch is recorded
        with use_tiles("autotune"):
            launch()

    def launch():
        hidden, weight = _meta((n, hidden_size), dtype), _meta((vocab, hidden_size), dtype)
        b = _meta((vocab,), dtype) if bias else None
        labels = _meta((n,), torch.int64)
        cap = 30.0 if softcap else None
        with _matmul_precision(precision):
            stats = head.linear_forward(hidden, weight, b, labels, 1.0, cap, 1.0, True, True)
            head.linear_backward(hidden, weight, b, labels, stats.lse, stats.entropy, _meta((n,), torch.float32),
                                 _meta((n,), torch.float32), 1.0, cap, 1.0, None, filter_eps, (need_h, need_w, bias),
                                 **({"vocab_order": _meta((vocab,), torch.int64)} if sorted_ else {}))

    flags = [f for f, on in (("bias", bias), ("softcap", softcap), ("filter", filter_eps is not None),
                             ("sorted", sorted_), ("autotune", autotune)) if on]
    grads_text = ",".join(k for k, on in (("h", need_h), ("w", need_w)) if on)
    label = f"N={n} H={hidden_size} V={vocab} {_dtype_name(dtype, precision)} {' '.join(flags)} grads={grads_text}"
    head_call = dict(n=n, hidden=hidden_size, vocab=vocab, dtype=dtype, fp32_precision=precision,
                     need_grad_hidden=need_h, need_grad_weight=need_w)
    return Case("prefopt.kernels.linear_logprobs", " ".join(label.split()), run, quick, head_call)


def _row_case(vocab, dtype, softcap, entropy_grad, quick):
    from prefopt.kernels import logprobs as rows
    n = 4096

    def run():
        logits, labels = _meta((n, vocab), dtype), _meta((n,), torch.int64)
        cap = 30.0 if softcap else None
        stats = rows.row_forward(logits, labels, -100, 1.0, cap, 1.0, True, True)
        rows.row_backward(logits, labels, stats.lse, stats.entropy, _meta((n,), torch.float32),
                          _meta((n,), torch.float32) if entropy_grad else None, -100, 1.0, cap, 1.0)

    flags = [f for f, on in (("softcap", softcap), ("entropy-grad", entropy_grad)) if on]
    return Case("prefopt.kernels.logprobs", " ".join([f"V={vocab}", _dtype_name(dtype)] + flags), run, quick)


def _segment_case(n_tokens, n_segments, weighted, average, quick):
    from prefopt.kernels import sequence_sums as segments

    def run():
        values = _meta((n_tokens,), torch.float32)
        weights = _meta((n_tokens,), torch.float32) if weighted else None
        cu_seqlens = _meta((n_segments + 1,), torch.int64)
        sums, counts = segments.segment_forward(values, weights, cu_seqlens, average)
        segments.segment_backward(_meta((n_segments,), torch.float32), weights, cu_seqlens, counts, average,
                                  n_tokens)

    flags = [f for f, on in (("weights", weighted), ("average", average)) if on]
    return Case("prefopt.kernels.sequence_sums", " ".join([f"tokens={n_tokens} sequences={n_segments}"] + flags), run,
                quick)


LOSS_PAIRS = (1, 1001, 4096)  # one pair (P becomes a constant), a ragged count, a 16-divisible one


def _loss_case(spec_tag, pairs, need_grad, out_dtype, quick):
    """The pair-loss launchers as prefopt/losses/function.py calls them: the generated `_pair_kernel` of one loss
    configuration (fp32 compute), then `_scale_kernel` back to the input dtype. `aot_configs` lists every loss
    configuration with P unspecialised; these cases add what P itself does to the binding."""
    from prefopt.kernels import preference_loss as losses
    spec = dict(losses._aot_specs_by_tag())[spec_tag]
    n_params = len(losses.PARAM_NAMES) + len(spec.losses)

    def run():
        x = {name: _meta((pairs,), torch.float32) for name in losses._needed_inputs(spec)}
        losses.pair_forward(spec, x, _meta((n_params,), torch.float32), need_grad, torch.float32)
        if need_grad:
            losses.backward_scale(_meta((pairs,), torch.float32), _meta((), torch.float32), out_dtype)

    label = f"{spec_tag} P={pairs} grad={int(need_grad)}" + (f" out={_dtype_name(out_dtype)}" if need_grad else "")
    return Case("prefopt.kernels.preference_loss", label, run, quick)


def cases(module):
    """The launch cases of one kernel module, the --quick ones flagged. Every constexpr combination runs at an
    aligned shape; the ragged and single-row shapes (which change only the integer specialisation) and the
    one-gradient backwards run with every feature on."""
    out = []
    if module == "prefopt.kernels.linear_logprobs":
        head = []  # (positional, keyword) arguments of _head_case
        for dtype, precision in HEAD_DTYPES:
            for bias in (False, True):
                for softcap in (False, True):
                    head.append(((GPU_SHAPE, dtype, precision, bias, softcap, (True, True), bias and softcap), {}))
            for grads in GRADS[1:]:
                head.append(((GPU_SHAPE, dtype, precision, True, True, grads, False), {}))
            for shape in (RAGGED_SHAPE, SINGLE_ROW):
                head.append(((shape, dtype, precision, True, True, (True, True), False), {}))
            # gradient filtering: the FILTER=True backward, every feature on (the forward is the same as above)
            head.append(((GPU_SHAPE, dtype, precision, True, True, (True, True), True), dict(filter_eps=2.0 ** -12)))
            # vocabulary sorting: the SORTED=True backward (always filtered: vocab_sort needs filter_eps)
            head.append(((GPU_SHAPE, dtype, precision, True, True, (True, True), True),
                         dict(filter_eps=2.0 ** -12, sorted_=True)))
        out += [_head_case(*args, **kwargs) for args, kwargs in head]
        # every autotune candidate (kernels/_head_tiles.py) the tuner would time, on every specialisation above: a
        # tile spill-free in the heaviest one can spill in a lighter or ragged one (128 x 128 forwards did)
        out += [_head_case(*args[:6], False, **kwargs, autotune=True) for args, kwargs in head]
    elif module == "prefopt.kernels.logprobs":
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for vocab in ROW_VOCABS_ALIGNED:
                for softcap in (False, True):
                    for entropy_grad in (False, True):
                        out.append(_row_case(vocab, dtype, softcap, entropy_grad, softcap and entropy_grad))
            for vocab in ROW_VOCABS_RAGGED:
                out.append(_row_case(vocab, dtype, True, True, False))
    elif module == "prefopt.kernels.preference_loss":
        for pairs in LOSS_PAIRS:
            for tag in ("heaviest", "kto"):
                out.append(_loss_case(tag, pairs, False, torch.float32, False))
                for out_dtype in (torch.float32, torch.bfloat16):
                    out.append(_loss_case(tag, pairs, True, out_dtype, tag == "heaviest" and pairs == 4096))
    elif module == "prefopt.kernels.sequence_sums":
        for n_tokens, n_segments in ((4 * 4096, 4), (4096, 64), (1001, 3)):
            for weighted in (False, True):
                for average in (False, True):
                    heaviest = weighted and average and n_tokens % 16 == 0
                    out.append(_segment_case(n_tokens, n_segments, weighted, average, heaviest))
    else:
        raise ValueError(f"no launch cases for {module}")
    return out


def record(case, arch):
    """The kernel calls one case makes on `arch` (its launchers pick that arch's tiles): [(jit function, args,
    kwargs)], nothing launched."""
    from triton.runtime.jit import JITFunction

    from prefopt.kernels._head_tiles import assume_arch
    calls = []

    def recorder(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))

    real_run = JITFunction.run
    JITFunction.run = recorder
    try:
        with assume_arch(arch):
            case.run()
    finally:
        JITFunction.run = real_run
    return calls


def bind(fn, args, kwargs, target):
    """Triton's own binding of one call for `target`: (signature, constexprs, attrs, options) as
    `JITFunction.run` computes them before it compiles."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def specialisation_text(fn, signature, constexprs, attrs):
    """What a hand-written signature would not show: integers bound as constants (== 1) and the integer
    arguments that are NOT 16-divisible in this launch."""
    names = fn.arg_names
    ones = [names[path[0]] for path, value in constexprs.items()
            if signature[names[path[0]]] == "constexpr" and not fn.params[path[0]].is_constexpr]
    aligned = {names[path[0]] for path, value in attrs.items() if value}
    ragged = [name for name, ty in signature.items() if ty in ("i32", "i64") and name not in aligned]
    parts = [f"{name}=1" for name in ones] + ([f"not16:{','.join(ragged)}"] if ragged else [])
    return " ".join(parts)
