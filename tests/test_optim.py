"""Tests for backmatch_exact.optim (LARS, LSALR) against float64 hand computations."""

import copy
import math

import numpy as np
import pytest
import torch

from backmatch_exact.optim import LARS, LSALR, lars_scale, lsalr_scale


# ---------------------------------------------------------------- references

def ref_lars_factor(w, g, eps=0.0):
    wn, gn = np.linalg.norm(w), np.linalg.norm(g)
    if wn == 0 or gn == 0:
        return 1.0
    return wn / (gn + eps)


def ref_lsalr_factor(w, g):
    gn = np.linalg.norm(g)
    if gn == 0:
        return 1.0
    return 1.0 + math.log(1.0 + 1.0 / gn)


def ref_run(factor, w0, grads, lr, momentum=0.0, nesterov=False, wd=0.0):
    """numpy reference: apply the documented chain for a sequence of raw gradients."""
    w = np.array(w0, dtype=np.float64)
    buf = None
    for grad in grads:
        g = grad + wd * w
        u = lr * factor(w, g) * g
        if momentum:
            buf = u.copy() if buf is None else momentum * buf + u
            step = u + momentum * buf if nesterov else buf
        else:
            step = u
        w = w - step
    return w


def torch_run(cls, w0, grads, **kw):
    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = cls([p], **kw)
    for grad in grads:
        p.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
    return p.detach().numpy(), opt


FACTORS = {LARS: ref_lars_factor, LSALR: ref_lsalr_factor}

rng = np.random.default_rng(0)
W0 = rng.normal(size=(4, 3))
GRADS = [rng.normal(size=(4, 3)) * s for s in (0.3, 2.0, 0.05)]

CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, nesterov=True),
    dict(lr=0.1, weight_decay=0.5),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.3),
]


def _ref_kw(cfg):
    return dict(lr=cfg["lr"], momentum=cfg.get("momentum", 0.0),
                nesterov=cfg.get("nesterov", False), wd=cfg.get("weight_decay", 0.0))


# ---------------------------------------------------------------- hand checks

def test_lars_one_step_explicit_numbers():
    # W = [3, 4] (‖W‖ = 5), g = [0, 2] (‖g‖ = 2): ratio 2.5, local lr 0.25.
    w, _ = torch_run(LARS, [3.0, 4.0], [np.array([0.0, 2.0])], lr=0.1)
    np.testing.assert_allclose(w, [3.0, 4.0 - 0.25 * 2.0], rtol=0, atol=1e-15)


def test_lars_weight_decay_enters_trust_ratio():
    # wd = 1: g = [0,2] + [3,4] = [3,6], ‖g‖ = sqrt(45); ratio = 5/sqrt(45).
    w, _ = torch_run(LARS, [3.0, 4.0], [np.array([0.0, 2.0])], lr=0.1, weight_decay=1.0)
    r = 5.0 / math.sqrt(45.0)
    np.testing.assert_allclose(w, [3.0 - 0.1 * r * 3.0, 4.0 - 0.1 * r * 6.0], rtol=1e-14)
    # ‖step‖ = lr * ‖W‖ exactly (trust ratio uses the gradient actually stepped)
    np.testing.assert_allclose(np.linalg.norm(w - [3.0, 4.0]), 0.1 * 5.0, rtol=1e-14)


def test_lsalr_one_step_explicit_numbers():
    # g = [0, 0.5]: ‖g‖ = 0.5, factor 1 + log(3).
    w, _ = torch_run(LSALR, [3.0, 4.0], [np.array([0.0, 0.5])], lr=0.1)
    f = 1.0 + math.log(3.0)
    np.testing.assert_allclose(w, [3.0, 4.0 - 0.1 * f * 0.5], rtol=1e-15)


@pytest.mark.parametrize("cls", [LARS, LSALR])
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("nsteps", [1, 2, 3])
def test_matches_reference(cls, cfg, nsteps):
    got, _ = torch_run(cls, W0, GRADS[:nsteps], **cfg)
    want = ref_run(FACTORS[cls], W0, GRADS[:nsteps], **_ref_kw(cfg))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    # and the step is not trivially equal to plain SGD
    sgd = ref_run(lambda w, g: 1.0, W0, GRADS[:nsteps], **_ref_kw(cfg))
    assert not np.allclose(got, sgd)


def test_two_steps_momentum_explicit():
    # 1-D: W=[2], g1=[1], g2=[4]; LARS, lr=0.1, momentum 0.5.
    # step1: ratio 2/1=2, u1=0.2, buf=0.2, W=1.8
    # step2: ratio 1.8/4=0.45, u2=0.1*0.45*4=0.18, buf=0.5*0.2+0.18=0.28, W=1.52
    w, opt = torch_run(LARS, [2.0], [np.array([1.0]), np.array([4.0])], lr=0.1, momentum=0.5)
    np.testing.assert_allclose(w, [1.52], rtol=1e-14)
    (p,) = opt.param_groups[0]["params"]
    np.testing.assert_allclose(opt.state[p]["momentum_buffer"].numpy(), [0.28], rtol=1e-14)
    # Nesterov: step2 = u2 + 0.5*buf = 0.18 + 0.14 = 0.32; step1 = 0.2 + 0.1 = 0.3
    # W1 = 1.7, ratio2 = 1.7/4, u2 = 0.17, buf2 = 0.1 + 0.17 = 0.27, step2 = 0.17+0.135
    w, _ = torch_run(LARS, [2.0], [np.array([1.0]), np.array([4.0])], lr=0.1, momentum=0.5,
                     nesterov=True)
    np.testing.assert_allclose(w, [1.7 - 0.305], rtol=1e-14)


def test_no_buffer_without_momentum():
    _, opt = torch_run(LSALR, W0, GRADS[:2], lr=0.1)
    (p,) = opt.param_groups[0]["params"]
    assert "momentum_buffer" not in opt.state[p]


def test_scale_functions_directly():
    w = torch.tensor([3.0, 4.0], dtype=torch.float64)
    g = torch.tensor([0.0, 2.0], dtype=torch.float64)
    assert lars_scale(w, g).item() == pytest.approx(2.5)
    assert lars_scale(w, g, eps=3.0).item() == pytest.approx(1.0)
    assert lsalr_scale(g).item() == pytest.approx(1.0 + math.log(1.5))
    big = torch.tensor([300.0, 400.0], dtype=torch.float64)
    assert lsalr_scale(big).item() == pytest.approx(1.0 + math.log1p(1 / 500.0), rel=1e-15)


# ---------------------------------------------------------------- state dict

@pytest.mark.parametrize("cls,cfg", [
    (LARS, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    (LARS, dict(lr=0.1, momentum=0.9, nesterov=True, eps=1e-3)),
    (LSALR, dict(lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.2)),
])
def test_state_dict_round_trip(cls, cfg):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model.double()
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(8, 2, dtype=torch.float64)

    def train_step(m, opt):
        opt.zero_grad()
        loss = ((m(x) - y) ** 2).mean()
        loss.backward()
        opt.step()

    opt = cls(model.parameters(), **cfg)
    for _ in range(3):
        train_step(model, opt)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())

    train_step(model, opt)  # uninterrupted 4th step
    want = [p.detach().clone() for p in model.parameters()]

    model2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model2.double()
    model2.load_state_dict(saved_model)
    opt2 = cls(model2.parameters(), lr=123.0)  # hyper-parameters come from the state dict
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["lr"] == cfg["lr"]
    train_step(model2, opt2)
    for a, b in zip(want, model2.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=0)

    # without the momentum buffers the 4th step would differ (test has teeth)
    model3 = copy.deepcopy(model2)
    model3.load_state_dict(saved_model)
    train_step(model3, cls(model3.parameters(), **cfg))
    assert any(not torch.equal(a, b) for a, b in zip(want, model3.parameters()))


# ---------------------------------------------------------------- degenerate

@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_lars_zero_weight_is_plain_sgd(momentum):
    g = np.array([[0.5, -1.0], [2.0, 0.25]])
    w, _ = torch_run(LARS, np.zeros((2, 2)), [g], lr=0.1, momentum=momentum)
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w, -0.1 * g, rtol=1e-15)


@pytest.mark.parametrize("cls", [LARS, LSALR])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_zero_gradient_is_finite_no_op(cls, momentum):
    w, opt = torch_run(cls, W0, [np.zeros_like(W0)], lr=0.1, momentum=momentum)
    np.testing.assert_array_equal(w, W0)
    if momentum:
        (p,) = opt.param_groups[0]["params"]
        buf = opt.state[p]["momentum_buffer"]
        assert torch.all(torch.isfinite(buf)) and torch.all(buf == 0)


def test_zero_gradient_factor_is_one():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    z = torch.zeros(2, dtype=torch.float64)
    assert lars_scale(w, z).item() == 1.0
    assert lars_scale(z, w).item() == 1.0
    assert lsalr_scale(z).item() == 1.0


def test_zero_gradient_with_momentum_keeps_coasting():
    # a zero gradient after a real step must not produce NaN and must keep momentum
    w, _ = torch_run(LARS, [2.0], [np.array([1.0]), np.array([0.0])], lr=0.1, momentum=0.5)
    # step1: 0.2 -> 1.8; step2: u=0, buf=0.1 -> 1.7
    np.testing.assert_allclose(w, [1.7], rtol=1e-14)


def test_lsalr_tiny_gradient_finite_half():
    # float16: ‖g‖ = 6e-6 is representable but 1/‖g‖ overflows to inf.
    g = torch.full((1,), 6e-6, dtype=torch.float16)
    assert torch.isinf(1 / torch.linalg.vector_norm(g))
    s = lsalr_scale(g)
    n = float(torch.linalg.vector_norm(g))
    assert torch.isfinite(s)
    assert s.item() == pytest.approx(1.0 + math.log(1.0 + 1.0 / n), rel=1e-2)
    p = torch.nn.Parameter(torch.ones(1, dtype=torch.float16))
    p.grad = g
    LSALR([p], lr=0.1).step()
    assert torch.all(torch.isfinite(p))


def test_lsalr_small_norm_matches_reference():
    g = torch.tensor([1e-30, 0.0], dtype=torch.float64)
    assert lsalr_scale(g).item() == pytest.approx(1.0 + math.log1p(1e30), rel=1e-15)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("cls", [LARS, LSALR])
@pytest.mark.parametrize("kw,match", [
    (dict(lr=-0.1), "learning rate"),
    (dict(lr=float("nan")), "learning rate"),
    (dict(lr=0.1, momentum=-0.5), "momentum"),
    (dict(lr=0.1, nesterov=True), "Nesterov"),
    (dict(lr=0.1, momentum=0.0, nesterov=True), "Nesterov"),
    (dict(lr=0.1, weight_decay=-1e-4), "weight_decay"),
])
def test_invalid_arguments(cls, kw, match):
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=match):
        cls([p], **kw)


def test_lars_invalid_eps():
    with pytest.raises(ValueError, match="eps"):
        LARS([torch.nn.Parameter(torch.ones(2))], lr=0.1, eps=-1.0)


@pytest.mark.parametrize("cls", [LARS, LSALR])
def test_invalid_group_override(cls):
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="learning rate"):
        cls([{"params": [a]}, {"params": [b], "lr": -1.0}], lr=0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        cls([{"params": [a]}, {"params": [b], "momentum": 0.0}], lr=0.1, momentum=0.9,
            nesterov=True)


# ---------------------------------------------------------------- groups, closure, None grads

@pytest.mark.parametrize("cls", [LARS, LSALR])
def test_param_groups_respect_lr_and_overrides(cls):
    a = torch.nn.Parameter(torch.tensor(W0))
    b = torch.nn.Parameter(torch.tensor(W0))
    opt = cls([{"params": [a]}, {"params": [b], "lr": 0.01, "weight_decay": 0.5}], lr=0.1)
    for grad in GRADS[:2]:
        a.grad = torch.tensor(grad)
        b.grad = torch.tensor(grad)
        opt.step()
    np.testing.assert_allclose(a.detach().numpy(),
                               ref_run(FACTORS[cls], W0, GRADS[:2], lr=0.1), rtol=1e-13)
    np.testing.assert_allclose(b.detach().numpy(),
                               ref_run(FACTORS[cls], W0, GRADS[:2], lr=0.01, wd=0.5), rtol=1e-13)
    assert not np.allclose(a.detach().numpy(), b.detach().numpy())


def test_layers_are_per_tensor():
    # two tensors in one group get different trust ratios (their own norms)
    a = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([30.0, 40.0], dtype=torch.float64))
    a.grad = torch.tensor([0.0, 2.0], dtype=torch.float64)
    b.grad = torch.tensor([0.0, 2.0], dtype=torch.float64)
    LARS([a, b], lr=0.1).step()
    np.testing.assert_allclose(a.detach().numpy(), [3.0, 3.5])   # ratio 2.5
    np.testing.assert_allclose(b.detach().numpy(), [30.0, 35.0])  # ratio 25


@pytest.mark.parametrize("cls", [LARS, LSALR])
def test_skips_none_grad_and_closure(cls):
    a = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.full((3,), 7.0, dtype=torch.float64))
    opt = cls([a, frozen], lr=0.1, momentum=0.9)
    calls = []

    def closure():
        opt.zero_grad()
        loss = (a ** 2).sum()
        loss.backward()
        calls.append(1)
        return loss

    loss = opt.step(closure)
    assert calls == [1] and loss.item() == pytest.approx(3.0)
    assert frozen.grad is None and torch.equal(frozen, torch.full((3,), 7.0, dtype=torch.float64))
    assert len(opt.state[frozen]) == 0
    want = ref_run(FACTORS[cls], np.ones(3), [2 * np.ones(3)], lr=0.1, momentum=0.9)
    np.testing.assert_allclose(a.detach().numpy(), want, rtol=1e-14)
    assert opt.step() is None
