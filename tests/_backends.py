"""The backends a CPU test can run, as pytest params that skip (with the reason) the ones this machine lacks."""
import pytest

from prefopt import _backend


def available(name):
    ok, _ = (_backend.cpp_status("cpu") if name == "cpp" else
             _backend.triton_status("cpu") if name == "triton" else (True, ""))
    return ok


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not available(b), reason=f"{b} backend not available"))
            for b in ("torch", "cpp", "triton")]
CPU_BACKENDS = [b for b in BACKENDS if b.values[0] != "triton"]
