"""The backends a test can run on the test device, as pytest params that skip (with the reason) the ones this machine
lacks; the test device (PREFOPT_TEST_DEVICE: cpu, the default, or cuda; tests/conftest.py)."""
import os

import pytest
import torch

from prefopt import _backend

TEST_DEVICE = os.environ.get("PREFOPT_TEST_DEVICE", "cpu")
ON_CUDA = TEST_DEVICE == "cuda"


def available(name):
    ok, _ = (_backend.cpp_status(TEST_DEVICE) if name == "cpp" else
             _backend.triton_status(TEST_DEVICE) if name == "triton" else (True, ""))
    return ok


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not available(b), reason=f"{b} backend not available"))
            for b in ("torch", "cpp", "triton")]
CPU_BACKENDS = [b for b in BACKENDS if b.values[0] != "triton"]


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
