"""Statistics, plots and the text report of the fixed-context diagnostic (`opdlab diagnose`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from opdlab.diagnostics import plots
from opdlab.diagnostics.stats import (
    bootstrap_tercile_gap,
    bootstrap_tercile_gap_difference,
    decile_means,
    standardized_ols,
    winsorize,
)
from opdlab.scoring import FEATURES
from opdlab.selectors.base import Normalization

PREDICTORS = ["disagreement", "topk_entropy", "compatibility", "teachability", "incompatibility"]
RAW_MODEL = ["topk_entropy", "disagreement", "topk_entropy_x_disagreement", "compatibility", "position", "teacher_entropy"]
TEACHABILITY_MODEL = ["topk_entropy", "teachability", "incompatibility", "position", "teacher_entropy"]
GAINS = {"forward": "forward_gain", "reverse": "reverse_gain"}
DIFFERENCES = (("teachability", "disagreement"), ("teachability", "incompatibility"))  # the paper's claim 1: teachability over raw and incompatible D


@dataclass
class StatsOptions:
    """The statistics of the gain.

    Args:
        min_base_kl: positions whose θ0 forward KL is below this are left out of every statistic.
        winsorize: winsorising levels of the OLS (each variable clipped to its [p, 1-p] quantiles).
        bootstrap: cluster-bootstrap draws (clusters: contexts) of the tercile gaps.
        normalization: normalisation of D and C before D^L and D^I (the selectors' `quantile` by default).
        seed: seed of the bootstrap.
    """

    min_base_kl: float = 1e-4
    winsorize: list[float] = field(default_factory=lambda: [0.01, 0.05])
    bootstrap: int = 1000
    normalization: Normalization = "quantile"
    seed: int = 0

    def __post_init__(self) -> None:  # refused before the bank is sampled and θ1 trained, not after
        if not (self.min_base_kl > 0 and np.isfinite(self.min_base_kl)):
            raise ValueError(f"stats.min_base_kl must be a finite number > 0 (G divides by KL_f^base), got "
                             f"{self.min_base_kl}")
        if not self.winsorize:
            raise ValueError("stats.winsorize is empty; give at least one winsorising level of the OLS, e.g. "
                             "[0.01,0.05]")
        bad = [w for w in self.winsorize if not 0 <= w < 0.5]
        if bad:
            raise ValueError(f"stats.winsorize levels must be in [0, 0.5) (the share clipped at each end), got {bad}")
        if self.bootstrap < 1:
            raise ValueError(f"stats.bootstrap must be >= 1 (the draws of the tercile gaps' intervals), got "
                             f"{self.bootstrap}")


def gain_statistics(table: dict[str, np.ndarray], opts: StatsOptions) -> dict:
    """Tercile gaps (with bootstrap intervals), standardised OLS fits and decile means, per gain kind."""
    rows = table["included"]
    clusters = table["context"][rows]
    level = min(opts.winsorize, default=0.0)
    result = {"terciles": {}, "terciles_winsorized": {"level": level}, "tercile_differences": {},
              "tercile_differences_winsorized": {"level": level}, "ols": {}, "deciles": {}}
    for kind, column in GAINS.items():
        g = table[column][rows]
        # G is unbounded below (KL^after >> KL^base at a few positions), so the plain means are
        # outlier-prone; the same gaps of G winsorised at the smallest OLS level are reported beside them.
        for key, y in (("terciles", g), ("terciles_winsorized", winsorize(g, level))):
            result[key][kind] = {
                name: asdict(bootstrap_tercile_gap(table[name][rows], y, clusters, opts.bootstrap, seed=opts.seed))
                for name in PREDICTORS
            }
        # The paper's claim is an ordering (D^L separates gains better than D and than D^I): the interval of
        # the difference, on the same bootstrap draws, answers it; two overlapping intervals do not.
        for key, y in (("tercile_differences", g), ("tercile_differences_winsorized", winsorize(g, level))):
            result[key][kind] = {
                f"{a} - {b}": asdict(bootstrap_tercile_gap_difference(table[a][rows], table[b][rows], y, clusters,
                                                                      opts.bootstrap, seed=opts.seed))
                for a, b in DIFFERENCES
            }
        result["ols"][kind] = {
            model: {
                f"winsor_{level:g}": standardized_ols(g, {c: table[c][rows] for c in names}, clusters, level).as_dict()
                for level in opts.winsorize
            }
            for model, names in (("raw: G ~ H + D + HxD + C + pos + H_T", RAW_MODEL),
                                 ("teachability: G ~ H + D^L + D^I + pos + H_T", TEACHABILITY_MODEL))
        }
        result["deciles"][kind] = {name: decile_means(table[name][rows], g) for name in PREDICTORS}
    return result


def write_plots(result: dict, out: Path, label: str) -> list[str]:
    deciles = {name: {kind: result["deciles"][kind][name] for kind in GAINS} for name in PREDICTORS}
    plots.plot_deciles(deciles, out / "deciles.png", f"mean gain per predictor decile ({label})")
    winsorized = {k: v for k, v in result["terciles_winsorized"].items() if k != "level"}
    panels = {"mean G": result["terciles"], f"G winsorised at {result['terciles_winsorized']['level']:g}": winsorized}
    plots.plot_tercile_gaps(panels, out / "terciles.png", f"tercile gaps, 95% cluster bootstrap ({label})")
    plots.plot_coefficients(result["ols"]["forward"], out / "coefficients.png",
                            f"standardised OLS of G_f, ±1.96 cluster-robust SE ({label})")
    return ["deciles.png", "terciles.png", "coefficients.png"]


HEADLINE = ("headline: the plain tercile gaps (left; docs/method.md §3: mean G of the top third minus the bottom "
            "third); right, the same with G winsorised, a robustness check against the few extreme G values")


def sign_disagreements(result: dict) -> list[dict]:
    """The tercile gaps (and differences of gaps) whose plain and winsorised estimates have opposite signs:
    where the headline's sign comes from a few outlying positions, not from most of them."""
    out = []
    for key in ("terciles", "tercile_differences"):
        for kind in GAINS:
            for name, r in result[key][kind].items():
                w = result[f"{key}_winsorized"][kind][name]
                if r["estimate"] * w["estimate"] < 0:
                    out.append({"statistic": key, "gain": kind, "predictor": name, "plain": r["estimate"],
                                "winsorized": w["estimate"]})
    return out


def sign_note(names: list[str], level: float) -> str:
    """One line: what opposite signs of a plain and a winsorised gap mean."""
    return (f"  note: {', '.join(names)}: plain and winsorised (at {level:g}) estimates have opposite signs: the plain "
            "(headline) sign is set by a few positions with extreme G (G is unbounded below), the winsorised one by the "
            "bulk of positions; this bank does not establish the sign")


def format_report(result: dict, counts: dict) -> str:
    """A short text report of the headline numbers (printed at the end of the command): which column is the
    headline, and a note under each block where the plain and the winsorised estimates disagree in sign."""
    head = (f"positions: {counts['positions']} in {counts['contexts']} contexts, "
            f"{counts['included']} with KL_f^base >= min_base_kl; mean G_f {counts['mean_forward_gain']:.3f}")
    lines = [head, HEADLINE]
    level = result["terciles_winsorized"]["level"]
    flipped = sign_disagreements(result)
    for key, title in (("terciles", "tercile gap of G_{} (top - bottom, 95% CI)"),
                       ("tercile_differences", "difference of tercile gaps of G_{} (paired bootstrap, 95% CI)")):
        for kind in GAINS:
            width = max(map(len, result[key][kind]))
            lines.append(f"{title.format(kind[0])}   | G winsorised at {level:g} (robustness check):")
            for name, r in result[key][kind].items():
                w = result[f"{key}_winsorized"][kind][name]
                lines.append(f"  {name:{width}s} {r['estimate']:+.3f}  [{r['low']:+.3f}, {r['high']:+.3f}]   "
                             f"| {w['estimate']:+.3f}  [{w['low']:+.3f}, {w['high']:+.3f}]")
            names = [f["predictor"] for f in flipped if f["statistic"] == key and f["gain"] == kind]
            if names:
                lines.append(sign_note(names, level))
    for model, fits in result["ols"]["forward"].items():
        lines.append(f"OLS {model} (G_f; coef ± cluster SE):")
        for label, fit in fits.items():
            coefs = "  ".join(f"{n} {c['coef']:+.3f}±{c['se_cluster']:.3f}" for n, c in fit["coefficients"].items())
            lines.append(f"  {label}: {coefs}  R² {fit['r2']:.3f}")
    return "\n".join([*lines, *LEGEND])


LEGEND = [
    "quantities (docs/method.md §2-3): G_f / G_r (forward_gain / reverse_gain) = relative drop of the forward /",
    "  reverse KL(teacher, student) from θ0 to θ1 at the same context;",
    *(f"  {name} ({symbol}) = {meaning};" for name, (symbol, meaning) in FEATURES.items()),
    "  ~ = quantile-normalised over the bank.",
]


def to_jsonable(obj):
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
