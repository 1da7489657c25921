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

:func:`primal_solve` (factor the d x d ``G + λI``) and :func:`dual_solve` (factor
the N x N ``AAᵀ + λB·I``, cheaper when N < d) are thin callers of it.
``weights.py`` decides which one a layer uses.
"""

from __future__ import annotations

import dataclasses
import functools

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


def absolute_damping(diagonal_mean: torch.Tensor, damping: float, relative: bool) -> float:
    """λ to add to G: ``damping`` itself, or ``damping · mean(diag G)``."""
    if damping == 0.0:
        return 0.0
    return damping * float(diagonal_mean) if relative else damping


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
    size, dtype = matrix.shape[-1], matrix.dtype
    with timing.part(layer, "factor"):
        chol, info = torch.linalg.cholesky_ex(matrix)
        pivots = torch.diagonal(chol, dim1=-2, dim2=-1)
        condition = ((pivots.amax(-1) / pivots.amin(-1)) ** 2).max()
    with timing.part(layer, "solve"):
        # rhs·(L Lᵀ)⁻¹ by two triangular solves from the right: no transposed copies of rhs and x
        x = torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol.mT, rhs, upper=True, left=False),
                                          upper=False, left=False)
        # one read-back for all three checks: a NaN or inf anywhere in x makes the second entry NaN
        failed, condition = torch.stack([info.abs().max().to(dtype), condition + 0.0 * x.sum()]).tolist()
    if failed == 0 and condition < max_cholesky_condition(dtype):
        return x, "cholesky", size * (matrix.numel() // (size * size)), condition, "", True
    if cholesky_only:
        return None
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


def primal_solve(gram: torch.Tensor, grad: torch.Tensor, damping: float = 0.0, relative_damping: bool = True,
                 layer: str = "", timing: Timing = NO_TIMING, cholesky_only: bool = False):
    """``(g'_W, SolveInfo)`` with ``g'_W = grad · (G + λI)⁺`` from the d x d Gram ``G = AᵀA / B`` (or a batch of
    them, one λ for all), in ``gram``'s dtype; ``g'_W`` has ``grad``'s dtype. ``cholesky_only``: None unless
    the pivots prove ``G + λI``."""
    matrix, dtype = gram, gram.dtype
    g = grad.to(dtype)
    lam = absolute_damping(torch.diagonal(matrix, dim1=-2, dim2=-1).mean(), damping, relative_damping)
    if lam:
        matrix = matrix.clone()
        matrix.diagonal(dim1=-2, dim2=-1).add_(lam)
    factored = factor_solve(matrix, g, layer, timing, cholesky_only)
    if factored is None:
        return None
    x, path, rank, condition, fallback, resolved = factored
    _check_finite(x, path, layer)
    residual = functools.partial(_primal_residual, x, matrix, g)  # (g = 0 gives x = 0 and a residual of 0)
    return x.to(grad.dtype), SolveInfo(path, matrix.shape[-1], rank, condition, lam, residual, fallback, resolved,
                                       dtype, _groups(matrix))


def dual_solve(kernel: torch.Tensor, signals: torch.Tensor, grad: torch.Tensor, batch_size: int, times_rows,
               d: int, damping: float = 0.0, relative_damping: bool = True, layer: str = "",
               timing: Timing = NO_TIMING, cholesky_only: bool = False):
    """The dual (push-through) form ``grad · (G + λI)⁺ = B · Sᵀ (AAᵀ + λB·I)⁺ A``, for N < d; as :func:`primal_solve`.

    ``kernel``: ``K = AAᵀ`` (N x N; overwritten), in the solve dtype; ``signals``: S (N x n);
    ``times_rows(C)``: ``C·A``. ``grad`` must be ``Sᵀ A`` exactly (no weight
    decay, which lies outside A's row space); only its norm is read. λ comes
    from ``mean diag G = tr(K) / (B·d)``. The residual of the normal equations is
    ``‖R A‖ / ‖g‖`` with ``R = C (K + λB·I) - Sᵀ``, which is ``x (G + λI) - g``.
    All may carry one leading batch dimension, as in :func:`primal_solve`.
    """
    dtype = kernel.dtype
    s = signals.to(dtype)
    with timing.part(layer, "dual"):
        diagonal = torch.diagonal(kernel, dim1=-2, dim2=-1)
        lam = absolute_damping(diagonal.mean() * kernel.shape[-1] / (batch_size * d), damping, relative_damping)
        if lam:
            diagonal.add_(lam * batch_size)
        factored = factor_solve(kernel, s.mT, layer, cholesky_only=cholesky_only)  # Sᵀ K⁺
        if factored is None:
            return None
        coeffs, path, rank, condition, fallback, resolved = factored
        x = batch_size * times_rows(coeffs)
        _check_finite(x, "dual-" + path, layer)
    residual = functools.partial(_dual_residual, times_rows, coeffs, kernel, s, grad)
    return x.to(grad.dtype), SolveInfo("dual-" + path, kernel.shape[-1], rank, condition, lam, residual, fallback,
                                       resolved, dtype, _groups(kernel))


def _groups(matrix: torch.Tensor) -> int:
    return matrix.shape[0] if matrix.dim() == 3 else 1
