"""Figures for ``backmatch compare`` and ``backmatch train`` (matplotlib, Agg backend, PNG files).

A figure draws the data it is handed: the commands compute every number and
grouping it shows, so this module imports nothing from the package.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import matplotlib.transforms as mtransforms  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _by_layer(rows: list[dict]) -> dict[str, list[dict]]:
    layers: dict[str, list[dict]] = {}
    for row in rows:
        layers.setdefault(row["layer"], []).append(row)
    return layers


def _per_layer_lines(ax, rows: list[dict], key: str, log: bool = False, style: str = "-o"):
    for layer, lrows in _by_layer(rows).items():
        values = [r[key] for r in lrows]
        if log and any(v is not None and v > 0 for v in values):
            ax.set_yscale("log")
        ax.plot([r["step"] for r in lrows], values, style, ms=3, label=layer)


def _axes(ax, title: str, ylabel: str, xlabel: str = "step") -> None:
    """Title and axis labels; a step or epoch axis gets integer ticks (a short run has few steps)."""
    ax.set(title=title, ylabel=ylabel, xlabel=xlabel)
    if xlabel in ("step", "epoch"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _legend_right(fig, ax, title: str, extra: tuple = ()) -> None:
    """One legend for the figure, right of the axes (clear of every line and bar): ``ax``'s labelled lines,
    then the ``(handle, label)`` pairs ``extra``."""
    handles, labels = ax.get_legend_handles_labels()
    handles += [handle for handle, _ in extra]
    labels += [label for _, label in extra]
    fig.legend(handles, labels, title=title, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.95))


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110, bbox_inches="tight")  # (bbox: keeps a legend outside the axes)
    plt.close(fig)
    return name


NORM_W = r"$\|W\|^2_{2,\mu}$"


def compare_figures(rows: list[dict], losses: list[float], out: Path, approximation_names: list[str],
                    costs: dict[str, dict], spread: dict[int, dict]) -> list[str]:
    """The ``backmatch compare`` plots; returns the file names written into ``out``.

    ``rows``: the ``layers.csv`` rows; ``losses``: the training loss per step;
    ``approximation_names``: Algorithm 1's switches, in order (``Approximations.names()``);
    ``costs``: per ablation key, its mean costs (``ablation_costs(rows)``);
    ``spread``: per checkpoint and method, max/min of ``‖g_W‖/‖W‖`` over layers (``gradient_spread(rows)``).
    """
    out = Path(out)
    names = []
    last = max(r["step"] for r in rows)
    at_last = [r for r in rows if r["step"] == last]
    layers = [r["layer"] for r in at_last]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _per_layer_lines(axes[0], rows, "cosine")
    _axes(axes[0], "Algorithm 1 vs exact: direction", r"cosine$(g'_W, \tilde g_W)$")
    _per_layer_lines(axes[1], rows, "norm_ratio", log=True)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    _axes(axes[1], "Algorithm 1 vs exact: size (1 = equal)", r"$\|\tilde g_W\| \,/\, \|g'_W\|$")
    if losses:
        axes[2].plot(range(1, len(losses) + 1), losses, lw=0.8)
    _axes(axes[2], "training loss", "cross-entropy of the batch")
    _legend_right(fig, axes[0], "layer")
    names.append(_save(fig, out, "agreement.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for layer, lrows in _by_layer(rows).items():
        line, = axes[0].plot([r["step"] for r in lrows], [r["m_exact"] for r in lrows], "-o", ms=3, label=layer)
        axes[0].plot([r["step"] for r in lrows], [r["m_approx"] for r in lrows], "--", color=line.get_color())
    axes[0].set_yscale("log")
    _axes(axes[0], "backward factor at the layer's input\nexact (solid) vs Algorithm 1 (dashed)",
          r"$\|g_a\| \,/\, \|g'_a\|$")
    _per_layer_lines(axes[1], rows, "m_ratio", log=True)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    _axes(axes[1], "Algorithm 1's backward factor over the exact one", r"$m_{approx} \,/\, m_{exact}$")
    _legend_right(fig, axes[0], "layer")
    names.append(_save(fig, out, "backward_factor.png"))

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    width = 0.8 / len(approximation_names)
    x = range(len(layers))
    highest = 0.0
    for k, name in enumerate(approximation_names):
        for ax, prefix in zip(axes, ("only", "without")):
            costs_per_layer = [1 - _mean_over_steps(rows, layer, f"{prefix}_{name}_cos") for layer in layers]
            highest = max([highest] + [v for v in costs_per_layer if v == v])
            ax.bar([i + k * width for i in x], costs_per_layer, width,
                   label=f"{name} ({costs[f'{prefix}_{name}']['mean_1_minus_cos']:.3f})")
    for ax, title in zip(axes, ("exact + one approximation", "Algorithm 1 without one approximation")):
        ax.set_xticks([i + 0.4 - width / 2 for i in x], layers)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(0, 1 if highest <= 1 else 2)  # 1 - cosine lies in [0, 2]
        _axes(ax, title, "1 − cosine to exact (mean over checkpoints)", xlabel="layer")
        ax.legend(title="approximation (mean)", fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncol=3)
    axes[1].yaxis.set_tick_params(labelleft=True)
    names.append(_save(fig, out, "ablations.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, style in (("bp", "-o"), ("exact", "-s"), ("approx", "-^")):
        axes[0].plot(layers, [r[f"rel_{method}"] for r in at_last], style, label=method)
    axes[0].set_yscale("log")
    _axes(axes[0], f"relative gradient size per layer at step {last}", r"$\|g_W\| \,/\, \|W\|$", xlabel="layer")
    steps = sorted(spread)
    for method in ("bp", "exact", "approx"):
        axes[1].plot(steps, [spread[s][method] for s in steps], "-o", ms=3, label=method)
    axes[1].set_yscale("log")
    _axes(axes[1], "spread over layers", r"max/min over layers of $\|g_W\| \,/\, \|W\|$")
    _legend_right(fig, axes[0], "gradient")
    names.append(_save(fig, out, "gradient_spread.png"))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _per_layer_lines(axes[0], rows, "amplification", log=True)
    _axes(axes[0], "signal amplification", "mean / min squared column norm")
    _per_layer_lines(axes[1], rows, "den_std_mean")
    _axes(axes[1], "spread of the signal denominators", "std / mean")
    _per_layer_lines(axes[2], [r for r in rows if r["bn_var_ratio"] == r["bn_var_ratio"]], "bn_var_ratio", log=True)
    axes[2].axhline(1.0, color="grey", lw=0.8)
    _axes(axes[2], f"BatchNorm after the layer: Var[a] vs {NORM_W}", f"mean Var[a] / {NORM_W}")
    _legend_right(fig, axes[0], "layer")
    names.append(_save(fig, out, "amplification.png"))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _per_layer_lines(axes[0], rows, "cos_joint_per_unit")
    axes[0].set(title="cosine(per-unit g'_W, joint g'_W)", xlabel="step")
    axes[0].legend(fontsize=8)
    _per_layer_lines(axes[1], rows, "joint_norm_ratio", log=True)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set(title="norm ratio ‖per-unit g'_W‖ / ‖joint g'_W‖", xlabel="step")
    _per_layer_lines(axes[2], rows, "local_cos_joint_per_unit")
    axes[2].set(title="one layer's rules on the same g'_b: cosine(per-unit, joint)", xlabel="step")
    names.append(_save(fig, out, "joint.png"))
    return names


def _mean_over_steps(rows: list[dict], layer: str, key: str) -> float:
    values = [r[key] for r in rows if r["layer"] == layer and r[key] == r[key]]
    return sum(values) / len(values) if values else math.nan


def training_curves(groups: dict[str, dict[int, list[dict]]], path: Path) -> None:
    """Paper Fig. 2 style: training loss and test error vs epoch, one line per config (mean over seeds).

    ``groups``: the ``results.jsonl`` lines as ``{label: {seed: [lines in epoch order]}}``
    (``train.group_results``). Runs that diverged are marked with an × at the top
    of both panels, at the epoch where they diverged.
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    top = [mtransforms.blended_transform_factory(ax.transData, ax.transAxes) for ax in axes]
    diverged_any = False
    for label, seeds in groups.items():
        per_epoch: dict[int, list[dict]] = {}
        for runs in seeds.values():
            for r in runs:
                if not r.get("diverged"):
                    per_epoch.setdefault(r["epoch"], []).append(r)
        epochs = sorted(per_epoch)
        color = None
        if epochs:
            loss = [sum(r["train_loss"] for r in per_epoch[e]) / len(per_epoch[e]) for e in epochs]
            err = [100 * (1 - sum(r["test_acc"] for r in per_epoch[e]) / len(per_epoch[e])) for e in epochs]
            line, = axes[0].plot(epochs, loss, "-o", ms=3, label=label)
            axes[1].plot(epochs, err, "-o", ms=3, color=line.get_color(), label=label)
            color = line.get_color()
            if len(seeds) > 1:
                lo = [100 * (1 - max(r["test_acc"] for r in per_epoch[e])) for e in epochs]
                hi = [100 * (1 - min(r["test_acc"] for r in per_epoch[e])) for e in epochs]
                axes[1].fill_between(epochs, lo, hi, color=color, alpha=0.15)
        for runs in seeds.values():
            for r in runs:
                if r.get("diverged"):
                    diverged_any = True
                    for ax, tr in zip(axes, top):
                        mark, = ax.plot([r["epoch"]], [0.96], "x", ms=9, mew=2, color=color, transform=tr,
                                        clip_on=False, label=None if color else f"{label} (diverged)")
                        color = mark.get_color()
    axes[0].set_yscale("log")
    _axes(axes[0], "training loss", "mean cross-entropy of the epoch", xlabel="epoch")
    _axes(axes[1], "test error", "test error (%)", xlabel="epoch")
    marker = (plt.Line2D([], [], ls="", marker="x", color="k"), "× diverged (at the top)")
    _legend_right(fig, axes[0], "configuration", extra=[marker] if diverged_any else [])
    _save(fig, Path(path).parent, Path(path).name)
