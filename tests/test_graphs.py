"""Branching networks (SPEC §8) against a dense oracle written from the definition, in float64.

Each test network is an ordinary ``nn.Module`` with a ``forward`` as users write it,
and beside it the same graph as a list of :class:`Node` s for the oracle. The
oracle (nothing from ``backmatch_exact``) runs the nodes forward, then walks the
values from the output down: a value's back-matched signal is the sum over its
consumers of ``J_cᵀ g'_c`` over the sum of their squared Jacobian columns, with
every ``J_c`` a dense per-sample Jacobian (``torch.func.jacrev``; BatchNorm's
diagonal ``γ/σ``, its batch coupling dropped). Weights and BatchNorm's γ, β come
from ``tests/oracle.py``'s dense least squares on the signal at their output.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import jacrev

import backmatch_exact as bm

try:
    from tests import oracle
except ImportError:  # pytest's rootdir/tests on sys.path
    import oracle

DT = torch.float64
RTOL = 1e-8
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the oracle
@dataclasses.dataclass
class Node:
    """One op of a graph: ``name = fn(*inputs)``. ``module``: a weight layer or BatchNorm whose parameters get
    oracle gradients; ``damped``: signal damping applies to its denominators (weights, pools)."""

    name: str
    fn: Callable
    inputs: list[str]
    module: nn.Module | None = None
    damped: bool = False
    batchnorm: bool = False


def _forward(nodes, x):
    values = {"x": x.detach()}
    for node in nodes:
        values[node.name] = node.fn(*[values[i] for i in node.inputs]).detach()
    return values


def _jacobians(node, values, wrt):
    """Per sample, the dense Jacobian of the node's output w.r.t. the value ``wrt`` (every occurrence of it)."""
    if node.batchnorm:  # the diagonal γ/σ: batch statistics held fixed (eq. 11 drops the coupling)
        a = values[wrt]
        dims = [0] + list(range(2, a.dim()))
        var = a.var(dim=dims, unbiased=False)
        gain = 1 / torch.sqrt(var + node.module.eps)
        if node.module.weight is not None:
            gain = gain * node.module.weight.detach()
        diag = gain.reshape((1, -1) + (1,) * (a.dim() - 2)).expand_as(a)
        return oracle.diagonal_jacobians(diag)
    jacs = []
    for i in range(values["x"].shape[0]):
        def sample_output(z):
            args = [z.unsqueeze(0) if name == wrt else values[name][i:i + 1] for name in node.inputs]
            return node.fn(*args).squeeze(0)
        z = values[wrt][i].clone()
        jacs.append(oracle.to_np(jacrev(sample_output)(z)).reshape(-1, z.numel()))
    return jacs


def _signals(nodes, values, R, mu=0.0, joint=False) -> dict[str, np.ndarray]:
    """The back-matched signal at every value, from the output signal R down (SPEC §8): per unit, or jointly
    (``joint``: per sample ``(Σ_c J_cᵀJ_c + λI)⁺ Σ_c J_cᵀ g'_c``, λ = μ·Σ over damped c of mean_j ‖J_c[:,j]‖²)."""
    signals = {nodes[-1].name: oracle.to_np(R)}
    for value in reversed(["x"] + [n.name for n in nodes[:-1]]):
        numerator, denominator, normal, lam = 0.0, 0.0, 0.0, 0.0
        for node in (n for n in nodes if value in n.inputs):
            jacs = _jacobians(node, values, value)
            r = signals[node.name].reshape(len(jacs), -1)
            numerator = numerator + np.stack([j.T @ ri for j, ri in zip(jacs, r)])
            normal = normal + np.stack([j.T @ j for j in jacs])
            col_sq = np.stack([(j * j).sum(axis=0) for j in jacs])
            denominator = denominator + (col_sq + mu * col_sq.mean() if node.damped and mu else col_sq)
            lam += mu * col_sq.mean(axis=1) if node.damped and mu else 0.0
        if joint:
            eye = np.eye(numerator.shape[1])
            signal = np.stack([np.linalg.pinv(m + (lam[i] if np.ndim(lam) else lam) * eye, rcond=1e-10,
                                              hermitian=True) @ n for i, (m, n) in enumerate(zip(normal, numerator))])
        else:
            ok = denominator > 0
            signal = np.where(ok, numerator / np.where(ok, denominator, 1.0), 0.0)
        signals[value] = signal.reshape(values[value].shape)
    return signals


def graph_oracle(nodes: list[Node], x: torch.Tensor, R: torch.Tensor, mu: float = 0.0, joint: bool = False):
    """Back-matched ``(g'_x, {module: {param: gradient}})`` of the graph for the output signal R (exact mode)."""
    values = _forward(nodes, x)
    signals = _signals(nodes, values, R, mu, joint)
    grads = {}
    for node in nodes:
        if node.module is None:
            continue
        a, R_node = values[node.inputs[0]], torch.from_numpy(signals[node.name])
        if node.batchnorm:
            bn = oracle.batchnorm_oracle(node.module, a, R_node)
            grads[node.module] = {k: v for k, v in bn.items() if k != "input"}
        else:
            grads[node.module] = oracle.weight_oracle(node.module, a, R_node)
    return signals["x"], grads


# ------------------------------------------------------------------ the networks
def _conv(cin, cout, k=3, stride=1):
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)


class IdentityBlock(nn.Module):
    """``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + x)`` with ``out += x`` and one ReLU module used twice."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = _conv(c, c), nn.BatchNorm2d(c), _conv(c, c), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x
        return self.relu(out)

    def nodes(self, inp="x", prefix=""):
        p = prefix
        return [Node(p + "c1", self.conv1, [inp], self.conv1, True), Node(p + "b1", self.bn1, [p + "c1"], self.bn1,
                                                                          batchnorm=True),
                Node(p + "r1", F.relu, [p + "b1"]), Node(p + "c2", self.conv2, [p + "r1"], self.conv2, True),
                Node(p + "b2", self.bn2, [p + "c2"], self.bn2, batchnorm=True),
                Node(p + "add", torch.add, [p + "b2", inp]), Node(p + "out", F.relu, [p + "add"])]


class ProjectionBlock(nn.Module):
    """A strided block whose shortcut is a 1x1 conv + BN, added out of place with ``torch.add``."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = _conv(c, 2 * c, stride=2), nn.BatchNorm2d(2 * c, affine=False)
        self.conv2, self.bn2 = _conv(2 * c, 2 * c), nn.BatchNorm2d(2 * c, affine=False)
        self.proj, self.bnp = nn.Conv2d(c, 2 * c, 1, 2, bias=False), nn.BatchNorm2d(2 * c, affine=False)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(torch.add(out, self.bnp(self.proj(x))))

    def nodes(self):
        return [Node("c1", self.conv1, ["x"], self.conv1, True), Node("b1", self.bn1, ["c1"], self.bn1, batchnorm=True),
                Node("r1", F.relu, ["b1"]), Node("c2", self.conv2, ["r1"], self.conv2, True),
                Node("b2", self.bn2, ["c2"], self.bn2, batchnorm=True),
                Node("p", self.proj, ["x"], self.proj, True), Node("bp", self.bnp, ["p"], self.bnp, batchnorm=True),
                Node("add", torch.add, ["b2", "bp"]), Node("out", F.relu, ["add"])]


class ThreeConsumers(nn.Module):
    """x feeds two convs and an add: ``relu(conv_a(x) + conv_b(x) + x)``."""

    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x) + x)

    def nodes(self):
        return [Node("a", self.a, ["x"], self.a, True), Node("b", self.b, ["x"], self.b, True),
                Node("ab", torch.add, ["a", "b"]), Node("abx", torch.add, ["ab", "x"]), Node("out", F.relu, ["abx"])]


class CatScaleNet(nn.Module):
    """``torch.cat``, a Python-scalar product, a division, ``x + x``, views and functional pools, a Linear head."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(2 * c, c, 3, padding=1, bias=False)
        self.fc = nn.Linear(c * 4, 3)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        y = self.conv2(torch.cat([0.5 * h, x / 4], 1))
        y = F.max_pool2d(y + y, 2) + F.avg_pool2d(x, 2, stride=2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 2), 1))

    def nodes(self):
        return [Node("c1", self.conv1, ["x"], self.conv1, True), Node("h", F.relu, ["c1"]),
                Node("hs", lambda h: 0.5 * h, ["h"]), Node("xs", lambda x: x / 4, ["x"]),
                Node("cat", lambda a, b: torch.cat([a, b], 1), ["hs", "xs"]),
                Node("c2", self.conv2, ["cat"], self.conv2, True), Node("yy", lambda y: y + y, ["c2"]),
                Node("mp", lambda y: F.max_pool2d(y, 2), ["yy"], damped=True),
                Node("ap", lambda x: F.avg_pool2d(x, 2, stride=2), ["x"], damped=True),
                Node("sum", torch.add, ["mp", "ap"]), Node("gap", lambda y: F.adaptive_avg_pool2d(y, 2), ["sum"],
                                                          damped=True),
                Node("flat", lambda y: torch.flatten(y, 1), ["gap"]), Node("out", self.fc, ["flat"], self.fc, True)]


class Nested(nn.Module):
    """Blocks inside a stage inside a network, and a residual around the whole stage."""

    def __init__(self, c):
        super().__init__()
        self.stem = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.stage = nn.Sequential(IdentityBlock(c), IdentityBlock(c))

    def forward(self, x):
        h = self.stem(x)
        return self.stage(h) + h

    def nodes(self):
        first, second = self.stage
        return ([Node("h", self.stem, ["x"], self.stem, True)] + first.nodes("h", "s0") + second.nodes("s0out", "s1")
                + [Node("out", torch.add, ["s1out", "h"])])


NETWORKS = {"identity": IdentityBlock, "projection": ProjectionBlock, "three": ThreeConsumers,
            "cat-scale-pools": CatScaleNet, "nested": Nested}


def _setup(kind, c=2, batch=3, size=6, seed=0):
    torch.manual_seed(seed)
    model = NETWORKS[kind](c).to(DT)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and module.affine:
                module.weight.uniform_(0.5, 2.0, generator=gen)
                module.bias.uniform_(-0.5, 0.5, generator=gen)
    x = torch.randn(batch, c, size, size, generator=gen, dtype=DT)
    with torch.no_grad():
        R = torch.randn(model(x).shape, generator=gen, dtype=DT)
    return model, x, R


def _engine_run(model, x, R, **attach):
    for p in model.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    if attach:
        with bm.attach(model, **attach):
            (model(x) * R).sum().backward()
    else:
        (model(x) * R).sum().backward()
    return x.grad.clone(), {m: {n: p.grad.clone() for n, p in m.named_parameters(recurse=False)}
                            for m in model.modules() if next(m.parameters(recurse=False), None) is not None}


def _assert_close(got, expected, what, rtol=RTOL):
    got, expected = oracle.to_np(got), np.asarray(expected)
    scale = max(np.abs(expected).max(), 1e-300)
    assert np.abs(got - expected).max() <= rtol * scale, (what, np.abs(got - expected).max() / scale)


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", list(NETWORKS))
@pytest.mark.parametrize("mu", [0.0, 0.7])
def test_exact_equals_the_dense_graph_oracle(kind, mu):
    model, x, R = _setup(kind)
    got_x, got = _engine_run(model, x, R, mode="exact", signal_damping=mu)
    want_x, want = graph_oracle(model.nodes(), x, R, mu)
    _assert_close(got_x, want_x, "x")
    for module, params in want.items():
        for name, value in params.items():
            _assert_close(got[module][name], value, f"{type(module).__name__}.{name}")


@pytest.mark.parametrize("kind", ["identity", "projection", "three", "nested"])
@pytest.mark.parametrize("mu", [0.0, 0.7])
def test_joint_signals_at_fan_outs_equal_the_dense_graph_oracle(kind, mu):
    """signals='joint' (SPEC §7–8): at a tensor feeding a conv and an add, (conv1ᵀconv1 + I)⁺ (conv1ᵀ g'_1 + g'_add)."""
    model, x, R = _setup(kind)
    got_x, got = _engine_run(model, x, R, mode="exact", signals="joint", signal_damping=mu)
    want_x, want = graph_oracle(model.nodes(), x, R, mu, joint=True)
    _assert_close(got_x, want_x, "x", rtol=1e-7)
    for module, params in want.items():
        for name, value in params.items():
            _assert_close(got[module][name], value, f"{type(module).__name__}.{name}", rtol=1e-7)
    per_unit_x, _ = _engine_run(model, x, R, mode="exact", signal_damping=mu)
    assert np.abs(oracle.to_np(per_unit_x) - want_x).max() > 1e-3 * np.abs(want_x).max()  # (not the per-unit rule)


def test_joint_signal_over_differently_laid_out_consumers_is_refused():
    """x feeds a conv (whole samples) and an average pool (per channel): a clear error, not a wrong answer."""
    model, x, R = _setup("cat-scale-pools")
    with bm.attach(model, mode="exact", signals="joint"):
        with pytest.raises(bm.GraphError, match="joint.*laid out differently.*per_unit"):
            (model(x.clone().requires_grad_(True)) * R).sum().backward()


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_exact_weights_solves_on_backprop_signals(kind):
    """exact_weights: the signals are autograd's; every weight is the dense least squares on its own."""
    model, x, R = _setup(kind)
    signals, inputs = {}, {}

    def record(module, args, out):
        inputs[module] = args[0].detach()
        out.register_hook(lambda g: signals.__setitem__(module, g.detach()))

    handles = [m.register_forward_hook(record) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    plain_x, _ = _engine_run(model, x, R)
    for h in handles:
        h.remove()
    got_x, got = _engine_run(model, x, R, mode="exact_weights")
    assert torch.equal(got_x, plain_x)
    for module, signal in signals.items():
        if isinstance(module, nn.BatchNorm2d):
            if module.affine:
                want = oracle.batchnorm_oracle(module, inputs[module], signal)
                for name in ("weight", "bias"):
                    _assert_close(got[module][name], want[name], f"BN.{name}")
        else:
            for name, value in oracle.weight_oracle(module, inputs[module], signal).items():
                _assert_close(got[module][name], value, f"{type(module).__name__}.{name}")


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_bp_mode_is_autograd_exactly(kind):
    model, x, R = _setup(kind)
    plain_x, plain = _engine_run(model, x, R)
    got_x, got = _engine_run(model, x, R, mode="bp")
    assert torch.equal(plain_x, got_x)
    assert all(torch.equal(plain[m][n], got[m][n]) for m in plain for n in plain[m])


@settings(max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["identity", "projection", "three"]), c=st.integers(1, 3), batch=st.integers(2, 4),
       size=st.sampled_from([4, 5, 6]), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_equal_the_oracle(kind, c, batch, size, seed):
    model, x, R = _setup(kind, c, batch, size, seed % 1000)
    got_x, got = _engine_run(model, x, R, mode="exact")
    want_x, want = graph_oracle(model.nodes(), x, R)
    _assert_close(got_x, want_x, "x", rtol=1e-7)
    for module, params in want.items():
        if isinstance(module, nn.Conv2d) and not oracle.well_posed(module, _input_of(model, module, x)):
            continue  # (a weight problem without a clear numerical rank: no float64 reference to 1e-8)
        for name, value in params.items():
            _assert_close(got[module][name], value, f"{type(module).__name__}.{name}", rtol=1e-7)


def _input_of(model, module, x):
    seen = {}
    handle = module.register_forward_pre_hook(lambda mod, a: seen.setdefault("a", a[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["a"]


def test_fan_out_is_not_the_sum_of_per_consumer_signals():
    """At x (feeding conv1 and the add) the denominators add; summing each consumer's own back-matched signal
    (what per-layer rules on autograd give) is a different, wrong answer."""
    model, x, R = _setup("identity", c=2)
    got_x, _ = _engine_run(model, x, R, mode="exact")
    nodes = model.nodes()
    values = _forward(nodes, x)
    signals = _signals(nodes, values, R)
    naive = 0.0  # Σ_c (J_cᵀ g'_c) / ‖J_c[:, j]‖², from the oracle's own signals at the consumers' outputs
    for node in (n for n in nodes if "x" in n.inputs):
        jacs = _jacobians(node, values, "x")
        r = signals[node.name].reshape(len(jacs), -1)
        num = np.stack([j.T @ ri for j, ri in zip(jacs, r)])
        den = np.stack([(j * j).sum(axis=0) for j in jacs])
        naive = naive + np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    naive = naive.reshape(tuple(x.shape))
    want_x = signals["x"]
    _assert_close(got_x, want_x, "x")
    assert np.abs(naive - want_x).max() > 0.1 * np.abs(want_x).max()


def test_capture_steps_off_for_leaf_modules_and_keeps_a_users_mode_in_place(monkeypatch):
    """Inside a leaf module the capture mode leaves the stack (its calls are not glue); a torch-function mode the
    model's own forward enters around a module call stays where it is: it still sees the calls after the
    module's, and the answer is the same as without it."""
    from torch.overrides import TorchFunctionMode

    from backmatch_exact import graph
    seen = []
    real = graph.Capture.__torch_function__

    def counted(self, func, types, args=(), kwargs=None):
        seen.append(getattr(func, "__name__", str(func)))
        return real(self, func, types, args, kwargs)

    monkeypatch.setattr(graph.Capture, "__torch_function__", counted)

    class Watch(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    class Net(nn.Module):
        def __init__(self, watch):
            super().__init__()
            self.conv, self.fc, self.watch = nn.Conv2d(2, 3, 3), nn.Linear(12, 2), watch

        def forward(self, x):
            if self.watch is None:
                return self.fc(torch.relu(self.conv(x)).flatten(1))
            with self.watch:
                h = torch.relu(self.conv(x))
            return self.fc(h.flatten(1))

    x, y = torch.randn(4, 2, 4, 4, dtype=DT), torch.arange(4) % 2
    grads = []
    for watch in (None, Watch()):
        torch.manual_seed(1)
        model = Net(watch).to(DT)
        seen.clear()
        with bm.attach(model, mode="exact", damping=0.1):
            F.cross_entropy(model(x), y).backward()
        grads.append([p.grad for p in model.parameters()])
        if watch is None:
            assert seen == ["relu", "flatten"]  # the glue only: no conv2d, linear or the engine's own calls
        else:
            assert "relu" in watch.seen and "flatten" in seen  # the user's mode stayed on top of the capture
        assert torch._C._len_torch_function_stack() == 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ what is refused
class _Glue(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.conv1, self.conv2, self.op = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), op

    def forward(self, x):
        return self.conv2(self.op(self.conv1(x), x))


@pytest.mark.parametrize("op, name", [
    (lambda h, x: h * x, "mul"), (lambda h, x: torch.sigmoid(h), "sigmoid"), (lambda h, x: h[:, :1].repeat(1, 2, 1, 1),
                                                                                "__getitem__"),
    (lambda h, x: torch.exp(h) + x, "exp"), (lambda h, x: 2.0 / h, "__rdiv__"),
])
def test_unsupported_glue_is_a_graph_error_naming_op_and_line(op, name):
    model = _Glue(op).to(DT)
    with bm.attach(model, mode="exact"):
        with pytest.raises(bm.GraphError, match=rf"{name} \(called at .*test_graphs\.py:\d+"):
            model(torch.randn(2, 2, 4, 4, dtype=DT, requires_grad=True))


def test_module_with_weights_called_twice_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x)) + x

    model = Shared()
    with bm.attach(model, mode="exact"):
        with pytest.raises(bm.GraphError, match="'conv'.*twice.*shared weights"):
            model(torch.randn(1, 2, 4, 4))


@pytest.mark.parametrize("mode", ["exact", "exact_weights"])
def test_backward_through_an_older_forward_pass_is_refused(mode):
    """Two forward passes, then one loss over both (or a detached engine's pass): back-matching solves each
    forward pass's graph, so it refuses instead of mixing two passes' signals."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).to(DT)
    x1, x2 = torch.randn(8, 4, dtype=DT), torch.randn(8, 4, dtype=DT)
    engine = bm.attach(model, mode=mode)
    loss = model(x1).square().sum() + model(x2).square().sum()
    with pytest.raises(bm.GraphError, match="'2'.*earlier forward pass"):
        loss.backward()
    model(x1).square().sum().backward()  # one pass, one backward: fine again
    loss = model(x1).square().sum()
    engine.detach()
    with pytest.raises(bm.GraphError, match="'2'.*detached"):
        loss.backward()
