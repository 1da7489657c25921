"""nn.Conv2d in its im2col view, ``b_col = W_row · a_i2c`` (eq. 19).

* backprop:      g_a = conv_transpose(g_b, W),  g_W_row = E[Σ_u g_b(u) a_i2c(u)ᵀ]     (eq. 20/21)
* back-matching: g'_a(j,p) = g_a(j,p) / c(j,p),  c(j,p) = Σ W[k,j,v]² over every output
                 location that input (j,p) feeds — boundary, stride, padding, dilation included (eq. 22)
                 g'_W_row = g_W_row · G⁺,  G = E[Σ_u a_i2c(u) a_i2c(u)ᵀ]  (eq. 23; mean over
                 samples, sum over output locations u)

* approximate:   G ≈ s·I with s the sharing factor (eq. 33), and c(j,p) ≈ ‖W_col‖²_{2,µ} / c with
                 c = (input locations) / s, so r = g_a / g'_a = ‖W_col‖²_{2,µ} / c   (eq. 35)

* joint:         g'_a = (JᵀJ + λI)⁺ Jᵀ g'_b over a sample's whole input map, J the convolution
                 (the same for every sample). ``JᵀJ = Σ_u S_uᵀ (W_rowᵀ W_row) S_u`` (S_u: the patch
                 of output location u), formed without im2col (``ConvInput.gram``); or matrix-free,
                 ``J = conv2d`` and ``Jᵀ = conv_transpose2d``.

``c(j,p)`` is one backward pass of a ones tensor through the layer with W squared,
and does not depend on the data.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..joint import InputOperator
from ..weights import ExplicitRows, RowSource
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
        if module.padding_mode != "zeros":
            raise UnsupportedModuleError(
                f"layer {path!r} (Conv2d): padding_mode={module.padding_mode!r} is not supported, only 'zeros'"
            )
        if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
            raise UnsupportedModuleError(
                f"layer {path!r} (Conv2d): padding='same' with an even dilated kernel pads asymmetrically; "
                "give the padding as numbers"
            )

    def column_sq_norms(self, module: nn.Conv2d, a: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        # eq. 22's c(j, p). The output grid is a product of two 1-D grids, so c(j, ·) = R_h · S_j · R_wᵀ with
        # S_j = Σ_k W[k,j]² and R[p, v] = 1 where kernel offset v of some output position reads input position
        # p: two small matrix products (a transposed convolution of ones with W² gives the same, slower).
        # Only a's shape is read; ``weight``: a copy of the module's to use instead
        w_sq = (module.weight if weight is None else weight).detach() ** 2
        height, width = a.shape[-2:]
        out_h, out_w = _output_size(module, height, width)
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        ph, pw = _int_padding(module)
        rows = _reads(height, out_h, kh, sh, dh, ph, w_sq.dtype, w_sq.device)
        cols = _reads(width, out_w, kw, sw, dw, pw, w_sq.dtype, w_sq.device)
        groups = module.groups  # (input channel j's outgoing weights are its group's outputs only)
        per_input = w_sq.reshape(groups, -1, *w_sq.shape[1:]).sum(1).reshape(-1, *w_sq.shape[2:])
        return (rows @ per_input @ cols.T)[None]

    def input_rows(self, module: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
        """A, rows (sample, location) in ``signal_rows``' order; groups x N x d for a grouped conv."""
        _check_4d(module, a)
        cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=_int_padding(module),
                        stride=module.stride)  # (B, d, L): eq. 19's a_i2c per sample
        groups = module.groups
        rows = cols.reshape(cols.shape[0], groups, -1, cols.shape[2]).permute(1, 0, 3, 2).reshape(
            groups, -1, cols.shape[1] // groups)
        rows = append_ones_column(rows) if module.bias is not None else rows
        return rows[0] if groups == 1 else rows

    def signal_rows(self, module: nn.Conv2d, g_b: torch.Tensor) -> torch.Tensor:
        groups = module.groups
        rows = g_b.reshape(g_b.shape[0], groups, -1, g_b.shape[2] * g_b.shape[3]).permute(1, 0, 3, 2).reshape(
            groups, -1, module.out_channels // groups)
        return rows[0] if groups == 1 else rows

    def groups(self, module: nn.Conv2d) -> int:
        return module.groups

    def input_units(self, module: nn.Conv2d) -> int:
        return module.in_channels

    def input_operator(self, module: nn.Conv2d, a: torch.Tensor) -> "ConvInput":
        _check_4d(module, a)
        return ConvInput(module, tuple(a.shape[1:]), self.column_sq_norms(module, a))

    def approx_ratio(self, module: nn.Conv2d, place) -> float:
        ratio = mean_sq_column_norm(module.weight, module.in_channels, place)
        return ratio / self.location_factor(module, place)  # eq. 35

    def location_factor(self, module: nn.Conv2d, place) -> float:
        return place.input_shape[-2] * place.input_shape[-1] / place.sharing

    def row_source(self, module: nn.Conv2d, a: torch.Tensor) -> RowSource:
        _check_4d(module, a)
        if module.groups > 1:  # the groups' im2col rows, all problems in one batch
            return ExplicitRows(self.input_rows(module, a), a.shape[0])
        return ConvRows(module, a)

    def autograd_parameter_grads(self, module: nn.Conv2d, node):
        if node is None or not node.name().startswith("ConvolutionBackward"):
            return None
        # the node's grad_inputs are (g_input, g_W, g_b): g_W in the weight's own dtype, None when not asked for
        return lambda grad_inputs: {"weight": grad_inputs[1], "bias": grad_inputs[2]}


class ConvRows(RowSource):
    """A conv layer's im2col rows ``A`` (N = B·H_out·W_out rows) used without ever forming them."""

    def __init__(self, module: nn.Conv2d, a: torch.Tensor):
        self.module, self.a = module, a
        out_h, out_w = _output_size(module, *a.shape[-2:])
        self.batch = a.shape[0]
        self.samples = a.shape[0] * out_h * out_w
        self.d = module.weight[0].numel() + (module.bias is not None)

    def gram(self, dtype: torch.dtype) -> torch.Tensor:
        """``AᵀA / B`` by 2-D lags on the CPU in float32 from 16 channels, stride 1 (:func:`_gram_lag`),
        else by products of input rows when the stride along the height is 1 (:func:`_gram_rows`).

        Row form: an output row reads input rows ``r = u + dil·i`` (kernel row i).
        With ``A1[r]`` the 1-D im2col of input row r along the width (B·W_out x C·k_w),
        the block of G between kernel rows i and i + s is ``Σ_u A1[u+dil·i]ᵀ A1[u+dil·(i+s)]``:
        the product of one pair of input rows is shared by every i whose window reads both.
        So each row is multiplied with its k_h partners once (one batched GEMM over the rows) and
        each block is a sum of H_out of those products. About ``H_pad / (k_h·H_out)`` of the im2col Gram's
        flops and ``1/k_h`` of its memory; additions only, so rounding is like the
        direct product's. Otherwise (stride > 1 along the height, k_h = 1, tiny
        outputs) the im2col Gram, a batch chunk at a time.
        """
        module, a = self.module, self.a.to(dtype)
        geometry = _geometry(module, a)
        geometry["sums"] = module.bias is not None  # column sums of A: only the bias needs them
        if _lag_pays(geometry, a):
            gram, sums = _gram_lag(a, geometry)
        else:
            gram, sums = (_gram_rows if _rows_pay(geometry) else _gram_direct)(a, geometry)
        if module.bias is not None:
            corner = sums.new_full((1, 1), float(self.samples))
            gram = torch.cat([torch.cat([gram, sums[:, None]], 1), torch.cat([sums[None], corner], 1)], 0)
        return gram / self.batch

    def kernel(self, dtype: torch.dtype) -> torch.Tensor:
        """``K = AAᵀ`` (N x N, rows in ``signal_rows`` order) without the im2col matrix.

        ``K[(b,u),(b',u')] = Σ_i P[(b, p_i(u)), (b', p_i(u'))]`` with the pixel Gram
        ``P = Σ_c x[·,c,·] x[·,c,·]`` over the input's own pixels and ``p_i(u)`` the
        pixel kernel offset i reads at output u (none in the padding): C multiply-adds
        per pixel pair instead of C·k_h·k_w per row pair, then k_h·k_w strided sums.
        """
        module, a = self.module, self.a
        g = _geometry(module, a)
        batch, channels, height, width = a.shape
        if height * width > 4 * g["out_h"] * g["out_w"]:  # strided: the pixel Gram would outgrow K itself
            return ExplicitRows(Conv2dRule().input_rows(module, a), batch).kernel(dtype)
        pixels = a.to(dtype).permute(0, 2, 3, 1).reshape(-1, channels)
        gram = (pixels @ pixels.T).view(batch, height, width, batch, height, width)
        out_h, out_w = g["out_h"], g["out_w"]
        kernel = gram.new_zeros(batch, out_h, out_w, batch, out_h, out_w)
        for ih in range(g["kh"]):
            rows = _reads_range(height, out_h, g["sh"], g["dh"] * ih - g["ph"])
            for iw in range(g["kw"]):
                cols = _reads_range(width, out_w, g["sw"], g["dw"] * iw - g["pw"])
                if rows is not None and cols is not None:
                    (u, h), (v, w) = rows, cols
                    kernel[:, u, v, :, u, v] += gram[:, h, w, :, h, w]
        kernel = kernel.view(batch * out_h * out_w, -1)
        if module.bias is not None:
            kernel += 1.0  # the ones column
        return kernel

    def times_rows(self, coeffs: torch.Tensor) -> torch.Tensor:
        """``C·A`` (r x d) for ``C`` (r x N) in ``signal_rows`` order: a weight-gradient convolution, no im2col."""
        module, a = self.module, self.a
        out_h, out_w = _output_size(module, *a.shape[-2:])
        r = coeffs.shape[0]
        grad_output = coeffs.T.reshape(a.shape[0], out_h * out_w, r).transpose(1, 2).reshape(
            a.shape[0], r, out_h, out_w)
        has_bias = module.bias is not None
        grad_w, grad_b = _weight_gradient(grad_output, a.to(coeffs.dtype), module.kernel_size, module.stride,
                                          _int_padding(module), module.dilation, has_bias)
        flat = grad_w.reshape(r, -1)
        return torch.cat([flat, grad_b[:, None]], 1) if has_bias else flat


class ConvInput(InputOperator):
    """J of one sample's whole input map (C_in·H·W units) to its output map: the convolution without bias."""

    def __init__(self, module: nn.Conv2d, in_shape: tuple, col_sq: torch.Tensor):
        self.weight, self.in_shape, self.col_sq = module.weight.detach().clone(), in_shape, col_sq.reshape(-1)
        self.stride, self.padding, self.dilation = tuple(module.stride), _int_padding(module), tuple(module.dilation)
        self.groups = module.groups
        self.out_shape = (module.out_channels, *_output_size(module, *in_shape[1:]))
        self.size, self.out_size = math.prod(in_shape), math.prod(self.out_shape)

    def matvec(self, v):
        out = F.conv2d(v.view(-1, *self.in_shape), self.weight.to(v.dtype), None, self.stride, self.padding,
                       self.dilation, self.groups)
        return out.reshape(v.shape[0], -1)

    def rmatvec(self, u):
        out = torch.nn.grad.conv2d_input((u.shape[0], *self.in_shape), self.weight.to(u.dtype),
                                         u.view(-1, *self.out_shape), self.stride, self.padding, self.dilation,
                                         self.groups)
        return out.reshape(u.shape[0], -1)

    def gram(self, dtype):
        """``JᵀJ = Σ_u S_uᵀ K S_u`` with ``K = W_rowᵀ W_row``: entry ``((c,p), (c',p'))`` sums ``K[(c,p−u),(c',p'−u)]``
        over the output locations u whose window holds both pixels. The windows are products of a row range
        and a column range, so the sum over u splits into one over output rows (``Q_h``) and one over output
        columns (``Q_w``): two small contractions, no patch ever formed."""
        channels, height, width = self.in_shape
        kh, kw = self.weight.shape[-2:]
        groups = self.groups  # (a grouped conv: K is block diagonal, each group's input channels apart)
        w = self.weight.to(dtype).reshape(groups, self.weight.shape[0] // groups, -1)
        kernel = torch.block_diag(*(wg.T @ wg for wg in w)).view(channels, kh, kw, channels, kh, kw)
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        rows = _window_pairs(height, self.out_shape[1], kh, sh, dh, ph, dtype, w.device)
        cols = _window_pairs(width, self.out_shape[2], kw, sw, dw, pw, dtype, w.device)
        by_rows = torch.einsum("aijbkl,ikpq->ajblpq", kernel, rows)
        return torch.einsum("ajblpq,jlrs->aprbqs", by_rows, cols).reshape(self.size, self.size)


@functools.lru_cache(maxsize=256)
def _window_pairs(size: int, out: int, kernel: int, stride: int, dilation: int, padding: int, dtype,
                  device) -> torch.Tensor:
    """``Q[v, v', p, p']`` (kernel, kernel, size, size): how many output positions read input p at kernel offset v
    and input p' at offset v' (along one axis)."""
    position = stride * torch.arange(out)[:, None] + dilation * torch.arange(kernel)[None, :] - padding
    reads = torch.zeros(out, kernel, size + 1, dtype=dtype)  # the last column collects the padding
    reads.scatter_(2, torch.where((position >= 0) & (position < size), position, size)[..., None], 1.0)
    reads = reads[..., :size]
    return torch.einsum("uvp,uwq->vwpq", reads, reads).to(device)


_CHUNK_ELEMENTS = 1 << 20  # per batch chunk, elements of its im2col or row matrix (4 MiB in fp32: stays in cache)
_WORKSPACE: dict = {}  # CPU: (shape, dtype) -> a zero-padded buffer kept from step to step
_WORKSPACE_BYTES = 1 << 28


def _padded_buffer(shape: tuple, like: torch.Tensor, written: tuple) -> torch.Tensor:
    """A zero tensor of ``shape`` whose padding the caller never writes: on the CPU the same one every step.

    The allocator hands big CPU buffers back to the system when they are freed, and touching a fresh one
    costs a page fault per 4 KiB, which was a third of the row Gram's time. Callers overwrite the same
    region each time (``written`` names it, part of the key) and leave the rest zero, so the buffer stays
    valid. (CUDA's caching allocator already reuses memory: there each call gets a new tensor.) Not for use
    from several threads at once.
    """
    if like.device.type != "cpu":
        return like.new_zeros(shape)
    key = (shape, like.dtype, written)
    buffer = _WORKSPACE.get(key)
    if buffer is None:
        size = like.element_size() * math.prod(shape)
        if size > _WORKSPACE_BYTES:
            return like.new_zeros(shape)
        if size + sum(b.element_size() * b.numel() for b in _WORKSPACE.values()) > _WORKSPACE_BYTES:
            _WORKSPACE.clear()
        buffer = _WORKSPACE[key] = like.new_zeros(shape)
    return buffer


@functools.lru_cache(maxsize=256)
def _reads(size: int, out: int, kernel: int, stride: int, dilation: int, padding: int, dtype, device) -> torch.Tensor:
    """(size x kernel) 0/1 matrix: 1 where kernel offset v of some output position reads input position p."""
    position = stride * torch.arange(out)[:, None] + dilation * torch.arange(kernel)[None, :] - padding
    offset = torch.arange(kernel).expand(out, kernel)
    inside = (position >= 0) & (position < size)
    reads = torch.zeros(size, kernel, dtype=dtype)
    reads[position[inside], offset[inside]] = 1.0
    return reads.to(device)


def _reads_range(size: int, out: int, stride: int, offset: int):
    """``(outputs, inputs)`` slices: the outputs u whose pixel ``stride·u + offset`` is inside, and those pixels."""
    first = max(0, -(offset // stride))  # ceil(-offset / stride)
    last = min(out - 1, (size - 1 - offset) // stride)
    if last < first:
        return None
    return slice(first, last + 1), slice(stride * first + offset, stride * last + offset + 1, stride)


def _geometry(module: nn.Conv2d, a: torch.Tensor) -> dict:
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    ph, pw = _int_padding(module)
    height, width = a.shape[-2:]
    out_h, out_w = _output_size(module, height, width)
    return dict(kh=kh, kw=kw, sh=sh, sw=sw, dh=dh, dw=dw, ph=ph, pw=pw, height=height + 2 * ph,
                width=width + 2 * pw, out_h=out_h, out_w=out_w, channels=a.shape[1])


def _rows_pay(g: dict) -> bool:
    """The row form applies (stride 1 along the height) and cuts flops (windows share rows)."""
    return g["sh"] == 1 and g["kh"] > 1 and g["height"] < g["kh"] * g["out_h"]


def _lag_pays(g: dict, a: torch.Tensor) -> bool:
    """The 2-D lag form applies (stride 1) and is faster (measured on the CPU in float32 from 16 channels up:
    1.2–2.2× the row form at ResNet's and VGG's layers; in float64, without mkldnn, slower). Not on CUDA:
    cuDNN may run it in TF32 there (``torch.backends.cudnn.allow_tf32``), and it has not been measured."""
    return (g["sh"] == 1 and g["sw"] == 1 and g["kh"] * g["kw"] > 1 and g["channels"] >= 16
            and a.dtype == torch.float32 and a.device.type == "cpu")


_LAG_CHUNK = 8  # samples per lag-product call: mkldnn sums a call's products in one long run (rounding 1e-5
# of the largest entry at batch 128, the row GEMMs 1e-7 to 2e-7); 8 samples a call bring it to 3e-7–4e-7


def _lag_products(centre: torch.Tensor, around: torch.Tensor, kernel: tuple, padding: tuple,
                  dilation: tuple) -> torch.Tensor:
    """``L[c, c', A, B] = Σ_n Σ_p centre[n, c, p] · around[n, c', p + dilation·(A, B) − padding]`` (zero outside
    ``around``): the weight gradient of a convolution of ``around`` whose output gradient is ``centre``, one of
    mkldnn's fastest kernels (~380 GFLOP/s on the two cores at 64 channels, where the row GEMMs run at about
    140, the cores' GEMM peak). Summed over chunks of :data:`_LAG_CHUNK` samples."""
    total = None
    for start in range(0, centre.shape[0], _LAG_CHUNK):
        part = _weight_gradient(centre[start:start + _LAG_CHUNK], around[start:start + _LAG_CHUNK], kernel, (1, 1),
                                padding, dilation)[0]
        total = part if total is None else total.add_(part)
    return total


def _weight_gradient(grad_output: torch.Tensor, x: torch.Tensor, kernel, stride, padding, dilation,
                     bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(g_W, g_b)`` of a convolution of ``x`` (one group) whose output gradient is ``grad_output``, by torch's
    weight-gradient kernel (no im2col); ``g_b`` None unless ``bias``."""
    _, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_output, x, x.new_empty((grad_output.shape[1], x.shape[1]) + tuple(kernel)),
        [grad_output.shape[1]] if bias else None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
        [False, True, bias])
    return grad_w, grad_b


def _left_out(size: int, k: int, d: int, p: int) -> dict[int, list[int]]:
    """Along one axis: each input position that some kernel offset's window leaves out, with those offsets.
    Offset i reads positions ``[d·i − p, d·i − p + out)``, ``out = size + 2p − d(k − 1)``."""
    out = {}
    for r in range(size):
        offsets = [i for i in range(k) if r < d * i - p or r >= size - (d * (k - 1 - i) - p)]
        if offsets:
            out[r] = offsets
    return out


def _lag_range(r: int, offsets: list[int], size: int, k: int, d: int) -> tuple[int, int]:
    """The lags (kernel steps) that the windows of ``offsets`` meet at position r and that stay in the image."""
    return max(-max(offsets), -(r // d)), min(k - 1 - min(offsets), (size - 1 - r) // d)


def _partners(i: int, lo: int, hi: int, k: int) -> tuple[slice, slice]:
    """For offset i and lags ``[lo, hi]``: the partner offsets ``i' = i + lag`` inside the kernel, and their lags'
    positions in ``[lo, hi]``."""
    first, stop = max(0, i + lo), min(k, i + hi + 1)
    return slice(first, stop), slice(first - i - lo, stop - i - lo)


def _subtract_left_out_rows(gram: torch.Tensor, a: torch.Tensor, kh: int, kw: int, dh: int, dw: int, ph: int) -> None:
    """``gram[c, i, j, c', i', j'] −=`` the products at the input rows that kernel row i's window leaves out
    (every column): one GEMM per such row, over the lags it needs. Columns: the same on the transposed input."""
    height, width = a.shape[-2:]
    qw = dw * (kw - 1)
    for r, offsets in _left_out(height, kh, dh, ph).items():
        lo, hi = _lag_range(r, offsets, height, kh, dh)
        if lo > hi:
            continue
        partners = F.pad(a[:, :, r + dh * lo:r + dh * hi + 1:dh], (qw, qw))  # B, C, lags, W + 2qw
        partners = partners.unfold(3, 2 * qw + 1, 1)[..., ::dw]  # B, C, lags, W, 2kw − 1
        lags = torch.einsum("ncs,ndasb->cdab", a[:, :, r], partners)
        for i in offsets:
            partners, at = _partners(i, lo, hi, kh)
            block = torch.stack([lags[:, :, at, kw - 1 - j:2 * kw - 1 - j] for j in range(kw)], 1)
            gram[:, i, :, :, partners, :] -= block  # [c, j, c', i', j']


def _gram_lag(a: torch.Tensor, g: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(AᵀA, column sums of A)`` by 2-D lags; stride 1.

    The entry of kernel offsets (c, i, j) and (c', i', j') sums ``x[c, p] x[c', p + (dil·(i'−i), dil·(j'−j))]``
    over the pixels p of the window of offset (i, j). Over *all* pixels those are the lag products ``L``, one
    weight-gradient convolution of the input with itself (:func:`_lag_products`, (2k−1)² lags for the k²
    offset pairs); a window differs from all pixels only by the few border rows and columns it leaves out,
    which are subtracted (and the pixels left out along both axes added back). About ``(2k−1)²/(k⁴)`` of the
    im2col Gram's multiply-adds plus the borders', run by mkldnn's convolution kernels.
    """
    kh, kw, dh, dw, ph, pw = g["kh"], g["kw"], g["dh"], g["dw"], g["ph"], g["pw"]
    _, channels, height, width = a.shape
    full = _lag_products(a, a, (2 * kh - 1, 2 * kw - 1), (dh * (kh - 1), dw * (kw - 1)), (dh, dw))
    gram = full.new_empty(channels, kh, kw, channels, kh, kw)
    for i in range(kh):
        for j in range(kw):
            gram[:, i, j] = full[:, :, kh - 1 - i:2 * kh - 1 - i, kw - 1 - j:2 * kw - 1 - j]
    _subtract_left_out_rows(gram, a, kh, kw, dh, dw, ph)
    _subtract_left_out_rows(gram.permute(0, 2, 1, 3, 5, 4), a.transpose(2, 3), kw, kh, dw, dh, pw)
    rows, cols = _left_out(height, kh, dh, ph), _left_out(width, kw, dw, pw)
    for r, row_offsets in rows.items():  # subtracted as a row and as a column: added back once
        alo, ahi = _lag_range(r, row_offsets, height, kh, dh)
        for s, col_offsets in cols.items():
            blo, bhi = _lag_range(s, col_offsets, width, kw, dw)
            if alo > ahi or blo > bhi:
                continue
            partners = a[:, :, r + dh * alo:r + dh * ahi + 1:dh, s + dw * blo:s + dw * bhi + 1:dw]
            lags = torch.einsum("nc,ndab->cdab", a[:, :, r, s], partners)
            for i in row_offsets:
                rows_i, at_i = _partners(i, alo, ahi, kh)
                for j in col_offsets:
                    cols_j, at_j = _partners(j, blo, bhi, kw)
                    gram[:, i, j, :, rows_i, cols_j] += lags[:, :, at_i, at_j]
    d = channels * kh * kw
    gram = gram.view(d, d)
    gram = (gram + gram.T) / 2  # (entry and mirror come from two lag products, equal but for rounding)
    sums = None
    if g["sums"]:
        ones = a.new_ones(a.shape[0], 1, g["out_h"], g["out_w"])
        sums = _lag_products(ones, a, (kh, kw), (ph, pw), (dh, dw)).reshape(d)
    return gram, sums


def _chunks(batch: int, per_sample: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, per_sample))
    return [(start, min(batch, start + step)) for start in range(0, batch, step)]


def _gram_direct(a: torch.Tensor, g: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(AᵀA, column sums of A)`` from the im2col matrix, a batch chunk at a time."""
    d = g["channels"] * g["kh"] * g["kw"]
    locations = g["out_h"] * g["out_w"]
    gram, sums = a.new_zeros(d, d), a.new_zeros(d)
    for start, stop in _chunks(a.shape[0], d * locations):
        cols = F.unfold(a[start:stop], (g["kh"], g["kw"]), dilation=(g["dh"], g["dw"]), padding=(g["ph"], g["pw"]),
                        stride=(g["sh"], g["sw"]))
        rows = cols.transpose(1, 2).reshape(-1, d)
        gram.addmm_(rows.T, rows)
        if g["sums"]:
            sums += rows.sum(0)
    return gram, sums


def _gram_rows(a: torch.Tensor, g: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(AᵀA, column sums of A)`` from products of input rows (see :meth:`ConvRows.gram`); stride 1 along the height.

    ``rows[t]`` is one input row's 1-D im2col along the width, (C·k_w) x (B·W_out), its C·k_w rows padded
    with zeros to a multiple of 16 (which the GEMM kernels run much faster on). Rows are stored by their
    index modulo the dilation, so that the partners ``r + dil·s`` (s < k_h) of row r are the k_h rows after
    its own: ``rows[t] · rows[t : t + k_h]ᵀ`` for every row is one batched GEMM over the rows. Partners past
    a residue class's end are other rows, not zeros, but no window sums those products. The products stay
    per row (H_pad·k_h blocks of mp x mp: 15 MB at 64 channels and 32 x 32 in float32), so the windows' sums are
    plain sums over rows, in the working dtype.
    """
    kh, kw, dh, dw, sw = g["kh"], g["kw"], g["dh"], g["dw"], g["sw"]
    height, out_h, out_w, channels, ph, pw = g["height"], g["out_h"], g["out_w"], g["channels"], g["ph"], g["pw"]
    m = channels * kw  # columns of one input row's 1-D im2col
    mp = -(-m // 16) * 16
    span = dw * (kw - 1) + 1
    per_class = -(-height // dh)  # padded row r is kept at slot (r mod dil)·per_class + r // dil
    count = dh * per_class
    pairs = a.new_zeros(count, mp, kh * mp)  # pairs[t, :, s·mp:(s+1)·mp]: slot t against slot t + s
    sums = a.new_zeros(count, m) if g["sums"] else None
    for start, stop in _chunks(a.shape[0], (count + kh) * out_w * mp):
        x = a[start:stop]
        if pw:
            x = F.pad(x, (pw, pw))
        unfolded = x.unfold(3, span, sw)[..., ::dw].permute(2, 1, 4, 0, 3)  # H, C, k_w, B, W_out
        per_row = unfolded.shape[3] * unfolded.shape[4]
        # zero rows for the height padding and the last slots' partners, zero columns up to mp
        rows = _padded_buffer((count + kh - 1, mp, per_row), x, (m, ph, x.shape[2], dh))
        for residue in range(dh):
            first_h = (residue - ph) % dh  # the first image row of this residue class
            src = unfolded[first_h::dh]
            slot = residue * per_class + (ph + first_h) // dh
            rows[slot:slot + src.shape[0], :m].view(src.shape).copy_(src)
        partners = rows.as_strided((count, kh * mp, per_row), (mp * per_row, per_row, 1), rows.storage_offset())
        pairs.baddbmm_(rows[:count], partners.transpose(1, 2))
        if sums is not None:
            sums += rows[:count, :m].sum(-1)
    # kernel rows i and i + s: the products of the rows in kernel row i's window, [dil·i, dil·i + H_out), summed
    # for every i and lag s in one small GEMM (the lags s ≥ k_h − i, summed too, are not used)
    windows = _windows(kh, dh, out_h, height, per_class, count, a.dtype, a.device)
    by_lag = (windows @ pairs.view(count, -1)).view(kh, mp, kh, mp).permute(0, 2, 1, 3)[:, :, :m, :m]
    first, lag, lower = _block_lags(kh, a.device)
    blocks = by_lag[first, lag]  # block (p, q) of G: window min(p, q) at lag |q − p|, transposed below the diagonal
    blocks = torch.where(lower, blocks.transpose(-1, -2), blocks)
    d = channels * kh * kw
    gram = blocks.view(kh, kh, channels, kw, channels, kw).permute(2, 0, 3, 4, 1, 5).reshape(d, d)
    if sums is None:
        return gram, None
    return gram, (windows @ sums).view(kh, channels, kw).transpose(0, 1).reshape(d)


@functools.lru_cache(maxsize=256)
def _windows(kh: int, dh: int, out_h: int, height: int, per_class: int, count: int, dtype, device) -> torch.Tensor:
    """(k_h x slots) 0/1: the padded rows kernel row i reads, [dil·i, dil·i + H_out) (:func:`_reads` at stride 1),
    at their slots in :func:`_gram_rows`' order."""
    rows = torch.arange(height)
    windows = torch.zeros(kh, count, dtype=dtype)
    windows[:, (rows % dh) * per_class + rows // dh] = _reads(height, out_h, kh, 1, dh, 0, dtype, "cpu").T
    return windows.to(device)


@functools.lru_cache(maxsize=64)
def _block_lags(kh: int, device) -> tuple:
    """For the k_h x k_h blocks (p, q) of G (kernel rows): the window ``min(p, q)``, the lag ``|q − p|``, and
    whether the block is below the diagonal (there the transpose of that window's block)."""
    p, q = torch.meshgrid(torch.arange(kh), torch.arange(kh), indexing="ij")
    return torch.minimum(p, q).to(device), (q - p).abs().to(device), (q < p)[:, :, None, None].to(device)


def _check_4d(module, a):
    if a.dim() != 4:
        raise UnsupportedModuleError(f"Conv2d expects a batched 4-D input (B, C, H, W), got shape {tuple(a.shape)}")


def _output_size(module: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    padding = _int_padding(module)
    sizes = []
    for n, p, d, k, s in zip((height, width), padding, module.dilation, module.kernel_size, module.stride):
        sizes.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(sizes)
