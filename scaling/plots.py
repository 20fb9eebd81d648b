"""Figures (matplotlib, Agg backend, PNG files): loss against finetuning data with fitted curves
per X (the paper's Fig. 1), one panel per factor (Figs. 2-4), critical-size curves with bands
(Fig. 5), and residuals."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scaling import procedures  # noqa: E402
from scaling.table import FINETUNE_EXAMPLES  # noqa: E402

_COUNTED = {"model_size", "pretrain_data"}  # parameters and tokens: 1.2B, 254K; PET sizes as is


def _label(factor: str, x: float) -> str:
    if factor not in _COUNTED:
        return f"{x:g}"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


Band = Callable[[str, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def factor_fits(result: procedures.ProcedureResult, plan: procedures.Plan, path: str,
                band: Band | None = None) -> str:
    """One panel per factor: observed losses (hollow = held out) and the fitted law per X.

    band(factor, x, df) -> (lower, upper) shades an interval of the predicted loss (e.g.
    `bootstrap.prediction_band`) around each fitted curve.
    """
    factors = list(result.factors)
    fig, axes = plt.subplots(1, len(factors), figsize=(4.6 * len(factors), 3.8), squeeze=False)
    tab, y = plan.table, plan.table[plan.target]
    for ax, f in zip(axes[0], factors):
        col = procedures.FACTORS[f]
        rows = np.concatenate([plan.fit_rows[f], plan.held_rows[f]])
        xs = np.unique(tab[col][rows])
        cmap = plt.get_cmap("viridis")
        df_all = tab[FINETUNE_EXAMPLES][rows]
        grid = np.geomspace(df_all.min(), df_all.max(), 100)
        held = set(plan.held_rows[f].tolist())
        shown = [y[rows]]  # what the y-axis must show: observations and fitted curves
        for i, x in enumerate(xs):
            color = cmap(i / max(1, len(xs) - 1))
            sel = rows[tab[col][rows] == x]
            fit_sel = [r for r in sel if r not in held]
            held_sel = [r for r in sel if r in held]
            ax.plot(tab[FINETUNE_EXAMPLES][fit_sel], y[fit_sel], "o", color=color, ms=4)
            ax.plot(tab[FINETUNE_EXAMPLES][held_sel], y[held_sel], "o", mfc="none",
                    color=color, ms=6)
            pred = result.factors[f].fit.predict({"x": np.full(grid.shape, x), "df": grid})
            ax.plot(grid, pred, "-", color=color, lw=1.2, label=_label(f, x))
            shown.append(pred)
            if band is not None:
                lo, hi = band(f, np.full(grid.shape, x), grid)
                ax.fill_between(grid, lo, hi, color=color, alpha=0.25, lw=0)
        # A wide band (few configurations) must not flatten the data: bands run off the axes.
        shown = np.concatenate(shown)
        shown = shown[np.isfinite(shown)]
        if shown.size:
            low, high = shown.min(), shown.max()
            pad = 0.25 * (high - low) or 0.05 * abs(high) or 0.1
            ax.set_ylim(low - pad, high + pad)
        ax.set_xscale("log")
        sizes = np.unique(df_all)
        if sizes.size <= 8:  # ticks at the grid's data sizes, not overlapping minor labels
            ax.set_xticks(sizes, [f"{v:g}" for v in sizes])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("finetuning examples")
        ax.set_ylabel(f"{plan.target} (nats/token)")
        ff = result.factors[f]
        ax.set_title(f"{f.replace('_', ' ')}: Δe={ff.fit_errors['delta']:.4f} "
                     f"Δh={ff.heldout_errors['delta']:.4f}", fontsize=9)
        ax.legend(fontsize=7, title=procedures.FACTORS[f], title_fontsize=7)
    fig.suptitle(f"{result.task} {result.method}: {result.law} law "
                 f"({'certified' if result.certified else 'NOT certified'}); "
                 "hollow = held out" + ("; bands: bootstrap interval" if band else ""),
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def residuals(result: procedures.ProcedureResult, plan: procedures.Plan, path: str) -> str:
    """Residuals (prediction - observation) against finetuning examples, per factor."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    tab, y = plan.table, plan.table[plan.target]
    for f, ff in result.factors.items():
        col = procedures.FACTORS[f]
        for rows, marker in ((plan.fit_rows[f], "o"), (plan.held_rows[f], "x")):
            if rows.size == 0:
                continue
            pred = ff.fit.predict({"x": tab[col][rows], "df": tab[FINETUNE_EXAMPLES][rows]})
            ax.plot(tab[FINETUNE_EXAMPLES][rows], pred - y[rows], marker, ms=4,
                    label=f"{f} ({'fit' if marker == 'o' else 'held out'})")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("finetuning examples")
    ax.set_ylabel("prediction - observation")
    ax.set_title(f"{result.task} {result.method}: residuals ({result.law})", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def critical_sizes(curves: Mapping[str, dict], path: str, title: str,
                   bands: Mapping[str, dict] | None = None) -> str:
    """Critical finetuning size against X for method pairs, with bootstrap bands."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (name, c) in enumerate(curves.items()):
        xs = np.array([p["x"] for p in c])
        dfs = np.array([p["df"] for p in c])
        extra = np.array([p["status"] == "extrapolated" for p in c])
        line, = ax.plot(xs, dfs, "-", label=name)
        ax.plot(xs[extra], dfs[extra], "o", mfc="none", color=line.get_color(), ms=4)
        if bands and name in bands:
            b = bands[name]
            ax.fill_between(b["x"], b["lower"], b["upper"], color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model parameters")
    ax.set_ylabel("critical finetuning examples")
    ax.set_title(title + " (hollow = extrapolated)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def curves(panels: Sequence[Mapping], path: str, title: str) -> str:
    """Per-curve fits of laws of Df alone (e.g. single vs rectified), one panel per curve.

    Each panel: 'title', 'df', 'loss', 'held' (bool mask) and 'fits' [(name, FitResult)].
    """
    cols = min(5, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.ravel(), panels):
        df, loss, held = panel["df"], panel["loss"], panel["held"]
        ax.plot(df[~held], loss[~held], "ko", ms=3)
        ax.plot(df[held], loss[held], "ko", mfc="none", ms=5)
        grid = np.geomspace(df.min(), df.max(), 200)
        for name, fit in panel["fits"]:
            ax.plot(grid, fit.predict({"df": grid}), lw=1.1,
                    ls="-" if fit.certified else "--",
                    label=name + ("" if fit.certified else " (not certified)"))
        ax.set_xscale("log")
        ax.set_title(panel["title"], fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5)
    fig.suptitle(title + " (hollow = held out; dashed = fit not certified)", fontsize=9)
    fig.supxlabel("finetuning examples", fontsize=8)
    fig.supylabel("loss", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
