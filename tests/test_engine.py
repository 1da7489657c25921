"""The engine as a whole: modes, detach, whole-network identities, bad input."""

import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import backmatch_exact as bm


def _batch(n=8, channels=3, seed=0, device="cpu", dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, 32, 32, generator=gen, dtype=dtype).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    return x, y


def _grads(model, x, y, reduction="mean", **attach_args):
    model.zero_grad()
    if attach_args:
        with bm.attach(model, **attach_args):
            F.cross_entropy(model(x), y, reduction=reduction).backward()
    else:
        F.cross_entropy(model(x), y, reduction=reduction).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _lenet(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return bm.models.lenet_bn().double().to(device)


@pytest.mark.parametrize("make", [lambda: bm.models.lenet_bn(), lambda: bm.models.vgg_bn(11)])
def test_bp_mode_equals_autograd(make):
    torch.manual_seed(0)
    model = make().double()
    x, y = _batch(4)
    plain = _grads(model, x, y)
    attached = _grads(model, x, y, mode="bp")
    assert plain.keys() == attached.keys()
    for name in plain:
        assert torch.equal(plain[name], attached[name]), name


def test_detach_restores_plain_backprop():
    model = _lenet()
    x, y = _batch()
    plain = _grads(model, x, y)
    engine = bm.attach(model, mode="exact")
    F.cross_entropy(model(x), y).backward()
    engine.detach()
    after = _grads(model, x, y)
    for name in plain:
        assert torch.equal(plain[name], after[name]), name


def test_exact_differs_from_backprop_and_is_finite():
    model = _lenet()
    x, y = _batch()
    plain = _grads(model, x, y)
    exact = _grads(model, x, y, mode="exact")
    for name in plain:
        assert torch.isfinite(exact[name]).all()
        assert not torch.allclose(plain[name], exact[name]), name


def _capture_layer_signals(model):
    """Record each weight layer's input and the signal that reaches its output, independently of the engine."""
    seen = {}

    def hook(name, module, args, output):
        entry = {"input": args[0].detach()}
        output.register_hook(lambda g: entry.__setitem__("signal", g.detach()))
        seen[name] = entry

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(n, mod, a, o))
               for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return seen, handles


@pytest.mark.parametrize("mode", ["exact", "exact_weights"])
def test_whole_network_normal_equations(mode):
    """Every weight layer's g'_W solves g'_W G = g_W for the signal it received, and is minimum-norm."""
    model = _lenet()
    x, y = _batch(16)
    engine = bm.attach(model, mode=mode)
    seen, handles = _capture_layer_signals(model)  # registered after attach: sees the tapped outputs
    F.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    engine.detach()
    for name, entry in seen.items():
        module = getattr(model, name)
        a, s = entry["input"], entry["signal"]
        if isinstance(module, nn.Conv2d):
            rows = F.unfold(a, module.kernel_size).transpose(1, 2).reshape(-1, module.weight[0].numel())
            sig = s.flatten(2).transpose(1, 2).reshape(-1, module.out_channels)
        else:
            rows, sig = a, s
        gram = rows.T @ rows / a.shape[0]
        g_w = sig.T @ rows
        solved = module.weight.grad.reshape(module.out_channels if isinstance(module, nn.Conv2d)
                                            else module.out_features, -1)
        assert torch.allclose(solved @ gram, g_w, rtol=1e-8, atol=1e-10 * g_w.abs().max()), name
        # minimum norm: no component in the null space of G
        evals, evecs = torch.linalg.eigh(gram)
        null = evecs[:, evals < 1e-10 * evals.max()]
        assert torch.linalg.matrix_norm(solved @ null) <= 1e-8 * torch.linalg.matrix_norm(solved), name
        if name == "fc1":  # batch 16 < 400 inputs: G is singular, the null space is not empty
            assert null.shape[1] == 400 - 16


def test_exact_mode_sends_back_matched_signals_down():
    """In exact mode the signal reaching fc2 differs from backprop's; in exact_weights it is backprop's."""
    model = _lenet()
    x, y = _batch(16)
    signals = {}
    for mode in ("bp", "exact", "exact_weights"):
        engine = bm.attach(model, mode=mode)
        seen, handles = _capture_layer_signals(model)
        F.cross_entropy(model(x), y).backward()
        for h in handles:
            h.remove()
        engine.detach()
        signals[mode] = seen["fc2"]["signal"]
    assert torch.allclose(signals["bp"], signals["exact_weights"])
    assert not torch.allclose(signals["bp"], signals["exact"])


def test_mean_vs_sum_loss_scales_like_the_gradient():
    model = _lenet()
    x, y = _batch(8)
    mean = _grads(model, x, y, "mean", mode="exact")
    total = _grads(model, x, y, "sum", mode="exact")
    for name in mean:
        assert torch.allclose(total[name], 8 * mean[name], rtol=1e-8), name


@pytest.mark.parametrize("mode", ["exact", "exact_weights"])
def test_duplicating_the_batch_leaves_the_answer_unchanged(mode):
    model = _lenet()
    x, y = _batch(8)
    once = _grads(model, x, y, mode=mode)
    twice = _grads(model, torch.cat([x, x]), torch.cat([y, y]), mode=mode)
    for name in once:
        assert torch.allclose(once[name], twice[name], rtol=1e-7, atol=1e-12), name


def test_weight_decay_is_added_before_the_solve():
    model = _lenet()
    x, y = _batch(16)
    wd = 0.1
    with_wd = _grads(model, x, y, mode="exact_weights", weight_decay=wd)
    engine = bm.attach(model, mode="exact_weights")
    seen, handles = _capture_layer_signals(model)
    F.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    engine.detach()
    a, s = seen["fc3"]["input"], seen["fc3"]["signal"]
    gram = a.T @ a / a.shape[0]
    expected = (s.T @ a + wd * model.fc3.weight.detach()) @ torch.linalg.pinv(gram, hermitian=True)
    assert torch.allclose(with_wd["fc3.weight"], expected, rtol=1e-7, atol=1e-10)


def test_stats_report_every_weight_layer():
    model = _lenet()
    x, y = _batch(16)
    with bm.attach(model, mode="exact") as engine:
        F.cross_entropy(model(x), y).backward()
        stats = engine.stats()
    assert [s["layer"] for s in stats] == ["cv1", "cv2", "fc1", "fc2", "fc3"]
    by_name = {s["layer"]: s for s in stats}
    assert by_name["fc1"]["d"] == 400 and by_name["fc1"]["samples"] == 16
    assert by_name["fc1"]["path"].startswith("dual") and by_name["fc1"]["rank"] == 16
    assert by_name["cv1"]["samples"] == 16 * 28 * 28 and by_name["cv1"]["path"] == "cholesky"
    for s in stats:
        assert s["residual"] < 1e-10
        assert s["amplification"] >= 1.0
        assert s["condition"] >= 1.0


@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_no_grad_forward_is_untouched(mode):
    """A no_grad forward gives the output it gives without the engine, and one run between a training step's
    forward and its backward changes nothing in that step."""
    model = _lenet()
    x, y = _batch(4)
    with torch.no_grad():
        plain = model(x)  # (training mode: batch statistics, so the output does not depend on the running ones)
    expected = _grads(model, x, y, mode=mode)
    with bm.attach(model, mode=mode) as engine:
        with torch.no_grad():
            assert torch.equal(model(x), plain)
        assert engine.stats() == []
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        with torch.no_grad():
            model(x[:2])
        loss.backward()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, expected[name]), name


def test_inplace_relu_is_supported():
    """ReLU(inplace=True) gives exactly what ReLU() gives, in bp and exact mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)).double()
    twin = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(6, 5, dtype=torch.float64)
    plain = _grads_generic(model, x)
    with bm.attach(model, mode="bp"):
        assert all(torch.equal(a, b) for a, b in zip(plain, _grads_generic(model, x)))
    with bm.attach(model, mode="exact"):
        grads = _grads_generic(model, x)
    with bm.attach(twin, mode="exact"):
        expected = _grads_generic(twin, x)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))
    assert not all(torch.allclose(a, b) for a, b in zip(grads, plain))


def _grads_generic(model, x):
    model.zero_grad()
    model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


# ------------------------------------------------------------------ bad input
def test_unsupported_module_is_named_at_attach():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Tanh()), nn.Linear(4, 2))
    with pytest.raises(bm.UnsupportedModuleError, match=r"'1\.0'.*Tanh"):
        bm.attach(model)


def test_conv_padding_modes_other_than_zeros_are_refused():
    with pytest.raises(bm.UnsupportedModuleError, match=r"'0' \(Conv2d\): padding_mode='reflect'"):
        bm.attach(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")))


def test_parameters_outside_leaf_modules_are_refused():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.inner(x) * self.scale

    with pytest.raises(bm.UnsupportedModuleError, match="scale"):
        bm.attach(Scaled())


@pytest.mark.parametrize("mode", ["exact", "bp"])
def test_nan_input_is_a_clear_error(mode):
    model = _lenet()
    x, y = _batch(4)
    x[1, 0, 3, 3] = float("nan")
    with bm.attach(model, mode=mode):
        with pytest.raises(bm.NonFiniteError, match="cv1.*NaN"):
            F.cross_entropy(model(x), y).backward()


def test_wrong_mode_and_arguments():
    model = _lenet()
    with pytest.raises(ValueError, match="mode"):
        bm.attach(model, mode="exactly")
    with pytest.raises(ValueError, match="damping"):
        bm.attach(model, damping=-1.0)
    with pytest.raises(ValueError, match="signal_damping"):
        bm.attach(model, signal_damping=float("nan"))
    with pytest.raises(ValueError, match="damping_scale"):
        bm.attach(model, damping_scale="huge")
    with pytest.raises(ValueError, match="solve_dtype"):
        bm.attach(model, solve_dtype=torch.float16)


class _Functional(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.fc1, self.fc2, self.op = nn.Linear(4, 4), nn.Linear(4, 2), op

    def forward(self, x):
        return self.fc2(self.op(self.fc1(x), x))


def test_unsupported_work_between_modules_is_named_where_it_happens():
    """An op with no rule (tanh) between two modules: a GraphError naming the op and the line that called it."""
    model = _Functional(lambda h, x: torch.tanh(h))
    with bm.attach(model, mode="exact"):
        with pytest.raises(bm.GraphError, match=r"tanh \(called at .*test_engine\.py:\d+ in <lambda>\)"):
            model(torch.randn(3, 4, requires_grad=True)).sum().backward()


def test_functional_after_last_module_is_detected():
    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return F.log_softmax(self.fc(x), dim=1)

    with bm.attach(Tail(), mode="exact") as engine:
        with pytest.raises(bm.GraphError, match="output"):
            engine.model(torch.randn(2, 4))


def test_views_between_modules_are_allowed():
    """torch.flatten in a custom forward is the same network as an nn.Flatten module."""
    class Viewing(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(2 * 3 * 3, 2)

        def forward(self, x):
            return self.fc(torch.flatten(self.conv(x), 1))

    torch.manual_seed(0)
    model = Viewing().double()
    chain = nn.Sequential(model.conv, nn.Flatten(), model.fc)
    x = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    results = []
    for net in (model, chain):
        net.zero_grad()
        with bm.attach(net, mode="exact"):
            net(x).square().sum().backward()
        results.append([p.grad.clone() for p in (model.conv.weight, model.conv.bias, model.fc.weight)])
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


def test_shared_module_is_detected():
    fc = nn.Linear(3, 3)
    model = nn.Sequential(fc, nn.ReLU(), fc)
    with bm.attach(model, mode="exact"):
        with pytest.raises(bm.GraphError, match="twice"):
            model(torch.randn(2, 3))


def test_gradient_from_outside_the_module_is_detected():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    with bm.attach(model, mode="exact"):
        loss = model(torch.randn(5, 3, dtype=torch.float64)).sum() + model[0].weight.square().sum()
        with pytest.raises(bm.GraphError, match="outside"):
            loss.backward()


@pytest.mark.parametrize("kind", ["batch", "group", "layer"])
def test_normalization_parameters_checked_against_autograd_by_identity(kind):
    """A float32 input of 1e18 (a diverging run reached 1e20) makes torch's own g_γ wrong (relative error 1
    against float64) while the rule's sum is right: the outside-use check compares p.grad with what the
    normalization's autograd node handed out, so that is no false 'outside' error, and a real outside
    gradient on γ is still caught."""
    norm = {"batch": nn.BatchNorm2d(4), "group": nn.GroupNorm(2, 4), "layer": nn.LayerNorm([4, 6, 6])}[kind]
    torch.manual_seed(0)
    model = nn.Sequential(norm, nn.Flatten(), nn.Linear(144, 3))
    x, y = torch.randn(16, 4, 6, 6) + 3, torch.arange(16) % 3
    with bm.attach(model, mode="exact", damping=0.1):
        F.cross_entropy(model(x * 1e18), y).backward()
        assert torch.isfinite(norm.weight.grad).all()
        loss = F.cross_entropy(model(x), y) + norm.weight.square().sum()
        with pytest.raises(bm.GraphError, match="'0'.*outside"):
            loss.backward()


def test_exact_mode_on_device(device):
    model = _lenet(device=device).float()
    x, y = _batch(32, device=device, dtype=torch.float32)
    reference = _grads(model.double().cpu(), x.double().cpu(), y.cpu(), mode="exact")
    model = model.float().to(device)
    result = _grads(model, x, y, mode="exact")
    for name in reference:
        got = result[name].double().cpu()
        assert torch.isfinite(got).all(), name
        rel = (got - reference[name]).norm() / reference[name].norm()
        assert rel < 1e-3, (name, float(rel))


@pytest.mark.parametrize("mode", ["exact", "exact_weights", "approx"])
def test_steps_do_not_keep_old_graphs_alive(mode):
    """A step's layer inputs (and the graph around them) are freed by the next step: nothing accumulates."""
    model = _lenet()
    x, y = _batch(8)
    with bm.attach(model, mode=mode):
        F.cross_entropy(model(x), y).backward()
        refs = []  # weak references to this step's layer inputs (tapped or not), from the next forward on
        handles = [m.register_forward_pre_hook(lambda mod, args: refs.append(weakref.ref(args[0])))
                   for m in model.modules() if next(m.children(), None) is None]
        F.cross_entropy(model(x), y).backward()
        for h in handles:
            h.remove()
        assert len(refs) == 16
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
        gc.collect()
        assert [ref() for ref in refs[1:] if ref() is not None] == []


@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_an_input_fed_again_gets_the_same_signal_each_step(mode):
    """A leaf input that requires grad, used in several steps: each backward computes its signal once (a hook
    left over from an earlier pass would divide it again, step after step)."""
    model = _lenet()
    x, y = _batch(4)
    x.requires_grad_(True)
    grads = []
    with bm.attach(model, mode=mode, approx_signals=True):
        for _ in range(3):
            x.grad = None
            F.cross_entropy(model(x), y).backward()
            grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("mode, signals", [("exact", "per_unit"), ("exact", "joint"), ("approx", "per_unit")])
def test_a_step_is_freed_without_the_cycle_collector(mode, signals):
    """Each step's recorded graph goes when the next forward pass starts, and a detached engine goes as soon
    as it is dropped, with what its last step kept: by reference counting alone (Python's cycle collector,
    which can wait many steps and knows nothing of a tensor's size, is switched off here)."""
    from backmatch_exact.graph import Op

    def live_ops():
        # (by exact type: isinstance on every object gc knows touches deprecated torch proxies, which warn)
        return sum(type(o) is Op for o in gc.get_objects())

    torch.manual_seed(0)
    model = bm.models.resnet(8).double()
    x, y = _batch(4)
    gc.collect()
    gc.disable()
    try:
        options = {"approx_signals": True} if mode == "approx" else {}  # (approx mode then records every step)
        engine = bm.attach(model, mode=mode, signals=signals, damping=0.1, signal_damping=0.1, **options)
        counts = []
        for _ in range(3):
            F.cross_entropy(model(x), y).backward()
            counts.append(live_ops())
        assert counts[0] > 0 and counts[0] == counts[1] == counts[2]
        stats = engine.stats()
        engine.detach()
        assert engine.stats() == stats  # detach keeps the last step's rows readable
        assert live_ops() == 0
        ref = weakref.ref(engine)
        del engine
        assert ref() is None
    finally:
        gc.enable()


def test_statistics_the_answer_does_not_need_are_computed_when_read():
    """residual and amplification come from what the step kept, when stats() asks; the next forward pass lets
    that go, and a row read only then says so with nan instead of describing another step."""
    model = _lenet()
    x, y = _batch(8)
    with bm.attach(model, mode="exact") as engine:
        F.cross_entropy(model(x), y).backward()
        read = engine.stats()
        assert all(isinstance(s["residual"], float) and s["residual"] < 1e-10 for s in read)
        assert engine.stats() == read  # read once, then kept
        F.cross_entropy(model(x), y).backward()
        model(x)  # a new forward pass before the rows were read
        late = engine.stats()
    assert all(s["residual"] != s["residual"] and s["amplification"] != s["amplification"] for s in late)
    assert [s["path"] for s in late] == [s["path"] for s in read]  # (what was known at once stays)


def test_amplification_read_after_the_optimizer_step_describes_the_step_weights():
    """``amplification`` is computed when read, from a copy of the weights the backward pass solved with: an
    optimizer step (here one input unit's weights shrunk 1000-fold, in place) before ``stats()`` changes
    nothing in it."""
    model, x, y = _lenet(), *_batch(8)
    readings = []
    for shrink in (False, True):
        net = copy.deepcopy(model)
        with bm.attach(net, mode="exact") as engine:
            F.cross_entropy(net(x), y).backward()
            if shrink:
                with torch.no_grad():
                    for module in net.modules():
                        if isinstance(module, (nn.Linear, nn.Conv2d)):
                            module.weight[:, 0] *= 1e-3
            readings.append([s["amplification"] for s in engine.stats()])
    assert readings[0] == readings[1]
    assert all(a >= 1.0 for a in readings[0])


# ------------------------------------------------------------------ precision
def _ill_conditioned(samples, inputs=64, condition=1e6, seed=0):
    """float32 rows whose Gram has eigenvalues spread evenly (in log) over [1/condition, 1], and a signal R."""
    gen = torch.Generator().manual_seed(seed)
    rank = min(samples, inputs)
    left, _ = torch.linalg.qr(torch.randn(samples, rank, generator=gen, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(inputs, rank, generator=gen, dtype=torch.float64))
    singular = torch.logspace(0, -0.5 * float(torch.log10(torch.tensor(condition))), rank, dtype=torch.float64)
    x = (left * singular) @ right.T * samples ** 0.5
    return x.float(), torch.randn(samples, 8, generator=gen).float()


def _linear_exact(x, R, dtype, **attach_args):
    """One Linear layer in ``dtype`` with signal R at its output: (g'_W as float64, stats row, warnings)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], R.shape[1], bias=False)).to(dtype)
    with warnings.catch_warnings(record=True) as caught, bm.attach(model, mode="exact", **attach_args) as engine:
        warnings.simplefilter("always")
        for _ in range(2):  # a second step must not warn again
            model.zero_grad()
            (model(x.to(dtype)) * R.to(dtype)).sum().backward()
        row = engine.stats()[0]
    return model[0].weight.grad.double(), row, [w for w in caught if issubclass(w.category, bm.UnresolvedSolveWarning)]


@pytest.mark.parametrize("samples", [256, 32], ids=["primal", "dual"])
def test_float32_default_gives_the_float64_answer_on_an_ill_conditioned_gram(samples):
    """Condition 1e6: a float32 Cholesky cannot prove it, so by default the Gram is formed and factored in float64;
    solve_dtype=torch.float32 cuts what float32 cannot resolve, and says so, once."""
    x, R = _ill_conditioned(samples)
    exact, row64, _ = _linear_exact(x, R, torch.float64)
    assert (row64["solve_dtype"], row64["resolved"]) == ("float64", True)
    cos = lambda g: float(F.cosine_similarity(g.flatten(), exact.flatten(), dim=0))  # noqa: E731
    for args in ({}, {"solve_dtype": torch.float64}, {"backend": "reference"}):
        got, row, warned = _linear_exact(x, R, torch.float32, **args)
        assert cos(got) > 0.999999 and not warned, args
        assert (row["solve_dtype"], row["resolved"], row["rank"]) == ("float64", True, min(samples, 64)), args
        assert row["fallback"] == ("" if args.get("solve_dtype") else "float32 Cholesky not proven: float64"), args
    got, row, warned = _linear_exact(x, R, torch.float32, solve_dtype=torch.float32)
    assert cos(got) < 0.9  # eigenvalues below 64·eps·λ_max were cut: another answer
    assert (row["solve_dtype"], row["resolved"]) == ("float32", False) and row["rank"] < min(samples, 64)
    assert len(warned) == 1
    message = str(warned[0].message)
    assert "layer '0'" in message and "condition" in message and "solve_dtype=torch.float64" in message


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode, backend", [("exact", "fast"), ("exact", "reference"), ("exact_weights", "fast"),
                                           ("exact_weights", "reference"), ("approx", "fast")])
def test_half_precision_model_steps_like_float32(dtype, mode, backend):
    """Solves run in float32 (float64 where needed); the gradients have the parameters' dtype and are as close to
    the float32 model's as half-precision backprop itself is (measured minimum over 6 seeds and every parameter:
    bfloat16 0.978, float16 0.996, plain backprop included). The reference backend's g_W = Sᵀ A differs from
    autograd's by half-precision rounding, which the outside-use check must not take for an outside gradient."""
    torch.manual_seed(0)
    reference = bm.models.lenet_bn()
    x, y = _batch(32, dtype=torch.float32)
    want = _grads(reference, x, y, mode=mode)
    model = bm.models.lenet_bn().to(dtype)
    model.load_state_dict(reference.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with bm.attach(model, mode=mode, backend=backend) as engine:
        F.cross_entropy(model(x.to(dtype)), y).backward()
        stats = engine.stats()
    for name, p in model.named_parameters():
        assert p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name
        cos = float(F.cosine_similarity(p.grad.double().flatten(), want[name].double().flatten(), dim=0))
        assert cos > (0.95 if dtype == torch.bfloat16 else 0.99), (name, cos)
    if mode != "approx":
        assert {s["solve_dtype"] for s in stats} <= {"float32", "float64"}
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_second_attach_is_refused_until_detach():
    model = _lenet()
    x, y = _batch()
    engine = bm.attach(model, mode="exact")
    with pytest.raises(bm.BackMatchError, match=r"Sequential is already attached.*'exact'.*detach that engine first"):
        bm.attach(model, mode="approx")
    with pytest.raises(bm.BackMatchError, match=r"already attached"):  # a part of an attached model
        bm.attach(model.fc3, mode="exact")
    with pytest.raises(bm.BackMatchError, match=r"Sequential \(its module '0'\) is already"):  # holding an attached one
        bm.attach(nn.Sequential(model.fc3), mode="exact")
    engine.detach()
    with bm.attach(model, mode="exact"):  # detached: attaching again works, and so does leaving the block
        F.cross_entropy(model(x), y).backward()
    bm.attach(model, mode="bp").detach()
