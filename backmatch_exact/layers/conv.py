"""nn.Conv2d in its im2col view, ``b_col = W_row · a_i2c`` (eq. 19).

* backprop:      g_a = conv_transpose(g_b, W),  g_W_row = E[Σ_u g_b(u) a_i2c(u)ᵀ]     (eq. 20/21)
* back-matching: g'_a(j,p) = g_a(j,p) / c(j,p),  c(j,p) = Σ W[k,j,v]² over every output
                 location that input (j,p) feeds — boundary, stride, padding, dilation included (eq. 22)
                 g'_W_row = g_W_row · G⁺,  G = E[Σ_u a_i2c(u) a_i2c(u)ᵀ]  (eq. 23; mean over
                 samples, sum over output locations u)

* approximate:   G ≈ s·I with s the sharing factor (eq. 33), and c(j,p) ≈ ‖W_col‖²_{2,µ} / c with
                 c = (input locations) / s, so r = g_a / g'_a = ‖W_col‖²_{2,µ} / c   (eq. 35)

``c(j,p)`` is one backward pass of a ones tensor through the layer with W squared,
and does not depend on the data.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from .base import WeightRule, append_ones_column, mean_sq_column_norm


def _int_padding(module: nn.Conv2d) -> tuple[int, int]:
    if not isinstance(module.padding, str):
        return tuple(module.padding)
    if module.padding == "valid":
        return (0, 0)
    # padding="same": PyTorch pads dilation·(k-1) in total, the extra one on the right/bottom
    totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    return tuple(t // 2 for t in totals)


class Conv2dRule(WeightRule):
    def check(self, module: nn.Conv2d, path: str) -> None:
        if module.groups != 1:
            raise UnsupportedModuleError(
                f"layer {path!r} (Conv2d): groups={module.groups} is not supported, only groups=1"
            )
        if module.padding_mode != "zeros":
            raise UnsupportedModuleError(
                f"layer {path!r} (Conv2d): padding_mode={module.padding_mode!r} is not supported, only 'zeros'"
            )
        if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
            raise UnsupportedModuleError(
                f"layer {path!r} (Conv2d): padding='same' with an even dilated kernel pads asymmetrically; "
                "give the padding as numbers"
            )

    def column_sq_norms(self, module: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
        w_sq = module.weight.detach() ** 2
        height, width = a.shape[-2:]
        out_h, out_w = _output_size(module, height, width)
        ones = w_sq.new_ones(1, module.out_channels, out_h, out_w)
        padding = _int_padding(module)
        # eq. 22 denominators: the transposed conv of ones with W², cropped to the input size
        full = F.conv_transpose2d(ones, w_sq, stride=module.stride, padding=padding, dilation=module.dilation,
                                  output_padding=_output_padding(module, height, width, out_h, out_w))
        return full

    def input_rows(self, module: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
        _check_4d(module, a)
        cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=_int_padding(module),
                        stride=module.stride)  # (B, d, L): eq. 19's a_i2c per sample
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return append_ones_column(rows) if module.bias is not None else rows

    def signal_rows(self, module: nn.Conv2d, g_b: torch.Tensor) -> torch.Tensor:
        return g_b.flatten(2).transpose(1, 2).reshape(-1, module.out_channels)

    def approx_ratio(self, module: nn.Conv2d, place) -> float:
        input_locations = place.input_shape[-2] * place.input_shape[-1]
        return mean_sq_column_norm(module.weight) * place.sharing / input_locations  # eq. 35


def _check_4d(module, a):
    if a.dim() != 4:
        raise UnsupportedModuleError(f"Conv2d expects a batched 4-D input (B, C, H, W), got shape {tuple(a.shape)}")


def _output_size(module: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    padding = _int_padding(module)
    sizes = []
    for n, p, d, k, s in zip((height, width), padding, module.dilation, module.kernel_size, module.stride):
        sizes.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(sizes)


def _output_padding(module, height, width, out_h, out_w):
    """Rows/columns the transposed conv must add so its output has the input's size (stride remainder)."""
    padding = _int_padding(module)
    extra = []
    for n, m, p, d, k, s in zip((height, width), (out_h, out_w), padding, module.dilation, module.kernel_size,
                                module.stride):
        extra.append(n - ((m - 1) * s - 2 * p + d * (k - 1) + 1))
    return tuple(extra)
