"""Per-step communication of exact back-matching under torch.distributed.

VGG11-BN on CIFAR shapes (3x32x32, 10 classes), float32, wrapped in
DistributedDataParallel, on ``--procs`` CPU processes with the gloo backend.
Reports, per step and per rank, what ``engine.distributed.last_step`` measured:
the collectives, the bytes each rank hands to them, a ring estimate of the bytes
each rank sends, and the seconds spent inside them (launch to completion,
including waiting for the slower rank); then the same buckets timed on their
own after a barrier (pure transfer), how each layer was exchanged, and what a
per-layer all-reduce of G and g_W would have moved instead.

    PYTHONPATH=. python validation/bench_distributed.py                # 2 procs, batch 32 per rank
    PYTHONPATH=. python validation/bench_distributed.py --batch 64 --mode exact_weights --steps 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import backmatch_exact as bm
from backmatch_exact.distributed import close_process_group


def _worker(rank: int, procs: int, init: str, args, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=procs,
                            timeout=datetime.timedelta(seconds=300))
    result = _measure(rank, procs, args)  # the DDP model, which holds the process group, is gone now
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    close_process_group()  # barrier, then gloo's threads joined before the interpreter finalizes


def _measure(rank: int, procs: int, args) -> dict:
    torch.manual_seed(0)
    model = DDP(bm.models.vgg_bn(11))
    engine = bm.attach(model, mode=args.mode)
    gen = torch.Generator().manual_seed(1000 + rank)
    steps = []
    for step in range(args.steps + 1):  # step 0 warms up
        x = torch.randn(args.batch, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (args.batch,), generator=gen)
        start = time.perf_counter()
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        wall = time.perf_counter() - start
        if step:
            steps.append(dict(engine.distributed.last_step, step_seconds=wall))
    layers = engine.stats()
    engine.detach()

    # the same buckets again, alone, after a barrier: transfer time without waiting for the other rank
    last = steps[-1]
    gram_elems = sum(s["d"] * (s["d"] + 1) // 2 for s in layers if s["exchange"] == "gram")
    row_elems = sum(s["samples"] // procs * s["d"] for s in layers if s["exchange"] == "rows")
    alone = []
    for _ in range(3):
        grams, rows = torch.zeros(gram_elems), torch.zeros(row_elems)
        gathered = [torch.empty_like(rows) for _ in range(procs)]
        dist.barrier()
        start = time.perf_counter()
        works = [dist.all_reduce(grams, async_op=True), dist.all_gather(gathered, rows, async_op=True)]
        for work in works:
            work.wait()
        alone.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    return {"steps": steps, "layers": layers, "alone": alone, "params": params, "last": last}


def _mb(n: float) -> str:
    return f"{n / 1e6:8.2f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="samples per rank")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    parser.add_argument("--mode", default="exact", choices=["exact", "exact_weights"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        init = f"file://{os.path.join(out, 'rendezvous')}"
        mp.spawn(_worker, args=(args.procs, init, args, out), nprocs=args.procs)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(args.procs)]

    k = args.procs
    layers = ranks[0]["layers"]
    print(f"VGG11-BN, {args.mode}, {k} processes (gloo, CPU), batch {args.batch} per rank, float32\n")
    print(f"{'layer':<14}{'d':>6}{'n':>6}{'N global':>10}  exchange  solve          elements/rank")
    for s in layers:
        elems = s["d"] * (s["d"] + 1) // 2 if s["exchange"] == "gram" else s["samples"] // k * s["d"]
        print(f"{s['layer']:<14}{s['d']:>6}{s['outputs']:>6}{s['samples']:>10}  {s['exchange']:<8}  "
              f"{s['path']:<14}{elems:>12,}")
    print()
    summary = {"procs": k, "batch_per_rank": args.batch, "mode": args.mode}
    for r, result in enumerate(ranks):
        steps = result["steps"]
        print(f"rank {r}: collectives per step {steps[-1]['collectives']}")
        print(f"  payload per step   {_mb(steps[-1]['payload_bytes'])}   (bytes this rank hands to the collectives)")
        print(f"  wire per step      {_mb(steps[-1]['wire_bytes'])}   (ring estimate of bytes this rank sends)")
        secs = [s["seconds"] for s in steps]
        walls = [s["step_seconds"] for s in steps]
        print(f"  inside collectives {statistics.mean(secs) * 1e3:8.1f} ms/step  (min {min(secs) * 1e3:.1f}, "
              f"includes waiting for the other rank)")
        print(f"  whole fwd+bwd step {statistics.mean(walls):8.2f} s/step")
        print(f"  same buckets alone {min(result['alone']) * 1e3:8.1f} ms     (after a barrier: pure transfer)")
        summary[f"rank{r}"] = {"payload_bytes": steps[-1]["payload_bytes"], "wire_bytes": steps[-1]["wire_bytes"],
                               "collective_seconds_mean": statistics.mean(secs),
                               "step_seconds_mean": statistics.mean(walls),
                               "buckets_alone_seconds_min": min(result["alone"]),
                               "collectives": steps[-1]["collectives"]}
    elem = 4  # float32
    per_layer_g_and_grad = sum(s["d"] ** 2 + s["outputs"] * s["d"] for s in layers) * elem
    grams_only = sum(s["d"] * (s["d"] + 1) // 2 for s in layers) * elem
    ddp = ranks[0]["params"] * elem
    print("\nfor comparison (payload per rank per step):")
    print(f"  per-layer all-reduce of full G and g_W  {_mb(per_layer_g_and_grad)}")
    print(f"  every layer's Gram triangle, no rows    {_mb(grams_only)}")
    print(f"  DDP's own gradient all-reduce           {_mb(ddp)}")
    summary.update(per_layer_g_and_grad_bytes=per_layer_g_and_grad, grams_only_bytes=grams_only, ddp_grad_bytes=ddp)
    print("\n" + json.dumps(summary))


if __name__ == "__main__":
    main()
