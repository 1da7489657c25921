"""The normalizations: BatchNorm (1d/2d, Sync), GroupNorm and LayerNorm, ``b = γ (a - E[a]) / σ + β``.

They differ only in what the statistics are taken over; everything else is one rule
(:class:`NormalizationRule`), each subclass saying where its mean and σ come from and
how its γ, β line up with the input:

=================  ===================================  ==========================================
layer              mean and σ over                        γ, β per
=================  ===================================  ==========================================
BatchNorm1d/2d     the batch and the locations, per       channel (running statistics in eval mode;
                   channel                                 SyncBatchNorm: the global batch's)
GroupNorm          each sample's group of channels         channel
LayerNorm          each sample's ``normalized_shape``      element of ``normalized_shape``
=================  ===================================  ==========================================

``σ = sqrt(Var[a] + eps)`` with the biased variance and the layer's own eps. When a
SyncBatchNorm syncs (training, torch.distributed initialized, more than one process
in its group) the mean and σ are the global batch's, so the rule all-reduces the
per-channel sums (count-weighted, as the layer does).

* backprop:      g_a = (γ/σ)·g_b + the statistics' coupling terms (eq. 25 for BatchNorm)
* back-matching: g'_a = g_b · σ / γ      (eq. 26: each unit matches its signal on its
                 own, so the coupling terms are dropped, as eq. 11 prescribes; γ = 1 without
                 affine; γ = 0 gives 0)
                 (g'_γ, g'_β) = (g_γ, g_β) · G⁺ per element of γ, the least squares of ``b = γ x̂ + β``
                 with the 2x2 Gram  G = [[Σ_u E[x̂²], Σ_u E[x̂]], [Σ_u E[x̂], L]]  (the conv convention:
                 mean over samples, sum over the L locations that share the element; weight decay
                 added to g_γ, g_β first). With BatchNorm's batch statistics E[x̂] = 0 and it
                 decouples: g'_γ = g_γ / Σ_u E[x̂²], g'_β = g_β / L. With running statistics (eval
                 mode), or GroupNorm's and LayerNorm's per-sample ones, the 2x2 is solved in full.
* approximate:   Var[a] ≈ ‖W‖²_{2,µ} of the weight layer that produced a (row homogeneity with
                 normalized inputs), so r = g_a / g'_a = γ²/σ² ≈ mean(γ²) / ‖W‖²_{2,µ}   (eq. 36;
                 γ = 1 without affine; the same estimate for GroupNorm and LayerNorm)
"""

import math
import weakref

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


def _batch_moments(module, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance, in one pass; for a syncing SyncBatchNorm the global batch's
    (two small all-reduces, count-weighted as the layer does)."""
    dims, group = _reduce_dims(a), _sync_group(module)
    if group is None:
        # torch's own kernel for a batch norm's statistics (biased variance): 3–4x var_mean over dims (0, 2, 3)
        # on the CPU, which was 70 of ResNet-20's 555 ms exact step at batch 128
        return torch.batch_norm_update_stats(a, None, None, 0.0)
    count = a.new_tensor([a.numel() // a.shape[1]])
    sums = torch.cat([a.sum(dim=dims), count])
    dist.all_reduce(sums, group=group)
    mean = sums[:-1] / sums[-1]
    squares = torch.cat([((a - _channel_view(mean, a)) ** 2).sum(dim=dims), count])
    dist.all_reduce(squares, group=group)
    return mean, squares[:-1] / squares[-1]


#: autograd nodes of torch's own normalization kernels, whose grad_inputs are (input, weight, bias)
_NATIVE_NODES = ("NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0",
                 "NativeGroupNormBackward0", "NativeLayerNormBackward0")


class NormalizationRule(LayerRule):
    """What the normalizations share; subclasses say where the statistics and the parameters sit."""

    needs_output_signal = True
    normalizes = True

    def __init__(self):
        # per module: (its last input, that input's version, its statistics), which the call's next questions reuse
        self._known = weakref.WeakKeyDictionary()

    def statistics(self, module, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, σ) as the layer normalized ``a`` with, each broadcastable against ``a``.

        Computed once per input (or taken from the layer's autograd node, :meth:`remember`): a call's
        numerator, denominator and γ, β solve ask in turn (one reduction over the input each time otherwise,
        a third of BatchNorm's share of an exact step).
        """
        known = self._known.get(module)
        if known is not None and known[0]() is a and known[1] == a._version:
            return known[2]
        result = self._statistics(module, a.detach())
        self._keep(module, a, result)
        return result

    def _keep(self, module, a: torch.Tensor, statistics: tuple) -> None:
        self._known[module] = (weakref.ref(a), a._version, statistics)

    def remember(self, module, a: torch.Tensor, node) -> None:
        """Keep the statistics ``node``, the autograd node of the call that normalized ``a``, saved, where it saved
        them (:meth:`statistics` then reduces nothing)."""

    # ---------------------------------------------------------------- what differs
    def _statistics(self, module, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def parameter_view(self, module, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like γ, reshaped to broadcast against ``a`` (here: one per channel, dim 1)."""
        return _channel_view(t, a)

    def parameter_dims(self, module, a: torch.Tensor) -> list[int]:
        """The dims of ``a`` that an element of γ is shared over (samples first): its gradient sums them
        (here: all but the channels)."""
        return _reduce_dims(a)

    def centered(self, module) -> bool:
        """Whether E[x̂] over what an element of γ sees is zero by construction (BatchNorm's batch statistics)."""
        return False

    # ---------------------------------------------------------------- shared
    def std(self, module, a: torch.Tensor) -> torch.Tensor:
        """σ, broadcastable against ``a``."""
        return self.statistics(module, a)[1]

    def normalized(self, module, a: torch.Tensor) -> torch.Tensor:
        """x̂ = (a - mean) / σ, as the layer computed it."""
        mean, sigma = self.statistics(module, a)
        return (a.detach() - mean) / sigma

    def _gain(self, module, a) -> torch.Tensor:
        """γ/σ (1/σ without affine), broadcastable against ``a``: the diagonal of the layer's Jacobian."""
        sigma = self.std(module, a)
        return 1.0 / sigma if module.weight is None else self.parameter_view(module, a, module.weight.detach()) / sigma

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
        return grad_output * self._gain(module, a)

    def transforms_numerator(self, switches) -> bool:
        return not switches.bn_coupling

    def denominator(self, module, a, signal_damping, switches, factors):
        """``(γ/σ)²`` (so a sole consumer sends ``g_b·σ/γ``, eq. 26); switch ``bn_variance``: Algorithm 1's
        ratio, which estimates Var[a] by ``‖W_prev‖²_{2,µ}``."""
        if switches.bn_variance:
            return factors.ratio
        return self._gain(module, a) ** 2

    def solves_parameters(self, module) -> bool:
        return module.weight is not None

    def autograd_parameter_grads(self, module, node):
        """torch's native normalization nodes hand out ``(g_input, g_γ, g_β)``. (Where a float32 input is
        huge, 1e20 in a diverging run, torch's g_γ can be 14 % off the float64 value while the rule's own
        sum is right to 1e-7: comparing the two by a tolerance would blame an outside gradient.)"""
        if node is None or node.name() not in _NATIVE_NODES:
            return None
        return lambda grad_inputs: {"weight": grad_inputs[1], "bias": grad_inputs[2]}

    def parameter_gram(self, module, a):
        """Per element of γ ``[Σ_u E[x̂²], Σ_u E[x̂]]`` (2 x γ's size): the entries of the 2x2 Gram that depend on
        the data. Where the statistics center x̂ (BatchNorm's batch statistics) ``Σ_u E[x̂]`` is set to exactly
        0, so that the solve reduces to the diagonal one bit for bit. Ranks with equal batches average these
        (the average of their means is the global mean)."""
        return self._gram_entries(module, a, self.normalized(module, a))

    def _gram_entries(self, module, a: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        dims = self.parameter_dims(module, a)
        squares = (x_hat * x_hat).sum(dim=dims) / a.shape[0]
        means = torch.zeros_like(squares) if self.centered(module) else x_hat.sum(dim=dims) / a.shape[0]
        return torch.stack([squares, means])

    def parameter_gradients(self, module, a, grad_output, weight_decay: float, gram=None):
        """``(g'_γ, g'_β) = (g_γ + wd·γ, g_β + wd·β) · G⁺`` per element, G the 2x2 Gram of ``b = γ x̂ + β``.

        By the Schur complement ``s = Σ_u E[x̂²] - L·μ²`` of ``L`` (μ = mean of x̂ over samples and
        locations): ``g'_γ = (g_γ - μ g_β) / s``, ``g'_β = g_β / L - μ g'_γ``; with centered statistics μ = 0
        and this is ``g_γ / Σ_u E[x̂²]``, ``g_β / L``. An element whose s is within rounding of the
        subtracted ``L·μ²`` (x̂ constant: G of rank 1, ``G = L·v vᵀ`` with ``v = (μ, 1)``) gets the
        minimum-norm answer ``v (v·g) / (L |v|⁴)``. Without β (a LayerNorm with ``bias=False``) it is the
        1x1 ``g'_γ = g_γ / Σ_u E[x̂²]``. ``gram``: :meth:`parameter_gram`'s value (flat is fine), e.g. the
        ranks' average. Plain: autograd's ``g_γ, g_β``, which the engine uses to cross-check.
        """
        x_hat = self.normalized(module, a)
        dims = self.parameter_dims(module, a)
        shape = module.weight.shape
        plain = {"weight": (grad_output * x_hat).sum(dim=dims).reshape(shape)}
        if module.bias is not None:
            plain["bias"] = grad_output.sum(dim=dims).reshape(shape)
        g_gamma = plain["weight"] + weight_decay * module.weight.detach()
        squares, means = (self._gram_entries(module, a, x_hat) if gram is None else gram).reshape(2, *shape)
        if module.bias is None:
            return {"weight": safe_divide(g_gamma, squares)}, plain
        g_beta = plain["bias"] + weight_decay * module.bias.detach()
        locations = math.prod(a.shape[d] for d in dims[1:])
        mu = means / locations
        schur = squares - means * mu
        # rounding of s when x̂ is constant, relative to L·μ², grows like √N·eps over N = samples x locations
        # (measured in float32: at most 6.7·eps at N = 16, 41·eps at N = 2¹⁵, 230·eps at N = 2²⁰)
        noise = (math.prod(a.shape[d] for d in dims) ** 0.5 + 8) * torch.finfo(schur.dtype).eps * means * mu
        full_rank = schur > noise
        gamma = safe_divide(g_gamma - mu * g_beta, schur, full_rank)
        beta = g_beta / locations - mu * gamma
        norm_sq = mu * mu + 1.0  # rank 1: the minimum-norm answer along v = (μ, 1)
        along = (mu * g_gamma + g_beta) / (locations * norm_sq * norm_sq)
        return {"weight": torch.where(full_rank, gamma, mu * along),
                "bias": torch.where(full_rank, beta, along)}, plain


class BatchNormRule(NormalizationRule):
    """BatchNorm1d/2d and SyncBatchNorm: per channel, over the batch and the locations."""

    def remember(self, module, a, node):
        """torch's batch norm kernel saves the batch mean and 1/σ with batch statistics (σ = 1/that differs from
        ``sqrt(Var + eps)`` by rounding); running statistics are read from the module anyway."""
        if node is None or node.name() != "NativeBatchNormBackward0" or not self.centered(module):
            return
        mean, inverse = node._saved_result1, node._saved_result2
        if mean.dtype == a.dtype and mean.shape == (a.shape[1],):
            self._keep(module, a, (_channel_view(mean, a), _channel_view(1.0 / inverse, a)))

    def _statistics(self, module, a):
        if module.training or module.running_mean is None:
            mean, var = _batch_moments(module, a)
        else:
            mean, var = module.running_mean, module.running_var
        return _channel_view(mean, a), _channel_view(torch.sqrt(var + module.eps), a)

    def centered(self, module) -> bool:
        return module.training or module.running_mean is None


class GroupNormRule(NormalizationRule):
    """GroupNorm: per sample, over its group of channels and the locations; γ, β per channel."""

    def _statistics(self, module, a):
        var, mean = torch.var_mean(a.reshape(a.shape[0], module.num_groups, -1), dim=-1, unbiased=False)
        per_channel = a.shape[1] // module.num_groups  # (each group's statistics for each of its channels)
        shape = a.shape[:2] + (1,) * (a.dim() - 2)
        return (mean.repeat_interleave(per_channel, dim=1).reshape(shape),
                torch.sqrt(var + module.eps).repeat_interleave(per_channel, dim=1).reshape(shape))


class LayerNormRule(NormalizationRule):
    """LayerNorm: per sample (and leading position), over ``normalized_shape``; γ, β per element of it."""

    def _statistics(self, module, a):
        dims = list(range(a.dim() - len(module.normalized_shape), a.dim()))
        var, mean = torch.var_mean(a, dim=dims, unbiased=False, keepdim=True)
        return mean, torch.sqrt(var + module.eps)

    def parameter_view(self, module, a, t):
        return t.reshape((1,) * (a.dim() - t.dim()) + tuple(t.shape))

    def parameter_dims(self, module, a):
        return list(range(a.dim() - len(module.normalized_shape)))
