"""Dispatch probes shared by the tests that prove a path never builds a tensor of some size ([T, T] attention masks
or scores, [N, V] logits) or that count the host ops a path issues."""
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


class OpCounter(TorchDispatchMode):
    """Counts the aten ops issued while active. `one_launch(rowops)` wraps a row-ops module so that each of its calls
    counts as one op (the single launch a GPU would make) and the aten ops inside it count nothing."""

    def __init__(self):
        super().__init__()
        self.n, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.n += 1
        return func(*args, **(kwargs or {}))

    def one_launch(self, rowops):
        counter = self

        class OneLaunch:
            def __getattr__(self, name):
                fn = getattr(rowops, name)

                def call(*args, **kwargs):
                    counter.n += 1
                    counter.paused = True
                    try:
                        return fn(*args, **kwargs)
                    finally:
                        counter.paused = False
                return call

        return OneLaunch()
