"""Algorithm 1: back-matching reduced to one scale factor per weight layer.

Walk the layers from the output down with the backward factor ``m = 1``:

* a weight layer's gradient becomes ``g̃_W = (g_W + wd·W) / (m·s)``, with the
  sharing factor ``s`` (1 for Linear; for Conv2d the spatial locations of its
  output after any pooling before the next weight layer);
* then ``m ← m·r`` with the layer's ratio ``r = g_a / g'_a`` (each layer file's
  ``approx_ratio``: ‖Wᵀ‖²_{2,µ} for Linear, ‖W_col‖²_{2,µ}/c for Conv2d,
  1/‖W_prev‖²_{2,µ} for BatchNorm, 1 for ReLU, pooling, flatten).

Everything here depends on weights and shapes only, never on the data.

Algorithm 1 is exact back-matching with a handful of approximations made at
once; :class:`Approximations` names them, so that the engine can make any subset
(``attach(mode="exact", approximations=...)``) and a comparison can tell what
each one costs. ``mode="approx"`` is all of them.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .errors import UnsupportedModuleError
from .layers import LayerRule
from .layers.base import ApproxPlace


@dataclasses.dataclass(frozen=True)
class Approximations:
    """Which of Algorithm 1's approximations of exact back-matching are made (none: exact back-matching).

    Each switch replaces one exact quantity by Algorithm 1's estimate of it:
    see :data:`DESCRIPTIONS`. All of them together are Algorithm 1 (``mode="approx"``).
    """

    gram: bool = False
    columns: bool = False
    conv_factor: bool = False
    bn_variance: bool = False
    bn_coupling: bool = False
    unit_ratios: bool = False

    @classmethod
    def names(cls) -> list[str]:
        """The switch names, in a fixed order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def only(cls, name: str) -> "Approximations":
        """Exact back-matching with the one approximation ``name`` made."""
        return cls(**{name: True})

    @classmethod
    def all_but(cls, name: str) -> "Approximations":
        """Algorithm 1 without the one approximation ``name`` (exact there)."""
        return cls(**{n: n != name for n in cls.names()})

    @classmethod
    def of(cls, value) -> "Approximations":
        """From an :class:`Approximations`, None (none), ``"all"``, or an iterable of switch names."""
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        if value == "all":
            return ALGORITHM1
        names = [value] if isinstance(value, str) else list(value)
        unknown = [n for n in names if n not in cls.names()]
        if unknown:
            raise ValueError(f"unknown approximations {unknown}; choose from {cls.names()} or 'all'")
        return cls(**{n: True for n in names})

    def any(self) -> bool:
        return any(dataclasses.astuple(self))

    def needs_factors(self) -> bool:
        """Whether a switch uses Algorithm 1's numbers (s, r, c), which need the forward pass's shapes."""
        return self.gram or self.conv_factor or self.bn_variance


ALGORITHM1 = Approximations(**{name: True for name in Approximations.names()})

#: what each switch means, for reports
DESCRIPTIONS = {
    "gram": "(a) G ≈ s·I: weight solve g_W·G⁺ replaced by g_W/s (BatchNorm γ, β: their plain gradient, s = 1)",
    "columns": "(b) row homogeneity: per-unit column norms ‖w_j‖² / c(j,p) replaced by their mean",
    "conv_factor": "conv denominators further divided by c = H_in·W_in/s (Algorithm 1's conv ratio)",
    "bn_variance": "(c) BN: Var[a] replaced by ‖W_prev‖²_{2,µ}",
    "bn_coupling": "BN: signal through backprop's full Jacobian (batch-statistics terms kept)",
    "unit_ratios": "pooling, LeakyReLU: backprop's signal (r = 1) instead of their per-unit rule "
                   "(the same for disjoint max pools)",
}


@dataclasses.dataclass
class ApproxFactors:
    """Algorithm 1's numbers for one layer."""

    backward_factor: float  # m at the layer's output
    sharing_factor: float  # s (1 unless Conv2d)
    ratio: float  # r = g_a / g'_a; the factor at the layer's input is m·r
    location_factor: float = 1.0  # c (1 unless Conv2d): input locations per pooled output location


def may_scale(rule: LayerRule) -> bool:
    """Whether Algorithm 1 can give this rule a ratio other than 1 (the others leave the signal as it is)."""
    return type(rule).approx_ratio is not LayerRule.approx_ratio


class ApproxPlan:
    """Algorithm 1 for one chain of layers and shapes: the shape-only part done once.

    The engine keeps one plan per chain it has seen and calls :meth:`factors`
    every step, which measures all the weights it needs in one batch and walks
    the layers down. ``layers``: (path, module, rule, input_shape, output_shape) of one
    forward pass, in execution order.
    """

    def __init__(self, layers: list[tuple[str, nn.Module, LayerRule, tuple, tuple]]):
        weight_positions = [i for i, (_, _, rule, _, _) in enumerate(layers) if rule.has_weights]
        _require_batchnorm_after_hidden_weights(layers, weight_positions)
        self.layers = layers
        self.sq_norms: dict = {}  # shared by every place; refilled by each factors() call
        self.places = []
        producer = None
        for i, (path, module, rule, in_shape, out_shape) in enumerate(layers):
            sharing = _sharing_factor(layers, i) if rule.has_weights else 1.0
            self.places.append(ApproxPlace(in_shape, sharing, producer, self.sq_norms))
            if rule.has_weights:
                producer = module
        self.location = [rule.location_factor(module, place)
                         for (_, module, rule, _, _), place in zip(layers, self.places)]  # c, shape-only
        self.scaling = [i for i, (_, _, rule, _, _) in enumerate(layers) if may_scale(rule)]  # other ratios: 1
        # whose weight (a Linear/Conv2d W, a BatchNorm γ) a ratio may read
        self.weighted = [module for _, module, rule, _, _ in layers if rule.has_weights or rule.needs_output_signal]

    def _measure_weights(self) -> None:
        """``‖W‖²`` of every weight and BatchNorm γ, in one batch (one host sync instead of one per tensor)."""
        tensors = [module.weight for module in self.weighted if getattr(module, "weight", None) is not None]
        self.sq_norms.clear()
        if not tensors:
            return
        with torch.no_grad():
            norms = [torch.linalg.vector_norm(t) for t in tensors]
            try:
                values = torch.stack(norms).tolist()
            except RuntimeError:  # weights of several dtypes or devices
                values = [float(n) for n in norms]
        self.sq_norms.update((t, v * v) for t, v in zip(tensors, values))

    def factors(self) -> list[ApproxFactors]:
        """(m, s, r) of every layer, from the weights as they are now."""
        self._measure_weights()
        ratios = [1.0] * len(self.layers)
        for i in self.scaling:
            path, module, rule, _, _ = self.layers[i]
            try:
                ratios[i] = rule.approx_ratio(module, self.places[i])
            except UnsupportedModuleError as err:
                raise UnsupportedModuleError(f"layer {path!r}: {err}") from None
        factors: list[ApproxFactors] = [None] * len(self.layers)
        m = 1.0  # the loss gradient w.r.t. the network output is the initial signal
        for i in reversed(range(len(self.layers))):
            place = self.places[i]
            factors[i] = ApproxFactors(m, place.sharing, ratios[i], self.location[i])
            m *= ratios[i]
        return factors


def _sharing_factor(layers, i: int) -> float:
    """s: spatial size of the last 4-D output from layer i up to (not including) the next weight layer."""
    if layers[i][4].__len__() != 4:
        return 1.0
    height, width = layers[i][4][-2:]
    for _, _, rule, _, out_shape in layers[i + 1:]:
        if rule.has_weights:
            break
        if len(out_shape) == 4:
            height, width = out_shape[-2:]
    return float(height * width)


def _require_batchnorm_after_hidden_weights(layers, weight_positions: list[int]) -> None:
    for here, nxt in zip(weight_positions, weight_positions[1:]):
        if not any(rule.normalizes for _, _, rule, _, _ in layers[here + 1:nxt]):
            raise UnsupportedModuleError(
                f"layer {layers[here][0]!r}: approx mode (Algorithm 1) needs a BatchNorm between every hidden "
                f"weight layer and the next one ({layers[nxt][0]!r}); use mode='exact' for this network"
            )
