"""The ``backmatch`` console command as a user meets it: the real command in a subprocess.

A bad value is one line on stderr naming the option and what it must be, exit status 2, no
traceback, and no output folder touched; Ctrl-C is one line and status 130.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import backmatch_exact as bm
from backmatch_exact import cli
from backmatch_exact.research import common

try:
    from test_data import idx_bytes, write_idx_folder
except ImportError:  # run from elsewhere
    from tests.test_data import idx_bytes, write_idx_folder

ROOT = Path(__file__).resolve().parent.parent
ENV = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def backmatch(*argv, cwd, timeout=120):
    """``python -m backmatch_exact.cli ARGV`` in ``cwd``: the console command without installing it."""
    return subprocess.run([sys.executable, "-m", "backmatch_exact.cli", *map(str, argv)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *words):
    """Exit status 2 and one line on stderr, ``backmatch <command>: error: …``, holding ``words``."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("backmatch") and ": error: " in lines[0], lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


# The bad values of the issue: (argv, what the line must say). Each command gets --out OUT where it has one.
BAD_VALUES = [
    (["check", "--damping", "-1"], ["--damping must be a finite number >= 0, got -1"]),
    (["train", "--lr", "-0.1"], ["--lr must be a finite number > 0, got -0.1"]),
    (["train", "--lr", "0.1", "nan"], ["--lr must be a finite number > 0, got nan"]),
    (["compare", "--batch-size", "0"], ["--batch-size must be an integer >= 1, got 0"]),
    (["check", "--batch", "0"], ["--batch must be an integer >= 1, got 0"]),
    (["bench", "--steps", "0"], ["--steps must be an integer >= 1, got 0"]),
    (["train", "--batch-size", "-5"], ["--batch-size must be an integer >= 1, got -5"]),
    (["train", "--train-subset", "-5"], ["--train-subset must be an integer >= 0, got -5"]),
    (["train", "--epochs", "0"], ["--epochs must be an integer >= 1, got 0"]),
    (["train", "--resume", "--overwrite"], ["--overwrite", "not allowed with --resume"]),
    (["compare", "--data", "/nonexistent"], ["--data /nonexistent", "nor an existing folder"]),
    (["train", "--data", "/nonexistent"], ["--data /nonexistent", "nor an existing folder"]),
    pytest.param(["check", "--device", "cuda"], ["--device must be a device this machine has, got cuda"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
]


def _ids(value):
    return " ".join(value) if isinstance(value[0], str) else ""


@pytest.fixture(scope="module")
def bad_value_runs(tmp_path_factory):
    """Every bad value of BAD_VALUES run as the real command, all started at once (each is a Python start
    with torch, seconds): ``{id: (result, its working folder)}``."""
    started = {}
    for case in BAD_VALUES:
        argv = list(case.values[0] if hasattr(case, "values") else case[0])
        cwd = tmp_path_factory.mktemp("bad")
        if argv[0] in ("compare", "train"):
            argv += ["--out", str(cwd / "runs" / "out")]
        started[_ids(argv[:-2] if argv[0] in ("compare", "train") else argv)] = (argv, cwd, subprocess.Popen(
            [sys.executable, "-m", "backmatch_exact.cli", *argv], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    runs = {}
    for key, (argv, cwd, process) in started.items():
        out, err = process.communicate(timeout=300)
        runs[key] = (subprocess.CompletedProcess(argv, process.returncode, out, err), cwd)
    return runs


@pytest.mark.parametrize("argv, words", BAD_VALUES, ids=_ids)
def test_a_bad_value_is_one_line_and_status_2(bad_value_runs, argv, words):
    result, cwd = bad_value_runs[_ids(argv)]
    assert_one_line_error(result, *words)
    assert list(cwd.iterdir()) == []  # no output folder, not even an empty one


def test_an_out_of_range_label_is_one_line_naming_file_and_value(tmp_path):
    folder = tmp_path / "idx"
    arrays = write_idx_folder(folder, np.random.default_rng(0))
    labels = arrays["train-labels-idx1-ubyte"].copy()
    labels[3] = 200
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    result = backmatch("train", "--data", folder, "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(result, str(folder / "train-labels-idx1-ubyte"), "label 200", "0..9")
    assert not (tmp_path / "out").exists()


def test_compare_refuses_an_existing_result_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("an earlier result")
    result = backmatch("compare", "--out", out, cwd=tmp_path)
    assert_one_line_error(result, f"--out {out} already holds files", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["report.md"] and (out / "report.md").read_text() == "an earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left either


def test_train_refuses_an_existing_result_folder(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "results.jsonl").write_text('{"epoch": 1}\n')
    result = backmatch("train", "--out", out, cwd=tmp_path)
    assert_one_line_error(result, "already holds results", "--resume", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "results.jsonl"]
    assert (out / "results.jsonl").read_text() == '{"epoch": 1}\n'


def test_ctrl_c_in_compare_is_one_line_130_and_no_half_written_folder(tmp_path):
    """Ctrl-C: exit status 130 and one line; ``--out`` is either absent (nothing measured yet, the likely case
    here: the signal comes as the first checkpoint is measured) or complete: the checkpoints measured before
    the interrupt, written at once (test_compare checks that case in-process)."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "backmatch_exact.cli", "compare", "--out", str(out), "--steps", "100000",
               "--every", "20", "--batch-size", "8", "--eval-batch", "8", "--no-float32-check", "--threads", "1"]
    process = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    first = process.stderr.read(1)  # the progress bar appears: the first checkpoint is being measured
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, first + stderr
    message = stderr.splitlines()[-1]  # (after the progress bar's own line)
    assert message.startswith("backmatch compare: interrupted") and "Traceback" not in stderr, stderr
    assert [p.name for p in tmp_path.iterdir() if p.name != "out"] == []  # no staging folder left
    if out.exists():
        summary = json.loads((out / "summary.json").read_text())
        assert summary["stopped"]["why"] == "interrupted" and summary["checkpoints"][0] == 0
        assert {"layers.csv", "report.md", "agreement.png"} <= {p.name for p in out.iterdir()}


def test_check_in_bp_mode_says_it_solves_nothing(capsys):
    assert cli.main(["check", "--mode", "bp", "--batch-size", "4"]) == 0
    assert "bp mode solves nothing" in capsys.readouterr().out


def test_version(tmp_path):
    version = backmatch("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"backmatch_exact {bm.__version__}"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and "--lr LR [LR ...]" in text
    assert "(default: 0.05)" in text and "(default: train_out)" in text and "(default: inf)" in text


# ------------------------------------------------------------------ the parser, in-process (fast)
def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


BAD_TEXT = {common.positive_int: "0", common.non_negative_int: "-1", common.positive_float: "0",
            common.non_negative_float: "-0.5", common.positive_float_or_inf: "nan", common.fraction: "1"}


def test_every_numeric_option_is_checked_and_every_option_explained(capsys):
    """Every option of every command has a help line; every number is parsed by one of the checking types,
    and a bad value for it is one line naming the option."""
    checked = 0
    for name, parser in _subcommands().items():
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
                continue
            assert action.help, (name, action.option_strings)
            if isinstance(action.default, (int, float)) and not isinstance(action.default, bool) \
                    or action.type in BAD_TEXT:
                assert action.type in BAD_TEXT, (name, action.option_strings)
                option = action.option_strings[0]
                with pytest.raises(SystemExit) as exit_:
                    cli.main([name, option, BAD_TEXT[action.type]])
                lines = capsys.readouterr().err.splitlines()
                assert exit_.value.code == 2 and len(lines) == 1, lines
                assert lines[0].startswith(f"backmatch {name}: error: {option} must be "), lines[0]
                checked += 1
    assert checked >= 30


def test_one_spelling_per_concept():
    """The options that several commands take are spelled and typed alike (``--batch-size``, not ``--batch``)."""
    spellings = {}
    for name, parser in _subcommands().items():
        for action in parser._actions:
            if action.help != argparse.SUPPRESS:
                for option in action.option_strings:
                    spellings.setdefault(action.dest, set()).add(option)
    assert spellings["batch_size"] == {"--batch-size"}
    assert all(len(options) == 1 for dest, options in spellings.items() if dest != "help"), spellings
