"""The forward pass as a graph: ops (module calls and the functional glue between them) and the values they pass.

Back-matching needs to know, for every tensor a layer passes on, *who consumes
it*: at a fan-out the back-matched signal divides the sum of the consumers'
backprop signals by the sum of their squared Jacobian columns (SPEC §8), which
is not what per-layer rules on autograd give. The engine therefore records each
forward pass:

* a :class:`Value` for every tensor that requires grad and that the model's
  ``forward`` makes or receives: its producer and its :class:`Use` s;
* an :class:`Op` for every module call and every functional op between modules.

Module calls are seen by module hooks. The functional glue is seen by a
:class:`torch.overrides.TorchFunctionMode` (:class:`Capture`) that is active
during the model's forward pass and outside its leaf modules: it sees every torch
function with its arguments and its Python call site, so an op back-matching
has no rule for is refused where it is called, naming it, and ``out += identity``
on a tensor is one more op. (``torch.fx`` would need the model traced ahead of
time and cannot follow data-dependent ``forward`` code; reading the autograd
graph after the fact loses the call sites.)

Nothing here holds a produced tensor past the forward pass: an op keeps detached
aliases of its inputs, so a hook registered on a value's tensor never closes a
reference cycle through autograd (which Python's collector cannot see).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import traceback
import weakref

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .approximations import ApproxFactors
from .layers import LayerRule


@dataclasses.dataclass(eq=False)
class Use:
    """One op's use of a value, as its input number ``index``; ``denominator``: a constant one, or None."""

    op: "Op"
    index: int
    denominator: float | None = None


@dataclasses.dataclass(eq=False)
class Value:
    """A tensor that requires grad in one forward pass: who made it (None: the model input) and who uses it."""

    producer: "Op | None"
    shape: tuple
    uses: list[Use] = dataclasses.field(default_factory=list)
    checked: bool = False  # its back-matched signal was checked for NaN in this backward pass


@dataclasses.dataclass(eq=False)
class Op:
    """One module call or functional op in one forward pass: what its backward rules need.

    ``module``: the module (for a functional op, an equivalent module or None);
    ``inputs``: detached aliases of its differentiable inputs; ``values``: theirs;
    ``output``: the value it made.
    """

    path: str
    rule: LayerRule
    module: nn.Module | None
    inputs: list[torch.Tensor]
    values: list[Value]
    denominators: list = dataclasses.field(default_factory=lambda: [None])  # per input: a constant one, or None
    layer: object = None  # the engine's record of a leaf module (None for a functional op)
    output: Value | None = None
    output_shape: tuple = ()
    grad_output: torch.Tensor | None = None
    plain_grads: dict = dataclasses.field(default_factory=dict)  # autograd's g_W, to cross-check
    approx: ApproxFactors | None = None  # Algorithm 1's factors, set when the forward pass ends
    node_token: object = None  # the current hook on the output's autograd node (a retained graph's older ones are stale)

    @property
    def input(self) -> torch.Tensor | None:
        """The (first) input: a module has one."""
        return self.inputs[0] if self.inputs else None

    @input.setter
    def input(self, value) -> None:
        self.inputs = [] if value is None else [value]


class Capture(TorchFunctionMode):
    """Active during the model's forward pass: hands every torch function called outside a leaf module to
    ``on_call(func, args, kwargs)``, which runs it. A bound method is held weakly (the engine owns its
    Capture: a strong reference back would make the two a cycle that only Python's collector frees).

    While a leaf module runs (``enter_leaf`` .. ``leave_leaf``) its calls are not glue: the mode steps off the
    stack if it is on top (every call through a mode costs Python work: ~30 µs for a tensor hook's
    ``register_hook``), else it stays and passes them through.
    """

    def __init__(self, on_call):
        super().__init__()
        self._on_call = weakref.WeakMethod(on_call) if inspect.ismethod(on_call) else (lambda: on_call)
        self.inside = 0  # > 0 while a supported leaf module (or the engine's own hook) runs
        self._depth = None  # the mode stack's length with this mode on top
        self._off = False  # stepped off the stack for a leaf module

    def __enter__(self):
        self.inside, self._off = 0, False
        super().__enter__()
        self._depth = _stack_length() if _stack_length is not None else None
        return self

    def __exit__(self, *exc):
        if not self._off:  # (off when a leaf module raised, or the model is itself a leaf: nothing to pop)
            super().__exit__(*exc)
        self._off = False

    def enter_leaf(self) -> None:
        self.inside += 1
        if self.inside == 1 and self._depth is not None and _stack_length() == self._depth:
            super().__exit__(None, None, None)
            self._off = True

    def leave_leaf(self) -> None:
        self.inside -= 1
        if self.inside == 0 and self._off:
            self._off = False
            super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.inside:
            return func(*args, **kwargs)
        return self._on_call()(func, args, kwargs)


# the torch-function mode stack's length (a user's mode pushed inside the forward pass sits above Capture)
_stack_length = getattr(torch._C, "_len_torch_function_stack", None)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def call_site() -> str:
    """``file:line in function`` of the innermost frame outside torch and this package (the user's code)."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if not (path.startswith(_PACKAGE) or path.startswith(_TORCH)):
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "an unknown place"


def tensors_requiring_grad(args, kwargs) -> list[torch.Tensor]:
    """The tensors among the arguments (one level into lists and tuples) that require grad."""
    found = []
    for arg in list(args) + list(kwargs.values()):
        for item in (arg if isinstance(arg, (list, tuple)) else (arg,)):
            if isinstance(item, torch.Tensor) and item.requires_grad:
                found.append(item)
    return found
