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

import contextlib
import dataclasses
import time

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


# ------------------------------------------------------------------ fast path: timing, reference switch, primal solve

#: True: the engine takes the plain reference path for weight layers (im2col rows, its own g_W = Sᵀ A,
#: :func:`min_norm_solve`), the path every fast one is tested against (tests/test_fast_paths.py).
reference = False


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


class Timing:
    """Wall-clock time of the parts of an exact step, per layer (``backmatch bench``'s breakdown).

    Off by default, and then ``timing.part(layer, name)`` returns one shared no-op
    context: an attribute test per use. :meth:`enable` turns it on; ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs at both ends of every span so that device work
    is charged to the span that launched it, and each span is also a
    ``torch.profiler`` range named ``backmatch/<layer>/<part>``. Parts: ``gram``
    (forming AᵀA), ``weight_grad`` (g_W, and A and S for a dual solve, where
    autograd's g_W is not taken), ``factor`` (Cholesky, or eigh when it fails its
    check), ``solve`` (triangular solves, the one read-back, the residual), ``dual``
    (the whole N x N solve), ``column_norms`` (‖J_{:,j}‖² for the statistics) and,
    per layer of any kind, ``input_signal`` (its signal rule: for a weight layer the
    column norms and the rescaling; with the finiteness check).
    """

    def __init__(self):
        self.enabled = False
        self.sync = None
        self.clock = time.perf_counter
        self.totals: dict[tuple, float] = {}
        self.names: dict = {}

    def enable(self, sync=None, names: dict | None = None, clock=time.perf_counter) -> None:
        """Start timing (totals reset). ``names``: ``{id(module): path}`` for spans that name a module;
        ``clock``: ``time.perf_counter`` (wall) or e.g. ``time.thread_time`` (CPU time of this thread,
        robust on a shared machine when torch runs one thread)."""
        self.enabled, self.sync, self.clock = True, sync, clock
        self.names = dict(names or {})
        self.totals = {}

    def disable(self) -> None:
        self.enabled, self.sync, self.names, self.clock = False, None, {}, time.perf_counter

    def reset(self) -> None:
        self.totals = {}

    def part(self, layer, name: str):
        """Context timing ``name`` for ``layer`` (a path, or a module known to :meth:`enable`)."""
        if not self.enabled:
            return _NULL_SPAN
        if not isinstance(layer, str):
            layer = self.names.get(id(layer), type(layer).__name__)
        return _Span(self, (layer, name))


_NULL_SPAN = contextlib.nullcontext()

#: the module-wide timer the engine, the solver and the weight rules report to
timing = Timing()


def primal_solve(
    gram: torch.Tensor,
    grad: torch.Tensor,
    damping: float = 0.0,
    relative_damping: bool = True,
    layer: str = "",
) -> tuple[torch.Tensor, SolveInfo]:
    """Primal ``g'_W = grad · (G + λI)⁺`` from an already formed d x d Gram ``G = AᵀA / B``.

    For callers that hold ``G`` but not its rows (the fast conv path; ``distributed.py``,
    which averages the ranks' Grams), with one host sync and the statistics left as tensors. The Cholesky factor, its solve and the
    checks (factorization info, pivot condition, finite answer) run first and
    are read back together; only a failed check leads to :func:`_factor_solve`'s
    eigendecomposition. ``SolveInfo.condition`` and ``residual`` are 0-d tensors
    (``Engine.stats`` converts them). Result has ``grad``'s dtype.
    """
    dtype = solve_dtype(grad.dtype)
    g = grad.to(dtype)
    matrix = gram.to(dtype)
    d = matrix.shape[0]
    lam = absolute_damping(torch.diagonal(matrix).sum() / d, damping, relative_damping) if damping else 0.0
    if lam:
        matrix = matrix.clone()
        matrix.diagonal().add_(lam)
    with timing.part(layer, "factor"):
        chol, info = torch.linalg.cholesky_ex(matrix)
        pivots = torch.diagonal(chol)
        condition = (pivots.max() / pivots.min()) ** 2
    with timing.part(layer, "solve"):
        x = torch.cholesky_solve(g.T, chol).T
        # one read-back for all three checks: a NaN or inf anywhere in x makes the second entry NaN
        failed, cond = torch.stack([info.to(dtype), condition + 0.0 * x.sum()]).tolist()
    path, rank, fallback = "cholesky", d, ""
    if failed != 0 or not cond < max_cholesky_condition(dtype):
        with timing.part(layer, "factor"):
            x, path, rank, condition, fallback = _factor_solve(matrix, g, layer)
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"layer {layer}: the back-matched weight gradient is not finite ({path} solve)")
    with timing.part(layer, "solve"):  # (g = 0 gives x = 0 and a residual of 0)
        residual = (torch.linalg.vector_norm(torch.addmm(g, x, matrix, beta=-1))
                    / torch.linalg.vector_norm(g).clamp_min(torch.finfo(dtype).tiny))
    return x.to(grad.dtype), SolveInfo(path, d, rank, condition, lam, residual, fallback)


def kernel_solve(
    kernel: torch.Tensor,
    signals: torch.Tensor,
    grad: torch.Tensor,
    batch_size: int,
    times_rows,
    d: int,
    damping: float = 0.0,
    relative_damping: bool = True,
    layer: str = "",
) -> tuple[torch.Tensor, SolveInfo]:
    """The dual form from the kernel ``K = AAᵀ`` (N x N) and a product ``times_rows(C) = C·A``.

    With one host sync and the statistics as 0-d tensors. ``grad`` must be ``Sᵀ A``
    (no weight decay); only its norm is read. λ comes from the kernel's trace
    (``mean diag G = tr(K)/(B·d)``); the residual of the normal equations is
    ``‖R A‖ / ‖g‖`` with ``R = C (K + λB·I) - Sᵀ``, which is ``x (G + λI) - g``.
    ``kernel`` is overwritten. A Conv2d passes a kernel and a product that never
    form the im2col matrix (``Conv2dRule.kernel`` / ``rows_product``).
    """
    n_rows = kernel.shape[0]
    dtype = solve_dtype(grad.dtype)
    kernel = kernel.to(dtype)
    s = signals.to(dtype)
    with timing.part(layer, "dual"):
        lam = absolute_damping(torch.diagonal(kernel).sum() / (batch_size * d), damping, relative_damping) \
            if damping else 0.0
        if lam:
            kernel.diagonal().add_(lam * batch_size)
        chol, info = torch.linalg.cholesky_ex(kernel)
        pivots = torch.diagonal(chol)
        condition = (pivots.max() / pivots.min()) ** 2
        coeffs = torch.cholesky_solve(s, chol).T  # Sᵀ K⁻¹
        failed, cond = torch.stack([info.to(dtype), condition + 0.0 * coeffs.sum()]).tolist()
        path, rank, fallback = "dual-cholesky", n_rows, ""
        if failed != 0 or not cond < max_cholesky_condition(dtype):
            coeffs, path, rank, condition, fallback = _factor_solve(kernel, s.T, layer)
            path = "dual-" + path
        x = batch_size * times_rows(coeffs)
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"layer {layer}: the back-matched weight gradient is not finite ({path} solve)")
        gap = times_rows(torch.addmm(s.T, coeffs, kernel, beta=-1))
        residual = (torch.linalg.vector_norm(gap)
                    / torch.linalg.vector_norm(grad.to(dtype)).clamp_min(torch.finfo(dtype).tiny))
    return x.to(grad.dtype), SolveInfo(path, n_rows, rank, condition, lam, residual, fallback)
