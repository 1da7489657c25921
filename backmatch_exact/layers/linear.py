"""nn.Linear: ``b = W a + c`` (eq. 5).

* backprop:      g_a = Wᵀ g_b,              g_W = E[g_b ãᵀ] (autograd's, signals carry 1/B)
* back-matching: g'_a_j = g_a_j / ‖w_j‖²   (eq. 12/14, w_j = column j of W)
                 g'_W = g_W · G⁺,  G = E[ã ãᵀ]   (eq. 13/15, bias as weight on a constant 1)
* approximate:   G ≈ I, ‖w_j‖² ≈ ‖Wᵀ‖²_{2,µ} (row homogeneity), so r = g_a / g'_a = ‖Wᵀ‖²_{2,µ}  (eq. 32/34)
* joint:         g'_a = (WᵀW + λI)⁺ Wᵀ g'_b = W⁺ g'_b at λ = 0 (the dual form Wᵀ(WWᵀ + λI)⁺ g'_b when out < in)

Inputs with extra leading dimensions (B, ..., in) count every position as a
location: mean over the B samples, sum over positions, as for Conv2d.
"""

import torch
from torch import nn

from ..joint import InputOperator
from .base import WeightRule, append_ones_column, mean_sq_column_norm


class LinearRule(WeightRule):
    def column_sq_norms(self, module: nn.Linear, a: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """eq. 12: ``w_jᵀ w_j`` (``weight``: a copy of the module's to use instead)."""
        return ((module.weight if weight is None else weight).detach() ** 2).sum(dim=0)

    def input_operator(self, module: nn.Linear, a: torch.Tensor) -> "LinearInput":
        return LinearInput(module.weight.detach().clone(), self.column_sq_norms(module, a))

    def input_rows(self, module: nn.Linear, a: torch.Tensor) -> torch.Tensor:
        rows = a.reshape(-1, module.in_features)
        return append_ones_column(rows) if module.bias is not None else rows

    def signal_rows(self, module: nn.Linear, g_b: torch.Tensor) -> torch.Tensor:
        return g_b.reshape(-1, module.out_features)

    def approx_ratio(self, module: nn.Linear, place) -> float:
        return mean_sq_column_norm(module.weight, module.in_features, place)  # eq. 34

    def input_units(self, module: nn.Linear) -> int:
        return module.in_features

    def autograd_parameter_grads(self, module: nn.Linear, node):
        """A 2-D input's ``F.linear`` is ``mm(a, Wᵀ)`` (``addmm(c, a, Wᵀ)`` with a bias): the node's grad_inputs
        hold ``g_Wᵀ`` (and ``g_c``, already summed over the batch). Read only where the node's inputs are this
        module's parameters themselves (not a 3-D input's views, not a cast copy under autocast)."""
        if node is None or node.name() not in ("MmBackward0", "AddmmBackward0"):
            return None
        edges = node.next_functions
        transpose = edges[-1][0]
        if not (transpose is not None and transpose.name() == "TBackward0"
                and getattr(transpose.next_functions[0][0], "variable", None) is module.weight):
            return None
        if module.bias is None:
            return lambda grad_inputs: {"weight": _transposed(grad_inputs[-1])}
        if len(edges) != 3 or getattr(edges[0][0], "variable", None) is not module.bias:
            return None
        return lambda grad_inputs: {"weight": _transposed(grad_inputs[-1]), "bias": grad_inputs[0]}


def _transposed(g):
    return None if g is None else g.mT  # (the view autograd's TBackward0 hands the weight: the same data)


class LinearInput(InputOperator):
    """J = W for every sample (every leading position of the input is a sample of its own)."""

    def __init__(self, weight: torch.Tensor, col_sq: torch.Tensor):
        self.weight, self.col_sq = weight, col_sq
        self.out_size, self.size = weight.shape

    def matvec(self, v):
        return v @ self.weight.to(v.dtype).T

    def rmatvec(self, u):
        return u @ self.weight.to(u.dtype)

    def gram(self, dtype):
        w = self.weight.to(dtype)
        return w.T @ w

    def dual_gram(self, dtype):
        w = self.weight.to(dtype)
        return w @ w.T
