"""Hooks that turn ``loss.backward()`` into back-matching propagation on an unmodified model.

The engine knows no layer's mathematics (that lives in ``layers/``, one file
per layer type, behind the ``LayerRule`` interface) and no weight solve (that is
``weights.solve``). It does three things around every supported leaf module:

* a *signal tap* on the module's input, an identity in the forward pass whose
  backward hands the layer rule the backprop signal ``Jᵀ g'_b`` and passes the
  back-matched ``g'_a`` further down;
* an *output tap* on the module's output, whose backward sees the signal the
  layer receives from above and, for a weight layer, solves for ``g'_W``;
* a hook on each parameter that puts that ``g'_W`` into ``.grad`` in place of
  autograd's ``g_W``.

It also checks that the forward pass is a chain of supported modules: each
module must consume the previous module's output (or a view of it). Anything
else — a functional call between two modules, a residual branch, a module used
twice — is a ``GraphError``, because back-matching has no rule for it.

Under ``torch.distributed`` the engine hands its ``distributed.Comm`` the module
calls at the end of each forward pass and asks it, per weight layer, for the
row source of the solve (the ranks' averaged Gram or gathered rows); see the
interface at the top of ``distributed.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import nn

from . import distributed, joint, weights
from .approx import ApproxFactors, ApproxPlan, Approximations, may_scale
from .errors import BackMatchError, GraphError, NonFiniteError, UnsupportedModuleError
from .layers import LayerRule, rule_for
from .layers.base import signal_amplification, solves_jointly
from .timing import Timing

MODES = ("bp", "exact", "exact_weights", "approx")
BACKENDS = ("fast", "reference")


@dataclasses.dataclass(slots=True)
class _Layer:
    path: str
    module: nn.Module
    rule: LayerRule
    call: "_Call | None" = None  # the module's call in the current forward pass
    forward: int = -1  # the engine's forward-pass count when it last ran (a second run in one pass is an error)
    input_tap: bool = False  # the mode needs a _SignalTap on its input (set by Engine._install)
    output_tap: bool = False  # ... an _OutputTap on its output
    check_input: bool = False  # ... a finiteness check of its input in the forward pass


@dataclasses.dataclass(slots=True)
class _Call:
    """One module call in one forward pass: what the backward rules need."""

    layer: _Layer
    input: torch.Tensor
    output_shape: tuple = ()
    grad_output: torch.Tensor | None = None
    plain_grads: dict = dataclasses.field(default_factory=dict)  # autograd's g_W, to cross-check
    approx: ApproxFactors | None = None  # Algorithm 1's factors, set when the forward pass ends
    node: object = None  # autograd node that made the module's output (exact modes): its weight gradient
    node_token: object = None  # the current hook on that node (a retained graph's older ones are stale)


class _Tap(torch.autograd.Function):
    """Identity forward that remembers the engine and the module call for its backward."""

    @staticmethod
    def forward(ctx, x, engine, call):
        ctx.engine, ctx.call = engine, call
        return x.view_as(x)


class _SignalTap(_Tap):
    """Backward replaces the backprop signal at a module input by the back-matched one."""

    @staticmethod
    def backward(ctx, grad):
        return ctx.engine._input_signal(ctx.call, grad), None, None


class _OutputTap(_Tap):
    """Backward shows the engine the signal arriving at a module output."""

    @staticmethod
    def backward(ctx, grad):
        # the module's own backward node, read here and dropped after use: a reference to it kept from the
        # forward pass would tie the call to the graph in a cycle Python's collector cannot see
        ctx.call.node = ctx.next_functions[0][0]
        try:
            ctx.engine._output_signal(ctx.call, grad)
        finally:
            ctx.call.node = None
        return grad, None, None


def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


class _Deferred:
    """A statistic computed only when :meth:`Engine.stats` reads it."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn


def _is_finite(t: torch.Tensor) -> bool:
    # one pass instead of isfinite's several: a NaN or ±inf anywhere makes the sum non-finite (an
    # overflowing sum of finite values only sends us to the exact test)
    if t.is_floating_point() and math.isfinite(t.detach().sum()):
        return True
    return bool(torch.isfinite(t).all())


class Engine:
    """Back-matching propagation attached to a model. Create it with :func:`attach`."""

    def __init__(self, model: nn.Module, mode: str = "exact", damping: float = 0.0, signal_damping: float = 0.0,
                 damping_scale: str = "relative", weight_decay: float = 0.0, solve_method: str = "auto",
                 process_group=None, approximations=None, backend: str = "fast", signals: str = "per_unit",
                 joint_solver: str = "auto", joint_tol: float | None = None, joint_max_iter: int = 500,
                 on_no_convergence: str = "raise"):
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
        self.approximations = Approximations.of(approximations)
        self._switched = self.approximations.any()
        if self._switched and mode != "exact":
            raise ValueError(f"approximations are switches of mode='exact' (mode='approx' makes all of them), "
                             f"not of mode={mode!r}")
        self.joint = joint.settings(signals, joint_solver, joint_tol, joint_max_iter, on_no_convergence)
        if self.joint is not None and (mode != "exact" or self._switched):
            raise ValueError(f"signals='joint' is a rule for the back-matched signals of mode='exact' without "
                             f"approximations; mode={mode!r}"
                             + (" sends no back-matched signal" if mode != "exact" else " has approximations"))
        self.signals = signals
        # torch.distributed (distributed.py): a DDP model is unwrapped to its .module; None when nothing is exchanged
        model, self.distributed = distributed.setup(model, mode, process_group)
        self.model = model
        self.mode = mode
        self.backend = backend
        self.settings = weights.Settings(float(damping), damping_scale == "relative", float(weight_decay),
                                         solve_method)
        self.signal_damping = float(signal_damping)
        self.timing = Timing()  # bench's per-layer breakdown; off unless enabled
        self.layers = self._collect_layers(model)
        self._stats: dict[str, dict] = {}
        self._pending: dict[torch.Tensor, torch.Tensor] = {}
        self._handles: list = []
        self._forward_active = False
        self._forwards = 0  # forward passes with gradients so far
        self._last_output: torch.Tensor | None = None
        self._calls: list[_Call] = []  # this forward pass's module calls, in execution order
        self._approx_plans: dict[tuple, ApproxPlan] = {}  # Algorithm 1 per chain and shapes
        self._approx_step = None  # approx mode: (plan, calls) of the last forward pass, for stats()
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
            layers.append(_Layer(path, module, rule_for(module, path)))
        if not layers:
            raise UnsupportedModuleError("the model has no modules to attach to")
        return layers

    def _install(self) -> None:
        exact = self.mode in ("exact", "exact_weights")
        for layer in self.layers:
            rule = layer.rule
            layer.input_tap = rule.changes_signal and (
                self.mode == "exact" or self.mode == "approx" and may_scale(rule))
            layer.output_tap = exact and (rule.has_weights or rule.needs_output_signal or (
                self.joint is not None and solves_jointly(rule)))  # the joint solve reads g'_b
            layer.check_input = self.mode != "approx" and (rule.has_weights or rule.needs_output_signal)
        hooks = self._handles
        hooks.append(self.model.register_forward_pre_hook(self._model_begin))
        hooks.append(self.model.register_forward_hook(self._model_end))
        for layer in self.layers:
            hooks.append(layer.module.register_forward_pre_hook(functools.partial(self._before, layer)))
            hooks.append(layer.module.register_forward_hook(functools.partial(self._after, layer)))
            if self.mode != "bp":
                for name, param in layer.module.named_parameters(recurse=False):
                    if param.requires_grad:
                        hooks.append(param.register_hook(functools.partial(self._param_grad, layer, name, param)))

    def detach(self) -> None:
        """Remove every hook: the model behaves exactly as before :func:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # --------------------------------------------------------------- forward
    def _model_begin(self, model, args):
        if not torch.is_grad_enabled():  # evaluation: nothing to record, and a pending step's calls stay as they are
            return None
        self._forward_active = True
        self._forwards += 1
        self._calls = []
        self._last_output = args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else None

    def _model_end(self, model, args, output):
        if not self._forward_active:
            return None
        self._forward_active = False
        last = self._last_output
        if isinstance(output, torch.Tensor) and output.requires_grad and (
                last is None or _root(output) is not _root(last)):
            raise GraphError(
                f"the model's output is not the output of its last module ({self._last_path()}): "
                "an operation after it is outside back-matching; move it into the loss"
            )
        if self.mode == "approx" or self.approximations.needs_factors():
            self._approx_factors()
        if self.distributed is not None and self._calls:
            self.distributed.forward_end(self._calls, output, self._row_source)
        if self.mode in ("approx", "bp"):
            # bp reads no input in backward, approx only a weight layer's, and that only to name a NaN
            # (_param_grad): let the others go now, as plain backprop would
            for call in self._calls:
                if self.mode == "bp" or not call.layer.rule.has_weights:
                    call.input = None
        return None

    def _approx_factors(self) -> None:
        calls = self._calls
        chain = tuple((c.layer.path, c.layer.module, c.layer.rule, c.input.shape, c.output_shape) for c in calls)
        plan = self._approx_plans.get(chain)
        if plan is None:  # a new chain or new shapes: Algorithm 1's shape-only part, once
            if len(self._approx_plans) >= 16:
                self._approx_plans.clear()
            plan = self._approx_plans[chain] = ApproxPlan(list(chain))
        for call, factors in zip(calls, plan.factors()):
            call.approx = factors
        if self.mode == "approx":
            self._approx_step = calls  # stats() reads it

    def _approx_stats(self) -> None:
        """Fill ``_stats`` from the last approx-mode forward pass (done only when stats() asks)."""
        for call in self._approx_step:
            layer, factors = call.layer, call.approx
            if layer.rule.has_weights or factors.ratio != 1.0:
                self._stats[layer.path] = {
                    "layer": layer.path, "kind": type(layer.module).__name__, "m": factors.backward_factor,
                    "s": factors.sharing_factor, "r": factors.ratio, "c": factors.location_factor,
                    "scale": 1.0 / (factors.backward_factor * factors.sharing_factor),
                }

    def _last_path(self) -> str:
        return repr(self._calls[-1].layer.path) if self._calls else "none ran"

    def _before(self, layer: _Layer, module, args):
        if not torch.is_grad_enabled():
            return None
        if not self._forward_active:
            raise GraphError(f"layer {layer.path!r} ran outside a forward pass of the attached model")
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise GraphError(f"layer {layer.path!r} must take exactly one tensor input")
        if layer.forward == self._forwards:
            raise GraphError(
                f"layer {layer.path!r} ran twice in one forward pass: shared weights are not supported"
            )
        layer.forward = self._forwards
        x = args[0]
        last = self._last_output
        if not (last is not None and _root(x) is _root(last)) and (self._calls or x.requires_grad):
            raise GraphError(
                f"layer {layer.path!r} ({type(module).__name__}) does not take the output of the previous "
                f"module ({self._last_path()}): work between supported modules (a functional call, a residual "
                "branch) has no back-matching rule"
            )
        layer.call = call = _Call(layer, x)
        self._calls.append(call)
        if layer.check_input:
            self._check_finite(x, "input", layer)  # approx mode: in _param_grad, only if needed
        changed = False
        if layer.input_tap and x.requires_grad:
            x, changed = _SignalTap.apply(x, self, call), True
        if getattr(module, "inplace", False):
            x, changed = x.clone(), True  # the in-place op then writes to our copy, never to a tapped view
        return (x,) if changed else None

    def _after(self, layer: _Layer, module, args, output):
        if not torch.is_grad_enabled():
            return None
        layer.call.output_shape = output.shape
        tapped = layer.output_tap and output.requires_grad
        if tapped:
            output = _OutputTap.apply(output, self, layer.call)
        self._last_output = output
        return output if tapped else None

    def _check_finite(self, t: torch.Tensor, what: str, layer: _Layer) -> None:
        if not _is_finite(t):
            if self.distributed is not None:  # recorded: every rank raises together at the next exchange
                return self.distributed.record_bad(layer.path, what)
            raise NonFiniteError(
                f"layer {layer.path!r} ({type(layer.module).__name__}): {what} of shape {tuple(t.shape)} "
                "contains NaN or infinity"
            )

    # -------------------------------------------------------------- backward
    def _output_signal(self, call: _Call, grad: torch.Tensor) -> None:
        layer = call.layer
        self._check_finite(grad, "signal arriving at the output", layer)
        call.grad_output = grad
        if layer.rule.has_weights:
            self._solve_weights(call, grad)
        elif layer.rule.solves_parameters(layer.module):
            self._solve_parameters(call, grad)

    def _row_source(self, call: _Call) -> weights.RowSource:
        """The input rows of ``call``'s weight problem: the rule's fast source, or A itself (reference)."""
        rule, module, a = call.layer.rule, call.layer.module, call.input.detach()
        if self.backend == "reference":
            return weights.ExplicitRows(rule.input_rows(module, a), a.shape[0] if a.dim() > 1 else 1)
        return rule.row_source(module, a)

    def _solve_weights(self, call: _Call, grad: torch.Tensor) -> None:
        """g'_W for one weight layer, by ``weights.solve`` on this call's row source.

        The fast backend takes autograd's own ``g_W`` where the rule can read it off the
        node that made the layer's output (a convolution's): the solve then runs in a hook on that
        node, before the parameters' hooks, and the node's gradient doubles as the
        outside-use check (``_param_grad``). Otherwise ``g_W = Sᵀ A`` from the row source.
        """
        layer = call.layer
        finish = functools.partial(self._finish_weights, call, self._row_source(call), grad)
        reader = layer.rule.autograd_weight_grads(layer.module, call.node) if self.backend == "fast" else None
        if reader is None:
            return finish(None)
        # a graph kept for another backward (retain_graph) gets a new hook each time: only the newest acts
        call.node_token = token = object()
        call.node.register_hook(functools.partial(self._node_grads, call, token, reader, finish))

    def _node_grads(self, call: _Call, token, reader, finish, grad_inputs, grad_outputs) -> None:
        """Hook on the node that made a weight layer's output: solve with autograd's own gradients of this call."""
        if token is not call.node_token:
            return None
        module = call.layer.module
        grads = reader(grad_inputs)
        names = [name for name in ("weight", "bias") if getattr(module, name, None) is not None]
        if all(grads[name] is None for name in names):
            return None  # no parameter gradient asked for (autograd.grad w.r.t. inputs only)
        usable = all(grads[name] is not None and grads[name].dtype == module.weight.dtype for name in names)
        finish({name: grads[name] for name in names} if usable else None)
        return None

    def _finish_weights(self, call: _Call, local: weights.RowSource, grad: torch.Tensor, plain: dict | None) -> None:
        layer = call.layer
        rule, module, path = layer.rule, layer.module, layer.path

        def signals():
            return rule.signal_rows(module, grad)

        if plain is None:
            with self.timing.part(path, "weight_grad"):
                flat = local.times_rows(signals().T)  # g_W = Sᵀ A (eq. 7/21): the signals carry the loss's 1/B
            call.plain_grads = rule.unflatten(module, flat)
        else:
            flat, call.plain_grads = rule.flatten(module, plain), plain
        source, exchange = local, None
        if self.distributed is not None:
            source, signals, exchange = self.distributed.problem(path, local, signals)
        weight = rule.flat_weight(module).detach() if self.settings.weight_decay else None
        scale = call.approx.sharing_factor if self.approximations.gram else None  # Algorithm 1's G ≈ s·I
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
        if info is None:
            return
        with self.timing.part(path, "column_norms"):
            col_sq = rule.column_sq_norms(module, call.input.detach())  # this step's weights; reduced if read
        amplification = _Deferred(functools.partial(signal_amplification, col_sq, self.signal_damping))
        row = weights.stats_row(path, type(module).__name__, source, module.weight.shape[0], info, amplification)
        if exchange is not None:
            row["exchange"] = exchange
        self._stats[path] = row

    def _solve_parameters(self, call: _Call, grad: torch.Tensor) -> None:
        """The closed-form back-matched gradients of a layer's own parameters (a normalization's γ, β)."""
        layer = call.layer
        gram = self.distributed.parameter_gram(layer.path) if self.distributed is not None else None
        wd = self.settings.weight_decay
        solved, call.plain_grads = layer.rule.parameter_gradients(layer.module, call.input.detach(), grad, wd, gram)
        if self.approximations.gram:  # Algorithm 1's G ≈ s·I here too: s = 1 off weight layers, as approx mode has it
            scale = call.approx.sharing_factor
            solved = {name: (g + wd * getattr(layer.module, name).detach()) / scale
                      for name, g in call.plain_grads.items()}
        for name, value in solved.items():
            self._pending[getattr(layer.module, name)] = value

    def _input_signal(self, call: _Call, grad: torch.Tensor) -> torch.Tensor:
        layer = call.layer
        if self.mode == "approx":
            ratio = call.approx.ratio
            return grad if ratio == 1.0 else grad / ratio  # g'_a ≈ g_a / r
        rule, module, a = layer.rule, layer.module, call.input.detach()
        if self.joint is not None and solves_jointly(rule):
            result = self._joint_signal(call, grad)  # (timed as signal_gram / signal)
            self._check_finite(result, "back-matched input signal", layer)
            return result
        with self.timing.part(layer.path, "input_signal"):
            if self._switched:
                result = rule.approx_signal(module, a, grad, call.grad_output, self.signal_damping,
                                            self.approximations, call.approx)
            else:
                result = rule.signal(module, a, grad, call.grad_output, self.signal_damping)
            self._check_finite(result, "back-matched input signal", layer)
        return result

    def _joint_signal(self, call: _Call, grad: torch.Tensor) -> torch.Tensor:
        """``(JᵀJ + λI)⁺ Jᵀ g'_b`` (``joint.solve``); its statistics join the layer's row of ``stats()``."""
        layer = call.layer
        operator = layer.rule.input_operator(layer.module, call.input.detach())
        try:
            result, info = joint.solve([(operator, call.grad_output)], grad, self.signal_damping, self.joint,
                                       layer.path, self.timing)
        except BackMatchError as exc:
            if self.distributed is None:
                raise
            self.distributed.record_bad(layer.path, "joint input signal", exc)  # no rank raises alone
            return torch.zeros_like(grad)
        row = self._stats.setdefault(layer.path, {"layer": layer.path, "kind": type(layer.module).__name__})
        row.update((key, _Deferred(value) if callable(value) else value) for key, value in info.row().items())
        return result

    def _param_grad(self, layer: _Layer, name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        if self.mode == "approx":
            # the signals arriving were already divided by m, so autograd's grad is g_W / m
            factors = layer.call.approx
            scaled = grad if factors.sharing_factor == 1.0 else grad / factors.sharing_factor
            if self.settings.weight_decay:
                wd = self.settings.weight_decay
                scaled = scaled + (wd / (factors.backward_factor * factors.sharing_factor)) * param
            call = layer.call
            if not math.isfinite(scaled.sum()):
                # approx mode checks the inputs here, not in the forward pass (which it keeps as cheap as plain
                # backprop): a NaN or inf in a weight layer's input always reaches its g_W = Sᵀ A. Name the first
                # layer (forward order) whose input went bad, as the forward check would have.
                bad = next((c for c in self._calls if c.input is not None and not _is_finite(c.input)), None)
                if bad is not None:
                    self._check_finite(bad.input, "input", bad.layer)
            else:
                call.input = None  # finite g_W: the input was finite; release it as plain backprop would
            return scaled
        solved = self._pending.pop(param, None)
        call = getattr(layer, "call", None)
        ours = call.plain_grads.get(name) if call is not None else None
        if solved is None or ours is None:
            raise GraphError(
                f"layer {layer.path!r}: parameter {name!r} received a gradient that did not pass through the "
                "layer's output (used outside its module?)"
            )
        if grad is ours:  # autograd's gradient of this very call (taken off its node), nothing added outside
            return solved
        gap = torch.linalg.vector_norm(grad - ours)
        # measured against the whole layer's gradient: a bias right before a normalization has a gradient that is
        # rounding noise in both computations, which must not read as a 100% difference
        layer_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in
                                                           call.plain_grads.values()]))
        scale = torch.maximum(torch.linalg.vector_norm(grad), layer_norm)
        if bool(gap > 1e-3 * scale + torch.finfo(grad.dtype).tiny):
            raise GraphError(
                f"layer {layer.path!r}: parameter {name!r} received a gradient from outside its module "
                f"(autograd's differs from the layer's own by {float(gap / scale):.2e} relative); add penalties "
                "through attach(weight_decay=...) instead"
            )
        return solved

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
        and was retried); under torch.distributed also ``exchange`` (gram / rows).

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
        for row in rows:  # some values are 0-d tensors or deferred until read: read them here, once
            for key, value in row.items():
                if isinstance(value, _Deferred):
                    value = row[key] = value.fn()
                if isinstance(value, torch.Tensor):
                    row[key] = float(value)
        return rows


class _Skipped(Exception):
    """A distributed step already failed on some rank: this solve is not worth doing."""


def attach(model: nn.Module, mode: str = "exact", damping: float = 0.0, signal_damping: float = 0.0,
           damping_scale: str = "relative", weight_decay: float = 0.0, solve_method: str = "auto",
           process_group=None, approximations=None, backend: str = "fast", signals: str = "per_unit",
           joint_solver: str = "auto", joint_tol: float | None = None, joint_max_iter: int = 500,
           on_no_convergence: str = "raise") -> Engine:
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
    (names from :class:`~backmatch_exact.approx.Approximations`, e.g. ``["gram"]``,
    or ``"all"``, which equals ``mode="approx"`` without weight decay); the rest of
    the step stays exact. backend: ``"fast"`` (default) or ``"reference"``, the
    plain im2col rows and ``g_W = Sᵀ A`` that every fast path is tested against.
    signals: ``"per_unit"`` (default: each input unit matches the change on its own,
    eq. 11–12/22) or ``"joint"`` (``mode="exact"`` only: all of a layer's input units
    at once, ``(JᵀJ + μ·mean_j ‖J_{:,j}‖²·I)⁺ Jᵀ g'_b`` per sample, see ``joint.py``).
    joint_solver: ``"auto"`` (dense up to ``joint.DENSE_MAX`` rows, else iterative),
    ``"dense"`` or ``"iterative"`` (preconditioned CGLS). joint_tol: the iterative
    solve's tolerance on the relative residual of the normal equations (None: 1e-5
    for float32 solves, 1e-10 for float64); joint_max_iter: its iteration cap;
    on_no_convergence: ``"raise"`` (:class:`SolveError`) or ``"record"`` (keep the
    last iterate, ``signal_converged=False`` in ``stats()``).
    process_group: data parallelism over torch.distributed (``distributed.py``). A
    ``DistributedDataParallel`` model is unwrapped (hooks on ``model.module``,
    ``engine.model`` is that module) and exchanges over ``model.process_group``
    unless a group is given. For a plain model, pass the group (e.g.
    ``torch.distributed.group.WORLD``) and average ``p.grad`` over it yourself after
    ``backward()``; with None a plain model is treated as single-process. In exact
    modes the ranks average their Grams, and after the gradient average every rank
    holds the single-process result on the concatenated batch (equal per-rank batch
    sizes required). A bad value on any rank makes every rank raise.

    Returns the :class:`Engine`; ``engine.detach()`` (or leaving a ``with`` block) removes it.
    """
    return Engine(model, mode, damping, signal_damping, damping_scale, weight_decay, solve_method, process_group,
                  approximations, backend, signals, joint_solver, joint_tol, joint_max_iter, on_no_convergence)
