"""Layer-wise adaptive SGD optimizers: LARS and LSALR.

These are the two layer-wise learning-rate baselines used in the back-matching
paper (Zhang, Chen, Liu 2018, §4.1).  A *layer* is one parameter tensor: a weight matrix and its
bias are two layers, each with its own local learning rate.

Both optimizers share one update chain, applied independently per tensor ``W``
with gradient ``∇W`` (the order follows ``optax.lars``)::

    g      = ∇W + weight_decay · W                  # 1. weight decay (coupled, L2)
    s      = layer_scale(W, g)                      # 2. layer-wise factor (below)
    u      = lr · s · g                             #    locally scaled gradient
    buf    = momentum · buf + u                     # 3. momentum, torch.optim.SGD
    step   = u + momentum · buf   if nesterov       #    semantics (no dampening,
           = buf                  otherwise         #    buf starts at u)
    W      = W − step                               # 4. update

With ``momentum == 0`` no buffer is kept and ``step = u``.  Because ``lr`` is
folded in *before* the momentum buffer (torch.optim.SGD convention, not optax's
"scale by lr last"), a change of ``lr`` between steps (scheduler) only affects
new contributions to the buffer.

The layer factor ``s`` is

* **LARS** (You, Gitman, Ginsburg 2017): ``s = ‖W‖₂ / (‖g‖₂ + eps)``, the trust
  ratio, with Frobenius norms of the whole tensor.  ``g`` is the gradient
  *after* weight decay, i.e. the vector that is actually stepped, so the local
  step size ``‖u‖ = lr · ‖W‖`` (for ``eps = 0``) is exactly relative to the
  weight norm.  Departures from the paper: the paper's trust coefficient ``η``
  is absorbed into ``lr``, and the paper writes ``‖∇W‖ + β‖W‖`` in the
  denominator where we use ``‖∇W + βW‖`` (as optax does).  If ``‖W‖ = 0`` or
  ``‖g‖ = 0`` the ratio is undefined; we use ``s = 1`` (a plain SGD step for
  that tensor), so freshly zero-initialised tensors such as biases still move.
* **LSALR** (Singh, De, Zhang, Goldstein, Taylor 2015, "Layer-specific adaptive
  learning rates"): ``s = 1 + log(1 + 1/‖g‖₂)``.  It enlarges steps where
  gradients are small.  If ``‖g‖ = 0`` the step is zero anyway; we define
  ``s = 1`` so that nothing is ``inf``/``NaN``.  The factor is evaluated in a
  form that never forms ``1/‖g‖``, so tiny non-zero norms give a finite, large
  ``s`` even where ``1/‖g‖`` would overflow (e.g. float16).
  Any schedule on the base rate is left to a ``torch.optim.lr_scheduler``.

Parameters whose ``.grad`` is ``None`` are skipped (no state is created).
Sparse gradients are rejected.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["LARS", "LSALR", "lars_scale", "lsalr_scale", "layer_adaptive_sgd"]


# --------------------------------------------------------------------------
# Functional kernel
# --------------------------------------------------------------------------

def lars_scale(w: Tensor, g: Tensor, eps: float = 0.0) -> Tensor:
    """LARS trust ratio ``‖w‖ / (‖g‖ + eps)``; ``1`` if ``‖w‖ = 0`` or ``‖g‖ = 0``.

    Returns a 0-dim tensor (no host sync). ``g`` should already include weight decay.
    """
    w_norm = torch.linalg.vector_norm(w)
    g_norm = torch.linalg.vector_norm(g)
    ratio = w_norm / (g_norm + eps)
    degenerate = (w_norm == 0) | (g_norm == 0)
    return torch.where(degenerate, torch.ones_like(ratio), ratio)


def lsalr_scale(g: Tensor) -> Tensor:
    """LSALR factor ``1 + log(1 + 1/‖g‖)``; ``1`` if ``‖g‖ = 0``.

    Uses ``log1p(n) - log(n)`` for ``n < 1`` (exact same value, no overflow of
    ``1/n``) and ``log1p(1/n)`` otherwise (no cancellation).
    """
    n = torch.linalg.vector_norm(g)
    small = torch.log1p(n) - torch.log(n)          # good for n < 1
    large = torch.log1p(torch.reciprocal(n))       # good for n >= 1
    s = 1.0 + torch.where(n < 1, small, large)
    return torch.where(n == 0, torch.ones_like(s), s)


def layer_adaptive_sgd(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Optional[Tensor]],
    *,
    layer_scale: Callable[[Tensor, Tensor], Tensor],
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
) -> None:
    """In-place layer-adaptive SGD step (see module docstring for the chain).

    ``momentum_buffers`` is updated in place: ``None`` entries are replaced by
    the newly created buffer when ``momentum > 0``.
    """
    for i, (p, grad) in enumerate(zip(params, grads)):
        g = grad.add(p, alpha=weight_decay) if weight_decay != 0 else grad
        u = g.mul(layer_scale(p, g) * lr)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = torch.clone(u).detach()
                momentum_buffers[i] = buf
            else:
                buf.mul_(momentum).add_(u)
            step = u.add(buf, alpha=momentum) if nesterov else buf
        else:
            step = u
        p.sub_(step)


# --------------------------------------------------------------------------
# Optimizer bookkeeping
# --------------------------------------------------------------------------

class _LayerAdaptiveSGD(Optimizer):
    """Shared bookkeeping for layer-wise adaptive SGD.

    Subclasses implement :meth:`_layer_scale` (and may add hyper-parameters,
    validated in :meth:`_validate_extra`).
    """

    def __init__(self, params, defaults: dict):
        self._validate(defaults)
        super().__init__(params, defaults)

    # -- validation ------------------------------------------------------
    @classmethod
    def _validate(cls, group: dict) -> None:
        lr, momentum = group["lr"], group["momentum"]
        wd, nesterov = group["weight_decay"], group["nesterov"]
        if isinstance(lr, Tensor):
            raise ValueError("lr must be a Python float, not a Tensor")
        if not lr >= 0.0:  # also rejects NaN
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
        if not momentum >= 0.0:
            raise ValueError(f"Invalid momentum value: {momentum} (must be >= 0)")
        if not wd >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {wd} (must be >= 0)")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum requires momentum > 0")
        cls._validate_extra(group)

    @classmethod
    def _validate_extra(cls, group: dict) -> None:
        pass

    def add_param_group(self, param_group: dict) -> None:
        # Validate per-group overrides too (torch.optim only checks defaults).
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate(merged)
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    # -- the layer factor -------------------------------------------------
    def _layer_scale(self, group: dict) -> Callable[[Tensor, Tensor], Tensor]:
        """Return ``f(W, g) -> s`` for this group (``g`` includes weight decay)."""
        raise NotImplementedError

    # -- step ------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Perform one optimisation step; ``closure`` re-evaluates and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params: List[Tensor] = []
            grads: List[Tensor] = []
            bufs: List[Optional[Tensor]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                params.append(p)
                grads.append(p.grad)
                bufs.append(self.state[p].get("momentum_buffer"))

            layer_adaptive_sgd(
                params, grads, bufs,
                layer_scale=self._layer_scale(group),
                lr=group["lr"],
                momentum=group["momentum"],
                nesterov=group["nesterov"],
                weight_decay=group["weight_decay"],
            )

            if group["momentum"] != 0:
                for p, buf in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = buf
        return loss


class LARS(_LayerAdaptiveSGD):
    r"""Layer-wise Adaptive Rate Scaling (You et al. 2017).

    Per tensor ``W``: ``g = ∇W + wd·W``; local lr ``= lr · ‖W‖ / (‖g‖ + eps)``
    (Frobenius norms; ratio ``1`` if ``‖W‖ = 0`` or ``‖g‖ = 0``); then
    torch.optim.SGD-style (Nesterov) momentum on the scaled gradient.  ``lr``
    plays the role of the paper's trust coefficient ``η`` times the global rate.
    See the module docstring for the full chain and the departures from the paper.

    Args:
        params: iterable of tensors or param-group dicts.
        lr: global learning rate (>= 0).
        momentum: momentum factor (>= 0).
        nesterov: Nesterov momentum (requires ``momentum > 0``).
        weight_decay: coupled L2 coefficient (>= 0), added to the gradient
            *before* the trust ratio is computed.
        eps: added to ``‖g‖`` in the trust-ratio denominator (>= 0).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, eps: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      weight_decay=weight_decay, eps=eps))

    @classmethod
    def _validate_extra(cls, group: dict) -> None:
        if not group["eps"] >= 0.0:
            raise ValueError(f"Invalid eps value: {group['eps']} (must be >= 0)")

    def _layer_scale(self, group):
        eps = group["eps"]
        return lambda w, g: lars_scale(w, g, eps)


class LSALR(_LayerAdaptiveSGD):
    r"""Layer-Specific Adaptive Learning Rates (Singh et al. 2015).

    Per tensor ``W``: ``g = ∇W + wd·W``; local lr ``= lr · (1 + log(1 + 1/‖g‖))``
    (Frobenius norm; factor ``1`` if ``‖g‖ = 0``, where the step is zero anyway);
    then torch.optim.SGD-style (Nesterov) momentum on the scaled gradient.
    See the module docstring for the full chain and the departures from the paper.

    Args:
        params: iterable of tensors or param-group dicts.
        lr: global learning rate (>= 0).
        momentum: momentum factor (>= 0).
        nesterov: Nesterov momentum (requires ``momentum > 0``).
        weight_decay: coupled L2 coefficient (>= 0), added to the gradient
            *before* the LSALR factor is computed.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      weight_decay=weight_decay))

    def _layer_scale(self, group):
        return lambda w, g: lsalr_scale(g)
