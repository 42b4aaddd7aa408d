"""Sampled-evaluation metrics: Avg@k, pass@k, maj@k, and their aggregation over benchmarks and seeds.

Each problem is answered by n sampled responses, c of them correct.

- Avg@k (also "mean@k"): the mean over problems of c / n: the expected accuracy of one sampled response,
  estimated with n samples instead of one. This is what the TA-OPD paper and its neighbours report.
- pass@k': the probability that at least one of k' responses drawn without replacement from the n is
  correct, averaged over problems, with the unbiased estimator of Chen et al. 2021 ("Evaluating Large
  Language Models Trained on Code", eq. 1): 1 - C(n - c, k') / C(n, k'). pass@n is "any of the n is correct";
  pass@1 equals Avg@n.
- maj@k: the majority answer of the n responses (by the verifier's answer key; responses without an answer
  do not vote; ties go to the answer seen first) is correct.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples, c correct (Chen et al. 2021), computed as the stable
    product 1 - prod_{i=n-c+1}^{n} (1 - k / i) rather than with binomials that overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_correct(keys: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the most common answer key (None: no answer, does not vote) belongs to a correct response;
    ties go to the key seen first. No key at all: wrong."""
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(k for k in keys if k is not None and votes[k] == top)
    return any(ok for k, ok in zip(keys, correct, strict=True) if k == winner)


def benchmark_metrics(problems: list[dict], pass_ks: Sequence[int]) -> dict[str, float]:
    """Metrics of one benchmark at one seed. `problems`: one dict per problem with the lists `correct`,
    `keys`, `lengths`, `truncated` and `parsed` (one entry per sampled response)."""
    if not problems:
        raise ValueError("no problems to score")
    n = len(problems[0]["correct"])
    out = {"avg": mean(sum(p["correct"]) / len(p["correct"]) for p in problems)}
    for k in pass_ks:
        out[f"pass@{k}"] = mean(pass_at_k(len(p["correct"]), sum(p["correct"]), k) for p in problems)
    out[f"maj@{n}"] = mean(float(majority_correct(p["keys"], p["correct"])) for p in problems)
    out["length"] = mean(x for p in problems for x in p["lengths"])
    out["truncated"] = mean(float(x) for p in problems for x in p["truncated"])
    out["unparsed"] = mean(float(not x) for p in problems for x in p["parsed"])
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator) of the finite values; non-finite ones
    (nan: a run without that number) are left out. The spread of a single value is unknown, not zero: its std
    is nan, as are both of no value at all. The one mean ± std of opdlab (eval, compare, the paired report)."""
    x = [float(v) for v in values if math.isfinite(v)]
    if not x:
        return float("nan"), float("nan")
    m = mean(x)
    if len(x) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))


def format_mean_std(values: Sequence[float], fmt: str = ".3f", missing: str = "–") -> str:
    """`mean ± std` of the finite values; one value: `mean (n=1)` (its spread is unknown); none: `missing`."""
    m, s = mean_std(values)
    return plus_minus(m, s, fmt, missing)


def plus_minus(m: float, s: float, fmt: str = ".3f", missing: str = "–") -> str:
    """A mean and std from `mean_std` as text: `m ± s`, `m (n=1)` when the std is unknown, `missing` without a mean."""
    if not math.isfinite(m):
        return missing
    return f"{m:{fmt}} ± {s:{fmt}}" if math.isfinite(s) else f"{m:{fmt}} (n=1)"
