"""The distributed teardown abort, provoked on purpose; and its absence with ``close_process_group``.

Two gloo ranks (mp.spawn, CPU). Rank 0 starts its last collective, an all_gather, and leaves the wait to
its teardown (a barrier's, a join's, or nobody's); its own references to the tensors are gone, so gloo's
work is left holding them. Rank 1 joins that all_gather late, while rank 0 runs its last exit handler,
holding the GIL (a Python loop, switch interval 10 s), just before the interpreter finalizes. Rank 0's
gloo worker thread then completes the collective and, freeing the tensors it was given, asks for the
GIL; it gets the GIL only once the interpreter is finalizing, and there Python ends it with pthread_exit
inside the work's noexcept destructor: std::terminate, SIGABRT, "terminate called without an active
exception". This staging only makes the moment certain: in validation/bench_distributed.py the same
happened about once in 25 runs without the final barrier, when the loaded VM ran a worker thread late
after it completed a collective (core dump: ProcessGroupGloo::runLoop -> ~AsyncAllgatherWork ->
TensorImpl::decref_pyobject -> take_gil -> PyThread_exit_thread -> std::terminate).

    PYTHONPATH=. python validation/teardown_abort.py destroy        # SIGABRT on rank 0
    PYTHONPATH=. python validation/teardown_abort.py close_unclean  # exits 0

variants
  destroy             dist.destroy_process_group()                  (the benchmark's teardown before the barrier)
  barrier             dist.barrier(); dist.destroy_process_group()  (the teardown until the fix: the barrier
                      waits for the collective here, so this staging cannot show what is left of the window)
  close               close_process_group()                         (the fix)
  close_unclean       close_process_group(clean=False)              (the fix after Ctrl-C: no barrier)
  close_unclean_held  the same while something still holds the group: it cannot join the threads, warns,
                      and the abort is back
In destroy, barrier and close_unclean_held a global holds the group, as DDP's import of torch.distributed.nn
(before the fix) and the engine did in the benchmark.
"""

import atexit
import os
import sys
import time

FLAG = None


def _last_exit_handler(clock=time.perf_counter):  # registered before torch's handlers: runs after them
    if FLAG is not None:
        open(FLAG, "w").close()  # rank 1 joins the all_gather now
        sys.setswitchinterval(10.0)
        end = clock() + 1.0
        while clock() < end:  # Python, holding the GIL
            pass


atexit.register(_last_exit_handler)

import datetime  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from backmatch_exact.distributed import close_process_group  # noqa: E402  (before init_process_group)

VARIANTS = ("destroy", "barrier", "close", "close_unclean", "close_unclean_held")


def _worker(rank: int, folder: str, variant: str) -> None:
    global FLAG, HOLDER
    flag = os.path.join(folder, "rank0_exiting")
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    rows = torch.ones(20_000)
    gathered = [torch.empty_like(rows) for _ in range(2)]
    if rank == 0:
        FLAG = flag
        dist.all_gather(gathered, rows, async_op=True)  # waited by the teardown, or never
    else:  # once rank 0 is in its last exit handler, or after 30 s (a teardown with a barrier waits for us)
        deadline = time.monotonic() + 30
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.01)
        dist.all_gather(gathered, rows)
    del rows, gathered
    if variant in ("destroy", "barrier", "close_unclean_held"):
        HOLDER = dist.group.WORLD
    if variant == "destroy":
        dist.destroy_process_group()
    elif variant == "barrier":
        dist.barrier()
        dist.destroy_process_group()
    else:
        close_process_group(clean=variant == "close")


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in VARIANTS:
        raise SystemExit(__doc__)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(folder, sys.argv[1]), nprocs=2)


if __name__ == "__main__":
    main()
