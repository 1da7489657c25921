"""Hooks that turn ``loss.backward()`` into back-matching propagation on an unmodified model.

The engine knows no layer's mathematics (that lives in ``layers/``, one file
per layer type, behind the ``LayerRule`` interface) and no weight solve (that is
``weights.solve``). During each forward pass it records the graph of ops and
values (``graph.py``: module calls, and the functional glue between them that a
:class:`~backmatch_exact.graph.Capture` mode sees) and hooks three things:

* every value (a tensor that requires grad and that an op made or the model
  received) gets a tensor hook: in backward it sees the sum of its consumers'
  backprop signals ``Σ_c J_cᵀ g'_c`` and sends down the back-matched signal, that
  sum over ``Σ_c ‖J_c[:,j]‖²`` (SPEC §8; one consumer: the paper's rules);
* a weight or normalization layer's output node gets a pre-hook that sees the signal
  the layer receives and solves for its parameters' ``g'``;
* every parameter gets a hook that puts that ``g'`` into ``.grad`` in place of
  autograd's gradient.

In the exact modes on one process (``batch_solves=True``) the pre-hook only forms a
weight layer's problem: the solves wait for the end of the backward pass, a callback
queued with autograd (``_end_backward``), which factors those of one size together,
reads the pass's checks back to the host at once and then writes ``.grad``; the
parameter hooks hand autograd zeros.

A layer whose rule replaces the numerator too (a batch normalization drops its
statistics' coupling) gets an identity autograd Function on its input whose
backward hands in the replaced numerator. Work the engine has no rule for — an
unsupported functional op, a module with weights called twice — is a
``GraphError`` where it happens.

Under ``torch.distributed`` the engine hands its ``distributed.Comm`` the ops at
the end of each forward pass and asks it, per weight layer, for the row source
of the solve (the ranks' averaged Gram or gathered rows); see the interface at
the top of ``distributed.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
import weakref
from typing import Callable

import torch
from torch import nn

from . import distributed, joint, solver, weights
from .approx import ApproxPlan, CheckedGraph, PlanOp
from .approximations import Approximations
from .errors import BackMatchError, GraphError, NonFiniteError, UnresolvedSolveWarning, UnsupportedModuleError
from .graph import Capture, Op, Use, Value, call_site, tensors_requiring_grad
from .layers import LayerRule, glue, rule_for
from .layers.base import signal_amplification, solves_jointly
from .solver import safe_divide
from .timing import Timing

MODES = ("bp", "exact", "exact_weights", "approx")
BACKENDS = ("fast", "reference")
SOLVE_DTYPES = (None, torch.float32, torch.float64)
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Engine]" = weakref.WeakKeyDictionary()  # hooked module -> engine


@dataclasses.dataclass(slots=True)
class _Layer:
    path: str
    module: nn.Module
    rule: LayerRule
    op: Op | None = None  # the module's (last) call in the current forward pass
    forward: int = -1  # the engine's forward-pass count when it last ran (a weight layer may run once per pass)
    has_parameters: bool = False
    output_hook: bool = False  # the mode solves at its output (set by Engine._install)
    check_input: bool = False  # ... checks its input for NaN in the forward pass


def _is_finite(t: torch.Tensor) -> bool:
    # one pass instead of isfinite's several: a NaN or ±inf anywhere makes the sum non-finite (an
    # overflowing sum of finite values only sends us to the exact test)
    if t.is_floating_point() and math.isfinite(t.detach().sum()):
        return True
    return bool(torch.isfinite(t).all())


@dataclasses.dataclass(eq=False, slots=True)
class _Check:
    """A check of the batched path: 0-d tensors computed on the device, judged once they are read back."""

    values: list
    verdict: Callable  # the values read ↦ the error to raise, or None


@dataclasses.dataclass(eq=False, slots=True)
class _Queued:
    """A weight layer's solve formed in backward on the batched path, waiting for the end of the pass."""

    op: Op
    source: weights.RowSource
    deferred: weights.Deferred


def _read_back(values: list[torch.Tensor]) -> list[float]:
    """The batched path's host read: values of a whole pass in one transfer (where the step synchronizes)."""
    if not values:
        return []
    device = values[0].device
    return torch.stack([v.to(device) for v in values]).tolist()


def _first_failure(checks: list[_Check], read: list[float]):
    """The error of the first of ``checks`` (read: their values, in order, then anything else) that fails."""
    at = 0
    for check in checks:
        failure = check.verdict(read[at:at + len(check.values)])
        if failure is not None:
            return failure
        at += len(check.values)
    return None


def _non_finite_error(path: str, kind: str, what: str, shape: tuple) -> NonFiniteError:
    return NonFiniteError(f"layer {path!r} ({kind}): {what} of shape {shape} contains NaN or infinity")


def _non_finite(path: str, kind: str, what: str, shape: tuple, read: list[float]):
    """Verdict of a finiteness check: its values are finite exactly when the tensor is."""
    return None if all(math.isfinite(v) for v in read) else _non_finite_error(path, kind, what, shape)


def _added_outside(path: str, name: str, read: list):
    """Verdict of a parameter's own-gradient check, read as (differs, relative gap)."""
    if not read[0]:
        return None
    return GraphError(f"layer {path!r}: parameter {name!r} received a gradient from outside its module "
                      f"(autograd's differs from the layer's own by {read[1]:.2e} relative); add penalties "
                      "through attach(weight_decay=...) instead")


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same entries of the same memory (one tensor, or views alike of it)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype and a.device == b.device)


def _amplification(rule, module, weight: torch.Tensor, input_shape: tuple, signal_damping: float) -> float:
    """A weight layer's ``amplification`` statistic, from its weight as the step had it: computed when read."""
    shape_only = torch.empty(input_shape, device="meta")
    return signal_amplification(rule.column_sq_norms(module, shape_only, weight), signal_damping)


def _laid_out_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` as autograd would store it in an empty ``.grad``: itself if it has the parameter's strides, else a
    copy that has them."""
    if value.stride() == param.stride():
        return value
    return torch.empty_like(param).copy_(value)


class Engine:
    """Back-matching propagation attached to a model. Create it with :func:`attach`."""

    def __init__(self, model: nn.Module, mode: str = "exact", damping: float = 0.0, signal_damping: float = 0.0,
                 damping_scale: str = "relative", weight_decay: float = 0.0, solve_method: str = "auto",
                 process_group=None, approximations=None, backend: str = "fast", approx_signals: bool = False,
                 solve_dtype=None, signals: str = "per_unit", joint_solver: str = "auto", joint_tol: float | None = None,
                 joint_max_iter: int = 500, on_no_convergence: str = "raise", batch_solves: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, value in (("damping", damping), ("signal_damping", signal_damping),
                            ("weight_decay", weight_decay)):
            if not (isinstance(value, (int, float)) and value >= 0 and value == value and value != float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if damping_scale not in ("relative", "absolute"):
            raise ValueError(f"damping_scale must be 'relative' or 'absolute', got {damping_scale!r}")
        if solve_method not in ("auto", "primal", "dual"):
            raise ValueError(f"solve_method must be 'auto', 'primal' or 'dual', got {solve_method!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if solve_dtype not in SOLVE_DTYPES:
            raise ValueError(f"solve_dtype must be one of {SOLVE_DTYPES}, got {solve_dtype!r}")
        switches = Approximations.of(approximations)
        if switches.any() and mode != "exact":
            raise ValueError(f"approximations are switches of mode='exact' (mode='approx' makes all of them), "
                             f"not of mode={mode!r}")
        self.joint = joint.settings(signals, joint_solver, joint_tol, joint_max_iter, on_no_convergence)
        if self.joint is not None and (mode != "exact" or switches.any()):
            raise ValueError(f"signals='joint' is a rule for the back-matched signals of mode='exact' without "
                             f"approximations; mode={mode!r}"
                             + (" sends no back-matched signal" if mode != "exact" else " has approximations"))
        self.signals = signals
        # torch.distributed (distributed.py): a DDP model is unwrapped to its .module; None when nothing is exchanged
        model, self.distributed = distributed.setup(model, mode, process_group)
        self.model = model
        self.batch_solves = bool(batch_solves)
        # the batched path: exact modes on one process (DDP's reducer reads .grad during backward, so under
        # torch.distributed each solve is done as its signal arrives). The weight solves of a backward pass are
        # factored at its end, same sizes in one call, and the step's checks are read back once there
        # (_end_backward), the forward pass's input checks with them (flagged in _model_end). signals="joint"
        # checks as it goes: its solves would meet a NaN first and fail with a less clear error. The reference
        # backend, a check, solves as it goes too: queued, its problems would hold every layer's explicit rows to
        # the end (VGG11 at batch 128 in float64: 2.05 GB over the model's own instead of 1.57).
        self._batched = (self.batch_solves and mode in ("exact", "exact_weights") and self.distributed is None
                         and backend == "fast")
        self._deferred_checks = self._batched and signals == "per_unit"
        self.mode = mode
        self.backend = backend
        # approx mode is exact back-matching with every approximation made, and weight gradients scaled instead
        # of solved: its signals come from the same switches
        self.approximations = Approximations.of("all") if mode == "approx" else switches
        self._needs_factors = mode == "approx" or switches.needs_factors()
        self._matched_signals = mode in ("exact", "approx")  # the signals sent down are back-matched
        # approx mode: once a graph is checked for an input shape, a step runs plain autograd and scales .grad
        # (and on a branching network the gradient of a few branches: approx.CheckedGraph); approx_signals=True
        # propagates Algorithm 1's signals every step (x.grad and tensor hooks then see them)
        self.approx_signals = bool(approx_signals)
        self._light: dict[tuple, CheckedGraph] = {}  # checked graphs by _light_key
        self._light_grads: dict | None = None  # such a step's (factor of autograd's g, of the parameter) per layer
        self._light_taps: dict | None = None  # ... during its forward pass: {call number: k} per module path
        self._light_calls: dict[str, int] = {}  # ... the calls of each module so far
        self._tapped: set[str] = set()  # the modules with a branch hook (_tap_branch)
        self._module_handles: list = []
        self.settings = weights.Settings(float(damping), damping_scale == "relative", float(weight_decay),
                                         solve_method, solve_dtype)
        self.signal_damping = float(signal_damping)
        self.timing = Timing()  # bench's per-layer breakdown; off unless enabled
        self.layers = self._collect_layers(model)
        self._paths = {layer.path for layer in self.layers}
        self._stats: dict[str, dict] = {}
        # param -> its g' for the parameter hook (a _Queued on the batched path until the end of backward)
        self._pending: dict[torch.Tensor, torch.Tensor | _Queued] = {}
        # the batched path's checked inputs of this forward pass, in order, with their verdicts: flagged at its end
        self._forward_checks: list[tuple[torch.Tensor, Callable]] = []
        self._input_checks: list[_Check] = []  # ... flagged: read with each backward pass's checks, first
        self._backward_checks: list[_Check] = []  # the checks of this backward pass
        self._queue: list[_Queued] = []  # this backward pass's weight solves, in the order formed
        self._claims: dict[torch.Tensor, bool] = {}  # params whose hook ran: True where .grad was None then
        self._armed_task = None  # autograd's graph task whose end _end_backward is queued for
        self._accumulators: dict[torch.Tensor, object] = {}  # param -> its AccumulateGrad node (batched path)
        self._handles: list = []
        self._capture = Capture(self._functional)
        self._capturing = False  # a forward pass with gradients is running
        self._forwards = 0  # forward passes with gradients so far
        self._ops: list[Op] = []  # this forward pass's ops, in execution order
        self._input_hooks: list = []  # the handles of this forward pass's hooks on the model's inputs
        self._values: dict[int, tuple[torch.Tensor, Value]] = {}  # during a forward pass: id(tensor) -> its value
        self._approx_plans: dict[tuple, ApproxPlan] = {}  # Algorithm 1 per graph and shapes
        self._approx_step = None  # approx mode: the ops of the last forward pass, for stats()
        self._warned_unresolved = False  # an unresolved weight solve is warned about once per engine
        self._claim()
        self._install()
        if self.distributed is not None:
            self.distributed.attach([(layer.path, type(layer.module).__name__) for layer in self.layers],
                                    self.settings)

    # the attach arguments, as attributes
    damping = property(lambda self: self.settings.damping)
    weight_decay = property(lambda self: self.settings.weight_decay)
    solve_method = property(lambda self: self.settings.solve_method)

    # ----------------------------------------------------------------- attach
    @staticmethod
    def _collect_layers(model: nn.Module) -> list[_Layer]:
        layers = []
        for path, module in model.named_modules():
            path = path or type(model).__name__
            has_children = next(module.children(), None) is not None
            if has_children:
                own = [n for n, _ in module.named_parameters(recurse=False)]
                if own:
                    raise UnsupportedModuleError(
                        f"module {path!r} ({type(module).__name__}) holds parameters {own} itself besides "
                        "submodules: its forward is unknown to back-matching"
                    )
                continue
            has_parameters = next(module.parameters(recurse=False), None) is not None
            layers.append(_Layer(path, module, rule_for(module, path), has_parameters=has_parameters))
        if not layers:
            raise UnsupportedModuleError("the model has no modules to attach to")
        return layers

    def _install(self) -> None:
        exact = self.mode in ("exact", "exact_weights")
        for layer in self.layers:
            rule = layer.rule
            layer.output_hook = exact and (rule.has_weights or rule.needs_output_signal)
            layer.check_input = self.mode != "approx" and (rule.has_weights or rule.needs_output_signal)
        hooks = self._handles
        hooks.append(self.model.register_forward_pre_hook(self._model_begin))
        hooks.append(self.model.register_forward_hook(self._model_end, always_call=True))
        self._install_module_hooks()
        for layer in self.layers:
            if self.mode != "bp":
                for name, param in layer.module.named_parameters(recurse=False):
                    if param.requires_grad:
                        hooks.append(param.register_hook(functools.partial(self._param_grad, layer, name, param)))
                        if self._batched:
                            self._accumulators[param] = param.view_as(param).grad_fn.next_functions[0][0]

    def _install_module_hooks(self) -> None:
        if self._module_handles:
            return
        for layer in self.layers:
            self._module_handles.append(layer.module.register_forward_pre_hook(functools.partial(self._before, layer)))
            self._module_handles.append(layer.module.register_forward_hook(functools.partial(self._after, layer)))

    def _remove_module_hooks(self) -> None:
        for handle in self._module_handles:
            handle.remove()
        self._module_handles.clear()

    def _claim(self) -> None:
        """Refuse a model that another engine is attached to (two engines' hooks would each rewrite the
        gradients), or one with such a model among its modules; then mark this model's modules as ours."""
        modules = [(type(self.model).__name__, self.model)] + [(layer.path, layer.module) for layer in self.layers]
        for path, module in modules:
            other = _ATTACHED.get(module)
            if other is not None:
                where = "" if module is self.model else f" (its module {path!r})"
                raise BackMatchError(
                    f"{type(self.model).__name__}{where} is already attached to an engine (mode {other.mode!r}): "
                    "detach that engine first (engine.detach(), or leave its with-block)"
                )
        for _, module in modules:
            _ATTACHED[module] = self

    def detach(self) -> None:
        """Remove every hook: the model behaves exactly as before :func:`attach`.

        The last step's statistics stay readable (the deferred ones are computed now); everything else the
        step kept is let go.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._remove_module_hooks()
        self.stats()
        self._release_step()
        self._pending.clear()
        for module in [self.model] + [layer.module for layer in self.layers]:
            if _ATTACHED.get(module) is self:
                del _ATTACHED[module]

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # --------------------------------------------------------------- forward
    def _model_begin(self, model, args):
        if not torch.is_grad_enabled():  # evaluation: nothing to record, and a pending step's ops stay as they are
            return None
        self._light_grads = None
        self._expire_statistics()
        self._release_step()
        self._forwards += 1
        if self.mode == "approx" and not self.approx_signals:
            checked = self._light.get(self._light_key(args))
            if checked is not None and self._light_begin(checked, args):
                self._remove_module_hooks()  # (a step that could not be light may have put them back)
                return None
            self._install_module_hooks()  # a new input shape or structure: record and check this pass
        self._values = {}
        for x in tensors_requiring_grad(args, {}):
            self._produce(x, None)
        self._capture.__enter__()
        self._capturing = True
        return None

    def _release_step(self) -> None:
        """Let go of the last forward pass's graph. Its ops hold the layers' inputs and signals, and refer to
        each other (an op to its values, a value to the ops using it, a layer to its op): unbroken, they would
        wait for Python's cycle collector, tensors and all."""
        for op in self._ops:
            op.inputs, op.values, op.output, op.layer, op.grad_output, op.plain_grads = [], [], None, None, None, {}
        self._ops = []
        for handle in self._input_hooks:
            handle.remove()
        self._input_hooks.clear()
        for layer in self.layers:
            layer.op = None
        self._forward_checks, self._input_checks, self._backward_checks = [], [], []
        self._queue, self._claims = [], {}

    def _check_current(self, forward: int, where: str) -> None:
        """A backward hook of forward pass ``forward``: refuse it unless that pass is the model's last one."""
        if not self._handles:
            raise GraphError(f"{where}: this backward pass runs through a forward pass made while the engine "
                             "was attached, and it has been detached since")
        if forward != self._forwards:
            raise GraphError(
                f"{where}: this backward pass runs through an earlier forward pass of the model than its "
                "last one; back-matching needs each forward pass's backward before the next forward pass with "
                "gradients (one loss per forward pass, or the forward passes concatenated into one batch)"
            )

    def _light_key(self, args) -> tuple:
        """What a checked graph is valid for: the inputs' shapes, dtypes and devices, and every module's mode."""
        return (tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else type(a) for a in args),
                tuple(layer.module.training for layer in self.layers))

    def _light_begin(self, checked: CheckedGraph, args) -> bool:
        """A step of approx mode on a checked graph: Algorithm 1's numbers, and nothing else to record. False
        when this step's numbers need the signals propagated (``CheckedGraph.scales``): then it records."""
        plan = checked.plan
        inputs = [a.detach().sum() for a in tensors_requiring_grad(args, {}) if a.is_floating_point()] + \
                 [a.detach().sum() for a in args if isinstance(a, torch.Tensor) and not a.requires_grad
                  and a.is_floating_point()]
        factors = plan.factors(extra=inputs)  # (the weights' norms and the inputs' sums in one read-back)
        if not all(math.isfinite(v) for v in plan.extra):
            first = self.layers[0]
            raise NonFiniteError(f"layer {plan.ops[0].path!r} ({type(first.module).__name__}): input contains "
                                 "NaN or infinity")
        scales = checked.scales(factors, self.settings.weight_decay)
        if scales is None:
            return False
        (self._light_grads, self._light_taps), self._light_calls = scales, {}
        self._approx_step = list(zip(plan.ops, factors))
        return True

    def _tap_branch(self, layer: _Layer, module, args):
        """Pre-hook of a module whose call may take a fan-out's branch: in a checked approx step, the gradient
        of its input through this call times the call's ``k`` (``CheckedGraph``)."""
        if self._light_taps is None:
            return None
        call = self._light_calls.get(layer.path, 0)
        self._light_calls[layer.path] = call + 1
        k = self._light_taps.get(layer.path, {}).get(call)
        if k is None or not (len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].requires_grad):
            return None
        x = args[0].clone() if getattr(module, "inplace", False) else args[0].view_as(args[0])
        x.register_hook(functools.partial(torch.mul, other=k))
        return (x,)

    def _check_graph(self, args) -> None:
        """Approx mode: keep this pass's graph, checked, for later passes with the same ``_light_key``, where
        Algorithm 1 can be had from plain autograd (``CheckedGraph``); the module hooks go (they come back for a
        new key). Not kept where a rule's numerator differs from autograd's or a fan-out has two branches no
        module call takes, each with its own scale."""
        if any(op.rule.transforms_numerator(self.approximations) for op in self._ops):
            return
        calls, count = {}, {}
        for i, op in enumerate(self._ops):
            if op.layer is not None:
                calls[i] = (op.path, count.get(op.path, 0))
                count[op.path] = calls[i][1] + 1
        weighted = {op.path: i for i, op in enumerate(self._ops) if op.layer is not None and op.layer.has_parameters}
        checked = CheckedGraph(self._approx_plans[self._graph_key], weighted, calls)
        if checked.scales([op.approx for op in self._ops], 0.0) is None:
            return
        self._light[self._light_key(args)] = checked
        untapped = checked.branch_layers - self._tapped
        for layer in self.layers:
            if layer.path in untapped:
                self._handles.append(layer.module.register_forward_pre_hook(
                    functools.partial(self._tap_branch, layer)))
                self._tapped.add(layer.path)
        self._remove_module_hooks()  # (this pass still propagates its signals through its value hooks)

    def _model_end(self, model, args, output):
        self._light_taps = None  # (a checked step's branch hooks are done)
        if not self._capturing:
            return None
        self._capturing = False
        self._capture.__exit__(None, None, None)
        values, self._values = self._values, {}  # (the produced tensors are not kept past the forward pass)
        if output is None:  # the forward pass raised (this hook always runs)
            return None
        # the batched path's input checks: flagged now, outside the capture mode, and read with the backward
        # pass's checks (first, in order: a NaN input is named before the signals it makes)
        self._input_checks = [_Check(solver.extremes(t), verdict) for t, verdict in self._forward_checks]
        self._forward_checks = []
        if isinstance(output, torch.Tensor) and output.requires_grad and values.get(id(output), (None,))[0] \
                is not output:
            raise GraphError("the model's output was not made by a supported module or op in its forward pass")
        if self._needs_factors:
            self._approx_factors()
        if self.mode == "approx" and not self.approx_signals:
            self._check_graph(args)
        if self.distributed is not None and self._ops:
            self.distributed.forward_end(self._ops, output, self._row_source)
        if self.mode in ("approx", "bp"):
            # bp reads no input in backward, approx only a weight layer's, and that only to name a NaN
            # (_param_grad): let the others go now, as plain backprop would
            for op in self._ops:
                if self.mode == "bp" or not op.rule.has_weights:
                    op.inputs = []
        return None

    def _produce(self, tensor: torch.Tensor, op: Op | None) -> Value:
        """Record ``tensor`` as a value made by ``op`` (None: a model input) and hook its backward signal."""
        value = Value(op, tuple(tensor.shape))
        if op is not None:
            op.output, op.output_shape = value, tuple(tensor.shape)
        self._values[id(tensor)] = (tensor, value)
        if self._matched_signals:
            handle = tensor.register_hook(functools.partial(self._value_signal, self._forwards, value))
            if op is None:  # a model input outlives the pass (a leaf, or fed again): its hook goes with the pass
                self._input_hooks.append(handle)
        return value

    def _value_of(self, tensor: torch.Tensor, where: str) -> Value:
        entry = self._values.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            raise GraphError(
                f"{where} takes a tensor that requires grad but that no supported module or op made in this "
                "forward pass (a tensor from outside the model's forward, or from an op applied to it there)"
            )
        return entry[1]

    def _before(self, layer: _Layer, module, args):
        if not torch.is_grad_enabled():
            return None
        if not self._capturing:
            raise GraphError(f"layer {layer.path!r} ran outside a forward pass of the attached model")
        self._capture.enter_leaf()  # until _after: the module's own work (and ours) is not glue
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise GraphError(f"layer {layer.path!r} must take exactly one tensor input")
        if layer.has_parameters and layer.forward == self._forwards:
            raise GraphError(
                f"layer {layer.path!r} ({type(module).__name__}) ran twice in one forward pass: a module with "
                "weights used twice (shared weights) has no back-matching rule; parameter-free modules may be reused"
            )
        layer.forward = self._forwards
        x = args[0]
        value = self._value_of(x, f"layer {layer.path!r} ({type(module).__name__})") if x.requires_grad else None
        op = Op(layer.path, layer.rule, module, [x.detach()], [value] if value else [], layer=layer)
        if value is not None:
            value.uses.append(Use(op, 0))
        layer.op = op
        self._ops.append(op)
        if layer.check_input:
            self._check_finite(x, "input", layer.path, module)  # approx mode: in _param_grad, only if needed
        changed = False
        if self._matched_signals and x.requires_grad and layer.rule.transforms_numerator(self.approximations):
            # a tap: a view of the input whose node hands the rule's numerator down instead of autograd's Jᵀ g_b
            x, changed = x.view_as(x), True
            x.grad_fn.register_hook(functools.partial(self._numerator, op))
        if getattr(module, "inplace", False):
            x, changed = x.clone(), True  # the in-place op writes to our copy: the value stays as it was
        return (x,) if changed else None

    def _after(self, layer: _Layer, module, args, output):
        if not torch.is_grad_enabled() or not self._capturing:
            return None
        try:
            op = layer.op
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                return None
            if output is args[0] and not getattr(module, "inplace", False):  # an identity: the output is its input
                self._ops.remove(op)
                if op.values:
                    op.values[0].uses.pop()
                return None
            if layer.output_hook:
                node = output.grad_fn
                if layer.rule.normalizes:  # the statistics it normalized with, for its backward rules
                    layer.rule.remember(module, op.input, node)
                reader = layer.rule.autograd_parameter_grads(module, node) if layer.has_parameters else None
                solved_at_node = reader is not None and layer.rule.has_weights and self.backend == "fast"
                node.register_prehook(functools.partial(self._output_signal, self._forwards, op, solved_at_node))
                if solved_at_node:
                    node.register_hook(functools.partial(self._node_grads, op, reader))
                elif reader is not None and not layer.rule.has_weights:
                    node.register_hook(functools.partial(self._node_parameter_grads, op, reader))
            self._produce(output, op)
        finally:
            self._capture.leave_leaf()
        return None

    def _functional(self, func, args, kwargs):
        """A torch function called in the model's forward pass outside its leaf modules (``graph.Capture``)."""
        inputs = tensors_requiring_grad(args, kwargs)
        if not inputs:
            return func(*args, **kwargs)  # no gradient flows through it
        name = getattr(func, "__name__", repr(func))
        entries = {id(t): (t, t._version, self._values.get(id(t))) for t in inputs}
        out = func(*args, **kwargs)
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            if name == "__setitem__":  # an in-place write into a value: no rule
                raise GraphError(f"{name} (called at {call_site()}) writes into a tensor of the graph: back-matching "
                                 f"has no rule for it; supported between modules: {glue.SUPPORTED}")
            return out
        same = entries.get(id(out))
        if same is not None and same[0] is out and out._version == same[1]:
            return out  # an op that returned its input as it is (e.g. .contiguous() of a contiguous tensor)
        call = glue.parse(func, args, kwargs, out)
        if call is None:
            raise GraphError(
                f"{name} (called at {call_site()}) is applied to a tensor of the graph but has no back-matching "
                f"rule; supported between modules: {glue.SUPPORTED}. On the model's output, move it into the loss"
            )
        values = []
        for t in call.inputs:
            tensor, _, entry = entries[id(t)]
            if entry is None or entry[0] is not tensor:
                self._value_of(tensor, f"{name} (called at {call_site()})")  # raises
            values.append(entry[1])
        op = Op(f"{name}#{len(self._ops)}", call.rule, call.module, [t.detach() for t in call.inputs], values,
                list(call.denominators))
        for index, (value, den) in enumerate(zip(values, call.denominators)):
            value.uses.append(Use(op, index, den))
        self._ops.append(op)
        self._produce(out, op)
        return out

    def _approx_factors(self) -> None:
        ops = self._ops
        index = {}
        for op in ops:
            for value in op.values:
                index.setdefault(id(value), len(index))
            if op.output is not None:
                index.setdefault(id(op.output), len(index))
        graph = tuple(PlanOp(op.path, op.module, op.rule, tuple(op.inputs[0].shape) if op.inputs else (),
                             op.output_shape, tuple(index[id(v)] for v in op.values),
                             index[id(op.output)] if op.output is not None else None, tuple(op.denominators))
                      for op in ops)
        plan = self._approx_plans.get(graph)
        if plan is None:  # a new graph or new shapes: Algorithm 1's shape-only part, once
            if len(self._approx_plans) >= 16:
                self._approx_plans.clear()
                self._light.clear()
            plan = self._approx_plans[graph] = ApproxPlan(list(graph))
        self._graph_key = graph
        factors = plan.factors()
        for op, op_factors in zip(ops, factors):
            op.approx = op_factors
        if self.mode == "approx":
            self._approx_step = list(zip(graph, factors))  # stats() reads it

    def _approx_stats(self) -> None:
        """Fill ``_stats`` from the last approx-mode forward pass (done only when stats() asks)."""
        for op, factors in self._approx_step:
            if op.module is not None and op.path in self._paths and (op.rule.has_weights or factors.ratio != 1.0):
                self._stats[op.path] = {
                    "layer": op.path, "kind": type(op.module).__name__, "m": factors.backward_factor,
                    "s": factors.sharing_factor, "r": factors.ratio, "c": factors.location_factor,
                    "scale": factors.weight_scale,
                }

    def _check_finite(self, t: torch.Tensor, what: str, path: str, module) -> None:
        kind = type(module).__name__ if module is not None else "op"
        if self._deferred_checks:  # a device flag, read with the others of the pass
            if not (t.is_floating_point() and t.numel()):
                return
            verdict = functools.partial(_non_finite, path, kind, what, tuple(t.shape))
            if self._capturing:  # flagged when the pass ends (_model_end), all at once and outside the capture mode
                self._forward_checks.append((t.detach(), verdict))
            else:
                self._arm()
                self._backward_checks.append(_Check(solver.extremes(t), verdict))
            return
        if not _is_finite(t):
            if self.distributed is not None:  # recorded: every rank raises together at the next exchange
                return self.distributed.record_bad(path, what)
            raise _non_finite_error(path, kind, what, tuple(t.shape))

    # -------------------------------------------------------------- backward
    def _numerator(self, op: Op, grad_inputs, grad_outputs):
        """Hook on the node of a layer's input tap (``_before``): autograd's ``Jᵀ g_b`` replaced by the rule's
        numerator, which the value's hook then divides (a consumer whose numerator is not autograd's)."""
        return (op.rule.numerator(op.module, op.input, grad_inputs[0], op.grad_output, self.approximations),)

    def _value_signal(self, forward: int, value: Value, grad: torch.Tensor):
        """Tensor hook of a value: the back-matched signal from the sum of its consumers' backprop signals."""
        self._check_current(forward, f"layer {value.producer.path!r}" if value.producer else "the model's input")
        result = self._back_matched(value, grad)
        if self.joint is not None and value.producer is not None:  # a joint consumer's solve reads its g'_b
            value.producer.grad_output = grad if result is None else result
        return result

    def _back_matched(self, value: Value, grad: torch.Tensor):
        uses = value.uses
        if not uses or (len(uses) == 1 and self._unchanged(uses[0])):
            return None
        first = uses[0].op
        if self.joint is not None and any(u.denominator is None and solves_jointly(u.op.rule) for u in uses):
            result = self._joint_signal(value, grad)  # (timed as signal_gram / signal)
            self._check_finite(result, "back-matched input signal", first.path, first.module)
            value.checked = True
            return result
        with self.timing.part(first.path, "input_signal"):
            den = self._denominator(uses[0])
            for use in uses[1:]:
                den = den + self._denominator(use)
            result = safe_divide(grad, den)
            self._check_finite(result, "back-matched input signal", first.path, first.module)
        value.checked = True  # (what the producer's output hook receives: checked once)
        return result

    def _unchanged(self, use: Use) -> bool:
        """Whether a value's only consumer passes its backprop signal on as the back-matched one."""
        if use.denominator is not None:
            return use.denominator == 1.0
        op = use.op
        if self.mode == "approx":
            return op.approx.ratio == 1.0
        return op.rule.signal_unchanged(op.module, self.signal_damping if op.rule.damped else 0.0,
                                        self.approximations)

    def _denominator(self, use: Use):
        """What one consumer adds to the denominator of its input's signal (SPEC §8: they add up)."""
        if use.denominator is not None:
            return use.denominator
        op = use.op
        if self.mode == "approx":
            return op.approx.ratio  # Algorithm 1: r instead of ‖J_{:,j}‖²
        return op.rule.denominator(op.module, op.inputs[use.index], self.signal_damping if op.rule.damped else 0.0,
                                   self.approximations, op.approx)

    def _output_signal(self, forward: int, op: Op, solved_at_node: bool, grad_outputs) -> None:
        """Pre-hook of a weight or normalization layer's output node: the signal it receives, and its solve."""
        self._check_current(forward, f"layer {op.path!r}")
        grad = grad_outputs[0]
        if grad is None:
            return None
        if self._batched:
            self._arm()
        if not op.output.checked:
            self._check_finite(grad, "signal arriving at the output", op.path, op.module)
        op.grad_output = grad
        if op.rule.has_weights:
            if not solved_at_node:
                self._finish_weights(op, None)
        elif op.rule.solves_parameters(op.module):
            self._solve_parameters(op, grad)
        return None

    def _row_source(self, op: Op) -> weights.RowSource:
        """The input rows of ``op``'s weight problem: the rule's fast source, or A itself (reference)."""
        rule, module, a = op.rule, op.module, op.input
        if self.backend == "reference":
            return weights.ExplicitRows(rule.input_rows(module, a), a.shape[0] if a.dim() > 1 else 1)
        return rule.row_source(module, a)

    def _node_grads(self, op: Op, reader, grad_inputs, grad_outputs) -> None:
        """Hook on the node that made a weight layer's output: solve with autograd's own gradients of this call.

        The fast backend's way where the rule can read ``g_W`` off that node (the conv rule's): the
        solve runs before the parameters' hooks, and the node's gradient doubles as the
        outside-use check (``_param_grad``). Otherwise ``g_W = Sᵀ A`` from the row source.
        """
        module = op.module
        grads = reader(grad_inputs)
        names = [name for name in ("weight", "bias") if getattr(module, name, None) is not None]
        if all(grads[name] is None for name in names):
            return None  # no parameter gradient asked for (autograd.grad w.r.t. inputs only)
        usable = all(grads[name] is not None and grads[name].dtype == module.weight.dtype for name in names)
        self._finish_weights(op, {name: grads[name] for name in names} if usable else None)
        return None

    def _node_parameter_grads(self, op: Op, reader, grad_inputs, grad_outputs) -> None:
        """Hook on a normalization layer's output node: autograd's own g_γ, g_β of this call, for the outside-use
        check in ``_param_grad`` (the solve already ran with the rule's own, in ``_output_signal``)."""
        for name, grad in reader(grad_inputs).items():
            if grad is not None and name in op.plain_grads:
                op.plain_grads[name] = grad
        return None

    def _finish_weights(self, op: Op, plain: dict | None) -> None:
        rule, module, path, grad = op.rule, op.module, op.path, op.grad_output
        local = self._row_source(op)

        def signals():
            return rule.signal_rows(module, grad)

        if plain is None:
            with self.timing.part(path, "weight_grad"):
                flat = local.times_rows(signals().mT)  # g_W = Sᵀ A (eq. 7/21): the signals carry the loss's 1/B
            op.plain_grads = rule.unflatten(module, flat)
        else:
            flat, op.plain_grads = rule.flatten(module, plain), plain
        source, exchange = local, None
        if self.distributed is not None:
            source, signals, exchange = self.distributed.problem(path, local, signals)
        weight = rule.flat_weight(module).detach() if self.settings.weight_decay else None
        scale = op.approx.sharing_factor if self.approximations.gram else None  # Algorithm 1's G ≈ s·I
        if self._batched and scale is None:  # factored with the others of its size at the end of backward
            queued = _Queued(op, source, weights.defer(source, flat, signals, weight, self.settings, path,
                                                       self.timing))
            self._queue.append(queued)
            for name in op.plain_grads:
                self._pending[getattr(module, name)] = queued
            if self.joint is not None:  # this pass's row: the joint signal's statistics join it before the solve ends
                self._stats[path] = {"layer": path, "kind": type(module).__name__}
            return
        try:
            if self.distributed is not None and self.distributed.failed:
                raise _Skipped  # the step fails at the next check anyway: skip the work
            solved, info = weights.solve(source, flat, signals, weight, self.settings, path, self.timing, scale)
        except (BackMatchError, _Skipped) as exc:
            if self.distributed is None:
                raise
            if not isinstance(exc, _Skipped):  # no rank raises alone (the others would wait forever)
                self.distributed.record_bad(path, "back-matched weight gradient", exc)
            solved, info = torch.zeros_like(flat), None
        for name, value in rule.unflatten(module, solved).items():
            self._pending[getattr(module, name)] = value
        if info is not None:
            self._record(op, source, info, exchange)

    def _record(self, op: Op, source: weights.RowSource, info, exchange: str | None = None,
                joined: dict | None = None) -> None:
        """A weight layer's stats row, from its solve's ``info`` and what ``joined`` this pass's row before it (the
        joint signal's statistics, on the batched path); the first unresolved solve warns."""
        module, path = op.module, op.path
        weight = module.weight.detach().clone()  # this step's (an optimizer's step changes it in place)
        amplification = functools.partial(_amplification, op.rule, module, weight, tuple(op.input.shape),
                                          self.signal_damping)
        row = weights.stats_row(path, type(module).__name__, source, module.weight.shape[0], info, amplification)
        if exchange is not None:
            row["exchange"] = exchange
        if joined:
            row.update((key, value) for key, value in joined.items() if key not in row)
        self._stats[path] = row
        if not info.resolved and not self._warned_unresolved:
            self._warned_unresolved = True
            warnings.warn(weights.unresolved_message(path, info), UnresolvedSolveWarning, stacklevel=3)

    def _solve_parameters(self, op: Op, grad: torch.Tensor) -> None:
        """The closed-form back-matched gradients of a layer's own parameters (a normalization's γ, β)."""
        gram = self.distributed.parameter_gram(op.path) if self.distributed is not None else None
        wd = self.settings.weight_decay
        solved, op.plain_grads = op.rule.parameter_gradients(op.module, op.input, grad, wd, gram)
        if self.approximations.gram:  # Algorithm 1's G ≈ s·I here too: s = 1 off weight layers, as approx mode has it
            scale = op.approx.sharing_factor
            solved = {name: (g + wd * getattr(op.module, name).detach()) / scale for name, g in op.plain_grads.items()}
        for name, value in solved.items():
            self._pending[getattr(op.module, name)] = value

    def _joint_signal(self, value: Value, grad: torch.Tensor) -> torch.Tensor:
        """``(Σ_c J_cᵀJ_c + λI)⁺ Σ_c J_cᵀ g'_c`` over the value's consumers (``joint.solve``, SPEC §7–8).

        Consumers whose ``JᵀJ`` is not diagonal hand in their Jacobian (``rule.input_operator``); the others
        (an identity in an add, a normalization, an activation) together add a diagonal, and their part of
        the numerator is what is left of autograd's sum. The statistics join the first such layer's row.
        """
        operators, diagonal, solved_here = [], None, None
        for use in value.uses:
            op = use.op
            if use.denominator is None and solves_jointly(op.rule):
                operator = op.rule.input_operator(op.module, op.inputs[use.index])
                operators.append((operator, operator.out_rows(op.grad_output)))
                solved_here = solved_here or op
            else:  # ‖J_c[:, j]‖² of a consumer whose JᵀJ is diagonal (undamped: λ carries the damping)
                part = use.denominator if use.denominator is not None else op.rule.column_sq_norms(
                    op.module, op.inputs[use.index])
                diagonal = part if diagonal is None else diagonal + part
        if len({operator.size for operator, _ in operators}) > 1:
            raise GraphError(
                f"signals='joint': the tensor that {' and '.join(u.op.path for u in value.uses)} read is laid out "
                "differently by them (a pooling layer, per channel, beside a layer that reads whole samples): the "
                "joint solve over such consumers is not supported; use signals='per_unit' for this network"
            )
        if diagonal is not None:
            first = operators[0][0]
            numerator = first.rows(grad) - sum(operator.rmatvec(signal) for operator, signal in operators)
            scale = first.rows(torch.as_tensor(diagonal, dtype=grad.dtype).expand(grad.shape).sqrt())
            operators.append((joint.DiagonalInput(scale), safe_divide(numerator, scale)))
        path = solved_here.path
        try:
            result, info = joint.solve(operators, grad, self.signal_damping, self.joint, path, self.timing)
        except BackMatchError as exc:
            if self.distributed is None:
                raise
            self.distributed.record_bad(path, "back-matched input signal", exc)  # no rank raises alone
            return torch.zeros_like(grad)
        row = self._stats.setdefault(path, {"layer": path, "kind": type(solved_here.module).__name__})
        row.update(info.row())
        return result

    def _param_grad(self, layer: _Layer, name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        op = layer.op
        if self._light_grads is not None:
            # a checked approx step: autograd's g_W times c/s is Algorithm 1's g_W/s (on a chain c = 1/m)
            scale, decay = self._light_grads[layer.path]
            return grad * scale + decay * param if decay else grad * scale
        if self.mode == "approx":
            # the signals arriving were already divided by m, so autograd's grad is g_W / m
            factors = op.approx
            scaled = grad if factors.sharing_factor == 1.0 else grad / factors.sharing_factor
            if self.settings.weight_decay:
                scaled = scaled + (self.settings.weight_decay * factors.weight_scale) * param
            if not math.isfinite(scaled.sum()):
                # approx mode checks the inputs here, not in the forward pass (which it keeps as cheap as plain
                # backprop): a NaN or inf in a weight layer's input always reaches its g_W = Sᵀ A. Name the first
                # layer (forward order) whose input went bad, as the forward check would have.
                bad = next((o for o in self._ops if o.inputs and not _is_finite(o.input)), None)
                if bad is not None:
                    self._check_finite(bad.input, "input", bad.path, bad.module)
            else:
                op.inputs = []  # finite g_W: the input was finite; release it as plain backprop would
            return scaled
        if self._batched:
            self._arm()
        solved = self._pending.get(param) if self._batched else self._pending.pop(param, None)
        ours = op.plain_grads.get(name) if op is not None else None
        if solved is None or ours is None:
            raise GraphError(
                f"layer {layer.path!r}: parameter {name!r} received a gradient that did not pass through the "
                "layer's output (used outside its module?)"
            )
        if not _same_view(grad, ours):  # not autograd's gradient of this very call (taken off its node): compare
            self._check_own_gradient(layer.path, name, grad, ours, op.plain_grads.values())
        if not self._batched:
            return solved
        if not self._stores_grad(param):
            # torch.autograd.grad w.r.t. this parameter: autograd hands back what this hook returns, so the
            # solves queued so far (this layer's among them) are finished now
            self._solve_queue()
            return self._pending.pop(param)
        # .grad is written at the end of backward (_end_backward), where g' exists: zeros now, so that what
        # autograd accumulates is exactly what .grad held before this pass
        self._claims[param] = param.grad is None
        return torch.zeros_like(grad)

    def _stores_grad(self, param: torch.Tensor) -> bool:
        """Whether this backward pass stores ``param``'s gradient in ``.grad`` (``loss.backward()``) rather than
        handing it back (``torch.autograd.grad``). Autograd tells the two apart only by refusing, under
        ``autograd.grad``, to say whether it will run a leaf's accumulator."""
        try:
            torch._C._will_engine_execute_node(self._accumulators[param])
        except RuntimeError:
            return False
        return True

    def _check_own_gradient(self, path: str, name: str, grad: torch.Tensor, ours: torch.Tensor, layer_grads) -> None:
        """Refuse a parameter gradient that differs from the layer's own: something outside its module added to it."""
        gap = torch.linalg.vector_norm(grad - ours)
        # measured against the whole layer's gradient: a bias right before a normalization has a gradient that is
        # rounding noise in both computations, which must not read as a 100% difference
        layer_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in layer_grads]))
        scale = torch.maximum(torch.linalg.vector_norm(grad), layer_norm)
        # two computations of one g_W differ by their summation order: measured up to 2e-4 of the layer's
        # gradient in float32 and 3.4·eps in float16 (half products partly summed in half), hence 16·eps on top
        tolerance = 1e-3 + 16 * torch.finfo(grad.dtype).eps
        outside = gap > tolerance * scale + torch.finfo(grad.dtype).tiny
        if self._batched:  # read with the step's other checks
            self._backward_checks.append(_Check([outside, gap / scale], functools.partial(_added_outside, path, name)))
        elif bool(outside):
            raise _added_outside(path, name, [True, float(gap / scale)])

    def _arm(self) -> None:
        """The batched path's first hook of a backward pass: a fresh record, and ``_end_backward`` queued for the
        pass's end. Autograd's graph task id tells the passes apart (a ``retain_graph`` pass again, a pass that
        raised before its end and left its record behind)."""
        task = torch._C._current_graph_task_id()
        if task == self._armed_task:
            return
        self._armed_task = task
        self._queue, self._claims, self._backward_checks = [], {}, list(self._input_checks)
        self._pending.clear()
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        """The end of a backward pass on the batched path: the queued solves finished (``_solve_queue``), then
        ``.grad`` written for the parameters whose hooks ran. A pass that raises leaves ``.grad`` as it was
        before it."""
        claims, self._claims = self._claims, {}
        try:
            self._solve_queue()
            for param, empty in claims.items():
                value = _laid_out_like(self._pending.pop(param), param)
                if empty:
                    param.grad = value
                else:
                    param.grad.add_(value)  # (+ the hook's zeros: exactly what .grad held, then + g')
        except BaseException:
            for param, empty in claims.items():
                if empty:
                    param.grad = None  # (autograd stored the hook's zeros there)
            raise
        finally:
            self._pending.clear()

    def _solve_queue(self) -> None:
        """The weight solves queued so far factored (one call per form, size, dtype and device:
        ``solver.factor_batch``), every check recorded so far read back in one transfer, the first failed one
        raised in the order recorded, each solve finished (a Cholesky its pivots do not prove goes the
        per-layer way on, ``weights.complete``) and its ``g'`` left in ``_pending``."""
        queue, checks = self._queue, self._backward_checks
        self._queue, self._backward_checks = [], []
        with torch.no_grad():
            factored = solver.factor_batch([queued.deferred.problem for queued in queue],
                                           [queued.op.path for queued in queue], self.timing)
            read = _read_back([v for check in checks for v in check.values] +
                              [v for _, _, values in factored for v in values])
            failure = _first_failure(checks, read)
            if failure is not None:
                raise failure
            at = sum(len(check.values) for check in checks)
            for queued, (answer, residual, values) in zip(queue, factored):
                op, part = queued.op, read[at:at + len(values)]
                at += len(values)
                solved, info = weights.complete(queued.deferred, answer, residual, part, op.path, self.timing)
                for name, value in op.rule.unflatten(op.module, solved).items():
                    self._pending[getattr(op.module, name)] = value
                self._record(op, queued.source, info, joined=self._stats.get(op.path))

    # ------------------------------------------------------------ diagnostics
    def stats(self) -> list[dict]:
        """Per weight layer, in network order, what the last backward pass did.

        Exact modes, per weight layer: ``layer`` (module path), ``kind``, ``d``
        (inputs per output, bias included), ``outputs``, ``samples`` (N = batch x
        locations), ``batch``, ``path`` (cholesky / eigh / dual-cholesky /
        dual-eigh; identity under the ``gram`` approximation), ``rank``,
        ``condition`` (estimate), ``residual`` (relative residual of the normal
        equations), ``damping`` (absolute λ), ``amplification`` (largest mean/own
        squared column norm), ``fallback`` (non-empty when a factorization failed
        and was retried, or a float32 solve was done again in float64), ``groups``,
        ``solve_dtype`` (what the Gram was formed and factored in) and ``resolved``
        (whether that dtype resolves the answer, ``solver.SolveInfo``; the first
        layer that is not warns once, ``UnresolvedSolveWarning``); under
        torch.distributed also ``exchange`` (gram / rows). ``residual`` and
        ``amplification`` are computed when this is called, from what the step kept;
        after the next forward pass they read nan (the step's matrices are let go then).

        Approx mode, per weight layer and per layer whose ratio is not 1:
        ``layer``, ``kind``, ``m`` (backward factor at the output), ``s``
        (sharing factor), ``c`` (conv factor), ``r`` (ratio g_a / g'_a) and
        ``scale`` = 1/(m·s), the factor applied to the weight gradient.

        ``signals="joint"``: every weight layer's row, and a row of its own for each
        average pooling layer, add the joint signal solve (``joint.SignalInfo``):
        ``signal_path`` (cholesky / eigh / dual-cholesky / dual-eigh: dense;
        iterative; none: no signal was asked for, as below the first weight layer),
        ``signal_rank`` (dense), ``signal_iterations`` (iterative),
        ``signal_residual`` (largest relative residual of the normal equations over
        the samples), ``signal_condition`` (dense: of the Jacobi-scaled matrix it
        factored), ``signal_converged`` and ``signal_fallback``.
        """
        if self._approx_step is not None:
            self._approx_stats()
            self._approx_step = None
        rows = [self._stats[layer.path] for layer in self.layers if layer.path in self._stats]
        if self.joint is not None:
            for row in rows:
                for key, value in joint.NO_SIGNAL.items():
                    row.setdefault(key, value)
        for row in rows:  # the statistics the answer does not need are computed here, when read, once
            for key, value in row.items():
                if callable(value):
                    row[key] = value()
        return rows

    def _expire_statistics(self) -> None:
        """A new forward pass: drop what unread deferred statistics keep alive (they then read nan)."""
        for row in self._stats.values():
            for key, value in row.items():
                if callable(value):
                    row[key] = float("nan")


class _Skipped(Exception):
    """A distributed step already failed on some rank: this solve is not worth doing."""


def attach(model: nn.Module, mode: str = "exact", damping: float = 0.0, signal_damping: float = 0.0,
           damping_scale: str = "relative", weight_decay: float = 0.0, solve_method: str = "auto",
           process_group=None, approximations=None, backend: str = "fast", approx_signals: bool = False,
           solve_dtype=None, signals: str = "per_unit", joint_solver: str = "auto", joint_tol: float | None = None,
           joint_max_iter: int = 500, on_no_convergence: str = "raise", batch_solves: bool = True) -> Engine:
    """Make ``loss.backward()`` on ``model`` compute back-matching propagation.

    mode: ``"bp"`` (hooks attached, values unchanged), ``"exact"`` (back-matched
    signals flow down and every weight gets ``g_W · G⁺``), ``"exact_weights"``
    (exact weight solves on ordinary backprop signals), ``"approx"`` (Algorithm
    1: every weight gets ``(g_W + wd·W) / (m·s)`` from weights alone).
    damping: λ in ``g_W (G + λI)⁻¹``; relative to ``mean(diag G)`` unless
    ``damping_scale="absolute"``. signal_damping: μ in the signal denominators
    ``‖J_{:,j}‖² + μ·mean_j ‖J_{:,j}‖²``. weight_decay: added to ``g_W`` before the
    solve (then give the optimizer weight_decay=0). solve_method: ``"auto"``
    picks the N x N dual form when samples N < d; ``"primal"`` / ``"dual"`` force one.
    approximations: with ``mode="exact"``, make some of Algorithm 1's approximations
    (names from :class:`~backmatch_exact.approximations.Approximations`, e.g. ``["gram"]``,
    or ``"all"``, which equals ``mode="approx"`` without weight decay); the rest of
    the step stays exact. backend: ``"fast"`` (default) or ``"reference"``, the
    plain im2col rows and ``g_W = Sᵀ A`` that every fast path is tested against.
    approx_signals: in approx mode, propagate Algorithm 1's scaled signals down every
    step (``x.grad`` and tensor hooks then see them). By default the first forward pass
    of each input shape records and checks the graph, and later ones run plain backprop
    and rescale ``.grad`` (on a branching network also the gradient of each extra
    branch into a fan-out, by one number): the same weights at about backprop's cost,
    while ``x.grad`` and tensor hooks see Algorithm 1's signals times a number per
    tensor (backprop's on a chain).
    solve_dtype: the dtype weight Grams are formed and factored in, ``torch.float32``
    or ``torch.float64``; None (default): float64 for float64 models, and for float32
    and half models float32 where its Cholesky proves the Gram well conditioned,
    float64 where it does not (``weights.py``). The answer has the parameters' dtype.
    signals: ``"per_unit"`` (default: each input unit matches the change on its own,
    eq. 11–12/22) or ``"joint"`` (``mode="exact"`` only: all of a tensor's units at
    once, ``(Σ_c J_cᵀJ_c + λI)⁺ Σ_c J_cᵀ g'_c`` per sample over its consumers c, see
    ``joint.py``). joint_solver: ``"auto"`` (dense up to ``joint.DENSE_MAX`` rows, else
    iterative), ``"dense"`` or ``"iterative"`` (CGLS). joint_tol: the iterative solve's
    tolerance on the relative residual of the normal equations (None: 1e-5 for float32
    solves, 1e-10 for float64); joint_max_iter: its iteration cap; on_no_convergence:
    ``"raise"`` (:class:`SolveError`) or ``"record"`` (keep the last iterate,
    ``signal_converged=False`` in ``stats()``).
    batch_solves: in the exact modes on one process with the fast backend (default True), each backward pass
    forms its weight solves as the signals arrive and factors them at its end, the
    matrices of one size in one batched ``torch.linalg`` call; everything the step checks
    (the Cholesky pivots, NaN in the signals and in the forward pass's layer inputs) is
    read back to the host at once there: a NaN input raises from ``backward()``, not
    from the forward pass. ``.grad`` is written then, and is the same as with False,
    which solves and checks each layer as its signal arrives (as every step under
    torch.distributed does).
    process_group: data parallelism over torch.distributed (``distributed.py``). A
    ``DistributedDataParallel`` model is unwrapped (hooks on ``model.module``,
    ``engine.model`` is that module) and exchanges over ``model.process_group``
    unless a group is given. For a plain model, pass the group (e.g.
    ``torch.distributed.group.WORLD``) and average ``p.grad`` over it yourself after
    ``backward()``; with None a plain model is treated as single-process. In exact
    modes the ranks average their Grams, and after the gradient average every rank
    holds the single-process result on the concatenated batch (equal per-rank batch
    sizes required). A bad value on any rank makes every rank raise.

    A model (or a module of it) takes one engine at a time: attaching a second is an
    error until the first is detached.

    Returns the :class:`Engine`; ``engine.detach()`` (or leaving a ``with`` block) removes it.
    """
    return Engine(model, mode, damping, signal_damping, damping_scale, weight_decay, solve_method, process_group,
                  approximations, backend, approx_signals, solve_dtype, signals, joint_solver, joint_tol,
                  joint_max_iter, on_no_convergence, batch_solves)
