"""The batched path (``attach(batch_solves=True)``, the default) against the per-layer path, in float64.

On the batched path a backward pass forms its weight solves as the signals arrive, factors them at its
end (the matrices of one form and size in one ``cholesky_ex`` call), reads the step's checks back to the
host at once and only then writes ``.grad``. Everything the per-layer path gives must come out the same:
``.grad``, the statistics, the errors and the fallbacks.
"""

from __future__ import annotations

import unittest.mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import backmatch_exact as bm
from backmatch_exact import engine as engine_module

DT = torch.float64
TIGHT = 1e-12

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {"lenet": (bm.models.lenet_bn, 16), "vgg11": (lambda: bm.models.vgg_bn(11), 4),
          "resnet8": (lambda: bm.models.resnet(8), 4)}
#: what a stats row says about its solve; ``residual`` and ``amplification`` are compared as numbers
SOLVE_KEYS = ("layer", "kind", "d", "outputs", "samples", "batch", "groups", "path", "rank", "fallback",
              "solve_dtype", "resolved")


def _data(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen, dtype=DT), torch.randint(0, 10, (n,), generator=gen)


def _model(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name][0]().to(DT)


def _step(model, x, y, **attach):
    """One backward from empty ``.grad``: (grads by name, stats with the deferred entries computed)."""
    model.zero_grad(set_to_none=True)
    with bm.attach(model, **attach) as engine:
        F.cross_entropy(model(x), y).backward()
        stats = engine.stats()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, stats


def _rel(a, b):
    scale = b.abs().max()
    return float((a - b).abs().max() / scale) if scale > 0 else float(a.abs().max())


def _assert_same(batched, per_layer):
    (grads, stats), (expected, expected_stats) = batched, per_layer
    assert grads.keys() == expected.keys()
    for name in grads:
        assert _rel(grads[name], expected[name]) <= TIGHT, (name, _rel(grads[name], expected[name]))
    assert [row["layer"] for row in stats] == [row["layer"] for row in expected_stats]
    for row, other in zip(stats, expected_stats):
        assert {k: row[k] for k in SOLVE_KEYS} == {k: other[k] for k in SOLVE_KEYS}, row["layer"]
        for key in ("condition", "damping", "residual", "amplification"):
            assert row[key] == pytest.approx(other[key], rel=1e-9, abs=1e-300), (row["layer"], key)


@pytest.mark.parametrize("solve_dtype", [None, torch.float32, torch.float64])
@pytest.mark.parametrize("damping", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["exact", "exact_weights"])
@pytest.mark.parametrize("name", list(MODELS))
def test_batched_equals_per_layer(name, mode, damping, solve_dtype):
    model = _model(name)
    x, y = _data(MODELS[name][1])
    attach = dict(mode=mode, damping=damping, signal_damping=0.1, solve_dtype=solve_dtype)
    _assert_same(_step(model, x, y, **attach), _step(model, x, y, batch_solves=False, **attach))


def _cholesky_calls():
    return unittest.mock.patch("torch.linalg.cholesky_ex", wraps=torch.linalg.cholesky_ex)


def test_layers_of_one_size_are_factored_in_one_call():
    """VGG11 at batch 4: conv3 and conv4 share the 256 x 256 dual kernel, the 512-channel convs at 4x4 and at
    2x2 the 64 x 64 and 16 x 16 ones: 6 Cholesky calls for 9 weight layers, against 9 on the per-layer path."""
    model = _model("vgg11")
    x, y = _data(4)
    with _cholesky_calls() as calls:
        batched = _step(model, x, y, mode="exact")
    shapes = [tuple(call.args[0].shape) for call in calls.call_args_list]
    with _cholesky_calls() as per_layer_calls:
        per_layer = _step(model, x, y, mode="exact", batch_solves=False)
    _assert_same(batched, per_layer)
    stats = batched[1]
    sizes = {(row["path"].startswith("dual"), row["samples"] if row["path"].startswith("dual") else row["d"])
             for row in stats}
    assert all(row["path"] in ("cholesky", "dual-cholesky") for row in stats)
    assert len(stats) == 9 and per_layer_calls.call_count == 9
    assert calls.call_count == len(sizes) == 6
    assert sorted(shape[0] for shape in shapes) == [1, 1, 1, 2, 2, 2]
    assert {shape[1:] for shape in shapes if shape[0] == 2} == {(256, 256), (64, 64), (16, 16)}


def test_the_reference_backend_solves_each_layer_as_its_signal_arrives():
    """The reference backend (explicit rows, a check) keeps the per-layer path: one Cholesky per weight layer,
    so that no layer's explicit rows wait for the end of the pass; its answer is the fast backend's."""
    model = _model("vgg11")
    x, y = _data(4)
    with _cholesky_calls() as calls:
        reference = _step(model, x, y, mode="exact", backend="reference")
    assert calls.call_count == 9 and all(call.args[0].dim() == 2 for call in calls.call_args_list)
    fast = _step(model, x, y, mode="exact")
    assert all(_rel(reference[0][name], fast[0][name]) < 1e-9 for name in fast[0])


def test_a_cholesky_not_proven_goes_the_per_layer_way():
    """A float32 model whose three Grams share a size and go one call, where one (rank 3 of 6: duplicated
    inputs) is not proven by its float32 pivots: that layer alone is formed again in float64 and solved by
    eigh, as the per-layer path does, with the same statistics."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.ReLU(), nn.Linear(6, 6, bias=False), nn.ReLU(),
                          nn.Linear(6, 6, bias=False))
    half = torch.randn(64, 3)
    x = torch.cat([half, half], 1)
    results = []
    for batch_solves in (True, False):
        model.zero_grad(set_to_none=True)
        with bm.attach(model, mode="exact", batch_solves=batch_solves) as engine:
            with _cholesky_calls() as calls:
                model(x).square().mean().backward()
            results.append(({n: p.grad.clone() for n, p in model.named_parameters()}, engine.stats(),
                            calls.call_count))
    (grads, stats, batched_calls), (expected, expected_stats, _) = results
    for name in grads:
        assert _rel(grads[name], expected[name]) <= 1e-6, name  # (float32 answers: the same calls, as close)
    paths = [(row["path"], row["solve_dtype"], row["fallback"]) for row in stats]
    assert paths[0] == ("eigh", "float64", "float32 Cholesky not proven: float64")
    assert paths[1:] == [("cholesky", "float32", "")] * 2
    assert paths == [(row["path"], row["solve_dtype"], row["fallback"]) for row in expected_stats]
    assert batched_calls == 2  # the three float32 matrices in one call, then the float64 one of the first layer


def _bad_signal_step(model, x, y):
    """A backward pass whose first signal is NaN (a NaN weight in the loss): the error it raises."""
    out = model(x)
    weight = torch.ones_like(out)
    weight[0, 0] = float("nan")
    with pytest.raises(bm.NonFiniteError) as error:
        (F.cross_entropy(out, y, reduction="none")[:, None] * weight).mean().backward()
    return str(error.value)


@pytest.mark.parametrize("mode", ["exact", "exact_weights"])
def test_a_nan_is_named_as_before_and_grad_is_left_alone(mode):
    """A NaN input is named by the per-layer path in the forward pass; the batched path flags it there and
    names it with the backward pass's one read, before the NaN signals it made. A NaN signal is named by the
    backward pass. Each with the per-layer path's message (its first bad layer). A failed backward pass writes
    no ``.grad``: empty ones stay empty, accumulated ones keep their values."""
    model = _model("lenet")
    x, y = _data(4)
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    with bm.attach(model, mode=mode, batch_solves=False):
        with pytest.raises(bm.NonFiniteError) as error:
            model(bad)
        messages = [str(error.value)]
    with bm.attach(model, mode=mode):
        out = model(bad)  # (flagged, not read: no error yet)
        assert out.isnan().any()
        with pytest.raises(bm.NonFiniteError) as error:
            F.cross_entropy(out, y).backward()
        messages.append(str(error.value))
        assert all(p.grad is None for p in model.parameters())
        F.cross_entropy(model(x), y).backward()  # the next forward pass's checks are its own
        assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    assert messages[0] == messages[1] == "layer 'cv1' (Conv2d): input of shape (4, 3, 32, 32) contains NaN or infinity"

    signal_messages = []
    for batch_solves in (True, False):
        model.zero_grad(set_to_none=True)
        with bm.attach(model, mode=mode, batch_solves=batch_solves):
            signal_messages.append(_bad_signal_step(model, x, y))
            if batch_solves:
                assert all(p.grad is None for p in model.parameters())
    assert signal_messages[0] == signal_messages[1]
    assert signal_messages[0].startswith("layer 'fc3' (Linear): signal arriving at the output")

    expected, _ = _step(model, x, y, mode=mode)
    with bm.attach(model, mode=mode):  # .grad from the step above: a failed pass leaves it exactly so
        _bad_signal_step(model, x, y)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, expected[name]), name


def test_gradient_accumulation_over_two_backward_calls_is_the_sum():
    model = _model("resnet8")
    (x1, y1), (x2, y2) = _data(4, seed=1), _data(4, seed=2)
    first, _ = _step(model, x1, y1, mode="exact", damping=0.1)
    second, _ = _step(model, x2, y2, mode="exact", damping=0.1)
    for batch_solves in (True, False):
        model.zero_grad(set_to_none=True)
        with bm.attach(model, mode="exact", damping=0.1, batch_solves=batch_solves):
            F.cross_entropy(model(x1), y1).backward()
            F.cross_entropy(model(x2), y2).backward()
        for name, p in model.named_parameters():
            assert torch.equal(p.grad, first[name] + second[name]), (batch_solves, name)


def test_retained_graph_and_input_only_backward_are_as_before():
    """``retain_graph``: a second backward through one forward pass adds its g' again; ``torch.autograd.grad``
    with respect to the input alone writes no ``.grad`` and gives the per-layer path's input gradient."""
    model = _model("lenet")
    x, y = _data(8)
    results = []
    for batch_solves in (True, False):
        model.zero_grad(set_to_none=True)
        with bm.attach(model, mode="exact", batch_solves=batch_solves):
            loss = F.cross_entropy(model(x), y)
            loss.backward(retain_graph=True)
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad(set_to_none=True)
            inputs = x.clone().requires_grad_(True)
            (input_grad,) = torch.autograd.grad(F.cross_entropy(model(inputs), y), inputs)
            assert all(p.grad is None for p in model.parameters())
        results.append((grads, input_grad))
    (grads, input_grad), (expected, expected_input) = results
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))
    assert torch.equal(input_grad, expected_input)


@pytest.mark.parametrize("mode", ["exact", "exact_weights"])
def test_autograd_grad_with_respect_to_the_parameters_returns_the_back_matched_gradients(mode):
    """``torch.autograd.grad(loss, params)`` hands back what the parameter hooks return: on the batched path
    that must be g' (the queued solves finished in the hook), not the zeros a ``.backward()`` pass returns
    there, and no ``.grad`` is written."""
    model = _model("lenet")
    x, y = _data(8)
    results = []
    for batch_solves in (True, False):
        model.zero_grad(set_to_none=True)
        with bm.attach(model, mode=mode, damping=0.1, batch_solves=batch_solves):
            results.append(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))
            assert all(p.grad is None for p in model.parameters())
    batched, per_layer = results
    assert all(_rel(a, b) < 1e-12 for a, b in zip(batched, per_layer))
    assert all(float(a.norm()) > 0 for a in batched)


@pytest.mark.parametrize("name, mode", [("lenet", "exact"), ("resnet8", "exact_weights")])
def test_an_exact_step_reads_back_once(monkeypatch, name, mode):
    """The CPU's view of the one host sync: in a step, no tensor becomes a Python value anywhere but in the
    engine's ``_read_back``, called once, at the end of backward (every solve's checks, λ, the signals' checks
    and the forward pass's input checks)."""
    model = _model(name)
    x, y = _data(4)
    reads, outside, inside = [], [], []
    real = engine_module._read_back

    def read_back(values):
        reads.append(len(values))
        inside.append(True)
        try:
            return real(values)
        finally:
            inside.pop()

    def counted(method):
        original = getattr(torch.Tensor, method)

        def wrapper(self, *args, **kwargs):
            if not inside:
                outside.append(method)
            return original(self, *args, **kwargs)
        return wrapper

    with bm.attach(model, mode=mode, damping=0.1) as engine:
        monkeypatch.setattr(engine_module, "_read_back", read_back)
        for method in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy"):
            monkeypatch.setattr(torch.Tensor, method, counted(method), raising=False)
        F.cross_entropy(model(x), y).backward()
        monkeypatch.undo()
        stats = engine.stats()
    assert outside == [] and len(reads) == 1
    assert all(row["path"] in ("cholesky", "dual-cholesky") and row["damping"] > 0 for row in stats)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_exact_step_on_cuda_synchronizes_only_to_read_back(monkeypatch):
    """Under ``torch.cuda.set_sync_debug_mode("error")`` every synchronizing call raises. Here only the engine's
    ``_read_back`` (wrapped by the test to allow it) may synchronize, once, at the end of backward. A first
    step runs before, unchecked: it fills the shape caches, whose first use copies small index tensors to the
    device. Damping keeps every float32 Cholesky proven (a fallback may read back more)."""
    torch.manual_seed(0)
    model = bm.models.lenet_bn().cuda()
    x, y = (t.cuda() for t in _data(32))
    x = x.float()
    calls = []
    real = engine_module._read_back

    def read_back(values):
        calls.append(len(values))
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real(values)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    with bm.attach(model, mode="exact", damping=0.1, signal_damping=0.1) as engine:
        F.cross_entropy(model(x), y).backward()
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        monkeypatch.setattr(engine_module, "_read_back", read_back)
        torch.cuda.set_sync_debug_mode("error")
        try:
            F.cross_entropy(model(x), y).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        stats = engine.stats()
    assert len(calls) == 1
    assert all(row["path"] in ("cholesky", "dual-cholesky") for row in stats)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected))
