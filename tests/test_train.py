"""``backmatch train``: sweeps, resuming to identical numbers, Ctrl-C, divergence and instability as results."""

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from backmatch_exact.research import common, train

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
    args = _args(out, "--optim", "sgd", "exact", "--lr", "1e30", "0.05", "--signal-damping", "1",
                 "--train-subset", "128", "--epochs", "2")
    assert train.main(args) == 0
    lines = train.read_results(out / "results.jsonl")
    diverged = [l for l in lines if l["diverged"]]
    assert sorted(l["config"] for l in diverged) == ["exact_lr1e+30_d0_sd1_seed0", "sgd_lr1e+30_seed0"]
    for line in diverged:
        assert line["step"] == 2 and line["epoch"] == 1  # the first step is finite, its update is not
        assert math.isfinite(line["last_finite_loss"]) and line["status"] == "diverged"
    exact = next(l for l in diverged if l["optim"] == "exact")
    assert exact["reason"].startswith("NonFiniteError")
    finished = [l["config"] for l in lines if not l["diverged"]]
    assert finished == ["sgd_lr0.05_seed0"] * 2 + ["exact_lr0.05_d0_sd1_seed0"] * 2
    summary = (out / "summary.md").read_text()
    assert "**diverged 1/1**" in summary and "sgd lr=1e+30" in summary and (out / "curves.png").stat().st_size > 0
    for text in (out / "results.jsonl").read_text().splitlines():  # strict JSON: no NaN or Infinity literals
        json.loads(text, parse_constant=lambda literal: pytest.fail(f"{literal} in results.jsonl"))

    # resuming leaves diverged configs alone
    args.resume = True
    assert train.main(args) == 0
    assert train.read_results(out / "results.jsonl") == lines


def test_refuses_to_mix_runs(tmp_path):
    out = tmp_path / "run"
    assert train.main(_args(out, "--train-subset", "64", "--epochs", "1")) == 0
    with pytest.raises(common.CommandError, match="--resume"):
        train.main(_args(out, "--train-subset", "64", "--epochs", "1"))
    with pytest.raises(common.CommandError, match="batch_size"):
        train.main(_args(out, "--train-subset", "64", "--epochs", "1", "--resume", "--batch-size", "32"))
    assert train.main(_args(out, "--train-subset", "64", "--epochs", "1", "--overwrite")) == 0


def test_unstable_is_told_from_diverged_and_done(tmp_path, capsys):
    """A finite run whose last epoch ends above its first step's loss is "unstable"; undamped exact is warned about."""
    out = tmp_path / "run"
    assert train.main(_args(out, "--optim", "sgd", "exact", "--lr", "0.05", "3", "--train-subset", "128",
                            "--epochs", "2")) == 0
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "warning" in warning[0] and "--damping 1 --signal-damping 1" in warning[0]
    assert "exact lr=0.05 λ=0 μ=0" in warning[0]
    last = {line["config"]: line for line in train.read_results(out / "results.jsonl")}
    for key, line in last.items():
        first_step = line["initial_loss"]
        assert line["status"] == ("unstable" if line["train_loss"] > first_step else "done"), key
    assert last["sgd_lr3_seed0"]["status"] == "unstable" and last["sgd_lr0.05_seed0"]["status"] == "done"
    table = (out / "summary.md").read_text()
    assert "**unstable 1/1** (seed 0: train loss" in table and "done 1/1" in table


def test_a_run_stopped_before_its_first_result_leaves_no_folder(tmp_path, monkeypatch):
    """Ctrl-C (or a crash) before any epoch finished: the folders this run made are gone again."""
    out = tmp_path / "runs" / "run"

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.main(_args(out, "--train-subset", "64", "--epochs", "1"))
    assert list(tmp_path.iterdir()) == []


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
    model = common.build_model("lenet", 1, 10)
    for name in common.OPTIMIZERS:
        optimizer, engine = common.make_optimizer(name, model, 0.1, weight_decay=1e-4)
        assert (engine is not None) == (name in common.ENGINE_MODES)
        wd = optimizer.param_groups[0]["weight_decay"]
        assert wd == (0.0 if engine is not None else 1e-4)
        if engine is not None:
            assert engine.weight_decay == 1e-4
            engine.detach()
    vgg = common.build_model("vgg11", 3, 100)
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs) and vgg.classifier.out_features == 100
    assert sum(p.numel() for p in vgg.parameters()) == 9_268_928  # no affine BN: 3x3 convs and one Linear(512, 100)


# ------------------------------------------------------------------ under torchrun
def _torchrun(cwd, *argv, nproc=2):
    """``torchrun --nproc_per_node nproc -m backmatch_exact.cli train ...`` as a subprocess (2 min cap)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "backmatch_exact.cli", "train", "--no-progress", *argv]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


DIST = ["--optim", "sgd", "exact", "--lr", "0.05", "--signal-damping", "1", "--train-subset", "128",
        "--batch-size", "64", "--dtype", "float64"]


def _sharded_sgd_reference(epochs=2, lr=0.05, momentum=0.9):
    """What 2 DDP ranks compute for ``sgd``, in one process: each half of the global batch with its own
    BatchNorm statistics, gradients averaged, rank 0's running statistics kept."""
    from backmatch_exact import data

    dataset = data.load("default")
    x_train, y_train = dataset.x_train[:128].double(), dataset.y_train[:128]
    torch.manual_seed(0)
    model = common.build_model("lenet", dataset.in_channels, dataset.num_classes).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in data.batches(128, 64, generator):
            x, y = x_train[idx], y_train[idx]
            buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
            grads = []
            for half in (slice(32, 64), slice(0, 32)):  # rank 1 first; its running statistics are discarded
                if half.start == 0:
                    model.load_state_dict(buffers, strict=False)
                model.zero_grad()
                torch.nn.functional.cross_entropy(model(x[half]), y[half]).backward()
                grads.append([p.grad.clone() for p in model.parameters()])
            for p, g1, g0 in zip(model.parameters(), *grads):
                p.grad = (g0 + g1) / 2
            optimizer.step()
    return model.state_dict()


def test_train_under_torchrun_writes_once_and_resumes(tmp_path):
    straight = _torchrun(tmp_path, *DIST, "--epochs", "2", "--out", "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _torchrun(tmp_path, *DIST, "--epochs", "1", "--out", "resumed")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun(tmp_path, *DIST, "--epochs", "2", "--out", "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # rank 0 alone writes: one line per configuration and epoch, one summary on stdout
    lines = train.read_results(tmp_path / "straight" / "results.jsonl")
    assert [(l["config"], l["epoch"]) for l in lines] == [
        ("sgd_lr0.05_seed0", 1), ("sgd_lr0.05_seed0", 2), ("exact_lr0.05_d0_sd1_seed0", 1),
        ("exact_lr0.05_d0_sd1_seed0", 2)]
    assert straight.stdout.count("# Training comparison") == 1
    assert json.loads((tmp_path / "straight" / "args.json").read_text())["processes"] == 2
    by_key = lambda lines: sorted(lines, key=lambda l: (l["config"], l["epoch"]))  # noqa: E731
    assert by_key(_metrics(tmp_path / "resumed")) == by_key(_metrics(tmp_path / "straight"))
    for key in ("sgd_lr0.05_seed0", "exact_lr0.05_d0_sd1_seed0"):
        _assert_same_state(_checkpoint(tmp_path / "straight", key), _checkpoint(tmp_path / "resumed", key))

    # each rank trained on its half of every global batch
    reference = _sharded_sgd_reference()
    trained = _checkpoint(tmp_path / "straight", "sgd_lr0.05_seed0")["model"]
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-9, atol=1e-12, msg=name)

    # a run made by 2 processes is not resumed by 1 (BatchNorm statistics would change meaning)
    with pytest.raises(common.CommandError, match="processes was 2, now 1"):
        train.main(_args(tmp_path / "resumed", *DIST[:-4], "--dtype", "float64", "--epochs", "3", "--resume"))


def test_signals_sweep_keeps_old_keys_and_trains_joint(tmp_path):
    configs = train.expand_configs(["sgd", "exact"], [0.1], [1.0], [1.0], [0, 1], ["per_unit", "joint"])
    assert [c.key for c in configs] == ["sgd_lr0.1_seed0", "sgd_lr0.1_seed1", "exact_lr0.1_d1_sd1_seed0",
                                        "exact_lr0.1_d1_sd1_seed1", "exact_lr0.1_d1_sd1_joint_seed0",
                                        "exact_lr0.1_d1_sd1_joint_seed1"]
    assert configs[-1].label == "exact lr=0.1 λ=1 μ=1 joint" and configs[2].label == "exact lr=0.1 λ=1 μ=1"
    out = tmp_path / "run"
    assert train.main(_args(out, "--optim", "exact", "--signals", "per_unit", "joint", "--signal-damping", "1",
                            "--train-subset", "64", "--epochs", "1")) == 0
    lines = train.read_results(out / "results.jsonl")
    assert [(l["config"], l["signals"], l["diverged"]) for l in lines] == [
        ("exact_lr0.05_d0_sd1_seed0", "per_unit", False), ("exact_lr0.05_d0_sd1_joint_seed0", "joint", False)]
    assert lines[0]["test_loss"] != lines[1]["test_loss"]  # (after the one step: a different update)
    with pytest.raises(SystemExit):
        train.main(_args(tmp_path / "bad", "--signals", "both"))
