"""The backends a test can run on the test device, as pytest params; the test device (PREFOPT_TEST_DEVICE: cpu,
the default, or cuda: tests/conftest.py, scripts/gpu_check.sh).

Triton is skipped (with the reason) where its interpreter cannot run. The C++ backend is different: setup.py builds
prefopt._C wherever torch and a C++ compiler are present (README: "If the extension cannot be built, the install
still succeeds"), so a build that failed silently would otherwise turn every cpp test into a skip and leave CI green
with the CPU backend untested. Where the build is expected (`CPP_EXPECTED`: a C++ compiler on PATH and
PREFOPT_NO_EXT unset, as on CI, which installs with the README's command), the cpp params are not skipped: they run
and fail with the backend's own "prefopt._C is not built (...)" error. PREFOPT_EXPECT_EXT=1 / 0 overrides the
detection (e.g. 0 for a deliberate install with PREFOPT_NO_EXT=1 whose variable is no longer set)."""
import os
import shutil

import pytest
import torch

from prefopt import _backend

TEST_DEVICE = os.environ.get("PREFOPT_TEST_DEVICE", "cpu")
ON_CUDA = TEST_DEVICE == "cuda"


def cpp_expected() -> tuple[bool, str]:
    """(whether prefopt._C must be importable here, why): the rule setup.py builds by."""
    forced = os.environ.get("PREFOPT_EXPECT_EXT", "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"PREFOPT_EXPECT_EXT={forced}"
    if os.environ.get("PREFOPT_NO_EXT", "0") not in ("", "0"):
        return False, "PREFOPT_NO_EXT is set: the install skips the extension"
    compiler = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension compiles with
    found = shutil.which(compiler)
    if found is None:
        return False, f"no C++ compiler ({compiler!r}) on PATH: setup.py cannot build the extension"
    return True, f"a C++ compiler is on PATH ({found}), so setup.py builds prefopt._C"


CPP_EXPECTED, CPP_EXPECTED_WHY = cpp_expected()


def available(name):
    ok, _ = (_backend.cpp_status(TEST_DEVICE) if name == "cpp" else
             _backend.triton_status(TEST_DEVICE) if name == "triton" else (True, ""))
    return ok


def _param(name):
    if available(name) or (name == "cpp" and CPP_EXPECTED):
        return pytest.param(name)
    return pytest.param(name, marks=pytest.mark.skip(reason=f"{name} backend not available"
                                                     + (f" ({CPP_EXPECTED_WHY})" if name == "cpp" else "")))


BACKENDS = [_param(b) for b in ("torch", "cpp", "triton")]
CPU_BACKENDS = [b for b in BACKENDS if b.values[0] != "triton"]
CPP = BACKENDS[1]


def cuda_tensor_mode():
    """A mode that puts the tensors the tests build (torch.randn, zeros, tensor, arange, ...) on the GPU, so the
    kernel tests run on CUDA tensors unchanged. A factory given a CPU generator (torch.Generator(), the tests'
    seeded inputs) draws on the CPU and moves the result, so inputs are the same numbers as on a CPU run."""
    from torch.utils._device import DeviceContext, _device_constructors

    class CudaInputs(DeviceContext):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            gen = kwargs.get("generator")
            if (func in _device_constructors() and kwargs.get("device") is None and gen is not None
                    and gen.device.type == "cpu"):
                return func(*args, **kwargs).to(self.device)
            return super().__torch_function__(func, types, args, kwargs)

    return CudaInputs(torch.device("cuda"))
