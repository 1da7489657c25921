"""The manual back-matching pass against the engine, and a tiny ``backmatch compare`` run."""

import argparse
import csv
import json
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

import backmatch_exact as bm
from backmatch_exact.research import compare, train
from backmatch_exact.research.compare import ALGORITHM1, EXACT, Approximations


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n=6, channels=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, channels, 32, 32, generator=gen, dtype=torch.float64),
            torch.randint(0, 10, (n,), generator=gen))


def _lenet():
    torch.manual_seed(0)
    return bm.models.lenet_bn().double()


def _odd_chain():
    """Biases, affine BatchNorm with γ far from 1, padding, a stride-2 conv: what LeNet does not have."""
    torch.manual_seed(1)
    model = nn.Sequential(OrderedDict([
        ("c1", nn.Conv2d(3, 4, 3, padding=1, bias=True)), ("b1", nn.BatchNorm2d(4)), ("r1", nn.ReLU()),
        ("p1", nn.MaxPool2d(2)),
        ("c2", nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False)), ("b2", nn.BatchNorm2d(5)), ("r2", nn.ReLU()),
        ("flat", nn.Flatten()),
        ("f1", nn.Linear(5 * 8 * 8, 7, bias=True)), ("b3", nn.BatchNorm1d(7)), ("r3", nn.ReLU()),
        ("f2", nn.Linear(7, 10, bias=True)),
    ])).double()
    with torch.no_grad():
        for bn in (model.b1, model.b2, model.b3):
            bn.weight.uniform_(0.3, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
    return model


MODELS = [_lenet, _odd_chain]


def _manual(model, x, y, mode="exact", approx=EXACT, **kw):
    chain = compare.forward_chain(model, x)
    _, grad = compare.loss_gradient(chain, y)
    return compare.manual_backward(chain, grad, mode, approx, **kw)


def _assert_matches(manual, engine, tol=1e-9):
    assert set(engine.weight_grads) <= set(manual)
    for path in engine.weight_grads:
        assert compare.relative_difference(manual[path].weight_grad, engine.weight_grads[path]) < tol, path
        assert compare.relative_difference(manual[path].input_signal, engine.input_signals[path]) < tol, path


@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("damping,signal_damping", [(0.0, 0.0), (0.5, 1.0)])
def test_manual_pass_without_approximations_is_exact_mode(make, damping, signal_damping):
    model = make()
    x, y = _batch()
    engine = compare.engine_pass(model, x, y, "exact", damping=damping, signal_damping=signal_damping)
    manual = _manual(model, x, y, damping=damping, signal_damping=signal_damping)
    _assert_matches(manual, engine)


@pytest.mark.parametrize("make", MODELS)
def test_manual_pass_with_every_approximation_is_approx_mode(make):
    model = make()
    x, y = _batch()
    _assert_matches(_manual(model, x, y, approx=ALGORITHM1), compare.engine_pass(model, x, y, "approx"))


def test_manual_backprop_is_autograd():
    model = _odd_chain()
    x, y = _batch()
    _assert_matches(_manual(model, x, y, mode="bp"), compare.engine_pass(model, x, y, "bp"), tol=1e-12)


def test_approximations_change_only_what_they_claim():
    model = _lenet()
    x, y = _batch()
    exact = _manual(model, x, y)
    # (a) G ≈ s·I leaves every signal exact; each weight gradient is g_W / s on the exact output signal
    gram = _manual(model, x, y, approx=Approximations.only("gram"))
    chain = compare.forward_chain(model, x)
    factors = dict(zip([c.path for c in chain], compare.chain_factors(chain)))
    for layer in chain:
        assert torch.equal(gram[layer.path].input_signal, exact[layer.path].input_signal)
        if layer.rule.has_weights:
            rows = layer.rule.input_rows(layer.module, layer.input.detach())
            sig = layer.rule.signal_rows(layer.module, exact[layer.path].output_signal)
            expected = sig.T @ rows / factors[layer.path].sharing_factor
            assert compare.relative_difference(gram[layer.path].weight_grad, expected) < 1e-12
    # a conv factor on a network's top layers (Linear) does nothing: fc3, fc2, fc1 stay exact
    conv = _manual(model, x, y, approx=Approximations.only("conv_factor"))
    for path in ("fc3", "fc2", "fc1"):
        assert compare.relative_difference(conv[path].weight_grad, exact[path].weight_grad) < 1e-12
    assert compare.relative_difference(conv["cv1"].weight_grad, exact["cv1"].weight_grad) > 1e-3
    # the BN switches act at bn4 and below: fc3's gradient is untouched, fc2's (above bn4's input) is not
    for name in ("bn_variance", "bn_coupling"):
        bn = _manual(model, x, y, approx=Approximations.only(name))
        assert compare.relative_difference(bn["fc3"].weight_grad, exact["fc3"].weight_grad) < 1e-12
        assert compare.relative_difference(bn["fc2"].weight_grad, exact["fc2"].weight_grad) > 1e-3


def test_approximation_sets():
    names = Approximations.names()
    assert not EXACT.any() and all(getattr(ALGORITHM1, n) for n in names)
    assert Approximations.only("gram") == Approximations(gram=True)
    assert sum(map(bool, vars(Approximations.all_but("columns")).values())) == len(names) - 1
    assert set(compare.DESCRIPTIONS) == set(names)


def test_manual_pass_rejects_non_sequential():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(TypeError):
        compare.forward_chain(Net(), torch.zeros(1, 3))


def test_cosine_is_clamped_and_nan_for_zero():
    v = torch.tensor([1.0, 2.0])
    assert compare.cosine(v, v) == pytest.approx(1.0) and compare.cosine(v, -v) == pytest.approx(-1.0)
    assert compare.cosine(v, 1e300 * v) <= 1.0
    assert math.isnan(compare.cosine(v, torch.zeros(2)))


def _compare_args(out, **kw):
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    args = parser.parse_args(["--out", str(out), "--steps", "2", "--every", "1", "--batch-size", "16",
                              "--eval-batch", "16", "--no-progress"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_tiny_compare_run_writes_consistent_files(tmp_path):
    summary = compare.run(_compare_args(tmp_path))
    with open(tmp_path / "layers.csv") as f:
        rows = list(csv.DictReader(f))
    layers = ["cv1", "cv2", "fc1", "fc2", "fc3"]
    assert {"step", "layer", "cosine", "norm_ratio", "m_exact", "m_approx"} <= set(rows[0])
    assert set(compare.CSV_COLUMNS) == set(rows[0])
    assert [(int(r["step"]), r["layer"]) for r in rows] == [(s, l) for s in (0, 1, 2) for l in layers]
    for r in rows:
        for key in ["cosine", "cos_bp_exact", "f32_cosine"] + [k for k in r if k.endswith("_cos")]:
            assert -1.0 <= float(r[key]) <= 1.0, key
        assert float(r["norm_ratio"]) > 0 and float(r["m_exact"]) > 0 and float(r["m_approx"]) > 0
        assert abs(float(r["cosine"]) - float(r["cos_bp_exact"])) < 1e-9  # approx = rescaled backprop

    saved = json.loads((tmp_path / "summary.json").read_text())
    assert {"settings", "timing_s", "consistency", "final", "mean_over_checkpoints", "ablation_costs",
            "gradient_spread", "findings", "figures", "layers"} <= set(saved)
    assert saved["layers"] == layers and set(saved["final"]) == set(layers)
    assert all(v < 1e-9 for v in saved["consistency"].values())
    assert summary["checkpoints"] == [0, 1, 2]

    report = (tmp_path / "report.md").read_text()
    for layer in layers:
        assert layer in report
    for name in saved["figures"]:
        assert (tmp_path / name).stat().st_size > 0 and f"]({name})" in report


def test_compare_cli_is_wired(tmp_path, monkeypatch):
    from backmatch_exact import cli

    seen = {}
    monkeypatch.setattr(compare, "main", lambda args: seen.setdefault("args", args) and 0)
    monkeypatch.setattr(train, "main", lambda args: seen.setdefault("train", args) and 0)
    cli.main(["compare", "--steps", "3", "--out", str(tmp_path)])
    cli.main(["train", "--optim", "sgd", "exact", "--lr", "0.1", "0.2", "--out", str(tmp_path)])
    assert seen["args"].steps == 3 and seen["args"].optim == "sgd"
    assert seen["train"].optim == ["sgd", "exact"] and seen["train"].lr == [0.1, 0.2]
