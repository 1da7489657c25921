"""The one least-squares solver every weight layer shares.

A weight layer with input rows ``A`` (N x d: one row per sample and location, a
column of ones appended for a bias) and back-matched output signals ``S``
(N x n) has the ordinary gradient ``g_W = Sᵀ A`` (the signals carry the loss's
1/B) and the Gram matrix ``G = Aᵀ A / B`` (mean over the B samples, sum over
locations). Back-matching (eq. 13/23) asks for

    g'_W = g_W · G⁺          or, with damping λ > 0,    g'_W = g_W · (G + λI)⁻¹,

the minimum-norm least-squares answer, which is what ``numpy.linalg.lstsq``
returns for the stacked per-row problems ``min ‖s_k - A w_k‖``.

Two equivalent ways to get it:

* primal: factor the d x d matrix ``G + λI``;
* dual (push-through): ``g_W (G + λI)⁺ = B · Sᵀ (A Aᵀ + λB·I)⁺ A``, an N x N
  factorization, cheaper when N < d. It needs ``g_W = Sᵀ A`` exactly, so it is
  not used when weight decay adds a term outside the row space of A.

Either matrix is factored by Cholesky when that is provably safe, and by a
symmetric eigendecomposition with a rank cut-off otherwise (a float32 Cholesky
of a singular Gram "succeeds" with tiny pivots and returns garbage).
"""

from __future__ import annotations

import dataclasses

import torch

from .errors import NonFiniteError, SolveError


@dataclasses.dataclass
class SolveInfo:
    """What one solve did, for ``engine.stats()``."""

    path: str  # "cholesky" | "eigh" | "dual-cholesky" | "dual-eigh"
    size: int  # order of the factored matrix (d for primal, N for dual)
    rank: int  # numerical rank of the factored matrix
    condition: float  # estimate: Cholesky pivots ratio², or exact from eigh
    damping: float  # absolute λ actually added to G
    residual: float  # ‖X (G + λI) - g_W‖ / ‖g_W‖
    fallback: str = ""  # non-empty when a factorization failed and was retried


def solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """Solves run in at least float32; float64 models solve in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def max_cholesky_condition(dtype: torch.dtype) -> float:
    """Largest condition estimate for which a Cholesky answer is trusted.

    At condition κ a Cholesky solve loses about κ·eps of relative accuracy;
    1/sqrt(eps) keeps about half the digits (≈3e3 in float32, ≈7e7 in float64).
    Above it the eigendecomposition path decides what is rank and what is noise.
    """
    return torch.finfo(dtype).eps ** -0.5


def absolute_damping(gram_trace_mean: torch.Tensor, damping: float, relative: bool) -> float:
    """λ to add to G: ``damping`` itself, or ``damping · mean(diag G)``."""
    if damping == 0.0:
        return 0.0
    return damping * float(gram_trace_mean) if relative else damping


def _factor_solve(matrix: torch.Tensor, rhs: torch.Tensor, layer: str):
    """Return ``rhs · matrix⁺`` for a symmetric PSD ``matrix``, with how it was done.

    ``rhs`` is (r x m), ``matrix`` (m x m); both already in the solve dtype.
    """
    size = matrix.shape[0]
    dtype = matrix.dtype
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        pivots = torch.diagonal(chol)
        condition = float((pivots.max() / pivots.min()) ** 2)
        if condition < max_cholesky_condition(dtype):
            x = torch.cholesky_solve(rhs.T, chol).T
            return x, "cholesky", size, condition, ""

    fallback = ""
    try:
        evals, evecs = torch.linalg.eigh(matrix)
    except RuntimeError as first:  # cuSOLVER can fail to converge on float32 Grams
        fallback = f"eigh failed in {dtype} ({first.__class__.__name__}); "
        try:
            evals, evecs = torch.linalg.eigh(matrix.double())
            fallback += "float64 retry"
        except RuntimeError:
            jitter = torch.finfo(dtype).eps * float(torch.diagonal(matrix).mean().clamp_min(1e-30))
            eye = torch.eye(size, dtype=torch.float64, device=matrix.device)
            try:
                evals, evecs = torch.linalg.eigh(matrix.double() + jitter * eye)
            except RuntimeError as last:
                raise SolveError(f"layer {layer}: every factorization of its {size}x{size} matrix failed") from last
            fallback += f"float64 with jitter {jitter:.3g}"
        evals, evecs = evals.to(dtype), evecs.to(dtype)
    # eigenvalues below size·eps·λmax are rounding noise of a zero eigenvalue
    cutoff = size * torch.finfo(dtype).eps * evals.max().clamp_min(0)
    keep = evals > cutoff
    rank = int(keep.sum())
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    x = ((rhs @ evecs) * inv) @ evecs.T
    kept = evals[keep]
    condition = float(kept.max() / kept.min()) if rank > 0 else float("inf")
    return x, "eigh", rank, condition, fallback


def min_norm_solve(
    inputs: torch.Tensor,
    signals: torch.Tensor | None,
    grad: torch.Tensor,
    batch_size: int,
    damping: float = 0.0,
    relative_damping: bool = True,
    method: str = "auto",
    layer: str = "",
) -> tuple[torch.Tensor, SolveInfo]:
    """Return ``g'_W = grad · (G + λI)⁺`` with ``G = inputsᵀ inputs / batch_size``.

    ``inputs``: A (N x d). ``signals``: S (N x n), needed for the dual form;
    pass None to force the primal. ``grad``: g_W (n x d), Sᵀ A plus any weight
    decay. ``method``: "auto" (dual when N < d and the dual applies), "primal"
    or "dual". Result has ``grad``'s dtype.
    """
    if method not in ("auto", "primal", "dual"):
        raise ValueError(f"method must be 'auto', 'primal' or 'dual', got {method!r}")
    n_rows, d = inputs.shape
    dtype = solve_dtype(grad.dtype)
    a = inputs.to(dtype)
    g = grad.to(dtype)
    lam = absolute_damping((a * a).sum() / (batch_size * d), damping, relative_damping)

    use_dual = signals is not None and (method == "dual" or (method == "auto" and n_rows < d))
    if method == "dual" and signals is None:
        raise ValueError("the dual form needs the per-sample signals")
    if use_dual:
        s = signals.to(dtype)
        kernel = a @ a.T
        if lam:
            kernel.diagonal().add_(lam * batch_size)
        coeffs, path, rank, condition, fallback = _factor_solve(kernel, s.T, layer)
        x = batch_size * (coeffs @ a)
        path = "dual-" + path
        size = n_rows
    else:
        gram = a.T @ a / batch_size
        if lam:
            gram.diagonal().add_(lam)
        x, path, rank, condition, fallback = _factor_solve(gram, g, layer)
        size = d

    if not torch.isfinite(x).all():
        raise NonFiniteError(f"layer {layer}: the back-matched weight gradient is not finite ({path} solve)")
    # residual of the normal equations, without forming G for the dual form
    applied = (x @ a.T) @ a / batch_size + lam * x
    scale = torch.linalg.vector_norm(g)
    residual = float(torch.linalg.vector_norm(applied - g) / scale) if scale > 0 else 0.0
    info = SolveInfo(path, size, rank, condition, lam, residual, fallback)
    return x.to(grad.dtype), info


