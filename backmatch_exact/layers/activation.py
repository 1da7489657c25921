"""Elementwise layers: ReLU (eq. 28-31), LeakyReLU, Dropout. Their Jacobian is diagonal, d_j.

* backprop:      g_a = d · g_b
* back-matching: g'_a = g_a / d² = g_b / d   (0 where d = 0)

ReLU: d ∈ {0, 1}, so back-matching equals backprop (eq. 31).
LeakyReLU with slope α: d = α on the negative side, so g'_a = g_b / α there.
Approximate (Algorithm 1): r = 1 for ReLU and LeakyReLU (the paper's eq. 31 rule), 1/(1-p)² for Dropout.
Dropout (training): d ∈ {0, 1/(1-p)}, so g'_a = (1-p)·g_b on kept units; in eval it is the identity.
"""

import torch
from torch import nn

from .base import LayerRule, UnitRatioRule


class ReLURule(UnitRatioRule):
    changes_signal = False  # eq. 31: identical to backprop for a sole consumer

    def column_sq_norms(self, module: nn.ReLU, a: torch.Tensor) -> torch.Tensor:
        return (a > 0).to(a.dtype)  # what it adds at a fan-out (autograd's slope at a = 0 is 0)


class LeakyReLURule(UnitRatioRule):
    def column_sq_norms(self, module: nn.LeakyReLU, a: torch.Tensor) -> torch.Tensor:
        slope_sq = torch.full_like(a, module.negative_slope ** 2)
        return torch.where(a > 0, torch.ones_like(a), slope_sq)  # autograd uses the slope at a = 0


class DropoutRule(LayerRule):
    def column_sq_norms(self, module: nn.Dropout, a: torch.Tensor) -> torch.Tensor:
        # dropped units already carry a zero backprop signal, so one constant covers both cases
        keep = 1.0 - module.p if module.training else 1.0
        return a.new_full((), 1.0 / keep ** 2 if keep > 0 else 0.0)  # (filled on the device: no copy from the host)

    def approx_ratio(self, module: nn.Dropout, place) -> float:
        keep = 1.0 - module.p if module.training else 1.0
        return 1.0 / keep ** 2 if keep > 0 else 1.0  # exact here: the Jacobian is a constant on kept units
