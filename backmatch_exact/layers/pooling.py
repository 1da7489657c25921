"""Pooling layers. Output unit k reads a window of inputs; n_j windows read input j.

MaxPool2d — output k copies one input (the maximum), so J has 0/1 entries:
* backprop:      g_a_j = Σ_{k selects j} g_b_k
* back-matching: g'_a_j = mean_{k selects j} g_b_k   (0 if no window selects j); identical
                 to backprop when windows do not overlap.

AvgPool2d / AdaptiveAvgPool2d — b_k = Σ_{j∈k} a_j / |K_k|:
* backprop:      g_a_j = Σ_{k∋j} g_b_k / |K_k|
* back-matching: g'_a_j = g_a_j / Σ_{k∋j} |K_k|⁻²   (= |K|·Σ_{k∋j} g_b_k / n_j for equal windows)

Both are ``g_a / ‖J_{:,j}‖²``; only the column norms differ.

Joint (beyond the paper): MaxPool's ``JᵀJ`` is diagonal (each output copies one input), so its joint rule is the
per-unit one. Average pooling's is not, even without overlap: per channel, ``g'_a = (PᵀP + λI)⁺ Pᵀ g'_b``
with P the pooling matrix (``PoolInput``). A window of |K| inputs read by no other window gives each
of them ``g_b_k`` (the least change that moves the mean by ``g_b_k``), where the per-unit rule gives
``|K|·g_b_k``.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..joint import InputOperator
from .base import UnitRatioRule


class PoolingRule(UnitRatioRule):
    """What the pooling layers share: signal damping applies, and Algorithm 1 gives them r = 1."""

    damped = True


class MaxPool2dRule(PoolingRule):
    def check(self, module: nn.MaxPool2d, path: str) -> None:
        if module.return_indices:
            raise UnsupportedModuleError(f"layer {path!r} (MaxPool2d): return_indices=True is not supported")

    def column_sq_norms(self, module: nn.MaxPool2d, a: torch.Tensor) -> torch.Tensor:
        # ‖J_{:,j}‖² = how many windows select input j; depends on the data
        _, index = F.max_pool2d(a.detach(), module.kernel_size, module.stride, module.padding, module.dilation,
                                module.ceil_mode, return_indices=True)
        flat = a.new_zeros(a.shape[:-2] + (a.shape[-2] * a.shape[-1],))
        flat.scatter_add_(-1, index.flatten(-2), torch.ones_like(index.flatten(-2), dtype=a.dtype))
        return flat.view_as(a)

    def signal_unchanged(self, module, signal_damping, switches):
        # Disjoint windows (stride >= dilated kernel extent): every input is read by at most one window, so
        # ‖J_{:,j}‖² is 1 where its window selected it and 0 elsewhere, where backprop's g_a is already 0:
        # a sole consumer sends g'_a = g_a exactly, without recomputing the pooling.
        return (not signal_damping and _disjoint_windows(module)) or super().signal_unchanged(
            module, signal_damping, switches)


def _disjoint_windows(module: nn.MaxPool2d) -> bool:
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    kernel, dilation = pair(module.kernel_size), pair(module.dilation)
    stride = pair(module.stride if module.stride is not None and module.stride != [] else module.kernel_size)
    return all(s >= d * (k - 1) + 1 for s, d, k in zip(stride, dilation, kernel))


class AvgPoolRule(PoolingRule):
    """Average pooling: its joint rule goes through the pooling matrix of one channel (``PoolInput``)."""

    def input_operator(self, module, a: torch.Tensor) -> "PoolInput":
        return PoolInput(module, tuple(a.shape[-2:]), self.column_sq_norms(module, a))


class AvgPool2dRule(AvgPoolRule):
    def column_sq_norms(self, module: nn.AvgPool2d, a: torch.Tensor) -> torch.Tensor:
        return _avg_pool_col_sq(module, tuple(a.shape[-2:]), a.dtype, a.device)


class AdaptiveAvgPool2dRule(AvgPoolRule):
    def column_sq_norms(self, module: nn.AdaptiveAvgPool2d, a: torch.Tensor) -> torch.Tensor:
        height, width = a.shape[-2:]
        out = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * 2
        out_h, out_w = (n if o is None else o for o, n in zip(out, (height, width)))
        return _adaptive_col_sq_map(height, width, out_h, out_w, a.dtype, a.device)


@functools.lru_cache(maxsize=256)
def _adaptive_col_sq_map(height: int, width: int, out_h: int, out_w: int, dtype, device) -> torch.Tensor:
    """The column norms of one channel's map, made once per shape and device: a copy from the host to a GPU
    synchronizes with it."""
    rows = torch.tensor(_adaptive_col_sq(height, out_h), dtype=dtype, device=device)
    return rows[:, None] * torch.tensor(_adaptive_col_sq(width, out_w), dtype=dtype, device=device)[None, :]


def _adaptive_col_sq(size: int, out: int) -> list[float]:
    """Σ over the adaptive windows containing each input position of 1/|window|², along one axis."""
    col_sq = [0.0] * size
    for i in range(out):
        start, end = (i * size) // out, math.ceil((i + 1) * size / out)
        for j in range(start, end):
            col_sq[j] += 1.0 / (end - start) ** 2
    return col_sq


def _avg_pool_col_sq(module: nn.AvgPool2d, shape, dtype, device) -> torch.Tensor:
    """Σ_{k∋j} J_kj² for one channel. Every window's non-zero entries are equal, 1/divisor_k."""
    ones = torch.ones((1, 1) + shape, dtype=dtype, device=device, requires_grad=True)
    args = (module.kernel_size, module.stride, module.padding, module.ceil_mode)
    with torch.enable_grad():
        row_sums = F.avg_pool2d(ones, *args, module.count_include_pad, module.divisor_override)
        # inputs inside each window that are real (not padding): the sum with divisor 1
        members = F.avg_pool2d(ones.detach(), *args, True, 1)
        entry = row_sums.detach() / members  # the value of J_kj for j in window k
        (col_sq,) = torch.autograd.grad(row_sums, ones, entry)
    return col_sq[0, 0]


class PoolInput(InputOperator):
    """J of one channel of an average pooling layer, P (every channel of every sample is a sample of its own)."""

    def __init__(self, module: nn.Module, in_hw: tuple, col_sq: torch.Tensor):
        self.module, self.in_hw, self.col_sq = module, in_hw, col_sq.reshape(-1)
        self.size = in_hw[0] * in_hw[1]
        self.out_hw = tuple(self._pool(col_sq.new_zeros(1, 1, *in_hw)).shape[-2:])
        self.out_size = self.out_hw[0] * self.out_hw[1]

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return F.adaptive_avg_pool2d(x, m.output_size)
        return F.avg_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                            m.divisor_override)

    def matvec(self, v):
        return self._pool(v.view(-1, 1, *self.in_hw)).reshape(v.shape[0], -1)

    def rmatvec(self, u):
        z = u.new_zeros(u.shape[0], 1, *self.in_hw, requires_grad=True)
        with torch.enable_grad():
            (out,) = torch.autograd.grad(self._pool(z), z, u.view(-1, 1, *self.out_hw))
        return out.reshape(u.shape[0], -1)

    def _matrix(self, dtype) -> torch.Tensor:
        """P (out x in), pooled from the unit basis."""
        basis = torch.eye(self.size, dtype=dtype, device=self.col_sq.device)
        return self.matvec(basis).T

    def gram(self, dtype):
        p = self._matrix(dtype)
        return p.T @ p

    def dual_gram(self, dtype):
        p = self._matrix(dtype)
        return p @ p.T
