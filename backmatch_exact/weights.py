"""One weight layer's least-squares problem: from its input rows and output signals to ``g'_W`` and a stats row.

A weight layer (Linear; Conv2d in its im2col view, eq. 19) computes ``b = W̃ ã``
for every sample and location. With its input rows ``A`` (N x d: one row per
sample and location, a column of ones for a bias) and the signals at its
outputs ``S`` (N x n, carrying the loss's 1/B), the ordinary gradient is
``g_W = Sᵀ A`` and back-matching (eq. 13/23) asks for

    g'_W = (g_W + wd·W̃) · (G + λI)⁺,      G = AᵀA / B

(mean over the B samples, sum over locations; weight decay added before the
solve, paper §3.2). :func:`solve` is the only place this is computed. Where the
rows come from is a plug-in, a :class:`RowSource`:

* :class:`ExplicitRows` — A itself: the reference backend, Linear layers, the
  rows gathered from every rank under ``torch.distributed``;
* a rule's fast source — ``Conv2dRule.row_source`` forms ``AᵀA`` by 2-D lags or
  products of input rows, ``AAᵀ`` from the pixel Gram and ``C·A`` by a weight-gradient convolution,
  never the im2col matrix;
* :class:`ExchangedGram` — the ranks' averaged Gram (``distributed.py``): the primal form only.

The dtype the Gram is formed and factored in is ``settings.solve_dtype``; by
default (None) float64 for float64 models, and for float32 and half models
float32 where a float32 Cholesky proves the Gram well conditioned, float64 where
it does not (a float32 eigendecomposition would cut directions the data has:
``solver.SolveInfo.resolved``). A Gram rounded elsewhere (``ExchangedGram``) cannot
be formed again: it is factored in float32 and its stats row says whether that
resolved it. The answer always has the parameters' dtype.

:func:`solve` answers at once. The engine's batched path splits it: :func:`defer`
forms the problem during backward, ``solver.factor_batch`` factors it at the end of
the backward pass together with the other layers' problems of its size, and
:func:`complete` finishes it from the checks read back there, the per-layer way on
(float64, eigh) where the batched Cholesky does not prove the Gram.

Primal or dual: the N x N dual form (``solver.dual_problem``) is used when the
source can give the kernel ``AAᵀ``, there is no weight decay (``wd·W̃`` lies
outside A's row space, where the dual cannot reach) and either
``solve_method="dual"`` or ``"auto"`` with N < d.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch

from . import solver
from .timing import NO_TIMING, Timing


class RowSource:
    """The input rows ``A`` of one weight problem, in whatever form is cheapest to use.

    ``samples`` (N) and ``d`` are A's shape, ``batch`` (B) the number of samples its rows come from.
    """

    samples: int
    d: int
    batch: int
    #: the Gram can be formed again in float64 from the rows (not from a Gram rounded elsewhere)
    reformable: bool = True

    def gram(self, dtype: torch.dtype) -> torch.Tensor:
        """``G = AᵀA / B`` (d x d) in ``dtype``."""
        raise NotImplementedError

    def kernel(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``AAᵀ`` (N x N, a fresh tensor the solve may overwrite) in ``dtype``; None: only the primal form."""
        return None

    def times_rows(self, coeffs: torch.Tensor) -> torch.Tensor:
        """``C·A`` for ``C`` (r x N) in row order; with ``C = Sᵀ`` this is ``g_W``."""
        raise NotImplementedError


class ExplicitRows(RowSource):
    """``A`` as a matrix (N x d)."""

    def __init__(self, rows: torch.Tensor, batch: int):
        self.rows, self.batch = rows, batch  # (N x d, or groups x N x d)
        self.samples, self.d = rows.shape[-2:]

    def gram(self, dtype):
        rows = self.rows.to(dtype)
        return rows.mT @ rows / self.batch

    def kernel(self, dtype):
        rows = self.rows.to(dtype)
        return rows @ rows.mT

    def times_rows(self, coeffs):
        return coeffs @ self.rows.to(coeffs.dtype)


class ExchangedGram(RowSource):
    """A Gram formed elsewhere (the ranks' average): the primal form only."""

    reformable = False

    def __init__(self, gram: torch.Tensor, samples: int, batch: int):
        self._gram, self.samples, self.batch = gram, samples, batch
        self.d = gram.shape[-1]

    def gram(self, dtype):
        return self._gram.to(dtype)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What ``attach`` says about every weight solve."""

    damping: float = 0.0  # λ
    relative_damping: bool = True  # λ · mean(diag G) instead of λ
    weight_decay: float = 0.0
    solve_method: str = "auto"  # "auto" | "primal" | "dual"
    solve_dtype: torch.dtype | None = None  # the Gram's dtype; None: float32 or float64 (module docstring)

    def dtype_for(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a layer whose parameters have ``dtype`` forms and factors its Gram in."""
        return self.solve_dtype or solver.solve_dtype(dtype)


def uses_dual(source: RowSource, settings: Settings) -> bool:
    """Whether :func:`solve` takes the N x N dual form for ``source``."""
    if settings.weight_decay or settings.solve_method == "primal" or isinstance(source, ExchangedGram):
        return False
    return settings.solve_method == "dual" or source.samples < source.d


def solve(source: RowSource, plain: torch.Tensor, signals: Callable[[], torch.Tensor], weight: torch.Tensor,
          settings: Settings, layer: str = "", timing: Timing = NO_TIMING,
          identity_scale: float | None = None) -> tuple[torch.Tensor, solver.SolveInfo]:
    """``g'_W`` (n x d, laid out like ``weight``) and what the solve did.

    ``plain``: ``g_W = Sᵀ A``; ``signals()``: S (N x n, rows in the source's
    order), asked for only by the dual form; ``weight``: ``W̃`` for the weight
    decay. ``identity_scale=s``: Algorithm 1's approximation ``G ≈ s·I``, so
    ``g'_W = (g_W + wd·W̃) / s`` and nothing is factored. The dtype: see the module docstring.
    """
    if identity_scale is not None:
        total = plain + settings.weight_decay * weight if settings.weight_decay else plain
        nan, groups = float("nan"), total.shape[0] if total.dim() == 3 else 1
        return total / identity_scale, solver.SolveInfo("identity", source.d, groups * source.d, nan, 0.0, nan,
                                                        groups=groups)
    dtype = settings.dtype_for(plain.dtype)
    may_escalate = _may_escalate(dtype, source, settings)
    problem = _problem(dtype, source, plain, signals, weight, settings, layer, timing)
    solved = _solve_now(problem, layer, timing, cholesky_only=may_escalate)
    if solved is None:
        return _escalated(dtype, source, plain, signals, weight, settings, layer, timing)
    return solved


@dataclasses.dataclass(eq=False)
class Deferred:
    """A weight solve formed now, factored later with others of its size (:func:`defer`, :func:`complete`)."""

    problem: solver.Problem  # in the dtype :func:`solve` tries first
    escalate: Callable | None  # solve's float64 answer where that dtype was a first try, else None


def defer(source: RowSource, plain: torch.Tensor, signals: Callable[[], torch.Tensor], weight: torch.Tensor,
          settings: Settings, layer: str = "", timing: Timing = NO_TIMING) -> Deferred:
    """:func:`solve`'s first half (no ``identity_scale``): the problem formed, for ``solver.factor_batch``."""
    dtype = settings.dtype_for(plain.dtype)
    escalate = None
    if _may_escalate(dtype, source, settings):
        escalate = functools.partial(_escalated, dtype, source, plain, signals, weight, settings, layer, timing)
    return Deferred(_problem(dtype, source, plain, signals, weight, settings, layer, timing), escalate)


def complete(deferred: Deferred, answer: torch.Tensor, residual, read: list[float], layer: str = "",
             timing: Timing = NO_TIMING) -> tuple[torch.Tensor, solver.SolveInfo]:
    """:func:`solve`'s second half, from ``solver.factor_batch``'s answer and its values read back: the
    answer where the pivots prove it, otherwise solve's own way on from there (float64, or eigh)."""
    solved = solver.accept(deferred.problem, answer, residual, read, layer)
    if solved is not None:
        return solved
    if deferred.escalate is not None:
        return deferred.escalate()
    return solver.eigh_solve(deferred.problem, read, layer, timing)


def _may_escalate(dtype: torch.dtype, source: RowSource, settings: Settings) -> bool:
    # the default for float32 and half models: a float32 answer only where the float32 Cholesky proves it
    # (pivot condition below 1/sqrt(eps), about 3e3), otherwise the Gram is formed and factored in float64
    return settings.solve_dtype is None and dtype != torch.float64 and source.reformable


def _escalated(dtype, source, plain, signals, weight, settings, layer, timing):
    """:func:`solve` in float64 after ``dtype``'s Cholesky did not prove the Gram."""
    solved, info = _solve_now(_problem(torch.float64, source, plain, signals, weight, settings, layer, timing),
                              layer, timing)
    info.fallback = "; ".join(filter(None, [f"{dtype_name(dtype)} Cholesky not proven: float64", info.fallback]))
    return solved, info


def _problem(dtype, source, plain, signals, weight, settings, layer, timing) -> solver.Problem:
    """The Gram (or kernel) formed in ``dtype`` and the right-hand side: ``solver.primal_problem`` / ``dual_problem``."""
    if uses_dual(source, settings):
        with timing.part(layer, "gram"):
            kernel = source.kernel(dtype)
        with timing.part(layer, "weight_grad"):
            rows_signals = signals()
        with timing.part(layer, "dual"):
            return solver.dual_problem(kernel, rows_signals, plain, source.batch, source.times_rows, source.d,
                                       settings.damping, settings.relative_damping)
    with timing.part(layer, "gram"):
        gram = source.gram(dtype)
    total = plain + settings.weight_decay * weight if settings.weight_decay else plain
    return solver.primal_problem(gram, total, settings.damping, settings.relative_damping)


def _solve_now(problem, layer, timing, cholesky_only=False):
    """``solver.solve``, the dual form timed as one part ("dual", as its forming in :func:`_problem` is)."""
    if problem.form:
        with timing.part(layer, "dual"):
            return solver.solve(problem, layer, cholesky_only=cholesky_only)
    return solver.solve(problem, layer, timing, cholesky_only)


def stats_row(layer: str, kind: str, source: RowSource, outputs: int, info: solver.SolveInfo,
              amplification) -> dict:
    """The row ``engine.stats()`` reports for one weight layer (see ``Engine.stats``; for a grouped layer
    ``d`` is per group, ``rank`` summed over the groups, ``condition`` the largest)."""
    return {"layer": layer, "kind": kind, "d": source.d, "outputs": outputs, "samples": source.samples,
            "batch": source.batch, "groups": info.groups, "path": info.path, "rank": info.rank,
            "condition": info.condition, "residual": info.residual, "damping": info.damping, "amplification": amplification,
            "fallback": info.fallback, "solve_dtype": dtype_name(info.dtype), "resolved": info.resolved}


def unresolved_message(layer: str, info: solver.SolveInfo) -> str:
    """What to tell the user about a layer whose answer ``info`` says is not resolved, and what resolves it."""
    name = dtype_name(info.dtype)
    remedy = ("damping > 0 bounds the condition" if info.dtype == torch.float64
              else "attach(..., solve_dtype=torch.float64) forms and factors it in float64")
    return (f"layer {layer!r}: the {name} weight solve does not resolve its Gram (condition {info.condition:.3g}, "
            f"times eps({name}) = {info.condition * torch.finfo(info.dtype).eps:.2g}; rank kept {info.rank}): "
            f"its back-matched gradient may point elsewhere than the exact one; {remedy}")


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")
