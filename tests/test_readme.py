"""The READMEs' code stays true: every ```python block of README.md runs as written, and every
``backmatch`` command in a ```bash block of README.md or validation/README.md parses."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from backmatch_exact import cli

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)

#: python blocks that cannot run here, found by a phrase in the block, and why
CANNOT_RUN = {
    "torchrun": "runs under torchrun with NCCL on several GPUs (dist.init_process_group(\"nccl\"))",
}


def blocks(path: Path, language: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(path.read_text()) if m.group(1) == language]


def backmatch_commands(path: Path) -> list[list[str]]:
    """The argument lists of the ``backmatch`` commands (or ``-m backmatch_exact.cli`` ones) in ``path``'s bash
    blocks; lines with shell variables or ``...`` are left out (they are not complete commands)."""
    commands = []
    for block in blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if "backmatch_exact.cli" in words:
                    words = ["backmatch"] + words[words.index("backmatch_exact.cli") + 1:]
                if words[:1] == ["backmatch"] and not any("$" in w or "..." in w for w in words):
                    commands.append(words[1:])
    return commands


PYTHON_BLOCKS = blocks(ROOT / "README.md", "python")
COMMANDS = backmatch_commands(ROOT / "README.md") + backmatch_commands(ROOT / "validation" / "README.md")


def test_the_readme_has_code():
    assert len(PYTHON_BLOCKS) >= 5 and len(COMMANDS) >= 5


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))])
def test_python_block_runs(code):
    reason = next((why for phrase, why in CANNOT_RUN.items() if phrase in code), None)
    if reason:
        pytest.skip(reason)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a[:3]) for a in COMMANDS])
def test_backmatch_command_parses(argv):
    """The options exist and their values are valid (nothing runs)."""
    cli.build_parser().parse_args(argv)


def test_data_is_reachable_from_the_package():
    """``import backmatch_exact as bm; bm.data.load("default")`` in a fresh interpreter."""
    code = 'import backmatch_exact as bm; print(bm.data.load("default").num_classes)'
    result = subprocess.run([sys.executable, "-c", code], env=os.environ | {"PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "10", result.stderr
