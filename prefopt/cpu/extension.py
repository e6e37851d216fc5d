"""The compiled extension that serves a tensor's device: prefopt._C (C++ CPU) or prefopt._C_cuda (CUDA).

Both expose the same functions; the `cpp` backend modules call through here so CUDA tensors reach the CUDA
kernels of csrc/cuda and CPU tensors the C++ ones (the backend resolver already checked the one needed exists).
"""
import importlib


def extension_for(tensor):
    return importlib.import_module("prefopt._C_cuda" if tensor.device.type == "cuda" else "prefopt._C")
