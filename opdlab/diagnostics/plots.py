"""PNG plots of the fixed-context diagnostic (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wrapped(text: str, width_inches: float, fontsize: float) -> str:
    """`text` broken into lines that fit `width_inches` at `fontsize` (an average character is ~0.6 em wide)."""
    chars = max(12, int(width_inches * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars, break_on_hyphens=False)) if len(text) > chars else text


def save_figure(fig, path: Path, title: str | None = None) -> None:
    """Suptitle (if any, wrapped to the figure's width), constrained layout, a 120-dpi PNG at `path`; the
    figure is closed.

    Constrained layout (not tight_layout) keeps every title, axis label and tick label inside the figure,
    also titles wider than their panel and a suptitle that needs several lines.
    """
    if title is not None:
        fig.suptitle(wrapped(title, fig.get_figwidth() - 0.3, 10), fontsize=10)
    fig.set_layout_engine("constrained")
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plot_deciles(deciles: dict[str, dict[str, dict[str, np.ndarray]]], path: Path, title: str) -> None:
    """One panel per predictor: mean gain per predictor decile (±1.96 SE), one line per gain kind.

    deciles: predictor -> gain kind (e.g. "forward") -> output of `stats.decile_means`.
    """
    plt = pyplot()
    names = list(deciles)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for kind, d in deciles[name].items():
            x = np.arange(1, len(d["y_mean"]) + 1)
            ax.errorbar(x, d["y_mean"], yerr=1.96 * np.nan_to_num(d["y_se"]), marker="o", ms=3, capsize=2, label=kind)
        ax.set_title(wrapped(name, 3.0, 12))
        ax.set_xlabel("decile")
        ax.axhline(0.0, color="grey", lw=0.5)
    axes[0][0].set_ylabel("mean gain G")
    axes[0][-1].legend(fontsize=8)
    save_figure(fig, path, title)


def plot_tercile_gaps(panels: dict[str, dict[str, dict[str, dict]]], path: Path, title: str) -> None:
    """Horizontal bars of top-minus-bottom tercile gain per predictor with their 95% bootstrap intervals.

    panels: panel title -> gain kind -> predictor -> {"estimate", "low", "high"}.

    The predictors are on the y axis (first at the top), so their names are read side by side however long
    they are (on the x axis, five feature names ran together).
    """
    plt = pyplot()
    first = next(iter(panels.values()))
    rows = len(next(iter(first.values())))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 1.2 + 0.55 * rows), squeeze=False)
    for ax, (panel, gaps) in zip(axes[0], panels.items(), strict=True):
        kinds = list(gaps)
        names = list(next(iter(gaps.values())))
        height = 0.8 / len(kinds)
        for i, kind in enumerate(kinds):
            est = np.array([gaps[kind][n]["estimate"] for n in names])
            err = np.array([[e - gaps[kind][n]["low"], gaps[kind][n]["high"] - e] for e, n in zip(est, names, strict=True)]).T
            ax.barh(np.arange(len(names)) + (i - (len(kinds) - 1) / 2) * height, est, height, xerr=err, capsize=3,
                    label=kind)
        ax.set_yticks(np.arange(len(names)), names)
        ax.invert_yaxis()  # the first predictor on top, as listed
        ax.axvline(0.0, color="grey", lw=0.5)
        ax.set_xlabel("G: top tercile - bottom tercile")
        ax.set_title(wrapped(panel, 5.0, 9), fontsize=9)
        ax.legend(fontsize=8)
    save_figure(fig, path, title)


def plot_coefficients(models: dict[str, dict], path: Path, title: str) -> None:
    """Standardised OLS coefficients ±1.96 cluster-robust SE; one panel per model, a marker per winsorising.

    models: model name -> winsorising label -> `OLSResult.as_dict()`.
    """
    plt = pyplot()
    rows = max(len(next(iter(fits.values()))["coefficients"]) for fits in models.values())
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 1.4 + 0.45 * rows), squeeze=False)
    for ax, (model, fits) in zip(axes[0], models.items(), strict=True):
        labels = list(fits)
        names = list(next(iter(fits.values()))["coefficients"])
        for i, label in enumerate(labels):
            coefs = fits[label]["coefficients"]
            y = np.arange(len(names)) + (i - (len(labels) - 1) / 2) * 0.25
            ax.errorbar([coefs[n]["coef"] for n in names], y, xerr=[1.96 * coefs[n]["se_cluster"] for n in names],
                        fmt="o", ms=4, capsize=2, label=f"{label} (R²={fits[label]['r2']:.3f})")
        ax.set_yticks(np.arange(len(names)), names)
        ax.axvline(0.0, color="grey", lw=0.5)
        ax.set_xlabel("standardised coefficient")
        ax.set_title(wrapped(model, 5.0, 9), fontsize=9)
        # below the axes: inside, it sits on the error bars of whichever coefficients are in the middle
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(labels), frameon=False)
    save_figure(fig, path, title)


def symlog_ticks(linthresh: float, top: float):
    """0 and the powers of ten from `linthresh` to `top`: none inside the linear part (0, linthresh), whose
    labels would sit on top of 0's (matplotlib's symlog locator puts them there)."""
    from matplotlib.ticker import FixedLocator

    first, last = math.ceil(math.log10(linthresh) - 1e-9), math.floor(math.log10(max(top, linthresh)) + 1e-9)
    return FixedLocator([0.0, *(10.0**k for k in range(first, last + 1))])


def plot_curves(panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]], path: Path, title: str,
                xlabel: str = "step", ylabel: str = "val/accuracy", xlog: bool = False) -> None:
    """Mean curve ± std band per method, one panel per group (sharing the y axis).

    panels: panel title -> method label -> (x, mean, std).
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (panel, curves) in zip(axes[0], panels.items(), strict=True):
        for label, (x, mean, std) in curves.items():
            (line,) = ax.plot(x, mean, marker="o", ms=2, label=label)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        if xlog:  # symlog: the first point (0 tokens before training) stays on the axis
            positive = [x[x > 0].min() for x, _, _ in curves.values() if (x > 0).any()]
            linthresh = min(positive, default=1.0)
            ax.set_xscale("symlog", linthresh=linthresh)
            ax.xaxis.set_major_locator(symlog_ticks(linthresh, max((x.max() for x, _, _ in curves.values()), default=0.0)))
        ax.set_xlabel(xlabel)
        ax.set_title(wrapped(panel, 5.0, 9), fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    save_figure(fig, path, title)
