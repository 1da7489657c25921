"""Wall-clock time of the parts of an exact step, per layer (``backmatch bench``'s breakdown).

Each engine has its own :class:`Timing` (``engine.timing``), off by default: then
``timing.part(layer, name)`` returns one shared no-op context, an attribute test
per use. :meth:`Timing.enable` turns it on; ``sync`` (e.g. ``torch.cuda.synchronize``)
runs at both ends of every span so that device work is charged to the span that
launched it, and each span is also a ``torch.profiler`` range named
``backmatch/<layer>/<part>``. Parts: ``gram`` (forming AᵀA or AAᵀ), ``weight_grad``
(g_W where autograd's is not taken, and the signal rows of a dual solve),
``factor`` (Cholesky, or eigh when it fails its check), ``solve`` (triangular
solves, the one read-back, the residual), ``dual`` (the whole N x N solve) and,
per layer of any kind, ``input_signal`` (its signal rule, with the finiteness
check). On the engine's batched path ``factor`` and ``solve`` run at the end of
backward (the step's one read-back there is in no span), and the matrices of
several layers factored in one call are timed in a row of their own,
``batched <size>`` (``batched dual-<size>`` for N x N kernels), instead of in
their layers'.
"""

from __future__ import annotations

import contextlib
import time

import torch


class _Span:
    __slots__ = ("timing", "key", "record", "start")

    def __init__(self, timing: "Timing", key: tuple):
        self.timing, self.key = timing, key

    def __enter__(self):
        if self.timing.sync is not None:
            self.timing.sync()
        self.record = torch.autograd.profiler.record_function("backmatch/" + "/".join(self.key))
        self.record.__enter__()
        self.start = self.timing.clock()
        return self

    def __exit__(self, *exc):
        if self.timing.sync is not None:
            self.timing.sync()
        elapsed = self.timing.clock() - self.start
        self.record.__exit__(*exc)
        totals = self.timing.totals
        totals[self.key] = totals.get(self.key, 0.0) + elapsed
        return False


_NULL_SPAN = contextlib.nullcontext()


class Timing:
    """Per-layer, per-part seconds of an engine's exact steps (see the module docstring)."""

    def __init__(self):
        self.enabled = False
        self.sync = None
        self.clock = time.perf_counter
        self.totals: dict[tuple, float] = {}

    def enable(self, sync=None, clock=time.perf_counter) -> None:
        """Start timing (totals reset). ``clock``: ``time.perf_counter`` (wall) or e.g. ``time.process_time``
        (CPU time of this process, robust on a shared machine when torch runs one thread)."""
        self.enabled, self.sync, self.clock = True, sync, clock
        self.totals = {}

    def disable(self) -> None:
        self.enabled, self.sync, self.clock = False, None, time.perf_counter

    def part(self, layer: str, name: str):
        """Context timing ``name`` for ``layer`` (a module path)."""
        if not self.enabled:
            return _NULL_SPAN
        return _Span(self, (layer, name))


class _NeverEnabled(Timing):
    def enable(self, sync=None, clock=time.perf_counter) -> None:
        raise RuntimeError("NO_TIMING is shared and stays off: enable an engine's own timing (engine.timing)")


#: the timing of callers outside an engine: always off
NO_TIMING = _NeverEnabled()
