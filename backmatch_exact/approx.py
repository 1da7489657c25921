"""Algorithm 1: back-matching reduced to one scale factor per weight layer.

Walk the layers from the output down with the backward factor ``m = 1``:

* a weight layer's gradient becomes ``g̃_W = (g_W + wd·W) / (m·s)``, with the
  sharing factor ``s`` (1 for Linear; for Conv2d the spatial locations of its
  output after any pooling before the next weight layer);
* then ``m ← m·r`` with the layer's ratio ``r = g_a / g'_a`` (each layer file's
  ``approx_ratio``: ‖Wᵀ‖²_{2,µ} for Linear, ‖W_col‖²_{2,µ}/c for Conv2d,
  1/‖W_prev‖²_{2,µ} for BatchNorm, 1 for ReLU, pooling, flatten).

Everything here depends on weights and shapes only, never on the data.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .errors import UnsupportedModuleError
from .layers import LayerRule
from .layers.base import ApproxPlace


@dataclasses.dataclass
class ApproxFactors:
    """Algorithm 1's numbers for one layer."""

    backward_factor: float  # m at the layer's output
    sharing_factor: float  # s (1 unless Conv2d)
    ratio: float  # r = g_a / g'_a; the factor at the layer's input is m·r


def algorithm1(layers: list[tuple[str, nn.Module, LayerRule, tuple, tuple]]) -> list[ApproxFactors]:
    """Factors for each layer of one forward pass.

    ``layers``: (path, module, rule, input_shape, output_shape) in execution order.
    """
    weight_positions = [i for i, (_, _, rule, _, _) in enumerate(layers) if rule.has_weights]
    _require_batchnorm_after_hidden_weights(layers, weight_positions)
    places = []
    producer = None
    for i, (path, module, rule, in_shape, out_shape) in enumerate(layers):
        places.append(ApproxPlace(in_shape, _sharing_factor(layers, i) if rule.has_weights else 1.0, producer))
        if rule.has_weights:
            producer = module
    factors: list[ApproxFactors] = [None] * len(layers)
    m = 1.0  # the loss gradient w.r.t. the network output is the initial signal
    for i in reversed(range(len(layers))):
        path, module, rule, _, _ = layers[i]
        try:
            ratio = rule.approx_ratio(module, places[i])
        except UnsupportedModuleError as err:
            raise UnsupportedModuleError(f"layer {path!r}: {err}") from None
        factors[i] = ApproxFactors(m, places[i].sharing, ratio)
        m *= ratio
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
    from .layers.batchnorm import BatchNormRule

    for here, nxt in zip(weight_positions, weight_positions[1:]):
        between = [rule for _, _, rule, _, _ in layers[here + 1:nxt]]
        if not any(isinstance(rule, BatchNormRule) for rule in between):
            raise UnsupportedModuleError(
                f"layer {layers[here][0]!r}: approx mode (Algorithm 1) needs a BatchNorm between every hidden "
                f"weight layer and the next one ({layers[nxt][0]!r}); use mode='exact' for this network"
            )
