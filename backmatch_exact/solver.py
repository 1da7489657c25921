"""The numerics every layer shares: safe division, damping, and the one factorization of a PSD matrix.

Back-matching's weight solve (eq. 13/23) asks for ``g'_W = g_W · (G + λI)⁺``, the
minimum-norm least-squares answer, for a symmetric positive semi-definite ``G``
that is often singular. :func:`factor_solve` is the one place that answers
``rhs · M⁺`` for such a matrix ``M``:

1. Cholesky (``torch.linalg.cholesky_ex``), accepted only when its pivots prove
   ``M`` well conditioned: a float32 Cholesky of a singular Gram "succeeds" with
   tiny pivots and returns garbage. The factorization's status, the pivot
   condition and the finiteness of the answer are read back in one host sync.
2. Otherwise a symmetric eigendecomposition whose eigenvalues below
   ``size·eps·λ_max`` are cut (rounding noise of a zero eigenvalue): the
   pseudo-inverse. If ``eigh`` fails it is retried in float64, then in float64
   with a little jitter on the diagonal; if that fails too, :class:`SolveError`.

Whether the dtype *resolves* the answer (``SolveInfo.resolved``): rounding a
Gram's entries moves its eigenvalues by about ``eps·λ_max`` (measured: at most
6·eps·λ_max for float32 Grams of order 400–2300 whose exact zero eigenvalues
came out as noise), so eigenvalues above the noise floor ``√size·eps·λ_max``
are the data's own. The answer is resolved when the solve kept all of them and
their condition κ has ``κ·eps ≤`` :data:`RESOLVED_ERROR` (the answer then
carries about three correct digits). An eigenvalue between the floor and the
cut is a direction of the data that the dtype cannot tell from noise: in float32
at κ ≈ 5e4 (VGG11's features.11, batch 32) the cut drops most of the spectrum
and the answer points elsewhere than float64's.

A weight solve is a :class:`Problem`: :func:`primal_problem` (factor the d x d
``G + λI``) or :func:`dual_problem` (factor the N x N ``AAᵀ + λB·I``, cheaper when
N < d); :func:`solve` factors one with :func:`factor_solve`. ``weights.py`` decides
which form a layer uses.

A problem can also be factored later with others: :func:`factor_batch` factors the
problems of one form, size, dtype and device in one call and reads nothing back,
so that the caller reads every problem's checks in the same host sync; then
:func:`accept` takes the answer where the pivots prove it and :func:`eigh_solve`
goes on where they do not. :func:`solve` is the same for one problem, read at once.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Callable

import torch

from .errors import NonFiniteError, SolveError
from .timing import NO_TIMING, Timing


def safe_divide(x: torch.Tensor, d, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``x / d``, and 0 where ``d`` is 0 (or where ``keep`` is False): the minimum-norm answer there.

    One division: a dropped denominator becomes +inf, and a finite ``x`` over it is 0. ``d`` may be a number.
    """
    if not isinstance(d, torch.Tensor):
        return x / d if d != 0 else torch.zeros_like(x)
    keep = d != 0 if keep is None else keep
    return x / torch.where(keep, d, torch.inf)


@dataclasses.dataclass
class SolveInfo:
    """What one weight solve did, for ``engine.stats()``."""

    path: str  # "cholesky" | "eigh" | "dual-cholesky" | "dual-eigh" | "identity" (Algorithm 1's G ≈ s·I)
    size: int  # order of the factored matrix (d for primal, N for dual)
    rank: int  # numerical rank of the factored matrix
    condition: float  # Cholesky: (max/min pivot)²; eigh: ratio of the kept eigenvalues
    damping: float  # absolute λ actually added to G
    residual: object  # ‖X (G + λI) - g_W‖ / ‖g_W‖: a callable that computes it (only if stats() reads it)
    fallback: str = ""  # non-empty when eigh failed and was retried
    resolved: bool = True  # the solve dtype resolves the answer (see the module docstring)
    dtype: torch.dtype | None = None  # the dtype the matrix was formed and factored in
    groups: int = 1  # independent problems solved in one batch (a grouped conv's)


#: largest ``κ·eps`` of a resolved answer: its relative error is about κ times the Gram's rounding (≈ eps)
RESOLVED_ERROR = 1e-3


def solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """Solves run in at least float32; float64 models solve in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def max_cholesky_condition(dtype: torch.dtype) -> float:
    """Largest pivot condition for which a Cholesky answer is trusted.

    At condition κ a Cholesky solve loses about κ·eps of relative accuracy;
    1/sqrt(eps) keeps about half the digits (≈3e3 in float32, ≈7e7 in float64).
    Above it the eigendecomposition decides what is rank and what is noise.
    """
    return torch.finfo(dtype).eps ** -0.5


def absolute_damping(diagonal_mean: torch.Tensor, damping: float, relative: bool):
    """λ to add to G: ``damping`` itself, or ``damping · mean(diag G)`` as a float64 tensor on G's device (the
    product Python's float would give): nothing is read back to the host here, λ is read with the checks."""
    if damping == 0.0:
        return 0.0
    return damping * diagonal_mean.double() if relative else damping


@dataclasses.dataclass(eq=False)
class Problem:
    """One weight solve ``rhs · matrix⁺``, formed and not yet factored (:func:`primal_problem`, :func:`dual_problem`).

    :func:`solve` factors it on its own; :func:`factor_batch` with others of its form and size, then
    :func:`accept` or :func:`eigh_solve` finish it.
    """

    form: str  # "" (primal) or "dual-": the prefix of SolveInfo.path
    matrix: torch.Tensor  # (groups x) size x size, λ added, in the solve dtype
    rhs: torch.Tensor  # (groups x) r x size, in the solve dtype
    damping: torch.Tensor | float  # absolute λ (a device tensor when relative: absolute_damping)
    answer: Callable  # x = rhs · matrix⁺ ↦ (g'_W in the solve dtype, its residual as a callable)
    dtype: torch.dtype  # the gradient's: g'_W is returned in it


def primal_problem(gram: torch.Tensor, grad: torch.Tensor, damping: float = 0.0,
                   relative_damping: bool = True) -> Problem:
    """``grad · (G + λI)⁺`` from the d x d Gram ``G = AᵀA / B`` (or a batch of them, one λ for all), in ``gram``'s
    dtype."""
    g = grad.to(gram.dtype)
    lam = absolute_damping(torch.diagonal(gram, dim1=-2, dim2=-1).mean(), damping, relative_damping)
    matrix = gram
    if damping:
        matrix = gram.clone()
        matrix.diagonal(dim1=-2, dim2=-1).add_(lam)

    def answer(x):
        return x, functools.partial(_primal_residual, x, matrix, g)  # (g = 0 gives x = 0 and a residual of 0)

    return Problem("", matrix, g, lam, answer, grad.dtype)


def dual_problem(kernel: torch.Tensor, signals: torch.Tensor, grad: torch.Tensor, batch_size: int, times_rows,
                 d: int, damping: float = 0.0, relative_damping: bool = True) -> Problem:
    """The dual (push-through) form ``grad · (G + λI)⁺ = B · Sᵀ (AAᵀ + λB·I)⁺ A``, for N < d.

    ``kernel``: ``K = AAᵀ`` (N x N; overwritten), in the solve dtype; ``signals``: S (N x n);
    ``times_rows(C)``: ``C·A``. ``grad`` must be ``Sᵀ A`` exactly (no weight
    decay, which lies outside A's row space); only its norm is read. λ comes
    from ``mean diag G = tr(K) / (B·d)``. The residual of the normal equations is
    ``‖R A‖ / ‖g‖`` with ``R = C (K + λB·I) - Sᵀ``, which is ``x (G + λI) - g``.
    All may carry one leading batch dimension, as in :func:`primal_problem`.
    """
    s = signals.to(kernel.dtype)
    diagonal = torch.diagonal(kernel, dim1=-2, dim2=-1)
    lam = absolute_damping(diagonal.mean() * kernel.shape[-1] / (batch_size * d), damping, relative_damping)
    if damping:
        diagonal.add_(lam * batch_size)

    def answer(coeffs):  # coeffs = Sᵀ K⁺
        return batch_size * times_rows(coeffs), functools.partial(_dual_residual, times_rows, coeffs, kernel, s,
                                                                 grad)

    return Problem("dual-", kernel, s.mT, lam, answer, grad.dtype)


def solve(problem: Problem, layer: str = "", timing: Timing = NO_TIMING, cholesky_only: bool = False):
    """``(g'_W, SolveInfo)`` for ``problem`` factored on its own (:func:`factor_solve`; λ and the checks are read
    back here); None where ``cholesky_only`` and the pivots do not prove the matrix."""
    factored = factor_solve(problem.matrix, problem.rhs, layer, timing, cholesky_only)
    if factored is None:
        return None
    return _conclude(problem, factored, float(problem.damping), layer)


def factor_solve(matrix: torch.Tensor, rhs: torch.Tensor, layer: str = "", timing: Timing = NO_TIMING,
                 cholesky_only: bool = False):
    """``rhs · matrix⁺`` for a symmetric PSD ``matrix`` (m x m) and ``rhs`` (r x m), both in the solve dtype.

    Both may carry one leading batch dimension (a grouped conv's independent problems, factored in one
    call). Returns ``(x, path, rank, condition, fallback, resolved)`` with ``path`` "cholesky" or "eigh"
    (see the module docstring for when each runs; one problem the pivots do not prove sends the whole
    batch to eigh), ``rank`` summed and ``condition`` the largest over the batch. An accepted Cholesky is
    resolved (``κ·eps < sqrt(eps)``); eigh's ``condition`` is that of the eigenvalues above the noise
    floor, the kept ones when resolved. ``cholesky_only``: None instead of the eigendecomposition when
    the pivots do not prove ``matrix``.
    """
    with timing.part(layer, "factor"):
        chol, info = torch.linalg.cholesky_ex(matrix)
        conditions = _pivot_conditions(chol)
    with timing.part(layer, "solve"):
        x = _solve_factored(rhs, chol)
        failed, condition = torch.stack(_checks(info, conditions, x)).tolist()  # one read-back for all three
    if failed == 0 and condition < max_cholesky_condition(matrix.dtype):
        return x, "cholesky", _rank(matrix), condition, "", True
    if cholesky_only:
        return None
    return _eigh_solve(matrix, rhs, layer, timing)


def factor_batch(problems: list[Problem], layers: list[str], timing: Timing = NO_TIMING) -> list[tuple]:
    """Cholesky solutions of ``problems`` with one ``torch.linalg.cholesky_ex`` per group of the same form, size,
    dtype and device, reading nothing back.

    Within a group the problems with right sides of one shape are solved together (one pair of triangular solves). Per
    problem ``(answer, residual, values)``: the answer as ``problem.answer`` gives it, and the 0-d tensors
    :func:`accept` needs read back: the factorization's status, the pivot condition (nan where the solution
    is not finite), λ where it is a tensor, and for the dual form the answer's extremes (``C·A`` is not the
    solution the condition checks). On the CPU a batched call factors each matrix as the single call would.
    ``layers``: the problems' layer names, for ``timing`` (a group of several is timed as "batched <size>").
    """
    results = [None] * len(problems)
    groups: dict[tuple, list[int]] = {}
    for i, problem in enumerate(problems):
        matrix = problem.matrix
        groups.setdefault((problem.form, matrix.shape[-1], matrix.dtype, matrix.device), []).append(i)
    for (form, size, _, _), members in groups.items():
        members.sort(key=lambda i: problems[i].rhs.shape[-2])  # equal right sides side by side
        counts = [problems[i].matrix.numel() // (size * size) for i in members]  # (a grouped conv: several)
        matrices = [problems[i].matrix.reshape(-1, size, size) for i in members]
        name = layers[members[0]] if len(members) == 1 else f"batched {form}{size}"
        with timing.part(name, "factor"):
            chol, info = torch.linalg.cholesky_ex(matrices[0] if len(matrices) == 1 else torch.cat(matrices))
            conditions = _pivot_conditions(chol)
        with timing.part(name, "solve"):
            start = 0
            for _, run in itertools.groupby(zip(members, counts), key=lambda pair: problems[pair[0]].rhs.shape[-2]):
                run = list(run)
                rhs = [problems[i].rhs.reshape(count, *problems[i].rhs.shape[-2:]) for i, count in run]
                stop = start + sum(count for _, count in run)
                solved = _solve_factored(rhs[0] if len(rhs) == 1 else torch.cat(rhs), chol[start:stop])
                offset = 0
                for i, count in run:
                    problem, mine = problems[i], slice(start + offset, start + offset + count)
                    x = solved[offset:offset + count]
                    offset += count
                    answer, residual = problem.answer(x.reshape(problem.rhs.shape))
                    values = _checks(info[mine], conditions[mine], x)
                    if isinstance(problem.damping, torch.Tensor):
                        values.append(problem.damping)
                    if form:
                        values += extremes(answer)
                    results[i] = answer, residual, values
                start = stop
    return results


def accept(problem: Problem, answer: torch.Tensor, residual, read: list[float], layer: str = ""):
    """:func:`factor_batch`'s answer to ``problem`` as :func:`solve` gives it, from its ``values`` read back; None
    where the pivots do not prove the matrix (then :func:`eigh_solve`, as :func:`solve` would go on)."""
    failed, condition, damping, bounds = _unpack(problem, read)
    if failed != 0 or not condition < max_cholesky_condition(problem.matrix.dtype):
        return None
    path = problem.form + "cholesky"
    if not all(math.isfinite(v) for v in bounds):
        raise NonFiniteError(f"layer {layer}: the back-matched weight gradient is not finite ({path} solve)")
    return _finished(problem, answer, residual, path, _rank(problem.matrix), condition, damping, "", True)


def eigh_solve(problem: Problem, read: list[float], layer: str = "", timing: Timing = NO_TIMING):
    """:func:`solve` past a Cholesky its pivots did not prove (``read``: as for :func:`accept`): the
    eigendecomposition of ``problem``'s matrix."""
    damping = _unpack(problem, read)[2]
    return _conclude(problem, _eigh_solve(problem.matrix, problem.rhs, layer, timing), damping, layer)


def _unpack(problem: Problem, read: list[float]) -> tuple:
    """``(status, condition, λ, the dual answer's extremes)`` from :func:`factor_batch`'s values read back."""
    failed, condition, *rest = read
    damping = rest.pop(0) if isinstance(problem.damping, torch.Tensor) else problem.damping
    return failed, condition, damping, rest


def _conclude(problem: Problem, factored: tuple, damping: float, layer: str):
    x, path, rank, condition, fallback, resolved = factored
    answer, residual = problem.answer(x)
    path = problem.form + path
    _check_finite(answer, path, layer)
    return _finished(problem, answer, residual, path, rank, condition, damping, fallback, resolved)


def _finished(problem: Problem, answer, residual, path, rank, condition, damping, fallback, resolved):
    """``(g'_W in the gradient's dtype, SolveInfo)`` of a solved ``problem``."""
    matrix = problem.matrix
    return answer.to(problem.dtype), SolveInfo(path, matrix.shape[-1], rank, condition, damping, residual, fallback,
                                               resolved, matrix.dtype, _groups(matrix))


def extremes(t: torch.Tensor) -> list[torch.Tensor]:
    """A tensor's least and largest entries, 0-d on its device: both finite exactly when the tensor is (a NaN
    reaches both, ±inf one; no sum to overflow)."""
    return list(torch.aminmax(t.detach()))


def _pivot_conditions(chol: torch.Tensor) -> torch.Tensor:
    """``(max/min pivot)²`` of each factor."""
    pivots = torch.diagonal(chol, dim1=-2, dim2=-1)
    return (pivots.amax(-1) / pivots.amin(-1)) ** 2


_SMALL = 512  # up to this order, fewer right sides than the order are solved by one cholesky_solve. Measured on two
# CPU cores, float32: 2–8x faster than two triangular solves with 10–16 right sides (LeNet's convs and fc3, ResNet's
# batched 144s), about equal from 32 to the order, slower with as many right sides as the order (512 with 512:
# 6.3 -> 8.5 ms) and for larger orders (576 with 64: 0.47 -> 0.54 ms; 4608 with 512: 123 -> 170 ms)


def _solve_factored(rhs: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``rhs·(L Lᵀ)⁻¹``: by ``torch.cholesky_solve`` for small matrices and few right sides; otherwise by two
    triangular solves from the right (no transposed copies of rhs and x)."""
    if chol.shape[-1] <= _SMALL and rhs.shape[-2] < chol.shape[-1]:
        return torch.cholesky_solve(rhs.mT, chol).mT
    return torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol.mT, rhs, upper=True, left=False),
                                         upper=False, left=False)


def _checks(info: torch.Tensor, conditions: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    """The status and pivot condition of one problem's factors; a NaN or inf anywhere in ``x`` makes the second NaN."""
    return [info.abs().max().to(conditions.dtype), conditions.max() + 0.0 * x.sum()]


def _rank(matrix: torch.Tensor) -> int:
    """The rank of ``matrix`` (summed over a batch) where its Cholesky is accepted: full."""
    size = matrix.shape[-1]
    return size * (matrix.numel() // (size * size))


def _eigh_solve(matrix: torch.Tensor, rhs: torch.Tensor, layer: str, timing: Timing):
    """:func:`factor_solve` by the eigendecomposition, cutting eigenvalues below ``size·eps·λ_max``."""
    size, dtype = matrix.shape[-1], matrix.dtype
    with timing.part(layer, "factor"):
        evals, evecs, fallback = _eigh(matrix, layer)
        eps, top = torch.finfo(dtype).eps, evals.amax(-1, keepdim=True).clamp_min(0)
        keep = evals > size * eps * top
        x = ((rhs @ evecs) * safe_divide(torch.ones_like(evals), evals, keep).unsqueeze(-2)) @ evecs.mT
        rank = int(keep.sum())
        data = evals > size ** 0.5 * eps * top  # above the noise floor
        smallest = torch.where(data, evals, torch.inf).amin(-1)
        condition = float((top.squeeze(-1) / smallest).max()) if bool(data.any(-1).all()) else float("inf")
        resolved = int(data.sum()) == rank and (rank == 0 or condition * eps <= RESOLVED_ERROR)
    return x, "eigh", rank, condition, fallback, resolved


def _eigh(matrix: torch.Tensor, layer: str):
    """``(eigenvalues, eigenvectors, fallback)`` of ``matrix`` in its dtype; retried in float64, then with jitter."""
    dtype, size = matrix.dtype, matrix.shape[-1]
    try:
        return *torch.linalg.eigh(matrix), ""
    except RuntimeError as first:  # e.g. cuSOLVER failing to converge on a float32 Gram
        fallback = f"eigh failed in {dtype} ({type(first).__name__}); "
    try:
        evals, evecs = torch.linalg.eigh(matrix.double())
        fallback += "float64 retry"
    except RuntimeError:
        jitter = torch.finfo(dtype).eps * float(torch.diagonal(matrix, dim1=-2, dim2=-1).mean().clamp_min(1e-30))
        shifted = matrix.double() + jitter * torch.eye(size, dtype=torch.float64, device=matrix.device)
        try:
            evals, evecs = torch.linalg.eigh(shifted)
        except RuntimeError as last:
            raise SolveError(
                f"layer {layer}: every factorization of its {size}x{size} matrix failed "
                f"({fallback}float64 retry and float64 with jitter {jitter:.3g} failed too)"
            ) from last
        fallback += f"float64 with jitter {jitter:.3g}"
    return evals.to(dtype), evecs.to(dtype), fallback


def _relative_norm(gap: torch.Tensor, reference: torch.Tensor) -> float:
    tiny = torch.finfo(gap.dtype).tiny
    return float(torch.linalg.vector_norm(gap) / torch.linalg.vector_norm(reference).clamp_min(tiny))


def _primal_residual(x, matrix, g) -> float:
    return _relative_norm(x @ matrix - g, g)


def _dual_residual(times_rows, coeffs, kernel, s, grad) -> float:
    return _relative_norm(times_rows(coeffs @ kernel - s.mT), grad.to(coeffs.dtype))


def _check_finite(x: torch.Tensor, path: str, layer: str) -> None:
    if path != "cholesky" and not torch.isfinite(x).all():  # (the Cholesky check above includes x)
        raise NonFiniteError(f"layer {layer}: the back-matched weight gradient is not finite ({path} solve)")


def _groups(matrix: torch.Tensor) -> int:
    return matrix.shape[0] if matrix.dim() == 3 else 1
