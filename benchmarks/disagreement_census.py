"""Where the toy student and teacher disagree, on the student's own rollouts: the census behind a toy.

    python benchmarks/disagreement_census.py                       # toy:scratch4, K = 4, 256 prompts
    python benchmarks/disagreement_census.py --toy spell2 --top-k 16
    python benchmarks/disagreement_census.py --toy mix4           # the fair long toy (issue 22)

Samples one response per held-out-style prompt with the student (temperature 1, the training engine),
scores every response position with both models (the features of docs/method.md §2), and reports: the
share of high-disagreement positions (top 10% of D) with C < 0.5 (incompatible) and with C > 0.9
(teachable), how concentrated D is over response positions, and the student's greedy and sampled accuracy.
"""

from __future__ import annotations

import argparse

import torch

from opdlab.module import OPDModule
from opdlab.rollout import decode_responses, encode_prompts
from opdlab.selectors import TeachabilitySelector
from opdlab.tasks import ScratchpadAdditionTask
from opdlab.toy import TOYS, make_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--toy", default="scratch4", choices=sorted(TOYS))
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=50)
    args = p.parse_args()
    module = OPDModule(
        student=f"toy:{args.toy}/student",
        teacher=f"toy:{args.toy}/teacher",
        selector=TeachabilitySelector(top_k=args.top_k),
        rollout=dict(max_new_tokens=args.max_new_tokens),
    )
    module.configure_model()
    task = make_task(TOYS[args.toy], 0)
    problems = [task.problem_at(10**6 + i) for i in range(args.prompts)]  # far from the training prompts used
    prompts = encode_prompts(module.tokenizer, [q.prompt for q in problems], [q.answer for q in problems])
    with torch.no_grad():
        rollout = module.rollout(prompts, seeds=list(range(args.prompts)))
        stats = module.token_stats(rollout)
        greedy = module.rollout(prompts, greedy=True)
    valid = stats.valid
    d, c = stats.disagreement[valid], stats.compatibility[valid]
    high = d >= torch.quantile(d, 0.9)
    mass = torch.where(valid, stats.disagreement, 0.0).sum(0)  # total D at each response index
    by_position = mass / valid.sum(0).clamp(min=1)
    share = mass.sort(descending=True).values
    top = int((share.cumsum(0) < 0.8 * share.sum()).sum()) + 1
    heaviest = mass.argsort(descending=True)[:top].tolist()
    accuracy = lambda r: sum(task.verify(t, a) for t, a in zip(decode_responses(module.tokenizer, r), r.answers, strict=True)) / len(r.answers)  # noqa: E731
    print(f"toy {args.toy}, K = {args.top_k}, {args.prompts} student rollouts, {int(valid.sum())} response positions "
          f"(mean length {valid.sum(1).float().mean():.1f})")
    print(f"student accuracy: greedy {accuracy(greedy):.1%}, sampled (temperature 1) {accuracy(rollout):.1%}")
    print(f"high-D positions (top 10% of D): C < 0.5: {float((c[high] < 0.5).float().mean()):.0%}, "
          f"C > 0.9: {float((c[high] > 0.9).float().mean()):.0%}")
    print(f"80% of all D (summed over rollouts) lies on {top} of {len(share)} response indices ({sorted(heaviest)}); "
          "mean D by index:")
    print(" ".join(f"{x:.2f}" for x in by_position.tolist()))
    print("mean C by index:")
    print(" ".join(f"{x:.2f}" for x in (torch.where(valid, stats.compatibility, 0.0).sum(0) / valid.sum(0).clamp(min=1)).tolist()))
    all_d = float(d.sum())
    print(f"share of all D at teachable positions (C >= 0.5): {float(d[c >= 0.5].sum()) / all_d:.0%}; at incompatible "
          f"ones (C < 0.5): {float(d[c < 0.5].sum()) / all_d:.0%}")
    if isinstance(task, ScratchpadAdditionTask):
        scratchpad_roles(task, module, rollout, stats)


ROLES = {0: "first operand", 2: "second operand", 4: "carry in", 6: "sum digit", 7: "carry mark", 8: "carry out"}


def scratchpad_roles(task, module, rollout, stats) -> None:
    """Per role of a scratchpad step (`a+b+c=dcE|`: 10 characters a step): how much of the disagreement is there,
    how teachable, and the teacher's probability of the token the student wrote. At the operand positions this
    measures whether the teacher accepts the student's spelling (its operand order)."""
    valid, ids = stats.valid, rollout.response_ids
    index = torch.arange(valid.shape[1])[None, :].expand_as(valid)
    in_steps = index < 10 * task.digits
    role_of = torch.full_like(index, -1)
    role_of[in_steps] = (index % 10)[in_steps]
    first_digit = module.tokenizer.convert_tokens_to_ids("0")
    is_digit = (ids >= first_digit) & (ids < first_digit + 10)
    d_all = float(stats.disagreement[valid].sum())
    p_teacher = stats.teacher_token_logp.exp()
    is_digit = is_digit | ((role_of == 7) & valid)  # the carry mark ('c' or '=') is not a digit
    print("by role in the scratchpad steps (positions where the student wrote a digit, and the carry mark):")
    print("| role | positions | share of all D | mean D | C < 0.5 | teacher p(student's token): all | step 0 | step 1 "
          "| steps 2+ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for offset, name in ROLES.items():
        where = valid & (role_of == offset) & is_digit
        n = int(where.sum())
        if not n:
            continue
        dd, cc = stats.disagreement[where], stats.compatibility[where]
        by_step = [where & (index // 10 == 0), where & (index // 10 == 1), where & (index >= 20)]
        steps = " | ".join(f"{float(p_teacher[w].mean()):.3f}" if w.any() else "-" for w in by_step)
        print(f"| {name} | {n} | {float(dd.sum()) / d_all:.0%} | {float(dd.mean()):.3f} | "
              f"{float((cc < 0.5).float().mean()):.0%} | {float(p_teacher[where].mean()):.3f} | {steps} |")


if __name__ == "__main__":
    main()
