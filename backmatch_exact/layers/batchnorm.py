"""nn.BatchNorm1d / BatchNorm2d: ``b = γ (a - E[a]) / σ + β`` per unit (channel), eq. 24.

``σ = sqrt(Var[a] + eps)`` with the biased batch variance in training mode (the
running variance in eval mode) and the layer's own eps. ``nn.SyncBatchNorm`` has the
same rule; when it syncs (training, torch.distributed initialized, more than one
process in its group) the mean and σ are the global batch's, so the rule
all-reduces the per-channel sums (count-weighted, as the layer does).

* backprop:      g_a = (γ/σ)·g_b + the batch-statistics coupling terms of eq. 25
* back-matching: g'_a = g_b · σ / γ      (eq. 26: each unit matches its signal on its
                 own, so the coupling terms are dropped; γ = 1 without affine; γ = 0 gives 0)
                 (g'_γ, g'_β) = (g_γ, g_β) · G⁺ per channel, the least squares of ``b = γ x̂ + β``
                 with the 2x2 Gram  G = [[Σ_u E[x̂²], Σ_u E[x̂]], [Σ_u E[x̂], L]]  (the conv convention:
                 mean over samples, sum over the L locations; weight decay added to g_γ, g_β first).
                 With batch statistics E[x̂] = 0 and it decouples: g'_γ = g_γ / Σ_u E[x̂²], g'_β = g_β / L.
                 With running statistics (eval mode) E[x̂] ≠ 0 and the 2x2 is solved in full.
* approximate:   Var[a] ≈ ‖W‖²_{2,µ} of the weight layer that produced a (row homogeneity with
                 normalized inputs), so r = g_a / g'_a = γ²/σ² ≈ mean(γ²) / ‖W‖²_{2,µ}   (eq. 36;
                 γ = 1 without affine)
"""

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UnsupportedModuleError
from ..solver import safe_divide
from .base import LayerRule, mean_sq_row_norm, squared_norm


def _channel_view(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Reshape a per-channel vector to broadcast against ``a`` (channels on dim 1)."""
    return t.reshape((1, -1) + (1,) * (a.dim() - 2))


def _reduce_dims(a: torch.Tensor) -> list[int]:
    return [0] + list(range(2, a.dim()))


def _sync_group(module) -> "dist.ProcessGroup | None":
    """The process group a SyncBatchNorm took this batch's statistics over (its forward's own test), else None."""
    if not (isinstance(module, nn.SyncBatchNorm) and module.training and dist.is_available()
            and dist.is_initialized()):
        return None
    group = module.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _batch_mean(module, a: torch.Tensor) -> torch.Tensor:
    """Per-channel batch mean; for a syncing SyncBatchNorm, over every rank's batch (one small all-reduce)."""
    dims, group = _reduce_dims(a), _sync_group(module)
    if group is None:
        return a.mean(dim=dims)
    sums = torch.cat([a.sum(dim=dims), a.new_tensor([a.numel() // a.shape[1]])])
    dist.all_reduce(sums, group=group)
    return sums[:-1] / sums[-1]


def _batch_var(module, a: torch.Tensor) -> torch.Tensor:
    """Per-channel biased batch variance; for a syncing SyncBatchNorm, the global one (two small all-reduces)."""
    dims, group = _reduce_dims(a), _sync_group(module)
    if group is None:
        return a.var(dim=dims, unbiased=False)
    squares = ((a - _channel_view(_batch_mean(module, a), a)) ** 2).sum(dim=dims)
    squares = torch.cat([squares, a.new_tensor([a.numel() // a.shape[1]])])
    dist.all_reduce(squares, group=group)
    return squares[:-1] / squares[-1]


def batch_std(module: nn.modules.batchnorm._BatchNorm, a: torch.Tensor) -> torch.Tensor:
    """σ per channel, exactly as the layer normalized this batch (SyncBatchNorm: the global batch's σ)."""
    a = a.detach()
    uses_batch_stats = module.training or module.running_var is None
    var = _batch_var(module, a) if uses_batch_stats else module.running_var
    return torch.sqrt(var + module.eps)


def normalized(module, a: torch.Tensor) -> torch.Tensor:
    """x̂ = (a - mean) / σ, as the layer computed it."""
    a = a.detach()
    uses_batch_stats = module.training or module.running_mean is None
    mean = _batch_mean(module, a) if uses_batch_stats else module.running_mean
    return (a - _channel_view(mean, a)) / _channel_view(batch_std(module, a), a)


def _gram_entries(module, a: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    dims = _reduce_dims(a)
    squares = (x_hat * x_hat).sum(dim=dims) / a.shape[0]
    uses_batch_stats = module.training or module.running_mean is None
    means = torch.zeros_like(squares) if uses_batch_stats else x_hat.sum(dim=dims) / a.shape[0]
    return torch.stack([squares, means])


class BatchNormRule(LayerRule):
    needs_output_signal = True
    normalizes = True

    def approx_ratio(self, module, place) -> float:
        if place.producer is None:
            raise UnsupportedModuleError(
                f"{type(module).__name__} with no weight layer before it: Algorithm 1 estimates its variance "
                "from the weights of the layer that feeds it"
            )
        gamma_sq = squared_norm(module.weight, place) / module.weight.numel() if module.weight is not None else 1.0
        return gamma_sq / mean_sq_row_norm(place.producer.weight, place)  # eq. 36

    def numerator(self, module, a, grad_input, grad_output, switches):
        """eq. 26 keeps only the diagonal of J, ``γ/σ``: ``g_b·γ/σ``, the coupling terms dropped (eq. 11);
        switch ``bn_coupling``: backprop's full ``Jᵀ g_b``, as Algorithm 1 transports it."""
        if switches.bn_coupling:
            return grad_input
        return grad_output * _channel_view(self._gain(module, a), a)

    def transforms_numerator(self, switches) -> bool:
        return not switches.bn_coupling

    def denominator(self, module, a, signal_damping, switches, factors):
        """``(γ/σ)²`` per channel (so a sole consumer sends ``g_b·σ/γ``, eq. 26); switch ``bn_variance``:
        Algorithm 1's ratio, which estimates Var[a] by ``‖W_prev‖²_{2,µ}``."""
        if switches.bn_variance:
            return factors.ratio
        return _channel_view(self._gain(module, a), a) ** 2

    @staticmethod
    def _gain(module, a) -> torch.Tensor:
        """γ/σ per channel (1/σ without affine): the diagonal of the layer's Jacobian."""
        sigma = batch_std(module, a)
        return 1.0 / sigma if module.weight is None else module.weight.detach() / sigma

    def solves_parameters(self, module) -> bool:
        return module.weight is not None

    def parameter_gram(self, module, a):
        """Per channel ``[Σ_u E[x̂²], Σ_u E[x̂]]`` (2 x C): the entries of the 2x2 Gram that depend on the data.

        With batch statistics ``Σ_u E[x̂]`` is zero by construction and is set to exactly 0, so that the
        solve reduces to the diagonal one bit for bit. Ranks with equal batches average these (the
        average of their means is the global mean).
        """
        return _gram_entries(module, a, normalized(module, a))

    def parameter_gradients(self, module, a, grad_output, weight_decay: float, gram=None):
        """``(g'_γ, g'_β) = (g_γ + wd·γ, g_β + wd·β) · G⁺`` per channel, G the 2x2 Gram of ``b = γ x̂ + β``.

        By the Schur complement ``s = Σ_u E[x̂²] - L·μ²`` of ``L`` (μ = mean of x̂ over samples and
        locations): ``g'_γ = (g_γ - μ g_β) / s``, ``g'_β = g_β / L - μ g'_γ``; with batch statistics μ = 0
        and this is ``g_γ / Σ_u E[x̂²]``, ``g_β / L``. A channel whose s is within rounding of the
        subtracted ``L·μ²`` (x̂ constant: G of rank 1, ``G = L·v vᵀ`` with ``v = (μ, 1)``) gets the
        minimum-norm answer ``v (v·g) / (L |v|⁴)``. ``gram``: :meth:`parameter_gram`'s value (flat is
        fine), e.g. the ranks' average. Plain: autograd's ``g_γ, g_β``, which the engine uses to cross-check.
        """
        x_hat = normalized(module, a)
        dims = _reduce_dims(a)
        plain = {"weight": (grad_output * x_hat).sum(dim=dims), "bias": grad_output.sum(dim=dims)}
        g_gamma = plain["weight"] + weight_decay * module.weight.detach()
        g_beta = plain["bias"] + weight_decay * module.bias.detach()
        squares, means = (_gram_entries(module, a, x_hat) if gram is None else gram).reshape(2, -1)
        locations = a[0, 0].numel() if a.dim() > 2 else 1
        mu = means / locations
        schur = squares - means * mu
        # rounding of s when x̂ is constant, relative to L·μ², grows like √N·eps over N = samples x locations
        # (measured in float32: at most 6.7·eps at N = 16, 41·eps at N = 2¹⁵, 230·eps at N = 2²⁰)
        noise = ((a.numel() // a.shape[1]) ** 0.5 + 8) * torch.finfo(schur.dtype).eps * means * mu
        full_rank = schur > noise
        gamma = safe_divide(g_gamma - mu * g_beta, schur, full_rank)
        beta = g_beta / locations - mu * gamma
        norm_sq = mu * mu + 1.0  # rank 1: the minimum-norm answer along v = (μ, 1)
        along = (mu * g_gamma + g_beta) / (locations * norm_sq * norm_sq)
        return {"weight": torch.where(full_rank, gamma, mu * along),
                "bias": torch.where(full_rank, beta, along)}, plain
