"""Backend selection: PREFOPT_BACKEND / use_backend() -> which implementation runs an op.

`auto` picks Triton for CUDA tensors and the C++ extension (else torch) for CPU tensors. Asking for a
backend that cannot run is an error, never a silent fallback.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings

BACKENDS = ("auto", "triton", "cpp", "torch")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("prefopt_backend", default=None)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"unknown prefopt backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    return name.strip().lower()


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed prefopt calls on backend `name` (auto|triton|cpp|torch)."""
    token = _override.set(_check_name(name))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend() -> str:
    """The backend asked for: use_backend() wins over the PREFOPT_BACKEND variable."""
    name = _override.get()
    if name is None:
        env = os.environ.get("PREFOPT_BACKEND", "auto")
        try:
            name = _check_name(env)
        except ValueError as err:
            raise ValueError(f"PREFOPT_BACKEND: {err}") from None
    return name


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


def backend_info() -> dict:
    """What is available here, for bug reports and the CLI."""
    info = {"requested": requested_backend()}
    for dev in ("cpu", "cuda"):
        info[f"cpp/{dev}"] = cpp_status(dev)
        info[f"triton/{dev}"] = triton_status(dev)
    from prefopt._validation import cache_budget_bytes
    try:
        info["logits cache"] = (f"{cache_budget_bytes(None, 'cpu') / 2**20:g} MiB per head call on CPU, "
                                f"{cache_budget_bytes(None, 'cuda') / 2**20:g} MiB on CUDA (cpp backend)")
    except ValueError as err:
        info["logits cache"] = f"invalid: {err}"
    return info
