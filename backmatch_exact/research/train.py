"""``backmatch train``: train LeNet-BN / VGG-BN with several optimizers on the same weights and batches.

Every configuration (optimizer x learning rate x damping x signal damping x signal rule x seed)
starts from the initial weights its seed gives and sees the batches (and
augmentations) its seed gives, so configurations with one seed differ only in
how they turn gradients into steps. Optimizers:

``sgd``            torch.optim.SGD on backprop gradients (weight decay in the optimizer)
``approx``         Algorithm 1: ``bm.attach(mode="approx", weight_decay=wd)`` + SGD(weight_decay=0)
``exact``          exact back-matching (``damping`` λ, ``signal_damping`` μ, ``signals`` per_unit or joint),
                   + SGD(weight_decay=0)
``exact_weights``  exact weight solves on backprop signals (``damping``), + SGD(weight_decay=0)
``lars``, ``lsalr``  ``bm.optim.LARS`` / ``LSALR`` on backprop gradients

Output folder:

``results.jsonl``   one strict-JSON line per configuration and finished epoch (flushed as it goes),
                    with the configuration's ``"status"`` after that epoch (below); a diverged
                    configuration gets a last line with ``"diverged": true``
``checkpoints/``    per configuration: model, optimizer, generator and RNG state, epoch —
                    what ``--resume`` continues from (to the same numbers as an uninterrupted run)
``args.json``       the options of the run
``summary.md``, ``curves.png``  the table (mean ± std over seeds) and the curves, rebuilt
                    from ``results.jsonl`` at the end (and when interrupted)

A configuration that diverges — a non-finite loss (or one above ``--max-loss``),
or the engine raising ``NonFiniteError`` / ``SolveError`` — is recorded with its
step and last finite loss, and the run goes on with the next configuration.

``"status"`` of a configuration: ``"diverged"`` as above; ``"unstable"`` when it
finished but its last epoch's mean training loss is above its *initial loss*, the
loss of its first training step (the first mini-batch, on the initial weights:
``"initial_loss"`` in every line); ``"done"`` otherwise. ``summary.md`` counts
them per configuration. An exact run with λ = μ = 0 is warned about at the start:
it usually ends unstable or diverged.

Several processes (``torchrun --nproc_per_node N -m backmatch_exact.cli train ...``):
the model is wrapped in ``DistributedDataParallel`` ("gloo" on CPU, "nccl" on
CUDA, one GPU per process) and the engine attached to it. ``--batch-size`` stays
the global batch: every rank draws the same batch (and augmentation) from the
same generator and trains on its 1/N share of it, so the batches, the learning
rates and the logged numbers mean what they mean in one process. A last batch
that does not split evenly loses its remainder (fewer than N examples). Rank 0
alone writes the folder; every rank starts a resumed configuration from rank 0's
checkpoint, which it receives from rank 0 (no shared file system needed). The
BatchNorm running statistics are rank 0's (DDP broadcasts them every forward
pass, and again before each evaluation). Test metrics are computed on each rank's
share of the test set and summed over the ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import backmatch_exact as bm

from .. import data, distributed
from ..joint import SIGNALS
from .common import (
    MODELS,
    OPTIMIZERS,
    CommandError,
    add_batch_size,
    add_options,
    build_model,
    created_folder,
    fraction,
    json_safe,
    load_data,
    make_optimizer,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_float_or_inf,
    positive_int,
    to_json,
    undamped_warning,
)

#: options that must not change when a run is resumed (they change what an epoch computes);
#: keep --threads too for bit-identical numbers
RESUME_KEYS = ("data", "model", "batch_size", "train_subset", "augment", "momentum", "nesterov", "weight_decay",
               "lr_decay", "decay_every", "dtype", "max_loss", "processes")


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run: optimizer, learning rate, dampings (exact modes only), seed, signal rule (exact only).

    The signal rule is part of the label and key only when it is not the default ``"per_unit"``, so the
    folders of earlier runs keep their keys.
    """

    optim: str
    lr: float
    damping: float = 0.0
    signal_damping: float = 0.0
    seed: int = 0
    signals: str = "per_unit"

    @property
    def label(self) -> str:
        """Human-readable name without the seed: runs with the same label are averaged."""
        text = f"{self.optim} lr={self.lr:g}"
        if self.optim in ("exact", "exact_weights"):
            text += f" λ={self.damping:g}"
        if self.optim == "exact":
            text += f" μ={self.signal_damping:g}"
        if self.signals != "per_unit":
            text += f" {self.signals}"
        return text

    @property
    def key(self) -> str:
        """File-name-safe unique name, seed included."""
        text = f"{self.optim}_lr{self.lr:g}"
        if self.optim in ("exact", "exact_weights"):
            text += f"_d{self.damping:g}"
        if self.optim == "exact":
            text += f"_sd{self.signal_damping:g}"
        if self.signals != "per_unit":
            text += f"_{self.signals}"
        return f"{text}_seed{self.seed}"


def expand_configs(optims, lrs, dampings=(0.0,), signal_dampings=(0.0,), seeds=(0,), signals=("per_unit",)
                   ) -> list[Config]:
    """All configurations of the sweep: damping only varies for exact modes, signal damping and the signal
    rule only for exact."""
    configs = []
    for optim in optims:
        if optim not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optim!r}; choose from {OPTIMIZERS}")
        for lr in lrs:
            for damping in (dampings if optim in ("exact", "exact_weights") else [0.0]):
                for signal_damping in (signal_dampings if optim == "exact" else [0.0]):
                    for rule in (signals if optim == "exact" else ["per_unit"]):
                        for seed in seeds:
                            configs.append(Config(optim, float(lr), float(damping), float(signal_damping), int(seed),
                                                  rule))
    return list(dict.fromkeys(configs))


def lr_at(epoch: int, lr: float, decay: float, every: int) -> float:
    """Step schedule: ``lr · decay^⌊epoch / every⌋`` (epoch counted from 0)."""
    return lr * decay ** (epoch // every) if every > 0 else lr


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in a ``torchrun`` job (``size == 1``: a single process, no ``torch.distributed``)."""

    rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one that reads and writes the output folder."""
        return self.rank == 0

    def shard(self, items: torch.Tensor, equal: bool = True) -> torch.Tensor:
        """This rank's contiguous share of ``items``.

        ``equal``: every share the same size, a remainder of fewer than ``size`` items dropped (training
        batches); otherwise every item in exactly one share, sizes differing by at most one (evaluation).
        """
        if self.size == 1:
            return items
        n = len(items) // self.size * self.size if equal else len(items)
        return items[n * self.rank // self.size:n * (self.rank + 1) // self.size]

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks (float64, on the process group's device)."""
        if self.size == 1:
            return values
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        total = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.tolist()

    def align_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics)."""
        if self.size > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def from_leader(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def join_process_group(device: str) -> tuple[Ranks, torch.device]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1) join the default process group; return ``(ranks, device)``.

    CUDA: "nccl" with one GPU per process (``cuda:LOCAL_RANK``); otherwise "gloo".
    A single process returns ``(Ranks(), torch.device(device))`` and initializes nothing.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return Ranks(), torch.device(device)
    if torch.device(device).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Ranks(dist.get_rank(), dist.get_world_size()), torch.device(device)


class Diverged(Exception):
    """A configuration stopped: non-finite loss or a non-finite back-matching solve."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict]:
    """The lines of a ``results.jsonl`` (an unfinished last line is ignored)."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines


def _append_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(to_json(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _checkpoint_path(out: Path, config: Config) -> Path:
    return out / "checkpoints" / f"{config.key}.pt"


def _load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def _prune_results(out: Path) -> None:
    """Keep only result lines that a checkpoint backs (an epoch logged but not checkpointed is redone)."""
    path = out / "results.jsonl"
    kept, checkpoints = [], {}
    for line in read_results(path):
        key = line["config"]
        if key not in checkpoints:
            ckpt_path = out / "checkpoints" / f"{key}.pt"
            checkpoints[key] = (torch.load(ckpt_path, map_location="cpu", weights_only=False)
                                if ckpt_path.exists() else None)
        ckpt = checkpoints[key]
        if ckpt is None:
            continue
        if line.get("diverged") and ckpt["status"] != "diverged":
            continue
        if line["epoch"] <= ckpt["epoch"] or (line.get("diverged") and ckpt["status"] == "diverged"):
            kept.append(line)
    tmp = path.with_name("results.jsonl.tmp")
    tmp.write_text("".join(to_json(line) + "\n" for line in kept))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Training one configuration
# --------------------------------------------------------------------------------------------------


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             ranks: Ranks = Ranks()) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode on ``(x, y)``.

    With several ranks each evaluates its share of ``(x, y)`` (every example is
    counted once: the shares here keep the remainder) and the sums are added up.
    """
    x, y = ranks.shard(x, equal=False), ranks.shard(y, equal=False)
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            logits = model(x[start:start + batch_size])
            total_loss += float(F.cross_entropy(logits, y[start:start + batch_size], reduction="sum"))
            correct += int((logits.argmax(1) == y[start:start + batch_size]).sum())
    model.train()
    total_loss, correct, count = ranks.sum([total_loss, correct, len(y)])
    return total_loss / count, correct / count


def train_config(config: Config, tensors: dict, args: argparse.Namespace, out: Path, progress=None,
                 ranks: Ranks = Ranks()) -> str:
    """Train one configuration for ``args.epochs`` epochs (continuing its checkpoint if there is one).

    ``tensors``: ``x_train, y_train, x_test, y_test`` on the device, plus
    ``in_channels`` and ``num_classes``. Appends one line per epoch to
    ``out/results.jsonl`` and checkpoints after each (rank 0 only). Returns the
    configuration's status: ``"done"``, ``"unstable"`` or ``"diverged"`` (module
    docstring). A KeyboardInterrupt loses only the epoch in progress.
    """
    ckpt_path = _checkpoint_path(out, config)
    ckpt = ranks.from_leader(_load_checkpoint(ckpt_path) if ranks.leader else None)
    if ckpt is not None and progress is not None:
        progress.update(args.epochs if ckpt["status"] == "diverged" else min(ckpt["epoch"], args.epochs))
    if ckpt is not None and ckpt["status"] == "diverged":
        return "diverged"
    device = tensors["x_train"].device
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(config.seed)
    model = build_model(args.model, tensors["in_channels"], tensors["num_classes"]).to(device, dtype)
    net = model if ranks.size == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    optimizer, engine = make_optimizer(config.optim, net, config.lr, args.momentum, args.nesterov,
                                       args.weight_decay, config.damping, config.signal_damping, config.signals)
    generator = torch.Generator().manual_seed(config.seed)
    epoch, step, wall, last_loss, initial_loss, status = 0, 0, 0.0, None, None, "done"
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        epoch, step, wall, last_loss = ckpt["epoch"], ckpt["step"], ckpt["wall_time_s"], ckpt["last_loss"]
        initial_loss = ckpt.get("initial_loss")
    base = dataclasses.asdict(config) | {"config": config.key, "label": config.label}
    x_train, y_train = tensors["x_train"], tensors["y_train"]
    n = len(y_train)
    try:
        while epoch < args.epochs:
            lr_now = lr_at(epoch, config.lr, args.lr_decay, args.decay_every)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            tick = time.perf_counter()
            loss_sum, correct, seen, max_loss = 0.0, 0, 0, -math.inf
            model.train()
            batches = data.batches(n, args.batch_size, generator)
            inner = tqdm(batches, total=math.ceil(n / args.batch_size), leave=False,
                         disable=args.no_progress or not ranks.leader, desc=f"{config.key} epoch {epoch + 1}")
            for idx in inner:
                idx = idx.to(device)
                x = x_train[idx]
                if args.augment:
                    x = data.augment(x, generator)
                x, y = ranks.shard(x), ranks.shard(y_train[idx])
                if len(y) == 0:  # a last batch smaller than the number of ranks
                    continue
                step += 1
                try:
                    optimizer.zero_grad(set_to_none=True)
                    logits = net(x)
                    loss = F.cross_entropy(logits, y)
                    # backward before the loss is read: the engine names a NaN input with its one read-back
                    # at the end of backward, and the read waits for the queued work only once
                    loss.backward()
                    local = loss.item()
                    value = ranks.sum([local])[0] / ranks.size  # the global batch's loss
                    if not math.isfinite(value):
                        raise Diverged(step, f"non-finite loss {value}")
                    if value > args.max_loss:
                        raise Diverged(step, f"loss {value:.4g} above --max-loss {args.max_loss:g}")
                except (bm.NonFiniteError, bm.SolveError) as err:
                    raise Diverged(step, f"{type(err).__name__}: {err}") from None
                optimizer.step()
                last_loss = value
                if step == 1:
                    initial_loss = value
                max_loss = max(max_loss, value)
                loss_sum += local * len(y)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
            loss_sum, correct, seen = ranks.sum([loss_sum, correct, seen])
            ranks.align_buffers(model)
            test_loss, test_acc = evaluate(model, tensors["x_test"], tensors["y_test"], ranks=ranks)
            if not math.isfinite(test_loss):  # the epoch's last update made the weights non-finite
                raise Diverged(step, f"non-finite test loss {test_loss} after the last step of the epoch")
            epoch += 1
            epoch_time = time.perf_counter() - tick
            wall += epoch_time
            status = "unstable" if initial_loss is not None and loss_sum / seen > initial_loss else "done"
            record = base | {"epoch": epoch, "step": step, "lr_now": lr_now, "train_loss": loss_sum / seen,
                             "initial_loss": initial_loss, "max_train_loss": max_loss, "train_acc": correct / seen,
                             "test_loss": test_loss, "test_acc": test_acc, "epoch_time_s": epoch_time,
                             "wall_time_s": wall, "status": status, "diverged": False}
            if ranks.leader:
                _append_line(out / "results.jsonl", record)
                _atomic_save({"config": dataclasses.asdict(config), "status": "running", "epoch": epoch,
                              "step": step, "wall_time_s": wall, "last_loss": last_loss,
                              "initial_loss": initial_loss, "model": model.state_dict(),
                              "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                              "torch_rng": torch.get_rng_state(),
                              "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                             ckpt_path)
            if progress is not None:
                progress.update(1)
                progress.write(f"{config.label} seed {config.seed} epoch {epoch}: train loss "
                               f"{record['train_loss']:.4f}, test acc {test_acc:.4f} ({epoch_time:.1f} s)"
                               + (f"; UNSTABLE: above the initial loss {initial_loss:.4f}"
                                  if status == "unstable" else ""))
        return status
    except Diverged as err:
        wall += time.perf_counter() - tick
        record = base | {"epoch": epoch + 1, "step": err.step, "status": "diverged", "diverged": True,
                         "reason": err.reason, "last_finite_loss": last_loss, "initial_loss": initial_loss,
                         "wall_time_s": wall}
        if ranks.leader:
            _append_line(out / "results.jsonl", record)
            _atomic_save({"config": dataclasses.asdict(config), "status": "diverged", "epoch": epoch,
                          "step": err.step, "wall_time_s": wall, "last_loss": last_loss, "reason": err.reason},
                         ckpt_path)
        if progress is not None:
            progress.update(args.epochs - epoch)
            progress.write(f"{config.label} seed {config.seed} DIVERGED at step {err.step} (epoch {epoch + 1}): "
                           f"{err.reason[:120]}; last finite loss {last_loss}")
        return "diverged"
    finally:
        if engine is not None:
            engine.detach()


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def group_results(results: list[dict]) -> dict[str, dict[int, list[dict]]]:
    """``{label: {seed: [lines in epoch order]}}``, labels in order of first appearance."""
    groups: dict[str, dict[int, list[dict]]] = {}
    for line in results:
        groups.setdefault(line["label"], {}).setdefault(line["seed"], []).append(line)
    for seeds in groups.values():
        for lines in seeds.values():
            lines.sort(key=lambda l: (l["epoch"], l.get("diverged", False)))
    return groups


def status_of(line: dict) -> str:
    """A ``results.jsonl`` line's status (lines written before there was one: from ``"diverged"``)."""
    return line.get("status") or ("diverged" if line.get("diverged") else "done")


def _status_cell(seeds: dict[int, list[dict]]) -> str:
    """How the seeds of one configuration ended: ``done 3/3``, or the unstable and diverged ones, bold."""
    ended = {seed: runs[-1] for seed, runs in sorted(seeds.items())}
    parts = []
    for status in ("diverged", "unstable"):
        details = []
        for seed, line in ended.items():
            if status_of(line) != status:
                continue
            if status == "diverged":
                loss = line.get("last_finite_loss")
                details.append(f"seed {seed}: epoch {line['epoch']}, step {line['step']}, last loss "
                               + (f"{loss:.3g}" if loss is not None else "none"))
            else:
                details.append(f"seed {seed}: train loss {line['train_loss']:.3g} > initial "
                               f"{line['initial_loss']:.3g}")
        if details:
            parts.append(f"**{status} {len(details)}/{len(ended)}** ({'; '.join(details)})")
    done = sum(status_of(line) == "done" for line in ended.values())
    return "; ".join(parts + ([f"done {done}/{len(ended)}"] if done else []))


def summary_table(results: list[dict]) -> str:
    """Markdown table: per label, mean ± std over seeds of final and best test accuracy (%), how the seeds ended."""
    header = ["config", "seeds", "epochs", "final test acc %", "best test acc %", "final train loss",
              "peak step loss", "s / epoch", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, seeds in group_results(results).items():
        finals, bests, losses, peaks, times, epochs = [], [], [], [], [], []
        for runs in seeds.values():
            done = [r for r in runs if not r.get("diverged")]
            if done and not runs[-1].get("diverged"):
                finals.append(done[-1]["test_acc"])
                losses.append(done[-1]["train_loss"])
            if done:
                bests.append(max(r["test_acc"] for r in done))
                peaks += [r["max_train_loss"] for r in done if "max_train_loss" in r]
                times += [r["epoch_time_s"] for r in done]
                epochs.append(done[-1]["epoch"])
        cells = [label, str(len(seeds)), "/".join(str(e) for e in sorted(set(epochs))) or "0",
                 _mean_std(finals) if finals else "diverged",
                 _mean_std(bests), f"{sum(losses) / len(losses):.4f}" if losses else "–",
                 f"{max(peaks):.3g}" if peaks else "–",
                 f"{sum(times) / len(times):.1f}" if times else "–",
                 _status_cell(seeds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(out: Path) -> str:
    """Rebuild ``summary.md`` and ``curves.png`` from ``out/results.jsonl``; return the markdown."""
    out = Path(out)
    results = read_results(out / "results.jsonl")
    args = json.loads((out / "args.json").read_text()) if (out / "args.json").exists() else {}
    text = ["# Training comparison", ""]
    if args:
        text += [f"Model {args.get('model')} on {args.get('data')}"
                 + (f" (first {args['train_subset']} training images)" if args.get("train_subset") else "")
                 + f", batch {args.get('batch_size')}, momentum {args.get('momentum')}"
                 + (" (Nesterov)" if args.get("nesterov") else "")
                 + f", weight decay {args.get('weight_decay')}, lr × {args.get('lr_decay')} every "
                 f"{args.get('decay_every')} epochs" + (", augmented" if args.get("augment") else "") + ".", ""]
    text += ["Mean ± std over seeds; final accuracy over the seeds that did not diverge. Accuracies on the test set; "
             "peak step loss: the largest mini-batch loss of any seed in any finished epoch. Status: diverged = "
             "a non-finite loss or solve; unstable = finished, but the last epoch's mean training loss is above "
             "the loss of the first training step.",
             "", summary_table(results), ""]
    if results:
        from .figures import training_curves  # (matplotlib is loaded when the figure is drawn)

        training_curves(group_results(results), out / "curves.png")
        text += ["![training curves](curves.png)", ""]
    markdown = "\n".join(text)
    (out / "summary.md").write_text(markdown)
    return markdown


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``backmatch train`` options."""
    parser.add_argument("--optim", nargs="+", default=["sgd"], choices=OPTIMIZERS, metavar="OPTIM",
                        help=f"optimizers (swept): {', '.join(OPTIMIZERS)}")
    parser.add_argument("--lr", nargs="+", type=positive_float, default=[0.05], help="learning rates (swept)")
    parser.add_argument("--momentum", type=fraction, default=0.9, help="momentum of every optimizer")
    parser.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="weight decay")
    parser.add_argument("--damping", nargs="+", type=non_negative_float, default=[0.0],
                        help="λ of exact / exact_weights, relative to mean diag G (swept)")
    parser.add_argument("--signal-damping", nargs="+", type=non_negative_float, default=[0.0],
                        help="μ of exact, relative to the mean signal denominator (swept)")
    parser.add_argument("--signals", nargs="+", default=["per_unit"], choices=SIGNALS,
                        help="input signal rule of exact (swept): per_unit (the paper's eq. 11) or joint (co-updated)")
    parser.add_argument("--epochs", type=positive_int, default=10, help="epochs per configuration")
    parser.add_argument("--lr-decay", type=positive_float, default=0.2, help="multiply the lr by this ...")
    parser.add_argument("--decay-every", type=positive_int, default=60, help="... every this many epochs")
    parser.add_argument("--augment", action="store_true", help="random flips and rotations (data.augment)")
    parser.add_argument("--seeds", nargs="+", type=non_negative_int, default=[0],
                        help="seeds (swept): initial weights, batch order, augmentation")
    parser.add_argument("--max-loss", type=positive_float_or_inf, default=math.inf,
                        help="count a training loss above this as divergence too (inf: only non-finite)")
    parser.add_argument("--model", default="lenet", choices=MODELS, help="network: LeNet-BN, VGG-BN or a CIFAR ResNet")
    add_options(parser, "--data")
    add_batch_size(parser, "training batch size (under torchrun: the global batch)")
    parser.add_argument("--train-subset", type=non_negative_int, default=0,
                        help="train on the first N training examples (0: all)")
    add_options(parser, "--dtype", "--device", "--threads")
    parser.add_argument("--out", default="train_out", help="output folder")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its checkpoints (a new --out starts fresh)")
    again.add_argument("--overwrite", action="store_true", help="start over, deleting the results in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _settings(args: argparse.Namespace) -> dict:
    """The options a resumed run must share with the run it continues, as ``args.json`` stores them."""
    return json_safe({k: getattr(args, k) for k in RESUME_KEYS})


def _check_folder(out: Path, args: argparse.Namespace) -> None:
    """Refuse an ``--out`` this run must not write into, before anything is written (:class:`CommandError`)."""
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file, not a folder")
    has_results = (out / "results.jsonl").exists() or any((out / "checkpoints").glob("*"))
    if args.resume and (out / "args.json").exists():
        old = json.loads((out / "args.json").read_text())
        changed = {k: (old.get(k), v) for k, v in _settings(args).items() if json_safe(old.get(k)) != v}
        if changed:
            raise CommandError(f"--resume with different options than the run in {out}: "
                               + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in changed.items()))
    elif has_results and not args.resume and not args.overwrite:
        raise CommandError(f"--out {out} already holds results: pass --resume to continue or --overwrite to "
                           "start over")


def _prepare_folder(out: Path, args: argparse.Namespace) -> None:
    """Make the output folder ready (:func:`_check_folder` has passed): on ``--resume`` prune the result lines no
    checkpoint backs, on ``--overwrite`` delete the old results; write ``args.json``."""
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if args.resume:
        _prune_results(out)
    elif args.overwrite:
        (out / "results.jsonl").unlink(missing_ok=True)
        for f in (out / "checkpoints").iterdir():
            f.unlink()
    record = {k: v for k, v in vars(args).items() if k not in ("run", "command")}
    (out / "args.json").write_text(to_json(record, indent=1))


def main(args: argparse.Namespace) -> int:
    """Entry point of ``backmatch train``; returns the exit status (130 when interrupted)."""
    ranks, device = join_process_group(args.device)
    status = None
    try:
        status = _run(args, ranks, device)
        return status
    finally:
        if ranks.size > 1:  # barrier only after a clean run: after Ctrl-C or an error the other ranks may be gone
            distributed.close_process_group(clean=status == 0)


def _run(args: argparse.Namespace, ranks: Ranks, device: torch.device) -> int:
    """``main`` once the process group (if any) is joined.

    Everything that can refuse the run (options, ``--out``, the data) is checked before the
    output folder is touched; a new folder is removed again when the run fails or is
    interrupted before its first result line.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size % ranks.size:
        raise CommandError(f"--batch-size {args.batch_size} is the global batch: it must be divisible by the "
                           f"{ranks.size} processes")
    args.processes = ranks.size
    out = Path(args.out)
    configs = expand_configs(args.optim, args.lr, args.damping, args.signal_damping, args.seeds, args.signals)
    problem = None
    if ranks.leader:
        try:
            _check_folder(out, args)
        except CommandError as err:
            problem = str(err)
    problem = ranks.from_leader(problem)
    if problem:
        raise CommandError(problem)
    dataset = load_data(args.data)
    undamped = [c.label for c in configs if c.optim == "exact" and c.damping == 0 and c.signal_damping == 0]
    if undamped and ranks.leader:
        print(undamped_warning("train", list(dict.fromkeys(undamped))), file=sys.stderr)
    dtype = getattr(torch, args.dtype)
    subset = slice(0, args.train_subset or None)
    tensors = {"x_train": dataset.x_train[subset].to(device, dtype), "y_train": dataset.y_train[subset].to(device),
               "x_test": dataset.x_test.to(device, dtype), "y_test": dataset.y_test.to(device),
               "in_channels": dataset.in_channels, "num_classes": dataset.num_classes}
    has_results = lambda: bool(read_results(out / "results.jsonl"))  # noqa: E731
    if not ranks.leader:
        return _train_all(configs, tensors, args, out, ranks, has_results)
    with created_folder(out, keep=has_results):
        _prepare_folder(out, args)
        return _train_all(configs, tensors, args, out, ranks, has_results)


def _train_all(configs: list[Config], tensors: dict, args: argparse.Namespace, out: Path, ranks: Ranks,
               has_results) -> int:
    """Train every configuration in turn; write the summary. 0, or 130 after Ctrl-C (with results kept)."""
    progress = tqdm(total=len(configs) * args.epochs, desc="train", unit="epoch",
                    disable=args.no_progress) if ranks.leader else None
    status = 0
    try:
        for config in configs:
            train_config(config, tensors, args, out, progress, ranks)
    except KeyboardInterrupt:
        if not has_results():
            raise  # nothing finished: the folder goes if this run made it
        if progress is not None:
            progress.write(f"interrupted: finished epochs are in {out}/results.jsonl; rerun with --resume to continue")
        status = 130
    finally:
        if progress is not None:
            progress.close()
    if ranks.leader:
        print(summarize(out))
    return status
