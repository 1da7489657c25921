"""Approx mode (Algorithm 1) against closed forms derived by hand, and its plumbing."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import backmatch_exact as bm
from backmatch_exact.layers import rule_for


def _sq_mu_rows(w):  # ‖W‖²_{2,µ}: mean squared row norm (W_row for a conv)
    return float(w.detach().square().sum()) / w.shape[0]


def _sq_mu_cols(w):  # ‖Wᵀ‖²_{2,µ} / ‖W_col‖²_{2,µ}: mean squared norm per input unit / channel
    return float(w.detach().square().sum()) / w.shape[1]


def _randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * torch.rand(1, generator=gen).item() * 2)
    return model


def _grads(model, x, y, reduction="mean", **attach):
    model.zero_grad()
    engine = bm.attach(model, **attach) if attach else None
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    stats = engine.stats() if engine else None
    if engine:
        engine.detach()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, stats


def _data(n=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64),
            torch.randint(0, 10, (n,), generator=gen))


def test_lenet_golden_closed_forms():
    """The supplement's walk through LeNet-BN, written out for all five layers."""
    model = _randomize(bm.models.lenet_bn().double())
    x, y = _data()
    plain, _ = _grads(model, x, y)
    approx, _ = _grads(model, x, y, mode="approx")
    fc3, fc2, fc1, cv2, cv1 = (model.fc3.weight, model.fc2.weight, model.fc1.weight, model.cv2.weight,
                               model.cv1.weight)
    expected = {
        "fc3.weight": 1.0,
        "fc2.weight": _sq_mu_rows(fc2) / _sq_mu_cols(fc3),
        "fc1.weight": _sq_mu_rows(fc2) * _sq_mu_rows(fc1) / (_sq_mu_cols(fc3) * _sq_mu_cols(fc2)),
        # s_cv2 = 25, c_cv2 = 1 (no conv above): g̃ = g / (m·25)
        "cv2.weight": _sq_mu_rows(fc2) * _sq_mu_rows(fc1) * _sq_mu_rows(cv2)
        / (25 * _sq_mu_cols(fc3) * _sq_mu_cols(fc2) * _sq_mu_cols(fc1)),
        # the supplement's closed form: s_cv1 = 196 cancels against c_cv2 = 196/25
        "cv1.weight": _sq_mu_rows(fc2) * _sq_mu_rows(fc1) * _sq_mu_rows(cv2) * _sq_mu_rows(cv1)
        / (25 * _sq_mu_cols(fc3) * _sq_mu_cols(fc2) * _sq_mu_cols(fc1) * _sq_mu_cols(cv2)),
    }
    for name, factor in expected.items():
        want = plain[name] * factor
        assert torch.allclose(approx[name], want, rtol=1e-10, atol=0), name


def test_vgg11_hand_expectations():
    """VGG11 at 32x32: conv7 and conv8 sit at 2x2 with no pooling after conv7; by hand,
    g̃ = g · ‖W_k‖²_{2,µ} / ‖W_cls‖²_{2,µ} for conv6, conv7 and conv8 (columns = rows = 512 channels)."""
    model = _randomize(bm.models.vgg_bn(11).double(), seed=3)
    x, y = _data(4)
    plain, _ = _grads(model, x, y)
    approx, stats = _grads(model, x, y, mode="approx")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    cls = model.classifier.weight
    assert torch.allclose(approx["classifier.weight"], plain["classifier.weight"], rtol=1e-12)
    for name in convs[-3:]:
        w = model.get_submodule(name).weight
        factor = float(w.detach().square().sum()) / float(cls.detach().square().sum())
        assert torch.allclose(approx[name + ".weight"], plain[name + ".weight"] * factor, rtol=1e-10), name
    by_layer = {s["layer"]: s for s in stats}
    assert by_layer[convs[-1]]["s"] == 1.0  # pooled to 1x1 before the classifier
    assert by_layer[convs[-2]]["s"] == 4.0  # 2x2, no pooling before conv8
    assert by_layer[convs[0]]["s"] == 16 * 16  # 32x32 pooled to 16x16


def test_weight_decay_is_added_before_the_scaling():
    model = _randomize(bm.models.lenet_bn().double())
    x, y = _data()
    plain, _ = _grads(model, x, y)
    wd = 0.01
    approx, stats = _grads(model, x, y, mode="approx", weight_decay=wd)
    scale = {s["layer"] + ".weight": s["scale"] for s in stats if s["kind"] in ("Linear", "Conv2d")}
    for name, p in model.named_parameters():
        want = (plain[name] + wd * p.detach()) * scale[name]
        assert torch.allclose(approx[name], want, rtol=1e-10), name


def test_mean_vs_sum_loss_scaling():
    model = _randomize(bm.models.lenet_bn().double())
    x, y = _data(8)
    mean, _ = _grads(model, x, y, "mean", mode="approx")
    total, _ = _grads(model, x, y, "sum", mode="approx")
    for name in mean:
        assert torch.allclose(total[name], 8 * mean[name], rtol=1e-10), name


def test_approx_signals_agree_with_weight_only_factors():
    """The signal reaching each weight layer's output in approx mode is backprop's divided by m."""
    model = _randomize(bm.models.lenet_bn().double())
    x, y = _data()

    def signals(**attach):
        seen = {}
        engine = bm.attach(model, **attach)
        def record(name, output):
            output.register_hook(lambda g: seen.__setitem__(name, g.detach()))

        handles = [m.register_forward_hook(lambda mod, a, out, n=n: record(n, out))
                   for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        F.cross_entropy(model(x), y).backward()
        stats = engine.stats()
        for h in handles:
            h.remove()
        engine.detach()
        return seen, stats

    bp, _ = signals(mode="bp")
    approx, stats = signals(mode="approx")
    m = {s["layer"]: s["m"] for s in stats}
    for name in ("fc3", "fc2", "fc1", "cv2", "cv1"):
        assert torch.allclose(approx[name], bp[name] / m[name], rtol=1e-10), name
    assert m["fc3"] == 1.0


def test_stats_expose_the_factors():
    model = bm.models.lenet_bn().double()
    x, y = _data()
    _, stats = _grads(model, x, y, mode="approx")
    by_layer = {s["layer"]: s for s in stats}
    assert by_layer["cv1"]["s"] == 196 and by_layer["cv2"]["s"] == 25
    assert by_layer["cv2"]["c"] == pytest.approx(196 / 25)
    assert by_layer["fc1"]["s"] == 1
    assert by_layer["bn3"]["r"] == pytest.approx(1 / _sq_mu_rows(model.fc1.weight))
    for s in stats:
        if "scale" in s:
            assert s["scale"] == pytest.approx(1 / (s["m"] * s["s"]))


def test_hidden_weight_layer_without_batchnorm_is_an_error():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with bm.attach(model, mode="approx"):
        with pytest.raises(bm.UnsupportedModuleError, match=r"'0'.*BatchNorm"):
            model(torch.randn(6, 4))


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-3),
])
def test_approx_drives_stock_optimizers(make_opt):
    """The transformed .grad is all a stock optimizer sees: stepping on it equals stepping on g/(m·s)."""
    torch.manual_seed(0)
    model = bm.models.lenet_bn().double()
    twin = bm.models.lenet_bn().double()
    twin.load_state_dict(model.state_dict())
    x, y = _data()
    opt, twin_opt = make_opt(model.parameters()), make_opt(twin.parameters())
    engine = bm.attach(model, mode="approx")
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        scale = {s["layer"] + ".weight": s["scale"] for s in engine.stats() if "scale" in s
                 and s["kind"] in ("Linear", "Conv2d")}
        opt.step()
        twin_opt.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        for name, p in twin.named_parameters():
            p.grad.mul_(scale[name])
        twin_opt.step()
    engine.detach()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12), name


def test_one_engine_follows_new_shapes_and_new_weights():
    """The engine reuses Algorithm 1's shape-only work between steps: a new input size or new weights must
    still give what a freshly attached engine gives."""
    def net():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                             nn.Flatten(), nn.Linear(16, 5)).double()

    torch.manual_seed(0)
    model, twin = net(), net()
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (6,), generator=gen)
    engine = bm.attach(model, mode="approx")
    for size, weight_scale in ((8, 1.0), (12, 1.0), (12, 3.0), (8, 0.5)):
        with torch.no_grad():
            model[0].weight.mul_(weight_scale)
        x = torch.randn(6, 3, size, size, generator=gen, dtype=torch.float64)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        twin.load_state_dict(model.state_dict())
        fresh_grads, fresh_stats = _grads(twin, x, y, mode="approx")  # a new engine
        assert engine.stats() == fresh_stats, (size, weight_scale)
        largest = max(g.abs().max() for g in fresh_grads.values())  # (the conv bias before the BN is rounding noise)
        for name, p in model.named_parameters():  # (a checked shape only scales .grad: the same to rounding)
            assert torch.allclose(p.grad, fresh_grads[name], rtol=1e-12, atol=1e-14 * largest), (size, name)
    engine.detach()


class _Branchy(nn.Module):
    """h feeds two convs and an add; y feeds a pooling module that is called twice (its first call takes a
    branch of y's fan-out, its second does not) and ``F.relu``; a scalar product."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.a, self.bn_a = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        y = self.bn_a(self.a(h)) + self.bn_b(self.b(h)) + h
        z = self.pool(y) + 0.5 * self.pool(F.relu(y))
        return self.fc(torch.flatten(self.pool(z), 1))


class _ScaledShortcut(nn.Module):
    """h feeds a conv and a scalar product that leads to ``bn_w``: with ``bn_w``'s γ = 0 the product's branch
    carries a scale of 0 and the conv's does not, which no hook on a module call can make of autograd's sum."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.a, self.bn_a = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.w, self.bn_w = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        u = self.bn_a(self.a(h)) + self.bn_w(self.w(2 * h))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(u, 1), 1))


def _affine_bn_uniform(model, seed=2):
    """γ in [0.5, 1.5], β in [-0.2, 0.2] for every BatchNorm2d (not 1 and 0: a rule that ignores them shows)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
    return model


def _zero_gamma(model, path):
    with torch.no_grad():
        model.get_submodule(path).weight.zero_()
    return model


# name: (make, γ zeroed before the first step, γ zeroed before the third, the steps that record the graph)
GRAPHS = {
    "lenet": (lambda: _lenet(), None, None, {0}),
    "odd chain": (lambda: _odd_chain(), None, None, {0}),
    "resnet8": (lambda: _affine_bn_uniform(bm.models.resnet(8)), None, None, {0}),
    "resnet8, zero-init residual": (lambda: _affine_bn_uniform(bm.models.resnet(8)), "stage2.0.bn2", None, {0}),
    "branchy": (lambda: _affine_bn_uniform(_Branchy()), None, None, {0}),
    "odd chain, a γ = 0": (lambda: _odd_chain(), "b2", None, {0}),
    # γ = 0 at the check: not kept, and checked again next step (γ has moved by then)
    "scaled shortcut, γ = 0": (lambda: _affine_bn_uniform(_ScaledShortcut()), "bn_w", None, {0, 1}),
    # γ = 0 after the check: that step records and propagates
    "scaled shortcut, γ = 0 later": (lambda: _affine_bn_uniform(_ScaledShortcut()), None, "bn_w", {0, 2}),
}


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_checked_steps_equal_propagating_the_signals(name, wd):
    """Once a graph is checked, an approx step runs autograd's backprop and scales .grad (on a branching network
    it also multiplies the gradient of a fan-out's extra branches by one number each): Algorithm 1's weights
    all the same, as approx_signals=True gives them by propagating the signals, over steps with new weights.
    A γ = 0 stops the signal (the weights below keep still, no NaN); where no module call takes the branch to
    rescale, the step records and propagates."""
    make, zero_first, zero_later, recording = GRAPHS[name]
    torch.manual_seed(0)
    light = make().double()
    full = make().double()
    full.load_state_dict(light.state_dict())
    for model in (light, full):
        if zero_first:
            _zero_gamma(model, zero_first)
    x, y = _data(4)
    e_light = bm.attach(light, mode="approx", weight_decay=wd)
    e_full = bm.attach(full, mode="approx", weight_decay=wd, approx_signals=True)
    for step in range(4):
        if step == 2 and zero_later:
            for model in (light, full):
                _zero_gamma(model, zero_later)
        for model in (light, full):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
        assert (len(e_light._ops) > 0) == (step in recording), step  # (a recorded pass keeps its ops)
        stats = e_light.stats()
        assert stats == e_full.stats()
        if (step == 0 and zero_first) or (step == 2 and zero_later):  # γ = 0 gives m = 0 below it: scale 0
            stopped = [row for row in stats if row["m"] == 0.0]
            assert stopped and all(row["scale"] == 0.0 for row in stopped), step
        largest = max(p.grad.abs().max() for p in full.parameters())
        for (n, a), b in zip(light.named_parameters(), full.parameters()):
            assert torch.isfinite(a.grad).all(), (step, n)
            assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-13 * largest), (step, n)
        with torch.no_grad():
            for a, b in zip(light.parameters(), full.parameters()):
                a.sub_(0.1 * a.grad)
                b.copy_(a)
    e_light.detach()
    e_full.detach()


def test_checked_chain_still_refuses_non_finite_input_and_weights():
    model, (x, y) = _lenet(), _data(4)
    with bm.attach(model, mode="approx"):
        F.cross_entropy(model(x), y).backward()  # checks the graph for this shape
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(bm.NonFiniteError, match="cv1.*input.*NaN"):
            model(bad)
        with torch.no_grad():
            model.fc2.weight[0, 0] = float("inf")
        with pytest.raises(bm.NonFiniteError, match="fc2.*weight.*NaN or infinity"):
            model(x)


# ------------------------------------------------------------------ Algorithm 1's approximations as switches
def _odd_chain():
    """Biases, affine BatchNorm with γ far from 1, padding, a stride-2 conv, an average pool, a LeakyReLU."""
    torch.manual_seed(1)
    model = nn.Sequential(OrderedDict([
        ("c1", nn.Conv2d(3, 4, 3, padding=1, bias=True)), ("b1", nn.BatchNorm2d(4)), ("r1", nn.ReLU()),
        ("p1", nn.MaxPool2d(2)),
        ("c2", nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False)), ("b2", nn.BatchNorm2d(5)),
        ("r2", nn.LeakyReLU(0.2)), ("p2", nn.AvgPool2d(3, stride=1, padding=1)),
        ("flat", nn.Flatten()),
        ("f1", nn.Linear(5 * 8 * 8, 7, bias=True)), ("b3", nn.BatchNorm1d(7)), ("r3", nn.ReLU()),
        ("f2", nn.Linear(7, 10, bias=True)),
    ])).double()
    with torch.no_grad():
        for bn in (model.b1, model.b2, model.b3):
            bn.weight.uniform_(0.3, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def _lenet():
    return _randomize(bm.models.lenet_bn().double())


def _run(model, x, y, **attach):
    """One backward with the engine: ({weight layer: (input, input signal, output signal)}, {param: grad})."""
    seen = {}

    def record(name, module, args, output):
        entry = seen[name] = {"input": args[0].detach()}
        args[0].register_hook(lambda g: entry.__setitem__("input_signal", g.detach()))
        output.register_hook(lambda g: entry.__setitem__("output_signal", g.detach()))

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    engine = bm.attach(model, **attach)
    # after the engine's hooks: the output hook sees the tapped output, the input hook the tapped input
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: record(n, mod, a, o)) for n, m in layers.items()]
    model.zero_grad()
    try:
        F.cross_entropy(model(x.clone().requires_grad_(True)), y).backward()
    finally:
        for h in handles:
            h.remove()
        engine.detach()
    return seen, {n: p.grad.clone() for n, p in model.named_parameters()}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("make", [_lenet, _odd_chain], ids=["lenet", "odd-chain"])
def test_exact_with_every_approximation_is_approx_mode(make):
    """Two implementations of Algorithm 1: approx mode rescales, exact mode with every switch solves layer by layer."""
    model, (x, y) = make(), _data(6)
    approx, approx_grads = _run(model, x, y, mode="approx")
    switched, switched_grads = _run(model, x, y, mode="exact", approximations="all")
    exact, exact_grads = _run(model, x, y, mode="exact")
    for name in approx_grads:  # relative to the whole module's gradient: a bias before a BN has only rounding noise
        module_norm = torch.cat([g.flatten() for n, g in approx_grads.items() if n.split(".")[0] == name.split(".")[0]])
        assert (switched_grads[name] - approx_grads[name]).norm() < 1e-9 * module_norm.norm(), name
    for layer in approx:
        assert _rel(switched[layer]["input_signal"], approx[layer]["input_signal"]) < 1e-9, layer
    # and they are not exact back-matching
    assert all(_rel(approx_grads[n], exact_grads[n]) > 1e-3 for n in ("cv1.weight", "fc1.weight", "c1.weight")
               if n in approx_grads)


def test_approximations_change_only_what_they_claim():
    model, (x, y) = _lenet(), _data(6)
    exact, exact_grads = _run(model, x, y, mode="exact")
    _, stats = _grads(model, x, y, mode="approx")
    sharing = {s["layer"]: s["s"] for s in stats}
    # (a) G ≈ s·I leaves every signal exact; each weight gradient is g_W / s on the exact output signal
    gram, gram_grads = _run(model, x, y, mode="exact", approximations=["gram"])
    for name, module in (("cv1", model.cv1), ("cv2", model.cv2), ("fc1", model.fc1), ("fc2", model.fc2),
                         ("fc3", model.fc3)):
        assert torch.equal(gram[name]["output_signal"], exact[name]["output_signal"]), name
        rule = rule_for(module, name)
        rows = rule.input_rows(module, exact[name]["input"])
        signals = rule.signal_rows(module, exact[name]["output_signal"])
        expected = (signals.T @ rows / sharing[name]).reshape(module.weight.shape)
        assert _rel(gram_grads[f"{name}.weight"], expected) < 1e-12, name
    # a conv factor on a network's top layers (Linear) does nothing: fc3, fc2, fc1 stay exact
    _, conv_grads = _run(model, x, y, mode="exact", approximations=["conv_factor"])
    for name in ("fc3", "fc2", "fc1"):
        assert _rel(conv_grads[f"{name}.weight"], exact_grads[f"{name}.weight"]) < 1e-12, name
    assert _rel(conv_grads["cv1.weight"], exact_grads["cv1.weight"]) > 1e-3
    # the BN switches act at bn4 and below: fc3's gradient is untouched, fc2's (above bn4's input) is not
    for switch in ("bn_variance", "bn_coupling"):
        _, bn_grads = _run(model, x, y, mode="exact", approximations=[switch])
        assert _rel(bn_grads["fc3.weight"], exact_grads["fc3.weight"]) < 1e-12, switch
        assert _rel(bn_grads["fc2.weight"], exact_grads["fc2.weight"]) > 1e-3, switch
    # LeNet's max pools are disjoint: r = 1 is their exact rule, so the switch changes nothing
    _, unit_grads = _run(model, x, y, mode="exact", approximations=["unit_ratios"])
    assert all(torch.equal(unit_grads[n], exact_grads[n]) for n in exact_grads)


def test_unit_ratios_switch_replaces_pooling_and_leaky_relu_rules():
    """The odd chain's average pool and LeakyReLU have exact rules that differ from backprop's."""
    model, (x, y) = _odd_chain(), _data(6)
    exact, _ = _run(model, x, y, mode="exact")
    unit, _ = _run(model, x, y, mode="exact", approximations=["unit_ratios"])
    bp, _ = _run(model, x, y, mode="bp")
    assert torch.equal(unit["f1"]["input_signal"], exact["f1"]["input_signal"])  # above p2: untouched
    # below p2 and r2, b2's signal is backprop's through them: c2's output signal is BN's rule on that
    assert _rel(unit["c2"]["output_signal"], exact["c2"]["output_signal"]) > 1e-3
    assert _rel(bp["f1"]["input_signal"], unit["f1"]["input_signal"]) > 1e-3  # (the switch is not bp mode)


def test_approximation_sets():
    names = bm.Approximations.names()
    assert names == ["gram", "columns", "conv_factor", "bn_variance", "bn_coupling", "unit_ratios"]
    assert not bm.Approximations().any() and all(getattr(bm.Approximations.of("all"), n) for n in names)
    assert bm.Approximations.only("gram") == bm.Approximations(gram=True) == bm.Approximations.of(["gram"])
    assert sum(map(bool, vars(bm.Approximations.all_but("columns")).values())) == len(names) - 1
    assert bm.Approximations.of(None) == bm.Approximations()
    with pytest.raises(ValueError, match="unknown approximations.*'grams'"):
        bm.Approximations.of(["grams"])


def test_approximations_belong_to_exact_mode():
    for mode in ("bp", "exact_weights", "approx"):
        with pytest.raises(ValueError, match="approximations.*mode='exact'"):
            bm.attach(bm.models.lenet_bn(), mode=mode, approximations=["gram"])


# ------------------------------------------------------------------ Algorithm 1 on a branching network
def _resnet20():
    torch.manual_seed(3)
    return _affine_bn_uniform(bm.models.resnet(20).double(), seed=4)


def test_resnet_exact_with_every_approximation_is_approx_mode():
    model, (x, y) = _resnet20(), _data(4)
    approx, approx_grads = _run(model, x, y, mode="approx")
    switched, switched_grads = _run(model, x, y, mode="exact", approximations="all")
    for name in approx_grads:
        scale = approx_grads[name].norm()
        assert (switched_grads[name] - approx_grads[name]).norm() <= 1e-9 * scale, name
    for layer in approx:
        assert _rel(switched[layer]["input_signal"], approx[layer]["input_signal"]) < 1e-9, layer


def test_resnet20_approx_against_a_hand_derivation():
    """Two layers of ResNet-20 worked out by hand with Algorithm 1's ratios and autograd's linear maps:
    the last conv (a chain up to the loss) and the conv before the last shortcut (its signal meets a fan-out)."""
    model, (x, y) = _resnet20(), _data(4)
    last, before = model.stage3[2], model.stage3[1]
    grads, stats = _grads(model, x, y, mode="approx")
    # plain backprop, keeping what the derivation needs
    kept = {}
    handles = [before.register_forward_hook(lambda m, a, out: kept.__setitem__("v", out)),
               last.conv1.register_forward_hook(lambda m, a, out: kept.__setitem__("c1", out)),
               last.bn2.register_forward_hook(lambda m, a, out: kept.__setitem__("b2", out))]
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    for h in handles:
        h.remove()
    g_c1, g_add = torch.autograd.grad(loss, [kept["c1"], kept["b2"]], retain_graph=True)  # (b2 += identity: the
    # gradient of bn2's output before the in-place add is the add's output gradient)
    plain = dict(zip(("last", "before"), torch.autograd.grad(loss, [last.conv2.weight, before.conv2.weight],
                                                             retain_graph=True)))

    def r_bn(bn, conv):  # eq. 36: mean(γ²) / ‖W_prev‖²_{2,µ} (mean squared row norm)
        return float(bn.weight.detach().square().mean()) / _sq_mu_rows(conv.weight)

    def r_conv(conv, input_locations, s):  # eq. 35: ‖W_col‖²_{2,µ} / c, c = input locations / s
        return _sq_mu_cols(conv.weight) / (input_locations / s)

    r_fc = _sq_mu_cols(model.fc.weight)
    # the last conv: bn2 → += → relu → global pool → fc, a chain: m = r_bn2 · r_fc, and s = 1 (1x1 after pooling)
    m_last = r_bn(last.bn2, last.conv2) * r_fc
    by_layer = {s["layer"]: s for s in stats}
    assert by_layer["stage3.2.conv2"]["s"] == 1.0
    assert by_layer["stage3.2.conv2"]["m"] == pytest.approx(m_last, rel=1e-12)
    assert _rel(grads["stage3.2.conv2.weight"], plain["last"] / m_last) < 1e-10
    # the conv before the shortcut: its block's output v feeds the last block's conv1 and its identity add, so
    # Algorithm 1's signal at v is (conv1ᵀ g̃_conv1 + g̃_add) / (r_conv1 + 1) (SPEC §8), then back through
    # relu, +=, bn2 (÷ r_bn2) to the conv, whose s is 64 (8x8: the path to the next conv pools nothing)
    m_c1 = r_bn(last.bn1, last.conv1) * r_conv(last.conv2, 64, 1) * r_bn(last.bn2, last.conv2) * r_fc  # (conv2: s=1)
    (conv1_t,) = torch.autograd.grad(kept["c1"], kept["v"], g_c1 / m_c1, retain_graph=True)
    signal_v = (conv1_t + g_add / r_fc) / (r_conv(last.conv1, 64, 64) + 1)
    (through,) = torch.autograd.grad(kept["v"], before.conv2.weight, signal_v)
    expected = through / (r_bn(before.bn2, before.conv2) * 64)
    assert by_layer["stage3.1.conv2"]["s"] == 64.0
    assert _rel(grads["stage3.1.conv2.weight"], expected) < 1e-10
    assert _rel(expected, plain["before"] / (expected.norm() / plain["before"].norm())) > 1e-3  # not a rescaling
