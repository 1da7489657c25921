"""The one factorization (``solver.factor_solve``) and its thin callers, branch by branch, against numpy."""

import numpy as np
import pytest
import torch

from backmatch_exact import solver, weights
from backmatch_exact.errors import NonFiniteError, SolveError


def _psd(eigenvalues, seed=0, dtype=torch.float64):
    """``Q diag(eigenvalues) Qᵀ`` with a random orthogonal Q: a PSD matrix of known spectrum."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=torch.float64))
    matrix = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return ((matrix + matrix.T) / 2).to(dtype)


def _rhs(rows, size, seed=1, dtype=torch.float64):
    return torch.randn(rows, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _min_norm(matrix, rhs, rcond):
    """numpy's answer: rhs · pinv(matrix), eigenvalues below rcond·λ_max cut."""
    return rhs.double().numpy() @ np.linalg.pinv(matrix.double().numpy(), rcond=rcond, hermitian=True)


def test_well_conditioned_matrix_takes_cholesky():
    matrix, rhs = _psd([1.0, 2.0, 3.0, 5.0, 8.0]), _rhs(3, 5)
    x, path, rank, condition, fallback, resolved = solver.factor_solve(matrix, rhs)
    assert (path, rank, fallback, resolved) == ("cholesky", 5, "", True)
    np.testing.assert_allclose(x.numpy(), rhs.numpy() @ np.linalg.inv(matrix.numpy()), rtol=1e-12)
    pivots = torch.diagonal(torch.linalg.cholesky(matrix))
    assert condition == pytest.approx(float((pivots.max() / pivots.min()) ** 2))


def test_singular_matrix_takes_eigh_and_gives_the_minimum_norm_answer():
    matrix, rhs = _psd([0.0, 0.0, 1.0, 2.0, 4.0, 8.0]), _rhs(2, 6)
    x, path, rank, condition, fallback, resolved = solver.factor_solve(matrix, rhs)
    assert (path, rank, fallback, resolved) == ("eigh", 4, "", True)  # the zeros are far below the noise floor
    assert condition == pytest.approx(8.0)  # the kept eigenvalues only
    np.testing.assert_allclose(x.numpy(), _min_norm(matrix, rhs, 1e-10), rtol=1e-9, atol=1e-12)


def test_ill_conditioned_float32_matrix_leaves_cholesky_for_eigh():
    """Full rank in exact arithmetic, but its pivot condition (1e5) is above float32's trust bound (≈3e3)."""
    assert solver.max_cholesky_condition(torch.float32) < 1e5 < solver.max_cholesky_condition(torch.float64)
    spectrum = [1e-5, 1e-2, 0.5, 1.0]
    x32, path32, rank32, _, _, resolved32 = solver.factor_solve(_psd(spectrum, dtype=torch.float32),
                                                                _rhs(3, 4, dtype=torch.float32))
    x64, path64, rank64, _, _, resolved64 = solver.factor_solve(_psd(spectrum), _rhs(3, 4))
    assert (path32, rank32) == ("eigh", 4) and (path64, rank64) == ("cholesky", 4)
    assert not resolved32 and resolved64  # κ·eps = 1e5 · 1.2e-7 > RESOLVED_ERROR in float32 only
    np.testing.assert_allclose(x32.double().numpy(), x64.numpy(), rtol=0.05)  # float32 at condition 1e5


@pytest.mark.parametrize("spectrum, resolved", [
    ([0.0] * 8 + list(np.logspace(-3, 0, 56)), True),  # zeros that float32 turns into noise, kept ones well apart
    ([2e-6] * 8 + list(np.logspace(-3, 0, 56)), False),  # above √64·eps·λ_max but below the cut 64·eps·λ_max
])
def test_eigenvalues_between_the_noise_floor_and_the_cut_are_not_resolved(spectrum, resolved):
    x, path, rank, condition, _, got = solver.factor_solve(_psd(spectrum, dtype=torch.float32),
                                                           _rhs(2, 64, dtype=torch.float32))
    assert (path, rank, got) == ("eigh", 56, resolved)
    assert condition == pytest.approx(1e3 if resolved else 5e5, rel=0.1)  # λ_max / the smallest data eigenvalue


def test_weights_solve_forms_a_float32_gram_again_in_float64_when_cholesky_cannot_prove_it():
    """Default settings: rows it can form again are solved in float64; an exchanged (rounded) Gram cannot be, and
    says whether float32 resolved it; solve_dtype=torch.float32 keeps float32."""
    rows = (_rhs(40, 6) @ torch.diag(torch.logspace(0, -3, 6, dtype=torch.float64))).float()
    grad = _rhs(3, 6, seed=2, dtype=torch.float32)
    answer = (grad.double() @ torch.linalg.inv(rows.double().T @ rows.double() / 40)).float()
    cases = [(weights.ExplicitRows(rows, 40), weights.Settings(), torch.float64, True),
             (weights.ExchangedGram(rows.T @ rows / 40, 40, 40), weights.Settings(), torch.float32, False),
             (weights.ExplicitRows(rows, 40), weights.Settings(solve_dtype=torch.float32), torch.float32, False)]
    for source, settings, dtype, resolved in cases:
        x, info = weights.solve(source, grad, lambda: None, None, settings)
        assert (x.dtype, info.dtype, info.resolved) == (torch.float32, dtype, resolved)
        if resolved:
            assert info.fallback == "float32 Cholesky not proven: float64"
            torch.testing.assert_close(x, answer, rtol=1e-5, atol=0)


def test_non_finite_right_hand_side_is_refused():
    matrix, rhs = _psd([1.0, 2.0, 3.0]), _rhs(2, 3)
    rhs[1, 1] = float("nan")
    _, path, _, _, _, _ = solver.factor_solve(matrix, rhs)
    assert path == "eigh"  # the NaN answer fails the Cholesky check
    with pytest.raises(NonFiniteError, match="fc9.*not finite"):
        solver.solve(solver.primal_problem(matrix, rhs), layer="fc9")


def _failing_eigh(monkeypatch, fails):
    """Make ``torch.linalg.eigh`` raise for the calls ``fails(call number, matrix)`` says; count the calls."""
    real, calls = torch.linalg.eigh, []

    def eigh(matrix, *args, **kwargs):
        calls.append(matrix.dtype)
        if fails(len(calls), matrix):
            raise torch.linalg.LinAlgError("injected: did not converge")
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    return calls


def test_eigh_failure_in_float32_is_retried_in_float64(monkeypatch):
    matrix, rhs = _psd([0.0, 1.0, 3.0], dtype=torch.float32), _rhs(2, 3, dtype=torch.float32)
    calls = _failing_eigh(monkeypatch, lambda n, m: m.dtype == torch.float32)
    x, path, rank, _, fallback, _ = solver.factor_solve(matrix, rhs)
    assert calls == [torch.float32, torch.float64]
    assert (path, rank, x.dtype) == ("eigh", 2, torch.float32)
    assert "eigh failed in torch.float32" in fallback and fallback.endswith("float64 retry")
    np.testing.assert_allclose(x.double().numpy(), _min_norm(matrix, rhs, 1e-5), rtol=1e-4, atol=1e-6)


def test_second_eigh_failure_adds_jitter(monkeypatch):
    matrix, rhs = _psd([0.0, 1.0, 3.0]), _rhs(2, 3)
    calls = _failing_eigh(monkeypatch, lambda n, m: n <= 2)
    x, path, rank, _, fallback, _ = solver.factor_solve(matrix, rhs)
    assert len(calls) == 3 and path == "eigh" and rank == 2
    assert "float64 with jitter" in fallback
    np.testing.assert_allclose(x.numpy(), _min_norm(matrix, rhs, 1e-10), rtol=1e-9, atol=1e-12)


def test_every_factorization_failing_is_a_solve_error(monkeypatch):
    calls = _failing_eigh(monkeypatch, lambda n, m: True)
    with pytest.raises(SolveError, match="layer conv3: every factorization of its 3x3 matrix failed"):
        solver.factor_solve(_psd([0.0, 1.0, 3.0]), _rhs(2, 3), layer="conv3")
    assert len(calls) == 3


@pytest.mark.parametrize("relative", [True, False])
def test_primal_damping_and_residual(relative):
    gram, grad = _psd([0.0, 0.5, 1.0, 2.5]), _rhs(3, 4)
    x, info = solver.solve(solver.primal_problem(gram, grad, damping=0.1, relative_damping=relative))
    lam = 0.1 * float(torch.diagonal(gram).mean()) if relative else 0.1
    assert info.damping == pytest.approx(lam) and info.path == "cholesky"
    np.testing.assert_allclose(x.numpy(), grad.numpy() @ np.linalg.inv(gram.numpy() + lam * np.eye(4)), rtol=1e-10)
    assert info.residual() < 1e-13


def test_dual_equals_primal_on_explicit_rows():
    """N = 5 rows of d = 8 inputs: the 5 x 5 kernel gives the min-norm answer of the singular 8 x 8 Gram."""
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    signals = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    grad, batch = signals.T @ rows, 4
    gram = rows.T @ rows / batch
    primal, pinfo = solver.solve(solver.primal_problem(gram, grad))
    dual, dinfo = solver.solve(solver.dual_problem(rows @ rows.T, signals, grad, batch, rows.__rmatmul__, 8))
    assert (pinfo.path, pinfo.rank) == ("eigh", 5) and (dinfo.path, dinfo.rank) == ("dual-cholesky", 5)
    np.testing.assert_allclose(dual.numpy(), _min_norm(gram, grad, 1e-10), rtol=1e-9)
    np.testing.assert_allclose(primal.numpy(), dual.numpy(), rtol=1e-8)
    assert dinfo.residual() < 1e-12


def test_safe_divide_is_zero_where_the_denominator_is():
    x, d = torch.tensor([1.0, -2.0, 3.0, 4.0]), torch.tensor([2.0, 0.0, -3.0, 0.0])
    assert torch.equal(solver.safe_divide(x, d), torch.tensor([0.5, 0.0, -1.0, 0.0]))
    keep = torch.tensor([True, True, False, True])
    assert torch.equal(solver.safe_divide(x, torch.ones(4), keep), torch.tensor([1.0, -2.0, 0.0, 4.0]))
