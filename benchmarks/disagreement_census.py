"""Where the toy student and teacher disagree, on the student's own rollouts: the census behind a toy.

    python benchmarks/disagreement_census.py                       # toy:scratch4, K = 4, 256 prompts
    python benchmarks/disagreement_census.py --toy spell2 --top-k 16
    python benchmarks/disagreement_census.py --toy mix4           # the fair long toy (issue 22)
    python benchmarks/disagreement_census.py --toy mix4 --budget 0.05   # and where each selector's 5% goes

Samples one response per held-out-style prompt with the student (temperature 1, the training engine),
scores every response position with both models (the features of docs/method.md §2), and reports: the
share of high-disagreement positions (top 10% of D) with C < 0.5 (incompatible) and with C > 0.9
(teachable), how concentrated D is over response positions, and the student's greedy and sampled accuracy.
On the scratchpad toys, also by role in the scratchpad; with --budget, where each built-in selector's budget
falls at the start of training (one selection over all the rollouts, no per-response floor, as the long-toy
configs select).
"""

from __future__ import annotations

import argparse

import torch

from opdlab.diagnostics.probe import token_stats
from opdlab.module import OPDModule
from opdlab.rollout import decode_responses, encode_prompts
from opdlab.selectors import (DivergenceSelector, EntropySelector, IncompatibleSelector, RandomSelector,
                              TeachabilitySelector)
from opdlab.tasks import ScratchpadAdditionTask
from opdlab.toy import TOYS, make_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--toy", default="scratch4", choices=sorted(TOYS))
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--student", default=None,
                   help="a student checkpoint to take the census of instead of the toy's (e.g. a run's student/)")
    p.add_argument("--budget", type=float, default=None,
                   help="also report where each selector's kept positions fall at this budget (scratchpad toys)")
    args = p.parse_args()
    module, task, prompts, rollout, stats = sample_and_score(args.toy, args.student, args.top_k, args.prompts,
                                                             args.max_new_tokens)
    with torch.no_grad():
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
        if args.budget is not None:
            budget_by_role(task, module, rollout, stats, args.budget, args.top_k)


def sample_and_score(toy: str, student: str | None, top_k: int, n_prompts: int, max_new_tokens: int = 50):
    """One temperature-1 response per prompt (prompts far from the training ones) from the student (default: the
    toy's), scored against the toy's teacher: (module, task, prompts, rollout, stats)."""
    module = OPDModule(student=student or f"toy:{toy}/student", teacher=f"toy:{toy}/teacher",
                       selector=TeachabilitySelector(top_k=top_k), rollout=dict(max_new_tokens=max_new_tokens))
    module.configure_model()
    task = make_task(TOYS[toy], 0)
    problems = [task.problem_at(10**6 + i) for i in range(n_prompts)]
    prompts = encode_prompts(module.tokenizer, [q.prompt for q in problems], [q.answer for q in problems])
    with torch.no_grad():
        rollout = module.rollout(prompts, seeds=list(range(n_prompts)))
        stats = token_stats(module, rollout)
    return module, task, prompts, rollout, stats


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


def position_kinds(task, module, rollout, valid) -> dict[str, torch.Tensor]:
    """Masks of the kinds of response position in a scratchpad response (`a+b+c=dcE|` steps, then `:` and the
    answer): operand and carry copies, sum digits, carry marks, carry outs, separators, the answer, the end."""
    index = torch.arange(valid.shape[1])[None, :].expand_as(valid)
    steps = valid & (index < 10 * task.digits)
    offset = index % 10
    colon = module.tokenizer.convert_tokens_to_ids(":")
    after = torch.cumsum((rollout.response_ids == colon).long(), 1) > 0  # the ':' and everything after it
    eos = rollout.response_ids == module.tokenizer.eos_token_id
    kinds = {
        "copies (operands, carry in)": steps & ~after & ((offset == 0) | (offset == 2) | (offset == 4)),
        "sum digit": steps & ~after & (offset == 6),
        "carry mark": steps & ~after & (offset == 7),
        "carry out": steps & ~after & (offset == 8),
        "separators (+ = |)": steps & ~after & ((offset == 1) | (offset == 3) | (offset == 5) | (offset == 9)),
        "':' and answer digits": valid & after & ~eos,
        "end of response": valid & eos,
    }
    kinds["after the last step, before ':'"] = valid & ~torch.stack(list(kinds.values())).any(0)
    return kinds


def budget_by_role(task, module, rollout, stats, ratio: float, top_k: int) -> None:
    """The share of each selector's kept positions on each kind of scratchpad position, beside the share of all
    positions and of all D there."""
    kinds = position_kinds(task, module, rollout, stats.valid)
    selectors = {
        "teachability": TeachabilitySelector(ratio, top_k, per_response_floor=False),
        "divergence": DivergenceSelector(ratio, top_k, per_response_floor=False),
        "entropy": EntropySelector(ratio, top_k, per_response_floor=False),
        "incompatible": IncompatibleSelector(ratio, top_k, per_response_floor=False),
        "random": RandomSelector(ratio, per_response_floor=False),
    }
    kept = {name: sel.select(stats, torch.Generator().manual_seed(0)) for name, sel in selectors.items()}
    d = torch.where(stats.valid, stats.disagreement, 0.0)
    print(f"where a {ratio:g} budget falls (one selection over the {stats.valid.shape[0]} rollouts above), share of "
          "kept positions by kind:")
    print("| kind | all positions | all D | " + " | ".join(kept) + " |")
    print("|---|---|---|" + "---|" * len(kept))
    for name, where in kinds.items():
        if not where.any():
            continue
        cells = [f"{float((mask & where).sum()) / max(int(mask.sum()), 1):.0%}" for mask in kept.values()]
        print(f"| {name} | {float(where.sum()) / float(stats.valid.sum()):.0%} | {float(d[where].sum()) / float(d.sum()):.0%} | "
              + " | ".join(cells) + " |")
    print("kept positions: " + ", ".join(f"{n} {int(m.sum())}" for n, m in kept.items()))


if __name__ == "__main__":
    main()
