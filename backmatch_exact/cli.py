"""The ``backmatch`` console command."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import backmatch_exact as bm

from . import data
from .research import bench, compare, train

STATS_COLUMNS = ["layer", "kind", "d", "samples", "path", "rank", "condition", "residual", "amplification",
                 "solve_dtype", "resolved"]


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Plain-text table of ``rows`` (dicts), numbers in short scientific notation."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def check(args: argparse.Namespace) -> int:
    """One exact back-matching step on LeNet-BN and a batch of the shipped data; print per-layer stats."""
    torch.manual_seed(args.seed)
    dataset = data.load(args.data)
    dtype = getattr(torch, args.dtype)
    model = bm.models.lenet_bn(dataset.in_channels, dataset.num_classes).to(args.device, dtype)
    x = dataset.x_train[: args.batch].to(args.device, dtype)
    y = dataset.y_train[: args.batch].to(args.device)
    with bm.attach(model, mode=args.mode, damping=args.damping, signal_damping=args.signal_damping) as engine:
        F.cross_entropy(model(x), y).backward()
        stats = engine.stats()
    print(f"LeNet-BN, mode={args.mode}, batch {x.shape[0]} of {dataset.name}, {args.dtype} on {args.device}")
    print(format_table(stats, STATS_COLUMNS))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="backmatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="one exact back-matching step on LeNet-BN; print the per-layer stats")
    p.add_argument("--data", default="default", help="'default' (shipped Fashion-MNIST subset) or a folder")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--mode", default="exact", choices=["bp", "exact", "exact_weights"])
    p.add_argument("--damping", type=float, default=0.0)
    p.add_argument("--signal-damping", type=float, default=0.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=check)

    p = sub.add_parser("compare", help="exact back-matching vs Algorithm 1 at checkpoints of a training run")
    compare.add_arguments(p)
    p.set_defaults(run=compare.main)

    p = sub.add_parser("train", help="train with several optimizers on the same weights and batches")
    train.add_arguments(p)
    p.set_defaults(run=train.main)

    p = sub.add_parser("bench", help="time a training step per engine mode, side by side; per-layer breakdown")
    bench.add_arguments(p)
    p.set_defaults(run=bench.main)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
