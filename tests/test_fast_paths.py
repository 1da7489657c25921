"""The engine's fast backend against its plain reference backend (``attach(backend="reference")``), in float64.

The fast path forms the conv Gram from products of input rows (or, on the CPU in float32 from 16 channels,
by 2-D lags, one weight-gradient convolution of the input with itself) instead of the im2col matrix,
takes autograd's own conv (and 2-D Linear) weight gradient instead of recomputing ``Sᵀ A``, solves
from the Gram with one host sync, computes conv column norms as two small matrix
products and skips the max-pool rule for disjoint windows. Each of these must give
the reference path's numbers to rounding.
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import backmatch_exact as bm
from backmatch_exact.research import bench
from backmatch_exact.layers import rule_for
from backmatch_exact.layers.conv import ConvRows, _geometry, _gram_lag, _int_padding, _lag_pays, _rows_pay
from backmatch_exact.layers.pooling import MaxPool2dRule, _disjoint_windows
from backmatch_exact.weights import ExplicitRows

DT = torch.float64
TIGHT = 1e-10
SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max()
    return float((a - b).abs().max() / scale) if scale > 0 else float(a.abs().max())


def run_model(model, x, y, **attach):
    """One backward with the engine: (param grads, x.grad, stats)."""
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    with bm.attach(model, **attach) as engine:
        F.cross_entropy(model(x), y).backward()
        stats = engine.stats()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, x.grad.clone(), stats


def both_paths(model, x, y, **attach):
    return run_model(model, x, y, **attach), run_model(model, x, y, backend="reference", **attach)


def assert_paths_agree(fast, ref, tol=TIGHT):
    (fg, fx, fstats), (rg, rx, rstats) = fast, ref
    assert fg.keys() == rg.keys()
    for name in rg:
        assert torch.isfinite(fg[name]).all(), name
        assert rel(fg[name], rg[name]) < tol, (name, rel(fg[name], rg[name]))
    assert rel(fx, rx) < tol, ("x.grad", rel(fx, rx))
    assert [s["layer"] for s in fstats] == [s["layer"] for s in rstats]
    for f, r in zip(fstats, rstats):
        for key in ("d", "outputs", "samples", "batch", "path", "rank"):
            assert f[key] == r[key], (f["layer"], key, f[key], r[key])
        for key in ("amplification", "damping"):
            assert f[key] == pytest.approx(r[key], rel=1e-9, abs=1e-300), (f["layer"], key)
        # (with weight decay on a singular G the normal equations have no exact solution: compare, don't bound)
        assert f["residual"] == pytest.approx(r["residual"], rel=1e-6, abs=1e-9), (f["layer"], f["residual"])
        assert isinstance(f["condition"], float) and isinstance(f["residual"], float)


def _data(n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen, dtype=DT), torch.randint(0, 10, (n,), generator=gen)


# ------------------------------------------------------------------ whole networks

@pytest.mark.parametrize("mode", ["exact", "exact_weights"])
@pytest.mark.parametrize("attach", [{}, {"damping": 0.1, "signal_damping": 0.5}, {"weight_decay": 0.01},
                                    {"solve_method": "primal"}, {"solve_method": "dual"}],
                         ids=["plain", "damped", "weight-decay", "primal", "dual"])
def test_lenet_fast_equals_reference(mode, attach):
    torch.manual_seed(0)
    model = bm.models.lenet_bn().to(DT)
    x, y = _data(2 if attach.get("solve_method") == "dual" else 16)  # forced dual: N x N kernels, keep N small
    fast, ref = both_paths(model, x, y, mode=mode, **attach)
    assert_paths_agree(fast, ref)


def test_vgg11_fast_equals_reference():
    """Padding 1 convs, 2x2 and 1x1 maps (dual solves), a Linear classifier."""
    torch.manual_seed(1)
    model = bm.models.vgg_bn(11).to(DT)
    x, y = _data(4, seed=1)
    fast, ref = both_paths(model, x, y, mode="exact")
    assert_paths_agree(fast, ref)


def _odd_net():
    """Biases, affine BN, stride, dilation, 'same' padding, rectangular kernels, overlapping pooling."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 4, (3, 2), padding=(1, 2), dilation=(1, 2), bias=True), nn.BatchNorm2d(4), nn.ReLU(),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(4, 5, 3, padding="same", bias=True), nn.BatchNorm2d(5), nn.LeakyReLU(0.2),
        nn.Conv2d(5, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 10, bias=True),
    ).to(DT)


@pytest.mark.parametrize("mode", ["exact", "exact_weights"])
def test_odd_network_fast_equals_reference(mode):
    model = _odd_net()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 16, 16, generator=gen, dtype=DT)
    y = torch.randint(0, 10, (5,), generator=gen)
    fast, ref = both_paths(model, x, y, mode=mode, signal_damping=0.3)
    assert_paths_agree(fast, ref)


def test_frozen_conv_weight_with_trainable_bias():
    """The conv node gives no g_W: the fast path computes it itself for the joint [W b] solve."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 10)).to(DT)
    model[0].weight.requires_grad_(False)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 3, 8, 8, generator=gen, dtype=DT), torch.randint(0, 10, (6,), generator=gen)
    fast, ref = both_paths(model, x, y, mode="exact")
    assert_paths_agree(fast, ref)


def test_conv_weight_used_outside_is_still_detected():
    """The fast path's outside-use check: autograd's total differs from the conv node's own g_W."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).to(DT)
    with bm.attach(model, mode="exact"):
        loss = model(torch.randn(4, 2, 6, 6, dtype=DT)).sum() + model[0].weight.square().sum()
        with pytest.raises(bm.GraphError, match="outside"):
            loss.backward()


@pytest.mark.parametrize("bias", [False, True])
def test_linear_gradient_is_read_off_its_node_for_2d_inputs_only(monkeypatch, bias):
    """A Linear on a 2-D input solves with ``g_W`` (and ``g_c``) as its ``mm`` / ``addmm`` node handed them out,
    so ``p.grad`` is that very gradient and needs no comparison; on a 3-D input (a view's node) the engine
    forms ``Sᵀ A`` and compares. Either way the answer is the reference backend's."""
    from backmatch_exact import engine as engine_module
    compared = []
    real = engine_module.Engine._check_own_gradient

    def counted(self, path, name, *args):
        compared.append((path, name))
        return real(self, path, name, *args)

    monkeypatch.setattr(engine_module.Engine, "_check_own_gradient", counted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=bias), nn.ReLU(), nn.Linear(5, 3, bias=bias), nn.Flatten()).to(DT)
    for shape, expected in (((16, 6), []), ((4, 6, 6), ["0", "2"])):
        x = torch.randn(*shape, dtype=DT)
        y = torch.randint(0, 3, shape[:1])
        compared.clear()
        fast = run_model(model, x, y, mode="exact", damping=0.1)
        assert sorted({path for path, _ in compared}) == expected
        assert_paths_agree(fast, run_model(model, x, y, mode="exact", damping=0.1, backend="reference"))


def test_linear_bias_used_outside_is_still_detected():
    """A bias read off an ``addmm`` node is autograd's total only when nothing outside added to it."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(DT)
    with bm.attach(model, mode="exact"):
        loss = model(torch.randn(5, 4, dtype=DT)).sum() + model[2].bias.square().sum()
        with pytest.raises(bm.GraphError, match="'2'.*'bias'.*outside"):
            loss.backward()


def test_repeated_steps_with_an_optimizer_match_reference():
    """Several SGD steps (weights change in place every step): fast and reference trajectories agree."""
    x, y = _data(8, seed=6)
    trajectories = []
    for backend in ("fast", "reference"):
        torch.manual_seed(7)
        model = bm.models.lenet_bn().to(DT)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with bm.attach(model, mode="exact", backend=backend):
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        trajectories.append([p.detach().clone() for p in model.parameters()])
    for fast, ref in zip(*trajectories):
        assert rel(fast, ref) < 1e-9


# ------------------------------------------------------------------ random conv geometries

@st.composite
def conv_geometries(draw):
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.sampled_from([1, 1, 1, 2])), draw(st.integers(1, 3)))
    padding = draw(st.sampled_from(["int", "int", "int", "same", "valid"]))
    if padding == "same":
        stride = (1, 1)
        assume(all(d * (k - 1) % 2 == 0 for d, k in zip(dilation, kernel)))
    elif padding == "int":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    size = (draw(st.integers(4, 12)), draw(st.integers(4, 12)))
    pad = (0, 0) if padding == "valid" else padding if padding != "same" else (0, 0)
    for n, p, d, k in zip(size, pad, dilation, kernel):
        assume(n + 2 * p - d * (k - 1) - 1 >= 0)
    return dict(cin=draw(st.integers(1, 4)), cout=draw(st.integers(1, 3)), kernel=kernel, stride=stride,
                padding=padding, dilation=dilation, bias=draw(st.booleans()), batch=draw(st.integers(1, 4)),
                size=size, seed=draw(st.integers(0, 2**31 - 1)))


def _conv(case):
    gen = torch.Generator().manual_seed(case["seed"])
    layer = nn.Conv2d(case["cin"], case["cout"], case["kernel"], stride=case["stride"], padding=case["padding"],
                      dilation=case["dilation"], bias=case["bias"]).to(DT)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
    x = torch.randn(case["batch"], case["cin"], *case["size"], generator=gen, dtype=DT)
    return layer, x, gen


def _column_sq_norms_by_transposed_conv(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """eq. 22's c(j, p) the way SPEC writes it: conv_transpose2d(ones_like(output), W²), cropped to the input."""
    out = layer(x)
    padding = _int_padding(layer)
    size = [(o - 1) * s - 2 * p + d * (k - 1) + 1
            for o, s, p, d, k in zip(out.shape[-2:], layer.stride, padding, layer.dilation, layer.kernel_size)]
    extra = [n - m for n, m in zip(x.shape[-2:], size)]
    return torch.nn.functional.conv_transpose2d(torch.ones_like(out[:1]), layer.weight.detach() ** 2,
                                                 stride=layer.stride, padding=padding, dilation=layer.dilation,
                                                 output_padding=extra)


@SETTINGS
@given(case=conv_geometries())
def test_conv_row_source_and_column_norms_equal_explicit_ones(case):
    layer, x, gen = _conv(case)
    with torch.no_grad():
        _conv_row_source_case(layer, x, gen)


@SETTINGS
@given(case=conv_geometries())
def test_conv_gram_by_2d_lags_equals_the_im2col_gram(case):
    """The 2-D lag form, run here in float64 on any stride-1 geometry: the im2col Gram and column sums."""
    assume(case["stride"] == (1, 1) or case["padding"] == "same")
    layer, x, _ = _conv(case)
    geometry = dict(_geometry(layer, x), sums=layer.bias is not None)
    gram, sums = _gram_lag(x, geometry)
    a = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=_int_padding(layer))
    a = a.transpose(1, 2).reshape(-1, a.shape[1])
    assert rel(gram, a.T @ a) < TIGHT and torch.equal(gram, gram.T)
    if layer.bias is not None:
        assert rel(sums, a.sum(0)) < TIGHT


@pytest.mark.parametrize("kernel, padding, dilation, bias", [(3, 1, 1, False), (5, 0, 1, True), ((3, 2), (2, 0), 2, True)])
def test_float32_conv_gram_from_16_channels_takes_the_lag_form(kernel, padding, dilation, bias):
    """ConvRows.gram in float32 on the CPU from 16 channels: the lag form, within 2e-6 of the float64 Gram's
    largest entry at batch 128 (measured a few 1e-7, summed over 8-sample chunks)."""
    gen = torch.Generator().manual_seed(0)
    layer = nn.Conv2d(16, 4, kernel, padding=padding, dilation=dilation, bias=bias)
    x = torch.randn(128, 16, 12, 10, generator=gen) + 0.5
    assert _lag_pays(_geometry(layer, x), x)
    gram = ConvRows(layer, x).gram(torch.float32).double()
    assert rel(gram, ConvRows(layer.double(), x.double()).gram(DT)) < 2e-6


@pytest.mark.parametrize("channels, kernel, padding, dilation, bias, size", [
    (3, 5, 0, 1, False, (32, 32)), (6, 5, 0, 1, True, (14, 14)), (3, 3, 1, 1, True, (32, 32)),
    (8, (3, 2), (2, 0), 2, True, (12, 10))])
def test_float32_conv_gram_by_rows_is_rounded_like_one_product(channels, kernel, padding, dilation, bias, size):
    """ConvRows.gram in float32 below 16 channels (LeNet's convs): the row form, within about 2 float32 eps of the
    float64 Gram's largest entry at batch 128 (measured 0.7e-7 to 1.2e-7; the earlier kernel-row-lag form's
    cumulative sums of border rows gave up to 8.9e-7 on these inputs)."""
    gen = torch.Generator().manual_seed(0)
    layer = nn.Conv2d(channels, 4, kernel, padding=padding, dilation=dilation, bias=bias)
    x = torch.randn(128, channels, *size, generator=gen) + 0.5
    geometry = _geometry(layer, x)
    assert _rows_pay(geometry) and not _lag_pays(geometry, x)
    gram = ConvRows(layer, x).gram(torch.float32).double()
    assert torch.equal(gram, gram.T)
    assert rel(gram, ConvRows(layer.double(), x.double()).gram(DT)) < 2.5e-7


def _conv_row_source_case(layer, x, gen):
    rule = rule_for(layer, "conv")
    g_b = torch.randn(layer(x).shape, generator=gen, dtype=DT)
    fast = rule.row_source(layer, x)
    rows = rule.input_rows(layer, x)
    ref = ExplicitRows(rows, x.shape[0])
    assert (fast.samples, fast.d, fast.batch) == (ref.samples, ref.d, ref.batch) == (rows.shape[0], rows.shape[1],
                                                                                      x.shape[0])
    gram = fast.gram(DT)
    assert gram.shape == (ref.d, ref.d) and rel(gram, ref.gram(DT)) < TIGHT
    assert rel(gram, gram.T) < TIGHT
    signals = rule.signal_rows(layer, g_b)
    assert rel(fast.times_rows(signals.T), signals.T @ rows) < TIGHT  # g_W = Sᵀ A by a weight-gradient conv
    assert rel(rule.flatten(layer, {"weight": layer.weight, "bias": layer.bias}), rule.flat_weight(layer)) == 0
    col_sq = rule.column_sq_norms(layer, x)
    expected = _column_sq_norms_by_transposed_conv(layer, x)
    assert col_sq.shape == expected.shape and rel(col_sq, expected) < TIGHT
    # the dual form's pieces: K = AAᵀ from the pixel Gram, C·A by a weight-gradient convolution
    assert rel(fast.kernel(DT), rows @ rows.T) < TIGHT
    coeffs = torch.randn(3, rows.shape[0], generator=gen, dtype=DT)
    assert rel(fast.times_rows(coeffs), coeffs @ rows) < TIGHT


@SETTINGS
@given(case=conv_geometries(), mu=st.sampled_from([0.0, 0.5]), damping=st.sampled_from([0.0, 0.0, 0.1]),
       method=st.sampled_from(["auto", "primal"]))
def test_conv_chain_fast_equals_reference(case, mu, damping, method):
    """Two convs (the lower one gets a back-matched signal), every geometry the rule accepts."""
    first, x, gen = _conv(case)
    second = nn.Conv2d(case["cout"], 2, 1, bias=True).to(DT)
    model = nn.Sequential(first, nn.LeakyReLU(0.3), second)
    with torch.no_grad():
        R = torch.randn(model(x).shape, generator=gen, dtype=DT)
    results = []
    for backend in ("fast", "reference"):
        for p in model.parameters():
            p.grad = None
        xr = x.clone().requires_grad_(True)
        with bm.attach(model, mode="exact", signal_damping=mu, damping=damping, solve_method=method,
                       backend=backend) as engine:
            (model(xr) * R).sum().backward()
            stats = engine.stats()
        results.append(([p.grad.clone() for p in model.parameters()], xr.grad.clone(), stats))
    (fast, fx, fs), (ref, rx, rs) = results
    for f, r in zip(fast, ref):
        assert rel(f, r) < 1e-9
    assert rel(fx, rx) < 1e-9
    assert [s["path"] for s in fs] == [s["path"] for s in rs]


# ------------------------------------------------------------------ max pooling

@SETTINGS
@given(kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)), stride=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), ceil=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_maxpool_disjoint_fast_path_is_bitwise_the_rule(kernel, stride, dilation, ceil, seed):
    padding = (kernel[0] // 2, kernel[1] // 2)
    layer = nn.MaxPool2d(kernel, stride, padding, dilation=dilation, ceil_mode=ceil)
    assume(_disjoint_windows(layer))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (2, 3, 9, 8), generator=gen).to(DT).requires_grad_(True)  # ties
    try:
        out = layer(x)
    except RuntimeError:
        assume(False)
    (g_a,) = torch.autograd.grad(out, x, torch.randn(out.shape, generator=gen, dtype=DT))
    rule = MaxPool2dRule()
    assert rule.signal_unchanged(layer, 0.0, bm.Approximations())  # the engine then passes g_a on untouched
    assert torch.equal(rule.signal(layer, x.detach(), g_a, None, 0.0, bm.Approximations()), g_a)  # which the general rule gives too


def test_maxpool_overlapping_windows_keep_the_general_rule():
    assert not _disjoint_windows(nn.MaxPool2d(3, stride=2))
    assert _disjoint_windows(nn.MaxPool2d(2))
    assert _disjoint_windows(nn.MaxPool2d(2, stride=3, dilation=2))
    assert not _disjoint_windows(nn.MaxPool2d(2, stride=2, dilation=2))


# ------------------------------------------------------------------ approx mode checks

def test_approx_nan_input_is_named_at_the_first_layer():
    """Approx mode moved the input check from the forward pass to the weight gradients; same error."""
    torch.manual_seed(0)
    model = bm.models.lenet_bn().to(DT)
    x, y = _data(4)
    x[1, 0, 3, 3] = float("nan")
    with bm.attach(model, mode="approx"):
        with pytest.raises(bm.NonFiniteError, match="cv1.*input.*NaN"):
            F.cross_entropy(model(x), y).backward()


def _watch_inputs(model):
    """Weak references to every leaf module's input of the next forward passes (registered after attach)."""
    refs = []
    handles = [m.register_forward_pre_hook(lambda mod, args: refs.append(weakref.ref(args[0])))
               for m in model.modules() if next(m.children(), None) is None]
    return refs, handles


@pytest.mark.parametrize("mode", [None, "bp", "approx"])
def test_bp_and_approx_release_layer_inputs_as_backprop_does(mode):
    """After backward no layer input is alive but the model's own: plain backprop (None) is the control."""
    torch.manual_seed(0)
    model = bm.models.lenet_bn().to(DT)
    x, y = _data(4)
    engine = bm.attach(model, mode=mode) if mode else None
    refs, handles = _watch_inputs(model)
    F.cross_entropy(model(x), y).backward()
    gc.collect()
    alive = [ref() for ref in refs[1:] if ref() is not None]
    for h in handles:
        h.remove()
    if engine:
        engine.detach()
    assert len(refs) == 16 and alive == []


# ------------------------------------------------------------------ timing and bench

def test_timing_is_off_by_default_and_records_when_on():
    torch.manual_seed(0)
    model = bm.models.lenet_bn().to(DT)
    x, y = _data(4)
    x.requires_grad_(True)
    with bm.attach(model, mode="exact") as engine:
        timing = engine.timing
        assert not timing.enabled
        assert timing.part("x", "gram") is timing.part("y", "solve")  # the shared no-op
        F.cross_entropy(model(x), y).backward()
        assert timing.totals == {}
        timing.enable()
        F.cross_entropy(model(x), y).backward()
        totals = dict(timing.totals)
        timing.disable()
    assert not timing.enabled
    layers = {layer for layer, _ in totals}
    assert {"cv1", "cv2", "fc1", "fc2", "fc3"} <= layers
    assert ("cv1", "gram") in totals and ("fc1", "dual") in totals and ("cv2", "factor") in totals
    assert all(seconds >= 0 for seconds in totals.values())


def test_bench_runs_and_reports(tmp_path, capsys):
    report = bench.run("lenet", batch=8, steps=2, warmup=1, threads=1, profile_steps=1, dtype="float32")
    modes = report["modes"]
    assert set(modes) == set(bench.DEFAULT_MODES)
    assert modes["plain"]["vs_plain"] == modes["plain"]["vs_plain_paired"] == modes["bp"]["vs_bp"] == 1.0
    assert all(m["median_ms"] > 0 for m in modes.values())
    assert "cv1" in report["breakdown_ms"] and "gram" in report["breakdown_ms"]["cv1"]
    text = bench.format_report(report)
    assert "exact" in text and "gram" in text
    out = tmp_path / "r.json"
    assert bench.cli(["--model", "lenet", "--batch", "4", "--steps", "1", "--warmup", "0", "--threads", "1",
                      "--modes", "plain,exact", "--profile-steps", "0", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["modes"]) == {"plain", "exact"}
    assert bench.cli(["--model", "lenet", "--batch", "4", "--steps", "1", "--warmup", "0", "--threads", "1",
                      "--modes", "exact@float32,exact@float64", "--data", "default", "--profile-steps", "0",
                      "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["modes"]) == {"exact@float32", "exact@float64"}
    with pytest.raises(SystemExit) as refused:
        bench.cli(["--modes", "exact@float16"])
    assert refused.value.code == 2
    assert "--modes must be mode names" in capsys.readouterr().err


def test_bench_times_the_joint_step():
    report = bench.run("lenet", batch=4, steps=1, warmup=0, threads=1, profile_steps=1, modes=("bp", "exact_joint"),
                       signal_damping=0.5)
    assert set(report["modes"]) == {"bp", "exact_joint"} and report["config"]["signal_damping"] == 0.5
    assert report["breakdown_ms_exact_joint"]["cv2"]["signal"] > 0 and "breakdown_ms" not in report
    assert {s["layer"]: s["signal_path"] for s in report["exact_joint_stats"]}["cv2"] == "cholesky"
    assert "cholesky / cholesky" in bench.format_report(report)


def test_retained_graph_second_backward_matches_reference():
    """retain_graph: the conv node gets a second hook; only the newest acts, as the reference path would."""
    x, y = _data(4, seed=8)
    results = []
    for backend in ("fast", "reference"):
        torch.manual_seed(9)
        model = bm.models.lenet_bn().to(DT)
        with bm.attach(model, mode="exact", backend=backend):
            loss = F.cross_entropy(model(x), y)
            loss.backward(retain_graph=True)
            loss.backward()
        results.append([p.grad.clone() for p in model.parameters()])
    for fast, ref in zip(*results):
        assert rel(fast, ref) < TIGHT
