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
``backmatch_exact.approx.Approximations``): each one alone (``only_*``) and all
but one (``without_*``). Two cross-checks hold the engine against independent
computations at every checkpoint: the fast exact backend against the plain
reference backend (im2col rows, ``g_W = Sᵀ A``), and approx mode (which only
rescales) against exact mode with every approximation switched on (which
propagates and solves layer by layer); bp mode is held against plain autograd.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import backmatch_exact as bm

from .. import data
from ..approx import ALGORITHM1, DESCRIPTIONS, Approximations
from ..layers import rule_for
from ..layers.base import mean_sq_row_norm
from ..layers.batchnorm import batch_std
from .common import MODELS, OPTIMIZERS, build_model, make_optimizer
from .figures import compare_figures

# --------------------------------------------------------------------------------------------------
# Engine runs
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EnginePass:
    """One ``loss.backward()`` through the model, plain or with an engine attached.

    ``weight_grads``: per weight layer the ``p.grad`` it left, flat like ``rule.flat_weight``;
    ``input_signals``: per weight layer the signal at its input, captured with a tensor hook;
    ``inputs``: every leaf module's input in this forward pass, in execution order ``(path, module, input)``;
    ``stats``: ``engine.stats()`` keyed by layer (empty for plain backprop);
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
                **attach_args) -> EnginePass:
    """Backward of the mean cross-entropy with ``bm.attach(model, mode, **attach_args)`` (``"plain"``: no engine).

    A forward pre-hook on each leaf module (placed before the engine's own)
    records its input and, for a weight layer, puts a tensor hook on it that
    records the signal arriving there: the backprop signal, or the back-matched
    one. ``x`` is made to require grad so the first layer's input signal is computed too.
    """
    weight_layers = [(path, m) for path, m in _leaves(model) if rule_for(m, path).has_weights]
    signals: dict[str, torch.Tensor] = {}
    inputs: list = []

    def capture(path, module, args):
        inputs.append((path, module, args[0].detach()))
        if args[0].requires_grad and rule_for(module, path).has_weights:
            args[0].register_hook(lambda g: signals.__setitem__(path, g.detach().clone()))

    outputs: dict[str, torch.Tensor] = {}

    def capture_output(path, module, args, out):
        if out.requires_grad:
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
             float32_model: nn.Module | None = None) -> tuple[list[dict], dict]:
    """All per-layer measurements on one batch ``(x, y)`` for the model as it is now.

    ``model`` should be a private copy (its BatchNorm running statistics move),
    in the dtype the comparison runs in, in training mode. ``damping`` and
    ``signal_damping`` configure the exact mode (and the ablations). ``float32_model``,
    if given, is a float32 copy whose exact gradients are compared with ``model``'s
    to show how much float32 rounding moves them.

    Returns ``(rows, checks)``: one dict per weight layer (see the module's CSV
    columns) and the cross-checks (:data:`CHECKS`: largest relative differences).
    """
    exact_args = dict(damping=damping, signal_damping=signal_damping, damping_scale=damping_scale)
    run = functools.partial(engine_pass, model, x, y)
    passes = {"bp": run("plain"), "exact": run("exact", **exact_args), "approx": run("approx"),
              "joint": run("exact", signals="joint", **exact_args)}
    ablations = {key: run("exact", approximations=switches, **exact_args)
                 for key, switches in ablation_settings().items()}
    f32 = engine_pass(float32_model, x.float(), y, "exact", **exact_args) if float32_model is not None else None
    checks = {
        "reference_vs_exact": _largest_gap(passes["exact"], run("exact", backend="reference", **exact_args)),
        "switches_vs_approx": _largest_gap(passes["approx"], run("exact", approximations=ALGORITHM1)),
        "bp_mode_vs_autograd": _largest_gap(passes["bp"], run("bp")),
        "loss": passes["bp"].loss,
    }
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
    local = rule.signal(module, a, backprop, g_b, signal_damping)
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
        var = batch_std(bn[1], bn[2]).double() ** 2
        row["bn_var_ratio"] = float(var.mean()) / mean_sq_row_norm(module.weight)
        row["bn_var_spread"] = float(var.std(unbiased=False) / var.mean())
    row["f32_cosine"] = row["f32_rel_diff"] = float("nan")
    if f32 is not None:
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


def findings(rows: list[dict], checks: dict, dtype: str = "float64") -> list[str]:
    """Sentences with the measured numbers, for ``report.md`` and ``summary.json``."""
    steps = sorted({r["step"] for r in rows})
    first, last = steps[0], steps[-1]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    at = {step: {r["layer"]: r for r in rows if r["step"] == step} for step in steps}
    out = []

    def per_layer(step, key, fmt="{:.3f}"):
        return ", ".join(f"{layer} {fmt.format(at[step][layer][key])}" for layer in layers)

    out.append(f"cosine(exact g'_W, approx g̃_W) at step {first}: {per_layer(first, 'cosine')}; "
               f"at step {last}: {per_layer(last, 'cosine')}.")
    cos_all = _finite(r["cosine"] for r in rows)
    worst = min(rows, key=lambda r: r["cosine"] if math.isfinite(r["cosine"]) else 2.0)
    out.append(f"Over all {len(steps)} checkpoints the cosine ranges from {min(cos_all):.3f} to {max(cos_all):.3f} "
               f"(mean {np.mean(cos_all):.3f}); the lowest is {worst['layer']} at step {worst['step']}. "
               "Algorithm 1 only rescales the backprop gradient, so this equals cosine(exact, backprop) "
               f"(largest gap between the two columns: {max(abs(r['cosine'] - r['cos_bp_exact']) for r in rows):.1e}).")
    out.append(f"Norm ratio ‖g̃‖/‖g'‖ at step {first}: {per_layer(first, 'norm_ratio', '{:.3g}')}; "
               f"at step {last}: {per_layer(last, 'norm_ratio', '{:.3g}')}.")
    out.append(f"Backward factor at each weight layer's input, m_approx/m_exact at step {first}: "
               f"{per_layer(first, 'm_ratio', '{:.3g}')}; at step {last}: {per_layer(last, 'm_ratio', '{:.3g}')} "
               "(1 = Algorithm 1 predicts the exact signal scale).")
    costs = ablation_costs(rows)
    only = sorted(Approximations.names(), key=lambda n: -costs[f"only_{n}"]["mean_1_minus_cos"])
    only_scale = sorted(Approximations.names(), key=lambda n: -costs[f"only_{n}"]["mean_abs_log10_ratio"])
    fix = sorted(Approximations.names(), key=lambda n: costs[f"without_{n}"]["mean_1_minus_cos"])
    out.append("Switched on alone, the approximation that moves the direction most is "
               f"{only[0]} (mean 1 - cosine {costs[f'only_{only[0]}']['mean_1_minus_cos']:.3f}), then "
               + ", ".join(f"{n} ({costs[f'only_{n}']['mean_1_minus_cos']:.3f})" for n in only[1:]) + ".")
    out.append("Switched on alone, the one that moves the scale most is "
               f"{only_scale[0]} (mean |log10 norm ratio| "
               f"{costs[f'only_{only_scale[0]}']['mean_abs_log10_ratio']:.3f}, i.e. a factor "
               f"{10 ** costs[f'only_{only_scale[0]}']['mean_abs_log10_ratio']:.2f}), then "
               + ", ".join(f"{n} ({costs[f'only_{n}']['mean_abs_log10_ratio']:.3f})" for n in only_scale[1:]) + ".")
    chain = sorted([PER_UNIT] + [f"only_{n}" for n in Approximations.names()],
                   key=lambda k: -costs[k]["mean_1_minus_cos"])
    out.append("All of the paper's approximations ranked by mean 1 - cosine against the rung above them "
               "(per_unit: exact per-unit against exact joint; only_*: one of Algorithm 1's approximations against "
               "exact per-unit): " + ", ".join(f"{k} {costs[k]['mean_1_minus_cos']:.3f}" for k in chain)
               + "; mean |log10 norm ratio|: " + ", ".join(f"{k} {costs[k]['mean_abs_log10_ratio']:.3f}"
                                                          for k in chain) + ".")
    out.append(f"Independence assumption (per-unit instead of joint input signals), cosine of the weight gradients "
               f"at step {first}: {per_layer(first, 'cos_joint_per_unit')}; at step {last}: "
               f"{per_layer(last, 'cos_joint_per_unit')}; norm ratio ‖per-unit‖/‖joint‖ at step {last}: "
               f"{per_layer(last, 'joint_norm_ratio', '{:.3g}')}. One layer's rule alone on the same g'_b, mean "
               "cosine over checkpoints: " + ", ".join(
                   f"{layer} {_mean(r['local_cos_joint_per_unit'] for r in rows if r['layer'] == layer):.3f}"
                   for layer in layers)
               + f"; largest joint solve residual {max(_finite(r['joint_residual'] for r in rows), default=0.0):.1e}.")
    out.append(f"Removing {fix[0]} from Algorithm 1 (keeping the rest) brings it closest to exact: mean 1 - cosine "
               f"{costs[f'without_{fix[0]}']['mean_1_minus_cos']:.3f} versus "
               f"{_mean(1.0 - r['cosine'] for r in rows):.3f} for full Algorithm 1.")
    spread = gradient_spread(rows)
    out.append("Spread of ‖g_W‖/‖W‖ over layers (max/min) at step "
               f"{first}: BP {spread[first]['bp']:.3g}, exact {spread[first]['exact']:.3g}, approx "
               f"{spread[first]['approx']:.3g}; at step {last}: BP {spread[last]['bp']:.3g}, exact "
               f"{spread[last]['exact']:.3g}, approx {spread[last]['approx']:.3g}.")
    amp = max(rows, key=lambda r: r["amplification"])
    out.append(f"Largest signal amplification (mean/min column norm): {amp['amplification']:.3g} at {amp['layer']}, "
               f"step {amp['step']}; denominators' std/mean at step {last}: {per_layer(last, 'den_std_mean', '{:.2f}')}.")
    gram = [r for r in rows if r["step"] == last]
    out.append(f"G ≈ s·I check at step {last}, mean diag(G)/s: {per_layer(last, 'gram_scale', '{:.3g}')}; "
               f"off-diagonal/diagonal norm: {per_layer(last, 'gram_offdiag', '{:.3g}')}.")
    bn = [r for r in gram if math.isfinite(r["bn_var_ratio"])]
    if bn:
        out.append(f"BN Var[a] / ‖W‖²_{{2,µ}} at step {last}: "
                   + ", ".join(f"{r['layer']} {r['bn_var_ratio']:.3g}" for r in bn) + ".")
    f32 = _finite(r["f32_rel_diff"] for r in rows)
    if f32:
        worst = max((r for r in rows if math.isfinite(r["f32_rel_diff"])), key=lambda r: r["f32_rel_diff"])
        out.append(f"float32 vs {dtype} exact gradients: relative difference at most "
                   f"{worst['f32_rel_diff']:.1e} ({worst['layer']}, step {worst['step']}; condition of G there "
                   f"{worst['condition']:.3g}), median {np.median(f32):.1e}.")
    out.append("Cross-checks, largest relative difference over layers and checkpoints: fast exact backend vs "
               f"reference backend {checks['reference_vs_exact']:.1e}, approx mode vs exact with every "
               f"approximation switched on {checks['switches_vs_approx']:.1e}, bp mode vs autograd "
               f"{checks['bp_mode_vs_autograd']:.1e}.")
    return out


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

CSV_COLUMNS = (["step", "layer", "kind", "cosine", "norm_ratio", "m_exact", "m_approx", "m_ratio", "cos_bp_exact",
                "rel_bp", "rel_exact", "rel_approx", "amplification", "den_max_mean", "den_std_mean", "s",
                "r_approx", "gram_scale", "gram_offdiag", "condition", "bn_var_ratio", "bn_var_spread",
                "f32_cosine", "f32_rel_diff", "train_loss", "eval_loss", "cos_joint_per_unit", "joint_norm_ratio",
                "signal_cos_joint_per_unit", "signal_joint_norm_ratio", "local_cos_joint_per_unit",
                "local_joint_norm_ratio", "joint_residual"]
               + [f"{key}_{what}" for key in ablation_settings() for what in ("cos", "ratio")])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``backmatch compare`` options."""
    parser.add_argument("--data", default="default", help="'default' (shipped Fashion-MNIST subset) or a folder")
    parser.add_argument("--model", default="lenet", choices=MODELS)
    parser.add_argument("--optim", default="sgd", choices=OPTIMIZERS, help="optimizer that trains the network")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--every", type=int, default=30, help="evaluate every this many steps (and at step 0)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--eval-batch", type=int, default=128, help="size of the fixed evaluation batch")
    parser.add_argument("--damping", type=float, default=0.0,
                        help="λ of the exact mode being evaluated (and of the training, for --optim exact*)")
    parser.add_argument("--signal-damping", type=float, default=0.0,
                        help="μ of the exact mode being evaluated (and of the training, for --optim exact)")
    parser.add_argument("--eval-dtype", default="float64", choices=["float32", "float64"],
                        help="dtype of the evaluation copies (the exact solves run in it)")
    parser.add_argument("--no-float32-check", action="store_true",
                        help="skip the float32-vs-eval-dtype comparison of the exact gradients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default; 1 is faster when other jobs share the cores)")
    parser.add_argument("--out", default="compare_out", help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run(args: argparse.Namespace) -> dict:
    """Train, evaluate at checkpoints, write ``layers.csv``, ``summary.json``, plots and ``report.md``.

    Returns the summary dictionary (also written to ``summary.json``).
    """
    if args.steps < 0 or args.every <= 0:
        raise ValueError("--steps must be >= 0 and --every > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dataset = data.load(args.data)
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
    step, train_loss = 0, float("nan")
    batches = iter(())
    while True:
        if step in checkpoints:
            tick = time.perf_counter()
            f32 = None if args.no_float32_check else copy_of_model(torch.float32)
            step_rows, checks = evaluate(copy_of_model(eval_dtype), x_eval, y_eval, args.damping,
                                         args.signal_damping, float32_model=f32)
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
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        train_loss = loss.item()
        losses.append(train_loss)
        if not math.isfinite(train_loss):
            progress.close()
            raise FloatingPointError(f"training diverged at step {step + 1}: loss {train_loss}")
        step += 1
        progress.update(1)
    progress.close()
    if engine is not None:
        engine.detach()

    checks = {key: max(c[key] for c in all_checks) for key in CHECKS}
    text = findings(rows, checks, args.eval_dtype)
    _write_csv(out / "layers.csv", rows)
    costs, spread = ablation_costs(rows), gradient_spread(rows)
    figures = compare_figures(rows, losses, out, Approximations.names(), costs, spread)
    total = time.perf_counter() - start
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    last = max(r["step"] for r in rows)
    summary = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("run",)},
        "dataset": dataset.name, "eval_dtype": args.eval_dtype,
        "checkpoints": sorted(checkpoints), "layers": layers,
        "timing_s": {"total": total, "evaluation": eval_time, "training": total - eval_time},
        "consistency": checks,
        "final": {r["layer"]: {k: r[k] for k in CSV_COLUMNS if k in r} for r in rows if r["step"] == last},
        "mean_over_checkpoints": {layer: {k: _mean(r[k] for r in rows if r["layer"] == layer)
                                          for k in CSV_COLUMNS[3:] if k not in ("kind",)} for layer in layers},
        "ablation_costs": costs,
        "gradient_spread": spread,
        "train_loss": losses,
        "figures": figures,
        "findings": text,
    }
    with open(out / "summary.json", "w") as f:
        json.dump(_json_safe(summary), f, indent=1)
    (out / "report.md").write_text(report(summary, rows))
    return summary


def _table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(summary: dict, rows: list[dict]) -> str:
    """``report.md``: settings, findings in numbers, per-layer tables and the plots."""
    s = summary["settings"]
    last = max(r["step"] for r in rows)
    first = min(r["step"] for r in rows)
    costs = summary["ablation_costs"]
    parts = [
        "# Exact back-matching vs Algorithm 1",
        "",
        f"{s['model']} on {summary['dataset']}, trained {s['steps']} steps with {s['optim']} (lr {s['lr']}, "
        f"momentum {s['momentum']}, batch {s['batch_size']}, seed {s['seed']}); evaluated every {s['every']} steps "
        f"on one fixed batch of {s['eval_batch']} training images in {summary['eval_dtype']}. Exact mode: damping "
        f"λ = {s['damping']}, signal damping μ = {s['signal_damping']}. Total time "
        f"{summary['timing_s']['total']:.0f} s ({summary['timing_s']['evaluation']:.0f} s evaluating).",
        "",
        "## Findings",
        "",
        *[f"- {line}" for line in summary["findings"]],
        "",
        f"## Per layer at step {first} and step {last}",
        "",
        _table([r for r in rows if r["step"] in (first, last)],
               ["step", "layer", "cosine", "norm_ratio", "m_exact", "m_approx", "rel_bp", "rel_exact", "rel_approx",
                "amplification", "den_std_mean", "gram_scale", "bn_var_ratio"]),
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
        "Each row is exact back-matching with one approximation switched on (`only_*`), or Algorithm 1 with one "
        "switched off (`without_*`), compared with exact (per-unit) back-matching; `per_unit` is exact per-unit "
        "back-matching itself compared with exact joint back-matching (`signals=\"joint\"`), the assumption "
        "below all the others. Mean over layers and checkpoints.",
        "",
        _table([{"setting": key, "compared with": "exact joint" if key == PER_UNIT else "exact per-unit",
                 "meaning": PER_UNIT_MEANING if key == PER_UNIT else DESCRIPTIONS[key.split("_", 1)[1]],
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
        "after the layer; `f32_cosine` = float32 exact vs the evaluation dtype's; `only_*`/`without_*` = ablations; "
        "`cos_joint_per_unit`/`joint_norm_ratio` = per-unit vs joint g'_W (norm ratio per-unit/joint), `signal_*` "
        "the same for the signal at the layer's input, `local_*` for this layer's two rules on the same g'_b, "
        "`joint_residual` = the joint solve's relative residual of the normal equations.",
        "",
    ]
    return "\n".join(parts)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``backmatch compare``."""
    summary = run(args)
    print("\n".join(summary["findings"]))
    print(f"wrote {args.out}/layers.csv, summary.json, report.md and {len(summary['figures'])} plots "
          f"in {summary['timing_s']['total']:.0f} s")
    return 0
