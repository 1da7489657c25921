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

:func:`primal_solve` (factor the d x d ``G + λI``) and :func:`dual_solve` (factor
the N x N ``AAᵀ + λB·I``, cheaper when N < d) are thin callers of it.
``weights.py`` decides which one a layer uses.
"""

from __future__ import annotations

import dataclasses

import torch

from .errors import NonFiniteError, SolveError
from .timing import NO_TIMING, Timing


def safe_divide(x: torch.Tensor, d: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``x / d``, and 0 where ``d`` is 0 (or where ``keep`` is False): the minimum-norm answer there.

    One division: a dropped denominator becomes +inf, and a finite ``x`` over it is 0.
    """
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
    residual: torch.Tensor | float  # ‖X (G + λI) - g_W‖ / ‖g_W‖ (a 0-d tensor until stats() reads it)
    fallback: str = ""  # non-empty when eigh failed and was retried


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


def factor_solve(matrix: torch.Tensor, rhs: torch.Tensor, layer: str = "", timing: Timing = NO_TIMING):
    """``rhs · matrix⁺`` for a symmetric PSD ``matrix`` (m x m) and ``rhs`` (r x m), both in the solve dtype.

    Returns ``(x, path, rank, condition, fallback)`` with ``path`` "cholesky" or
    "eigh" (see the module docstring for when each runs).
    """
    size, dtype = matrix.shape[0], matrix.dtype
    with timing.part(layer, "factor"):
        chol, info = torch.linalg.cholesky_ex(matrix)
        pivots = torch.diagonal(chol)
        condition = (pivots.max() / pivots.min()) ** 2
    with timing.part(layer, "solve"):
        # rhs·(L Lᵀ)⁻¹ by two triangular solves from the right: no transposed copies of rhs and x
        x = torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol.mT, rhs, upper=True, left=False),
                                          upper=False, left=False)
        # one read-back for all three checks: a NaN or inf anywhere in x makes the second entry NaN
        failed, condition = torch.stack([info.to(dtype), condition + 0.0 * x.sum()]).tolist()
    if failed == 0 and condition < max_cholesky_condition(dtype):
        return x, "cholesky", size, condition, ""
    with timing.part(layer, "factor"):
        evals, evecs, fallback = _eigh(matrix, layer)
        keep = evals > size * torch.finfo(dtype).eps * evals.max().clamp_min(0)
        x = ((rhs @ evecs) * safe_divide(torch.ones_like(evals), evals, keep)) @ evecs.T
        kept = evals[keep]
        rank = kept.numel()
        condition = float(kept.max() / kept.min()) if rank > 0 else float("inf")
    return x, "eigh", rank, condition, fallback


def _eigh(matrix: torch.Tensor, layer: str):
    """``(eigenvalues, eigenvectors, fallback)`` of ``matrix`` in its dtype; retried in float64, then with jitter."""
    dtype = matrix.dtype
    try:
        return *torch.linalg.eigh(matrix), ""
    except RuntimeError as first:  # e.g. cuSOLVER failing to converge on a float32 Gram
        fallback = f"eigh failed in {dtype} ({type(first).__name__}); "
    try:
        evals, evecs = torch.linalg.eigh(matrix.double())
        fallback += "float64 retry"
    except RuntimeError:
        jitter = torch.finfo(dtype).eps * float(torch.diagonal(matrix).mean().clamp_min(1e-30))
        shifted = matrix.double() + jitter * torch.eye(matrix.shape[0], dtype=torch.float64, device=matrix.device)
        try:
            evals, evecs = torch.linalg.eigh(shifted)
        except RuntimeError as last:
            raise SolveError(
                f"layer {layer}: every factorization of its {matrix.shape[0]}x{matrix.shape[0]} matrix failed "
                f"({fallback}float64 retry and float64 with jitter {jitter:.3g} failed too)"
            ) from last
        fallback += f"float64 with jitter {jitter:.3g}"
    return evals.to(dtype), evecs.to(dtype), fallback


def _relative_norm(gap: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(gap) / torch.linalg.vector_norm(reference).clamp_min(torch.finfo(gap.dtype).tiny)


def _check_finite(x: torch.Tensor, path: str, layer: str) -> None:
    if path != "cholesky" and not torch.isfinite(x).all():  # (the Cholesky check above includes x)
        raise NonFiniteError(f"layer {layer}: the back-matched weight gradient is not finite ({path} solve)")


def primal_solve(gram: torch.Tensor, grad: torch.Tensor, damping: float = 0.0, relative_damping: bool = True,
                 layer: str = "", timing: Timing = NO_TIMING) -> tuple[torch.Tensor, SolveInfo]:
    """``g'_W = grad · (G + λI)⁺`` from the d x d Gram ``G = AᵀA / B``; the result has ``grad``'s dtype."""
    dtype = solve_dtype(grad.dtype)
    g = grad.to(dtype)
    matrix = gram.to(dtype)
    d = matrix.shape[0]
    lam = absolute_damping(torch.diagonal(matrix).mean(), damping, relative_damping)
    if lam:
        matrix = matrix.clone()
        matrix.diagonal().add_(lam)
    x, path, rank, condition, fallback = factor_solve(matrix, g, layer, timing)
    _check_finite(x, path, layer)
    with timing.part(layer, "solve"):  # (g = 0 gives x = 0 and a residual of 0)
        residual = _relative_norm(torch.addmm(g, x, matrix, beta=-1), g)
    return x.to(grad.dtype), SolveInfo(path, d, rank, condition, lam, residual, fallback)


def dual_solve(kernel: torch.Tensor, signals: torch.Tensor, grad: torch.Tensor, batch_size: int, times_rows,
               d: int, damping: float = 0.0, relative_damping: bool = True, layer: str = "",
               timing: Timing = NO_TIMING) -> tuple[torch.Tensor, SolveInfo]:
    """The dual (push-through) form ``grad · (G + λI)⁺ = B · Sᵀ (AAᵀ + λB·I)⁺ A``, for N < d.

    ``kernel``: ``K = AAᵀ`` (N x N; overwritten); ``signals``: S (N x n);
    ``times_rows(C)``: ``C·A``. ``grad`` must be ``Sᵀ A`` exactly (no weight
    decay, which lies outside A's row space); only its norm is read. λ comes
    from ``mean diag G = tr(K) / (B·d)``. The residual of the normal equations is
    ``‖R A‖ / ‖g‖`` with ``R = C (K + λB·I) - Sᵀ``, which is ``x (G + λI) - g``.
    """
    dtype = solve_dtype(grad.dtype)
    kernel = kernel.to(dtype)
    s = signals.to(dtype)
    with timing.part(layer, "dual"):
        lam = absolute_damping(torch.diagonal(kernel).sum() / (batch_size * d), damping, relative_damping)
        if lam:
            kernel.diagonal().add_(lam * batch_size)
        coeffs, path, rank, condition, fallback = factor_solve(kernel, s.T, layer)  # Sᵀ K⁺
        x = batch_size * times_rows(coeffs)
        _check_finite(x, "dual-" + path, layer)
        residual = _relative_norm(times_rows(torch.addmm(s.T, coeffs, kernel, beta=-1)), grad.to(dtype))
    return x.to(grad.dtype), SolveInfo("dual-" + path, kernel.shape[0], rank, condition, lam, residual, fallback)
