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
computed from the averaged ``G``). BatchNorm's γ is solved the same way with its
per-channel Gram ``G_γ``; β needs nothing (``g'_β = g_β / L``).

The per-rank signals are the single-process ones (every signal rule is per
sample) except at BatchNorm: a plain BatchNorm normalizes with its rank's own
batch statistics (as DistributedDataParallel does) and its back-matching rule
uses the same local σ; a ``SyncBatchNorm`` normalizes with the global batch
statistics and its rule all-reduces the per-channel sums so σ is global too
(``layers/batchnorm.py``), which makes the whole step equal the single-process
one. Approx mode needs no communication at all: its factors come from the
weights and shapes, which are the same on every rank, and its scaling is linear.

Communication per training step (exact and exact_weights)
---------------------------------------------------------
At the end of the forward pass, once per step:

1. ``header``: a k x 4 all-reduce (each rank's batch size, a checksum of its
   layer shapes, and a bad-value flag); every rank refuses the step together
   when the batch sizes or shapes differ, or when some rank saw a NaN input;
2. one all-reduce bucket with the upper triangles of every "gram" layer's
   ``G_r`` (and every affine BatchNorm's ``G_γ``), and one all-gather bucket with
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
"""

from __future__ import annotations

import functools
import time
import zlib

import torch
import torch.distributed as dist
from torch import nn

from . import solver
from .errors import BackMatchError, GraphError, NonFiniteError, UnsupportedModuleError
from .layers.base import signal_amplification
from .layers.batchnorm import _reduce_dims, normalized

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


class Comm:
    """One engine's exchanges over one process group (``engine.distributed``)."""

    def __init__(self, group, mode: str):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.global_ranks = []
        for q in range(self.size):
            try:
                self.global_ranks.append(dist.get_global_rank(group, q))
            except (RuntimeError, ValueError):
                self.global_ranks.append(q)
        self.exact = mode in ("exact", "exact_weights")
        self.layers: list = []
        self.index: dict[str, int] = {}
        self.last_step: dict = {}
        self._bad = None  # (layer index, code, local exception): this rank's first bad value since the last check
        self._exchanged: dict[str, tuple] = {}  # layer path -> what the ranks agreed on for this step
        self._device = torch.device("cpu")
        self._masks: dict = {}

    # ---------------------------------------------------------------- hooks
    def install(self, engine) -> None:
        """Hook the end of the engine's model's forward pass (after the engine's own hook)."""
        self.layers = engine.layers
        self.index = {layer.path: i for i, layer in enumerate(engine.layers)}
        engine._handles.append(engine.model.register_forward_hook(functools.partial(self._forward_end, engine)))

    def record_bad(self, layer, what: str, exc: BaseException | None = None) -> None:
        """Remember this rank's first bad value; every rank raises at the next exchange instead of this one now."""
        if self._bad is None:
            code = WHATS.index(what) + 1 if what in WHATS else len(WHATS)
            self._bad = (self.index.get(layer.path, -1), code, exc)

    def _forward_end(self, engine, module, args, output):
        if not torch.is_grad_enabled() or not engine._calls:
            return None
        self._device = engine._calls[0].input.device
        self._exchanged = {}
        self.last_step = {"collectives": [], "payload_bytes": 0, "wire_bytes": 0, "seconds": 0.0}
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._queue_check)
        if self.exact:
            self._exchange(engine)
        return None

    def _queue_check(self, grad):
        torch.autograd.Variable._execution_engine.queue_callback(self._check)
        return None

    # ------------------------------------------------------- collectives
    def _timed(self, name: str, payload: int, wire: int, launch):
        start = time.perf_counter()
        works = launch()
        for work in works:
            work.wait()
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
            layer = self.layers[where] if 0 <= where < len(self.layers) else None
            place = f"layer {layer.path!r} ({type(layer.module).__name__})" if layer is not None else "the model"
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

    def _exchange(self, engine) -> None:
        """End of forward: agree on shapes and flags, then average the Grams / gather the rows of every layer."""
        k, me = self.size, self.rank
        weights, affine, shapes = [], [], []
        for call in engine._calls:
            layer = call.layer
            rule, module = layer.rule, layer.module
            try:
                if rule.has_weights:
                    a = call.input.detach()
                    rows = rule.input_rows(module, a)
                    batch = a.shape[0] if a.dim() > 1 else 1
                    weights.append((layer, rows, batch))
                    shapes.append((self.index[layer.path], *rows.shape, batch))
                elif rule.needs_output_signal and getattr(module, "weight", None) is not None:
                    a = call.input.detach()
                    x_hat = normalized(module, a)  # SyncBatchNorm: global statistics (a collective on every rank)
                    affine.append((layer, (x_hat * x_hat).sum(dim=_reduce_dims(a)) / a.shape[0]))
                    shapes.append((self.index[layer.path], *a.shape))
            except Exception as exc:  # noqa: BLE001 - a rank must not leave the others waiting in the header
                self.record_bad(layer, "local computation", exc)
        first = engine._calls[0].input
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

        method = engine.solve_method
        dual_ok = not engine.weight_decay
        gram_parts, gram_plan, row_parts, row_plan = [], [], [], []
        for layer, rows, batch in weights:
            count, d = rows.shape
            rows = rows.to(solver.solve_dtype(rows.dtype))
            if k * count <= d or (method == "dual" and dual_ok):
                row_parts.append(rows.reshape(-1))
                row_plan.append((layer, count, d, batch))
            else:
                gram = rows.T @ rows / batch  # as solver.min_norm_solve forms it
                gram_parts.append(gram[self._triangle(d)])
                gram_plan.append((layer, "gram", d, batch, gram.dtype))
        for layer, gram in affine:
            gram_parts.append(gram.reshape(-1))
            gram_plan.append((layer, "affine", gram.numel(), 0, gram.dtype))

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
            for layer, kind, size, batch, dtype in gram_plan:
                if kind == "gram":  # kept packed (half the memory) until the layer's solve unpacks it
                    numel = size * (size + 1) // 2
                    self._exchanged[layer.path] = ("gram", grams[offset:offset + numel], size, k * batch, dtype)
                else:
                    numel = size
                    self._exchanged[layer.path] = ("affine", grams[offset:offset + numel].to(dtype))
                offset += numel
        offset = 0
        for layer, count, d, batch in row_plan:
            numel = count * d
            everyone = torch.cat([part[offset:offset + numel].reshape(count, d) for part in gathered])
            self._exchanged[layer.path] = ("rows", everyone, k * batch, me * count)
            offset += numel

    # ------------------------------------------------------------ backward
    def output_signal(self, engine, call, grad: torch.Tensor) -> None:
        """``Engine._output_signal`` under distribution: record bad signals, solve with the agreed Grams."""
        layer = call.layer
        if not bool(torch.isfinite(grad).all()):
            self.record_bad(layer, "signal arriving at the output")
        call.grad_output = grad
        rule, module = layer.rule, layer.module
        if rule.has_weights:
            self._solve_weights(engine, call, grad)
        elif rule.needs_output_signal and getattr(module, "weight", None) is not None:
            exchanged = self._agreed(layer, "affine")
            solved, call.plain_grads = rule.affine_gradients(module, call.input.detach(), grad, engine.weight_decay,
                                                             gram_gamma=exchanged[1])
            for name, value in solved.items():
                engine._pending[getattr(module, name)] = value

    def _agreed(self, layer, kind: str) -> tuple:
        exchanged = self._exchanged.get(layer.path)
        if exchanged is None or (exchanged[0] == "affine") != (kind == "affine"):
            raise GraphError(f"layer {layer.path!r}: backward pass without the forward pass's exchange "
                             "(was the forward run under torch.no_grad()?)")
        return exchanged

    def _solve_weights(self, engine, call, grad: torch.Tensor) -> None:
        layer = call.layer
        rule, module = layer.rule, layer.module
        exchanged = self._agreed(layer, "weights")
        a = call.input.detach()
        rows = rule.input_rows(module, a)
        signals = rule.signal_rows(module, grad)
        plain = signals.T @ rows  # this rank's g_W; the data-parallel gradient average finishes the mean
        call.plain_grads = rule.unflatten(module, plain)
        total = plain + engine.weight_decay * rule.flat_weight(module).detach() if engine.weight_decay else plain
        dual_ok = not engine.weight_decay
        solved, info = torch.zeros_like(total), None
        if self._bad is None:  # else the step fails at the check anyway: skip the work
            try:
                if exchanged[0] == "gram":
                    _, packed, d, batch, dtype = exchanged
                    upper = packed.new_zeros(d, d)
                    upper[self._triangle(d)] = packed
                    gram = (upper + upper.triu(1).T).to(dtype)
                    solved, info = solver.primal_solve(gram, total, engine.damping, engine.relative_damping, layer.path)
                    samples = self.size * rows.shape[0]
                else:
                    _, everyone, batch, start = exchanged
                    padded = None
                    if dual_ok:  # this rank's signals in its own rows, zero elsewhere: Sᵀ A_all = g_r
                        padded = signals.new_zeros(everyone.shape[0], signals.shape[1])
                        padded[start:start + signals.shape[0]] = signals
                    solved, info = solver.min_norm_solve(
                        everyone, padded, total, batch, engine.damping, engine.relative_damping,
                        engine.solve_method if dual_ok else "primal", layer.path)
                    samples = everyone.shape[0]
            except BackMatchError as exc:
                self.record_bad(layer, "back-matched weight gradient", exc)
                solved, info = torch.zeros_like(total), None
        for name, value in rule.unflatten(module, solved).items():
            engine._pending[getattr(module, name)] = value
        if info is not None:
            engine._stats[layer.path] = {
                "layer": layer.path, "kind": type(module).__name__, "d": rows.shape[1],
                "outputs": signals.shape[1], "samples": samples, "batch": batch, "path": info.path,
                "rank": info.rank, "condition": info.condition, "residual": info.residual, "damping": info.damping,
                "amplification": signal_amplification(rule.column_sq_norms(module, a), engine.signal_damping),
                "fallback": info.fallback, "exchange": exchanged[0],
            }
