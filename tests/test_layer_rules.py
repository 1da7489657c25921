"""Every layer rule of the engine against the independent dense oracle in ``tests/oracle.py`` (float64).

A single-layer model ``nn.Sequential(layer)`` is attached, an arbitrary output
signal R is injected with ``loss = (model(x) * R).sum()``, and ``x.grad`` /
``p.grad`` are compared with the oracle's dense-Jacobian / lstsq answers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import backmatch_exact as bm
from backmatch_exact.layers import rule_for
try:
    from tests import oracle
except ImportError:  # pytest's rootdir/tests on sys.path
    import oracle

DT = torch.float64
RTOL = 1e-8
SETTINGS = settings(max_examples=25, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FEW = settings(SETTINGS, max_examples=20)

seeds = st.integers(0, 2**31 - 1)
mus = st.sampled_from([0.0, 0.5, 2.0])


# ------------------------------------------------------------------ helpers

pytestmark = pytest.mark.usefixtures("one_thread")


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=DT)


def randomize(module: nn.Module, gen) -> nn.Module:
    """float64, with parameters drawn from ``gen`` (reproducible from the hypothesis seed)."""
    module = module.to(DT)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(randn(gen, *p.shape))
    return module


def run(layer: nn.Module, x: torch.Tensor, R: torch.Tensor, mode: str = "exact", seed: int | None = None, **kw):
    """Attach, inject R, backward. Returns (x.grad, {param: grad}, stats, forward output)."""
    model = nn.Sequential(layer)
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    engine = bm.attach(model, mode=mode, **kw)
    try:
        if seed is not None:
            torch.manual_seed(seed)
        out = model(x)
        (out * R).sum().backward()
        stats = engine.stats()
    finally:
        engine.detach()
    grads = {name: p.grad.detach().clone() for name, p in layer.named_parameters()}
    return x.grad.detach().clone(), grads, stats, out.detach()


def plain_grads(model: nn.Module, x: torch.Tensor, R: torch.Tensor):
    """Ordinary autograd, no engine: (x.grad, {name: grad})."""
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    (model(x) * R).sum().backward()
    return x.grad.detach().clone(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_close(actual, expected, rtol=RTOL, what=""):
    actual, expected = oracle.to_np(actual), oracle.to_np(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    scale = float(np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale + 1e-300, err_msg=what)


def check_weights(layer, grads, expected):
    assert set(grads) == set(expected), (set(grads), set(expected))
    for name in expected:
        assert_close(grads[name], expected[name], what=f"g'_{name}")


# ------------------------------------------------------------------ strategies

@st.composite
def linear_cases(draw):
    return dict(
        fan_in=draw(st.integers(1, 6)), fan_out=draw(st.integers(1, 6)), batch=draw(st.integers(1, 6)),
        bias=draw(st.booleans()), positions=draw(st.sampled_from([None, None, 2, 3])), seed=draw(seeds))


def make_linear(case):
    gen = torch.Generator().manual_seed(case["seed"])
    layer = randomize(nn.Linear(case["fan_in"], case["fan_out"], bias=case["bias"]), gen)
    lead = (case["batch"],) if case["positions"] is None else (case["batch"], case["positions"])
    x = randn(gen, *lead, case["fan_in"])
    R = randn(gen, *lead, case["fan_out"])
    return layer, x, R, gen


@st.composite
def conv_cases(draw):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.sampled_from(["int", "int", "int", "same", "valid"]))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if padding == "same":
        stride = (1, 1)
        assume(all(d * (k - 1) % 2 == 0 for d, k in zip(dilation, kernel)))
    elif padding == "int":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    case = dict(
        cin=draw(st.integers(1, 3)), cout=draw(st.integers(1, 3)), kernel=kernel, stride=stride, padding=padding,
        dilation=dilation, bias=draw(st.booleans()), batch=draw(st.integers(1, 4)),
        size=(draw(st.integers(5, 9)), draw(st.integers(5, 9))), seed=draw(seeds))
    pad = (0, 0) if padding == "valid" else padding if padding != "same" else (None, None)
    for n, p, d, k in zip(case["size"], pad, dilation, kernel):
        if p is not None:
            assume(n + 2 * p - d * (k - 1) - 1 >= 0)  # non-empty output
    return case


def make_conv(case):
    gen = torch.Generator().manual_seed(case["seed"])
    layer = randomize(nn.Conv2d(case["cin"], case["cout"], case["kernel"], stride=case["stride"],
                                padding=case["padding"], dilation=case["dilation"], bias=case["bias"]), gen)
    x = randn(gen, case["batch"], case["cin"], *case["size"])
    with torch.no_grad():
        out_shape = layer(x).shape
    R = randn(gen, *out_shape)
    return layer, x, R, gen


@st.composite
def pool_geometry(draw):
    kernel = (draw(st.integers(2, 3)), draw(st.integers(2, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    return dict(kernel=kernel, stride=stride, padding=padding, ceil_mode=draw(st.booleans()),
                batch=draw(st.integers(1, 4)), channels=draw(st.integers(1, 3)),
                size=(draw(st.integers(5, 9)), draw(st.integers(5, 9))), seed=draw(seeds))


def pool_io(layer, case):
    gen = torch.Generator().manual_seed(case["seed"])
    x = randn(gen, case["batch"], case["channels"], *case["size"])
    with torch.no_grad():
        out_shape = layer(x).shape
    return x, randn(gen, *out_shape)


# ------------------------------------------------------------------ Linear / Conv2d

@SETTINGS
@given(case=linear_cases(), mu=mus)
def test_linear_signal_and_weights(case, mu):
    layer, x, R, _ = make_linear(case)
    assume(oracle.well_posed(layer, x))
    g_a, grads, stats, _ = run(layer, x, R, signal_damping=mu)
    assert_close(g_a, oracle.signal_oracle(layer, x, R, mu), what="g'_a")
    check_weights(layer, grads, oracle.weight_oracle(layer, x, R))
    (st_,) = stats
    n_rows, d = x.numel() // case["fan_in"], case["fan_in"] + case["bias"]
    assert (st_["samples"], st_["d"], st_["batch"]) == (n_rows, d, case["batch"])
    assert st_["path"].startswith("dual") == (n_rows < d)  # auto: both forms are exercised


def test_linear_unbatched_input():
    gen = torch.Generator().manual_seed(0)
    layer = randomize(nn.Linear(4, 3), gen)
    x, R = randn(gen, 4), randn(gen, 3)
    g_a, grads, _, _ = run(layer, x, R)
    assert_close(g_a, oracle.signal_oracle(layer, x[None], R[None])[0], what="g'_a")
    check_weights(layer, grads, oracle.weight_oracle(layer, x[None], R[None]))


@SETTINGS
@given(case=conv_cases(), mu=mus)
def test_conv2d_signal_and_weights(case, mu):
    layer, x, R, _ = make_conv(case)
    assume(oracle.well_posed(layer, x))
    g_a, grads, stats, _ = run(layer, x, R, signal_damping=mu)
    assert_close(g_a, oracle.signal_oracle(layer, x, R, mu), what="g'_a")
    check_weights(layer, grads, oracle.weight_oracle(layer, x, R))
    assert stats[0]["samples"] == R[:, 0].numel()


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=(2, 3), stride=1, padding=(1, 2), dilation=(2, 1)),
    dict(kernel_size=(3, 3), stride=(1, 2), padding=0, dilation=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=1, dilation=(1, 2)),
], ids=["lag-dil", "lag-stride-w", "direct"])
@pytest.mark.parametrize("method", ["auto", "primal"])
def test_conv2d_many_input_channels(geometry, method):
    """C_in·k_w >= 64 input columns per kernel row (the wide-row Gram), N > d and N < d."""
    gen = torch.Generator().manual_seed(7)
    layer = randomize(nn.Conv2d(22, 3, **geometry), gen)
    for batch in (1, 4):
        x = randn(gen, batch, 22, 9, 8)
        with torch.no_grad():
            R = randn(gen, *layer(x).shape)
        g_a, grads, stats, _ = run(layer, x, R, solve_method=method, signal_damping=0.5)
        assert_close(g_a, oracle.signal_oracle(layer, x, R, 0.5), what="g'_a")
        check_weights(layer, grads, oracle.weight_oracle(layer, x, R))


@SETTINGS
@given(case=conv_cases(), depthwise=st.booleans(), method=st.sampled_from(["auto", "primal", "dual"]), mu=mus)
def test_grouped_and_depthwise_conv2d(case, depthwise, method, mu):
    """groups = 2 (two independent convs) or groups = channels (depthwise): one problem per group, batched."""
    gen = torch.Generator().manual_seed(case["seed"])
    cin = 2 * case["cin"] if not depthwise else case["cin"] + 1
    groups = 2 if not depthwise else cin
    cout = 2 * case["cout"] if not depthwise else cin
    layer = randomize(nn.Conv2d(cin, cout, case["kernel"], stride=case["stride"], padding=case["padding"],
                                dilation=case["dilation"], bias=case["bias"], groups=groups), gen)
    x = randn(gen, case["batch"], cin, *case["size"])
    with torch.no_grad():
        R = randn(gen, *layer(x).shape)
    subs = [nn.Conv2d(cin // groups, 1, case["kernel"], case["stride"], case["padding"], case["dilation"],
                      bias=case["bias"])]
    assume(all(oracle.well_posed(subs[0], x[:, k * (cin // groups):(k + 1) * (cin // groups)])
               for k in range(groups)))
    g_a, grads, stats, _ = run(layer, x, R, signal_damping=mu, solve_method=method)
    assert_close(g_a, oracle.signal_oracle(layer, x, R, mu), what="g'_a")
    check_weights(layer, grads, oracle.grouped_conv_weight_oracle(layer, x, R))
    assert stats[0]["groups"] == groups and stats[0]["d"] == (cin // groups) * layer.weight[0, 0].numel() + case["bias"]


# ------------------------------------------------------------------ pooling

@SETTINGS
@given(case=pool_geometry(), dilation=st.integers(1, 2), mu=mus)
def test_maxpool2d_signal(case, dilation, mu):
    layer = nn.MaxPool2d(case["kernel"], case["stride"], case["padding"], dilation=dilation,
                         ceil_mode=case["ceil_mode"])
    x, R = pool_io(layer, case)
    g_a, _, _, _ = run(layer, x, R, signal_damping=mu)
    assert_close(g_a, oracle.signal_oracle(layer, x, R, mu), what="g'_a")


def test_maxpool2d_overlap_is_averaged():
    """1-D overlap check by hand: kernel 2 stride 1 on increasing inputs selects inputs 1..n-1, one of them twice."""
    x = torch.tensor([[[[0.0, 1.0, 2.0, 3.0]]]], dtype=DT)
    layer = nn.MaxPool2d((1, 2), stride=(1, 1))
    R = torch.tensor([[[[1.0, 2.0, 4.0]]]], dtype=DT)
    g_a, _, _, _ = run(layer, x, R)
    assert_close(g_a, [[[[0.0, 1.0, 2.0, 4.0]]]])
    x = torch.tensor([[[[0.0, 5.0, 1.0, 2.0]]]], dtype=DT)  # input 1 wins two windows: mean of 1 and 2
    g_a, _, _, _ = run(layer, x, R)
    assert_close(g_a, [[[[0.0, 1.5, 0.0, 4.0]]]])


@SETTINGS
@given(case=pool_geometry(), count_include_pad=st.booleans(),
       divisor_override=st.sampled_from([None, None, None, 1, 5]), mu=mus)
def test_avgpool2d_signal(case, count_include_pad, divisor_override, mu):
    layer = nn.AvgPool2d(case["kernel"], case["stride"], case["padding"], ceil_mode=case["ceil_mode"],
                         count_include_pad=count_include_pad, divisor_override=divisor_override)
    x, R = pool_io(layer, case)
    g_a, _, _, _ = run(layer, x, R, signal_damping=mu)
    assert_close(g_a, oracle.signal_oracle(layer, x, R, mu), what="g'_a")


@SETTINGS
@given(case=pool_geometry(), out_h=st.integers(1, 11), out_w=st.one_of(st.none(), st.integers(1, 11)), mu=mus)
def test_adaptive_avgpool2d_signal(case, out_h, out_w, mu):
    layer = nn.AdaptiveAvgPool2d((out_h, out_w))
    x, R = pool_io(layer, case)
    g_a, _, _, _ = run(layer, x, R, signal_damping=mu)
    assert_close(g_a, oracle.signal_oracle(layer, x, R, mu), what="g'_a")


def test_adaptive_avgpool2d_int_output_size():
    gen = torch.Generator().manual_seed(3)
    layer = nn.AdaptiveAvgPool2d(3)
    x = randn(gen, 2, 2, 7, 5)
    R = randn(gen, 2, 2, 3, 3)
    g_a, _, _, _ = run(layer, x, R)
    assert_close(g_a, oracle.signal_oracle(layer, x, R), what="g'_a")


# ------------------------------------------------------------------ elementwise

@SETTINGS
@given(kind=st.sampled_from(["relu", "leaky"]), slope=st.floats(0.1, 0.5), mu=mus,
       shape=st.sampled_from([(3, 5), (1, 7), (2, 3, 5, 6), (4, 1, 5, 5)]), seed=seeds)
def test_relu_leaky_relu_signal(kind, slope, mu, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.ReLU() if kind == "relu" else nn.LeakyReLU(slope)
    x = randn(gen, *shape)
    x[torch.rand(shape, generator=gen) < 0.15] = 0.0  # exact zeros: the engine must follow autograd's choice there
    R = randn(gen, *shape)
    g_a, _, _, _ = run(layer, x, R, signal_damping=mu)  # μ does not apply to activations
    expected = oracle.signal_oracle(layer, x, R)
    assert_close(g_a, expected, what="g'_a")
    if kind == "leaky":
        neg = x.numpy() <= 0
        assert_close(g_a.numpy()[neg], R.numpy()[neg] / slope)


@pytest.mark.parametrize("kind", ["leaky_relu", "dropout_train"])
def test_inplace_elementwise_in_exact_mode(kind):
    gen = torch.Generator().manual_seed(0)
    x, R = randn(gen, 3, 4), randn(gen, 3, 4)
    if kind == "leaky_relu":
        g_a, _, _, _ = run(nn.LeakyReLU(0.2, inplace=True), x, R)
        expected = oracle.signal_oracle(nn.LeakyReLU(0.2), x, R)  # out-of-place twin for the dense Jacobian
    else:
        g_a, _, _, out = run(nn.Dropout(0.5, inplace=True).train(), x, R, seed=0)
        expected = oracle.dropout_train_signal_oracle(x, out, 0.5, R)
    assert_close(g_a, expected, what="g'_a")


@SETTINGS
@given(p=st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]), train=st.booleans(), mu=mus,
       shape=st.sampled_from([(3, 6), (2, 2, 5, 5), (1, 3, 6, 5)]), seed=seeds)
def test_dropout_signal(p, train, mu, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Dropout(p).train(train)
    x, R = randn(gen, *shape), randn(gen, *shape)
    g_a, _, _, out = run(layer, x, R, seed=seed, signal_damping=mu)
    if train:
        torch.manual_seed(seed)  # the mask is reproducible: same forward output without the engine
        assert torch.equal(nn.Dropout(p)(x), out)
        expected = oracle.dropout_train_signal_oracle(x, out, p, R)
        if 0 < p < 1:
            kept = out.numpy() != 0
            assert_close(g_a.numpy()[kept], (1 - p) * R.numpy()[kept])
    else:
        expected = oracle.signal_oracle(layer, x, R)
        assert_close(g_a, R)
    assert_close(g_a, expected, what="g'_a")


# ------------------------------------------------------------------ BatchNorm

def _batchnorm_case(kind, training, batch, channels, eps, gen, constant_channel=False, affine=True):
    """A BatchNorm in float64 with random γ, β and running statistics (mean far from the data's in eval mode)."""
    shape = {"1d": (batch, channels), "1d-seq": (batch, channels, 5), "2d": (batch, channels, 5, 6)}[kind]
    cls = nn.BatchNorm2d if kind == "2d" else nn.BatchNorm1d
    layer = cls(channels, eps=eps, affine=affine).to(DT).train(training)
    if affine:
        randomize(layer, gen)
    with torch.no_grad():
        layer.running_mean.copy_(2.0 * randn(gen, channels))
        layer.running_var.copy_(randn(gen, channels).abs() * 4.0 + 0.5)
    x = 3.0 * randn(gen, *shape) + 1.5
    if constant_channel:
        x[:, -1] = 0.5  # training: zero variance, x̂ = 0; eval: x̂ constant, a rank-1 2x2 Gram
    return layer, x, randn(gen, *shape)


@SETTINGS
@given(kind=st.sampled_from(["1d", "1d-seq", "2d"]), affine=st.booleans(), training=st.booleans(),
       batch=st.integers(2, 4), channels=st.integers(1, 3), zero_gamma=st.booleans(), constant_channel=st.booleans(),
       eps=st.sampled_from([1e-5, 0.1]), mu=mus, weight_decay=st.sampled_from([0.0, 0.0, 0.3]), seed=seeds)
def test_batchnorm_signal_and_affine(kind, affine, training, batch, channels, zero_gamma, constant_channel, eps, mu,
                                     weight_decay, seed):
    """Training (batch statistics) and eval (running statistics): g'_a, and γ, β by the stacked per-channel lstsq."""
    gen = torch.Generator().manual_seed(seed)
    layer, x, R = _batchnorm_case(kind, training, batch, channels, eps, gen, constant_channel, affine)
    if affine and zero_gamma:
        with torch.no_grad():
            layer.weight[0] = 0.0
    g_a, grads, _, _ = run(layer, x, R, signal_damping=mu, weight_decay=weight_decay)
    expected = oracle.batchnorm_oracle(layer, x, R, weight_decay)
    assert_close(g_a, expected["input"], what="g'_a")
    if affine:
        check_weights(layer, grads, {k: expected[k] for k in ("weight", "bias")})
        if zero_gamma:
            assert not g_a[:, 0].any()
    else:
        assert grads == {}


def test_batchnorm_eval_mode_is_not_the_diagonal_answer():
    """With running statistics E[x̂] ≠ 0: the decoupled g_γ / Σx̂², g_β / L is far from the least-squares answer."""
    gen = torch.Generator().manual_seed(4)
    layer, x, R = _batchnorm_case("2d", False, 8, 3, 1e-5, gen)
    _, grads, _, _ = run(layer, x, R)
    expected = oracle.batchnorm_oracle(layer, x, R)
    check_weights(layer, grads, {k: expected[k] for k in ("weight", "bias")})
    _, plain = plain_grads(nn.Sequential(layer), x, R)
    x_hat = (x - layer.running_mean[None, :, None, None]) / torch.sqrt(layer.running_var + layer.eps)[None, :, None,
                                                                                                      None]
    diagonal = {"weight": plain["0.weight"] / ((x_hat ** 2).sum((0, 2, 3)) / 8), "bias": plain["0.bias"] / 30}
    for name in ("weight", "bias"):
        gap = float((diagonal[name] - grads[name]).norm() / grads[name].norm())
        assert gap > 0.1, (name, gap)


def test_batchnorm_training_mode_is_the_diagonal_answer_bit_for_bit():
    """Batch statistics: Σ_u E[x̂] = 0 exactly, and the 2x2 solve is g_γ / Σ_u E[x̂²], g_β / L to the last bit."""
    gen = torch.Generator().manual_seed(5)
    layer, x, R = _batchnorm_case("2d", True, 6, 4, 1e-5, gen)
    layer, x, R = layer.float(), x.float(), R.float()
    rule = rule_for(layer, "bn")
    solved, plain = rule.parameter_gradients(layer, x, R, 0.01)
    x_hat = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True)
                                                               + layer.eps)
    assert torch.equal(rule.parameter_gram(layer, x)[1], torch.zeros(4))
    squares = rule.parameter_gram(layer, x)[0]
    torch.testing.assert_close(squares, (x_hat ** 2).sum((0, 2, 3)) / 6)
    assert torch.equal(solved["weight"], (plain["weight"] + 0.01 * layer.weight.detach()) / squares)
    assert torch.equal(solved["bias"], (plain["bias"] + 0.01 * layer.bias.detach()) / 30)


@pytest.mark.parametrize("mode", ["exact", "exact_weights"])
def test_batchnorm_batch_statistics_are_read_off_its_autograd_node(monkeypatch, mode):
    """In training, the exact modes take the batch mean and σ = 1/invstd that torch's kernel saved on the layer's
    node instead of reducing the input again; the answer is the one from reducing it, to rounding."""
    from backmatch_exact.layers import normalization
    reductions = []
    real = normalization._batch_moments
    monkeypatch.setattr(normalization, "_batch_moments",
                        lambda module, a: reductions.append(a.shape) or real(module, a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5),
                          nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.arange(8) % 3
    results = []
    for read_off_node in (True, False):
        if not read_off_node:
            monkeypatch.setattr(normalization.BatchNormRule, "remember", lambda self, module, a, node: None)
        reductions.clear()
        model.zero_grad(set_to_none=True)
        with bm.attach(model, mode=mode, damping=0.1):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        results.append([p.grad.clone() for p in model.parameters()])
        assert bool(reductions) != read_off_node, reductions
    for node_read, reduced in zip(*results):
        torch.testing.assert_close(node_read, reduced, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["1d", "1d-seq", "2d"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_batchnorm_eval_gram_averaged_over_shards_is_the_whole_batch_answer(kind, weight_decay):
    """The data-parallel path in one process: two shards' ``parameter_gram`` averaged (what the ranks exchange),
    each shard solved with it on its own signals (its loss a mean over its half), then averaged (DDP's
    gradient average), equals the dense oracle on the whole batch."""
    gen = torch.Generator().manual_seed(6)
    layer, x, R = _batchnorm_case(kind, False, 6, 3, 1e-5, gen, constant_channel=True)
    rule = rule_for(layer, "bn")
    halves = [slice(0, 3), slice(3, 6)]
    gram = sum(rule.parameter_gram(layer, x[h]) for h in halves) / 2
    shards = [rule.parameter_gradients(layer, x[h], 2 * R[h], weight_decay, gram.reshape(-1))[0] for h in halves]
    expected = oracle.batchnorm_oracle(layer, x, R, weight_decay)
    check_weights(layer, {n: (shards[0][n] + shards[1][n]) / 2 for n in ("weight", "bias")},
                  {k: expected[k] for k in ("weight", "bias")})


@SETTINGS
@given(kind=st.sampled_from(["group", "group-depth", "layer-features", "layer-image"]), affine=st.booleans(),
       bias=st.booleans(), batch=st.integers(1, 4), mu=mus, weight_decay=st.sampled_from([0.0, 0.3]), seed=seeds)
def test_group_and_layer_norm_signal_and_affine(kind, affine, bias, batch, mu, weight_decay, seed):
    """BatchNorm's diagonal rule with per-sample statistics; γ, β by the full 2x2 least squares per element."""
    gen = torch.Generator().manual_seed(seed)
    if kind.startswith("group"):
        channels = 6
        layer = nn.GroupNorm(2 if kind == "group" else 6, channels, affine=affine)
        x = randn(gen, batch, channels, 3, 4) * 2 + 1
    else:
        shape = (5,) if kind == "layer-features" else (3, 4)
        layer = nn.LayerNorm(shape, elementwise_affine=affine, bias=bias)
        x = randn(gen, batch, 2, *shape) * 2 + 1  # (a leading dim of positions, which share γ)
    layer = randomize(layer, gen)
    with torch.no_grad():
        R = randn(gen, *layer(x).shape)
    g_a, grads, _, _ = run(layer, x, R, signal_damping=mu, weight_decay=weight_decay)
    expected = oracle.normalization_oracle(layer, x, R, weight_decay)
    assert_close(g_a, expected["input"], what="g'_a")
    check_weights(layer, grads, {k: v for k, v in expected.items() if k != "input"})


# ------------------------------------------------------------------ damping

@SETTINGS
@given(use_conv=st.booleans(), lin=linear_cases(), conv=conv_cases(),
       damping=st.sampled_from([1e-3, 0.1, 1.0, 3.0]), scale=st.sampled_from(["absolute", "relative"]),
       method=st.sampled_from(["auto", "primal", "dual"]))
def test_weight_damping_matches_explicit_inverse(use_conv, lin, conv, damping, scale, method):
    layer, x, R, _ = make_conv(conv) if use_conv else make_linear(lin)
    _, grads, stats, _ = run(layer, x, R, damping=damping, damping_scale=scale, solve_method=method)
    check_weights(layer, grads, oracle.weight_oracle(layer, x, R, damping, scale))
    lam = oracle.damping_lambda(layer, x, damping, scale)
    assert stats[0]["damping"] == pytest.approx(lam, rel=1e-12)
    # damping changes the answer (guards against λ being ignored)
    undamped = oracle.weight_oracle(layer, x, R)
    if damping >= 0.1 and np.abs(undamped["weight"]).max() > 0:
        assert not np.allclose(grads["weight"].numpy(), undamped["weight"], rtol=1e-6, atol=0)


@FEW
@given(use_conv=st.booleans(), lin=linear_cases(), conv=conv_cases(), mu=st.sampled_from([0.5, 2.0]))
def test_signal_damping_matches_explicit_denominator(use_conv, lin, conv, mu):
    """Closed form: g'_a = Jᵀ R / (c_j + μ·mean c) with c_j the column norms, independent of the jacrev oracle."""
    layer, x, R, _ = make_conv(conv) if use_conv else make_linear(lin)
    g_a, _, _, _ = run(layer, x, R, signal_damping=mu)
    backprop, _ = plain_grads(nn.Sequential(layer), x, R)
    w = layer.weight.detach().numpy()
    if use_conv:
        # c(j, p) = Σ over outputs of J², i.e. backprop of a ones signal through the layer with W²
        sq = nn.Conv2d(conv["cin"], conv["cout"], conv["kernel"], stride=conv["stride"], padding=conv["padding"],
                       dilation=conv["dilation"], bias=False).to(DT)
        with torch.no_grad():
            sq.weight.copy_(layer.weight ** 2)
        col, _ = plain_grads(sq, x, torch.ones_like(R))
        col = col.numpy()
    else:
        col = np.broadcast_to((w ** 2).sum(axis=0), x.shape)
    den = col + mu * col.mean()
    assert_close(g_a, backprop.numpy() / den, what="g'_a")


# ------------------------------------------------------------------ rank-deficient solves

def _rank_deficient_linear(kind, fan_in, fan_out, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = randomize(nn.Linear(fan_in, fan_out, bias=bias), gen)
    if kind == "few-samples":  # N < d
        x = randn(gen, max(1, fan_in + bias - 2), fan_in)
    elif kind == "duplicated":
        base = randn(gen, 2, fan_in)
        x = base.repeat(3, 1)
    else:  # zero input column: a feature that is 0 for every sample
        x = randn(gen, 5, fan_in)
        x[:, 0] = 0.0
    R = randn(gen, x.shape[0], fan_out)
    return layer, x, R


@SETTINGS
@given(kind=st.sampled_from(["few-samples", "duplicated", "zero-column"]), fan_in=st.integers(2, 6),
       fan_out=st.integers(1, 4), bias=st.booleans(), conv_case=st.booleans(),
       damping=st.sampled_from([0.0, 0.0, 0.1]), seed=seeds)
def test_primal_and_dual_agree_when_rank_deficient(kind, fan_in, fan_out, bias, conv_case, damping, seed):
    if conv_case:
        gen = torch.Generator().manual_seed(seed)
        layer = randomize(nn.Conv2d(fan_in, fan_out, 3, stride=2, bias=bias), gen)
        if kind == "few-samples":  # 1 sample, 2x2 = 4 locations < d = 9·C_in
            x = randn(gen, 1, fan_in, 5, 5)
        elif kind == "duplicated":
            x = randn(gen, 1, fan_in, 5, 5).repeat(3, 1, 1, 1)
        else:
            x = randn(gen, 3, fan_in, 5, 5)
            x[:, 0] = 0.0  # a whole input channel is zero
        with torch.no_grad():
            R = randn(gen, *layer(x).shape)
    else:
        layer, x, R = _rank_deficient_linear(kind, fan_in, fan_out, bias, seed)
    assume(damping or oracle.well_posed(layer, x))
    expected = oracle.weight_oracle(layer, x, R, damping)
    rank = np.linalg.matrix_rank(oracle.weight_rows(layer, x))
    results = {}
    for method in ("auto", "primal", "dual"):
        g_a, grads, stats, _ = run(layer, x, R, solve_method=method, damping=damping)
        assert np.isfinite(g_a.numpy()).all()
        assert_close(g_a, oracle.signal_oracle(layer, x, R), what=f"g'_a ({method})")
        check_weights(layer, grads, expected)
        if damping == 0.0:
            assert stats[0]["rank"] == rank, (method, stats[0])
            assert stats[0]["residual"] < 1e-8
        results[method] = grads
    for name in results["primal"]:
        assert_close(results["dual"][name], results["primal"][name], what=name)
    if kind == "zero-column" and damping == 0.0:
        # min norm: no gradient on a weight whose input is always zero
        assert not results["primal"]["weight"][:, 0].any()
        assert not results["dual"]["weight"][:, 0].any()


@SETTINGS
@given(use_conv=st.booleans(), mu=mus, seed=seeds, batch=st.integers(1, 3))
def test_zero_weight_column_gives_zero_signal(use_conv, mu, seed, batch):
    gen = torch.Generator().manual_seed(seed)
    if use_conv:
        layer = randomize(nn.Conv2d(3, 2, 3, padding=1), gen)
        x = randn(gen, batch, 3, 6, 5)
        with torch.no_grad():
            layer.weight[:, 1] = 0.0  # input channel 1 feeds nothing
        R = randn(gen, batch, 2, 6, 5)
        dead = (slice(None), 1)
    else:
        layer = randomize(nn.Linear(4, 3), gen)
        x = randn(gen, batch, 4)
        with torch.no_grad():
            layer.weight[:, 2] = 0.0
        R = randn(gen, batch, 3)
        dead = (slice(None), 2)
    assume(oracle.well_posed(layer, x))
    g_a, grads, _, _ = run(layer, x, R, signal_damping=mu)
    assert np.isfinite(g_a.numpy()).all()
    assert not g_a[dead].any()
    assert_close(g_a, oracle.signal_oracle(layer, x, R, mu), what="g'_a")
    check_weights(layer, grads, oracle.weight_oracle(layer, x, R))


def test_conv_unread_pixels_get_zero_signal():
    """kernel 1, stride 2: odd rows/columns are read by no window, ‖J[:, j]‖ = 0 there."""
    gen = torch.Generator().manual_seed(1)
    layer = randomize(nn.Conv2d(2, 3, 1, stride=2), gen)
    x = randn(gen, 2, 2, 6, 7)
    R = randn(gen, 2, 3, 3, 4)
    for mu in (0.0, 2.0):
        g_a, _, _, _ = run(layer, x, R, signal_damping=mu)
        assert not g_a[:, :, 1::2].any() and not g_a[:, :, :, 1::2].any()
        assert_close(g_a, oracle.signal_oracle(layer, x, R, mu))


# ------------------------------------------------------------------ exact_weights mode and chains

@SETTINGS
@given(use_conv=st.booleans(), lin=linear_cases(), conv=conv_cases())
def test_exact_weights_mode_single_layer(use_conv, lin, conv):
    layer, x, R, _ = make_conv(conv) if use_conv else make_linear(lin)
    assume(oracle.well_posed(layer, x))
    g_a, grads, _, _ = run(layer, x, R, mode="exact_weights", signal_damping=2.0)
    backprop, _ = plain_grads(nn.Sequential(layer), x, R)
    assert_close(g_a, backprop, what="g_a (plain)")
    assert_close(g_a, oracle.backprop_signal(layer, x, R), what="g_a (dense)")
    check_weights(layer, grads, oracle.weight_oracle(layer, x, R))


def _chain(seed, width_in, hidden, width_out, batch, slope):
    gen = torch.Generator().manual_seed(seed)
    first = randomize(nn.Linear(width_in, hidden), gen)
    act = nn.LeakyReLU(slope)
    last = randomize(nn.Linear(hidden, width_out), gen)
    x = randn(gen, batch, width_in)
    R = randn(gen, batch, width_out)
    return first, act, last, x, R


@FEW
@given(seed=seeds, width_in=st.integers(1, 5), hidden=st.integers(1, 5), width_out=st.integers(1, 5),
       batch=st.integers(1, 5), slope=st.floats(0.1, 0.5), mode=st.sampled_from(["exact", "exact_weights"]))
def test_two_layer_chain(seed, width_in, hidden, width_out, batch, slope, mode):
    """Linear → LeakyReLU → Linear: the first layer solves against the signal its mode passes down."""
    first, act, last, x, R = _chain(seed, width_in, hidden, width_out, batch, slope)
    with torch.no_grad():
        assume(oracle.well_posed(first, x) and oracle.well_posed(last, act(first(x))))
    model = nn.Sequential(first, act, last)
    x = x.clone().requires_grad_(True)
    engine = bm.attach(model, mode=mode)
    try:
        (model(x) * R).sum().backward()
    finally:
        engine.detach()
    got = {layer: {n: p.grad.clone() for n, p in layer.named_parameters()} for layer in (first, last)}
    got_x = x.grad.clone()
    with torch.no_grad():
        h1 = first(x)
        h2 = act(h1)
    check_weights(last, got[last], oracle.weight_oracle(last, h2, R))
    if mode == "exact":
        s2 = oracle.signal_oracle(last, h2, R)
        s1 = oracle.signal_oracle(act, h1, s2)
        expected_x = oracle.signal_oracle(first, x, s1)
    else:
        s1 = oracle.backprop_signal(act, h1, oracle.backprop_signal(last, h2, R))
        expected_x, _ = plain_grads(model, x, R)
    s1 = torch.from_numpy(np.ascontiguousarray(s1))
    check_weights(first, got[first], oracle.weight_oracle(first, x, s1))
    assert_close(got_x, expected_x, what="g'_a")


# ------------------------------------------------------------------ oracle self-checks

def test_oracle_linear_closed_form():
    """The oracle itself: A = [x | 1], and the signal rule is Wᵀr / ‖w_j‖² for Linear."""
    gen = torch.Generator().manual_seed(5)
    layer = randomize(nn.Linear(3, 2), gen)
    x, R = randn(gen, 4, 3), randn(gen, 4, 2)
    np.testing.assert_allclose(oracle.weight_rows(layer, x), np.c_[x.numpy(), np.ones(4)], rtol=0, atol=0)
    w = layer.weight.detach().numpy()
    np.testing.assert_allclose(oracle.signal_oracle(layer, x, R), R.numpy() @ w / (w ** 2).sum(0), rtol=1e-13)
    g = oracle.weight_oracle(layer, x, R)
    a = np.c_[x.numpy(), np.ones(4)]
    flat = np.c_[g["weight"], g["bias"]]
    np.testing.assert_allclose(flat @ (a.T @ a / 4), R.numpy().T @ a, rtol=1e-10)  # g'_W G = g_W, G invertible
