"""Statistics of the fixed-context diagnostic (docs/method.md §3), in plain numpy.

- `tercile_gap` / `bootstrap_tercile_gap`: mean outcome of a predictor's top tercile minus its bottom
  tercile, with a cluster bootstrap over contexts (terciles are re-cut in every draw);
  `bootstrap_tercile_gap_difference`: the difference of two predictors' gaps, paired on the same draws;
- `standardized_ols`: OLS of a z-scored outcome on z-scored regressors after winsorising, with plain and
  cluster-robust (CR1, clustered by context) standard errors;
- `decile_means`: mean outcome per predictor decile, for plots.

Terciles and deciles are cut by rank (ties split in the data's order), so every bin holds the same
number of positions even when a predictor has many equal values (D^L is exactly 0 wherever D̃ or C̃ is).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def winsorize(x: np.ndarray, level: float) -> np.ndarray:
    """Clip x to its [level, 1 - level] quantiles (linear interpolation); level 0 leaves x unchanged."""
    if not 0.0 <= level < 0.5:
        raise ValueError(f"winsorising level must be in [0, 0.5), got {level}")
    if level == 0.0 or x.size == 0:
        return x.astype(float)
    lo, hi = np.quantile(x, [level, 1.0 - level])
    return np.clip(x, lo, hi)


def zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std (population std); a constant column becomes all zeros."""
    std = x.std()
    return np.zeros_like(x, dtype=float) if std < 1e-12 else (x - x.mean()) / std


def rank_bins(order: np.ndarray, weights: np.ndarray, bins: int) -> np.ndarray:
    """Bin index (0 = lowest) of each position, cutting the weighted rank order into equal-weight bins.

    order: (n,) argsort of the predictor; weights: (..., n) non-negative weights in the *original* order.
    A position belongs to bin b when the weight before it lies in [b/bins, (b+1)/bins) of the total, so
    with unit weights each bin holds n // bins or n // bins + 1 positions. Returns (..., n), original order.
    """
    w = weights[..., order]
    before = np.cumsum(w, -1) - w
    total = w.sum(-1, keepdims=True)
    sorted_bins = np.minimum((before * bins / np.maximum(total, 1e-300)).astype(int), bins - 1)
    out = np.empty_like(sorted_bins)
    out[..., order] = sorted_bins
    return out


def tercile_gap(x: np.ndarray, y: np.ndarray) -> float:
    """mean(y | top tercile of x) - mean(y | bottom tercile of x), terciles cut by rank."""
    bins = rank_bins(np.argsort(x, kind="stable"), np.ones_like(y, dtype=float), 3)
    return float(y[bins == 2].mean() - y[bins == 0].mean())


@dataclass
class BootstrapResult:
    estimate: float  # the gap on the data itself
    low: float  # percentile interval bounds
    high: float
    se: float  # standard deviation of the bootstrap draws
    draws: int


def bootstrap_tercile_gap(
    x: np.ndarray, y: np.ndarray, clusters: np.ndarray, draws: int = 1000, level: float = 0.95, seed: int = 0,
    max_cells: int = 5_000_000,
) -> BootstrapResult:
    """Tercile gap with a percentile cluster-bootstrap interval.

    Each draw resamples whole clusters (contexts) with replacement, i.e. weights every position by how
    often its context was drawn, and re-cuts the terciles on the weighted sample. Draws are processed in
    blocks of at most `max_cells` (draws x positions) weights to bound memory.
    """
    gaps = tercile_gap_draws(x, y, clusters, draws, seed, max_cells)
    return summarize_draws(tercile_gap(x, y), gaps, level)


def bootstrap_tercile_gap_difference(
    x1: np.ndarray, x2: np.ndarray, y: np.ndarray, clusters: np.ndarray, draws: int = 1000, level: float = 0.95,
    seed: int = 0, max_cells: int = 5_000_000,
) -> BootstrapResult:
    """gap(x1) - gap(x2) with a paired cluster-bootstrap interval: both gaps are re-computed on the *same*
    resampled contexts in every draw, so the interval is that of the difference (which predictor separates
    gains better), not two overlapping intervals read side by side."""
    gaps1 = tercile_gap_draws(x1, y, clusters, draws, seed, max_cells)
    gaps2 = tercile_gap_draws(x2, y, clusters, draws, seed, max_cells)  # same seed: the same cluster draws
    return summarize_draws(tercile_gap(x1, y) - tercile_gap(x2, y), gaps1 - gaps2, level)


def tercile_gap_draws(x: np.ndarray, y: np.ndarray, clusters: np.ndarray, draws: int, seed: int,
                      max_cells: int) -> np.ndarray:
    """(draws,) tercile gaps on cluster-bootstrap resamples; the resamples depend only on (clusters, seed)."""
    _, cluster_idx = np.unique(clusters, return_inverse=True)
    n_clusters = cluster_idx.max() + 1
    order = np.argsort(x, kind="stable")
    rng = np.random.default_rng(seed)
    gaps = []
    block = max(1, max_cells // max(1, x.size))
    for start in range(0, draws, block):
        counts = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=min(block, draws - start))
        w = counts[:, cluster_idx].astype(float)  # (B, n)
        bins = rank_bins(order, w, 3)
        top, bottom = w * (bins == 2), w * (bins == 0)
        gaps.append((top @ y) / top.sum(1) - (bottom @ y) / bottom.sum(1))
    return np.concatenate(gaps)


def summarize_draws(estimate: float, draws: np.ndarray, level: float) -> BootstrapResult:
    alpha = (1.0 - level) / 2
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return BootstrapResult(estimate, float(low), float(high), float(draws.std(ddof=1)), draws.size)


@dataclass
class OLSResult:
    names: list[str]  # regressors (the intercept is fitted but not reported)
    coef: np.ndarray  # (k,)
    se_cluster: np.ndarray  # CR1 cluster-robust standard errors
    se_plain: np.ndarray  # homoskedastic standard errors
    r2: float
    n: int
    n_clusters: int

    def as_dict(self) -> dict:
        return {
            "r2": self.r2, "n": self.n, "n_clusters": self.n_clusters,
            "coefficients": {
                name: {"coef": float(c), "se_cluster": float(sc), "se_plain": float(sp)}
                for name, c, sc, sp in zip(self.names, self.coef, self.se_cluster, self.se_plain, strict=True)
            },
        }


def ols(y: np.ndarray, X: np.ndarray, clusters: np.ndarray, names: list[str]) -> OLSResult:
    """OLS of y (n,) on X (n, k) plus an intercept, with plain and CR1 cluster-robust standard errors.

    CR1: V = c · B (Σ_g s_g s_gᵀ) B with B = (XᵀX)⁻¹, s_g = Σ_{i∈g} x_i u_i, c = G/(G-1) · (n-1)/(n-p)
    (the small-sample factor of Stata's `vce(cluster)`). Pseudo-inverses keep collinear columns finite.
    """
    n = y.shape[0]
    design = np.column_stack([np.ones(n), X])  # (n, p)
    p = design.shape[1]
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ beta
    bread = np.linalg.pinv(design.T @ design)
    dof = max(n - p, 1)
    se_plain = np.sqrt(np.maximum(np.diag(bread) * (resid @ resid) / dof, 0.0))
    _, cluster_idx = np.unique(clusters, return_inverse=True)
    g = cluster_idx.max() + 1
    scores = np.zeros((g, p))
    np.add.at(scores, cluster_idx, design * resid[:, None])  # (G, p): s_g
    factor = g / max(g - 1, 1) * (n - 1) / dof
    cov = factor * bread @ (scores.T @ scores) @ bread
    se_cluster = np.sqrt(np.maximum(np.diag(cov), 0.0))
    tss = ((y - y.mean()) ** 2).sum()
    r2 = float(1.0 - (resid @ resid) / tss) if tss > 0 else 0.0
    return OLSResult(list(names), beta[1:], se_cluster[1:], se_plain[1:], r2, n, int(g))


def standardized_ols(y: np.ndarray, columns: dict[str, np.ndarray], clusters: np.ndarray, level: float) -> OLSResult:
    """Winsorise y and every regressor at `level`, z-score them all, then `ols`.

    The coefficients are in standard deviations of y per standard deviation of each regressor.
    Interaction columns (e.g. H x D) should be formed from the raw values before calling.
    """
    X = np.column_stack([zscore(winsorize(c, level)) for c in columns.values()])
    return ols(zscore(winsorize(y, level)), X, clusters, list(columns))


def decile_means(x: np.ndarray, y: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Per rank bin of x: mean x, mean y, standard error of the mean of y, count."""
    idx = rank_bins(np.argsort(x, kind="stable"), np.ones_like(y, dtype=float), bins)
    out = {"x_mean": [], "y_mean": [], "y_se": [], "count": []}
    for b in range(bins):
        sel = idx == b
        k = int(sel.sum())
        out["x_mean"].append(float(x[sel].mean()) if k else float("nan"))
        out["y_mean"].append(float(y[sel].mean()) if k else float("nan"))
        out["y_se"].append(float(y[sel].std(ddof=1) / np.sqrt(k)) if k > 1 else float("nan"))
        out["count"].append(k)
    return {key: np.asarray(v) for key, v in out.items()}
