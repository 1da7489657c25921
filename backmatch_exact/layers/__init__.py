"""The table from module type to its backward rules. An unknown type is an error, never backprop."""

from torch import nn

from ..errors import UnsupportedModuleError
from .activation import DropoutRule, LeakyReLURule, ReLURule
from .base import LayerRule, WeightRule
from .normalization import BatchNormRule, GroupNormRule, LayerNormRule
from .conv import Conv2dRule
from .linear import LinearRule
from .passthrough import PassThroughRule
from .pooling import AdaptiveAvgPool2dRule, AvgPool2dRule, MaxPool2dRule

RULES: dict[type, LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv2d: Conv2dRule(),
    nn.BatchNorm1d: BatchNormRule(),
    nn.BatchNorm2d: BatchNormRule(),
    nn.SyncBatchNorm: BatchNormRule(),  # σ is the global batch's when it syncs (layers/normalization.py)
    nn.GroupNorm: GroupNormRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.ReLU: ReLURule(),
    nn.LeakyReLU: LeakyReLURule(),
    nn.Dropout: DropoutRule(),
    nn.MaxPool2d: MaxPool2dRule(),
    nn.AvgPool2d: AvgPool2dRule(),
    nn.AdaptiveAvgPool2d: AdaptiveAvgPool2dRule(),
    nn.Flatten: PassThroughRule(),
    nn.Identity: PassThroughRule(),
}


def rule_for(module: nn.Module, path: str) -> LayerRule:
    """The rule for ``module`` (exact type match: a subclass may change the forward), checked."""
    rule = RULES.get(type(module))
    if rule is None:
        supported = ", ".join(sorted(t.__name__ for t in RULES))
        raise UnsupportedModuleError(
            f"layer {path!r} ({type(module).__name__}) has no back-matching rule; supported: {supported}"
        )
    rule.check(module, path)
    return rule


__all__ = ["RULES", "rule_for", "LayerRule", "WeightRule"]
