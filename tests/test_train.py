"""``backmatch train``: sweeps, resuming to identical numbers, Ctrl-C, divergence as a result."""

import argparse
import json
import math

import pytest
import torch

from backmatch_exact import train

TIMING_KEYS = {"epoch_time_s", "wall_time_s"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(out, *extra):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser.parse_args(["--out", str(out), "--no-progress", "--batch-size", "64", *extra])


def _metrics(out):
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS}
            for line in train.read_results(out / "results.jsonl")]


def _checkpoint(out, key):
    return torch.load(out / "checkpoints" / f"{key}.pt", weights_only=False)


def _assert_same_state(a, b):
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k
    assert torch.equal(a["generator"], b["generator"])


RUN = ["--optim", "sgd", "exact", "--lr", "0.05", "--damping", "1", "--signal-damping", "1",
       "--train-subset", "160", "--augment"]


def test_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(_args(straight, *RUN, "--epochs", "2")) == 0
    assert train.main(_args(resumed, *RUN, "--epochs", "1")) == 0

    # Ctrl-C during the second epoch of the first config: epoch 1 stays, nothing half-written
    real_evaluate = train.evaluate

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate", interrupted)
    assert train.main(_args(resumed, *RUN, "--epochs", "2", "--resume")) == 130
    assert [(l["config"], l["epoch"]) for l in train.read_results(resumed / "results.jsonl")] == [
        ("sgd_lr0.05_seed0", 1), ("exact_lr0.05_d1_sd1_seed0", 1)]
    monkeypatch.setattr(train, "evaluate", real_evaluate)

    assert train.main(_args(resumed, *RUN, "--epochs", "2", "--resume")) == 0
    by_key = lambda lines: sorted(lines, key=lambda l: (l["config"], l["epoch"]))  # noqa: E731
    assert by_key(_metrics(resumed)) == by_key(_metrics(straight))
    assert len(_metrics(straight)) == 4
    for key in ("sgd_lr0.05_seed0", "exact_lr0.05_d1_sd1_seed0"):
        _assert_same_state(_checkpoint(straight, key), _checkpoint(resumed, key))


def test_resume_drops_lines_no_checkpoint_backs(tmp_path):
    out = tmp_path / "run"
    assert train.main(_args(out, "--optim", "sgd", "--train-subset", "64", "--epochs", "1")) == 0
    line = train.read_results(out / "results.jsonl")[0]
    with open(out / "results.jsonl", "a") as f:  # as if killed between the log line and the checkpoint
        f.write(json.dumps(line | {"epoch": 2}) + "\n")
    assert train.main(_args(out, "--optim", "sgd", "--train-subset", "64", "--epochs", "2", "--resume")) == 0
    assert [l["epoch"] for l in train.read_results(out / "results.jsonl")] == [1, 2]
    assert train.read_results(out / "results.jsonl")[1]["train_loss"] != line["train_loss"]


def test_a_diverging_config_is_a_result(tmp_path):
    out = tmp_path / "run"
    args = _args(out, "--optim", "sgd", "exact", "--lr", "inf", "0.05", "--signal-damping", "1",
                 "--train-subset", "128", "--epochs", "2")
    assert train.main(args) == 0
    lines = train.read_results(out / "results.jsonl")
    diverged = [l for l in lines if l["diverged"]]
    assert sorted(l["config"] for l in diverged) == ["exact_lrinf_d0_sd1_seed0", "sgd_lrinf_seed0"]
    for line in diverged:
        assert line["step"] == 2 and line["epoch"] == 1  # the first step is finite, its update is not
        assert math.isfinite(line["last_finite_loss"])
    exact = next(l for l in diverged if l["optim"] == "exact")
    assert exact["reason"].startswith("NonFiniteError")
    finished = [l["config"] for l in lines if not l["diverged"]]
    assert finished == ["sgd_lr0.05_seed0"] * 2 + ["exact_lr0.05_d0_sd1_seed0"] * 2
    summary = (out / "summary.md").read_text()
    assert "**1/1**" in summary and "sgd lr=inf" in summary and (out / "curves.png").stat().st_size > 0

    # resuming leaves diverged configs alone
    args.resume = True
    assert train.main(args) == 0
    assert train.read_results(out / "results.jsonl") == lines


def test_refuses_to_mix_runs(tmp_path):
    out = tmp_path / "run"
    assert train.main(_args(out, "--train-subset", "64", "--epochs", "1")) == 0
    with pytest.raises(SystemExit, match="--resume"):
        train.main(_args(out, "--train-subset", "64", "--epochs", "1"))
    with pytest.raises(SystemExit, match="batch_size"):
        train.main(_args(out, "--train-subset", "64", "--epochs", "1", "--resume", "--batch-size", "32"))
    assert train.main(_args(out, "--train-subset", "64", "--epochs", "1", "--overwrite")) == 0


def test_sweep_expansion():
    configs = train.expand_configs(["sgd", "exact", "exact_weights"], [0.1, 0.01], [0.0, 1.0], [0.0, 2.0], [0, 1])
    count = {o: sum(c.optim == o for c in configs) for o in ("sgd", "exact", "exact_weights")}
    assert count == {"sgd": 4, "exact": 16, "exact_weights": 8}
    assert len({c.key for c in configs}) == len(configs)
    assert train.Config("exact", 0.1, 1.0, 2.0, 3).label == "exact lr=0.1 λ=1 μ=2"
    with pytest.raises(ValueError):
        train.expand_configs(["adam"], [0.1])


def test_lr_schedule_and_optimizers():
    assert train.lr_at(59, 0.1, 0.2, 60) == 0.1 and train.lr_at(60, 0.1, 0.2, 60) == pytest.approx(0.02)
    model = train.build_model("lenet", 1, 10)
    for name in train.OPTIMIZERS:
        optimizer, engine = train.make_optimizer(name, model, 0.1, weight_decay=1e-4)
        assert (engine is not None) == (name in train.ENGINE_MODES)
        wd = optimizer.param_groups[0]["weight_decay"]
        assert wd == (0.0 if engine is not None else 1e-4)
        if engine is not None:
            assert engine.weight_decay == 1e-4
            engine.detach()
    assert sum(p.numel() for p in train.build_model("vgg11", 3, 100).parameters()) > 9e6
