"""What every layer rule shares.

Notation (used by every file in this package): a layer maps its input ``a`` to
its output ``b``; ``g_b`` is the signal arriving at the output and ``g_a`` the
one it sends down. Plain backprop sends ``g_a = Jᵀ g_b``. Back-matching (eq. 11)
lets every input unit j match the output signal on its own, which gives

    g'_a_j = (Jᵀ g_b)_j / ‖J_{:,j}‖²          (0 where ‖J_{:,j}‖ = 0)

for any layer that is linear (or piecewise linear) in its input: the backprop
signal divided by the squared norm of the Jacobian's column j. Linear (eq. 12),
Conv2d (eq. 22), pooling, ReLU (eq. 30), LeakyReLU and Dropout are all this one
rule and only say how to compute ``‖J_{:,j}‖²`` (``column_sq_norms``). When a
tensor feeds several layers, their numerators and their denominators add up
(SPEC §8): a rule therefore gives the two parts, :meth:`LayerRule.numerator` and
:meth:`LayerRule.denominator`, and the engine divides their sums.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..approximations import ApproxFactors, Approximations
from ..solver import safe_divide
from ..weights import ExplicitRows, RowSource

if TYPE_CHECKING:
    from ..joint import InputOperator


def damped(col_sq: torch.Tensor, signal_damping: float) -> torch.Tensor:
    """``col_sq + μ·mean(col_sq)`` (SPEC §3's signal damping; μ = 0: the paper's rule)."""
    return col_sq + signal_damping * col_sq.mean() if signal_damping else col_sq


def signal_amplification(col_sq: torch.Tensor, signal_damping: float = 0.0) -> float:
    """Largest ``mean/own`` ratio of the (damped) squared column norms, over units with a non-zero one.

    1 when every unit's outgoing weights have the same norm (the row-homogeneity
    that Algorithm 1 assumes); large when some unit's outgoing weights are tiny,
    which is what makes undamped exact back-matching blow signals up.
    """
    if signal_damping:
        col_sq = col_sq + signal_damping * col_sq.mean()
    nonzero = col_sq[col_sq > 0]
    if nonzero.numel() == 0:
        return 0.0
    return float(col_sq.mean() / nonzero.min())


class LayerRule:
    """The backward rules of one module type. Stateless: the engine passes the module and saved tensors.

    Subclasses set the class flags and override what differs from plain backprop.
    """

    #: the layer holds weights whose gradient is replaced by a least-squares solve
    has_weights = False
    #: the signal rule changes the backprop signal (False: back-matching equals backprop here)
    changes_signal = True
    #: signal damping μ applies to this layer's denominators (eq. 12/22, pooling)
    damped = False
    #: the signal rule needs the signal at the layer's output, not only ``Jᵀ g_b``
    needs_output_signal = False
    #: the layer normalizes by batch statistics (Algorithm 1 needs one after every hidden weight layer)
    normalizes = False

    def check(self, module: nn.Module, path: str) -> None:
        """Raise ``UnsupportedModuleError`` for a configuration the rule does not handle."""

    def column_sq_norms(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """``‖J_{:,j}‖²`` for every input unit, broadcastable to ``a``."""
        raise NotImplementedError

    def numerator(self, module, a, grad_input, grad_output, switches: "Approximations") -> torch.Tensor:
        """This layer's part of its input's signal numerator: backprop's ``grad_input = Jᵀ g_b`` unless the rule
        drops part of J (then :meth:`transforms_numerator` is True and the engine asks for it)."""
        return grad_input

    def transforms_numerator(self, switches: "Approximations") -> bool:
        """Whether :meth:`numerator` is not simply autograd's ``Jᵀ g_b``."""
        return False

    def denominator(self, module, a, signal_damping: float, switches: "Approximations",
                    factors: "ApproxFactors | None"):
        """This layer's part of its input's signal denominator: ``‖J_{:,j}‖² + μ·mean_j ‖J_{:,j}‖²``, or
        Algorithm 1's estimate of it where a switch says so (``approximations.Approximations``). ``factors``: the
        layer's Algorithm 1 numbers (m, s, r, c) in this forward pass, when a switch needs them."""
        return damped(self.column_sq_norms(module, a), signal_damping)

    def signal_unchanged(self, module, signal_damping: float, switches: "Approximations") -> bool:
        """Whether, as its input's only consumer, the layer passes the backprop signal on unchanged."""
        return not self.changes_signal

    def signal(self, module, a, grad_input, grad_output, signal_damping: float, switches: "Approximations",
               factors=None) -> torch.Tensor:
        """Back-matched ``g'_a`` when this layer is its input's only consumer: numerator over denominator
        (``switches``: which of Algorithm 1's approximations to make, ``Approximations()`` for none)."""
        mu = signal_damping if self.damped else 0.0
        return safe_divide(self.numerator(module, a, grad_input, grad_output, switches),
                           self.denominator(module, a, mu, switches, factors))

    def autograd_parameter_grads(self, module: nn.Module, node):
        """How to read this call's plain ``{name: g}`` of its own parameters from the ``grad_inputs`` of
        ``node``, the autograd node that made the layer's output; None when that node does not hand them out.
        The engine checks ``p.grad`` against them by identity (the same tensor, or the same view of its memory:
        nothing added outside the module), and a weight layer's fast path solves with them (otherwise
        ``g_W = Sᵀ A``)."""
        return None

    def input_operator(self, module: nn.Module, a: torch.Tensor) -> "InputOperator":
        """This call's input Jacobian J for the joint signal ``(JᵀJ + λI)⁺ Jᵀ g'_b`` (``joint.py``).

        Only rules whose ``JᵀJ`` is not diagonal override it; for the others the joint rule is :meth:`signal`.
        """
        raise NotImplementedError

    def approx_ratio(self, module: nn.Module, place: "ApproxPlace") -> float:
        """Algorithm 1's ratio ``r = g_a / g'_a``, from weights and shapes alone (1: same as backprop)."""
        return 1.0

    def location_factor(self, module: nn.Module, place: "ApproxPlace") -> float:
        """Algorithm 1's conv factor ``c`` = input locations per output location after pooling (1: no locations)."""
        return 1.0

    # ------------------------------------------ parameters with a closed-form back-matched gradient
    def solves_parameters(self, module: nn.Module) -> bool:
        """Whether the layer holds parameters whose back-matched gradient :meth:`parameter_gradients` gives
        (BatchNorm's γ and β); a :class:`WeightRule`'s weights go through ``weights.solve`` instead."""
        return False

    def parameter_gram(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """The data-dependent part of that solve, which data-parallel ranks average (``distributed.py``)."""
        raise NotImplementedError

    def parameter_gradients(self, module, a, grad_output, weight_decay: float, gram=None):
        """``(back-matched, plain)`` gradients ``{name: tensor}``; ``gram`` replaces :meth:`parameter_gram`'s."""
        raise NotImplementedError


def solves_jointly(rule: LayerRule) -> bool:
    """Whether ``rule`` gives an input operator for the joint signal (its joint and per-unit rules differ)."""
    return type(rule).input_operator is not LayerRule.input_operator


@dataclasses.dataclass
class ApproxPlace:
    """Where a layer sits, as far as Algorithm 1 needs to know.

    input_shape: the layer's input shape in this forward pass.
    sharing: s, for a Conv2d the spatial locations of its output after any pooling
        before the next weight layer (1 for other layers).
    producer: for a BatchNorm, the weight layer whose output it normalizes.
    sq_norms: ``‖t‖²`` of this step's weights, computed together (``approx.ApproxPlan``);
        a tensor missing from it is measured on its own.
    """

    input_shape: tuple
    sharing: float = 1.0
    producer: nn.Module | None = None
    sq_norms: dict = dataclasses.field(default_factory=dict)


def squared_norm(tensor: torch.Tensor, place: ApproxPlace | None = None) -> float:
    """``‖tensor‖²`` (sum of squares): from ``place.sq_norms`` when it holds the tensor, else measured here."""
    value = place.sq_norms.get(tensor) if place is not None else None
    return float(tensor.detach().square().sum()) if value is None else value


def mean_sq_row_norm(weight: torch.Tensor, place: ApproxPlace | None = None) -> float:
    """‖W‖²_{2,µ}: mean over output units (rows of W_row) of the squared row norm."""
    return squared_norm(weight, place) / weight.shape[0]


def mean_sq_column_norm(weight: torch.Tensor, units: int, place: ApproxPlace | None = None) -> float:
    """‖Wᵀ‖²_{2,µ} (‖W_col‖²_{2,µ} for a conv): mean over the ``units`` input units (channels) of the squared
    norm of their outgoing weights."""
    return squared_norm(weight, place) / units


class WeightRule(LayerRule):
    """A layer ``b = W·ã`` per sample and location (Linear, Conv2d in its im2col view, eq. 19).

    Subclasses say how to lay the input out as rows ``A`` (N x d, a ones column
    for the bias) and the output signal as rows ``S`` (N x n); the solve itself
    is ``weights.solve``. A layer made of ``groups`` independent blocks (a grouped
    conv: each group of outputs reads only its group of inputs) has one such
    problem per group: ``A`` (groups x N x d), ``S`` (groups x N x n), ``W̃``
    (groups x n x d), solved in one batched call.
    """

    has_weights = True
    damped = True

    def input_rows(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """A: one row per (sample, location), the input the weights see there (+1 for a bias)."""
        raise NotImplementedError

    def signal_rows(self, module: nn.Module, g_b: torch.Tensor) -> torch.Tensor:
        """S: one row per (sample, location), the signal at the outputs there."""
        raise NotImplementedError

    def groups(self, module: nn.Module) -> int:
        """How many independent weight problems the layer is (1 but for a grouped conv)."""
        return 1

    def input_units(self, module: nn.Module) -> int:
        """Input units (features, channels): Algorithm 1's ``‖Wᵀ‖²_{2,µ}`` averages over them."""
        raise NotImplementedError

    def flatten(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``{"weight": W, "bias": c}`` (shaped like the parameters) as the n x d matrix ``[W c]`` (one per
        group), in the column order of ``input_rows``; :meth:`unflatten` undoes it."""
        groups = self.groups(module)
        w = tensors["weight"].reshape(module.weight.shape[0], -1)
        if module.bias is not None:
            w = torch.cat([w, tensors["bias"][:, None]], dim=1)
        return w if groups == 1 else w.reshape(groups, -1, w.shape[1])

    def flat_weight(self, module: nn.Module) -> torch.Tensor:
        """``W̃ = [W c]`` as an n x d matrix (one per group)."""
        return self.flatten(module, {"weight": module.weight, "bias": module.bias})

    def unflatten(self, module: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a matrix laid out like ``flat_weight`` back into per-parameter gradients."""
        flat = flat.reshape(module.weight.shape[0], -1)
        k = module.weight[0].numel()
        grads = {"weight": flat[:, :k].reshape(module.weight.shape)}
        if module.bias is not None:
            grads["bias"] = flat[:, k]
        return grads

    def row_source(self, module: nn.Module, a: torch.Tensor) -> RowSource:
        """The input rows of this call's weight problem in their cheapest form (default: A itself).

        The reference backend always uses ``ExplicitRows(input_rows)``; a fast source must give the same numbers.
        """
        return ExplicitRows(self.input_rows(module, a), a.shape[0] if a.dim() > 1 else 1)

    def denominator(self, module, a, signal_damping, switches, factors):
        """Switch ``columns``: every denominator becomes the mean ``‖Wᵀ‖²_{2,µ}``; ``conv_factor``: divided by c."""
        if not (switches.columns or switches.conv_factor):
            return super().denominator(module, a, signal_damping, switches, factors)
        col_sq = (a.new_tensor(mean_sq_column_norm(module.weight, self.input_units(module))) if switches.columns
                  else self.column_sq_norms(module, a))
        if switches.conv_factor:
            col_sq = col_sq / factors.location_factor
        return damped(col_sq, signal_damping)


class UnitRatioRule(LayerRule):
    """A layer whose exact rule is not backprop's everywhere but to which Algorithm 1 gives ``r = 1``
    (pooling, ReLU and LeakyReLU at a fan-out)."""

    def denominator(self, module, a, signal_damping, switches, factors):
        """Switch ``unit_ratios``: 1, so its signal is backprop's, as Algorithm 1 sends it."""
        if switches.unit_ratios:
            return 1.0
        return super().denominator(module, a, signal_damping, switches, factors)

    def signal_unchanged(self, module, signal_damping, switches):
        return switches.unit_ratios or super().signal_unchanged(module, signal_damping, switches)


def append_ones_column(rows: torch.Tensor) -> torch.Tensor:
    """``[A 1]`` (each of a batch of A): the bias is a weight on a constant input 1."""
    return torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
