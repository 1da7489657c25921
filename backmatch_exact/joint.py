"""The joint input signal (beyond the paper: its future work): every unit of a layer's input co-updated.

Back-matching's input signal (eq. 11–12, 22) lets each input unit j match the
requested change ``g'_b`` on its own, as if the rest of the layer stayed put:
``g'_a_j = (Jᵀ g'_b)_j / ‖J_{:,j}‖²``. The paper calls this a strong assumption
and names the co-update of a layer's units as future work. The joint answer is
the least-squares solution over the whole input of the layer at once, per sample:

    g'_a = argmin ‖g'_b − J δa‖² (minimum norm) = (JᵀJ + λI)⁺ Jᵀ g'_b,   λ = μ · mean_j ‖J_{:,j}‖²

with the signal damping μ of ``attach`` (the same scale as the per-unit rule's,
since ``mean diag(JᵀJ) = mean_j ‖J_{:,j}‖²``). The per-unit rule is this with
``JᵀJ`` replaced by its diagonal, so the two differ exactly by the independence
assumption; where ``JᵀJ`` is diagonal (MaxPool, BatchNorm with its coupling
dropped, activations, Dropout, Flatten) they coincide and those rules stay as they are.

A layer whose joint rule differs describes its Jacobian as an :class:`InputOperator`
(``LayerRule.input_operator``: Linear, Conv2d, AvgPool2d, AdaptiveAvgPool2d), and
:func:`solve` answers for a *list* of consumers of one tensor,

    g'_a = (Σ_c J_cᵀJ_c + λI)⁺ Σ_c J_cᵀ g'_c,     λ = μ · Σ_{c damped} mean_j ‖J_c[:,j]‖²,

one consumer in a chain (several at a fan-out, for branching networks). Paths:

* **dense** — ``Σ JᵀJ + λI`` (n x n, the same for every sample, so one
  factorization serves the batch) by ``solver.factor_solve``, Jacobi-scaled by
  its diagonal first (the per-unit denominators: LeNet cv2's ``JᵀJ`` has
  condition ≈1.8e4, scaled ≈1.6e3, which a float32 Cholesky accepts). A scaled
  factorization that cuts a rank is redone unscaled, because the minimum-norm
  answer of a singular system is not invariant under scaling. Units with no
  column at all (``‖J_{:,j}‖ = 0``) are left out and get 0, the minimum-norm value.
  **dual** — with one consumer that can give ``JJᵀ`` and fewer outputs than
  inputs (a Linear with out < in, pooling): ``Jᵀ (JJᵀ + λI)⁺ g'_b``, the same
  answer by the push-through identity (minimum norm at λ = 0 too).
* **iterative** — CGLS on the stacked least-squares problem
  ``min ‖[J_c; √λ I] δa − [g'_c; 0]‖`` (never CG on the normal equations, which
  squares the condition), right-preconditioned when λ > 0 (below) by the
  per-unit diagonal ``D = Σ_c ‖J_c[:,j]‖² + λ``, batched over samples: each sample stops at its own
  tolerance, the solve when all have or after ``max_iter`` iterations. The
  recursively updated residual drifts by rounding, so convergence is only
  accepted on a recomputed one. Started from 0, unpreconditioned CGLS stays in
  the row space of J and so converges to the minimum-norm answer; the
  preconditioned one converges to the least-squares answer of minimum *D-weighted*
  norm, the same only when that answer is unique. So the preconditioner is used
  when λ > 0 (the answer is unique) and plain CGLS when λ = 0, where J may be
  rank-deficient even with more outputs than inputs (a padded conv has outputs
  that read padding only). On VGG's undamped convs the two take 40 and 44
  iterations to 1e-6.

``auto`` takes a dense path when the matrix it factors has at most
:data:`DENSE_MAX` rows and the iterative one otherwise: at 2048 the matrix is 16
MiB in float32 and its Cholesky about 3 GFlop, a tenth of a second on one CPU
core, while LeNet's cv2 (1176 units) is then dense and VGG's 16x16 to 4x4 maps
(4096 to 16384 units, whose dense Cholesky would cost about 1 to 60 s) are
iterative. VGG's 2x2 maps (2048 units) stay dense: undamped, those square
convolutions are too ill-conditioned for the iteration, although with damping
it is the cheaper path there (forming their ``JᵀJ`` costs more than ~15 iterations).

Every solve reports its path, rank (dense) or iterations (iterative), the
achieved relative residual of the normal equations (largest over the samples)
and, for dense solves, the condition of the factored matrix. An iterative solve
that misses its tolerance raises :class:`~backmatch_exact.errors.SolveError`
unless ``on_no_convergence="record"``, which keeps its last iterate and says so
in the statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from . import solver
from .errors import SolveError
from .timing import NO_TIMING, Timing

SIGNALS = ("per_unit", "joint")
SOLVERS = ("auto", "dense", "iterative")
ON_NO_CONVERGENCE = ("raise", "record")

#: largest matrix (rows) the automatic choice factors densely; see the module docstring
DENSE_MAX = 2048
#: default tolerance on the relative residual of the normal equations, per solve dtype
DEFAULT_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
#: iterations between two recomputations of the CGLS residual (besides every convergence check)
_REFRESH = 50


class InputOperator:
    """The Jacobian J of one layer call w.r.t. its input, the same for every sample.

    A snapshot: later in-place updates of the layer's parameters (an optimizer step) do not change it, so
    statistics read after the step still describe the solve. Vectors are rows: ``rows(t)`` lays a tensor shaped like the layer's input out as
    (S, size), one row per sample (a Linear's leading positions and a pooling
    layer's channels are samples of their own: J is block diagonal over them);
    ``out_rows`` does the same for the output. Subclasses set ``size`` (n),
    ``out_size`` (m) and ``col_sq`` (n: the per-unit denominators ``‖J_{:,j}‖²`` of
    the rule's ``column_sq_norms``), and implement ``matvec`` and ``rmatvec``.
    """

    size: int
    out_size: int
    col_sq: torch.Tensor
    #: signal damping μ applies to this consumer (as ``LayerRule.damped``)
    damped: bool = True

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, self.size)

    def out_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, self.out_size)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``J v`` for rows ``v`` (S, n) → (S, m), in ``v``'s dtype (no bias)."""
        raise NotImplementedError

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """``Jᵀ u`` for rows ``u`` (S, m) → (S, n)."""
        raise NotImplementedError

    def gram(self, dtype: torch.dtype) -> torch.Tensor:
        """``JᵀJ`` (n x n, a fresh tensor) in ``dtype``."""
        raise NotImplementedError

    def dual_gram(self, dtype: torch.dtype) -> torch.Tensor:
        """``JJᵀ`` (m x m, a fresh tensor) in ``dtype``; an operator that does not override it is solved primal."""
        raise NotImplementedError


class DiagonalInput(InputOperator):
    """What consumers of a tensor whose ``JᵀJ`` is diagonal (an identity in an add, a normalization with its
    coupling dropped, an activation) add at a fan-out: ``J̃ = diag(d)`` with ``d² = Σ ‖J_c[:, j]‖²``, rows as the
    other consumers lay them out. It has their ``JᵀJ``, which is all the solve depends on (its signal is their
    numerator over d). ``uniform``: d is the same for every sample, so a dense factorization serves them all."""

    damped = False  # (glue, normalizations and activations are never signal-damped)

    def __init__(self, scale: torch.Tensor):
        self.scale, self.col_sq = scale, (scale * scale)[0]
        self.size = self.out_size = scale.shape[1]
        self.uniform = bool((scale == scale[:1]).all())

    def matvec(self, v):
        return v * self.scale.to(v.dtype)

    def rmatvec(self, u):
        return u * self.scale.to(u.dtype)

    def gram(self, dtype):
        if not self.uniform:
            raise ValueError("a diagonal that differs between samples has no single JᵀJ")
        return torch.diag(self.col_sq.to(dtype))


@dataclasses.dataclass(frozen=True)
class Settings:
    """What ``attach(signals="joint", ...)`` says about every joint solve."""

    solver: str = "auto"  # "auto" | "dense" | "iterative"
    tol: float | None = None  # relative residual of the normal equations; None: DEFAULT_TOL of the solve dtype
    max_iter: int = 500
    on_no_convergence: str = "raise"  # "raise" | "record"


def settings(signals: str, solver_: str, tol, max_iter, on_no_convergence: str) -> Settings | None:
    """Validated :class:`Settings` for ``signals="joint"``; None for ``"per_unit"``."""
    if signals not in SIGNALS:
        raise ValueError(f"signals must be one of {SIGNALS}, got {signals!r}")
    if solver_ not in SOLVERS:
        raise ValueError(f"joint_solver must be one of {SOLVERS}, got {solver_!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"joint_tol must be None or a number in (0, 1), got {tol!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"joint_max_iter must be an integer >= 1, got {max_iter!r}")
    if on_no_convergence not in ON_NO_CONVERGENCE:
        raise ValueError(f"on_no_convergence must be one of {ON_NO_CONVERGENCE}, got {on_no_convergence!r}")
    if signals == "per_unit":
        return None
    return Settings(solver_, None if tol is None else float(tol), max_iter, on_no_convergence)


@dataclasses.dataclass
class SignalInfo:
    """What one joint solve did (``engine.stats()``'s ``signal_*`` keys)."""

    path: str  # "cholesky" | "eigh" | "dual-cholesky" | "dual-eigh" (dense) | "iterative" | "none"
    rank: float = math.nan  # dense: numerical rank of the factored matrix
    iterations: int = 0  # iterative: CGLS iterations run (the slowest sample's)
    #: largest relative residual of the normal equations over the samples; for a dense solve a function that
    #: computes it (the engine's stats() calls it when read: its answer is not needed for the step)
    residual: torch.Tensor | float | functools.partial = math.nan
    condition: float = math.nan  # dense: condition estimate of the factored (Jacobi-scaled) matrix
    converged: bool = True
    fallback: str = ""  # dense: a factorization retried (solver.factor_solve)

    def row(self) -> dict:
        """The ``signal_*`` statistics of a layer."""
        return {f"signal_{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}


#: the statistics of a layer that takes part in the joint rule but computed no signal (nothing below it)
NO_SIGNAL = SignalInfo("none").row()


def solve(consumers: list[tuple[InputOperator, torch.Tensor]], numerator: torch.Tensor, signal_damping: float,
          settings: Settings, layer: str = "", timing: Timing = NO_TIMING) -> tuple[torch.Tensor, SignalInfo]:
    """``g'_a = (Σ_c J_cᵀJ_c + λI)⁺ Σ_c J_cᵀ g'_c`` for every sample, shaped like ``numerator``.

    ``consumers``: ``(operator, g'_c)`` per consumer of the tensor, ``g'_c`` shaped
    like that consumer's output; ``numerator``: ``Σ_c J_cᵀ g'_c`` as autograd
    computed it (shaped like the input). ``signal_damping``: μ. Raises
    :class:`SolveError` when an iterative solve misses its tolerance (unless
    ``settings.on_no_convergence == "record"``).
    """
    operators = [op for op, _ in consumers]
    size = operators[0].size
    if any(op.size != size for op in operators):
        raise ValueError(f"layer {layer}: the consumers of one tensor lay its samples out differently")
    dtype = solver.solve_dtype(numerator.dtype)
    rhs = operators[0].rows(numerator).to(dtype)
    signals = [op.out_rows(g).to(dtype) for op, g in consumers]
    lam = signal_damping * sum(float(op.col_sq.to(dtype).mean()) for op in operators if op.damped)
    dual = len(consumers) == 1 and operators[0].out_size < size and _offers_dual(operators[0])
    factored = operators[0].out_size if dual else size
    method = settings.solver if settings.solver != "auto" else "dense" if factored <= DENSE_MAX else "iterative"
    if not all(getattr(op, "uniform", True) for op in operators):
        method = "iterative"  # (an activation's mask at a fan-out: every sample has its own JᵀJ)
    if method == "iterative":
        with timing.part(layer, "signal"):
            x, info = _iterative(operators, signals, rhs, lam, settings, layer)
        return x.reshape(numerator.shape).to(numerator.dtype), info
    if dual:
        x, info = _dense_dual(operators[0], signals[0], lam, dtype, layer, timing)
    else:
        x, info = _dense(operators, rhs, lam, dtype, layer, timing)
    info.residual = functools.partial(_largest_residual, operators, signals, rhs, x.clone(), lam)
    return x.reshape(numerator.shape).to(numerator.dtype), info


def _iterative(operators, signals, rhs, lam, settings: Settings, layer: str):
    """CGLS to the settings' tolerance, preconditioned when the least-squares answer is unique (λ > 0, see the
    module docstring); a miss raises :class:`SolveError` unless it is to be recorded."""
    dtype = rhs.dtype
    tol = settings.tol if settings.tol is not None else DEFAULT_TOL[dtype]
    diagonal = sum(op.col_sq.to(dtype).reshape(-1) for op in operators) + lam
    scale = diagonal.clamp_min(torch.finfo(dtype).tiny).rsqrt() if lam > 0 else 1.0
    x, info = _cgls(operators, signals, rhs, lam, torch.where(diagonal > 0, scale, 0.0), tol, settings.max_iter)
    if not info.converged and settings.on_no_convergence == "raise":
        raise SolveError(
            f"layer {layer}: the iterative joint signal solve (CGLS) did not reach tolerance {tol:.3g} in "
            f"{info.iterations} iterations: largest relative residual of the normal equations "
            f"{float(info.residual):.3g}. Raise joint_max_iter, add signal_damping, use joint_solver='dense', "
            "or on_no_convergence='record' to keep the last iterate"
        )
    return x, info


def _solve_read(matrix: torch.Tensor, rhs: torch.Tensor, layer: str):
    """``rhs · matrix⁺`` for a fresh PSD ``matrix`` (scaled in place): the units with an empty row and column
    (read by no output) are left out and get 0, their minimum-norm value; the rest is Jacobi-scaled by its
    diagonal. When the scaled factorization cuts a rank the answer would be the minimum of a scaled norm, so
    the unscaled matrix is factored instead (the minimum-norm answer)."""
    diagonal = torch.diagonal(matrix).clone()
    keep = diagonal > 0
    whole = bool(keep.all())
    if not whole:
        index = keep.nonzero().squeeze(1)
        matrix, rhs, diagonal = matrix[index][:, index], rhs[:, index], diagonal[index]
    scale = diagonal.rsqrt()
    matrix.mul_(scale[:, None]).mul_(scale[None, :])
    x, path, rank, condition, fallback, _ = solver.factor_solve(matrix, rhs * scale, layer)
    if rank < matrix.shape[0]:
        matrix.div_(scale[:, None]).div_(scale[None, :])
        x, path, rank, condition, fallback, _ = solver.factor_solve(matrix, rhs, layer)
    else:
        x = x * scale
    if not whole:
        x = x.new_zeros(x.shape[0], keep.numel()).index_copy_(1, index, x)
    return x, SignalInfo(path, rank, 0, math.nan, condition, True, fallback)


def _dense(operators, rhs, lam, dtype, layer, timing):
    """The primal dense path: ``(Σ JᵀJ + λI)`` factored once, every sample's ``Σ Jᵀ g`` a right-hand side."""
    with timing.part(layer, "signal_gram"):
        matrix = operators[0].gram(dtype)
        for op in operators[1:]:
            matrix += op.gram(dtype)
        if lam:
            matrix.diagonal().add_(lam)
    with timing.part(layer, "signal"):
        return _solve_read(matrix, rhs, layer)


def _offers_dual(operator: InputOperator) -> bool:
    return type(operator).dual_gram is not InputOperator.dual_gram


def _dense_dual(operator, signal, lam, dtype, layer, timing):
    """The dual dense path ``Jᵀ (JJᵀ + λI)⁺ g'_b`` (an output that reads nothing has an empty row of J)."""
    with timing.part(layer, "signal_gram"):
        matrix = operator.dual_gram(dtype)
        if lam:
            matrix.diagonal().add_(lam)
    with timing.part(layer, "signal"):
        z, info = _solve_read(matrix, signal, layer)
        info.path = "dual-" + info.path
        return operator.rmatvec(z), info


def _largest_residual(operators, signals, rhs, x, lam) -> float:
    return float(_relative_residuals(operators, signals, rhs, x, lam)[0].max())


def _relative_residuals(operators, signals, rhs, x, lam):
    """Per sample ``‖Σ_c J_cᵀ(g'_c − J_c x) − λx‖ / ‖Σ_c J_cᵀ g'_c‖`` (0 for a zero numerator), and the residual."""
    residual = sum(op.rmatvec(g - op.matvec(x)) for op, g in zip(operators, signals))
    if lam:
        residual = residual - lam * x
    reference = torch.linalg.vector_norm(rhs, dim=1)
    ratio = torch.linalg.vector_norm(residual, dim=1) / reference.clamp_min(torch.finfo(rhs.dtype).tiny)
    return torch.where(reference > 0, ratio, torch.zeros_like(ratio)), residual


def _cgls(operators, signals, rhs, lam, precondition, tol, max_iter):
    """Preconditioned CGLS for every sample at once (see the module docstring); returns ``(x, SignalInfo)``.

    Right preconditioning ``δa = P y`` with the diagonal ``P`` (``D^{-1/2}``, 1, 0 for unread units): CGLS on
    ``[J_c P; √λ P] y ≈ [g'_c; 0]``. Its residual is kept as the per-consumer
    ``r_c = g'_c − J_c x`` (the damping rows' residual is ``−√λ x``), so
    ``t = Σ_c J_cᵀ r_c − λx`` is the residual of the unpreconditioned normal
    equations and ``s = P t`` the preconditioned one.
    """
    reference = torch.linalg.vector_norm(rhs, dim=1)
    floor = torch.finfo(rhs.dtype).tiny
    x = torch.zeros_like(rhs)
    residuals = [g.clone() for g in signals]
    t = rhs.clone()  # Σ Jᵀ g'_c, as autograd computed it
    done = reference == 0
    s = precondition * t
    direction = s.clone()
    gamma = (s * s).sum(1)
    iterations, checked = 0, True
    relative = torch.zeros_like(reference)
    while not bool(done.all()) and iterations < max_iter:
        iterations += 1
        step = precondition * direction
        images = [op.matvec(step) for op in operators]
        curvature = sum((q * q).sum(1) for q in images) + lam * (step * step).sum(1)
        alpha = torch.where(done | (curvature <= 0), torch.zeros_like(gamma), gamma / curvature.clamp_min(floor))
        x.addcmul_(alpha[:, None], step)
        for r, q in zip(residuals, images):
            r.addcmul_(alpha[:, None], q, value=-1.0)
        t = sum(op.rmatvec(r) for op, r in zip(operators, residuals))
        if lam:
            t = t - lam * x
        relative = torch.linalg.vector_norm(t, dim=1) / reference.clamp_min(floor)
        checked = False
        if bool(((relative <= tol) | done).all()) or iterations % _REFRESH == 0:
            # accept convergence only on a recomputed residual: the recursive one drifts by rounding
            residuals = [g - op.matvec(x) for op, g in zip(operators, signals)]
            relative, t = _relative_residuals(operators, signals, rhs, x, lam)
            done = done | (relative <= tol)
            checked = True
        s = precondition * t
        gamma_next = (s * s).sum(1)
        beta = torch.where(gamma > 0, gamma_next / gamma.clamp_min(floor), torch.zeros_like(gamma))
        direction = s + beta[:, None] * direction
        gamma = gamma_next
    if not checked:
        relative, _ = _relative_residuals(operators, signals, rhs, x, lam)
    converged = bool(done.all())
    return x, SignalInfo("iterative", math.nan, iterations, relative.max() if relative.numel() else 0.0, math.nan,
                         converged)
