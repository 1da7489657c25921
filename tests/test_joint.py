"""The joint input signal (``signals="joint"``, ``backmatch_exact/joint.py``) against an independent dense oracle.

Oracle (float64, nothing from ``backmatch_exact``): per sample the explicit Jacobian J
of the layer (``torch.func.jacrev``, ``tests/oracle.py``), then

* undamped: ``g'_a = numpy.linalg.lstsq(J, g'_b)`` — the minimum-norm least-squares answer;
* damped:   ``g'_a = numpy.linalg.solve(JᵀJ + μ·m̄·I, Jᵀ g'_b)``, ``m̄ = mean_j ‖J_{:,j}‖²``.

A network is checked layer by layer from the top: the joint oracle at Linear, Conv2d and average
pooling, the per-unit oracle at the diagonal layers (MaxPool, BatchNorm, ReLU, Flatten), and each
weight layer's gradient from the oracle's signal at its output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import backmatch_exact as bm
from backmatch_exact import joint

try:
    from tests import oracle
    from tests.test_layer_rules import DT, RTOL, SETTINGS, assert_close, randn, randomize, seeds
except ImportError:  # pytest's rootdir/tests on sys.path
    import oracle
    from test_layer_rules import DT, RTOL, SETTINGS, assert_close, randn, randomize, seeds

FEW = settings(SETTINGS, max_examples=12)
mus = st.sampled_from([0.0, 0.0, 0.5, 2.0])

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the oracle

def joint_oracle(jacs: list[np.ndarray], R, mu: float = 0.0) -> np.ndarray:
    """Per sample ``J⁺ g'_b`` (lstsq, minimum norm) or ``(JᵀJ + μ m̄ I)⁻¹ Jᵀ g'_b``; shape (B, inputs)."""
    r = oracle.to_np(R).reshape(len(jacs), -1)
    if all(np.array_equal(jac, jacs[0]) for jac in jacs[1:]):  # one J for the batch: the samples are columns
        jacs, r = jacs[:1], [r.T]
    out = []
    for jac, g in zip(jacs, r):
        if mu:
            mean_col_sq = (jac * jac).sum(axis=0).mean()
            out.append(np.linalg.solve(jac.T @ jac + mu * mean_col_sq * np.eye(jac.shape[1]), jac.T @ g))
        else:
            out.append(np.linalg.lstsq(jac, g, rcond=oracle.RCOND)[0])
    return out[0].T if len(out) == 1 and out[0].ndim == 2 else np.stack(out)


def clear_rank(jacs: list[np.ndarray], kept: float = 1e-3) -> bool:
    """Every singular value of every J is rounding noise or comfortably non-zero (the minimum-norm answer is
    then well defined; in between it depends on where a solver cuts the rank)."""
    for jac in jacs:
        s = np.linalg.svd(jac, compute_uv=False)
        if s.size and s[0] > 0 and not np.all((s / s[0] < 1e-12) | (s / s[0] >= kept)):
            return False
    return True


def signal_oracle(layer: nn.Module, x: torch.Tensor, R, mu: float = 0.0) -> np.ndarray:
    return joint_oracle(oracle.input_jacobians(layer, x), R, mu).reshape(tuple(x.shape))


# ------------------------------------------------------------------ helpers

def run(layer: nn.Module, x: torch.Tensor, R: torch.Tensor, **kw):
    """``nn.Sequential(layer)`` with the joint rule, the output signal R injected. Returns (x.grad, stats)."""
    model = nn.Sequential(layer)
    x = x.detach().clone().requires_grad_(True)
    with bm.attach(model, mode="exact", signals="joint", **kw) as engine:
        (model(x) * R).sum().backward()
        stats = engine.stats()
    return x.grad.detach().clone(), stats


def output_signal(layer, x, gen):
    with torch.no_grad():
        return randn(gen, *layer(x).shape)


# ------------------------------------------------------------------ single layers, every path

@st.composite
def conv_cases(draw):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    size = (draw(st.integers(3, 7)), draw(st.integers(3, 7)))
    for n, p, d, k in zip(size, padding, dilation, kernel):
        assume(n + 2 * p - d * (k - 1) - 1 >= 0)
    return dict(cin=draw(st.integers(1, 3)), cout=draw(st.integers(1, 3)), kernel=kernel, stride=stride,
                padding=padding, dilation=dilation, bias=draw(st.booleans()), batch=draw(st.integers(1, 3)),
                size=size, seed=draw(seeds))


def make_conv(case):
    gen = torch.Generator().manual_seed(case["seed"])
    layer = randomize(nn.Conv2d(case["cin"], case["cout"], case["kernel"], stride=case["stride"],
                                padding=case["padding"], dilation=case["dilation"], bias=case["bias"]), gen)
    x = randn(gen, case["batch"], case["cin"], *case["size"])
    return layer, x, output_signal(layer, x, gen)


@FEW
@given(fan_in=st.integers(1, 6), fan_out=st.integers(1, 6), batch=st.integers(1, 4), bias=st.booleans(),
       positions=st.sampled_from([None, None, 3]), mu=mus, solver=st.sampled_from(["auto", "iterative"]), seed=seeds)
def test_linear(fan_in, fan_out, batch, bias, positions, mu, solver, seed):
    """W⁺ g'_b per sample and position: dual form when out < in (minimum norm there), primal otherwise."""
    gen = torch.Generator().manual_seed(seed)
    layer = randomize(nn.Linear(fan_in, fan_out, bias=bias), gen)
    x = randn(gen, *((batch,) if positions is None else (batch, positions)), fan_in)
    R = output_signal(layer, x, gen)
    assume(mu or clear_rank([layer.weight.detach().numpy()], 1e-2))
    g_a, (row,) = run(layer, x, R, signal_damping=mu, joint_solver=solver, joint_tol=1e-13)
    rows = x.reshape(-1, fan_in)
    expected = joint_oracle(oracle.input_jacobians(layer, rows), R.reshape(-1, fan_out), mu).reshape(x.shape)
    assert_close(g_a, expected, rtol=RTOL if solver == "auto" else 1e-7, what="g'_a")
    if solver == "auto":
        assert row["signal_path"] == ("dual-cholesky" if fan_out < fan_in else "cholesky"), row
        assert row["signal_rank"] == min(fan_in, fan_out)
    else:
        assert row["signal_path"] == "iterative" and row["signal_converged"] and row["signal_residual"] <= 1e-13


@FEW
@given(case=conv_cases(), mu=mus)
def test_conv2d_dense(case, mu):
    """The convolution's least-squares inverse over a sample's whole map: stride, padding, dilation, bias."""
    layer, x, R = make_conv(case)
    jacs = oracle.input_jacobians(layer, x)
    assume(mu or clear_rank(jacs))
    g_a, (row,) = run(layer, x, R, signal_damping=mu)
    assert_close(g_a, joint_oracle(jacs, R, mu).reshape(x.shape), what="g'_a")
    assert row["signal_path"] in ("cholesky", "eigh") and row["signal_residual"] < 1e-9


@FEW
@given(case=conv_cases(), mu=mus)
@example(case=dict(cin=1, cout=1, kernel=(1, 2), stride=(1, 1), padding=(1, 0), dilation=(1, 1), bias=False, batch=1,
                   size=(3, 3), seed=0), mu=0.0)  # more outputs than inputs, yet rank-deficient: padding-only rows
def test_conv2d_iterative_equals_dense(case, mu):
    """CGLS to 1e-13 against the dense factorization of the same problem (and the oracle)."""
    layer, x, R = make_conv(case)
    jacs = oracle.input_jacobians(layer, x)
    assume(mu or clear_rank(jacs, 1e-2))
    dense, _ = run(layer, x, R, signal_damping=mu, joint_solver="dense")
    iterative, (row,) = run(layer, x, R, signal_damping=mu, joint_solver="iterative", joint_tol=1e-13,
                            joint_max_iter=2000)
    assert row["signal_path"] == "iterative" and row["signal_converged"], row
    assert row["signal_residual"] <= 1e-13 and row["signal_iterations"] >= 1
    assert_close(iterative, dense, rtol=1e-7, what="iterative vs dense")
    assert_close(dense, joint_oracle(jacs, R, mu).reshape(x.shape), what="dense vs oracle")


@FEW
@given(kernel=st.integers(2, 3), stride=st.integers(1, 3), padding=st.integers(0, 1), ceil=st.booleans(),
       count_include_pad=st.booleans(), divisor=st.sampled_from([None, None, 5]), mu=mus,
       solver=st.sampled_from(["auto", "dense", "iterative"]), seed=seeds)
def test_avgpool2d(kernel, stride, padding, ceil, count_include_pad, divisor, mu, solver, seed):
    """Overlapping (stride < kernel), padded, count_include_pad both ways, ceil_mode, divisor_override."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil, count_include_pad=count_include_pad,
                         divisor_override=divisor)
    x = randn(gen, 2, 2, 6, 7)
    R = output_signal(layer, x, gen)
    jacs = oracle.input_jacobians(layer, x)
    assume(mu or clear_rank(jacs))
    g_a, (row,) = run(layer, x, R, signal_damping=mu, joint_solver=solver, joint_tol=1e-13)
    assert_close(g_a, joint_oracle(jacs, R, mu).reshape(x.shape), rtol=1e-7 if solver == "iterative" else RTOL)
    assert row["layer"] == "0" and row["kind"] == "AvgPool2d" and row["signal_converged"]


@FEW
@given(out_h=st.integers(1, 8), out_w=st.one_of(st.none(), st.integers(1, 8)), mu=mus,
       solver=st.sampled_from(["auto", "iterative"]), seed=seeds)
def test_adaptive_avgpool2d(out_h, out_w, mu, solver, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.AdaptiveAvgPool2d((out_h, out_w))
    x = randn(gen, 2, 2, 5, 6)
    R = output_signal(layer, x, gen)
    jacs = oracle.input_jacobians(layer, x)
    assume(mu or clear_rank(jacs))
    g_a, _ = run(layer, x, R, signal_damping=mu, joint_solver=solver, joint_tol=1e-13)
    assert_close(g_a, joint_oracle(jacs, R, mu).reshape(x.shape), rtol=1e-7 if solver == "iterative" else RTOL)


@pytest.mark.parametrize("mu", [0.0, 1.0])
def test_disjoint_average_pool_closed_form(mu):
    """A window of |K| inputs read by no other window gives each of them g_b·|K|/(|K| + μ) (joint), against
    |K|·g_b/(1 + μ) per unit."""
    gen = torch.Generator().manual_seed(0)
    x, R = randn(gen, 2, 3, 4, 6), randn(gen, 2, 3, 2, 3)
    layer = nn.AvgPool2d(2)
    g_a, _ = run(layer, x, R, signal_damping=mu)
    window = R.repeat_interleave(2, -2).repeat_interleave(2, -1)
    assert_close(g_a, window * 4 / (4 + mu))
    model = nn.Sequential(layer)
    with bm.attach(model, mode="exact", signal_damping=mu):  # per unit: |K| times more at μ = 0
        xg = x.clone().requires_grad_(True)
        (model(xg) * R).sum().backward()
    assert_close(xg.grad, window * 4 / (1 + mu))


def test_linear_is_the_pseudo_inverse():
    gen = torch.Generator().manual_seed(1)
    for fan_in, fan_out in ((7, 3), (3, 7)):
        layer = randomize(nn.Linear(fan_in, fan_out), gen)
        x, R = randn(gen, 5, fan_in), randn(gen, 5, fan_out)
        g_a, _ = run(layer, x, R)
        assert_close(g_a, R @ torch.linalg.pinv(layer.weight.detach()).T)


# ------------------------------------------------------------------ rank-deficient operators

@pytest.mark.parametrize("solver", ["dense", "iterative"])
def test_rank_deficient_operators_give_the_minimum_norm_answer(solver):
    """More inputs than outputs (Linear 6→2, a strided conv with fewer outputs than inputs), zero columns (a
    dead input unit, a dead input channel, pixels no window reads): lstsq's minimum-norm answer, 0 where a
    unit feeds nothing."""
    gen = torch.Generator().manual_seed(3)
    wide = randomize(nn.Linear(6, 2), gen)
    dead_unit = randomize(nn.Linear(4, 5), gen)
    with torch.no_grad():
        dead_unit.weight[:, 1] = 0.0
    strided = randomize(nn.Conv2d(3, 2, 2, stride=2), gen)  # 2·3·3 = 18 outputs for 3·6·6 = 108 inputs
    dead_channel = randomize(nn.Conv2d(3, 4, 3, padding=1), gen)
    with torch.no_grad():
        dead_channel.weight[:, 2] = 0.0
    unread = randomize(nn.Conv2d(2, 3, 1, stride=2), gen)  # odd rows and columns are read by no window
    cases = [(wide, randn(gen, 4, 6), None), (dead_unit, randn(gen, 4, 4), (slice(None), 1)),
             (strided, randn(gen, 2, 3, 6, 6), None), (dead_channel, randn(gen, 2, 3, 5, 4), (slice(None), 2)),
             (unread, randn(gen, 2, 2, 6, 7), (slice(None), slice(None), slice(1, None, 2)))]
    for layer, x, dead in cases:
        R = output_signal(layer, x, gen)
        jacs = oracle.input_jacobians(layer, x)
        assert clear_rank(jacs)
        assert any(np.linalg.matrix_rank(j) < j.shape[1] for j in jacs)  # rank-deficient indeed
        g_a, (row,) = run(layer, x, R, joint_solver=solver, joint_tol=1e-13, joint_max_iter=3000)
        assert_close(g_a, joint_oracle(jacs, R).reshape(x.shape), rtol=RTOL if solver == "dense" else 1e-7,
                     what=f"{layer} ({row['signal_path']})")
        if dead is not None:
            assert not g_a[dead].any()
        if solver == "dense":
            assert row["signal_rank"] == max(np.linalg.matrix_rank(j) for j in jacs), row


def test_scaled_factorization_that_cuts_a_rank_is_redone_unscaled():
    """The Jacobi-scaled pseudo-inverse is not the minimum-norm one: a strided conv with fewer outputs than
    inputs (primal path, singular JᵀJ, border units with small columns) must still match lstsq."""
    gen = torch.Generator().manual_seed(5)
    layer = randomize(nn.Conv2d(2, 1, 3, stride=2, padding=1), gen)
    x = randn(gen, 2, 2, 7, 7)
    R = output_signal(layer, x, gen)
    g_a, (row,) = run(layer, x, R, joint_solver="dense")
    assert row["signal_path"] == "eigh" and row["signal_rank"] == 16  # 16 outputs for 98 inputs
    assert_close(g_a, signal_oracle(layer, x, R))


# ------------------------------------------------------------------ networks

def _layer_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
    """Every leaf module with its input, in forward order (a plain forward pass, no engine)."""
    calls = []
    handles = [m.register_forward_pre_hook(lambda m, args: calls.append((m, args[0].detach().clone())))
               for m in model.modules() if next(m.children(), None) is None]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return calls


JOINT_TYPES = (nn.Linear, nn.Conv2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def network_oracle(model: nn.Module, x: torch.Tensor, R: torch.Tensor, mu: float, damping: float):
    """From the top down: the joint oracle at Linear, Conv2d and average pooling, the per-unit one elsewhere.

    Returns ``(signal at the input, {module: {param: g'}})``.
    """
    grads, signal = {}, R
    for module, a in reversed(_layer_inputs(model, x)):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            grads[module] = oracle.weight_oracle(module, a, signal, damping)
        if isinstance(module, JOINT_TYPES):
            signal = signal_oracle(module, a, signal, mu)
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            signal = oracle.batchnorm_oracle(module, a, signal)["input"]
        else:  # MaxPool (damped like every pooling layer), ReLU, Flatten: diagonal JᵀJ, joint = per unit
            signal = oracle.signal_oracle(module, a, signal, mu if isinstance(module, nn.MaxPool2d) else 0.0)
        signal = torch.from_numpy(np.ascontiguousarray(signal))
    return signal, grads


def small_vgg_bn() -> nn.Sequential:
    """VGG-BN shaped, 8x8 input, with an overlapping padded average pool and a global one in the chain."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, affine=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5, bias=False))


@pytest.mark.parametrize("net, mu, damping, solver", [
    ("lenet", 0.0, 0.0, "auto"), ("lenet", 0.5, 0.1, "auto"),
    ("vgg", 0.0, 0.0, "auto"), ("vgg", 1.0, 0.1, "iterative")])
def test_whole_network(net, mu, damping, solver):
    """Signals and weight gradients of LeNet-BN and a small VGG-BN, layer by layer, against the oracle (float64).

    LeNet's input does not require grad, so nothing is solved below cv1 (its stats say ``none``); the VGG's
    does, and its input signal is checked too.
    """
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if net == "lenet":
        model, x = bm.models.lenet_bn(1, 10).to(DT), randn(gen, 3, 1, 32, 32)
    else:
        model, x = randomize(small_vgg_bn(), gen), randn(gen, 3, 2, 8, 8)
    R = output_signal(model, x, gen)
    x_in = x.clone().requires_grad_(net == "vgg")
    with bm.attach(model, mode="exact", signals="joint", signal_damping=mu, damping=damping, joint_solver=solver,
                   joint_tol=1e-13) as engine:
        (model(x_in) * R).sum().backward()
        stats = {row["layer"]: row for row in engine.stats()}
    signal, expected = network_oracle(model, x, R, mu, damping)
    rtol = RTOL if solver == "auto" else 1e-7
    for module, grads in expected.items():
        for name, value in grads.items():
            assert_close(getattr(module, name).grad, value, rtol=rtol, what=f"{module} {name}")
    if net == "lenet":
        assert stats["cv1"]["signal_path"] == "none" and stats["cv2"]["signal_path"] == "cholesky"
        assert [stats[f"fc{i}"]["signal_path"] for i in (1, 2, 3)] == ["dual-cholesky"] * 3
    else:
        assert_close(x_in.grad, signal, rtol=rtol, what="signal at the input")
        pools = [row for row in stats.values() if row["kind"].endswith("AvgPool2d")]
        assert len(pools) == 2 and all(row["signal_converged"] for row in pools)
    assert all(row["signal_residual"] < 1e-9 for row in stats.values() if row["signal_path"] != "none")


def test_no_signal_below_the_first_weight_layer(monkeypatch):
    """The joint solve runs once per layer that has something below it: never for cv1 when x needs no gradient."""
    calls = []
    real = joint.solve
    monkeypatch.setattr(joint, "solve", lambda *a, **kw: calls.append(kw.get("layer", a[4])) or real(*a, **kw))
    torch.manual_seed(0)
    model = bm.models.lenet_bn(1, 10).to(DT)
    x, y = torch.randn(4, 1, 32, 32, dtype=DT), torch.randint(0, 10, (4,))
    with bm.attach(model, mode="exact", signals="joint") as engine:
        F.cross_entropy(model(x), y).backward()
        assert calls == ["fc3", "fc2", "fc1", "cv2"]
        assert engine.stats()[0]["signal_path"] == "none"
        calls.clear()
        F.cross_entropy(model(x.requires_grad_(True)), y).backward()
        assert calls == ["fc3", "fc2", "fc1", "cv2", "cv1"]
        assert engine.stats()[0]["signal_path"] == "cholesky"


# ------------------------------------------------------------------ numerics reported, never hidden

def test_a_solve_that_misses_its_tolerance_raises_or_is_recorded():
    gen = torch.Generator().manual_seed(2)
    layer = randomize(nn.Conv2d(3, 3, 3, padding=1), gen)
    x = randn(gen, 2, 3, 6, 6)
    R = output_signal(layer, x, gen)
    with pytest.raises(bm.SolveError, match=r"layer 0: .*tolerance 1e-12 in 3 iterations.*residual"):
        run(layer, x, R, joint_solver="iterative", joint_tol=1e-12, joint_max_iter=3)
    g_a, (row,) = run(layer, x, R, joint_solver="iterative", joint_tol=1e-12, joint_max_iter=3,
                      on_no_convergence="record")
    assert not row["signal_converged"] and row["signal_iterations"] == 3 and row["signal_residual"] > 1e-12
    assert np.isfinite(g_a.numpy()).all()
    exact = signal_oracle(layer, x, R)
    assert 0 < np.abs(g_a.numpy() - exact).max() / np.abs(exact).max() < 1  # an iterate on its way, not the answer


def test_statistics_read_after_the_optimizer_step_describe_the_solve():
    """The dense residual is computed when stats() reads it, from a snapshot of the call's J: an optimizer step
    in between (which moves the weights in place) does not change it."""
    torch.manual_seed(0)
    model = bm.models.lenet_bn(1, 10).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = torch.randn(4, 1, 32, 32, dtype=DT), torch.randint(0, 10, (4,))
    with bm.attach(model, mode="exact", signals="joint") as engine:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rows = engine.stats()
    assert [r["signal_path"] for r in rows] == ["none", "cholesky", "dual-cholesky", "dual-cholesky", "dual-cholesky"]
    assert all(isinstance(r["signal_residual"], float) for r in rows)
    assert all(r["signal_residual"] < 1e-12 for r in rows[1:]), rows


def test_float32_paths_agree_with_float64():
    """The automatic float32 tolerance (1e-5) is reached, and dense and iterative answers are float32-close."""
    torch.manual_seed(0)
    model = bm.models.lenet_bn(1, 10)
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    results = {}
    for dtype, solver in ((torch.float64, "dense"), (torch.float32, "dense"), (torch.float32, "iterative")):
        m = model.to(dtype)
        xin = x.to(dtype).clone().requires_grad_(True)
        with bm.attach(m, mode="exact", signals="joint", signal_damping=0.1, joint_solver=solver) as engine:
            F.cross_entropy(m(xin), y).backward()
            stats = engine.stats()
        assert all(row["signal_converged"] for row in stats)
        if solver == "iterative":
            assert all(row["signal_residual"] <= 1e-5 for row in stats), stats
        results[dtype, solver] = xin.grad.double()
        m.zero_grad()
    reference = results[torch.float64, "dense"]
    for key in ((torch.float32, "dense"), (torch.float32, "iterative")):
        assert_close(results[key], reference, rtol=1e-3, what=str(key))


def test_automatic_choice_is_visible_and_overridable():
    gen = torch.Generator().manual_seed(4)
    layer = randomize(nn.Conv2d(1, 2, 3, padding=1), gen)
    x = randn(gen, 2, 1, 10, 10)
    R = output_signal(layer, x, gen)
    for solver, path in (("auto", "cholesky"), ("iterative", "iterative")):
        _, (row,) = run(layer, x, R, joint_solver=solver)
        assert row["signal_path"] == path
    old = joint.DENSE_MAX
    try:
        joint.DENSE_MAX = 99  # 100 input units: now too many for auto's dense path
        _, (row,) = run(layer, x, R)
        assert row["signal_path"] == "iterative" and row["signal_converged"]
    finally:
        joint.DENSE_MAX = old


# ------------------------------------------------------------------ the API

def test_per_unit_stats_are_unchanged_and_joint_adds_its_keys():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(12, 4)).to(DT)
    x = torch.randn(3, 2, 4, 4, dtype=DT, requires_grad=True)
    rows = {}
    for signals in ("per_unit", "joint"):
        with bm.attach(model, mode="exact", signals=signals) as engine:
            model(x).square().sum().backward()
            rows[signals] = engine.stats()
    assert [r["layer"] for r in rows["per_unit"]] == ["0", "5"]
    assert not any(k.startswith("signal_") for r in rows["per_unit"] for k in r)
    assert [r["layer"] for r in rows["joint"]] == ["0", "3", "5"]  # the average pool gets a row of its own
    keys = set(joint.NO_SIGNAL)
    assert keys == {"signal_path", "signal_rank", "signal_iterations", "signal_residual", "signal_condition",
                    "signal_converged", "signal_fallback"}
    for row in rows["joint"]:
        assert keys <= set(row)
    assert set(rows["joint"][0]) - keys == set(rows["per_unit"][0])


def test_arguments_are_checked():
    model = nn.Sequential(nn.Linear(3, 2))
    for mode in ("bp", "exact_weights", "approx"):
        with pytest.raises(ValueError, match="sends no back-matched signal"):
            bm.attach(model, mode=mode, signals="joint")
    with pytest.raises(ValueError, match="approximations"):
        bm.attach(model, mode="exact", signals="joint", approximations=["columns"])
    for kw, match in ((dict(signals="both"), "signals"), (dict(joint_solver="lu"), "joint_solver"),
                      (dict(joint_tol=0.0), "joint_tol"), (dict(joint_max_iter=0), "joint_max_iter"),
                      (dict(on_no_convergence="warn"), "on_no_convergence")):
        with pytest.raises(ValueError, match=match):
            bm.attach(model, mode="exact", **({"signals": "joint"} | kw))
    with bm.attach(model, mode="exact") as engine:  # per_unit is the default
        assert engine.signals == "per_unit" and engine.joint is None


def test_timing_has_the_signal_parts():
    torch.manual_seed(0)
    model = bm.models.lenet_bn().to(DT)
    x, y = torch.randn(4, 3, 32, 32, dtype=DT), torch.randint(0, 10, (4,))
    with bm.attach(model, mode="exact", signals="joint") as engine:
        engine.timing.enable()
        F.cross_entropy(model(x), y).backward()
        totals = dict(engine.timing.totals)
    assert ("cv2", "signal_gram") in totals and ("cv2", "signal") in totals and ("fc1", "signal") in totals
    assert ("cv2", "input_signal") not in totals and ("bn2", "input_signal") in totals
