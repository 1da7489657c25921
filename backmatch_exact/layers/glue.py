"""The functional glue between modules in a branching network (SPEC §8): what each op's Jacobian is.

A residual network's ``forward`` joins modules with a few functional ops. Each is
linear in its inputs with a Jacobian simple enough that the squared norm of a
column, the denominator the op adds to its input's back-matched signal, is a
constant or another rule's:

* ``a + b``, ``torch.add(a, b, alpha=α)``, ``out += identity``, ``a - b``: ``J = c·I``
  for an input with coefficient c, so ``c²`` — times the number of positions an
  input is broadcast to. The same tensor twice (``x + x``) is one input with
  ``c = 2``: denominator 4.
* ``torch.cat``: the identity on each slice; a tensor that appears k times has k.
* ``α·x``, ``x / α``, ``-x`` (α a Python number): ``α²``, ``1/α²``, 1.
* views, reshape, flatten, permute, transpose, squeeze, clone, contiguous: a
  permutation of the units, 1.
* ``F.relu`` / ``torch.relu`` / ``x.relu()``, ``F.max_pool2d``, ``F.avg_pool2d``,
  ``F.adaptive_avg_pool2d``: the rule of the module that does the same
  (:class:`~torch.nn.ReLU`, :class:`~torch.nn.MaxPool2d`, ...), applied to an
  equivalent module built from the call's arguments.

These ops are never signal-damped, like ``Flatten`` and ``Identity``; the pools
are, like their modules. :func:`parse` turns one intercepted call into a
:class:`GlueCall`, or None when back-matching has no rule for it.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .activation import ReLURule
from .base import LayerRule
from .pooling import AdaptiveAvgPool2dRule, AvgPool2dRule, MaxPool2dRule


class GlueRule(LayerRule):
    """A linear op whose per-input denominators are constants (:attr:`GlueCall.denominators`)."""

    changes_signal = False


GLUE = GlueRule()


@dataclasses.dataclass
class GlueCall:
    """One functional op: its rule, the module that stands for it, its differentiable inputs and their
    constant denominators (None: the rule's ``denominator`` on that input)."""

    name: str
    rule: LayerRule
    module: nn.Module | None
    inputs: list[torch.Tensor]
    denominators: list[float | None]


def _numbers(value) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _linear_combination(name: str, terms: list[tuple[object, float]], out: torch.Tensor) -> GlueCall | None:
    """``Σ c_k · t_k`` (+ constants): each distinct tensor that requires grad, with ``(Σ its c)² · copies``."""
    coefficients: dict[int, list] = {}
    for term, coefficient in terms:
        if isinstance(term, torch.Tensor) and term.requires_grad:
            entry = coefficients.setdefault(id(term), [term, 0.0])
            entry[1] += coefficient
        elif not (_numbers(term) or isinstance(term, torch.Tensor)):
            return None
    inputs = [t for t, _ in coefficients.values()]
    dens = [c * c * (out.numel() // max(1, t.numel())) for t, c in coefficients.values()]
    return GlueCall(name, GLUE, None, inputs, dens)


def _add(name, args, kwargs, out, sign=1.0):
    if len(args) < 2:
        return None
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    if not _numbers(alpha):
        return None
    return _linear_combination(name, [(args[0], 1.0), (args[1], sign * float(alpha))], out)


def _rsub(name, args, kwargs, out):
    alpha = kwargs.get("alpha", 1)
    return _linear_combination(name, [(args[0], -float(alpha)), (args[1], 1.0)], out) if _numbers(alpha) else None


def _scale(name, args, kwargs, out, invert=False):
    tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
    scalars = [a for a in args[:2] if _numbers(a)]
    if len(tensors) != 1 or len(scalars) != 1 or kwargs.get("rounding_mode") is not None:
        return None
    alpha = float(scalars[0])
    if invert:
        if alpha == 0 or args[0] is not tensors[0]:  # a number divided by a tensor is not linear
            return None
        alpha = 1.0 / alpha
    return _linear_combination(name, [(tensors[0], alpha)], out)


def _negate(name, args, kwargs, out):
    return _linear_combination(name, [(args[0], -1.0)], out)


def _cat(name, args, kwargs, out):
    tensors = args[0] if args else kwargs.get("tensors")
    if not isinstance(tensors, (list, tuple)):
        return None
    counts: dict[int, list] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            counts.setdefault(id(t), [t, 0])[1] += 1
    return GlueCall(name, GLUE, None, [t for t, _ in counts.values()], [float(k) for _, k in counts.values()])


def _permutation(name, args, kwargs, out):
    return GlueCall(name, GLUE, None, [args[0]], [1.0])


def _as_module(rule: LayerRule, build):
    """A parser for a functional op that a module's rule covers: ``build(*args, **kwargs)`` gives the module."""
    def parse(name, args, kwargs, out):
        try:
            module = build(*args[1:], **kwargs)
        except TypeError:
            return None
        if module is None:
            return None
        return GlueCall(name, rule, module, [args[0]], [None])
    return parse


@functools.lru_cache(maxsize=256)
def _max_pool(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return None if return_indices else nn.MaxPool2d(kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)


@functools.lru_cache(maxsize=256)
def _avg_pool(kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    return nn.AvgPool2d(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


@functools.lru_cache(maxsize=64)
def _adaptive_avg_pool(output_size):
    return nn.AdaptiveAvgPool2d(output_size)


def _relu(inplace=False):
    return _RELU


_RELU = nn.ReLU()


def _hashable(build):
    """``build`` with list arguments (``kernel_size=[2, 2]``) turned into tuples, for its cache."""
    def call(*args, **kwargs):
        fix = (lambda v: tuple(v) if isinstance(v, list) else v)
        return build(*map(fix, args), **{k: fix(v) for k, v in kwargs.items()})
    return call


_PARSERS = {
    "add": _add, "add_": _add, "__add__": _add, "__radd__": _add, "__iadd__": _add,
    "sub": functools.partial(_add, sign=-1.0), "sub_": functools.partial(_add, sign=-1.0),
    "__sub__": functools.partial(_add, sign=-1.0), "__isub__": functools.partial(_add, sign=-1.0),
    "rsub": _rsub, "__rsub__": _rsub,
    "mul": _scale, "mul_": _scale, "__mul__": _scale, "__rmul__": _scale, "__imul__": _scale,
    "div": functools.partial(_scale, invert=True), "div_": functools.partial(_scale, invert=True),
    "__truediv__": functools.partial(_scale, invert=True), "__itruediv__": functools.partial(_scale, invert=True),
    "neg": _negate, "__neg__": _negate,
    "cat": _cat, "concat": _cat, "concatenate": _cat,
    "relu": _as_module(ReLURule(), _relu), "relu_": _as_module(ReLURule(), _relu),
    "max_pool2d": _as_module(MaxPool2dRule(), _hashable(_max_pool)),
    "avg_pool2d": _as_module(AvgPool2dRule(), _hashable(_avg_pool)),
    "adaptive_avg_pool2d": _as_module(AdaptiveAvgPool2dRule(), _hashable(_adaptive_avg_pool)),
}
for _name in ("view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t",
              "squeeze", "unsqueeze", "contiguous", "clone"):
    _PARSERS[_name] = _permutation

#: the names :func:`parse` knows, for error messages
SUPPORTED = ("+, -, torch.add / sub (alpha a number), +=, torch.cat, * and / by a Python number, relu, "
             "views / reshape / flatten / permute / transpose / squeeze / clone, max_pool2d, avg_pool2d, "
             "adaptive_avg_pool2d")


def parse(func, args: tuple, kwargs: dict, out: torch.Tensor) -> GlueCall | None:
    """The glue op ``func(*args, **kwargs)`` that returned ``out``, or None when no rule covers it."""
    name = getattr(func, "__name__", "")
    parser = _PARSERS.get(name)
    if parser is None:
        return None
    if name in ("relu", "relu_") and func not in (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu,
                                                   torch.Tensor.relu_):
        return None
    return parser(name, args, kwargs, out)
