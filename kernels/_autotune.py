"""The opt-in autotune of the fused head's tiles (PREFOPT_TILES=autotune, or `prefopt.use_tiles("autotune")`).

Off by default: the per-architecture tables of kernels/_head_tiles.py run, with no first-call cost. On, the first
launch of each *tuning key* times every pruned candidate of kernels/_head_tiles.py (`candidates`) on the call's
own tensors and keeps the fastest for the rest of the process. The key is what changes the compiled kernel (the
launcher's specialisation: dtype, math mode, bias, softcap, filtering, sorting, which gradients) plus the shape,
with the token count rounded up to a power of two: batches of varying length share a bucket, so a training run
tunes a handful of times, not once per step (as Cut Cross-Entropy bins its batch size). Triton's own
`triton.autotune` keys on exact argument values, which would retune for every new token count.

Timing: `triton.testing.do_bench` (median) on CUDA; on other devices (the interpreter, where only the path is
tested) one wall-clock run. The backward adds into its gradient buffers with atomics, so every trial launch
leaves garbage there: the launcher passes `reset`, called once the timing is done, before the real launch.
A candidate that does not launch (Triton's OutOfResources: shared memory or registers over the device's limits)
is skipped; the table tile is always among the candidates.
"""
from __future__ import annotations

import logging
import time

from prefopt._backend import requested_tiles
from prefopt._source_tree import require_prefopt_name

from . import _head_tiles

require_prefopt_name(__name__)

logger = logging.getLogger("prefopt.autotune")

_CHOICES: dict = {}


def _bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _time(launch, tile, device) -> float:
    """Seconds one launch of `tile` takes."""
    if getattr(device, "type", None) == "cuda":
        import triton.testing
        return triton.testing.do_bench(lambda: launch(tile), warmup=5, rep=25, return_mode="median") * 1e-3
    start = time.perf_counter()
    launch(tile)
    return time.perf_counter() - start


def _out_of_resources(err) -> bool:
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover - every supported triton has it
        return False
    return isinstance(err, OutOfResources)


def choose(specialisation: tuple, dtype, backward: bool, n: int, vocab: int, hidden_size: int, device, arch: int,
           launch, reset=None):
    """The tile a launch runs: the table's unless autotuning is on; then the cached or freshly timed choice."""
    table = _head_tiles.table_tile(dtype, backward, arch)
    if requested_tiles() != "autotune":
        return table
    key = (arch, "backward" if backward else "forward", str(dtype), _head_tiles.math_mode(dtype), specialisation,
           _bucket(n), vocab, hidden_size)
    if key in _CHOICES:
        return _CHOICES[key][0]
    timings = []
    for tile in _head_tiles.candidates(dtype, backward, arch, _bucket(n), vocab):
        try:
            timings.append((_time(launch, tile, device), tile))
        except Exception as err:  # noqa: BLE001 - only a resource failure is skipped; the rest is a bug
            if not _out_of_resources(err):
                raise
            logger.info("prefopt autotune: %s skipped (%s)", tile, err)
    if reset is not None:
        reset()
    if not timings:
        raise RuntimeError(f"prefopt autotune: no candidate tile of {key} could launch")
    seconds, best = min(timings, key=lambda pair: pair[0])
    _CHOICES[key] = (best, tuple((tile, s) for s, tile in timings))
    logger.info("prefopt autotune: %s -> %s (%.3f ms; %s)", key, best, seconds * 1e3,
                ", ".join(f"{tile}: {s * 1e3:.3f} ms" for s, tile in timings))
    return best


def choices() -> dict:
    """What the tuner picked so far: {key: (tile, ((candidate, seconds), ...))}."""
    return dict(_CHOICES)


def clear():
    """Forget every choice (the next launch of each key tunes again)."""
    _CHOICES.clear()
