"""Which selectors keep a scratchpad student's wrong sum digits: the check behind TA-OPD's stall on toy:mix4.

    python benchmarks/selection_at_errors.py --student toy:mix4/student
    python benchmarks/selection_at_errors.py --student benchmarks/results/fair_toy_compare/runs/teachability_r0.05/seed0/student

Samples one response per prompt with the student (temperature 1; prompts far from the training ones), scores every
position against the toy's teacher, and splits the sum-digit positions of the scratchpad steps into wrong (the
teacher gives the student's digit < 0.5) and right ones. For each kind it prints the mean compatibility C,
disagreement D and top-K entropy H, and the share that each selector keeps at the budget (one selection over all
rollouts, no per-response floor), with teachability under both the paper's quantile normalisation and min-max.
Also the quantiles of C over all positions: when C's q05 is ~1, quantile normalisation sends every position with
a C even slightly below it to C̃ = 0 (docs/method.md §2.1).
"""

from __future__ import annotations

import argparse

import torch

from disagreement_census import sample_and_score  # benchmarks/ runs as scripts, so this imports as a sibling
from opdlab.selectors import DivergenceSelector, EntropySelector, RandomSelector, TeachabilitySelector
from opdlab.tasks import ScratchpadAdditionTask
from opdlab.toy import TOYS, make_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--toy", default="mix4", choices=sorted(TOYS), help="the scratchpad toy whose teacher scores")
    p.add_argument("--student", default=None, help="a student checkpoint (default: the toy's student)")
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--prompts", type=int, default=256)
    args = p.parse_args()
    task = make_task(TOYS[args.toy], 0)
    if not isinstance(task, ScratchpadAdditionTask):
        raise SystemExit(f"--toy {args.toy}: expected a scratchpad toy (scratch4, mix4)")
    student = args.student or f"toy:{args.toy}/student"
    _, _, _, _, stats = sample_and_score(args.toy, student, args.top_k, args.prompts)
    valid = stats.valid
    index = torch.arange(valid.shape[1])[None].expand_as(valid)
    sum_digit = valid & (index < 10 * task.digits) & (index % 10 == 6)
    p_teacher = stats.teacher_token_logp.exp()
    kinds = {"wrong sum digits": sum_digit & (p_teacher < 0.5), "right sum digits": sum_digit & (p_teacher >= 0.5)}
    r, k = args.budget, args.top_k
    selectors = {
        "teachability (quantile)": TeachabilitySelector(r, k, per_response_floor=False),
        "teachability (min-max)": TeachabilitySelector(r, k, normalization="minmax", per_response_floor=False),
        "entropy": EntropySelector(r, k, per_response_floor=False),
        "divergence": DivergenceSelector(r, k, per_response_floor=False),
        "random": RandomSelector(r, per_response_floor=False),
    }
    kept = {n: s.select(stats, torch.Generator().manual_seed(0)) for n, s in selectors.items()}
    c = stats.compatibility[valid]
    q = [float(torch.quantile(c, x)) for x in (0.05, 0.5, 0.95)]
    print(f"{student} against toy:{args.toy}/teacher, K = {k}, budget {r:g}, {args.prompts} rollouts")
    print(f"C over all positions: q05 {q[0]:.4f}, median {q[1]:.4f}, q95 {q[2]:.4f}; "
          f"C < 0.99 at {float((c < 0.99).float().mean()):.1%} of positions")
    print("| positions | n | mean C | mean D | mean H | " + " | ".join(f"kept by {n}" for n in kept) + " |")
    print("|---|---|---|---|---|" + "---|" * len(kept))
    for name, where in kinds.items():
        n = int(where.sum())
        if not n:
            continue
        shares = " | ".join(f"{float((m & where).sum()) / n:.0%}" for m in kept.values())
        print(f"| {name} | {n} | {float(stats.compatibility[where].mean()):.2f} | {float(stats.disagreement[where].mean()):.2f} "
              f"| {float(stats.topk_entropy[where].mean()):.2f} | {shares} |")
    print("share of each selector's budget on wrong sum digits: "
          + ", ".join(f"{n} {float((m & kinds['wrong sum digits']).sum()) / max(int(m.sum()), 1):.0%}" for n, m in kept.items()))


if __name__ == "__main__":
    main()
