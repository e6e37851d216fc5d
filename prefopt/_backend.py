"""Backend selection: PREFOPT_BACKEND / use_backend() -> which implementation runs an op; and for the linear
head of the triton backend, PREFOPT_HEAD / use_head() -> which of its two heads runs.

`auto` picks Triton for CUDA tensors and the C++ extension (else torch) for CPU tensors. Asking for a
backend that cannot run is an error, never a silent fallback.

Heads of the triton backend (docs/bench.md, "Which GPU head"): `fused` is kernels/linear_logprobs.py (logits
tiles in registers, fp32 atomics); `tiles` is prefopt/cpu/chunked.py's ChunkedHead driven by the Triton row ops
(cuBLAS GEMMs into an owned fp32 tile, no atomics, more HBM traffic). `auto` lets prefopt/cost_model.py's
`choose_head` pick one per call shape on CUDA tensors; on CPU tensors (the interpreter, a correctness vehicle
only) `auto` keeps the fused head. The torch and cpp backends have only the tiled head.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings

BACKENDS = ("auto", "triton", "cpp", "torch")
HEADS = ("auto", "fused", "tiles")
TILE_CHOICES = ("table", "autotune")  # how the fused head picks its tiles (kernels/_head_tiles.py, _autotune.py)
ISSUE_SHAPE = (16384, 4096, 128256)  # N, H, V of the head call of issue 16 (docs/bench.md), shown by `prefopt info`

class _Setting:
    """A choice read at call time: a `use_*` context manager wins over its environment variable."""

    def __init__(self, what: str, env: str, valid: tuple, default: str = "auto"):
        self.what, self.env, self.valid, self.default = what, env, valid, default
        self.override: contextvars.ContextVar[str | None] = contextvars.ContextVar(f"prefopt_{what}", default=None)

    def check(self, name: str) -> str:
        if not isinstance(name, str) or name.strip().lower() not in self.valid:
            raise ValueError(f"unknown prefopt {self.what} {name!r}; valid {self.what}s: {', '.join(self.valid)}")
        return name.strip().lower()

    @contextlib.contextmanager
    def use(self, name: str):
        token = self.override.set(self.check(name))
        try:
            yield
        finally:
            self.override.reset(token)

    def requested(self) -> str:
        name = self.override.get()
        if name is None:
            try:
                name = self.check(os.environ.get(self.env, self.default))
            except ValueError as err:
                raise ValueError(f"{self.env}: {err}") from None
        return name


_BACKEND = _Setting("backend", "PREFOPT_BACKEND", BACKENDS)
_HEAD = _Setting("head", "PREFOPT_HEAD", HEADS)
_TILES = _Setting("tile choice", "PREFOPT_TILES", TILE_CHOICES, default="table")


def use_backend(name: str):
    """Run the enclosed prefopt calls on backend `name` (auto|triton|cpp|torch)."""
    return _BACKEND.use(name)


def requested_backend() -> str:
    """The backend asked for: use_backend() wins over the PREFOPT_BACKEND variable."""
    return _BACKEND.requested()


def use_head(name: str):
    """Run the enclosed linear heads of the triton backend as `name` (auto|fused|tiles)."""
    return _HEAD.use(name)


def requested_head() -> str:
    """The head asked for: use_head() wins over the PREFOPT_HEAD variable (read at call time)."""
    return _HEAD.requested()


def use_tiles(name: str):
    """How the enclosed fused-head launches pick their tiles: "table" (the per-architecture table, the default)
    or "autotune" (time the pruned candidates once per shape bucket; kernels/_autotune.py)."""
    return _TILES.use(name)


def requested_tiles() -> str:
    """use_tiles() wins over the PREFOPT_TILES variable (read at call time; default "table")."""
    return _TILES.requested()


@functools.lru_cache(maxsize=None)
def _import_status(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
        return True, ""
    except Exception as err:  # ImportError, or a broken build raising something else
        return False, f"{type(err).__name__}: {err}".splitlines()[0]


def cpp_status(device_type: str = "cpu") -> tuple[bool, str]:
    """(available, reason-if-not) for the compiled extension serving `device_type`."""
    module = "prefopt._C" if device_type == "cpu" else "prefopt._C_cuda"
    ok, why = _import_status(module)
    return ok, ("" if ok else f"{module} is not built ({why})")


def triton_status(device_type: str) -> tuple[bool, str]:
    ok, why = _import_status("triton")
    if not ok:
        return False, f"triton is not importable ({why})"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        return False, ("Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 "
                       "before triton is imported")
    if device_type not in ("cpu", "cuda"):
        return False, f"no Triton backend for device type {device_type!r}"
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device is visible to torch"
    return True, ""


_warned_fallback = False


def resolve(device) -> str:
    """The concrete backend ("triton", "cpp" or "torch") that runs an op on tensors on `device`."""
    device_type = getattr(device, "type", str(device))
    name = requested_backend()
    if name == "auto":
        if device_type == "cuda":
            ok, _ = triton_status("cuda")
            return "triton" if ok else "torch"
        ok, why = cpp_status(device_type)
        if ok:
            return "cpp"
        global _warned_fallback
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"prefopt: using the torch backend on CPU because {why}", RuntimeWarning, stacklevel=3)
        return "torch"
    if name == "triton":
        ok, why = triton_status(device_type)
        if not ok:
            raise RuntimeError(f"prefopt backend 'triton' is not available: {why}")
    elif name == "cpp":
        ok, why = cpp_status(device_type)
        if not ok:
            raise RuntimeError(f"prefopt backend 'cpp' is not available: {why}")
    return name


def head_prediction(n_tokens: int, hidden_size: int, vocab: int, dtype):
    """prefopt/cost_model.py's `HeadChoice` for one call of the triton backend's head at this shape: the fused
    head's launch tiles (kernels/linear_logprobs.py `_config`) against the tiled head's (prefopt/cpu/chunked.py
    `tile_shape`), at torch's current float32 matmul precision."""
    import torch

    from prefopt.cost_model import choose_head
    from prefopt.cpu.chunked import tile_shape
    from prefopt.kernels.linear_logprobs import _config
    forward, backward = _config(dtype, False), _config(dtype, True)  # the sm_90 tiles: the model is an H100's
    return choose_head(n_tokens, hidden_size, vocab, dtype, fused_forward_blocks=(forward.block_n, forward.block_v),
                       fused_backward_blocks=(backward.block_n, backward.block_v),
                       tile=tile_shape(n_tokens, vocab, None), fp32_precision=torch.get_float32_matmul_precision())


def resolve_head(device, n_tokens: int, hidden_size: int, vocab: int, dtype) -> str:
    """The linear head ("fused" or "tiles") that runs a call of n_tokens x hidden_size x vocab on `device`.
    The backend is resolved first; a head the backend lacks is an error, never a silent fallback."""
    device_type = getattr(device, "type", str(device))
    backend = resolve(device)
    name = requested_head()
    if backend != "triton":
        if name == "fused":
            raise RuntimeError(f"prefopt head 'fused' is the triton backend's; the {backend!r} backend has only "
                               "the tiled head (PREFOPT_HEAD=auto or tiles)")
        return "tiles"
    import torch
    if torch.are_deterministic_algorithms_enabled():
        # The fused backward adds its tiles' gradient shares with fp32 atomics in whatever order the tiles finish;
        # the tiled head has none (its GEMMs and index_add_ are deterministic in torch's deterministic mode).
        if name == "auto":
            return "tiles"
        if name == "fused":
            message = ("prefopt head 'fused' has no deterministic backward (fp32 atomic adds in tile completion "
                       "order) and torch.use_deterministic_algorithms(True) is on: use PREFOPT_HEAD=auto or tiles")
            if not torch.is_deterministic_algorithms_warn_only_enabled():
                raise RuntimeError(message)
            warnings.warn(message, UserWarning, stacklevel=3)
    if name != "auto":
        return name
    if device_type != "cuda" or dtype not in (torch.float32, torch.bfloat16, torch.float16) or n_tokens == 0:
        return "fused"  # the interpreter, fp64 (tests only) and empty calls: no cost model applies
    return head_prediction(n_tokens, hidden_size, vocab, dtype).head


def head_choice(n_tokens: int, hidden_size: int, vocab: int, dtype=None, device="cuda") -> str:
    """Which linear head would run a call of n_tokens labelled tokens, hidden_size features and vocab entries
    in `dtype` (default bfloat16) on `device`, under the current PREFOPT_BACKEND / PREFOPT_HEAD settings:
    "fused" or "tiles". The autograd Function asks exactly this (prefopt/functions.py `head_impl`)."""
    import torch
    return resolve_head(torch.device(device), n_tokens, hidden_size, vocab, dtype or torch.bfloat16)


def backend_info() -> dict:
    """What is available here, for bug reports and the CLI."""
    info = {"requested": requested_backend()}
    try:
        info["head"] = requested_head()
    except ValueError as err:
        info["head"] = f"invalid: {err}"
    try:
        info["fused head tiles"] = requested_tiles()
    except ValueError as err:
        info["fused head tiles"] = f"invalid: {err}"
    for dev in ("cpu", "cuda"):
        info[f"cpp/{dev}"] = cpp_status(dev)
        info[f"triton/{dev}"] = triton_status(dev)
    from prefopt._validation import cache_budget_bytes
    try:
        info["logits cache"] = (f"{cache_budget_bytes(None, 'cpu') / 2**20:g} MiB per head call on CPU, "
                                f"{cache_budget_bytes(None, 'cuda') / 2**20:g} MiB on CUDA (cpp backend)")
    except ValueError as err:
        info["logits cache"] = f"invalid: {err}"
    try:
        import torch
        n, h, v = ISSUE_SHAPE
        pick = head_prediction(n, h, v, torch.bfloat16)
        info["auto head"] = (f"on CUDA at N={n}, H={h}, V={v}, bf16: {pick.head} (predicted on an H100: fused "
                             f"{pick.fused_s * 1e3:.1f} ms, tiles {pick.tiles_s * 1e3:.1f} ms per forward+backward)")
    except Exception as err:  # triton missing: no fused head to compare with
        info["auto head"] = f"unavailable: {type(err).__name__}: {err}".splitlines()[0]
    return info
