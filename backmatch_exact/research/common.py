"""What the research commands share: the models and optimizers they can train, and how to build them;
their command-line plumbing (option types, one-line errors), strict JSON and output folders.

A value the user can fix — a bad option, a missing data folder, an output folder
that already holds results — is reported as one line, ``backmatch <command>: error:
<message>``, with exit status 2 and no traceback: option values through the
argparse types below (:class:`Parser` prints argparse's errors that way), later
checks as :class:`CommandError`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import math
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import torch
from torch import nn

import backmatch_exact as bm

from .. import data

OPTIMIZERS = ("sgd", "approx", "exact", "exact_weights", "lars", "lsalr")
ENGINE_MODES = ("approx", "exact", "exact_weights")
MODELS = ("lenet", "vgg11", "vgg13", "vgg16", "vgg19", "resnet20", "resnet32", "resnet44", "resnet56")


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """``"lenet"`` → LeNet-BN, ``"vgg11"`` … ``"vgg19"`` → VGG-BN, ``"resnet20"`` … → the CIFAR ResNet of that depth."""
    if name == "lenet":
        return bm.models.lenet_bn(in_channels, num_classes)
    if name.startswith("vgg") and name[3:].isdigit():
        return bm.models.vgg_bn(int(name[3:]), in_channels, num_classes)
    if name.startswith("resnet") and name[6:].isdigit():
        return bm.models.resnet(int(name[6:]), in_channels, num_classes)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def make_optimizer(name: str, model: nn.Module, lr: float, momentum: float = 0.0, nesterov: bool = False,
                   weight_decay: float = 0.0, damping: float = 0.0, signal_damping: float = 0.0,
                   signals: str = "per_unit"):
    """The optimizer ``name`` for ``model``, and the back-matching engine it needs (None for sgd/lars/lsalr).

    ``signals``: the input signal rule of ``exact`` (``"per_unit"`` or ``"joint"``).

    Engine modes get the weight decay through ``attach`` and an SGD with
    ``weight_decay=0``; the others keep it in the optimizer. Detach the engine
    (``engine.detach()``) when done with the model.
    """
    params = model.parameters()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay), None
    if name in ("lars", "lsalr"):
        cls = bm.optim.LARS if name == "lars" else bm.optim.LSALR
        return cls(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay), None
    if name in ENGINE_MODES:
        engine = bm.attach(model, mode=name, damping=damping, signal_damping=signal_damping,
                           weight_decay=weight_decay, signals=signals)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0), engine
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


# --------------------------------------------------------------------------------------------------
# Command line: errors, option types, the parser
# --------------------------------------------------------------------------------------------------


class CommandError(Exception):
    """A failure the user can act on: printed as one line ``backmatch <command>: error: <message>``.

    ``status`` is the exit status: 2 for a bad option or input (argparse's), 1 for a run that failed.
    """

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def one_line(message: object) -> str:
    """``message`` with its line breaks and indentation collapsed into single spaces."""
    return " ".join(str(message).split())


def _bounded(kind: type, low: float, *, low_open: bool = False, high: float | None = None,
             infinite: bool = False):
    """An argparse type: ``kind(text)`` if it lies in ``[low, high)`` (``(low, …`` when ``low_open``), else an
    ``ArgumentTypeError`` naming the range. NaN is never allowed, infinity only when ``infinite``."""
    noun = "an integer" if kind is int else "a number" if infinite else "a finite number"
    if high is None:
        where = f"{'>' if low_open else '>='} {low:g}" + (" (inf allowed)" if infinite else "")
    else:
        where = f"in {'(' if low_open else '['}{low:g}, {high:g})"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        inside = (low < value if low_open else low <= value) and (high is None or value < high)
        if not inside or (math.isinf(value) and not infinite):
            raise argparse.ArgumentTypeError(f"must be {noun} {where}, got {text}")
        return value

    return parse


positive_int = _bounded(int, 1)
non_negative_int = _bounded(int, 0)
positive_float = _bounded(float, 0, low_open=True)
non_negative_float = _bounded(float, 0)
positive_float_or_inf = _bounded(float, 0, low_open=True, infinite=True)
fraction = _bounded(float, 0, high=1)  # [0, 1): momentum


def device(text: str) -> str:
    """``--device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when there is one); one this machine lacks
    is an error before anything runs."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(text)
    except (RuntimeError, ValueError):
        kind = None
    if kind is None or kind.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda, cuda:N or auto, got {text}")
    count = torch.cuda.device_count() if kind.type == "cuda" and torch.cuda.is_available() else 0
    if kind.type == "cuda" and count <= (kind.index or 0):
        raise argparse.ArgumentTypeError(f"must be a device this machine has, got {text} "
                                         f"(torch {torch.__version__} sees {count} CUDA devices; use cpu)")
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with every option's default after its help line (none for flags and unset options)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or default is None or default is False or default == argparse.SUPPRESS \
                or "%(default)" in text:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """argparse with :class:`HelpFormatter`, and its errors as one line ``<prog>: error: --opt must be …``
    (exit status 2; no usage lines: ``--help`` has them). Subcommand parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        message = re.sub(r"\bargument (-[\w-]+)", r"\1", message)  # "argument --lr: must be" → "--lr must be"
        message = re.sub(r"^(-[\w-]+): must ", r"\1 must ", message)
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


#: options several commands take, with one spelling, type and help line each (:func:`add_options`)
SHARED_OPTIONS = {
    "--data": dict(default="default", help="'default' (the shipped Fashion-MNIST subset), a folder of IDX or CIFAR "
                   "files, or 'cifar10:PATH', 'mnist:PATH' and the like (backmatch_exact.data.load)"),
    "--device": dict(type=device, default="cpu", help="cpu, cuda, cuda:N, or auto (cuda when there is one)"),
    "--dtype": dict(default="float32", choices=["float32", "float64"], help="dtype of the model and the data"),
    "--threads": dict(type=non_negative_int, default=0,
                      help="torch CPU threads (0: torch's default; 1 is faster when other jobs share the cores)"),
    "--seed": dict(type=non_negative_int, default=0, help="random seed (initial weights, batches)"),
}


def add_options(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add the :data:`SHARED_OPTIONS` ``names`` to ``parser``."""
    for name in names:
        parser.add_argument(name, **SHARED_OPTIONS[name])


def add_batch_size(parser: argparse.ArgumentParser, help: str, default: int = 128) -> None:
    """``--batch-size`` (and ``--batch``, its old spelling in check and bench, kept hidden)."""
    parser.add_argument("--batch-size", type=positive_int, default=default, help=help)
    parser.add_argument("--batch", type=positive_int, dest="batch_size", help=argparse.SUPPRESS)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run ``args.run(args)``; a :class:`CommandError` or Ctrl-C becomes one line on stderr.

    Returns the exit status: the command's, the error's, or 130 after Ctrl-C.
    """
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}" if getattr(args, "command", None) else parser.prog
    try:
        return args.run(args)
    except CommandError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def load_data(spec: str) -> data.Dataset:
    """``data.load(spec)``; a missing or malformed dataset is a :class:`CommandError` naming ``--data``."""
    try:
        return data.load(spec)
    except (data.DataFormatError, data.MissingFilesError, data.UnsafePickleError) as err:
        raise CommandError(f"--data {spec}: {err}") from None


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (AttributeError, OSError):
        return None


def return_freed_memory() -> None:
    """Hand the heap memory freed so far back to the operating system, where the C library can (glibc's
    ``malloc_trim``; elsewhere nothing happens).

    A command that runs many engine passes one after another (``compare``: twenty per checkpoint) otherwise
    keeps the high-water mark of every pass's temporaries, fragmented around what stays alive: the quick
    start's ``compare`` peaked at 0.58–0.64 GB without it and 0.57–0.61 GB with it (four runs each), for
    about 1 s of its 18. Called between groups of passes, not after each one: a pass then takes its pages
    from the system again (after every pass: +35 % time).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def undamped_warning(command: str, configs: list[str]) -> str:
    """The line that warns, before an undamped exact run, that it usually fails (and what helps)."""
    return (f"backmatch {command}: warning: {', '.join(configs)}: exact back-matching without damping "
            "(λ = μ = 0) usually diverges or ends above its initial loss; --damping 1 --signal-damping 1 "
            "is the usual remedy")


# --------------------------------------------------------------------------------------------------
# Strict JSON and output folders
# --------------------------------------------------------------------------------------------------


def json_safe(value):
    """``value`` with every NaN or infinity replaced by None (recursively), so it is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(value, **kwargs) -> str:
    """Strict JSON text of ``value`` (NaN and infinities as null, never as the ``NaN`` literal)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def check_new_folder(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, or a folder that already holds files unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CommandError(f"--out {out} already holds files: pass --overwrite to replace the results in it, "
                           "or choose another folder")


@contextlib.contextmanager
def created_folder(path: Path, keep=lambda: False):
    """Create ``path`` and its missing parents; if the block raises and ``keep()`` is false, remove them again.

    Only folders this call created are removed (the outermost, with all it holds), so a run that fails
    before it has anything to keep leaves no empty folder behind.
    """
    path = Path(os.path.abspath(path))
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created and not keep():
            shutil.rmtree(created[-1], ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_folder(out: Path):
    """A fresh hidden folder next to ``out`` to write the results into; when the block ends normally they move
    into ``out`` (one rename when ``out`` is new or empty, else file by file), otherwise they are deleted.

    So ``out`` holds either its old files or the complete new set, never a half-written one.
    """
    out = Path(os.path.abspath(out))
    with created_folder(out.parent):
        stage = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
        stage.mkdir()
        try:
            yield stage
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            if not out.exists():
                os.replace(stage, out)
            else:
                for item in stage.iterdir():
                    os.replace(item, out / item.name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
