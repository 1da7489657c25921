"""An independent float64 reference for the back-matching layer rules.

Nothing here imports ``backmatch_exact``: every quantity is rebuilt from dense
matrices obtained with ``torch.func.jacrev`` (or written out by hand for the
rules that are not Jacobian column norms: BatchNorm, dropout in training mode)
and solved with numpy in float64.

Conventions (one layer, input ``a`` -> output ``b``, output signal ``R = g_b``):

* signal rule: per sample, with ``J`` the dense Jacobian of that sample's output
  w.r.t. that sample's input, ``g'_a_j = (Jᵀ R)_j / (‖J[:, j]‖² + μ·mean‖J[:, ·]‖²)``,
  0 where the denominator is 0; the mean runs over every input unit of the batch.
* weight rule: rows of ``A`` are the Jacobian of output channel 0 at each
  (sample, location) w.r.t. the weight row ``W[0]`` (and ``bias[0]``), rows of
  ``S`` the output signal there; ``g'_W = B · lstsq(A, S)ᵀ`` (minimum norm), or
  ``g_W (G + λI)⁻¹`` with ``g_W = Sᵀ A`` and ``G = AᵀA / B`` when damped.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev


def to_np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float64).cpu().numpy()
    return np.asarray(t, dtype=np.float64)


# ------------------------------------------------------------------ signal rule

def input_jacobians(fn, x: torch.Tensor) -> list[np.ndarray]:
    """Per sample i the dense Jacobian of ``fn(x[i:i+1])[0]`` w.r.t. ``x[i]``, as (outputs, inputs) arrays."""
    x = x.detach().to(torch.float64)
    jacs = []
    for i in range(x.shape[0]):
        xi = x[i].clone()
        jac = jacrev(lambda z: fn(z.unsqueeze(0)).squeeze(0))(xi)
        jacs.append(to_np(jac).reshape(-1, xi.numel()))
    return jacs


def diagonal_jacobians(diag) -> list[np.ndarray]:
    """Per sample a diagonal Jacobian with the given (B, ...) diagonal values."""
    diag = to_np(diag)
    return [np.diag(d.reshape(-1)) for d in diag]


def signal_from_jacobians(jacs: list[np.ndarray], R, mu: float = 0.0) -> np.ndarray:
    """``g'_a`` (shape (B, inputs)) from per-sample Jacobians and the output signal R."""
    r = to_np(R).reshape(len(jacs), -1)
    col_sq = np.stack([(j * j).sum(axis=0) for j in jacs])  # (B, inputs): ‖J[:, j]‖² per sample
    backprop = np.stack([j.T @ ri for j, ri in zip(jacs, r)])
    den = col_sq + mu * col_sq.mean() if mu else col_sq
    ok = den > 0
    return np.where(ok, backprop / np.where(ok, den, 1.0), 0.0)


def signal_oracle(module: nn.Module, x: torch.Tensor, R, mu: float = 0.0) -> np.ndarray:
    """Back-matched input signal of a (piecewise) linear, sample-independent module (eval-mode dropout ok)."""
    if isinstance(module, nn.Dropout) and module.training:
        raise ValueError("train-mode dropout is random: use dropout_train_signal_oracle with the forward output")
    jacs = input_jacobians(module, x)
    return signal_from_jacobians(jacs, R, mu).reshape(tuple(x.shape))


def dropout_train_signal_oracle(x: torch.Tensor, out: torch.Tensor, p: float, R) -> np.ndarray:
    """Training-mode dropout, built from the forward output: the Jacobian diagonal is 0 or 1/(1-p)."""
    kept = to_np(out) != 0
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    jacs = diagonal_jacobians(np.where(kept, scale, 0.0))
    return signal_from_jacobians(jacs, R).reshape(tuple(x.shape))


def backprop_signal(module: nn.Module, x: torch.Tensor, R) -> np.ndarray:
    """Plain ``Jᵀ R`` per sample from the dense Jacobians (for the exact_weights mode)."""
    jacs = input_jacobians(module, x)
    r = to_np(R).reshape(len(jacs), -1)
    return np.stack([j.T @ ri for j, ri in zip(jacs, r)]).reshape(tuple(x.shape))


# ------------------------------------------------------------------ weight rule

def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Conv2d) else -1


def weight_rows(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    """A: per (sample, output location) the Jacobian of output channel 0 w.r.t. W[0] (then bias[0])."""
    x = x.detach().to(torch.float64)
    params = {name: p.detach().to(torch.float64) for name, p in module.named_parameters()}
    dim = _channel_dim(module)

    def channel0(p):
        return functional_call(module, p, (x,)).select(dim, 0)

    n_rows = channel0(params).numel()
    jac = jacrev(channel0)(params)  # name -> channel0 shape + param shape
    w_shape = tuple(params["weight"].shape)
    cols = [to_np(jac["weight"]).reshape((n_rows,) + w_shape)[:, 0].reshape(n_rows, -1)]
    if "bias" in params:
        cols.append(to_np(jac["bias"]).reshape(n_rows, -1)[:, :1])
    return np.concatenate(cols, axis=1)


def signal_rows(module: nn.Module, R) -> np.ndarray:
    """S: per (sample, output location) the signal at the n outputs, in the row order of ``weight_rows``."""
    r = to_np(R)
    n = r.shape[_channel_dim(module)]
    if isinstance(module, nn.Conv2d):
        r = np.moveaxis(r, 1, -1)
    return r.reshape(-1, n)


def split_flat(module: nn.Module, flat: np.ndarray) -> dict[str, np.ndarray]:
    """[W | bias] (n x d) -> {"weight": ..., "bias": ...} shaped like the parameters."""
    k = module.weight[0].numel()
    out = {"weight": flat[:, :k].reshape(tuple(module.weight.shape))}
    if getattr(module, "bias", None) is not None:
        out["bias"] = flat[:, k]
    return out


def batch_size(x: torch.Tensor) -> int:
    return x.shape[0]


#: singular values of A below RCOND·σ_max are rounding noise of a zero one (lstsq's cut-off)
RCOND = 1e-10


def well_posed(module: nn.Module, x: torch.Tensor, noise: float = 1e-12, kept: float = 1e-3) -> bool:
    """True when the undamped weight problem has a clear numerical rank.

    Every singular value of A must be either rounding noise (< ``noise``·σ_max) or
    comfortably non-zero (>= ``kept``·σ_max). Between the two, the answer depends on
    where a solver cuts the rank, and a solver that factors ``G = AᵀA`` (condition
    κ(A)²) legitimately loses digits: no float64 reference can demand 1e-8 there.
    """
    s = np.linalg.svd(weight_rows(module, x), compute_uv=False)
    if s.size == 0 or s[0] == 0:
        return True
    r = s / s[0]
    return bool(np.all((r < noise) | (r >= kept)))


def weight_oracle(module: nn.Module, x: torch.Tensor, R, damping: float = 0.0,
                  damping_scale: str = "relative") -> dict[str, np.ndarray]:
    """Back-matched weight (and bias) gradients of a Linear / Conv2d layer."""
    a = weight_rows(module, x)
    s = signal_rows(module, R)
    assert a.shape[0] == s.shape[0]
    b = batch_size(x)
    if damping == 0.0:
        solution = np.linalg.lstsq(a, s, rcond=RCOND)[0]  # (d, n), minimum norm
        flat = b * solution.T
    else:
        gram = a.T @ a / b
        lam = damping if damping_scale == "absolute" else damping * float(np.mean(np.diag(gram)))
        g_w = s.T @ a
        flat = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), g_w.T).T  # G symmetric
    return split_flat(module, flat)


def damping_lambda(module: nn.Module, x: torch.Tensor, damping: float, damping_scale: str) -> float:
    a = weight_rows(module, x)
    gram = a.T @ a / batch_size(x)
    return damping if damping_scale == "absolute" else damping * float(np.mean(np.diag(gram)))


# ------------------------------------------------------------------ batchnorm

def batchnorm_oracle(module: nn.Module, x: torch.Tensor, R, weight_decay: float = 0.0) -> dict[str, np.ndarray]:
    """BatchNorm: g'_a = R·σ/γ; (g'_γ, g'_β) the least squares of ``b = γ x̂ + β`` per channel.

    σ and the mean are the batch's (training mode) or the running ones (eval mode). Per channel the
    rows ``[x̂, 1]`` of every sample and location and the targets ``B·R`` are one stacked problem:
    ``numpy.linalg.lstsq``'s minimum-norm answer; with weight decay ``(Aᵀ R + wd·θ) · pinv(AᵀA / B)``.
    """
    a = to_np(x)
    r = to_np(R)
    dims = (0,) + tuple(range(2, a.ndim))
    view = (1, -1) + (1,) * (a.ndim - 2)
    if module.training or module.running_mean is None:
        mean = a.mean(axis=dims)
        var = ((a - mean.reshape(view)) ** 2).mean(axis=dims)  # biased batch variance
    else:
        mean, var = to_np(module.running_mean), to_np(module.running_var)
    sigma = np.sqrt(var + module.eps)
    gamma = to_np(module.weight) if module.weight is not None else np.ones_like(sigma)
    scale = np.where(gamma != 0, sigma / np.where(gamma != 0, gamma, 1.0), 0.0)
    out = {"input": r * scale.reshape(view)}
    if module.weight is not None:
        x_hat = (a - mean.reshape(view)) / sigma.reshape(view)
        b = a.shape[0]
        beta = to_np(module.bias)
        solved = []
        for c in range(a.shape[1]):
            column = np.moveaxis(x_hat, 1, 0)[c].reshape(-1)
            target = np.moveaxis(r, 1, 0)[c].reshape(-1)
            rows = np.stack([column, np.ones_like(column)], axis=1)
            if weight_decay:
                g = rows.T @ target + weight_decay * np.array([gamma[c], beta[c]])
                solved.append(g @ np.linalg.pinv(rows.T @ rows / b, rcond=1e-10, hermitian=True))
            else:
                solved.append(np.linalg.lstsq(rows, b * target, rcond=None)[0])
        out["weight"], out["bias"] = np.array(solved).T
    return out


def grouped_conv_weight_oracle(module: nn.Conv2d, x: torch.Tensor, R, damping: float = 0.0) -> dict[str, np.ndarray]:
    """A grouped conv is ``groups`` independent convs: each group's outputs read only its inputs, so each group's
    weights are :func:`weight_oracle` of that sub-convolution on its channels."""
    g = module.groups
    cin, cout = module.in_channels // g, module.out_channels // g
    r = torch.as_tensor(to_np(R))
    parts = []
    for k in range(g):
        sub = nn.Conv2d(cin, cout, module.kernel_size, module.stride, module.padding, module.dilation,
                        bias=module.bias is not None).to(torch.float64)
        with torch.no_grad():
            sub.weight.copy_(module.weight[k * cout:(k + 1) * cout])
            if module.bias is not None:
                sub.bias.copy_(module.bias[k * cout:(k + 1) * cout])
        parts.append(weight_oracle(sub, x[:, k * cin:(k + 1) * cin], r[:, k * cout:(k + 1) * cout], damping))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def normalization_oracle(module: nn.Module, x: torch.Tensor, R, weight_decay: float = 0.0) -> dict[str, np.ndarray]:
    """GroupNorm / LayerNorm, from their definitions: g'_a = R·σ/γ (the Jacobian's diagonal γ/σ with the per-sample
    statistics held fixed); each element of γ (and β) the least squares of ``b = γ x̂ + β`` over every sample and
    location it is shared by, as :func:`batchnorm_oracle` does per channel."""
    a, r = to_np(x), to_np(R)
    if isinstance(module, nn.GroupNorm):
        grouped = a.reshape(a.shape[0], module.num_groups, -1)
        mean = np.broadcast_to(grouped.mean(-1, keepdims=True), grouped.shape).reshape(a.shape)
        var = np.broadcast_to(grouped.var(-1, keepdims=True), grouped.shape).reshape(a.shape)
        param_axes = (1,)  # γ per channel
    else:  # LayerNorm over the trailing normalized_shape
        k = len(module.normalized_shape)
        axes = tuple(range(a.ndim - k, a.ndim))
        mean, var = a.mean(axis=axes, keepdims=True), a.var(axis=axes, keepdims=True)
        param_axes = axes
    sigma = np.sqrt(var + module.eps)
    x_hat = (a - mean) / sigma
    gamma = (np.ones(()) if module.weight is None else
             to_np(module.weight).reshape([a.shape[i] if i in param_axes else 1 for i in range(a.ndim)]))
    out = {"input": np.where(gamma != 0, r * sigma / np.where(gamma != 0, gamma, 1.0), 0.0)}
    if module.weight is None:
        return out
    b = a.shape[0]
    shared = [i for i in range(a.ndim) if i not in param_axes]  # samples first, then locations
    order = list(param_axes) + shared
    xs = np.transpose(x_hat, order).reshape(int(np.prod([a.shape[i] for i in param_axes])), -1)
    rs = np.transpose(r, order).reshape(xs.shape)
    w = to_np(module.weight).reshape(-1)
    bias = to_np(module.bias).reshape(-1) if module.bias is not None else None
    solved = []
    for k in range(xs.shape[0]):
        rows = np.stack([xs[k], np.ones_like(xs[k])], axis=1) if bias is not None else xs[k][:, None]
        theta = np.array([w[k], bias[k]]) if bias is not None else np.array([w[k]])
        g = rows.T @ rs[k] + weight_decay * theta
        solved.append(g @ np.linalg.pinv(rows.T @ rows / b, rcond=1e-10, hermitian=True))
    solved = np.array(solved)
    out["weight"] = solved[:, 0].reshape(tuple(module.weight.shape))
    if bias is not None:
        out["bias"] = solved[:, 1].reshape(tuple(module.bias.shape))
    return out
