"""backmatch: exact and approximate back-matching propagation from the command line.

A bad option value, a missing dataset or an output folder that already holds
results is one line on stderr ("backmatch COMMAND: error: ...") and exit status 2;
Ctrl-C is one line and exit status 130. "backmatch COMMAND --help" lists a
command's options with their defaults.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import backmatch_exact as bm

from .research import bench, compare, train
from .research.common import (
    Parser,
    add_batch_size,
    add_options,
    load_data,
    non_negative_float,
    run_command,
)

#: the ``engine.stats()`` columns ``check`` prints per mode (bp mode solves nothing and has none)
STATS_COLUMNS = {
    "exact": ["layer", "kind", "d", "samples", "path", "rank", "condition", "residual", "amplification",
              "solve_dtype", "resolved"],
    "exact_weights": ["layer", "kind", "d", "samples", "path", "rank", "condition", "residual", "solve_dtype",
                      "resolved"],
    "approx": ["layer", "kind", "m", "s", "c", "r", "scale"],
}


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain-text table of ``rows`` (dicts), numbers in short scientific notation."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def check(args: argparse.Namespace) -> int:
    """One back-matching step on LeNet-BN and a batch of the data; print per-layer stats."""
    dataset = load_data(args.data)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    model = bm.models.lenet_bn(dataset.in_channels, dataset.num_classes).to(args.device, dtype)
    x = dataset.x_train[: args.batch_size].to(args.device, dtype)
    y = dataset.y_train[: args.batch_size].to(args.device)
    with bm.attach(model, mode=args.mode, damping=args.damping, signal_damping=args.signal_damping) as engine:
        F.cross_entropy(model(x), y).backward()
        stats = engine.stats()
    print(f"LeNet-BN, mode={args.mode}, batch {x.shape[0]} of {dataset.name}, {args.dtype} on {args.device}")
    if args.mode == "bp":
        print("bp mode solves nothing (the engine leaves backprop's gradients as they are): no per-layer statistics")
    else:
        print(format_table(stats, STATS_COLUMNS[args.mode]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``backmatch`` argument parser, subcommands included."""
    parser = Parser(prog="backmatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"backmatch_exact {bm.__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    text = "one back-matching step on LeNet-BN and a batch of the data; print the per-layer solver statistics"
    p = sub.add_parser("check", help=text, description=text)
    add_options(p, "--data")
    add_batch_size(p, "examples in the batch (the first ones of the training set)")
    p.add_argument("--mode", default="exact", choices=bm.MODES, help="engine mode")
    p.add_argument("--damping", type=non_negative_float, default=0.0,
                   help="λ of the weight solves, relative to mean diag G")
    p.add_argument("--signal-damping", type=non_negative_float, default=0.0,
                   help="μ of the signal denominators, relative to their mean")
    add_options(p, "--device", "--dtype", "--seed")
    p.set_defaults(run=check)

    commands = {"compare": (compare, "exact back-matching vs Algorithm 1 at checkpoints of a training run"),
                "train": (train, "train with several optimizers on the same weights and batches"),
                "bench": (bench, "time a training step per engine mode, side by side; per-layer breakdown")}
    for name, (module, text) in commands.items():
        p = sub.add_parser(name, help=text, description=text)
        module.add_arguments(p)
        p.set_defaults(run=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``backmatch`` console command; returns the exit status."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
