"""Exact back-matching under ``torch.distributed`` data parallelism.

What equals what
----------------
Rank r holds a shard of B samples (the same B on every rank), computes the
signals of its own loss (mean over its B samples) and, per weight layer, its
Gram ``G_r = A_rᵀ A_r / B`` and gradient ``g_r = S_rᵀ A_r``. On the
concatenated batch of k·B samples a single process would use

    G = mean_r G_r,     g_W = mean_r g_r,     g'_W = g_W · G⁺.

``g'_W`` is linear in ``g_W`` once ``G`` is fixed, so it is enough that every
rank holds the same averaged ``G``: rank r puts ``g_r · G⁺`` in ``p.grad`` and the
gradient average that data parallelism already does (DistributedDataParallel's
all-reduce, or the user's own) turns it into ``mean_r(g_r) · G⁺ = g'_W``, the
single-process result on the concatenated batch, identical on every rank. The
weight gradients are therefore never communicated twice: this module only
exchanges the Grams (or, where that is cheaper, the input rows they are made
of). Weight decay and damping keep this property (``W`` is in sync, λ is
computed from the averaged ``G``). BatchNorm's γ, β are solved the same way with
the data-dependent entries of their per-channel 2x2 Gram (``Σ_u E[x̂²]``, and
``Σ_u E[x̂]``, which is 0 with batch statistics).

The per-rank signals are the single-process ones (every signal rule is per
sample) except at BatchNorm: a plain BatchNorm normalizes with its rank's own
batch statistics (as DistributedDataParallel does) and its back-matching rule
uses the same local σ; a ``SyncBatchNorm`` normalizes with the global batch
statistics and its rule all-reduces the per-channel sums so σ is global too
(``layers/normalization.py``), which makes the whole step equal the single-process
one. Approx mode needs no communication at all: its factors come from the
weights and shapes, which are the same on every rank, and its scaling is linear.

Communication per training step (exact and exact_weights)
---------------------------------------------------------
At the end of the forward pass, once per step:

1. ``header``: a k x 4 all-reduce (each rank's batch size, a checksum of its
   layer shapes, and a bad-value flag); every rank refuses the step together
   when the batch sizes or shapes differ, or when some rank saw a NaN input;
2. one all-reduce bucket with the upper triangles of every "gram" layer's
   ``G_r`` (and every affine BatchNorm's 2x2 entries), and one all-gather bucket with
   the input rows of every "rows" layer, both in flight at the same time.

A layer with N_r rows per rank and d inputs (bias included) goes to the
all-gather bucket when ``k·N_r <= d``: a ring all-reduce of the d(d+1)/2
triangle moves about ``(k-1)/k · d(d+1)`` numbers per rank, an all-gather of
the rows ``(k-1)/k · k·N_r·d``. Those layers are then solved from the gathered
rows exactly as a single process would on the concatenated batch (dual N x N
form when k·N_r < d, the solver's own rule), so the solve path matches the
single-process one layer by layer. ``solve_method="dual"`` (without weight
decay) sends every layer's rows.

At the end of the backward pass (all modes): ``check``, a k x 2 all-reduce of
each rank's bad-value flag (non-finite signal, failed solve). A rank never
raises on bad values alone: it records the first one, carries on, and every
rank raises the same :class:`NonFiniteError` naming that rank and layer after
the next exchange, so no rank is left waiting in a collective.

``engine.distributed.last_step`` reports, for the last step, the collectives,
the bytes each rank hands to them (``payload_bytes``), a ring estimate of the
bytes each rank sends (``wire_bytes``) and the seconds spent inside them.

The engine's interface
----------------------
An engine whose ``engine.distributed`` is a :class:`Comm` calls it, and it never
reads or writes the engine:

* ``attach(layers, settings)`` once: ``(path, kind)`` of every module in network
  order (a bad-value flag names its layer by index) and the engine's ``weights.Settings``;
* ``forward_end(ops, output, row_source)`` at the end of every forward pass with
  gradients: the ops in execution order (``graph.Op``: ``.path``, ``.rule``,
  ``.module``, ``.input``) and ``row_source(op)``, a weight layer's local ``RowSource``.
  Exchanges, and queues the end-of-backward check on ``output``;
* ``problem(path, local, signals)`` for each weight layer in backward: the
  ``(source, signals, exchange)`` that ``weights.solve`` is to use instead of
  this rank's own ``local`` source and ``signals()``;
* ``parameter_gram(path)``: the averaged Gram of a layer that solves its own
  parameters (``LayerRule.parameter_gram``: BatchNorm's per-channel 2x2 entries);
* ``record_bad(path, what, exc=None)`` where a single process would raise, and
  ``failed``: whether this rank has seen a bad value since the last check.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import warnings
import zlib

import torch
import torch.distributed as dist
from torch import nn

if dist.is_available():
    # Its functions take ``group=group.WORLD`` as a default argument, evaluated on import: imported after
    # init_process_group (DistributedDataParallel's constructor imports it) they would hold the default
    # group, and gloo's threads, until the interpreter finalizes. Imported now they hold None.
    import torch.distributed.nn  # noqa: F401

from .errors import BackMatchError, GraphError, NonFiniteError, UnsupportedModuleError
from .weights import ExchangedGram, ExplicitRows, RowSource, Settings

#: what a rank can find bad, in the order of the code its flag carries (code = index + 1)
WHATS = ("input", "signal arriving at the output", "back-matched input signal", "back-matched weight gradient",
         "local computation")


def setup(model: nn.Module, mode: str, process_group=None):
    """``(module to hook, Comm or None)`` for :class:`~backmatch_exact.engine.Engine`.

    A ``DistributedDataParallel`` model is unwrapped (the hooks go on ``.module``)
    and, unless ``process_group`` is given, exchanges over the DDP instance's own
    process group (the default group when it has none). A plain model exchanges
    only when ``process_group`` is given. A group of one process exchanges nothing.
    """
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if isinstance(model, nn.DataParallel) and len(model.device_ids or []) > 1:
        raise UnsupportedModuleError(
            "nn.DataParallel replicates the model in every forward pass, which back-matching's hooks cannot follow; "
            "use DistributedDataParallel (one process per device)"
        )
    inner = model.module if ddp else model
    if process_group is None and not ddp:
        return inner, None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialized (init_process_group)")
    group = process_group if process_group is not None else (getattr(model, "process_group", None)
                                                             or dist.group.WORLD)
    size = dist.get_world_size(group)
    if size < 1:
        raise ValueError("this process is not a member of process_group")
    if size == 1:
        return inner, None
    return inner, Comm(group, mode)


def close_process_group(clean: bool = True) -> None:
    """Leave ``torch.distributed`` so that none of gloo's threads outlives this call (use it instead of
    ``dist.destroy_process_group()``).

    gloo runs each collective on a worker thread, which lets go of it (and of the tensors it was
    given) a moment *after* ``wait()`` has returned. When that is the last reference to a tensor
    made in Python, freeing it takes the GIL; if the interpreter has meanwhile begun to finalize,
    Python ends the thread with ``pthread_exit`` inside the work's destructor, which is
    ``noexcept``: ``std::terminate``, SIGABRT ("terminate called without an active exception").
    ``destroy_process_group()`` leaves those threads running whenever anything still holds the
    group (a live ``DistributedDataParallel`` model; ``torch.distributed.nn`` imported after
    ``init_process_group``, see the import at the top), so they run on into finalization.

    Here, with ``clean``, a barrier first: every rank is done with every collective, so nobody
    closes a connection a peer still reads (after Ctrl-C or an error pass ``clean=False``: the
    peers may be gone). Then garbage cycles are collected while the group is still registered,
    and the group is destroyed: its last reference goes from a ``ProcessGroup`` handle, whose
    destructor releases the GIL, and gloo's destructor joins its threads now, with the
    interpreter alive. Free the models that use the group first (return from the function that
    built them). If gloo threads still run afterwards (listed from /proc: Linux), a clean close
    raises ``RuntimeError`` and ``clean=False`` warns.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    functional = sys.modules.get("torch.distributed.nn.functional")
    pinned = functional is not None and any(
        dist.group.WORLD in (getattr(f, "__defaults__", None) or ()) for f in vars(functional).values())
    if clean:
        dist.barrier()
    gc.collect()  # now, while the group is registered: its last reference must not go in a collection (GIL held)
    dist.destroy_process_group()
    left = gloo_threads()
    if left:
        holder = ("torch.distributed.nn, imported after init_process_group, holds it as a default argument: "
                  "import backmatch_exact before init_process_group" if pinned else
                  "something still holds the process group (a DistributedDataParallel model?): free it first")
        message = (f"torch.distributed is destroyed but {len(left)} gloo threads still run ({', '.join(left)}): "
                   f"{holder}; otherwise those threads can abort the interpreter at exit")
        if clean:
            raise RuntimeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def wait_all(works) -> None:
    """Wait for every one of ``works``, also when waiting for one fails or is interrupted, then raise the first
    error: no collective is left running behind the caller (still writing into its tensors, which then
    only gloo's thread holds)."""
    error = None
    for work in works:
        try:
            work.wait()
        except BaseException as exc:  # noqa: BLE001 - Ctrl-C included: wait for the rest first, then raise it
            if error is None:
                error = exc
    if error is not None:
        raise error


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads still running (read from /proc; [] where there is none)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return sorted(names)


class Comm:
    """One engine's exchanges over one process group (``engine.distributed``)."""

    def __init__(self, group, mode: str):
        # The default group is named None, as torch.distributed names it: an engine outlives detach() for as
        # long as its last autograd graph refers to it, and must not keep the group (gloo's threads) alive
        # past close_process_group meanwhile.
        self.group = None if group is dist.group.WORLD else group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.global_ranks = []
        for q in range(self.size):
            try:
                self.global_ranks.append(dist.get_global_rank(group, q))
            except (RuntimeError, ValueError):
                self.global_ranks.append(q)
        self.exact = mode in ("exact", "exact_weights")
        self.layers: list[tuple[str, str]] = []
        self.index: dict[str, int] = {}
        self.settings = Settings()
        self.last_step: dict = {}
        self._bad = None  # (layer index, code, local exception): this rank's first bad value since the last check
        self._exchanged: dict[str, tuple] = {}  # layer path -> what the ranks agreed on for this step
        self._device = torch.device("cpu")
        self._masks: dict = {}

    def attach(self, layers: list[tuple[str, str]], settings: Settings) -> None:
        """``(path, kind)`` of the engine's modules in network order, and its solve settings."""
        self.layers, self.settings = list(layers), settings
        self.index = {path: i for i, (path, _) in enumerate(self.layers)}

    @property
    def failed(self) -> bool:
        """This rank has seen a bad value since the last check (its step fails there)."""
        return self._bad is not None

    def record_bad(self, path: str, what: str, exc: BaseException | None = None) -> None:
        """Remember this rank's first bad value; every rank raises at the next exchange instead of this one now."""
        if self._bad is None:
            code = WHATS.index(what) + 1 if what in WHATS else len(WHATS)
            self._bad = (self.index.get(path, -1), code, exc)

    def forward_end(self, calls: list, output, row_source) -> None:
        """End of a forward pass: queue the end-of-backward check; in exact modes, exchange."""
        self._device = calls[0].input.device
        self._exchanged = {}
        self.last_step = {"collectives": [], "payload_bytes": 0, "wire_bytes": 0, "seconds": 0.0}
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._queue_check)
        if self.exact:
            self._exchange(calls, row_source)

    def _queue_check(self, grad):
        torch.autograd.Variable._execution_engine.queue_callback(self._check)
        return None

    # ------------------------------------------------------- collectives
    def _timed(self, name: str, payload: int, wire: int, launch):
        start = time.perf_counter()
        wait_all(launch())
        step = self.last_step
        step["collectives"].append(name)
        step["payload_bytes"] += payload
        step["wire_bytes"] += wire
        step["seconds"] += time.perf_counter() - start

    def _allreduce_bytes(self, t: torch.Tensor) -> tuple[int, int]:
        n = t.numel() * t.element_size()
        return n, 2 * (self.size - 1) * n // self.size

    def _flags(self, columns: list[float]) -> torch.Tensor:
        """k x (len(columns) + 2) float64: this rank's row holds ``columns`` and its bad flag (code, layer + 1)."""
        flags = torch.zeros(self.size, len(columns) + 2, dtype=torch.float64)
        code, where = (self._bad[1], self._bad[0] + 1) if self._bad is not None else (0, 0)
        flags[self.rank] = torch.tensor(columns + [code, where], dtype=torch.float64)
        return flags.to(self._device)

    def _check(self) -> None:
        """End of backward: every rank learns whether any rank saw a bad value, and all raise together."""
        flags = self._flags([])
        self._timed("check", *self._allreduce_bytes(flags),
                    lambda: [dist.all_reduce(flags, group=self.group, async_op=True)])
        self._raise_if_bad(flags.cpu())

    def _raise_if_bad(self, flags: torch.Tensor) -> None:
        bad = [(q, int(code), int(where) - 1) for q, (code, where) in enumerate(flags.tolist()) if code > 0]
        if not bad:
            return
        mine = self._bad[2] if self._bad is not None else None
        self._bad = None
        parts = []
        for q, code, where in bad:
            place = (f"layer {self.layers[where][0]!r} ({self.layers[where][1]})" if 0 <= where < len(self.layers)
                     else "the model")
            what = WHATS[code - 1]
            problem = "failed" if what == "local computation" else "contains NaN or infinity"
            parts.append(f"rank {self.global_ranks[q]} of {self.size}: {place}: {what} {problem}")
        error = NonFiniteError if all(WHATS[code - 1] != "local computation" for _, code, _ in bad) else BackMatchError
        raise error("; ".join(parts) + " (torch.distributed: every rank of the process group raises this error)") \
            from mine

    # ---------------------------------------------------------- exchange
    def _triangle(self, d: int) -> torch.Tensor:
        key = (d, self._device)
        if key not in self._masks:
            self._masks[key] = torch.ones(d, d, dtype=torch.bool, device=self._device).triu()
        return self._masks[key]

    def _exchange(self, calls: list, row_source) -> None:
        """Agree on shapes and flags, then average the Grams / gather the rows of every layer."""
        k, me = self.size, self.rank
        local, affine, shapes = [], [], []
        for call in calls:
            path, rule, module = call.path, call.rule, call.module
            try:
                if rule.has_weights:
                    source = row_source(call)
                    local.append((call, source))
                    shapes.append((self.index[path], source.samples, source.d, source.batch))
                elif rule.solves_parameters(module):
                    a = call.input.detach()
                    # SyncBatchNorm: global statistics (a collective on every rank)
                    affine.append((path, rule.parameter_gram(module, a)))
                    shapes.append((self.index[path], *a.shape))
            except Exception as exc:  # noqa: BLE001 - a rank must not leave the others waiting in the header
                self.record_bad(path, "local computation", exc)
        first = calls[0].input
        batch = first.shape[0] if first.dim() > 1 else 1
        header = self._flags([float(batch), float(zlib.crc32(repr(shapes).encode()))])
        self._timed("header", *self._allreduce_bytes(header),
                    lambda: [dist.all_reduce(header, group=self.group, async_op=True)])
        header = header.cpu()
        self._raise_if_bad(header[:, 2:])
        batches = [int(b) for b in header[:, 0].tolist()]
        if len(set(batches)) > 1:
            raise BackMatchError(
                f"per-rank batch sizes differ ({batches}): exact back-matching under data parallelism averages the "
                "ranks' Grams and needs the same batch size on every rank (DistributedSampler gives every rank "
                "the same number of samples)"
            )
        if len(set(header[:, 1].tolist())) > 1:
            raise BackMatchError("the ranks' layer shapes differ (input sizes?): every rank must run the same shapes")

        send_rows = self.settings.solve_method == "dual" and not self.settings.weight_decay
        gram_parts, gram_plan, row_parts, row_plan = [], [], [], []
        for call, source in local:
            path, rule, module = call.path, call.rule, call.module
            dtype = self.settings.dtype_for(call.input.dtype)
            groups = rule.groups(module)  # (a grouped conv: one problem per group, shapes groups x ...)
            if k * source.samples <= source.d or send_rows:
                rows = rule.input_rows(module, call.input.detach()).to(dtype)
                row_parts.append(rows.reshape(-1))
                row_plan.append((path, groups, source.samples, source.d, source.batch))
            else:
                gram = source.gram(dtype)
                gram_parts.append(gram[..., self._triangle(source.d)].reshape(-1))
                gram_plan.append((path, "gram", (groups, source.d), (source.samples, source.batch), gram.dtype))
        for path, gram in affine:
            gram_parts.append(gram.reshape(-1))
            gram_plan.append((path, "affine", gram.numel(), None, gram.dtype))

        wire, payload = 0, 0
        grams = rows_local = gathered = None
        if gram_parts:
            dtype = torch.float64 if any(p.dtype == torch.float64 for p in gram_parts) else gram_parts[0].dtype
            grams = torch.cat([p.to(dtype) for p in gram_parts])
            n, w = self._allreduce_bytes(grams)
            payload, wire = payload + n, wire + w
        if row_parts:
            dtype = torch.float64 if any(p.dtype == torch.float64 for p in row_parts) else row_parts[0].dtype
            rows_local = torch.cat([p.to(dtype) for p in row_parts])
            gathered = [torch.empty_like(rows_local) for _ in range(k)]
            n = rows_local.numel() * rows_local.element_size()
            payload, wire = payload + n, wire + (k - 1) * n

        def launch():  # both buckets in flight at once
            works = []
            if grams is not None:
                works.append(dist.all_reduce(grams, group=self.group, async_op=True))
            if rows_local is not None:
                works.append(dist.all_gather(gathered, rows_local, group=self.group, async_op=True))
            return works

        if grams is not None or rows_local is not None:
            name = "+".join(n for n, x in (("grams", grams), ("rows", rows_local)) if x is not None)
            self._timed(name, payload, wire, launch)

        offset = 0
        if grams is not None:
            grams /= k
            for path, kind, size, counts, dtype in gram_plan:
                if kind == "gram":  # kept packed (half the memory) until the layer's solve unpacks it
                    groups, d = size
                    numel = groups * d * (d + 1) // 2
                    samples, batch = counts
                    self._exchanged[path] = ("gram", grams[offset:offset + numel], size, (k * samples, k * batch),
                                             dtype)
                else:
                    numel = size
                    self._exchanged[path] = ("affine", grams[offset:offset + numel].to(dtype))
                offset += numel
        offset = 0
        for path, groups, count, d, batch in row_plan:
            numel = groups * count * d
            everyone = torch.cat([part[offset:offset + numel].reshape(groups, count, d) for part in gathered], 1)
            self._exchanged[path] = ("rows", everyone[0] if groups == 1 else everyone, k * batch, me * count)
            offset += numel

    # ------------------------------------------------------------ backward
    def _agreed(self, path: str, kind: str) -> tuple:
        exchanged = self._exchanged.get(path)
        if exchanged is None or (exchanged[0] == "affine") != (kind == "affine"):
            raise GraphError(f"layer {path!r}: backward pass without the forward pass's exchange "
                             "(was the forward run under torch.no_grad()?)")
        return exchanged

    def parameter_gram(self, path: str) -> torch.Tensor:
        """The ranks' average of a layer's ``LayerRule.parameter_gram``."""
        return self._agreed(path, "affine")[1]

    def problem(self, path: str, local: RowSource, signals):
        """``(source, signals, exchange)`` for ``weights.solve``: the agreed Gram, or every rank's rows."""
        exchanged = self._agreed(path, "weights")
        if exchanged[0] == "gram":
            _, packed, (groups, d), (samples, batch), dtype = exchanged
            upper = packed.new_zeros(groups, d, d)
            upper[..., self._triangle(d)] = packed.view(groups, -1)
            gram = (upper + upper.triu(1).mT).to(dtype)
            return ExchangedGram(gram[0] if groups == 1 else gram, samples, batch), signals, "gram"
        _, everyone, batch, start = exchanged

        def padded():  # this rank's signals in its own rows, zero elsewhere: Sᵀ A_all = g_r
            own = signals()
            rows = own.new_zeros(*own.shape[:-2], everyone.shape[-2], own.shape[-1])
            rows[..., start:start + own.shape[-2], :] = own
            return rows

        return ExplicitRows(everyone, batch), padded, "rows"
