"""``backmatch bench``: what one training step costs in each engine mode, measured side by side.

Every mode gets its own copy of the same model (same initial weights), its own
``torch.optim.SGD`` and the same synthetic batch. A step is
``zero_grad → forward → cross-entropy → backward → optimizer.step()``. The modes
run interleaved, one step each per round and in a rotating order, so that a
slow spell of a shared machine hits every mode alike; the weights are restored
before every step (outside the timed region), so every step of a mode does the
same work. After the warm-up rounds the median over ``--steps`` rounds is
reported, with the ratios against plain backprop (no engine attached) and
against the engine's ``bp`` mode, and the median over the rounds of each round's
own ratio to plain backprop (``paired``: a drift of the machine's speed between
rounds cancels in it, so it is the steadier of the two on a shared machine). On CUDA each step is bracketed by
``torch.cuda.synchronize()`` and the peak memory of each mode's step is recorded
(``max_memory_allocated`` during the step minus what was allocated when it began:
the step's own activations, gradients and temporaries, not the other modes' model
copies); TF32 is switched off so that float32 means float32.

Then a few more exact steps run with the engine's timing on (``engine.timing``,
synchronized spans, so they are slower than the timed ones): the per-layer
breakdown of what the exact step adds — Gram formation, factorization, solve,
column norms, signal rescaling — in milliseconds per step; the same for the
joint exact step (mode ``exact_joint``: ``signals="joint"``, whose signal solve
shows as ``signal_gram`` and ``signal``) when it runs. ``exact_joint`` is not in
the default set of modes: name it in ``--modes``. ``--signal-damping`` sets μ of
both exact modes (VGG's square convolutions need some for the iterative joint
solve to converge).

    backmatch bench --model lenet --batch-size 128 --threads 2 --out validation/results/bench_cpu_lenet.json
    backmatch bench --model lenet --batch-size 128 --modes bp exact exact_joint
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import backmatch_exact as bm

from .. import data
from .common import (
    MODELS,
    Parser,
    add_batch_size,
    add_options,
    build_model,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_command,
    to_json,
)

MODES = ("plain", "bp", "approx", "exact", "exact_weights", "exact_joint")
DEFAULT_MODES = MODES[:-1]
SOLVE_DTYPES = ("", "float32", "float64")  # after "@" in a mode name: attach(solve_dtype=...)
PARTS = ("gram", "weight_grad", "factor", "solve", "dual", "input_signal", "signal_gram", "signal")
#: the modes whose steps get a per-layer breakdown, and the suffix of their report keys
PROFILED = {"exact": "", "exact_joint": "_exact_joint"}


def _sync(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


class _Runner:
    """One mode: its model copy, engine, optimizer and the saved initial state."""

    def __init__(self, mode: str, base: torch.nn.Module, lr: float, signal_damping: float = 0.0):
        self.mode = mode
        self.model = copy.deepcopy(base)
        engine_mode, _, solve_dtype = mode.partition("@")  # "exact@float64": exact with float64 solves
        options = dict(solve_dtype=getattr(torch, solve_dtype, None))
        if engine_mode == "exact_joint":
            engine_mode, options = "exact", dict(options, signals="joint")
        if engine_mode == "exact":
            options["signal_damping"] = signal_damping
        self.engine = None if mode == "plain" else bm.attach(self.model, mode=engine_mode, **options)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self) -> None:
        with torch.no_grad():
            for key, value in self.model.state_dict().items():
                value.copy_(self.initial[key])

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.optimizer.step()


def run(model: str = "lenet", batch: int = 128, device: str = "cpu", dtype: str = "float32", steps: int = 20,
        warmup: int = 3, threads: int | None = None, modes=DEFAULT_MODES, lr: float = 0.01, profile_steps: int = 3,
        seed: int = 0, clock: str = "wall", data_spec: str = "synthetic", signal_damping: float = 0.0) -> dict:
    """Time the modes; return the JSON-ready report (see the module docstring).

    ``clock``: ``"wall"`` (``time.perf_counter``, the default and the only one on CUDA) or
    ``"cpu"`` (``time.process_time``: CPU seconds of every thread of this process, which a
    shared machine's other jobs barely disturb; with ``threads=1`` the cleanest comparison).
    ``data_spec``: ``"synthetic"`` (a Gaussian CIFAR-shaped batch) or a ``data.load`` spec, whose first
    ``batch`` training images are used (real images make some Grams worse conditioned than noise does).
    """
    previous = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(model, batch, device, dtype, steps, warmup, modes, lr, profile_steps, seed, clock, data_spec,
                    signal_damping)
    finally:
        torch.set_num_threads(previous[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous[1:]


def _run(model, batch, device, dtype, steps, warmup, modes, lr, profile_steps, seed, clock, data_spec,
         signal_damping) -> dict:
    dev = torch.device(device)
    timer = time.process_time if clock == "cpu" and dev.type != "cuda" else time.perf_counter
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    if data_spec == "synthetic":
        base = build_model(model, 3, 10)  # CIFAR shapes: the batch is 3 x 32 x 32
        gen = torch.Generator().manual_seed(seed + 1)
        x, y = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    else:
        dataset = data.load(data_spec)
        base = build_model(model, dataset.in_channels, dataset.num_classes)
        x, y = dataset.x_train[:batch], dataset.y_train[:batch]
    base = base.to(dev, torch_dtype).train()
    x, y = x.to(dev, torch_dtype), y.to(dev)
    runners = [_Runner(mode, base, lr, signal_damping) for mode in modes]
    sync = _sync(dev)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    peaks: dict[str, int] = {mode: 0 for mode in modes}

    for round_ in range(warmup + steps):
        shift = round_ % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            runner.restore()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                before = torch.cuda.memory_allocated(dev)
            start = timer()
            runner.step(x, y)
            if sync is not None:
                sync()
            elapsed = timer() - start
            if round_ >= warmup:
                times[runner.mode].append(elapsed)
                if dev.type == "cuda":  # what the step itself allocates at its peak, over what was there
                    peaks[runner.mode] = max(peaks[runner.mode], torch.cuda.max_memory_allocated(dev) - before)

    medians = {mode: statistics.median(t) for mode, t in times.items()}
    report = {
        "config": {"model": model, "batch": batch, "data": data_spec, "device": str(dev), "dtype": dtype,
                   "steps": steps,
                   "warmup": warmup, "threads": torch.get_num_threads(), "lr": lr, "seed": seed,
                   "signal_damping": signal_damping,
                   "clock": "cpu (process_time)" if timer is time.process_time else "wall (perf_counter)",
                   "torch": torch.__version__, "python": platform.python_version(),
                   "machine": platform.machine(), "cpus": os.cpu_count(),
                   "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
                   "tf32": False if dev.type == "cuda" else None},
        "modes": {},
    }
    for mode in modes:
        t = sorted(times[mode])
        entry = {"median_ms": 1e3 * medians[mode], "min_ms": 1e3 * t[0], "max_ms": 1e3 * t[-1],
                 "q1_ms": 1e3 * t[len(t) // 4], "q3_ms": 1e3 * t[(3 * len(t)) // 4]}
        if "plain" in medians:
            entry["vs_plain"] = medians[mode] / medians["plain"]
            entry["vs_plain_paired"] = statistics.median(a / b for a, b in zip(times[mode], times["plain"]))
        if "bp" in medians:
            entry["vs_bp"] = medians[mode] / medians["bp"]
        entry["peak_memory_bytes"] = peaks[mode] if dev.type == "cuda" else None  # step peak over its start
        report["modes"][mode] = entry
    if dev.type == "cuda" and "bp" in peaks and "exact" in peaks and peaks["bp"]:
        report["peak_memory_exact_vs_bp"] = peaks["exact"] / peaks["bp"]
    else:
        report["peak_memory_exact_vs_bp"] = None  # CPU: not measured (no allocator statistics)

    for runner in runners:
        suffix = PROFILED.get(runner.mode)
        if suffix is None or profile_steps <= 0:
            continue
        report["breakdown_ms" + suffix], report["profiled_step_ms" + suffix] = _breakdown(
            runner, x, y, sync, profile_steps, timer)
        keys = ("layer", "kind", "d", "samples", "path", "rank", "solve_dtype") + (
            ("signal_path", "signal_rank", "signal_iterations", "signal_residual") if suffix else ())
        report[runner.mode + "_stats"] = [{k: s.get(k) for k in keys} for s in runner.engine.stats()]
    for runner in runners:
        if runner.engine is not None:
            runner.engine.detach()
    return report


def _breakdown(runner: _Runner, x, y, sync, steps: int, timer=time.perf_counter):
    """Per layer and part, milliseconds per exact step with the engine's timing spans on."""
    timing = runner.engine.timing
    timing.enable(sync, timer)
    try:
        total = 0.0
        for _ in range(steps):
            runner.restore()
            start = timer()
            runner.step(x, y)
            if sync is not None:
                sync()
            total += timer() - start
        totals = dict(timing.totals)
    finally:
        timing.disable()
    layers: dict[str, dict[str, float]] = {}
    for (layer, part), seconds in totals.items():
        layers.setdefault(layer, {})[part] = 1e3 * seconds / steps
    order = [n for n, _ in runner.model.named_modules()]
    ordered = {name: layers[name] for name in sorted(layers, key=lambda n: order.index(n) if n in order else 1e9)}
    return ordered, 1e3 * total / steps


def format_report(report: dict) -> str:
    cfg = report["config"]
    lines = [f"{cfg['model']} batch {cfg['batch']} ({cfg.get('data', 'synthetic')} data) {cfg['dtype']} on "
             f"{cfg['device']} ({cfg['device_name']}), "
             f"{cfg['threads']} threads, median of {cfg['steps']} steps after {cfg['warmup']} warm-up rounds, "
             f"{cfg['clock']} clock"]
    width = max(14, 2 + max(len(mode) for mode in report["modes"]))
    header = (f"{'mode':<{width}}{'median ms':>11}{'q1 ms':>9}{'q3 ms':>9}{'vs plain':>10}{'paired':>8}{'vs bp':>8}"
              f"{'peak MiB':>10}")
    lines += [header, "-" * len(header)]
    for mode, e in report["modes"].items():
        peak = f"{e['peak_memory_bytes'] / 2**20:.0f}" if e["peak_memory_bytes"] else "n/a"
        lines.append(f"{mode:<{width}}{e['median_ms']:>11.2f}{e['q1_ms']:>9.2f}{e['q3_ms']:>9.2f}"
                     f"{e.get('vs_plain', float('nan')):>10.3f}{e.get('vs_plain_paired', float('nan')):>8.3f}"
                     f"{e.get('vs_bp', float('nan')):>8.3f}{peak:>10}")
    if report.get("peak_memory_exact_vs_bp"):
        lines.append(f"peak memory exact / bp: {report['peak_memory_exact_vs_bp']:.3f}")
    for mode, suffix in PROFILED.items():
        if "breakdown_ms" + suffix not in report:
            continue
        lines.append("")
        lines.append(f"{mode} step, per layer, ms per step (timing on: {report['profiled_step_ms' + suffix]:.2f} ms "
                     "per step); path: the weight solve's" + (", then the signal solve's (iterations)" if suffix else ""))
        parts_shown = [p for p in PARTS if suffix or not p.startswith("signal")]
        header = f"{'layer':<22}{'path':<30}" + "".join(f"{p:>13}" for p in parts_shown) + f"{'sum':>9}"
        lines += [header, "-" * len(header)]
        paths = {s["layer"]: _path_text(s) for s in report.get(mode + "_stats", [])}
        sums = {p: 0.0 for p in parts_shown}
        for layer, parts in report["breakdown_ms" + suffix].items():
            row = f"{layer:<22}{paths.get(layer, ''):<30}"
            for p in parts_shown:
                row += f"{parts.get(p, 0.0):>13.3f}"
                sums[p] += parts.get(p, 0.0)
            lines.append(row + f"{sum(parts.values()):>9.3f}")
        lines.append(f"{'total':<52}" + "".join(f"{sums[p]:>13.3f}" for p in parts_shown)
                     + f"{sum(sums.values()):>9.3f}")
    return "\n".join(lines)


def _path_text(stats: dict) -> str:
    """A layer's solve paths for the breakdown table: the weight solve's, then the signal solve's if any."""
    text = [stats["path"]] if stats.get("path") else []
    if stats.get("signal_path") not in (None, "none"):
        signal = stats["signal_path"]
        text.append(f"{signal} ({stats['signal_iterations']})" if signal == "iterative" else signal)
    return " / ".join(text)


def mode_names(text: str) -> list[str]:
    """``--modes`` values: a mode name (or, as older scripts wrote it, several joined by commas)."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names
               if name.partition("@")[0] not in MODES or name.partition("@")[2] not in SOLVE_DTYPES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"must be mode names from {' '.join(MODES)} (an exact mode optionally "
                                         f"with @float32 or @float64), got {text}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``backmatch bench`` options."""
    p.add_argument("--model", default="lenet", choices=MODELS, help="network (CIFAR-shaped batch)")
    add_batch_size(p, "examples in the synthetic batch")
    add_options(p, "--device", "--dtype")
    p.add_argument("--steps", type=positive_int, default=20, help="timed rounds (each mode one step per round)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed rounds first")
    add_options(p, "--threads")
    p.add_argument("--modes", nargs="+", type=mode_names, metavar="MODE",
                   help=f"the modes to time (default: all of {' '.join(DEFAULT_MODES)}; also exact_joint); an "
                        "exact mode may name its solve dtype, e.g. exact@float64")
    p.add_argument("--signal-damping", type=non_negative_float, default=0.0,
                   help="μ of the exact and exact_joint modes")
    p.add_argument("--lr", type=positive_float, default=0.01, help="learning rate of the SGD step")
    p.add_argument("--profile-steps", type=non_negative_int, default=3,
                   help="exact steps with the per-layer timing on (0: none)")
    add_options(p, "--seed")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (a Gaussian CIFAR-shaped batch), 'default' (the shipped data) or a folder")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: perf_counter; cpu: process_time, robust on a busy shared CPU")
    p.add_argument("--out", default=None, help="write the report as JSON here (replacing the file)")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``backmatch bench``."""
    modes = tuple(dict.fromkeys(mode for group in args.modes for mode in group)) if args.modes else DEFAULT_MODES
    report = run(args.model, args.batch_size, args.device, args.dtype, args.steps, args.warmup, args.threads, modes,
                 args.lr, args.profile_steps, args.seed, args.clock, args.data, args.signal_damping)
    print(format_report(report))
    if args.out:
        path = os.path.abspath(args.out)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(to_json(report, indent=2))
        os.replace(path + ".tmp", path)
        print(f"wrote {args.out}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``python -m backmatch_exact.research.bench``: the same as ``backmatch bench``."""
    parser = Parser(prog="backmatch bench", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(run=main)
    return run_command(parser, argv)


if __name__ == "__main__":
    sys.exit(cli())
