"""A spy on every backend entry point (row ops, heads, segment sums, pair losses), for the tests that promise an
error comes "before any kernel" (tests/test_validation.py, tests/test_core_ops.py)."""
import importlib

from prefopt.cpu.chunked import ChunkedHead
from prefopt.losses import function as loss_function

_ENTRY_POINTS = [
    ("prefopt.cpu.rowops_torch", "row_forward"), ("prefopt.cpu.rowops_cpp", "row_forward"),
    ("prefopt.kernels.logprobs", "row_forward"), ("prefopt.kernels.linear_logprobs", "linear_forward"),
    ("prefopt.cpu.segment_torch", "segment_forward"), ("prefopt.cpu.segment_cpp", "segment_forward"),
    ("prefopt.kernels.sequence_sums", "segment_forward"), ("prefopt.cpu.losses_cpp", "pair_forward"),
    ("prefopt.kernels.preference_loss", "pair_forward"),
]


class KernelSpy:
    """Records (entry point, args, kwargs) of every backend forward: row ops, heads, segment sums, pair losses."""

    def __init__(self, monkeypatch):
        self.calls = []
        for module_name, attr in _ENTRY_POINTS:
            module = importlib.import_module(module_name)
            monkeypatch.setattr(module, attr, self._wrap(f"{module_name}.{attr}", getattr(module, attr)))
        monkeypatch.setattr(ChunkedHead, "linear_forward", self._wrap("ChunkedHead.linear_forward",
                                                                      ChunkedHead.linear_forward))
        monkeypatch.setattr(loss_function._TorchBackend, "pair_forward",
                            staticmethod(self._wrap("torch_pair_forward", loss_function.torch_pair_forward)))

    def _wrap(self, name, fn):
        def spy(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return fn(*args, **kwargs)
        return spy

    def named(self, suffix):
        return [c for c in self.calls if c[0].endswith(suffix)]
