"""Algorithm 1: back-matching reduced to one scale factor per weight layer.

Walk the layers from the output down with the backward factor ``m = 1``:

* a weight layer's gradient becomes ``g̃_W = (g_W + wd·W) / (m·s)``, with the
  sharing factor ``s`` (1 for Linear; for Conv2d the spatial locations of its
  output after any pooling before the next weight layer);
* then ``m ← m·r`` with the layer's ratio ``r = g_a / g'_a`` (each layer file's
  ``approx_ratio``: ‖Wᵀ‖²_{2,µ} for Linear, ‖W_col‖²_{2,µ}/c for Conv2d,
  1/‖W_prev‖²_{2,µ} for BatchNorm, 1 for ReLU, pooling, flatten).

Everything here depends on weights and shapes only, never on the data. So a
step of approx mode on a graph checked before needs no recording: plain
backprop, one number per branch into a fan-out and one per weight layer's
gradient give Algorithm 1 (:class:`CheckedGraph`).

Algorithm 1 is exact back-matching with a handful of approximations made at
once; ``approximations.Approximations`` names them, so that the engine can make
any subset (``attach(mode="exact", approximations=...)``) and a comparison can
tell what each one costs. ``mode="approx"`` is all of them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .approximations import ApproxFactors
from .errors import NonFiniteError, UnsupportedModuleError
from .layers import LayerRule
from .layers.base import ApproxPlace


def may_scale(rule: LayerRule) -> bool:
    """Whether Algorithm 1 can give this rule a ratio other than 1 (the others leave the signal as it is)."""
    return type(rule).approx_ratio is not LayerRule.approx_ratio


@dataclasses.dataclass(frozen=True)
class PlanOp:
    """What Algorithm 1 needs of one op of a forward pass (hashable: a plan is cached per graph and shapes).

    ``inputs``, ``output``: numbers of the values the op reads and makes (None: none);
    ``denominators``: per input, a constant denominator (a functional op's) or None (the rule's ratio).
    """

    path: str
    module: nn.Module | None
    rule: LayerRule
    input_shape: tuple
    output_shape: tuple
    inputs: tuple
    output: int | None
    denominators: tuple


class ApproxPlan:
    """Algorithm 1 for one graph of ops and shapes: the shape-only part done once.

    The engine keeps one plan per graph it has seen and calls :meth:`factors`
    every step, which measures all the weights it needs in one batch and walks
    the ops from the output down. On a chain this is the paper's walk; at a
    tensor that feeds several ops (SPEC §8) the consumers' ratios add up like
    exact back-matching's denominators, and ``m`` there is their sum times the mean
    of the consumers' own ``m`` (exact when those agree; see README).
    """

    def __init__(self, ops: list[PlanOp]):
        self.ops = ops
        self.uses: dict[int, list[tuple[int, int]]] = {}  # value -> [(op index, input position)]
        self.producer: dict[int, int] = {}  # value -> op index
        for i, op in enumerate(ops):
            for position, value in enumerate(op.inputs):
                self.uses.setdefault(value, []).append((i, position))
            if op.output is not None:
                self.producer[op.output] = i
        self._require_batchnorm_after_hidden_weights()
        self.sq_norms: dict = {}  # shared by every place; refilled by each factors() call
        self.places = [ApproxPlace(op.input_shape, self._sharing_factor(i) if op.rule.has_weights else 1.0,
                                   self._weight_producer(op) if op.rule.normalizes else None, self.sq_norms)
                       for i, op in enumerate(ops)]
        self.location = [op.rule.location_factor(op.module, place)
                         for op, place in zip(ops, self.places)]  # c, shape-only
        self.scaling = [i for i, op in enumerate(ops) if may_scale(op.rule)]  # other ratios: 1
        # whose weight (a Linear/Conv2d W, a BatchNorm γ) a ratio may read
        self.weighted = [(op.path, op.module) for op in ops if op.rule.has_weights or op.rule.needs_output_signal]
        self.extra: list[float] = []

    def _measure_weights(self, extra=()) -> None:
        """``‖W‖²`` of every weight and BatchNorm γ, and the scalars ``extra``, in one batch (one host sync
        instead of one per tensor); a weight that is not finite is an error naming its layer."""
        owners = {id(m.weight): (path, m) for path, m in self.weighted if getattr(m, "weight", None) is not None}
        tensors = [m.weight for _, m in owners.values()]
        self.sq_norms.clear()
        with torch.no_grad():
            scalars = [torch.linalg.vector_norm(t) for t in tensors] + list(extra)
            try:
                values = torch.stack(scalars).tolist() if scalars else []
            except RuntimeError:  # of several dtypes or devices
                values = [float(v) for v in scalars]
        self.extra = values[len(tensors):]
        for t, v in zip(tensors, values):
            if not math.isfinite(v):
                path, module = owners[id(t)]
                raise NonFiniteError(f"layer {path!r} ({type(module).__name__}): weight contains NaN or infinity")
            self.sq_norms[t] = v * v

    def factors(self, extra=()) -> list[ApproxFactors]:
        """(m, s, r, c) of every op, from the weights as they are now (``extra``: scalars to read back with
        their norms, left in :attr:`extra`)."""
        self._measure_weights(extra)
        ops = self.ops
        ratios = [1.0] * len(ops)
        for i in self.scaling:
            try:
                ratios[i] = ops[i].rule.approx_ratio(ops[i].module, self.places[i])
            except UnsupportedModuleError as err:
                raise UnsupportedModuleError(f"layer {ops[i].path!r}: {err}") from None
        factors: list[ApproxFactors] = [None] * len(ops)
        for i in reversed(range(len(ops))):  # every op's consumers come after it: their factors are known
            op = ops[i]
            factors[i] = ApproxFactors(self._backward_factor(op.output, ratios, factors), self.places[i].sharing,
                                       ratios[i], self.location[i])
        return factors

    def carried_scales(self, factors: list[ApproxFactors],
                       tappable) -> tuple[dict[int, float], dict[int, float]] | None:
        """Algorithm 1's signals as multiples of what plain autograd carries, with a number per branch into a fan-out.

        Along a chain Algorithm 1 divides the signal by each ratio it passes, so the signal at a value is
        backprop's times a number ``c``. Where a value feeds several ops, its signal
        ``Σ_j c_j J_jᵀ h_j / Σ_j r_j`` (``h_j``: what autograd carries at consumer j's output) is again a
        multiple of what autograd sums there if every branch j but a reference one first has its gradient
        multiplied by ``k_j = c_j / c_ref``.

        Returns ``c`` per value that an op makes, and ``k`` per op index whose input branch needs one (those
        equal to 1 left out), or None where that cannot be done: a branch to rescale whose op is not in
        ``tappable`` (the ops the engine can reach with a hook: module calls), or a reference branch whose
        ``c`` is 0 while another's is not. A zero denominator makes ``c`` 0 (the signal there is 0, as
        :func:`~backmatch_exact.solver.safe_divide` makes it).
        """
        ops = self.ops
        scales: dict[int, float] = {}
        taps: dict[int, float] = {}
        made = [op.output for op in reversed(ops) if op.output is not None]
        inputs = [value for value in self.uses if value not in self.producer]  # the model's inputs
        for value in made + inputs:  # every op's consumers before it
            uses = self.uses.get(value)
            if not uses:
                scales[value] = 1.0  # the network output: the loss gradient is the initial signal
                continue
            den = sum(self._denominator(j, k, factors[j].ratio) for j, k in uses)
            live = [(j, scales[ops[j].output]) for j, _ in uses if ops[j].output is not None]
            fixed = {c for j, c in live if j not in tappable}
            if len(fixed) > 1:
                return None
            ref = fixed.pop() if fixed else (live[0][1] if live else 0.0)
            if ref == 0.0 and any(c != 0.0 for _, c in live):
                return None
            for j, c in live:
                if c != ref:
                    taps[j] = c / ref
            scales[value] = ref / den if den else 0.0
        return {value: c for value, c in scales.items() if value in self.producer}, taps

    def _backward_factor(self, value: int | None, ratios: list[float], factors: list[ApproxFactors]) -> float:
        """m at a value: 1 at the network output; the sum of its consumers' ratios times the mean of their m."""
        uses = self.uses.get(value)
        if not uses:
            return 1.0  # the loss gradient w.r.t. the network output is the initial signal
        if len(uses) == 1:  # (a chain: m·r)
            j, k = uses[0]
            return self._denominator(j, k, ratios[j]) * factors[j].backward_factor
        total = sum(self._denominator(j, k, ratios[j]) for j, k in uses)
        return total * sum(factors[j].backward_factor for j, _ in uses) / len(uses)

    def _denominator(self, j: int, k: int, ratio: float) -> float:
        """What op j, reading the value as its input k, adds to the value's denominator: the op's constant
        (glue), else its ratio."""
        den = self.ops[j].denominators[k]
        return ratio if den is None else den

    def _sharing_factor(self, i: int) -> float:
        """s: spatial size of the last 4-D output from op i up to (not including) the next weight layer.

        Along every path from the op's output; where paths that pool differently meet a weight
        layer (or the network output), the largest — the one that shares least.
        """
        if len(self.ops[i].output_shape) != 4:
            return 1.0
        sizes = set()
        stack = [(self.ops[i].output, self.ops[i].output_shape[-2] * self.ops[i].output_shape[-1])]
        seen = set()
        while stack:
            value, size = stack.pop()
            if (value, size) in seen:
                continue
            seen.add((value, size))
            uses = self.uses.get(value, [])
            if not uses:
                sizes.add(size)
            for j, _ in uses:
                op = self.ops[j]
                if op.rule.has_weights:
                    sizes.add(size)
                elif op.output is not None:
                    shape = op.output_shape
                    stack.append((op.output, shape[-2] * shape[-1] if len(shape) == 4 else size))
        return float(max(sizes))

    def _weight_producer(self, op: PlanOp) -> nn.Module | None:
        """The weight layer whose output a normalization normalizes, through single-input ops; None if none."""
        value = op.inputs[0] if op.inputs else None
        while value is not None and value in self.producer:
            producer = self.ops[self.producer[value]]
            if producer.rule.has_weights:
                return producer.module
            if len(producer.inputs) != 1:
                return None
            value = producer.inputs[0]
        return None

    def _require_batchnorm_after_hidden_weights(self) -> None:
        """Every path from a weight layer to the next one passes a normalization (Algorithm 1's eq. 36)."""
        for i, op in enumerate(self.ops):
            if not op.rule.has_weights or op.output is None:
                continue
            stack, seen = [op.output], set()
            while stack:
                value = stack.pop()
                if value in seen:
                    continue
                seen.add(value)
                for j, _ in self.uses.get(value, []):
                    consumer = self.ops[j]
                    if consumer.rule.has_weights:
                        raise UnsupportedModuleError(
                            f"layer {op.path!r}: approx mode (Algorithm 1) needs a BatchNorm between every hidden "
                            f"weight layer and the next one ({consumer.path!r}); use mode='exact' for this network"
                        )
                    if not consumer.rule.normalizes and consumer.output is not None:
                        stack.append(consumer.output)


@dataclasses.dataclass(eq=False)
class CheckedGraph:
    """A graph approx mode has recorded and checked for one input shape: what a later step of that shape needs.

    Such a step runs plain autograd and gets Algorithm 1 from it (:meth:`ApproxPlan.carried_scales`): each
    weight layer's gradient times ``c/s`` (plus ``wd·W/(m·s)``), and, on a branching network, the gradient
    of each module call's input branch into a fan-out times its ``k``, applied by a hook on that call.
    """

    plan: ApproxPlan
    weights: dict[str, int]  # layer with parameters -> its op index
    calls: dict[int, tuple[str, int]]  # op index of a module call -> (the module's path, which of its calls)

    @property
    def branch_layers(self) -> set[str]:
        """The modules whose calls may take a fan-out's branch (those a step may hook)."""
        return {self.calls[j][0] for uses in self.plan.uses.values() if len(uses) > 1
                for j, _ in uses if j in self.calls}

    def scales(self, factors: list[ApproxFactors], weight_decay: float) -> tuple[dict, dict] | None:
        """This step's numbers: per layer with parameters, the factors of autograd's gradient and of the
        parameter (``(c/s, wd/(m·s))``); per module, ``{call number: k}`` of its calls' input branches. None:
        this step's signals cannot be had from autograd's (then it records and propagates them)."""
        carried = self.plan.carried_scales(factors, self.calls)
        if carried is None:
            return None
        values, taps = carried
        ops = self.plan.ops
        grads = {path: (values.get(ops[i].output, 0.0) / factors[i].sharing_factor,
                        weight_decay * factors[i].weight_scale) for path, i in self.weights.items()}
        branches: dict[str, dict[int, float]] = {}
        for i, k in taps.items():
            path, call = self.calls[i]
            branches.setdefault(path, {})[call] = k
        return grads, branches
