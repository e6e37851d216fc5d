"""Dispatch probes shared by the tests that prove a path never builds a tensor of some size ([T, T] attention masks
or scores, [N, V] logits)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class SquareTensors(TorchDispatchMode):
    """Records every tensor an op creates with two dimensions of at least `length` (a [T, T] mask or score)."""

    def __init__(self, length):
        super().__init__()
        self.length, self.found = length, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and sum(d >= self.length for d in t.shape) >= 2:
                self.found.append((str(func), tuple(t.shape)))
        return out


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any op creates while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
