"""Which of Algorithm 1's approximations a step makes, and the numbers Algorithm 1 hands a layer.

Algorithm 1 (``approx.py``) is exact back-matching with a handful of approximations
made at once. :class:`Approximations` names them as switches, so that the engine can
make any subset (``attach(mode="exact", approximations=...)``) and ``compare`` can
tell what each one costs; the layer rules read the switches, and
:class:`ApproxFactors` holds one layer's ``m``, ``s``, ``r``, ``c``. Nothing here
imports from the package: the rules below and the plan above both use it.
"""

from __future__ import annotations

import dataclasses


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

    @property
    def weight_scale(self) -> float:
        """``1/(m·s)``, the factor of the layer's weight gradient; 0 where ``m·s`` is 0 (a zero ratio above, e.g.
        a BatchNorm with γ = 0: no signal reaches the layer, and its weights keep still)."""
        ms = self.backward_factor * self.sharing_factor
        return 1.0 / ms if ms else 0.0
