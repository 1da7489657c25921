"""How good is Algorithm 1? Exact back-matching against its one-scale-per-layer approximation.

``backmatch compare`` trains a network (LeNet-BN by default) with an ordinary
optimizer and, at checkpoints, takes one fixed mini-batch and computes for every
weight layer the plain backprop gradient ``g_W``, the exact back-matched gradient
``g'_W`` (engine mode ``"exact"``) and Algorithm 1's ``g̃_W`` (mode ``"approx"``),
then measures how far apart they are and which of Algorithm 1's approximations
is responsible. A fourth run, exact back-matching with the joint input signal
(``signals="joint"``, ``backmatch_exact/joint.py``), measures the assumption
before all of those: that each input unit matches the requested change on its
own (eq. 11). The chain of approximations is joint → per-unit (the paper's
exact back-matching) → Algorithm 1.

Every measurement is one engine run on that batch (:func:`engine_pass`). The
ablations are exact back-matching with some of Algorithm 1's approximations
switched on (``attach(mode="exact", approximations=...)``, see
``backmatch_exact.approximations.Approximations``): each one alone (``only_*``) and all
but one (``without_*``). Two cross-checks hold the engine against independent
computations at every checkpoint: the fast exact backend against the plain
reference backend (im2col rows, ``g_W = Sᵀ A``), and approx mode (which only
rescales) against exact mode with every approximation switched on (which
propagates and solves layer by layer); bp mode is held against plain autograd.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import backmatch_exact as bm

from .. import data
from ..approximations import ALGORITHM1, DESCRIPTIONS, Approximations
from ..layers import rule_for
from ..layers.base import mean_sq_row_norm
from .common import (
    MODELS,
    OPTIMIZERS,
    CommandError,
    add_batch_size,
    add_options,
    build_model,
    check_new_folder,
    fraction,
    load_data,
    make_optimizer,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    return_freed_memory,
    staged_folder,
    to_json,
    undamped_warning,
)

# --------------------------------------------------------------------------------------------------
# Engine runs
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EnginePass:
    """One ``loss.backward()`` through the model, plain or with an engine attached.

    ``weight_grads``: per weight layer the ``p.grad`` it left, flat like ``rule.flat_weight``;
    ``input_signals``: per weight layer the signal at its input, captured with a tensor hook;
    ``inputs``: every weight and normalization layer's input in this forward pass, in execution order
    ``(path, module, input)``; ``stats``: ``engine.stats()`` keyed by layer (empty for plain backprop);
    ``output_signals``: per weight layer the signal arriving at its output.
    """

    loss: float
    weight_grads: dict[str, torch.Tensor]
    input_signals: dict[str, torch.Tensor]
    inputs: list[tuple[str, nn.Module, torch.Tensor]]
    stats: dict[str, dict]
    output_signals: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, m) for path, m in model.named_modules() if next(m.children(), None) is None]


def engine_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str = "plain",
                record_inputs: bool = False, record_signals: tuple[str, ...] = ("input",),
                **attach_args) -> EnginePass:
    """Backward of the mean cross-entropy with ``bm.attach(model, mode, **attach_args)`` (``"plain"``: no engine).

    A forward pre-hook on each leaf module (placed before the engine's own)
    puts a tensor hook on a weight layer's input that records the signal
    arriving there, the backprop signal or the back-matched one (``record_signals``
    holds ``"input"``), and one on its output (``"output"``); with ``record_inputs``
    it keeps the inputs of the weight and normalization layers. The weight gradients
    are always kept (an ablation's run needs no more). ``x`` is made to require grad
    so the first layer's input signal is computed too. (A comparison runs twenty of
    these per checkpoint: a pass keeps only what ``evaluate`` reads.)
    """
    weight_layers = [(path, m) for path, m in _leaves(model) if rule_for(m, path).has_weights]
    signals: dict[str, torch.Tensor] = {}
    inputs: list = []

    def capture(path, module, args):
        rule = rule_for(module, path)
        if record_inputs and (rule.has_weights or rule.normalizes):
            inputs.append((path, module, args[0].detach()))
        if "input" in record_signals and args[0].requires_grad and rule.has_weights:
            args[0].register_hook(lambda g: signals.__setitem__(path, g.detach().clone()))

    outputs: dict[str, torch.Tensor] = {}

    def capture_output(path, module, args, out):
        if "output" in record_signals and out.requires_grad:
            out.register_hook(lambda g: outputs.__setitem__(path, g.detach().clone()))

    handles = [m.register_forward_pre_hook(functools.partial(capture, path), prepend=True)
               for path, m in _leaves(model)]
    handles += [m.register_forward_hook(functools.partial(capture_output, path), prepend=True)
                for path, m in weight_layers]
    engine = bm.attach(model, mode=mode, **attach_args) if mode != "plain" else None
    try:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x.detach().clone().requires_grad_(True)), y)
        loss.backward()
        stats = {s["layer"]: s for s in engine.stats()} if engine else {}
        grads = {path: _flat_grad(m).detach().clone() for path, m in weight_layers}
    finally:
        if engine is not None:
            engine.detach()
        for handle in handles:
            handle.remove()
    return EnginePass(loss.item(), grads, signals, inputs, stats, outputs)


def _flat_grad(module: nn.Module) -> torch.Tensor:
    n = module.weight.shape[0]
    parts = [module.weight.grad.reshape(n, -1)]
    if getattr(module, "bias", None) is not None:
        parts.append(module.bias.grad[:, None])
    return torch.cat(parts, dim=1)


def ablation_settings() -> dict[str, Approximations]:
    """The ablation runs of an evaluation: each approximation alone, and Algorithm 1 without each."""
    settings = {f"only_{name}": Approximations.only(name) for name in Approximations.names()}
    settings.update({f"without_{name}": Approximations.all_but(name) for name in Approximations.names()})
    return settings


# --------------------------------------------------------------------------------------------------
# One checkpoint's measurements
# --------------------------------------------------------------------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors as flat vectors, clamped to [-1, 1] (nan if either is 0)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    den = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    if den == 0.0:
        return float("nan")
    return max(-1.0, min(1.0, float(a @ b) / den))


def norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach().double()))


def ratio(num: float, den: float) -> float:
    return num / den if den != 0 else float("nan")


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a - b‖ / ‖b‖`` (0 when both are 0)."""
    den = norm(b)
    gap = norm(a - b)
    return gap / den if den else (0.0 if gap == 0 else float("inf"))


def denominator_spread(col_sq: torch.Tensor) -> tuple[float, float]:
    """(max/mean, std/mean) of a layer's per-unit signal denominators ``‖J_{:,j}‖²``."""
    col_sq = col_sq.double().reshape(-1)
    mean = float(col_sq.mean())
    if mean == 0:
        return float("nan"), float("nan")
    return float(col_sq.max()) / mean, float(col_sq.std(unbiased=False)) / mean


def gram_diagnostics(rows: torch.Tensor, batch: int, sharing: float) -> tuple[float, float]:
    """How well ``G ≈ s·I`` holds for input rows A: (mean diag(G) / s, ‖G - diag G‖_F / ‖diag G‖)."""
    rows = rows.double()
    gram = rows.T @ rows / batch
    diag = torch.diagonal(gram)
    off = gram - torch.diag(diag)
    return float(diag.mean()) / sharing, norm(off) / norm(diag)


def _largest_gap(a: EnginePass, b: EnginePass) -> float:
    """Largest relative difference between two runs' weight gradients and weight-layer input signals."""
    return max(max(relative_difference(a.weight_grads[p], b.weight_grads[p]),
                   relative_difference(a.input_signals[p], b.input_signals[p])) for p in b.weight_grads)


CHECKS = {
    "reference_vs_exact": "fast exact backend against the reference backend (im2col rows, g_W = Sᵀ A)",
    "switches_vs_approx": "approx mode against exact mode with every approximation switched on",
    "bp_mode_vs_autograd": "the engine's bp mode against plain autograd",
}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, damping: float = 0.0,
             signal_damping: float = 0.0, damping_scale: str = "relative",
             float32_model: nn.Module | None = None, float32_solve_dtype=None) -> tuple[list[dict], dict]:
    """All per-layer measurements on one batch ``(x, y)`` for the model as it is now.

    ``model`` should be a private copy (its BatchNorm running statistics move),
    in the dtype the comparison runs in, in training mode. ``damping`` and
    ``signal_damping`` configure the exact mode (and the ablations). ``float32_model``,
    if given, is a float32 copy whose exact gradients (solved with
    ``attach(solve_dtype=float32_solve_dtype)``) are compared with ``model``'s
    to show how much float32 rounding moves them.

    Returns ``(rows, checks)``: one dict per weight layer (see the module's CSV
    columns) and the cross-checks (:data:`CHECKS`: largest relative differences).
    """
    exact_args = dict(damping=damping, signal_damping=signal_damping, damping_scale=damping_scale)
    run = functools.partial(engine_pass, model, x, y)
    # The order keeps the peak memory down (the quick start's compare: about 0.6 GB, was 1.3): the passes
    # with the most temporaries (the reference backend's explicit rows, the joint solves) run while few
    # results are kept, a check's run is dropped once compared, and the freed heap is handed back after
    # each group of passes.
    passes = {"exact": run("exact", **exact_args)}
    checks = {"reference_vs_exact": _largest_gap(passes["exact"], run("exact", backend="reference", **exact_args))}
    # (an iterative joint solve that stops short is recorded, not raised: joint_residual reports it)
    passes["joint"] = run("exact", signals="joint", on_no_convergence="record", record_signals=("input", "output"),
                          **exact_args)
    return_freed_memory()
    passes["bp"] = run("plain", record_inputs=True)
    checks["bp_mode_vs_autograd"] = _largest_gap(passes["bp"], run("bp"))
    passes["approx"] = run("approx")
    checks["switches_vs_approx"] = _largest_gap(passes["approx"], run("exact", approximations=ALGORITHM1))
    checks["loss"] = passes["bp"].loss
    return_freed_memory()
    ablations = {key: run("exact", approximations=switches, record_signals=(), **exact_args)
                 for key, switches in ablation_settings().items()}
    f32 = (engine_pass(float32_model, x.float(), y, "exact", record_signals=(), solve_dtype=float32_solve_dtype,
                       **exact_args) if float32_model is not None else None)
    calls = passes["bp"].inputs
    rows = [_layer_row(calls, index, passes, ablations, f32) | _joint_columns(calls[index], passes, signal_damping)
            for index, (path, module, _) in enumerate(calls) if rule_for(module, path).has_weights]
    return rows, checks


def _joint_columns(call: tuple, passes: dict[str, EnginePass], signal_damping: float) -> dict:
    """Per-unit against joint back-matching at one weight layer (the independence assumption of eq. 11).

    ``cos_joint_per_unit``, ``joint_norm_ratio``: the weight gradients ``g'_W`` of the per-unit and the joint
    runs (cosine; ‖per-unit‖ / ‖joint‖). ``signal_*``: the same for the signals at the layer's input, which
    compound every layer above. ``local_*``: this layer's rules alone, on the same signal ``g'_b`` at its
    output (the joint run's): ``Jᵀg'_b / ‖J_{:,j}‖²`` against ``J⁺ g'_b``. ``joint_residual``: the joint
    solve's relative residual of the normal equations there.
    """
    path, module, a = call
    rule = rule_for(module, path)
    per_unit, joint = passes["exact"], passes["joint"]
    g_b = joint.output_signals[path]
    operator = rule.input_operator(module, a)
    backprop = operator.rmatvec(operator.out_rows(g_b)).reshape(a.shape)
    local = rule.signal(module, a, backprop, g_b, signal_damping, Approximations())
    columns = {"joint_residual": float(joint.stats[path]["signal_residual"])}
    for prefix, mine, theirs in (("", per_unit.weight_grads[path], joint.weight_grads[path]),
                                 ("signal_", per_unit.input_signals[path], joint.input_signals[path]),
                                 ("local_", local, joint.input_signals[path])):
        columns[f"{prefix}cos_joint_per_unit"] = cosine(mine, theirs)
        columns[f"{prefix}joint_norm_ratio"] = ratio(norm(mine), norm(theirs))
    return columns


def _layer_row(calls: list, index: int, passes: dict[str, EnginePass], ablations: dict[str, EnginePass],
               f32: EnginePass | None) -> dict:
    """The measurements of the weight layer ``calls[index]``: one row of ``layers.csv`` (without step and losses)."""
    path, module, a = calls[index]
    rule = rule_for(module, path)
    g = {mode: result.weight_grads[path] for mode, result in passes.items()}
    signal = {mode: result.input_signals[path] for mode, result in passes.items()}
    approx_stats, exact_stats = passes["approx"].stats[path], passes["exact"].stats[path]
    weight_norm = norm(module.weight)
    row = {
        "layer": path, "kind": type(module).__name__,
        # Algorithm 1 against exact back-matching
        "cosine": cosine(g["approx"], g["exact"]), "norm_ratio": ratio(norm(g["approx"]), norm(g["exact"])),
        "cos_bp_exact": cosine(g["bp"], g["exact"]),
        # backward factor at the layer's input: backprop signal over back-matched signal
        "m_exact": ratio(norm(signal["bp"]), norm(signal["exact"])),
        "m_approx": approx_stats["m"] * approx_stats["r"],
        "s": approx_stats["s"], "r_approx": approx_stats["r"],
        # gradient magnitude relative to the weights
        **{f"rel_{mode}": ratio(norm(g[mode]), weight_norm) for mode in ("bp", "exact", "approx")},
        # how non-uniform the signal denominators are, and how far G is from s·I
        "amplification": exact_stats["amplification"], "condition": exact_stats["condition"],
    }
    row["m_ratio"] = ratio(row["m_approx"], row["m_exact"])
    row["den_max_mean"], row["den_std_mean"] = denominator_spread(rule.column_sq_norms(module, a))
    row["gram_scale"], row["gram_offdiag"] = gram_diagnostics(rule.input_rows(module, a), a.shape[0],
                                                              approx_stats["s"])
    # approximation (c): the BatchNorm after this layer, its batch variance against ‖W‖²_{2,µ}
    row["bn_var_ratio"] = row["bn_var_spread"] = float("nan")
    bn = _batchnorm_after(calls, index)
    if bn is not None:
        var = (rule_for(bn[1], bn[0]).std(bn[1], bn[2]).double() ** 2).reshape(-1)  # (BatchNorm: one per channel)
        row["bn_var_ratio"] = float(var.mean()) / mean_sq_row_norm(module.weight)
        row["bn_var_spread"] = float(var.std(unbiased=False) / var.mean())
    row["f32_cosine"] = row["f32_rel_diff"] = float("nan")
    row["f32_solve_dtype"] = ""
    if f32 is not None:
        row["f32_solve_dtype"] = f32.stats[path]["solve_dtype"]
        row["f32_cosine"] = cosine(f32.weight_grads[path], g["exact"])
        row["f32_rel_diff"] = relative_difference(f32.weight_grads[path].to(g["exact"].dtype), g["exact"])
    for key, result in ablations.items():
        row[f"{key}_cos"] = cosine(result.weight_grads[path], g["exact"])
        row[f"{key}_ratio"] = ratio(norm(result.weight_grads[path]), norm(g["exact"]))
    return row


def _batchnorm_after(calls: list, index: int):
    """The BatchNorm call ``(path, module, input)`` between weight layer ``index`` and the next one, if any."""
    for path, module, a in calls[index + 1:]:
        rule = rule_for(module, path)
        if rule.has_weights:
            return None
        if rule.normalizes:
            return path, module, a
    return None


# --------------------------------------------------------------------------------------------------
# Summaries and generated text
# --------------------------------------------------------------------------------------------------


def _finite(values) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _mean(values) -> float:
    values = _finite(values)
    return float(np.mean(values)) if values else float("nan")


#: the ablation row of the independence assumption: exact per-unit back-matching against exact joint
PER_UNIT = "per_unit"
PER_UNIT_MEANING = ("(eq. 11) each input unit matches the requested change on its own: exact per-unit "
                    "back-matching, compared with exact joint back-matching")


def ablation_costs(rows: list[dict]) -> dict[str, dict]:
    """Per ablation key: mean ``1 - cosine`` and mean ``|log10 norm ratio|`` over all rows.

    The ``only_*`` / ``without_*`` keys are measured against exact (per-unit) back-matching; :data:`PER_UNIT`,
    exact per-unit back-matching itself, against exact joint back-matching.
    """
    columns = {key: (f"{key}_cos", f"{key}_ratio") for key in ablation_settings()}
    columns[PER_UNIT] = ("cos_joint_per_unit", "joint_norm_ratio")
    costs = {}
    for key, (cos, norm_ratio) in columns.items():
        costs[key] = {
            "mean_1_minus_cos": _mean(1.0 - r[cos] for r in rows),
            "mean_abs_log10_ratio": _mean(abs(math.log10(r[norm_ratio])) for r in rows if r[norm_ratio] > 0),
        }
    return costs


def gradient_spread(rows: list[dict]) -> dict[str, dict]:
    """Per checkpoint, per method, the ratio max/min over layers of ``‖g_W‖/‖W‖``."""
    spread = {}
    for step in sorted({r["step"] for r in rows}):
        at = [r for r in rows if r["step"] == step]
        spread[step] = {}
        for method in ("bp", "exact", "approx"):
            values = _finite(r[f"rel_{method}"] for r in at)
            spread[step][method] = max(values) / min(values) if values and min(values) > 0 else float("nan")
    return spread


def _number(value, fmt: str = "{:.3g}") -> str:
    """``value`` formatted, or "–" where it is not a finite number (a quantity the layer does not have)."""
    return fmt.format(value) if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def _largest_factor(rows: list[dict], key: str) -> tuple[float, dict | None]:
    """The largest factor ``max(v, 1/v)`` of a ratio column over ``rows``, and its row."""
    rated = [(10 ** abs(math.log10(r[key])), r) for r in rows if math.isfinite(r[key]) and r[key] > 0]
    return max(rated, key=lambda fr: fr[0]) if rated else (math.nan, None)


def findings(rows: list[dict], checks: dict, dtype: str = "float64") -> list[dict]:
    """What the run shows, for ``report.md`` and ``summary.json``: per finding a one-sentence ``conclusion``
    and the measured ``numbers`` behind it."""
    steps = sorted({r["step"] for r in rows})
    first, last = steps[0], steps[-1]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    at = {step: {r["layer"]: r for r in rows if r["step"] == step} for step in steps}
    out = []

    def add(conclusion: str, numbers: str) -> None:
        out.append({"conclusion": conclusion, "numbers": numbers})

    def per_layer(step, key, fmt="{:.3f}"):
        return ", ".join(f"{layer} {_number(at[step][layer][key], fmt)}" for layer in layers)

    def at_steps(key, fmt="{:.3f}"):
        text = f"at step {first}: {per_layer(first, key, fmt)}"
        return text + (f"; at step {last}: {per_layer(last, key, fmt)}" if last != first else "")

    cos_all = _finite(r["cosine"] for r in rows)
    worst = min(rows, key=lambda r: r["cosine"] if math.isfinite(r["cosine"]) else 2.0)
    lowest = min(cos_all, default=math.nan)
    if lowest >= 0.99:
        conclusion = f"Algorithm 1 points where exact back-matching does: cosine at least {lowest:.3f} everywhere."
    elif lowest >= 0.9:
        conclusion = (f"Algorithm 1 points roughly where exact back-matching does, least so at {worst['layer']} "
                      f"(cosine {lowest:.3f} at step {worst['step']}).")
    else:
        conclusion = (f"Algorithm 1's direction departs from exact back-matching's: the cosine drops to "
                      f"{_number(lowest, '{:.3f}')} at {worst['layer']} (step {worst['step']}).")
    gap = max(abs(r["cosine"] - r["cos_bp_exact"]) for r in rows)
    if gap < 1e-6:
        relation = ("Algorithm 1 only rescales the backprop gradient, so this equals cosine(exact, backprop) "
                    f"(largest gap between the two columns: {gap:.1e}).")
    else:  # a fan-out: the branches' backward factors m differ, and their sum is not backprop's over one m
        relation = ("On this network Algorithm 1 is not backprop rescaled layer by layer (where a tensor feeds "
                    "several layers, it sums the consumers' signals each over its own backward factor), so "
                    f"cosine(exact, backprop) differs from this by up to {gap:.2g}.")
    add(conclusion, f"cosine(exact g'_W, approx g̃_W) {at_steps('cosine')}; mean over the {len(steps)} "
        f"checkpoints {_number(_mean(cos_all), '{:.3f}')}. " + relation)

    factor, row = _largest_factor(rows, "norm_ratio")
    if row is None or factor < 1.5:
        conclusion = f"Algorithm 1's step sizes match exact back-matching's within a factor {_number(factor)}."
    else:
        conclusion = (f"Algorithm 1's step size is off by up to a factor {factor:.3g}: "
                      f"{'larger' if row['norm_ratio'] > 1 else 'smaller'} than exact at {row['layer']} "
                      f"(step {row['step']}).")
    add(conclusion, f"Norm ratio ‖g̃‖/‖g'‖ {at_steps('norm_ratio', '{:.3g}')}.")

    factor, row = _largest_factor(rows, "m_ratio")
    if row is None or factor < 1.5:
        conclusion = f"Algorithm 1 predicts the exact signal scale at every weight layer's input within a factor " \
                     f"{_number(factor)}."
    else:
        conclusion = (f"Algorithm 1 {'over' if row['m_ratio'] > 1 else 'under'}estimates the backward factor at "
                      f"{row['layer']}'s input by up to a factor {factor:.3g} (step {row['step']}).")
    add(conclusion, f"Backward factor at each weight layer's input, m_approx/m_exact {at_steps('m_ratio', '{:.3g}')} "
        "(1 = Algorithm 1 predicts the exact signal scale).")

    costs = ablation_costs(rows)
    names = Approximations.names()

    def ranked(prefix, what, fmt="{:.3f}"):
        order = sorted(names, key=lambda n: -_nan_low(costs[f"{prefix}_{n}"][what]))
        return order, ", ".join(f"{n} {_number(costs[f'{prefix}_{n}'][what], fmt)}" for n in order)

    only, text = ranked("only", "mean_1_minus_cos")
    add(f"Made alone, {only[0]} is the approximation that moves the gradient's direction most.",
        f"Mean 1 − cosine to exact with one approximation made: {text}.")
    only, text = ranked("only", "mean_abs_log10_ratio")
    scale = costs[f"only_{only[0]}"]["mean_abs_log10_ratio"]
    add(f"Made alone, {only[0]} is the one that moves the step size most (by a factor "
        f"{_number(10 ** scale if math.isfinite(scale) else scale, '{:.2f}')} on average).",
        f"Mean |log10 norm ratio| to exact with one approximation made: {text}.")
    _, text = ranked("without", "mean_1_minus_cos")
    full = _mean(1.0 - r["cosine"] for r in rows)
    measured = {n: costs[f"without_{n}"]["mean_1_minus_cos"] for n in names}
    best = min(names, key=lambda n: (not math.isfinite(measured[n]), measured[n]))  # NaN: could not measure
    if measured[best] < full:
        conclusion = f"Computing {best} exactly would bring Algorithm 1 closest to exact back-matching."
    else:
        conclusion = "No single approximation is to blame: undoing any one of them leaves Algorithm 1 as far " \
                     "from exact back-matching."
    add(conclusion, f"Mean 1 − cosine to exact of full Algorithm 1 {_number(full, '{:.3f}')}; of Algorithm 1 "
        f"without one approximation: {text}.")

    chain = sorted([PER_UNIT] + [f"only_{n}" for n in names], key=lambda k: -_nan_low(costs[k]["mean_1_minus_cos"]))
    add(f"Of all the assumptions between exact joint back-matching and Algorithm 1, {chain[0]} costs the "
        "gradient's direction most.",
        "Mean 1 − cosine against the rung above (per_unit: exact per-unit against exact joint; only_*: one of "
        "Algorithm 1's approximations against exact per-unit): "
        + ", ".join(f"{k} {_number(costs[k]['mean_1_minus_cos'])}" for k in chain) + "; mean |log10 norm ratio|: "
        + ", ".join(f"{k} {_number(costs[k]['mean_abs_log10_ratio'])}" for k in chain) + ".")
    worst_layer = min(layers, key=lambda layer: _nan_low(-_mean(1 - r["cos_joint_per_unit"] for r in rows
                                                                if r["layer"] == layer)))
    add(f"The independence assumption (per-unit instead of joint input signals) moves {worst_layer}'s update "
        "most.",
        f"Cosine of per-unit and joint g'_W {at_steps('cos_joint_per_unit')}; norm ratio ‖per-unit‖/‖joint‖ "
        f"{at_steps('joint_norm_ratio', '{:.3g}')}. One layer's rule alone on the same g'_b, mean cosine over "
        "checkpoints: " + ", ".join(
            f"{layer} {_number(_mean(r['local_cos_joint_per_unit'] for r in rows if r['layer'] == layer))}"
            for layer in layers)
        + f"; largest joint solve residual {max(_finite(r['joint_residual'] for r in rows), default=0.0):.1e}.")

    spread = gradient_spread(rows)
    exact, bp = spread[last]["exact"], spread[last]["bp"]
    if math.isfinite(exact) and math.isfinite(bp) and exact != bp:
        conclusion = (f"Exact back-matching {'evens out' if exact < bp else 'spreads out'} the gradient size "
                      f"relative to the weights across layers, compared with backprop (step {last}).")
    else:
        conclusion = f"Exact back-matching and backprop spread the relative gradient size alike (step {last})."

    def spreads(step):
        return ", ".join(f"{name} {_number(spread[step][method])}"
                         for name, method in (("BP", "bp"), ("exact", "exact"), ("approx", "approx")))

    add(conclusion, f"Max/min of ‖g_W‖/‖W‖ over layers at step {first}: {spreads(first)}"
        + (f"; at step {last}: {spreads(last)}." if last != first else "."))

    amp = max(rows, key=lambda r: _nan_low(r["amplification"]))
    add(f"Exact back-matching gives a layer's weakest unit up to {_number(amp['amplification'])} times the "
        f"average unit's signal ({amp['layer']}, step {amp['step']}).",
        f"Largest mean/min squared column norm per layer at step {last}: "
        f"{per_layer(last, 'amplification', '{:.3g}')}; denominators' std/mean: "
        f"{per_layer(last, 'den_std_mean', '{:.2f}')}.")

    gram = list(at[last].values())
    scale_factor, _ = _largest_factor(gram, "gram_scale")
    offdiag = max(_finite(r["gram_offdiag"] for r in gram), default=math.nan)
    holds = scale_factor <= 2 and offdiag <= 0.5
    add(f"Approximation (a), G ≈ s·I, {'roughly holds' if holds else 'does not hold'} at step {last}: the scale "
        f"is off by up to a factor {_number(scale_factor)}, the off-diagonal part up to {_number(offdiag)} of "
        "the diagonal.",
        f"Mean diag(G)/s: {per_layer(last, 'gram_scale', '{:.3g}')}; off-diagonal/diagonal norm: "
        f"{per_layer(last, 'gram_offdiag', '{:.3g}')}.")

    bn = [r for r in gram if math.isfinite(r["bn_var_ratio"])]
    if bn:
        bn_factor, _ = _largest_factor(bn, "bn_var_ratio")
        missing = [r["layer"] for r in gram if not math.isfinite(r["bn_var_ratio"])]
        add(f"Approximation (c), Var[a] ≈ ‖W‖²_{{2,µ}} at the BatchNorm after a layer, is off by up to a factor "
            f"{_number(bn_factor)} at step {last}.",
            "Mean Var[a] / ‖W‖²_{2,µ}: " + ", ".join(f"{r['layer']} {r['bn_var_ratio']:.3g}" for r in bn)
            + (f" ({', '.join(missing)}: no BatchNorm after it)." if missing else "."))

    f32 = _finite(r["f32_rel_diff"] for r in rows)
    if f32:
        worst = max((r for r in rows if math.isfinite(r["f32_rel_diff"])), key=lambda r: r["f32_rel_diff"])
        if worst["f32_rel_diff"] < 1e-3:
            conclusion = (f"float32 is enough for the exact gradients: they differ from {dtype} by at most "
                          f"{worst['f32_rel_diff']:.1e}.")
        else:
            conclusion = (f"float32 is not enough for the exact gradients everywhere: they differ from {dtype} by "
                          f"up to {worst['f32_rel_diff']:.1e} at {worst['layer']} (step {worst['step']}).")
        least = min((r for r in rows if math.isfinite(r["f32_cosine"])), key=lambda r: r["f32_cosine"])
        in64 = collections.Counter(r["layer"] for r in rows if r.get("f32_solve_dtype") == "float64")
        add(conclusion, f"Relative difference float32 vs {dtype}: largest {worst['f32_rel_diff']:.1e} "
            f"({worst['layer']}, step {worst['step']}; condition of G there {worst['condition']:.3g}), "
            f"median {np.median(f32):.1e}; cosine at least {least['f32_cosine']:.6f} ({least['layer']}, step "
            f"{least['step']}). Solves of the float32 copy that ran in float64: "
            + (", ".join(f"{layer} ({n} of {len(steps)} checkpoints)" for layer, n in in64.items()) or "none")
            + ".")

    gap = max(checks[key] for key in CHECKS)
    if gap < 1e-6:
        conclusion = f"The engine agrees with its independent cross-checks (largest relative difference {gap:.1e})."
    else:
        conclusion = (f"The engine disagrees with a cross-check (largest relative difference {gap:.1e}): "
                      "treat the numbers above with suspicion.")
    add(conclusion, "Largest relative difference over layers and checkpoints: fast exact backend vs reference "
        f"backend {checks['reference_vs_exact']:.1e}, approx mode vs exact with every approximation switched on "
        f"{checks['switches_vs_approx']:.1e}, bp mode vs autograd {checks['bp_mode_vs_autograd']:.1e}.")
    return out


def _nan_low(value: float) -> float:
    """Sort key: ``value``, with NaN below everything."""
    return value if math.isfinite(value) else -math.inf


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

CSV_COLUMNS = (["step", "layer", "kind", "cosine", "norm_ratio", "m_exact", "m_approx", "m_ratio", "cos_bp_exact",
                "rel_bp", "rel_exact", "rel_approx", "amplification", "den_max_mean", "den_std_mean", "s",
                "r_approx", "gram_scale", "gram_offdiag", "condition", "bn_var_ratio", "bn_var_spread",
                "f32_cosine", "f32_rel_diff", "f32_solve_dtype", "train_loss", "eval_loss", "cos_joint_per_unit",
                "joint_norm_ratio", "signal_cos_joint_per_unit", "signal_joint_norm_ratio", "local_cos_joint_per_unit",
                "local_joint_norm_ratio", "joint_residual"]
               + [f"{key}_{what}" for key in ablation_settings() for what in ("cos", "ratio")])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``backmatch compare`` options."""
    add_options(parser, "--data")
    parser.add_argument("--model", default="lenet", choices=MODELS, help="network: LeNet-BN, VGG-BN or a CIFAR ResNet")
    parser.add_argument("--optim", default="sgd", choices=OPTIMIZERS, help="optimizer that trains the network")
    parser.add_argument("--lr", type=positive_float, default=0.05, help="learning rate of the training")
    parser.add_argument("--momentum", type=fraction, default=0.9, help="momentum of the training")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="weight decay of the training")
    parser.add_argument("--steps", type=non_negative_int, default=300,
                        help="training steps (0: evaluate the initial weights only)")
    parser.add_argument("--every", type=positive_int, default=30,
                        help="evaluate every this many steps (and at step 0 and the last step)")
    add_batch_size(parser, "training batch size")
    parser.add_argument("--eval-batch", type=positive_int, default=128, help="size of the fixed evaluation batch")
    parser.add_argument("--damping", type=non_negative_float, default=0.0,
                        help="λ of the exact mode being evaluated (and of the training, for --optim exact*)")
    parser.add_argument("--signal-damping", type=non_negative_float, default=0.0,
                        help="μ of the exact mode being evaluated (and of the training, for --optim exact)")
    parser.add_argument("--eval-dtype", default="float64", choices=["float32", "float64"],
                        help="dtype of the evaluation copies (the exact solves run in it)")
    parser.add_argument("--no-float32-check", action="store_true",
                        help="skip the float32-vs-eval-dtype comparison of the exact gradients")
    parser.add_argument("--float32-solve-dtype", default="auto", choices=["auto", "float32", "float64"],
                        help="attach(solve_dtype=...) of the float32 copy: auto (the default, None), float32 or "
                             "float64")
    add_options(parser, "--seed", "--device", "--threads")
    parser.add_argument("--out", default="compare_out",
                        help="output folder; written only when the run ends, all files at once")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results in an --out that already holds files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def run(args: argparse.Namespace) -> dict:
    """Train, evaluate at checkpoints, write ``layers.csv``, ``summary.json``, plots and ``report.md``.

    Checks ``--out`` and loads the data before anything is created; the files
    are written into a hidden folder next to ``--out`` and moved there at the
    end (:func:`~.common.staged_folder`). A run stopped early — Ctrl-C, or the
    training diverging — still writes what its finished checkpoints measured,
    and ``summary["stopped"]`` says why; Ctrl-C before the first checkpoint
    writes nothing. Returns the summary dictionary (also written to ``summary.json``).
    """
    start = time.perf_counter()
    out = Path(args.out)
    check_new_folder(out, args.overwrite)
    dataset = load_data(args.data)
    if args.optim == "exact" and args.damping == 0 and args.signal_damping == 0:
        print(undamped_warning("compare", ["--optim exact"]), file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, losses, all_checks, eval_time, stopped = _measure(args, dataset)
    if not rows:
        raise KeyboardInterrupt  # (only Ctrl-C stops a run before its first checkpoint)

    checks = {key: max(c[key] for c in all_checks) for key in CHECKS}
    costs, spread = ablation_costs(rows), gradient_spread(rows)
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    last = max(r["step"] for r in rows)
    summary = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("run", "command")},
        "dataset": dataset.name, "eval_dtype": args.eval_dtype,
        "checkpoints": sorted({r["step"] for r in rows}), "layers": layers,
        "stopped": stopped,
        "consistency": checks,
        "final": {r["layer"]: {k: r[k] for k in CSV_COLUMNS if k in r} for r in rows if r["step"] == last},
        "mean_over_checkpoints": {layer: {k: _mean(r[k] for r in rows if r["layer"] == layer)
                                          for k in CSV_COLUMNS[3:] if k not in ("kind",)} for layer in layers},
        "ablation_costs": costs,
        "gradient_spread": spread,
        "train_loss": losses,
        "findings": findings(rows, checks, args.eval_dtype),
    }
    from .figures import compare_figures  # (matplotlib is loaded when the figures are drawn, not during the run)

    with staged_folder(out) as stage:
        _write_csv(stage / "layers.csv", rows)
        summary["figures"] = compare_figures(rows, losses, stage, Approximations.names(), costs, spread)
        total = time.perf_counter() - start
        summary["timing_s"] = {"total": total, "evaluation": eval_time, "training": total - eval_time}
        (stage / "summary.json").write_text(to_json(summary, indent=1))
        (stage / "report.md").write_text(report(summary, rows))
    return summary


def _measure(args: argparse.Namespace, dataset: data.Dataset):
    """The training run and its checkpoints: ``(rows, losses, checks per checkpoint, evaluation seconds, stopped)``.

    ``stopped`` is None for a run that reached ``--steps``, else ``{"why": "interrupted" | "diverged", "step",
    "message"}``: Ctrl-C and a diverging training end the run early, keeping the checkpoints measured so far.
    """
    device = torch.device(args.device)
    build = functools.partial(build_model, args.model, dataset.in_channels, dataset.num_classes)
    torch.manual_seed(args.seed)
    model = build().to(device)
    optimizer, engine = make_optimizer(args.optim, model, args.lr, momentum=args.momentum,
                                       weight_decay=args.weight_decay, damping=args.damping,
                                       signal_damping=args.signal_damping)
    generator = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(dataset.y_train), generator=torch.Generator().manual_seed(args.seed + 1))
    eval_dtype = getattr(torch, args.eval_dtype)
    x_eval = dataset.x_train[pick[:args.eval_batch]].to(device, eval_dtype)
    y_eval = dataset.y_train[pick[:args.eval_batch]].to(device)

    def copy_of_model(dtype):
        clone = build().to(device, dtype)
        clone.load_state_dict(model.state_dict())
        return clone.train()

    rows, losses, all_checks = [], [], []
    eval_time = 0.0
    checkpoints = set(range(0, args.steps + 1, args.every)) | {args.steps}
    progress = tqdm(total=args.steps, desc="compare", unit="step", disable=args.no_progress)
    step, train_loss, stopped = 0, float("nan"), None
    batches = iter(())
    try:
        while True:
            if step in checkpoints:
                tick = time.perf_counter()
                f32 = None if args.no_float32_check else copy_of_model(torch.float32)
                step_rows, checks = evaluate(copy_of_model(eval_dtype), x_eval, y_eval, args.damping,
                                             args.signal_damping, float32_model=f32,
                                             float32_solve_dtype=getattr(torch, args.float32_solve_dtype, None))
                return_freed_memory()  # (the evaluation's temporaries, before training goes on)
                for row in step_rows:
                    row.update(step=step, train_loss=train_loss, eval_loss=checks["loss"])
                rows += step_rows
                all_checks.append(checks)
                eval_time += time.perf_counter() - tick
                progress.set_postfix(loss=f"{train_loss:.3f}", cos=f"{min(r['cosine'] for r in step_rows):.3f}")
            if step == args.steps:
                break
            idx = next(batches, None)
            if idx is None:
                batches = data.batches(len(dataset.y_train), args.batch_size, generator)
                idx = next(batches)
            x, y = dataset.x_train[idx].to(device), dataset.y_train[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            try:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            except (bm.NonFiniteError, bm.SolveError) as err:
                stopped = {"why": "diverged", "step": step + 1, "message": f"{type(err).__name__}: {err}"}
                break
            optimizer.step()
            train_loss = loss.item()
            losses.append(train_loss)
            if not math.isfinite(train_loss):
                stopped = {"why": "diverged", "step": step + 1, "message": f"training loss {train_loss}"}
                break
            step += 1
            progress.update(1)
    except KeyboardInterrupt:
        stopped = {"why": "interrupted", "step": step, "message": f"Ctrl-C at step {step} of {args.steps}"}
    finally:
        progress.close()
        if engine is not None:
            engine.detach()
    return rows, losses, all_checks, eval_time, stopped


def _table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return _number(value) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _ablation_meaning(key: str) -> str:
    """What an ablation setting is: exact + one approximation, or Algorithm 1 without one."""
    kind, name = key.split("_", 1)
    if kind == "only":
        return f"exact + {name}: {DESCRIPTIONS[name]}"
    return f"Algorithm 1 without {name}, i.e. every approximation but this one: {DESCRIPTIONS[name]}"


def report(summary: dict, rows: list[dict]) -> str:
    """``report.md``: settings, findings (a conclusion, then its numbers), per-layer tables and the plots."""
    s = summary["settings"]
    last = max(r["step"] for r in rows)
    first = min(r["step"] for r in rows)
    costs = summary["ablation_costs"]
    stopped = summary.get("stopped")
    no_bn = [r["layer"] for r in rows if r["step"] == last and not math.isfinite(r["bn_var_ratio"])]
    parts = [
        "# Exact back-matching vs Algorithm 1",
        "",
        f"{s['model']} on {summary['dataset']}, trained {s['steps']} steps with {s['optim']} (lr {s['lr']}, "
        f"momentum {s['momentum']}, batch {s['batch_size']}, seed {s['seed']}); evaluated every {s['every']} steps "
        f"on one fixed batch of {s['eval_batch']} training images in {summary['eval_dtype']}. Exact mode: damping "
        f"λ = {s['damping']}, signal damping μ = {s['signal_damping']}. Total time "
        f"{summary['timing_s']['total']:.0f} s ({summary['timing_s']['evaluation']:.0f} s evaluating).",
        "",
        *([f"**Stopped early** ({stopped['why']}: {stopped['message']}): the findings cover the "
           f"{len(summary['checkpoints'])} checkpoints up to step {last}.", ""] if stopped else []),
        "## Findings",
        "",
        *[f"- **{f['conclusion']}** {f['numbers']}" for f in summary["findings"]],
        "",
        f"## Per layer at step {first} and step {last}",
        "",
        _table([r for r in rows if r["step"] in (first, last)],
               ["step", "layer", "cosine", "norm_ratio", "m_exact", "m_approx", "rel_bp", "rel_exact", "rel_approx",
                "amplification", "den_std_mean", "gram_scale", "bn_var_ratio"]),
        "– : no value." + (f" bn_var_ratio is measured at the BatchNorm after a layer, and {', '.join(no_bn)} has "
                           "none after it." if no_bn else ""),
        "",
        "## Joint vs per-unit input signals (the independence assumption)",
        "",
        "Per-unit: exact back-matching as in the paper; joint: every input unit of a layer co-updated, "
        "`(JᵀJ + μ m̄ I)⁺ Jᵀ g'_b`. Weights: cosine and norm ratio ‖per-unit‖/‖joint‖ of g'_W; signal: of the "
        "signals at the layer's input (compounded over the layers above); local: the two rules of this layer "
        "alone on the same g'_b.",
        "",
        _table([r for r in rows if r["step"] in (first, last)],
               ["step", "layer", "cos_joint_per_unit", "joint_norm_ratio", "signal_cos_joint_per_unit",
                "signal_joint_norm_ratio", "local_cos_joint_per_unit", "local_joint_norm_ratio", "joint_residual"]),
        "",
        "## Ablations",
        "",
        "Each row is exact back-matching with one of Algorithm 1's approximations made (`only_*`), or Algorithm 1 "
        "with one of them undone (`without_*`), compared with exact (per-unit) back-matching; `per_unit` is exact "
        "per-unit back-matching itself compared with exact joint back-matching (`signals=\"joint\"`), the "
        "assumption below all the others. Mean over layers and checkpoints.",
        "",
        _table([{"setting": key, "compared with": "exact joint" if key == PER_UNIT else "exact per-unit",
                 "meaning": PER_UNIT_MEANING if key == PER_UNIT else _ablation_meaning(key),
                 "mean 1-cos": costs[key]["mean_1_minus_cos"],
                 "mean abs log10 norm ratio": costs[key]["mean_abs_log10_ratio"]} for key in costs],
               ["setting", "compared with", "meaning", "mean 1-cos", "mean abs log10 norm ratio"]),
        "",
        "## Plots",
        "",
        *[f"![{name}]({name})\n" for name in summary["figures"]],
        "Columns of `layers.csv`: `cosine`/`norm_ratio` compare approx with exact; `m_exact` = ‖g_a‖/‖g'_a‖ at the "
        "layer's input (backprop over exact signal), `m_approx` = Algorithm 1's m·r there; `rel_*` = ‖g_W‖/‖W‖; "
        "`amplification` = mean/min signal denominator (engine stats); `den_*` = spread of the per-unit "
        "denominators; `gram_scale` = mean diag(G)/s; `bn_var_ratio` = mean Var[a]/‖W‖²_{2,µ} at the BatchNorm "
        "after the layer (nan when there is none); `f32_cosine` = float32 exact vs the evaluation dtype's; "
        "`only_*`/`without_*` = ablations; `cos_joint_per_unit`/`joint_norm_ratio` = per-unit vs joint g'_W (norm "
        "ratio per-unit/joint), `signal_*` the same for the signal at the layer's input, `local_*` for this layer's "
        "two rules on the same g'_b, `joint_residual` = the joint solve's relative residual of the normal equations.",
        "",
    ]
    return "\n".join(parts)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``backmatch compare``: 0, 130 after Ctrl-C, 1 when the training diverged."""
    summary = run(args)
    print("\n".join(f"{f['conclusion']} {f['numbers']}" for f in summary["findings"]))
    print(f"wrote {args.out}/layers.csv, summary.json, report.md and {len(summary['figures'])} plots "
          f"in {summary['timing_s']['total']:.0f} s")
    stopped = summary["stopped"]
    if stopped is None:
        return 0
    kept = f"{args.out} holds the {len(summary['checkpoints'])} checkpoints before it"
    if stopped["why"] == "interrupted":
        print(f"backmatch compare: interrupted at step {stopped['step']}; {kept}", file=sys.stderr)
        return 130
    raise CommandError(f"the training diverged at step {stopped['step']} ({stopped['message']}); {kept}; "
                       "try a smaller --lr, or --damping 1 --signal-damping 1", status=1)
