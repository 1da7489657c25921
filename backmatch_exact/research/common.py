"""What the research commands share: the models and optimizers they can train, and how to build them."""

from __future__ import annotations

import torch
from torch import nn

import backmatch_exact as bm

OPTIMIZERS = ("sgd", "approx", "exact", "exact_weights", "lars", "lsalr")
ENGINE_MODES = ("approx", "exact", "exact_weights")
MODELS = ("lenet", "vgg11", "vgg13", "vgg16", "vgg19")


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """``"lenet"`` → LeNet-BN, ``"vgg11"`` … ``"vgg19"`` → VGG-BN of that depth."""
    if name == "lenet":
        return bm.models.lenet_bn(in_channels, num_classes)
    if name.startswith("vgg") and name[3:].isdigit():
        return bm.models.vgg_bn(int(name[3:]), in_channels, num_classes)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def make_optimizer(name: str, model: nn.Module, lr: float, momentum: float = 0.0, nesterov: bool = False,
                   weight_decay: float = 0.0, damping: float = 0.0, signal_damping: float = 0.0,
                   signals: str = "per_unit"):
    """The optimizer ``name`` for ``model``, and the back-matching engine it needs (None for sgd/lars/lsalr).

    ``signals``: the input signal rule of ``exact`` (``"per_unit"`` or ``"joint"``).

    Engine modes get the weight decay through ``attach`` and an SGD with
    ``weight_decay=0``; the others keep it in the optimizer. Detach the engine
    (``engine.detach()``) when done with the model.
    """
    params = model.parameters()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay), None
    if name in ("lars", "lsalr"):
        cls = bm.optim.LARS if name == "lars" else bm.optim.LSALR
        return cls(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay), None
    if name in ENGINE_MODES:
        engine = bm.attach(model, mode=name, damping=damping, signal_damping=signal_damping,
                           weight_decay=weight_decay, signals=signals)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0), engine
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
