"""``backmatch compare``: its measurements and cross-checks on a tiny run, and its command line."""

import argparse
import csv
import json
import math

import numpy as np
import pytest
import torch

import backmatch_exact as bm
from backmatch_exact.research import compare, train
from backmatch_exact.research.common import CommandError


pytestmark = pytest.mark.usefixtures("one_thread")


def test_cosine_is_clamped_and_nan_for_zero():
    v = torch.tensor([1.0, 2.0])
    assert compare.cosine(v, v) == pytest.approx(1.0) and compare.cosine(v, -v) == pytest.approx(-1.0)
    assert compare.cosine(v, 1e300 * v) <= 1.0
    assert math.isnan(compare.cosine(v, torch.zeros(2)))


def test_evaluate_rows_are_the_engine_runs_they_name():
    """Each ablation column is the engine with those switches; the cross-checks hold on an odd-sized batch."""
    torch.manual_seed(0)
    model = bm.models.lenet_bn().double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32, generator=gen, dtype=torch.float64), torch.randint(0, 10, (6,), generator=gen)
    rows, checks = compare.evaluate(model, x, y, damping=0.1, signal_damping=0.5)
    assert [r["layer"] for r in rows] == ["cv1", "cv2", "fc1", "fc2", "fc3"]
    assert all(checks[key] < 1e-9 for key in compare.CHECKS), checks
    run = lambda **kw: compare.engine_pass(model, x, y, "exact", damping=0.1, signal_damping=0.5, **kw)  # noqa: E731
    exact = run()
    only_columns = run(approximations=["columns"])
    without_gram = run(approximations=bm.Approximations.all_but("gram"))
    for row in rows:
        layer = row["layer"]
        assert row["only_columns_cos"] == pytest.approx(
            compare.cosine(only_columns.weight_grads[layer], exact.weight_grads[layer]), abs=1e-12)
        assert row["without_gram_ratio"] == pytest.approx(
            compare.norm(without_gram.weight_grads[layer]) / compare.norm(exact.weight_grads[layer]), rel=1e-9)
    assert rows[0]["only_columns_cos"] < 0.999  # (the switch does something at cv1)

    # the independence assumption: per-unit against joint, and one layer's two rules on the same g'_b (fc3: W⁺)
    joint = run(signals="joint", record_signals=("input", "output"))
    for row in rows:
        layer = row["layer"]
        assert row["cos_joint_per_unit"] == pytest.approx(
            compare.cosine(exact.weight_grads[layer], joint.weight_grads[layer]), abs=1e-12)
        assert row["signal_joint_norm_ratio"] == pytest.approx(
            compare.norm(exact.input_signals[layer]) / compare.norm(joint.input_signals[layer]), rel=1e-9)
        assert row["joint_residual"] < 1e-9
    w, g_b = model.fc3.weight.detach(), joint.output_signals["fc3"]
    col_sq = (w * w).sum(0)
    per_unit = g_b @ w / (col_sq + 0.5 * col_sq.mean())
    co_updated = torch.linalg.solve(w.T @ w + 0.5 * col_sq.mean() * torch.eye(84, dtype=w.dtype), w.T @ g_b.T).T
    assert torch.allclose(joint.input_signals["fc3"], co_updated, rtol=1e-9, atol=1e-14)
    assert rows[-1]["local_cos_joint_per_unit"] == pytest.approx(compare.cosine(per_unit, co_updated), abs=1e-9)
    assert rows[-1]["local_cos_joint_per_unit"] < 0.999  # (the assumption costs something at fc3)
    costs = compare.ablation_costs(rows)
    assert costs[compare.PER_UNIT]["mean_1_minus_cos"] == pytest.approx(
        float(np.mean([1 - r["cos_joint_per_unit"] for r in rows])))


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

    saved = json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON
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


def test_an_interrupted_compare_writes_what_it_measured_at_once(tmp_path, monkeypatch, capsys):
    """Ctrl-C at the second checkpoint: status 130, and --out gets the first checkpoint's complete set of files
    in one move; --overwrite replaces compare's files and leaves others alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("an earlier report")
    (out / "notes.txt").write_text("mine")
    real_evaluate, calls = compare.evaluate, []

    def evaluate_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(compare, "evaluate", evaluate_then_interrupt)
    with pytest.raises(CommandError, match="already holds files"):
        compare.main(_compare_args(out))
    assert compare.main(_compare_args(out, overwrite=True, no_float32_check=True)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("backmatch compare: interrupted at step 1")
    summary = json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert summary["stopped"]["why"] == "interrupted" and summary["checkpoints"] == [0]
    assert "Stopped early" in (out / "report.md").read_text() and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the staging folder is gone


def test_a_diverging_compare_is_one_error_and_keeps_its_checkpoints(tmp_path):
    args = _compare_args(tmp_path / "runs" / "out", optim="exact", signal_damping=1.0, lr=1e30, steps=3, every=10,
                         no_float32_check=True)
    with pytest.raises(CommandError, match="diverged at step 2 .NonFiniteError") as err:
        compare.main(args)
    assert err.value.status == 1
    assert json.loads((tmp_path / "runs" / "out" / "summary.json").read_text())["stopped"]["why"] == "diverged"


@pytest.mark.parametrize("make, rescaled", [(lambda: bm.models.lenet_bn(), True), (lambda: bm.models.resnet(8), False)],
                         ids=["lenet", "resnet8"])
def test_the_first_finding_says_whether_algorithm1_is_backprop_rescaled(make, rescaled):
    """On a chain Algorithm 1's g̃_W is backprop's g_W over a scalar, so its cosine to exact is backprop's; at a
    fan-out (ResNet's shortcut) the consumers' signals are summed each over its own m, and the two differ."""
    torch.manual_seed(0)
    model = make().double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64), torch.randint(0, 10, (4,), generator=gen)
    rows, checks = compare.evaluate(model, x, y, damping=0.1, signal_damping=0.1)
    gap = max(abs(r["cosine"] - r["cos_bp_exact"]) for r in rows)
    assert (gap < 1e-9) == rescaled, gap
    for row in rows:
        row.update(step=0, train_loss=float("nan"), eval_loss=checks["loss"])
    first = compare.findings(rows, checks)[0]["numbers"]
    assert ("only rescales the backprop gradient" in first) == rescaled, first
    assert ("is not backprop rescaled" in first) == (not rescaled), first
