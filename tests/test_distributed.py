"""Exact back-matching under torch.distributed: 2 CPU processes on gloo, spawned by the tests.

* BN-free model in DDP: exact / exact_weights (with weight decay and damping too)
  equal the single-process engine on the concatenated batch; so does a plain model
  whose gradients the user all-reduces; gradients are identical on both ranks.
* plain BatchNorm: equal a reference written here that runs each shard with its own
  BN statistics and combines the shards' Grams and gradients with numpy's pinv;
  approx mode equals the mean of the per-shard results.
* a rank with bad input makes every rank raise within seconds, never hang.
* SyncBatchNorm equals single-process exactly (CUDA only; skipped without it).
"""

import datetime
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import backmatch_exact as bm
from backmatch_exact.distributed import close_process_group, wait_all

WORLD = 2
SHARD = 4  # samples per rank
TIMEOUT = datetime.timedelta(seconds=20)  # safety net on every collective: a hang fails instead of blocking CI


# ------------------------------------------------------------------ helpers
def _spawn(worker, tmp_path, *args, limit=60.0):
    """Run ``worker(rank, init_method, out_dir, *args)`` on WORLD processes; fail (and kill them) past ``limit`` s."""
    init = f"file://{tmp_path / 'rendezvous'}"
    ctx = mp.start_processes(worker, args=(init, str(tmp_path), *args), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + limit
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the ranks did not finish in {limit} s (hang)")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _init(rank, init, device="cpu"):
    torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" and torch.cuda.device_count() >= WORLD else "gloo"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=WORLD, timeout=TIMEOUT)


def _cpu_worker(rank, init, out):
    """Every CPU check's distributed half in one pair of processes (starting them dominates the run time)."""
    _init(rank, init)
    results = {"ddp": _ddp_part(rank), "bn": _configs_part(rank, _bn_net, BN_CONFIGS),
               "residual": _configs_part(rank, _residual_net, RESIDUAL_CONFIGS),
               "bad": _bad_part(rank)}  # bad input last
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    close_process_group()  # raises if gloo's threads would outlive it (a model still holding the group)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """What each rank of the CPU run returned, by part: "ddp", "bn", "bad"."""
    return _spawn(_cpu_worker, tmp_path_factory.mktemp("dist"))


def _data(n=WORLD * SHARD, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


def _shard(rank):
    """Rank ``rank``'s SHARD samples of ``_data()`` (a copy: a test may write NaNs into it)."""
    x, y = _data()
    return x[rank * SHARD:(rank + 1) * SHARD].clone(), y[rank * SHARD:(rank + 1) * SHARD]


def _plain_net():
    """Conv (Gram exchange) → pool → Linear 36→6 (rows exchange: 8 samples <= 37) → Linear 6→3 (Gram: 8 > 7)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 6), nn.ReLU(),
                         nn.Linear(6, 3)).double()


def _bn_net(bn2d=nn.BatchNorm2d, bn1d=nn.BatchNorm1d):
    # no conv bias before BN: its backprop gradient is rounding noise there, which the engine's cross-check rejects
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), bn2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(36, 6, bias=False), bn1d(6, affine=False), nn.ReLU(), nn.Linear(6, 3)).double()


def _step(model, x, y, scale=1.0):
    model.zero_grad()
    (F.cross_entropy(model(x), y) * scale).backward()


def _grads(model):
    return {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}


def _single(make, x, y, mode, **kwargs):
    model = make()
    with bm.attach(model, mode=mode, **kwargs):
        _step(model, x, y)
    return _grads(model)


def _close(got, want, rtol=1e-9):
    assert got.keys() == want.keys()
    for name in want:
        scale = float(want[name].abs().max())
        assert torch.allclose(got[name], want[name], rtol=rtol, atol=rtol * scale), \
            (name, float((got[name] - want[name]).abs().max()), scale)


# ------------------------------------------------ DDP on a BN-free model
CONFIGS = [("exact", {}), ("exact_weights", {}), ("exact_weights", {"weight_decay": 0.01, "damping": 0.1}),
           ("exact", {"solve_method": "dual"})]


def _ddp_part(rank):
    x, y = _shard(rank)
    results = {}
    for i, (mode, kwargs) in enumerate(CONFIGS):
        model = DDP(_plain_net())
        with bm.attach(model, mode=mode, **kwargs) as engine:
            _step(model, x, y)
            results[i] = {"grads": _grads(model.module), "stats": engine.stats(),
                          "comm": dict(engine.distributed.last_step)}
    # a plain model whose gradients the user averages: pass the process group explicitly
    model = _plain_net()
    with bm.attach(model, mode="exact", process_group=dist.group.WORLD):
        _step(model, x, y)
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= WORLD
    results["manual"] = {"grads": _grads(model)}
    return results


def test_ddp_equals_single_process_on_the_concatenated_batch(spawned):
    ranks = [r["ddp"] for r in spawned]
    x, y = _data()
    for key in list(range(len(CONFIGS))) + ["manual"]:
        mode, kwargs = CONFIGS[key] if key != "manual" else ("exact", {})
        want = _single(_plain_net, x, y, mode, **kwargs)
        for r in range(WORLD):
            _close(ranks[r][key]["grads"], want)
        for name in want:  # DDP's average leaves the very same numbers on every rank
            assert torch.equal(ranks[0][key]["grads"][name], ranks[1][key]["grads"][name]), (key, name)
    # the cost model: conv and the last Linear send their Gram, the first Linear its rows (8 samples <= 37 inputs)
    stats = {s["layer"]: s for s in ranks[0][0]["stats"]}
    assert [stats[k]["exchange"] for k in ("0", "4", "6")] == ["gram", "rows", "gram"]
    assert stats["4"]["path"].startswith("dual") and stats["4"]["samples"] == WORLD * SHARD
    assert stats["0"]["samples"] == WORLD * SHARD * 36 and stats["0"]["batch"] == WORLD * SHARD
    comm = ranks[0][0]["comm"]
    assert comm["collectives"] == ["header", "grams+rows", "check"]
    gram_bytes = 8 * (28 * 29 // 2 + 7 * 8 // 2)  # float64 upper triangles of the conv (d=28) and fc2 (d=7) Grams
    header_bytes, rows_bytes, check_bytes = 8 * WORLD * 4, 8 * SHARD * 37, 8 * WORLD * 2
    assert comm["payload_bytes"] == header_bytes + gram_bytes + rows_bytes + check_bytes
    forced_dual = {s["layer"]: s["exchange"] for s in ranks[0][3]["stats"]}
    assert set(forced_dual.values()) == {"rows"}


# ------------------------------------------------ DDP on a branching network
class _Residual(nn.Module):
    """A BN-free residual network, ``relu(conv2(relu(conv1(x))) + x)`` with a depthwise conv2, pooled into a Linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        out = self.conv2(torch.relu(self.conv1(x)))
        out += x
        return self.fc(torch.flatten(F.max_pool2d(torch.relu(out), 2), 1))


def _residual_net():
    torch.manual_seed(0)
    return _Residual().double()


RESIDUAL_CONFIGS = [("exact", {}), ("exact_weights", {"weight_decay": 0.01}), ("exact", {"solve_method": "dual"})]


def _configs_part(rank, make_net, configs):
    """This rank's gradients after one DDP step of a fresh ``make_net()`` per (mode, attach kwargs) config."""
    x, y = _shard(rank)
    results = {}
    for i, (mode, kwargs) in enumerate(configs):
        model = DDP(make_net())
        with bm.attach(model, mode=mode, **kwargs):
            _step(model, x, y)
        results[i] = _grads(model.module)
    return results


def test_ddp_on_a_residual_network_equals_single_process(spawned):
    ranks = [r["residual"] for r in spawned]
    x, y = _data()
    for i, (mode, kwargs) in enumerate(RESIDUAL_CONFIGS):
        want = _single(_residual_net, x, y, mode, **kwargs)
        for r in range(WORLD):
            _close(ranks[r][i], want)


# ------------------------------------------------------------ plain BatchNorm
BN_CONFIGS = [("exact", {}), ("exact_weights", {"weight_decay": 0.01}), ("approx", {})]


def _rows(module, a):
    """A: one row per sample and location (explicit unfold), a ones column for a bias."""
    if isinstance(module, nn.Conv2d):
        a = F.unfold(a, module.kernel_size).transpose(1, 2).reshape(-1, module.weight[0].numel())
    return torch.cat([a, a.new_ones(len(a), 1)], 1) if module.bias is not None else a


def _per_shard_reference(mode, weight_decay=0.0):
    """Each shard with its own BN statistics; the ranks' Grams and gradients averaged; numpy pinv."""
    x, y = _data()
    seen = []
    for r in range(WORLD):
        model = _bn_net()
        captured = {}

        def hook(name, module, args, output):
            entry = captured[name] = {"a": args[0].detach()}
            output.register_hook(lambda g: entry.__setitem__("s", g.detach()))

        engine = bm.attach(model, mode=mode)  # the single-process engine supplies this shard's signals
        handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(n, mod, a, o))
                   for n, m in model.named_children() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
        _step(model, x[r * SHARD:(r + 1) * SHARD], y[r * SHARD:(r + 1) * SHARD])
        for h in handles:
            h.remove()
        engine.detach()
        seen.append(captured)
    model = _bn_net()
    want = {}
    for name, module in model.named_children():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            rows = [_rows(module, s[name]["a"]) for s in seen]
            sig = [s[name]["s"].flatten(2).transpose(1, 2).reshape(-1, module.weight.shape[0])
                   if isinstance(module, nn.Conv2d) else s[name]["s"] for s in seen]
            gram = sum(a.T @ a / SHARD for a in rows) / WORLD
            g = sum(s.T @ a for s, a in zip(sig, rows)) / WORLD
            weight = module.weight.detach().reshape(module.weight.shape[0], -1)
            if module.bias is not None:
                weight = torch.cat([weight, module.bias.detach()[:, None]], 1)
            g = g + weight_decay * weight
            solved = torch.from_numpy(g.numpy() @ np.linalg.pinv(gram.numpy(), rcond=1e-10, hermitian=True))
            k = module.weight[0].numel()
            want[f"{name}.weight"] = solved[:, :k].reshape(module.weight.shape)
            if module.bias is not None:
                want[f"{name}.bias"] = solved[:, k]
        elif isinstance(module, nn.BatchNorm2d):  # γ: per-channel Gram of x̂ (own statistics), averaged
            g_gamma = g_beta = gram = 0
            for s in seen:
                a, sig = s[name]["a"], s[name]["s"]
                x_hat = (a - a.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
                    a.var((0, 2, 3), unbiased=False, keepdim=True) + module.eps)
                gram = gram + (x_hat ** 2).sum((0, 2, 3)) / SHARD / WORLD
                g_gamma = g_gamma + (sig * x_hat).sum((0, 2, 3)) / WORLD
                g_beta = g_beta + sig.sum((0, 2, 3)) / WORLD
            want[f"{name}.weight"] = (g_gamma + weight_decay * module.weight.detach()) / gram
            want[f"{name}.bias"] = (g_beta + weight_decay * module.bias.detach()) / a[0, 0].numel()
    return want


def test_plain_batchnorm_equals_per_shard_reference(spawned):
    ranks = [r["bn"] for r in spawned]
    x, y = _data()
    for i, (mode, kwargs) in enumerate(BN_CONFIGS):
        if mode == "approx":  # nothing exchanged: the mean of the shards' own results
            shards = [_single(_bn_net, x[r * SHARD:(r + 1) * SHARD], y[r * SHARD:(r + 1) * SHARD], mode)
                      for r in range(WORLD)]
            want = {n: sum(s[n] for s in shards) / WORLD for n in shards[0]}
        else:
            want = _per_shard_reference(mode, **kwargs)
        for r in range(WORLD):
            _close(ranks[r][i], want, rtol=1e-8)
            for name in want:
                assert torch.equal(ranks[0][i][name], ranks[1][i][name]), (mode, name)


# ---------------------------------------------------------------- bad input
def _bad_part(rank):
    x, y = _shard(rank)
    outcome = {}

    def attempt(name, make, mode, inputs, scale=1.0, labels=y):
        model = DDP(make())
        start = time.monotonic()
        try:
            with bm.attach(model, mode=mode):
                _step(model, inputs, labels, scale)
            outcome[name] = ("ok", "", time.monotonic() - start)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            outcome[name] = (type(exc).__name__, str(exc), time.monotonic() - start)

    nan_x = x.clone()
    if rank == 1:
        nan_x[0, 0, 2, 2] = float("nan")
    attempt("nan_input_exact", _plain_net, "exact", nan_x)
    attempt("nan_signal_exact", _plain_net, "exact", x, scale=float("nan") if rank == 0 else 1.0)
    attempt("nan_input_approx", _bn_net, "approx", nan_x)
    attempt("unequal_batches", _plain_net, "exact_weights", x[:SHARD - rank], labels=y[:SHARD - rank])
    attempt("healthy_after", _plain_net, "exact", x)  # the group still works and the flags were reset
    return outcome


def test_bad_input_on_one_rank_fails_every_rank_quickly(spawned):
    ranks = [r["bad"] for r in spawned]
    for r in range(WORLD):
        kind, message, seconds = ranks[r]["nan_input_exact"]
        assert kind == "NonFiniteError" and seconds < 5, (r, kind, message, seconds)
        assert "rank 1 of 2: layer '0' (Conv2d): input contains NaN" in message, message
        kind, message, seconds = ranks[r]["nan_signal_exact"]
        assert kind == "NonFiniteError" and seconds < 5, (r, kind, message, seconds)
        assert "rank 0 of 2: layer '6' (Linear): signal arriving at the output contains NaN" in message, message
        kind, message, seconds = ranks[r]["nan_input_approx"]
        assert kind == "NonFiniteError" and seconds < 5, (r, kind, message, seconds)
        assert "rank 1 of 2: layer '0' (Conv2d): input" in message, message
        kind, message, seconds = ranks[r]["unequal_batches"]
        assert kind == "BackMatchError" and "batch sizes differ ([4, 3])" in message, (r, kind, message)
        assert ranks[r]["healthy_after"][0] == "ok", ranks[r]["healthy_after"]


# ------------------------------------------------------------- SyncBatchNorm
def test_sync_batchnorm_is_batchnorm_in_one_process():
    """Without torch.distributed a SyncBatchNorm is a BatchNorm, and back-matching treats it as one."""
    x, y = _data()
    sync = _single(lambda: _bn_net(nn.SyncBatchNorm, nn.SyncBatchNorm), x, y, "exact")
    plain = _single(_bn_net, x, y, "exact")
    _close(sync, plain, rtol=1e-12)


def _sync_worker(rank, init, out):
    torch.cuda.set_device(rank % torch.cuda.device_count())  # one GPU: both ranks share it over gloo
    _init(rank, init, device="cuda")
    results = _sync_part(rank)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    close_process_group()


def _sync_part(rank):
    x, y = (t.cuda() for t in _shard(rank))
    results = {}
    for mode in ("exact", "exact_weights"):
        model = DDP(_bn_net(nn.SyncBatchNorm, nn.SyncBatchNorm).cuda())
        with bm.attach(model, mode=mode):
            _step(model, x, y)
        results[mode] = _grads(model.module)
    return results


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="SyncBatchNorm syncs only on CUDA")
def test_sync_batchnorm_equals_single_process_on_cuda(tmp_path):
    ranks = _spawn(_sync_worker, tmp_path, limit=120.0)
    x, y = _data()
    for mode in ("exact", "exact_weights"):
        want = _single(_bn_net, x, y, mode)  # one process, plain BatchNorm on the whole batch, CPU float64
        for r in range(WORLD):
            _close(ranks[r][mode], want, rtol=1e-7)


# ------------------------------------------------------------------ teardown
def test_wait_all_waits_for_every_work_before_raising_the_first_error():
    class Work:
        def __init__(self, error=None):
            self.error, self.waited = error, False

        def wait(self):
            self.waited = True
            if self.error is not None:
                raise self.error

    works = [Work(KeyboardInterrupt()), Work(), Work(RuntimeError("second"))]
    with pytest.raises(KeyboardInterrupt):
        wait_all(works)
    assert all(work.waited for work in works)
    close_process_group()  # without torch.distributed: nothing to do


# ------------------------------------------------------------------ arguments
def test_process_group_needs_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="not initialized"):
        bm.attach(_plain_net(), process_group=object())
    with bm.attach(_plain_net()) as engine:
        assert engine.distributed is None
